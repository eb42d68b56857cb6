"""GET /api/v1/models: the language models in the store."""

from fastapi import APIRouter, Depends
from sqlalchemy.orm import Session

from app import store
from app.deps import get_session, read_access
from app.responses import JSON

router = APIRouter(tags=["models"], dependencies=[Depends(read_access)])


@router.get("/models", summary="List language models")
def list_models(session: Session = Depends(get_session)):
    saes = store.list_saes(session)
    return JSON({"items": [
        {"name": lm.name, "source": lm.source, "architecture": lm.architecture, "n_layers": lm.n_layers,
         "d_model": lm.d_model, "vocab_size": lm.vocab_size,
         "saes": [s.name for s in saes if s.lm_id == lm.id]}
        for lm in store.list_lms(session)]})
