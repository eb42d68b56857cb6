"""Search: explanations by words, by meaning, or both; latents by the token they peak on.

Three modes for explanations:
- keyword: full text (SQLite FTS5 with the porter stemmer; PostgreSQL to_tsvector / websearch).
- semantic: the query is embedded with the configured sentence-embedding model
  (trainer.interpret.embedder) and compared by cosine similarity with every explanation's stored
  embedding of the same model. Exact search: in PostgreSQL with pgvector (`<=>`) when migration
  0005 found the extension, else a matrix product in numpy over one cached matrix per SAE. A
  matrix is reloaded only when its SAE's watermark (newest explanation id and row count of that
  SAE's vectors) moves, and only the new rows are read when explanations were just added.
  Two floors drop results: `min_similarity` (a query about nothing in the atlas finds nothing),
  and, relative to the query, `min_above_typical`: a hit must beat the query's median similarity
  over the SAE's explanations by that much. Token-pattern explanations all read "the word ‹…›
  (…)", so a query like "the word just" is ~0.25 similar to every one of them, above any fixed
  floor that still lets the just-latent (~0.5) through; the median says what "typical" is for
  this query in this SAE. Used where an SAE has at least MIN_FOR_TYPICAL explanations.
- merged (default): reciprocal rank fusion of the two ranked lists, score = sum over the lists of
  1 / (RRF_K + rank), with RRF_K = 60 (Cormack, Clarke & Buettcher 2009). RRF needs no common
  scale between a text-search rank and a cosine, rewards items both lists find, and keeps items
  only one finds (a synonym the keyword index cannot match, an exact token the embedding blurs).
  Without an embedding model, merged is keyword search, and the result says so.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from store.errors import EmbeddingUnavailable
from store.models import SAE, Explanation, ExplanationEmbedding, Feature, SAEStatus
from store.feature import explanation_dict
from store.saes import list_saes
from store.table import feature_summary
from store.vectors import document_text
from store.vocab import vocab_for

MODES = ("merged", "keyword", "semantic")
RRF_K = 60
MAX_RESULTS = 500  # most results one search ranks; pages are cut from these
DEFAULT_MIN_SIMILARITY = 0.2  # cosine; all-MiniLM-L6-v2 puts unrelated short texts below ~0.15
DEFAULT_MIN_ABOVE_TYPICAL = 0.1  # cosine above the query's median similarity over the SAE's explanations
MIN_FOR_TYPICAL = 20  # explanations an SAE needs before its median similarity means something


def _fts_query(q: str) -> str:
    """User text to a safe FTS5 query: each word quoted, all required, last one as a prefix."""
    words = [w for w in "".join(c if c.isalnum() else " " for c in q).split() if w][:12]
    if not words:
        return ""
    return " ".join(f'"{w}"' for w in words[:-1]) + (" " if len(words) > 1 else "") + f'"{words[-1]}"*'


def _clean_query(q: str) -> str:
    """Search text without NUL and other control characters (PostgreSQL refuses NUL in text)."""
    return "".join(ch if ch.isprintable() or ch.isspace() else " " for ch in q).strip() if not q.isprintable() else q.strip()


def _ready_explanations(sae_name: str | None):
    base = (select(Explanation.id).join(Feature, Explanation.feature_id == Feature.id)
            .join(SAE, Feature.sae_id == SAE.id).where(SAE.status == SAEStatus.ready.value))
    return base.where(SAE.name == sae_name) if sae_name else base


def keyword_ids(session: Session, q: str, limit: int = MAX_RESULTS, sae_name: str | None = None) -> list[int]:
    """Explanation ids matching the words of q, best first."""
    q = _clean_query(q)
    if not q:
        return []
    dialect = session.get_bind().dialect.name
    base = _ready_explanations(sae_name)
    if dialect == "sqlite":
        fts = _fts_query(q)
        if not fts:
            return []
        ids = select(text("rowid")).select_from(text("explanations_fts")).where(text("explanations_fts MATCH :q"))
        stmt = base.where(Explanation.id.in_(ids)).params(q=fts)
    elif dialect == "postgresql":
        ts = func.websearch_to_tsquery("english", q)
        stmt = base.where(func.to_tsvector("english", Explanation.text).op("@@")(ts)).order_by(
            func.ts_rank(func.to_tsvector("english", Explanation.text), ts).desc())
    else:
        stmt = base.where(Explanation.text.ilike(f"%{q}%"))
    stmt = stmt.order_by(Explanation.detection_score.desc().nulls_last(), Explanation.id).limit(limit)
    return list(session.scalars(stmt))


def explanation_rows(session: Session, ids: list[int]) -> dict[int, dict]:
    """{explanation id: result item} for the given ids (one query)."""
    if not ids:
        return {}
    rows = session.execute(select(Explanation, Feature.index, SAE.name).join(Feature, Explanation.feature_id == Feature.id)
                           .join(SAE, Feature.sae_id == SAE.id).where(Explanation.id.in_(ids)))
    return {e.id: {"sae": name, "index": index, **explanation_dict(e)} for e, index, name in rows}


def search_explanations(session: Session, q: str, limit: int = 50, sae_name: str | None = None) -> list[dict]:
    """Keyword search (the original API of this module): result items, best first."""
    ids = keyword_ids(session, q, limit, sae_name)
    rows = explanation_rows(session, ids)
    return [rows[i] for i in ids if i in rows]


# --- semantic ------------------------------------------------------------------------------------

@dataclass
class _Matrix:
    watermark: tuple[int, int]  # (newest explanation id, rows) of this SAE's vectors of this model
    ids: np.ndarray
    vectors: np.ndarray


_matrices: dict[tuple[int, str, str], _Matrix] = {}
_matrices_lock = threading.Lock()
_query_vectors: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
_QUERY_CACHE = 256


# The watermark query counts an SAE's vectors: ~100 ms at 100k explanations on SQLite, most of a
# search. Its answer is kept this long (and dropped at once when this process writes vectors).
WATERMARK_TTL_S = 2.0
_watermark_cache: dict[tuple[str, str, str | None], tuple[float, int, dict]] = {}


def forget_matrices() -> None:
    with _matrices_lock:
        _matrices.clear()
        _query_vectors.clear()
        _watermark_cache.clear()


def _watermarks(session: Session, model: str, sae_name: str | None) -> dict[int, tuple[str, tuple[int, int]]]:
    """{sae id: (version, (newest explanation id, rows))} of ready SAEs that have vectors of `model`
    (at most WATERMARK_TTL_S old, and never older than this process's last write of vectors)."""
    from store import vectors

    key = (str(session.get_bind().url), model, sae_name)
    cached = _watermark_cache.get(key)
    if cached is not None and cached[0] > time.monotonic() and cached[1] == vectors.writes:
        return cached[2]
    writes = vectors.writes
    stmt = (select(SAE.id, SAE.version, func.max(ExplanationEmbedding.explanation_id), func.count())
            .join(ExplanationEmbedding, ExplanationEmbedding.sae_id == SAE.id)
            .where(ExplanationEmbedding.model == model, SAE.status == SAEStatus.ready.value)
            .group_by(SAE.id, SAE.version))
    if sae_name:
        stmt = stmt.where(SAE.name == sae_name)
    marks = {sid: (version, (int(mx), int(n))) for sid, version, mx, n in session.execute(stmt)}
    _watermark_cache[key] = (time.monotonic() + WATERMARK_TTL_S, writes, marks)
    return marks


def _load(session: Session, sae_id: int, model: str, after: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rows = session.execute(select(ExplanationEmbedding.explanation_id, ExplanationEmbedding.vector).where(
        ExplanationEmbedding.model == model, ExplanationEmbedding.sae_id == sae_id,
        ExplanationEmbedding.explanation_id > after).order_by(ExplanationEmbedding.explanation_id)).all()
    if not rows:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
    vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), -1)
    return ids, vectors


def sae_matrix(session: Session, sae_id: int, version: str, model: str, watermark: tuple[int, int]) -> _Matrix:
    """The SAE's explanation vectors, from the cache while its watermark stands still."""
    key = (sae_id, version, model)
    with _matrices_lock:
        cached = _matrices.get(key)
    if cached is not None and cached.watermark == watermark:
        return cached
    if cached is not None and watermark[0] > cached.watermark[0]:
        ids, vectors = _load(session, sae_id, model, after=cached.watermark[0])
        if len(ids) and len(cached.ids) + len(ids) == watermark[1] and vectors.shape[1] == cached.vectors.shape[1]:
            m = _Matrix(watermark, np.concatenate([cached.ids, ids]), np.concatenate([cached.vectors, vectors]))
            with _matrices_lock:
                _matrices[key] = m
            return m
    ids, vectors = _load(session, sae_id, model)
    m = _Matrix(watermark, ids, np.ascontiguousarray(vectors))
    with _matrices_lock:
        for k in [k for k in _matrices if k[0] == sae_id and k != key]:  # older versions of this SAE
            del _matrices[k]
        _matrices[key] = m
    return m


def query_vector(embedder, q: str) -> np.ndarray:
    key = (embedder.name, q)
    with _matrices_lock:
        v = _query_vectors.get(key)
        if v is not None:
            _query_vectors.move_to_end(key)
            return v
    v = embedder.embed([document_text(q)])[0]  # token chips a user pasted read as quotes, as in the vectors
    with _matrices_lock:
        _query_vectors[key] = v
        while len(_query_vectors) > _QUERY_CACHE:
            _query_vectors.popitem(last=False)
    return v


def semantic_ids(session: Session, q: str, embedder, limit: int = MAX_RESULTS, sae_name: str | None = None,
                 min_similarity: float = DEFAULT_MIN_SIMILARITY,
                 min_above_typical: float = DEFAULT_MIN_ABOVE_TYPICAL) -> list[tuple[int, float]]:
    """[(explanation id, cosine similarity)] best first; raises EmbeddingUnavailable without a model."""
    from store.vectors import has_pgvector, pgvector_literal

    q = _clean_query(q)
    if not q:
        return []
    embedder.check()  # a missing model is an error even where nothing was embedded with it yet
    marks = _watermarks(session, embedder.name, sae_name)
    if not marks:
        return []  # nothing embedded with this model: no need to load it
    v = query_vector(embedder, q)
    if has_pgvector(session):
        return _pgvector_ids(session, pgvector_literal(v), embedder.name, limit, sae_name, min_similarity,
                             min_above_typical)
    best_ids, best_sims = [], []
    for sae_id, (version, watermark) in marks.items():
        m = sae_matrix(session, sae_id, version, embedder.name, watermark)
        if not len(m.ids) or m.vectors.shape[1] != v.shape[0]:
            continue
        sims = m.vectors @ v
        floor = min_similarity
        if min_above_typical > 0 and len(sims) >= MIN_FOR_TYPICAL:
            floor = max(floor, float(np.median(sims)) + min_above_typical)
        keep = np.nonzero(sims >= floor)[0]
        if keep.size > limit:
            keep = keep[np.argpartition(-sims[keep], limit - 1)[:limit]]
        best_ids.append(m.ids[keep])
        best_sims.append(sims[keep])
    if not best_ids:
        return []
    ids, sims = np.concatenate(best_ids), np.concatenate(best_sims)
    order = np.lexsort((ids, -sims))[:limit]
    return [(int(ids[k]), float(sims[k])) for k in order]


def _pgvector_ids(session: Session, q: str, model: str, limit: int, sae_name: str | None, min_similarity: float,
                  min_above_typical: float) -> list[tuple[int, float]]:
    """semantic_ids in PostgreSQL with pgvector: the same floors, computed in the database."""
    where = "e.model = :model AND s.status = 'ready' AND e.embedding IS NOT NULL" + (
        " AND s.name = :sae" if sae_name else "")
    params = {"q": q, "model": model, "k": limit, **({"sae": sae_name} if sae_name else {})}
    floors: dict[int, float] = {}
    if min_above_typical > 0:
        typical = text("SELECT e.sae_id, count(*), percentile_cont(0.5) WITHIN GROUP "
                       "(ORDER BY 1 - (e.embedding <=> CAST(:q AS vector))) "
                       f"FROM explanation_embeddings e JOIN saes s ON s.id = e.sae_id WHERE {where} GROUP BY e.sae_id")
        floors = {int(sid): float(med) + min_above_typical for sid, n, med in session.execute(typical, params)
                  if n >= MIN_FOR_TYPICAL}
    sql = text("SELECT e.explanation_id, 1 - (e.embedding <=> CAST(:q AS vector)) AS sim, e.sae_id "
               f"FROM explanation_embeddings e JOIN saes s ON s.id = e.sae_id WHERE {where} "
               "ORDER BY e.embedding <=> CAST(:q AS vector) LIMIT :k")
    return [(int(i), float(sim)) for i, sim, sid in session.execute(sql, params)
            if sim >= max(min_similarity, floors.get(int(sid), min_similarity))]


# --- the one entry point the API and the page use -------------------------------------------------

@dataclass
class SearchResult:
    mode: str  # what ran: merged, keyword or semantic
    items: list[dict] = field(default_factory=list)  # the requested page
    total: int = 0
    semantic_error: str | None = None  # why merged search fell back to keyword search


def rrf(*ranked: list[int], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal rank fusion of ranked id lists: [(id, score)], best first (ties: smaller id)."""
    scores: dict[int, float] = {}
    for ids in ranked:
        for rank, i in enumerate(ids, 1):
            scores[i] = scores.get(i, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda x: (-x[1], x[0]))


def _require(embedder):
    if embedder is None:
        raise EmbeddingUnavailable("no embedding model was given to the search", "pass the configured embedder")
    return embedder


def search(session: Session, q: str, mode: str = "merged", sae_name: str | None = None, offset: int = 0,
           limit: int = 50, min_similarity: float = DEFAULT_MIN_SIMILARITY, embedder=None,
           min_above_typical: float = DEFAULT_MIN_ABOVE_TYPICAL) -> SearchResult:
    """Explanations for q in the given mode; semantic mode raises EmbeddingUnavailable without a model."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    keyword: list[int] = []
    semantic: list[tuple[int, float]] = []
    error = None
    if mode in ("keyword", "merged"):
        keyword = keyword_ids(session, q, MAX_RESULTS, sae_name)
    if mode in ("semantic", "merged"):
        try:
            semantic = semantic_ids(session, q, _require(embedder), MAX_RESULTS, sae_name, min_similarity,
                                    min_above_typical)
        except EmbeddingUnavailable as exc:
            if mode == "semantic":
                raise
            error = exc.one_line()
    similarity = dict(semantic)
    kw_rank = {i: r for r, i in enumerate(keyword, 1)}
    sem_rank = {i: r for r, (i, _) in enumerate(semantic, 1)}
    if mode == "keyword":
        ranked = [(i, None) for i in keyword]
    elif mode == "semantic":
        ranked = [(i, None) for i, _ in semantic]
    else:
        ranked = rrf(keyword, [i for i, _ in semantic])
    page = ranked[offset:offset + limit]
    rows = explanation_rows(session, [i for i, _ in page])
    items = []
    for i, fused in page:
        if i not in rows:
            continue
        item = rows[i]
        item["match"] = {"keyword_rank": kw_rank.get(i), "semantic_rank": sem_rank.get(i),
                         "similarity": round(similarity[i], 4) if i in similarity else None,
                         "rrf": round(fused, 6) if fused is not None else None}
        items.append(item)
    used = "keyword" if (mode == "merged" and error) else mode
    return SearchResult(mode=used, items=items, total=len(ranked), semantic_error=error)


def search_by_token(session: Session, token: str, limit: int = 50, sae_name: str | None = None,
                    offset: int = 0) -> list[dict]:
    return search_by_token_page(session, token, limit, sae_name, offset)[0]


def search_by_token_page(session: Session, token: str, limit: int = 50, sae_name: str | None = None,
                         offset: int = 0) -> tuple[list[dict], int]:
    """(features whose top examples mostly peak on a token whose text matches `token`, SAE by SAE,
    from `offset`; how many match in all)."""
    out = []
    total = 0
    token = token.replace("\x00", "")
    for sae in list_saes(session):
        if sae_name and sae.name != sae_name:
            continue
        vocab = vocab_for(session, sae.lm_id)
        ids = vocab.find(token)
        if not ids:
            continue
        where = (Feature.sae_id == sae.id, Feature.peak_token_id.in_(ids))
        n = session.scalar(select(func.count()).select_from(Feature).where(*where)) or 0
        skip = max(0, offset - total)  # how much of this SAE's matches the earlier pages cover
        total += n
        want = limit - len(out)
        if want <= 0 or skip >= n:
            continue
        rows = session.scalars(select(Feature).where(*where)
                               .order_by(Feature.peak_token_share.desc(), Feature.max_act.desc(), Feature.index)
                               .offset(skip).limit(want))
        out += [{"sae": sae.name, **feature_summary(f, vocab)} for f in rows]
    return out, total
