"""Synthetic activations with known ground truth: sparse non-negative mixtures of unit directions.

Used by the recovery test and benchmark: an SAE that works should find the true directions.
"""

from __future__ import annotations

import numpy as np
import torch


def superposition_data(n: int, d: int = 64, n_features: int = 256, mean_active: float = 6.0,
                       noise: float = 0.0, seed: int = 0, freq_ratio: float = 9.0,
                       magnitude_sigma: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """(activations [n, d] float32, true directions [n_features, d]).

    n_features > d unit directions in superposition; feature i fires independently with a
    probability that falls geometrically with i, the most frequent feature `freq_ratio` times as
    often as the rarest (the default 9 spans 3x to 1/3x the average, so some are rare), on average
    `mean_active` features per row; magnitudes are log-normal with median 1 and log-scale
    `magnitude_sigma` (varied scales); plus a fixed offset and optional isotropic noise.
    """
    if n_features <= 0 or d <= 0 or mean_active <= 0 or freq_ratio < 1:
        raise ValueError("superposition_data needs positive sizes, mean_active > 0 and freq_ratio >= 1")
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((n_features, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    base = np.geomspace(np.sqrt(freq_ratio), 1 / np.sqrt(freq_ratio), n_features)
    probs = np.minimum(base / base.sum() * mean_active, 1.0)
    out = np.empty((n, d), dtype=np.float32)
    offset = rng.standard_normal(d) * 0.5
    chunk = 65536
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        fire = rng.random((m, n_features)) < probs
        mags = rng.lognormal(mean=0.0, sigma=magnitude_sigma, size=(m, n_features)) * fire
        x = mags @ directions + offset
        if noise:
            x += rng.standard_normal((m, d)) * noise
        out[start:start + m] = x
    return out, directions.astype(np.float32)


def max_cosines(learned: torch.Tensor | np.ndarray, true: np.ndarray | torch.Tensor) -> torch.Tensor:
    """For each true direction [n_features], the best cosine with any learned decoder row."""
    learned = torch.as_tensor(learned, dtype=torch.float32).detach()
    true = torch.as_tensor(true, dtype=torch.float32)
    learned = learned / learned.norm(dim=1, keepdim=True).clamp_min(1e-8)
    true = true / true.norm(dim=1, keepdim=True)
    return (true @ learned.T).max(dim=1).values

