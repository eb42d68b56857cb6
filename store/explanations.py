"""The writes of explanations made offline (at publish, and the search-vector backfill), and the
queries that find the explanations still without a vector.

Vectors are stored per embedding model (store/vectors.py); search compares only vectors of the
configured model, so an explanation "needs a vector" when it has none of that model.
"""

from __future__ import annotations

import numpy as np
from sqlalchemy import and_, bindparam, func, insert, or_, select, update
from sqlalchemy.orm import Session

from store.errors import AtlasError
from store.models import SAE, Explanation, ExplanationEmbedding, Feature
from store.vectors import write_embeddings


def insert_explanations(session: Session, sae_id: int, rows: list[dict], vectors: np.ndarray, model: str) -> list[int]:
    """Insert explanation rows (columns of Explanation) with one search vector each; returns their ids."""
    ids = [eid for (eid,) in session.execute(
        insert(Explanation).returning(Explanation.id, sort_by_parameter_order=True), rows)]
    write_embeddings(session, ids, [sae_id] * len(ids), vectors, model)
    return ids


def set_feature_explanations(session: Session, texts: dict[int, str]) -> None:
    """Set the explanation shown for each feature id (the feature table and pages read this column)."""
    table = Feature.__table__
    session.connection().execute(
        update(table).where(table.c.id == bindparam("b_id")).values(explanation=bindparam("b_text")),
        [{"b_id": int(fid), "b_text": text} for fid, text in texts.items()])


def sae_id_by_name(session: Session, name: str) -> int:
    sae_id = session.scalar(select(SAE.id).where(SAE.name == name))
    if sae_id is None:
        raise AtlasError(f"no SAE named {name!r} in the store", "`sae-atlas` lists them on /saes; check the name")
    return sae_id


def _needs_vector(model: str, replace: bool):
    """Explanations without a vector; with replace, also those with a vector of another model."""
    none = ExplanationEmbedding.explanation_id.is_(None)
    return or_(none, ExplanationEmbedding.model != model) if replace else none


def _scope(stmt, sae_id: int | None):
    stmt = stmt.join(Feature, Explanation.feature_id == Feature.id).outerjoin(
        ExplanationEmbedding, ExplanationEmbedding.explanation_id == Explanation.id)
    return stmt.where(Feature.sae_id == sae_id) if sae_id is not None else stmt


def count_missing(session: Session, model: str, sae_id: int | None = None, replace: bool = False) -> tuple[int, int]:
    """(explanations needing a vector, explanations already having one of `model`) in scope."""
    missing = session.scalar(_scope(select(func.count(Explanation.id)), sae_id).where(_needs_vector(model, replace)))
    have = session.scalar(_scope(select(func.count(Explanation.id)), sae_id).where(
        and_(ExplanationEmbedding.explanation_id.is_not(None), ExplanationEmbedding.model == model)))
    return int(missing or 0), int(have or 0)


def missing_chunk(session: Session, model: str, sae_id: int | None, replace: bool, after: int,
                  limit: int) -> list[tuple[int, str, int]]:
    """The next `limit` explanations needing a vector with id > after: (id, text, sae id), by id."""
    return [tuple(r) for r in session.execute(
        _scope(select(Explanation.id, Explanation.text, Feature.sae_id), sae_id)
        .where(_needs_vector(model, replace), Explanation.id > after)
        .order_by(Explanation.id).limit(limit)).all()]
