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


class _JobGauges:
    """Jobs by state, counted in the database at scrape time: true across API replicas."""

    def __init__(self, ctx: Any):
        self.ctx = ctx

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily
        from sqlalchemy import func, select

        from cvxtune.db import Finetune, Prediction

        for model, name in ((Finetune, "finetunes"), (Prediction, "predictions")):
            g = GaugeMetricFamily(f"cvxtune_{name}", f"{name} by state", labels=["state"])
            with self.ctx.sessions() as s:
                rows = s.execute(select(model.state, func.count()).group_by(model.state)).all()
            for state, n in rows:
                g.add_metric([state], n)
            yield g


@router.get("/metrics", response_class=Response)
def metrics(ctx: CtxDep) -> Response:
    """Prometheus: HTTP requests and latency, and jobs by state."""
    from prometheus_client import CollectorRegistry

    jobs = CollectorRegistry(auto_describe=False)
    jobs.register(_JobGauges(ctx))
    body = generate_latest() + generate_latest(jobs)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
