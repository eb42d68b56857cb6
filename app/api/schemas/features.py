"""A feature and its parts (stats, logits, examples, explanations, neighbours), and search hits."""

from __future__ import annotations

from pydantic import BaseModel

from app.api.schemas.common import Open, Page


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
