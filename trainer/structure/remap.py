"""`sae-atlas map NAME`: make a published SAE's map again from the store, e.g. after LM explanations
arrived (labels come from the best explanation of each latent) or with other settings."""

from __future__ import annotations

import time

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from store import publish as writes
from store.db import check_schema, get_engine
from store.errors import AtlasError
from store.models import Feature, LatentStructure
from store.saes import sae_by_name
from store.vocab import vocab_for
from trainer.relate.cofiring import Partners
from trainer.structure.layout import MapConfig, build_map, label_texts


def stored_partners(session: Session, sae_id: int, counts: np.ndarray, n_tokens: int) -> Partners | None:
    """The co-firing partners publish stored, as the arrays the map reads; None if there are none."""
    rows = session.execute(select(LatentStructure.latent_index, LatentStructure.partners)
                           .where(LatentStructure.sae_id == sae_id)).all()
    if not rows:
        return None
    m = max((len(p or []) for _, p in rows), default=0) or 1
    ids = np.full((len(counts), m), -1, np.int32)
    nij = np.zeros((len(counts), m), np.int64)
    for i, partners in rows:
        for slot, p in enumerate(partners or []):
            ids[i, slot], nij[i, slot] = p[0], p[1]
    return Partners(ids, nij, counts.astype(np.int64), int(n_tokens))


def remap_published(name: str, cfg: MapConfig | None = None, engine=None) -> dict:
    """Rebuild and store the map of the published SAE `name`; returns a short summary."""
    from trainer.formats import load_sae

    cfg = cfg or MapConfig()
    engine = engine or get_engine()
    check_schema(engine)
    started = time.time()
    with Session(engine) as session:
        sae = sae_by_name(session, name)
        rows = session.execute(select(Feature.index, Feature.neighbors, Feature.explanation, Feature.firing_count,
                                      Feature.peak_token_id)
                               .where(Feature.sae_id == sae.id).order_by(Feature.index)).all()
        vocab = vocab_for(session, sae.lm_id)
        peaks = [vocab.text(r[4]) if r[4] is not None else None for r in rows]
        weights = sae.weights_path
        sae_id, d_sae, n_tokens = sae.id, sae.d_sae, sae.n_tokens_analyzed
        partners = stored_partners(session, sae_id, np.array([r[3] for r in rows]), n_tokens)
    try:
        directions = load_sae(weights).sae.W_dec.detach().float().cpu().numpy()
    except (AtlasError, OSError, TypeError) as exc:
        raise AtlasError(f"cannot read the weights of {name} at {weights!r} ({exc})",
                         "the SAE folder it was published from must still be there") from None
    if directions.shape[0] != d_sae or len(rows) != d_sae:
        raise AtlasError(f"the weights at {weights} have {directions.shape[0]} latents but {name} has {d_sae}",
                         "publish the SAE again")
    width = max((len(r[1] or []) for r in rows), default=0)
    nb_ids = np.zeros((d_sae, width), np.int64)
    nb_cos = np.full((d_sae, width), -1.0)
    for r in rows:
        for slot, (j, c) in enumerate(r[1] or []):
            nb_ids[r[0], slot], nb_cos[r[0], slot] = j, c
    m = build_map(directions, nb_ids, nb_cos, partners, label_texts([r[2] for r in rows], peaks), cfg)
    with Session(engine) as session, session.begin():
        sae = sae_by_name(session, name)
        if sae.id != sae_id:
            raise AtlasError(f"{name} was published again while its map was being made", "run the command again")
        writes.replace_map(session, sae, np.column_stack([m["x"], m["y"]]), m["cluster"], m["config"], m["clusters"])
    return {"clusters": len(m["clusters"]), "latents": d_sae, "seconds": time.time() - started,
            "labels": [c["label"] for c in m["clusters"][:10]]}
