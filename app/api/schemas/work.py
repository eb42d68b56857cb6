"""Queued work: auto-interp jobs and training runs with their metrics."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from app.api.schemas.common import Page


class JobOut(BaseModel):
    id: int
    kind: str
    sae_id: int
    feature_id: int
    status: str
    priority: int
    attempts: int
    max_attempts: int
    params: dict[str, Any] | None
    error: str | None
    result: dict[str, Any] | None
    requested_by: str | None
    leased: bool = Field(description="whether a worker holds the job now")
    run_after: str | None
    lease_expires_at: str | None
    created_at: str | None
    started_at: str | None
    finished_at: str | None


class JobListItem(JobOut):
    sae: str
    index: int


class JobPage(Page[JobListItem]):
    counts: dict[str, int] = Field(description="jobs by status, over the whole queue")


class JobsCreated(BaseModel):
    created: int
    skipped: int | None = None
    job: JobOut | None = None


# --- runs -----------------------------------------------------------------------------------------

class RunSAE(BaseModel):
    id: int
    name: str
    site: str
    architecture: str
    d_sae: int
    k: int | None
    metrics: dict[str, Any]
    url: str


class RunOut(BaseModel):
    id: int
    name: str
    status: str
    phase: str | None
    progress: float
    step: int
    total_steps: int
    gpus: int
    priority: int
    attempts: int
    max_attempts: int
    resumed_from_step: int | None
    error: str | None
    requested_by: str | None
    leased: bool = Field(description="whether a trainer worker holds the run now")
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    heartbeat_at: str | None
    latest: dict[str, Any]
    spec: dict[str, Any] = Field(description="the run's config; local paths relative to their roots")


class RunDetail(RunOut):
    saes: list[RunSAE]
    log_tail: str


class RunPage(Page[RunOut]):
    counts: dict[str, int]


class MetricPoint(BaseModel):
    step: int
    tokens: int
    loss: float | None
    fvu: float | None
    l0: float | None
    dead_frac: float | None
    lr: float | None
    elapsed_s: float | None
    attempt: int


class RunMetrics(BaseModel):
    run_id: int
    saes: dict[str, list[MetricPoint]]
