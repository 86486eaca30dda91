"""``GET /viewer``: the selection viewer, a page that runs a prompt through this server's own API
and shows what compression kept (server/viewer/: plain HTML, CSS and JS, no build step, no CDN).

The page and its two assets are open like /health: they hold no data and no key. Every call the
page makes goes to the API with the key the user types in, which the page keeps in a variable
only (never in storage or a cookie), so with ``--api-key`` set the page loads and says that its
calls got 401 until the key is given.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from compressors.attention import attention_names
from compressors.knobs import short_repr
from compressors.registry import method_names
from server.routes.deps import StateDep
from server.viewer import ASSETS

router = APIRouter(include_in_schema=False)

CONFIG_MARK = "{{VIEWER_CONFIG}}"
# Nothing but this origin: scripts, styles and API calls alike (the page works with no internet).
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@cache
def asset(name: str) -> str:
    return resources.files("server.viewer").joinpath(name).read_text(encoding="utf-8")


@router.get("/viewer")
async def viewer_page(state: StateDep) -> HTMLResponse:
    """The page, with what its menus offer (method and attention names, the server's defaults) in
    a JSON data block: no script runs inline, so the CSP above needs no exception."""
    config = {
        "methods": method_names(),
        "attention": attention_names(),
        "default_method": state.settings.default_method,
    }
    # "</" cannot occur in the JSON (names are identifiers), so the data block cannot be closed early.
    page = asset("index.html").replace(CONFIG_MARK, json.dumps(config).replace("</", "<\\/"))
    return HTMLResponse(page, headers=HEADERS)


@router.get("/viewer/{name}")
async def viewer_asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:  # the JSON 404 every unknown route answers (server/errors.py)
        served = ", ".join(sorted(ASSETS))
        raise StarletteHTTPException(404, f"no viewer asset {short_repr(name, 100)}; the viewer serves {served}")
    return Response(asset(name), media_type=media_type, headers=HEADERS)
