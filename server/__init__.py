"""GemServe: the serving layer (engine, HTTP API, CLI)."""
