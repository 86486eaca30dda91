"""``POST /tokenize``: count a prompt's tokens the way generation will (chat template included)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from contract.protocol import TokenizeRequest, TokenizeResponse, template_messages
from server.engine.checks import check_prompt_fits
from server.errors import ERROR_RESPONSES
from server.routes.deps import EngineDep, StateDep

router = APIRouter(tags=["tokenize"])


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES, summary="Tokenize a prompt")
async def tokenize(body: TokenizeRequest, engine: EngineDep, state: StateDep) -> TokenizeResponse:
    state.check_model(body.model)
    # In a worker thread (a long prompt takes a while); both encoders refuse text that cannot fit.
    if body.messages is not None:
        tokens = await asyncio.to_thread(engine.encode_chat, template_messages(body.messages))
    else:
        tokens = await asyncio.to_thread(engine.encode_prompt, body.prompt)
    check_prompt_fits(len(tokens), engine.max_model_len, param="messages" if body.messages is not None else "prompt")
    return TokenizeResponse(count=len(tokens), max_model_len=engine.max_model_len, tokens=tokens)
