"""GET /api/v1/models: the language models in the store."""

from fastapi import APIRouter, Depends
from sqlalchemy.orm import Session

import store
from app.api.schemas import READ_ERRORS, LMOut, Page, PageParams
from app.deps import get_session, read_access
from app.responses import JSON

router = APIRouter(tags=["models"], dependencies=[Depends(read_access)], responses=READ_ERRORS)


@router.get("/models", summary="List language models", response_model=Page[LMOut])
def list_models(pages: PageParams = Depends(), session: Session = Depends(get_session)):
    saes = store.list_saes(session)
    lms = store.list_lms(session)
    items = [{"name": lm.name, "source": lm.source, "architecture": lm.architecture, "n_layers": lm.n_layers,
              "d_model": lm.d_model, "vocab_size": lm.vocab_size, "saes": [s.name for s in saes if s.lm_id == lm.id]}
             for lm in lms[pages.offset:pages.offset + pages.per_page]]
    return JSON(pages.body(items, len(lms)))
