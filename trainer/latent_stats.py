"""Running per-latent statistics of the shown activations, for every latent at once (float64)."""

from __future__ import annotations

import numpy as np
import torch


class RunningStats:
    """Per-latent count, power sums and max of the shown activations (float64)."""

    def __init__(self, d_sae: int, device):
        z = lambda dt: torch.zeros(d_sae, dtype=dt, device=device)
        self.count = z(torch.int64)
        self.s1, self.s2, self.s3, self.s4 = z(torch.float64), z(torch.float64), z(torch.float64), z(torch.float64)
        self.max = z(torch.float64)
        self.n_tokens = 0

    def update(self, latents: torch.Tensor, acts: torch.Tensor, n_tokens: int) -> None:
        a = acts.to(torch.float64)
        self.count.index_add_(0, latents, torch.ones_like(latents))
        a2 = a * a
        self.s1.index_add_(0, latents, a)
        self.s2.index_add_(0, latents, a2)
        self.s3.index_add_(0, latents, a2 * a)
        self.s4.index_add_(0, latents, a2 * a2)
        self.max.scatter_reduce_(0, latents, a, reduce="amax")
        self.n_tokens += n_tokens

    def state(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k).cpu().numpy() for k in ("count", "s1", "s2", "s3", "s4", "max")} | {
            "n_tokens": np.array(self.n_tokens)}

    def load(self, state) -> None:
        for k in ("count", "s1", "s2", "s3", "s4", "max"):
            getattr(self, k).copy_(torch.from_numpy(state[k]))
        self.n_tokens = int(state["n_tokens"])

    def moments(self) -> dict[str, np.ndarray]:
        c = self.count.double().clamp_min(1)
        mean, e2, e3, e4 = self.s1 / c, self.s2 / c, self.s3 / c, self.s4 / c
        var = (e2 - mean**2).clamp_min(0)
        std = var.sqrt()
        safe = std.clamp_min(1e-12)
        skew = (e3 - 3 * mean * e2 + 2 * mean**3) / safe**3
        kurt = (e4 - 4 * mean * e3 + 6 * mean**2 * e2 - 3 * mean**4) / safe**4
        few = self.count < 2
        skew[few] = 0.0
        kurt[few] = 0.0
        return {"mean": mean.cpu().numpy(), "e_a2": e2.cpu().numpy(), "std": std.cpu().numpy(),
                "skew": skew.cpu().numpy(), "kurtosis": kurt.cpu().numpy()}
