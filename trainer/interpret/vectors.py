"""Explanation embeddings in the store: packed float32 rows, plus a pgvector column where there is one."""

from __future__ import annotations

import numpy as np
from sqlalchemy import delete, insert, text
from sqlalchemy.orm import Session

from app.models import ExplanationEmbedding

_PGVECTOR_QUERY = text("SELECT 1 FROM information_schema.columns WHERE table_name = 'explanation_embeddings' "
                       "AND column_name = 'embedding'")


def has_pgvector(session: Session) -> bool:
    """Whether explanation_embeddings has migration 0005's pgvector column (PostgreSQL with pgvector)."""
    if session.get_bind().dialect.name != "postgresql":
        return False
    return session.execute(_PGVECTOR_QUERY).first() is not None


def pack(v: np.ndarray) -> bytes:
    return np.ascontiguousarray(v, dtype="<f4").tobytes()


def unpack(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype="<f4")


def pgvector_literal(v: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.7g}" for x in np.asarray(v, np.float32).tolist()) + "]"


def write_embeddings(session: Session, explanation_ids: list[int], sae_ids: list[int], vectors: np.ndarray,
                     model: str, replace: bool = False) -> int:
    """Store one vector per explanation (in the caller's transaction); replace drops older ones first."""
    if not explanation_ids:
        return 0
    vectors = np.asarray(vectors, np.float32)
    if replace:
        for k in range(0, len(explanation_ids), 5000):
            session.execute(delete(ExplanationEmbedding).where(
                ExplanationEmbedding.explanation_id.in_(explanation_ids[k:k + 5000])))
    rows = [{"explanation_id": int(e), "sae_id": int(s), "model": model, "dim": int(vectors.shape[1]),
             "vector": pack(v)} for e, s, v in zip(explanation_ids, sae_ids, vectors)]
    for k in range(0, len(rows), 5000):
        session.execute(insert(ExplanationEmbedding), rows[k:k + 5000])
    if has_pgvector(session):
        raw = session.connection().connection.driver_connection
        with raw.cursor() as cur:
            cur.executemany("UPDATE explanation_embeddings SET embedding = %s::vector WHERE explanation_id = %s",
                            [(pgvector_literal(v), int(e)) for e, v in zip(explanation_ids, vectors)])
    return len(rows)
