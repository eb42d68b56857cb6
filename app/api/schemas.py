"""Response models of the JSON API: what OpenAPI documents for every endpoint and status.

Handlers build their JSON with orjson (app.responses) for speed and return it as a Response, so
these models describe the responses rather than produce them; tests/test_fuzz_api.py checks every
documented response against them (schemathesis), on SQLite and PostgreSQL.

Lists share one shape: {"items", "total", "page", "per_page", "pages"}, with `page` (1-based) and
`per_page` query parameters (Page and page_params below).
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from fastapi import Query
from pydantic import BaseModel, Field

T = TypeVar("T")
MAX_PER_PAGE = 500


class Open(BaseModel):
    model_config = {"extra": "allow"}


# --- errors and pages -----------------------------------------------------------------------------

class ErrorDetail(BaseModel):
    location: str
    message: str


class ErrorInfo(BaseModel):
    status: int
    code: str = Field(description="machine-readable: not_found, invalid_parameters, unauthorized, conflict, ...")
    message: str
    details: list[ErrorDetail] | None = None


class ErrorBody(BaseModel):
    """Every error: {"error": {"status", "code", "message", "details"?}}."""

    error: ErrorInfo


def errors(*statuses: int) -> dict:
    """`responses=` for a route: the error statuses it can answer, all in the one error shape."""
    text = {400: "Bad request", 401: "No API key or session", 403: "The key is not valid, revoked, or read-only",
            404: "Not found", 409: "Conflict with the current state", 413: "Request body too large",
            422: "Invalid parameters", 503: "The database is unavailable (Retry-After)"}
    return {s: {"model": ErrorBody, "description": text.get(s, "Error")} for s in statuses}


READ_ERRORS = errors(401, 403, 404, 422, 503)
WRITE_ERRORS = errors(401, 403, 404, 409, 413, 422, 503)


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int = Field(description="items over all pages")
    page: int = Field(description="this page, 1-based")
    per_page: int
    pages: int = Field(description="number of pages")


class PageParams:
    """`page` (1-based) and `per_page` query parameters, as every list endpoint takes them."""

    def __init__(self, page: int = Query(1, ge=1, le=1_000_000, description="page number, 1-based"),
                 per_page: int = Query(50, ge=1, le=MAX_PER_PAGE, description=f"items per page (1-{MAX_PER_PAGE})")):
        self.page = page
        self.per_page = per_page

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.per_page

    def body(self, items: list, total: int, **extra) -> dict:
        return {**extra, "items": items, "total": total, "page": self.page, "per_page": self.per_page,
                "pages": (total + self.per_page - 1) // self.per_page}


# --- models and SAEs ------------------------------------------------------------------------------

class LMOut(BaseModel):
    name: str
    source: str
    architecture: str
    n_layers: int
    d_model: int
    vocab_size: int
    saes: list[str]


class SAELinks(BaseModel):
    self: str
    features: str
    page: str


class SAEOut(BaseModel):
    name: str
    model: str
    site: str
    layer: int | None
    architecture: str
    d_in: int
    d_sae: int
    k: int | None
    metrics: dict[str, Any]
    tokens_analyzed: int
    description: str
    published_at: str | None
    run_id: int | None = None
    links: SAELinks


class EvaluationOut(BaseModel):
    """The SAE's latest report card (`sae-atlas evaluate`)."""

    id: int
    created_at: str | None
    n_tokens: int = Field(description="held-out tokens of the reconstruction metrics")
    settings: dict[str, Any] = Field(description="model, site, corpus, eval_fraction, ctx_len, tokens, contexts, ...")
    metrics: dict[str, Any] = Field(description="fvu, explained_variance, l0, dead_frac_eval, dense_frac, cos_sim, "
                                                "ce_clean, ce_sae, ce_zero_ablation, ce_recovered (+ _ci95 half-width and "
                                                "_interval [low, high]), delta_lm_loss (likewise), ce_contexts")


class SAEDetail(SAEOut):
    charts: dict[str, Any]
    config: dict[str, Any]
    norm_scale: float
    evaluation: EvaluationOut | None = Field(None, description="the latest report card; null when never evaluated")


class CompareLinks(BaseModel):
    page: str
    api: str


class CompareRow(BaseModel):
    name: str
    model: str
    site: str
    layer: int | None
    architecture: str
    d_sae: int
    k: int | None
    source: str | None = Field(description="evaluation (the latest report card), training (the run's metrics) or null")
    evaluated_at: str | None
    l0: float | None
    fvu: float | None
    ce_recovered: float | None
    ce_recovered_ci95: float | None = Field(description="half-width of the 95% interval")
    delta_lm_loss: float | None
    delta_lm_loss_ci95: float | None
    dead_frac: float | None
    interpretability: float | None = Field(description="mean over scored latents of each latent's best score of "
                                                       "the chosen kind (`score`)")
    scored_latents: int
    scores: dict[str, dict[str, Any]] = Field(description="every kind: {mean, latents}")
    probing_top_1: float | None = Field(None, description="SAEBench sparse probing: test accuracy of a probe on the top-1 "
                                                          "latent, mean over tasks (report card made with --probing)")
    probing_top_5: float | None = Field(None, description="the same on the top-5 latents")
    probing_llm: float | None = Field(None, description="the same on all the LM's activations (the ceiling)")
    absorption: float | None = Field(None, description="SAEBench mean absorption fraction on the first-letter task "
                                                       "(lower is better; null unless measured with --absorption)")
    absorption_probe_accuracy: float | None = Field(None, description="26-way accuracy of the first-letter probe on the LM")
    front: dict[str, bool] = Field(description="on the Pareto front of L0 against fvu / ce_recovered / interpretability / "
                                               "probing_top_1 / absorption")
    links: CompareLinks


class CompareOut(BaseModel):
    model: str | None = Field(description="the model compared; null: every model")
    score: str = Field(description="the interpretation score plotted: detection, fuzzing or embedding")
    scores: list[str]
    saes: list[CompareRow]


# --- features -------------------------------------------------------------------------------------

class FeatureSummary(BaseModel):
    index: int
    density: float
    max: float
    mean: float
    firing_count: int
    explanation: str | None
    best_score: float | None
    peak_token: str | None
    peak_token_id: int | None
    peak_token_share: float
    top_logits: list[str]
    top_logit_ids: list[int]


class FeaturePage(Page[FeatureSummary]):
    sae: str


class Histogram(BaseModel):
    edges: list[float]
    counts: list[float]


class Stats(BaseModel):
    firing_count: int
    density: float
    log10_density: float | None
    mean: float
    max: float
    e_a2: float | None
    std: float | None
    skew: float | None
    kurtosis: float | None
    tokens_analyzed: int


class LogitEntry(BaseModel):
    token_id: int
    token: str
    value: float


class Logits(BaseModel):
    top: list[LogitEntry]
    bottom: list[LogitEntry]
    histogram: Histogram


class PeakToken(BaseModel):
    token_id: int
    token: str
    share: float


class NeighborOut(BaseModel):
    index: int
    cosine: float
    explanation: str | None


class ExampleOut(BaseModel):
    id: int
    activation: float
    peak: int
    doc_id: int
    doc_offset: int
    token_ids: list[int]
    tokens: list[str]
    acts: list[float]


class IntervalOut(BaseModel):
    interval: int
    range: list[float]
    share: float
    examples: list[ExampleOut]


class ExamplesOut(BaseModel):
    top: list[ExampleOut]
    intervals: list[IntervalOut]
    random: list[ExampleOut]


class ExplanationOut(BaseModel):
    id: int
    text: str
    method: str
    explainer: str
    detection_score: float | None
    detection_f1: float | None
    fuzzing_score: float | None
    fuzzing_f1: float | None
    created_at: str | None


class FeatureLinks(BaseModel):
    self: str
    page: str
    neighbors: str
    examples: str
    prev: str | None
    next: str | None


class FeatureOut(Open):
    """A feature's whole dashboard (panels other helpers add appear as further keys)."""

    sae: str
    index: int
    d_sae: int
    stats: Stats
    activation_histogram: Histogram
    logits: Logits
    peak_token: PeakToken | None
    neighbors: list[NeighborOut]
    examples: ExamplesOut
    explanations: list[ExplanationOut]
    best_score: float | None
    explanation: str | None
    links: FeatureLinks


class NeighborLinks(BaseModel):
    self: str
    page: str


class NeighborItem(NeighborOut):
    links: NeighborLinks


class NeighborsOut(BaseModel):
    sae: str
    index: int
    k: int
    items: list[NeighborItem]
    available: int


class KindExampleOut(ExampleOut):
    kind: str
    interval: int | None


class FeatureExamplesOut(BaseModel):
    sae: str
    index: int
    kind: str
    items: list[KindExampleOut]


# --- search ---------------------------------------------------------------------------------------

class ExplanationHit(ExplanationOut):
    sae: str
    index: int


class TokenHit(FeatureSummary):
    sae: str


class TokenHits(Page[TokenHit]):
    q: str


# --- jobs -----------------------------------------------------------------------------------------

class JobOut(BaseModel):
    id: int
    kind: str
    sae_id: int
    feature_id: int
    status: str
    priority: int
    attempts: int
    max_attempts: int
    params: dict[str, Any] | None
    error: str | None
    result: dict[str, Any] | None
    requested_by: str | None
    leased: bool = Field(description="whether a worker holds the job now")
    run_after: str | None
    lease_expires_at: str | None
    created_at: str | None
    started_at: str | None
    finished_at: str | None


class JobListItem(JobOut):
    sae: str
    index: int


class JobPage(Page[JobListItem]):
    counts: dict[str, int] = Field(description="jobs by status, over the whole queue")


class JobsCreated(BaseModel):
    created: int
    skipped: int | None = None
    job: JobOut | None = None


# --- runs -----------------------------------------------------------------------------------------

class RunSAE(BaseModel):
    id: int
    name: str
    site: str
    architecture: str
    d_sae: int
    k: int | None
    metrics: dict[str, Any]
    url: str


class RunOut(BaseModel):
    id: int
    name: str
    status: str
    phase: str | None
    progress: float
    step: int
    total_steps: int
    gpus: int
    priority: int
    attempts: int
    max_attempts: int
    resumed_from_step: int | None
    error: str | None
    requested_by: str | None
    leased: bool = Field(description="whether a trainer worker holds the run now")
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    heartbeat_at: str | None
    latest: dict[str, Any]
    spec: dict[str, Any] = Field(description="the run's config; local paths relative to their roots")


class RunDetail(RunOut):
    saes: list[RunSAE]
    log_tail: str


class RunPage(Page[RunOut]):
    counts: dict[str, int]


class MetricPoint(BaseModel):
    step: int
    tokens: int
    loss: float | None
    fvu: float | None
    l0: float | None
    dead_frac: float | None
    lr: float | None
    elapsed_s: float | None
    attempt: int


class RunMetrics(BaseModel):
    run_id: int
    saes: dict[str, list[MetricPoint]]


# --- structure: co-firing partners, the map, feature groups -------------------------------------------

class CofiringItem(BaseModel):
    index: int = Field(description="the partner latent j")
    n_together: int = Field(description="analysed tokens on which both fire (N_ij)")
    p_partner_given_this: float = Field(description="P(j | i) = N_ij / N_i")
    p_this_given_partner: float = Field(description="P(i | j) = N_ij / N_j")
    lift: float = Field(description="P(i, j) / (P(i) P(j)): how many times more often than independent latents")
    explanation: str | None
    links: NeighborLinks


class CofiringOut(BaseModel):
    sae: str
    index: int
    k: int
    items: list[CofiringItem] = Field(description="partners by decreasing lift")
    available: int
    computed: bool = Field(description="false when the SAE was published from an analysis without co-firing counts")


class MapCluster(BaseModel):
    id: int
    size: int
    label: str
    words: list[str]
    x: float
    y: float


class MapPoints(BaseModel):
    index: list[int]
    x: list[float]
    y: list[float]
    cluster: list[int | None] = Field(description="-1: in no cluster")
    density: list[float]
    explanation: list[str | None]


class MapOut(BaseModel):
    sae: str
    config: dict[str, Any] = Field(description="UMAP and Leiden settings the map was made with")
    clusters: list[MapCluster]
    points: MapPoints = Field(description="one entry per latent, as columns")


class GroupSummary(BaseModel):
    rank: int = Field(description="0 is the most irreducible group of the SAE")
    latents: list[int]
    n_tokens: int = Field(description="sampled tokens the projection and indices use")
    separability: float = Field(description="separability index S (bits): min over rotations of I(a; b); high = not separable")
    mixture: float = Field(description="epsilon-mixture index M: largest share of points near one line; low = not a mixture")
    circle_residual: float = Field(description="RMS distance of the 2-D scatter to its fitted circle / radius")
    variance_share: list[float] = Field(description="variance share of the top two principal components")


class GroupScatter(BaseModel):
    x: list[float]
    y: list[float]
    token: list[int]
    token_text: list[str]
    latent: list[int] = Field(description="the group latent that fires most on each point's token")


class GroupOut(GroupSummary):
    sae: str
    scatter: GroupScatter


# --- attribution graphs ---------------------------------------------------------------------------

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