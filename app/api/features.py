"""Features of an SAE: the filtered table, one feature's whole dashboard, neighbours, examples.

Every handler is a plain `def`: FastAPI runs it in its thread pool, so no database read ever
blocks the event loop (and with it every other request).
"""

from typing import Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from sqlalchemy.orm import Session

import store
from app.api_error import ApiError
from app.api.schemas import READ_ERRORS, FeatureExamplesOut, FeatureOut, FeaturePage, NeighborsOut
from app.deps import get_session, read_access
from store.models import ExampleKind
from app.responses import JSON, RawJSON, cache_headers, dumps, etag_matches, not_modified

router = APIRouter(tags=["features"], dependencies=[Depends(read_access)], responses=READ_ERRORS)

Index = Path(ge=0, le=store.MAX_LATENT_INDEX, description="latent index (0-based)")
SaeName = Path(min_length=1, max_length=200, description="name of a published SAE")


def table_query(sort, order, density_min, density_max, has_explanation, score_min, page, per_page) -> store.TableQuery:
    if density_min is not None and density_max is not None and density_min > density_max:
        raise ApiError(422, "invalid_parameters", "density_min must not exceed density_max",
                       [{"location": "query.density_min", "message": "must not exceed density_max"}])
    return store.TableQuery(sort, order, density_min, density_max, has_explanation, score_min, page, per_page)


@router.get("/saes/{sae}/features", summary="Features of an SAE, filtered, sorted and paginated",
            response_model=FeaturePage)
def list_features(
    sae: str = SaeName,
    sort: Literal["index", "density", "max", "mean", "score"] = "index",
    order: Literal["asc", "desc"] = "asc",
    density_min: float | None = Query(None, ge=0, le=1, allow_inf_nan=False),
    density_max: float | None = Query(None, ge=0, le=1, allow_inf_nan=False),
    has_explanation: bool | None = None,
    score_min: float | None = Query(None, ge=0, le=1, allow_inf_nan=False),
    page: int = Query(1, ge=1, le=1_000_000),
    per_page: int = Query(50, ge=1, le=store.MAX_PAGE_SIZE),
    session: Session = Depends(get_session),
):
    s = store.sae_by_name(session, sae)
    q = table_query(sort, order, density_min, density_max, has_explanation, score_min, page, per_page)
    rows, total = store.feature_table(session, s, q)
    vocab = store.vocab_for(session, s.lm_id)
    return JSON({"sae": s.name, "items": [store.feature_summary(f, vocab) for f in rows], "total": total, "page": page,
                 "per_page": per_page, "pages": (total + per_page - 1) // per_page})


def _links(sae: str, index: int, d_sae: int) -> dict:
    base = f"/api/v1/saes/{sae}/features"
    return {"self": f"{base}/{index}", "page": f"/saes/{sae}/features/{index}",
            "neighbors": f"{base}/{index}/neighbors", "examples": f"{base}/{index}/examples",
            "prev": f"{base}/{index - 1}" if index > 0 else None,
            "next": f"{base}/{index + 1}" if index + 1 < d_sae else None}


@router.get("/saes/{sae}/features/{index}", summary="One feature with everything on its page",
            response_model=FeatureOut, responses={304: {"description": "Not modified (If-None-Match)"}})
def get_feature(request: Request, sae: str = SaeName, index: int = Index, session: Session = Depends(get_session)):
    f = store.load_feature(session, sae, index)
    neighbor_expl = store.shown_neighbor_explanations(session, f)
    etag = f.etag(neighbors=neighbor_expl)
    if etag_matches(request, etag):
        return not_modified(etag)
    key = ("json", f.sae.id, index, etag)
    body = store.RENDERED.get(key)
    if body is None:
        vocab = store.vocab_for(session, f.sae.lm_id)
        payload = store.feature_payload(session, f.sae, f, vocab, neighbor_expl=neighbor_expl)
        payload["links"] = _links(f.sae.name, index, f.sae.d_sae)
        body = dumps(payload)
        store.RENDERED.put(key, body)
    return RawJSON(body, headers=cache_headers(etag))


@router.get("/saes/{sae}/features/{index}/neighbors", summary="Nearest features by decoder cosine similarity",
            response_model=NeighborsOut, responses={304: {"description": "Not modified (If-None-Match)"}})
def get_neighbors(request: Request, sae: str = SaeName, index: int = Index,
                  k: int = Query(10, ge=1, le=100, description="how many neighbours (1-100)"),
                  session: Session = Depends(get_session)):
    f = store.load_feature(session, sae, index)
    expl = store.shown_neighbor_explanations(session, f, k)
    etag = f.etag(neighbors=expl, k=k)
    if etag_matches(request, etag):
        return not_modified(etag)
    near = [(int(j), c) for j, c in (f.neighbors or [])[:k]]
    items = [{"index": j, "cosine": c, "explanation": expl.get(j),
              "links": {"self": f"/api/v1/saes/{sae}/features/{j}", "page": f"/saes/{sae}/features/{j}"}}
             for j, c in near]
    return JSON({"sae": sae, "index": index, "k": k, "items": items, "available": len(f.neighbors or [])},
                headers=cache_headers(etag))


@router.get("/saes/{sae}/features/{index}/examples", summary="A feature's examples with per-token activations",
            response_model=FeatureExamplesOut, responses={304: {"description": "Not modified (If-None-Match)"}})
def get_examples(request: Request, sae: str = SaeName, index: int = Index,
                       kind: Literal[(*ExampleKind.__members__, "all")] = "all",
                       session: Session = Depends(get_session)):
    f = store.load_feature(session, sae, index)
    etag = f'W/"{f.sae.version[:16]}-{index}-ex-{kind}"'  # examples change only when the SAE is republished
    if etag_matches(request, etag):
        return not_modified(etag)
    vocab = store.vocab_for(session, f.sae.lm_id)
    wanted = None if kind == "all" else ExampleKind[kind].value
    rows = [ex for ex in store.examples_for(session, f.id) if wanted is None or ex.kind == wanted]
    items = store.example_dicts(rows, vocab)
    for ex, d in zip(rows, items):
        d["kind"] = ExampleKind(ex.kind).name
        d["interval"] = ex.interval
    return JSON({"sae": sae, "index": index, "kind": kind, "items": items}, headers=cache_headers(etag))
