"""The auto-interp job queue: a table in the store, claimed by workers with leases (app.leases).

- enqueue: one job per (feature, kind) while it is live (queued or running), enforced by a partial
  unique index; bulk enqueue is INSERT ... SELECT ... ON CONFLICT DO NOTHING in chunks.
- claim, heartbeat, fail, release: the shared lease machinery in app.leases, re-exported here.
- `finish` marks a job done inside the caller's transaction, so results commit together with the
  completion or not at all.
- cancel works on queued and running jobs (a running job's worker notices at its next heartbeat);
  cancelling a job that has ended is a Conflict (409).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, and_, exists, func, insert, literal, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from store.errors import AtlasError, Conflict, NotFound
from app.leases import (  # noqa: F401  (re-exported: the queue's public surface)
    BACKOFF_BASE_S,
    BACKOFF_MAX_S,
    KIND_EXPLAIN,
    backoff_s,
    claim,
    fail,
    heartbeat,
    owned,
    release,
    requeue_expired,
    retry_busy,
    write,
)
from store.models import (
    LIVE_JOB_STATUSES,
    SAE,
    Feature,
    Job,
    JobStatus,
    SAEStatus,
    UTCDateTime,
    utcnow,
)
from store.settings import get_settings

# Results keys that name a host and process (the worker id): kept in the store, never served.
PRIVATE_RESULT_KEYS = frozenset(("worker",))


def job_dict(job: Job) -> dict:
    """A job as the API and pages show it: no worker host names or process ids (the lease owner
    and the result's worker), only whether the job is leased."""
    result = job.result
    if isinstance(result, dict):
        result = {k: v for k, v in result.items() if k not in PRIVATE_RESULT_KEYS}
    return {
        "id": job.id, "kind": job.kind, "sae_id": job.sae_id, "feature_id": job.feature_id, "status": job.status,
        "priority": job.priority, "attempts": job.attempts, "max_attempts": job.max_attempts, "params": job.params,
        "error": job.error, "result": result, "requested_by": job.requested_by,
        "leased": job.lease_owner is not None,
        "run_after": _iso(job.run_after), "lease_expires_at": _iso(job.lease_expires_at),
        "created_at": _iso(job.created_at), "started_at": _iso(job.started_at), "finished_at": _iso(job.finished_at),
    }


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat() if dt else None


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


# Indices per INSERT: far below PostgreSQL's 65,535 bind parameters (and SQLite's 32,766).
ENQUEUE_CHUNK = 5000


def _insert(session: Session):
    """INSERT ... ON CONFLICT DO NOTHING for this backend: a job that another request queued for
    the same feature meanwhile (the partial unique index on live jobs) is skipped, not an error."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(Job)
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(Job)
    return insert(Job)


def enqueue_for_sae(session: Session, sae_name: str, indices: list[int] | None = None, density_min: float | None = None,
                    density_max: float | None = None, priority: int = 0, limit: int | None = None,
                    requested_by: str | None = None, kind: str = KIND_EXPLAIN) -> tuple[int, int]:
    """Bulk enqueue; returns (created, skipped because a live job exists).

    One INSERT ... SELECT per chunk of ENQUEUE_CHUNK indices (one in all for a density range),
    each ON CONFLICT DO NOTHING, so concurrent bulk requests for the same latents never fail: the
    later one waits for the earlier one's commit and skips what it queued. Chunks go in ascending
    index order, so two requests lock rows in the same order and cannot deadlock."""
    sae = session.scalar(select(SAE).where(SAE.name == sae_name, SAE.status == SAEStatus.ready.value))
    if sae is None:
        raise NotFound(f"no SAE named {sae_name!r}")
    if indices is not None:
        bad = [i for i in indices if not 0 <= i < sae.d_sae]
        if bad:
            raise AtlasError(f"latent indices {bad[:5]} are out of range 0..{sae.d_sae - 1}")
    if limit is not None and limit <= 0:
        raise AtlasError("limit must be positive")
    base = [Feature.sae_id == sae.id]
    if density_min is not None:
        base.append(Feature.density >= density_min)
    if density_max is not None:
        base.append(Feature.density <= density_max)
    if indices is None:
        chunks: list[list[int] | None] = [None]
    else:
        wanted_indices = sorted(set(indices))
        chunks = [wanted_indices[i:i + ENQUEUE_CHUNK] for i in range(0, len(wanted_indices), ENQUEUE_CHUNK)]
    live = exists().where(Job.feature_id == Feature.id, Job.kind == kind, Job.status.in_(LIVE_JOB_STATUSES))
    now = utcnow()
    columns = ["kind", "sae_id", "feature_id", "status", "priority", "attempts", "max_attempts", "params", "run_after",
               "created_at", "requested_by"]
    values = (literal(kind), Feature.sae_id, Feature.id, literal(JobStatus.queued.value), literal(priority), literal(0),
              literal(get_settings().job_max_attempts), literal({}, JSON), literal(now, UTCDateTime()),
              literal(now, UTCDateTime()), literal(requested_by))
    created = matching = 0
    for chunk in chunks:
        conds = base if chunk is None else [*base, Feature.index.in_(chunk)]
        matching += session.scalar(select(func.count()).select_from(Feature).where(and_(*conds))) or 0
        if limit is not None and created >= limit:
            continue
        pick = select(*values).where(and_(*conds)).order_by(Feature.index)
        if limit is not None:
            # A limit counts new jobs, so latents that already have one are left out before it.
            # (Without a limit, ON CONFLICT alone skips them: a NOT EXISTS over jobs that this
            # transaction's earlier chunks just wrote, which have no statistics yet, can be
            # planned as a scan per latent.)
            pick = pick.where(~live).limit(limit - created)
        stmt = _insert(session).from_select(columns, pick)
        if hasattr(stmt, "on_conflict_do_nothing"):
            stmt = stmt.on_conflict_do_nothing()
        # Without preserve_rowcount, psycopg reports -1 for INSERT ... SELECT.
        created += session.execute(stmt, execution_options={"preserve_rowcount": True}).rowcount or 0
    wanted = min(matching, limit) if limit is not None else matching
    return created, max(0, wanted - created)


def complete(session: Session, job_id: int, worker_id: str, result: dict | None = None) -> bool:
    return write(session, update(Job).where(owned(job_id, worker_id)).values(
        status=JobStatus.done.value, result=result or {}, finished_at=utcnow(), lease_owner=None,
        lease_expires_at=None, error=None))



def finish(session: Session, job_id: int, worker_id: str, result: dict | None = None) -> bool:
    """Mark our job done inside the caller's transaction (no commit), so that a job's results and
    its completion commit together or not at all: False means the job is no longer ours (its lease
    expired and another worker may have it, or it was cancelled) and the caller must roll back."""
    n = session.execute(update(Job).where(owned(job_id, worker_id)).values(
        status=JobStatus.done.value, result=result or {}, finished_at=utcnow(), lease_owner=None,
        lease_expires_at=None, error=None)).rowcount
    return bool(n)



def cancel_job(session: Session, job_id: int) -> Job:
    """Cancel a queued or running job (the caller commits). Conflict (409) when it has already
    ended, including when it ends between our read and the conditional update."""
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    n = session.execute(update(Job).where(Job.id == job_id, Job.status.in_(LIVE_JOB_STATUSES)).values(
        status=JobStatus.cancelled.value, finished_at=utcnow(), lease_owner=None, lease_expires_at=None)).rowcount
    session.flush()
    session.refresh(job)
    if not n:
        raise Conflict(f"job {job_id} is already {job.status}", "only queued or running jobs can be cancelled")
    return job


def counts(session: Session) -> dict[str, int]:
    return {k: int(v) for k, v in session.execute(select(Job.status, func.count()).group_by(Job.status))}
