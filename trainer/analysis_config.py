"""What an analysis reads and keeps: its settings (the CLI flags have the same names), and the
defaults an SAE folder supplies (model, site, corpus, context length)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from store.errors import AtlasError
from trainer.formats import LoadedSAE

ANALYSIS_DIR = "analysis"


@dataclass
class AnalyzeConfig:
    """What to analyse and how many examples to keep (CLI flags have the same names)."""

    sae_dir: Path
    """An SAE folder (ours, SAELens, sparsify or Gemma Scope)."""
    model: str | None = None
    """LM to run; default: the model the SAE was trained on."""
    site: str | None = None
    """Activation site; default: the SAE's own."""
    corpus: str | None = None
    """Corpus; default: the SAE's training corpus, else pydoc."""
    text_field: str = "text"
    """Text field of .jsonl/.parquet/HF corpora."""
    split: str = "eval"
    """Documents to read: eval (held out from training), train or all."""
    eval_fraction: float | None = None
    """Held-out share of documents; default: the SAE's training value, else 0.1."""
    ctx_len: int | None = None
    """Context length; default: the SAE's training value, else 128."""
    tokens: int = 1_000_000
    """Most tokens to analyse (fewer when the split is smaller)."""
    seed: int = 0
    """Document order and sampling seed."""
    lm_batch_size: int = 32
    """Contexts per LM forward pass."""
    shard_contexts: int = 256
    """Contexts per on-disk shard (the resume granularity)."""
    n_top: int = 20
    """Top examples per latent (one per document)."""
    n_intervals: int = 10
    """Equal-width intervals of [0, max] to sample examples from."""
    per_interval: int = 5
    """Examples per interval."""
    n_random: int = 20
    """Uniformly sampled positive activations per latent."""
    hist_bins: int = 50
    """Bins of each latent's activation histogram."""
    window_before: int = 32
    """Tokens shown before the peak token."""
    window_after: int = 12
    """Tokens shown after the peak token."""
    n_logits: int = 10
    """Top and bottom tokens of the direct logit effect."""
    logit_hist_bins: int = 40
    """Bins of the logit-effect histogram over the vocabulary."""
    n_neighbors: int = 32
    """Nearest latents by decoder cosine similarity."""
    n_cofire: int = 16
    """Co-firing partners kept per latent (most lift first; trainer/relate/cofiring.py)."""
    cofire_min_count: int = 5
    """Tokens two latents must fire on together to count as co-firing partners."""
    groups: bool = True
    """Find multi-dimensional feature groups among co-firing, similar latents and measure their
    irreducibility (trainer/structure/groups.py) from the same codes."""
    dense_threshold: float = 0.1
    """A latent active on more than this share of tokens is listed as dense."""
    exclude_bos: bool = True
    """Mask the BOS position."""
    sink_norm_ratio: float | None = 10.0
    """Mask tokens whose activation norm exceeds this multiple of the median (attention sinks)."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    lm_dtype: str = "auto"
    """LM precision."""
    out: Path | None = None
    """Output folder; default SAE_DIR/analysis."""
    keep_shards: bool = False
    """Keep the on-disk codes after the analysis finishes."""
    restart: bool = False
    """Discard a partial analysis instead of resuming it."""
    cache_activations: bool = False
    """Read the LM activations from the on-disk cache (DATA_DIR/activations) that training or an earlier
    analysis wrote, filling it first if no cache holds this split: analyses of several SAEs of one model
    then share one LM pass."""
    dark_matter: bool = True
    """Measure what the SAE misses in the same pass (FVU by position and token, linear and nonlinear
    error, spliced-loss increase per token on a sample)."""
    dm_ridge: float = 1e-3
    """Dark matter: ridge lambda of the error regression, as a fraction of the mean eigenvalue of Cov(x)."""
    dm_warmup_tokens: int = 65_536
    """Dark matter: tokens that fit the linear map before the nonlinear error of later tokens is scored."""
    dm_top_contexts: int = 20
    """Dark matter: contexts with the largest nonlinear error to keep."""
    dm_ce_contexts: int = 32
    """Dark matter: contexts of the per-token spliced-loss sample (0 skips it)."""

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.sae_dir) / ANALYSIS_DIR

    def identity(self) -> str:
        """What must match for a partial analysis to be resumed."""
        keys = ("model", "site", "corpus", "text_field", "split", "eval_fraction", "ctx_len", "tokens", "seed",
                "shard_contexts", "exclude_bos", "sink_norm_ratio", "cache_activations", "dark_matter",
                "dm_warmup_tokens", "dm_top_contexts")
        blob = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def validate(self) -> None:
        for name in ("tokens", "lm_batch_size", "shard_contexts", "n_top", "n_intervals", "per_interval", "hist_bins",
                     "n_logits", "logit_hist_bins", "n_neighbors", "n_cofire", "cofire_min_count"):
            if getattr(self, name) <= 0:
                raise AtlasError(f"--{name.replace('_', '-')} must be positive")
        if self.n_random < 0 or self.window_before < 0 or self.window_after < 0:
            raise AtlasError("--n-random and the window sizes must not be negative")
        if self.dm_ce_contexts < 0 or self.dm_top_contexts < 0 or self.dm_warmup_tokens <= 0:
            raise AtlasError("--dm-ce-contexts and --dm-top-contexts must not be negative, --dm-warmup-tokens positive")
        if not 0 < self.dm_ridge < 1e3:
            raise AtlasError(f"--dm-ridge {self.dm_ridge} is out of range", "use a small positive number like 1e-3")
        if self.split not in ("eval", "train", "all"):
            raise AtlasError(f"unknown split {self.split!r}", "use eval, train or all")


def resolve_defaults(cfg: AnalyzeConfig, loaded: LoadedSAE) -> AnalyzeConfig:
    """Fill model/site/corpus/ctx_len/eval_fraction from what the SAE folder knows."""
    training = loaded.meta.get("training", {})
    cfg.model = cfg.model or loaded.model
    if not cfg.model or cfg.model == "activations":
        raise AtlasError(f"{cfg.sae_dir} does not say which model it reads", "pass --model")
    cfg.site = cfg.site or loaded.site
    if not cfg.site:
        raise AtlasError(f"{cfg.sae_dir} does not say which site it reads", "pass --site, e.g. resid_post.6")
    cfg.corpus = cfg.corpus or training.get("corpus") or "pydoc"
    if training.get("text_field") and cfg.text_field == "text":
        cfg.text_field = training["text_field"]
    cfg.ctx_len = cfg.ctx_len or int(training.get("ctx_len") or 128)
    cfg.eval_fraction = cfg.eval_fraction if cfg.eval_fraction is not None else float(training.get("eval_fraction", 0.1))
    return cfg
