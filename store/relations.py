"""The writes of a relation between two published SAEs, and the reads that pick partners for one.

A relation changes what the pages of both SAEs show, so writing one gives both SAEs a new version
(their ETags change with it). The offline pipeline (trainer/relate/) computes relations and calls
these; the pages and the API read them through store.lineage.
"""

from __future__ import annotations

import math
import uuid

from sqlalchemy import Engine, delete, insert, or_, select
from sqlalchemy.orm import Session

from store.errors import AtlasError
from store.models import SAE, FeatureLink, SAERelation, SAEStatus
from store.publish import clean_json

LINK_COLUMNS = ("a", "b", "label", "kind", "cos", "rho", "p_b_given_a", "p_a_given_b", "stitch_gain")


def ready_sae(session: Session, name: str) -> SAE:
    sae = session.scalar(select(SAE).where(SAE.name == name, SAE.status == SAEStatus.ready.value))
    if sae is None:
        raise AtlasError(f"no published SAE named {name!r}", "list them with `sae-atlas` at /api/v1/saes or publish it first")
    return sae


def _opt(v):
    return None if v is None or not math.isfinite(float(v)) else float(v)


def write_relation(engine: Engine, name_a: str, name_b: str, kind: str, summary: dict, links: dict) -> int:
    """Store a relation and its links in one transaction, replacing an older one of the same pair;
    returns its id. `links` holds one array per LINK_COLUMNS name (index -1: no latent on that side)."""
    with Session(engine) as session, session.begin():
        a, b = ready_sae(session, name_a), ready_sae(session, name_b)
        session.execute(delete(SAERelation).where(or_((SAERelation.sae_a_id == a.id) & (SAERelation.sae_b_id == b.id),
                                                      (SAERelation.sae_a_id == b.id) & (SAERelation.sae_b_id == a.id))))
        row = SAERelation(sae_a_id=a.id, sae_b_id=b.id, kind=kind, n_tokens=int(summary.get("tokens", 0)),
                          summary=clean_json(summary))
        session.add(row)
        session.flush()
        rows = [{"relation_id": row.id, "a_index": int(i) if i >= 0 else None, "b_index": int(j) if j >= 0 else None,
                 "label": str(lab), "kind": str(how) or None, "cos": _opt(c), "rho": _opt(r), "p_b_given_a": _opt(pba),
                 "p_a_given_b": _opt(pab), "stitch_gain": _opt(g)}
                for i, j, lab, how, c, r, pba, pab, g in zip(*(links[c] for c in LINK_COLUMNS))]
        for s in range(0, len(rows), 20_000):
            session.execute(insert(FeatureLink), rows[s:s + 20_000])
        a.version, b.version = uuid.uuid4().hex, uuid.uuid4().hex  # their pages now show this relation
        return row.id


def partners(session: Session, sae: SAE) -> list[SAE]:
    """Published SAEs to relate `sae` with automatically: same model, and the same site at another
    width, or the same kind of site and width one layer away."""
    kind = sae.site.split(".")[0]
    out = []
    for other in session.scalars(select(SAE).where(SAE.lm_id == sae.lm_id, SAE.id != sae.id,
                                                   SAE.status == SAEStatus.ready.value).order_by(SAE.name)):
        if other.d_in != sae.d_in:
            continue
        width_pair = other.site == sae.site and other.d_sae != sae.d_sae
        layer_pair = (other.site.split(".")[0] == kind and other.d_sae == sae.d_sae and other.layer is not None
                      and sae.layer is not None and abs(other.layer - sae.layer) == 1)
        if width_pair or layer_pair:
            out.append(other)
    return out
