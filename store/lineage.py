"""Read side of feature lineage: relations between SAEs, the links of one latent, the layer map of
a model, and what an SAE misses. Every query reads only published (ready) SAEs.

A relation is stored once, with A the narrower SAE of a width pair or the earlier layer of a
layer pair; readers ask for it in either order. A latent's chain across layers follows the stored
one-to-one matches hop by hop (indexed reads of feature_links by relation and latent).

A feature page walks the relation graph of its SAE on every view, so the graph (every relation
between published SAEs, as plain data) is read once per process and kept while no published SAE
changes: one tiny read of the published SAEs' versions per view checks that. Writing a relation
gives both its SAEs new versions, and republishing or deleting an SAE changes the set, so a kept
graph is never stale; only the links of the latent itself are read per view."""

from __future__ import annotations

import itertools
import threading
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple

from sqlalchemy import and_, func, inspect, or_, select
from sqlalchemy.orm import Session, aliased

from store.db import json_value, raw_rows
from store.errors import NotFound
from store.models import LM, SAE, FeatureLink, SAEDarkMatter, SAERelation, SAEStatus

MAX_HOPS = 12
MATCH_LABELS = ("matched", "unconfirmed")
WIDTH_LABELS = ("persisted", "split", "persisted_split", "novel", "reconstruction", "vanished")
LINK_SORTS = {"a": FeatureLink.a_index, "b": FeatureLink.b_index, "cos": FeatureLink.cos, "rho": FeatureLink.rho,
              "p_b_given_a": FeatureLink.p_b_given_a, "p_a_given_b": FeatureLink.p_a_given_b,
              "stitch_gain": FeatureLink.stitch_gain}

_A, _B = aliased(SAE), aliased(SAE)
# Build each alias's column collection now, before request threads share it: its lazy first
# build can race, and a request then fails with NoSuchColumnError (sqlalchemy issue 12302; seen
# here as intermittent 500s on relation pages under concurrent load).
for _alias in (_A, _B):
    inspect(_alias).selectable.c


@dataclass
class RelationView:
    relation: SAERelation
    a: SAE
    b: SAE

    @property
    def kind(self) -> str:
        return self.relation.kind


def _ready(*saes):
    return and_(*(s.status == SAEStatus.ready.value for s in saes))


def relation_views(session: Session, where=None, order=None, offset: int = 0, limit: int | None = None):
    q = (select(SAERelation, _A, _B).join(_A, SAERelation.sae_a_id == _A.id).join(_B, SAERelation.sae_b_id == _B.id)
         .where(_ready(_A, _B)))
    if where is not None:
        q = q.where(where)
    q = q.order_by(*(order or (_A.layer, _A.name, _B.name))).offset(offset)
    if limit is not None:
        q = q.limit(limit)
    return [RelationView(r, a, b) for r, a, b in session.execute(q)]


def list_relations(session: Session, model: str | None = None, sae: str | None = None, kind: str | None = None,
                   page: int = 1, per_page: int = 50) -> tuple[list[RelationView], int]:
    conds = []
    if model is not None:
        lm = session.scalar(select(LM).where(LM.name == model))
        if lm is None:
            raise NotFound(f"no model named {model!r}")
        conds.append(_A.lm_id == lm.id)
    if sae is not None:
        conds.append(or_(_A.name == sae, _B.name == sae))
    if kind is not None:
        conds.append(SAERelation.kind == kind)
    where = and_(*conds) if conds else None
    count_q = (select(func.count()).select_from(SAERelation).join(_A, SAERelation.sae_a_id == _A.id)
               .join(_B, SAERelation.sae_b_id == _B.id).where(_ready(_A, _B)))
    if where is not None:
        count_q = count_q.where(where)
    total = int(session.scalar(count_q) or 0)
    return relation_views(session, where, offset=(page - 1) * per_page, limit=per_page), total


def relation_between(session: Session, x: str, y: str) -> RelationView:
    """The relation of two published SAEs, stored in either order; NotFound says what is missing."""
    found = relation_views(session, or_(and_(_A.name == x, _B.name == y), and_(_A.name == y, _B.name == x)))
    if found:
        return found[0]
    for name in (x, y):
        if session.scalar(select(SAE.id).where(SAE.name == name, SAE.status == SAEStatus.ready.value)) is None:
            raise NotFound(f"no SAE named {name!r}")
    raise NotFound(f"{x!r} and {y!r} have not been related", f"run `sae-atlas relate {x} {y}`")


def relations_of(session: Session, sae_id: int) -> list[RelationView]:
    return relation_views(session, or_(SAERelation.sae_a_id == sae_id, SAERelation.sae_b_id == sae_id))


def links(session: Session, relation_id: int, label: str | None = None, a_index: int | None = None,
          b_index: int | None = None, sort: str = "a", order: str = "asc", page: int = 1,
          per_page: int = 50) -> tuple[list[FeatureLink], int]:
    conds = [FeatureLink.relation_id == relation_id]
    if label is not None:
        conds.append(FeatureLink.label == label)
    if a_index is not None:
        conds.append(FeatureLink.a_index == a_index)
    if b_index is not None:
        conds.append(FeatureLink.b_index == b_index)
    total = int(session.scalar(select(func.count()).select_from(FeatureLink).where(*conds)) or 0)
    col = LINK_SORTS[sort]
    ordering = col.desc().nulls_last() if order == "desc" else col.asc().nulls_last()
    rows = session.scalars(select(FeatureLink).where(*conds).order_by(ordering, FeatureLink.id)
                           .offset((page - 1) * per_page).limit(per_page))
    return list(rows), total


class Brief(NamedTuple):
    """What a link to a latent shows beside its number."""

    index: int
    explanation: str | None
    density: float | None
    peak_token_id: int | None
    logits: dict | None


def feature_briefs(session: Session, sae_id: int, indices) -> dict[int, Brief]:
    """Some latents of one SAE by index (one indexed read, no ORM objects: feature pages show a few)."""
    indices = sorted({int(i) for i in indices if i is not None})[:2000]
    if not indices:
        return {}
    sql = ('SELECT "index", explanation, density, peak_token_id, logits FROM features '
           f'WHERE sae_id = ? AND "index" IN ({", ".join("?" * len(indices))})')
    return {r[0]: Brief(r[0], r[1], r[2], r[3], json_value(r[4])) for r in raw_rows(session, sql, (sae_id, *indices))}


def split_forest(session: Session, view: RelationView, label: str = "split", page: int = 1,
                 per_page: int = 20) -> tuple[list[tuple[int, list[FeatureLink]]], int]:
    """Parents of a width relation with their children, most children first: (parent, links) pairs."""
    rid = view.relation.id
    counts = (select(FeatureLink.a_index, func.count().label("n")).where(
        FeatureLink.relation_id == rid, FeatureLink.label == label, FeatureLink.a_index.is_not(None))
        .group_by(FeatureLink.a_index))
    total = int(session.scalar(select(func.count()).select_from(counts.subquery())) or 0)
    parents = session.execute(counts.order_by(func.count().desc(), FeatureLink.a_index)
                              .offset((page - 1) * per_page).limit(per_page)).all()
    ids = [p for p, _ in parents]
    children: dict[int, list[FeatureLink]] = {p: [] for p in ids}
    if ids:
        for link in session.scalars(select(FeatureLink).where(FeatureLink.relation_id == rid, FeatureLink.label == label,
                                                              FeatureLink.a_index.in_(ids))
                                    .order_by(FeatureLink.p_b_given_a.desc().nulls_last(), FeatureLink.b_index)):
            children[link.a_index].append(link)
    return [(p, children[p]) for p in ids], total


# --- the relation graph a feature's lineage walks ---------------------------------------------------

@dataclass(frozen=True)
class SAERef:
    """What lineage shows of a published SAE: plain data, shared across requests and threads."""

    id: int
    name: str
    site: str
    layer: int | None
    d_sae: int
    architecture: str
    lm_id: int


@dataclass(frozen=True)
class Edge:
    """A relation as lineage walks it: its id, its kind and its two SAEs (A narrower or earlier)."""

    id: int
    kind: str
    a: SAERef
    b: SAERef


@dataclass(frozen=True)
class RelationGraph:
    """Every relation between published SAEs, by SAE, for one state of the published SAEs."""

    versions: dict[int, str]  # id -> version of every published SAE: what the graph was read for
    edges: dict[int, tuple[Edge, ...]]  # SAE id -> its relations, in relations_of's order
    _tags: dict = field(default_factory=dict, repr=False, compare=False)

    def of(self, sae_id: int) -> tuple[Edge, ...]:
        return self.edges.get(sae_id, ())

    def tag(self, sae_id: int) -> str:
        """A digest of the versions of every SAE connected to sae_id through relations: it changes
        whenever a relation anywhere along its chains is written, or one of those SAEs republished."""
        tag = self._tags.get(sae_id)
        if tag is None:
            seen, todo = {sae_id}, [sae_id]
            while todo:
                for e in self.of(todo.pop()):
                    for other in (e.a.id, e.b.id):
                        if other not in seen:
                            seen.add(other)
                            todo.append(other)
            tag = self._tags[sae_id] = f"{zlib.crc32(repr(sorted((i, self.versions.get(i)) for i in seen)).encode()):08x}"
        return tag


_READY_VERSIONS = f"SELECT id, version FROM saes WHERE status = '{SAEStatus.ready.value}' ORDER BY id"
_GRAPH = (select(SAERelation.id, SAERelation.kind,
                 *(c for s in (_A, _B) for c in (s.id, s.name, s.site, s.layer, s.d_sae, s.architecture, s.lm_id)))
          .join(_A, SAERelation.sae_a_id == _A.id).join(_B, SAERelation.sae_b_id == _B.id).where(_ready(_A, _B))
          .order_by(_A.layer, _A.name, _B.name))
_graphs: dict[tuple, RelationGraph] = {}
_graphs_lock = threading.Lock()


def relation_graph(session: Session) -> RelationGraph:
    """The relation graph of the published SAEs as they are now: read once per state of their
    versions (one small read of those per call), then served from memory."""
    key = tuple(tuple(r) for r in raw_rows(session, _READY_VERSIONS, ()))
    graph = _graphs.get(key)
    if graph is None:
        edges: dict[int, list[Edge]] = {}
        for r in session.execute(_GRAPH):
            e = Edge(r[0], r[1], SAERef(*r[2:9]), SAERef(*r[9:16]))
            edges.setdefault(e.a.id, []).append(e)
            if e.b.id != e.a.id:
                edges.setdefault(e.b.id, []).append(e)
        graph = RelationGraph(dict(key), {k: tuple(v) for k, v in edges.items()})
        with _graphs_lock:
            if len(_graphs) >= 8:  # older states of the atlas: nothing asks for them again
                _graphs.clear()
            _graphs[key] = graph
    return graph


class Link(NamedTuple):
    """One link of a latent, as its lineage shows it (FeatureLink's columns without the ids)."""

    a_index: int | None
    b_index: int | None
    label: str
    kind: str | None
    cos: float | None
    rho: float | None
    p_b_given_a: float | None
    p_a_given_b: float | None
    stitch_gain: float | None


_LINKS = f"SELECT {', '.join(Link._fields)} FROM feature_links WHERE relation_id = ? AND "
_BY_SHARE = " ORDER BY p_b_given_a DESC NULLS LAST"
_MATCHED = f" AND label IN ({', '.join('?' * len(MATCH_LABELS))}) LIMIT 1"


def _links(session: Session, where: str, params: tuple) -> list[Link]:
    """A latent's links of one relation: `where` follows "relation_id = ? AND" (indexed reads)."""
    return [Link(*r) for r in raw_rows(session, _LINKS + where, params)]


def _hop(session: Session, edges: tuple[Edge, ...], sae_id: int, index: int, forward: bool):
    """The matched latent one layer after (forward) or before `index` of SAE sae_id, if any."""
    for e in edges:
        if e.kind != "layer":
            continue
        if forward and e.a.id == sae_id:
            found = _links(session, "a_index = ?" + _MATCHED, (e.id, index, *MATCH_LABELS))
            if found:
                return e.b, found[0].b_index, found[0]
        if not forward and e.b.id == sae_id:
            found = _links(session, "b_index = ?" + _MATCHED, (e.id, index, *MATCH_LABELS))
            if found:
                return e.a, found[0].a_index, found[0]
    return None


def feature_lineage(session: Session, sae_id: int, index: int, graph: RelationGraph | None = None) -> dict:
    """A latent's chain across layers (backward and forward through stored matches) and its family
    across widths (its children in wider SAEs, its parent and siblings in narrower ones). SAEs are
    SAERefs, relations Edges and links rows of FeatureLink's columns."""
    graph = graph or relation_graph(session)
    own = graph.of(sae_id)
    if not own:
        return {"layers": {"backward": [], "forward": []}, "widths": [], "related": False}
    chains = {}
    for direction, forward in (("backward", False), ("forward", True)):
        chain, sid, idx, seen = [], sae_id, index, {sae_id}
        for _ in range(MAX_HOPS):
            step = _hop(session, graph.of(sid), sid, idx, forward)
            if step is None or step[0].id in seen:
                break
            sae, idx, link = step
            seen.add(sae.id)
            chain.append({"sae": sae, "index": idx, "cos": link.cos, "rho": link.rho, "label": link.label})
            sid = sae.id
        chains[direction] = chain[::-1] if direction == "backward" else chain
    widths = []
    for e in own:
        if e.kind != "width":
            continue
        if e.a.id == sae_id:  # this latent is a parent: its children in the wider SAE, or a vanished row
            rows = _links(session, "a_index = ?" + _BY_SHARE, (e.id, index))
            kids = [r for r in rows if r.b_index is not None]
            vanished = any(r.label == "vanished" for r in rows)
            widths.append({"role": "parent", "relation": e, "other": e.b, "children": kids, "vanished": vanished})
        else:  # a child: its parent in the narrower SAE and its siblings
            found = _links(session, "b_index = ? LIMIT 1", (e.id, index))
            mine = found[0] if found else None
            siblings = []
            if mine is not None and mine.a_index is not None:
                # filtered here, not in SQL: a "b_index <> ?" there made SQLite scan the relation by b_index
                siblings = [r for r in _links(session, "a_index = ?" + _BY_SHARE, (e.id, mine.a_index))
                            if r.b_index is not None and r.b_index != index]
            widths.append({"role": "child", "relation": e, "other": e.a, "link": mine, "siblings": siblings})
    return {"layers": chains, "widths": widths, "related": True}


def dark_matter(session: Session, sae_id: int) -> dict | None:
    row = session.get(SAEDarkMatter, sae_id)
    return row.data if row is not None else None


def layer_map(session: Session, lm_id: int) -> dict:
    """The published SAEs of a model by site kind and width, and the layer relations between them."""
    saes = list(session.scalars(select(SAE).where(SAE.lm_id == lm_id, SAE.status == SAEStatus.ready.value)
                                .order_by(SAE.layer, SAE.d_sae, SAE.name)))
    ids = [s.id for s in saes]
    views = relation_views(session, SAERelation.sae_a_id.in_(ids)) if ids else []
    rows: dict[tuple[str, int], list[SAE]] = {}
    for s in saes:
        rows.setdefault((s.site.split(".")[0], s.d_sae), []).append(s)
    layers = sorted({s.layer for s in saes if s.layer is not None})
    return {"saes": saes, "rows": rows, "layers": layers, "relations": views}


# --- shared by the API and the pages ---

def sae_ref(s: SAE) -> dict:
    return {"name": s.name, "site": s.site, "layer": s.layer, "d_sae": s.d_sae, "architecture": s.architecture,
            "page": f"/saes/{s.name}"}


def pair_dark_matter(session: Session, sae: SAE) -> list[dict]:
    out = []
    for v in relations_of(session, sae.id):
        if v.kind == "width" and v.a.id == sae.id:
            dm = (v.relation.summary or {}).get("dark_matter") or {}
            out.append({"wider": v.b.name, "relation": f"/relations/{v.a.name}/{v.b.name}", **dm})
    return out


def layer_rows(session: Session, lm: LM) -> tuple[list[int], list[dict]]:
    m = layer_map(session, lm.id)
    by_pair = {(v.a.id, v.b.id): v for v in m["relations"] if v.kind == "layer"}
    rows = []
    for (kind, width), saes in sorted(m["rows"].items()):
        cells = []
        for x, y in itertools.pairwise(saes):
            v = by_pair.get((x.id, y.id))
            if v is None:
                continue
            mm = (v.relation.summary or {}).get("matching", {})
            cells.append({"a": x.name, "b": y.name, "layer_a": x.layer, "layer_b": y.layer,
                          "persistence": mm.get("persistence"), "matched_share": mm.get("matched_share"),
                          "mean_cos": mm.get("mean_cos"), "page": f"/relations/{x.name}/{y.name}"})
        rows.append({"site_kind": kind, "d_sae": width, "saes": [sae_ref(s) for s in saes], "pairs": cells})
    return m["layers"], rows
