"""The Alembic migrations build exactly the schema the models describe."""

from alembic import command

from app.migrate import alembic_config, upgrade
from cvxtune.db import engine_for


def test_migrations_match_the_models(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.sqlite3'}"
    upgrade(url)
    upgrade(url)  # idempotent
    cfg = alembic_config(url)
    with engine_for(url).connect() as conn:
        cfg.attributes["connection"] = conn
        command.check(cfg)  # raises when autogenerate would emit any operation
