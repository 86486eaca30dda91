"""``POST /tokenize``: count a prompt's tokens the way generation will (chat template included)."""

from __future__ import annotations

from fastapi import APIRouter

from server.errors import ERROR_RESPONSES
from server.protocol import TokenizeRequest, TokenizeResponse
from server.routes.deps import API_KEY_GUARD, EngineDep, StateDep

router = APIRouter(tags=["tokenize"], dependencies=API_KEY_GUARD)


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES, summary="Tokenize a prompt")
async def tokenize(body: TokenizeRequest, engine: EngineDep, state: StateDep) -> TokenizeResponse:
    state.check_model(body.model)
    if body.messages is not None:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        tokens = engine.encode_chat(messages)
    else:
        tokens = engine.encode_prompt(body.prompt or "")
    return TokenizeResponse(count=len(tokens), max_model_len=engine.max_model_len, tokens=tokens)
