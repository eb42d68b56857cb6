"""Attribution: the adjacency matrix of a prompt's local replacement model (circuit-tracer's
attribute / AttributionContext.compute_batch, written for our LoadedLM).

A row of the matrix is one target: a feature's pre-activation or a logit target's demeaned logit.
Its gradient through the frozen replacement model (replacement.py), contracted with each source's
vector where the source writes, gives the direct effects of every source on it:
  feature s at (l, p):  a_s W_dec,s · ∂target/∂mlp_out_l[p]
  error node (l, p):    e_{l,p} · ∂target/∂mlp_out_l[p]
  token p:              embedding_p · ∂target/∂embedding[p]
A feature target t at (L, q) is seeded with W_enc,t at mlp_in_L[q]; a logit target with its
demeaned unembedding row at the final norm's output, last position. Many targets share one
backward pass: the replacement model runs forward once (batch 1) and the backward pass is
vectorised over the targets (autograd's is_grads_batched), instead of circuit-tracer's forward
pass over batch_size copies of the prompt, which on a CPU costs as much as the backward passes.
The model is causal, so a batch of targets at positions < t is differentiated through a forward
pass over the first t tokens only (t rounded up to prefix_step), which roughly halves the work.

Order of work, as circuit-tracer: the logit rows first; then feature rows, either all of them or,
when max_feature_nodes caps the graph, update_interval x batch_size at a time in order of their
influence on the logits through the rows computed so far (prune.partial_influence).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from store.errors import AtlasError
from trainer.circuits.graph import Graph
from trainer.circuits.prune import partial_influence
from trainer.circuits.replacement import LinearGraph, Prepared, ReplacementModel
from trainer.circuits.targets import LogitTargets, salient_logits, targets_for


@dataclass
class AttributionConfig:
    """How a graph is computed (defaults: circuit-tracer's, except where noted)."""

    max_n_logits: int = 10
    """At most this many logit targets."""
    desired_logit_prob: float = 0.95
    """Logit targets are the most probable tokens until their cumulative probability reaches this."""
    batch_size: int = 512
    """With max_feature_nodes, features are re-ranked after every update_interval x batch_size
    rows (circuit-tracer's batch_size, which is also its number of targets per backward pass)."""
    backward_batch: int = 64
    """Targets per backward pass (ours). Every target in a pass costs as much as the deepest and
    latest one, so passes over few targets, taken in (layer, position) order, waste less; on a
    4-block model of SmolLM2's width, 8,192 targets took 11 s in passes of 64 or 128 and 15 s in
    passes of 256 (one thread)."""
    max_feature_nodes: int | None = 7500
    """Keep only this many feature nodes, chosen by influence; None keeps every active feature
    (circuit-tracer's library default; 7500 is its command line's). The matrices are dense: rows
    for the kept features over every active feature's column while ranking, e.g. 7,500 x 62,000
    floats (1.9 GB) for 32 tokens through 30 layers at L0 64, where all 61,000 would need 15 GB."""
    update_interval: int = 4
    """With max_feature_nodes: backward passes between re-rankings of the features."""
    max_tokens: int = 64
    """Longest prompt accepted, in tokens (the BOS we prepend not counted)."""
    prefix_step: int = 8
    """Targets are differentiated through the shortest prefix of the prompt that holds them,
    rounded up to a multiple of this many tokens (ours; circuit-tracer always uses the whole prompt)."""

    def __post_init__(self):
        if self.max_n_logits < 1 or not 0 < self.desired_logit_prob <= 1:
            raise AtlasError("max_n_logits must be >= 1 and desired_logit_prob in (0, 1]")
        if min(self.batch_size, self.backward_batch, self.update_interval, self.prefix_step) < 1:
            raise AtlasError("batch_size, backward_batch, update_interval and prefix_step must be >= 1")
        if self.max_feature_nodes is not None and self.max_feature_nodes < 0:
            raise AtlasError("max_feature_nodes must not be negative", "leave it unset to keep every feature")


class _Sources:
    """Contracts a batch of target gradients with every source's vector (one row per target)."""

    def __init__(self, prep: Prepared, device: torch.device):
        self.n_layers, self.n_pos = len(prep.layers), prep.n_pos
        self.n_features = sum(len(c.positions) for c in prep.layers)
        self.n_cols = self.n_features + (self.n_layers + 1) * self.n_pos
        self.errors = prep.errors.to(device)
        self.embeddings = prep.embeddings.to(device)
        # Per layer, the decoder vectors padded to [T, K, D] with K the most features at one
        # position, so a layer's contraction is one batched matmul over positions.
        self.blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None] = []
        start = 0
        for c in prep.layers:
            n = len(c.positions)
            if n == 0:
                self.blocks.append(None)
                continue
            counts = torch.bincount(c.positions, minlength=self.n_pos)
            first = torch.cumsum(counts, 0) - counts
            slots = torch.arange(n) - first[c.positions]
            padded = torch.zeros(self.n_pos, int(counts.max()), c.decoder.shape[1])
            padded[c.positions, slots] = c.decoder
            cols = torch.arange(start, start + n)
            self.blocks.append((padded.to(device), c.positions.to(device), slots.to(device), cols.to(device)))
            start += n

    def contract(self, grad_embed: torch.Tensor | None, grad_out: list[torch.Tensor | None], batch: int) -> torch.Tensor:
        """grad_embed [B, t, D] and grad_out[l] [B, t, D] (None: zero), over the first t <= T
        positions (sources further on have no effect on these targets) -> rows [B, n_cols]."""
        device = self.embeddings.device
        rows = torch.zeros(batch, self.n_cols, device=device)
        err0 = self.n_features
        tok0 = err0 + self.n_layers * self.n_pos
        if grad_embed is not None:
            t = grad_embed.shape[1]
            rows[:, tok0:tok0 + t] = (grad_embed.float() * self.embeddings[:t]).sum(-1)
        for layer, g in enumerate(grad_out):
            if g is None:
                continue
            g, t = g.float(), g.shape[1]
            e = err0 + layer * self.n_pos
            rows[:, e:e + t] = (g * self.errors[layer, :t]).sum(-1)
            block = self.blocks[layer]
            if block is not None:
                padded, positions, slots, cols = block
                per_pos = torch.bmm(g.transpose(0, 1), padded[:t].transpose(1, 2))  # [t, B, K]
                if t < self.n_pos:
                    inside = positions < t
                    positions, slots, cols = positions[inside], slots[inside], cols[inside]
                rows[:, cols] = per_pos[positions, :, slots].T
        return rows


class _Prefixes:
    """Frozen replacement models over prefixes of the prompt, made as batches need them: a batch
    whose targets lie at positions < t is differentiated through the first `t` positions only,
    t rounded up to a multiple of `step` (fewer forward passes to keep)."""

    def __init__(self, model: ReplacementModel, prep: Prepared, step: int):
        self.model, self.prep, self.step = model, prep, step
        self.graphs: dict[int, LinearGraph] = {}

    def covering(self, positions: torch.Tensor) -> LinearGraph:
        need = int(positions.max()) + 1
        t = min(self.prep.n_pos, -(-need // self.step) * self.step)
        if t not in self.graphs:
            self.graphs[t] = self.model.linear_forward(self.prep, t)
        return self.graphs[t]


def _backward_rows(prefixes: _Prefixes, sources: _Sources, layers: torch.Tensor, positions: torch.Tensor,
                   vectors: torch.Tensor) -> torch.Tensor:
    """Rows [B, n_cols] for B targets: target b is seeded with vectors[b] at position positions[b]
    of mlp_in of layer layers[b], or of the final norm's output where layers[b] == n_layers."""
    lin = prefixes.covering(positions)
    n_layers, batch = sources.n_layers, len(layers)
    outputs, seeds = [], []
    for layer in sorted(set(layers.tolist())):
        at = lin.final if layer == n_layers else lin.mlp_in[layer]
        which = (layers == layer).nonzero()[:, 0]
        seed = torch.zeros((batch,) + tuple(at.shape), dtype=at.dtype, device=at.device)
        seed[which, 0, positions[which]] = vectors[which].to(at.device, at.dtype)
        outputs.append(at)
        seeds.append(seed)
    deepest = min(int(layers.max()), n_layers)
    inputs = [lin.embeddings] + lin.mlp_out[:deepest]
    grads = torch.autograd.grad(outputs, inputs, seeds, retain_graph=True, allow_unused=True, is_grads_batched=True)
    squeeze = [None if g is None else g[:, 0] for g in grads]
    return sources.contract(squeeze[0], squeeze[1:], batch)


def _targets(prep: Prepared, model: ReplacementModel, cfg: AttributionConfig,
             logit_tokens: torch.Tensor | None) -> LogitTargets:
    unembed = model.lm.unembed_weight
    if logit_tokens is None:
        return salient_logits(prep.logits[-1], unembed, cfg.max_n_logits, cfg.desired_logit_prob)
    tokens = torch.as_tensor(logit_tokens, dtype=torch.long).reshape(-1)
    if len(tokens) == 0 or int(tokens.min()) < 0 or int(tokens.max()) >= prep.logits.shape[-1]:
        raise AtlasError(f"logit targets must be token ids in 0..{prep.logits.shape[-1] - 1}")
    return targets_for(tokens, prep.logits[-1], unembed)


def attribute(prompt: str | list[int] | torch.Tensor, model: ReplacementModel,
              config: AttributionConfig | None = None, logit_tokens: torch.Tensor | list[int] | None = None,
              progress: Callable[[int, int], None] | None = None) -> Graph:
    """The attribution graph of `prompt` (text, or token ids; a BOS is prepended unless the ids
    start with a special token). logit_tokens: the logit targets' ids instead of the salient
    ones. progress(done, total) is called after each backward pass, counting target rows."""
    cfg = config or AttributionConfig()
    t0 = time.perf_counter()
    tokens = model.tokenize(prompt, cfg.max_tokens)
    prep = model.prepare(tokens)
    targets = _targets(prep, model, cfg, logit_tokens)
    prefixes = _Prefixes(model, prep, cfg.prefix_step)
    sources = _Sources(prep, model.lm.device)
    table = prep.feature_table()
    encoders = torch.cat([c.encoder for c in prep.layers]) if len(table) else torch.zeros(0, model.lm.d_model)
    n_feat, n_logits, n_layers, n_pos = len(table), len(targets), model.n_layers, prep.n_pos
    n_cols = sources.n_cols
    max_feat = n_feat if cfg.max_feature_nodes is None else min(cfg.max_feature_nodes, n_feat)
    total_rows = n_logits + max_feat

    # rows[i] holds the direct effects on node row_nodes[i]; the logit columns stay zero.
    rows = torch.zeros(total_rows, n_cols + n_logits)
    row_nodes = torch.zeros(total_rows, dtype=torch.long)
    filled = 0

    def compute(layers: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor, nodes: torch.Tensor) -> None:
        nonlocal filled
        for start in range(0, len(layers), cfg.backward_batch):
            part = slice(start, start + cfg.backward_batch)
            block = _backward_rows(prefixes, sources, layers[part], positions[part], vectors[part])
            count = block.shape[0]
            rows[filled:filled + count, :n_cols] = block.cpu()
            row_nodes[filled:filled + count] = nodes[part]
            filled += count
            if progress is not None:
                progress(filled, total_rows)

    compute(torch.full((n_logits,), n_layers), torch.full((n_logits,), n_pos - 1), targets.vectors,
            torch.arange(n_cols, n_cols + n_logits))

    visited = torch.zeros(n_feat, dtype=torch.bool)
    while int(visited.sum()) < max_feat:
        if max_feat == n_feat:
            pending = torch.arange(n_feat)
        else:
            infl = partial_influence(rows[:filled], row_nodes[:filled], targets.probabilities)
            rank = torch.argsort(infl[:n_feat], descending=True)
            queue = min(cfg.update_interval * cfg.batch_size, max_feat - int(visited.sum()))
            pending = rank[~visited[rank]][:queue]
            # The order inside a queue does not change any row; (layer, position) order lets a
            # backward pass start at a shallower layer.
            pending = pending.sort().values
        compute(table[pending, 0], table[pending, 1], encoders[pending], pending)
        visited[pending] = True

    selected = visited.nonzero()[:, 0]
    keep_cols = torch.cat([selected, torch.arange(n_feat, n_cols + n_logits)])
    n_nodes = len(keep_cols)
    adjacency = torch.zeros(n_nodes, n_nodes)
    # Features first, then the logit rows at the end; error and token rows stay zero.
    where = torch.empty(n_cols + n_logits, dtype=torch.long)
    where[keep_cols] = torch.arange(n_nodes)
    adjacency[where[row_nodes[:filled]]] = rows[:filled][:, keep_cols]
    graph = Graph(
        prompt=model.lm.tokenizer.decode(prep.tokens.tolist()),
        tokens=prep.tokens,
        n_layers=n_layers,
        active_features=table,
        activations=torch.cat([c.activations for c in prep.layers]) if n_feat else torch.zeros(0),
        selected_features=selected,
        logit_tokens=targets.tokens.cpu(),
        logit_probabilities=targets.probabilities.cpu(),
        adjacency=adjacency,
        seconds=time.perf_counter() - t0,
    )
    return graph
