"""Streaming per-group top-m selection, vectorised, exact, and with memory bounded by groups x m.

Used by the analysis for every latent at once: the top activations (one per document), the
examples sampled from each activation interval, and the uniform random sample of positive
activations (the m smallest of a hash-derived uniform key is a uniform sample without
replacement). Ties are broken by the smaller token id, so results do not depend on shard order.
"""

from __future__ import annotations

import torch

# A 24-bit uniform key per (token, latent): a fixed integer hash, reproducible anywhere.
_M32 = 0xFFFFFFFF


def uniform_key(token: torch.Tensor, latent: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Deterministic pseudo-random numbers in [0, 1) for (token id, latent) pairs."""
    h = (token.to(torch.int64) & _M32) ^ ((latent.to(torch.int64) * 0x27D4EB2F + seed * 0x165667B1) & _M32)
    for _ in range(3):
        h = ((h ^ (h >> 15)) * 0x2C1B3C6D) & _M32
        h = ((h ^ (h >> 12)) * 0x297A2D39) & _M32
    h = h ^ (h >> 15)
    return (h & 0xFFFFFF).to(torch.float64) / float(1 << 24)


class TopPerGroup:
    """Keeps, for each of `groups` groups, the m entries with the largest key.

    Entries carry a token id (the payload) and optionally a document id; with dedupe=True each
    group keeps at most one entry per document (its best). Add batches with update(); the state
    is torch tensors on `device` and can be saved with state()/load().
    """

    def __init__(self, groups: int, m: int, dedupe: bool = False, device: torch.device | str = "cpu"):
        self.groups, self.m, self.dedupe = groups, m, dedupe
        self.key = torch.full((groups, m), float("-inf"), dtype=torch.float64, device=device)
        self.token = torch.full((groups, m), -1, dtype=torch.int64, device=device)
        self.doc = torch.full((groups, m), -1, dtype=torch.int64, device=device)

    def threshold(self) -> torch.Tensor:
        """The smallest key a new entry must beat to enter each group (-inf while not full)."""
        return self.key.min(dim=1).values

    def update(self, group: torch.Tensor, key: torch.Tensor, token: torch.Tensor, doc: torch.Tensor | None = None) -> None:
        if group.numel() == 0:
            return
        key = key.to(torch.float64)
        # Entries that cannot enter their group are dropped first: after warm-up this keeps
        # the sort below small. (>= keeps ties, resolved by token id below.)
        # With dedupe this stays exact: a document already held can only improve by beating its
        # own entry, which is at least the group's threshold.
        keep = key >= self.threshold()[group]
        group, key, token = group[keep], key[keep], token[keep]
        doc = doc[keep] if doc is not None else torch.full_like(token, -1)
        if group.numel() == 0:
            return
        filled = self.token >= 0
        g_all = torch.cat([torch.nonzero(filled)[:, 0], group])
        k_all = torch.cat([self.key[filled], key])
        t_all = torch.cat([self.token[filled], token])
        d_all = torch.cat([self.doc[filled], doc])
        if self.dedupe:
            order = _lexsort([t_all, -k_all, d_all, g_all])
            g_all, k_all, t_all, d_all = g_all[order], k_all[order], t_all[order], d_all[order]
            first = torch.ones_like(g_all, dtype=torch.bool)
            first[1:] = (g_all[1:] != g_all[:-1]) | (d_all[1:] != d_all[:-1]) | (d_all[1:] < 0)
            g_all, k_all, t_all, d_all = g_all[first], k_all[first], t_all[first], d_all[first]
        order = _lexsort([t_all, -k_all, g_all])
        g_all, k_all, t_all, d_all = g_all[order], k_all[order], t_all[order], d_all[order]
        starts = torch.searchsorted(g_all, torch.arange(self.groups, device=g_all.device))
        rank = torch.arange(g_all.numel(), device=g_all.device) - starts[g_all]
        sel = rank < self.m
        g_sel, r_sel = g_all[sel], rank[sel]
        self.key.fill_(float("-inf"))
        self.token.fill_(-1)
        self.doc.fill_(-1)
        self.key[g_sel, r_sel] = k_all[sel]
        self.token[g_sel, r_sel] = t_all[sel]
        self.doc[g_sel, r_sel] = d_all[sel]

    def state(self) -> dict[str, torch.Tensor]:
        return {"key": self.key.cpu(), "token": self.token.cpu(), "doc": self.doc.cpu()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.key.copy_(state["key"])
        self.token.copy_(state["token"])
        self.doc.copy_(state["doc"])


def _lexsort(keys: list[torch.Tensor]) -> torch.Tensor:
    """Indices that sort by keys[-1], then keys[-2], ... (like numpy.lexsort), stable."""
    order = torch.argsort(keys[0], stable=True)
    for k in keys[1:]:
        order = order[torch.argsort(k[order], stable=True)]
    return order
