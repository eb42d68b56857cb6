"""The explanation half of the /search page: keyword, semantic or merged results, never a dead end.

Without an embedding model the page still answers: semantic and merged searches fall back to
keyword results and say why (the JSON API answers mode=semantic with a 503 instead).
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.api_error import ApiError
from store import search as search_store

PAGE_RESULTS = 100


def explanation_results(session: Session, q: str, mode: str, sae_name: str | None) -> tuple[list[dict], dict]:
    from trainer.interpret.embedder import EmbeddingUnavailable, get_embedder

    if mode not in search_store.MODES:
        raise ApiError(422, "invalid_parameters", f"mode must be one of {', '.join(search_store.MODES)}")
    info = {"mode": mode, "requested": mode, "message": None}
    if not q.strip():
        return [], info
    try:
        result = search_store.search(session, q, mode, sae_name, 0, PAGE_RESULTS, embedder=get_embedder())
    except EmbeddingUnavailable as exc:
        result = search_store.search(session, q, "keyword", sae_name, 0, PAGE_RESULTS)
        result.semantic_error = exc.one_line()
    info.update(mode=result.mode, total=result.total)
    if result.semantic_error:
        info["message"] = f"Semantic search is unavailable ({result.semantic_error}); these are keyword matches."
    return result.items, info
