"""``GET /metrics``: Prometheus text exposition of :class:`server.metrics.ServerMetrics`."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.routes.deps import API_KEY_GUARD, StateDep

router = APIRouter(tags=["metrics"], dependencies=API_KEY_GUARD)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}},
    summary="Prometheus metrics",
)
async def metrics(state: StateDep) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
