"""The finetune and batch-prediction work, as plain functions of a job id.

Each stage reads the job from the database, does its work, writes its outputs atomically and
records them on the job, so running a stage twice (a re-delivered task) does no harm: finished
work is found and skipped. Stage, progress and ETA are written as they change, and the same
writes notice a cancel request, so a cancelled job stops within about a second.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError
from sqlalchemy import select, update

from cvxtune import __version__, features
from cvxtune.artifacts import ArtifactStore, open_store
from cvxtune.contracts import (
    HEAD_OUTPUT,
    STAGE_SPAN,
    TERMINAL_STATES,
    DatasetKind,
    HeadSpec,
    JobState,
    Stage,
    head_kind_of_solver,
)
from cvxtune.db import Dataset, Finetune, Head, Prediction, session_scope, utcnow
from cvxtune.errors import CvxtuneError, DatasetError, InvalidInput, NotFound
from cvxtune.settings import Settings, get_settings

log = logging.getLogger("cvxtune.jobs")

PROGRESS_EVERY_S = 0.5
STAGE_ORDER = {stage: i for i, stage in enumerate(Stage)}


class JobCancelled(Exception):
    """The job was cancelled (or already finished) while this stage ran."""


class NothingToDo(Exception):
    """A delivered stage has no work: the job is finished, cancelled or already past it (a
    stale re-delivery after the job was queued again), so the rest of the chain is dropped."""


@dataclass
class Env:
    settings: Settings

    @property
    def db(self) -> str:
        return self.settings.resolved_database_url

    @cached_property
    def store(self) -> ArtifactStore:
        return open_store(self.settings.resolved_artifacts_url, self.settings.store_cache_dir)


def default_env() -> Env:
    return Env(get_settings())


# ---------------------------------------------------------------- job bookkeeping


def head_id_for(job_id: str) -> str:
    """A job registers exactly one head, with an id derived from the job's."""
    return "hd_" + job_id.split("_", 1)[-1]


def _spans(kind: str) -> dict[Stage, tuple[float, float]]:
    if kind == DatasetKind.images:
        return STAGE_SPAN
    # Features need no extraction: the fit is nearly all of the work.
    return {
        Stage.validate: (0.0, 0.02),
        Stage.extract: (0.02, 0.05),
        Stage.fit: (0.05, 0.95),
        Stage.evaluate: (0.95, 0.99),
        Stage.register: (0.99, 1.0),
    }


class Reporter:
    """Writes a stage's progress and ETA (at most every PROGRESS_EVERY_S) and checks for cancel."""

    def __init__(self, env: Env, job_id: str, stage: Stage, kind: str, started: float):
        self.env, self.job_id, self.stage = env, job_id, stage
        self.lo, self.hi = _spans(kind)[stage]
        self.started = started  # epoch seconds the job started running
        self._last = 0.0
        self._best = 0.0  # progress only moves forward, even when the gap wobbles

    def __call__(self, fraction: float, info: Any = None, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < PROGRESS_EVERY_S:
            return
        self._last = now
        self._best = max(self._best, min(max(float(fraction), 0.0), 1.0))
        p = self.lo + (self.hi - self.lo) * self._best
        elapsed = max(time.time() - self.started, 1e-3)
        eta = elapsed * (1.0 - p) / p if p >= 0.03 else None
        with session_scope(self.env.db) as s:
            n = s.execute(
                update(Finetune)
                .where(
                    Finetune.id == self.job_id,
                    Finetune.cancel_requested.is_(False),
                    Finetune.state == JobState.running,
                )
                .values(progress=p, eta_seconds=eta, updated_at=utcnow())
            ).rowcount
        if n == 0:
            raise JobCancelled(self.job_id)


def begin_stage(env: Env, job_id: str, stage: Stage) -> tuple[Finetune, Dataset | None]:
    """Mark the job running in `stage`, take its heartbeat and count the delivery.

    Raises NothingToDo when the job is gone, finished, cancelled or already in a later stage.
    A job is failed once one stage has been delivered more than `max_deliveries` times (a
    worker that keeps dying on it must not loop forever).
    """
    with session_scope(env.db) as s:
        job = s.get(Finetune, job_id, with_for_update=True)
        if job is None or job.state in TERMINAL_STATES or job.cancel_requested:
            raise NothingToDo(f"job {job_id} is {'gone' if job is None else job.state}")
        if job.state == JobState.running and STAGE_ORDER[Stage(job.stage)] > STAGE_ORDER[stage]:
            raise NothingToDo(f"job {job_id} is already in stage {job.stage}")
        attempts = job.attempts + 1 if job.stage == stage else 1
        if attempts > env.settings.max_deliveries:
            job.state, job.error_code, job.finished_at = (
                JobState.failed,
                "too_many_attempts",
                utcnow(),
            )
            job.error_message = (
                f"stage {stage} was started {attempts - 1} times without "
                "finishing (the worker may be running out of memory)"
            )
            job.eta_seconds = None
            s.commit()
            raise NothingToDo(f"job {job_id} failed: stage {stage} delivered too often")
        job.attempts, job.stage, job.state = attempts, stage, JobState.running
        deliveries = dict((job.outputs or {}).get("deliveries", {}))
        deliveries[str(stage)] = attempts
        job.outputs = {**(job.outputs or {}), "deliveries": deliveries}
        job.started_at = job.started_at or utcnow()
        job.updated_at = job.heartbeat_at = utcnow()
        ds = s.get(Dataset, job.dataset_id)
        s.flush()
        s.expunge_all()
        return job, ds


@contextmanager
def heartbeat(env: Env, table: type[Finetune] | type[Prediction], job_id: str) -> Iterator[None]:
    """Refresh the job's heartbeat every `job_heartbeat_s` while the block runs (a thread), so
    app.recovery tells a live stage from one whose worker died. Only a heartbeat the stage holds
    is refreshed: begin_stage sets it, finish_stage clears it, so a beat landing after the stage
    finished does not make the job look alive while its next stage waits in the queue."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(env.settings.job_heartbeat_s):
            try:
                with session_scope(env.db) as s:
                    s.execute(
                        update(table)
                        .where(
                            table.id == job_id,
                            table.state == JobState.running,
                            table.heartbeat_at.is_not(None),
                        )
                        .values(heartbeat_at=utcnow())
                    )
            except Exception as e:  # the database blinked; the next beat tries again
                log.warning("job %s: heartbeat not written (%s)", job_id, e)

    thread = threading.Thread(target=beat, name=f"heartbeat-{job_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def drop_heartbeat(env: Env, table: type[Finetune] | type[Prediction], job_id: str) -> None:
    """The job waits in the queue (a retry after a transient fault): nothing runs it now, and
    recovery must not take the wait for a dead worker. Best effort: the database may be the
    fault being retried."""
    try:
        with session_scope(env.db) as s:
            s.execute(update(table).where(table.id == job_id).values(heartbeat_at=None))
    except Exception as e:
        log.warning("job %s: heartbeat not cleared before a retry (%s)", job_id, e)


def finish_stage(env: Env, job_id: str, stage: Stage, kind: str, **outputs: Any) -> None:
    lo_hi = _spans(kind)[stage]
    with session_scope(env.db) as s:
        job = s.get(Finetune, job_id, with_for_update=True)
        if job is None or job.state in TERMINAL_STATES:
            raise JobCancelled(job_id)
        job.outputs = {**(job.outputs or {}), **outputs}
        job.progress = max(job.progress, lo_hi[1])
        job.updated_at = utcnow()
        job.heartbeat_at = None  # the next stage waits in the queue; nothing runs it yet


def fail_job(env: Env, job_id: str, code: str, message: str) -> None:
    with session_scope(env.db) as s:
        s.execute(
            update(Finetune)
            .where(Finetune.id == job_id, Finetune.state.not_in([str(x) for x in TERMINAL_STATES]))
            .values(
                state=JobState.failed,
                error_code=code,
                error_message=message,
                finished_at=utcnow(),
                eta_seconds=None,
                updated_at=utcnow(),
            )
        )


def _started_epoch(job: Finetune) -> float:
    return job.started_at.timestamp() if job.started_at else time.time()


# ---------------------------------------------------------------- stages


def validate(job_id: str, env: Env | None = None) -> None:
    env = env or default_env()
    job, ds = begin_stage(env, job_id, Stage.validate)
    if ds is None:
        raise DatasetError(f"dataset {job.dataset_id} no longer exists")
    head = head_spec(job.head)
    if ds.kind == DatasetKind.features and head.kind != "mlp":
        raise InvalidInput(
            f"the {head.kind} head needs an image dataset; a features dataset feeds mlp heads only",
            code="unsupported_head_kind",
        )
    if job.backbone:
        from workers.backbones import get_spec, weights_source

        spec = get_spec(job.backbone)
        try:
            head.check_input(spec.output_shape(head.output))
        except ValueError as e:
            raise InvalidInput(f"head: {e} of backbone {job.backbone}") from e
        src = weights_source(
            job.backbone,
            weights_dir=env.settings.weights_dir,
            allow_random=env.settings.allow_random_weights,
        )
        if src.kind == "none":
            from workers.backbones import weights_unavailable_error

            raise weights_unavailable_error(job.backbone)
        if ds.kind == DatasetKind.features and ds.n_features != spec.embed_dim:
            raise InvalidInput(
                f"features have {ds.n_features} dimensions, {job.backbone} "
                f"embeds to {spec.embed_dim}"
            )
    if not env.store.exists(ds.artifact_key):
        raise DatasetError(f"the files of dataset {ds.id} are missing from the artifact store")
    finish_stage(env, job_id, Stage.validate, ds.kind)


def head_spec(head: dict[str, Any]) -> HeadSpec:
    """The job's head spec; a stored spec this version cannot read is bad input, not a crash."""
    try:
        return HeadSpec.model_validate(head)
    except ValidationError as e:
        first = e.errors()[0] if e.errors() else {"msg": str(e)}
        raise InvalidInput(f"head: {first['msg']}") from e


def _embeddings_key(
    env: Env, ds: Dataset, backbone: str, output: str, report: Callable[[float], None]
) -> tuple[str, bool]:
    """Extract (or find) the dataset's `output` embeddings; returns their artifact key and
    whether the extraction cache had them.

    The artifact is a directory of .npy files (X, y) and classes.json, so readers can
    memory-map X: a feature map is 250 kB per image, a dataset's maps can outgrow memory.
    """
    from workers.extract import extract

    res = extract(
        env.store.local_path(ds.artifact_key),
        backbone,
        output=output,
        cache_dir=env.settings.cache_dir,
        weights_dir=env.settings.weights_dir,
        allow_random=env.settings.allow_random_weights,
        progress=lambda fraction, *_: report(fraction),
    )
    key = f"embeddings/{res.key}"
    if not env.store.exists(key):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "e"
            out.mkdir()
            np.save(out / "X.npy", np.asarray(res.X, dtype=np.float32))  # streams a memmap
            np.save(out / "y.npy", np.asarray(res.y, dtype=np.int64))
            (out / "classes.json").write_text(json.dumps([str(c) for c in res.classes]))
            env.store.put_dir(key, out)
    return key, bool(getattr(res, "cache_hit", False))


def load_embeddings(env: Env, key: str) -> features.Features:
    """Embeddings by artifact key: a canonical .npz (feature datasets, older jobs) read whole,
    or an extraction directory whose X is memory-mapped read-only (rows load as used)."""
    path = env.store.local_path(key)
    if key.endswith(".npz"):
        return features.load_canonical(path)
    return features.Features(
        X=np.load(path / "X.npy", mmap_mode="r"),
        y=np.load(path / "y.npy"),
        classes=json.loads((path / "classes.json").read_text()),
    )


def extract(job_id: str, env: Env | None = None) -> None:
    env = env or default_env()
    job, ds = begin_stage(env, job_id, Stage.extract)
    assert ds is not None
    if "embeddings" in (job.outputs or {}) and env.store.exists(job.outputs["embeddings"]["key"]):
        finish_stage(env, job_id, Stage.extract, ds.kind)
        return
    if ds.kind == DatasetKind.features:
        emb = {"key": ds.artifact_key, "cache_hit": True, "source": "dataset"}
    else:
        report = Reporter(env, job_id, Stage.extract, ds.kind, _started_epoch(job))
        assert job.backbone is not None
        output = head_spec(job.head).output
        key, hit = _embeddings_key(env, ds, job.backbone, output, report)
        emb = {"key": key, "cache_hit": hit, "source": job.backbone, "output": output}
    finish_stage(env, job_id, Stage.extract, ds.kind, embeddings=emb)


def split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified split: each class keeps at least one training sample."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val = min(round(len(idx) * fraction), len(idx) - 1) if fraction > 0 else 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _load_xy(env: Env, job: Finetune) -> features.Features:
    return load_embeddings(env, job.outputs["embeddings"]["key"])


# Rows per block when predicting: about 64 MB of input at a time, whatever the head's input.
PREDICT_BLOCK_BYTES = 64 << 20


def in_blocks(method: Callable[[Any], Any], X: np.ndarray, rows: np.ndarray | None = None) -> Any:
    """method(X[rows]) for a non-empty selection of rows (all by default), evaluated a block of
    rows at a time and concatenated, so a memory-mapped X is never read into memory whole."""
    rows = np.arange(len(X)) if rows is None else np.asarray(rows)
    per_row = max(1, int(np.prod(X.shape[1:])) * X.itemsize)
    step = max(1, PREDICT_BLOCK_BYTES // per_row)
    return np.concatenate(
        [np.asarray(method(X[rows[s : s + step]])) for s in range(0, len(rows), step)]
    )


def load_head(path: Path) -> Any:
    """A saved head of any kind (the solver reads its class from the directory)."""
    import solver

    return solver.load(path)


def fit(job_id: str, env: Env | None = None) -> None:
    env = env or default_env()
    job, ds = begin_stage(env, job_id, Stage.fit)
    kind = ds.kind if ds else DatasetKind.features
    head_key = f"heads/{head_id_for(job_id)}"
    if "fit" in (job.outputs or {}) and env.store.exists(head_key):
        finish_stage(env, job_id, Stage.fit, kind)
        return
    import solver

    data = _load_xy(env, job)
    train, _ = split(data.y, job.validation_fraction, job.seed)
    spec = head_spec(job.head)
    estimator = getattr(solver, spec.solver_class)
    clf = estimator(**spec.solver_kwargs(), lam=job.lam, random_state=job.seed)
    report = Reporter(env, job_id, Stage.fit, kind, _started_epoch(job))
    report(0.0, force=True)
    t0 = time.perf_counter()
    X_train = data.X[train]  # the one copy the solver needs; data.X may be memory-mapped
    try:
        clf.fit(X_train, data.y[train], progress=report)
    except ValueError as e:  # the solver refuses inputs it cannot fit, saying why
        raise InvalidInput(f"the {spec.kind} head cannot be fitted on these inputs: {e}") from e
    del X_train
    seconds = time.perf_counter() - t0
    input_shape = [int(v) for v in data.X.shape[1:]]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "head"
        clf.save(out)
        (out / "cvxtune.json").write_text(
            json.dumps(
                {
                    "kind": spec.kind,
                    "output": spec.output,
                    "input_shape": input_shape,
                    "classes": data.classes,
                    "backbone": job.backbone,
                    "job_id": job_id,
                    "dataset_id": job.dataset_id,
                    "code_version": code_version(),
                },
                indent=1,
            )
        )
        env.store.put_dir(head_key, out)
    summary = {
        "kind": spec.kind,
        "input_shape": input_shape,
        "objective": _num(getattr(clf, "objective_", None)),
        "duality_gap": _num(getattr(clf, "duality_gap_", None)),
        "n_iter": _num(getattr(clf, "n_iter_", None)),
        "n_neurons": _num(getattr(clf, "n_neurons_", None)),
        "n_heads": _num(getattr(clf, "n_heads_", None)),
        "constraint_violation": _num(getattr(clf, "constraint_violation_", None)),
        "lam": _num(getattr(clf, "lam_", job.lam)),
        "lam_max": _num(getattr(clf, "lam_max_", None)),
        "converged": bool(getattr(clf, "converged_", True)),
        "pricing_violation": _num(getattr(clf, "pricing_violation_", None)),
        # Gates each pricing round added (only when rounds were asked for).
        "pricing_added": (
            [int(k) for k in clf.pricing_added_] if getattr(clf, "pricing_rounds", 0) else None
        ),
        "n_train": int(train.size),
        "fit_seconds": round(seconds, 4),
    }
    finish_stage(env, job_id, Stage.fit, kind, fit=summary)


def _num(v: Any) -> Any:
    if v is None:
        return None
    if hasattr(v, "item"):
        v = v.item()
    return int(v) if isinstance(v, (int, np.integer)) else float(v)


def classification_metrics(y: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict[str, Any]:
    k = len(classes)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    tp = np.diag(cm).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(cm.sum(0) > 0, tp / cm.sum(0), 0.0)
        recall = np.where(cm.sum(1) > 0, tp / cm.sum(1), 0.0)
    return {
        "n": int(y.size),
        "accuracy": float(tp.sum() / max(y.size, 1)),
        "per_class": {
            c: {
                "precision": round(float(precision[i]), 6),
                "recall": round(float(recall[i]), 6),
                "support": int(cm[i].sum()),
            }
            for i, c in enumerate(classes)
        },
        "confusion_matrix": cm.tolist(),
    }


def evaluate(job_id: str, env: Env | None = None) -> None:
    env = env or default_env()
    job, ds = begin_stage(env, job_id, Stage.evaluate)
    kind = ds.kind if ds else DatasetKind.features
    data = _load_xy(env, job)
    train, val = split(data.y, job.validation_fraction, job.seed)
    clf = load_head(env.store.local_path(f"heads/{head_id_for(job_id)}"))
    metrics: dict[str, Any] = {
        "train": {
            "n": int(train.size),
            "accuracy": float(np.mean(in_blocks(clf.predict, data.X, train) == data.y[train])),
        },
        "validation": (
            classification_metrics(data.y[val], in_blocks(clf.predict, data.X, val), data.classes)
            if val.size
            else None
        ),
    }
    finish_stage(env, job_id, Stage.evaluate, kind, metrics=metrics)


def register(job_id: str, env: Env | None = None) -> None:
    env = env or default_env()
    job, ds = begin_stage(env, job_id, Stage.register)
    hid = head_id_for(job_id)
    out = job.outputs
    fit_ = out["fit"]
    with session_scope(env.db) as s:
        live = s.get(Finetune, job_id, with_for_update=True)
        if live is None or live.state in TERMINAL_STATES or live.cancel_requested:
            raise JobCancelled(job_id)
        if s.get(Head, hid) is None:
            s.add(
                Head(
                    id=hid,
                    project_id=job.project_id,
                    finetune_id=job_id,
                    dataset_id=job.dataset_id,
                    backbone=job.backbone,
                    artifact_key=f"heads/{hid}",
                    classes=ds.classes if ds else [],
                    metrics=out.get("metrics", {}),
                    certificate=_certificate(fit_),
                    lineage={
                        "dataset_id": job.dataset_id,
                        "dataset_hash": ds.content_hash if ds else None,
                        "backbone": job.backbone,
                        "weights": _weights_id(env, job.backbone),
                        "embeddings": out["embeddings"]["key"],
                        "head": job.head,
                        "input": {
                            "output": head_spec(job.head).output,
                            "shape": fit_.get("input_shape"),
                        },
                        "lam": fit_.get("lam"),
                        "lam_requested": job.lam,
                        "seed": job.seed,
                        "validation_fraction": job.validation_fraction,
                        "code_version": code_version(),
                    },
                )
            )
        live.head_id, live.state, live.stage = hid, JobState.succeeded, Stage.done
        live.progress, live.eta_seconds, live.finished_at = 1.0, 0.0, utcnow()
        live.updated_at = utcnow()


# What a head's certificate shows; the kind-specific entries only where the kind has them.
CERTIFICATE = (
    "duality_gap",
    "objective",
    "converged",
    "n_iter",
    "n_neurons",
    "lam",
    "lam_max",
    "pricing_violation",
)
KIND_CERTIFICATE = ("n_heads", "constraint_violation", "pricing_added")


def _certificate(fit_: dict[str, Any]) -> dict[str, Any]:
    cert = {k: fit_.get(k) for k in CERTIFICATE}
    cert.update({k: fit_[k] for k in KIND_CERTIFICATE if fit_.get(k) is not None})
    return cert


def _weights_id(env: Env, backbone: str | None) -> str | None:
    if not backbone:
        return None
    try:
        from workers.backbones import weights_id, weights_source

        src = weights_source(
            backbone,
            weights_dir=env.settings.weights_dir,
            allow_random=env.settings.allow_random_weights,
        )
        return weights_id(src, backbone)
    except CvxtuneError:
        return None


_VERSION: str | None = None


def code_version() -> str:
    """The package version plus the git commit when running from a checkout."""
    global _VERSION
    if _VERSION is None:
        try:
            sha = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(__file__).parent,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            sha = ""
        _VERSION = f"{__version__}+{sha}" if sha else __version__
    return _VERSION


# ---------------------------------------------------------------- batch prediction


def predict_batch(prediction_id: str, env: Env | None = None) -> None:
    env = env or default_env()
    with session_scope(env.db) as s:
        pred = s.get(Prediction, prediction_id, with_for_update=True)
        if pred is None or pred.state in TERMINAL_STATES:
            return
        pred.attempts += 1
        if pred.attempts > env.settings.max_deliveries:
            pred.state, pred.error_code, pred.finished_at = (
                JobState.failed,
                "too_many_attempts",
                utcnow(),
            )
            pred.error_message = "the prediction was started too many times without finishing"
            return
        pred.state, pred.heartbeat_at = JobState.running, utcnow()
        head = s.scalar(select(Head).where(Head.id == pred.head_id))
        ds = s.get(Dataset, pred.dataset_id)
        s.flush()
        s.expunge_all()
    if head is None or ds is None:
        raise NotFound("the head or the dataset of this prediction no longer exists")
    clf = load_head(env.store.local_path(head.artifact_key))
    kind = head_kind_of_solver(type(clf).__name__)
    if ds.kind == DatasetKind.features:
        if kind != "mlp":
            raise InvalidInput(
                f"the {kind} head predicts image datasets only; {ds.id} is a features dataset",
                code="unsupported_head_kind",
            )
        data = features.load_canonical(env.store.local_path(ds.artifact_key))
    else:
        assert head.backbone is not None
        key, _ = _embeddings_key(env, ds, head.backbone, HEAD_OUTPUT[kind], lambda fraction: None)
        data = load_embeddings(env, key)
    try:
        proba = np.asarray(in_blocks(clf.predict_proba, data.X), dtype=np.float64)
    except ValueError as e:
        raise InvalidInput(f"the dataset does not fit the head's input: {e}") from e
    names = [head.classes[int(i)] for i in np.asarray(clf.classes_).tolist()]
    labels = [names[int(j)] for j in proba.argmax(1)]
    results = [
        {
            "index": i,
            "label": lab,
            "true_label": data.classes[int(t)],
            "probabilities": {n: round(float(p), 6) for n, p in zip(names, row, strict=True)},
        }
        for i, (lab, t, row) in enumerate(zip(labels, data.y, proba, strict=True))
    ]
    correct = sum(r["label"] == r["true_label"] for r in results)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.json"
        path.write_text(json.dumps(results))
        env.store.put_file(f"predictions/{prediction_id}.json", path)
    with session_scope(env.db) as s:
        pred = s.get(Prediction, prediction_id)
        assert pred is not None
        pred.state, pred.progress, pred.finished_at = JobState.succeeded, 1.0, utcnow()
        pred.result_key = f"predictions/{prediction_id}.json"
        pred.summary = {"n": len(results), "accuracy": correct / max(len(results), 1)}


def fail_prediction(env: Env, prediction_id: str, code: str, message: str) -> None:
    with session_scope(env.db) as s:
        s.execute(
            update(Prediction)
            .where(
                Prediction.id == prediction_id,
                Prediction.state.not_in([str(x) for x in TERMINAL_STATES]),
            )
            .values(
                state=JobState.failed, error_code=code, error_message=message, finished_at=utcnow()
            )
        )
