"""Aligned activations of two sites for relating SAEs: the activation cache when one holds both
sites (no LM at all), else one LM pass with both sites hooked (LMActivations keeps only the tokens
valid at every site, so the two sites' rows stay aligned)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from store.settings import get_settings
from trainer.activations import ActivationCache, LMActivations, LMStreamSpec, find_cache

log = logging.getLogger(__name__)


@dataclass
class DataSpec:
    """Which text to read: by default the analysis settings of the first SAE of the pair."""

    model: str
    corpus: str = "pydoc"
    text_field: str = "text"
    split: str = "eval"
    eval_fraction: float = 0.1
    ctx_len: int = 128
    seed: int = 0
    exclude_bos: bool = True
    sink_norm_ratio: float | None = 10.0
    lm_batch_size: int = 32

    @classmethod
    def from_analysis(cls, model: str, analysis: dict) -> DataSpec:
        keys = ("corpus", "text_field", "split", "eval_fraction", "ctx_len", "seed", "exclude_bos", "sink_norm_ratio",
                "lm_batch_size")
        return cls(model=model, **{k: analysis[k] for k in keys if k in analysis and
                                   (analysis[k] is not None or k == "sink_norm_ratio")})

    def stream(self, sites: list[str], split: str, lm_dtype: str) -> LMStreamSpec:
        return LMStreamSpec(model=self.model, sites=sites, corpus=self.corpus, text_field=self.text_field,
                            ctx_len=self.ctx_len, split=split, eval_fraction=self.eval_fraction, seed=self.seed,
                            exclude_bos=self.exclude_bos, sink_norm_ratio=self.sink_norm_ratio, lm_dtype=lm_dtype)


def lm_dtype_name(lm=None) -> str:
    """The dtype string caches are keyed by (what str(lm.dtype) gives), without loading the LM."""
    if lm is not None:
        return str(lm.dtype)
    from trainer.lm import pick_device, pick_dtype

    return str(pick_dtype(None, pick_device(None)))


def cached_pair(spec: DataSpec, sites: list[str], tokens: int, lm=None) -> list[ActivationCache]:
    """Caches that hold both sites: the split asked for if one covers `tokens` (for split 'all', the
    eval and train caches together), else the cached option with the most tokens (a cache of another
    split of the same corpus still beats running the LM). Empty when no cache holds both sites."""
    root = get_settings().data_dir / "activations"
    dtype = lm_dtype_name(lm)

    def find(split):
        return find_cache(root, spec.stream(sites, split, dtype), with_contexts=False)

    def size(option):
        return sum(c.meta()["tokens"] for c in option)

    asked = [[find(spec.split)]] + ([[find("eval"), find("train")]] if spec.split == "all" else [])
    asked = [o for o in asked if all(c is not None for c in o)]
    for o in asked:
        if size(o) >= tokens or all(c.meta().get("whole_split") for c in o):
            return o
    others = [[c] for c in (find(s) for s in ("eval", "train", "all") if s != spec.split) if c is not None]
    if not asked + others:
        return []
    best = max(asked + others, key=size)
    log.info("relating on the %d cached tokens of the %s split (fewer than the %d asked for)", size(best),
             "+".join(c.spec.split for c in best), tokens)
    return best


def pair_chunks(spec: DataSpec, sites: list[str], tokens: int, lm=None, chunk_tokens: int = 4096,
                describe: list | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Aligned {site: [n, D]} chunks of both sites over up to `tokens` tokens."""
    sites = list(dict.fromkeys(sites))
    caches = cached_pair(spec, sites, tokens, lm)
    if caches:
        if describe is not None:
            describe.append("activation cache " + " + ".join(c.dir.name for c in caches))
        readers = [c.reader(epochs=1, seed=spec.seed, chunk_tokens=chunk_tokens) for c in caches]
        for chunk in itertools.chain(*readers):
            yield {s: chunk[s] for s in sites}
        return
    if lm is None:
        from trainer.lm import load_lm

        lm = load_lm(spec.model)
    if describe is not None:
        describe.append("lm")
    log.info("no activation cache holds %s; running the LM with both sites hooked", ", ".join(sites))
    source = LMActivations(lm, spec.stream(sites, spec.split, str(lm.dtype)), spec.lm_batch_size, max_tokens=tokens,
                           epochs=1)
    yield from source
