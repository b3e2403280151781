"""The stage functions on a real database, without a broker: failure policy and bookkeeping."""

from __future__ import annotations

import pytest
from seed_rows import add_finetune

from app.migrate import upgrade
from cvxtune.db import Finetune, session_scope
from cvxtune.errors import DatasetError
from cvxtune.settings import Settings
from workers import jobs


@pytest.fixture
def env(tmp_path):
    settings = Settings(data_dir=tmp_path, max_deliveries=3)
    upgrade(settings.resolved_database_url)
    return jobs.Env(settings)


def _job(env) -> str:
    return add_finetune(env.db)


def _get(env, job_id):
    with session_scope(env.db) as s:
        return s.get(Finetune, job_id)


def test_redelivery_is_bounded(env):
    job_id = _job(env)
    for _ in range(3):
        assert jobs.begin_stage(env, job_id, jobs.Stage.fit) is not None
    assert jobs.begin_stage(env, job_id, jobs.Stage.fit) is None
    job = _get(env, job_id)
    assert job.state == "failed" and job.error_code == "too_many_attempts"
    assert job.outputs["deliveries"] == {"fit": 3}


def test_missing_dataset_files_fail_validation(env):
    job_id = _job(env)
    with pytest.raises(DatasetError, match="missing"):
        jobs.validate(job_id, env)


def test_reporter_stops_a_cancelled_job(env):
    job_id = _job(env)
    jobs.begin_stage(env, job_id, jobs.Stage.fit)
    report = jobs.Reporter(env, job_id, jobs.Stage.fit, "features", started=0.0)
    report(0.5, force=True)
    assert _get(env, job_id).progress == pytest.approx(0.05 + 0.9 * 0.5)
    with session_scope(env.db) as s:
        s.get(Finetune, job_id).cancel_requested = True
    with pytest.raises(jobs.JobCancelled):
        report(0.6, force=True)
    # A cancelled job's later stages do nothing.
    assert jobs.begin_stage(env, job_id, jobs.Stage.evaluate) is None


def test_failure_keeps_the_first_terminal_state(env):
    job_id = _job(env)
    jobs.fail_job(env, job_id, "invalid_dataset", "bad")
    jobs.fail_job(env, job_id, "internal_error", "later")
    job = _get(env, job_id)
    assert (job.state, job.error_code, job.error_message) == ("failed", "invalid_dataset", "bad")


def test_split_is_stratified_and_reproducible():
    import numpy as np

    y = np.repeat([0, 1, 2], [10, 5, 2])
    tr, va = jobs.split(y, 0.2, seed=4)
    tr2, va2 = jobs.split(y, 0.2, seed=4)
    assert (tr == tr2).all() and (va == va2).all()
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(17))
    assert all((y[tr] == c).any() for c in range(3))
    assert np.bincount(y[va], minlength=3).tolist() == [2, 1, 0]


def test_metrics_match_a_hand_count():
    import numpy as np

    y = np.array([0, 0, 1, 1, 1])
    pred = np.array([0, 1, 1, 1, 0])
    m = jobs.classification_metrics(y, pred, ["a", "b"])
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["confusion_matrix"] == [[1, 1], [1, 2]]
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["a"]["recall"] == pytest.approx(0.5)
