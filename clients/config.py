"""Where the clients point by default: light (no openai import) so ``gemserve``'s CLI stays fast."""

from __future__ import annotations

import os

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
BASE_URL_ENV = "GEMSERVE_BASE_URL"
API_KEY_ENV = "GEMSERVE_API_KEY"


def resolve_base_url(base_url: str | None) -> str:
    """Argument, else ``GEMSERVE_BASE_URL``, else loopback; the server root (a trailing ``/v1`` is dropped
    so an OpenAI-style base URL works too)."""
    url = (base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must start with http:// or https://, got {url!r}")
    return url.removesuffix("/v1")


def resolve_api_key(api_key: str | None) -> str:
    """Argument, else ``GEMSERVE_API_KEY``, else none (``""``: no Authorization header; never ``OPENAI_API_KEY``)."""
    return api_key if api_key is not None else os.environ.get(API_KEY_ENV, "")
