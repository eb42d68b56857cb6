"""One-to-one matching of latents (layer or seed pairs), with "unmatched" allowed.

Minimum total cost over partial one-to-one matchings, where leaving a latent unmatched costs
max_cost / 2 on either side, so a pair can only be matched when its cost is below max_cost (and
only when no better use of either latent exists). Two exact solvers, same objective:

- dense (small widths): scipy's linear_sum_assignment on A x (B + A dummies), where row i may take
  its own dummy column at cost max_cost and non-candidate pairs cost more than that;
- sparse (large widths): scipy's min_weight_full_bipartite_matching (LAPJVsp) on the candidate
  graph made square with dummies: a dummy partner per latent on the other side, plus a zero-cost
  mirror edge (dummy of j, dummy of i) for every candidate edge (i, j), so that any partial
  matching extends to a full one. Weights are shifted by +1 because the solver reads explicit
  zeros as missing edges; every full matching has the same number of edges, so the shift does not
  change the optimum.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

DENSE_LIMIT = 2_000_000  # n_a x n_b cells below which the dense solver is used


def match(n_a: int, n_b: int, a: np.ndarray, b: np.ndarray, cost: np.ndarray, max_cost: float,
          method: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Matched pairs (a_idx, b_idx) of the min-cost partial one-to-one matching over candidate edges
    (a[m], b[m], cost[m]); edges costing max_cost or more are never used."""
    keep = cost < max_cost
    a, b, cost = a[keep].astype(np.int64), b[keep].astype(np.int64), cost[keep].astype(np.float64)
    if len(a) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if method == "auto":
        method = "dense" if n_a * n_b <= DENSE_LIMIT else "sparse"
    if method == "dense":
        return _dense(n_a, n_b, a, b, cost, max_cost)
    if method == "sparse":
        return _sparse(n_a, n_b, a, b, cost, max_cost)
    raise ValueError(f"unknown matching method {method!r}")


def _dense(n_a, n_b, a, b, cost, max_cost):
    big = 2.0 * max_cost + 1.0
    c = np.full((n_a, n_b + n_a), big)
    c[a, b] = cost
    c[np.arange(n_a), n_b + np.arange(n_a)] = max_cost
    rows, cols = linear_sum_assignment(c)
    real = cols < n_b
    rows, cols = rows[real], cols[real]
    ok = c[rows, cols] < max_cost
    return rows[ok], cols[ok]


def _sparse(n_a, n_b, a, b, cost, max_cost):
    u = max_cost / 2.0
    # rows: A latents 0..n_a-1, then dummies of B latents; cols: B latents 0..n_b-1, then dummies of A latents
    rows = np.concatenate([a, np.arange(n_a), n_a + np.arange(n_b), n_a + b])
    cols = np.concatenate([b, n_b + np.arange(n_a), np.arange(n_b), n_b + a])
    w = np.concatenate([cost, np.full(n_a, u), np.full(n_b, u), np.zeros(len(a))]) + 1.0
    graph = coo_matrix((w, (rows, cols)), shape=(n_a + n_b, n_b + n_a)).tocsr()
    r, c = min_weight_full_bipartite_matching(graph)
    real = (r < n_a) & (c < n_b)
    return r[real].astype(np.int64), c[real].astype(np.int64)
