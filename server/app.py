"""The FastAPI app: ``create_app(settings)`` builds it; the lifespan loads the model once.

The model loads in a worker thread after the server is up, so ``/health`` answers at once
and ``/ready`` turns 200 when the engine has started. Every response carries
``X-Request-Id`` (the client's, when it sent a sane one) and every request leaves one
structured log line (``gemserve.access``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.engine.base import AsyncEngine
from server.errors import error_for_exception, register_error_handlers
from server.guards import ApiKeyMiddleware, BodyLimitMiddleware, default_body_limit
from server.openapi import openapi_schema
from server.routes import ROUTERS
from server.routes.deps import ServerState
from server.settings import Settings

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("gemserve.access")

BACKENDS = ("hf", "vllm")
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def build_engine(settings: Settings) -> AsyncEngine:
    """Load the model and wrap it in the backend's async engine (blocking: run it in a thread)."""
    if settings.backend == "hf":
        from server.engine.hf import HFEngine
        from server.engine.hf_async import HFAsyncEngine, no_openmp_team
        from server.models import load_model

        with no_openmp_team() as threads:  # the scheduler thread alone computes with `threads` threads
            loaded = load_model(
                settings.model,
                device=settings.device,
                cache_dir=settings.cache_dir,
                max_model_len=settings.max_model_len,
                profile=settings.profile,
                dtype=settings.dtype,
                filter_dtype=settings.filter_dtype,
            )
            engine = HFEngine(
                loaded, default_method=settings.default_method, default_attention=settings.default_attention
            )
        return HFAsyncEngine(
            engine,
            settings.max_concurrency,
            settings.max_queue,
            settings.retry_after_s,
            max_batch_tokens=settings.max_batch_tokens or 4 * engine.max_model_len,
            step_tokens=settings.max_num_batched_tokens,
            shadow_fraction=settings.shadow_fraction,
            intra_op_threads=threads,
            warm_up_at_start=settings.warmup,
            step_trace=settings.step_trace,
        )
    if settings.backend == "vllm":  # GemFilter on a truncated HF model in front of vLLM (issue 5)
        from server.engine.vllm_setup import build_vllm_engine

        return build_vllm_engine(settings)
    raise ValueError(f"unknown backend '{settings.backend}'; available: {', '.join(BACKENDS)}")


def create_app(settings: Settings | None = None, engine: AsyncEngine | None = None) -> FastAPI:
    """The app for ``settings``; pass a ready ``engine`` (not started) to skip model loading (tests)."""
    settings = settings or Settings()
    state = ServerState(settings=settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(load_and_start(state, engine), name="load-engine")
        try:
            yield
        finally:
            if not loader.done():
                loader.cancel()
            if state.engine is not None:
                await state.engine.shutdown()

    app = FastAPI(
        title="GemServe",
        description="OpenAI-compatible long-context serving with per-request prompt/KV compression",
        version="0.1.0",
        lifespan=lifespan,
        # Served by server/routes/docs.py instead, behind the API key like every other route.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        # No 307 to the slash-less path: its Location would be built from the client's Host header.
        redirect_slashes=False,
    )
    app.state.gemserve = state
    register_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    app.openapi = lambda: openapi_schema(  # type: ignore[method-assign]
        app, state.engine.request_options() if state.engine is not None else None
    )
    # Added innermost first: the request id and access log wrap the key and size checks, so a
    # 401 or 413 carries an X-Request-Id and leaves a log line too.
    app.add_middleware(BodyLimitMiddleware, limit=lambda: body_limit(state))
    app.add_middleware(ApiKeyMiddleware, api_key=settings.resolved_api_key())
    app.add_middleware(RequestContextMiddleware, state=state)
    return app


def body_limit(state: ServerState) -> int:
    if state.settings.max_request_bytes is not None:
        return state.settings.max_request_bytes
    return default_body_limit(state.engine.max_model_len if state.engine is not None else None)


async def load_and_start(state: ServerState, engine: AsyncEngine | None) -> None:
    try:
        if engine is None:
            engine = await asyncio.to_thread(build_engine, state.settings)
        await engine.start()
    except Exception as exc:
        state.load_error = str(exc)
        logger.exception("engine failed to start")
        return
    state.engine = engine  # first: the served name falls back to the engine's model name
    state.metrics.bind_engine(engine, state.served_model_name())
    logger.info(
        "ready: model %s on backend %s in %s (GemFilter's filter pass in %s)",
        engine.model_name,
        engine.backend,
        engine.dtype,
        engine.filter_dtype,
    )


class RequestContextMiddleware:
    """Pure ASGI (no response buffering, streams pass straight through): request id, the 500
    fallback, the request counter and the access log line."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = client_request_id(scope) or uuid.uuid4().hex
        request_state = scope.setdefault("state", {})
        request_state.update(request_id=request_id, arrival_time=start)
        sent: dict[str, Any] = {"status": 500, "started": False}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("X-Request-Id", request_id)
                sent.update(status=message["status"], started=True)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            logger.error("request %s failed", request_id, exc_info=exc)
            sent["status"] = 500
            if not sent["started"]:
                await error_for_exception(exc, request_id).response()(scope, receive, send_with_id)
        finally:
            self.finish(scope, request_state, int(request_state.get("outcome_status", sent["status"])), start)

    def finish(self, scope: Scope, request_state: dict[str, Any], status: int, start: float) -> None:
        path = scope.get("path", "")
        method = request_state.get("method_label", "-")
        engine = self.state.engine
        if path in GENERATION_PATHS:
            backend = engine.backend if engine is not None else self.state.settings.backend
            self.state.metrics.count_request(self.state.served_model_name(), backend, method, status)
        fields = {
            "request_id": request_state.get("request_id"),
            "http": f"{scope.get('method')} {path}",
            "status": status,
            "method": method,
            "total_ms": round((time.perf_counter() - start) * 1000.0, 2),
        }
        result = request_state.get("result")
        if result is not None:
            m = result.metrics
            fields.update(
                prompt_tokens=result.prompt_tokens,
                kept_tokens=result.compression.kept_tokens,
                completion_tokens=result.completion_tokens,
                finish=result.finish_reason,
                queue_ms=round(m.queue_ms, 2),
                ttft_ms=round(m.ttft_ms, 2),
                e2e_ms=round(m.e2e_ms, 2),
            )
        access_logger.info(" ".join(f"{key}={value}" for key, value in fields.items()))


def client_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _REQUEST_ID.match(text) else None
    return None


@contextmanager
def serve_in_background(
    app: FastAPI, host: str = "127.0.0.1", ready_timeout_s: float = 120.0, wait_ready: bool = True
) -> Iterator[str]:
    """Run ``app`` with uvicorn in a daemon thread on a free port; yield its base URL once
    ``/ready`` answers 200 (``wait_ready=False``: once ``/health`` does, the model may still be
    loading); on exit, shut down (draining in-flight requests). For tests and benchmarks that
    need a real socket in-process."""
    import uvicorn

    with socket.socket() as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + ready_timeout_s
    while not ready(url, "/ready" if wait_ready else "/health"):
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError(f"server on {url} did not become ready within {ready_timeout_s} s")
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=ready_timeout_s)


def ready(url: str, path: str = "/ready") -> bool:
    import httpx

    try:
        return httpx.get(f"{url}{path}", timeout=5).status_code == 200
    except httpx.TransportError:
        return False
