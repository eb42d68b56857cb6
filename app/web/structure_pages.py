"""Pages of an SAE's structure:

- /saes/{name}/map: every latent on a canvas (static/map.js: pan, zoom, hover, click, search,
  colour by cluster or density); the points come from GET /api/v1/saes/{name}/map;
- /saes/{name}/groups and /saes/{name}/groups/{rank}: multi-dimensional feature groups, most
  irreducible first, and one group's 2-D scatter (server-rendered SVG, coloured by token);
- the feature page's "what fires together" panel and its place on the map
  (templates/_feature_structure.html, through the `feature_structure` template global).

Like every page: no inline script or style; the map needs JavaScript (it says so without it).
"""

from __future__ import annotations

import math
from collections import Counter

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session

import store
from app.deps import get_session, read_access
from app.web import charts
from app.web.rendering import render
from store import structure

router = APIRouter(include_in_schema=False, dependencies=[Depends(read_access)])
GROUPS_PER_PAGE = 50
TOKEN_COLOURS = 10  # the most frequent tokens of a scatter get a colour each, the rest grey


def feature_structure(session: Session, sae, index: int) -> dict | None:
    """Context of templates/_feature_structure.html; None when the SAE has no structure rows. Called
    by the feature page with its own session; what every latent shares (clusters, the map's frame,
    group membership) comes from store.structure.sae_structure's per-version memory."""
    place = structure.latent_place(session, sae.id, index)
    if place is None:
        return None
    shared = structure.sae_structure(session, sae)
    here = (place.x, place.y) if place.x is not None else None
    return {"partners": structure.partner_dicts(session, sae.id, place.partners),
            "map": shared.has_map, "cluster": shared.clusters.get(place.cluster),
            "thumbnail": charts.map_thumbnail(list(shared.clusters.values()), here, bounds=shared.bounds,
                                              href=f"/saes/{sae.name}/map?focus={index}") if shared.has_map else None,
            "groups": shared.groups_by_latent.get(index, [])}


@router.get("/saes/{name}/map", response_class=HTMLResponse)
def map_page(request: Request, name: str = Path(max_length=200), focus: int | None = Query(None, ge=0, le=store.MAX_LATENT_INDEX),
             session: Session = Depends(get_session)):
    sae = store.sae_by_name(session, name)
    m = structure.sae_map(session, sae.id)
    return render(request, "map.html", {"sae": sae, "lm": sae.lm, "m": m, "focus": focus if focus is not None and focus < sae.d_sae else None,
                                        "n_groups": structure.count_groups(session, sae.id)})


@router.get("/saes/{name}/groups", response_class=HTMLResponse)
def groups_page(request: Request, name: str = Path(max_length=200), page: int = Query(1, ge=1, le=100_000),
                session: Session = Depends(get_session)):
    sae = store.sae_by_name(session, name)
    total = structure.count_groups(session, sae.id)
    rows = structure.list_groups(session, sae.id, (page - 1) * GROUPS_PER_PAGE, GROUPS_PER_PAGE)
    latents = sorted({i for g in rows for i in g.latents})
    expl = store.neighbor_explanations(session, sae.id, latents)
    return render(request, "groups.html", {"sae": sae, "lm": sae.lm, "page": page, "total": total,
                                           "pages": max(1, math.ceil(total / GROUPS_PER_PAGE)),
                                           "groups": [structure.group_summary(g) for g in rows], "expl": expl})


@router.get("/saes/{name}/groups/{rank}", response_class=HTMLResponse)
def group_page(request: Request, name: str = Path(max_length=200), rank: int = Path(ge=0, le=1_000_000),
               session: Session = Depends(get_session)):
    sae = store.sae_by_name(session, name)
    g = structure.group(session, sae.id, rank)
    vocab = store.vocab_for(session, sae.lm_id)
    sc = g.scatter or {}
    tokens = sc.get("token", [])
    top = [t for t, _ in Counter(tokens).most_common(TOKEN_COLOURS)]
    colour = {t: i for i, t in enumerate(top)}
    titles = [f"{vocab.text(t)!r} · latent #{lat}" for t, lat in zip(tokens, sc.get("latent", []))]
    chart = charts.scatter(sc.get("x", []), sc.get("y", []), [colour.get(t, -1) for t in tokens], titles,
                                          label=f"group {rank}: reconstructions on the top two principal components")
    counts = Counter(tokens)
    legend = [{"k": colour[t], "text": vocab.text(t), "count": counts[t]} for t in top]
    expl = store.neighbor_explanations(session, sae.id, g.latents)
    return render(request, "group.html", {"sae": sae, "lm": sae.lm, "g": structure.group_summary(g), "chart": chart,
                                          "legend": legend, "expl": expl, "total": structure.count_groups(session, sae.id)})
