"""The checks every request passes before any route runs: the API key and the body size.

Both are pure ASGI middleware (no buffering; SSE passes straight through) so that they hold for
every path, including ones no route matches: a 404 or 405 answers 401 without the key like any
other route, and nothing is read past the body limit.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import ErrorSpec
from server.viewer import VIEWER_PATHS

# Open without a key: liveness and readiness probes (``/ready`` says more only with the key) and
# the viewer page, which holds no data and asks the user for the key its API calls send.
OPEN_PATHS = frozenset({"/health", "/ready", *VIEWER_PATHS})
# The default body limit: bytes per token of context (token-id lists, escaped non-ASCII text
# and pretty-printed JSON all fit well within it), and never below 1 MiB.
BODY_BYTES_PER_CONTEXT_TOKEN = 64
MIN_BODY_LIMIT = 1 << 20


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


def bearer_token(scope: Scope) -> bytes | None:
    """The token of ``Authorization: Bearer <token>`` exactly as sent (RFC 6750: one space after a
    case-insensitive scheme; nothing trimmed, so whitespace around a key is a different key)."""
    value = header(scope, b"authorization")
    if value is None or value[:7].lower() != b"bearer ":
        return None
    return value[7:]


class ApiKeyMiddleware:
    """With an API key set, every path but :data:`OPEN_PATHS` answers 401 without it.

    ``scope["state"]["authenticated"]`` tells a route (``/ready``) whether the caller showed the key.
    """

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.expected = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        authenticated, problem = self.check(scope)
        scope.setdefault("state", {})["authenticated"] = authenticated
        if not authenticated and scope.get("path") not in OPEN_PATHS:
            code, message = problem
            await ErrorSpec(401, "authentication_error", message, code=code).response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def check(self, scope: Scope) -> tuple[bool, tuple[str, str]]:
        if self.expected is None:
            return True, ("", "")
        token = bearer_token(scope)
        if not token:
            return False, ("missing_api_key", "missing API key: send 'Authorization: Bearer <key>'")
        if not hmac.compare_digest(token, self.expected):  # constant time
            return False, ("invalid_api_key", "invalid API key")
        return True, ("", "")


class BodyLimitMiddleware:
    """413 for a body over ``limit()`` bytes: at once from ``Content-Length``, or as soon as a
    chunked body passes the limit (the rest is never read)."""

    def __init__(self, app: ASGIApp, limit: Callable[[], int]) -> None:
        self.app = app
        self.limit = limit  # a callable: the engine's context is known only once it has loaded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        declared = header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await too_large(limit).response()(scope, receive, send)
            return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # FastAPI lets an HTTPException from reading the body through as it is.
                    raise HTTPException(413, detail=too_large(limit).message)
            return message

        await self.app(scope, counted_receive, send)


def too_large(limit: int) -> ErrorSpec:
    return ErrorSpec(
        413,
        "invalid_request_error",
        f"request body is larger than this server's limit of {limit} bytes",
        code="request_too_large",
    )


def default_body_limit(max_model_len: int | None) -> int:
    if max_model_len is None:
        return MIN_BODY_LIMIT
    return max(MIN_BODY_LIMIT, BODY_BYTES_PER_CONTEXT_TOKEN * max_model_len)
