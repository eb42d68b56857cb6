"""Contrastive search in the API: two sets of texts in, latents that tell them apart out.

POST runs the query on the inference service, stores texts and answer, and returns the answer
with its permalink; GET reads a stored query (it works with inference off: a read-only mirror
still shows the queries it holds).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Path, Request
from sqlalchemy.orm import Session

from app.api_error import ApiError
from app.live import admit, query_payload, run_contrast
from app.deps import get_session, read_access
from app.inference.queries import load_query
from app.inference.schemas import ContrastRequest, ContrastResponse, ServiceError
from app.responses import JSON

router = APIRouter(tags=["live model"], dependencies=[Depends(read_access)])

QueryId = Path(min_length=1, max_length=64, description="id of a stored contrastive query")


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
