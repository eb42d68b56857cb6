"""Search: explanations by text, latents by the token they peak on."""

from __future__ import annotations

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from app.models import SAE, Explanation, Feature, SAEStatus
from app.store.feature import explanation_dict
from app.store.saes import list_saes
from app.store.table import feature_summary
from app.store.vocab import vocab_for


def _fts_query(q: str) -> str:
    """User text to a safe FTS5 query: each word quoted, all required, last one as a prefix."""
    words = [w for w in "".join(c if c.isalnum() else " " for c in q).split() if w][:12]
    if not words:
        return ""
    return " ".join(f'"{w}"' for w in words[:-1]) + (" " if len(words) > 1 else "") + f'"{words[-1]}"*'


def _clean_query(q: str) -> str:
    """Search text without NUL and other control characters (PostgreSQL refuses NUL in text)."""
    return "".join(ch if ch.isprintable() or ch.isspace() else " " for ch in q).strip() if not q.isprintable() else q.strip()


def search_explanations(session: Session, q: str, limit: int = 50, sae_name: str | None = None,
                        offset: int = 0) -> list[dict]:
    return search_explanations_page(session, q, limit, sae_name, offset)[0]


def search_explanations_page(session: Session, q: str, limit: int = 50, sae_name: str | None = None,
                             offset: int = 0) -> tuple[list[dict], int]:
    """(explanations matching q, best scored first, from `offset`; how many match in all)."""
    q = _clean_query(q)
    if not q:
        return [], 0
    dialect = session.get_bind().dialect.name
    base = (select(Explanation, Feature.index, SAE.name).join(Feature, Explanation.feature_id == Feature.id)
            .join(SAE, Feature.sae_id == SAE.id).where(SAE.status == SAEStatus.ready.value))
    if sae_name:
        base = base.where(SAE.name == sae_name)
    if dialect == "sqlite":
        fts = _fts_query(q)
        if not fts:
            return [], 0
        ids = select(text("rowid")).select_from(text("explanations_fts")).where(text("explanations_fts MATCH :q"))
        stmt = base.where(Explanation.id.in_(ids)).params(q=fts)
    elif dialect == "postgresql":
        ts = func.websearch_to_tsquery("english", q)
        stmt = base.where(func.to_tsvector("english", Explanation.text).op("@@")(ts)).order_by(
            func.ts_rank(func.to_tsvector("english", Explanation.text), ts).desc())
    else:
        stmt = base.where(Explanation.text.ilike(f"%{q}%"))
    total = session.scalar(select(func.count()).select_from(stmt.order_by(None).subquery())) or 0
    stmt = stmt.order_by(Explanation.detection_score.desc().nulls_last(), Explanation.id).limit(limit).offset(offset)
    return [{"sae": name, "index": index, **explanation_dict(e)} for e, index, name in session.execute(stmt)], total


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
