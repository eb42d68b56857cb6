"""Checking candidate pairs on data: Pearson correlation and co-firing rates, streamed.

For every latent: how often it fires (N_i), the sum and sum of squares of its activation. For
every candidate pair: how often both fire on the same token (N_ij) and the sum of a_i * a_j. From
these, over all N tokens (zeros included):

    rho_ij = cov(a_i, a_j) / (std a_i std a_j),   P(j | i) = N_ij / N_i,   P(i | j) = N_ij / N_j.

Only candidate pairs are counted: each token's (active A latent, active B latent) pairs are looked
up in the sorted candidate keys (a binary search), so the cost is tokens x k_A x k_B lookups and the
memory is one float64 pair of counters per candidate.
"""

from __future__ import annotations

import numpy as np
import torch

_PAIRS_PER_STEP = 1 << 22  # token x slot x slot products handled at once (bounds memory)


class PairStats:
    def __init__(self, n_a: int, n_b: int, a: np.ndarray, b: np.ndarray, device=None):
        self.n_a, self.n_b = n_a, n_b
        dev = device or torch.device("cpu")
        keys = torch.from_numpy(a.astype(np.int64) * n_b + b.astype(np.int64)).to(dev)
        self.keys, self.order = torch.sort(keys)
        z = lambda n: torch.zeros(n, dtype=torch.float64, device=dev)
        self.count_a, self.sum_a, self.sq_a = z(n_a), z(n_a), z(n_a)
        self.count_b, self.sum_b, self.sq_b = z(n_b), z(n_b), z(n_b)
        self.count_ab, self.sum_ab = z(len(a)), z(len(a))
        self.tokens = 0

    @staticmethod
    def _latents(count, total, sq, values, indices):
        active = values > 0
        idx, v = indices[active], values[active].double()
        count.index_add_(0, idx, torch.ones_like(v))
        total.index_add_(0, idx, v)
        sq.index_add_(0, idx, v * v)

    @torch.no_grad()
    def update(self, va: torch.Tensor, ia: torch.Tensor, vb: torch.Tensor, ib: torch.Tensor) -> None:
        """Codes of the same n tokens: values and indices [n, k_A] of A and [n, k_B] of B."""
        dev = self.keys.device
        va, ia, vb, ib = va.to(dev).float(), ia.to(dev).long(), vb.to(dev).float(), ib.to(dev).long()
        self.tokens += va.shape[0]
        self._latents(self.count_a, self.sum_a, self.sq_a, va, ia)
        self._latents(self.count_b, self.sum_b, self.sq_b, vb, ib)
        if not len(self.keys):
            return
        step = max(1, _PAIRS_PER_STEP // max(1, va.shape[1] * vb.shape[1]))
        for s in range(0, va.shape[0], step):
            a_v, a_i, b_v, b_i = va[s:s + step], ia[s:s + step], vb[s:s + step], ib[s:s + step]
            both = (a_v > 0)[:, :, None] & (b_v > 0)[:, None, :]
            keys = (a_i[:, :, None] * self.n_b + b_i[:, None, :])[both]
            prod = (a_v[:, :, None] * b_v[:, None, :])[both]
            pos = torch.searchsorted(self.keys, keys).clamp_max(len(self.keys) - 1)
            hit = self.keys[pos] == keys
            pos = pos[hit]
            self.count_ab.index_add_(0, pos, torch.ones_like(pos, dtype=torch.float64))
            self.sum_ab.index_add_(0, pos, prod[hit].double())

    def result(self) -> dict[str, np.ndarray]:
        """Per candidate pair, in the order the candidates were given: n_ab, rho, p_b_given_a,
        p_a_given_b; and per latent of each SAE its firing count."""
        n = max(self.tokens, 1)
        inv = torch.empty_like(self.order)
        inv[self.order] = torch.arange(len(self.order), device=self.order.device)
        count_ab, sum_ab = self.count_ab[inv], self.sum_ab[inv]
        a = (self.keys[inv] // self.n_b)
        b = (self.keys[inv] % self.n_b)
        mean_a, mean_b = self.sum_a / n, self.sum_b / n
        var_a = (self.sq_a / n - mean_a**2).clamp_min(0)
        var_b = (self.sq_b / n - mean_b**2).clamp_min(0)
        cov = sum_ab / n - mean_a[a] * mean_b[b]
        den = (var_a[a] * var_b[b]).sqrt()
        rho = torch.where(den > 0, cov / den.clamp_min(1e-300), torch.zeros_like(cov))
        ca, cb = self.count_a[a], self.count_b[b]
        return {
            "n_ab": count_ab.cpu().numpy(), "rho": rho.clamp(-1, 1).cpu().numpy(),
            "p_b_given_a": torch.where(ca > 0, count_ab / ca.clamp_min(1), torch.zeros_like(ca)).cpu().numpy(),
            "p_a_given_b": torch.where(cb > 0, count_ab / cb.clamp_min(1), torch.zeros_like(cb)).cpu().numpy(),
            "count_a": self.count_a.cpu().numpy(), "count_b": self.count_b.cpu().numpy(), "tokens": self.tokens,
        }
