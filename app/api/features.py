"""Features of an SAE: the filtered table, one feature's whole dashboard, neighbours, examples."""

from typing import Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response
from sqlalchemy.orm import Session

from app import store
from app.api.errors import ApiError
from app.deps import get_session, read_access
from app.models import ExampleKind
from app.responses import JSON

router = APIRouter(tags=["features"], dependencies=[Depends(read_access)])

Index = Path(ge=0, le=2**31 - 1, description="latent index")


def _table_query(sort, order, density_min, density_max, has_explanation, score_min, page, per_page) -> store.TableQuery:
    if density_min is not None and density_max is not None and density_min > density_max:
        raise ApiError(422, "invalid_parameters", "density_min must not exceed density_max")
    return store.TableQuery(sort, order, density_min, density_max, has_explanation, score_min, page, per_page)


@router.get("/saes/{sae}/features", summary="Features of an SAE, filtered, sorted and paginated")
def list_features(
    sae: str,
    sort: Literal["index", "density", "max", "mean", "score"] = "index",
    order: Literal["asc", "desc"] = "asc",
    density_min: float | None = Query(None, ge=0, le=1),
    density_max: float | None = Query(None, ge=0, le=1),
    has_explanation: bool | None = None,
    score_min: float | None = Query(None, ge=0, le=1),
    page: int = Query(1, ge=1, le=1_000_000),
    per_page: int = Query(50, ge=1, le=store.MAX_PAGE_SIZE),
    session: Session = Depends(get_session),
):
    s = store.sae_by_name(session, sae)
    q = _table_query(sort, order, density_min, density_max, has_explanation, score_min, page, per_page)
    rows, total = store.feature_table(session, s, q)
    vocab = store.vocab_for(session, s.lm_id)
    return JSON({"items": [store.feature_summary(f, vocab) for f in rows], "total": total, "page": page,
                 "per_page": per_page, "pages": (total + per_page - 1) // per_page})


@router.get("/saes/{sae}/features/{index}", summary="One feature with everything on its page")
def get_feature(request: Request, sae: str, index: int = Index, session: Session = Depends(get_session)):
    s = store.sae_by_name(session, sae)
    f = store.feature_by_index(session, s, index)
    etag = store.feature_etag(session, s, f)
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    vocab = store.vocab_for(session, s.lm_id)
    payload = store.feature_payload(session, s, f, vocab)
    payload["links"] = {"self": f"/api/v1/saes/{sae}/features/{index}", "page": f"/saes/{sae}/features/{index}",
                        "prev": f"/api/v1/saes/{sae}/features/{index - 1}" if index > 0 else None,
                        "next": f"/api/v1/saes/{sae}/features/{index + 1}" if index + 1 < s.d_sae else None}
    return JSON(payload, headers=headers)


@router.get("/saes/{sae}/features/{index}/neighbors", summary="Nearest features by decoder cosine similarity")
def get_neighbors(sae: str, index: int = Index, k: int = Query(10, ge=1, le=100),
                  session: Session = Depends(get_session)):
    s = store.sae_by_name(session, sae)
    f = store.feature_by_index(session, s, index)
    items = [{"index": int(j), "cosine": c} for j, c in (f.neighbors or [])[:k]]
    return JSON({"sae": sae, "index": index, "k": k, "items": items, "available": len(f.neighbors or [])})


@router.get("/saes/{sae}/features/{index}/examples", summary="A feature's examples with per-token activations")
def get_examples(sae: str, index: int = Index, kind: Literal["top", "interval", "random", "all"] = "all",
                 session: Session = Depends(get_session)):
    s = store.sae_by_name(session, sae)
    f = store.feature_by_index(session, s, index)
    vocab = store.vocab_for(session, s.lm_id)
    wanted = None if kind == "all" else ExampleKind[kind].value
    items = []
    for ex in store.examples_for(session, f.id):
        if wanted is None or ex.kind == wanted:
            d = store.example_dict(ex, vocab)
            d["kind"] = ExampleKind(ex.kind).name
            d["interval"] = ex.interval
            items.append(d)
    return JSON({"sae": sae, "index": index, "items": items})
