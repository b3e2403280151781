from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.deps import CtxDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(ctx: CtxDep) -> JSONResponse:
    """Database, broker and artifact store all answer; 503 names what does not."""

    def database() -> None:
        with ctx.sessions() as s:
            s.execute(text("SELECT 1"))

    checks: dict[str, Any] = {}
    for name, fn in (
        ("database", database),
        ("broker", ctx.queue.ping),
        ("artifacts", ctx.store.check),
    ):
        try:
            await run_in_threadpool(fn)
            checks[name] = "ok"
        except Exception as e:
            checks[name] = f"unavailable: {type(e).__name__}"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503
    )


@router.get("/metrics", response_class=Response)
def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
