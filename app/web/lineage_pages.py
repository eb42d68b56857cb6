"""Pages of feature lineage and dark matter:

- /relations and /relations/{a}/{b}: the relations of the atlas, and one pair of SAEs (best-match
  distribution, shares matched at each threshold, the splitting forest as trees or the matches,
  the novel latents of the wider SAE);
- /models/{model}: the layer map, the persistence of features at each adjacent pair;
- /saes/{name}/misses: what an SAE misses (dark matter);
- the "across layers / across widths" panel of a feature page (templates/_feature_lineage.html),
  which asks for its data through the `feature_lineage` template global registered here.

Like every page: server-rendered, SVG charts, no inline script or style, usable without JavaScript.
"""

from __future__ import annotations

import math

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import HTMLResponse
from markupsafe import Markup
from sqlalchemy import select
from sqlalchemy.orm import Session

import store
from app.api_error import ApiError
from app.deps import get_session, read_access
from store.errors import NotFound
from store.models import LM
from store import lineage
from app.web import charts
from app.web.rendering import env, examples_html, render

router = APIRouter(include_in_schema=False, dependencies=[Depends(read_access)])

VIEWS = {"width": ("split", "persisted_split", "persisted", "novel", "reconstruction", "vanished"),
         "layer": ("matched", "unconfirmed"), "seed": ("matched", "unconfirmed")}
TREE_VIEWS = ("split", "persisted_split", "persisted")  # parents of A with their children in B
PER_PAGE = 25


def _brief(f, vocab: store.Vocab) -> dict:
    """What a link to a latent shows beside its number: explanation, peak token, top logits, density."""
    if f is None:
        return {}
    top = [t for t, _ in (f.logits or {}).get("top", [])[:3]]
    return {"explanation": f.explanation, "density": f.density,
            "peak_html": Markup(vocab.chip_html(f.peak_token_id)) if f.peak_token_id is not None else None,
            "logits_html": [Markup(vocab.chip_html(t)) for t in top]}


def _link(link, v: lineage.RelationView, briefs_a: dict, briefs_b: dict, vocab) -> dict:
    return {"a": link.a_index, "b": link.b_index, "label": link.label, "kind": link.kind, "cos": link.cos, "rho": link.rho,
            "p_b_given_a": link.p_b_given_a, "p_a_given_b": link.p_a_given_b, "stitch_gain": link.stitch_gain,
            "a_url": f"/saes/{v.a.name}/features/{link.a_index}" if link.a_index is not None else None,
            "b_url": f"/saes/{v.b.name}/features/{link.b_index}" if link.b_index is not None else None,
            "a_brief": _brief(briefs_a.get(link.a_index), vocab), "b_brief": _brief(briefs_b.get(link.b_index), vocab)}


# --- the feature page's panel ---------------------------------------------------------------------

def feature_lineage(request: Request, sae, index: int) -> dict | None:
    """Context of templates/_feature_lineage.html: None when the SAE has no relations. Reads with its
    own session (the feature page renders from cached rows); the page's ETag carries the relation
    graph's tag (store.lineage.RelationGraph.tag), so a cached page never outlives what it shows."""
    with request.app.state.read_sessionmaker() as session:
        graph = lineage.relation_graph(session)
        lin = lineage.feature_lineage(session, sae.id, index, graph)
        if not lin["related"]:
            return None
        vocab = store.vocab_for(session, sae.lm_id)

        def hop(h):
            f = lineage.feature_briefs(session, h["sae"].id, [h["index"]]).get(h["index"])
            return {"sae": h["sae"].name, "layer": h["sae"].layer, "site": h["sae"].site, "index": h["index"],
                    "cos": h["cos"], "rho": h["rho"], "label": h["label"], "url": f"/saes/{h['sae'].name}/features/{h['index']}",
                    **_brief(f, vocab)}

        widths = []
        for w in lin["widths"]:
            v = w["relation"]
            if w["role"] == "parent":
                kids = w["children"]
                briefs_b = lineage.feature_briefs(session, v.b.id, [k.b_index for k in kids])
                widths.append({"role": "parent", "other": v.b, "url": f"/relations/{v.a.name}/{v.b.name}",
                               "vanished": w["vanished"], "children": [_link(k, v, {}, briefs_b, vocab) for k in kids]})
            else:
                mine, sibs = w["link"], w["siblings"]
                briefs_a = lineage.feature_briefs(session, v.a.id, [mine.a_index] if mine is not None else [])
                briefs_b = lineage.feature_briefs(session, v.b.id, [s.b_index for s in sibs])
                widths.append({"role": "child", "other": v.a, "url": f"/relations/{v.a.name}/{v.b.name}",
                               "link": _link(mine, v, briefs_a, {}, vocab) if mine is not None else None,
                               "siblings": [_link(s, v, {}, briefs_b, vocab) for s in sibs]})
        layers = [v for v in graph.of(sae.id) if v.kind == "layer"]
        return {"backward": [hop(h) for h in lin["layers"]["backward"]],
                "forward": [hop(h) for h in lin["layers"]["forward"]],
                "layer_relations": [{"other": v.b if v.a.id == sae.id else v.a, "url": f"/relations/{v.a.name}/{v.b.name}"}
                                    for v in layers],
                "widths": widths, "here": {"layer": int(sae.site.split(".")[1]), "index": index}}


def sae_relations(request: Request, sae) -> list[dict]:
    """Context of templates/_sae_lineage.html: the SAE's relations with a one-line headline each."""
    with request.app.state.read_sessionmaker() as session:
        out = []
        for v in lineage.relations_of(session, sae.id):
            s = v.relation.summary or {}
            if v.kind == "width":
                sp = s.get("splitting", {})
                parents = sp.get("parents", {})
                head = (f"{parents.get('split', 0) + parents.get('persisted_split', 0):,} latents split, "
                        f"{sp.get('children', {}).get('novel', 0):,} novel in the wider one")
            else:
                persistence = (s.get("matching") or {}).get("persistence")
                head = f"{100 * persistence:.0f}% of latents persist" if persistence is not None else ""
            other = v.b if v.a.id == sae.id else v.a
            out.append({"kind": v.kind, "other": {"name": other.name, "site": other.site, "d_sae": other.d_sae},
                        "url": f"/relations/{v.a.name}/{v.b.name}", "headline": head})
        return out


env.globals["feature_lineage"] = feature_lineage
env.globals["sae_relations"] = sae_relations


# --- relations ------------------------------------------------------------------------------------

@router.get("/relations", response_class=HTMLResponse)
def relations_page(request: Request, page: int = Query(1, ge=1, le=100_000), session: Session = Depends(get_session)):
    views, total = lineage.list_relations(session, page=page, per_page=100)
    return render(request, "relations.html", {"views": views, "total": total, "page": page,
                                              "pages": max(1, math.ceil(total / 100))})


@router.get("/relations/{a}/{b}", response_class=HTMLResponse)
def relation_page(request: Request, a: str = Path(max_length=200), b: str = Path(max_length=200),
                  view: str | None = Query(None, max_length=20), page: int = Query(1, ge=1, le=100_000),
                  session: Session = Depends(get_session)):
    v = lineage.relation_between(session, a, b)
    views = VIEWS[v.kind]
    if view is not None and view not in views:
        raise ApiError(422, "invalid_parameters", f"view must be one of {', '.join(views)} for a {v.kind} pair")
    vocab = store.vocab_for(session, v.a.lm_id)
    s = v.relation.summary or {}
    if v.kind == "width":
        sp = s.get("splitting", {})
        counts = {**{k: sp.get("parents", {}).get(k, 0) for k in ("split", "persisted_split", "persisted", "vanished")},
                  **{k: sp.get("children", {}).get(k, 0) for k in ("novel", "reconstruction")}}
    else:
        _, n_matched = lineage.links(session, v.relation.id, "matched", per_page=1)
        _, n_unconf = lineage.links(session, v.relation.id, "unconfirmed", per_page=1)
        counts = {"matched": n_matched, "unconfirmed": n_unconf}
    view = view or next((name for name in views if counts.get(name)), views[0])  # the first view with something in it
    ctx = {"v": v, "s": s, "view": view, "views": views, "page": page, "vocab": vocab, "counts": counts}
    if view in TREE_VIEWS:
        forest, total = lineage.split_forest(session, v, view, page, PER_PAGE)
        briefs_a = lineage.feature_briefs(session, v.a.id, [p for p, _ in forest])
        briefs_b = lineage.feature_briefs(session, v.b.id, [k.b_index for _, kids in forest for k in kids])
        ctx["trees"] = [{"parent": p, "url": f"/saes/{v.a.name}/features/{p}", "brief": _brief(briefs_a.get(p), vocab),
                         "children": [_link(k, v, {}, briefs_b, vocab) for k in kids]} for p, kids in forest]
    else:
        sort = {"novel": "stitch_gain", "reconstruction": "stitch_gain", "vanished": "a", "matched": "rho",
                "unconfirmed": "cos"}[view]
        rows, total = lineage.links(session, v.relation.id, view, sort=sort, order="asc" if sort == "a" else "desc",
                                    page=page, per_page=PER_PAGE)
        briefs_a = lineage.feature_briefs(session, v.a.id, [r.a_index for r in rows])
        briefs_b = lineage.feature_briefs(session, v.b.id, [r.b_index for r in rows])
        ctx["rows"] = [_link(r, v, briefs_a, briefs_b, vocab) for r in rows]
    ctx["total"] = total
    ctx["pages"] = max(1, math.ceil(total / PER_PAGE))
    if page > ctx["pages"] and total:
        raise NotFound(f"page {page} is past the last page ({ctx['pages']})")
    return render(request, "relation.html", ctx)


# --- the layer map --------------------------------------------------------------------------------

@router.get("/models/{model:path}", response_class=HTMLResponse)
def model_page(request: Request, model: str = Path(max_length=200), session: Session = Depends(get_session)):
    lm = session.scalar(select(LM).where(LM.name == model))
    if lm is None:
        raise NotFound(f"no model named {model!r}")
    layers, rows = lineage.layer_rows(session, lm)
    widths = [v for v in lineage.list_relations(session, model=lm.name, kind="width", per_page=500)[0]]
    saes = [s for s in store.list_saes(session) if s.lm_id == lm.id]
    for row in rows:
        by_layer = {s["layer"]: s for s in row["saes"]}
        pair_after = {c["layer_a"]: c for c in row["pairs"]}
        cells = []
        for layer in layers:
            cells.append({"kind": "sae", "sae": by_layer.get(layer)})
            if layer != layers[-1]:
                cells.append({"kind": "pair", "pair": pair_after.get(layer) if layer in by_layer else None})
        row["cells"] = cells
    # one bar per adjacent pair of each row; rows differ by width (and site kind), so say which
    kinds = {r["site_kind"] for r in rows}
    chart_pairs = [(r, c) for r in rows for c in r["pairs"]]
    chart = charts.value_bars([c["persistence"] for _, c in chart_pairs],
                              [f"{r['site_kind'] + ' ' if len(kinds) > 1 else ''}{c['layer_a']}→{c['layer_b']} · "
                               f"{r['d_sae']:,}" for r, c in chart_pairs], label="persistence at each adjacent pair",
                              y_format=lambda x: f"{100 * x:.0f}%") if chart_pairs else None
    return render(request, "model.html", {"lm": lm, "layers": layers, "rows": rows, "widths": widths, "saes": saes,
                                          "chart": chart})


# --- what an SAE misses ---------------------------------------------------------------------------

def _q_label(q: float) -> str:
    return f"{100 * q:g}%"


@router.get("/saes/{name}/misses", response_class=HTMLResponse)
def misses_page(request: Request, name: str = Path(max_length=200), session: Session = Depends(get_session)):
    sae = store.sae_by_name(session, name)
    data = lineage.dark_matter(session, sae.id)
    vocab = store.vocab_for(session, sae.lm_id)
    ctx = {"sae": sae, "lm": sae.lm, "d": data, "pairs": lineage.pair_dark_matter(session, sae), "vocab": vocab}
    if data:
        pos = data.get("by_position", {}).get("fvu", [])
        ctx["position_chart"] = charts.value_bars(pos, [str(i) for i in range(len(pos))], label="FVU by position in the context",
                                                  tick_every=max(1, len(pos) // 8), reference=data.get("fvu"))
        sp = data.get("spliced") or {}
        conc = sp.get("concentration") or {}
        if conc.get("q"):
            ctx["concentration_chart"] = charts.category_lines(
                {"share of the loss increase (dCE > 0)": conc.get("delta_ce", []), "share of the KL divergence": conc.get("kl", [])},
                [_q_label(q) for q in conc["q"]], label="held by the top q% of tokens", y_max=1.0,
                y_format=lambda x: f"{100 * x:.0f}%", diagonal=list(conc["q"]))
            ctx["concentration"] = list(zip(conc["q"], conc.get("delta_ce", []), conc.get("kl", [])))
        for group in ("highest_fvu", "most_error"):
            for row in data.get("by_token", {}).get(group, []):
                row["html"] = Markup(vocab.chip_html(row["token_id"]))
        contexts = (data.get("nonlinear") or {}).get("contexts", [])
        scale = max((max(c["nonlinear"]) for c in contexts if c["nonlinear"]), default=1.0)
        ctx["nonlinear_html"] = examples_html([{"token_ids": c["token_ids"], "acts": c["nonlinear"], "peak": c["peak"],
                                                "activation": c["score"]} for c in contexts], vocab, scale)
        top = sp.get("top_tokens", [])
        ctx["top_dce_html"] = examples_html([{"token_ids": t["token_ids"], "acts": [0.0] * len(t["token_ids"]),
                                              "peak": t["peak"] + 1, "activation": t["delta_ce"]} for t in top], vocab, 1.0)
        ctx["top_dce"] = top
    return render(request, "misses.html", ctx)
