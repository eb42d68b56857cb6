"""What the analyses found about an SAE as a whole: relations between SAEs, what it misses, its
structure (co-firing, map, groups) and its report card."""

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
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from store.models.base import (
    Base,
    BigId,
    UTCDateTime,
    utcnow,
)

if TYPE_CHECKING:  # relationship targets in sibling modules resolve through the mapper registry
    from store.models.atlas import SAE


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
