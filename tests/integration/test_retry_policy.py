"""The tasks' failure policy: transient faults retry with backoff, then fail; bad input fails
once. Runs the real task functions with Celery's local `apply` (the broker path is covered by
the service tests)."""

from __future__ import annotations

import pytest
from seed_rows import add_finetune

from app.migrate import upgrade
from cvxtune.db import Finetune, session_scope
from cvxtune.settings import get_settings
from workers import tasks


@pytest.fixture
def job(tmp_path, monkeypatch):
    def make(artifacts_url: str | None = None) -> str:
        monkeypatch.setenv("CVXTUNE_DATA_DIR", str(tmp_path))
        if artifacts_url:
            monkeypatch.setenv("CVXTUNE_ARTIFACTS_URL", artifacts_url)
        get_settings.cache_clear()
        url = get_settings().resolved_database_url
        upgrade(url)
        return add_finetune(url)

    yield make
    get_settings.cache_clear()


def _job(job_id: str) -> Finetune:
    with session_scope(get_settings().resolved_database_url) as s:
        row = s.get(Finetune, job_id)
        assert row is not None
        return row


def test_transient_faults_retry_then_fail(job, monkeypatch):
    import socket

    with socket.socket() as sock:  # a port nobody listens on: the store is "down"
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    job_id = job(f"s3://bucket/p?endpoint_url=http://127.0.0.1:{port}")
    monkeypatch.setattr(tasks, "MAX_RETRIES", 2)
    result = tasks.validate.apply(args=(job_id,))
    row = _job(job_id)
    assert row.state == "failed" and row.error_code == "transient_error", (result.traceback, row)
    assert row.outputs["deliveries"]["validate"] == 3  # the first run and two retries


def test_bad_input_fails_once(job):
    job_id = job()  # the dataset row exists but its file was never stored
    tasks.validate.apply(args=(job_id,))
    row = _job(job_id)
    assert (row.state, row.error_code) == ("failed", "invalid_dataset")
    assert row.outputs["deliveries"] == {"validate": 1}
