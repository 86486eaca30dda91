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
from typing import Any

import httpx

from clients._base import (
    DEFAULT_MAX_RETRIES,
    REQUEST_ID_HEADER,
    CallOptions,
    ClientCore,
    CompressionLike,
    MessageLike,
    MetricsSnapshot,
    ModelT,
    TimeoutLike,
    json_or_status,
    message_body,
    new_request_id,
    parse_model,
    request_body,
    retry_delay,
    should_retry,
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

__all__ = ["AsyncGemServe", "GemServe", "MetricsSnapshot"]

PromptLike = str | list[str] | list[int] | list[list[int]]
StopLike = str | list[str] | None


def _completion_fields(prompt: PromptLike, **fields: Any) -> dict[str, Any]:
    return {"prompt": prompt, **fields}


def _chat_fields(messages: Iterable[MessageLike], **fields: Any) -> dict[str, Any]:
    return {"messages": message_body(messages), **fields}


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

    def _call(self, method: str, path: str, model_type: type[ModelT], body: Any = None, **options: Any) -> ModelT:
        response, request_id = self._send(method, path, body, CallOptions(**options))
        return parse_model(model_type, response, request_id)

    def _stream(self, path: str, body: Mapping[str, Any], chunk_type: type[Any], options: CallOptions) -> Stream[Any]:
        response, request_id = self._send("POST", path, body, options, stream=True)
        return Stream(response, chunk_type, request_id)

    def models(self, **options: Any) -> ModelList:
        return self._call("GET", "/v1/models", ModelList, **options)

    def tokenize(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[MessageLike] | None = None,
        model: str | None = None,
        **options: Any,
    ) -> TokenizeResponse:
        """Token ids of ``prompt`` (no chat template) or of ``messages`` (with it): exactly one of them."""
        body = request_body({"model": model, "prompt": prompt}, None)
        if messages is not None:
            body["messages"] = message_body(messages)
        return self._call("POST", "/tokenize", TokenizeResponse, body, **options)

    def health(self, **options: Any) -> dict[str, Any]:
        response, _ = self._send("GET", "/health", None, CallOptions(**options))
        return json_or_status(response)

    def ready(self, **options: Any) -> bool:
        """True once the model is loaded; False while the server answers 503 (not retried)."""
        options.setdefault("max_retries", 0)
        try:
            self._send("GET", "/ready", None, CallOptions(**options))
        except InternalServerError as exc:
            if exc.status_code != 503:
                raise
            return False
        return True

    def metrics(self, **options: Any) -> MetricsSnapshot:
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

    def create(
        self,
        *,
        prompt: PromptLike,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: StopLike = None,
        seed: int | None = None,
        stream: bool = False,
        stream_options: Mapping[str, Any] | None = None,
        compression: CompressionLike = None,
        ignore_eos: bool | None = None,
        user: str | None = None,
        extra_body: Mapping[str, Any] | None = None,
        extra_headers: Mapping[str, str] | None = None,
        timeout: TimeoutLike = None,
        max_retries: int | None = None,
    ) -> CompletionResponse | Stream[CompletionChunk]:
        """``POST /v1/completions``; with ``stream=True`` a ``Stream`` of ``CompletionChunk``."""
        fields = _completion_fields(
            prompt, model=model, max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed,
            stream=stream, stream_options=stream_options, compression=compression, ignore_eos=ignore_eos, user=user,
        )  # fmt: skip
        body = request_body(fields, extra_body)
        options = CallOptions(timeout=timeout, max_retries=max_retries, extra_headers=extra_headers)
        if stream:
            return self._client._stream("/v1/completions", body, CompletionChunk, options)
        response, request_id = self._client._send("POST", "/v1/completions", body, options)
        return parse_model(CompletionResponse, response, request_id)


class ChatCompletions:
    def __init__(self, client: GemServe) -> None:
        self._client = client

    def create(
        self,
        *,
        messages: Iterable[MessageLike],
        model: str | None = None,
        max_tokens: int | None = None,
        max_completion_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: StopLike = None,
        seed: int | None = None,
        stream: bool = False,
        stream_options: Mapping[str, Any] | None = None,
        compression: CompressionLike = None,
        ignore_eos: bool | None = None,
        user: str | None = None,
        extra_body: Mapping[str, Any] | None = None,
        extra_headers: Mapping[str, str] | None = None,
        timeout: TimeoutLike = None,
        max_retries: int | None = None,
    ) -> ChatCompletionResponse | Stream[ChatCompletionChunk]:
        """``POST /v1/chat/completions``; with ``stream=True`` a ``Stream`` of ``ChatCompletionChunk``."""
        fields = _chat_fields(
            messages, model=model, max_tokens=max_tokens, max_completion_tokens=max_completion_tokens,
            temperature=temperature, top_p=top_p, stop=stop, seed=seed, stream=stream, stream_options=stream_options,
            compression=compression, ignore_eos=ignore_eos, user=user,
        )  # fmt: skip
        body = request_body(fields, extra_body)
        options = CallOptions(timeout=timeout, max_retries=max_retries, extra_headers=extra_headers)
        if stream:
            return self._client._stream("/v1/chat/completions", body, ChatCompletionChunk, options)
        response, request_id = self._client._send("POST", "/v1/chat/completions", body, options)
        return parse_model(ChatCompletionResponse, response, request_id)


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

    async def _call(self, method: str, path: str, model_type: type[ModelT], body: Any = None, **options: Any) -> ModelT:
        response, request_id = await self._send(method, path, body, CallOptions(**options))
        return parse_model(model_type, response, request_id)

    async def _stream(
        self, path: str, body: Mapping[str, Any], chunk_type: type[Any], options: CallOptions
    ) -> AsyncStream[Any]:
        response, request_id = await self._send("POST", path, body, options, stream=True)
        return AsyncStream(response, chunk_type, request_id)

    async def models(self, **options: Any) -> ModelList:
        return await self._call("GET", "/v1/models", ModelList, **options)

    async def tokenize(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[MessageLike] | None = None,
        model: str | None = None,
        **options: Any,
    ) -> TokenizeResponse:
        body = request_body({"model": model, "prompt": prompt}, None)
        if messages is not None:
            body["messages"] = message_body(messages)
        return await self._call("POST", "/tokenize", TokenizeResponse, body, **options)

    async def health(self, **options: Any) -> dict[str, Any]:
        response, _ = await self._send("GET", "/health", None, CallOptions(**options))
        return json_or_status(response)

    async def ready(self, **options: Any) -> bool:
        options.setdefault("max_retries", 0)
        try:
            await self._send("GET", "/ready", None, CallOptions(**options))
        except InternalServerError as exc:
            if exc.status_code != 503:
                raise
            return False
        return True

    async def metrics(self, **options: Any) -> MetricsSnapshot:
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

    async def create(
        self,
        *,
        prompt: PromptLike,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: StopLike = None,
        seed: int | None = None,
        stream: bool = False,
        stream_options: Mapping[str, Any] | None = None,
        compression: CompressionLike = None,
        ignore_eos: bool | None = None,
        user: str | None = None,
        extra_body: Mapping[str, Any] | None = None,
        extra_headers: Mapping[str, str] | None = None,
        timeout: TimeoutLike = None,
        max_retries: int | None = None,
    ) -> CompletionResponse | AsyncStream[CompletionChunk]:
        fields = _completion_fields(
            prompt, model=model, max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed,
            stream=stream, stream_options=stream_options, compression=compression, ignore_eos=ignore_eos, user=user,
        )  # fmt: skip
        body = request_body(fields, extra_body)
        options = CallOptions(timeout=timeout, max_retries=max_retries, extra_headers=extra_headers)
        if stream:
            return await self._client._stream("/v1/completions", body, CompletionChunk, options)
        response, request_id = await self._client._send("POST", "/v1/completions", body, options)
        return parse_model(CompletionResponse, response, request_id)


class AsyncChatCompletions:
    def __init__(self, client: AsyncGemServe) -> None:
        self._client = client

    async def create(
        self,
        *,
        messages: Iterable[MessageLike],
        model: str | None = None,
        max_tokens: int | None = None,
        max_completion_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: StopLike = None,
        seed: int | None = None,
        stream: bool = False,
        stream_options: Mapping[str, Any] | None = None,
        compression: CompressionLike = None,
        ignore_eos: bool | None = None,
        user: str | None = None,
        extra_body: Mapping[str, Any] | None = None,
        extra_headers: Mapping[str, str] | None = None,
        timeout: TimeoutLike = None,
        max_retries: int | None = None,
    ) -> ChatCompletionResponse | AsyncStream[ChatCompletionChunk]:
        fields = _chat_fields(
            messages, model=model, max_tokens=max_tokens, max_completion_tokens=max_completion_tokens,
            temperature=temperature, top_p=top_p, stop=stop, seed=seed, stream=stream, stream_options=stream_options,
            compression=compression, ignore_eos=ignore_eos, user=user,
        )  # fmt: skip
        body = request_body(fields, extra_body)
        options = CallOptions(timeout=timeout, max_retries=max_retries, extra_headers=extra_headers)
        if stream:
            return await self._client._stream("/v1/chat/completions", body, ChatCompletionChunk, options)
        response, request_id = await self._client._send("POST", "/v1/chat/completions", body, options)
        return parse_model(ChatCompletionResponse, response, request_id)


class AsyncChat:
    def __init__(self, client: AsyncGemServe) -> None:
        self.completions = AsyncChatCompletions(client)
