"""Training runs: submit (API key), list, read with metric history, cancel (API key)."""

from typing import Literal

from fastapi import APIRouter, Depends, Path, Query
from sqlalchemy.orm import Session

from app.api_error import ApiError
from app.api.schemas import READ_ERRORS, WRITE_ERRORS, PageParams, RunDetail, RunMetrics, RunPage
from app.deps import KeyFirstRoute, get_session, read_access, write_access
from store.errors import AtlasError, Conflict, NotFound
from store.models import APIKey
from app.responses import JSON
from app.runs import service
from app.runs.spec import RunSpec

router = APIRouter(prefix="/runs", tags=["runs"], route_class=KeyFirstRoute)

RunId = Path(ge=1, le=2**31 - 1)
Status = Literal["queued", "running", "done", "failed", "cancelled"]


def _run(session: Session, run_id: int):
    try:
        return service.get(session, run_id)
    except NotFound as exc:
        raise ApiError(404, "not_found", exc.one_line()) from None


@router.post("", status_code=201, summary="Queue a training run (needs a write key)", response_model=RunDetail,
             responses=WRITE_ERRORS)
def create_run(spec: RunSpec, key: APIKey = Depends(write_access), session: Session = Depends(get_session)):
    """The config is validated before it is queued: field ranges, the sweep (k < width, tokens >=
    one batch, the names it will publish under), local paths (only under the configured model and
    corpus roots), the model and its sites against its depth (read without weights), the corpus."""
    try:
        run = service.submit(session, spec, requested_by=key.name)
    except Conflict as exc:
        raise ApiError(409, "conflict", exc.one_line()) from None
    except AtlasError as exc:
        raise ApiError(422, "invalid_parameters", exc.one_line()) from None
    session.commit()
    return JSON(service.run_dict(run, []), status_code=201, headers={"Location": f"/api/v1/runs/{run.id}"})


@router.get("", summary="List training runs, newest first", dependencies=[Depends(read_access)],
            response_model=RunPage, responses=READ_ERRORS)
def list_runs(status: Status | None = None, pages: PageParams = Depends(), session: Session = Depends(get_session)):
    runs, total = service.recent(session, pages.per_page, pages.offset, status)
    return JSON(pages.body([service.run_dict(r, full=False) for r in runs], total, counts=service.counts(session)))


@router.get("/{run_id}", summary="One run: config, status, progress, log tail, published SAEs",
            dependencies=[Depends(read_access)], response_model=RunDetail, responses=READ_ERRORS)
def get_run(run_id: int = RunId, session: Session = Depends(get_session)):
    run = _run(session, run_id)
    return JSON(service.run_dict(run, service.published_saes(session, run.id)))


@router.get("/{run_id}/metrics", summary="The run's training metrics by SAE and step",
            dependencies=[Depends(read_access)], response_model=RunMetrics, responses=READ_ERRORS)
def get_metrics(run_id: int = RunId, sae: str | None = Query(None, max_length=200),
                max_points: int = Query(2000, ge=2, le=100_000), session: Session = Depends(get_session)):
    _run(session, run_id)
    return JSON({"run_id": run_id, "saes": service.history(session, run_id, sae, max_points)})


@router.post("/{run_id}/cancel", summary="Cancel a queued or running run (needs a write key)",
             response_model=RunDetail, responses=WRITE_ERRORS)
def cancel_run(run_id: int = RunId, key: APIKey = Depends(write_access), session: Session = Depends(get_session)):
    """409 when the run has already ended, also when it ends while the cancel is under way."""
    run = _run(session, run_id)
    run = service.cancel(session, run_id)  # Conflict -> 409
    session.commit()
    return JSON(service.run_dict(run, service.published_saes(session, run.id)))
