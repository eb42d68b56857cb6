"""Search: explanations by text (FTS5 / PostgreSQL full text) and features by peak token."""

from fastapi import APIRouter, Depends, Query
from sqlalchemy.orm import Session

from app import store
from app.deps import get_session, read_access
from app.responses import JSON

router = APIRouter(prefix="/search", tags=["search"], dependencies=[Depends(read_access)])


@router.get("/explanations", summary="Explanations matching a text query")
def search_explanations(q: str = Query(..., min_length=1, max_length=200), sae: str | None = Query(None, max_length=200),
                        limit: int = Query(50, ge=1, le=200), session: Session = Depends(get_session)):
    if sae:
        store.sae_by_name(session, sae)
    return JSON({"q": q, "items": store.search_explanations(session, q, limit, sae)})


@router.get("/tokens", summary="Features whose top examples peak on a token")
def search_tokens(q: str = Query(..., min_length=1, max_length=100), sae: str | None = Query(None, max_length=200),
                  limit: int = Query(50, ge=1, le=200), session: Session = Depends(get_session)):
    if sae:
        store.sae_by_name(session, sae)
    return JSON({"q": q, "items": store.search_by_token(session, q, limit, sae)})
