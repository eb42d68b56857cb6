"""Work queued for workers: auto-interp jobs, training runs and their metrics, attribution graphs."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import (
    JSON,
    BigInteger,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from store.models.base import (
    Base,
    BigId,
    BigInt64,
    JobStatus,
    UTCDateTime,
    utcnow,
)

if TYPE_CHECKING:  # relationship targets in sibling modules resolve through the mapper registry
    from store.models.atlas import SAE


class Job(Base):
    """An auto-interp job: a durable queue row claimed by workers with a lease."""

    __tablename__ = "jobs"
    __table_args__ = (
        # The claim walks this index in the claim's order (status = queued, priority DESC, id) and
        # stops at the first runnable rows, instead of sorting every queued job.
        Index("ix_jobs_claim", "status", text("priority DESC"), "id"),
        Index("ix_jobs_sae_status", "sae_id", "status"),
        # Deleting or replacing an SAE deletes its features, and each feature's jobs by feature_id.
        Index("ix_jobs_feature_id", "feature_id"),
        # Every claim first looks for expired leases; only running jobs have one (NULL otherwise).
        Index("ix_jobs_lease_expires_at", "lease_expires_at"),
        # At most one live job per (feature, kind): a partial unique index on both databases.
        Index(
            "uq_jobs_live_feature_kind",
            "feature_id",
            "kind",
            unique=True,
            sqlite_where=text("status IN ('queued', 'running')"),
            postgresql_where=text("status IN ('queued', 'running')"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    kind: Mapped[str] = mapped_column(String(20), default="explain")
    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"))
    feature_id: Mapped[int] = mapped_column(ForeignKey("features.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(20), default=JobStatus.queued.value)
    priority: Mapped[int] = mapped_column(Integer, default=0, doc="higher runs first")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    run_after: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict | None] = mapped_column(JSON)
    requested_by: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class TrainingRun(Base):
    """A training run: config, status, progress and the SAEs it published.

    The row is its own queue entry: trainer workers claim it with a lease exactly as auto-interp
    workers claim jobs (same columns, same claim code in app.autointerp.queue), so a run whose
    worker dies goes back to the queue and the next worker resumes it from its checkpoint.
    """

    __tablename__ = "runs"
    __table_args__ = (
        Index("ix_runs_claim", "status", text("priority DESC"), "id"),
        Index("ix_runs_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True, doc="the published SAE's name (a sweep's prefix)")
    spec: Mapped[dict] = mapped_column(JSON, doc="the validated RunSpec: model, sites, architecture, widths, ...")
    status: Mapped[str] = mapped_column(String(20), default=JobStatus.queued.value)
    gpus: Mapped[int] = mapped_column(SmallInteger, default=1, doc="devices the run asks for (torchrun when > 1)")
    priority: Mapped[int] = mapped_column(Integer, default=0, doc="higher runs first")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    run_after: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    phase: Mapped[str | None] = mapped_column(String(20), doc="train, evaluate, analyze or publish while running")
    progress: Mapped[float] = mapped_column(Float, default=0.0, doc="0..1 over the whole pipeline")
    # int64: tokens / batch_size passes 2**31 for long runs with small batches.
    step: Mapped[int] = mapped_column(BigInt64, default=0)
    total_steps: Mapped[int] = mapped_column(BigInt64, default=0)
    resumed_from_step: Mapped[int | None] = mapped_column(BigInt64, doc="checkpoint step the latest attempt resumed from")
    latest: Mapped[dict] = mapped_column(JSON, default=dict, doc="the newest metrics record of each SAE")
    log_tail: Mapped[str] = mapped_column(Text, default="")
    log_offsets: Mapped[dict] = mapped_column(JSON, default=dict, doc="bytes of each metrics log already stored")
    workdir: Mapped[str | None] = mapped_column(String(2000))
    error: Mapped[str | None] = mapped_column(Text)
    requested_by: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    saes: Mapped[list[SAE]] = relationship(back_populates="run", order_by="SAE.id")
    metrics: Mapped[list[RunMetric]] = relationship(back_populates="run", order_by="RunMetric.id",
                                                    passive_deletes=True)


class RunMetric(Base):
    """One training-log record of one SAE of a run (the curves on the run page)."""

    __tablename__ = "run_metrics"
    __table_args__ = (Index("ix_run_metrics_run_sae_step", "run_id", "sae", "step"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    sae: Mapped[str] = mapped_column(String(200), doc="the SAE within the run (one name per sweep member)")
    attempt: Mapped[int] = mapped_column(SmallInteger, default=1)
    step: Mapped[int] = mapped_column(BigInt64)
    tokens: Mapped[int] = mapped_column(BigInteger)
    loss: Mapped[float | None] = mapped_column(Float)
    fvu: Mapped[float | None] = mapped_column(Float)
    l0: Mapped[float | None] = mapped_column(Float)
    dead_frac: Mapped[float | None] = mapped_column(Float)
    lr: Mapped[float | None] = mapped_column(Float)
    elapsed_s: Mapped[float | None] = mapped_column(Float)

    run: Mapped[TrainingRun] = relationship(back_populates="metrics")


class AttributionGraph(Base):
    """An attribution graph of one prompt through one transcoder set (trainer/circuits), and its job.

    The row is its own queue entry, claimed with a lease by graph workers exactly as training runs
    are (the queue columns and app.leases); `sae-atlas graph` computes one at once and stores it
    done. The graph itself is circuit-tracer's frontend JSON (trainer/circuits/export.py), kept
    zlib-compressed; the scores are the replacement and completeness scores of the unpruned graph."""

    __tablename__ = "graphs"
    __table_args__ = (
        Index("ix_graphs_claim", "status", text("priority DESC"), "id"),
        Index("ix_graphs_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slug: Mapped[str] = mapped_column(String(64), unique=True, doc="the permalink")
    model: Mapped[str] = mapped_column(String(200), doc="the LM the transcoder set was trained on")
    set_name: Mapped[str] = mapped_column(String(200), doc="the transcoder set's name")
    set_path: Mapped[str] = mapped_column(String(2000), doc="its manifest on disk")
    prompt: Mapped[str] = mapped_column(Text)
    config: Mapped[dict] = mapped_column(JSON, default=dict, doc="AttributionConfig and pruning thresholds")
    status: Mapped[str] = mapped_column(String(20), default=JobStatus.queued.value)
    priority: Mapped[int] = mapped_column(Integer, default=0, doc="higher runs first")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=2)
    run_after: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    progress: Mapped[float] = mapped_column(Float, default=0.0, doc="0..1: target rows computed")
    error: Mapped[str | None] = mapped_column(Text)
    replacement_score: Mapped[float | None] = mapped_column(Float)
    completeness_score: Mapped[float | None] = mapped_column(Float)
    n_nodes: Mapped[int | None] = mapped_column(Integer, doc="nodes in the stored (pruned) graph")
    n_links: Mapped[int | None] = mapped_column(Integer)
    seconds: Mapped[float | None] = mapped_column(Float, doc="attribution wall time")
    graph: Mapped[bytes | None] = mapped_column(LargeBinary, doc="zlib-compressed graph JSON (circuit-tracer's format)")
    requested_by: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
