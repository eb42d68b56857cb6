"""Reads of an SAE's structure: each latent's co-firing partners and place on the map, the map's
clusters, and its multi-dimensional feature groups (written at publish, see store/publish.py).

Like every read, these only see published (ready) SAEs: callers pass an SAE they got from
sae_by_name / sae_info, which already filtered on status.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from store.db import json_value, raw_rows
from store.errors import NotFound
from store.feature import neighbor_explanations
from store.models import Feature, FeatureGroup, LatentStructure, SAEMap

_L = LatentStructure.__table__.c
_F = Feature.__table__.c


@dataclass(frozen=True)
class LatentPlace:
    """One latent's row of latent_structure."""

    partners: list  # [[j, N_ij, P(j | i), P(i | j), lift], ...]
    x: float | None
    y: float | None
    cluster: int | None


_PLACE = "SELECT partners, x, y, cluster FROM latent_structure WHERE sae_id = ? AND latent_index = ?"


def latent_place(session: Session, sae_id: int, index: int) -> LatentPlace | None:
    """None when the SAE was published without structure (an older analysis). One read of the
    primary key through the DBAPI cursor (the feature page makes it on every uncached view)."""
    rows = raw_rows(session, _PLACE, (sae_id, index))
    if not rows:
        return None
    partners, x, y, cluster = rows[0]
    return LatentPlace(list(json_value(partners) or []), x, y, cluster)


@dataclass(frozen=True)
class SAEStructure:
    """What every feature page of one SAE version shares: the map's clusters and extent, and which
    groups each latent belongs to. Read once per (SAE, version) and kept in memory: publishing and
    `sae-atlas map` both give the SAE a new version (store.publish)."""

    has_map: bool
    clusters: dict  # cluster id -> {id, size, label, x, y, words}
    bounds: tuple[float, float, float, float] | None  # min x, min y, max x, max y over clusters and latents
    groups_by_latent: dict  # latent index -> ranks of its groups, ascending


_structures: dict[tuple[int, str], SAEStructure] = {}
_structures_lock = threading.Lock()


def sae_structure(session: Session, sae) -> SAEStructure:
    """The shared part of an SAE's structure (see SAEStructure), for the SAE row's own version."""
    key = (sae.id, sae.version)
    found = _structures.get(key)
    if found is not None:
        return found
    m = sae_map(session, sae.id)
    clusters = {c["id"]: c for c in (m.clusters if m else [])}
    bounds = None
    if m is not None:
        lo = session.execute(select(func.min(_L.x), func.min(_L.y), func.max(_L.x), func.max(_L.y))
                             .where(_L.sae_id == sae.id)).first()
        xs = [c["x"] for c in clusters.values()] + [v for v in (lo[0], lo[2]) if v is not None]
        ys = [c["y"] for c in clusters.values()] + [v for v in (lo[1], lo[3]) if v is not None]
        bounds = (min(xs), min(ys), max(xs), max(ys)) if xs else None
    by_latent: dict[int, list[int]] = {}
    for rank, latents in session.execute(select(FeatureGroup.rank, FeatureGroup.latents)
                                         .where(FeatureGroup.sae_id == sae.id).order_by(FeatureGroup.rank)):
        for i in latents or []:
            by_latent.setdefault(int(i), []).append(rank)
    found = SAEStructure(m is not None, clusters, bounds, by_latent)
    with _structures_lock:
        if len(_structures) >= 64:  # older versions: nothing asks for them again
            _structures.clear()
        _structures[key] = found
    return found


def partner_dicts(session: Session, sae_id: int, partners: list) -> list[dict]:
    """Partners as the API and the page show them, with each partner's explanation."""
    expl = neighbor_explanations(session, sae_id, [p[0] for p in partners])
    return [{"index": j, "n_together": n, "p_partner_given_this": pji, "p_this_given_partner": pij, "lift": lift,
             "explanation": expl.get(j)} for j, n, pji, pij, lift in partners]


def sae_map(session: Session, sae_id: int) -> SAEMap | None:
    return session.get(SAEMap, sae_id)


def map_points(session: Session, sae_id: int) -> dict[str, list]:
    """Every latent on the map, as columns: index, x, y, cluster, log10 density, explanation."""
    rows = session.execute(
        select(_L.latent_index, _L.x, _L.y, _L.cluster, _F.density, _F.explanation)
        .join(Feature.__table__, (_F.sae_id == _L.sae_id) & (_F.index == _L.latent_index))
        .where(_L.sae_id == sae_id, _L.x.is_not(None)).order_by(_L.latent_index)).all()
    cols = list(zip(*rows)) if rows else [[]] * 6
    return {"index": list(cols[0]), "x": [round(v, 4) for v in cols[1]], "y": [round(v, 4) for v in cols[2]],
            "cluster": list(cols[3]), "density": [float(v) for v in cols[4]], "explanation": list(cols[5])}


def count_groups(session: Session, sae_id: int) -> int:
    return session.scalar(select(func.count()).select_from(FeatureGroup).where(FeatureGroup.sae_id == sae_id)) or 0


def list_groups(session: Session, sae_id: int, offset: int = 0, limit: int = 50) -> list[FeatureGroup]:
    """The groups of an SAE, most irreducible first."""
    return list(session.scalars(select(FeatureGroup).where(FeatureGroup.sae_id == sae_id)
                                .order_by(FeatureGroup.rank).offset(offset).limit(limit)))


def group(session: Session, sae_id: int, rank: int) -> FeatureGroup:
    g = session.scalar(select(FeatureGroup).where(FeatureGroup.sae_id == sae_id, FeatureGroup.rank == rank))
    if g is None:
        raise NotFound(f"no feature group {rank} in this SAE")
    return g


def group_summary(g) -> dict:
    """A group's headline numbers, as the API and the pages list them."""
    return {"rank": g.rank, "latents": g.latents, "n_tokens": g.n_tokens, "separability": g.separability,
            "mixture": g.mixture, "circle_residual": g.circle_residual, "variance_share": g.variance_share}
