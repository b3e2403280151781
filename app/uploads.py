"""Multipart uploads streamed to disk under a size limit.

The body is read chunk by chunk; the parser spools each file part to a temporary file, and
the upload is refused (413) as soon as the bytes received pass the limit, whether or not the
client sent a Content-Length.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from app.problems import PayloadTooLarge
from cvxtune.errors import InvalidInput


@dataclass
class SavedFile:
    field: str
    filename: str
    path: Path
    size: int
    sha256: str


@dataclass
class Upload:
    files: list[SavedFile] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)

    def cleanup(self) -> None:
        for f in self.files:
            f.path.unlink(missing_ok=True)


async def _limited(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise PayloadTooLarge(f"upload larger than the limit of {limit} bytes")
        yield chunk


def _save(part: UploadFile, field_name: str, dest_dir: Path) -> SavedFile:
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix="upload-")
    size = 0
    with os.fdopen(fd, "wb") as out:
        part.file.seek(0)
        while chunk := part.file.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
    return SavedFile(field_name, part.filename or "", Path(tmp), size, digest.hexdigest())


async def receive(request: Request, dest_dir: Path, limit: int, max_files: int = 1000) -> Upload:
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise InvalidInput(
            "send the file as multipart/form-data", status=415, code="unsupported_media_type"
        )
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"upload of {length} bytes is larger than the limit of {limit}")
    dest_dir.mkdir(parents=True, exist_ok=True)
    parser = MultiPartParser(
        request.headers, _limited(request, limit), max_files=max_files, max_fields=100
    )
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise InvalidInput(f"malformed multipart body: {e.message}") from e
    upload = Upload()
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                upload.files.append(_save(value, name, dest_dir))
                await value.close()
            else:
                upload.fields[name] = value
    except BaseException:
        upload.cleanup()
        raise
    return upload


async def receive_small(request: Request, limit: int, max_files: int) -> list[tuple[str, bytes]]:
    """(field, bytes) of each file part, kept in memory: for predict requests of a few images,
    where writing temporary files would cost more than the images themselves."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise InvalidInput(
            "send images as multipart/form-data (field 'files') or JSON {\"embeddings\": ...}",
            status=415,
            code="unsupported_media_type",
        )
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"request of {length} bytes is larger than the limit of {limit}")
    parser = MultiPartParser(
        request.headers, _limited(request, limit), max_files=max_files, max_fields=100
    )
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise InvalidInput(f"malformed multipart body: {e.message}") from e
    out = []
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            out.append((name, await value.read()))
            await value.close()
    return out


def move_into(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(src, dst)
