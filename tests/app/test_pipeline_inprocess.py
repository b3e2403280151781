"""The whole finetune pipeline in one process: the routes create the job, the stage functions
(the same ones the Celery tasks call) run it, and the routes serve the registered head."""

import numpy as np

from workers import jobs

FAST_HEAD = {"gates": 16, "tol": 1e-4, "max_iter": 300}


def _run_job(settings, job_id):
    env = jobs.Env(settings)
    for stage in (jobs.validate, jobs.extract, jobs.fit, jobs.evaluate, jobs.register):
        stage(job_id, env)


def test_features_finetune_then_predict(client, auth, settings, queue, make_npz, upload_file):
    ds = upload_file(auth, make_npz(n_per_class=30, d=6)).json()
    r = client.post(
        "/v1/finetunes",
        headers=auth,
        json={"dataset_id": ds["id"], "head": FAST_HEAD, "lam": 1e-2, "seed": 1},
    )
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] == "queued" and queue.finetunes == [job["id"]]
    _run_job(settings, job["id"])
    job = client.get(f"/v1/finetunes/{job['id']}", headers=auth).json()
    assert job["state"] == "succeeded", job
    assert job["progress"] == 1.0 and job["head_id"]
    head = client.get(f"/v1/heads/{job['head_id']}", headers=auth).json()
    val = head["metrics"]["validation"]
    assert val["accuracy"] >= 0.9
    assert sum(map(sum, val["confusion_matrix"])) == val["n"] == 12
    assert head["certificate"]["duality_gap"] is not None
    assert head["lineage"]["dataset_id"] == ds["id"]
    X = np.array([[0.0] * 6, [6.0] * 6])
    r = client.post(
        f"/v1/heads/{head['id']}/predict", headers=auth, json={"embeddings": X.tolist()}
    )
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["label"] for p in preds] == ["cat", "dog"]
    assert abs(sum(preds[0]["probabilities"].values()) - 1) < 1e-5
    w = client.get(f"/v1/heads/{head['id']}/weights", headers=auth)
    assert w.status_code == 200 and len(w.content) > 100
