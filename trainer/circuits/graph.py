"""An attribution graph: nodes, the dense adjacency matrix of direct effects, and what they stand for.

Node order (circuit-tracer's Graph): the selected feature nodes (in (layer, position, feature)
order), then one error node per (layer, position), layer-major, then one token node per position,
then the logit nodes (most probable first). adjacency[target, source] is the direct effect of the
source on the target in the frozen replacement model: on a feature's pre-activation, or on a
target's demeaned logit. Rows of error and token nodes are zero (nothing in the graph feeds them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


class Node(NamedTuple):
    """kind: feature | error | token | logit. layer: the block (-1 for tokens, n_layers for
    logits); position: the token position; index: the feature, the token id (token nodes) or the
    vocabulary id (logit nodes), -1 for error nodes."""

    kind: str
    layer: int
    position: int
    index: int


@dataclass
class Graph:
    prompt: str
    """The prompt as decoded from `tokens`."""
    tokens: torch.Tensor
    """[T] long: the attributed tokens, BOS first."""
    n_layers: int
    """Blocks of the model (one error node per block and position)."""
    active_features: torch.Tensor
    """[N, 3] long: (layer, position, feature) of every active transcoder feature (BOS excluded)."""
    activations: torch.Tensor
    """[N] float32: their activations."""
    selected_features: torch.Tensor
    """[n] long: indices into active_features of the feature nodes (all of them unless capped)."""
    logit_tokens: torch.Tensor
    """[k] long: vocabulary ids of the logit nodes."""
    logit_probabilities: torch.Tensor
    """[k] float32: their probabilities (the logit nodes' weights in influence)."""
    adjacency: torch.Tensor
    """[n + L*T + T + k] squared, float32: adjacency[target, source] (see the module docstring)."""
    seconds: float = 0.0
    """Wall time the attribution took."""

    @property
    def n_pos(self) -> int:
        return int(self.tokens.numel())

    @property
    def n_features(self) -> int:
        return int(self.selected_features.numel())

    @property
    def n_logits(self) -> int:
        return int(self.logit_tokens.numel())

    @property
    def n_nodes(self) -> int:
        return int(self.adjacency.shape[0])

    @property
    def error_slice(self) -> slice:
        return slice(self.n_features, self.n_features + self.n_layers * self.n_pos)

    @property
    def token_slice(self) -> slice:
        start = self.error_slice.stop
        return slice(start, start + self.n_pos)

    @property
    def logit_slice(self) -> slice:
        return slice(self.n_nodes - self.n_logits, self.n_nodes)

    def logit_weights(self) -> torch.Tensor:
        """[n_nodes]: the logit nodes' probabilities, zero elsewhere."""
        w = torch.zeros(self.n_nodes, dtype=self.adjacency.dtype)
        w[self.logit_slice] = self.logit_probabilities.to(w.dtype)
        return w

    def node(self, i: int) -> Node:
        if i < self.n_features:
            layer, pos, feat = (int(v) for v in self.active_features[self.selected_features[i]])
            return Node("feature", layer, pos, feat)
        if i < self.error_slice.stop:
            layer, pos = divmod(i - self.n_features, self.n_pos)
            return Node("error", layer, pos, -1)
        if i < self.token_slice.stop:
            pos = i - self.token_slice.start
            return Node("token", -1, pos, int(self.tokens[pos]))
        j = i - self.logit_slice.start
        return Node("logit", self.n_layers, self.n_pos - 1, int(self.logit_tokens[j]))

    def nodes(self) -> list[Node]:
        return [self.node(i) for i in range(self.n_nodes)]

    def node_activations(self) -> torch.Tensor:
        """[n] activations of the feature nodes."""
        return self.activations[self.selected_features]
