"""The artifact store: datasets, embeddings and heads, addressed by key ("heads/h_1/").

One interface, two implementations chosen by URL: `file:///dir` (the default) and
`s3://bucket/prefix?endpoint_url=http://host:9000` for any S3-compatible server. Writes are
atomic: a reader sees the whole object or nothing. Workers and the API read through
`local_path`, which for S3 materialises the object in a local cache first.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlparse

from cvxtune.errors import NotFound, TransientError


class ArtifactStore(Protocol):
    def put_file(self, key: str, src: Path) -> None: ...
    def put_dir(self, key: str, src: Path) -> None: ...
    def exists(self, key: str) -> bool: ...
    def local_path(self, key: str) -> Path: ...
    def delete(self, key: str) -> None: ...
    def check(self) -> None: ...


def _check_key(key: str) -> str:
    parts = key.strip("/").split("/")
    if not key or any(p in {"", ".", ".."} for p in parts):
        raise ValueError(f"bad artifact key {key!r}")
    return "/".join(parts)


class LocalStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put_file(self, key: str, src: Path) -> None:
        dst = self._path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=".tmp-")
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, dst)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def put_dir(self, key: str, src: Path) -> None:
        # A directory cannot be replaced atomically over an existing one; write it beside, then
        # rename. An existing complete copy wins (keys are content- or id-addressed).
        dst = self._path(key)
        if dst.is_dir():
            return
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.parent / f".tmp-{dst.name}-{uuid.uuid4().hex}"
        shutil.copytree(src, tmp)
        try:
            os.rename(tmp, dst)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not dst.is_dir():
                raise

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def local_path(self, key: str) -> Path:
        p = self._path(key)
        if not p.exists():
            raise NotFound(f"artifact {key} not found")
        return p

    def delete(self, key: str) -> None:
        p = self._path(key)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()

    def check(self) -> None:
        probe = self.root / f".probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()


class S3Store:
    """An S3-compatible bucket; single PUTs are atomic, directories end with a manifest object."""

    def __init__(self, bucket: str, prefix: str, cache_dir: Path, endpoint_url: str | None = None):
        import boto3

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.cache_dir = Path(cache_dir)
        self.client = boto3.client("s3", endpoint_url=endpoint_url)

    def _k(self, key: str) -> str:
        key = _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _wrap(self, fn: Any, *args: Any, **kw: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kw)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                raise NotFound("artifact not found") from e
            raise TransientError("artifact store request failed") from e
        except BotoCoreError as e:
            raise TransientError("artifact store unreachable") from e

    def put_file(self, key: str, src: Path) -> None:
        self._wrap(self.client.upload_file, str(src), self.bucket, self._k(key))

    def put_dir(self, key: str, src: Path) -> None:
        names = sorted(p.relative_to(src).as_posix() for p in Path(src).rglob("*") if p.is_file())
        for name in names:
            self.put_file(f"{key}/{name}", Path(src) / name)
        # The manifest goes last: a directory without one is incomplete and not visible.
        body = "\n".join(names).encode()
        self._wrap(
            self.client.put_object, Bucket=self.bucket, Key=self._k(f"{key}/.manifest"), Body=body
        )

    def _is_dir(self, key: str) -> bool:
        try:
            self._wrap(self.client.head_object, Bucket=self.bucket, Key=self._k(f"{key}/.manifest"))
            return True
        except NotFound:
            return False

    def exists(self, key: str) -> bool:
        if self._is_dir(key):
            return True
        try:
            self._wrap(self.client.head_object, Bucket=self.bucket, Key=self._k(key))
            return True
        except NotFound:
            return False

    def local_path(self, key: str) -> Path:
        dst = self.cache_dir / "s3" / _check_key(key)
        if dst.exists():
            return dst
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.parent / f".tmp-{dst.name}-{uuid.uuid4().hex}"
        try:
            if self._is_dir(key):
                obj = self._wrap(
                    self.client.get_object, Bucket=self.bucket, Key=self._k(f"{key}/.manifest")
                )
                for name in obj["Body"].read().decode().splitlines():
                    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                    self._wrap(
                        self.client.download_file,
                        self.bucket,
                        self._k(f"{key}/{name}"),
                        str(tmp / name),
                    )
            else:
                self._wrap(self.client.download_file, self.bucket, self._k(key), str(tmp))
            os.replace(tmp, dst)
        finally:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            elif tmp.exists():
                tmp.unlink()
        return dst

    def delete(self, key: str) -> None:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._k(key)):
            for obj in page.get("Contents", []):
                if obj["Key"] == self._k(key) or obj["Key"].startswith(self._k(key) + "/"):
                    self._wrap(self.client.delete_object, Bucket=self.bucket, Key=obj["Key"])
        local = self.cache_dir / "s3" / _check_key(key)
        if local.is_dir():
            shutil.rmtree(local, ignore_errors=True)
        elif local.exists():
            local.unlink()

    def check(self) -> None:
        self._wrap(self.client.head_bucket, Bucket=self.bucket)


def open_store(url: str, cache_dir: Path) -> ArtifactStore:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStore(Path(parsed.path))
    if parsed.scheme == "s3":
        endpoint = parse_qs(parsed.query).get("endpoint_url", [None])[0]
        return S3Store(parsed.netloc, parsed.path, cache_dir, endpoint_url=endpoint)
    raise ValueError(f"unsupported artifacts URL {url!r} (file:// or s3://)")
