"""Synthetic activations with known ground truth: sparse non-negative mixtures of unit directions.

Used by the recovery test and benchmark: an SAE that works should find the true directions.
"""

from __future__ import annotations

import numpy as np
import torch


def superposition_data(n: int, d: int = 64, n_features: int = 256, mean_active: float = 6.0,
                       noise: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(activations [n, d] float32, true directions [n_features, d]).

    n_features > d unit directions in superposition; feature i fires independently with a
    probability that falls with i (from 3x to 1/3x the average, so some are rare), with a
    magnitude drawn from a log-normal distribution (varied scales), plus a fixed offset.
    """
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((n_features, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    base = np.geomspace(3.0, 1 / 3, n_features)
    probs = base / base.sum() * mean_active
    out = np.empty((n, d), dtype=np.float32)
    offset = rng.standard_normal(d) * 0.5
    chunk = 65536
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        fire = rng.random((m, n_features)) < probs
        mags = rng.lognormal(mean=0.0, sigma=0.4, size=(m, n_features)) * fire
        x = mags @ directions + offset
        if noise:
            x += rng.standard_normal((m, d)) * noise
        out[start:start + m] = x
    return out, directions.astype(np.float32)


def mean_max_cosine(learned: torch.Tensor, true: np.ndarray | torch.Tensor) -> float:
    """For each true direction, the best cosine with a learned decoder row; averaged."""
    learned = torch.as_tensor(learned, dtype=torch.float32)
    true = torch.as_tensor(true, dtype=torch.float32)
    learned = learned / learned.norm(dim=1, keepdim=True).clamp_min(1e-8)
    true = true / true.norm(dim=1, keepdim=True)
    return float((true @ learned.T).max(dim=1).values.mean())
