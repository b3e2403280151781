from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter

from app.deps import CtxDep, ProjectDep, SessionDep
from app.routes.common import get_owned
from app.schemas import BatchPredictionPublic
from cvxtune.db import Prediction

router = APIRouter(prefix="/v1/predictions", tags=["predictions"])


def to_public(p: Prediction, results: list[dict[str, Any]] | None) -> dict[str, Any]:
    error = {"code": p.error_code, "message": p.error_message or ""} if p.error_code else None
    return {
        "id": p.id,
        "head_id": p.head_id,
        "dataset_id": p.dataset_id,
        "state": p.state,
        "progress": p.progress,
        "error": error,
        "summary": p.summary or {},
        "predictions": results,
        "created_at": p.created_at,
        "finished_at": p.finished_at,
    }


@router.get("/{prediction_id}", response_model=BatchPredictionPublic)
def get_prediction(
    prediction_id: str, ctx: CtxDep, project: ProjectDep, session: SessionDep
) -> dict[str, Any]:
    p = get_owned(session, Prediction, prediction_id, project.id, "prediction")
    results = None
    if p.result_key:
        results = json.loads(ctx.store.local_path(p.result_key).read_text())
    return to_public(p, results)
