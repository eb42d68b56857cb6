"""Activation streams for training: from the LM, from an on-disk cache, or from a saved array.

Every source yields aligned chunks `{site: Tensor[n, D]}` of *valid* tokens: the leading BOS and
attention-sink tokens (activation norm far above the median of their context) are dropped, because they would
dominate the reconstruction loss and the top examples. A ShuffleBuffer then mixes tokens across
many contexts into training batches.

The cache stores one pass over a split as memory-mapped .npy shards per site, in the LM's own
precision (bfloat16 as raw uint16), plus the contexts the tokens came from, so repeated runs,
sweeps, analyses and relations between SAEs skip the LM entirely.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from store.errors import AtlasError

log = logging.getLogger(__name__)

_STORAGE = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def valid_token_mask(acts: torch.Tensor, sink_norm_ratio: float | None, exclude_bos: bool = True) -> torch.Tensor:
    """[B, T] bool: tokens to keep. Drops position 0 (BOS) and attention sinks (such as <bos>
    mid-context): tokens whose norm exceeds sink_norm_ratio x the median norm of their own row
    (the lower median over the row's finite tokens after BOS).

    The one rule for training, caches, analysis and live inference. A row is one context (or one
    live text), so a token's mask depends on its own text, never on the rest of the batch: the same
    text is masked the same way in a batch of contexts and on its own. A running (causal) median
    was tried and kept sinks right after BOS, which have no past to compare with: on the demo's
    held-out cache, tokens of 100x the median norm stayed in and made FVU look three times better."""
    mask = torch.ones(acts.shape[:2], dtype=torch.bool, device=acts.device)
    if exclude_bos:
        mask[:, 0] = False
    if sink_norm_ratio:
        norms = acts.float().norm(dim=-1)
        finite = torch.isfinite(norms)
        counted = mask & finite
        ref = torch.where(counted, norms, torch.nan)
        # nanquantile's "lower" interpolation is the lower median; a row with nothing counted has none
        median = torch.nanquantile(ref, 0.5, dim=1, keepdim=True, interpolation="lower")
        median = torch.where(torch.isnan(median), torch.inf, median)
        # Non-finite tokens are kept, not filtered: the trainer must see them and stop with a clear
        # message instead of silently training on nothing.
        mask &= (norms <= sink_norm_ratio * median) | ~finite
    return mask


def to_numpy_storage(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def from_numpy_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """A tensor over the array without copying. Cache shards are read-only memory maps; the
    tensors made from them are only read, so torch's warning about non-writable arrays is moot."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        if dtype == "bfloat16":
            return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(a))


@dataclass
class LMStreamSpec:
    """Everything that determines the LM activation stream (and names its cache)."""

    model: str
    sites: list[str]
    corpus: str
    text_field: str
    ctx_len: int
    split: str
    eval_fraction: float
    seed: int
    exclude_bos: bool
    sink_norm_ratio: float | None
    lm_dtype: str

    def key(self) -> str:
        blob = json.dumps(self.__dict__, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class LMActivations:
    """Runs the LM over packed contexts and yields the valid tokens' activations, epoch after epoch.

    With world_size > 1 (DDP) each rank reads every world_size-th context batch. skip_batches: this
    rank's first batches to pass over without running the LM (where a resumed run left off).
    """

    def __init__(self, lm, spec: LMStreamSpec, lm_batch_size: int = 32, max_tokens: int | None = None,
                 rank: int = 0, world_size: int = 1, epochs: int | None = None, skip_batches: int = 0):
        from trainer.corpus import Packer, open_corpus

        self.lm, self.spec = lm, spec
        self.sites = [lm.site(s) for s in spec.sites]
        self.corpus = open_corpus(spec.corpus, spec.text_field)
        self.packer = Packer(lm.tokenizer, spec.ctx_len, lm.bos_token_id, lm.separator_token_id)
        self.lm_batch_size = lm_batch_size
        self.max_tokens = max_tokens
        self.rank, self.world_size = rank, world_size
        self.epochs = epochs
        self.skip_batches = skip_batches
        self.d_in = lm.d_model
        self.epochs_started = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        from trainer.corpus import split_documents

        seen = 0
        epoch = 0
        batch_no = mine = 0
        while self.epochs is None or epoch < self.epochs:
            self.epochs_started = epoch + 1
            produced = False
            docs = split_documents(self.corpus, self.spec.split, self.spec.eval_fraction, self.spec.seed + epoch)
            for batch in self.packer.batches(docs, self.lm_batch_size):
                batch_no += 1
                if (batch_no - 1) % self.world_size != self.rank:
                    continue
                mine += 1
                produced = True
                if mine <= self.skip_batches:
                    continue
                acts = self.lm.read(batch.tokens, self.sites)
                first = acts[self.sites[-1].name]
                mask = valid_token_mask(first, self.spec.sink_norm_ratio, self.spec.exclude_bos)
                for site in self.sites[:-1]:
                    mask &= valid_token_mask(acts[site.name], self.spec.sink_norm_ratio, self.spec.exclude_bos)
                chunk = {s.name: acts[s.name][mask] for s in self.sites}
                seen += int(mask.sum())
                yield chunk
                if self.max_tokens is not None and seen >= self.max_tokens:
                    return
            if not produced:
                raise AtlasError(f"corpus {self.spec.corpus!r} gave no contexts for the {self.spec.split} split",
                                 f"use a larger corpus or a context length below {self.spec.ctx_len}")
            epoch += 1


CACHE_FORMAT = 4  # 2: contexts (tokens, documents, positions, the valid-token mask) stored too; 4: per-context sink mask
# Analyses read the stored mask, so they need a cache whose mask follows the current valid_token_mask.
CONTEXTS_FORMAT = 4


def joint_valid_mask(acts: dict[str, torch.Tensor], spec: LMStreamSpec) -> torch.Tensor:
    """[B, T] bool: the tokens valid at every site (one mask, so the sites' rows stay aligned)."""
    mask = None
    for a in acts.values():
        m = valid_token_mask(a, spec.sink_norm_ratio, spec.exclude_bos)
        mask = m if mask is None else mask & m
    return mask


@dataclass
class CachedBatch:
    """Some contexts of a cache: their tokens, documents and positions, the valid-token mask, and
    the valid tokens' activations of the requested sites (read from the memory map on demand)."""

    first_context: int
    tokens: torch.Tensor  # [B, T] int64
    doc_ids: torch.Tensor  # [B, T] int32
    doc_pos: torch.Tensor  # [B, T] int32
    mask: torch.Tensor  # [B, T] bool
    _rows: tuple[dict[str, np.ndarray], int, int, str]

    def activations(self, site: str) -> torch.Tensor:
        """[n_valid, D] activations of `site`, in the cache's storage dtype (rows follow the mask)."""
        arrays, start, end, dtype = self._rows
        return from_numpy_storage(arrays[site][start:end], dtype)


class ActivationCache:
    """One pass of an LM activation stream stored as memory-mapped .npy shards per site.

    Next to the activations of the valid tokens (what training reads) every shard keeps its
    contexts: token ids, document ids and positions, and the valid-token mask (one mask for all
    sites). So the analysis, the relations between SAEs and the dark-matter statistics can read
    the same cache as training, and a whole pipeline runs the LM over the corpus once.
    """

    def __init__(self, root: Path, spec: LMStreamSpec):
        self.root = root
        self.spec = spec
        self.dir = root / spec.key()

    @property
    def complete(self) -> bool:
        return (self.dir / "meta.json").is_file()

    @property
    def has_contexts(self) -> bool:
        return self.complete and self.meta().get("format", 1) >= CONTEXTS_FORMAT

    def covers(self, tokens: int) -> bool:
        """Whether the cache holds `tokens` tokens or the whole split (whichever is smaller)."""
        if not self.complete:
            return False
        meta = self.meta()
        return meta.get("whole_split", False) or meta["tokens"] >= tokens

    def meta(self) -> dict:
        return json.loads((self.dir / "meta.json").read_text())

    def write(self, source: LMActivations, max_tokens: int, shard_tokens: int = 1 << 18, progress=None) -> None:
        """Run the LM once over the split (up to max_tokens) and store activations and contexts.

        Reads the same contexts, in the same order, as the first epoch of `source`."""
        from trainer.corpus import split_documents

        spec = self.spec
        tmp = self.dir.with_name(self.dir.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        pending: dict[str, list[torch.Tensor]] = {s: [] for s in spec.sites}
        pending_ctx: dict[str, list[np.ndarray]] = {k: [] for k in ("tokens", "doc_ids", "doc_pos", "mask")}
        shards, total, contexts, pending_n = [], 0, 0, 0
        storage = None

        def flush():
            nonlocal pending_n, contexts
            if not pending_ctx["tokens"]:
                return
            name = f"shard_{len(shards):05d}.npy"
            for site, parts in pending.items():
                (tmp / site).mkdir(parents=True, exist_ok=True)
                np.save(tmp / site / name, to_numpy_storage(torch.cat(parts)))
                parts.clear()
            (tmp / "contexts").mkdir(parents=True, exist_ok=True)
            ctx = {k: np.concatenate(v) for k, v in pending_ctx.items()}
            np.savez(tmp / "contexts" / name.replace(".npy", ".npz"), **ctx)
            shards.append({"file": name, "tokens": pending_n, "first_context": contexts,
                           "contexts": int(ctx["tokens"].shape[0])})
            contexts += int(ctx["tokens"].shape[0])
            for v in pending_ctx.values():
                v.clear()
            pending_n = 0

        docs = split_documents(source.corpus, spec.split, spec.eval_fraction, spec.seed)
        whole_split = True
        for batch in source.packer.batches(docs, source.lm_batch_size):
            acts = source.lm.read(batch.tokens, source.sites)
            mask = joint_valid_mask(acts, spec)
            n = int(mask.sum())
            for site in spec.sites:
                a = acts[site][mask]
                storage = storage or _STORAGE[a.dtype]
                pending[site].append(a.cpu())
            pending_ctx["tokens"].append(batch.tokens.numpy().astype(np.int32))
            pending_ctx["doc_ids"].append(batch.doc_ids.numpy().astype(np.int32))
            pending_ctx["doc_pos"].append(batch.doc_pos.numpy().astype(np.int32))
            pending_ctx["mask"].append(mask.cpu().numpy())
            pending_n += n
            total += n
            if progress is not None:
                progress(n)
            if pending_n >= shard_tokens:
                flush()
            if total >= max_tokens:
                whole_split = False  # stopped by the token budget, not by the end of the split
                break
        flush()
        if not shards:
            raise AtlasError(f"corpus {spec.corpus!r} gave no contexts for the {spec.split} split",
                             f"use a larger corpus or a context length below {spec.ctx_len}")
        meta = {"spec": spec.__dict__, "d_in": source.d_in, "dtype": storage, "tokens": total, "shards": shards,
                "whole_split": whole_split, "format": CACHE_FORMAT, "contexts": contexts}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(self.dir, ignore_errors=True)
        tmp.rename(self.dir)

    def fill(self, lm, max_tokens: int, lm_batch_size: int = 32, desc: str = "caching activations",
             shard_tokens: int = 1 << 18, report_phase: str | None = None) -> ActivationCache:
        """Write the cache (one LM pass, with a progress bar) unless it already covers max_tokens.
        shard_tokens: tokens per shard, held in memory for every site until the shard is written.
        report_phase: also report the pass's progress to trainer.progress under this phase."""
        if self.covers(max_tokens) and self.has_contexts:
            return self
        from tqdm import tqdm

        from trainer.corpus import count_tokens

        source = LMActivations(lm, self.spec, lm_batch_size)
        target = max_tokens
        if source.corpus.finite:  # the progress bar's total (the corpus is listed once, shared with the pass)
            target = min(target, count_tokens(source.corpus, lm.tokenizer, self.spec.split, self.spec.eval_fraction))
        with tqdm(total=target, unit="tok", unit_scale=True, desc=desc, dynamic_ncols=True, mininterval=1.0) as bar:
            def advance(n: int) -> None:
                bar.update(n)
                if report_phase is not None:
                    from trainer.progress import report

                    report(report_phase, bar.n, target, "tok")

            self.write(source, max_tokens=max_tokens, shard_tokens=shard_tokens, progress=advance)
        log.info("cached %d tokens of %s activations (%s split) in %s", self.meta()["tokens"],
                 ", ".join(self.spec.sites), self.spec.split, self.dir)
        return self

    def contexts(self, sites: list[str], batch_contexts: int = 32, start_context: int = 0) -> Iterator[CachedBatch]:
        """The cached contexts in their stored order, batch_contexts at a time, from start_context."""
        meta = self.meta()
        if meta.get("format", 1) < CONTEXTS_FORMAT:
            raise AtlasError(f"the activation cache {self.dir} predates stored contexts or the current sink mask",
                             f"delete it (rm -r {self.dir}) so that it is written again")
        missing = [s for s in sites if s not in self.spec.sites]
        if missing:
            raise AtlasError(f"the activation cache {self.dir} has no {', '.join(missing)} activations",
                             "cache those sites too")
        for sh in meta["shards"]:
            first, n_ctx = sh["first_context"], sh["contexts"]
            if first + n_ctx <= start_context:
                continue
            arrays = {s: np.load(self.dir / s / sh["file"], mmap_mode="r") for s in sites}
            with np.load(self.dir / "contexts" / sh["file"].replace(".npy", ".npz")) as z:
                ctx = {k: z[k] for k in z.files}
            offsets = np.concatenate([[0], np.cumsum(ctx["mask"].sum(1))])
            for lo in range(max(0, start_context - first), n_ctx, batch_contexts):
                hi = min(lo + batch_contexts, n_ctx)
                yield CachedBatch(first + lo, torch.from_numpy(ctx["tokens"][lo:hi].astype(np.int64)),
                                  torch.from_numpy(ctx["doc_ids"][lo:hi]), torch.from_numpy(ctx["doc_pos"][lo:hi]),
                                  torch.from_numpy(ctx["mask"][lo:hi]),
                                  (arrays, int(offsets[lo]), int(offsets[hi]), meta["dtype"]))

    def reader(self, epochs: int | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
               chunk_tokens: int = 8192, skip_chunks: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Chunks of the cache in a shuffled shard/chunk order, epoch after epoch. Rank r of world_size
        reads every world_size-th chunk, passing over its first skip_chunks (a resumed run's)."""
        meta = self.meta()
        arrays = {s: [np.load(self.dir / s / sh["file"], mmap_mode="r") for sh in meta["shards"]] for s in self.spec.sites}
        spans = [(i, start) for i, sh in enumerate(meta["shards"]) for start in range(0, sh["tokens"], chunk_tokens)]
        epoch, n, mine = 0, 0, 0
        while epochs is None or epoch < epochs:
            order = np.random.default_rng(seed + epoch).permutation(len(spans))
            for j in order:
                n += 1
                if (n - 1) % world_size != rank:
                    continue
                mine += 1
                if mine <= skip_chunks:
                    continue
                shard, start = spans[j]
                yield {s: from_numpy_storage(arrays[s][shard][start:start + chunk_tokens], meta["dtype"]) for s in arrays}
            epoch += 1


def find_cache(root: Path, spec: LMStreamSpec, with_contexts: bool = True) -> ActivationCache | None:
    """A complete cache under `root` whose stream equals `spec` except that it may hold more sites
    (a sweep's cache serves every one of its sites); the one with the most tokens wins."""
    if not root.is_dir():
        return None
    want = {k: v for k, v in spec.__dict__.items() if k != "sites"}
    best, best_tokens = None, -1
    for meta_path in root.glob("*/meta.json"):
        try:
            meta = json.loads(meta_path.read_text())
            cached = dict(meta["spec"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if with_contexts and meta.get("format", 1) < CONTEXTS_FORMAT:
            continue
        sites = cached.pop("sites", [])
        if cached != want or not set(spec.sites) <= set(sites):
            continue
        if meta.get("tokens", 0) > best_tokens:
            cache = ActivationCache(root, LMStreamSpec(**{**cached, "sites": sites}))
            if cache.dir == meta_path.parent:
                best, best_tokens = cache, meta.get("tokens", 0)
    return best


def cached_eval_activations(root: Path, spec: LMStreamSpec, tokens: int) -> dict[str, torch.Tensor] | None:
    """The first `tokens` valid tokens of a cached split, in stream order (what an LM pass over the
    split would give first), or None when no cache with contexts covers them."""
    cache = find_cache(root, spec)
    if cache is None or not cache.covers(tokens):
        return None
    parts: dict[str, list[torch.Tensor]] = {s: [] for s in spec.sites}
    have = 0
    for batch in cache.contexts(list(spec.sites)):
        for s in spec.sites:
            parts[s].append(batch.activations(s))
        have += int(batch.mask.sum())
        if have >= tokens:
            break
    if not have:
        return None
    return {s: torch.cat(v)[:tokens] for s, v in parts.items()}


class ArrayActivations:
    """A user's float32 [N, D] .npy matrix: held-out rows for evaluation, shuffled batches for training.

    Batches are drawn from one seeded permutation per epoch and split across DDP ranks by rows, so
    a two-process run sees exactly the batches of a one-process run.
    """

    def __init__(self, path: Path, eval_fraction: float = 0.05, seed: int = 0):
        if not path.is_file():
            raise AtlasError(f"activation file {path} does not exist", "check the path")
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:  # numpy raises ValueError, OSError, BadZipFile, UnpicklingError...
            raise AtlasError(f"cannot read {path} as a .npy array ({type(exc).__name__}: {str(exc)[:100]})",
                             "save it with numpy.save(path, float32 array)") from None
        if not isinstance(arr, np.ndarray):
            raise AtlasError(f"{path} is an archive of several arrays, not one .npy array", "save one [N, D] float32 array")
        if arr.ndim != 2:
            raise AtlasError(f"activation file {path} has shape {arr.shape}, expected [N, D]", "save a 2-D float32 matrix")
        if arr.dtype != np.float32:
            raise AtlasError(f"activation file {path} has dtype {arr.dtype}, expected float32", "convert with arr.astype('float32')")
        if arr.shape[0] < 64:
            raise AtlasError(f"activation file {path} has only {arr.shape[0]} rows", "provide at least thousands of activations")
        self.path, self.array = path, arr
        self.d_in = arr.shape[1]
        perm = np.random.default_rng(seed).permutation(arr.shape[0])
        n_eval = max(1, int(round(arr.shape[0] * eval_fraction)))
        self.eval_rows = np.sort(perm[:n_eval])
        self.train_rows = perm[n_eval:]
        self.seed = seed

    def eval_tensor(self, max_rows: int | None = None) -> torch.Tensor:
        rows = self.eval_rows[:max_rows] if max_rows else self.eval_rows
        return torch.from_numpy(np.asarray(self.array[rows]))

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1, skip: int = 0) -> Iterator[torch.Tensor]:
        """Global batches of batch_size rows; this rank's share is rows rank::world_size."""
        epoch, n = 0, 0
        rows = self.train_rows
        if len(rows) < batch_size:
            raise AtlasError(f"{self.path} has {len(rows)} training rows, fewer than one batch of {batch_size}",
                             "lower --batch-size or provide more activations")
        while True:
            order = np.random.default_rng(self.seed + 1 + epoch).permutation(rows)
            for start in range(0, len(order) - batch_size + 1, batch_size):
                n += 1
                if n <= skip:
                    continue
                idx = np.sort(order[start:start + batch_size][rank::world_size])
                yield torch.from_numpy(np.asarray(self.array[idx]))
            epoch += 1


@dataclass
class BufferPosition:
    """Where a ShuffleBuffer stands, enough to rebuild it exactly: the source chunks read before the
    current window, the window's number (it seeds the window's permutation), the batches already
    handed out from it, and the tokens carried into it from the previous window (fewer than a batch)."""

    chunks: int = 0
    window: int = 0
    emitted: int = 0
    carry: dict[str, torch.Tensor] | None = None

    def to_state(self) -> dict:
        carry = {s: v.detach().cpu() for s, v in self.carry.items()} if self.carry else None
        return {"chunks": self.chunks, "window": self.window, "emitted": self.emitted, "carry": carry}

    @classmethod
    def from_state(cls, state: dict) -> BufferPosition:
        return cls(int(state["chunks"]), int(state["window"]), int(state["emitted"]), state.get("carry"))


class ShuffleBuffer:
    """Mixes a stream of token chunks across many contexts into batches of batch_size, window by window.

    A window is `capacity` tokens (plus the few carried over from the previous window): it is read
    from the source, permuted with a generator seeded by (seed, window number), and handed out as
    full batches; the remainder (< batch_size tokens) is carried into the next window. Every batch
    is thus a uniform draw from the window's contexts, and `position` (small: counters plus the
    carried tokens) is an exact bookmark: a buffer built from it, over the same source opened at
    `position.chunks`, yields exactly the batches this one would have yielded next, so a resumed run
    trains on no token twice and skips none (it re-reads at most one window of the source).

    open_chunks(skip) must return this rank's chunk stream without its first `skip` chunks.
    """

    def __init__(self, open_chunks: Callable[[int], Iterator[dict[str, torch.Tensor]]], batch_size: int,
                 capacity: int, seed: int = 0, device: torch.device | None = None,
                 position: BufferPosition | None = None):
        self.open_chunks = open_chunks
        self.batch_size = batch_size
        self.capacity = max(capacity, batch_size)
        self.seed = seed
        self.device = device
        self.position = position or BufferPosition()

    def _to(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device) if self.device is not None else t

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        pos = self.position
        chunks = iter(self.open_chunks(pos.chunks))
        while True:
            parts = [pos.carry] if pos.carry else []
            count = sum(next(iter(p.values())).shape[0] for p in parts)
            read, exhausted = 0, False
            while count < self.capacity:
                try:
                    chunk = next(chunks)
                except StopIteration:
                    exhausted = True
                    break
                parts.append(chunk)
                read += 1
                count += next(iter(chunk.values())).shape[0]
            if count < self.batch_size:
                return
            merged = {s: torch.cat([self._to(p[s]) for p in parts]) for s in parts[0]}
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + pos.window)
            perm = torch.randperm(count, generator=generator).to(next(iter(merged.values())).device)
            n_batches = count // self.batch_size
            for b in range(pos.emitted, n_batches):
                idx = perm[b * self.batch_size:(b + 1) * self.batch_size]
                pos.emitted = b + 1  # handed out: a checkpoint taken after this batch skips it
                yield {s: v[idx] for s, v in merged.items()}
            rest = perm[n_batches * self.batch_size:]
            pos.chunks, pos.window, pos.emitted = pos.chunks + read, pos.window + 1, 0
            pos.carry = {s: v[rest] for s, v in merged.items()} if rest.numel() else None
            if exhausted:
                return
