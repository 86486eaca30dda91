"""``GET /health`` (the process answers) and ``GET /ready`` (the model is loaded): no API key."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from server.routes.deps import StateDep

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    """Without the API key (when one is set) only ``ready``: the model's name, path and load
    error are the operator's to see."""

    ready: bool
    model: str | None = None
    backend: str | None = None
    dtype: str | None = None
    error: str | None = None


@router.get("/health", response_model=Health, summary="Liveness")
async def health() -> Health:
    return Health(status="ok")


@router.get(
    "/ready",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Model not loaded (yet)"}},
    summary="Readiness: 200 once the model is loaded",
)
async def ready(request: Request, state: StateDep) -> JSONResponse:
    status = 200 if state.ready else 503
    if not request.state.authenticated:
        return JSONResponse(Readiness(ready=state.ready).model_dump(exclude_none=True), status_code=status)
    body = Readiness(
        ready=state.ready,
        model=state.served_model_name(),
        backend=state.engine.backend if state.engine is not None else state.settings.backend,
        dtype=state.engine.dtype if state.engine is not None else None,
        error=state.load_error,
    )
    return JSONResponse(body.model_dump(), status_code=status)
