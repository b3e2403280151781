from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from app.catalogue import check_backbone, check_head
from app.deps import CtxDep, ProjectDep, SessionDep
from app.problems import Conflict
from app.routes.common import get_owned, paginate
from app.schemas import FinetuneCreate, FinetunePublic, Page
from cvxtune.contracts import HEAD_OUTPUT, TERMINAL_STATES, DatasetKind, JobState
from cvxtune.db import Dataset, Finetune, new_id, utcnow
from cvxtune.errors import InvalidInput

router = APIRouter(prefix="/v1/finetunes", tags=["finetunes"])


def to_public(job: Finetune) -> dict[str, Any]:
    error = {"code": job.error_code, "message": job.error_message or ""} if job.error_code else None
    return {
        "id": job.id,
        "state": job.state,
        "stage": job.stage,
        "progress": job.progress,
        "eta_seconds": job.eta_seconds,
        "error": error,
        "head_id": job.head_id,
        "dataset_id": job.dataset_id,
        "backbone": job.backbone,
        "head": job.head,
        "lam": job.lam,
        "validation_fraction": job.validation_fraction,
        "seed": job.seed,
        "attempts": job.attempts,
        "deliveries": (job.outputs or {}).get("deliveries", {}),
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
    }


def _check_request(ctx: CtxDep, body: FinetuneCreate, ds: Dataset) -> None:
    if ds.kind == DatasetKind.images and not body.backbone:
        raise InvalidInput("an image dataset needs a backbone to extract embeddings with")
    if ds.kind == DatasetKind.features and body.head.kind != "mlp":
        raise InvalidInput(
            "a features dataset holds one vector per sample, which only an mlp head takes; "
            f"the {body.head.kind} head is fitted on a backbone's {HEAD_OUTPUT[body.head.kind]} "
            "output, so it needs an image dataset",
            code="unsupported_head_kind",
        )
    if body.backbone:
        entry = check_backbone(ctx.settings, body.backbone)
        check_head(entry, body.head)
        if ds.kind == DatasetKind.features and ds.n_features != entry["embed_dim"]:
            raise InvalidInput(
                f"dataset features have {ds.n_features} dimensions but {body.backbone} embeds "
                f"to {entry['embed_dim']}; omit backbone for features from elsewhere"
            )
    if isinstance(body.lam, float) and body.lam <= 0:
        raise InvalidInput('lam must be positive or "auto"')
    if body.validation_fraction > 0:
        n_val = min(ds.class_counts.values()) * body.validation_fraction
        if n_val < 1 and ds.n_samples * body.validation_fraction < len(ds.classes):
            raise InvalidInput("validation_fraction leaves too few samples to validate on")


@router.post("", status_code=202, response_model=FinetunePublic)
def create_finetune(
    body: FinetuneCreate,
    ctx: CtxDep,
    project: ProjectDep,
    session: SessionDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> dict[str, Any]:
    """Start a job: validate -> extract embeddings (cached) -> fit -> evaluate -> register."""
    request_hash = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
    if idempotency_key:
        prior = session.scalar(
            select(Finetune).where(
                Finetune.project_id == project.id, Finetune.idempotency_key == idempotency_key
            )
        )
        if prior is not None:
            if prior.request_hash != request_hash:
                raise Conflict("this Idempotency-Key was used with a different request body")
            return to_public(prior)
    ds = get_owned(session, Dataset, body.dataset_id, project.id, "dataset")
    _check_request(ctx, body, ds)
    job = Finetune(
        id=new_id("ft"),
        project_id=project.id,
        dataset_id=ds.id,
        backbone=body.backbone,
        head=body.head.model_dump(),
        lam=body.lam,
        validation_fraction=body.validation_fraction,
        seed=body.seed,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        state=JobState.queued,
        stage="queued",
        progress=0.0,
        outputs={},
        attempts=0,
    )
    session.add(job)
    session.commit()  # the worker must see the row before it sees the task
    try:
        ctx.queue.send_finetune(job.id)
    except Exception:
        job.state, job.error_code = JobState.failed, "broker_unavailable"
        job.error_message, job.finished_at = "the job could not be queued", utcnow()
        session.commit()
        raise
    return to_public(job)


@router.get("", response_model=Page[FinetunePublic])
def list_finetunes(
    project: ProjectDep,
    session: SessionDep,
    cursor: str | None = None,
    limit: int = 50,
    state: JobState | None = None,
) -> dict[str, Any]:
    filters = {"state": state.value} if state else {}
    rows, nxt = paginate(session, Finetune, project.id, cursor, limit, **filters)
    return {"data": [to_public(r) for r in rows], "next_cursor": nxt}


@router.get("/{job_id}", response_model=FinetunePublic)
def get_finetune(job_id: str, project: ProjectDep, session: SessionDep) -> dict[str, Any]:
    return to_public(get_owned(session, Finetune, job_id, project.id, "finetune"))


@router.post("/{job_id}/cancel", response_model=FinetunePublic)
def cancel_finetune(
    job_id: str, ctx: CtxDep, project: ProjectDep, session: SessionDep
) -> dict[str, Any]:
    """Cancel a queued or running job. The worker notices within about a second and stops."""
    job = get_owned(session, Finetune, job_id, project.id, "finetune")
    if job.state in (JobState.succeeded, JobState.failed):
        raise Conflict(f"finetune {job.id} already {job.state}")
    if job.state != JobState.cancelled:
        job.cancel_requested = True
        job.state, job.finished_at, job.eta_seconds = JobState.cancelled, utcnow(), None
        job.updated_at = utcnow()
        session.commit()
        ctx.queue.revoke(job.id)
    return to_public(job)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def finetune_events(
    job_id: str, request: Request, ctx: CtxDep, project: ProjectDep, session: SessionDep
) -> StreamingResponse:
    """Server-Sent Events: a `status` event each time the job changes; ends when it finishes."""
    get_owned(session, Finetune, job_id, project.id, "finetune")
    session.close()

    async def stream() -> AsyncIterator[str]:
        last, idle = None, 0.0
        while True:
            with ctx.sessions() as s:
                job = s.get(Finetune, job_id)
                payload = json.dumps(to_public(job), default=str) if job else None
                state = job.state if job else None
            if payload is None:
                return
            if payload != last:
                last, idle = payload, 0.0
                yield f"event: status\ndata: {payload}\n\n"
            elif idle >= 15:
                idle = 0.0
                yield ": keep-alive\n\n"
            if state in TERMINAL_STATES or await request.is_disconnected():
                return
            await asyncio.sleep(0.25)
            idle += 0.25

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
