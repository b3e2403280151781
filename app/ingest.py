"""Turn an uploaded file into a stored, validated dataset, before any job may use it.

Features (NPZ, Parquet) are checked here and stored in one canonical NPZ. Image archives (zip or
tar of an ImageFolder, or a CSV manifest with its images) are checked by the workers' dataset
reader, the one place that knows image formats: path traversal, archive bombs, unreadable images,
too few classes or samples. That is one of the three imports from workers/ the import contract
allows app/ (see pyproject): a synchronous upload must say what is wrong with the archive.
"""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app.uploads import SavedFile
from cvxtune import features
from cvxtune.artifacts import ArtifactStore
from cvxtune.contracts import DatasetKind
from cvxtune.db import Dataset, new_id
from cvxtune.errors import DatasetError
from cvxtune.settings import Settings


def detect_format(path: Path, filename: str) -> str:
    name = filename.lower()
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"PK"):
        if name.endswith(".npz"):
            return "npz"
        try:
            with zipfile.ZipFile(path) as z:
                members = [m for m in z.namelist() if not m.endswith("/")]
        except zipfile.BadZipFile as e:
            raise DatasetError("the file looks like a zip archive but cannot be read") from e
        if members and all(m.endswith(".npy") for m in members):
            return "npz"
        return "zip"
    if name.endswith(".csv"):
        raise DatasetError("a CSV manifest must be uploaded inside a zip or tar with its images")
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except OSError:
        pass
    raise DatasetError(
        "unrecognised dataset format: upload a zip or tar of an ImageFolder (or of a CSV "
        "manifest with its images), an NPZ or a Parquet file of features and labels"
    )


def _image_report(path: Path, settings: Settings) -> dict[str, Any]:
    from workers.datasets import Limits, validate_dataset

    report = validate_dataset(
        path,
        min_per_class=settings.min_samples_per_class,
        limits=Limits(max_total_bytes=settings.max_archive_bytes),
        spool_dir=settings.uploads_dir,
    )
    return dict(report)


def ingest(
    session: Session,
    store: ArtifactStore,
    settings: Settings,
    project_id: str,
    upload: SavedFile,
    name: str | None,
) -> Dataset:
    if upload.size == 0:
        raise DatasetError("the uploaded file is empty")
    fmt = detect_format(upload.path, upload.filename)
    ds_id = new_id("ds")
    common = dict(
        id=ds_id,
        project_id=project_id,
        name=name or upload.filename or ds_id,
        format=fmt,
        content_hash=upload.sha256,
        size_bytes=upload.size,
    )
    if fmt in {"npz", "parquet"}:
        feats = features.read_features(upload.path, fmt, settings.min_samples_per_class)
        canonical = upload.path.with_suffix(".canonical.npz")
        try:
            features.write_canonical(feats, canonical)
            key = f"datasets/{ds_id}/features.npz"
            store.put_file(key, canonical)
        finally:
            canonical.unlink(missing_ok=True)
        row = Dataset(
            **common,
            kind=DatasetKind.features,
            artifact_key=key,
            n_samples=int(feats.X.shape[0]),
            n_features=int(feats.X.shape[1]),
            classes=feats.classes,
            class_counts=feats.class_counts,
            report=features.summary(feats),
        )
    else:
        report = _image_report(upload.path, settings)
        report["source"] = upload.filename or report.get("source")
        key = f"datasets/{ds_id}/images.{fmt}"
        store.put_file(key, upload.path)
        counts = {str(k): int(v) for k, v in report["class_counts"].items()}
        row = Dataset(
            **common,
            kind=DatasetKind.images,
            artifact_key=key,
            n_samples=int(report["n_samples"]),
            n_features=None,
            classes=sorted(counts),
            class_counts=counts,
            report=report,
        )
    session.add(row)
    session.flush()
    return row
