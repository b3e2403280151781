"""The artifact store: local directory and an S3-compatible server (moto's, over loopback)."""

import socket

import pytest

from cvxtune.artifacts import LocalStore, open_store
from cvxtune.errors import NotFound


@pytest.fixture(scope="module")
def s3_url():
    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    ).create_bucket(Bucket="cvx")
    yield f"s3://cvx/tenant?endpoint_url={endpoint}"
    server.stop()


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, monkeypatch):
    if request.param == "local":
        return open_store(f"file://{tmp_path / 'a'}", tmp_path / "cache")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return open_store(request.getfixturevalue("s3_url"), tmp_path / "cache")


def test_files_and_directories_round_trip(store, tmp_path):
    src = tmp_path / "f.bin"
    src.write_bytes(b"payload")
    store.put_file("datasets/d1/f.bin", src)
    assert store.exists("datasets/d1/f.bin")
    assert store.local_path("datasets/d1/f.bin").read_bytes() == b"payload"

    head = tmp_path / "head"
    (head / "sub").mkdir(parents=True)
    (head / "w.safetensors").write_bytes(b"w")
    (head / "sub" / "meta.json").write_text("{}")
    store.put_dir("heads/h1", head)
    got = store.local_path("heads/h1")
    assert (got / "w.safetensors").read_bytes() == b"w" and (got / "sub" / "meta.json").exists()

    store.delete("heads/h1")
    assert not store.exists("heads/h1")
    with pytest.raises(NotFound):
        store.local_path("heads/nothing")
    store.check()


@pytest.mark.parametrize("key", ["../x", "a/../../x", "", "a//b"])
def test_keys_cannot_escape_the_store(tmp_path, key):
    store = LocalStore(tmp_path)
    with pytest.raises(ValueError):
        store.put_file(key, tmp_path)


def test_local_writes_leave_no_partial_files(tmp_path):
    store = LocalStore(tmp_path / "a")
    src = tmp_path / "f"
    src.write_bytes(b"x" * 1000)
    store.put_file("k/f", src)
    store.put_file("k/f", src)  # overwrite is atomic too
    assert sorted(p.name for p in (tmp_path / "a" / "k").iterdir()) == ["f"]
