"""Attribution graphs: queue one (API key), list them, read one with its graph JSON, cancel one (API key),
steer a node (in the graph's frozen model or the live one)."""

from typing import Literal

from fastapi import APIRouter, Depends, Path, Request
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


@router.post("/{slug}/cancel", summary="Cancel a queued or running graph (needs a write key)",
             response_model=GraphDetail, responses=WRITE_ERRORS)
def cancel_graph(slug: str = Slug, key: APIKey = Depends(write_access), session: Session = Depends(get_session)):
    """404: no such graph; 409 when it has already ended, also when it ends while the cancel is under
    way. A worker computing it stops at its next progress write and stores nothing."""
    try:
        row = service.cancel(session, slug)  # Conflict -> 409
    except NotFound as exc:
        raise ApiError(404, "not_found", exc.one_line()) from None
    session.commit()
    return JSON(detail(row))


@router.post("/{slug}/steer", summary="Set a feature node's activation, or scale a feature or error node (0 ablates "
                                      "it), and compare the top logits: in the graph's frozen model or the live one",
             dependencies=[Depends(read_access)], response_model=GraphSteerOut,
             responses=errors(401, 403, 404, 409, 422, 429, 503))
def steer(req: GraphSteerRequest, request: Request, slug: str = Slug, session: Session = Depends(get_session)):
    """mode "frozen": through the prompt's frozen replacement model (trainer/circuits/steer.py), in
    this process (the set's LM and transcoders are loaded on the first call): the graph's linear
    prediction. mode "live": through the real model in the inference service (attention, norms and
    every MLP recomputed), as the other live endpoints: 503 when inference is off or the service
    cannot load the LM, 409 when it does not hold the graph's transcoder set, 429 past the
    anonymous rate. 409 until the graph is done."""
    from trainer.circuits.steer import parse_node

    try:
        row = gstore.get_graph(session, slug)
    except NotFound as exc:
        raise ApiError(404, "not_found", exc.one_line()) from None
    if row.status != "done":
        raise ApiError(409, "conflict", f"graph {slug} is {row.status}; steer it once it is done")
    try:
        edit = parse_node(req.node_id, req.kind, req.value, req.multiplier)
        if req.mode == "frozen":
            res = service.steer_frozen(row, edit, req.top_k)
            result = {"activation": res.activation, "value": res.value, "before": res.before, "after": res.after,
                      "targets": res.targets}
    except AtlasError as exc:
        raise ApiError(422, "invalid_parameters", exc.one_line()) from None
    if req.mode == "live":
        from app.live import admit, client

        admit(request, session)
        result = client(request).post("/v1/graphs/steer", service.live_request(row, edit, req.top_k))
    return JSON({"node_id": req.node_id, "kind": edit.kind, "mode": req.mode, "multiplier": edit.multiplier, **result})
