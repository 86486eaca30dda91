"""Server-sent events -> typed chunks: ``Stream`` (sync) and ``AsyncStream``.

Both are iterators and context managers over one HTTP response. Iteration stops at the
``[DONE]`` sentinel (or when the server closes the stream); the final chunk's ``usage``,
``compression`` and ``metrics`` stay on the stream object afterwards.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx
from pydantic import ValidationError

from clients.errors import APIResponseValidationError, StreamError, connection_error, error_message
from server.protocol import ChatCompletionChunk, CompletionChunk, CompressionInfo, MetricsInfo, UsageInfo

DONE = "[DONE]"

ChunkT = TypeVar("ChunkT", ChatCompletionChunk, CompletionChunk)


@dataclass
class ServerSentEvent:
    data: str
    event: str | None = None
    id: str | None = None


@dataclass
class SSEDecoder:
    """Line-by-line SSE parser (the WHATWG rules the OpenAI servers need): ``data:`` lines of
    one event join with newlines, a blank line ends the event, ``:`` lines are comments."""

    _data: list[str] = field(default_factory=list)
    _event: str | None = None
    _id: str | None = None

    def feed(self, line: str) -> ServerSentEvent | None:
        """One line without its terminator; returns the event a blank line completes."""
        if not line:
            return self._flush()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            self._id = value
        return None

    def _flush(self) -> ServerSentEvent | None:
        if not self._data and self._event is None:
            return None
        event = ServerSentEvent(data="\n".join(self._data), event=self._event, id=self._id)
        self._data, self._event = [], None
        return event


class _StreamState(Generic[ChunkT]):
    """What sync and async streams share: turning events into chunks and remembering the tail."""

    def __init__(self, chunk_type: type[ChunkT], request_id: str | None) -> None:
        self.chunk_type = chunk_type
        self.request_id = request_id
        self.usage: UsageInfo | None = None
        self.compression: CompressionInfo | None = None
        self.metrics: MetricsInfo | None = None
        self.finish_reason: str | None = None
        self.text = ""
        self.done = False

    def parse(self, event: ServerSentEvent) -> ChunkT | None:
        """The chunk an event carries; ``None`` for ``[DONE]``; raises on an in-stream error."""
        if event.data.strip() == DONE:
            self.done = True
            return None
        try:
            payload: Any = json.loads(event.data)
        except json.JSONDecodeError as exc:
            raise APIResponseValidationError(
                f"stream event is not JSON: {event.data[:200]!r}", request_id=self.request_id, body=event.data
            ) from exc
        if event.event == "error" or (isinstance(payload, dict) and "error" in payload):
            message = error_message(payload, "error in stream")
            raise StreamError(message, request_id=self.request_id, body=payload)
        try:
            chunk = self.chunk_type.model_validate(payload)
        except ValidationError as exc:
            raise APIResponseValidationError(
                f"unexpected stream chunk: {exc}", request_id=self.request_id, body=payload
            ) from exc
        self._remember(chunk)
        return chunk

    def _remember(self, chunk: ChunkT) -> None:
        self.usage = chunk.usage or self.usage
        self.compression = chunk.compression or self.compression
        self.metrics = chunk.metrics or self.metrics
        if isinstance(chunk, ChatCompletionChunk):
            pieces = [(choice.delta.content, choice.finish_reason) for choice in chunk.choices]
        else:
            pieces = [(choice.text, choice.finish_reason) for choice in chunk.choices]
        for text, finish_reason in pieces:
            self.text += text or ""
            self.finish_reason = finish_reason or self.finish_reason


class Stream(_StreamState[ChunkT]):
    """Iterate to get typed chunks; ``usage``/``compression``/``metrics``/``text`` fill in as they arrive."""

    def __init__(self, response: httpx.Response, chunk_type: type[ChunkT], request_id: str | None) -> None:
        super().__init__(chunk_type, request_id)
        self.response = response
        self._iterator = self._chunks()

    def _chunks(self) -> Iterator[ChunkT]:
        decoder = SSEDecoder()
        try:
            for line in self.response.iter_lines():
                event = decoder.feed(line)
                if event is None:
                    continue
                chunk = self.parse(event)
                if chunk is None:
                    break
                yield chunk
            else:
                event = decoder.feed("")  # a stream may end without a trailing blank line
                chunk = self.parse(event) if event is not None else None
                if chunk is not None:
                    yield chunk
        except httpx.TransportError as exc:  # the connection broke or timed out mid-stream
            raise connection_error(exc, self.request_id) from exc
        finally:
            self.close()

    def __iter__(self) -> Iterator[ChunkT]:
        return self

    def __next__(self) -> ChunkT:
        return next(self._iterator)

    def __enter__(self) -> Stream[ChunkT]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.response.close()


class AsyncStream(_StreamState[ChunkT]):
    """The async twin of ``Stream``: ``async for chunk in stream``, ``async with stream``."""

    def __init__(self, response: httpx.Response, chunk_type: type[ChunkT], request_id: str | None) -> None:
        super().__init__(chunk_type, request_id)
        self.response = response
        self._iterator = self._chunks()

    async def _chunks(self) -> AsyncIterator[ChunkT]:
        decoder = SSEDecoder()
        try:
            async for line in self.response.aiter_lines():
                event = decoder.feed(line)
                if event is None:
                    continue
                chunk = self.parse(event)
                if chunk is None:
                    return
                yield chunk
            event = decoder.feed("")
            chunk = self.parse(event) if event is not None else None
            if chunk is not None:
                yield chunk
        except httpx.TransportError as exc:
            raise connection_error(exc, self.request_id) from exc
        finally:
            await self.close()

    def __aiter__(self) -> AsyncIterator[ChunkT]:
        return self

    async def __anext__(self) -> ChunkT:
        return await self._iterator.__anext__()

    async def __aenter__(self) -> AsyncStream[ChunkT]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.response.aclose()
