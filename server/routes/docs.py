"""``GET /openapi.json`` and ``GET /docs`` behind the same API-key guard as the API itself.

The app disables FastAPI's built-in docs routes and serves these instead, so the key check of
server/guards.py covers them like any route: with ``--api-key`` set, only /health, /ready and the
viewer page are open.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

router = APIRouter(include_in_schema=False)


@router.get("/openapi.json")
async def openapi_schema(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{request.app.title} API")
