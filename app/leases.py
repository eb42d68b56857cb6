"""Leases on queue rows: the machinery shared by every durable queue in the store.

Auto-interp jobs (store.models.Job), training runs (store.models.TrainingRun) and attribution graphs
(store.models.AttributionGraph) are rows with the same
queue columns (status, priority, run_after, attempts, max_attempts, lease_owner, lease_expires_at,
heartbeat_at); workers claim them with the functions here, passing `model=`.

- claim: PostgreSQL uses `SELECT ... FOR UPDATE SKIP LOCKED` inside an UPDATE ... RETURNING, so
  many workers on many machines never take the same row, and the sweep of expired leases rides in
  the same statement as a CTE: one statement in autocommit, one round trip per claim. SQLite runs
  the sweep, then one atomic `UPDATE ... WHERE id IN (SELECT ...) RETURNING` (SQLite serialises
  writers).
- leases: a claimed row carries lease_owner and lease_expires_at; heartbeats extend it; a row
  whose lease expires (its worker died) goes back to the queue, and counts as an attempt. Every
  later state change is conditional on (status = running, lease_owner = me): `owned()`.
- failures retry with exponential backoff and jitter up to max_attempts, then the row is
  `failed` with its error kept; `release` gives a row back without counting the attempt.
"""

from __future__ import annotations

import random
import time
from datetime import datetime, timedelta

from sqlalchemy import and_, bindparam, case, func, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from store.models import AttributionGraph, Job, JobStatus, TrainingRun, UTCDateTime, utcnow
from store.settings import get_settings

KIND_EXPLAIN = "explain"
BACKOFF_BASE_S = 15.0
BACKOFF_MAX_S = 600.0


def retry_busy(fn, attempts: int = 20):
    """SQLite answers 'database is locked' when two writers race; retrying is correct there."""
    for i in range(attempts):
        try:
            return fn()
        except OperationalError as exc:
            if "locked" not in str(exc).lower() or i == attempts - 1:
                raise
            time.sleep(0.02 * (i + 1) + random.random() * 0.02)


# Statements built once per (dialect, model, ...) with bound parameters: building SQLAlchemy
# expressions anew on every claim cost more Python time than the database spends on the claim.
_STATEMENTS: dict[tuple, object] = {}
_PLAIN = {"synchronize_session": False}  # nothing in the session needs these rows refreshed
# a claim's RETURNING rows replace whatever the session holds of them
_RETURNING = {"synchronize_session": False, "populate_existing": True}


def _now_param(name: str = "p_now"):
    return bindparam(name, type_=UTCDateTime())


def _pick(dialect: str, M, cond):
    ids = select(M.id).where(cond)
    if dialect == "postgresql":
        ids = ids.with_for_update(skip_locked=True)
    return M.id.in_(ids.scalar_subquery())


def _sweep(dialect: str, M, now):
    """Expired leases (their worker stopped heartbeating), in ONE statement: back to the queue, or
    `failed` with the error kept when out of attempts. One statement, so that a row is judged once:
    with two (fail, then requeue), a row the first skipped as locked could be requeued by the second
    although out of attempts."""
    spent = M.attempts >= M.max_attempts
    expired = and_(M.status == JobStatus.running.value, M.lease_expires_at < now)
    return update(M).where(_pick(dialect, M, expired)).values(
        status=case((spent, JobStatus.failed.value), else_=JobStatus.queued.value),
        finished_at=case((spent, now), else_=M.finished_at),
        error=case((spent, func.coalesce(M.error + "; ", "") + "lease expired: the worker stopped responding"),
                   else_=M.error),
        run_after=case((spent, M.run_after), else_=now),
        lease_owner=None, lease_expires_at=None)


def requeue_expired(session: Session, now: datetime | None = None, model=Job) -> int:
    """Rows whose worker stopped heartbeating go back to the queue (or fail after max_attempts).

    On PostgreSQL the rows are picked with SKIP LOCKED, so workers sweeping at the same moment
    never wait on (or deadlock over) each other's rows; whoever locks a row first requeues it.
    (claim runs this sweep itself: inside its own statement on PostgreSQL.)
    """
    dialect = session.get_bind().dialect.name
    key = ("sweep", dialect, model)
    stmt = _STATEMENTS.get(key)
    if stmt is None:
        stmt = _STATEMENTS[key] = _sweep(dialect, model, _now_param())
    return session.execute(stmt, {"p_now": now or utcnow()}, execution_options=_PLAIN).rowcount or 0


def claim_template(dialect: str, limit: int, model=Job, conds=(), values: dict | None = None):
    """The claim as one UPDATE ... RETURNING (the whole rows) over the first `limit` runnable rows
    in claim order (priority DESC, id), with parameters p_now, p_expires and p_worker (or, given
    `values`, with those values written in). The subquery's order is the order of the ix_jobs_claim
    / ix_runs_claim index, so the database reads the first rows of the index instead of sorting the
    queue. On PostgreSQL the sweep of expired leases rides along as a CTE: a claim is one statement,
    one round trip."""
    M = model
    now = values["p_now"] if values else _now_param()
    expires = values["p_expires"] if values else _now_param("p_expires")
    worker = values["p_worker"] if values else bindparam("p_worker")
    ready = (select(M.id).where(M.status == JobStatus.queued.value, M.run_after <= now, *conds)
             .order_by(M.priority.desc(), M.id).limit(limit))
    if dialect == "postgresql":
        ready = ready.with_for_update(skip_locked=True)
    stmt = (update(M).where(M.id.in_(ready.scalar_subquery()))
            .values(status=JobStatus.running.value, lease_owner=worker,
                    lease_expires_at=expires, heartbeat_at=now,
                    attempts=M.attempts + 1, started_at=now)
            .returning(M))
    if dialect == "postgresql":
        stmt = stmt.add_cte(_sweep(dialect, M, now).cte("swept"))
    return stmt


def _claim_params(worker_id: str, now: datetime, lease_s: float) -> dict:
    return {"p_now": now, "p_expires": now + timedelta(seconds=lease_s), "p_worker": worker_id}


def claim_statement(session: Session, worker_id: str, now: datetime, limit: int, lease_s: float, model=Job,
                    conds=()):
    """What claim executes, with the values written in (tests EXPLAIN it)."""
    return claim_template(session.get_bind().dialect.name, limit, model, conds, _claim_params(worker_id, now, lease_s))


def claim(session: Session, worker_id: str, limit: int = 1, lease_s: float | None = None,
          kinds: tuple[str, ...] = (KIND_EXPLAIN,), model=Job, where=()) -> list:
    """Take up to `limit` runnable rows for this worker, highest priority first. Commits.

    model: Job (filtered by `kinds`) or TrainingRun; where: extra conditions on the rows."""
    lease_s = lease_s or get_settings().job_lease_s
    M = model
    dialect = session.get_bind().dialect.name
    conds = (Job.kind.in_(kinds),) if M is Job else ()

    def statement(n: int):
        if where:  # conditions with their own values (a trainer's free GPUs): built per call
            return claim_template(dialect, n, M, [*where, *conds])
        key = ("claim", dialect, M, tuple(kinds) if M is Job else (), n)
        stmt = _STATEMENTS.get(key)
        if stmt is None:
            stmt = _STATEMENTS[key] = claim_template(dialect, n, M, conds)
        return stmt

    def attempt() -> list:
        now = utcnow()
        params = _claim_params(worker_id, now, lease_s)
        try:
            if dialect == "postgresql" and not session.in_transaction():
                # Each statement is a whole claim: autocommit spares the BEGIN and COMMIT round trips.
                session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
            if dialect != "postgresql":
                requeue_expired(session, now, M)
            rows = list(session.scalars(statement(limit), params, execution_options=_RETURNING))
            if dialect == "postgresql" and len(rows) < limit:
                # The rows this statement's sweep requeued were invisible to its own claim (one
                # snapshot); a second statement sees them, so an expired job is taken over at once.
                rows += session.scalars(statement(limit - len(rows)), params, execution_options=_RETURNING)
            ids = [r.id for r in rows]
            session.commit()
        except BaseException:
            session.rollback()
            raise
        if session.expire_on_commit and ids:  # the commit expired what RETURNING loaded
            rows = list(session.scalars(select(M).where(M.id.in_(ids))))
        return sorted(rows, key=lambda r: (-r.priority, r.id))

    return retry_busy(attempt)


def owned(job_id: int, worker_id: str, model=Job):
    return and_(model.id == job_id, model.status == JobStatus.running.value, model.lease_owner == worker_id)


def write(session: Session, stmt) -> bool:
    def attempt():
        try:
            n = session.execute(stmt).rowcount
            session.commit()
            return bool(n)
        except BaseException:
            session.rollback()
            raise
    return retry_busy(attempt)


def heartbeat(session: Session, job_id: int, worker_id: str, lease_s: float | None = None, model=Job) -> bool:
    """Extend the lease; False means the row is no longer ours (expired, cancelled or re-leased)."""
    lease_s = lease_s or get_settings().job_lease_s
    now = utcnow()
    return write(session, update(model).where(owned(job_id, worker_id, model)).values(
        heartbeat_at=now, lease_expires_at=now + timedelta(seconds=lease_s)))


def backoff_s(attempts: int) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(0.5, 1.0) * min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** max(0, attempts - 1))


def fail(session: Session, job, worker_id: str, error: str, retryable: bool = True) -> str:
    """Record a failure: back to the queue after a backoff, or `failed` when out of attempts.
    `job` is a Job (or any object with its id, attempts and max_attempts), a TrainingRun or an
    AttributionGraph."""
    now = utcnow()
    error = error[:4000]
    M = type(job) if isinstance(job, (TrainingRun, AttributionGraph)) else Job
    if retryable and job.attempts < job.max_attempts:
        ok = write(session, update(M).where(owned(job.id, worker_id, M)).values(
            status=JobStatus.queued.value, error=error, lease_owner=None, lease_expires_at=None,
            run_after=now + timedelta(seconds=backoff_s(job.attempts))))
        return JobStatus.queued.value if ok else "lost"
    ok = write(session, update(M).where(owned(job.id, worker_id, M)).values(
        status=JobStatus.failed.value, error=error, finished_at=now, lease_owner=None, lease_expires_at=None))
    return JobStatus.failed.value if ok else "lost"


def release(session: Session, job_id: int, worker_id: str, model=Job) -> bool:
    """Give a row back untouched (worker shutting down): the attempt does not count."""
    return write(session, update(model).where(owned(job_id, worker_id, model)).values(
        status=JobStatus.queued.value, lease_owner=None, lease_expires_at=None, run_after=utcnow(),
        attempts=model.attempts - 1))
