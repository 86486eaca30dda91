"""What the sync and async clients share: configuration, the retry policy, request bodies and
response parsing.

No I/O here: the clients in ``sdk.py`` send what this module builds, so the retry rules and
the body rules are written once.
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict, TypeVar

import httpx
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ValidationError

from clients.errors import APIResponseValidationError
from server.protocol import ChatMessage, CompressionParams

logger = logging.getLogger("clients.sdk")

# ---- retry policy (openai-python's numbers) -----------------------------------------------------
DEFAULT_MAX_RETRIES = 2
INITIAL_RETRY_DELAY_S = 0.5
MAX_RETRY_DELAY_S = 8.0
# A server's Retry-After is honoured up to this ceiling; beyond it we fall back to our backoff
# rather than let a misbehaving server park the client for an hour.
MAX_RETRY_AFTER_S = 60.0
RETRY_JITTER = 0.25  # each backoff delay is shortened by up to 25% so clients do not retry in lockstep

DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=5.0)  # long prompts take minutes to prefill on CPU
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
BASE_URL_ENV = "GEMSERVE_BASE_URL"
API_KEY_ENV = "GEMSERVE_API_KEY"
REQUEST_ID_HEADER = "X-Request-Id"

TimeoutLike = float | httpx.Timeout | None
CompressionLike = CompressionParams | Mapping[str, Any] | None
MessageLike = ChatMessage | Mapping[str, Any]
ModelT = TypeVar("ModelT", bound=BaseModel)


def resolve_base_url(base_url: str | None) -> str:
    """Argument, else ``GEMSERVE_BASE_URL``, else loopback; the server root (a trailing ``/v1`` is dropped
    so an OpenAI-style base URL works too)."""
    url = (base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must start with http:// or https://, got {url!r}")
    return url.removesuffix("/v1")


def resolve_api_key(api_key: str | None) -> str | None:
    return api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None


def as_timeout(timeout: TimeoutLike) -> httpx.Timeout:
    if timeout is None:
        return DEFAULT_TIMEOUT
    return timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


# ---- retries -----------------------------------------------------------------------------------
def should_retry(status_code: int) -> bool:
    """429 (queue full) and 5xx are transient; other 4xx are the caller's to fix."""
    return status_code == 429 or status_code >= 500


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """The server's requested wait (``retry-after-ms``, ``Retry-After`` seconds or HTTP date), if any."""
    if not headers:
        return None
    lowered = {key.lower(): value for key, value in headers.items()}
    if "retry-after-ms" in lowered:
        try:
            return float(lowered["retry-after-ms"]) / 1000.0
        except ValueError:
            pass
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return when.timestamp() - time.time()


def retry_delay(attempt: int, headers: Mapping[str, str] | None = None) -> float:
    """Seconds to wait before retry number ``attempt + 1`` (``attempt`` counts from 0)."""
    requested = retry_after_seconds(headers)
    if requested is not None and 0 <= requested <= MAX_RETRY_AFTER_S:
        return requested
    backoff = min(INITIAL_RETRY_DELAY_S * 2**attempt, MAX_RETRY_DELAY_S)
    return backoff * (1 - RETRY_JITTER * random.random())


@dataclass(frozen=True)
class CallOptions:
    """Per-call overrides of the client's defaults (``None`` = the client's)."""

    timeout: TimeoutLike = None
    max_retries: int | None = None
    extra_headers: Mapping[str, str] | None = None


# ---- request bodies ----------------------------------------------------------------------------
def compression_body(compression: CompressionLike) -> dict[str, Any] | None:
    """Validate ``compression`` (model or dict) against the shared schema; the dict to send."""
    if compression is None:
        return None
    if not isinstance(compression, CompressionParams):
        compression = CompressionParams.model_validate(compression)
    return compression.model_dump(exclude_unset=True, exclude_none=True)  # only what the caller set


def message_body(messages: Iterable[MessageLike]) -> list[dict[str, Any]]:
    out = []
    for message in messages:
        model = message if isinstance(message, ChatMessage) else ChatMessage.model_validate(message)
        out.append(model.model_dump(exclude_none=True))
    if not out:
        raise ValueError("messages must hold at least one message")
    return out


class RequestOptions(TypedDict, total=False):
    """Per-call overrides every call accepts (absent: the client's defaults)."""

    extra_headers: Mapping[str, str] | None
    timeout: TimeoutLike
    max_retries: int | None


class SamplingParams(RequestOptions, total=False):
    """OpenAI's fields (``None`` or absent: the server's default) plus GemServe's extensions."""

    model: str | None
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    stop: str | list[str] | None
    seed: int | None
    stream_options: Mapping[str, Any] | None
    user: str | None
    compression: CompressionLike  # GemServe: a CompressionParams or a dict, validated before sending
    ignore_eos: bool | None  # GemServe: generate exactly max_tokens
    extra_body: Mapping[str, Any] | None  # merged into the JSON body last


class ChatParams(SamplingParams, total=False):
    max_completion_tokens: int | None


def split_params(
    fields: dict[str, Any], params: Mapping[str, Any], allowed: frozenset[str]
) -> tuple[dict[str, Any], CallOptions]:
    """The JSON body and the call options of one ``create()`` call; unknown keywords are a TypeError,
    as they would be for an ordinary signature."""
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise TypeError(f"create() got unexpected keyword argument(s): {', '.join(unknown)}")
    params = dict(params)
    options = CallOptions(
        timeout=params.pop("timeout", None),
        max_retries=params.pop("max_retries", None),
        extra_headers=params.pop("extra_headers", None),
    )
    extra_body = params.pop("extra_body", None)
    return request_body({**fields, **params}, extra_body), options


def request_body(fields: Mapping[str, Any], extra_body: Mapping[str, Any] | None) -> dict[str, Any]:
    """The JSON body: given fields only (``None`` means "server default"), then ``extra_body``."""
    body = {key: value for key, value in fields.items() if value is not None}
    if "compression" in body:
        body["compression"] = compression_body(body["compression"])
    if body.get("stream") and "stream_options" not in body:
        # The final chunk carries usage, compression and metrics only when usage is asked for.
        body["stream_options"] = {"include_usage": True}
    if not body.get("stream"):
        body.pop("stream", None)
    body.update(extra_body or {})
    return body


def parse_model(model_type: type[ModelT], response: httpx.Response, request_id: str | None) -> ModelT:
    try:
        return model_type.model_validate(response.json())
    except (ValueError, ValidationError) as exc:
        raise APIResponseValidationError(
            f"unexpected {model_type.__name__} body: {exc}", request_id=request_id, body=response.text
        ) from exc


# ---- client core ---------------------------------------------------------------------------------
class MetricsSnapshot:
    """``GET /metrics`` parsed with prometheus_client's own text parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families: dict[str, Metric] = {family.name: family for family in text_string_to_metric_families(text)}

    def value(self, sample_name: str, **labels: str) -> float | None:
        """The value of the sample named ``sample_name`` whose labels include ``labels``."""
        for family in self.families.values():
            for sample in family.samples:
                if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return None

    def __contains__(self, family_name: object) -> bool:
        return family_name in self.families


class ClientCore:
    """Configuration and request building shared by both clients."""

    def __init__(self, base_url: str | None, api_key: str | None, timeout: TimeoutLike, max_retries: int) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.base_url = resolve_base_url(base_url)
        self.api_key = resolve_api_key(api_key)
        self.timeout = as_timeout(timeout)
        self.max_retries = max_retries

    def _headers(self, request_id: str, options: CallOptions) -> dict[str, str]:
        headers = {"Accept": "application/json", REQUEST_ID_HEADER: request_id}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        headers.update(options.extra_headers or {})
        return headers

    def _request_kwargs(
        self, method: str, path: str, body: Mapping[str, Any] | None, options: CallOptions, request_id: str
    ) -> dict[str, Any]:
        timeout = self.timeout if options.timeout is None else as_timeout(options.timeout)
        return {
            "method": method,
            "url": self.base_url + path,
            "json": body,
            "headers": self._headers(request_id, options),
            "timeout": timeout,
        }

    def _retries(self, options: CallOptions) -> int:
        return self.max_retries if options.max_retries is None else options.max_retries

    @staticmethod
    def _log_retry(request_id: str, attempt: int, delay: float, reason: str) -> None:
        logger.info("request %s: %s; retry %d in %.2f s", request_id, reason, attempt + 1, delay)


def json_or_status(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {"status": response.text.strip()}
    return data if isinstance(data, dict) else {"status": data}
