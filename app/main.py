"""The FastAPI application: `create_app()` wires settings, database, store, queue and serving."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from prometheus_client import Counter, Histogram

from app import problems
from app.deps import Context
from app.migrate import upgrade
from app.recovery import Recovery
from app.routes import backbones, datasets, finetunes, heads, health, predictions
from app.serving import Serving
from cvxtune import __version__
from cvxtune.artifacts import open_store
from cvxtune.db import sessionmaker_for
from cvxtune.settings import Settings, get_settings

log = logging.getLogger("cvxtune.api")

REQUESTS = Counter("cvxtune_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram(
    "cvxtune_http_request_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


def create_app(
    settings: Settings | None = None, *, queue: Any = None, migrate: bool = True
) -> FastAPI:
    settings = settings or get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    url = settings.resolved_database_url
    if migrate:
        upgrade(url)
    if queue is None:
        from app.queue import TaskQueue

        queue = TaskQueue(settings)
    ctx = Context(
        settings=settings,
        sessions=sessionmaker_for(url),
        store=open_store(settings.resolved_artifacts_url, settings.store_cache_dir),
        queue=queue,
        serving=Serving(settings),
    )

    recovery = Recovery(settings, ctx.sessions, queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx.serving.preload()
        recovery.start()
        yield
        recovery.stop()
        close = getattr(queue, "close", None)
        if close:
            close()

    app = FastAPI(
        title="cvxtune",
        version=__version__,
        lifespan=lifespan,
        description="Fine-tune image classifiers with convex heads solved to a "
        "certified global optimum. Authenticate with `Authorization: Bearer KEY`.",
    )
    app.state.ctx = ctx
    problems.install(app)
    for module in (health, datasets, backbones, finetunes, heads, predictions):
        app.include_router(module.router)

    @app.middleware("http")
    async def observe(request: Request, call_next: Any) -> Response:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]
        start = time.perf_counter()
        response: Response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        elapsed = time.perf_counter() - start
        REQUESTS.labels(request.method, path, str(response.status_code)).inc()
        LATENCY.labels(request.method, path).observe(elapsed)
        response.headers["x-request-id"] = request_id
        log.info(
            "%s %s %s %.1fms request_id=%s",
            request.method,
            request.url.path,
            response.status_code,
            elapsed * 1000,
            request_id,
        )
        return response

    return app
