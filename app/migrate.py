"""Bring a database to the newest schema with Alembic (`upgrade head`); idempotent."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from cvxtune.db import engine_for

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str) -> None:
    cfg = alembic_config(url)
    with engine_for(url).begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
