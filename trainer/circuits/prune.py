"""Influence, pruning and graph scores, by circuit-tracer's definitions (circuit_tracer/graph.py:
normalize_matrix, compute_influence, find_threshold, prune_graph, compute_graph_scores,
compute_partial_influences).

- Â = |A| with each row divided by its sum (rows summing to zero stay zero): what share of a
  target's direct inputs each source makes up.
- Influence I = wᵀ(Â + Â² + …) with w the logit probabilities on the logit nodes: each node's
  share of the output, through every path. The graph is acyclic, so the series ends.
- Nodes are kept from the most influential down until `node_threshold` of the total influence is
  reached (ties at the threshold are all kept); token and logit nodes always stay.
- Edges among the kept nodes are scored Â'[t, s]·(I'_t + w_t), where Â' and I' are recomputed on
  the adjacency restricted to the kept nodes, and kept down to `edge_threshold` of the total
  score. Then, repeatedly until nothing changes, a feature or error node without a kept outgoing
  edge is dropped, as is a feature node without a kept incoming edge (with their edges).
- Replacement score: I(tokens) / (I(tokens) + I(errors)); completeness: Σᵢ(1 - Σ_errors Â[i, e])
  (Iᵢ + wᵢ) / Σᵢ(Iᵢ + wᵢ), over all nodes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from store.errors import AtlasError
from trainer.circuits.graph import Graph

ROW_FLOOR = 1e-10
"""Rows of |A| are divided by max(row sum, this) (compute_partial_influences uses 1e-8)."""


def normalize_rows(adjacency: torch.Tensor, floor: float = ROW_FLOOR) -> torch.Tensor:
    a = adjacency.abs()
    return a / a.sum(dim=1, keepdim=True).clamp(min=floor)


def influence(normalized: torch.Tensor, weights: torch.Tensor, max_iter: int = 1000) -> torch.Tensor:
    """wᵀ(Â + Â² + …), summed until a term is exactly zero (an acyclic graph's powers vanish)."""
    term = weights @ normalized
    total = term.clone()
    for _ in range(max_iter):
        if not term.any():
            return total
        term = term @ normalized
        total += term
    raise RuntimeError(f"influence did not converge in {max_iter} steps: is the graph acyclic?")


def node_influence(graph: Graph) -> torch.Tensor:
    return influence(normalize_rows(graph.adjacency), graph.logit_weights())


def threshold_score(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """The score s such that the scores >= s hold `fraction` of the total: sorting descending, the
    first s whose cumulative share reaches `fraction` (the last one if none does). Scores are not
    negative; only the non-zero ones are sorted (an edge matrix is mostly zeros), which changes
    nothing: zeros come last and add nothing to the running sum."""
    flat = scores.flatten()
    nonzero = flat[flat != 0]
    zero = flat.new_zeros(())
    if len(nonzero) == 0:
        return zero
    ordered = nonzero.sort(descending=True).values
    share = ordered.cumsum(0) / ordered.sum()
    index = int(torch.searchsorted(share, torch.tensor(fraction, dtype=share.dtype)))
    if index < len(ordered):
        return ordered[index]
    return zero if len(nonzero) < len(flat) else ordered[-1]


class Pruned(NamedTuple):
    node_mask: torch.Tensor
    """[n] bool: the nodes kept."""
    edge_mask: torch.Tensor
    """[n, n] bool: the edges kept, [target, source]."""
    cumulative_scores: torch.Tensor
    """[n]: each node's place in the influence ranking, as the share of the total influence held
    by it and every node ranked above it (what circuit-tracer exports as a node's influence)."""


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise AtlasError(f"{name} must lie in [0, 1], got {value}")
    n_keep_always = graph.n_pos + graph.n_logits  # tokens and logits, the last nodes
    weights = graph.logit_weights()
    infl = node_influence(graph)
    node_mask = infl >= threshold_score(infl, node_threshold)
    node_mask[-n_keep_always:] = True

    restricted = graph.adjacency.clone()
    restricted[~node_mask] = 0
    restricted[:, ~node_mask] = 0
    normalized = normalize_rows(restricted)
    edge_scores = normalized * (influence(normalized, weights) + weights)[:, None]
    edge_mask = edge_scores >= threshold_score(edge_scores.flatten(), edge_threshold)

    n_feat, upstream = graph.n_features, graph.n_nodes - n_keep_always

    def drop_dead_ends() -> None:
        node_mask[:upstream] &= edge_mask[:, :upstream].any(0)  # feature and error nodes need a way out
        node_mask[:n_feat] &= edge_mask[:n_feat].any(1)  # feature nodes need a way in

    # As circuit-tracer orders it: the first pass reads the edge mask as thresholded; each later
    # pass first removes the edges of the nodes dropped so far.
    before = node_mask.clone()
    drop_dead_ends()
    while not torch.equal(node_mask, before):
        before = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        drop_dead_ends()

    ordered, order = infl.sort(descending=True)
    cumulative = torch.zeros_like(infl)
    cumulative[order] = ordered.cumsum(0) / ordered.sum()
    return Pruned(node_mask, edge_mask, cumulative)


def graph_scores(graph: Graph, node_mask: torch.Tensor | None = None) -> tuple[float, float]:
    """(replacement, completeness) of the graph (circuit-tracer's compute_graph_scores).

    With `node_mask` (from prune), the scores of the pruned graph: the feature nodes it drops
    count as error nodes, as the attribution-graphs paper scores pruned graphs; the unpruned
    scores are exactly circuit-tracer's."""
    normalized = normalize_rows(graph.adjacency)
    weights = graph.logit_weights()
    infl = influence(normalized, weights)
    error = torch.zeros(graph.n_nodes, dtype=torch.bool)
    error[graph.error_slice] = True
    if node_mask is not None:
        error[:graph.n_features] |= ~node_mask[:graph.n_features]
    token_infl = infl[graph.token_slice].sum()
    error_infl = infl[error].sum()
    replacement = token_infl / (token_infl + error_infl)
    non_error = 1 - normalized[:, error].sum(dim=-1)
    output_infl = infl + weights
    completeness = (non_error * output_infl).sum() / output_infl.sum()
    return float(replacement), float(completeness)


def partial_influence(rows: torch.Tensor, row_nodes: torch.Tensor, logit_probabilities: torch.Tensor,
                      max_iter: int = 128, chunk: int = 1024) -> torch.Tensor:
    """Influence of every node from the rows computed so far (circuit-tracer's
    compute_partial_influences): rows [r, n_nodes] are the direct effects on the nodes row_nodes
    [r] (logit nodes, the last k columns, and the features visited); the others count as having
    no inputs. Ranks the features whose rows to compute next when feature nodes are capped.

    Same sum as circuit-tracer's p_{k+1} = p_k[row_nodes] Â, I = p_1 + p_2 + ..., computed on the
    rows' own nodes: with u_k = p_k[row_nodes], u_{k+1} = u_k Â[:, row_nodes] (an r x r matrix)
    and I = (u_0 + u_1 + ...) Â, so the r x n_nodes matrix is read twice instead of once per step
    (rows span every active feature's column: 1.9 GB at 7,500 rows x 62,000 nodes)."""
    n_rows, n_nodes = rows.shape
    sums = torch.cat([rows[i:i + chunk].abs().sum(1) for i in range(0, n_rows, chunk)]).clamp(min=1e-8)
    square = rows[:, row_nodes].abs() / sums[:, None]
    start = torch.zeros(n_nodes, dtype=rows.dtype)
    start[-len(logit_probabilities):] = logit_probabilities.to(rows.dtype)
    u = start[row_nodes]
    total = torch.zeros(n_rows, dtype=rows.dtype)
    for _ in range(max_iter):
        if not u.any():
            break
        total += u
        u = u @ square
    else:
        raise RuntimeError("partial influence did not converge")
    weights = total / sums
    influence = torch.zeros(n_nodes, dtype=rows.dtype)
    for i in range(0, n_rows, chunk):
        influence += weights[i:i + chunk] @ rows[i:i + chunk].abs()
    return influence
