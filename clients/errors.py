"""The errors the SDK raises: openai's own classes, also under the names this SDK has always used.

``GemServeError`` is ``openai.OpenAIError``, the root. A 4xx/5xx answer is an ``APIStatusError``
subclass (``status_code``, ``request_id``, ``message``, ``body`` = the server's ``error`` object);
no answer is ``APIConnectionError`` (or ``APITimeoutError``); an error event inside a stream is
openai's ``APIError`` (``StreamError`` here), the base of both.
"""

from openai import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    UnprocessableEntityError,
)
from openai import OpenAIError as GemServeError

StreamError = APIError

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "GemServeError",
    "InternalServerError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "StreamError",
    "UnprocessableEntityError",
]
