"""The GemServe Python SDK: ``GemServe`` (sync) and ``AsyncGemServe`` on httpx.

    with GemServe() as client:                      # GEMSERVE_BASE_URL / GEMSERVE_API_KEY or args
        reply = client.chat.completions.create(
            messages=[{"role": "user", "content": long_text}],
            compression={"method": "gemfilter", "budget": 1024},
        )
        print(reply.choices[0].message.content, reply.compression.kept_tokens)

Responses are the server's own pydantic models (``server/protocol.py``), so they never drift
from what the server sends. Errors come from ``clients/errors.py``; retries follow ``_base.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, overload

import httpx

from clients._base import (
    DEFAULT_MAX_RETRIES,
    REQUEST_ID_HEADER,
    CallOptions,
    ChatParams,
    ClientCore,
    MessageLike,
    MetricsSnapshot,
    ModelT,
    RequestOptions,
    SamplingParams,
    TimeoutLike,
    json_or_status,
    message_body,
    new_request_id,
    parse_model,
    request_body,
    retry_delay,
    should_retry,
    split_params,
)
from clients.errors import InternalServerError, connection_error, status_error
from clients.streaming import AsyncStream, Stream
from server.protocol import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionResponse,
    ModelList,
    TokenizeResponse,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["AsyncGemServe", "ChatParams", "GemServe", "MetricsSnapshot", "SamplingParams"]

PromptLike = str | list[str] | list[int] | list[list[int]]
COMPLETIONS_PATH = "/v1/completions"
CHAT_PATH = "/v1/chat/completions"
COMPLETION_KEYS = SamplingParams.__optional_keys__
CHAT_KEYS = ChatParams.__optional_keys__


# ---- sync -------------------------------------------------------------------------------------
class GemServe(ClientCore):
    """Synchronous client. ``timeout``/``max_retries`` here are defaults every call may override."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: TimeoutLike = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries)
        self._http = http_client or httpx.Client(timeout=self.timeout)
        self.completions = Completions(self)
        self.chat = Chat(self)

    def _send(
        self, method: str, path: str, body: Mapping[str, Any] | None, options: CallOptions, stream: bool = False
    ) -> tuple[httpx.Response, str]:
        """Send with retries (one request id for every attempt); the successful response."""
        request_id, retries = new_request_id(), self._retries(options)
        for attempt in range(retries + 1):
            request = self._http.build_request(**self._request_kwargs(method, path, body, options, request_id))
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if attempt >= retries:
                    raise connection_error(exc, request_id) from exc
                delay = retry_delay(attempt)
                self._log_retry(request_id, attempt, delay, type(exc).__name__)
                time.sleep(delay)
                continue
            if response.is_success:
                return response, response.headers.get(REQUEST_ID_HEADER, request_id)
            response.read()
            response.close()
            if attempt >= retries or not should_retry(response.status_code):
                raise status_error(response, request_id)
            delay = retry_delay(attempt, response.headers)
            self._log_retry(request_id, attempt, delay, f"HTTP {response.status_code}")
            time.sleep(delay)
        raise AssertionError("unreachable: the loop returns or raises")

    def _call(self, method: str, path: str, model_type: type[ModelT], body: Any, options: CallOptions) -> ModelT:
        response, request_id = self._send(method, path, body, options)
        return parse_model(model_type, response, request_id)

    def _stream(self, path: str, body: Mapping[str, Any], chunk_type: type[Any], options: CallOptions) -> Stream[Any]:
        response, request_id = self._send("POST", path, body, options, stream=True)
        return Stream(response, chunk_type, request_id)

    def models(self, **options: Unpack[RequestOptions]) -> ModelList:
        return self._call("GET", "/v1/models", ModelList, None, CallOptions(**options))

    def tokenize(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[MessageLike] | None = None,
        model: str | None = None,
        **options: Unpack[RequestOptions],
    ) -> TokenizeResponse:
        """Token ids of ``prompt`` (no chat template) or of ``messages`` (with it): exactly one of them."""
        body = request_body({"model": model, "prompt": prompt}, None)
        if messages is not None:
            body["messages"] = message_body(messages)
        return self._call("POST", "/tokenize", TokenizeResponse, body, CallOptions(**options))

    def health(self, **options: Unpack[RequestOptions]) -> dict[str, Any]:
        response, _ = self._send("GET", "/health", None, CallOptions(**options))
        return json_or_status(response)

    def ready(self, **options: Unpack[RequestOptions]) -> bool:
        """True once the model is loaded; False while the server answers 503 (not retried)."""
        options.setdefault("max_retries", 0)
        try:
            self._send("GET", "/ready", None, CallOptions(**options))
        except InternalServerError as exc:
            if exc.status_code != 503:
                raise
            return False
        return True

    def metrics(self, **options: Unpack[RequestOptions]) -> MetricsSnapshot:
        response, _ = self._send("GET", "/metrics", None, CallOptions(**options))
        return MetricsSnapshot(response.text)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> GemServe:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Completions:
    def __init__(self, client: GemServe) -> None:
        self._client = client

    @overload
    def create(
        self, *, prompt: PromptLike, stream: Literal[False] = False, **params: Unpack[SamplingParams]
    ) -> CompletionResponse: ...
    @overload
    def create(
        self, *, prompt: PromptLike, stream: Literal[True], **params: Unpack[SamplingParams]
    ) -> Stream[CompletionChunk]: ...
    def create(
        self, *, prompt: PromptLike, stream: bool = False, **params: Unpack[SamplingParams]
    ) -> CompletionResponse | Stream[CompletionChunk]:
        """``POST /v1/completions``; with ``stream=True`` a ``Stream`` of ``CompletionChunk``.
        Keywords: see ``SamplingParams`` (OpenAI's fields, ``compression``, per-call options)."""
        body, options = split_params({"prompt": prompt, "stream": stream}, params, COMPLETION_KEYS)
        if stream:
            return self._client._stream(COMPLETIONS_PATH, body, CompletionChunk, options)
        return self._client._call("POST", COMPLETIONS_PATH, CompletionResponse, body, options)


class ChatCompletions:
    def __init__(self, client: GemServe) -> None:
        self._client = client

    @overload
    def create(
        self, *, messages: Iterable[MessageLike], stream: Literal[False] = False, **params: Unpack[ChatParams]
    ) -> ChatCompletionResponse: ...
    @overload
    def create(
        self, *, messages: Iterable[MessageLike], stream: Literal[True], **params: Unpack[ChatParams]
    ) -> Stream[ChatCompletionChunk]: ...
    def create(
        self, *, messages: Iterable[MessageLike], stream: bool = False, **params: Unpack[ChatParams]
    ) -> ChatCompletionResponse | Stream[ChatCompletionChunk]:
        """``POST /v1/chat/completions``; with ``stream=True`` a ``Stream`` of ``ChatCompletionChunk``.
        Keywords: see ``ChatParams`` (OpenAI's fields, ``compression``, per-call options)."""
        body, options = split_params({"messages": message_body(messages), "stream": stream}, params, CHAT_KEYS)
        if stream:
            return self._client._stream(CHAT_PATH, body, ChatCompletionChunk, options)
        return self._client._call("POST", CHAT_PATH, ChatCompletionResponse, body, options)


class Chat:
    def __init__(self, client: GemServe) -> None:
        self.completions = ChatCompletions(client)


# ---- async ------------------------------------------------------------------------------------
class AsyncGemServe(ClientCore):
    """Asynchronous client: the same calls as ``GemServe``, awaited."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: TimeoutLike = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries)
        self._http = http_client or httpx.AsyncClient(timeout=self.timeout)
        self.completions = AsyncCompletions(self)
        self.chat = AsyncChat(self)

    async def _send(
        self, method: str, path: str, body: Mapping[str, Any] | None, options: CallOptions, stream: bool = False
    ) -> tuple[httpx.Response, str]:
        request_id, retries = new_request_id(), self._retries(options)
        for attempt in range(retries + 1):
            request = self._http.build_request(**self._request_kwargs(method, path, body, options, request_id))
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if attempt >= retries:
                    raise connection_error(exc, request_id) from exc
                delay = retry_delay(attempt)
                self._log_retry(request_id, attempt, delay, type(exc).__name__)
                await asyncio.sleep(delay)
                continue
            if response.is_success:
                return response, response.headers.get(REQUEST_ID_HEADER, request_id)
            await response.aread()
            await response.aclose()
            if attempt >= retries or not should_retry(response.status_code):
                raise status_error(response, request_id)
            delay = retry_delay(attempt, response.headers)
            self._log_retry(request_id, attempt, delay, f"HTTP {response.status_code}")
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the loop returns or raises")

    async def _call(self, method: str, path: str, model_type: type[ModelT], body: Any, options: CallOptions) -> ModelT:
        response, request_id = await self._send(method, path, body, options)
        return parse_model(model_type, response, request_id)

    async def _stream(
        self, path: str, body: Mapping[str, Any], chunk_type: type[Any], options: CallOptions
    ) -> AsyncStream[Any]:
        response, request_id = await self._send("POST", path, body, options, stream=True)
        return AsyncStream(response, chunk_type, request_id)

    async def models(self, **options: Unpack[RequestOptions]) -> ModelList:
        return await self._call("GET", "/v1/models", ModelList, None, CallOptions(**options))

    async def tokenize(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[MessageLike] | None = None,
        model: str | None = None,
        **options: Unpack[RequestOptions],
    ) -> TokenizeResponse:
        body = request_body({"model": model, "prompt": prompt}, None)
        if messages is not None:
            body["messages"] = message_body(messages)
        return await self._call("POST", "/tokenize", TokenizeResponse, body, CallOptions(**options))

    async def health(self, **options: Unpack[RequestOptions]) -> dict[str, Any]:
        response, _ = await self._send("GET", "/health", None, CallOptions(**options))
        return json_or_status(response)

    async def ready(self, **options: Unpack[RequestOptions]) -> bool:
        options.setdefault("max_retries", 0)
        try:
            await self._send("GET", "/ready", None, CallOptions(**options))
        except InternalServerError as exc:
            if exc.status_code != 503:
                raise
            return False
        return True

    async def metrics(self, **options: Unpack[RequestOptions]) -> MetricsSnapshot:
        response, _ = await self._send("GET", "/metrics", None, CallOptions(**options))
        return MetricsSnapshot(response.text)

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncGemServe:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class AsyncCompletions:
    def __init__(self, client: AsyncGemServe) -> None:
        self._client = client

    @overload
    async def create(
        self, *, prompt: PromptLike, stream: Literal[False] = False, **params: Unpack[SamplingParams]
    ) -> CompletionResponse: ...
    @overload
    async def create(
        self, *, prompt: PromptLike, stream: Literal[True], **params: Unpack[SamplingParams]
    ) -> AsyncStream[CompletionChunk]: ...
    async def create(
        self, *, prompt: PromptLike, stream: bool = False, **params: Unpack[SamplingParams]
    ) -> CompletionResponse | AsyncStream[CompletionChunk]:
        body, options = split_params({"prompt": prompt, "stream": stream}, params, COMPLETION_KEYS)
        if stream:
            return await self._client._stream(COMPLETIONS_PATH, body, CompletionChunk, options)
        return await self._client._call("POST", COMPLETIONS_PATH, CompletionResponse, body, options)


class AsyncChatCompletions:
    def __init__(self, client: AsyncGemServe) -> None:
        self._client = client

    @overload
    async def create(
        self, *, messages: Iterable[MessageLike], stream: Literal[False] = False, **params: Unpack[ChatParams]
    ) -> ChatCompletionResponse: ...
    @overload
    async def create(
        self, *, messages: Iterable[MessageLike], stream: Literal[True], **params: Unpack[ChatParams]
    ) -> AsyncStream[ChatCompletionChunk]: ...
    async def create(
        self, *, messages: Iterable[MessageLike], stream: bool = False, **params: Unpack[ChatParams]
    ) -> ChatCompletionResponse | AsyncStream[ChatCompletionChunk]:
        body, options = split_params({"messages": message_body(messages), "stream": stream}, params, CHAT_KEYS)
        if stream:
            return await self._client._stream(CHAT_PATH, body, ChatCompletionChunk, options)
        return await self._client._call("POST", CHAT_PATH, ChatCompletionResponse, body, options)


class AsyncChat:
    def __init__(self, client: AsyncGemServe) -> None:
        self.completions = AsyncChatCompletions(client)
