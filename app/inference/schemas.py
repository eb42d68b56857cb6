"""Requests and responses of the live endpoints, shared by the API and the inference service.

Every count and strength has a bound and must be finite (pydantic answers 422 otherwise). Text is
bounded twice: here by characters (so 10 MB never reaches a tokenizer), and by tokens in the
service, against SAE_ATLAS_INFERENCE_MAX_TOKENS, which needs the model's tokenizer.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_TEXT_CHARS = 50_000  # far above any 512-token text; the token cap is checked by the service
MAX_STRENGTH = 100.0  # in units of the latent's analysed max activation
MAX_STEER_FEATURES = 16
MAX_NEW_TOKENS = 128
MAX_RESULTS = 100  # Neuronpedia caps search-by-inference results at 100 too
MAX_CONTRAST_RESULTS = 500
MAX_TEXTS_HARD = 100_000  # the setting inference_contrast_max_texts is the real, lower, limit

Name = Field(min_length=1, max_length=200)


class ServiceError(Exception):
    """An answer other than success, in the API's one error shape (status, code, message)."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None, details=None):
        self.status, self.code, self.message = status, code, message
        self.retry_after, self.details = retry_after, details
        super().__init__(message)

    def body(self) -> dict:
        err = {"status": self.status, "code": self.code, "message": self.message}
        if self.details is not None:
            err["details"] = self.details
        return {"error": err}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, int(round(self.retry_after))))} if self.retry_after else {}


def bad_input(message: str) -> ServiceError:
    return ServiceError(422, "invalid_parameters", message)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextInput(_Strict):
    """A text, or token ids (BOS excluded: the service puts the model's BOS first, as the analysis did)."""

    text: str | None = Field(None, max_length=MAX_TEXT_CHARS, description="text to run the model on")
    token_ids: list[int] | None = Field(None, max_length=8192, description="token ids instead of text")

    @model_validator(mode="after")
    def _one(self):
        if (self.text is None) == (self.token_ids is None):
            raise ValueError("give either text or token_ids")
        if self.text is not None and not self.text.strip():
            raise ValueError("text is empty")
        if self.token_ids is not None and not self.token_ids:
            raise ValueError("token_ids is empty")
        return self


class ActivationsRequest(TextInput):
    """One latent (or a few) on every token of a text."""


class ServiceActivations(TextInput):
    sae: str = Name
    latents: list[int] = Field(min_length=1, max_length=64)


class SearchRequest(_Strict):
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS, description="text to run the model on")
    model: str | None = Field(None, max_length=200, description="LM name; default: the LM of the first SAE")
    saes: list[str] | None = Field(None, max_length=200, description="only these SAEs (default: every SAE of the model)")
    positions: list[int] | None = Field(None, max_length=8192,
                                        description="token positions to rank by (0 is BOS); default: every token")
    rank_by: Literal["relative", "activation"] = Field(
        "relative", description="relative: activation / the latent's analysed max; activation: raw value")
    density_min: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    density_max: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    limit: int = Field(50, ge=1, le=MAX_RESULTS)

    @model_validator(mode="after")
    def _check(self):
        if not self.text.strip():
            raise ValueError("text is empty")
        if self.positions is not None and any(p < 0 for p in self.positions):
            raise ValueError("positions must not be negative")
        if self.density_min is not None and self.density_max is not None and self.density_min > self.density_max:
            raise ValueError("density_min must not exceed density_max")
        return self


class SteerFeature(_Strict):
    sae: str = Name
    index: int = Field(ge=0, le=2**31 - 1)
    strength: float = Field(ge=-MAX_STRENGTH, le=MAX_STRENGTH, allow_inf_nan=False,
                            description="add: multiples of the latent's analysed max activation along its unit decoder "
                                        "direction; clamp: the value to hold the latent at, in the same units")


class SteerRequest(_Strict):
    prompt: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    features: list[SteerFeature] = Field(min_length=1, max_length=MAX_STEER_FEATURES)
    method: Literal["add", "clamp"] = "add"
    max_new_tokens: int = Field(32, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(0.5, ge=0, le=5, allow_inf_nan=False, description="0 means greedy")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    chat_template: bool = Field(False, description="wrap the prompt in the model's chat template (instruct models)")
    stream: bool = Field(False, description="stream tokens as server-sent events while they are generated")

    @model_validator(mode="after")
    def _check(self):
        if not self.prompt.strip():
            raise ValueError("prompt is empty")
        return self


class GraphSteerService(_Strict):
    """A graph node's edit run through the real model (app.inference.graph_steer): what the API
    sends the service from a stored graph's row (its model, dtype, set and prompt) and the request."""

    model: str = Name
    lm_dtype: str = Field("float32", pattern=r"^(float32|bfloat16|float16|auto)$")
    set_path: str = Field(min_length=1, max_length=4096)
    prompt: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    max_tokens: int = Field(64, ge=1, le=8192)
    kind: Literal["feature", "error"] = "feature"
    layer: int = Field(ge=0, le=10_000)
    position: int = Field(ge=0, le=8192)
    feature: int | None = Field(None, ge=0, le=2**31 - 1)
    value: float | None = Field(None, ge=-1e4, le=1e4, allow_inf_nan=False)
    multiplier: float | None = Field(None, ge=-1e3, le=1e3, allow_inf_nan=False)
    top_k: int = Field(10, ge=1, le=50)
    targets: list[int] = Field(default_factory=list, max_length=64)


class ContrastRequest(_Strict):
    set_a: list[str] = Field(min_length=2, max_length=MAX_TEXTS_HARD, description="texts of the first set")
    set_b: list[str] = Field(min_length=2, max_length=MAX_TEXTS_HARD, description="texts of the second set")
    label_a: str = Field("A", min_length=1, max_length=100)
    label_b: str = Field("B", min_length=1, max_length=100)
    model: str | None = Field(None, max_length=200)
    saes: list[str] | None = Field(None, max_length=200)
    direction: Literal["both", "a", "b"] = Field("both", description="a: latents more active in set A; b: in set B")
    density_min: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    density_max: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    limit: int = Field(50, ge=1, le=MAX_CONTRAST_RESULTS)

    @model_validator(mode="after")
    def _check(self):
        for label, texts in (("set_a", self.set_a), ("set_b", self.set_b)):
            if any(len(t) > MAX_TEXT_CHARS for t in texts):
                raise ValueError(f"every text of {label} must have at most {MAX_TEXT_CHARS} characters")
            if sum(1 for t in texts if t.strip()) < 2:
                raise ValueError(f"{label} needs at least two non-empty texts")
        if self.density_min is not None and self.density_max is not None and self.density_min > self.density_max:
            raise ValueError("density_min must not exceed density_max")
        return self


# --- responses (documented in OpenAPI) ---------------------------------------------------------

class Peak(BaseModel):
    position: int
    token: str
    activation: float
    relative: float | None = Field(description="activation / the latent's max in the analysis")


class ActivationsResponse(BaseModel):
    sae: str
    index: int
    max_activation: float = Field(description="the latent's max activation in the analysis")
    token_ids: list[int]
    tokens: list[str]
    activations: list[float] = Field(description="per token, f_i * ||W_dec,i|| as in the stored examples")
    masked: list[bool] = Field(description="BOS and attention sinks: not scored, as in the analysis")
    peak: Peak | None
    explanation: str | None = None
    links: dict[str, str]


class SearchResult(BaseModel):
    sae: str
    index: int
    activation: float
    relative: float | None
    max_activation: float
    density: float
    position: int
    token: str
    activations: list[float]
    explanation: str | None
    links: dict[str, str]


class SearchResponse(BaseModel):
    model: str
    token_ids: list[int]
    tokens: list[str]
    masked: list[bool]
    positions: list[int] | None
    rank_by: str
    saes: list[str]
    items: list[SearchResult]


class Continuation(BaseModel):
    text: str
    token_ids: list[int]


class SteerResponse(BaseModel):
    model: str
    prompt_token_ids: list[int]
    method: str
    default: Continuation
    steered: Continuation
    features: list[dict]


class ContrastItem(BaseModel):
    sae: str
    index: int
    auroc: float
    cohens_d: float | None
    p_value: float
    q_value: float
    mean_a: float
    mean_b: float
    density_a: float = Field(description="share of texts of set A where the latent fires")
    density_b: float
    density: float = Field(description="the latent's density in the analysis (share of tokens)")
    max_activation: float
    explanation: str | None = None
    links: dict[str, str]


class ContrastResponse(BaseModel):
    id: str
    model: str
    label_a: str
    label_b: str
    n_a: int
    n_b: int
    n_tests: int
    n_significant: int = Field(description="latents with q < 0.05")
    truncated_texts: int
    saes: list[dict]
    direction: str
    items: list[ContrastItem]
    created_at: str
    links: dict[str, str]


class InferenceStatus(BaseModel):
    enabled: bool
    reachable: bool
    message: str
    device: str | None = None
    loaded: list[dict] = []
    memory_mb: float | None = None
    memory_budget_mb: float | None = None
    queued: int | None = None
    limits: dict = {}
