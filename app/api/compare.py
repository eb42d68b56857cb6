"""GET /api/v1/compare: published SAEs side by side (the numbers of the /compare page's plots and table)."""

from fastapi import APIRouter, Depends, Query
from sqlalchemy.orm import Session

from app.api.schemas import READ_ERRORS, CompareOut
from app.deps import get_session, read_access
from app.responses import JSON
from store import compare

router = APIRouter(tags=["saes"], dependencies=[Depends(read_access)], responses=READ_ERRORS)


@router.get("/compare", response_model=CompareOut,
            summary="Every published SAE of a model (or of all models): L0, FVU, CE recovered, interpretability and "
                    "the Pareto fronts")
def get_comparison(model: str | None = Query(None, min_length=1, max_length=200, description="a model's name; all when absent"),
                   score: str | None = Query(None, pattern="^(detection|fuzzing|embedding)$",
                                             description="interpretation score to average (default: the kind most SAEs have)"),
                   session: Session = Depends(get_session)):
    return JSON(compare.comparison(session, model, score))
