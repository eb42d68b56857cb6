"""Attribution graph pages: the list with a form to submit a prompt, and one graph's page.

The graph page is drawn by static/graph.js from GET /api/v1/graphs/{slug}: nodes by layer x token
position, edges by sign and weight, a pruning slider over the stored influence, hover (the
published SAE's explanation and top activations of a transcoder feature, when its layer is
published), pinning and supernodes (kept in the URL's fragment), and steering a node
(POST /api/v1/graphs/{slug}/steer). The page itself needs no script to show the status and scores.
"""

from __future__ import annotations

import json
import typing

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy.orm import Session

from app import graphs as service
from app.api_error import ApiError
from app.deps import get_session, read_access
from app.security import CSRF_FIELD, csrf_valid
from app.web.rendering import forbidden_form, form_key, render
from store import graphs as gstore
from store.errors import AtlasError, NotFound

router = APIRouter(include_in_schema=False, dependencies=[Depends(read_access)])
NO_STORE = {"Cache-Control": "no-store"}
PER_PAGE = 50
MAX_LAYERS = 256
Slug = Path(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$")


def layer_saes(session: Session, row) -> dict[int, str]:
    """layer -> published SAE name for the graph's transcoders (see store.graphs.published_layers)."""
    from trainer.transcoders.sets import load_transcoder_set

    try:
        tset = load_transcoder_set(row.set_path, complete=False)
    except AtlasError:  # the set's folder moved since: match by model and site alone
        return gstore.published_layers(session, row.model, {layer: "" for layer in range(MAX_LAYERS)}, row.set_name)
    folders = {layer: str(tset.folder(layer).resolve()) for layer in tset.layers}
    return gstore.published_layers(session, row.model, folders, row.set_name)


def _list_page(request: Request, session: Session, values: dict | None = None, error: str | None = None,
               status: int = 200, page: int = 1) -> HTMLResponse:
    rows = gstore.list_graphs(session, PER_PAGE, (page - 1) * PER_PAGE)
    total = gstore.count_graphs(session)
    ctx = {"graphs": rows, "total": total, "page": page, "pages": max(1, (total + PER_PAGE - 1) // PER_PAGE),
           "sets": service.available_sets(), "v": values or {}, "error": error}
    return render(request, "graphs.html", ctx, status=status, headers=NO_STORE)


@router.get("/graphs", response_class=HTMLResponse)
def graphs_page(request: Request, page: int = Query(1, ge=1, le=100_000), session: Session = Depends(get_session)):
    return _list_page(request, session, page=page)


async def _form(request: Request) -> dict[str, str]:
    form = await request.form(max_files=0, max_fields=20)
    out: dict[str, typing.Any] = {}
    for name in ("set", "prompt", "api_key", CSRF_FIELD):
        v = form.get(name)
        out[name] = str(v)[:4000] if isinstance(v, str) else ""
    return out


@router.post("/graphs", response_class=HTMLResponse)
def submit_graph(request: Request, form: dict = Depends(_form), session: Session = Depends(get_session)):
    if not csrf_valid(request, form[CSRF_FIELD]):
        return forbidden_form(request)
    values = {"set": form["set"], "prompt": form["prompt"]}
    key, status, message = form_key(session, request, form["api_key"], "compute a graph")
    if key is None:
        return _list_page(request, session, values, message, status)
    if not form["prompt"].strip():
        return _list_page(request, session, values, "Type a prompt to attribute.", 422)
    try:
        row = service.submit(session, form["set"], form["prompt"], requested_by=key.name)
    except NotFound as exc:
        session.rollback()
        return _list_page(request, session, values, exc.one_line(), 404)
    except AtlasError as exc:
        session.rollback()
        return _list_page(request, session, values, exc.one_line(), 422)
    session.commit()
    return RedirectResponse(f"/graphs/{row.slug}", status_code=303)


@router.get("/graphs/{slug}", response_class=HTMLResponse)
def graph_page(request: Request, slug: str = Slug, session: Session = Depends(get_session)):
    try:
        row = gstore.get_graph(session, slug)
    except NotFound as exc:
        raise ApiError(404, "not_found", exc.one_line()) from None
    saes = layer_saes(session, row) if row.status == "done" else {}
    ctx = {"g": row, "saes_json": json.dumps({str(k): v for k, v in saes.items()}),
           "live": row.status in ("queued", "running")}
    return render(request, "graph.html", ctx, headers=NO_STORE)
