"""``POST /v1/chat/completions``: OpenAI chat completions (+ ``compression``)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response

from contract.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    new_id,
)
from server.engine.checks import CONTEXT_LENGTH_EXCEEDED, check_prompt_fits
from server.engine.types import GenerationResult, RequestError
from server.errors import ERROR_RESPONSES
from server.routes.deps import EngineDep, StateDep
from server.routes.serving import dump_extensions, finish_reason_of, generate_response

router = APIRouter(tags=["generation"])

STREAM_DOC = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true"}}


class ChatFormat:
    def __init__(self, model: str) -> None:
        self.id = new_id("chatcmpl")
        self.model = model

    def _chunk(self, delta: ChatDelta, finish_reason: str | None = None) -> ChatCompletionChunk:
        choice = ChatCompletionChunkChoice(delta=delta, finish_reason=finish_reason)
        return ChatCompletionChunk(id=self.id, model=self.model, choices=[choice])

    def first_chunks(self) -> list[ChatCompletionChunk]:
        # OpenAI opens a chat stream with the role and empty content.
        return [self._chunk(ChatDelta(role="assistant", content=""))]

    def delta_chunk(self, text: str) -> ChatCompletionChunk:
        return self._chunk(ChatDelta(content=text))

    def finish_chunk(self, result: GenerationResult) -> ChatCompletionChunk:
        extensions = dump_extensions(result)
        chunk = self._chunk(ChatDelta(), finish_reason_of(result))
        chunk.compression, chunk.metrics = extensions["compression"], extensions["metrics"]
        return chunk

    def usage_chunk(self, result: GenerationResult) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, model=self.model, choices=[], **dump_extensions(result))

    def response(self, result: GenerationResult) -> ChatCompletionResponse:
        choice = ChatCompletionChoice(
            message=ChatResponseMessage(content=result.text), finish_reason=finish_reason_of(result)
        )
        return ChatCompletionResponse(id=self.id, model=self.model, choices=[choice], **dump_extensions(result))


def check_max_tokens_fields(body: ChatCompletionRequest, max_model_len: int) -> None:
    """``max_tokens`` and ``max_completion_tokens`` each leave room for a prompt token, also the
    one ``max_completion_tokens`` overrides (the published schema bounds both)."""
    for param in ("max_tokens", "max_completion_tokens"):
        value = getattr(body, param)
        if value is not None and value >= max_model_len:
            raise RequestError(
                f"{param} is {value}, more than this model's context of {max_model_len} tokens leaves after the prompt",
                param=param,
                code=CONTEXT_LENGTH_EXCEEDED,
            )


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**ERROR_RESPONSES, **STREAM_DOC},
    summary="Create a chat completion",
)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, engine: EngineDep, state: StateDep
) -> Response:
    state.check_model(body.model)
    # Tokenized in a worker thread: a long prompt must not stall every other request.
    prompt_ids = await asyncio.to_thread(engine.encode_chat, body.template_messages())
    check_prompt_fits(len(prompt_ids), engine.max_model_len, param="messages")  # the engine's check says "prompt"
    check_max_tokens_fields(body, engine.max_model_len)
    max_tokens = body.max_new_tokens(state.settings.default_max_tokens)
    fmt = ChatFormat(state.served_model_name())
    return await generate_response(request, engine, body, prompt_ids, max_tokens, fmt)
