"""The client commands against the real app: a real httpx.Client whose transport hands each
request to the FastAPI app, and a queue that runs each finetune's stage functions in a thread
(the same functions the Celery tasks call), so `finetune --wait` follows a live job."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from cvxtune import cli
from cvxtune import client as cvx
from cvxtune.errors import CvxtuneError
from cvxtune.settings import Settings
from workers import jobs

FAST_HEAD = ["gates=16", "tol=1e-4", "max_iter=300"]


class ThreadQueue:
    """Runs each finetune as the worker would, in a thread; `hold` leaves jobs queued."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.hold = False
        self.threads: list[threading.Thread] = []

    def _run(self, job_id: str) -> None:
        env = jobs.Env(self.settings)
        for stage in (jobs.validate, jobs.extract, jobs.fit, jobs.evaluate, jobs.register):
            try:
                stage(job_id, env)
            except jobs.JobCancelled:
                return
            except CvxtuneError as e:
                jobs.fail_job(env, job_id, e.code, e.message)
                return

    def send_finetune(self, job_id: str) -> None:
        if not self.hold:
            t = threading.Thread(target=self._run, args=(job_id,), daemon=True)
            self.threads.append(t)
            t.start()

    def send_batch_prediction(self, prediction_id: str) -> None:
        pass

    def revoke(self, job_id: str) -> None:
        pass

    def ping(self) -> None:
        pass


class AppTransport(httpx.BaseTransport):
    """Hands a real httpx.Client's requests to the app (through the TestClient's portal)."""

    def __init__(self, app_client: TestClient):
        self.app_client = app_client

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        r = self.app_client.request(
            request.method,
            str(request.url),
            headers=list(request.headers.multi_items()),
            content=request.read(),
        )
        return httpx.Response(r.status_code, headers=r.headers.multi_items(), content=r.content)


@pytest.fixture
def queue(settings: Settings) -> Iterator[ThreadQueue]:
    q = ThreadQueue(settings)
    yield q
    for t in q.threads:
        t.join(timeout=30)


@pytest.fixture
def http(client: TestClient) -> Iterator[httpx.Client]:
    with httpx.Client(transport=AppTransport(client)) as h:
        yield h


@pytest.fixture
def key(auth: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    token = auth["Authorization"].split()[1]
    monkeypatch.setenv(cvx.KEY_ENV, token)
    monkeypatch.delenv(cvx.URL_ENV, raising=False)
    return token


@pytest.fixture
def run(http: httpx.Client, key: str, capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    """run("datasets", "list") -> (exit status, stdout, stderr)."""
    mains = {
        "datasets": cvx.datasets_main,
        "finetune": cvx.finetune_main,
        "jobs": cvx.jobs_main,
        "heads": cvx.heads_main,
        "predict": cvx.predict_main,
        "backbones": cvx.backbones_main,
    }

    def _run(command: str, *argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        status = mains[command](list(argv), http=http)
        out, err = capsys.readouterr()
        return status, out, err

    return _run


@pytest.fixture
def npz_file(tmp_path: Path, make_npz) -> Path:  # type: ignore[no-untyped-def]
    path = tmp_path / "blobs.npz"
    path.write_bytes(make_npz(n_per_class=30, d=6))
    return path


def test_commands_are_registered_and_import_no_torch() -> None:
    for name in ("datasets", "finetune", "jobs", "heads", "predict", "backbones"):
        assert cli.COMMANDS[name][0].startswith("cvxtune.client:")
    code = (
        "import sys, cvxtune.client; "
        "print(sorted(m for m in ('torch', 'fastapi', 'app', 'workers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_dataset_upload_list_show_delete(run, npz_file: Path) -> None:
    status, out, err = run("datasets", "upload", str(npz_file), "--name", "blobs")
    assert status == 0, err
    ds_id = out.strip()
    assert (
        ds_id.startswith("ds_")
        and "uploaded blobs: 60 samples (features, npz), 2 classes, 0 skipped" in err
    )

    status, out, _ = run("datasets", "list")
    assert status == 0
    header, row = out.splitlines()
    assert header.split() == ["ID", "NAME", "KIND", "SAMPLES", "CLASSES", "CREATED"]
    assert row.split()[:5] == [ds_id, "blobs", "features", "60", "2"]

    status, out, _ = run("datasets", "list", "--json")
    page = json.loads(out)
    assert [d["id"] for d in page["data"]] == [ds_id] and page["next_cursor"] is None

    status, out, _ = run("datasets", "show", ds_id)
    assert status == 0
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert lines["classes"] == "2: cat 30, dog 30" and lines["features"] == "6"

    assert run("datasets", "delete", ds_id)[:2] == (0, f"deleted {ds_id}\n")
    status, out, err = run("datasets", "show", ds_id)
    assert status == 1 and out == ""
    assert err.strip() == f"error not_found: dataset {ds_id} not found"


def test_finetune_wait_then_heads_and_predict(run, npz_file: Path, tmp_path: Path) -> None:
    ds_id = run("datasets", "upload", str(npz_file))[1].strip()
    status, out, err = run(
        "finetune", "--dataset", ds_id, "--lam", "0.01", "--seed", "1",
        "--validation-fraction", "0.2", "--option", *FAST_HEAD, "--idempotency-key", "k1", "--wait",
    )  # fmt: skip
    assert status == 0, err
    head_id = out.strip()
    assert head_id.startswith("hd_")
    job_id = "ft_" + head_id.removeprefix("hd_")
    assert f"finetune {job_id} submitted" in err
    assert err.rstrip().splitlines()[-1].split() == [job_id, "succeeded", "done", "100%"]

    # the same Idempotency-Key gives back the same (finished) job instead of a second one
    status, out, _ = run(
        "finetune", "--dataset", ds_id, "--lam", "0.01", "--seed", "1",
        "--validation-fraction", "0.2", "--option", *FAST_HEAD, "--idempotency-key", "k1",
    )  # fmt: skip
    assert (status, out.strip()) == (0, job_id)

    status, out, _ = run("jobs", "show", job_id, "--json")
    job = json.loads(out)
    assert job["state"] == "succeeded" and job["head"]["gates"] == 16 and job["lam"] == 0.01
    assert job["validation_fraction"] == 0.2 and job["seed"] == 1

    status, out, _ = run("heads", "show", head_id)
    assert status == 0
    fields = dict(line.split(None, 1) for line in out.splitlines()[:11])
    assert fields["validation"] == "accuracy 1.000 (n=12)"
    assert "relative duality gap" in fields["certificate"]
    assert f"\n  dataset_id           {ds_id}\n" in out  # lineage, aligned on its longest key
    assert "confusion matrix (rows: true class, columns: predicted)" in out

    status, out, _ = run("heads", "list", "--json")
    assert [h["id"] for h in json.loads(out)["data"]] == [head_id]

    weights = tmp_path / "head.safetensors"
    status, _, err = run("heads", "weights", head_id, "--out", str(weights))
    assert status == 0 and weights.stat().st_size > 100 and "wrote" in err
    assert weights.read_bytes()[8:9] == b"{"  # safetensors: 8-byte length, then a JSON header

    X = tmp_path / "x.npy"
    np.save(X, np.array([[0.0] * 6, [6.0] * 6], dtype=np.float32))
    status, out, err = run("predict", head_id, "--embeddings", str(X))
    assert status == 0, err
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [(r[0] + r[1], r[2]) for r in rows] == [("row0", "cat"), ("row1", "dog")]
    assert all(float(r[3]) > 0.5 for r in rows)
    status, out, _ = run("predict", head_id, "--embeddings", str(X), "--json")
    preds = json.loads(out)["predictions"]
    assert abs(sum(preds[0]["probabilities"].values()) - 1) < 1e-5

    # a head without a backbone cannot predict images: the service says so
    image = tmp_path / "a.png"
    image.write_bytes(b"\x89PNG not really")
    status, _, err = run("predict", head_id, str(image))
    assert status == 1 and err.startswith("error invalid_input: this head was fitted on embeddings")

    status, out, err = run("jobs", "cancel", job_id)
    assert status == 1 and err.strip() == f"error conflict: finetune {job_id} already succeeded"
    assert run("heads", "delete", head_id)[:2] == (0, f"deleted {head_id}\n")
    assert run("heads", "show", head_id)[0] == 1


def test_wait_polls_and_reports_a_failed_job(run, client, npz_file: Path) -> None:
    ds_id = run("datasets", "upload", str(npz_file))[1].strip()
    client.app.state.ctx.store.delete(f"datasets/{ds_id}")  # validation will find no files
    status, out, err = run(
        "finetune", "--dataset", ds_id, "--option", *FAST_HEAD, "--wait", "--poll", "0.05"
    )
    assert status == 1 and out == ""
    last = err.rstrip().splitlines()[-1]
    assert last == (
        f"error invalid_dataset: the files of dataset {ds_id} are missing from the artifact store"
    )


def test_wait_on_a_cancelled_job(run, queue: ThreadQueue, npz_file: Path) -> None:
    queue.hold = True
    ds_id = run("datasets", "upload", str(npz_file))[1].strip()
    job_id = run("finetune", "--dataset", ds_id, "--idempotency-key", "c")[1].strip()
    status, out, _ = run("jobs", "list", "--state", "queued")
    assert out.splitlines()[1].split()[:3] == [job_id, "queued", "queued"]
    assert run("jobs", "cancel", job_id)[:2] == (0, f"{job_id} cancelled\n")
    status, out, err = run("finetune", "--dataset", ds_id, "--idempotency-key", "c", "--wait")
    assert status == 1 and out == ""
    assert err.rstrip().endswith(f"error cancelled: finetune {job_id} was cancelled")


def test_backbones(run) -> None:
    status, out, _ = run("backbones")
    assert status == 0 and out.split()[:5] == ["NAME", "DIM", "INPUT", "WEIGHTS", "DESCRIPTION"]
    status, out, _ = run("backbones", "--json")
    by_name = {b["name"]: b for b in json.loads(out)}
    assert by_name["tf_efficientnet_lite0"]["embed_dim"] == 1280


def test_errors_bad_key_unknown_id_bad_input(run, npz_file: Path) -> None:
    status, out, err = run("heads", "list", "--key", "cvx_not-a-key")
    assert (status, out) == (1, "")
    assert err.strip() == "error unauthorized: unknown or revoked API key"
    status, _, err = run("jobs", "show", "ft_nope")
    assert status == 1 and err.strip() == "error not_found: finetune ft_nope not found"
    status, _, err = run("finetune", "--dataset", "ds_nope")
    assert status == 1 and err.strip() == "error not_found: dataset ds_nope not found"
    ds_id = run("datasets", "upload", str(npz_file))[1].strip()
    status, _, err = run("finetune", "--dataset", ds_id, "--option", "gates=0")
    assert status == 1 and err.startswith("error invalid_input: head.gates:")
    status, _, err = run("datasets", "upload", str(npz_file.with_name("missing.npz")))
    assert status == 2 and "missing.npz: no such file" in err


def test_missing_key_and_unreachable_service(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(cvx.KEY_ENV, raising=False)
    assert cli.main(["datasets", "list"]) == 2
    assert "cvxtune keys create --project NAME" in capsys.readouterr().err

    monkeypatch.setenv(cvx.KEY_ENV, "cvx_whatever")
    monkeypatch.setenv(cvx.URL_ENV, "http://127.0.0.1:9")  # the discard port: nothing listens
    assert cli.main(["heads", "list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error connection_failed: could not connect to http://127.0.0.1:9")


def test_embeddings_files_take_every_head_kind_shape(tmp_path: Path) -> None:
    from cvxtune.client import UsageError, _load_embeddings, _values_per_sample

    for shape in [(3, 5), (3, 4, 2), (3, 2, 2, 2)]:
        path = tmp_path / f"x{len(shape)}.npy"
        np.save(path, np.arange(np.prod(shape), dtype=np.float32).reshape(shape))
        rows = _load_embeddings(path)
        assert np.asarray(rows).shape == shape
        assert _values_per_sample(rows[:1]) == int(np.prod(shape[1:]))
    np.save(tmp_path / "bad.npy", np.zeros((2, 1, 1, 1, 1)))
    with pytest.raises(UsageError, match="expected"):
        _load_embeddings(tmp_path / "bad.npy")
