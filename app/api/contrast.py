"""Contrastive search in the API: two sets of texts in, latents that tell them apart out.

POST runs the query on the inference service, stores texts and answer, and returns the answer
with its permalink; GET reads a stored query (it works with inference off: a read-only mirror
still shows the queries it holds).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Path, Request
from sqlalchemy.orm import Session

import store
from app.api_error import ApiError
from app.api.live import admit, client
from app.deps import get_session, read_access
from app.inference.queries import load_query, save_query
from app.inference.schemas import ContrastRequest, ContrastResponse, ServiceError
from store.models import ContrastQuery
from app.responses import JSON

router = APIRouter(tags=["live model"], dependencies=[Depends(read_access)])

QueryId = Path(min_length=1, max_length=64, description="id of a stored contrastive query")


def run_contrast(request: Request, session: Session, body: ContrastRequest, requested_by: str | None) -> ContrastQuery:
    limit = request.app.state.settings.inference_contrast_max_texts
    max_bytes = request.app.state.settings.inference_contrast_max_bytes
    for label, texts in (("set_a", body.set_a), ("set_b", body.set_b)):
        if len(texts) > limit:
            raise ApiError(422, "invalid_parameters", f"{label} has {len(texts)} texts; the limit is {limit} "
                                                      "(SAE_ATLAS_INFERENCE_CONTRAST_MAX_TEXTS)")
        size = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
        if size > max_bytes:
            raise ApiError(413, "too_large", f"{label} holds {size:,} bytes of text; the limit is {max_bytes:,} "
                                             "(SAE_ATLAS_INFERENCE_CONTRAST_MAX_BYTES)")
        if any("\x00" in t for t in texts):
            raise ApiError(422, "invalid_parameters", f"{label}: texts must not contain NUL characters")
    for label in (body.label_a, body.label_b):
        if "\x00" in label:
            raise ApiError(422, "invalid_parameters", "labels must not contain NUL characters")
    answer = client(request).post("/v1/contrast", body.model_dump())
    return save_query(session, body, answer, requested_by)


def query_payload(session: Session, row: ContrastQuery) -> dict:
    res = row.result
    saes = {s.name: s for s in store.list_saes(session)}
    by_sae: dict[str, list[int]] = {}
    for item in res["items"]:
        by_sae.setdefault(item["sae"], []).append(item["index"])
    expl = {name: store.neighbor_explanations(session, saes[name].id, idx) for name, idx in by_sae.items() if name in saes}
    items = [{**item, "explanation": expl.get(item["sae"], {}).get(item["index"]),
              "links": {"feature": f"/api/v1/saes/{item['sae']}/features/{item['index']}",
                        "page": f"/saes/{item['sae']}/features/{item['index']}"}} for item in res["items"]]
    return {"id": row.id, "model": row.lm_name, "label_a": row.label_a, "label_b": row.label_b, "n_a": row.n_a,
            "n_b": row.n_b, "n_tests": res["n_tests"], "n_significant": res["n_significant"],
            "truncated_texts": res.get("truncated_texts", 0), "saes": res["saes"],
            "direction": row.params.get("direction", "both"), "items": items,
            "created_at": row.created_at.isoformat() if row.created_at else "",
            "links": {"self": f"/api/v1/contrast/{row.id}", "page": f"/contrast/{row.id}"}}


@router.post("/contrast", response_model=ContrastResponse, status_code=201,
             summary="Latents that tell two sets of texts apart (AUROC, Cohen's d, BH q-values); stored with a permalink",
             responses={404: {"description": "unknown model or SAE"}, 413: {"description": "sets too large"},
                        422: {"description": "bad parameters"}, 429: {"description": "rate limited"},
                        503: {"description": "busy, timed out or off"}})
def create_contrast(request: Request, body: ContrastRequest, session: Session = Depends(get_session)):
    who = admit(request, session)
    try:
        row = run_contrast(request, session, body, who)
    except ServiceError as exc:
        raise ApiError(exc.status, exc.code, exc.message) from None
    return JSON(query_payload(session, row), status_code=201, headers={"Location": f"/api/v1/contrast/{row.id}"})


@router.get("/contrast/{query_id}", response_model=ContrastResponse, summary="A stored contrastive query",
            responses={404: {"description": "no such query"}})
def get_contrast(query_id: str = QueryId, session: Session = Depends(get_session)):
    return JSON(query_payload(session, load_query(session, query_id)), headers={"Cache-Control": "no-cache"})
