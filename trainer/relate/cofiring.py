"""Checking candidate pairs on data: Pearson correlation and co-firing rates, streamed.

For every latent: how often it fires (N_i), the sum and sum of squares of its activation. For
every candidate pair: how often both fire on the same token (N_ij) and the sum of a_i * a_j. From
these, over all N tokens (zeros included):

    rho_ij = cov(a_i, a_j) / (std a_i std a_j),   P(j | i) = N_ij / N_i,   P(i | j) = N_ij / N_j.

Only candidate pairs are counted: for each token and each of its active A latents, the activations
of that latent's candidate partners are read from B's codes (densified a block of tokens at a time),
so the cost is tokens x k_A x (candidates per latent) reads, and the memory one float64 pair of
counters per candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_DENSE_CELLS = 1 << 24  # tokens x F_B cells of B's activations densified at once (64 MiB of float32)


class PairStats:
    """Streaming statistics of the latents of A and B and of their candidate pairs. The pair lookups
    run in numpy on the CPU (per-element gathers and repeats are several times faster there than
    in torch's CPU kernels); codes on a GPU are copied over, which is cheap next to encoding them."""

    def __init__(self, n_a: int, n_b: int, a: np.ndarray, b: np.ndarray, device=None):
        self.n_a, self.n_b = n_a, n_b
        dev = device or torch.device("cpu")
        self.a, self.b = a.astype(np.int64), b.astype(np.int64)
        # candidate partners grouped by A latent (CSR): those of latent i are partner[start[i]:start[i] + degree[i]]
        self.order = np.lexsort((self.b, self.a))
        self.partner = self.b[self.order]
        self.degree = np.bincount(self.a, minlength=n_a)
        self.start = np.cumsum(self.degree) - self.degree
        self._dense = np.zeros((0, n_b), np.float32)  # B's activations of a block of tokens, all zero between uses
        z = lambda n: torch.zeros(n, dtype=torch.float64, device=dev)
        self.count_a, self.sum_a, self.sq_a = z(n_a), z(n_a), z(n_a)
        self.count_b, self.sum_b, self.sq_b = z(n_b), z(n_b), z(n_b)
        self.count_ab = np.zeros(len(a), np.float64)
        self.sum_ab = np.zeros(len(a), np.float64)
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
        """Codes of the same n tokens: values and indices [n, k_A] of A and [n, k_B] of B.

        Per block of tokens, B's activations are written into a dense [tokens, F_B] array; every
        (token, active A latent) then reads its candidate partners' activations from it."""
        dev = self.count_a.device
        self.tokens += va.shape[0]
        self._latents(self.count_a, self.sum_a, self.sq_a, va.to(dev).float(), ia.to(dev).long())
        self._latents(self.count_b, self.sum_b, self.sq_b, vb.to(dev).float(), ib.to(dev).long())
        if not len(self.a):
            return
        va, ia = va.float().clamp_min(0).cpu().numpy(), ia.long().cpu().numpy()
        vb, ib = vb.float().clamp_min(0).cpu().numpy(), ib.long().cpu().numpy()
        step = max(1, _DENSE_CELLS // self.n_b)
        if self._dense.shape[0] < min(step, va.shape[0]):
            self._dense = np.zeros((min(step, va.shape[0]), self.n_b), np.float32)
        slots, prods = [], []
        for s in range(0, va.shape[0], step):
            a_v, a_i, b_v, b_i = va[s:s + step], ia[s:s + step], vb[s:s + step], ib[s:s + step]
            rows = np.arange(a_v.shape[0])[:, None]
            dense = self._dense
            dense[rows, b_i] = b_v
            row, col = np.nonzero(a_v > 0)
            lat, val = a_i[row, col], a_v[row, col]
            deg = self.degree[lat]
            total = int(deg.sum())
            if total:
                which = np.repeat(np.arange(len(lat)), deg)  # the (token, A latent) of each lookup
                pos = np.arange(total) - np.repeat(np.cumsum(deg) - deg, deg) + self.start[lat][which]
                w = dense[row[which], self.partner[pos]]
                hit = w > 0
                slots.append(self.order[pos[hit]])
                prods.append(val[which[hit]].astype(np.float64) * w[hit])
            dense[rows, b_i] = 0.0  # back to all zeros for the next block
        if slots:
            slot = np.concatenate(slots)
            self.count_ab += np.bincount(slot, minlength=len(self.a))
            self.sum_ab += np.bincount(slot, weights=np.concatenate(prods), minlength=len(self.a))

    def result(self) -> dict[str, np.ndarray]:
        """Per candidate pair, in the order the candidates were given: n_ab, rho, p_b_given_a,
        p_a_given_b; and per latent of each SAE its firing count."""
        n = max(self.tokens, 1)
        a, b = self.a, self.b
        count_a, count_b = self.count_a.cpu().numpy(), self.count_b.cpu().numpy()
        mean_a, mean_b = self.sum_a.cpu().numpy() / n, self.sum_b.cpu().numpy() / n
        var_a = np.clip(self.sq_a.cpu().numpy() / n - mean_a**2, 0, None)
        var_b = np.clip(self.sq_b.cpu().numpy() / n - mean_b**2, 0, None)
        cov = self.sum_ab / n - mean_a[a] * mean_b[b]
        den = np.sqrt(var_a[a] * var_b[b])
        with np.errstate(divide="ignore", invalid="ignore"):
            rho = np.where(den > 0, cov / np.where(den > 0, den, 1.0), 0.0)
            p_ba = np.where(count_a[a] > 0, self.count_ab / np.maximum(count_a[a], 1), 0.0)
            p_ab = np.where(count_b[b] > 0, self.count_ab / np.maximum(count_b[b], 1), 0.0)
        return {"n_ab": self.count_ab.copy(), "rho": np.clip(rho, -1, 1), "p_b_given_a": p_ba, "p_a_given_b": p_ab,
                "count_a": count_a, "count_b": count_b, "tokens": self.tokens}


def cofiring_pairs(codes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]], n_a: int, n_b: int,
                   min_share: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j) where A's latent i fires on at least `min_share` of the tokens where B's latent j
    fires, from the codes (values and indices of A, then of B) of a sample of tokens; each j keeps
    its k most frequent partners. These are the candidates no decoder cosine proposes: a child
    whose direction is unrelated to its parent's (on SAELens's hierarchical synthetic data the
    children's directions are drawn independently of their parents'). Counts come from one sparse
    product A^T B of the binary firing matrices (scipy), so the cost is the co-firing pairs seen."""
    from scipy.sparse import csr_matrix

    def firing(values, indices, n):
        v, i = torch.cat(values).float().cpu().numpy(), torch.cat(indices).long().cpu().numpy()
        rows, cols = np.nonzero(v > 0)
        return csr_matrix((np.ones(len(rows), np.float32), (rows, i[rows, cols])), shape=(v.shape[0], n))

    if not codes:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    fa = firing([c[0] for c in codes], [c[1] for c in codes], n_a)
    fb = firing([c[2] for c in codes], [c[3] for c in codes], n_b)
    fa.sum_duplicates()
    fb.sum_duplicates()
    both = (fa.T @ fb).tocoo()  # [F_A, F_B] co-firing counts of the pairs that co-fire at all
    fires_b = np.asarray(fb.sum(0)).ravel()
    keep = both.data >= min_share * fires_b[both.col]
    a, b, n = both.row[keep].astype(np.int64), both.col[keep].astype(np.int64), both.data[keep]
    order = np.lexsort((-n, b))  # by child, most co-firings first
    a, b = a[order], b[order]
    rank = np.arange(len(b)) - np.searchsorted(b, b)  # position within its child's list
    top = rank < k
    return a[top], b[top]


# --- co-firing within one SAE ----------------------------------------------------------------------

_COUNT_CELLS = 1 << 25  # cells of one block of the co-occurrence matrix (128 MiB of int32 counts, as much of float32 lift)


def _token_rows(tok: np.ndarray) -> np.ndarray:
    """0-based row per entry, one row per distinct token: a running count when the entries come in
    token order (the analysis shards do), else np.unique."""
    tok = np.asarray(tok)
    step = tok[1:] != tok[:-1]
    if len(tok) and (tok[1:] >= tok[:-1]).all():
        return np.concatenate([[0], np.cumsum(step)])
    return np.unique(tok, return_inverse=True)[1].ravel()


def cooccurrence_blocks(codes, n_latents: int, cells: int = _COUNT_CELLS, dtype=np.int64):
    """Exact co-occurrence counts N_ij (tokens on which latents i and j both fire) of one SAE, a block
    of rows at a time: yields (first row, int64 array [rows, n_latents]); the diagonal holds N_i.

    codes() returns a fresh iterator of (token ids, latent ids) pairs, one entry per active latent of a
    token (the analysis shards). Each block is a dense [rows, n_latents] array of at most `cells`
    cells, so memory is bounded whatever the width; a wide SAE re-reads the codes once per block.
    Per chunk of codes the counts are AᵀA of its sparse token x latent incidence matrix A.
    dtype: of the counts; int32 halves the memory where no pair can fire together 2^31 times."""
    from scipy import sparse

    rows = max(1, min(n_latents, cells // max(n_latents, 1)))
    for first in range(0, n_latents, rows):
        last = min(n_latents, first + rows)
        acc = np.zeros((last - first, n_latents), dtype)
        for tok, lat in codes():
            if len(tok) == 0:
                continue
            row = _token_rows(tok)
            a = sparse.csr_matrix((np.ones(len(lat), np.int32), (row, np.asarray(lat, np.int64))),
                                  shape=(int(row.max()) + 1, n_latents))
            block = a[:, first:last] if (first, last) != (0, n_latents) else a
            c = (block.T @ a).tocoo()
            acc[c.row, c.col] += c.data  # one entry per (i, j): no repeated indices
        yield first, acc


@dataclass
class Partners:
    """Each latent's co-firing partners within its SAE, best first (padding: id -1, count 0)."""

    ids: np.ndarray
    """[F, m] int32 partner latents, by decreasing lift."""
    n_ij: np.ndarray
    """[F, m] int64 tokens on which the latent and the partner both fire."""
    counts: np.ndarray
    """[F] int64 tokens on which each latent fires (N_i)."""
    n_tokens: int
    """Tokens counted (N)."""

    def stats(self, i: int) -> list[tuple[int, int, float, float, float]]:
        """(j, N_ij, P(j | i), P(i | j), lift) of latent i's partners."""
        out = []
        for j, nij in zip(self.ids[i].tolist(), self.n_ij[i].tolist()):
            if j < 0:
                break
            ni, nj = int(self.counts[i]), int(self.counts[j])
            out.append((j, nij, nij / ni, nij / nj, nij * self.n_tokens / (ni * nj)))
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        return {"cofire_ids": self.ids, "cofire_n": self.n_ij, "cofire_counts": self.counts,
                "cofire_tokens": np.array(self.n_tokens)}

    @classmethod
    def from_arrays(cls, z) -> Partners:
        return cls(z["cofire_ids"], z["cofire_n"], z["cofire_counts"], int(z["cofire_tokens"]))


def cofiring_partners(codes, n_latents: int, n_tokens: int, m: int = 16, min_count: int = 5,
                      counts: np.ndarray | None = None, cells: int = _COUNT_CELLS) -> Partners:
    """For every latent i, the m latents j that co-fire with it most beyond chance:

        lift_ij = P(i, j) / (P(i) P(j)) = N_ij N / (N_i N_j),   P(j | i) = N_ij / N_i,

    over N tokens, keeping pairs with N_ij >= min_count (rarer pairs make lift noise) and lift > 1
    (more often together than independent latents would be), ranked by lift, ties by N_ij.
    counts: N_i when the caller has them (the analysis's running statistics); else one more pass."""
    if m <= 0 or min_count < 1:
        raise ValueError("m must be positive and min_count at least 1")
    ids = np.full((n_latents, m), -1, np.int32)
    nij = np.zeros((n_latents, m), np.int64)
    if counts is None:
        counts = np.zeros(n_latents, np.int64)
        for tok, lat in codes():
            counts += np.bincount(np.asarray(lat, np.int64), minlength=n_latents)
    counts = np.asarray(counts, np.int64)
    small = np.int32 if n_tokens < 2**31 else np.int64
    for first, acc in cooccurrence_blocks(codes, n_latents, cells, small):
        r = np.arange(acc.shape[0])
        acc[r, first + r] = 0  # not its own partner
        # only the pairs frequent enough to qualify: far fewer than rows x latents
        rr, cc = np.nonzero(acc >= min_count)
        nn = acc[rr, cc].astype(np.int64)
        lift = nn * float(n_tokens) / (counts[first + rr].astype(np.float64) * counts[cc])
        ok = lift > 1
        rr, cc, nn, lift = rr[ok], cc[ok], nn[ok], lift[ok]
        order = np.lexsort((-nn, -lift, rr))  # per row: lift, then N_ij
        rr, cc, nn = rr[order], cc[order], nn[order]
        rank = np.arange(len(rr)) - np.searchsorted(rr, rr)  # place within its row
        top = rank < m
        ids[first + rr[top], rank[top]] = cc[top]
        nij[first + rr[top], rank[top]] = nn[top]
    return Partners(ids, nij, counts, int(n_tokens))
