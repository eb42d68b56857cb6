"""The shape of an SAE: co-firing partners of a latent, the map of all latents, feature groups."""

from fastapi import APIRouter, Depends, Path, Query
from sqlalchemy.orm import Session

import store
from app.api.schemas import READ_ERRORS, CofiringOut, GroupOut, GroupSummary, MapOut, Page, PageParams
from app.deps import get_session, read_access
from app.responses import JSON
from store import structure
from store.errors import NotFound

router = APIRouter(tags=["structure"], dependencies=[Depends(read_access)], responses=READ_ERRORS)

Index = Path(ge=0, le=store.MAX_LATENT_INDEX, description="latent index (0-based)")
SaeName = Path(min_length=1, max_length=200, description="name of a published SAE")


@router.get("/saes/{sae}/features/{index}/cofiring", response_model=CofiringOut,
            summary="Latents of the same SAE that fire together with this one beyond chance (lift, P(j | i))")
def get_cofiring(sae: str = SaeName, index: int = Index, k: int = Query(16, ge=1, le=100, description="how many partners"),
                 session: Session = Depends(get_session)):
    s = store.sae_by_name(session, sae)
    if index >= s.d_sae:
        raise NotFound(f"{sae} has {s.d_sae} latents; there is no latent {index}")
    place = structure.latent_place(session, s.id, index)
    partners = place.partners if place else []
    items = structure.partner_dicts(session, s.id, partners[:k])
    for it in items:
        it["links"] = {"self": f"/api/v1/saes/{sae}/features/{it['index']}", "page": f"/saes/{sae}/features/{it['index']}"}
    return JSON({"sae": sae, "index": index, "k": k, "items": items, "available": len(partners),
                 "computed": place is not None})


@router.get("/saes/{sae}/map", response_model=MapOut, summary="Every latent on a 2-D map, with clusters and their labels")
def get_map(sae: str = SaeName, session: Session = Depends(get_session)):
    s = store.sae_by_name(session, sae)
    m = structure.sae_map(session, s.id)
    if m is None:
        raise NotFound(f"{sae} has no map (it was published without one)")
    return JSON({"sae": sae, "config": m.config, "clusters": m.clusters, "points": structure.map_points(session, s.id)})


@router.get("/saes/{sae}/groups", response_model=Page[GroupSummary],
            summary="Groups of latents that act as one multi-dimensional feature, most irreducible first")
def list_groups(sae: str = SaeName, p: PageParams = Depends(), session: Session = Depends(get_session)):
    s = store.sae_by_name(session, sae)
    rows = structure.list_groups(session, s.id, p.offset, p.per_page)
    return JSON(p.body([structure.group_summary(g) for g in rows], structure.count_groups(session, s.id)))


@router.get("/saes/{sae}/groups/{rank}", response_model=GroupOut,
            summary="One feature group: its latents, irreducibility and the 2-D scatter of its reconstructions")
def get_group(sae: str = SaeName, rank: int = Path(ge=0, le=1_000_000, description="the group's rank"),
              session: Session = Depends(get_session)):
    s = store.sae_by_name(session, sae)
    g = structure.group(session, s.id, rank)
    vocab = store.vocab_for(session, s.lm_id)
    scatter = dict(g.scatter)
    scatter["token_text"] = [vocab.text(t) for t in scatter.get("token", [])]
    return JSON({"sae": sae, **structure.group_summary(g), "scatter": scatter})
