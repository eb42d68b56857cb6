"""Auto-interp jobs: enqueue (needs an API key), read, cancel."""

from typing import Literal

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, Field, model_validator
from sqlalchemy.orm import Session

import store
from app.api_error import ApiError
from app.api.schemas import READ_ERRORS, WRITE_ERRORS, JobOut, JobPage, JobsCreated, PageParams
from app.autointerp import queue
from app.deps import KeyFirstRoute, get_session, read_access, write_access
from store.models import APIKey, Job
from app.responses import JSON

router = APIRouter(prefix="/jobs", tags=["jobs"], route_class=KeyFirstRoute)

JobId = Path(ge=1, le=2**62)


class JobRequest(BaseModel):
    """Explain one latent (`index`), a list (`indices`), or every latent in a density range."""

    model_config = {"extra": "forbid"}

    sae: str = Field(min_length=1, max_length=200)
    index: int | None = Field(None, ge=0)
    indices: list[int] | None = Field(None, min_length=1, max_length=100_000)
    density_min: float | None = Field(None, ge=0, le=1)
    density_max: float | None = Field(None, ge=0, le=1)
    limit: int | None = Field(None, ge=1, le=10_000_000)
    priority: int = Field(0, ge=-1000, le=1000)
    kind: Literal["explain"] = "explain"

    @model_validator(mode="after")
    def _one_target(self):
        if self.index is not None and self.indices is not None:
            raise ValueError("give index or indices, not both")
        if self.density_min is not None and self.density_max is not None and self.density_min > self.density_max:
            raise ValueError("density_min must not exceed density_max")
        return self


@router.post("", status_code=201, summary="Queue explanation jobs (needs a write key)", response_model=JobsCreated,
             responses={200: {"model": JobsCreated, "description": "Nothing new: every latent already had a live job"},
                        **WRITE_ERRORS})
def create_jobs(req: JobRequest, key: APIKey = Depends(write_access), session: Session = Depends(get_session)):
    sae = store.sae_by_name(session, req.sae)
    if req.index is not None:
        feature = store.feature_by_index(session, sae, req.index)
        job, created = queue.enqueue(session, sae, feature, priority=req.priority, requested_by=key.name)
        session.commit()
        return JSON({"created": int(created), "job": queue.job_dict(job)}, status_code=201 if created else 200)
    if req.indices is not None:
        bad = [i for i in req.indices if not 0 <= i < sae.d_sae]
        if bad:
            raise ApiError(404, "not_found", f"latents {bad[:5]} are out of range 0..{sae.d_sae - 1}")
    created, skipped = queue.enqueue_for_sae(session, sae.name, indices=req.indices, density_min=req.density_min,
                                             density_max=req.density_max, priority=req.priority, limit=req.limit,
                                             requested_by=key.name)
    session.commit()
    return JSON({"created": created, "skipped": skipped}, status_code=201 if created else 200)


@router.get("", summary="List jobs, newest first", dependencies=[Depends(read_access)], response_model=JobPage,
            responses=READ_ERRORS)
def list_jobs(status: Literal["queued", "running", "done", "failed", "cancelled"] | None = None,
              sae: str | None = Query(None, max_length=200), pages: PageParams = Depends(),
              session: Session = Depends(get_session)):
    sae_id = store.sae_by_name(session, sae).id if sae else None
    jobs = store.recent_jobs(session, pages.per_page, status, sae_id, pages.offset)
    total = store.count_jobs(session, status, sae_id)
    items = [{**queue.job_dict(j), "sae": name, "index": index} for j, name, index in jobs]
    return JSON(pages.body(items, total, counts=store.job_counts(session)))


@router.get("/{job_id}", summary="One job", dependencies=[Depends(read_access)], response_model=JobOut,
            responses=READ_ERRORS)
def get_job(job_id: int = JobId, session: Session = Depends(get_session)):
    job = session.get(Job, job_id)
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id}")
    return JSON(queue.job_dict(job))


@router.post("/{job_id}/cancel", summary="Cancel a queued or running job (needs a write key)", response_model=JobOut,
             responses=WRITE_ERRORS)
def cancel(job_id: int = JobId, key: APIKey = Depends(write_access), session: Session = Depends(get_session)):
    """409 when the job has already ended (done, failed or cancelled), also when it ends while
    the cancel is under way."""
    job = queue.cancel_job(session, job_id)  # NotFound -> 404, Conflict -> 409
    session.commit()
    return JSON(queue.job_dict(job))
