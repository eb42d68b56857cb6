"""Feature splitting between a narrow SAE A and a wider SAE B at the same site.

Bricken et al. ("Towards monosemanticity") see a latent of a small dictionary split into several
latents of a larger one: each child points close to its parent and fires only when the parent
would, on a part of the parent's tokens. So a child j's parent is the candidate i with

    cos(d_i, d_j) >= link_cos   and   P(i fires | j fires) >= link_cofire,

the one with the highest P(i | j) (ties: the higher cosine). Then, per parent: one child ->
"persisted", two or more -> "split", none while it fires -> "vanished"; each child takes its
parent's label. A child without a parent is "novel" when the stitching test confirms it adds
something A misses, else a "reconstruction" latent (Leask et al.'s name for latents that re-encode
what the smaller SAE already has). Latents that never fire on the data get no label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PERSISTED, SPLIT, NOVEL, RECONSTRUCTION, VANISHED = "persisted", "split", "novel", "reconstruction", "vanished"


@dataclass
class Forest:
    parent: np.ndarray  # [F_B] parent in A of each B latent, -1 for none
    link: np.ndarray  # [F_B] index into the candidate arrays of the parent edge, -1 for none
    n_children: np.ndarray  # [F_A]
    parent_label: np.ndarray  # [F_A] object: persisted / split / vanished / "" (never fires)
    child_label: np.ndarray  # [F_B] object: persisted / split / novel / reconstruction / "" (never fires)


def split_forest(n_a: int, n_b: int, a: np.ndarray, b: np.ndarray, cos: np.ndarray, p_a_given_b: np.ndarray,
                 count_a: np.ndarray, count_b: np.ndarray, novel_ok: np.ndarray, link_cos: float = 0.5,
                 link_cofire: float = 0.5) -> Forest:
    """Parents, children and labels from candidate edges (a, b, cos) with their co-firing P(a | b);
    novel_ok [F_B] says which B latents pass the stitching test."""
    eligible = np.flatnonzero((cos >= link_cos) & (p_a_given_b >= link_cofire))
    parent = np.full(n_b, -1, np.int64)
    link = np.full(n_b, -1, np.int64)
    if len(eligible):
        # best edge per child: sort by child, then P(a|b) desc, then cos desc; take the first of each child
        order = eligible[np.lexsort((-cos[eligible], -p_a_given_b[eligible], b[eligible]))]
        first = np.ones(len(order), bool)
        first[1:] = b[order][1:] != b[order][:-1]
        best = order[first]
        parent[b[best]] = a[best]
        link[b[best]] = best
    has = parent >= 0
    n_children = np.bincount(parent[has], minlength=n_a)
    parent_label = np.full(n_a, "", dtype=object)
    alive_a = count_a > 0
    parent_label[alive_a & (n_children == 0)] = VANISHED
    parent_label[n_children == 1] = PERSISTED
    parent_label[n_children >= 2] = SPLIT
    child_label = np.full(n_b, "", dtype=object)
    alive_b = count_b > 0
    child_label[has] = parent_label[parent[has]]
    orphan = alive_b & ~has
    child_label[orphan & novel_ok] = NOVEL
    child_label[orphan & ~novel_ok] = RECONSTRUCTION
    return Forest(parent, link, n_children, parent_label, child_label)
