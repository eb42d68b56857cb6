"""Multi-dimensional features (Engels et al. 2024, "Not All Language Model Features Are Linear").

A group is a set of latents whose decoder directions are mutually similar and which co-fire beyond
chance: together they may tile one low-rank feature (days of the week on a circle) that the SAE
cut into pieces. For each group the analysis reconstructs the activations from the group's latents
only, x̂_G(t) = Σ_{i∈G} a_i(t) d̂_i on the tokens where any of them fires (a_i: the activation
shown to users, d̂_i: the unit decoder direction), projects them onto their top two principal
components, and measures how irreducible that 2-D distribution is with the paper's two indices
(separability_index, mixture_index). Everything here works on arrays, so tests can feed it planted
data; trainer/analyze.py feeds it the analysis shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainer.relate.cofiring import Partners


@dataclass
class GroupConfig:
    """How groups are found and measured (defaults suit SAEs of a few thousand to 100k latents)."""

    min_cos: float = 0.0
    """Two latents are linked only if their decoder directions have at least this cosine similarity
    (not pointing apart: a circle tiled by four latents has neighbours at 90 degrees) ..."""
    min_lift: float = 2.0
    """... they co-fire at least this many times more often than independent latents would ..."""
    min_share: float = 0.2
    """... and one fires on at least this share of the other's tokens (max of P(j | i), P(i | j)):
    pieces of one feature fire together often, not just more often than chance."""
    cos_alone: float | None = None
    """Also link latents whose decoder directions have at least this cosine similarity, whether or not
    they co-fire (how Engels et al. cluster a dictionary: the days of the week never fire on one token,
    yet their directions share a plane). Uses the analysis's decoder-cosine neighbours. None: off, the
    default: on the planted circle of tests/test_structure.py a trained SAE's circle latents are 0.4-0.6
    similar to latents of unrelated features, which these links pull into the circle's group; on the
    demo's SAEs it changed the groups found by at most one (benchmarks/structure_groups.py)."""
    min_size: int = 2
    """Smallest group (latents)."""
    max_size: int = 12
    """Largest group: bigger connected sets are split by Leiden community detection, again and again
    until every part fits (a part that cannot be split is dropped)."""
    max_groups: int = 200
    """Groups measured per SAE (those whose latents fire most, so their scatters have the most data)."""
    max_points: int = 1500
    """Tokens sampled (uniformly, by a hash of the token) per group for the PCA and the indices."""
    scatter_points: int = 400
    """Points of each group's scatter kept for its page."""
    epsilon: float = 0.1
    """ε of the mixture index (the paper's value)."""
    mi_bins: int = 12
    """Bins per axis of the histogram that estimates mutual information for the separability index."""
    angles: int = 90
    """Rotations tried by each index (θ on a regular grid)."""
    seed: int = 0
    """Seed of the token sample and of Leiden."""

    def validate(self) -> None:
        if not (-1 <= self.min_cos <= 1 and self.min_lift > 0 and 2 <= self.min_size <= self.max_size
                and self.max_groups >= 0 and self.max_points >= 10 and self.scatter_points >= 1
                and 0 <= self.min_share <= 1 and 0 < self.epsilon < 1 and self.mi_bins >= 2 and self.angles >= 4
                and (self.cos_alone is None or -1 <= self.cos_alone <= 1)):
            raise ValueError(f"invalid group settings {self}")


def find_groups(directions: np.ndarray, partners: Partners, cfg: GroupConfig,
                neighbors: tuple[np.ndarray, np.ndarray] | None = None) -> list[np.ndarray]:
    """Groups of latents linked by edges between co-firing partners (cosine >= min_cos, lift >= min_lift,
    max(P(j | i), P(i | j)) >= min_share) and, with cfg.cos_alone, between decoder-cosine neighbours
    (neighbors: the analysis's [F, k] neighbor_ids and neighbor_cos) at cosine >= cos_alone: the
    connected sets of min_size..max_size latents, larger sets split by Leiden on the cosine-weighted
    edges (shifted to stay positive). Returns sorted latent arrays, the most firing groups first."""
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components

    cfg.validate()
    F = directions.shape[0]
    d = directions / np.maximum(np.linalg.norm(directions, axis=1, keepdims=True), 1e-12)
    i, slot = np.nonzero(partners.ids >= 0)
    j = partners.ids[i, slot].astype(np.int64)
    n = partners.n_ij[i, slot].astype(np.float64)
    ci, cj = partners.counts[i].astype(np.float64), partners.counts[j].astype(np.float64)
    lift = n * partners.n_tokens / np.maximum(ci * cj, 1)
    share = n / np.maximum(np.minimum(ci, cj), 1)
    cos = np.einsum("ij,ij->i", d[i], d[j]) if len(i) else np.zeros(0)
    keep = (lift >= cfg.min_lift) & (share >= cfg.min_share) & (cos >= cfg.min_cos)
    i, j, cos = i[keep], j[keep], cos[keep]
    if cfg.cos_alone is not None:
        if neighbors is None:
            raise ValueError("cos_alone needs the decoder-cosine neighbours (neighbor_ids, neighbor_cos)")
        n_ids, n_cos = neighbors
        ni, slot = np.nonzero((n_cos >= cfg.cos_alone) & (n_ids >= 0))
        live = partners.counts > 0  # a latent that never fired has no reconstruction to measure
        nj = n_ids[ni, slot].astype(np.int64)
        ok = live[ni] & live[nj]
        i, j, cos = np.concatenate([i, ni[ok]]), np.concatenate([j, nj[ok]]), np.concatenate([cos, n_cos[ni, slot][ok]])
    adj = sparse.coo_matrix((1.0 + cos, (i, j)), shape=(F, F)).tocsr()  # weights > 0 even at cos 0
    adj = adj.maximum(adj.T)
    _, label = connected_components(adj, directed=False)
    sizes = np.bincount(label)
    groups: list[np.ndarray] = []
    for comp in np.nonzero(sizes >= cfg.min_size)[0]:
        members = np.nonzero(label == comp)[0]
        groups += _split_to_size(adj, members, cfg)
    groups.sort(key=lambda g: (-int(partners.counts[g].sum()), int(g[0])))
    return [np.sort(g) for g in groups[:cfg.max_groups]]


def _split_to_size(adj, members: np.ndarray, cfg: GroupConfig, depth: int = 0) -> list[np.ndarray]:
    """`members` if it has min_size..max_size latents; a larger set is split by Leiden and each part
    split again until it fits (a co-firing graph of thousands of latents is one component, and one
    round of modularity leaves communities of hundreds). A part Leiden cannot split is dropped."""
    if len(members) < cfg.min_size:
        return []
    if len(members) <= cfg.max_size:
        return [members]
    parts = _leiden_split(adj[members][:, members], cfg.seed)
    if len(parts) < 2 or depth >= 8:
        return []
    return [g for part in parts for g in _split_to_size(adj, members[part], cfg, depth + 1)]


def _leiden_split(adj, seed: int) -> list[np.ndarray]:
    import igraph as ig
    import leidenalg

    coo = adj.tocoo()
    upper = coo.row < coo.col
    g = ig.Graph(n=adj.shape[0], edges=list(zip(coo.row[upper].tolist(), coo.col[upper].tolist())))
    part = leidenalg.find_partition(g, leidenalg.ModularityVertexPartition, weights=coo.data[upper].tolist(), seed=seed)
    membership = np.asarray(part.membership)
    return [np.nonzero(membership == c)[0] for c in range(membership.max() + 1)]


def token_hash(tok: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per token id (splitmix64): the same token gets the same number in
    every shard and for every latent, so a group's sample keeps whole tokens."""
    with np.errstate(over="ignore"):
        z = np.asarray(tok, np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


def collect_group_codes(groups: list[np.ndarray], n_latents: int, counts: np.ndarray, codes, cfg: GroupConfig):
    """Each group's sampled tokens: a list of (coefficients [n, |G|], token ids [n]) where
    coefficients[t, m] is the activation of the group's m-th latent on its t-th sampled token.

    codes() yields (token index, latent, activation, vocabulary id of the token) per active latent.
    Each group keeps the tokens whose hash falls below max_points / (its latents' firings), so
    memory stays near max_points per group whatever the number of tokens."""
    member = np.full(n_latents, -1, np.int64)
    pos = np.zeros(n_latents, np.int64)
    for g, lat in enumerate(groups):
        member[lat] = g
        pos[lat] = np.arange(len(lat))
    rate = np.array([min(1.0, cfg.max_points / max(int(counts[g].sum()), 1)) for g in groups] + [0.0])
    parts = []
    for tok, lat, act, vocab_id in codes():
        g = member[np.asarray(lat, np.int64)]
        sel = g >= 0
        if not sel.any():
            continue
        t, g = np.asarray(tok, np.int64)[sel], g[sel]
        keep = token_hash(t, cfg.seed) < rate[g]
        parts.append((g[keep], t[keep], pos[np.asarray(lat, np.int64)[sel][keep]],
                      np.asarray(act, np.float64)[sel][keep], np.asarray(vocab_id, np.int64)[sel][keep]))
    out = []
    cat = [np.concatenate(x) for x in zip(*parts)] if parts else [np.zeros(0, np.int64)] * 5
    g_all, t_all, p_all, a_all, v_all = cat
    order = np.argsort(g_all, kind="stable")
    bounds = np.searchsorted(g_all[order], np.arange(len(groups) + 1))
    for g, lat in enumerate(groups):
        idx = order[bounds[g]:bounds[g + 1]]
        uniq, row = np.unique(t_all[idx], return_inverse=True)
        coef = np.zeros((len(uniq), len(lat)))
        coef[row, p_all[idx]] = a_all[idx]
        vid = np.zeros(len(uniq), np.int64)
        vid[row] = v_all[idx]
        out.append((coef, vid))
    return out


def project(directions: np.ndarray, coef: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The group reconstructions x̂(t) = Σ_m coef[t, m] d̂_m projected onto their top two principal
    components: (points [n, 2], share of the variance each of the top components explains).

    x̂ lives in the span of the group's directions, so PCA runs on coordinates in an orthonormal
    basis of that span (x̂ = Q R coefᵀ with D̂ᵀ = QR): the same geometry in |G| instead of D dimensions."""
    d = directions / np.maximum(np.linalg.norm(directions, axis=1, keepdims=True), 1e-12)
    _, r = np.linalg.qr(d.T.astype(np.float64))
    y = coef @ r.T
    y = y - y.mean(0)
    if len(y) < 2:
        return np.zeros((len(y), 2)), np.zeros(2)
    _, s, vt = np.linalg.svd(y, full_matrices=False)
    pts = y @ vt[:2].T
    var = s**2
    share = var[:2] / max(var.sum(), 1e-30)
    if pts.shape[1] < 2:  # a group of one direction (cannot happen with min_size 2, but stay 2-D)
        pts, share = np.pad(pts, ((0, 0), (0, 2 - pts.shape[1]))), np.pad(share, (0, 2 - len(share)))
    return pts, share


def separability_index(points: np.ndarray, bins: int = 12, angles: int = 90) -> float:
    """Engels et al.'s separability index of a 2-D feature f, in bits:

        S(f) = min_θ I(a; b),   (a, b) = R_θ f̃,

    the smallest mutual information between the two coordinates over all rotations R_θ of f̃, f
    normalised to zero mean and unit variance along each axis (f is given in its principal axes,
    so this is whitening). A separable feature — a product of two independent 1-D features — has
    S ≈ 0 at the right angle; a circle has the same, large I at every angle. Rotations by π/2 only
    swap and negate the coordinates, so θ runs over [0, π/2) on a grid of `angles`. I is the plug-in
    estimate from a bins x bins histogram with equal-width bins over each coordinate's range."""
    p = np.asarray(points, np.float64)
    if len(p) < 2:
        return 0.0
    p = (p - p.mean(0)) / np.maximum(p.std(0), 1e-12)
    best = np.inf
    for th in np.arange(angles) * (np.pi / 2 / angles):
        c, s = np.cos(th), np.sin(th)
        a, b = c * p[:, 0] - s * p[:, 1], s * p[:, 0] + c * p[:, 1]
        h, _, _ = np.histogram2d(a, b, bins=bins)
        best = min(best, _mutual_information(h))
    return float(best)


def _mutual_information(h: np.ndarray) -> float:
    pab = h / h.sum()
    pa, pb = pab.sum(1, keepdims=True), pab.sum(0, keepdims=True)
    nz = pab > 0
    return float((pab[nz] * np.log2(pab[nz] / (pa @ pb)[nz])).sum())


def mixture_index(points: np.ndarray, epsilon: float = 0.1, angles: int = 90) -> float:
    """Engels et al.'s ε-mixture index of a 2-D feature f:

        M_ε(f) = max_{v, c} P( |v·f + c| < ε · sqrt(E[(v·f + c)²]) ),

    the largest share of points that lie in a thin band around one line (a lower-dimensional
    subspace), the band's half-width ε times the RMS of v·f + c. A mixture of a 1-D feature and
    something else scores high; a circle scores low. The condition is unchanged by scaling (v, c),
    so v runs over unit vectors at `angles` angles in [0, π) and c over the values that centre the
    band on each data point; the RMS is exact (Var(v·f) + (E[v·f] + c)²)."""
    p = np.asarray(points, np.float64)
    n = len(p)
    if n == 0:
        return 0.0
    best = 0
    for th in np.arange(angles) * (np.pi / angles):
        proj = np.sort(p[:, 0] * np.cos(th) + p[:, 1] * np.sin(th))
        mean, var = proj.mean(), proj.var()
        centre = proj  # the band |proj - centre| < half-width, i.e. c = -centre
        half = epsilon * np.sqrt(var + (mean - centre) ** 2)
        inside = np.searchsorted(proj, centre + half, side="left") - np.searchsorted(proj, centre - half, side="right")
        best = max(best, int(inside.max()))
    return best / n


def circle_fit(points: np.ndarray) -> tuple[float, float]:
    """Least-squares circle through 2-D points (Kåsa's fit): (radius, RMS distance to the circle / radius)."""
    p = np.asarray(points, np.float64)
    a = np.column_stack([p, np.ones(len(p))])
    sol, *_ = np.linalg.lstsq(a, (p**2).sum(1), rcond=None)
    cx, cy = sol[0] / 2, sol[1] / 2
    r = float(np.sqrt(max(sol[2] + cx**2 + cy**2, 0.0)))
    dist = np.hypot(p[:, 0] - cx, p[:, 1] - cy)
    return r, float(np.sqrt(np.mean((dist - r) ** 2)) / max(r, 1e-12))


def measure_groups(groups: list[np.ndarray], directions: np.ndarray, sampled, cfg: GroupConfig) -> list[dict]:
    """Per group: its latents, the PCA scatter (a sample of scatter_points points with the token
    that fires and the group latent that fires most there), the variance shares of the two
    components, both indices and the circle fit; sorted most irreducible first (by S · (1 − M):
    inseparable and not a mixture)."""
    out = []
    for lat, (coef, vid) in zip(groups, sampled):
        if len(coef) < 10:  # too few tokens for a scatter or an index
            continue
        pts, share = project(directions[lat], coef)
        sep = separability_index(pts, cfg.mi_bins, cfg.angles)
        mix = mixture_index(pts, cfg.epsilon, cfg.angles)
        _, resid = circle_fit(pts)
        keep = np.arange(len(pts))
        if len(keep) > cfg.scatter_points:
            keep = np.sort(np.random.default_rng(cfg.seed).choice(len(pts), cfg.scatter_points, replace=False))
        out.append({"latents": lat.tolist(), "n_tokens": int(len(pts)), "separability": sep, "mixture": mix,
                    "variance_share": share.tolist(), "circle_residual": resid,
                    "scatter": {"x": pts[keep, 0].tolist(), "y": pts[keep, 1].tolist(),
                                "token": vid[keep].tolist(), "latent": lat[coef[keep].argmax(1)].tolist()}})
    out.sort(key=lambda g: -g["separability"] * (1 - g["mixture"]))
    return out
