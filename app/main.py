"""The FastAPI application: `create_app()` wires settings, database, store, queue and serving."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from app import problems
from app.deps import Context
from app.migrate import upgrade
from app.observe import Observe
from app.recovery import Recovery
from app.routes import backbones, datasets, finetunes, heads, health, predictions
from app.serving import Serving
from cvxtune import __version__
from cvxtune.artifacts import open_store
from cvxtune.db import sessionmaker_for
from cvxtune.settings import Settings, get_settings


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
    app.add_middleware(Observe)
    return app
