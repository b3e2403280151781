"""A cnn and an attention head fitted by the real Celery worker on EfficientNet-Lite0 feature
maps and tokens of real images, then image predict through the API process."""

from __future__ import annotations

import pytest

from workers.sample_data import (
    fashion_mnist_available,
    fashion_sample,
    png_bytes,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CLASSES = [1, 7, 8]  # trouser, sneaker, bag
HEADS = {
    "cnn": ({"kind": "cnn", "gates": 8, "n_components": 8}, [1280, 7, 7]),
    "attention": ({"kind": "attention", "n_components": 6}, [49, 1280]),
}


@pytest.fixture(scope="module")
def images_dataset(service, alpha, tmp_path_factory):
    if not fashion_mnist_available():
        pytest.skip("dataset-fashion-mnist is not installed (.ci/run installs it)")
    sample = fashion_sample(tmp_path_factory.mktemp("fm") / "kinds.zip", CLASSES, 5, 60)
    with service.client(alpha) as c:
        r = c.post("/v1/datasets", files={"file": ("kinds.zip", sample.archive.read_bytes())})
        assert r.status_code == 201, r.text
    return r.json()["id"], sample.probes, sample.probe_names


@pytest.mark.parametrize("kind", list(HEADS))
def test_worker_fits_head_kind_and_api_predicts_images(
    service, alpha, images_dataset, wait_job, kind
):
    ds_id, probes, truth = images_dataset
    head_opts, shape = HEADS[kind]
    body = {
        "dataset_id": ds_id,
        "backbone": "tf_efficientnet_lite0",
        "head": {**head_opts, "tol": 1e-4, "max_iter": 2000},
        "lam": 0.1,
        "validation_fraction": 0.2,
    }
    with service.client(alpha) as c:
        job = wait_job(c, c.post("/v1/finetunes", json=body).json()["id"])
        assert job["state"] == "succeeded", (job, service.log("worker.log"))
        head = c.get(f"/v1/heads/{job['head_id']}").json()
        assert head["kind"] == kind and head["lineage"]["input"]["shape"] == shape
        assert head["certificate"]["converged"] is True
        assert head["metrics"]["train"]["accuracy"] == 1.0
        files = [("files", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(probes)]
        r = c.post(f"/v1/heads/{head['id']}/predict", files=files)
        assert r.status_code == 200, r.text
        got = [p["label"] for p in r.json()["predictions"]]
        assert sum(g == t for g, t in zip(got, truth, strict=True)) >= 2, (got, truth)
