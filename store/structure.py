"""Reads of an SAE's structure: each latent's co-firing partners and place on the map, the map's
clusters, and its multi-dimensional feature groups (written at publish, see store/publish.py).

Like every read, these only see published (ready) SAEs: callers pass an SAE they got from
sae_by_name / sae_info, which already filtered on status.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

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


def latent_place(session: Session, sae_id: int, index: int) -> LatentPlace | None:
    """None when the SAE was published without structure (an older analysis)."""
    row = session.execute(select(_L.partners, _L.x, _L.y, _L.cluster)
                          .where(_L.sae_id == sae_id, _L.latent_index == index)).first()
    return LatentPlace(list(row[0] or []), row[1], row[2], row[3]) if row else None


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


def groups_of_latent(session: Session, sae_id: int, index: int) -> list[int]:
    """Ranks of the groups a latent belongs to (an SAE has a few hundred groups at most)."""
    rows = session.execute(select(FeatureGroup.rank, FeatureGroup.latents).where(FeatureGroup.sae_id == sae_id))
    return sorted(r for r, lat in rows if index in (lat or []))


def group_summary(g) -> dict:
    """A group's headline numbers, as the API and the pages list them."""
    return {"rank": g.rank, "latents": g.latents, "n_tokens": g.n_tokens, "separability": g.separability,
            "mixture": g.mixture, "circle_residual": g.circle_residual, "variance_share": g.variance_share}
