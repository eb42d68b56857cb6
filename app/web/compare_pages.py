"""/compare: published SAEs side by side (every SAE of one model with ?model=, else all of them).

Five Pareto plots, L0 against FVU, CE recovered, interpretability, SAEBench's sparse-probing top-1
accuracy and absorption fraction (store/compare.py has the
numbers and the fronts, the same as GET /api/v1/compare), and a table sorted on the server by any
column (its headers are links, so sorting needs no JavaScript). Every point and row links to its
SAE's page. The plots are inline SVG (app/web/charts.py): nothing is fetched from the network.
"""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session

import store
from app.api_error import ApiError
from app.deps import get_session, read_access
from app.web import charts
from app.web.rendering import pct, render
from store import compare

router = APIRouter(include_in_schema=False, dependencies=[Depends(read_access)])

# column key -> header text (the sortable columns of the table)
COLUMNS = {"name": "SAE", "model": "model", "site": "site", "architecture": "architecture", "d_sae": "latents",
           "l0": "L0", "fvu": "FVU", "ce_recovered": "CE recovered", "delta_lm_loss": "Δ LM loss",
           "dead_frac": "dead", "interpretability": "interpretability", "probing_top_1": "probing top-1",
           "probing_top_5": "probing top-5", "absorption": "absorption", "source": "numbers from"}
PLOTS = (("fvu", "FVU", "{:.3g}"), ("ce_recovered", "CE recovered", None), ("interpretability", "interpretability", "{:.3g}"),
         ("probing_top_1", "sparse probing top-1 accuracy", None), ("absorption", "absorption fraction", "{:.3g}"))


def _sorted(rows: list[dict], sort: str, order: str) -> list[dict]:
    """Rows by a column; a missing value sorts last whichever the order."""
    have = [r for r in rows if r.get(sort) is not None]
    missing = [r for r in rows if r.get(sort) is None]
    have.sort(key=lambda r: (r[sort], r["name"]), reverse=order == "desc")
    return have + missing


@router.get("/compare", response_class=HTMLResponse)
def compare_page(request: Request, model: str | None = Query(None, max_length=200),
                 score: str | None = Query(None, max_length=20), sort: str = Query("l0", max_length=30),
                 order: str = Query("asc", max_length=10), session: Session = Depends(get_session)):
    model = model or None
    if sort not in COLUMNS:
        raise ApiError(422, "invalid_parameters", f"sort must be one of {', '.join(COLUMNS)}")
    if order not in ("asc", "desc"):
        raise ApiError(422, "invalid_parameters", "order must be asc or desc")
    if score not in (None, "", *compare.SCORES):
        raise ApiError(422, "invalid_parameters", f"score must be one of {', '.join(compare.SCORES)}")
    data = compare.comparison(session, model, score or None)
    rows = data["saes"]
    archs = sorted({r["architecture"] for r in rows})
    series = {a: i for i, a in enumerate(archs)}
    plots = []
    for key, label, fmt in PLOTS:
        y_label = f"{label} ({data['score']})" if key == "interpretability" else label
        points = [{"x": r["l0"], "y": r[key], "href": r["links"]["page"], "series": series[r["architecture"]],
                   "front": r["front"][key], "hollow": r["source"] == "training",
                   "yerr": r["ce_recovered_ci95"] if key == "ce_recovered" else None,
                   "title": _title(r, key, label)} for r in rows]
        y_format = (lambda v, f=fmt: f.format(v)) if fmt else (lambda v: pct(v))
        plots.append({"key": key, "label": y_label,
                      "svg": charts.pareto_chart(points, x_label="L0", y_label=y_label,
                                                 lower_y_better=compare.AXES[key], y_format=y_format),
                      "front": [r["name"] for r in rows if r["front"][key]]})
    base = {k: v for k, v in {"model": model, "score": score or None}.items() if v}
    ctx = {"data": data, "rows": _sorted(rows, sort, order), "plots": plots, "legend": charts.legend(archs),
           "sort": sort, "order": order, "columns": COLUMNS, "model": model,
           "lms": sorted({s.lm.name for s in store.list_saes(session)}),
           "sort_qs": lambda col: urlencode({**base, "sort": col,
                                             "order": "desc" if sort == col and order == "asc" else "asc"}),
           "score_qs": lambda kind: urlencode({**base, "score": kind, "sort": sort, "order": order})}
    return render(request, "compare.html", ctx)


def _title(r: dict, key: str, label: str) -> str:
    y = r.get(key)
    shown = "–" if y is None else (pct(y) if key in ("ce_recovered", "probing_top_1") else f"{y:.4g}")
    if key == "ce_recovered" and r.get("ce_recovered_ci95") is not None:
        shown += f" ± {pct(r['ce_recovered_ci95'], 2)}"
    l0 = "–" if r.get("l0") is None else f"{r['l0']:.3g}"
    src = {"evaluation": "report card", "training": "training run"}.get(r["source"] or "", "no metrics")
    return f"{r['name']} ({r['architecture']}, {r['d_sae']:,} latents, {r['site']}): L0 {l0}, {label} {shown} [{src}]"
