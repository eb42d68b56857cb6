"""The held-out activating and the non-activating windows every latent is scored on.

A window is plain text (its tokens joined, no marks) of at most WINDOW = 6 tokens (the setting
embedding_window). delphi embeds 32-token examples, its default example length; a sentence
embedding of 32 tokens of code or prose is mostly about the context, not about the token a latent
fires on, and on the demo SAE the gap between true and shuffled explanations grew as the windows
shrank (32 -> 16 -> 8 -> 6 tokens; BENCHMARKS.md, benchmarks/embedding_queries.py --windows).
Windows are spans of the analysis's token stream, and wherever the stream is known they are
delphi's fixed windows (its center_examples=False): the blocks of `window` tokens each context is
cut into, [w b, w b + w) from the context's start. A block holds the activation somewhere inside
it. Fixed blocks are what makes scoring every latent affordable: every latent that fires in a
block shares that one window, so the windows to embed are bounded by the analysed tokens / w
rather than growing with latents x windows. The stream is rebuilt from the example windows of all
latents (they overlap and cover most of it); a block with a token no example shows falls back to
the window around the activation (peak 3/4 of the way in).

- Activating (held out): the latent's uniform random sample of activations first (kind=random: a
  sample of all its activations, like delphi's quantile-stratified test set), then its interval
  examples; never a window that overlaps one of its top examples, which the token-pattern
  explanation is computed from.
- Non-activating: windows of other latents, as delphi's default ("random" non-activating
  contexts). This latent's activation there is not stored, so it is assumed 0, which is true
  unless it fires somewhere in the window: probability ~1-(1-density)^window. They are used only when
  that is at most MAX_CONTAMINATION, never from the latent's nearest decoder neighbours (similar
  directions co-fire), and never where a window overlaps one of the latent's own examples. Denser
  latents get stretches of their own windows where they are exactly 0 (certain, but near an
  activation: hard negatives), a fixed block where one fits inside such a stretch.

Windows are deduplicated by their span, and at embedding time by their text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

WINDOW = 6
PEAK_FRAC = 0.75
MAX_CONTAMINATION = 0.2
N_NEIGHBORS_EXCLUDED = 10
MIN_ZERO_RUN = 16
KIND_TOP, KIND_INTERVAL, KIND_RANDOM = 0, 1, 2
UNKNOWN = -2  # a stream position no example window shows (-1: no token there, e.g. an excluded BOS)


@dataclass
class ScoringWindows:
    """Distinct windows (text and stream span), and per latent the indices of its activating and
    non-activating ones."""

    texts: list[str] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) in the analysis's token stream
    pos: list[list[int]] = field(default_factory=list)
    neg: list[list[int]] = field(default_factory=list)
    neg_source: list[str] = field(default_factory=list)  # per latent: other_latents, own_zero_runs or none
    blocks: int = 0  # how many of the windows are fixed blocks (the rest: centred or zero-run fallbacks)
    _index: dict = field(default_factory=dict, repr=False)

    def add(self, span: tuple[int, int], text: str) -> int:
        j = self._index.get(span)
        if j is None:
            j = self._index[span] = len(self.texts)
            self.texts.append(text)
            self.spans.append(span)
        return j


def scoring_window() -> int:
    """The window length the embedding scorer uses: the embedding_window setting, else WINDOW."""
    from store.settings import get_settings

    return get_settings().embedding_window or WINDOW


def centred_start(peak, width: int, window: int):
    """Where a `window`-token window around position `peak` of a `width`-token one starts: the peak
    PEAK_FRAC of the way in, moved to stay inside (scalars or arrays of peaks)."""
    return np.clip(np.asarray(peak) - round(PEAK_FRAC * (window - 1)), 0, max(width - window, 0))


def window_text(ids: np.ndarray, vocab: list[str]) -> str:
    n = len(vocab)
    return "".join(vocab[t] for t in np.asarray(ids).tolist() if 0 <= t < n)


class TokenStream:
    """The analysis's token stream as far as the example windows show it (UNKNOWN elsewhere)."""

    def __init__(self, starts: np.ndarray, tokens: np.ndarray, chunk: int = 65536):
        width = tokens.shape[1]
        n = int(starts.max()) + width if len(starts) else 0
        self.ids = np.full(n, UNKNOWN, np.int32)
        offsets = np.arange(width, dtype=np.int64)
        for k in range(0, len(starts), chunk):
            pos = starts[k:k + chunk, None] + offsets[None, :]
            tok = tokens[k:k + chunk]
            ok = tok >= 0  # -1 may be outside the window's context, where another window has a token
            self.ids[pos[ok]] = tok[ok]
        self._unknown = np.concatenate([[0], np.cumsum(self.ids == UNKNOWN)])

    def complete(self, lo: np.ndarray, hi: np.ndarray, bos_at: np.ndarray | None) -> np.ndarray:
        """Whether every position of [lo, hi) is known (an excluded BOS position counts as known)."""
        lo, hi = np.clip(lo, 0, len(self.ids)), np.clip(hi, 0, len(self.ids))
        missing = self._unknown[hi] - self._unknown[lo]
        if bos_at is not None:
            missing = missing - ((bos_at >= lo) & (bos_at < hi) & (self.ids[np.minimum(bos_at, len(self.ids) - 1)]
                                                                   == UNKNOWN))
        return (missing == 0) & (hi > lo)


def _overlap_any(lo: np.ndarray, hi: np.ndarray, ranges_lo: np.ndarray, ranges_hi: np.ndarray) -> np.ndarray:
    """For each [lo, hi): does it overlap any of the ranges?"""
    if not len(ranges_lo) or not len(lo):
        return np.zeros(len(lo), bool)
    return ((lo[:, None] < ranges_hi[None, :]) & (hi[:, None] > ranges_lo[None, :])).any(1)


def _merged(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted disjoint union of ranges [lo, hi)."""
    if not len(lo):
        return lo, hi
    o = np.argsort(lo, kind="stable")
    lo, hi = lo[o], np.maximum.accumulate(hi[o])
    new = np.concatenate([[True], lo[1:] > hi[:-1]])
    ends = np.concatenate([np.nonzero(new)[0][1:] - 1, [len(lo) - 1]])
    return lo[new], hi[ends]


def _hits_merged(lo: np.ndarray, hi: np.ndarray, m_lo: np.ndarray, m_hi: np.ndarray) -> np.ndarray:
    """For each [lo, hi): does it overlap the sorted disjoint ranges (m_lo, m_hi)?"""
    if not len(m_lo):
        return np.zeros(len(lo), bool)
    j = np.searchsorted(m_lo, hi, side="left") - 1  # the last range starting before hi
    return (j >= 0) & (m_hi[np.maximum(j, 0)] > lo)


def select(examples: dict[str, np.ndarray], features: dict[str, np.ndarray], vocab: list[str], n_pos: int = 8,
           n_neg: int = 8, seed: int = 0, window: int = WINDOW, ctx_len: int | None = None,
           exclude_bos: bool = True) -> ScoringWindows:
    """Windows for every latent of an analysis (trainer.analyze's examples.npz / features.npz).

    ctx_len (the analysis's context length) aligns the fixed blocks to each context's start; without
    it they are aligned to multiples of `window` in the stream (the same when ctx_len is a multiple).
    """
    n_latents = len(features["count"])
    density = np.asarray(features["density"], np.float64)
    neighbors = features.get("neighbor_ids")
    feat = np.asarray(examples["feature"], np.int64)
    kind = np.asarray(examples["kind"])
    tokens = np.asarray(examples["tokens"])
    acts = examples["acts"]
    peak = np.asarray(examples["peak"], np.int64)
    width = tokens.shape[1]
    # where each example window starts in the token stream; older analyses without the stream
    # index get a stream of their own per example (only centred windows then)
    if "token" in examples:
        starts = np.asarray(examples["token"], np.int64) - peak
    else:
        starts = np.arange(len(feat), dtype=np.int64) * (width + window)
    stream = TokenStream(starts, tokens)
    rng = np.random.default_rng(seed)
    order = np.argsort(feat, kind="stable")
    bounds = np.searchsorted(feat[order], np.arange(n_latents + 1))
    out = ScoringWindows(pos=[[] for _ in range(n_latents)], neg=[[] for _ in range(n_latents)],
                         neg_source=["none"] * n_latents)
    random_first = np.lexsort((np.asarray(examples["rank"], np.int64), -np.asarray(examples["interval"], np.int64),
                               kind != KIND_RANDOM))
    priority = np.empty(len(feat), np.int64)
    priority[random_first] = np.arange(len(feat))

    # every example's fixed block, and its centred window as the fallback
    g = starts + peak  # the activation's stream position
    b_lo, b_hi, ctx0 = block_of(g, window, ctx_len)
    bos = ctx0 if (ctx_len and exclude_bos) else None
    full = stream.complete(b_lo, b_hi, bos) if "token" in examples else np.zeros(len(g), bool)
    # the fallback: the centred window, from the example's own tokens (it never leaves their context)
    c_lo = centred_start(peak, width, window)
    c_hi = np.minimum(width, c_lo + window)
    w_lo = np.where(full, b_lo, starts + c_lo)
    w_hi = np.where(full, b_hi, starts + c_hi)

    def text_of(j: int) -> str:
        if full[j]:
            return window_text(stream.ids[w_lo[j]:w_hi[j]], vocab)
        return window_text(tokens[j, c_lo[j]:c_hi[j]], vocab)

    # 1. activating windows: the pool the non-activating ones are drawn from
    pool_owner: list[int] = []
    pool_win: list[int] = []
    for i in range(n_latents):
        rows = order[bounds[i]:bounds[i + 1]]
        if rows.size == 0:
            continue
        top = rows[kind[rows] == KIND_TOP]
        rest = rows[kind[rows] != KIND_TOP]
        rest = rest[np.argsort(priority[rest], kind="stable")]
        if not rest.size:
            continue
        ok = ~_overlap_any(w_lo[rest], w_hi[rest], starts[top], starts[top] + width)
        picked: list[int] = []
        for j in rest[ok].tolist():
            span = (int(w_lo[j]), int(w_hi[j]))
            k = out._index.get(span)
            if k is None:
                t = text_of(j)
                if not t:
                    continue
                k = out.add(span, t)
                out.blocks += bool(full[j])
            if k not in picked:
                picked.append(k)
                if len(picked) >= n_pos:
                    break
        out.pos[i] = picked
        pool_owner += [i] * len(picked)
        pool_win += picked
    owners: dict[int, list[int]] = {}
    for w, o in zip(pool_win, pool_owner):
        owners.setdefault(w, []).append(o)
    pool = np.asarray(sorted(owners), np.int64)
    spans = np.asarray(out.spans, np.int64).reshape(-1, 2)
    pool_lo, pool_hi = spans[pool, 0] if len(pool) else pool, spans[pool, 1] if len(pool) else pool

    # 2. non-activating windows
    for i in range(n_latents):
        if not out.pos[i]:
            continue
        rows = order[bounds[i]:bounds[i + 1]]
        contamination = 1.0 - (1.0 - min(max(density[i], 0.0), 1.0)) ** window
        if contamination <= MAX_CONTAMINATION and len(pool):
            exclude = {i}
            if neighbors is not None:
                exclude |= {int(x) for x in neighbors[i][:N_NEIGHBORS_EXCLUDED] if x >= 0}
            m_lo, m_hi = _merged(starts[rows], starts[rows] + width)  # where this latent's activations are shown
            cand = rng.integers(0, len(pool), size=20 * n_neg)
            cand = cand[~_hits_merged(pool_lo[cand], pool_hi[cand], m_lo, m_hi)]
            picked = []
            own = set(out.pos[i])
            for c in cand.tolist():
                k = int(pool[c])
                if k in own or k in picked or not exclude.isdisjoint(owners[k]):
                    continue
                picked.append(k)
                if len(picked) >= n_neg:
                    break
            if picked:
                out.neg[i] = picked
                out.neg_source[i] = "other_latents"
                continue
        picked = []
        for lo, hi, is_block in _zero_windows(rows, tokens, acts, starts, window, ctx_len, exclude_bos, out._index, rng):
            k = out._index.get((lo, hi))
            if k is None:
                k = out.add((lo, hi), window_text(stream.ids[lo:hi], vocab))
                out.blocks += is_block
            if k not in picked:
                picked.append(k)
                if len(picked) >= n_neg:
                    break
        if picked:
            out.neg[i] = picked
            out.neg_source[i] = "own_zero_runs"
    return out


def block_of(g: np.ndarray, window: int, ctx_len: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fixed block holding stream position g: (lo, hi, start of its context)."""
    ctx0 = (g // ctx_len) * ctx_len if ctx_len else np.zeros_like(g)
    lo = ctx0 + ((g - ctx0) // window) * window
    hi = np.minimum(lo + window, ctx0 + ctx_len) if ctx_len else lo + window
    return lo, hi, ctx0


def _zero_windows(rows: np.ndarray, tokens: np.ndarray, acts: np.ndarray, starts: np.ndarray, window: int,
                  ctx_len: int | None, exclude_bos: bool, registered: dict, rng) -> list[tuple[int, int, bool]]:
    """Windows where the latent is known to be exactly 0, from its own example windows (they show its
    activation on every token): [(lo, hi, is_block)], best first.

    First the fixed blocks its windows (together) show completely without an activation, those
    already embedded for other latents before the rest; then stretches of >= MIN_ZERO_RUN zero
    tokens of one window, cut to `window` tokens.
    """
    tok = tokens[rows]
    valid = tok >= 0
    pos = (starts[rows, None] + np.arange(tok.shape[1])[None, :])[valid]
    fires = np.asarray(acts[rows])[valid] > 0
    known = np.unique(pos)
    firing = np.unique(pos[fires])
    out: list[tuple[int, int, bool]] = []
    if len(known):
        lo = block_of(known, window, ctx_len)[0]
        blocks, count = np.unique(lo, return_counts=True)
        b_lo, b_hi, b_ctx0 = block_of(blocks, window, ctx_len)
        need = (b_hi - b_lo) - ((b_lo == b_ctx0) if (ctx_len and exclude_bos) else 0)
        hot = np.unique(block_of(firing, window, ctx_len)[0]) if len(firing) else firing
        ok = (count == need) & ~np.isin(blocks, hot)
        zero = [(int(x), int(y)) for x, y in zip(b_lo[ok], b_hi[ok])]
        seen = [z for z in zero if z in registered]
        new = [z for z in zero if z not in registered]
        for group in (seen, new):
            out += [(*group[j], True) for j in rng.permutation(len(group)).tolist()]
    zero_tok = valid & (np.asarray(acts[rows]) <= 0)
    padded = np.zeros((len(rows), zero_tok.shape[1] + 2), bool)
    padded[:, 1:-1] = zero_tok
    edges = np.diff(padded.astype(np.int8), axis=1)
    r_start, c_start = np.nonzero(edges == 1)
    _, c_end = np.nonzero(edges == -1)  # same row order: one end per start
    runs = [(int(starts[rows[r]]) + a, int(starts[rows[r]]) + min(b, a + window), False)
            for r, a, b in zip(r_start.tolist(), c_start.tolist(), c_end.tolist()) if b - a >= MIN_ZERO_RUN]
    return out + [runs[j] for j in rng.permutation(len(runs)).tolist()]
