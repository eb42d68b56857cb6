"""Read-side queries shared by the JSON API and the HTML pages.

Every function here reads only published (status = ready) SAEs, so a half-written SAE is never
visible. Vocabularies are decoded once per process and cached.
"""

from __future__ import annotations

import json
import math
import unicodedata
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from markupsafe import escape
from sqlalchemy import and_, func, or_, select, text
from sqlalchemy.orm import Session

from app.errors import NotFound
from app.models import LM, SAE, Example, ExampleKind, Explanation, Feature, Job, SAEStatus

SORTS = {
    "index": Feature.index,
    "density": Feature.density,
    "max": Feature.max_act,
    "mean": Feature.mean_act,
    "score": Feature.best_score,
}
MAX_PAGE_SIZE = 200


# --- tokens -----------------------------------------------------------------------------------

_VISIBLE = {"\n": "↵", "\r": "⏎", "\t": "⇥", "": "∅"}


def visible(token: str) -> str:
    """A token as a person should see it: newlines, tabs and invisible characters made visible."""
    if token in _VISIBLE:
        return _VISIBLE[token]
    out = []
    for ch in token:
        if ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            out.append(f"⟨U+{ord(ch):04X}⟩")
        else:
            out.append(ch)
    return "".join(out)


@dataclass(frozen=True)
class Vocab:
    raw: tuple[str, ...]
    html: tuple[str, ...]  # visible() then HTML-escaped: ready to drop into a page

    def text(self, token_id: int) -> str:
        return self.raw[token_id] if 0 <= token_id < len(self.raw) else f"<{token_id}>"

    def display_html(self, token_id: int) -> str:
        return self.html[token_id] if 0 <= token_id < len(self.html) else str(escape(f"<{token_id}>"))

    def find(self, query: str, limit: int = 200) -> list[int]:
        """Token ids whose text (stripped) equals the query, case-insensitively; then prefix matches."""
        q = query.strip().lower()
        if not q:
            return []
        exact = [i for i, t in enumerate(self.raw) if t.strip().lower() == q]
        return exact[:limit]


@lru_cache(maxsize=16)
def _decode_vocab(lm_id: int, blob: bytes) -> Vocab:
    raw = tuple(json.loads(zlib.decompress(blob)))
    return Vocab(raw, tuple(str(escape(visible(t))) for t in raw))


_vocab_by_lm: dict[int, Vocab] = {}


def vocab_for(session: Session, lm_id: int) -> Vocab:
    v = _vocab_by_lm.get(lm_id)
    if v is None:
        blob = session.scalar(select(LM.vocab).where(LM.id == lm_id))
        v = _decode_vocab(lm_id, blob)
        _vocab_by_lm[lm_id] = v
    return v


def forget_caches() -> None:
    _vocab_by_lm.clear()
    _decode_vocab.cache_clear()


# --- SAEs and models --------------------------------------------------------------------------

def list_lms(session: Session) -> list[LM]:
    return list(session.scalars(select(LM).order_by(LM.name)))


def list_saes(session: Session) -> list[SAE]:
    return list(session.scalars(select(SAE).where(SAE.status == SAEStatus.ready.value).order_by(SAE.name)))


def sae_by_name(session: Session, name: str) -> SAE:
    sae = session.scalar(select(SAE).where(SAE.name == name, SAE.status == SAEStatus.ready.value))
    if sae is None:
        raise NotFound(f"no SAE named {name!r}")
    return sae


def feature_by_index(session: Session, sae: SAE, index: int) -> Feature:
    if not 0 <= index < sae.d_sae:
        raise NotFound(f"SAE {sae.name!r} has latents 0..{sae.d_sae - 1}; {index} is out of range")
    f = session.scalar(select(Feature).where(Feature.sae_id == sae.id, Feature.index == index))
    if f is None:
        raise NotFound(f"latent {index} of {sae.name!r} not found")
    return f


def feature_etag(session: Session, sae: SAE, feature: Feature) -> str:
    """Changes when the SAE is republished or the feature gains an explanation."""
    n, last = session.execute(
        select(func.count(Explanation.id), func.max(Explanation.id)).where(Explanation.feature_id == feature.id)).one()
    return f'W/"{sae.version[:16]}-{feature.index}-{n}-{last or 0}"'


# --- one feature ------------------------------------------------------------------------------

def hist_edges(lo: float, hi: float, n: int) -> list[float]:
    return [round(lo + (hi - lo) * i / n, 6) for i in range(n + 1)]


def example_dict(ex: Example, vocab: Vocab) -> dict:
    ids = np.frombuffer(ex.token_ids, dtype="<i4")
    acts = np.frombuffer(ex.acts, dtype="<f2").astype(np.float32)
    return {
        "id": ex.id,
        "activation": round(ex.activation, 4),
        "peak": ex.peak,
        "doc_id": ex.doc_id,
        "doc_offset": ex.doc_offset,
        "token_ids": ids.tolist(),
        "tokens": [vocab.text(int(i)) for i in ids],
        "acts": np.round(acts, 3).tolist(),
    }


def examples_for(session: Session, feature_id: int) -> list[Example]:
    return list(session.scalars(select(Example).where(Example.feature_id == feature_id)
                                .order_by(Example.kind, Example.interval, Example.rank)))


def explanation_dict(e: Explanation) -> dict:
    return {"id": e.id, "text": e.text, "method": e.method, "explainer": e.explainer,
            "detection_score": e.detection_score, "detection_f1": e.detection_f1,
            "fuzzing_score": e.fuzzing_score, "fuzzing_f1": e.fuzzing_f1,
            "created_at": e.created_at.isoformat() if e.created_at else None}


def feature_payload(session: Session, sae: SAE, f: Feature, vocab: Vocab, n_intervals: int | None = None) -> dict:
    """Everything on a feature's page, as JSON-ready data."""
    examples = examples_for(session, f.id)
    top, random_sample = [], []
    groups: dict[int, list] = {}
    for ex in examples:
        d = example_dict(ex, vocab)
        if ex.kind == ExampleKind.top:
            top.append(d)
        elif ex.kind == ExampleKind.random:
            random_sample.append(d)
        else:
            groups.setdefault(ex.interval or 0, []).append(d)
    shares = f.interval_shares or []
    n_int = n_intervals or len(shares) or 10
    intervals = []
    for i in range(n_int - 1, -1, -1):  # highest interval first, like the top examples
        lo, hi = f.max_act * i / n_int, f.max_act * (i + 1) / n_int
        intervals.append({"interval": i, "range": [round(lo, 4), round(hi, 4)],
                          "share": shares[i] if i < len(shares) else 0.0, "examples": groups.get(i, [])})
    neighbor_ids = [int(j) for j, _ in (f.neighbors or [])]
    neighbor_expl = dict(session.execute(select(Feature.index, Feature.explanation).where(
        Feature.sae_id == sae.id, Feature.index.in_(neighbor_ids))).all()) if neighbor_ids else {}
    explanations = list(session.scalars(select(Explanation).where(Explanation.feature_id == f.id)
                                        .order_by(Explanation.detection_score.desc().nulls_last(), Explanation.id)))
    logits = f.logits or {}
    lh = logits.get("hist") or {}
    hist = f.act_hist or {}
    counts = hist.get("counts", [])
    return {
        "sae": sae.name,
        "index": f.index,
        "d_sae": sae.d_sae,
        "stats": {
            "firing_count": f.firing_count, "density": f.density,
            "log10_density": math.log10(f.density) if f.density > 0 else None,
            "mean": f.mean_act, "max": f.max_act, **(f.moments or {}),
            "tokens_analyzed": sae.n_tokens_analyzed,
        },
        "activation_histogram": {"edges": hist_edges(0.0, hist.get("max", f.max_act), len(counts)), "counts": counts},
        "logits": {
            "top": [{"token_id": t, "token": vocab.text(t), "value": v} for t, v in logits.get("top", [])],
            "bottom": [{"token_id": t, "token": vocab.text(t), "value": v} for t, v in logits.get("bottom", [])],
            "histogram": {"edges": hist_edges(lh.get("lo", 0.0), lh.get("hi", 0.0), len(lh.get("counts", []))),
                          "counts": lh.get("counts", [])},
        },
        "peak_token": None if f.peak_token_id is None else
        {"token_id": f.peak_token_id, "token": vocab.text(f.peak_token_id), "share": f.peak_token_share},
        "neighbors": [{"index": int(j), "cosine": c, "explanation": neighbor_expl.get(int(j))} for j, c in (f.neighbors or [])],
        "examples": {"top": top, "intervals": intervals, "random": random_sample},
        "explanations": [explanation_dict(e) for e in explanations],
        "best_score": f.best_score,
        "explanation": f.explanation,
    }


# --- the feature table ------------------------------------------------------------------------

@dataclass
class TableQuery:
    sort: str = "index"
    order: str = "asc"
    density_min: float | None = None
    density_max: float | None = None
    has_explanation: bool | None = None
    score_min: float | None = None
    page: int = 1
    per_page: int = 50


def feature_table(session: Session, sae: SAE, q: TableQuery) -> tuple[list[Feature], int]:
    conds = [Feature.sae_id == sae.id]
    if q.density_min is not None:
        conds.append(Feature.density >= q.density_min)
    if q.density_max is not None:
        conds.append(Feature.density <= q.density_max)
    if q.has_explanation is True:
        conds.append(Feature.explanation.is_not(None))
    elif q.has_explanation is False:
        conds.append(Feature.explanation.is_(None))
    if q.score_min is not None:
        conds.append(Feature.best_score >= q.score_min)
    where = and_(*conds)
    total = session.scalar(select(func.count()).select_from(Feature).where(where))
    col = SORTS[q.sort]
    ordering = col.desc().nulls_last() if q.order == "desc" else col.asc().nulls_last()
    rows = session.scalars(select(Feature).where(where).order_by(ordering, Feature.index)
                           .offset((q.page - 1) * q.per_page).limit(q.per_page))
    return list(rows), int(total or 0)


def feature_summary(f: Feature, vocab: Vocab) -> dict:
    return {"index": f.index, "density": f.density, "max": f.max_act, "mean": f.mean_act,
            "firing_count": f.firing_count, "explanation": f.explanation, "best_score": f.best_score,
            "peak_token": None if f.peak_token_id is None else vocab.text(f.peak_token_id),
            "top_logits": [vocab.text(t) for t, _ in (f.logits or {}).get("top", [])[:5]]}


# --- search -----------------------------------------------------------------------------------

def _fts_query(q: str) -> str:
    """User text to a safe FTS5 query: each word quoted, all required, last one as a prefix."""
    words = [w for w in "".join(c if c.isalnum() else " " for c in q).split() if w][:12]
    if not words:
        return ""
    return " ".join(f'"{w}"' for w in words[:-1]) + (" " if len(words) > 1 else "") + f'"{words[-1]}"*'


def search_explanations(session: Session, q: str, limit: int = 50, sae_name: str | None = None) -> list[dict]:
    q = q.strip()
    if not q:
        return []
    dialect = session.get_bind().dialect.name
    base = (select(Explanation, Feature.index, SAE.name).join(Feature, Explanation.feature_id == Feature.id)
            .join(SAE, Feature.sae_id == SAE.id).where(SAE.status == SAEStatus.ready.value))
    if sae_name:
        base = base.where(SAE.name == sae_name)
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
    return [{"sae": name, "index": index, **explanation_dict(e)} for e, index, name in session.execute(stmt)]


def search_by_token(session: Session, token: str, limit: int = 50, sae_name: str | None = None) -> list[dict]:
    """Features whose top examples mostly peak on a token whose text matches `token`."""
    out = []
    for sae in list_saes(session):
        if sae_name and sae.name != sae_name:
            continue
        vocab = vocab_for(session, sae.lm_id)
        ids = vocab.find(token)
        if not ids:
            continue
        rows = session.scalars(select(Feature).where(Feature.sae_id == sae.id, Feature.peak_token_id.in_(ids))
                               .order_by(Feature.peak_token_share.desc(), Feature.max_act.desc()).limit(limit))
        out += [{"sae": sae.name, **feature_summary(f, vocab), "peak_token_share": f.peak_token_share} for f in rows]
    return out[:limit]


# --- jobs -------------------------------------------------------------------------------------

def job_counts(session: Session) -> dict[str, int]:
    return {k: int(v) for k, v in session.execute(select(Job.status, func.count()).group_by(Job.status)).all()}


def recent_jobs(session: Session, limit: int = 50, status: str | None = None,
                sae_id: int | None = None) -> list[tuple[Job, str, int]]:
    """(job, SAE name, latent index), newest first."""
    q = (select(Job, SAE.name, Feature.index).join(SAE, Job.sae_id == SAE.id).join(Feature, Job.feature_id == Feature.id)
         .order_by(Job.id.desc()).limit(limit))
    if status:
        q = q.where(Job.status == status)
    if sae_id:
        q = q.where(Job.sae_id == sae_id)
    return [tuple(r) for r in session.execute(q)]


def live_job_for(session: Session, feature_id: int) -> Job | None:
    return session.scalar(select(Job).where(Job.feature_id == feature_id, or_(Job.status == "queued", Job.status == "running"))
                          .order_by(Job.id.desc()).limit(1))
