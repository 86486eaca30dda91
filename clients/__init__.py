"""GemServe clients: the Python SDK, the load tester and needle workloads (no torch here)."""
