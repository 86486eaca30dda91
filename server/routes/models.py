"""``GET /v1/models``: the one served model, with its context length."""

from __future__ import annotations

from fastapi import APIRouter

from contract.protocol import ModelCard, ModelList
from server.errors import ERROR_RESPONSES
from server.routes.deps import EngineDep, StateDep

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES, summary="List served models")
async def list_models(engine: EngineDep, state: StateDep) -> ModelList:
    card = ModelCard(
        id=state.served_model_name(),
        max_model_len=engine.max_model_len,
        backend=engine.backend,
        dtype=engine.dtype,
        filter_dtype=engine.filter_dtype,
    )
    return ModelList(data=[card])
