import json

import pytest

from cvxtune.db import Finetune, session_scope


@pytest.fixture
def dataset(auth, make_npz, upload_file):
    return upload_file(auth, make_npz(n_per_class=10, d=4)).json()


def test_create_queues_the_chain_and_reads_back(client, auth, dataset, queue):
    r = client.post("/v1/finetunes", headers=auth, json={"dataset_id": dataset["id"]})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] == "queued" and job["progress"] == 0.0 and job["head_id"] is None
    assert job["lam"] == "auto" and job["head"]["kind"] == "mlp"
    assert queue.finetunes == [job["id"]]
    assert client.get(f"/v1/finetunes/{job['id']}", headers=auth).json() == job
    listed = client.get("/v1/finetunes", headers=auth, params={"state": "queued"}).json()
    assert [j["id"] for j in listed["data"]] == [job["id"]]
    assert (
        client.get("/v1/finetunes", headers=auth, params={"state": "running"}).json()["data"] == []
    )


def test_idempotency_key(client, auth, dataset, queue):
    body = {"dataset_id": dataset["id"], "lam": 0.01}
    h = {**auth, "Idempotency-Key": "abc"}
    first = client.post("/v1/finetunes", headers=h, json=body).json()
    again = client.post("/v1/finetunes", headers=h, json=body)
    assert again.status_code == 202 and again.json()["id"] == first["id"]
    assert queue.finetunes == [first["id"]]  # queued once
    other = client.post("/v1/finetunes", headers=h, json={**body, "lam": 0.1})
    assert other.status_code == 409 and other.json()["code"] == "conflict"


BAD = {
    "unknown head option": ({"head": {"kind": "mlp", "learning_rate": 1}}, 422, "invalid_input"),
    "unknown head kind": ({"head": {"kind": "transformer"}}, 422, "invalid_input"),
    "pricing on relu": (
        {"head": {"kind": "mlp", "activation": "relu", "pricing_rounds": 2}},
        422,
        "invalid_input",
    ),
    "negative lam": ({"lam": -1}, 422, "invalid_input"),
    "lam word": ({"lam": "big"}, 422, "invalid_input"),
    "validation fraction": ({"validation_fraction": 1.5}, 422, "invalid_input"),
    "unknown backbone": ({"backbone": "resnet9000"}, 422, "unknown_backbone"),
    "dimension mismatch": ({"backbone": "tf_efficientnet_lite0"}, 422, "invalid_input"),
    "no weights here": ({"backbone": "vit_tiny_patch16_224"}, 409, "weights_unavailable"),
    "missing dataset": ({"dataset_id": "ds_0000000000000000"}, 404, "not_found"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_say_what_is_wrong(client, auth, dataset, queue, case):
    extra, status, code = BAD[case]
    r = client.post("/v1/finetunes", headers=auth, json={"dataset_id": dataset["id"], **extra})
    assert r.status_code == status, r.text
    assert r.json()["code"] == code and r.json()["detail"]
    assert queue.finetunes == []


def test_other_projects_dataset_is_not_found(client, other_auth, dataset):
    r = client.post("/v1/finetunes", headers=other_auth, json={"dataset_id": dataset["id"]})
    assert r.status_code == 404


def test_cancel_and_events(client, auth, other_auth, dataset, queue, settings):
    job = client.post("/v1/finetunes", headers=auth, json={"dataset_id": dataset["id"]}).json()
    assert client.post(f"/v1/finetunes/{job['id']}/cancel", headers=other_auth).status_code == 404
    r = client.post(f"/v1/finetunes/{job['id']}/cancel", headers=auth)
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert queue.revoked == [job["id"]]
    assert client.post(f"/v1/finetunes/{job['id']}/cancel", headers=auth).json()["state"] == (
        "cancelled"
    )
    with client.stream("GET", f"/v1/finetunes/{job['id']}/events", headers=auth) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
    assert json.loads(lines[-1][6:])["state"] == "cancelled"

    # A finished job cannot be cancelled.
    done = client.post("/v1/finetunes", headers=auth, json={"dataset_id": dataset["id"]}).json()
    with session_scope(settings.resolved_database_url) as s:
        s.get(Finetune, done["id"]).state = "succeeded"
    r = client.post(f"/v1/finetunes/{done['id']}/cancel", headers=auth)
    assert r.status_code == 409


def test_dataset_in_use_cannot_be_deleted(client, auth, dataset):
    client.post("/v1/finetunes", headers=auth, json={"dataset_id": dataset["id"]})
    r = client.delete(f"/v1/datasets/{dataset['id']}", headers=auth)
    assert r.status_code == 409


def test_backbones_catalogue(client, auth):
    r = client.get("/v1/backbones", headers=auth)
    assert r.status_code == 200
    cat = {b["name"]: b for b in r.json()}
    lite = cat["tf_efficientnet_lite0"]
    assert lite["embed_dim"] == 1280 and lite["input_size"] == [3, 224, 224]
    assert lite["weights_available"] is True
    assert cat["vit_tiny_patch16_224"]["weights_available"] is False
