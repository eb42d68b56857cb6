"""The held-out activating and the non-activating windows every latent is scored on: ONE picker for
the token-pattern explanations scored at publish (`select`, from the analysis files) and the LM
explanations scored by the auto-interp worker (app/autointerp, from the store), so that the two
embedding scores of a latent are computed on the same windows and compare.

Both callers hand the picker the same data: a latent's example windows as the store keeps them
(`Examples`: each window's valid tokens, its peak, and the peak's document position). A scoring
window is plain text (its tokens joined, no marks) of at most WINDOW = 6 tokens (the setting
embedding_window). delphi embeds 32-token examples, its default example length; a sentence
embedding of 32 tokens of code or prose is mostly about the context, not about the token a latent
fires on, and on the demo SAE the gap between true and shuffled explanations grew as the windows
shrank (BENCHMARKS.md, benchmarks/embedding_queries.py).

Windows are delphi's fixed windows (its center_examples=False): the blocks of `window` tokens each
document is cut into, [w b, w b + w) in document positions, holding the activation somewhere
inside. Fixed blocks are what makes scoring every latent affordable: every latent that fires in a
block shares that one window, so the windows to embed are bounded by the analysed tokens / w
rather than growing with latents x windows. A block that runs past the example's own window falls
back to the window centred on the activation (`centred_start`: the peak 3/4 of the way in).

- Activating (held out): the latent's uniform random sample of activations first (kind=random: a
  sample of all its activations, like delphi's quantile-stratified test set), then its interval
  examples; never a window that overlaps one of its top examples, which the token-pattern
  explanation is computed from and the LM explainer is shown.
- Non-activating: other latents' first activating windows, as delphi's default ("random"
  non-activating contexts): latents drawn at random with a generator seeded by (seed, latent), so
  the draw is the same wherever the picker runs. This latent's activation there is not stored, so
  it is assumed 0, which is true unless it fires somewhere in the window: probability
  ~1-(1-density)^window. They are used only when that is at most MAX_CONTAMINATION, never from the
  latent's nearest decoder neighbours (similar directions co-fire), and never where a window
  overlaps one of the latent's own examples. Denser latents get stretches of their own windows
  where they are exactly 0 (certain, but near an activation: hard negatives): the fixed blocks
  their windows show without an activation, then runs of MIN_ZERO_RUN zeros cut to `window`.

Windows are deduplicated by their document span, and at embedding time by their text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from store.models import ExampleKind

WINDOW = 6
PEAK_FRAC = 0.75
MAX_CONTAMINATION = 0.2
N_NEIGHBORS_EXCLUDED = 10
MIN_ZERO_RUN = 16
N_POS = 8  # held-out activating windows per latent
N_NEG = 8  # non-activating windows per latent
# Other latents drawn per latent: a fixed number, so asking for more negatives extends the list
# asked for fewer (the LM judges take more than the embedding scorer, from the same draw).
NEG_CANDIDATES = 200


def scoring_window() -> int:
    """The window length the embedding scorer uses: the embedding_window setting, else WINDOW."""
    from store.settings import get_settings

    return get_settings().embedding_window or WINDOW


def centred_start(peak, width: int, window: int, peak_frac: float = PEAK_FRAC):
    """Where a `window`-token window around position `peak` of a `width`-token one starts: the peak
    peak_frac of the way in, moved to stay inside (scalars or arrays of peaks and widths)."""
    return np.clip(np.asarray(peak) - round(peak_frac * (window - 1)), 0, np.maximum(np.asarray(width) - window, 0))


def window_text(ids: np.ndarray, vocab: Sequence[str]) -> str:
    n = len(vocab)
    return "".join(vocab[t] for t in np.asarray(ids).tolist() if 0 <= t < n)


@dataclass
class Examples:
    """Example windows (of one latent or many) as the store keeps them.

    tokens/acts [E, W] hold each window, its valid tokens at [first, first + length) (the analysis
    pads with -1 where a window leaves its context; publish stores the valid part only); peak is
    the activation's index in the row and offset its position in document `doc`.
    """

    latent: np.ndarray
    kind: np.ndarray
    rank: np.ndarray
    interval: np.ndarray  # -1 where none
    doc: np.ndarray
    offset: np.ndarray
    peak: np.ndarray
    first: np.ndarray
    length: np.ndarray
    tokens: np.ndarray
    acts: np.ndarray

    @classmethod
    def from_analysis(cls, examples: dict[str, np.ndarray]) -> Examples:
        """trainer.analyze's examples.npz, trimmed the way publish trims what it stores."""
        tokens = np.asarray(examples["tokens"])
        valid = tokens >= 0
        width = tokens.shape[1]
        first = np.where(valid.any(1), valid.argmax(1), 0)
        last = np.where(valid.any(1), width - 1 - valid[:, ::-1].argmax(1), -1)
        return cls(latent=np.asarray(examples["feature"], np.int64), kind=np.asarray(examples["kind"], np.int64),
                   rank=np.asarray(examples["rank"], np.int64), interval=np.asarray(examples["interval"], np.int64),
                   doc=np.asarray(examples["doc_id"], np.int64), offset=np.asarray(examples["doc_pos"], np.int64),
                   peak=np.asarray(examples["peak"], np.int64), first=first.astype(np.int64),
                   length=np.maximum(last - first + 1, 0).astype(np.int64), tokens=tokens, acts=examples["acts"])

    @classmethod
    def from_rows(cls, rows: Sequence, latents: Sequence[int]) -> Examples:
        """Stored example rows (app.autointerp.prompts.StoredExample: kind, rank, interval, peak,
        doc_id, doc_offset, token_ids, acts), rows[k] an example of latent latents[k]."""
        width = max((len(r.token_ids) for r in rows), default=0)
        tokens = np.full((len(rows), width), -1, np.int64)
        acts = np.zeros((len(rows), width), np.float32)
        for k, r in enumerate(rows):
            tokens[k, :len(r.token_ids)] = r.token_ids
            acts[k, :len(r.acts)] = r.acts

        def col(name, default=0):
            return np.asarray([default if getattr(r, name) is None else getattr(r, name) for r in rows], np.int64)

        return cls(latent=np.asarray(latents, np.int64).reshape(len(rows)), kind=col("kind"), rank=col("rank"),
                   interval=col("interval", -1), doc=col("doc_id"), offset=col("doc_offset"), peak=col("peak"),
                   first=np.zeros(len(rows), np.int64), length=np.asarray([len(r.token_ids) for r in rows], np.int64),
                   tokens=tokens, acts=acts)

    def start(self, rows) -> np.ndarray:
        """Document position of the first valid token of each row."""
        return self.offset[rows] - (self.peak[rows] - self.first[rows])

    def text(self, w: Win, vocab: Sequence[str]) -> str:
        a = int(self.first[w.row] + (w.lo - self.start(w.row)))
        return window_text(self.tokens[w.row, a:a + w.hi - w.lo], vocab)


@dataclass(frozen=True)
class Win:
    """A scoring window: the document span [lo, hi) of doc, cut from example `row` of `latent`."""

    doc: int
    lo: int
    hi: int
    row: int
    latent: int
    block: bool

    @property
    def key(self) -> tuple[int, int, int]:
        return self.doc, self.lo, self.hi


def _windows(ex: Examples, rows: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's scoring window in document positions: its activation's fixed block when the row
    shows all of it, else the window centred on the activation. (lo, hi, is_block)."""
    s = ex.start(rows)
    e = s + ex.length[rows]
    b_lo = (ex.offset[rows] // window) * window
    block = (b_lo >= s) & (b_lo + window <= e)
    c_lo = s + centred_start(ex.peak[rows] - ex.first[rows], ex.length[rows], window)
    lo = np.where(block, b_lo, c_lo)
    return lo, np.where(block, b_lo + window, np.minimum(e, c_lo + window)), block


def _hits(doc: int, lo: int, hi: int, docs: np.ndarray, los: np.ndarray, his: np.ndarray) -> bool:
    return bool(((docs == doc) & (los < hi) & (his > lo)).any())


def positives(ex: Examples, rows: np.ndarray, n: int, window: int = WINDOW,
              held_back: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> list[Win]:
    """Up to n held-out activating windows of one latent (rows: all its examples), best first.

    held_back: (doc, lo, hi) spans no window may overlap; default its top examples' windows.
    """
    rows = np.asarray(rows, np.int64)
    top = rows[ex.kind[rows] == ExampleKind.top]
    if held_back is None:
        s = ex.start(top)
        held_back = (ex.doc[top], s, s + ex.length[top])
    rest = rows[ex.kind[rows] != ExampleKind.top]
    rest = rest[np.lexsort((ex.rank[rest], -ex.interval[rest], ex.kind[rest] != ExampleKind.random))]
    rest = rest[ex.length[rest] > 0]
    lo, hi, block = _windows(ex, rest, window)
    out: list[Win] = []
    seen: set[tuple[int, int, int]] = set()
    for j, a, b, bl in zip(rest.tolist(), lo.tolist(), hi.tolist(), block.tolist()):
        d = int(ex.doc[j])
        if (d, a, b) in seen or _hits(d, a, b, *held_back):
            continue
        seen.add((d, a, b))
        out.append(Win(d, a, b, j, int(ex.latent[j]), bl))
        if len(out) >= n:
            break
    return out


def negatives(ex: Examples, rows: np.ndarray, latent: int, density: float, neighbors, n_latents: int, n: int,
              first_positive: Callable[[list[int]], dict[int, Win]], seed: int = 0, window: int = WINDOW,
              exclude: Sequence[tuple[int, int, int]] = (), shown: int | None = None) -> tuple[list[Win], str]:
    """Up to n non-activating windows of one latent and where they came from (other_latents,
    own_zero_runs or none).

    first_positive(latents) gives those latents' first activating window (positives(..., 1)); the
    Wins it returns belong to the caller's examples of those latents. exclude: window keys never
    used (the latent's own activating windows). shown: the longest window the caller shows of a
    negative (the contamination risk grows with it); default `window`.
    """
    rows = np.asarray(rows, np.int64)
    rng = np.random.default_rng([seed, latent])
    exclude = set(exclude)
    contamination = 1.0 - (1.0 - min(max(float(density), 0.0), 1.0)) ** (shown or window)
    if contamination <= MAX_CONTAMINATION and n_latents > 1:
        skip = {latent} | {int(x) for x in (neighbors if neighbors is not None else [])[:N_NEIGHBORS_EXCLUDED]
                           if x >= 0}
        cand = [j for j in dict.fromkeys(rng.integers(0, n_latents, NEG_CANDIDATES).tolist()) if j not in skip]
        s = ex.start(rows)
        own = (ex.doc[rows], s, s + ex.length[rows])
        picked: list[Win] = []
        keys: set[tuple[int, int, int]] = set()
        step = max(2 * n, 8)
        for k in range(0, len(cand), step):
            found = first_positive(cand[k:k + step])
            for j in cand[k:k + step]:
                w = found.get(j)
                if w is None or w.key in keys or w.key in exclude or _hits(w.doc, w.lo, w.hi, *own):
                    continue
                picked.append(w)
                keys.add(w.key)
                if len(picked) >= n:
                    return picked, "other_latents"
        if picked:
            return picked, "other_latents"
    picked = []
    for w in _zero_windows(ex, rows, latent, window, rng):
        if w.key not in exclude and len(picked) < n:
            picked.append(w)
            exclude.add(w.key)
    return picked, "own_zero_runs" if picked else "none"


def _zero_windows(ex: Examples, rows: np.ndarray, latent: int, window: int, rng) -> list[Win]:
    """Windows where the latent is known to be exactly 0 (its own windows show its activation on
    every token): the fixed blocks one of its windows shows without an activation, then stretches
    of >= MIN_ZERO_RUN zero tokens cut to `window` tokens; each group in random order."""
    blocks: list[Win] = []
    runs: list[Win] = []
    rows = rows[np.lexsort((ex.interval[rows], ex.rank[rows], ex.kind[rows]))]  # the same order whoever stored them
    for j in rows.tolist():
        f, m = int(ex.first[j]), int(ex.length[j])
        s = int(ex.start(j))
        zero = (np.asarray(ex.acts[j, f:f + m], np.float32) <= 0) & (ex.tokens[j, f:f + m] >= 0)
        d = int(ex.doc[j])
        for b in range(-(-s // window) * window, s + m - window + 1, window):
            if zero[b - s:b - s + window].all():
                blocks.append(Win(d, b, b + window, j, latent, True))
        edges = np.diff(np.concatenate([[0], zero.astype(np.int8), [0]]))
        for a, b in zip(np.nonzero(edges == 1)[0].tolist(), np.nonzero(edges == -1)[0].tolist()):
            if b - a >= MIN_ZERO_RUN:
                runs.append(Win(d, s + a, s + min(b, a + window), j, latent, False))
    return [blocks[k] for k in rng.permutation(len(blocks))] + [runs[k] for k in rng.permutation(len(runs))]


def zero_stretch(ex: Examples, w: Win, length: int) -> tuple[int, int]:
    """[lo, hi) indices into row w.row of up to `length` tokens around the zero window w, all of
    them 0 for the latent (to show a judge a longer non-activating window than the scorer's)."""
    f, m = int(ex.first[w.row]), int(ex.length[w.row])
    a = int(f + (w.lo - ex.start(w.row)))
    b = a + (w.hi - w.lo)
    zero = np.asarray(ex.acts[w.row], np.float32) <= 0
    lo, hi = a, b
    while lo > f and zero[lo - 1] and hi - lo < length:
        lo -= 1
    while hi < f + m and zero[hi] and hi - lo < length:
        hi += 1
    return lo, hi


@dataclass
class ScoringWindows:
    """Distinct windows (text and document span), and per latent the indices of its activating and
    non-activating ones."""

    texts: list[str] = field(default_factory=list)
    spans: list[tuple[int, int, int]] = field(default_factory=list)  # (doc, start, end)
    pos: list[list[int]] = field(default_factory=list)
    neg: list[list[int]] = field(default_factory=list)
    neg_source: list[str] = field(default_factory=list)  # per latent: other_latents, own_zero_runs or none
    blocks: int = 0  # how many of the windows are fixed blocks (the rest: centred or zero-run fallbacks)
    _index: dict = field(default_factory=dict, repr=False)

    def add(self, w: Win, text: str) -> int:
        j = self._index.get(w.key)
        if j is None:
            j = self._index[w.key] = len(self.texts)
            self.texts.append(text)
            self.spans.append(w.key)
            self.blocks += w.block
        return j


def select(examples: dict[str, np.ndarray], features: dict[str, np.ndarray], vocab: Sequence[str],
           n_pos: int | None = None, n_neg: int | None = None, seed: int = 0,
           window: int = WINDOW) -> ScoringWindows:
    """Windows for every latent of an analysis (trainer.analyze's examples.npz / features.npz)."""
    n_pos = N_POS if n_pos is None else n_pos
    n_neg = N_NEG if n_neg is None else n_neg
    n_latents = len(features["count"])
    density = np.asarray(features["density"], np.float64)
    neighbors = features.get("neighbor_ids")
    ex = Examples.from_analysis(examples)
    order = np.argsort(ex.latent, kind="stable")
    bounds = np.searchsorted(ex.latent[order], np.arange(n_latents + 1))
    out = ScoringWindows(pos=[[] for _ in range(n_latents)], neg=[[] for _ in range(n_latents)],
                         neg_source=["none"] * n_latents)
    pos: list[list[Win]] = []
    for i in range(n_latents):
        wins = positives(ex, order[bounds[i]:bounds[i + 1]], n_pos, window)
        texts = [ex.text(w, vocab) for w in wins]
        pos.append([w for w, t in zip(wins, texts) if t])
        out.pos[i] = [out.add(w, t) for w, t in zip(wins, texts) if t]
    first = {i: p[0] for i, p in enumerate(pos) if p}
    for i in range(n_latents):
        if not out.pos[i]:
            continue
        wins, source = negatives(ex, order[bounds[i]:bounds[i + 1]], i, density[i],
                                 None if neighbors is None else neighbors[i], n_latents, n_neg,
                                 lambda js: {j: first[j] for j in js if j in first}, seed, window,
                                 exclude=[w.key for w in pos[i]])
        texts = [ex.text(w, vocab) for w in wins]
        out.neg[i] = [out.add(w, t) for w, t in zip(wins, texts) if t]
        out.neg_source[i] = source if out.neg[i] else "none"
    return out
