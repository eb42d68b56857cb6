"""Read side of feature lineage: relations between SAEs, the links of one latent, the layer map of
a model, and what an SAE misses. Every query reads only published (ready) SAEs.

A relation is stored once, with A the narrower SAE of a width pair or the earlier layer of a
layer pair; readers ask for it in either order. A latent's chain across layers follows the stored
one-to-one matches hop by hop (indexed reads of feature_links by relation and latent)."""

from __future__ import annotations

import itertools

from dataclasses import dataclass

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session, aliased

from store.errors import NotFound
from store.models import LM, SAE, Feature, FeatureLink, SAEDarkMatter, SAERelation, SAEStatus

MAX_HOPS = 12
MATCH_LABELS = ("matched", "unconfirmed")
WIDTH_LABELS = ("persisted", "split", "persisted_split", "novel", "reconstruction", "vanished")
LINK_SORTS = {"a": FeatureLink.a_index, "b": FeatureLink.b_index, "cos": FeatureLink.cos, "rho": FeatureLink.rho,
              "p_b_given_a": FeatureLink.p_b_given_a, "p_a_given_b": FeatureLink.p_a_given_b,
              "stitch_gain": FeatureLink.stitch_gain}

_A, _B = aliased(SAE), aliased(SAE)


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


def feature_briefs(session: Session, sae_id: int, indices) -> dict[int, Feature]:
    """Feature rows of some latents of one SAE (density, peak token, logits, explanation) by index."""
    indices = sorted({int(i) for i in indices if i is not None})[:2000]
    if not indices:
        return {}
    return {f.index: f for f in session.scalars(select(Feature).where(Feature.sae_id == sae_id, Feature.index.in_(indices)))}


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


def _hop(session: Session, views: list[RelationView], sae_id: int, index: int, forward: bool):
    """The matched latent one layer after (forward) or before `index` of SAE sae_id, if any."""
    for v in views:
        if v.kind != "layer":
            continue
        if forward and v.a.id == sae_id:
            link = session.scalar(select(FeatureLink).where(FeatureLink.relation_id == v.relation.id,
                                                            FeatureLink.a_index == index,
                                                            FeatureLink.label.in_(MATCH_LABELS)).limit(1))
            if link is not None:
                return v.b, link.b_index, link
        if not forward and v.b.id == sae_id:
            link = session.scalar(select(FeatureLink).where(FeatureLink.relation_id == v.relation.id,
                                                            FeatureLink.b_index == index,
                                                            FeatureLink.label.in_(MATCH_LABELS)).limit(1))
            if link is not None:
                return v.a, link.a_index, link
    return None


def feature_lineage(session: Session, sae_id: int, index: int) -> dict:
    """A latent's chain across layers (backward and forward through stored matches) and its family
    across widths (its children in wider SAEs, its parent and siblings in narrower ones)."""
    own = relations_of(session, sae_id)
    if not own:
        return {"layers": {"backward": [], "forward": []}, "widths": [], "related": False}
    cache: dict[int, list[RelationView]] = {sae_id: own}

    def views_of(sid):
        if sid not in cache:
            cache[sid] = relations_of(session, sid)
        return cache[sid]

    chains = {}
    for direction, forward in (("backward", False), ("forward", True)):
        chain, sid, idx, seen = [], sae_id, index, {sae_id}
        for _ in range(MAX_HOPS):
            step = _hop(session, views_of(sid), sid, idx, forward)
            if step is None or step[0].id in seen:
                break
            sae, idx, link = step
            seen.add(sae.id)
            chain.append({"sae": sae, "index": idx, "cos": link.cos, "rho": link.rho, "label": link.label})
            sid = sae.id
        chains[direction] = chain[::-1] if direction == "backward" else chain
    widths = []
    for v in own:
        if v.kind != "width":
            continue
        rid = v.relation.id
        if v.a.id == sae_id:  # this latent is a parent: its children in the wider SAE
            kids = list(session.scalars(select(FeatureLink).where(FeatureLink.relation_id == rid, FeatureLink.a_index == index,
                                                                  FeatureLink.b_index.is_not(None))
                                        .order_by(FeatureLink.p_b_given_a.desc().nulls_last())))
            vanished = session.scalar(select(FeatureLink.id).where(FeatureLink.relation_id == rid, FeatureLink.a_index == index,
                                                                   FeatureLink.label == "vanished").limit(1)) is not None
            widths.append({"role": "parent", "relation": v, "other": v.b, "children": kids, "vanished": vanished})
        else:  # a child: its parent in the narrower SAE and its siblings
            mine = session.scalar(select(FeatureLink).where(FeatureLink.relation_id == rid, FeatureLink.b_index == index)
                                  .limit(1))
            siblings = []
            if mine is not None and mine.a_index is not None:
                siblings = list(session.scalars(select(FeatureLink).where(
                    FeatureLink.relation_id == rid, FeatureLink.a_index == mine.a_index, FeatureLink.b_index != index,
                    FeatureLink.b_index.is_not(None)).order_by(FeatureLink.p_b_given_a.desc().nulls_last())))
            widths.append({"role": "child", "relation": v, "other": v.a, "link": mine, "siblings": siblings})
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
