"""Faults in the auto-interp queue: workers killed and frozen at random while they drain it, and a
lease that expires under a worker which then reaches its completion (queue.finish).

The workers are real `python -m app.autointerp.worker` processes with the instant backend (the
documented test backend: canned answers, the real claim / heartbeat / store / finish path). The
faults follow a seeded random schedule, so every run injects the same sequence."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.autointerp import queue
from store.models import Explanation, Job, Judgement, utcnow
from tests.test_queue import setup_jobs, spawn_worker, url_of

SEED = 20261129


def test_a_worker_whose_lease_expired_cannot_complete_the_job(engine):
    """Worker A holds a job, its lease expires (it stopped heartbeating), worker B takes the job
    over and completes it; when A then reaches the end of the same job, queue.finish refuses it
    inside A's transaction, so A's explanation and judgements are rolled back: one result."""
    from app.autointerp.backends import make_backend
    from app.autointerp.explain import JobRef, LeaseLost, run_explain_job

    (job_id,) = setup_jobs(engine, n_features=1)
    backend = make_backend("instant")
    with Session(engine, expire_on_commit=False) as s:
        (a,) = queue.claim(s, "worker-a", lease_s=60)
    ref_a = JobRef(a.id, a.feature_id, a.sae_id, a.attempts, a.max_attempts, a.params or {})
    with Session(engine) as s, s.begin():  # A's lease runs out
        s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    with Session(engine, expire_on_commit=False) as s:
        (b,) = queue.claim(s, "worker-b", lease_s=60)
    assert b.id == job_id and b.attempts == 2
    ref_b = JobRef(b.id, b.feature_id, b.sae_id, b.attempts, b.max_attempts, b.params or {})
    done = asyncio.run(run_explain_job(ref_b, backend, engine, "worker-b"))
    with pytest.raises(LeaseLost):
        asyncio.run(run_explain_job(ref_a, backend, engine, "worker-a"))
    with Session(engine) as s:
        job = s.get(Job, job_id)
        assert job.status == "done" and job.result["worker"] == "worker-b"
        assert job.result["explanation_id"] == done["explanation_id"]
        assert s.scalar(select(func.count()).select_from(Explanation)) == 1
        judged = s.scalar(select(func.count(func.distinct(Judgement.explanation_id))))
        assert judged == 1


@pytest.mark.slow
def test_workers_killed_and_frozen_at_random_lose_and_duplicate_nothing(pg_engine):
    engine = pg_engine
    n_jobs, n_workers, lease = 500, 4, 2.0
    ids = setup_jobs(engine, n_features=n_jobs)
    assert len(ids) == n_jobs
    # A job's attempt budget is fixed when it is queued: a job killed or frozen several times (and,
    # on a loaded machine, one whose heartbeat came late) must still end done, so give it room.
    with Session(engine) as s, s.begin():
        s.execute(update(Job).values(max_attempts=50))
    rng = random.Random(SEED)

    def start():
        return spawn_worker(url_of(engine), "--backend", "instant:0.02", "--concurrency", "4", lease_s=lease)

    workers = [start() for _ in range(n_workers)]
    killed = frozen = 0

    def remaining() -> int:
        with Session(engine) as s:
            # finished jobs are done or failed; waiting on a failed one would only run out the clock
            return s.scalar(select(func.count()).select_from(Job).where(Job.status.not_in(("done", "failed")))) or 0

    try:
        # Faults while the queue drains: 12 SIGKILLs (each victim replaced by a fresh worker) and 4
        # SIGSTOP/SIGCONT freezes longer than the lease (the frozen worker wakes up to find its jobs
        # taken over: its completions must be refused).
        schedule = [rng.choice(["kill", "kill", "kill", "freeze"]) for _ in range(16)]
        for fault in schedule:
            if remaining() == 0:
                break
            time.sleep(rng.uniform(0.2, 1.0))
            i = rng.randrange(len(workers))
            victim = workers[i]
            if fault == "kill":
                victim.send_signal(signal.SIGKILL)
                victim.wait(timeout=30)
                workers[i] = start()
                killed += 1
            else:
                victim.send_signal(signal.SIGSTOP)
                time.sleep(lease * 1.5)
                victim.send_signal(signal.SIGCONT)
                frozen += 1
        deadline = time.monotonic() + 300
        while remaining() and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGCONT)
                w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.communicate(timeout=60)
            except Exception:  # noqa: BLE001
                w.kill()
    assert killed >= 5 and frozen >= 1, (killed, frozen)
    with Session(engine) as s:
        assert queue.counts(s) == {"done": n_jobs}  # nothing lost, nothing failed
        per_feature = dict(s.execute(select(Explanation.feature_id, func.count()).group_by(Explanation.feature_id)).all())
        assert len(per_feature) == n_jobs and set(per_feature.values()) == {1}  # nothing duplicated
        results = {j.result["explanation_id"] for j in s.scalars(select(Job))}
        stored = set(s.scalars(select(Explanation.id)))
        assert results == stored  # each job's result is the one explanation stored for it
        orphans = s.scalar(select(func.count()).select_from(Judgement).where(Judgement.explanation_id.not_in(stored)))
        assert orphans == 0
        retried = s.scalar(select(func.count()).select_from(Job).where(Job.attempts > 1))
    assert retried > 0  # the faults did hit jobs in flight
