"""``GET /openapi.json`` and ``GET /docs`` behind the same API-key guard as the API itself.

FastAPI's built-in docs routes cannot take a dependency, so the app disables them and serves
these instead: with ``--api-key`` set, only /health and /ready are open.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from server.routes.deps import API_KEY_GUARD

router = APIRouter(dependencies=API_KEY_GUARD, include_in_schema=False)


@router.get("/openapi.json")
async def openapi_schema(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{request.app.title} API")
