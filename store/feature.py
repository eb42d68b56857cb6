"""One feature's dashboard: the hot path of the JSON API and the pages.

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

import math
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import orjson
from sqlalchemy import Text, bindparam, cast, func, literal_column, select
from sqlalchemy.orm import Session

from store.db import json_value, raw_rows
from store.errors import NotFound
from store.models import SAE, Example, ExampleKind, Explanation, Feature, Job, SAEStatus
from store.saes import SAEInfo, sae_by_name, sae_info
from store.vocab import Vocab

MAX_LATENT_INDEX = 2**31 - 1


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
             .where(_J.feature_id == _F.id,
                    # written into the SQL (not an expanding parameter): the query is compiled once
                    # and run through the DBAPI cursor, and the partial index on live jobs applies
                    _J.status.in_([literal_column("'queued'"), literal_column("'running'")]))
             .order_by(_J.id.desc()).limit(1).correlate(Feature.__table__).scalar_subquery().label("live_job"))


_FEATURE_COLS = (
    _S.id.label("sae_id"), _S.version, _S.d_sae, _S.lm_id, _S.n_tokens_analyzed,
    _F.id.label("feature_id"), _F.index, _F.firing_count, _F.density, _F.mean_act, _F.max_act,
    cast(_F.moments, Text).label("moments"), cast(_F.act_hist, Text).label("act_hist"),
    cast(_F.interval_shares, Text).label("interval_shares"), cast(_F.logits, Text).label("logits"),
    cast(_F.neighbors, Text).label("neighbors"), _F.peak_token_id, _F.peak_token_share, _F.best_score,
    _F.explanation, _expl_count, _expl_last,
)
_FEATURE_FROM = Feature.__table__.join(SAE.__table__, _F.sae_id == _S.id)
_FEATURE_WHERE = (_S.name == bindparam("name"), _S.status == SAEStatus.ready.value, _F.index == bindparam("index"))
FEATURE_QUERY = select(*_FEATURE_COLS).select_from(_FEATURE_FROM).where(*_FEATURE_WHERE)
FEATURE_QUERY_WITH_JOB = select(*_FEATURE_COLS, _live_job).select_from(_FEATURE_FROM).where(*_FEATURE_WHERE)
EXAMPLES_QUERY = (select(_X.id, _X.kind, _X.rank, _X.interval, _X.activation, _X.peak, _X.doc_id, _X.doc_offset,
                         _X.token_ids, _X.acts)
                  .where(_X.feature_id == bindparam("fid")).order_by(_X.kind, _X.interval, _X.rank))
_loads = json_value  # JSON columns come back as text (see the casts above) and are parsed with orjson


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
    live_job: str | None = None

    def etag(self, page: bool = False, neighbors: dict[int, str] | None = None, k: int | None = None,
             lineage: str | None = None) -> str:
        """Keyed on what the response shows: the SAE's version (republishing), this feature's own
        explanations, the explanations of the neighbours it lists (`neighbors`, from
        shown_neighbor_explanations), for the page its explanation job and, when its SAE has
        relations, the tag of the relation graph its lineage panel walks (`lineage`, from
        store.lineage.RelationGraph.tag). An explanation of any other latent changes nothing here."""
        tag = f"{self.sae.version[:16]}-{self.index}-{self.n_explanations}-{self.last_explanation}"
        if neighbors:
            digest = zlib.crc32(orjson.dumps(sorted(neighbors.items())))
            tag += f"-n{len(neighbors)}.{digest:08x}"
        if k is not None:
            tag += f"-k{k}"
        if lineage:
            tag += f"-g{lineage}"
        if page:
            tag += f"-{(self.live_job or '0').replace(':', '')}"
        return f'W/"{tag}"'


_COMPILED: dict[tuple[str, bool], tuple[str, tuple[str, ...] | None, tuple[str, ...], dict]] = {}


def _feature_row(session: Session, name: str, index: int, with_job: bool):
    """The feature query through the DBAPI cursor, from SQL compiled once per dialect: SQLAlchemy's
    statement execution (cache lookup, result processing) was the largest share of a request's time."""
    conn = session.connection()
    dialect = conn.dialect
    key = (dialect.name, with_job)
    compiled = _COMPILED.get(key)
    if compiled is None:
        stmt = FEATURE_QUERY_WITH_JOB if with_job else FEATURE_QUERY
        c = stmt.compile(dialect=dialect)
        assert "POSTCOMPILE" not in str(c), "the feature query must not need per-execution expansion"
        compiled = _COMPILED[key] = (str(c), tuple(c.positiontup) if c.positional else None,
                                     tuple(col.key for col in stmt.selected_columns), dict(c.params))
    sql, order, names, constants = compiled
    if dialect.paramstyle not in ("qmark", "format", "pyformat", "named"):
        row = session.execute(FEATURE_QUERY_WITH_JOB if with_job else FEATURE_QUERY, {"name": name, "index": index}).first()
        return row._mapping if row is not None else None
    values = {**constants, "name": name, "index": index}  # constants: the statuses written into the query
    params = tuple(values[k] for k in order) if order is not None else values
    cur = conn.connection.driver_connection.cursor()
    try:
        cur.execute(sql, params)
        row = cur.fetchone()
    finally:
        cur.close()
    return dict(zip(names, row)) if row is not None else None


def load_feature(session: Session, name: str, index: int, with_job: bool = False) -> FeatureRow:
    """The feature `index` of the published SAE `name` in one query; NotFound names what is missing."""
    m = None
    if 0 <= index <= MAX_LATENT_INDEX and "\x00" not in name:
        m = _feature_row(session, name, index, with_job)
    if m is None:
        sae = sae_by_name(session, name)  # raises NotFound for an unknown SAE
        if not 0 <= index < sae.d_sae:
            raise NotFound(f"SAE {name!r} has latents 0..{sae.d_sae - 1}; {index} is out of range")
        raise NotFound(f"latent {index} of {name!r} not found")
    info = sae_info(session, m["sae_id"], m["version"])
    return FeatureRow(
        sae=info, id=m["feature_id"], index=m["index"], firing_count=m["firing_count"] or 0,
        density=m["density"] or 0.0, mean_act=m["mean_act"] or 0.0, max_act=m["max_act"] or 0.0,
        moments=_loads(m["moments"]) or {}, act_hist=_loads(m["act_hist"]) or {},
        interval_shares=_loads(m["interval_shares"]) or [], logits=_loads(m["logits"]) or {},
        neighbors=_loads(m["neighbors"]) or [], peak_token_id=m["peak_token_id"],
        peak_token_share=m["peak_token_share"] or 0.0, best_score=m["best_score"], explanation=m["explanation"],
        n_explanations=int(m["n_expl"] or 0), last_explanation=int(m["last_expl"] or 0),
        live_job=m["live_job"] if with_job else None,
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


def neighbor_explanations(session: Session, sae_id: int, indices: list[int]) -> dict[int, str]:
    """{latent index: best explanation} for those of `indices` that have one: one read of the
    (sae_id, index) unique index, a few dozen rows at most."""
    indices = [int(i) for i in indices][:1000]
    if not indices:
        return {}
    sql = (f'SELECT "index", explanation FROM features WHERE sae_id = ? AND "index" IN ({", ".join("?" * len(indices))}) '
           "AND explanation IS NOT NULL")
    return {int(i): e for i, e in raw_rows(session, sql, (sae_id, *indices))}


def shown_neighbor_explanations(session: Session, f: FeatureRow, k: int | None = None) -> dict[int, str]:
    """The explanations of the neighbours a feature's page (or its first k) lists: part of its ETag."""
    near = f.neighbors[:k] if k is not None else f.neighbors
    return neighbor_explanations(session, f.sae.id, [j for j, _ in near or ()])


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
    return [ExampleRow(*r) for r in raw_rows(session, _EXAMPLES_SQL, (feature_id,))]


def explanation_dict(e: Explanation) -> dict:
    return {"id": e.id, "text": e.text, "method": e.method, "explainer": e.explainer,
            "detection_score": e.detection_score, "detection_f1": e.detection_f1,
            "fuzzing_score": e.fuzzing_score, "fuzzing_f1": e.fuzzing_f1,
            "embedding_score": e.embedding_score, "detection_uninformative": e.detection_uninformative,
            "fuzzing_uninformative": e.fuzzing_uninformative, "scores": e.scores,
            "created_at": e.created_at.isoformat() if e.created_at else None}


def feature_payload(session: Session, sae, f, vocab: Vocab, n_intervals: int | None = None,
                    with_text: bool = True, neighbor_expl: dict[int, str] | None = None) -> dict:
    """Everything on a feature's page, as JSON-ready data.

    `f` is a FeatureRow (fast path) or an ORM Feature (then `sae` is its SAE); with_text=False
    leaves out the examples' token strings (the HTML page renders tokens by id); neighbor_expl:
    the neighbours' explanations when the caller has read them already (for the ETag)."""
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
    if neighbor_expl is None:
        neighbor_expl = neighbor_explanations(session, info.id, [j for j, _ in neighbors])
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
