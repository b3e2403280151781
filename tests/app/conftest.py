"""Route tests: a real app on a temporary SQLite database and artifact directory, with the task
queue replaced by a recorder (the real broker and worker are exercised in tests/integration)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.auth import create_key
from app.main import create_app
from cvxtune import contracts
from cvxtune.db import session_scope
from cvxtune.settings import Settings


class RecordingQueue:
    def __init__(self) -> None:
        self.finetunes: list[str] = []
        self.predictions: list[str] = []
        self.revoked: list[str] = []

    def send_finetune(self, job_id: str, start: str = contracts.TASK_VALIDATE) -> None:
        assert start == contracts.TASK_VALIDATE, "routes queue whole chains; recovery resumes"
        self.finetunes.append(job_id)

    def send_batch_prediction(self, prediction_id: str) -> None:
        self.predictions.append(prediction_id)

    def revoke(self, job_id: str) -> None:
        self.revoked.append(job_id)

    def ping(self) -> None:
        pass


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", max_upload_bytes=4 * 1024**2)


@pytest.fixture
def queue() -> RecordingQueue:
    return RecordingQueue()


@pytest.fixture
def client(settings: Settings, queue: RecordingQueue) -> Iterator[TestClient]:
    app = create_app(settings, queue=queue)
    with TestClient(app) as c:
        yield c


def _key(settings: Settings, project: str) -> dict[str, str]:
    with session_scope(settings.resolved_database_url) as s:
        return {"Authorization": f"Bearer {create_key(s, project)}"}


@pytest.fixture
def auth(settings: Settings, client: TestClient) -> dict[str, str]:
    return _key(settings, "alpha")


@pytest.fixture
def other_auth(settings: Settings, client: TestClient) -> dict[str, str]:
    return _key(settings, "beta")


@pytest.fixture
def make_npz():  # type: ignore[no-untyped-def]
    return npz_bytes


@pytest.fixture
def upload_file(client: TestClient):  # type: ignore[no-untyped-def]
    def _upload(auth, data, filename="d.npz", name=None):  # type: ignore[no-untyped-def]
        fields = {"name": name} if name else None
        return client.post(
            "/v1/datasets", headers=auth, files={"file": (filename, data)}, data=fields
        )

    return _upload


def npz_bytes(
    n_per_class: int = 20, d: int = 8, classes: tuple[str, ...] = ("cat", "dog"), seed: int = 0
) -> bytes:
    """Two well-separated Gaussian blobs per class, as an uploaded NPZ."""
    rng = np.random.default_rng(seed)
    X = np.concatenate(
        [rng.normal(3.0 * i, 1.0, size=(n_per_class, d)) for i in range(len(classes))]
    ).astype(np.float32)
    y = np.repeat(np.array(classes), n_per_class)
    buf = io.BytesIO()
    np.savez(buf, X=X, y=y)
    return buf.getvalue()
