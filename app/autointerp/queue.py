"""The auto-interp job queue: a table in the store, claimed by workers with leases.

- enqueue: one job per (feature, kind) while it is live (queued or running), enforced by a partial
  unique index; bulk enqueue is one INSERT ... SELECT.
- claim: PostgreSQL uses `SELECT ... FOR UPDATE SKIP LOCKED` inside an UPDATE ... RETURNING, so
  many workers on many machines never take the same row; SQLite runs one atomic
  `UPDATE ... WHERE id IN (SELECT ...) RETURNING` (SQLite serialises writers).
- leases: a claimed job carries lease_owner and lease_expires_at; heartbeats extend it; a job
  whose lease expires (its worker died) goes back to the queue. Every later state change is
  conditional on (status = running, lease_owner = me), and `finish` marks a job done inside the
  caller's transaction, so results commit together with the completion or not at all.
- the same claim, lease expiry, fail and release code serves training runs (app.models.
  TrainingRun has the same queue columns): pass `model=TrainingRun`. A run's heartbeat carries its
  progress and metrics in the same conditional UPDATE (app.runs.worker).
- failures retry with exponential backoff and jitter up to max_attempts, then the job is
  `failed` with its error kept; cancel works on queued and running jobs (a running job's worker
  notices at its next heartbeat).
"""

from __future__ import annotations

import random
import time
from datetime import datetime, timedelta

from sqlalchemy import JSON, and_, exists, func, insert, literal, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from app.errors import AtlasError, NotFound
from app.models import LIVE_JOB_STATUSES, SAE, Feature, Job, JobStatus, SAEStatus, TrainingRun, UTCDateTime, utcnow
from app.settings import get_settings

KIND_EXPLAIN = "explain"
BACKOFF_BASE_S = 15.0
BACKOFF_MAX_S = 600.0


def job_dict(job: Job) -> dict:
    return {
        "id": job.id, "kind": job.kind, "sae_id": job.sae_id, "feature_id": job.feature_id, "status": job.status,
        "priority": job.priority, "attempts": job.attempts, "max_attempts": job.max_attempts, "params": job.params,
        "error": job.error, "result": job.result, "requested_by": job.requested_by,
        "lease_owner": job.lease_owner,
        "run_after": _iso(job.run_after), "lease_expires_at": _iso(job.lease_expires_at),
        "created_at": _iso(job.created_at), "started_at": _iso(job.started_at), "finished_at": _iso(job.finished_at),
    }


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat() if dt else None


def _retry_busy(fn, attempts: int = 20):
    """SQLite answers 'database is locked' when two writers race; retrying is correct there."""
    for i in range(attempts):
        try:
            return fn()
        except OperationalError as exc:
            if "locked" not in str(exc).lower() or i == attempts - 1:
                raise
            time.sleep(0.02 * (i + 1) + random.random() * 0.02)


# --- enqueue ----------------------------------------------------------------------------------

def live_job(session: Session, feature_id: int, kind: str = KIND_EXPLAIN) -> Job | None:
    return session.scalar(select(Job).where(Job.feature_id == feature_id, Job.kind == kind,
                                            Job.status.in_(LIVE_JOB_STATUSES)))


def enqueue(session: Session, sae: SAE, feature: Feature, priority: int = 0, requested_by: str | None = None,
            params: dict | None = None, kind: str = KIND_EXPLAIN) -> tuple[Job, bool]:
    """Queue a job for one feature; returns (job, created). An existing live job is returned as is."""
    existing = live_job(session, feature.id, kind)
    if existing is not None:
        return existing, False
    job = Job(kind=kind, sae_id=sae.id, feature_id=feature.id, priority=priority, requested_by=requested_by,
              params=params or {}, max_attempts=get_settings().job_max_attempts, status=JobStatus.queued.value)
    try:
        with session.begin_nested():
            session.add(job)
    except IntegrityError:  # another request queued it between our check and insert
        existing = live_job(session, feature.id, kind)
        if existing is None:
            raise
        return existing, False
    return job, True


def enqueue_for_sae(session: Session, sae_name: str, indices: list[int] | None = None, density_min: float | None = None,
                    density_max: float | None = None, priority: int = 0, limit: int | None = None,
                    requested_by: str | None = None, kind: str = KIND_EXPLAIN) -> tuple[int, int]:
    """Bulk enqueue (one statement); returns (created, skipped because a live job exists)."""
    sae = session.scalar(select(SAE).where(SAE.name == sae_name, SAE.status == SAEStatus.ready.value))
    if sae is None:
        raise NotFound(f"no SAE named {sae_name!r}")
    if indices is not None:
        bad = [i for i in indices if not 0 <= i < sae.d_sae]
        if bad:
            raise AtlasError(f"latent indices {bad[:5]} are out of range 0..{sae.d_sae - 1}")
    if limit is not None and limit <= 0:
        raise AtlasError("limit must be positive")
    conds = [Feature.sae_id == sae.id]
    if indices is not None:
        conds.append(Feature.index.in_(indices))
    if density_min is not None:
        conds.append(Feature.density >= density_min)
    if density_max is not None:
        conds.append(Feature.density <= density_max)
    live = exists().where(Job.feature_id == Feature.id, Job.kind == kind, Job.status.in_(LIVE_JOB_STATUSES))
    matching = session.scalar(select(func.count()).select_from(Feature).where(and_(*conds)))
    now = utcnow()
    pick = (select(literal(kind), Feature.sae_id, Feature.id, literal(JobStatus.queued.value), literal(priority),
                   literal(0), literal(get_settings().job_max_attempts), literal({}, JSON), literal(now, UTCDateTime()),
                   literal(now, UTCDateTime()),
                   literal(requested_by))
            .where(and_(*conds), ~live).order_by(Feature.index))
    if limit is not None:
        pick = pick.limit(limit)
    stmt = insert(Job).from_select(["kind", "sae_id", "feature_id", "status", "priority", "attempts", "max_attempts",
                                    "params", "run_after", "created_at", "requested_by"], pick)
    # Without preserve_rowcount, psycopg reports -1 for INSERT ... SELECT.
    created = session.execute(stmt, execution_options={"preserve_rowcount": True}).rowcount or 0
    wanted = min(matching, limit) if limit is not None else matching
    return created, max(0, wanted - created)


# --- claiming and leases ----------------------------------------------------------------------

def requeue_expired(session: Session, now: datetime | None = None, model=Job) -> int:
    """Jobs whose worker stopped heartbeating go back to the queue (or fail after max_attempts).

    On PostgreSQL the rows are picked with SKIP LOCKED, so workers sweeping at the same moment
    never wait on (or deadlock over) each other's rows; whoever locks a row first requeues it.
    """
    now = now or utcnow()
    M = model
    expired = and_(M.status == JobStatus.running.value, M.lease_expires_at < now)

    def pick(cond):
        ids = select(M.id).where(cond)
        if session.get_bind().dialect.name == "postgresql":
            ids = ids.with_for_update(skip_locked=True)
        return M.id.in_(ids.scalar_subquery())

    failed = session.execute(update(M).where(pick(and_(expired, M.attempts >= M.max_attempts))).values(
        status=JobStatus.failed.value, finished_at=now, lease_owner=None, lease_expires_at=None,
        error=func.coalesce(M.error + "; ", "") + "lease expired: the worker stopped responding")).rowcount
    back = session.execute(update(M).where(pick(expired)).values(
        status=JobStatus.queued.value, lease_owner=None, lease_expires_at=None, run_after=now)).rowcount
    return (failed or 0) + (back or 0)


def claim(session: Session, worker_id: str, limit: int = 1, lease_s: float | None = None,
          kinds: tuple[str, ...] = (KIND_EXPLAIN,), model=Job, where=()) -> list:
    """Take up to `limit` runnable rows for this worker, highest priority first. Commits.

    model: Job (filtered by `kinds`) or TrainingRun; where: extra conditions on the rows."""
    lease_s = lease_s or get_settings().job_lease_s
    M = model
    conds = [M.status == JobStatus.queued.value, *where]
    if M is Job:
        conds.append(Job.kind.in_(kinds))

    def attempt() -> list:
        now = utcnow()
        try:
            requeue_expired(session, now, M)
            ready = (select(M.id).where(M.run_after <= now, *conds)
                     .order_by(M.priority.desc(), M.id).limit(limit))
            if session.get_bind().dialect.name == "postgresql":
                ready = ready.with_for_update(skip_locked=True)
            stmt = (update(M).where(M.id.in_(ready.scalar_subquery()))
                    .values(status=JobStatus.running.value, lease_owner=worker_id,
                            lease_expires_at=now + timedelta(seconds=lease_s), heartbeat_at=now,
                            attempts=M.attempts + 1, started_at=now)
                    .returning(M.id))
            ids = [row[0] for row in session.execute(stmt)]
            session.commit()
        except BaseException:
            session.rollback()
            raise
        if not ids:
            return []
        return list(session.scalars(select(M).where(M.id.in_(ids)).order_by(M.priority.desc(), M.id)
                                    .execution_options(populate_existing=True)))

    return _retry_busy(attempt)


def _owned(job_id: int, worker_id: str, model=Job):
    return and_(model.id == job_id, model.status == JobStatus.running.value, model.lease_owner == worker_id)


def _write(session: Session, stmt) -> bool:
    def attempt():
        try:
            n = session.execute(stmt).rowcount
            session.commit()
            return bool(n)
        except BaseException:
            session.rollback()
            raise
    return _retry_busy(attempt)


def heartbeat(session: Session, job_id: int, worker_id: str, lease_s: float | None = None) -> bool:
    """Extend the lease; False means the job is no longer ours (expired, cancelled or re-leased)."""
    lease_s = lease_s or get_settings().job_lease_s
    now = utcnow()
    return _write(session, update(Job).where(_owned(job_id, worker_id)).values(
        heartbeat_at=now, lease_expires_at=now + timedelta(seconds=lease_s)))


def complete(session: Session, job_id: int, worker_id: str, result: dict | None = None) -> bool:
    return _write(session, update(Job).where(_owned(job_id, worker_id)).values(
        status=JobStatus.done.value, result=result or {}, finished_at=utcnow(), lease_owner=None,
        lease_expires_at=None, error=None))


def finish(session: Session, job_id: int, worker_id: str, result: dict | None = None) -> bool:
    """Mark our job done inside the caller's transaction (no commit), so that a job's results and
    its completion commit together or not at all: False means the job is no longer ours (its lease
    expired and another worker may have it, or it was cancelled) and the caller must roll back."""
    n = session.execute(update(Job).where(_owned(job_id, worker_id)).values(
        status=JobStatus.done.value, result=result or {}, finished_at=utcnow(), lease_owner=None,
        lease_expires_at=None, error=None)).rowcount
    return bool(n)


def backoff_s(attempts: int) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(0.5, 1.0) * min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** max(0, attempts - 1))


def fail(session: Session, job, worker_id: str, error: str, retryable: bool = True) -> str:
    """Record a failure: back to the queue after a backoff, or `failed` when out of attempts.
    `job` is a Job (or any object with its id, attempts and max_attempts) or a TrainingRun."""
    now = utcnow()
    error = error[:4000]
    M = TrainingRun if isinstance(job, TrainingRun) else Job
    if retryable and job.attempts < job.max_attempts:
        ok = _write(session, update(M).where(_owned(job.id, worker_id, M)).values(
            status=JobStatus.queued.value, error=error, lease_owner=None, lease_expires_at=None,
            run_after=now + timedelta(seconds=backoff_s(job.attempts))))
        return JobStatus.queued.value if ok else "lost"
    ok = _write(session, update(M).where(_owned(job.id, worker_id, M)).values(
        status=JobStatus.failed.value, error=error, finished_at=now, lease_owner=None, lease_expires_at=None))
    return JobStatus.failed.value if ok else "lost"


def release(session: Session, job_id: int, worker_id: str, model=Job) -> bool:
    """Give a row back untouched (worker shutting down): the attempt does not count."""
    return _write(session, update(model).where(_owned(job_id, worker_id, model)).values(
        status=JobStatus.queued.value, lease_owner=None, lease_expires_at=None, run_after=utcnow(),
        attempts=model.attempts - 1))


def cancel_job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    if job.status not in LIVE_JOB_STATUSES:
        raise AtlasError(f"job {job_id} is already {job.status}", "only queued or running jobs can be cancelled")
    session.execute(update(Job).where(Job.id == job_id, Job.status.in_(LIVE_JOB_STATUSES)).values(
        status=JobStatus.cancelled.value, finished_at=utcnow(), lease_owner=None, lease_expires_at=None))
    session.flush()
    session.refresh(job)
    return job


def counts(session: Session) -> dict[str, int]:
    return {k: int(v) for k, v in session.execute(select(Job.status, func.count()).group_by(Job.status))}
