"""The feature table of an SAE: filter, sort, page."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from store.models import SAE, Feature
from store.vocab import Vocab

SORTS = {
    "index": Feature.index,
    "density": Feature.density,
    "max": Feature.max_act,
    "mean": Feature.mean_act,
    "score": Feature.best_score,
}
MAX_PAGE_SIZE = 200


@dataclass
class TableQuery:
    sort: str = "index"
    order: str = "asc"
    density_min: float | None = None
    density_max: float | None = None
    has_explanation: bool | None = None
    score_min: float | None = None
    page: int = 1
    per_page: int = 50


def feature_table(session: Session, sae: SAE, q: TableQuery) -> tuple[list[Feature], int]:
    conds = [Feature.sae_id == sae.id]
    if q.density_min is not None:
        conds.append(Feature.density >= q.density_min)
    if q.density_max is not None:
        conds.append(Feature.density <= q.density_max)
    if q.has_explanation is True:
        conds.append(Feature.explanation.is_not(None))
    elif q.has_explanation is False:
        conds.append(Feature.explanation.is_(None))
    if q.score_min is not None:
        conds.append(Feature.best_score >= q.score_min)
    where = and_(*conds)
    total = session.scalar(select(func.count()).select_from(Feature).where(where))
    col = SORTS[q.sort]
    ordering = col.desc().nulls_last() if q.order == "desc" else col.asc().nulls_last()
    rows = session.scalars(select(Feature).where(where).order_by(ordering, Feature.index)
                           .offset((q.page - 1) * q.per_page).limit(q.per_page))
    return list(rows), int(total or 0)


def feature_summary(f: Feature, vocab: Vocab) -> dict:
    return {"index": f.index, "density": f.density, "max": f.max_act, "mean": f.mean_act,
            "firing_count": f.firing_count, "explanation": f.explanation, "best_score": f.best_score,
            "peak_token": None if f.peak_token_id is None else vocab.text(f.peak_token_id),
            "peak_token_id": f.peak_token_id, "peak_token_share": f.peak_token_share,
            "top_logits": [vocab.text(t) for t, _ in (f.logits or {}).get("top", [])[:5]],
            "top_logit_ids": [t for t, _ in (f.logits or {}).get("top", [])[:5]]}
