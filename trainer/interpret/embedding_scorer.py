"""The embedding scorer (delphi's EmbeddingScorer) and the shuffled-explanation baseline.

As in delphi: the explanation is embedded as a retrieval query (query_text; delphi's instruction
prefix only for instruction-tuned models), each held-out activating and non-activating window is
embedded as plain text (windows.py: 6 tokens by default, where delphi embeds 32), and the score is the AUROC of
their cosine similarity to the query, activating vs not (delphi's result analysis: sklearn's
roc_auc_score of the similarities). AUROC is the probability that a random activating window is
more similar than a random non-activating one (ties count a half): 0.5 is chance, 1 perfect.
It needs no LM, so every explanation gets a score offline.

What "better than chance" means for one SAE is measured, not assumed: the same scorer with the
explanations permuted across latents (each latent scored with another latent's explanation) gives
the shuffled baseline; true minus shuffled is paired by latent and tested with the Wilcoxon
signed-rank test (AUROC differences are bounded and lumpy, so no normality is assumed).
"""

from __future__ import annotations

import numpy as np

from store.vectors import plain
from trainer.interpret.token_pattern import AFTER, PROMOTES, chip_tokens

# delphi/scorers/embedding/embedding.py puts this before the explanation, for its instruction-tuned
# embedding model. The bundled all-MiniLM-L6-v2 is not one: on the demo SAE (4,545 latents) the
# prefix cut the true-minus-shuffled AUROC from 0.065 to 0.047, so it is a setting
# (embedding_query_prefix), empty by default.
DELPHI_QUERY_PREFIX = "Instruct: Retrieve sentences that could be related to the explanation.\nQuery:"
SCORER = "embedding"


def query_text(explanation: str, prefix: str | None = None) -> str:
    """What is embedded to score an explanation: the prefix (default: the embedding_query_prefix
    setting), then the explanation's input side.

    An LM's explanation is embedded as written. A token-pattern explanation is embedded as the bare
    tokens its chips show on the input side, the ones before the peak first ("after ‹This›/‹It›"
    then ‹ just› reads "This It just"): that is what its activating windows contain. The tokens
    it promotes describe its output, not the windows it fires on, and the words around the chips
    ("the word", "right parenthesis", the shares) are for people. Measured on the demo SAE, each
    step widened the gap between true and shuffled explanations (BENCHMARKS.md,
    benchmarks/embedding_queries.py)."""
    if prefix is None:
        from store.settings import get_settings

        prefix = get_settings().embedding_query_prefix
    inputs = explanation.split(PROMOTES)[0]
    if "‹" not in inputs:
        return prefix + plain(inputs)
    peaks, _, before = inputs.partition(AFTER)
    return prefix + " ".join(chip_tokens(before) + chip_tokens(peaks))


def auroc(positive: np.ndarray, negative: np.ndarray) -> float | None:
    """Area under the ROC curve of scores separating positives from negatives (ties count 1/2)."""
    p = np.asarray(positive, np.float64).ravel()
    n = np.asarray(negative, np.float64).ravel()
    if not p.size or not n.size:
        return None
    greater = (p[:, None] > n[None, :]).sum()
    ties = (p[:, None] == n[None, :]).sum()
    return float((greater + 0.5 * ties) / (p.size * n.size))


def score_latents(queries: np.ndarray, windows: np.ndarray, pos: list[list[int]], neg: list[list[int]],
                  which: list[int] | np.ndarray, assign: np.ndarray | None = None) -> np.ndarray:
    """AUROC for each latent i in `which`: the query of latent assign[i] (default i) against i's windows.

    queries [n_latents, d] and windows [n_windows, d] are unit vectors; NaN where a latent has no
    activating or no non-activating window.
    """
    out = np.full(len(which), np.nan)
    for k, i in enumerate(which):
        if not pos[i] or not neg[i]:
            continue
        q = queries[i if assign is None else assign[i]]
        a = auroc(windows[pos[i]] @ q, windows[neg[i]] @ q)
        out[k] = np.nan if a is None else a
    return out


def derangement(n: int, seed: int) -> np.ndarray:
    """A random permutation of range(n) with no fixed point (n >= 2): nobody keeps its own explanation."""
    if n < 2:
        raise ValueError("a derangement needs at least two items")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    for i in np.nonzero(perm == np.arange(n))[0]:  # swap each fixed point with a random other slot
        j = int(rng.integers(n - 1))
        j += j >= i
        perm[i], perm[j] = perm[j], perm[i]
    while (fixed := np.nonzero(perm == np.arange(n))[0]).size:  # a swap can (rarely) create one
        i = int(fixed[0])
        j = (i + 1) % n
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def shuffled_scores(queries: np.ndarray, windows: np.ndarray, pos: list[list[int]], neg: list[list[int]],
                    which: list[int], seed: int = 0) -> np.ndarray:
    """The shuffled baseline: each latent in `which` scored with another latent's explanation."""
    which = list(which)
    assign = np.arange(len(queries))
    perm = derangement(len(which), seed)
    assign[np.asarray(which)] = np.asarray(which)[perm]
    return score_latents(queries, windows, pos, neg, which, assign)


def paired_comparison(true: np.ndarray, shuffled: np.ndarray) -> dict:
    """Mean true and shuffled score, their paired difference and its Wilcoxon signed-rank p-value."""
    from scipy.stats import wilcoxon

    t, s = np.asarray(true, np.float64), np.asarray(shuffled, np.float64)
    ok = np.isfinite(t) & np.isfinite(s)
    t, s = t[ok], s[ok]
    d = t - s
    out = {"n": int(ok.sum()), "true_mean": _r(t.mean()) if t.size else None,
           "shuffled_mean": _r(s.mean()) if s.size else None, "diff_mean": _r(d.mean()) if d.size else None,
           "shuffled_std": _r(s.std(ddof=1)) if s.size > 1 else None, "test": "wilcoxon signed-rank, two-sided",
           "p_value": None}
    if d.size >= 2 and np.any(d != 0):
        out["p_value"] = float(wilcoxon(t, s).pvalue)
    return out


def _r(x: float) -> float:
    return float(f"{float(x):.4g}")
