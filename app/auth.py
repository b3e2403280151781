"""API keys: `cvx_` + 43 url-safe characters, stored as sha256 hashes, one project each."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from cvxtune.db import ApiKey, Project, new_id


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def get_or_create_project(session: Session, name: str) -> Project:
    project = session.scalar(select(Project).where(Project.name == name))
    if project is None:
        project = Project(id=new_id("prj"), name=name)
        session.add(project)
        session.flush()
    return project


def create_key(session: Session, project_name: str) -> str:
    """Create a key for the project (created if needed); the plain key is returned only here."""
    project = get_or_create_project(session, project_name)
    key = "cvx_" + secrets.token_urlsafe(32)
    session.add(
        ApiKey(id=new_id("key"), project_id=project.id, key_hash=hash_key(key), prefix=key[:8])
    )
    session.flush()
    return key


def project_for_key(session: Session, key: str) -> Project | None:
    """The project of a key that is not revoked: one query, on every /v1 request."""
    return session.scalar(
        select(Project)
        .join(ApiKey, ApiKey.project_id == Project.id)
        .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    )
