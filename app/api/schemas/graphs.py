"""Attribution graphs: the request, the stored graph, and steering a node."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from app.api.schemas.common import Page


class GraphRequest(BaseModel):
    """A prompt to attribute through a transcoder set (at most 64 of the model's tokens)."""

    prompt: str = Field(min_length=1, max_length=4000)
    set: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                     description="a transcoder set's name (GET /api/v1/graphs/sets)")
    max_feature_nodes: int | None = Field(None, ge=1, le=20_000, description="cap on feature nodes (default 7,500)")
    node_threshold: float = Field(0.8, gt=0, le=1)
    edge_threshold: float = Field(0.98, gt=0, le=1)


class GraphOut(BaseModel):
    slug: str
    model: str
    set_name: str
    prompt: str
    config: dict[str, Any]
    status: str
    progress: float
    error: str | None
    replacement_score: float | None
    completeness_score: float | None
    n_nodes: int | None
    n_links: int | None
    seconds: float | None
    requested_by: str | None
    created_at: str | None
    started_at: str | None
    finished_at: str | None


class GraphDetail(GraphOut):
    graph: dict[str, Any] | None = Field(description="circuit-tracer's graph JSON (metadata, qParams, nodes, links) once done")


class GraphPage(Page[GraphOut]):
    pass


class GraphSets(BaseModel):
    sets: list[str] = Field(description="names of the transcoder sets in DATA_DIR/transcoder_sets")


class GraphSteerRequest(BaseModel):
    """Change one feature or error node of the graph at its position and compare the top logits."""

    node_id: str = Field(min_length=1, max_length=64,
                         description='a feature node "LAYER_FEATURE_POSITION" or an error node "0_LAYER_POSITION"')
    kind: Literal["feature", "error"] = Field("feature", description="the node's kind (the two id formats overlap)")
    value: float | None = Field(None, ge=-1e4, le=1e4, allow_inf_nan=False,
                                description="set the feature's activation to this (feature nodes)")
    multiplier: float | None = Field(None, ge=-1e3, le=1e3, allow_inf_nan=False,
                                     description="else scale the feature's activation or the error by this; "
                                                 "neither given: 0, which ablates the node")
    mode: Literal["frozen", "live"] = Field("frozen", description="frozen: the graph's linear prediction (the "
                                            "prompt's frozen replacement model); live: the real model in the "
                                            "inference service, attention and norms recomputed")
    top_k: int = Field(10, ge=1, le=50)


class TopLogit(BaseModel):
    token_id: int
    token: str
    logit: float
    prob: float


class GraphSteerTarget(BaseModel):
    token_id: int
    token: str
    logit_before: float
    logit_after: float
    prob_before: float
    prob_after: float


class GraphSteerOut(BaseModel):
    node_id: str
    kind: str
    mode: str
    activation: float | None = Field(description="the feature's activation in the prompt (null for an error node)")
    value: float | None = Field(description="what the feature was set to (null for an error node)")
    multiplier: float | None
    before: list[TopLogit]
    after: list[TopLogit]
    targets: list[GraphSteerTarget] = Field(description="the graph's logit nodes, before and after")
