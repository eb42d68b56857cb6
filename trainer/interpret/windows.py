"""The held-out activating and the non-activating windows every latent is scored on.

As in delphi's embedding scorer, a window is plain text (its tokens joined, no marks), 32 tokens
with the activation about 3/4 of the way in (the explainer prompts' cut).

- Activating (held out): the latent's uniform random sample of activations first (kind=random: a
  sample of all its activations, like delphi's quantile-stratified test set), then its interval
  examples; never a window that overlaps one of its top examples, which the token-pattern
  explanation is computed from.
- Non-activating: windows of other latents, as delphi's default ("random" non-activating
  contexts). This latent's activation there is not stored, so it is assumed 0, which is true
  unless it fires somewhere in the window: probability ~1-(1-density)^32. They are used only when
  that is at most MAX_CONTAMINATION, never from the latent's nearest decoder neighbours (similar
  directions co-fire), and never where a window overlaps one of the latent's own examples. Denser
  latents get stretches of their own windows where they are exactly 0 (certain, but near an
  activation: hard negatives).

Windows are deduplicated by their tokens, so a window is embedded once however many latents use it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

WINDOW = 32
PEAK_FRAC = 0.75
MAX_CONTAMINATION = 0.2
N_NEIGHBORS_EXCLUDED = 10
MIN_ZERO_RUN = 16
KIND_TOP, KIND_INTERVAL, KIND_RANDOM = 0, 1, 2


@dataclass
class ScoringWindows:
    """Distinct window texts, and per latent the indices of its activating and non-activating ones."""

    texts: list[str] = field(default_factory=list)
    pos: list[list[int]] = field(default_factory=list)
    neg: list[list[int]] = field(default_factory=list)
    neg_source: list[str] = field(default_factory=list)  # per latent: other_latents, own_zero_runs or none
    _index: dict = field(default_factory=dict, repr=False)

    def add(self, key: bytes, text: str) -> int:
        j = self._index.get(key)
        if j is None:
            j = self._index[key] = len(self.texts)
            self.texts.append(text)
        return j


def cut(n_tokens: int, peak: int, length: int = WINDOW, peak_frac: float = PEAK_FRAC) -> tuple[int, int]:
    """[lo, hi) of a `length`-token window with the peak ~peak_frac of the way in."""
    if n_tokens <= length:
        return 0, n_tokens
    before = int(round(peak_frac * (length - 1)))
    lo = max(0, peak - before)
    hi = min(n_tokens, lo + length)
    return max(0, hi - length), hi


def window_text(ids: np.ndarray, vocab: list[str]) -> str:
    return "".join(vocab[int(t)] for t in ids if 0 <= t < len(vocab))


def _overlaps(doc: int, pos: int, docs: np.ndarray, positions: np.ndarray, reach: int) -> bool:
    same = docs == doc
    return bool(same.any() and (np.abs(positions[same] - pos) < reach).any())


def select(examples: dict[str, np.ndarray], features: dict[str, np.ndarray], vocab: list[str], n_pos: int = 8,
           n_neg: int = 8, seed: int = 0, window: int = WINDOW) -> ScoringWindows:
    """Windows for every latent of an analysis (trainer.analyze's examples.npz / features.npz)."""
    n_latents = len(features["count"])
    density = np.asarray(features["density"], np.float64)
    neighbors = features.get("neighbor_ids")
    feat = np.asarray(examples["feature"], np.int64)
    kind = np.asarray(examples["kind"])
    tokens = examples["tokens"]
    acts = examples["acts"]
    peak = np.asarray(examples["peak"], np.int64)
    docs = np.asarray(examples["doc_id"], np.int64)
    dpos = np.asarray(examples["doc_pos"], np.int64)
    rng = np.random.default_rng(seed)
    order = np.argsort(feat, kind="stable")
    bounds = np.searchsorted(feat[order], np.arange(n_latents + 1))
    out = ScoringWindows(pos=[[] for _ in range(n_latents)], neg=[[] for _ in range(n_latents)],
                         neg_source=["none"] * n_latents)
    reach = window  # two windows of `window` tokens around peaks closer than this can share tokens

    def text_of(j: int, lo: int, hi: int) -> tuple[bytes, str]:
        ids = tokens[j, lo:hi]
        ids = ids[ids >= 0]
        return ids.astype("<i4").tobytes(), window_text(ids, vocab)

    # 1. activating windows, and the pool non-activating ones are drawn from
    pool_owner, pool_text, pool_doc, pool_pos = [], [], [], []
    for i in range(n_latents):
        rows = order[bounds[i]:bounds[i + 1]]
        if rows.size == 0:
            continue
        top = rows[kind[rows] == KIND_TOP]
        rest = rows[kind[rows] != KIND_TOP]
        # random sample first (uniform over activations), then intervals from the highest down
        rest = rest[np.lexsort((examples["rank"][rest], -examples["interval"][rest].astype(np.int64),
                                kind[rest] != KIND_RANDOM))]
        seen: set[tuple[int, int]] = set()
        for j in rest.tolist():
            if len(out.pos[i]) >= n_pos:
                break
            key = (int(docs[j]), int(dpos[j]))
            if key in seen or _overlaps(key[0], key[1], docs[top], dpos[top], reach):
                continue
            seen.add(key)
            valid = np.nonzero(tokens[j] >= 0)[0]
            if valid.size == 0:
                continue
            lo, hi = cut(tokens.shape[1], int(peak[j]), window)
            k = out.add(*text_of(j, lo, hi))
            if k not in out.pos[i]:
                out.pos[i].append(k)
                pool_owner.append(i)
                pool_text.append(k)
                pool_doc.append(key[0])
                pool_pos.append(key[1])
    pool_owner_a = np.asarray(pool_owner, np.int64)
    pool_doc_a = np.asarray(pool_doc, np.int64)
    pool_pos_a = np.asarray(pool_pos, np.int64)

    # 2. non-activating windows
    pyrng = random.Random(seed)
    for i in range(n_latents):
        if not out.pos[i]:
            continue
        rows = order[bounds[i]:bounds[i + 1]]
        own_docs, own_pos = docs[rows], dpos[rows]
        contamination = 1.0 - (1.0 - min(max(density[i], 0.0), 1.0)) ** window
        if contamination <= MAX_CONTAMINATION and len(pool_text):
            exclude = {i}
            if neighbors is not None:
                exclude |= {int(x) for x in neighbors[i][:N_NEIGHBORS_EXCLUDED] if x >= 0}
            picked: list[int] = []
            for c in rng.integers(0, len(pool_text), size=20 * n_neg).tolist():
                if len(picked) >= n_neg:
                    break
                k = pool_text[c]
                if (int(pool_owner_a[c]) in exclude or k in picked or k in out.pos[i]
                        or _overlaps(int(pool_doc_a[c]), int(pool_pos_a[c]), own_docs, own_pos, reach)):
                    continue
                picked.append(k)
            if picked:
                out.neg[i] = picked
                out.neg_source[i] = "other_latents"
                continue
        runs = []
        for j in rows.tolist():
            a = acts[j]
            ok = (tokens[j] >= 0) & (a <= 0)
            start = None
            for p, z in enumerate(list(ok) + [False]):
                if z and start is None:
                    start = p
                elif not z and start is not None:
                    if p - start >= MIN_ZERO_RUN:
                        runs.append(text_of(j, start, min(p, start + window)))
                    start = None
        pyrng.shuffle(runs)
        for key, text in runs[:n_neg]:
            out.neg[i].append(out.add(key, text))
        if out.neg[i]:
            out.neg_source[i] = "own_zero_runs"
    return out
