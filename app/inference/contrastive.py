"""Contrastive search: which latents tell two sets of texts apart, with honest statistics.

Each text is pooled to g_i = its max activation of latent i over its tokens (BOS and attention
sinks excluded, as in the analysis). For every latent of every SAE:

- AUROC_i = U_i / (|A| |B|), U_i the Mann-Whitney statistic of set A (ties count 1/2), from
  scipy.stats.mannwhitneyu, vectorised over latents, with its two-sided asymptotic p-value
  (normal approximation with the tie correction and a continuity correction);
- Cohen's d = (mean_A - mean_B) / pooled standard deviation (None when both sets are constant
  but differ, where d is infinite);
- densities: the share of texts of each set on which the latent fires at all;
- q-values by Benjamini-Hochberg (scipy.stats.false_discovery_control) over all latents of all
  SAEs. A latent that is constant over both sets (most often: never fires) has no evidence
  either way and enters with p = 1, so the correction counts every latent that was tested.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import false_discovery_control, mannwhitneyu


@dataclass
class ContrastStats:
    """Per-latent statistics, all of shape [F] (the latents of every SAE, concatenated)."""

    auroc: np.ndarray
    u: np.ndarray
    p: np.ndarray
    q: np.ndarray
    cohens_d: np.ndarray  # NaN where undefined (both sets constant and different)
    mean_a: np.ndarray
    mean_b: np.ndarray
    density_a: np.ndarray
    density_b: np.ndarray

    @property
    def n_tests(self) -> int:
        return len(self.p)


def contrast(a: np.ndarray, b: np.ndarray) -> ContrastStats:
    """a [n_a, F] and b [n_b, F]: pooled activations of the two sets."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    n_a, n_b = a.shape[0], b.shape[0]
    if n_a < 2 or n_b < 2:
        raise ValueError("each set needs at least two texts")
    F = a.shape[1]
    both = np.concatenate([a, b])
    varies = both.max(0) > both.min(0)
    u = np.full(F, n_a * n_b / 2.0)
    p = np.ones(F)
    if varies.any():
        res = mannwhitneyu(a[:, varies], b[:, varies], alternative="two-sided", method="asymptotic",
                           use_continuity=True, axis=0)
        u[varies] = res.statistic
        p[varies] = np.nan_to_num(res.pvalue, nan=1.0)
    p = np.clip(p, 0.0, 1.0)
    q = false_discovery_control(p, method="bh")
    mean_a, mean_b = a.mean(0), b.mean(0)
    var_a, var_b = a.var(0, ddof=1), b.var(0, ddof=1)
    pooled = np.sqrt(((n_a - 1) * var_a + (n_b - 1) * var_b) / (n_a + n_b - 2))
    diff = mean_a - mean_b
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(pooled > 0, diff / np.where(pooled > 0, pooled, 1.0), np.where(diff == 0, 0.0, np.nan))
    return ContrastStats(auroc=u / (n_a * n_b), u=u, p=p, q=q, cohens_d=d, mean_a=mean_a, mean_b=mean_b,
                         density_a=(a > 0).mean(0), density_b=(b > 0).mean(0))


def rank(stats: ContrastStats, direction: str = "both", allowed: np.ndarray | None = None, limit: int = 50) -> np.ndarray:
    """Indices of the latents to show, best first: smallest q, then the largest |AUROC - 1/2|, then |d|.
    direction a keeps latents more active in set A (AUROC > 1/2), b those more active in B;
    `allowed` [F] bool filters (e.g. by the analysed density)."""
    keep = stats.auroc != 0.5
    if direction == "a":
        keep &= stats.auroc > 0.5
    elif direction == "b":
        keep &= stats.auroc < 0.5
    if allowed is not None:
        keep &= allowed
    idx = np.flatnonzero(keep)
    if not idx.size:
        return idx
    d = np.nan_to_num(np.abs(stats.cohens_d[idx]), nan=np.inf)
    order = np.lexsort((-d, -np.abs(stats.auroc[idx] - 0.5), stats.q[idx]))
    return idx[order[:limit]]
