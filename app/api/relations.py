"""Feature lineage: relations between SAEs of one model, the links of a latent across layers and
widths, a model's layer map, and what each SAE misses (dark matter). Read-only; relations are
made by `sae-atlas relate` and at publish."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

import store
from app.deps import get_session, read_access
from store.errors import NotFound
from store.models import LM, FeatureLink
from store import lineage

router = APIRouter(tags=["lineage"], dependencies=[Depends(read_access)])

def sae_name(what: str = "name of a published SAE"):
    """A path parameter naming an SAE (one object per parameter: FastAPI keeps per-parameter state in it)."""
    return Path(min_length=1, max_length=200, description=what)

Kind = Literal["width", "layer", "seed"]
Label = Literal["matched", "unconfirmed", "persisted", "split", "persisted_split", "novel", "reconstruction", "vanished"]
LinkKind = Literal["direction", "cofiring"]
MAX_PER_PAGE = 500


class SAERef(BaseModel):
    name: str
    site: str
    layer: int | None
    d_sae: int
    architecture: str
    page: str = Field(description="the SAE's page")


class RelationOut(BaseModel):
    a: SAERef = Field(description="the narrower SAE of a width pair, the earlier layer of a layer pair")
    b: SAERef
    kind: Kind
    tokens: int = Field(description="tokens the co-firing statistics were measured on")
    created_at: datetime
    headline: dict[str, Any] = Field(description="persistence (layer/seed) or splitting counts (width)")
    summary: dict[str, Any] | None = Field(None, description="everything the pair page shows (one relation only)")
    page: str
    links: str = Field(description="the latent links of this relation (paginated)")


class RelationList(BaseModel):
    items: list[RelationOut]
    total: int
    page: int
    per_page: int
    pages: int


class LinkOut(BaseModel):
    a_index: int | None = Field(description="latent of A; null for a child without a parent")
    b_index: int | None = Field(description="latent of B; null for a parent that vanished")
    label: Label = Field(description="width pairs: the parent's fate (persisted_split: it survives in B and gains "
                                     "children), or novel / reconstruction / vanished; layer and seed pairs: "
                                     "matched or unconfirmed")
    kind: LinkKind | None = Field(None, description="how a width link was made: direction (decoder cosine and "
                                                    "co-firing) or cofiring (co-firing alone, the child pointing "
                                                    "elsewhere); null for matches and one-sided rows")
    cos: float | None = Field(description="decoder cosine (the best cosine when one side is empty)")
    rho: float | None = Field(description="Pearson correlation of the two latents' activations over all tokens")
    p_b_given_a: float | None = Field(description="share of A's firings on which B fires too")
    p_a_given_b: float | None = Field(description="share of B's firings on which A fires too")
    stitch_gain: float | None = Field(description="held-out relative decrease of A's squared error with B's latent added")
    a_page: str | None
    b_page: str | None


class LinkList(BaseModel):
    a: str
    b: str
    items: list[LinkOut]
    total: int
    page: int
    per_page: int
    pages: int


class Hop(BaseModel):
    sae: str
    site: str
    layer: int | None
    index: int
    cos: float | None
    rho: float | None
    label: str
    page: str


class WidthFamily(BaseModel):
    role: Literal["parent", "child"] = Field(description="parent: this latent's children in a wider SAE; child: its "
                                                         "parent and siblings in a narrower one")
    other: SAERef
    relation: str
    vanished: bool = False
    parent: LinkOut | None = None
    children: list[LinkOut] = []
    siblings: list[LinkOut] = []


class LineageOut(BaseModel):
    sae: str
    index: int
    backward: list[Hop] = Field(description="matched latents at earlier layers, farthest first")
    forward: list[Hop] = Field(description="matched latents at later layers, nearest first")
    widths: list[WidthFamily]


class DarkMatterOut(BaseModel):
    sae: str
    data: dict[str, Any] = Field(description="FVU by position and token, linear and nonlinear error, spliced-loss sample")
    pairs: list[dict[str, Any]] = Field(description="width pairs where this SAE is the narrower one: the per-token "
                                                    "correlation of error norms and the share of error the wider "
                                                    "SAE's novel latents capture")


class LayerCell(BaseModel):
    a: str
    b: str
    layer_a: int | None
    layer_b: int | None
    persistence: float | None
    matched_share: float | None
    mean_cos: float | None
    page: str


class LayerRow(BaseModel):
    site_kind: str
    d_sae: int
    saes: list[SAERef]
    pairs: list[LayerCell]


class LayerMapOut(BaseModel):
    model: str
    layers: list[int]
    rows: list[LayerRow]


def headline(v: lineage.RelationView) -> dict:
    s = v.relation.summary or {}
    if v.kind == "width":
        return {"splitting": s.get("splitting", {}).get("parents"), "children": s.get("splitting", {}).get("children"),
                "dark_matter": s.get("dark_matter")}
    m = s.get("matching", {})
    return {"persistence": m.get("persistence"), "matched_share": m.get("matched_share"), "pairs": m.get("pairs"),
            "confirmed": m.get("confirmed"), "mean_cos": m.get("mean_cos")}


def relation_dict(v: lineage.RelationView, detail: bool = False) -> dict:
    a, b = v.a.name, v.b.name
    return {"a": lineage.sae_ref(v.a), "b": lineage.sae_ref(v.b), "kind": v.kind, "tokens": v.relation.n_tokens,
            "created_at": v.relation.created_at, "headline": headline(v),
            "summary": v.relation.summary if detail else None, "page": f"/relations/{a}/{b}",
            "links": f"/api/v1/relations/{a}/{b}/links"}


def link_dict(link: FeatureLink, a: str, b: str) -> dict:
    return {"a_index": link.a_index, "b_index": link.b_index, "label": link.label, "kind": link.kind, "cos": link.cos,
            "rho": link.rho,
            "p_b_given_a": link.p_b_given_a, "p_a_given_b": link.p_a_given_b, "stitch_gain": link.stitch_gain,
            "a_page": f"/saes/{a}/features/{link.a_index}" if link.a_index is not None else None,
            "b_page": f"/saes/{b}/features/{link.b_index}" if link.b_index is not None else None}


def _pages(total: int, per_page: int) -> int:
    return (total + per_page - 1) // per_page


@router.get("/relations", response_model=RelationList, summary="Relations between SAEs, paginated")
def list_relations(model: str | None = Query(None, max_length=200), sae: str | None = Query(None, max_length=200),
                   kind: Kind | None = None, page: int = Query(1, ge=1, le=1_000_000),
                   per_page: int = Query(50, ge=1, le=MAX_PER_PAGE), session: Session = Depends(get_session)):
    if sae is not None:
        store.sae_by_name(session, sae)
    views, total = lineage.list_relations(session, model, sae, kind, page, per_page)
    return {"items": [relation_dict(v) for v in views], "total": total, "page": page, "per_page": per_page,
            "pages": _pages(total, per_page)}


@router.get("/relations/{a}/{b}", response_model=RelationOut, summary="One relation with its whole summary")
def get_relation(a: str = sae_name(), b: str = sae_name(), session: Session = Depends(get_session)):
    return relation_dict(lineage.relation_between(session, a, b), detail=True)


@router.get("/relations/{a}/{b}/links", response_model=LinkList, summary="The latent links of a relation, paginated")
def get_links(a: str = sae_name(), b: str = sae_name(), label: Label | None = None,
              a_index: int | None = Query(None, ge=0, le=store.MAX_LATENT_INDEX),
              b_index: int | None = Query(None, ge=0, le=store.MAX_LATENT_INDEX),
              sort: Literal["a", "b", "cos", "rho", "p_b_given_a", "p_a_given_b", "stitch_gain"] = "a",
              order: Literal["asc", "desc"] = "asc", page: int = Query(1, ge=1, le=1_000_000),
              per_page: int = Query(50, ge=1, le=MAX_PER_PAGE), session: Session = Depends(get_session)):
    v = lineage.relation_between(session, a, b)
    rows, total = lineage.links(session, v.relation.id, label, a_index, b_index, sort, order, page, per_page)
    return {"a": v.a.name, "b": v.b.name, "items": [link_dict(r, v.a.name, v.b.name) for r in rows], "total": total,
            "page": page, "per_page": per_page, "pages": _pages(total, per_page)}


@router.get("/saes/{sae}/features/{index}/lineage", response_model=LineageOut,
            summary="A latent across layers (its chain of matches) and across widths (parent, children)")
def get_lineage(sae: str = sae_name(), index: int = Path(ge=0, le=store.MAX_LATENT_INDEX),
                session: Session = Depends(get_session)):
    s = store.sae_by_name(session, sae)
    store.feature_by_index(session, s, index)
    lin = lineage.feature_lineage(session, s.id, index)

    def hop(h):
        return {"sae": h["sae"].name, "site": h["sae"].site, "layer": h["sae"].layer, "index": h["index"],
                "cos": h["cos"], "rho": h["rho"], "label": h["label"], "page": f"/saes/{h['sae'].name}/features/{h['index']}"}

    widths = []
    for w in lin["widths"]:
        v = w["relation"]
        a, b = v.a.name, v.b.name
        item = {"role": w["role"], "other": lineage.sae_ref(w["other"]), "relation": f"/relations/{a}/{b}"}
        if w["role"] == "parent":
            item.update(children=[link_dict(k, a, b) for k in w["children"]], vanished=w["vanished"])
        else:
            item.update(parent=link_dict(w["link"], a, b) if w["link"] is not None else None,
                        siblings=[link_dict(k, a, b) for k in w["siblings"]])
        widths.append(item)
    return {"sae": s.name, "index": index, "backward": [hop(h) for h in lin["layers"]["backward"]],
            "forward": [hop(h) for h in lin["layers"]["forward"]], "widths": widths}


@router.get("/saes/{sae}/dark-matter", response_model=DarkMatterOut, summary="What an SAE misses (dark matter)")
def get_dark_matter(sae: str = sae_name(), session: Session = Depends(get_session)):
    s = store.sae_by_name(session, sae)
    data = lineage.dark_matter(session, s.id)
    if data is None:
        raise NotFound(f"{s.name!r} was published without dark-matter statistics",
                       "analyse it again (sae-atlas analyze, dark_matter on) and republish it")
    return {"sae": s.name, "data": data, "pairs": lineage.pair_dark_matter(session, s)}


@router.get("/models/{model:path}/layer-map", response_model=LayerMapOut,
            summary="A model's SAEs by layer, with the persistence of features at each adjacent pair")
def get_layer_map(model: str = Path(min_length=1, max_length=200), session: Session = Depends(get_session)):
    lm = session.scalar(select(LM).where(LM.name == model))
    if lm is None:
        raise NotFound(f"no model named {model!r}")
    layers, rows = lineage.layer_rows(session, lm)
    return {"model": lm.name, "layers": layers, "rows": rows}
