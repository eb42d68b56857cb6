"""Models, SAEs (with their report cards) and the comparison of SAEs."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


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
