"""Auto-interp jobs as the pages list them."""

from __future__ import annotations

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from store.models import SAE, Feature, Job


def job_counts(session: Session) -> dict[str, int]:
    return {k: int(v) for k, v in session.execute(select(Job.status, func.count()).group_by(Job.status)).all()}


def recent_jobs(session: Session, limit: int = 50, status: str | None = None,
                sae_id: int | None = None, offset: int = 0) -> list[tuple[Job, str, int]]:
    """(job, SAE name, latent index), newest first."""
    q = (select(Job, SAE.name, Feature.index).join(SAE, Job.sae_id == SAE.id).join(Feature, Job.feature_id == Feature.id)
         .order_by(Job.id.desc()).limit(limit).offset(offset))
    if status:
        q = q.where(Job.status == status)
    if sae_id:
        q = q.where(Job.sae_id == sae_id)
    return [tuple(r) for r in session.execute(q)]


def count_jobs(session: Session, status: str | None = None, sae_id: int | None = None) -> int:
    q = select(func.count()).select_from(Job)
    if status:
        q = q.where(Job.status == status)
    if sae_id:
        q = q.where(Job.sae_id == sae_id)
    return int(session.scalar(q) or 0)


def live_job_for(session: Session, feature_id: int) -> Job | None:
    return session.scalar(select(Job).where(Job.feature_id == feature_id, or_(Job.status == "queued", Job.status == "running"))
                          .order_by(Job.id.desc()).limit(1))
