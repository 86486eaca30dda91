"""One mapping from exception type to HTTP status and OpenAI-style error body.

Every error leaves the server as ``{"error": {"message", "type", "param", "code"}}``. The
handlers are registered once in :func:`register_error_handlers`; the request-id middleware
(server/app.py) uses :func:`error_for_exception` for anything that escapes them (-> 500).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from contract.protocol import ErrorResponse
from server.engine.base import EngineNotReadyError, QueueFullError
from server.engine.types import RequestError

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error the web layer raises itself, with its status and OpenAI error type."""

    status_code = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class AuthenticationError(APIError):
    status_code = 401
    error_type = "authentication_error"


class UnknownModelError(APIError):
    status_code = 404
    error_type = "not_found_error"


# An error quotes the client's input cut to this many characters: a 1 MB method name must not
# come back as a 1 MB error body. (Sources quote with ``short_repr``; this caps whatever slips by.)
MAX_MESSAGE_CHARS = 1000


def truncated(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 15] + "... (truncated)"


@dataclass
class ErrorSpec:
    """What an exception becomes on the wire."""

    status: int
    type: str
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        param = truncated(self.param, 200) if self.param else self.param
        return {"error": {"message": truncated(self.message), "type": self.type, "param": param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers or None)


def error_for_exception(exc: BaseException, request_id: str | None = None) -> ErrorSpec:
    """The single exception -> status table. Only errors that say the client is at fault are 4xx;
    anything else (a plain ``ValueError`` from an invariant broken inside the engine included) is a
    500 naming the request id its logged traceback is filed under."""
    if isinstance(exc, APIError):
        return ErrorSpec(exc.status_code, exc.error_type, str(exc), exc.param, exc.code)
    if isinstance(exc, RequestValidationError):
        return validation_error(exc.errors())
    if isinstance(exc, QueueFullError):
        return ErrorSpec(
            429, "rate_limit_error", str(exc), code="queue_full", headers={"Retry-After": str(exc.retry_after_s)}
        )
    if isinstance(exc, EngineNotReadyError):
        return ErrorSpec(503, "service_unavailable", str(exc), code="not_ready", headers={"Retry-After": "1"})
    if isinstance(exc, RequestError):
        return ErrorSpec(400, "invalid_request_error", str(exc), exc.param, exc.code)
    if isinstance(exc, StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        code = "request_too_large" if exc.status_code == 413 else None  # server/guards.py
        return ErrorSpec(
            exc.status_code, http_error_type(exc.status_code), message, code=code, headers=dict(exc.headers or {})
        )
    # Never leak internals: the log has the traceback, keyed by the request id.
    where = f" under request id {request_id}" if request_id else ""
    return ErrorSpec(500, "internal_error", f"internal server error; the server log has the details{where}")


def validation_error(errors: Sequence[Any]) -> ErrorSpec:
    """400 naming the field(s): ``messages: Field required``; a body that is no JSON object at all
    is said so, not reported as a field."""
    body_problem = next((message for message in map(body_error, errors) if message), None)
    if body_problem is not None:
        return ErrorSpec(400, "invalid_request_error", body_problem)
    located = [(error_param(error), error) for error in errors]
    # A union field reports every member's failure: "content: Input should be a valid string" beside
    # "content.0.text: <the real problem>". A wrong-type error is dropped where another error at the
    # same field or inside it says more.
    located = [
        (param, error)
        for param, error in located
        if not (is_type_error(error) and any(says_more(other, param) for other in located if other[1] is not error))
    ]
    parts: list[str] = []
    first_param = None
    for param, error in located:
        first_param = first_param or param
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        part = f"{param}: {message}" if param else message
        if part not in parts:
            parts.append(part)
    return ErrorSpec(400, "invalid_request_error", "; ".join(parts) or "invalid request", first_param)


def error_param(error: Any) -> str | None:
    """``messages.0.content``: the field an error is at, without FastAPI's location kind and
    pydantic's union-member tags ("constrained-str", "list[int]"), which are not field names."""
    loc = [str(p) for p in error.get("loc", ()) if p not in ("body", "query", "header", "path")]
    loc = [p for p in loc if not UNION_TAG.search(p)]
    # A model-level check names its field itself (protocol.FieldError).
    return ".".join(loc) or getattr((error.get("ctx") or {}).get("error"), "param", None)


def is_type_error(error: Any) -> bool:
    """pydantic's "Input should be a valid <type>" errors (string_type, list_type, model_type...)."""
    return str(error.get("type", "")).endswith("_type")


def says_more(other: tuple[str | None, Any], param: str | None) -> bool:
    other_param, other_error = other
    if is_type_error(other_error) or param is None or other_param is None:
        return False
    return other_param == param or other_param.startswith(f"{param}.")


UNION_TAG = re.compile(r"[\[\-]")
JSON_BODY = "send one JSON object with Content-Type: application/json"


def body_error(error: Any) -> str | None:
    """What is wrong with the body as a whole (FastAPI reports it at location ``body``), or None:
    unparsable JSON (FastAPI puts the character offset where a field name goes), an empty body,
    a body FastAPI did not parse as JSON (another Content-Type) or JSON that is not an object."""
    loc = tuple(error.get("loc", ()))
    if error.get("type") == "json_invalid":
        reason = (error.get("ctx") or {}).get("error", "JSON decode error")
        where = f" at character {loc[1]}" if len(loc) > 1 else ""
        return f"the request body is not valid JSON ({reason}{where}); {JSON_BODY}"
    if loc != ("body",):
        return None
    if error.get("type") == "missing":
        return f"the request body is empty; {JSON_BODY}"
    if not isinstance(error.get("input"), dict):
        return f"the request body is not a JSON object; {JSON_BODY}"
    return None


def http_error_type(status: int) -> str:
    return {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error"}.get(
        status, "invalid_request_error" if status < 500 else "internal_error"
    )


async def handle_exception(request: Request, exc: Exception) -> JSONResponse:
    spec = error_for_exception(exc, getattr(request.state, "request_id", None))
    if spec.status >= 500 and spec.status != 503:
        logger.error("request %s failed", getattr(request.state, "request_id", "-"), exc_info=exc)
    return spec.response()


def register_error_handlers(app: FastAPI) -> None:
    for exc_type in (
        APIError,
        RequestValidationError,
        QueueFullError,
        EngineNotReadyError,
        RequestError,
        StarletteHTTPException,
    ):
        app.add_exception_handler(exc_type, handle_exception)


# OpenAPI: the error statuses a generation route can answer with, documented once.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request (field, context length, method or knob)"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "Unknown model"},
    413: {"model": ErrorResponse, "description": "Request body larger than the server's limit"},
    429: {"model": ErrorResponse, "description": "Queue full; see Retry-After"},
    500: {"model": ErrorResponse, "description": "Internal error; the server log has it under the X-Request-Id"},
    503: {"model": ErrorResponse, "description": "Model still loading or server shutting down"},
}
