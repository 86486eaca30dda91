"""``POST /v1/completions``: OpenAI text completions (+ ``compression``)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response

from contract.protocol import CompletionChoice, CompletionChunk, CompletionRequest, CompletionResponse, new_id
from server.engine.types import GenerationResult
from server.errors import ERROR_RESPONSES
from server.routes.deps import EngineDep, StateDep
from server.routes.serving import dump_extensions, finish_reason_of, generate_response

router = APIRouter(tags=["generation"])

STREAM_DOC = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true"}}


class CompletionFormat:
    def __init__(self, model: str) -> None:
        self.id = new_id("cmpl")
        self.model = model

    def _chunk(self, text: str, finish_reason: str | None = None) -> CompletionChunk:
        choice = CompletionChoice(text=text, finish_reason=finish_reason)
        return CompletionChunk(id=self.id, model=self.model, choices=[choice])

    def first_chunks(self) -> list[CompletionChunk]:
        return []

    def delta_chunk(self, text: str) -> CompletionChunk:
        return self._chunk(text)

    def finish_chunk(self, result: GenerationResult) -> CompletionChunk:
        extensions = dump_extensions(result)
        chunk = self._chunk("", finish_reason_of(result))
        chunk.compression, chunk.metrics = extensions["compression"], extensions["metrics"]
        return chunk

    def usage_chunk(self, result: GenerationResult) -> CompletionChunk:
        return CompletionChunk(id=self.id, model=self.model, choices=[], **dump_extensions(result))

    def response(self, result: GenerationResult) -> CompletionResponse:
        choice = CompletionChoice(text=result.text, finish_reason=finish_reason_of(result))
        return CompletionResponse(id=self.id, model=self.model, choices=[choice], **dump_extensions(result))


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={**ERROR_RESPONSES, **STREAM_DOC},
    summary="Create a completion",
)
async def create_completion(body: CompletionRequest, request: Request, engine: EngineDep, state: StateDep) -> Response:
    state.check_model(body.model)
    prompt = body.prompt_text_or_ids()
    # Tokenized in a worker thread: a long prompt must not stall every other request. Token ids
    # pass through: admission checks them (engine.check_request), /tokenize's encoder here.
    prompt_ids = await asyncio.to_thread(engine.encode_prompt, prompt) if isinstance(prompt, str) else list(prompt)
    fmt = CompletionFormat(state.served_model_name())
    return await generate_response(request, engine, body, prompt_ids, body.max_tokens or 16, fmt)
