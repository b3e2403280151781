"""Helpers shared by the resource routes: project-scoped lookup and cursor pagination."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from cvxtune.errors import InvalidInput, NotFound

M = TypeVar("M")


def get_owned(session: Session, model: type[M], obj_id: str, project_id: str, what: str) -> M:
    """The row if it exists *in this project*; otherwise 404, so ids never leak across projects."""
    row = session.get(model, obj_id)
    if row is None or getattr(row, "project_id", None) != project_id:
        raise NotFound(f"{what} {obj_id} not found")
    return row


def paginate(
    session: Session, model: Any, project_id: str, cursor: str | None, limit: int, **filters: Any
) -> tuple[list[Any], str | None]:
    """Newest first; the cursor is the last id of the previous page."""
    if not 1 <= limit <= 200:
        raise InvalidInput("limit must be between 1 and 200")
    stmt = select(model).where(model.project_id == project_id)
    for col, value in filters.items():
        stmt = stmt.where(getattr(model, col) == value)
    if cursor:
        last = session.get(model, cursor)
        if last is None or last.project_id != project_id:
            raise InvalidInput("unknown cursor")
        stmt = stmt.where(
            or_(
                model.created_at < last.created_at,
                and_(model.created_at == last.created_at, model.id < last.id),
            )
        )
    rows = list(
        session.scalars(stmt.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1))
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1].id if more and rows else None)
