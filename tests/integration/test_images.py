"""Fashion-MNIST images -> tf_efficientnet_lite0 (real weights) -> convex head -> image predict."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from workers.sample_data import (
    fashion_mnist_available,
    fashion_sample,
    png_bytes,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CLASSES = [1, 7, 8]  # trouser, sneaker, bag: distinct enough for a tiny training set


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    if not fashion_mnist_available():
        pytest.skip("dataset-fashion-mnist is not installed (.ci/run installs it)")
    sample = fashion_sample(tmp_path_factory.mktemp("fm") / "fashion.zip", CLASSES, 12, 100)
    return sample.archive, sample.probes, sample.probe_names


def test_image_zip_finetune_and_predict_images(service, alpha, fashion, wait_job):
    path, probe_images, probe_labels = fashion
    with service.client(alpha) as c:
        backbones = {b["name"]: b for b in c.get("/v1/backbones").json()}
        assert backbones["tf_efficientnet_lite0"]["weights_available"] is True
        r = c.post("/v1/datasets", files={"file": ("fashion.zip", path.read_bytes())})
        assert r.status_code == 201, r.text
        ds = r.json()
        assert ds["kind"] == "images" and ds["n_samples"] == 36
        assert ds["class_counts"] == {"bag": 12, "sneaker": 12, "trouser": 12}

        body = {
            "dataset_id": ds["id"],
            "backbone": "tf_efficientnet_lite0",
            "lam": 1e-2,
            "head": {"gates": 16, "tol": 1e-4, "max_iter": 300},
            "validation_fraction": 0.25,
        }
        job = wait_job(c, c.post("/v1/finetunes", json=body).json()["id"])
        assert job["state"] == "succeeded", (job, service.log("worker.log"))
        head = c.get(f"/v1/heads/{job['head_id']}").json()
        assert head["backbone"] == "tf_efficientnet_lite0"
        assert head["lineage"]["weights"].startswith("sha256:")
        assert head["metrics"]["validation"]["accuracy"] >= 0.75

        files = [
            ("files", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(probe_images)
        ]
        r = c.post(f"/v1/heads/{head['id']}/predict", files=files)
        assert r.status_code == 200, r.text
        got = [p["label"] for p in r.json()["predictions"]]
        assert sum(g == t for g, t in zip(got, probe_labels, strict=True)) >= 2, (got, probe_labels)

        # A second job on the same data and backbone reuses the cached embeddings.
        again = wait_job(c, c.post("/v1/finetunes", json={**body, "seed": 1}).json()["id"])
        assert again["state"] == "succeeded"
        r = c.post(
            f"/v1/heads/{head['id']}/predict",
            files=[("files", ("x.txt", b"not an image", "text/plain"))],
        )
        assert r.status_code == 422 and r.json()["code"] == "invalid_input"


def test_archive_with_path_traversal_is_refused(service, alpha):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a/1.png", png_bytes(np.zeros((8, 8), np.uint8)))
        z.writestr("../../evil/2.png", png_bytes(np.zeros((8, 8), np.uint8)))
    with service.client(alpha) as c:
        r = c.post("/v1/datasets", files={"file": ("evil.zip", buf.getvalue())})
        assert r.status_code == 422 and r.json()["code"] == "invalid_dataset", r.text
