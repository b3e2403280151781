"""Cancel, a worker killed mid-job, and an API restart, against the real worker and Redis."""

from __future__ import annotations

import io
import os
import signal

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def dataset(service, alpha):
    rng = np.random.default_rng(7)
    X = np.concatenate([rng.normal(0, 1, (40, 10)), rng.normal(2, 1, (40, 10))])
    buf = io.BytesIO()
    np.savez(buf, X=X.astype(np.float32), y=np.repeat(["no", "yes"], 40))
    with service.client(alpha) as c:
        r = c.post("/v1/datasets", files={"file": ("r.npz", buf.getvalue())})
        assert r.status_code == 201, r.text
        return r.json()


def _in_fit(c, job_id):
    job = c.get(f"/v1/finetunes/{job_id}").json()
    assert job["state"] in ("queued", "running"), job
    return job if job["stage"] == "fit" else None


def test_cancel_stops_a_running_job(service, alpha, dataset, wait_job, poll):
    # Never converges (tol below float precision, a million iterations): only cancel ends it.
    endless = {
        "dataset_id": dataset["id"],
        "lam": 1e-4,
        "head": {"gates": 32, "tol": 1e-15, "max_iter": 1_000_000},
    }
    with service.client(alpha) as c:
        job = c.post("/v1/finetunes", json=endless).json()
        poll(lambda: _in_fit(c, job["id"]), 120, "the job to start fitting")
        r = c.post(f"/v1/finetunes/{job['id']}/cancel")
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
        # The worker (concurrency 1) is free again only if the endless fit really stopped.
        quick = {
            "dataset_id": dataset["id"],
            "lam": 1e-2,
            "head": {"gates": 8, "tol": 1e-4, "max_iter": 100},
        }
        after = wait_job(c, c.post("/v1/finetunes", json=quick).json()["id"], timeout=120)
        assert after["state"] == "succeeded"
        final = c.get(f"/v1/finetunes/{job['id']}").json()
        assert final["state"] == "cancelled" and final["head_id"] is None
        assert c.post(f"/v1/finetunes/{job['id']}/cancel").json()["state"] == "cancelled"
    assert f"job {job['id']}: cancelled during" in service.log("worker.log")


def _fitting(c, dataset, seed: int, poll) -> dict:
    """A job long enough to be killed in (1000 iterations at an unreachable tol), once fitting."""
    body = {
        "dataset_id": dataset["id"],
        "lam": 1e-3,
        "seed": seed,
        "head": {"gates": 32, "tol": 1e-15, "max_iter": 1000},
    }
    job = c.post("/v1/finetunes", json=body).json()
    poll(lambda: _in_fit(c, job["id"]), 120, "the job to start fitting")
    return job


def _finishes_after_a_second_delivery(c, job, service, wait_job) -> dict:
    done = wait_job(c, job["id"], timeout=300)
    assert done["state"] == "succeeded", (done, service.log("worker.log"))
    assert done["deliveries"]["fit"] >= 2
    assert c.get(f"/v1/heads/{done['head_id']}").status_code == 200
    return done


def test_job_survives_its_worker_process_being_killed(service, alpha, dataset, wait_job, poll):
    with service.client(alpha) as c:
        job = _fitting(c, dataset, 5, poll)
        children = service.worker_children()
        assert children, "the prefork worker should have a pool process"
        for pid in children:
            os.kill(pid, signal.SIGKILL)  # what the OOM killer does
        _finishes_after_a_second_delivery(c, job, service, wait_job)


def test_job_survives_its_whole_worker_being_killed(service, alpha, dataset, wait_job, poll):
    # Killed whole (main process and pool), the worker neither acks nor rejects: Redis would
    # deliver the message again only after the visibility timeout (hours). The API's recovery
    # loop sees the heartbeat stop (5 s in these tests) and queues the stage again.
    with service.client(alpha) as c:
        job = _fitting(c, dataset, 6, poll)
        assert service.worker is not None
        os.killpg(service.worker.pid, signal.SIGKILL)  # a lost node, an OOM-killed main process
        service.worker.wait()
        service.start_worker()
        _finishes_after_a_second_delivery(c, job, service, wait_job)
    assert f"job {job['id']}: no heartbeat for" in service.log("api.log", tail=10**8)


def test_api_restart_keeps_everything(service, alpha):
    with service.client(alpha) as c:
        before = {
            "datasets": c.get("/v1/datasets").json()["data"],
            "finetunes": c.get("/v1/finetunes").json()["data"],
            "heads": c.get("/v1/heads").json()["data"],
        }
    assert before["heads"], "earlier tests registered heads"
    service.stop_api()
    service.start_api()
    with service.client(alpha) as c:
        assert c.get("/v1/datasets").json()["data"] == before["datasets"]
        assert c.get("/v1/finetunes").json()["data"] == before["finetunes"]
        assert c.get("/v1/heads").json()["data"] == before["heads"]
        head = before["heads"][0]
        w = c.get(f"/v1/heads/{head['id']}/weights")
        assert w.status_code == 200 and w.content[:8] != b""
