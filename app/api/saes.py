"""GET /api/v1/saes and /api/v1/saes/{sae}: published SAEs with their metrics and charts (one SAE also with
its latest report card)."""

from fastapi import APIRouter, Depends, Path, Request
from sqlalchemy.orm import Session

import store
from store import evaluations
from app.api.schemas import READ_ERRORS, Page, PageParams, SAEDetail, SAEOut
from app.deps import get_session, read_access
from store.models import SAE
from app.responses import JSON, cache_headers, etag_matches, not_modified

router = APIRouter(tags=["saes"], dependencies=[Depends(read_access)], responses=READ_ERRORS)


def sae_dict(sae: SAE, detail: bool = False) -> dict:
    d = {
        "name": sae.name, "model": sae.lm.name, "site": sae.site, "layer": sae.layer, "architecture": sae.architecture,
        "d_in": sae.d_in, "d_sae": sae.d_sae, "k": sae.k, "metrics": sae.metrics,
        "tokens_analyzed": sae.n_tokens_analyzed, "description": sae.description,
        "published_at": sae.published_at.isoformat() if sae.published_at else None, "run_id": sae.run_id,
        "links": {"self": f"/api/v1/saes/{sae.name}", "features": f"/api/v1/saes/{sae.name}/features",
                  "page": f"/saes/{sae.name}"},
    }
    if detail:
        d["charts"] = sae.charts
        d["config"] = sae.config
        d["norm_scale"] = sae.norm_scale
    return d


@router.get("/saes", summary="List published SAEs", response_model=Page[SAEOut])
def list_saes(pages: PageParams = Depends(), session: Session = Depends(get_session)):
    saes = store.list_saes(session)
    return JSON(pages.body([sae_dict(s) for s in saes[pages.offset:pages.offset + pages.per_page]], len(saes)))


@router.get("/saes/{sae}", summary="One SAE with its metrics, charts and configuration", response_model=SAEDetail,
            responses={304: {"description": "Not modified (If-None-Match)"}})
def get_sae(request: Request, sae: str = Path(min_length=1, max_length=200), session: Session = Depends(get_session)):
    s = store.sae_by_name(session, sae)
    ev = evaluations.latest_evaluation(session, s.id)
    # Fixed when the SAE is published, except its report card: a new evaluation is a new ETag.
    etag = f'W/"{s.version[:16]}-{evaluations.evaluation_tag(ev)}"'
    if etag_matches(request, etag):
        return not_modified(etag)
    return JSON({**sae_dict(s, detail=True), "evaluation": evaluations.evaluation_dict(ev)}, headers=cache_headers(etag))
