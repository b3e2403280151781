"""Request dependencies as Annotated aliases. Everything comes from `app.state.ctx`, built once
per app by `create_app`, so a test builds an app with its own settings or overrides these."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from app.auth import project_for_key
from app.problems import Unauthorized
from cvxtune.artifacts import ArtifactStore
from cvxtune.db import Project, committing
from cvxtune.settings import Settings


@dataclass
class Context:
    settings: Settings
    sessions: sessionmaker[Session]
    store: ArtifactStore
    queue: Any  # app.queue.TaskQueue, or a test double with the same methods
    serving: Any  # app.serving.Serving


async def get_ctx(request: Request) -> Context:
    """async, though it awaits nothing: FastAPI runs a plain `def` dependency in its threadpool,
    a hop through another thread (CPU on both sides) for one attribute read, on every request."""
    ctx: Context = request.app.state.ctx
    return ctx


CtxDep = Annotated[Context, Depends(get_ctx)]


def get_session(ctx: CtxDep) -> Iterator[Session]:
    with committing(ctx.sessions) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def bearer_key(request: Request) -> str:
    """The key of 'Authorization: Bearer KEY'; Unauthorized when there is none."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("missing API key: send 'Authorization: Bearer KEY'")
    return key.strip()


def project_of(session: Session, key: str) -> Project:
    """The project of an API key that is not revoked; Unauthorized otherwise."""
    project = project_for_key(session, key)
    if project is None:
        raise Unauthorized("unknown or revoked API key")
    return project


def get_project(request: Request, session: SessionDep) -> Project:
    return project_of(session, bearer_key(request))


ProjectDep = Annotated[Project, Depends(get_project)]
