from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app import ingest, uploads
from app.deps import CtxDep, ProjectDep, SessionDep
from app.routes.common import get_owned, paginate
from app.schemas import DatasetPublic, Page
from cvxtune.db import Dataset, Finetune
from cvxtune.errors import InvalidInput

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.post(
    "",
    status_code=201,
    response_model=DatasetPublic,
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "name": {"type": "string"},
                        },
                    }
                }
            }
        }
    },
)
async def create_dataset(
    request: Request, ctx: CtxDep, project: ProjectDep, session: SessionDep
) -> Dataset:
    """Upload a zip/tar ImageFolder, a CSV manifest with images (in a zip/tar), or an NPZ or
    Parquet file of features and labels, as the multipart field `file`."""
    up = await uploads.receive(
        request, ctx.settings.uploads_dir, ctx.settings.max_upload_bytes, max_files=2
    )
    try:
        files = [f for f in up.files if f.field == "file"]
        if len(files) != 1:
            raise InvalidInput("send exactly one multipart field named 'file'")
        row = ingest.ingest(
            session, ctx.store, ctx.settings, project.id, files[0], up.fields.get("name")
        )
        session.commit()
        return row
    finally:
        up.cleanup()


@router.get("", response_model=Page[DatasetPublic])
def list_datasets(
    project: ProjectDep, session: SessionDep, cursor: str | None = None, limit: int = 50
) -> dict:
    rows, nxt = paginate(session, Dataset, project.id, cursor, limit)
    return {"data": rows, "next_cursor": nxt}


@router.get("/{dataset_id}", response_model=DatasetPublic)
def get_dataset(dataset_id: str, project: ProjectDep, session: SessionDep) -> Dataset:
    return get_owned(session, Dataset, dataset_id, project.id, "dataset")


@router.delete("/{dataset_id}", status_code=204)
def delete_dataset(
    dataset_id: str, ctx: CtxDep, project: ProjectDep, session: SessionDep
) -> Response:
    row = get_owned(session, Dataset, dataset_id, project.id, "dataset")
    running = (
        session.query(Finetune)
        .filter(Finetune.dataset_id == row.id, Finetune.state.in_(["queued", "running"]))
        .count()
    )
    if running:
        from app.problems import Conflict

        raise Conflict(f"dataset {row.id} is used by {running} unfinished finetune job(s)")
    session.delete(row)
    session.commit()
    ctx.store.delete(f"datasets/{dataset_id}")
    return Response(status_code=204)
