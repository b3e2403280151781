"""upload -> finetune -> predict through the real API process, Redis and a Celery worker."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAST_HEAD = {"gates": 16, "tol": 1e-4, "max_iter": 300}


def blobs(n_per_class: int = 30, d: int = 6, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    X = np.concatenate(
        [
            rng.normal(0, 1, (n_per_class, d)),
            rng.normal(4, 1, (n_per_class, d)),
            rng.normal(-4, 1, (n_per_class, d)),
        ]
    ).astype(np.float32)
    y = np.repeat(np.array(["low", "mid", "high"])[[1, 2, 0]], n_per_class)
    buf = io.BytesIO()
    np.savez(buf, X=X, y=y)
    return buf.getvalue()


@pytest.fixture(scope="module")
def npz_dataset(service, alpha):
    with service.client(alpha) as c:
        r = c.post("/v1/datasets", files={"file": ("blobs.npz", blobs())}, data={"name": "blobs"})
        assert r.status_code == 201, r.text
        return r.json()


def test_npz_finetune_on_worker_then_predict(service, alpha, npz_dataset, wait_job, poll):
    with service.client(alpha) as c:
        body = {
            "dataset_id": npz_dataset["id"],
            "head": FAST_HEAD,
            "lam": 1e-2,
            "seed": 3,
            "validation_fraction": 0.2,
        }
        r = c.post("/v1/finetunes", json=body, headers={"Idempotency-Key": "blobs-1"})
        assert r.status_code == 202, r.text
        job = r.json()
        again = c.post("/v1/finetunes", json=body, headers={"Idempotency-Key": "blobs-1"})
        assert again.json()["id"] == job["id"]

        # The event stream reports the stages as the worker moves through them.
        events = []
        with c.stream("GET", f"/v1/finetunes/{job['id']}/events") as stream:
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        assert events[-1]["state"] == "succeeded", events[-1]
        progress = [e["progress"] for e in events]
        assert progress == sorted(progress) and progress[-1] == 1.0
        assert {e["stage"] for e in events} >= {"done"}

        job = wait_job(c, job["id"])
        assert job["state"] == "succeeded" and job["error"] is None
        head = c.get(f"/v1/heads/{job['head_id']}").json()
        assert head["metrics"]["validation"]["accuracy"] >= 0.9
        assert head["lineage"]["dataset_hash"] == npz_dataset["content_hash"]

        r = c.post(
            f"/v1/heads/{head['id']}/predict",
            json={"embeddings": [[0.0] * 6, [4.0] * 6, [-4.0] * 6]},
        )
        assert r.status_code == 200, r.text
        assert [p["label"] for p in r.json()["predictions"]] == ["mid", "high", "low"]

        # Batch prediction over the stored dataset, as a job of its own.
        r = c.post(f"/v1/heads/{head['id']}/predictions", json={"dataset_id": npz_dataset["id"]})
        assert r.status_code == 202, r.text
        pid = r.json()["id"]
        done = poll(
            lambda: (
                (p := c.get(f"/v1/predictions/{pid}").json())["state"] in ("succeeded", "failed")
                and p
            ),
            120,
            "the batch prediction",
        )
        assert done["state"] == "succeeded", done
        assert len(done["predictions"]) == npz_dataset["n_samples"] == 90
        assert done["summary"]["accuracy"] >= 0.9


def test_other_project_sees_nothing(service, alpha, beta, npz_dataset, wait_job):
    with service.client(beta) as c:
        assert c.get(f"/v1/datasets/{npz_dataset['id']}").status_code == 404
        assert c.get("/v1/datasets").json()["data"] == []
        r = c.post("/v1/finetunes", json={"dataset_id": npz_dataset["id"]})
        assert r.status_code == 404 and r.json()["code"] == "not_found"
    with service.client(alpha) as c:
        jobs = c.get("/v1/finetunes").json()["data"]
        heads = c.get("/v1/heads").json()["data"]
    with service.client(beta) as c:
        for job in jobs:
            assert c.get(f"/v1/finetunes/{job['id']}").status_code == 404
            assert c.post(f"/v1/finetunes/{job['id']}/cancel").status_code == 404
        for head in heads:
            assert c.get(f"/v1/heads/{head['id']}").status_code == 404
            assert c.get(f"/v1/heads/{head['id']}/weights").status_code == 404
            r = c.post(f"/v1/heads/{head['id']}/predict", json={"embeddings": [[0.0] * 6]})
            assert r.status_code == 404


def test_bad_input_fails_once_with_its_reason(service, alpha, wait_job):
    with service.client(alpha) as c:
        ds = c.post("/v1/datasets", files={"file": ("b.npz", blobs(seed=9))}).json()
        # The dataset's file vanishes from the store after upload (say, an operator's mistake).
        (service.data_dir / "artifacts" / "datasets" / ds["id"] / "features.npz").unlink()
        job = c.post("/v1/finetunes", json={"dataset_id": ds["id"], "lam": 0.01}).json()
        job = wait_job(c, job["id"], timeout=120)
        assert job["state"] == "failed" and job["head_id"] is None
        assert job["error"]["code"] == "invalid_dataset" and "missing" in job["error"]["message"]
        assert job["deliveries"] == {"validate": 1}  # not retried: retrying cannot help
