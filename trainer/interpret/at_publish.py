"""The publish step that interprets every latent: a token-pattern explanation, its embedding score,
its vector for semantic search, and the SAE's shuffled-explanation baseline.

`prepare` does the slow part (embedding the windows) from the analysis files BEFORE publishing
opens its transaction, so the store is not locked meanwhile; `write` adds the rows inside the
publish transaction, so an SAE appears with its explanations or not at all.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import numpy as np
from sqlalchemy.orm import Session

from store import explanations
from store.models import SAE
from store.vectors import document_text
from trainer.interpret import embedding_scorer, token_pattern, windows
from trainer.interpret.embedder import Embedder

log = logging.getLogger(__name__)

EMBED_CHUNK = 4096  # texts per embed call: long enough to batch by length, short enough for a live progress bar


@dataclass
class Interpretation:
    """Everything `write` stores, computed from the analysis alone."""

    texts: list[str | None]  # per latent; None: it never fired
    aurocs: np.ndarray  # per latent; NaN where unscored
    n_pos: list[int]
    n_neg: list[int]
    neg_source: list[str]
    vectors: np.ndarray  # [latents with a text, d]: the explanation embeddings (documents)
    summary: dict  # the SAE's true vs shuffled comparison
    unscored: frozenset[int] = frozenset()  # explained latents whose score was not computed (a sampled publish)


def embed_all(embedder: Embedder, texts: list[str], progress: bool, what: str) -> np.ndarray:
    """Embed in chunks, with a progress bar for long lists."""
    from tqdm.auto import tqdm

    parts = []
    bar = tqdm(total=len(texts), desc=what, unit="text", disable=not progress or len(texts) < EMBED_CHUNK,
               mininterval=2.0)
    for k in range(0, len(texts), EMBED_CHUNK):
        parts.append(embedder.embed(texts[k:k + EMBED_CHUNK]))
        bar.update(min(EMBED_CHUNK, len(texts) - k))
    bar.close()
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


# The vectors of the latest texts embedded by prepare() in this process, by text, oldest first.
# SAEs analysed on the same token stream (a sweep, the demo's SAEs, the blocks of a transcoder
# set: same model, corpus, context length and seed) cut the same fixed blocks, so the next SAE
# published here finds many of its windows already embedded: of a light publish of the demo's
# 30-block set, 85 % of the scoring windows were embedded for an earlier block, 29 % for the one
# just before (BENCHMARKS.md, "Publishing a block of the demo's transcoder set").
_recent: dict[str, dict[str, np.ndarray]] = {}  # embedder name -> {text: vector}, least recently used first
RECENT_MAX = 100_000  # texts kept (~150 MB of float32 at 384 dimensions)


def embed_distinct(embedder: Embedder, texts: list[str], progress: bool, what: str) -> tuple[np.ndarray, int, int]:
    """Vectors for texts, each distinct text embedded once (or taken from the vectors of the last
    RECENT_MAX texts earlier calls saw); returns (vectors, distinct texts, texts embedded now)."""
    index: dict[str, int] = {}
    inverse = np.fromiter((index.setdefault(t, len(index)) for t in texts), np.int64, len(texts))
    distinct = list(index)
    known = _recent.get(embedder.name, {})
    todo = [t for t in distinct if t not in known]
    fresh = embed_all(embedder, todo, progress, what)
    width = fresh.shape[1] if len(todo) else (len(next(iter(known.values()))) if known else 0)
    vectors = np.zeros((len(distinct), width), np.float32)
    new = dict(zip(todo, fresh))
    for k, t in enumerate(distinct):
        vectors[k] = new[t] if t in new else known[t]
    _remember(embedder.name, distinct, vectors)
    return (vectors[inverse] if distinct else vectors), len(distinct), len(todo)


def _remember(name: str, texts: list[str], vectors: np.ndarray) -> None:
    """Keep these texts' vectors as the most recently used, and at most RECENT_MAX texts in all
    (of one embedder: vectors of two models are never mixed)."""
    if name not in _recent:
        _recent.clear()
    kept = _recent.setdefault(name, {})
    for text, vector in zip(texts[-RECENT_MAX:], vectors[-RECENT_MAX:]):
        kept.pop(text, None)
        kept[text] = vector.copy()  # a row of its own: a kept view would hold its whole call's array
    for text in list(itertools.islice(kept, max(0, len(kept) - RECENT_MAX))):
        del kept[text]


def prepare(examples: dict, features: dict, vocab: list[str], embedder: Embedder, progress: bool = True,
            seed: int = 0, n_pos: int | None = None, n_neg: int | None = None,
            score_sample: int | None = None) -> Interpretation:
    """Token-pattern explanations, scoring windows and every embedding, from an analysis's files.

    score_sample: score the embedding AUROC of at most this many explained latents, drawn at random
    (seeded), and embed only their windows; every latent still gets its explanation and its search
    vector, and the others are recorded as not scored (Interpretation.unscored). None: all."""
    started = time.perf_counter()
    n_pos = windows.N_POS if n_pos is None else n_pos
    n_neg = windows.N_NEG if n_neg is None else n_neg
    n = len(features["count"])

    def text(t: int) -> str:
        return vocab[t] if 0 <= t < len(vocab) else f"<{t}>"

    stats = token_pattern.stats_from_analysis(examples, features)
    texts = [token_pattern.describe(st, text) for st in stats]
    t_explain = time.perf_counter() - started
    window = windows.scoring_window()
    wins = windows.select(examples, features, vocab, n_pos=n_pos, n_neg=n_neg, seed=seed, window=window)
    t_windows = time.perf_counter() - started - t_explain
    explained = [i for i, t in enumerate(texts) if t]
    to_score = explained
    if score_sample is not None and score_sample < len(explained):
        pick = np.random.default_rng(seed).choice(len(explained), size=max(score_sample, 0), replace=False)
        to_score = sorted(explained[j] for j in pick.tolist())
    # the windows embedded: all of them, or (sampled) those of the latents to score
    used = (list(range(len(wins.texts))) if to_score is explained
            else sorted({j for i in to_score for j in wins.pos[i] + wins.neg[i]}))
    n_win, n_expl, n_q = len(used), len(explained), len(to_score)
    # one pass over every text, so they batch by length together; the explanation as a search
    # document and as the scorer's query (delphi's prefix) are two texts
    everything = ([wins.texts[j] for j in used] + [document_text(texts[i]) for i in explained]
                  + [embedding_scorer.query_text(texts[i]) for i in to_score])
    vecs, distinct, embedded = embed_distinct(embedder, everything, progress, "embedding windows and explanations")
    docs, queries = vecs[n_win:n_win + n_expl], vecs[n_win + n_expl:]
    window_vecs = np.zeros((len(wins.texts), vecs.shape[1] if vecs.ndim == 2 else 0), np.float32)
    window_vecs[used] = vecs[:n_win]
    t_embed = time.perf_counter() - started - t_explain - t_windows
    aurocs = np.full(n, np.nan)
    if to_score and n_win:
        q = np.zeros((n, queries.shape[1]), np.float32)
        q[to_score] = queries
        aurocs[to_score] = embedding_scorer.score_latents(q, window_vecs, wins.pos, wins.neg, to_score)
        scored = [i for i in to_score if np.isfinite(aurocs[i])]
        if len(scored) >= 2:
            shuffled = embedding_scorer.shuffled_scores(q, window_vecs, wins.pos, wins.neg, scored, seed)
            result = embedding_scorer.paired_comparison(aurocs[scored], shuffled)
        else:
            result = embedding_scorer.paired_comparison(np.zeros(0), np.zeros(0))
    else:
        result = embedding_scorer.paired_comparison(np.zeros(0), np.zeros(0))
    total = time.perf_counter() - started
    result.update({
        "scorer": embedding_scorer.SCORER, "explainer": token_pattern.EXPLAINER, "method": token_pattern.METHOD,
        "model": embedder.name, "explained": n_expl, "latents": n, "n_pos": n_pos, "n_neg": n_neg, "window": window,
        "windows": n_win, "score_sample": score_sample, "latents_scored": n_q, "fixed_blocks": wins.blocks, "distinct_texts": distinct, "texts_embedded": embedded,
        "embedding_dtype": embedder.precision() if hasattr(embedder, "precision") else None,
        "negatives_from": {s: wins.neg_source.count(s) for s in ("other_latents", "own_zero_runs", "none")},
        "seconds": {"explain": round(t_explain, 2), "windows": round(t_windows, 2), "embed": round(t_embed, 2),
                    "total": round(total, 2)},
        "texts_per_s": round(embedded / t_embed, 1) if t_embed > 0 and embedded else None,
    })
    log.info("token-pattern explanations for %d of %d latents; %d texts embedded (%d distinct); embedding AUROC %s "
             "vs shuffled %s (p=%s) in %.1f s", n_expl, n, embedded, distinct, result["true_mean"], result["shuffled_mean"],
             result["p_value"], total)
    return Interpretation(texts=texts, aurocs=aurocs, n_pos=[len(p) for p in wins.pos],
                          n_neg=[len(x) for x in wins.neg], neg_source=wins.neg_source, vectors=docs,
                          summary=result, unscored=frozenset(explained) - frozenset(to_score))


def write(session: Session, sae: SAE, feature_ids: np.ndarray, interp: Interpretation) -> int:
    """Explanations, their vectors, the features' explanation column and the SAE's baseline."""
    s = interp.summary
    baseline = {k: s.get(k) for k in ("shuffled_mean", "shuffled_std", "true_mean", "diff_mean", "p_value", "n")}
    rows, latents = [], []
    for i, text in enumerate(interp.texts):
        if not text:
            continue
        a = interp.aurocs[i]
        latents.append(i)
        if i in interp.unscored:
            embedding = {"auroc": None, "not_computed": f"published with the embedding AUROC of a sample of "
                         f"{s.get('latents_scored')} latents only", "model": s["model"], "baseline": baseline}
        else:
            embedding = {"auroc": float(a) if np.isfinite(a) else None, "n_pos": interp.n_pos[i],
                         "n_neg": interp.n_neg[i], "negatives_from": interp.neg_source[i],
                         "model": s["model"], "baseline": baseline}
        rows.append({
            "feature_id": int(feature_ids[i]), "text": text, "method": token_pattern.METHOD,
            "explainer": token_pattern.EXPLAINER, "prompt": None, "raw_response": None,
            "embedding_score": float(a) if np.isfinite(a) else None,
            "scores": {"embedding": embedding},
        })
    if not rows:
        return 0
    explanations.insert_explanations(session, sae.id, rows, interp.vectors, s["model"])
    explanations.set_feature_explanations(session, {int(feature_ids[i]): interp.texts[i] for i in latents})
    sae.metrics = {**(sae.metrics or {}), "autointerp": s}
    return len(rows)
