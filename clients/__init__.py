"""GemServe clients: the Python SDK (the openai client plus GemServe's extensions) and the load tester; no torch."""
