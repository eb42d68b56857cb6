"""The map of an SAE: every latent placed in 2-D, clustered and labelled.

- Layout: UMAP (umap-learn) of the decoder directions with the cosine metric, seeded, on the exact
  cosine neighbours the analysis already found (features.npz neighbor_ids / neighbor_cos), so no
  approximate neighbour search runs and the same seed gives the same map.
- Clusters: Leiden (leidenalg on igraph) on the graph of those cosine neighbours plus the co-firing
  partners, each edge weighted by its cosine or by the pair's normalised PMI.
- Labels: the words that are frequent in a cluster's explanations and rare in the others' (c-TF-IDF).
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from trainer.interpret.token_pattern import PROMOTES, chip_tokens
from trainer.relate.cofiring import Partners

# Words that say nothing about what a latent does (explanation boilerplate and English glue).
STOPWORDS = frozenset("""
a an the of in on at to for from by with and or not no is are be as it its this that these those
token tokens word words text context contexts phrase phrases fires activates activating mentions
mention related relating refer refers referring reference references usually often mostly various
such e.g eg i.e ie like within after before between into about over under than then when where which
who whom whose what how s t including include includes especially particular specific certain
""".split())
WORD_RE = re.compile(r"[a-z][a-z0-9_'-]{1,30}")


@dataclass
class MapConfig:
    """How the map is made; stored with it."""

    seed: int = 0
    """UMAP and Leiden seed: the same seed gives the same map."""
    n_neighbors: int = 15
    """UMAP's neighbourhood size (at most the analysis's --n-neighbors + 1)."""
    min_dist: float = 0.05
    """UMAP's min_dist: how tightly points pack in the layout."""
    n_epochs: int | None = None
    """UMAP optimisation epochs; None: umap-learn's default (200 for large inputs, 500 for small)."""
    min_cos: float = 0.15
    """Cosine neighbours below this similarity are not edges of the cluster graph."""
    cofire_weight: float = 1.0
    """Weight of a co-firing edge per unit of normalised PMI, next to cosine edges weighted by their cosine."""
    resolution: float = 1.0
    """Leiden resolution (RB configuration model): higher gives more, smaller clusters."""
    min_cluster: int = 3
    """Clusters smaller than this are left unclustered (-1)."""
    label_words: int = 3
    """Words in a cluster's label."""

    def validate(self) -> None:
        if self.n_neighbors < 2 or not 0 <= self.min_dist <= 1 or self.resolution <= 0 or self.min_cluster < 1 \
                or self.label_words < 1 or self.cofire_weight < 0 or (self.n_epochs is not None and self.n_epochs < 1):
            raise ValueError(f"invalid map settings {self}")


def layout(directions: np.ndarray, neighbor_ids: np.ndarray, neighbor_cos: np.ndarray, cfg: MapConfig) -> np.ndarray:
    """[F, 2] UMAP coordinates of the decoder directions (cosine metric) from their exact neighbours."""
    F = directions.shape[0]
    k = min(cfg.n_neighbors, neighbor_ids.shape[1] + 1, F - 1)
    if k < 2 or F < 8:  # too few latents for UMAP's neighbourhood graph: a straight line is the honest layout
        return np.column_stack([np.arange(F, dtype=np.float64), np.zeros(F)])
    import torch
    import umap

    idx = np.concatenate([np.arange(F)[:, None], neighbor_ids[:, :k - 1]], 1).astype(np.int64)
    dist = np.concatenate([np.zeros((F, 1)), 1.0 - neighbor_cos[:, :k - 1]], 1).clip(0, 2).astype(np.float32)
    # UMAP sets numba's thread count to n_jobs and back to numba's default (every core) when done;
    # with numba's OpenMP layer that is the OpenMP runtime torch shares, so torch would run on every
    # core from then on, whatever the process asked for: publishing a transcoder set's next block
    # then embedded 6x slower on 2 busy cores (BENCHMARKS.md, "Publishing a block of the demo's
    # transcoder set"). Put torch's count back.
    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no NNDescent index (we never transform new points); n_jobs=1 with a seed
            emb = umap.UMAP(n_neighbors=k, metric="cosine", min_dist=cfg.min_dist, n_epochs=cfg.n_epochs,
                            random_state=cfg.seed, precomputed_knn=(idx, dist), n_jobs=1,
                            ).fit_transform(np.asarray(directions, np.float32))
    finally:
        torch.set_num_threads(threads)
    return np.asarray(emb, np.float64)


def cluster_graph(neighbor_ids: np.ndarray, neighbor_cos: np.ndarray, partners: Partners | None,
                  cfg: MapConfig):
    """(edges [E, 2] with i < j, weights [E]): cosine neighbours above min_cos, weight cos, plus
    co-firing partners with weight cofire_weight * NPMI, NPMI = log(lift) / -log(N_ij / N) in (0, 1];
    a pair that is both keeps the larger weight."""
    F = neighbor_ids.shape[0]
    i = np.repeat(np.arange(F), neighbor_ids.shape[1])
    j, w = neighbor_ids.ravel().astype(np.int64), neighbor_cos.ravel().astype(np.float64)
    keep = (w >= cfg.min_cos) & (j >= 0)
    pi, pj, pw = [i[keep]], [j[keep]], [w[keep]]
    if partners is not None and cfg.cofire_weight > 0:
        a, slot = np.nonzero(partners.ids >= 0)
        b = partners.ids[a, slot].astype(np.int64)
        nij = partners.n_ij[a, slot].astype(np.float64)
        n = float(partners.n_tokens)
        lift = nij * n / np.maximum(partners.counts[a].astype(np.float64) * partners.counts[b], 1)
        joint = nij / n
        with np.errstate(divide="ignore", invalid="ignore"):
            npmi = np.where(joint < 1, np.log(lift) / -np.log(joint), 1.0)
        ok = npmi > 0
        pi.append(a[ok])
        pj.append(b[ok])
        pw.append(cfg.cofire_weight * np.minimum(npmi[ok], 1.0))
    i, j, w = np.concatenate(pi), np.concatenate(pj), np.concatenate(pw)
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    ok = lo != hi
    key = lo[ok] * F + hi[ok]
    w = w[ok]
    order = np.lexsort((-w, key))  # per pair, the largest weight first
    key, w = key[order], w[order]
    first = np.ones(len(key), bool)
    first[1:] = key[1:] != key[:-1]
    key, w = key[first], w[first]
    return np.column_stack([key // F, key % F]), w


def clusters(F: int, edges: np.ndarray, weights: np.ndarray, cfg: MapConfig) -> np.ndarray:
    """Leiden communities of the graph, numbered by size (0 the largest); small ones -1."""
    import igraph as ig
    import leidenalg

    g = ig.Graph(n=F, edges=edges.tolist())
    part = leidenalg.find_partition(g, leidenalg.RBConfigurationVertexPartition, weights=weights.tolist(),
                                    resolution_parameter=cfg.resolution, seed=cfg.seed)
    member = np.asarray(part.membership, np.int64)
    sizes = np.bincount(member, minlength=1)
    order = np.lexsort((np.arange(len(sizes)), -sizes))  # by size, ties by Leiden's own numbering
    rank = np.empty(len(sizes), np.int64)
    rank[order] = np.arange(len(sizes))
    out = rank[member]
    out[sizes[member] < cfg.min_cluster] = -1
    return out


def cluster_labels(cluster: np.ndarray, explanations: list[str | None], n_words: int) -> dict[int, list[str]]:
    """Per cluster, the n_words words with the highest c-TF-IDF over its members' explanations:
    tf = the word's share of the cluster's words, idf = log(1 + clusters / clusters using the word)."""
    per: dict[int, Counter] = {}
    for c, text in zip(cluster.tolist(), explanations):
        if c < 0 or not text:
            continue
        per.setdefault(c, Counter()).update(label_words(text))
    df = Counter(w for counts in per.values() for w in counts)
    n = max(len(per), 1)
    out = {}
    for c, counts in per.items():
        total = sum(counts.values())
        score = {w: (k / total) * math.log(1 + n / df[w]) for w, k in counts.items()}
        out[c] = sorted(score, key=lambda w: (-score[w], w))[:n_words]
    return out


def label_words(text: str) -> list[str]:
    """The words an explanation gives its cluster's label. A token-pattern explanation ("the word
    ‹ meta› (40 % of top examples) …; promotes ‹class›") gives the tokens its chips name on the input
    side, whole (punctuation and numbers included): its template words would otherwise label every
    cluster "top · examples · promotes"."""
    if "‹" in text:
        return [t.strip().lower() for t in chip_tokens(text.split(PROMOTES)[0]) if t.strip()]
    words = [w.strip("'-") for w in WORD_RE.findall(text.lower())]
    return [w for w in words if len(w) > 1 and w not in STOPWORDS]


def label_texts(explanations: list[str | None], peak_tokens: list[str | None]) -> list[str | None]:
    """What each latent contributes to its cluster's label: its explanation, else the token its top
    examples peak on (an SAE published without explanations still gets readable labels)."""
    return [e if e else (t.strip() or None if t else None) for e, t in zip(explanations, peak_tokens)]


def build_map(directions: np.ndarray, neighbor_ids: np.ndarray, neighbor_cos: np.ndarray,
              partners: Partners | None, explanations: list[str | None] | None, cfg: MapConfig | None = None) -> dict:
    """The whole map: {"x", "y", "cluster"} arrays per latent, "clusters" [{id, size, label, words,
    x, y}] (the centroid), and "config"."""
    cfg = cfg or MapConfig()
    cfg.validate()
    F = directions.shape[0]
    xy = layout(directions, neighbor_ids, neighbor_cos, cfg)
    edges, weights = cluster_graph(neighbor_ids, neighbor_cos, partners, cfg)
    cluster = clusters(F, edges, weights, cfg)
    words = cluster_labels(cluster, explanations or [None] * F, cfg.label_words)
    info = []
    for c in range(int(cluster.max()) + 1 if F else 0):
        members = cluster == c
        w = words.get(c, [])
        info.append({"id": c, "size": int(members.sum()), "words": w,
                     "label": " · ".join(w) if w else f"cluster {c}",
                     "x": float(xy[members, 0].mean()), "y": float(xy[members, 1].mean())})
    return {"x": xy[:, 0], "y": xy[:, 1], "cluster": cluster, "clusters": info, "config": asdict(cfg)}
