import io
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workers.sample_data import png_bytes


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _png(seed: int) -> bytes:
    return png_bytes(np.random.default_rng(seed).integers(0, 255, (16, 16), dtype=np.uint8))


def test_npz_upload_lists_gets_and_deletes(client, auth, other_auth, make_npz, upload_file):
    r = upload_file(auth, make_npz(n_per_class=5, d=3), name="blobs")
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["name"] == "blobs" and ds["kind"] == "features" and ds["format"] == "npz"
    assert ds["n_samples"] == 10 and ds["n_features"] == 3
    assert ds["classes"] == ["cat", "dog"] and ds["class_counts"] == {"cat": 5, "dog": 5}
    assert client.get(f"/v1/datasets/{ds['id']}", headers=auth).json() == ds
    assert [d["id"] for d in client.get("/v1/datasets", headers=auth).json()["data"]] == [ds["id"]]
    # Another project cannot see, list or delete it: 404, so ids do not leak.
    assert client.get(f"/v1/datasets/{ds['id']}", headers=other_auth).status_code == 404
    assert client.get("/v1/datasets", headers=other_auth).json()["data"] == []
    assert client.delete(f"/v1/datasets/{ds['id']}", headers=other_auth).status_code == 404
    assert client.delete(f"/v1/datasets/{ds['id']}", headers=auth).status_code == 204
    assert client.get(f"/v1/datasets/{ds['id']}", headers=auth).status_code == 404


def test_cursor_pagination(client, auth, make_npz, upload_file):
    ids = [upload_file(auth, make_npz(n_per_class=3, seed=i)).json()["id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        page = client.get(
            "/v1/datasets",
            headers=auth,
            params={"limit": 2, **({"cursor": cursor} if cursor else {})},
        ).json()
        seen += [d["id"] for d in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]


@pytest.mark.parametrize("layout", ["list", "columns"])
def test_parquet_upload(client, auth, upload_file, layout):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(12, 4)).astype(np.float32)
    labels = ["a", "b", "c"] * 4
    if layout == "list":
        table = pa.table({"embedding": list(X), "label": labels})
    else:
        table = pa.table({**{f"f{j}": X[:, j] for j in range(4)}, "label": labels})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    r = upload_file(auth, buf.getvalue(), filename="x.parquet")
    assert r.status_code == 201, r.text
    assert r.json()["n_features"] == 4 and r.json()["class_counts"] == {"a": 4, "b": 4, "c": 4}


def test_image_zip_upload_reports_unreadable_files(client, auth, upload_file):
    members = {f"{c}/{i}.png": _png(i + 10 * k) for k, c in enumerate("xy") for i in range(3)}
    members["x/broken.png"] = b"\x89PNG not really"
    r = upload_file(auth, _zip(members), filename="imgs.zip")
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["kind"] == "images" and ds["class_counts"] == {"x": 3, "y": 3}
    assert [s["path"] for s in ds["report"]["skipped"]] == ["x/broken.png"]
    assert ds["report"]["source"] == "imgs.zip"


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


BAD_UPLOADS = {
    "one class": (_npz(X=np.ones((4, 2)), y=np.zeros(4)), "d.npz", "at least 2 classes"),
    "nan": (_npz(X=np.full((4, 2), np.nan), y=np.array([0, 0, 1, 1])), "d.npz", "NaN"),
    "too few per class": (_npz(X=np.ones((3, 2)), y=np.array([0, 0, 1])), "d.npz", "fewer than"),
    "no labels": (_npz(X=np.ones((4, 2))), "d.npz", "labels"),
    "mismatched rows": (_npz(X=np.ones((4, 2)), y=np.array([0, 1])), "d.npz", "labels"),
    "not a dataset": (b"hello world", "notes.txt", "unrecognised"),
    "empty": (b"", "d.npz", "empty"),
    "traversal": (_zip({"a/1.png": _png(1), "../b/2.png": _png(2)}), "t.zip", ""),
    "single image class": (_zip({"a/1.png": _png(1), "a/2.png": _png(2)}), "o.zip", "class"),
    "bomb": (
        _zip({"a/1.png": _png(1), "b/1.png": _png(2), "b/big.png": bytes(20 << 20)}),
        "bomb.zip",
        "",
    ),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_uploads_are_refused_with_a_reason(client, auth, upload_file, case):
    data, filename, words = BAD_UPLOADS[case]
    r = upload_file(auth, data, filename=filename)
    assert r.status_code == 422, r.text
    body = r.json()
    assert r.headers["content-type"] == "application/problem+json"
    assert body["code"] == "invalid_dataset" and words in body["detail"]
    assert client.get("/v1/datasets", headers=auth).json()["data"] == []


def test_upload_over_the_size_limit_is_refused(client, auth, settings, upload_file):
    big = bytes(settings.max_upload_bytes + 1)
    r = upload_file(auth, big, filename="big.npz")
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"

    # Without a Content-Length the limit still holds: the stream is counted as it arrives.
    def chunks():
        boundary = b"--xyz\r\n"
        yield boundary + b'Content-Disposition: form-data; name="file"; filename="b.npz"\r\n\r\n'
        for _ in range(settings.max_upload_bytes // (1 << 20) + 2):
            yield bytes(1 << 20)
        yield b"\r\n--xyz--\r\n"

    r = client.post(
        "/v1/datasets",
        headers={**auth, "content-type": "multipart/form-data; boundary=xyz"},
        content=chunks(),
    )
    assert r.status_code == 413


def test_upload_needs_multipart_file_field(client, auth):
    r = client.post("/v1/datasets", headers=auth, json={"file": "x"})
    assert r.status_code == 415
    r = client.post("/v1/datasets", headers=auth, files={"other": ("a.npz", b"x")})
    assert r.status_code == 422 and "file" in r.json()["detail"]


def test_csv_manifest_with_images_in_a_zip(client, auth, upload_file):
    members = {f"img/{i}.png": _png(i) for i in range(6)}
    members["labels.csv"] = (
        "path,label\n" + "".join(f"img/{i}.png,{'odd' if i % 2 else 'even'}\n" for i in range(6))
    ).encode()
    r = upload_file(auth, _zip(members), filename="manifest.zip")
    assert r.status_code == 201, r.text
    assert r.json()["class_counts"] == {"even": 3, "odd": 3}
