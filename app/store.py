"""Read-side queries shared by the JSON API and the HTML pages.

Every function here reads only published (status = ready) SAEs, so a half-written SAE is never
visible. Vocabularies are decoded once per process and cached.

The feature dashboard is the hot path (every page view and every JSON read of a feature), so it
is a fixed number of indexed queries whatever the feature: one joined read of the SAE and the
feature row (with the explanation count and, for pages, the live job folded in as scalar
subqueries), one read of its examples, and — only when there is something to show — its
explanations and its neighbours' explanations. Rows come back as plain tuples (no ORM objects)
and examples stay numpy arrays until orjson writes them.
"""

from __future__ import annotations

import json
import math
import operator
import re
import threading
import unicodedata
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import orjson
from markupsafe import escape
from sqlalchemy import Text, and_, bindparam, cast, func, or_, select, text
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
MAX_LATENT_INDEX = 2**31 - 1


# --- tokens -----------------------------------------------------------------------------------

_VISIBLE = {"\n": "↵", "\r": "⏎", "\t": "⇥", "": "∅"}
_INVISIBLE_CATEGORIES = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))


def visible(token: str) -> str:
    """A token as a person should see it in running text: newlines, tabs and invisible characters
    made visible (↵ ⇥ ⟨U+200B⟩ …); ordinary spaces stay spaces."""
    if token in _VISIBLE:
        return _VISIBLE[token]
    if token.isprintable():  # the common case: nothing to replace (spaces count as printable)
        return token
    out = []
    for ch in token:
        if ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif unicodedata.category(ch) in _INVISIBLE_CATEGORIES or (not ch.isprintable() and ch != " "):
            out.append(f"⟨U+{ord(ch):04X}⟩")
        else:
            out.append(ch)
    return "".join(out)


def chip(token: str) -> str:
    """A token shown on its own (logit tables, peak tokens): like visible(), and spaces become ␣
    so that ' the' and 'the' can be told apart."""
    return visible(token).replace(" ", "␣") or "∅"


def _clean(token) -> str:
    """Vocabulary entries as valid Unicode: lone surrogates (which JSON cannot carry) become U+FFFD."""
    if not isinstance(token, str):
        token = str(token)
    try:
        token.encode("utf-8")
        return token
    except UnicodeEncodeError:
        return token.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


_UNMARK = str.maketrans({"↵": "\n", "⏎": "\r", "⇥": "\t", "␣": " "})


@dataclass(frozen=True, eq=False)
class Vocab:
    raw: tuple[str, ...]
    html: tuple[str, ...]  # visible() then HTML-escaped: ready to drop into running text
    chips: tuple[str, ...] = ()  # chip() then HTML-escaped: a token on its own
    _index: dict = field(default_factory=dict, repr=False)

    def text(self, token_id: int) -> str:
        return self.raw[token_id] if 0 <= token_id < len(self.raw) else f"<{token_id}>"

    def texts(self, ids: np.ndarray) -> list[str] | tuple[str, ...]:
        """Token strings of many ids at once (C speed when all ids are in range)."""
        n = len(ids)
        if n == 0:
            return []
        if int(ids.min()) >= 0 and int(ids.max()) < len(self.raw):
            if n == 1:
                return [self.raw[int(ids[0])]]
            return operator.itemgetter(*ids.tolist())(self.raw)
        return [self.text(int(i)) for i in ids.tolist()]

    @property
    def spans(self) -> tuple[str, ...]:
        """Each token as an inactive example span, `<span class="t">…</span>` (built once)."""
        spans = self._index.get("__spans__")
        if spans is None:
            spans = tuple(f'<span class="t">{h}</span>' for h in self.html)
            self._index["__spans__"] = spans
        return spans

    def display_html(self, token_id: int) -> str:
        return self.html[token_id] if 0 <= token_id < len(self.html) else str(escape(f"<{token_id}>"))

    def chip_html(self, token_id: int) -> str:
        return self.chips[token_id] if 0 <= token_id < len(self.chips) else str(escape(f"<{token_id}>"))

    def find(self, query: str, limit: int = 200) -> list[int]:
        """Token ids whose text equals the query up to surrounding spaces and case.

        ↵ ⇥ ␣ in the query stand for newline, tab and space; a query of only whitespace matches
        tokens that are exactly that whitespace."""
        q = query.translate(_UNMARK)
        if not q:
            return []
        if not q.strip():
            return [i for i, t in enumerate(self.raw) if t == q][:limit]
        index = self._index.get("__find__")
        if index is None:
            index = {}
            for i, t in enumerate(self.raw):
                index.setdefault(t.strip().lower(), []).append(i)
            self._index["__find__"] = index
        return index.get(q.strip().lower(), [])[:limit]


_SPECIAL = re.compile(r"<\|[^<>|]{1,40}\|>|<(?:s|/s|bos|eos|pad|unk|mask|cls|sep|start_of_turn|end_of_turn)>|\[(?:CLS|SEP|PAD|UNK|MASK)\]")
_MARKS = re.compile("([↵⏎⇥␣∅]+|⟨U\\+[0-9A-F]{4,6}⟩)")


def token_html(token: str, as_chip: bool = False) -> str:
    """A token as safe HTML: visible() or chip(), escaped; the markers for whitespace and invisible
    characters are wrapped in <span class="ws"> (drawn lighter) and special tokens such as
    <|endoftext|> in <span class="sp">, so that they read as structure rather than text."""
    shown = chip(token) if as_chip else visible(token)
    if _SPECIAL.fullmatch(token):
        return f'<span class="sp">{escape(shown)}</span>'
    html = str(escape(shown))
    if _MARKS.search(html):
        html = _MARKS.sub(r'<span class="ws">\1</span>', html)
    return html


def make_vocab(tokens) -> Vocab:
    raw = tuple(_clean(t) for t in tokens)
    return Vocab(raw, tuple(token_html(t) for t in raw), tuple(token_html(t, as_chip=True) for t in raw))


@lru_cache(maxsize=16)
def _decode_vocab(lm_id: int, blob: bytes) -> Vocab:
    return make_vocab(json.loads(zlib.decompress(blob)))


_vocab_by_lm: dict[tuple[int, int], Vocab] = {}


def vocab_for(session: Session, lm_id: int) -> Vocab:
    """The LM's vocabulary, decoded once per process (and per database: ids are per database)."""
    key = (id(session.get_bind().pool), lm_id)
    v = _vocab_by_lm.get(key)
    if v is None:
        blob = session.scalar(select(LM.vocab).where(LM.id == lm_id))
        if blob is None:
            raise NotFound(f"language model {lm_id} has gone")
        v = _decode_vocab(lm_id, blob)
        _vocab_by_lm[key] = v
    return v


def forget_caches() -> None:
    _vocab_by_lm.clear()
    _decode_vocab.cache_clear()
    _sae_info.clear()
    _explained.clear()
    RENDERED.clear()


# --- SAEs and models --------------------------------------------------------------------------

def list_lms(session: Session) -> list[LM]:
    return list(session.scalars(select(LM).order_by(LM.name)))


def list_saes(session: Session) -> list[SAE]:
    return list(session.scalars(select(SAE).where(SAE.status == SAEStatus.ready.value).order_by(SAE.name)))


def sae_by_name(session: Session, name: str) -> SAE:
    if "\x00" in name or len(name) > 200:  # PostgreSQL rejects NUL in text; no SAE can have such a name
        raise NotFound(f"no SAE named {name[:200]!r}")
    sae = session.scalar(select(SAE).where(SAE.name == name, SAE.status == SAEStatus.ready.value))
    if sae is None:
        raise NotFound(f"no SAE named {name!r}")
    return sae


@dataclass(frozen=True)
class SAEInfo:
    """What a feature page needs to know about its SAE: immutable for one published version."""

    id: int
    name: str
    version: str
    d_sae: int
    lm_id: int
    lm_name: str
    site: str
    architecture: str
    k: int | None
    d_in: int
    n_tokens_analyzed: int

    @classmethod
    def of(cls, sae: SAE) -> SAEInfo:
        return cls(sae.id, sae.name, sae.version, sae.d_sae, sae.lm_id, sae.lm.name, sae.site, sae.architecture,
                   sae.k, sae.d_in, sae.n_tokens_analyzed)


_sae_info: dict[tuple[int, str], SAEInfo] = {}


def sae_info(session: Session, sae_id: int, version: str) -> SAEInfo:
    """The SAE's description, cached per (id, version): a republished SAE gets a new version."""
    info = _sae_info.get((sae_id, version))
    if info is None:
        sae = session.get(SAE, sae_id)
        if sae is None:
            raise NotFound(f"SAE {sae_id} has gone")
        info = SAEInfo.of(sae)
        if len(_sae_info) > 256:
            _sae_info.clear()
        _sae_info[(sae_id, version)] = info
    return info


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


# --- one feature: the hot path ------------------------------------------------------------------

_S = SAE.__table__.c
_F = Feature.__table__.c
_E = Explanation.__table__.c
_X = Example.__table__.c
_J = Job.__table__.c

_expl_count = (select(func.count()).where(_E.feature_id == _F.id).correlate(Feature.__table__)
               .scalar_subquery().label("n_expl"))
_expl_last = (select(func.max(_E.id)).where(_E.feature_id == _F.id).correlate(Feature.__table__)
              .scalar_subquery().label("last_expl"))
# The newest live job of the feature as "id:status" (the page shows it; it is part of the page's ETag).
_live_job = (select(cast(_J.id, Text).concat(":").concat(_J.status))
             .where(_J.feature_id == _F.id, _J.status.in_(("queued", "running")))
             .order_by(_J.id.desc()).limit(1).correlate(Feature.__table__).scalar_subquery().label("live_job"))

# Newest explanation anywhere (an O(1) read of the primary key index). It is part of every feature
# ETag, so a neighbour that gains an explanation refreshes the pages that list it; when it is 0 (no
# explanations at all) the explanation queries are skipped.
_expl_watermark = select(func.max(_E.id)).scalar_subquery().label("expl_watermark")

_FEATURE_COLS = (
    _S.id.label("sae_id"), _S.version, _S.d_sae, _S.lm_id, _S.n_tokens_analyzed,
    _F.id.label("feature_id"), _F.index, _F.firing_count, _F.density, _F.mean_act, _F.max_act,
    cast(_F.moments, Text).label("moments"), cast(_F.act_hist, Text).label("act_hist"),
    cast(_F.interval_shares, Text).label("interval_shares"), cast(_F.logits, Text).label("logits"),
    cast(_F.neighbors, Text).label("neighbors"), _F.peak_token_id, _F.peak_token_share, _F.best_score,
    _F.explanation, _expl_count, _expl_last, _expl_watermark,
)
_FEATURE_FROM = Feature.__table__.join(SAE.__table__, _F.sae_id == _S.id)
_FEATURE_WHERE = (_S.name == bindparam("name"), _S.status == SAEStatus.ready.value, _F.index == bindparam("index"))
FEATURE_QUERY = select(*_FEATURE_COLS).select_from(_FEATURE_FROM).where(*_FEATURE_WHERE)
FEATURE_QUERY_WITH_JOB = select(*_FEATURE_COLS, _live_job).select_from(_FEATURE_FROM).where(*_FEATURE_WHERE)
EXAMPLES_QUERY = (select(_X.id, _X.kind, _X.rank, _X.interval, _X.activation, _X.peak, _X.doc_id, _X.doc_offset,
                         _X.token_ids, _X.acts)
                  .where(_X.feature_id == bindparam("fid")).order_by(_X.kind, _X.interval, _X.rank))
NEIGHBOR_EXPL_QUERY = (select(_F.index, _F.explanation)
                       .where(_F.sae_id == bindparam("sid"), _F.index.in_(bindparam("idx", expanding=True)),
                              _F.explanation.is_not(None)))


def _loads(v):
    """JSON columns come back as text (see the casts above) and are parsed with orjson."""
    if v is None:
        return None
    if isinstance(v, (dict, list)):
        return v
    return orjson.loads(v)


@dataclass
class FeatureRow:
    """One feature row with its SAE's identity: everything the ETag and the dashboard need."""

    sae: SAEInfo
    id: int
    index: int
    firing_count: int
    density: float
    mean_act: float
    max_act: float
    moments: dict
    act_hist: dict
    interval_shares: list
    logits: dict
    neighbors: list
    peak_token_id: int | None
    peak_token_share: float
    best_score: float | None
    explanation: str | None
    n_explanations: int
    last_explanation: int
    explanation_watermark: int = 0
    live_job: str | None = None

    def etag(self, page: bool = False) -> str:
        """Changes when the SAE is republished or the feature gains an explanation (and, for the
        page, when its explanation job changes state)."""
        tag = (f"{self.sae.version[:16]}-{self.index}-{self.n_explanations}-{self.last_explanation}"
               f"-{self.explanation_watermark}")
        if page:
            tag += f"-{(self.live_job or '0').replace(':', '')}"
        return f'W/"{tag}"'


def load_feature(session: Session, name: str, index: int, with_job: bool = False) -> FeatureRow:
    """The feature `index` of the published SAE `name` in one query; NotFound names what is missing."""
    row = None
    if 0 <= index <= MAX_LATENT_INDEX and "\x00" not in name:
        row = session.execute(FEATURE_QUERY_WITH_JOB if with_job else FEATURE_QUERY,
                              {"name": name, "index": index}).first()
    if row is None:
        sae = sae_by_name(session, name)  # raises NotFound for an unknown SAE
        if not 0 <= index < sae.d_sae:
            raise NotFound(f"SAE {name!r} has latents 0..{sae.d_sae - 1}; {index} is out of range")
        raise NotFound(f"latent {index} of {name!r} not found")
    m = row._mapping
    info = sae_info(session, m["sae_id"], m["version"])
    return FeatureRow(
        sae=info, id=m["feature_id"], index=m["index"], firing_count=m["firing_count"] or 0,
        density=m["density"] or 0.0, mean_act=m["mean_act"] or 0.0, max_act=m["max_act"] or 0.0,
        moments=_loads(m["moments"]) or {}, act_hist=_loads(m["act_hist"]) or {},
        interval_shares=_loads(m["interval_shares"]) or [], logits=_loads(m["logits"]) or {},
        neighbors=_loads(m["neighbors"]) or [], peak_token_id=m["peak_token_id"],
        peak_token_share=m["peak_token_share"] or 0.0, best_score=m["best_score"], explanation=m["explanation"],
        n_explanations=int(m["n_expl"] or 0), last_explanation=int(m["last_expl"] or 0),
        explanation_watermark=int(m["expl_watermark"] or 0), live_job=m["live_job"] if with_job else None,
    )


def hist_edges(lo: float, hi: float, n: int) -> np.ndarray:
    return np.round(np.linspace(float(lo), float(hi), n + 1), 6)


def example_dict(ex, vocab: Vocab) -> dict:
    """One example (an ORM Example or a row of EXAMPLES_QUERY) as JSON-ready data.

    token_ids and acts stay numpy arrays: orjson writes them directly (acts rounded to 3 decimals)."""
    ids = np.frombuffer(ex.token_ids, dtype="<i4")
    acts = np.round(np.frombuffer(ex.acts, dtype="<f2").astype(np.float32), 3)
    return {
        "id": ex.id,
        "activation": round(ex.activation, 4),
        "peak": ex.peak,
        "doc_id": ex.doc_id,
        "doc_offset": ex.doc_offset,
        "token_ids": ids,
        "tokens": vocab.texts(ids),
        "acts": acts,
    }


def example_dicts(rows, vocab: Vocab, with_text: bool = True) -> list[dict]:
    """example_dict for many rows at once: one numpy decode and one vocabulary lookup for all their
    tokens, then zero-copy slices per example (the feature dashboard's hot path). Pages, which
    render tokens from the vocabulary's HTML, skip the token strings (with_text=False)."""
    if not rows:
        return []
    ids_all = np.frombuffer(b"".join([r.token_ids for r in rows]), dtype="<i4")
    acts_all = np.round(np.frombuffer(b"".join([r.acts for r in rows]), dtype="<f2").astype(np.float32), 3)
    texts_all = vocab.texts(ids_all) if with_text else ()
    out = []
    start = 0
    for r in rows:
        end = start + len(r.token_ids) // 4
        out.append({"id": r.id, "activation": round(r.activation, 4), "peak": r.peak, "doc_id": r.doc_id,
                    "doc_offset": r.doc_offset, "token_ids": ids_all[start:end], "tokens": texts_all[start:end] if with_text else None,
                    "acts": acts_all[start:end]})
        start = end
    return out


def _raw_rows(session: Session, sql: str, params: tuple) -> list[tuple] | None:
    """Run `sql` (written with ? placeholders) on the session's DBAPI connection; None when the
    driver's placeholder style is not one we translate (then callers use SQLAlchemy)."""
    conn = session.connection()
    style = conn.dialect.paramstyle
    if style in ("format", "pyformat"):
        sql = sql.replace("?", "%s")
    elif style != "qmark":
        return None
    cur = conn.connection.driver_connection.cursor()
    try:
        cur.execute(sql, params)
        return cur.fetchall()
    finally:
        cur.close()


_EXPLAINED_CACHE_MAX = 100_000
_explained: dict[str, tuple[int, dict[int, str] | None]] = {}
_explained_lock = threading.Lock()


def explained_latents(session: Session, sae_id: int, watermark: int, version: str = "") -> dict[int, str] | None:
    """{latent index: best explanation} of every explained latent of an SAE, cached per process
    until the explanation watermark (newest explanation id) moves; None when the SAE has more
    than _EXPLAINED_CACHE_MAX explained latents (then callers query just the ones they need)."""
    key = f"{id(session.get_bind().pool)}:{sae_id}:{version}"
    hit = _explained.get(key)
    if hit is not None and hit[0] == watermark:
        return hit[1]
    rows = _raw_rows(session, 'SELECT "index", explanation FROM features WHERE sae_id = ? AND explanation IS NOT NULL '
                              f"LIMIT {_EXPLAINED_CACHE_MAX + 1}", (sae_id,))
    if rows is None:
        rows = session.execute(select(Feature.index, Feature.explanation).where(
            Feature.sae_id == sae_id, Feature.explanation.is_not(None)).limit(_EXPLAINED_CACHE_MAX + 1)).all()
    table = {int(i): e for i, e in rows} if len(rows) <= _EXPLAINED_CACHE_MAX else None
    with _explained_lock:
        if len(_explained) > 64:
            _explained.clear()
        _explained[key] = (watermark, table)
    return table


def neighbor_explanations(session: Session, sae_id: int, indices: list[int], watermark: int | None = None,
                          version: str = "") -> dict[int, str]:
    """{latent index: best explanation} for those of `indices` that have one."""
    indices = [int(i) for i in indices][:1000]
    if not indices:
        return {}
    if watermark is not None:
        table = explained_latents(session, sae_id, watermark, version)
        if table is not None:
            return {i: table[i] for i in indices if i in table}
    sql = (f'SELECT "index", explanation FROM features WHERE sae_id = ? AND "index" IN ({", ".join("?" * len(indices))}) '
           "AND explanation IS NOT NULL")
    rows = _raw_rows(session, sql, (sae_id, *indices))
    if rows is None:
        rows = session.execute(NEIGHBOR_EXPL_QUERY, {"sid": sae_id, "idx": indices}).all()
    return {int(i): e for i, e in rows}


class ExampleRow(NamedTuple):
    id: int
    kind: int
    rank: int
    interval: int | None
    activation: float
    peak: int
    doc_id: int
    doc_offset: int
    token_ids: bytes
    acts: bytes


_EXAMPLES_SQL = ('SELECT id, kind, rank, "interval", activation, peak, doc_id, doc_offset, token_ids, acts '
                 'FROM examples WHERE feature_id = ? ORDER BY kind, "interval", rank')


def examples_for(session: Session, feature_id: int) -> list[ExampleRow]:
    """A feature's examples as rows (id, kind, rank, interval, activation, peak, doc_id, doc_offset,
    token_ids, acts), ordered by kind, interval and rank.

    This is the largest read of a page (~70 rows), so it goes through the DBAPI cursor directly
    (uses the index ix_examples_feature_kind_rank)."""
    rows = _raw_rows(session, _EXAMPLES_SQL, (feature_id,))
    if rows is None:
        rows = session.execute(EXAMPLES_QUERY, {"fid": feature_id}).all()
    return [ExampleRow(*r) for r in rows]


def explanation_dict(e: Explanation) -> dict:
    return {"id": e.id, "text": e.text, "method": e.method, "explainer": e.explainer,
            "detection_score": e.detection_score, "detection_f1": e.detection_f1,
            "fuzzing_score": e.fuzzing_score, "fuzzing_f1": e.fuzzing_f1,
            "created_at": e.created_at.isoformat() if e.created_at else None}


def feature_payload(session: Session, sae, f, vocab: Vocab, n_intervals: int | None = None,
                    with_text: bool = True) -> dict:
    """Everything on a feature's page, as JSON-ready data.

    `f` is a FeatureRow (fast path) or an ORM Feature (then `sae` is its SAE); with_text=False
    leaves out the examples' token strings (the HTML page renders tokens by id)."""
    if not isinstance(f, FeatureRow):
        f = load_feature(session, sae.name, f.index)
    info = f.sae
    top, random_sample = [], []
    groups: dict[int, list] = {}
    rows = examples_for(session, f.id)
    for ex, d in zip(rows, example_dicts(rows, vocab, with_text)):
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
    neighbors = [(int(j), c) for j, c in (f.neighbors or [])]
    neighbor_expl = neighbor_explanations(session, info.id, [j for j, _ in neighbors], f.explanation_watermark,
                                          info.version) \
        if neighbors and f.explanation_watermark else {}
    explanations = []
    if f.n_explanations:
        explanations = [explanation_dict(e) for e in session.scalars(
            select(Explanation).where(Explanation.feature_id == f.id)
            .order_by(Explanation.detection_score.desc().nulls_last(), Explanation.id))]
    logits = f.logits or {}
    lh = logits.get("hist") or {}
    hist = f.act_hist or {}
    counts = hist.get("counts", [])
    m = f.moments or {}
    return {
        "sae": info.name,
        "index": f.index,
        "d_sae": info.d_sae,
        "stats": {
            "firing_count": f.firing_count, "density": f.density,
            "log10_density": math.log10(f.density) if f.density > 0 else None,
            "mean": f.mean_act, "max": f.max_act,
            "e_a2": m.get("e_a2"), "std": m.get("std"), "skew": m.get("skew"), "kurtosis": m.get("kurtosis"),
            "tokens_analyzed": info.n_tokens_analyzed,
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
        "neighbors": [{"index": j, "cosine": c, "explanation": neighbor_expl.get(j)} for j, c in neighbors],
        "examples": {"top": top, "intervals": intervals, "random": random_sample},
        "explanations": explanations,
        "best_score": f.best_score,
        "explanation": f.explanation,
    }


# --- rendered output cache ------------------------------------------------------------------------

class RenderCache:
    """A bounded (by bytes) LRU of rendered responses keyed by (kind, SAE, index, ETag).

    Keys carry the ETag, which changes with the SAE's version and the feature's explanations (and
    job, for pages), so entries never go stale; they only age out."""

    def __init__(self, max_bytes: int = 48 << 20, max_entry: int = 2 << 20):
        self.max_bytes, self.max_entry = max_bytes, max_entry
        self._data: OrderedDict[tuple, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            body = self._data.get(key)
            if body is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return body

    def put(self, key: tuple, body: bytes) -> None:
        if len(body) > self.max_entry or self.max_bytes <= 0:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._data[key] = body
            self._bytes += len(body)
            while self._bytes > self.max_bytes and self._data:
                _, dropped = self._data.popitem(last=False)
                self._bytes -= len(dropped)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._data)


RENDERED = RenderCache()


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
            "peak_token_id": f.peak_token_id, "peak_token_share": f.peak_token_share,
            "top_logits": [vocab.text(t) for t, _ in (f.logits or {}).get("top", [])[:5]],
            "top_logit_ids": [t for t, _ in (f.logits or {}).get("top", [])[:5]]}


# --- search -----------------------------------------------------------------------------------

def _fts_query(q: str) -> str:
    """User text to a safe FTS5 query: each word quoted, all required, last one as a prefix."""
    words = [w for w in "".join(c if c.isalnum() else " " for c in q).split() if w][:12]
    if not words:
        return ""
    return " ".join(f'"{w}"' for w in words[:-1]) + (" " if len(words) > 1 else "") + f'"{words[-1]}"*'


def _clean_query(q: str) -> str:
    """Search text without NUL and other control characters (PostgreSQL refuses NUL in text)."""
    return "".join(ch if ch.isprintable() or ch.isspace() else " " for ch in q).strip() if not q.isprintable() else q.strip()


def search_explanations(session: Session, q: str, limit: int = 50, sae_name: str | None = None) -> list[dict]:
    q = _clean_query(q)
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
    token = token.replace("\x00", "")
    for sae in list_saes(session):
        if sae_name and sae.name != sae_name:
            continue
        vocab = vocab_for(session, sae.lm_id)
        ids = vocab.find(token)
        if not ids:
            continue
        rows = session.scalars(select(Feature).where(Feature.sae_id == sae.id, Feature.peak_token_id.in_(ids))
                               .order_by(Feature.peak_token_share.desc(), Feature.max_act.desc()).limit(limit))
        out += [{"sae": sae.name, **feature_summary(f, vocab)} for f in rows]
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
