from sqlalchemy import select

from cvxtune.db import ApiKey, session_scope


def test_requests_without_a_valid_key_are_refused(client, auth):
    predict = "/v1/heads/hd_0123456789abcdef/predict"  # checks the key its own way (one trip)
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}):
        for r in (
            client.get("/v1/datasets", headers=headers),
            client.post(predict, headers=headers, json={"embeddings": [[0.0]]}),
        ):
            assert r.status_code == 401
            assert r.headers["content-type"] == "application/problem+json"
            body = r.json()
            assert body["code"] == "unauthorized" and body["status"] == 401 and body["detail"]
    assert client.get("/v1/datasets", headers=auth).status_code == 200
    r = client.post(predict, headers=auth, json={"embeddings": [[0.0]]})
    assert r.status_code == 404 and r.json()["code"] == "not_found"


def test_keys_are_stored_hashed(settings, auth):
    key = auth["Authorization"].split()[1]
    with session_scope(settings.resolved_database_url) as s:
        rows = s.scalars(select(ApiKey)).all()
    assert rows and all(key not in (r.key_hash, r.prefix) for r in rows)
    assert all(len(r.key_hash) == 64 for r in rows)


def test_health_ready_and_metrics(client, auth, queue):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "artifacts": "ok"}
    client.get("/v1/datasets", headers=auth)
    metrics = client.get("/metrics").text
    assert 'cvxtune_http_requests_total{method="GET",route="/v1/datasets",status="200"}' in metrics
    assert client.get("/healthz").headers["x-request-id"]


def test_requests_carry_ids_and_are_counted_by_route_template(client, auth):
    assert client.get("/healthz", headers={"x-request-id": "req-42"}).headers["x-request-id"] == (
        "req-42"
    )
    assert client.get("/v1/heads/hd_missing", headers=auth).status_code == 404
    assert client.get("/no/such/path").status_code == 404
    metrics = client.get("/metrics").text
    assert (
        'cvxtune_http_requests_total{method="GET",route="/v1/heads/{head_id}",status="404"}'
        in metrics
    )
    assert 'cvxtune_http_requests_total{method="GET",route="unmatched",status="404"}' in metrics
    assert 'cvxtune_http_request_seconds_count{method="GET",route="/healthz"}' in metrics


def test_metrics_count_jobs_by_state(client, auth, make_npz, upload_file):
    ds = upload_file(auth, make_npz()).json()
    client.post("/v1/finetunes", headers=auth, json={"dataset_id": ds["id"]})
    assert 'cvxtune_finetunes{state="queued"} 1.0' in client.get("/metrics").text


def test_readyz_names_what_is_down(client, queue):
    def down() -> None:
        raise ConnectionError("broker down")

    queue.ping = down
    r = client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["checks"]["broker"].startswith("unavailable")


def test_unknown_route_and_openapi(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    spec = client.get("/openapi.json").json()
    assert "/v1/finetunes/{job_id}/events" in spec["paths"]
    assert "/v1/heads/{head_id}/predict" in spec["paths"]
