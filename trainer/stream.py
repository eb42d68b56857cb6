"""The training stream: batches of activations for one rank, with an exact bookmark for resuming.

    .npy matrix  ->  ArrayActivations.batches (already a permutation, split across ranks by rows)
    LM | cache   ->  this rank's chunks  ->  ShuffleBuffer (window by window)

`position()` says where the stream stands after the batches handed out so far; a stream opened
with that position yields exactly the batches the original would have yielded next. Every rank
has its own position (under DDP each rank reads its own share of the LM batches or cache chunks),
and the checkpoint keeps all of them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from store.errors import AtlasError
from store.settings import get_settings
from trainer.activations import (
    ActivationCache,
    ArrayActivations,
    BufferPosition,
    LMActivations,
    LMStreamSpec,
    ShuffleBuffer,
    cached_eval_activations,
)
from trainer.config import TrainConfig
from trainer.distributed import barrier
from trainer.sources import stream_sites

log = logging.getLogger(__name__)


def stream_spec(cfg: TrainConfig, lm, split: str) -> LMStreamSpec:
    """Everything that determines an LM activation stream (and names its cache). Its sites are the
    activation sites the run reads: a transcoder's mlp.L reads mlp_in.L and mlp_out.L."""
    return LMStreamSpec(model=cfg.model, sites=stream_sites(cfg.site), corpus=cfg.corpus, text_field=cfg.text_field,
                        ctx_len=cfg.ctx_len, split=split, eval_fraction=cfg.eval_fraction, seed=cfg.seed,
                        exclude_bos=cfg.exclude_bos, sink_norm_ratio=cfg.sink_norm_ratio,
                        lm_dtype=str(lm.dtype) if lm is not None else cfg.lm_dtype)


class TrainingStream:
    """This rank's training batches {site: [batch_size / world, D]} on `device`, endlessly."""

    def __init__(self, cfg: TrainConfig, device: torch.device, rank: int = 0, world: int = 1,
                 lm=None, array: ArrayActivations | None = None, position: dict | None = None):
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        self.lm, self.array = lm, array
        self.array_batches = int(position["array_batches"]) if position and "array_batches" in position else 0
        self.buffer: ShuffleBuffer | None = None
        self._start = BufferPosition.from_state(position["buffer"]) if position and "buffer" in position else None

    def position(self) -> dict:
        """Where this rank's stream stands (picklable, tensors on the CPU)."""
        if self.array is not None:
            return {"array_batches": self.array_batches}
        pos = self.buffer.position if self.buffer is not None else (self._start or BufferPosition())
        return {"buffer": pos.to_state()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        c = self.cfg
        if self.array is not None:
            per_rank = c.batch_size // self.world
            for batch in self.array.batches(c.batch_size, self.rank, self.world, skip=self.array_batches):
                self.array_batches += 1
                yield {c.site[0]: batch[:per_rank].to(self.device)}
            return
        spec = stream_spec(c, self.lm, "train")
        if c.cache_activations:
            cache = ActivationCache(get_settings().data_dir / "activations", spec)
            if not cache.covers(c.tokens):
                if self.rank == 0:
                    self._fill_cache(cache, spec)
                barrier()

            def open_chunks(skip: int):
                return cache.reader(seed=c.seed, rank=self.rank, world_size=self.world, skip_chunks=skip)
        else:
            def open_chunks(skip: int):
                return LMActivations(self.lm, spec, c.lm_batch_size, rank=self.rank, world_size=self.world,
                                     skip_batches=skip)
        self.buffer = ShuffleBuffer(open_chunks, c.batch_size // self.world, buffer_tokens(c, self.lm) // self.world,
                                    seed=c.seed + self.rank, device=self.device, position=self._start)
        yield from self.buffer

    def _fill_cache(self, cache: ActivationCache, spec: LMStreamSpec) -> None:
        from tqdm import tqdm

        from trainer.corpus import count_tokens, open_corpus

        corpus = open_corpus(spec.corpus, spec.text_field)
        target = self.cfg.tokens
        if corpus.finite:
            target = min(target, count_tokens(corpus, self.lm.tokenizer, "train", spec.eval_fraction))
        source = LMActivations(self.lm, spec, self.cfg.lm_batch_size)
        with tqdm(total=target, unit="tok", unit_scale=True, desc="caching activations", dynamic_ncols=True) as bar:
            cache.write(source, max_tokens=self.cfg.tokens, progress=bar.update)
        log.info("cached %d tokens of activations in %s", cache.meta()["tokens"], cache.dir)


def buffer_tokens(cfg: TrainConfig, lm) -> int:
    """Tokens the shuffle buffer mixes: shuffle_buffer, or fewer where that many tokens of every
    site would not fit in shuffle_buffer_mb (a window is held twice while it is shuffled)."""
    if lm is None:
        return cfg.shuffle_buffer
    per_token = 2 * len(stream_sites(cfg.site)) * lm.d_model * lm.dtype.itemsize
    return max(cfg.batch_size, min(cfg.shuffle_buffer, (cfg.shuffle_buffer_mb << 20) // per_token))


def held_out_chunks(cfg: TrainConfig, lm, array: ArrayActivations | None) -> Iterator[dict[str, torch.Tensor]]:
    """The first eval_tokens held-out tokens, {site: [n, D]} on the CPU, chunk after chunk (one
    chunk from a matrix or a cache; an LM pass, batch by batch, so that a run over many sites
    never holds every site's held-out activations at once)."""
    if array is not None:
        yield {cfg.site[0]: array.eval_tensor(cfg.eval_tokens)}
        return
    if cfg.cache_activations:  # a cache of the held-out split (e.g. the demo's) saves an LM pass
        cached = cached_eval_activations(get_settings().data_dir / "activations", stream_spec(cfg, lm, "eval"),
                                         cfg.eval_tokens)
        if cached is not None:
            yield cached
            return
    source = LMActivations(lm, stream_spec(cfg, lm, "eval"), cfg.lm_batch_size, max_tokens=cfg.eval_tokens, epochs=1)
    seen = 0
    for chunk in source:
        take = min(cfg.eval_tokens - seen, next(iter(chunk.values())).shape[0])
        seen += take
        yield {s: v[:take].cpu() for s, v in chunk.items()}
        if seen >= cfg.eval_tokens:
            return
    if not seen:
        raise AtlasError("the held-out split is empty", "raise --eval-fraction or use a larger corpus")


def held_out_activations(cfg: TrainConfig, lm, array: ArrayActivations | None) -> dict[str, torch.Tensor]:
    """Held-out activations for the reconstruction metrics, {site: [n, D]} on the CPU."""
    parts: dict[str, list[torch.Tensor]] = {}
    for chunk in held_out_chunks(cfg, lm, array):
        for s, v in chunk.items():
            parts.setdefault(s, []).append(v)
    return {s: torch.cat(v) for s, v in parts.items()}


def held_out_contexts(cfg: TrainConfig, lm, per_batch: int) -> Iterator[torch.Tensor]:
    """Held-out token contexts [per_batch, ctx_len] for the spliced-in LM loss, batch after batch,
    until the held-out split ends."""
    from trainer.corpus import Packer, open_corpus, split_documents

    packer = Packer(lm.tokenizer, cfg.ctx_len, lm.bos_token_id, lm.separator_token_id)
    docs = split_documents(open_corpus(cfg.corpus, cfg.text_field), "eval", cfg.eval_fraction, cfg.seed)
    for batch in packer.batches(docs, per_batch):
        yield batch.tokens


def activation_file(path: Path, cfg: TrainConfig) -> ArrayActivations:
    return ArrayActivations(path, eval_fraction=max(cfg.eval_fraction, 0.01), seed=cfg.seed)
