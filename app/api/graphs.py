"""Attribution graphs: queue one (API key), list them, read one with its graph JSON, steer a node."""

from typing import Literal

from fastapi import APIRouter, Depends, Path
from sqlalchemy.orm import Session

from app import graphs as service
from app.api.schemas import (
    READ_ERRORS,
    WRITE_ERRORS,
    GraphDetail,
    GraphPage,
    GraphRequest,
    GraphSets,
    GraphSteerOut,
    GraphSteerRequest,
    PageParams,
    errors,
)
from app.api_error import ApiError
from app.deps import KeyFirstRoute, get_session, read_access, write_access
from app.responses import JSON
from store import graphs as gstore
from store.errors import AtlasError, NotFound
from store.models import APIKey

router = APIRouter(prefix="/graphs", tags=["graphs"], route_class=KeyFirstRoute)

Slug = Path(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$")
Status = Literal["queued", "running", "done", "failed", "cancelled"]


def detail(row) -> dict:
    return {**gstore.graph_summary(row), "graph": gstore.unpack(row.graph)}


@router.post("", status_code=201, summary="Queue an attribution graph of a prompt (needs a write key)",
             response_model=GraphDetail, responses=WRITE_ERRORS)
def create_graph(req: GraphRequest, key: APIKey = Depends(write_access), session: Session = Depends(get_session)):
    """404: no set of that name; 422: the set lacks a block, its model is not held here, or the
    prompt is longer than 64 tokens. A graph worker (`sae-atlas graph-worker`) computes it."""
    config = {"node_threshold": req.node_threshold, "edge_threshold": req.edge_threshold}
    if req.max_feature_nodes is not None:
        config["attribution"] = {"max_feature_nodes": req.max_feature_nodes}
    try:
        row = service.submit(session, req.set, req.prompt, config, requested_by=key.name)
    except NotFound as exc:
        raise ApiError(404, "not_found", exc.one_line()) from None
    except AtlasError as exc:
        raise ApiError(422, "invalid_parameters", exc.one_line()) from None
    session.commit()
    return JSON(detail(row), status_code=201, headers={"Location": f"/api/v1/graphs/{row.slug}"})


@router.get("", summary="List attribution graphs, newest first", dependencies=[Depends(read_access)],
            response_model=GraphPage, responses=READ_ERRORS)
def list_graphs(status: Status | None = None, pages: PageParams = Depends(), session: Session = Depends(get_session)):
    rows = gstore.list_graphs(session, pages.per_page, pages.offset, status)
    return JSON(pages.body([gstore.graph_summary(r) for r in rows], gstore.count_graphs(session, status)))


@router.get("/sets", summary="Transcoder sets graphs can be computed with", dependencies=[Depends(read_access)],
            response_model=GraphSets, responses=READ_ERRORS)
def list_sets():
    return JSON({"sets": service.available_sets()})


@router.get("/{slug}", summary="One graph: status, progress, scores and, once done, circuit-tracer's graph JSON",
            dependencies=[Depends(read_access)], response_model=GraphDetail, responses=READ_ERRORS)
def get_graph(slug: str = Slug, session: Session = Depends(get_session)):
    try:
        return JSON(detail(gstore.get_graph(session, slug)))
    except NotFound as exc:
        raise ApiError(404, "not_found", exc.one_line()) from None


@router.post("/{slug}/steer", summary="Set a feature node's activation (0 ablates it) and compare the top logits",
             dependencies=[Depends(read_access)], response_model=GraphSteerOut, responses=errors(404, 409, 422, 503))
def steer(req: GraphSteerRequest, slug: str = Slug, session: Session = Depends(get_session)):
    """Computed through the prompt's frozen replacement model (trainer/circuits/steer.py), in this
    process: the set's LM and transcoders are loaded on the first call. 409 until the graph is done."""
    try:
        row = gstore.get_graph(session, slug)
    except NotFound as exc:
        raise ApiError(404, "not_found", exc.one_line()) from None
    if row.status != "done":
        raise ApiError(409, "conflict", f"graph {slug} is {row.status}; steer it once it is done")
    try:
        result = service.steer_node(row, req.node_id, req.value, req.top_k)
    except AtlasError as exc:
        raise ApiError(422, "invalid_parameters", exc.one_line()) from None
    return JSON({"node_id": req.node_id, "activation": result.activation, "value": result.value,
                 "before": result.before, "after": result.after})
