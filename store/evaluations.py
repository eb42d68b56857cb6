"""Report cards (`sae-atlas evaluate`): the write of one evaluation, and the reads of an SAE's latest,
shared by the SAE page, the SAE API and the comparison (store/compare.py).

An evaluation is appended, never replaced: the newest row of an SAE is its report card, older ones
stay as its history. A republished SAE is a new row of `saes`, so its old evaluations go with the old
row (ON DELETE CASCADE): they measured other weights.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from store.errors import AtlasError
from store.models import SAE, SAEEvaluation, SAEStatus


def write_evaluation(session: Session, sae_id: int, settings: dict, metrics: dict, n_tokens: int) -> int:
    """Store one evaluation of a published SAE; returns its id."""
    from store.publish import clean_json

    row = SAEEvaluation(sae_id=sae_id, settings=clean_json(settings), metrics=clean_json(metrics), n_tokens=int(n_tokens))
    session.add(row)
    session.flush()
    return row.id


def published_at_folder(session: Session, folder: Path) -> SAE | None:
    """The published SAE whose weights are the folder (it was published from there), if any."""
    path = str(Path(folder).expanduser().resolve())
    return session.scalar(select(SAE).where(SAE.weights_path == path, SAE.status == SAEStatus.ready.value)
                          .order_by(SAE.id.desc()).limit(1))


def weights_folder(sae: SAE) -> Path:
    """The folder a published SAE's weights were published from, which must still be on this machine."""
    path = Path(sae.weights_path or "")
    if not sae.weights_path or not path.exists():
        raise AtlasError(f"the weights of {sae.name!r} are not at {sae.weights_path!r} on this machine",
                         "evaluate on the machine that published it, or pass the SAE folder instead of the name")
    return path


def latest_evaluation(session: Session, sae_id: int) -> SAEEvaluation | None:
    return session.scalar(select(SAEEvaluation).where(SAEEvaluation.sae_id == sae_id)
                          .order_by(SAEEvaluation.id.desc()).limit(1))


def latest_evaluations(session: Session, sae_ids: list[int]) -> dict[int, SAEEvaluation]:
    """The newest evaluation of each SAE that has one (one query)."""
    if not sae_ids:
        return {}
    newest = (select(SAEEvaluation.sae_id, func.max(SAEEvaluation.id).label("id"))
              .where(SAEEvaluation.sae_id.in_(sae_ids)).group_by(SAEEvaluation.sae_id).subquery())
    rows = session.scalars(select(SAEEvaluation).join(newest, SAEEvaluation.id == newest.c.id))
    return {r.sae_id: r for r in rows}


def evaluation_dict(ev: SAEEvaluation | None) -> dict | None:
    """An evaluation as the API and the pages show it."""
    if ev is None:
        return None
    return {"id": ev.id, "created_at": ev.created_at.isoformat() if ev.created_at else None,
            "n_tokens": ev.n_tokens, "settings": ev.settings or {}, "metrics": ev.metrics or {}}


def evaluation_tag(ev: SAEEvaluation | None) -> str:
    """Part of an SAE's ETag: a new evaluation changes what its page and API response show."""
    return f"e{ev.id}" if ev is not None else "e0"
