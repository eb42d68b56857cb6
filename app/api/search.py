"""Search: explanations by words and by meaning (keyword, semantic, merged), features by peak token."""

from __future__ import annotations

import math
from typing import Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

import store
from app.api_error import ApiError
from app.api.schemas import READ_ERRORS, PageParams, TokenHits
from app.deps import get_session, read_access
from app.responses import JSON
from store import search as search_store

router = APIRouter(prefix="/search", tags=["search"], dependencies=[Depends(read_access)], responses=READ_ERRORS)

MAX_QUERY = 200
MAX_PER_PAGE = 200


class Match(BaseModel):
    keyword_rank: int | None = Field(None, description="rank in the keyword results (1 = best), if found there")
    semantic_rank: int | None = Field(None, description="rank in the semantic results (1 = best), if found there")
    similarity: float | None = Field(None, description="cosine similarity of query and explanation embeddings")
    rrf: float | None = Field(None, description="reciprocal-rank-fusion score (merged mode)")


class ExplanationHit(BaseModel):
    sae: str
    index: int = Field(description="latent index")
    id: int
    text: str
    method: str
    explainer: str
    detection_score: float | None = None
    detection_f1: float | None = None
    fuzzing_score: float | None = None
    fuzzing_f1: float | None = None
    embedding_score: float | None = Field(None, description="AUROC of the embedding scorer")
    detection_uninformative: bool | None = None
    fuzzing_uninformative: bool | None = None
    scores: dict | None = Field(None, description="per scorer: n, confidence interval, baseline")
    created_at: str | None = None
    match: Match | None = None


class SemanticInfo(BaseModel):
    model: str | None = Field(None, description="the embedding model the query was compared with")
    available: bool
    message: str | None = Field(None, description="why semantic search did not run (merged mode fell back)")


class ExplanationSearchPage(BaseModel):
    q: str
    mode: Literal["merged", "keyword", "semantic"] = Field(description="the mode that ran")
    items: list[ExplanationHit]
    total: int
    page: int
    per_page: int
    pages: int
    semantic: SemanticInfo


@router.get("/explanations", summary="Explanations matching a query, by words, by meaning or both",
            response_model=ExplanationSearchPage)
def search_explanations(
        q: str = Query(..., min_length=1, max_length=MAX_QUERY, description="what to look for"),
        mode: Literal["merged", "keyword", "semantic"] = Query(
            "merged", description="keyword (full text), semantic (embedding similarity) or merged "
                                  "(reciprocal rank fusion of both)"),
        sae: str | None = Query(None, max_length=200),
        min_similarity: float = Query(search_store.DEFAULT_MIN_SIMILARITY, ge=-1.0, le=1.0,
                                      description="semantic hits below this cosine similarity are dropped"),
        min_above_typical: float = Query(
            search_store.DEFAULT_MIN_ABOVE_TYPICAL, ge=0.0, le=2.0,
            description="semantic hits must beat the query's median similarity over the SAE's explanations by "
                        "this much (SAEs with at least 20 explanations; 0 turns it off)"),
        page: int = Query(1, ge=1, le=10_000),
        per_page: int | None = Query(None, ge=1, le=MAX_PER_PAGE),
        session: Session = Depends(get_session)):
    from trainer.interpret.embedder import EmbeddingModelMissing, EmbeddingUnavailable, get_embedder

    if not q.strip():
        raise ApiError(422, "invalid_parameters", "q is empty: type a word or a phrase to search for")
    if sae:
        store.sae_by_name(session, sae)
    n = per_page or 50
    embedder = get_embedder()
    try:
        result = search_store.search(session, q, mode, sae, (page - 1) * n, n, min_similarity, embedder,
                                     min_above_typical)
    except EmbeddingModelMissing as exc:
        raise ApiError(503, "embedding_model_unavailable", f"semantic search is unavailable: {exc.one_line()}",
                       {"fallback": "mode=keyword"}, headers={"Retry-After": "3600"}) from None
    except EmbeddingUnavailable as exc:
        raise ApiError(503, "embedding_service_unavailable", f"semantic search is unavailable: {exc.one_line()}",
                       {"fallback": "mode=keyword"}, headers={"Retry-After": "30"}) from None
    semantic = SemanticInfo(model=embedder.name, available=result.semantic_error is None,
                            message=result.semantic_error)
    return ExplanationSearchPage(q=q, mode=result.mode, items=[ExplanationHit(**i) for i in result.items],
                                 total=result.total, page=page, per_page=n,
                                 pages=max(1, math.ceil(result.total / n)), semantic=semantic)


@router.get("/tokens", summary="Features whose top examples peak on a token", response_model=TokenHits)
def search_tokens(q: str = Query(..., min_length=1, max_length=100), sae: str | None = Query(None, max_length=200),
                  pages: PageParams = Depends(), session: Session = Depends(get_session)):
    if sae:
        store.sae_by_name(session, sae)
    items, total = store.search_by_token_page(session, q, pages.per_page, sae, pages.offset)
    return JSON(pages.body(items, total, q=q))
