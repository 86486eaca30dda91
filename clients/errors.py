"""Every error the SDK raises, in one place (openai-python's shape).

``GemServeError`` is the root. A response with a 4xx/5xx status becomes an ``APIStatusError``
subclass carrying the status code, the request id and the server's message and body; a request
that never got a response becomes ``APIConnectionError`` (or ``APITimeoutError``).
"""

from __future__ import annotations

from typing import Any

import httpx

__all__ = [
    "APIConnectionError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "GemServeError",
    "InternalServerError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "StreamError",
    "UnprocessableEntityError",
    "connection_error",
    "error_message",
    "status_error",
]


class GemServeError(Exception):
    """Base of every SDK error."""


class APIStatusError(GemServeError):
    """The server answered with an error status."""

    def __init__(self, message: str, *, status_code: int, request_id: str | None, body: Any = None) -> None:
        super().__init__(f"Error code: {status_code} - {message}")
        self.message = message
        self.status_code = status_code
        self.request_id = request_id
        self.body = body


class BadRequestError(APIStatusError):
    """400: the request was invalid (unknown method, bad knob, prompt too long...)."""


class AuthenticationError(APIStatusError):
    """401: missing or wrong API key."""


class PermissionDeniedError(APIStatusError):
    """403."""


class NotFoundError(APIStatusError):
    """404: unknown route or model."""


class UnprocessableEntityError(APIStatusError):
    """422: the body failed schema validation."""


class RateLimitError(APIStatusError):
    """429: the server's queue is full; retried by default."""


class InternalServerError(APIStatusError):
    """5xx; retried by default."""


class APIConnectionError(GemServeError):
    """No response: connection refused, reset, DNS..."""

    def __init__(self, message: str = "Connection error.", *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id


class APITimeoutError(APIConnectionError):
    """The request timed out."""

    def __init__(self, message: str = "Request timed out.", *, request_id: str | None = None) -> None:
        super().__init__(message, request_id=request_id)


class APIResponseValidationError(GemServeError):
    """A 2xx response whose body is not what the API promises."""

    def __init__(self, message: str, *, request_id: str | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.body = body


class StreamError(GemServeError):
    """The server reported an error inside an event stream (after the 200 status)."""

    def __init__(self, message: str, *, request_id: str | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.body = body


_STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def error_message(body: Any, fallback: str) -> str:
    """The human message in an error body: OpenAI's ``{"error": {"message"}}`` or FastAPI's ``{"detail"}``."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if "detail" in body:
            return str(body["detail"])
        if body.get("message"):
            return str(body["message"])
    if isinstance(body, str) and body:
        return body
    return fallback


def status_error(response: httpx.Response, request_id: str | None) -> APIStatusError:
    """The exception for an error response (its body must already be read)."""
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    message = error_message(body, response.reason_phrase or f"HTTP {response.status_code}")
    status = response.status_code
    error_class = InternalServerError if status >= 500 else _STATUS_ERRORS.get(status, APIStatusError)
    request_id = response.headers.get("x-request-id") or request_id
    return error_class(message, status_code=status, request_id=request_id, body=body)


def connection_error(exc: httpx.TransportError, request_id: str | None) -> APIConnectionError:
    """The SDK error for an httpx transport failure (before or during a response)."""
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(request_id=request_id)
    return APIConnectionError(f"Connection error: {exc}", request_id=request_id)
