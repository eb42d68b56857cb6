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
from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.autointerp import queue
from store.models import SAE, Explanation, Feature, Job, Judgement, utcnow
from tests.test_queue import setup_jobs, spawn_worker, url_of


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


# Several seeded fault schedules per backend, one after another against the same worker pool (its
# victims replaced), each over its own batch of jobs: 8 worker starts per backend, not 8 per seed.
SEEDS = (20261129, 7, 2027)
JOBS_PER_SEED, N_WORKERS, LEASE_S = 100, 2, 2.0
# Every lease that runs out costs the job an attempt; a job killed or frozen several times (and, on
# a loaded machine, one whose heartbeat came late) must still end done, so the budget is generous.
ATTEMPTS = 50


@pytest.fixture
def generous_budget(monkeypatch):
    """The attempt budget for enqueue (fixed per job when queued) and the workers alike."""
    from store.settings import get_settings

    monkeypatch.setenv("SAE_ATLAS_JOB_MAX_ATTEMPTS", str(ATTEMPTS))
    get_settings.cache_clear()
    yield ATTEMPTS
    monkeypatch.undo()
    get_settings.cache_clear()


def _failures(engine, sae_id: int) -> list[str]:
    with Session(engine) as s:
        return [f"job {j.id} after {j.attempts} attempt(s): {j.error}" for j in s.scalars(
            select(Job).where(Job.sae_id == sae_id, Job.status == "failed").order_by(Job.id))]


@pytest.mark.slow
def test_workers_killed_and_frozen_at_random_lose_duplicate_and_fail_nothing(engine, generous_budget):
    """SIGKILLs (each victim replaced by a fresh worker) and SIGSTOP/SIGCONT freezes longer than
    the lease (the frozen worker wakes up to find its jobs taken over: its completions must be
    refused) while the queue drains. Every job ends done, with one explanation: none lost,
    duplicated or failed."""
    workers: list = []

    def start():
        return spawn_worker(url_of(engine), "--backend", "instant:0.05", "--concurrency", "4", lease_s=LEASE_S)

    def remaining(sae_id: int) -> int:
        with Session(engine) as s:
            # finished jobs are done or failed; waiting on a failed one would only run out the clock
            return s.scalar(select(func.count()).select_from(Job).where(
                Job.sae_id == sae_id, Job.status.not_in(("done", "failed")))) or 0

    killed = frozen = retried = 0
    try:
        workers += [start() for _ in range(N_WORKERS)]
        for seed in SEEDS:
            rng = random.Random(seed)
            setup_jobs(engine, n_features=JOBS_PER_SEED, name=f"chaos-{seed}")
            with Session(engine) as s:
                sae_id = s.scalar(select(SAE.id).where(SAE.name == f"chaos-{seed}"))
                assert set(s.scalars(select(Job.max_attempts).where(Job.sae_id == sae_id))) == {generous_budget}
            for fault in rng.sample(["kill", "kill", "freeze"], 3):
                if remaining(sae_id) == 0:
                    break
                time.sleep(rng.uniform(0.2, 0.8))
                i = rng.randrange(len(workers))
                victim = workers[i]
                if fault == "kill":
                    victim.send_signal(signal.SIGKILL)
                    victim.wait(timeout=30)
                    workers[i] = start()
                    killed += 1
                else:
                    victim.send_signal(signal.SIGSTOP)
                    time.sleep(LEASE_S * 1.5)
                    victim.send_signal(signal.SIGCONT)
                    frozen += 1
            deadline = time.monotonic() + 300
            while remaining(sae_id) and time.monotonic() < deadline:
                time.sleep(0.25)
            with Session(engine) as s:
                jobs = list(s.scalars(select(Job).where(Job.sae_id == sae_id)))
                statuses = Counter(j.status for j in jobs)
                assert statuses == {"done": JOBS_PER_SEED}, (seed, dict(statuses), _failures(engine, sae_id))
                per_feature = Counter(s.scalars(select(Explanation.feature_id).join(Feature).where(
                    Feature.sae_id == sae_id)))
                assert len(per_feature) == JOBS_PER_SEED and set(per_feature.values()) == {1}, seed  # none duplicated
                stored = set(s.scalars(select(Explanation.id).join(Feature).where(Feature.sae_id == sae_id)))
                assert {j.result["explanation_id"] for j in jobs} == stored, seed  # each job's one result
                retried += sum(j.attempts > 1 for j in jobs)
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
    assert killed >= 4 and frozen >= 2, (killed, frozen)
    with Session(engine) as s:
        orphans = s.scalar(select(func.count()).select_from(Judgement).where(
            Judgement.explanation_id.not_in(select(Explanation.id))))
    assert orphans == 0
    assert retried > 0  # the faults did hit jobs in flight
