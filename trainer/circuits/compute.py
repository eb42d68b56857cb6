"""One attribution graph end to end, as `sae-atlas graph` and the graph worker compute it: load a
transcoder set's manifest and its LM into a ReplacementModel, attribute a prompt (attribute.py),
score the unpruned graph and prune it (prune.py), and export the frontend JSON (export.py).

A loaded replacement model is kept per (manifest, device, dtype) by `replacement_for`, so a worker
pays the loading once for the graphs that share a set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from store.errors import AtlasError
from trainer.circuits.attribute import AttributionConfig, attribute
from trainer.circuits.export import graph_json
from trainer.circuits.prune import graph_scores, prune
from trainer.circuits.replacement import ReplacementModel
from trainer.transcoders.sets import TranscoderSet, load_transcoder_set


@dataclass
class GraphConfig:
    """How a stored graph is computed and pruned."""

    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    """Logit targets, batching, the feature-node cap and the prompt length limit."""
    node_threshold: float = 0.8
    """Keep nodes up to this share of cumulative influence in the stored graph (circuit-tracer's default)."""
    edge_threshold: float = 0.98
    """Keep edges up to this share of cumulative edge score (circuit-tracer's default)."""
    device: str | None = None
    """Where the LM and transcoders run (None: the best available)."""
    lm_dtype: str = "float32"
    """The LM's dtype; float32 gives graphs exact to float32 round-off (see ReplacementModel)."""

    def __post_init__(self):
        if isinstance(self.attribution, dict):
            self.attribution = AttributionConfig(**self.attribution)
        for name in ("node_threshold", "edge_threshold"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise AtlasError(f"{name} must lie in (0, 1], not {v}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GraphResult:
    """A computed graph, ready to store."""

    data: dict
    """circuit-tracer's frontend JSON of the pruned graph."""
    replacement: float
    """Replacement score of the unpruned graph."""
    completeness: float
    """Completeness score of the unpruned graph."""
    seconds: float
    """Attribution wall time."""


_LOADED: dict[tuple[str, str | None, str], ReplacementModel] = {}


def replacement_for(tset: TranscoderSet, device: str | None = None, lm_dtype: str = "float32") -> ReplacementModel:
    """The set's LM with its transcoders, loaded once per (manifest, device, dtype) in this process."""
    from trainer.lm import load_lm

    key = (str(tset.path.resolve()), device, lm_dtype)
    if key not in _LOADED:
        lm = load_lm(tset.model, device, lm_dtype)
        if lm.n_layers != tset.n_layers:
            raise AtlasError(f"transcoder set {tset.path} is for {tset.n_layers} blocks, {tset.model} has {lm.n_layers}",
                             "use the set trained on this model")
        loaded = tset.load_all()
        for item in loaded.values():
            item.sae.to(lm.device)
        _LOADED.clear()  # one set held at a time: a model's weights are large
        _LOADED[key] = ReplacementModel(lm, loaded)
    return _LOADED[key]


def open_set(path: str | Path) -> TranscoderSet:
    """The set's manifest, refusing one that lacks a block."""
    return load_transcoder_set(path, complete=True)


def compute_graph(model: ReplacementModel, prompt: str, slug: str, cfg: GraphConfig | None = None,
                  progress: Callable[[int, int], None] | None = None) -> GraphResult:
    """Attribute `prompt`, score the unpruned graph, prune it and export it under `slug`."""
    cfg = cfg or GraphConfig()
    graph = attribute(prompt, model, cfg.attribution, progress=progress)
    replacement, completeness = graph_scores(graph)
    pruned = prune(graph, cfg.node_threshold, cfg.edge_threshold)
    scan = model.lm.name
    data = graph_json(graph, slug, scan, model.lm.tokenizer.decode, cfg.node_threshold, cfg.edge_threshold, pruned)
    return GraphResult(data, replacement, completeness, graph.seconds)
