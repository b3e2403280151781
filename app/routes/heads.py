from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from app import uploads
from app.deps import CtxDep, ProjectDep, SessionDep, bearer_key, project_of
from app.problems import PayloadTooLarge
from app.routes.common import get_owned, paginate
from app.routes.predictions import to_public as prediction_public
from app.schemas import (
    BatchPredictionCreate,
    BatchPredictionPublic,
    HeadPublic,
    Page,
    PredictEmbeddings,
    PredictResponse,
)
from cvxtune.contracts import HEAD_OUTPUT, JobState
from cvxtune.db import Dataset, Head, Prediction, committing, new_id, utcnow
from cvxtune.errors import InvalidInput, NotFound

router = APIRouter(prefix="/v1/heads", tags=["heads"])

MAX_PREDICT_BYTES = 64 * 1024**2
MAX_PREDICT_FILES = 256


@router.get("", response_model=Page[HeadPublic])
def list_heads(
    project: ProjectDep, session: SessionDep, cursor: str | None = None, limit: int = 50
) -> dict[str, Any]:
    rows, nxt = paginate(session, Head, project.id, cursor, limit)
    return {"data": rows, "next_cursor": nxt}


@router.get("/{head_id}", response_model=HeadPublic)
def get_head(head_id: str, project: ProjectDep, session: SessionDep) -> Head:
    return get_owned(session, Head, head_id, project.id, "head")


@router.delete("/{head_id}", status_code=204)
def delete_head(head_id: str, ctx: CtxDep, project: ProjectDep, session: SessionDep) -> Response:
    head = get_owned(session, Head, head_id, project.id, "head")
    session.delete(head)
    session.commit()
    ctx.serving.forget_head(head_id)
    ctx.store.delete(head.artifact_key)
    return Response(status_code=204)


@router.get(
    "/{head_id}/weights",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def download_weights(
    head_id: str, ctx: CtxDep, project: ProjectDep, session: SessionDep
) -> FileResponse:
    """The head's weights as safetensors (the metadata JSON is in GET /v1/heads/{id})."""
    head = get_owned(session, Head, head_id, project.id, "head")
    files = sorted(ctx.store.local_path(head.artifact_key).glob("*.safetensors"))
    if not files:
        raise NotFound(f"head {head_id} has no weights file")
    return FileResponse(
        files[0], media_type="application/octet-stream", filename=f"{head_id}.safetensors"
    )


@dataclass(frozen=True)
class ServedHead:
    id: str
    head_dir: Path
    classes: list[str]
    backbone: str | None


async def served_head(head_id: str, request: Request, ctx: CtxDep) -> ServedHead:
    """The caller's head, for predict: the API key and the head's row in one trip to the
    threadpool and one short session, none of it on the event loop (the hot route; ProjectDep
    and SessionDep make three trips, and the row would be read on the loop). The artifact
    store's local path is resolved there too: from an S3 store it downloads the head once."""
    key = bearer_key(request)

    def look_up() -> ServedHead:
        with committing(ctx.sessions) as session:
            project = project_of(session, key)
            head = get_owned(session, Head, head_id, project.id, "head")
            classes, backbone, artifact = list(head.classes), head.backbone, head.artifact_key
        return ServedHead(head_id, ctx.store.local_path(artifact), classes, backbone)

    return await run_in_threadpool(look_up)


ServedHeadDep = Annotated[ServedHead, Depends(served_head)]


@router.post(
    "/{head_id}/predict",
    response_model=PredictResponse,
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {"schema": PredictEmbeddings.model_json_schema()},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "files": {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                            }
                        },
                    }
                },
            }
        }
    },
)
async def predict(request: Request, ctx: CtxDep, head: ServedHeadDep) -> dict[str, Any]:
    """Images as multipart field `files` (one or more), or JSON {"embeddings": [...]} with one
    entry per sample shaped as the head's input: (d,) for mlp, (channels, height, width) for
    cnn, (tokens, d) for attention heads."""
    head_id, head_dir, classes, backbone = head.id, head.head_dir, head.classes, head.backbone
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("application/json"):
        X = _embeddings(await _body(request, MAX_PREDICT_BYTES))
        preds = await ctx.serving.predict_embeddings(head_id, head_dir, classes, X)
    else:
        if backbone is None:
            raise InvalidInput(
                "this head was fitted on embeddings without a backbone; "
                'send {"embeddings": ...} instead of images'
            )
        parts = await uploads.receive_small(request, MAX_PREDICT_BYTES, MAX_PREDICT_FILES)
        images = [data for field, data in parts if field == "files"]
        if not images:
            raise InvalidInput("send one or more images as multipart field 'files'")
        preds = await ctx.serving.predict_images(head_id, head_dir, classes, backbone, images)
    return {"head_id": head_id, "predictions": preds}


def head_kind(head: Head) -> str:
    """The head's kind, from the spec it was fitted with (older heads are all MLPs)."""
    return str(((head.lineage or {}).get("head") or {}).get("kind", "mlp"))


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes `limit` bytes."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body larger than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _embeddings(body: bytes) -> np.ndarray:
    """The samples of a JSON predict body as one numeric array (n, *input shape)."""
    try:
        rows = PredictEmbeddings.model_validate_json(body).embeddings
    except ValueError as e:
        raise InvalidInput(
            f'body must be {{"embeddings": [...]}}, one entry per sample: {e}'
        ) from e
    try:
        X = np.asarray(rows)
    except ValueError as e:  # ragged nesting
        raise InvalidInput("embeddings must all have the same shape") from e
    if X.dtype.kind not in "iuf":
        raise InvalidInput("embeddings must be (nested) lists of numbers of one shape")
    return X


@router.post("/{head_id}/predictions", status_code=202, response_model=BatchPredictionPublic)
def create_batch_prediction(
    head_id: str, body: BatchPredictionCreate, ctx: CtxDep, project: ProjectDep, session: SessionDep
) -> dict[str, Any]:
    """Predict every sample of a stored dataset as a job; GET /v1/predictions/{id} for results."""
    head = get_owned(session, Head, head_id, project.id, "head")
    ds = get_owned(session, Dataset, body.dataset_id, project.id, "dataset")
    if ds.kind == "images" and head.backbone is None:
        raise InvalidInput("this head has no backbone, so it can only predict feature datasets")
    if ds.kind == "features" and head_kind(head) != "mlp":
        raise InvalidInput(
            f"the {head_kind(head)} head predicts image datasets only (it needs the backbone's "
            f"{HEAD_OUTPUT[head_kind(head)]} output); {ds.id} is a features dataset",
            code="unsupported_head_kind",
        )
    pred = Prediction(
        id=new_id("pr"),
        project_id=project.id,
        head_id=head.id,
        dataset_id=ds.id,
        state=JobState.queued,
        progress=0.0,
        attempts=0,
        summary={},
    )
    session.add(pred)
    session.commit()
    try:
        ctx.queue.send_batch_prediction(pred.id)
    except Exception:
        pred.state, pred.error_code, pred.finished_at = (
            JobState.failed,
            "broker_unavailable",
            utcnow(),
        )
        pred.error_message = "the job could not be queued"
        session.commit()
        raise
    return prediction_public(pred, None)
