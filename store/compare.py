"""The comparison of published SAEs (the /compare page and GET /api/v1/compare): for every SAE of a
model, or of every model, its L0 against FVU, CE recovered, interpretability, sparse-probing top-1
accuracy and absorption (SAEBench's measures, from report cards made with --probing /
--absorption), and which SAEs are on each Pareto front.

Numbers come from the SAE's latest report card (store/evaluations.py) when it has one, else from the
metrics its training run measured (the same trainer/evaluate.py code on fewer contexts); `source`
says which. Interpretability is the mean, over the SAE's scored latents, of each latent's best score
of one kind: detection or fuzzing (balanced accuracy of the LLM judge; answers the judge gave alike
to every example are left out, as on the feature page) or embedding (AUROC of explanation against
held-out windows). All three have 0.5 for chance and 1 for perfect, but they measure different
things: one kind is plotted at a time.
"""

from __future__ import annotations

import math

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from store.errors import NotFound
from store.evaluations import latest_evaluations
from store.models import LM, SAE, Explanation, Feature, SAEStatus

SCORES = ("detection", "fuzzing", "embedding")
# y axis -> whether lower is better (L0, the x axis, is always better lower).
AXES = {"fvu": True, "ce_recovered": False, "interpretability": False, "probing_top_1": False, "absorption": True}


def saebench_numbers(m: dict) -> dict:
    """SAEBench's measures from a report card's metrics (None where not measured): top-1 and top-5
    sparse-probing accuracy, and the mean absorption fraction (only when the probe could do the
    first-letter task well enough for the rate to be measured)."""
    sp = m.get("sparse_probing") if isinstance(m.get("sparse_probing"), dict) else {}
    ab = m.get("absorption") if isinstance(m.get("absorption"), dict) else {}
    return {"probing_top_1": _num(sp.get("sae_top_1_test_accuracy")),
            "probing_top_5": _num(sp.get("sae_top_5_test_accuracy")),
            "probing_llm": _num(sp.get("llm_test_accuracy")),
            "absorption": _num(ab.get("mean_absorption_fraction")) if ab.get("evaluated") else None,
            "absorption_probe_accuracy": _num(ab.get("probe_accuracy"))}


def _score_column(kind: str):
    if kind == "detection":
        return Explanation.detection_score, Explanation.detection_uninformative
    if kind == "fuzzing":
        return Explanation.fuzzing_score, Explanation.fuzzing_uninformative
    return Explanation.embedding_score, None


def interpretability(session: Session, sae_ids: list[int]) -> dict[int, dict[str, dict]]:
    """{sae_id: {kind: {"mean": m, "latents": n}}}: the mean of each scored latent's best score of
    that kind (two grouped queries per kind, whatever the number of latents)."""
    out: dict[int, dict[str, dict]] = {i: {} for i in sae_ids}
    if not sae_ids:
        return out
    for kind in SCORES:
        col, uninformative = _score_column(kind)
        best = (select(Feature.sae_id.label("sae_id"), func.max(col).label("best"))
                .select_from(Explanation).join(Feature, Explanation.feature_id == Feature.id)
                .where(Feature.sae_id.in_(sae_ids), col.is_not(None))
                .group_by(Feature.sae_id, Explanation.feature_id))
        if uninformative is not None:
            best = best.where(uninformative.is_not(True))
        best = best.subquery()
        for sae_id, mean, n in session.execute(
                select(best.c.sae_id, func.avg(best.c.best), func.count()).group_by(best.c.sae_id)):
            out[sae_id][kind] = {"mean": float(mean), "latents": int(n)}
    return out


def pareto_front(points: list[tuple[float | None, float | None]], lower_y_better: bool) -> list[bool]:
    """Which points no other point beats: another point dominates when its L0 (x) is no higher and its
    y no worse, one of them strictly. Points with a missing value are never on the front."""
    def ok(p):
        return p[0] is not None and p[1] is not None and math.isfinite(p[0]) and math.isfinite(p[1])

    def better_eq(a: float, b: float) -> bool:
        return a <= b if lower_y_better else a >= b

    flags = []
    for i, p in enumerate(points):
        if not ok(p):
            flags.append(False)
            continue
        dominated = any(ok(q) and j != i and q[0] <= p[0] and better_eq(q[1], p[1]) and (q[0] < p[0] or q[1] != p[1])
                        for j, q in enumerate(points))
        flags.append(not dominated)
    return flags


def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def comparison(session: Session, model: str | None = None, score: str | None = None) -> dict:
    """Every published SAE of `model` (None: of every model) with the numbers the plots and the table
    show; `score` picks the interpretability kind (None: the kind most of these SAEs have)."""
    stmt = select(SAE).join(LM, SAE.lm_id == LM.id).where(SAE.status == SAEStatus.ready.value)
    if model is not None:
        if "\x00" in model or len(model) > 200:  # PostgreSQL rejects NUL in text; no model has such a name
            raise NotFound(f"no model named {model[:200]!r}")
        if session.scalar(select(LM.id).where(LM.name == model)) is None:
            raise NotFound(f"no model named {model!r}")
        stmt = stmt.where(LM.name == model)
    if score is not None and score not in SCORES:
        raise NotFound(f"no interpretation score named {score!r}; use one of {', '.join(SCORES)}")
    saes = list(session.scalars(stmt.order_by(LM.name, SAE.name)))
    ids = [s.id for s in saes]
    evals = latest_evaluations(session, ids)
    interp = interpretability(session, ids)
    if score is None:  # the kind most SAEs have; detection first on a tie (the judge's score)
        score = max(SCORES, key=lambda k: (sum(k in interp[i] for i in ids), -SCORES.index(k)))
    rows = []
    for s in saes:
        ev = evals.get(s.id)
        m = (ev.metrics if ev is not None else s.metrics) or {}
        dead = m.get("dead_frac_eval") if ev is not None else m.get("dead_frac")
        mean = interp[s.id].get(score)
        rows.append({
            "name": s.name, "model": s.lm.name, "site": s.site, "layer": s.layer, "architecture": s.architecture,
            "d_sae": s.d_sae, "k": s.k,
            "source": "evaluation" if ev is not None else ("training" if m else None),
            "evaluated_at": ev.created_at.isoformat() if ev is not None and ev.created_at else None,
            "l0": _num(m.get("l0")), "fvu": _num(m.get("fvu")), "ce_recovered": _num(m.get("ce_recovered")),
            "ce_recovered_ci95": _num(m.get("ce_recovered_ci95")), "delta_lm_loss": _num(m.get("delta_lm_loss")),
            "delta_lm_loss_ci95": _num(m.get("delta_lm_loss_ci95")), "dead_frac": _num(dead),
            "interpretability": mean["mean"] if mean else None, "scored_latents": mean["latents"] if mean else 0,
            "scores": interp[s.id],
            **saebench_numbers(m if ev is not None else {}),
            "links": {"page": f"/saes/{s.name}", "api": f"/api/v1/saes/{s.name}"},
        })
    for axis, lower in AXES.items():
        for row, on in zip(rows, pareto_front([(r["l0"], r[axis]) for r in rows], lower)):
            row.setdefault("front", {})[axis] = on
    return {"model": model, "score": score, "scores": list(SCORES), "saes": rows}
