"""The queue at scale: the claim reads its index instead of sorting the queue, deletes find jobs by
feature, bulk enqueue survives 100k indices and concurrent requests, cancels of ended jobs are 409.

The plans are read with EXPLAIN on both backends after ANALYZE, from the exact statement that
app.leases.claim executes (claim_statement)."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from app import leases
from app.autointerp import queue
from tests.synthetic_sae import make_synthetic_sae
from store.errors import Conflict
from store.models import Job, TrainingRun, utcnow


def _queue_of(engine, n: int, name: str = "scale") -> None:
    """n queued jobs of mixed priority, and as many finished ones, with fresh statistics."""
    make_synthetic_sae(engine, name=name, n_features=2 * n, examples_per_feature=0)
    with Session(engine) as s, s.begin():
        queue.enqueue_for_sae(s, name)
        s.execute(update(Job).where(Job.id % 7 == 0).values(priority=10))
        s.execute(update(Job).where(Job.id % 2 == 0).values(status="done", finished_at=utcnow()))
    _analyze(engine)


def _wide_sae(engine, name: str, n: int) -> None:
    """An SAE of n bare latents, written by the server itself (generate_series): seconds, not minutes."""
    sae_id = make_synthetic_sae(engine, name=name, n_features=1, examples_per_feature=0)
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO features (sae_id, index, firing_count, density, mean_act, max_act, moments, act_hist, "
            "interval_shares, logits, neighbors, peak_token_share) SELECT :sid, g, 1, 0.001, 1, 1, '{}', '{}', '[]', "
            "'{}', '[]', 0 FROM generate_series(1, :last) AS g"), {"sid": sae_id, "last": n - 1})
        conn.execute(text("UPDATE saes SET d_sae = :n WHERE id = :sid"), {"n": n, "sid": sae_id})
    _analyze(engine)


def _analyze(engine) -> None:
    """Fresh planner statistics, as autovacuum keeps them after a bulk load."""
    with engine.connect() as conn:
        conn.execute(text("ANALYZE"))
        conn.commit()


def _plan(engine, stmt) -> str:
    with engine.connect() as conn:
        compiled = stmt.compile(engine, compile_kwargs={"literal_binds": True})
        if engine.dialect.name == "sqlite":
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + str(compiled)).all()
            return "\n".join(str(r[-1]) for r in rows)
        rows = conn.exec_driver_sql("EXPLAIN " + str(compiled)).all()
        conn.rollback()
        return "\n".join(r[0] for r in rows)


@pytest.mark.parametrize("model", [Job, TrainingRun])
def test_the_claim_reads_the_claim_index_in_order(engine, model):
    if model is Job:
        _queue_of(engine, 3000)
    with Session(engine) as s:
        conds = [Job.kind.in_(("explain",))] if model is Job else [TrainingRun.gpus <= 1]
        stmt = leases.claim_statement(s, "w", utcnow(), 1, 60.0, model, conds)
        plan = _plan(engine, stmt)
    index = "ix_jobs_claim" if model is Job else "ix_runs_claim"
    assert index in plan, plan
    if engine.dialect.name == "sqlite":
        assert "TEMP B-TREE" not in plan, plan  # no sort of the queue
    else:
        assert f"Index Scan using {index}" in plan and "Sort" not in plan, plan


def test_deleting_features_and_expiring_leases_use_their_indexes(engine):
    _queue_of(engine, 500, name="del")
    plan = _plan(engine, select(Job.id).where(Job.feature_id == 17))
    assert "ix_jobs_feature_id" in plan, plan
    # the subquery of leases.requeue_expired, which every claim runs first
    plan = _plan(engine, select(Job.id).where(Job.status == "running", Job.lease_expires_at < utcnow()))
    if engine.dialect.name == "sqlite":  # its statistics see one status value: the lease index it is
        assert "ix_jobs_lease_expires_at" in plan, plan
    else:  # PostgreSQL knows how few jobs run; either index reads only those
        assert "Seq Scan" not in plan and ("ix_jobs_lease_expires_at" in plan or "'running'" in plan), plan


@pytest.mark.parametrize("engine", ["postgres"], indirect=True)
def test_bulk_enqueue_of_100k_indices_through_the_api(engine):
    """100,000 indices (the most a request may name) in one POST: more than PostgreSQL's 65,535
    bind parameters in one statement, so the enqueue must be chunked."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.security import create_key

    n = 100_000
    _wide_sae(engine, "wide", n)
    with Session(engine) as s, s.begin():
        key = create_key(s, "bulk")
    auth = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(engine=engine)) as c:
        r = c.post("/api/v1/jobs", json={"sae": "wide", "indices": list(range(n))[::-1]}, headers=auth)
        assert r.status_code == 201 and r.json() == {"created": n, "skipped": 0}, r.text[:300]
        _analyze(engine)
        r = c.post("/api/v1/jobs", json={"sae": "wide", "indices": list(range(n))}, headers=auth)
        assert r.status_code == 200 and r.json() == {"created": 0, "skipped": n}
    with Session(engine) as s:
        assert s.scalar(select(func.count(func.distinct(Job.feature_id)))) == n


@pytest.mark.parametrize("engine", ["postgres"], indirect=True)
def test_concurrent_bulk_enqueues_of_the_same_latents_never_fail(engine):
    """The second request's INSERT waits on the first one's uncommitted rows (checked in
    pg_stat_activity, not by sleeping), then skips them instead of failing."""
    make_synthetic_sae(engine, name="race", n_features=300, examples_per_feature=0)
    indices = list(range(300))
    first = Session(engine)
    first.begin()
    assert queue.enqueue_for_sae(first, "race", indices=indices) == (300, 0)  # not committed yet
    outcome: dict = {}

    def second():
        try:
            with Session(engine) as s, s.begin():
                outcome["result"] = queue.enqueue_for_sae(s, "race", indices=indices[::-1])
        except Exception as exc:  # noqa: BLE001 (the test reports it)
            outcome["error"] = exc

    t = threading.Thread(target=second)
    t.start()
    deadline = time.monotonic() + 60
    with engine.connect() as probe:
        while time.monotonic() < deadline:
            waiting = probe.execute(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                         "AND query LIKE 'INSERT INTO jobs%'")).scalar()
            probe.rollback()
            if waiting:
                break
            time.sleep(0.02)
        else:
            raise AssertionError("the second bulk enqueue never waited on the first")
    first.commit()
    first.close()
    t.join(timeout=60)
    assert "error" not in outcome, outcome
    assert outcome["result"] == (0, 300)
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 300


def test_cancelling_a_job_that_ended_meanwhile_is_a_conflict(engine):
    make_synthetic_sae(engine, name="c", n_features=3, examples_per_feature=0)
    with Session(engine) as s, s.begin():
        queue.enqueue_for_sae(s, "c")
    with Session(engine) as reader:
        job = reader.scalars(select(Job).order_by(Job.id)).first()
        job_id = job.id
        assert job.status == "queued"  # what the cancelling request read
        with Session(engine) as worker, worker.begin():  # a worker finishes it meanwhile
            worker.execute(update(Job).where(Job.id == job_id).values(status="done"))
        with pytest.raises(Conflict, match="already done"):
            queue.cancel_job(reader, job_id)
        reader.rollback()
    with Session(engine) as s:
        assert s.get(Job, job_id).status == "done"
