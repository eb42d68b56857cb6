"""The store's ORM: the one thing the trainer and the app share.

Sized for PostgreSQL with a million features and a hundred million example rows:
- per-feature arrays that are always read whole (histograms, logit tables, neighbours) live in
  JSON columns of the feature row, so a feature page is two indexed reads (feature + examples);
- examples keep their token ids and per-token activations packed (int32 / float16 bytes), about
  250 bytes a row for a 41-token window instead of 41 rows;
- every query the pages make has an index (see __table_args__), and big tables use BIGINT keys.
Constraint names follow one convention so that Alembic batch migrations work on SQLite too.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone

import numpy as np
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BIGINT on PostgreSQL, but INTEGER on SQLite so that the primary key stays the rowid alias.
BigId = BigInteger().with_variant(Integer(), "sqlite")
# A 64-bit count: BIGINT on PostgreSQL; SQLite's INTEGER already holds 64 bits.
BigInt64 = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """A timestamp that is always timezone-aware UTC in Python, on SQLite (naive text) and PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class SAEStatus(str, enum.Enum):
    publishing = "publishing"  # rows are being written; readers never see it
    ready = "ready"
    failed = "failed"


class ExampleKind(enum.IntEnum):
    top = 0  # the highest activations, one per document
    interval = 1  # random examples from equal-width intervals of [0, max]
    random = 2  # a uniform random sample of positive activations


class JobStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"


LIVE_JOB_STATUSES = (JobStatus.queued.value, JobStatus.running.value)


class LM(Base):
    """A language model that SAEs are trained on, with its vocabulary."""

    __tablename__ = "lms"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    source: Mapped[str] = mapped_column(String(1000), doc="HF id, local path or alias it was loaded from")
    architecture: Mapped[str] = mapped_column(String(100))
    n_layers: Mapped[int] = mapped_column(Integer)
    d_model: Mapped[int] = mapped_column(Integer)
    vocab_size: Mapped[int] = mapped_column(Integer)
    bos_token_id: Mapped[int | None] = mapped_column(Integer)
    # zlib-compressed JSON list of token strings, index = token id; decoded once per process.
    vocab: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    saes: Mapped[list[SAE]] = relationship(back_populates="lm")


class SAE(Base):
    """A sparse autoencoder on one site of an LM, with its metrics and SAE-level charts."""

    __tablename__ = "saes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    lm_id: Mapped[int] = mapped_column(ForeignKey("lms.id", ondelete="RESTRICT"), index=True)
    site: Mapped[str] = mapped_column(String(100))
    layer: Mapped[int | None] = mapped_column(Integer)
    architecture: Mapped[str] = mapped_column(String(50))
    d_in: Mapped[int] = mapped_column(Integer)
    d_sae: Mapped[int] = mapped_column(Integer)
    k: Mapped[int | None] = mapped_column(Integer)
    config: Mapped[dict] = mapped_column(JSON, default=dict)
    norm_scale: Mapped[float] = mapped_column(Float, default=1.0)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict, doc="fvu, mse, l0, dead_frac, ce_recovered, ...")
    charts: Mapped[dict] = mapped_column(JSON, default=dict, doc="log-density histogram, dead and dense lists")
    weights_path: Mapped[str | None] = mapped_column(String(2000))
    n_tokens_analyzed: Mapped[int] = mapped_column(BigInteger, default=0)
    status: Mapped[str] = mapped_column(String(20), default=SAEStatus.publishing.value, index=True)
    # Changes on every publish: part of every ETag of this SAE's immutable data.
    version: Mapped[str] = mapped_column(String(40))
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"), index=True,
                                               doc="the training run that made it, if any")

    lm: Mapped[LM] = relationship(back_populates="saes")
    run: Mapped[TrainingRun | None] = relationship(back_populates="saes")


class Feature(Base):
    """One latent of an SAE with its whole dashboard except the examples."""

    __tablename__ = "features"
    __table_args__ = (
        UniqueConstraint("sae_id", "index", name="uq_features_sae_id_index"),
        Index("ix_features_sae_density", "sae_id", "density"),
        Index("ix_features_sae_max_act", "sae_id", "max_act"),
        Index("ix_features_sae_mean_act", "sae_id", "mean_act"),
        Index("ix_features_sae_score", "sae_id", "best_score"),
        Index("ix_features_sae_peak_token", "sae_id", "peak_token_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    firing_count: Mapped[int] = mapped_column(BigInteger, default=0)
    density: Mapped[float] = mapped_column(Float, default=0.0)
    mean_act: Mapped[float] = mapped_column(Float, default=0.0, doc="mean of the non-zero activations")
    max_act: Mapped[float] = mapped_column(Float, default=0.0)
    moments: Mapped[dict] = mapped_column(JSON, default=dict, doc="e_a2, std, skew, kurtosis of non-zero activations")
    act_hist: Mapped[dict] = mapped_column(JSON, default=dict, doc="{edges, counts} of non-zero activations")
    interval_shares: Mapped[list] = mapped_column(JSON, default=list)
    logits: Mapped[dict] = mapped_column(JSON, default=dict, doc="{top: [[id, v]], bottom: [[id, v]], hist: {edges, counts}}")
    neighbors: Mapped[list] = mapped_column(JSON, default=list, doc="[[index, cosine], ...] best first")
    peak_token_id: Mapped[int | None] = mapped_column(Integer, doc="the token most top examples peak on")
    peak_token_share: Mapped[float] = mapped_column(Float, default=0.0)
    # Denormalised from explanations so the SAE table can filter and sort without a join.
    best_score: Mapped[float | None] = mapped_column(Float)
    explanation: Mapped[str | None] = mapped_column(Text, doc="text of the best-scored explanation")

    examples: Mapped[list[Example]] = relationship(
        back_populates="feature", order_by="(Example.kind, Example.rank)", passive_deletes=True
    )
    explanations: Mapped[list[Explanation]] = relationship(
        back_populates="feature", order_by="Explanation.id", passive_deletes=True
    )


class Example(Base):
    """A window of tokens around one activation of one feature, with every token's activation."""

    __tablename__ = "examples"
    __table_args__ = (Index("ix_examples_feature_kind_rank", "feature_id", "kind", "rank"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    feature_id: Mapped[int] = mapped_column(ForeignKey("features.id", ondelete="CASCADE"))
    kind: Mapped[int] = mapped_column(SmallInteger, doc="ExampleKind")
    rank: Mapped[int] = mapped_column(SmallInteger, doc="order within the kind (and interval)")
    interval: Mapped[int | None] = mapped_column(SmallInteger, doc="interval number for kind=interval")
    activation: Mapped[float] = mapped_column(Float, doc="activation at the peak token")
    peak: Mapped[int] = mapped_column(SmallInteger, doc="position of the peak token in the window")
    doc_id: Mapped[int] = mapped_column(Integer, doc="corpus document the peak token comes from")
    doc_offset: Mapped[int] = mapped_column(Integer, doc="token offset of the peak inside its document")
    token_ids: Mapped[bytes] = mapped_column(LargeBinary, doc="int32 little-endian")
    acts: Mapped[bytes] = mapped_column(LargeBinary, doc="float16 little-endian, one per token")

    feature: Mapped[Feature] = relationship(back_populates="examples")

    def token_array(self) -> np.ndarray:
        return np.frombuffer(self.token_ids, dtype="<i4")

    def act_array(self) -> np.ndarray:
        return np.frombuffer(self.acts, dtype="<f2").astype(np.float32)


class Explanation(Base):
    """A short description of a feature, who wrote it, and how well it scored."""

    __tablename__ = "explanations"
    __table_args__ = (Index("ix_explanations_feature", "feature_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    feature_id: Mapped[int] = mapped_column(ForeignKey("features.id", ondelete="CASCADE"))
    text: Mapped[str] = mapped_column(Text)
    method: Mapped[str] = mapped_column(String(50), doc="how it was produced, e.g. explain-v1 or human")
    explainer: Mapped[str] = mapped_column(String(200), doc="model or person that wrote it")
    prompt: Mapped[str | None] = mapped_column(Text)
    raw_response: Mapped[str | None] = mapped_column(Text)
    detection_score: Mapped[float | None] = mapped_column(Float, doc="balanced accuracy")
    detection_f1: Mapped[float | None] = mapped_column(Float)
    fuzzing_score: Mapped[float | None] = mapped_column(Float, doc="balanced accuracy")
    fuzzing_f1: Mapped[float | None] = mapped_column(Float)
    embedding_score: Mapped[float | None] = mapped_column(
        Float, doc="AUROC of the cosine similarity of explanation and held-out windows, activating vs not")
    detection_uninformative: Mapped[bool | None] = mapped_column(
        Boolean, doc="the detection judge gave every example the same answer: its score says nothing")
    fuzzing_uninformative: Mapped[bool | None] = mapped_column(
        Boolean, doc="the fuzzing judge gave every example the same answer: its score says nothing")
    scores: Mapped[dict | None] = mapped_column(
        JSON, doc="per scorer: counts, confidence interval, embedding model, the SAE's shuffled baseline")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    feature: Mapped[Feature] = relationship(back_populates="explanations")
    judgements: Mapped[list[Judgement]] = relationship(
        back_populates="explanation", order_by="Judgement.id", passive_deletes=True
    )


class ExplanationEmbedding(Base):
    """An explanation's sentence embedding (unit length), for semantic search.

    `model` names the vector space (trainer.interpret.embedder): search compares only vectors of the
    configured model. On PostgreSQL servers with pgvector, migration 0005 adds an `embedding vector`
    column beside `vector` (kept in step by store.vectors) and search runs in the database.
    """

    __tablename__ = "explanation_embeddings"
    __table_args__ = (Index("ix_explanation_embeddings_model_sae", "model", "sae_id", "explanation_id"),)

    explanation_id: Mapped[int] = mapped_column(BigId, ForeignKey("explanations.id", ondelete="CASCADE"),
                                                primary_key=True, autoincrement=False)
    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(200))
    dim: Mapped[int] = mapped_column(SmallInteger)
    vector: Mapped[bytes] = mapped_column(LargeBinary, doc="float32 little-endian, L2-normalised")


class Judgement(Base):
    """One answer of the judge LM while scoring an explanation; unparsable answers are kept."""

    __tablename__ = "judgements"
    __table_args__ = (Index("ix_judgements_explanation", "explanation_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    explanation_id: Mapped[int] = mapped_column(ForeignKey("explanations.id", ondelete="CASCADE"))
    method: Mapped[str] = mapped_column(String(20), doc="detection or fuzzing")
    example_id: Mapped[int | None] = mapped_column(BigInteger, doc="the held-out example shown, if from the store")
    text: Mapped[str] = mapped_column(Text, doc="the example as the judge saw it")
    truth: Mapped[bool]
    prediction: Mapped[bool | None] = mapped_column(Boolean, doc="null when the answer could not be parsed")
    correct: Mapped[bool]
    raw: Mapped[str | None] = mapped_column(Text, doc="the judge's answer for this prompt")

    explanation: Mapped[Explanation] = relationship(back_populates="judgements")


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


class KeyScope(str, enum.Enum):
    read = "read"  # reads, when public_reads is off
    write = "write"  # reads and writes (jobs, runs, cancels)


class APIKey(Base):
    """A key for reads (scope read) or reads and writes (scope write); only its SHA-256 is stored."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    prefix: Mapped[str] = mapped_column(String(16), doc="first characters, to tell keys apart")
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[str] = mapped_column(String(10), default=KeyScope.write.value, server_default=KeyScope.write.value)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ContrastQuery(Base):
    """A stored contrastive search (two sets of texts and its ranked latents), for its permalink.

    The texts are kept (zlib-compressed JSON) so the query can be re-run after the SAEs change;
    the result is the answer as computed, with the SAE versions it was computed on."""

    __tablename__ = "contrast_queries"
    __table_args__ = (Index("ix_contrast_queries_created_at", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, doc="random hex: the permalink")
    lm_name: Mapped[str] = mapped_column(String(200))
    label_a: Mapped[str] = mapped_column(String(100))
    label_b: Mapped[str] = mapped_column(String(100))
    n_a: Mapped[int] = mapped_column(Integer)
    n_b: Mapped[int] = mapped_column(Integer)
    params: Mapped[dict] = mapped_column(JSON, default=dict, doc="direction, density filter, limit, SAEs")
    texts: Mapped[bytes] = mapped_column(LargeBinary, doc='zlib-compressed JSON {"a": [...], "b": [...]}')
    result: Mapped[dict] = mapped_column(JSON, doc="the ranked latents and the summary, as computed")
    requested_by: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WebSession(Base):
    """A browser's sign-in: the cookie holds a random token, the store only its SHA-256. Signing
    out, revoking the key or the expiry ends it; the key itself never reaches the browser."""

    __tablename__ = "web_sessions"
    __table_args__ = (Index("ix_web_sessions_api_key_id", "api_key_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    api_key: Mapped[APIKey] = relationship()
class SAERelation(Base):
    """How the latents of two SAEs of one model correspond (a width, layer or seed pair).

    A is the narrower SAE of a width pair and the earlier layer of a layer pair. The summary holds
    what the pair page shows: best-match distributions, shares matched at each cosine threshold,
    matching or splitting counts, the pair's dark-matter numbers, the settings and the data used."""

    __tablename__ = "sae_relations"
    __table_args__ = (UniqueConstraint("sae_a_id", "sae_b_id", name="uq_sae_relations_sae_a_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sae_a_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"))
    sae_b_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(20), doc="width, layer or seed")
    n_tokens: Mapped[int] = mapped_column(BigInteger, default=0, doc="tokens the statistics were measured on")
    summary: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    sae_a: Mapped[SAE] = relationship(foreign_keys=[sae_a_id])
    sae_b: Mapped[SAE] = relationship(foreign_keys=[sae_b_id])


class FeatureLink(Base):
    """One edge between a latent of A and a latent of B of a relation (either side may be empty:
    a novel or reconstruction child has no parent, a vanished parent has no child)."""

    __tablename__ = "feature_links"
    __table_args__ = (
        Index("ix_feature_links_relation_a", "relation_id", "a_index"),
        Index("ix_feature_links_relation_b", "relation_id", "b_index"),
        Index("ix_feature_links_relation_label", "relation_id", "label"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    relation_id: Mapped[int] = mapped_column(ForeignKey("sae_relations.id", ondelete="CASCADE"))
    a_index: Mapped[int | None] = mapped_column(Integer)
    b_index: Mapped[int | None] = mapped_column(Integer)
    label: Mapped[str] = mapped_column(String(16), doc="matched, unconfirmed, persisted, split, persisted_split, novel, "
                                                       "reconstruction, vanished")
    kind: Mapped[str | None] = mapped_column(String(16), doc="how a width link was made: direction (decoder cosine "
                                                             "and co-firing) or cofiring (co-firing alone); null for "
                                                             "matches and rows with one side empty")
    cos: Mapped[float | None] = mapped_column(Float, doc="decoder cosine (best cosine when one side is empty)")
    rho: Mapped[float | None] = mapped_column(Float, doc="Pearson correlation of the two activations over all tokens")
    p_b_given_a: Mapped[float | None] = mapped_column(Float, doc="share of A's firings on which B fires too")
    p_a_given_b: Mapped[float | None] = mapped_column(Float, doc="share of B's firings on which A fires too")
    stitch_gain: Mapped[float | None] = mapped_column(Float, doc="held-out relative decrease of A's squared error when B's latent is added")


class SAEDarkMatter(Base):
    """What an SAE misses, measured in its analysis pass (FVU by position and token, linear and
    nonlinear error, spliced-loss concentration): one JSON document per SAE."""

    __tablename__ = "sae_dark_matter"

    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"), primary_key=True)
    data: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class LatentStructure(Base):
    """Where one latent sits in its SAE's structure: its place on the map (x, y, cluster; empty
    until a map is made) and its co-firing partners within the SAE, measured by the analysis:
    [[j, N_ij, P(j | i), P(i | j), lift], ...], most lift first."""

    __tablename__ = "latent_structure"

    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"), primary_key=True)
    latent_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    x: Mapped[float | None] = mapped_column(Float)
    y: Mapped[float | None] = mapped_column(Float)
    cluster: Mapped[int | None] = mapped_column(Integer)
    partners: Mapped[list] = mapped_column(JSON, default=list)


class SAEMap(Base):
    """The map of an SAE's latents: how it was made (UMAP and Leiden settings) and its clusters
    ([{id, size, label, x, y, words}]); the points are rows of latent_structure."""

    __tablename__ = "sae_maps"

    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"), primary_key=True)
    config: Mapped[dict] = mapped_column(JSON, default=dict)
    clusters: Mapped[list] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class FeatureGroup(Base):
    """A group of latents that may act as one multi-dimensional feature (Engels et al. 2024): the
    PCA scatter of its reconstructions and its irreducibility. rank 0 is the most irreducible."""

    __tablename__ = "feature_groups"
    __table_args__ = (UniqueConstraint("sae_id", "rank", name="uq_feature_groups_sae_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"))
    rank: Mapped[int] = mapped_column(Integer)
    latents: Mapped[list] = mapped_column(JSON, default=list)
    n_tokens: Mapped[int] = mapped_column(Integer, doc="sampled tokens the scatter and the indices were computed on")
    separability: Mapped[float] = mapped_column(Float, doc="separability index S, bits (high: not separable)")
    mixture: Mapped[float] = mapped_column(Float, doc="epsilon-mixture index M (low: not a mixture)")
    circle_residual: Mapped[float] = mapped_column(Float, doc="RMS distance of the scatter to its best circle / radius")
    variance_share: Mapped[list] = mapped_column(JSON, default=list)
    scatter: Mapped[dict] = mapped_column(JSON, default=dict, doc="{x, y, token, latent}: a sample of the 2-D projection")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class SAEEvaluation(Base):
    """One run of `sae-atlas evaluate` on an SAE (trainer/report_card.py): the metrics with their 95%
    intervals, and the settings they were measured with. The newest row is the SAE's report card."""

    __tablename__ = "sae_evaluations"
    __table_args__ = (Index("ix_sae_evaluations_sae_created", "sae_id", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    settings: Mapped[dict] = mapped_column(JSON, default=dict, doc="model, site, corpus, split, tokens, contexts, ...")
    metrics: Mapped[dict] = mapped_column(JSON, default=dict, doc="fvu, l0, dead, dense, cosine, CE losses with intervals")
    n_tokens: Mapped[int] = mapped_column(BigInteger, doc="held-out tokens of the reconstruction metrics")


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
