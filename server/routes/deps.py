"""What the routers share: the server state on ``app.state`` and ``Annotated`` dependencies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from compressors.knobs import short_repr
from server.engine.base import AsyncEngine, EngineNotReadyError
from server.errors import UnknownModelError
from server.metrics import ServerMetrics
from server.settings import Settings


@dataclass
class ServerState:
    """Everything a request handler may need, set up by the app's lifespan."""

    settings: Settings
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    engine: AsyncEngine | None = None
    load_error: str | None = None

    @property
    def ready(self) -> bool:
        return self.engine is not None

    def served_model_name(self) -> str:
        if self.settings.served_model_name:
            return self.settings.served_model_name
        return self.engine.model_name if self.engine is not None else self.settings.model

    def check_model(self, requested: str | None) -> None:
        """OpenAI clients always send ``model``: accept the served name or the --model spec."""
        if requested is None or requested in (self.served_model_name(), self.settings.model):
            return
        raise UnknownModelError(
            f"model {short_repr(requested, 200)} is not served here; this server serves '{self.served_model_name()}'",
            param="model",
            code="model_not_found",
        )


def get_state(request: Request) -> ServerState:
    return request.app.state.gemserve


def get_engine(request: Request) -> AsyncEngine:
    state = get_state(request)
    if state.engine is None:
        reason = f"model failed to load: {state.load_error}" if state.load_error else "model is still loading"
        raise EngineNotReadyError(reason)
    return state.engine


StateDep = Annotated[ServerState, Depends(get_state)]
EngineDep = Annotated[AsyncEngine, Depends(get_engine)]
