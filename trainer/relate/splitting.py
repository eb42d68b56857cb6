"""Feature splitting between a narrow SAE A and a wider SAE B at the same site.

Bricken et al. ("Towards monosemanticity") see a latent of a small dictionary split into several
latents of a larger one: each child fires only when the parent would, on a part of the parent's
tokens. A child j's parent is a candidate i with P(i fires | j fires) high, linked in one of two ways:

- by direction: cos(d_i, d_j) >= link_cos and P(i | j) >= link_cofire (the child points close to
  its parent, as in Bricken et al.);
- by co-firing alone: P(i | j) >= cofire_link, at least COFIRE_LIFT times what chance gives (i's
  firing rate), and significantly so: the one-sided binomial test of the co-firing count against
  i's firing rate, with Benjamini-Hochberg q <= link_q over every candidate pair. A child that
  fires only inside its parent is its child whatever its direction: in a hierarchy of features
  (SAELens's synthetic data) a child's direction is unrelated to its parent's.

Of the eligible parents, the one with the highest P(i | j) wins (ties: the higher cosine); the link
records which way it was made. Per parent: one child -> "persisted"; two or more -> "split", or
"persisted_split" when one of them is the parent itself surviving in B (a direction link on which
the child also fires on at least link_cofire of the parent's tokens, so it is not one part of the
parent but all of it) while the others are new children; none while it fires -> "vanished". Each
child takes its parent's label. A child without a parent is "novel" when the stitching test
confirms it adds something A misses, else a "reconstruction" latent (Leask et al.'s name for
latents that re-encode what the smaller SAE already has). Latents that never fire on the data get
no label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binom, false_discovery_control

PERSISTED, SPLIT, PERSISTED_SPLIT = "persisted", "split", "persisted_split"
NOVEL, RECONSTRUCTION, VANISHED = "novel", "reconstruction", "vanished"
DIRECTION, COFIRING = "direction", "cofiring"
COFIRE_LIFT = 2.0
"""A co-firing link needs P(parent | child) at least this many times the parent's firing rate: a
latent that fires on most tokens co-fires with everything, significantly so on enough data."""


@dataclass
class Forest:
    parent: np.ndarray  # [F_B] parent in A of each B latent, -1 for none
    link: np.ndarray  # [F_B] index into the candidate arrays of the parent edge, -1 for none
    kind: np.ndarray  # [F_B] object: how the parent edge was made, direction / cofiring / "" (none)
    n_children: np.ndarray  # [F_A]
    parent_label: np.ndarray  # [F_A] object: persisted / split / persisted_split / vanished / "" (never fires)
    child_label: np.ndarray  # [F_B] object: its parent's label / novel / reconstruction / "" (never fires)


def cofire_q(n_ab: np.ndarray, count_b: np.ndarray, rate_a: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values of the pairs' co-firing counts: p = P(X >= n_ab) for X ~
    Binomial(count_b, rate_a), the count if A's latent fired independently of B's at its own rate."""
    p = binom.sf(np.asarray(n_ab) - 1, np.asarray(count_b).astype(np.int64), np.clip(rate_a, 0.0, 1.0))
    return false_discovery_control(np.clip(p, 0.0, 1.0), method="bh") if len(p) else np.zeros(0)


def split_forest(n_a: int, n_b: int, a: np.ndarray, b: np.ndarray, cos: np.ndarray, p_a_given_b: np.ndarray,
                 p_b_given_a: np.ndarray, q: np.ndarray, count_a: np.ndarray, count_b: np.ndarray, tokens: int,
                 novel_ok: np.ndarray, link_cos: float = 0.5, link_cofire: float = 0.5, cofire_link: float = 0.7,
                 link_q: float = 0.01) -> Forest:
    """Parents, children and labels from candidate edges (a, b, cos) with their co-firing P(a | b),
    P(b | a) and co-firing q-values (cofire_q); novel_ok [F_B] says which B latents pass the
    stitching test."""
    direction = (cos >= link_cos) & (p_a_given_b >= link_cofire)
    rate_a = count_a[a] / max(tokens, 1)
    cofiring = (~direction & (p_a_given_b >= cofire_link) & (p_a_given_b >= COFIRE_LIFT * rate_a) & (q <= link_q))
    eligible = np.flatnonzero(direction | cofiring)
    parent = np.full(n_b, -1, np.int64)
    link = np.full(n_b, -1, np.int64)
    kind = np.full(n_b, "", dtype=object)
    if len(eligible):
        # best edge per child: sort by child, then P(a|b) desc, then cos desc; take the first of each child
        order = eligible[np.lexsort((-cos[eligible], -p_a_given_b[eligible], b[eligible]))]
        first = np.ones(len(order), bool)
        first[1:] = b[order][1:] != b[order][:-1]
        best = order[first]
        parent[b[best]] = a[best]
        link[b[best]] = best
        kind[b[best]] = np.where(direction[best], DIRECTION, COFIRING)
    has = parent >= 0
    n_children = np.bincount(parent[has], minlength=n_a)
    # the parent itself, surviving in B: a direction link covering most of the parent's firings
    survives = np.zeros(n_a, bool)
    whole = has & (kind == DIRECTION)
    whole[whole] = p_b_given_a[link[whole]] >= link_cofire
    survives[parent[whole]] = True
    parent_label = np.full(n_a, "", dtype=object)
    alive_a = count_a > 0
    parent_label[alive_a & (n_children == 0)] = VANISHED
    parent_label[n_children == 1] = PERSISTED
    parent_label[n_children >= 2] = SPLIT
    parent_label[(n_children >= 2) & survives] = PERSISTED_SPLIT
    child_label = np.full(n_b, "", dtype=object)
    alive_b = count_b > 0
    child_label[has] = parent_label[parent[has]]
    orphan = alive_b & ~has
    child_label[orphan & novel_ok] = NOVEL
    child_label[orphan & ~novel_ok] = RECONSTRUCTION
    return Forest(parent, link, kind, n_children, parent_label, child_label)
