"""HTTP routes, one router per file; :data:`ROUTERS` is what the app includes."""

from __future__ import annotations

from fastapi import APIRouter

from server.routes import chat, completions, docs, health, metrics, models, tokenize, viewer

ROUTERS: list[APIRouter] = [
    health.router,
    completions.router,
    chat.router,
    models.router,
    tokenize.router,
    metrics.router,
    docs.router,
    viewer.router,
]
