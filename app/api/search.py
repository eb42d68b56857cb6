"""Search: explanations by text (FTS5 / PostgreSQL full text) and features by peak token."""

from fastapi import APIRouter, Depends, Query
from sqlalchemy.orm import Session

from app import store
from app.api.schemas import READ_ERRORS, ExplanationHits, PageParams, TokenHits
from app.deps import get_session, read_access
from app.responses import JSON

router = APIRouter(prefix="/search", tags=["search"], dependencies=[Depends(read_access)], responses=READ_ERRORS)


@router.get("/explanations", summary="Explanations matching a text query, best scored first",
            response_model=ExplanationHits)
def search_explanations(q: str = Query(..., min_length=1, max_length=200), sae: str | None = Query(None, max_length=200),
                        pages: PageParams = Depends(), session: Session = Depends(get_session)):
    if sae:
        store.sae_by_name(session, sae)
    items, total = store.search_explanations_page(session, q, pages.per_page, sae, pages.offset)
    return JSON(pages.body(items, total, q=q))


@router.get("/tokens", summary="Features whose top examples peak on a token", response_model=TokenHits)
def search_tokens(q: str = Query(..., min_length=1, max_length=100), sae: str | None = Query(None, max_length=200),
                  pages: PageParams = Depends(), session: Session = Depends(get_session)):
    if sae:
        store.sae_by_name(session, sae)
    items, total = store.search_by_token_page(session, q, pages.per_page, sae, pages.offset)
    return JSON(pages.body(items, total, q=q))
