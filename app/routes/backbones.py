from __future__ import annotations

from fastapi import APIRouter

from app.catalogue import list_backbones
from app.deps import CtxDep, ProjectDep
from app.schemas import BackbonePublic

router = APIRouter(prefix="/v1/backbones", tags=["backbones"])


@router.get("", response_model=list[BackbonePublic])
def get_backbones(ctx: CtxDep, project: ProjectDep) -> list[dict]:
    return list_backbones(ctx.settings)
