"""What explains a feature: explanations, their embeddings (for search by meaning) and their scores."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    LargeBinary,
    SmallInteger,
    String,
    Text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from store.models.base import (
    Base,
    BigId,
    UTCDateTime,
    utcnow,
)

if TYPE_CHECKING:  # relationship targets in sibling modules resolve through the mapper registry
    from store.models.atlas import Feature


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
