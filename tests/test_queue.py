"""The auto-interp queue and worker: unit tests on both databases, and real worker processes.

Worker processes run `python -m app.autointerp.worker --backend instant`: the instant backend is
the documented test/benchmark backend (canned answers, no model), so these tests exercise the
real claim / heartbeat / store / complete path of every job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.autointerp import queue
from tests.synthetic_sae import make_synthetic_sae
from store.models import Explanation, Feature, Job, Judgement, utcnow

REPO = Path(__file__).resolve().parents[1]


def setup_jobs(engine, n_features: int = 10, n_jobs: int | None = None, name: str = "synthetic") -> list[int]:
    make_synthetic_sae(engine, name=name, n_features=n_features)
    with Session(engine) as s, s.begin():
        queue.enqueue_for_sae(s, name, limit=n_jobs)
    with Session(engine) as s:
        return list(s.scalars(select(Job.id).order_by(Job.id)))


def get_job(engine, job_id: int) -> Job:
    with Session(engine, expire_on_commit=False) as s:
        return s.get(Job, job_id)


def claim(engine, worker: str, limit: int = 1, lease_s: float = 60.0) -> list[Job]:
    with Session(engine, expire_on_commit=False) as s:
        return queue.claim(s, worker, limit=limit, lease_s=lease_s)


def make_due(engine, job_id: int) -> None:
    """Pretend the backoff has passed."""
    with Session(engine) as s, s.begin():
        s.execute(update(Job).where(Job.id == job_id).values(run_after=utcnow() - timedelta(seconds=1)))


# --- unit tests of the queue (SQLite and PostgreSQL) ------------------------------------------

def test_one_live_job_per_feature(engine):
    from store.models import SAE

    make_synthetic_sae(engine, n_features=5)
    with Session(engine, expire_on_commit=False) as s, s.begin():
        assert queue.enqueue_for_sae(s, "synthetic") == (5, 0)
        assert queue.enqueue_for_sae(s, "synthetic") == (0, 5)
        feature = s.scalar(select(Feature).where(Feature.index == 2))
        first, created = queue.enqueue(s, s.get(SAE, feature.sae_id), feature)
        assert not created
    (job,) = [j for j in claim(engine, "w1", limit=5) if j.feature_id == feature.id]
    assert job.id == first.id
    with Session(engine) as s:
        assert queue.complete(s, job.id, "w1", {"ok": 1})
    with Session(engine) as s, s.begin():  # finished jobs do not block a new one
        again, created = queue.enqueue(s, s.get(SAE, feature.sae_id), s.get(Feature, feature.id))
        assert created and again.id != job.id


def test_priorities_then_age(engine):
    ids = setup_jobs(engine, n_features=4)
    with Session(engine) as s, s.begin():
        s.execute(update(Job).where(Job.id == ids[2]).values(priority=5))
        s.execute(update(Job).where(Job.id == ids[3]).values(priority=-1))
    order = [claim(engine, "w")[0].id for _ in ids]
    assert order == [ids[2], ids[0], ids[1], ids[3]]
    assert claim(engine, "w") == []


def test_failure_backs_off_and_gives_up_after_max_attempts(engine):
    (job_id,) = setup_jobs(engine, n_features=1)
    max_attempts = get_job(engine, job_id).max_attempts
    assert max_attempts == 3
    for attempt in range(1, max_attempts + 1):
        (job,) = claim(engine, "w")
        assert job.id == job_id and job.attempts == attempt
        with Session(engine) as s:
            status = queue.fail(s, job, "w", f"boom {attempt}")
        after = get_job(engine, job_id)
        if attempt < max_attempts:
            assert status == "queued" and after.status == "queued"
            # full jitter in [0.5, 1] x base x 2^(attempt-1)
            wait = (after.run_after - utcnow()).total_seconds()
            cap = queue.BACKOFF_BASE_S * 2 ** (attempt - 1)
            assert 0.5 * cap - 2 <= wait <= cap
            assert claim(engine, "w") == []  # not before the backoff
            make_due(engine, job_id)
        else:
            assert status == "failed" and after.status == "failed" and after.finished_at is not None
        assert after.error == f"boom {attempt}" and after.lease_owner is None


def test_non_retryable_failure_fails_at_once(engine):
    (job_id,) = setup_jobs(engine, n_features=1)
    (job,) = claim(engine, "w")
    with Session(engine) as s:
        assert queue.fail(s, job, "w", "bad key", retryable=False) == "failed"
    assert get_job(engine, job_id).attempts == 1


def test_release_does_not_count_an_attempt(engine):
    (job_id,) = setup_jobs(engine, n_features=1)
    (job,) = claim(engine, "w")
    with Session(engine) as s:
        assert queue.release(s, job.id, "w")
    after = get_job(engine, job_id)
    assert after.status == "queued" and after.attempts == 0 and after.lease_owner is None
    assert claim(engine, "w2")[0].attempts == 1


def test_expired_lease_is_taken_over_and_the_old_owner_locked_out(engine):
    (job_id,) = setup_jobs(engine, n_features=1)
    claim(engine, "dead", lease_s=0.05)
    time.sleep(0.1)
    (job,) = claim(engine, "alive")
    assert job.id == job_id and job.attempts == 2 and job.lease_owner == "alive"
    with Session(engine) as s:
        assert not queue.heartbeat(s, job_id, "dead")
        assert not queue.complete(s, job_id, "dead")
        assert queue.heartbeat(s, job_id, "alive")
        assert queue.complete(s, job_id, "alive", {"by": "alive"})
    assert get_job(engine, job_id).status == "done"


def test_lease_expiring_on_the_last_attempt_fails_the_job(engine):
    (job_id,) = setup_jobs(engine, n_features=1)
    with Session(engine) as s, s.begin():
        s.execute(update(Job).values(attempts=2))
    claim(engine, "dead", lease_s=0.05)
    time.sleep(0.1)
    assert claim(engine, "alive") == []
    after = get_job(engine, job_id)
    assert after.status == "failed" and "lease expired" in after.error


def test_one_sweep_fails_the_spent_and_requeues_the_rest_then_the_claim_takes_them(engine):
    """Two leases expire at once, one on its last attempt: the claim's sweep fails that one (its
    error kept) and hands the other to the claimer in the same call (on PostgreSQL the sweep rides
    in the claim's statement, whose snapshot cannot see what it requeued: the claim looks again)."""
    spent, alive = setup_jobs(engine, n_features=2)
    with Session(engine) as s, s.begin():
        s.execute(update(Job).where(Job.id == spent).values(attempts=2, error="boom"))
    assert {j.id for j in claim(engine, "dead", limit=2, lease_s=0.05)} == {spent, alive}
    time.sleep(0.1)
    (job,) = claim(engine, "next", limit=2)
    assert job.id == alive and job.attempts == 2 and job.lease_owner == "next" and job.status == "running"
    failed = get_job(engine, spent)
    assert failed.status == "failed" and failed.attempts == 3 and failed.lease_owner is None
    assert failed.error == "boom; lease expired: the worker stopped responding" and failed.finished_at is not None


def test_claim_rows_are_whole_and_the_session_stays_transactional(engine):
    """The claim returns its rows from the statement itself, readable after the session closes
    (also where the commit expires them); inside a transaction it still commits; and the pooled
    connection it used (autocommit on PostgreSQL) is transactional again for the next user."""
    a, b = setup_jobs(engine, n_features=2)
    with Session(engine) as s:  # expire_on_commit=True
        (job,) = queue.claim(s, "w", lease_s=60)
    assert job.id == a and job.status == "running" and job.attempts == 1 and job.started_at is not None
    with Session(engine, expire_on_commit=False) as s:
        assert s.get(Job, b).status == "queued"  # a transaction is open: the claim commits it
        (job,) = queue.claim(s, "w", lease_s=60)
        assert job.id == b and not s.in_transaction()
    with Session(engine) as s:
        s.execute(update(Job).values(priority=99))
        s.rollback()
    with Session(engine) as s:
        assert set(s.scalars(select(Job.priority))) == {0}


def test_cancel_queued_and_running(engine):
    a, b = setup_jobs(engine, n_features=2)
    with Session(engine) as s, s.begin():
        assert queue.cancel_job(s, a).status == "cancelled"
    (job,) = claim(engine, "w", limit=5)
    assert job.id == b
    with Session(engine) as s, s.begin():
        queue.cancel_job(s, b)
    with Session(engine) as s:
        assert not queue.heartbeat(s, b, "w")  # the worker learns at its next heartbeat
        assert not queue.complete(s, b, "w")
        assert queue.fail(s, job, "w", "late") == "lost"
        from store.errors import AtlasError

        with pytest.raises(AtlasError):
            queue.cancel_job(s, b)
    assert get_job(engine, b).status == "cancelled"


def test_claims_never_overlap_between_threads(engine):
    ids = setup_jobs(engine, n_features=60)
    got: dict[str, list[int]] = {}

    def worker(name):
        mine = got.setdefault(name, [])
        while batch := claim(engine, name, limit=3):
            mine += [j.id for j in batch]

    threads = [threading.Thread(target=worker, args=(f"t{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [i for v in got.values() for i in v]
    assert sorted(claimed) == ids


# --- the worker in this process ---------------------------------------------------------------

def test_worker_explains_scores_and_stores(engine):
    from app.autointerp.backends import INSTANT_EXPLANATION
    from app.autointerp.worker import run_worker

    ids = setup_jobs(engine, n_features=12, n_jobs=6)
    assert run_worker(concurrency=3, once=True, backend="instant", engine=engine) == 0
    with Session(engine) as s:
        jobs = list(s.scalars(select(Job)))
        assert {j.status for j in jobs} == {"done"} and len(jobs) == len(ids)
        for job in jobs:
            r = job.result
            expl = s.get(Explanation, r["explanation_id"])
            assert expl.feature_id == job.feature_id and expl.text == INSTANT_EXPLANATION
            assert expl.method == "explain-v4" and expl.explainer == "instant:instant"
            assert expl.prompt and "<<" in expl.prompt and expl.raw_response == INSTANT_EXPLANATION
            judgements = list(s.scalars(select(Judgement).where(Judgement.explanation_id == expl.id)))
            for method in ("detection", "fuzzing"):
                mine = [j for j in judgements if j.method == method]
                assert len(mine) == r[method]["n"] > 0
                assert {j.truth for j in mine} == {True, False}
                assert all(j.correct == (j.prediction == j.truth) for j in mine)
            feature = s.get(Feature, job.feature_id)
            assert feature.explanation == expl.text and feature.best_score == expl.detection_score
            assert 0.0 <= expl.detection_score <= 1.0 and 0.0 <= expl.fuzzing_score <= 1.0


def test_worker_drops_work_of_a_cancelled_job(sqlite_engine):
    from app.autointerp.backends import InstantBackend
    from app.autointerp.worker import Worker

    (job_id,) = setup_jobs(sqlite_engine, n_features=3, n_jobs=1)
    worker = Worker(InstantBackend(delay_s=2.0), sqlite_engine, concurrency=1, max_jobs=1, lease_s=0.6, poll_s=0.05)
    import asyncio

    def cancel_when_running():
        for _ in range(200):
            if get_job(sqlite_engine, job_id).status == "running":
                with Session(sqlite_engine) as s, s.begin():
                    queue.cancel_job(s, job_id)
                return
            time.sleep(0.02)

    t = threading.Thread(target=cancel_when_running)
    t.start()
    started = time.monotonic()
    assert asyncio.run(worker.run()) == 0
    t.join()
    assert time.monotonic() - started < 5  # stopped at a heartbeat, not after the ~8 s of work
    assert worker.stats.lost == 1 and worker.stats.done == 0
    assert get_job(sqlite_engine, job_id).status == "cancelled"
    with Session(sqlite_engine) as s:
        assert s.scalar(select(func.count(Explanation.id))) == 0


def test_too_few_examples_is_skipped_without_retry(sqlite_engine):
    from app.autointerp.worker import run_worker
    from store.models import Example

    (job_id,) = setup_jobs(sqlite_engine, n_features=3, n_jobs=1)
    with Session(sqlite_engine) as s, s.begin():
        fid = get_job(sqlite_engine, job_id).feature_id
        s.execute(Example.__table__.delete().where(Example.feature_id == fid, Example.rank > 1))
    assert run_worker(once=True, backend="instant", engine=sqlite_engine) == 0
    job = get_job(sqlite_engine, job_id)
    assert job.status == "failed" and job.attempts == 1
    assert "TooFewExamples" in job.error and "2 distinct activating examples" in job.error


# --- worker processes -------------------------------------------------------------------------

def spawn_worker(url: str, *args: str, lease_s: float = 30.0, **extra_env: str) -> subprocess.Popen:
    env = dict(os.environ, SAE_ATLAS_DATABASE_URL=url, SAE_ATLAS_JOB_LEASE_S=str(lease_s),
               SAE_ATLAS_WORKER_POLL_S="0.2", SAE_ATLAS_LOG_LEVEL="WARNING", PYTHONPATH=str(REPO), **extra_env)
    return subprocess.Popen([sys.executable, "-m", "app.autointerp.worker", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def url_of(engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def drain_with_processes(engine, n_jobs: int, n_workers: int):
    ids = setup_jobs(engine, n_features=n_jobs)
    assert len(ids) == n_jobs
    procs = [spawn_worker(url_of(engine), "--backend", "instant", "--once", "--concurrency", "4")
             for _ in range(n_workers)]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out
    with Session(engine) as s:
        assert queue.counts(s) == {"done": n_jobs}
        assert s.scalar(select(func.max(Job.attempts))) == 1
        per_feature = s.execute(select(Explanation.feature_id, func.count()).group_by(Explanation.feature_id)).all()
        assert len(per_feature) == n_jobs and {n for _, n in per_feature} == {1}
        workers = {j.result["worker"] for j in s.scalars(select(Job))}
        ids_in_results = {j.result["explanation_id"] for j in s.scalars(select(Job))}
        assert len(ids_in_results) == n_jobs
    return workers


@pytest.mark.slow
def test_four_worker_processes_drain_500_jobs_on_postgres(pg_engine):
    workers = drain_with_processes(pg_engine, n_jobs=500, n_workers=4)
    assert len(workers) >= 2  # the work was actually shared


@pytest.mark.slow
def test_two_worker_processes_drain_jobs_on_sqlite(sqlite_engine):
    drain_with_processes(sqlite_engine, n_jobs=150, n_workers=2)


@pytest.mark.slow
@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_killed_worker_job_is_re_leased_and_completed(db, request):
    engine = request.getfixturevalue("sqlite_engine" if db == "sqlite" else "pg_engine")
    ids = setup_jobs(engine, n_features=4, n_jobs=3)
    lease = 1.5
    # A slow worker takes one job and dies mid-job; a second worker drains the queue meanwhile.
    slow = spawn_worker(url_of(engine), "--backend", "instant:60", "--max-jobs", "1", lease_s=lease)
    victim = wait_for(lambda: next((j for j in (get_job(engine, i) for i in ids)
                                    if j.status == "running" and f":{slow.pid}:" in (j.lease_owner or "")), None),
                      60, "the slow worker to claim a job")
    time.sleep(lease / 2)  # a heartbeat or so in
    assert get_job(engine, victim.id).status == "running"
    slow.send_signal(signal.SIGKILL)
    slow.wait(timeout=10)
    other = spawn_worker(url_of(engine), "--backend", "instant", "--max-jobs", "3", lease_s=lease)
    out, _ = other.communicate(timeout=120)
    assert other.returncode == 0, out
    job = get_job(engine, victim.id)
    assert job.status == "done" and job.attempts == 2
    assert f":{other.pid}:" in job.result["worker"]
    with Session(engine) as s:
        assert queue.counts(s) == {"done": 3}
        assert s.scalar(select(func.count(Explanation.id)).where(Explanation.feature_id == victim.feature_id)) == 1


@pytest.mark.slow
def test_sigterm_releases_running_jobs(sqlite_engine):
    ids = setup_jobs(sqlite_engine, n_features=4, n_jobs=2)
    w = spawn_worker(url_of(sqlite_engine), "--backend", "instant:60", "--concurrency", "2", "--grace", "0.5")
    wait_for(lambda: all(get_job(sqlite_engine, i).status == "running" for i in ids), 60, "both jobs to run")
    w.send_signal(signal.SIGTERM)
    out, _ = w.communicate(timeout=30)
    assert w.returncode == 0, out
    for i in ids:
        job = get_job(sqlite_engine, i)
        assert job.status == "queued" and job.attempts == 0 and job.lease_owner is None
