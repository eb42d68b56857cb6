"""Explanation embeddings in the store: packed float32 rows, plus a pgvector column where there is one."""

from __future__ import annotations

import re

import numpy as np
from sqlalchemy import delete, insert, text
from sqlalchemy.orm import Session

from store.models import ExplanationEmbedding

_PGVECTOR_QUERY = text("SELECT 1 FROM information_schema.columns WHERE table_name = 'explanation_embeddings' "
                       "AND column_name = 'embedding'")


_pgvector: dict[str, bool] = {}  # per database URL: the column is added by a migration, so it stays


def has_pgvector(session: Session) -> bool:
    """Whether explanation_embeddings has migration 0005's pgvector column (PostgreSQL with pgvector);
    asked once per database and process (every search needs to know)."""
    bind = session.get_bind()
    if bind.dialect.name != "postgresql":
        return False
    key = bind.url.render_as_string(hide_password=True)
    if key not in _pgvector:
        _pgvector[key] = session.execute(_PGVECTOR_QUERY).first() is not None
    return _pgvector[key]


def pack(v: np.ndarray) -> bytes:
    return np.ascontiguousarray(v, dtype="<f4").tobytes()


def unpack(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype="<f4")


def pgvector_literal(v: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.7g}" for x in np.asarray(v, np.float32).tolist()) + "]"


# Bumped by every write in this process, so a search in the same process sees its own writes at once
# (store.search caches the vectors' watermarks for a moment; other processes' writes show
# within that moment).
writes = 0


def write_embeddings(session: Session, explanation_ids: list[int], sae_ids: list[int], vectors: np.ndarray,
                     model: str, replace: bool = False) -> int:
    """Store one vector per explanation (in the caller's transaction); replace drops older ones first.

    Bulk paths, as publishing writes one row per latent: COPY on PostgreSQL (with the pgvector
    column filled in the same pass), executemany on the raw SQLite connection.
    """
    global writes
    writes += 1
    if not explanation_ids:
        return 0
    vectors = np.asarray(vectors, np.float32)
    if replace:
        for k in range(0, len(explanation_ids), 5000):
            session.execute(delete(ExplanationEmbedding).where(
                ExplanationEmbedding.explanation_id.in_(explanation_ids[k:k + 5000])))
    dim = int(vectors.shape[1])
    rows = ((int(e), int(s), model, dim, pack(v)) for e, s, v in zip(explanation_ids, sae_ids, vectors))
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        pgvector = has_pgvector(session)
        cols = "explanation_id, sae_id, model, dim, vector" + (", embedding" if pgvector else "")
        raw = session.connection().connection.driver_connection
        with raw.cursor() as cur, cur.copy(f"COPY explanation_embeddings ({cols}) FROM STDIN") as copy:
            for row, v in zip(rows, vectors):
                copy.write_row((*row, pgvector_literal(v)) if pgvector else row)
    elif dialect == "sqlite":
        raw = session.connection().connection.driver_connection
        raw.executemany("INSERT INTO explanation_embeddings (explanation_id, sae_id, model, dim, vector) "
                        "VALUES (?, ?, ?, ?, ?)", rows)
    else:
        keys = ("explanation_id", "sae_id", "model", "dim", "vector")
        session.execute(insert(ExplanationEmbedding), [dict(zip(keys, r)) for r in rows])
    return len(explanation_ids)


# --- the text a vector embeds -----------------------------------------------------------------
# Explanations show tokens as chips (‹ just›) and shares "(100 % of top examples)"; the embedding
# model reads neither well, so every vector (at publish, by the worker, by the backfill, and the
# query of a search) embeds the same plain text.

CHIP = re.compile("‹([^‹›]*)›")
SHARE = re.compile(r"\s*\(\d{1,3} %(?: of top examples)?\)")


def plain(text: str) -> str:
    """The text as the embedding model should read it: token chips ‹ just› as "just", and without
    the shares "(100 % of top examples)", which are for people (they dilute the meaning: measured,
    "the word just" is 0.05 closer to an explanation without them)."""
    if "‹" not in text:
        return text
    text = SHARE.sub("", text)
    return CHIP.sub(lambda m: '"' + (m.group(1).strip() or m.group(1)) + '"', text)


def document_text(explanation: str) -> str:
    """What is embedded to find an explanation by meaning (semantic search): the explanation, chips as quotes."""
    return plain(explanation)
