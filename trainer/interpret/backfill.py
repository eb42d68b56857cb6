"""Embed the explanations that have no search vector (`sae-atlas embed-explanations`).

Explanations stored before migration 0005, or while the embedding model was missing (the worker
then stores the explanation without a vector and logs why), are invisible to semantic search until
they get one. This embeds them in chunks, each committed on its own, so an interrupted backfill
loses at most one chunk and the next run picks up the rest: what has a vector is never redone.
With replace, explanations whose vector comes from another embedding model are embedded again
with the configured one (search compares only vectors of the configured model).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from store import explanations
from store.errors import AtlasError
from store.vectors import document_text, write_embeddings

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 256


@dataclass
class BackfillResult:
    embedded: int  # explanations given a vector now
    remaining: int  # still without a vector of the model (0 unless interrupted)
    model: str
    already: int  # explanations (in scope) that had a vector of the model before


def embed_missing(engine: Engine, embedder, sae_name: str | None = None, chunk: int = DEFAULT_CHUNK,
                  replace: bool = False, progress: bool = True) -> BackfillResult:
    """Give every explanation in scope (all SAEs, or one) a vector of the embedder's model."""
    from tqdm.auto import tqdm

    if chunk < 1:
        raise AtlasError(f"--chunk must be at least 1 (got {chunk})")
    embedder.check()  # a missing model fails here, before anything is read
    with Session(engine) as session:
        sae_id = None
        if sae_name is not None:
            sae_id = explanations.sae_id_by_name(session, sae_name)
        total, already = explanations.count_missing(session, embedder.name, sae_id, replace)
    done, last = 0, 0
    bar = tqdm(total=total, desc=f"embedding explanations ({embedder.name})", unit="expl", disable=not progress,
               mininterval=1.0)
    try:
        while True:
            with Session(engine) as session:
                rows = explanations.missing_chunk(session, embedder.name, sae_id, replace, last, chunk)
            if not rows:
                break
            vectors = embedder.embed([document_text(text) for _, text, _ in rows])
            with Session(engine) as session, session.begin():
                # replace: an explanation may hold another model's vector (one vector per explanation)
                write_embeddings(session, [r[0] for r in rows], [r[2] for r in rows], vectors, embedder.name,
                                 replace=True)
            done += len(rows)
            last = rows[-1][0]
            bar.update(len(rows))
    finally:
        bar.close()
    with Session(engine) as session:
        remaining, _ = explanations.count_missing(session, embedder.name, sae_id, replace)
    log.info("embedded %d explanations with %s (%d already had a vector)", done, embedder.name, already)
    return BackfillResult(embedded=done, remaining=remaining, model=embedder.name, already=already)
