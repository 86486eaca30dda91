"""What completions and chat share: request conversion, the JSON answer, the SSE stream.

The two routes differ only in how a prompt is tokenised and how a chunk or response is
shaped; :class:`ResponseFormat` captures the second, so the request path exists once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from compressors.registry import method_names
from contract.protocol import CommonSamplingFields, UsageInfo
from server.engine.base import AsyncEngine, EventStream
from server.engine.types import CompressionSpec, GenerationRequest, GenerationResult, SamplingParams, TokenDelta
from server.errors import error_for_exception

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away first" (logs and metrics only)


# ---- request -> engine -----------------------------------------------------------------------
def to_generation_request(
    body: CommonSamplingFields, prompt_ids: list[int], max_tokens: int, request_id: str, arrival_time: float
) -> GenerationRequest:
    """The engine's view of an OpenAI request (validated further by ``check_request``)."""
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=body.stop_list(),
        seed=body.seed,
        ignore_eos=body.ignore_eos,
    )
    params = body.compression
    compression = (
        CompressionSpec(
            method=params.method,
            knobs=params.knobs(),
            return_selection=params.return_selection or params.return_scores,
            return_scores=params.return_scores,
            attention=params.attention,
            attention_knobs=dict(params.attention_knobs or {}),
        )
        if params is not None
        else CompressionSpec()
    )
    return GenerationRequest(
        prompt_ids=prompt_ids,
        sampling=sampling,
        compression=compression,
        request_id=request_id,
        arrival_time=arrival_time,
    )


def method_label(request: GenerationRequest, engine: AsyncEngine) -> str:
    """The ``method`` metric label; unknown names collapse to one value (bounded cardinality)."""
    name = engine.default_method if request.compression.method is None else request.compression.method
    return name if name in method_names() else "invalid"


# ---- engine -> response ----------------------------------------------------------------------
class ResponseFormat(Protocol):
    """How one route shapes its answer (completions and chat differ only here)."""

    def first_chunks(self) -> list[BaseModel]: ...

    def delta_chunk(self, text: str) -> BaseModel: ...

    def finish_chunk(self, result: GenerationResult) -> BaseModel: ...

    def usage_chunk(self, result: GenerationResult) -> BaseModel: ...

    def response(self, result: GenerationResult) -> BaseModel: ...


def usage_of(result: GenerationResult) -> UsageInfo:
    # prompt_tokens is the prompt as sent (before compression), as OpenAI bills it.
    return UsageInfo(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
    )


def finish_reason_of(result: GenerationResult) -> str:
    return "stop" if result.finish_reason == "cancelled" else result.finish_reason


def to_json(model: BaseModel) -> str:
    """OpenAI's shape: absent extensions are left out rather than sent as null."""
    data = model.model_dump(mode="json")
    for key in ("usage", "compression", "metrics"):
        if data.get(key) is None:
            data.pop(key, None)
    return json.dumps(data, separators=(",", ":"))


def sse_event(payload: str) -> str:
    return f"data: {payload}\n\n"


@dataclass
class Generation:
    """One admitted request on its way out: what the route hands to :func:`respond`."""

    http_request: Request
    engine: AsyncEngine
    request: GenerationRequest
    events: EventStream
    fmt: ResponseFormat
    include_usage: bool

    def record(self, result: GenerationResult | None, status: int | None = None) -> None:
        """Hand the outcome to the middleware, which logs one line and counts the request."""
        state = self.http_request.state
        state.result = result
        if status is not None:
            state.outcome_status = status
        if result is not None:
            gemserve = self.http_request.app.state.gemserve
            gemserve.metrics.observe_result(gemserve.served_model_name(), self.engine.backend, result)


async def generate_response(
    http_request: Request,
    engine: AsyncEngine,
    body: CommonSamplingFields,
    prompt_ids: list[int],
    max_tokens: int,
    fmt: ResponseFormat,
) -> Response:
    """Admit the request (400/429/503 raise here, before any byte is sent), then answer."""
    state = http_request.state
    request = to_generation_request(body, prompt_ids, max_tokens, state.request_id, state.arrival_time)
    state.method_label = method_label(request, engine)
    gemserve = http_request.app.state.gemserve
    metrics = gemserve.metrics
    labels = (gemserve.served_model_name(), engine.backend, state.method_label)
    request.on_finish = lambda done: metrics.count_generated_tokens(*labels, done.generated_tokens)
    events = engine.stream(request)
    generation = Generation(http_request, engine, request, events, fmt, body.include_usage())
    return await respond(generation, bool(body.stream))


async def respond(generation: Generation, stream: bool) -> Response:
    if stream:
        return StreamingResponse(sse_stream(generation), media_type="text/event-stream", headers=SSE_HEADERS)
    result = await collect_unless_disconnected(generation)
    if result is None:
        generation.record(None, CLIENT_CLOSED_REQUEST)
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    generation.record(result)
    return Response(content=to_json(generation.fmt.response(result)), media_type="application/json")


async def sse_stream(generation: Generation) -> AsyncIterator[str]:
    """``data: {chunk}`` events, then ``data: [DONE]`` — also after an error event.

    A client disconnect cancels this generator at its ``await``; ``finally`` then closes the
    engine stream, which cancels the request within one decode step.
    """
    fmt, events = generation.fmt, generation.events
    try:
        for chunk in fmt.first_chunks():
            yield sse_event(to_json(chunk))
        async for event in events:
            if isinstance(event, TokenDelta):
                if event.text:
                    yield sse_event(to_json(fmt.delta_chunk(event.text)))
                continue
            generation.record(event)
            yield sse_event(to_json(fmt.finish_chunk(event)))
            if generation.include_usage:
                yield sse_event(to_json(fmt.usage_chunk(event)))
    except asyncio.CancelledError:  # the client went away: finally cancels the request
        generation.record(None, CLIENT_CLOSED_REQUEST)
        raise
    except Exception as exc:  # the status line is gone: report the error in-band, then [DONE]
        spec = error_for_exception(exc, generation.request.request_id)
        logger.error("request %s failed mid-stream", generation.request.request_id, exc_info=exc)
        generation.record(None, spec.status)
        yield sse_event(json.dumps(spec.body()))
    finally:
        await events.aclose()
    yield DONE


async def collect_unless_disconnected(generation: Generation) -> GenerationResult | None:
    """Run to the result; if the client disconnects first, cancel and return ``None``."""
    consume = asyncio.ensure_future(last_result(generation.events))
    watch = asyncio.ensure_future(wait_for_disconnect(generation.http_request))
    try:
        await asyncio.wait({consume, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if consume.done():
        return consume.result()
    consume.cancel()
    await generation.events.aclose()
    return None


async def last_result(events: EventStream) -> GenerationResult:
    try:
        async for event in events:
            if isinstance(event, GenerationResult):
                return event
    finally:
        await events.aclose()
    raise RuntimeError("engine stream ended without a result")


async def wait_for_disconnect(request: Request) -> None:
    # The body is already read, so the next ASGI message is the disconnect (or a spurious empty one).
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def dump_extensions(result: GenerationResult) -> dict[str, Any]:
    return {"usage": usage_of(result), "compression": result.compression, "metrics": result.metrics}
