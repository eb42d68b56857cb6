"""What an atlas holds: language models, their published SAEs, each SAE's features and their examples."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

import numpy as np
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
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from store.models.base import (
    Base,
    BigId,
    SAEStatus,
    UTCDateTime,
    utcnow,
)

if TYPE_CHECKING:  # relationship targets in sibling modules resolve through the mapper registry
    from store.models.interpretation import Explanation
    from store.models.jobs import TrainingRun


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
