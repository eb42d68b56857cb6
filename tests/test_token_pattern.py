"""Token-pattern explanations, scoring windows, AUROC, the shuffled baseline and score intervals.

Expected values come from the tools' own documentation: sklearn's roc_auc_score docstring example,
scipy's Mann-Whitney U, Newcombe (1998)'s table of Wilson intervals, the issue's example wording.
"""

from __future__ import annotations

import numpy as np
import pytest

from app.autointerp.scoring import JudgedExample, Score, wilson_interval
from store.vectors import plain
from trainer.interpret import embedding_scorer, token_pattern, windows

VOCAB = ["<s>", "This", "It", " just", " simply", "accred", "ited", "itation", ")", " x", "(", " the", "\n"]


def vt(t: int) -> str:
    return VOCAB[t]


def test_describe_matches_the_issue_wording():
    # 10 top examples of latent 0, all peaking on " just", after "This" (6) or "It" (4)
    tokens = np.full((10, 5), 11)
    tokens[:, 3] = 3
    tokens[:6, 2] = 1
    tokens[6:, 2] = 2
    promotes = np.array([[5, 6, 7]])
    (st,) = token_pattern.stats_from_windows(np.zeros(10), tokens, np.full(10, 3), 1, promotes)
    assert st.n_top == 10 and st.peak == [(3, 1.0)] and st.before == [(1, 0.6), (2, 0.4)]
    # the issue's wording, with what the token is in words in front ("the word just" finds it)
    text = token_pattern.describe(st, vt)
    assert text == "the word ‹ just› (100 % of top examples), after ‹This›/‹It›; promotes ‹accred›, ‹ited›, ‹itation›"
    lines = token_pattern.prompt_lines(st, vt)
    assert lines[0] == "Tokens the top examples peak on: ‹ just› (100 %)" and "‹accred›" in lines[2]
    # what the embedding model reads: chips as quotes (it has no ‹), shares left out
    assert plain(text) == 'the word "just", after "This"/"It"; promotes "accred", "ited", "itation"'
    # the scorer's query: the bare tokens of the input side (what the windows can show), the ones
    # before the peak first; nothing it promotes, no instruction for MiniLM
    assert embedding_scorer.query_text(text) == "This It just"
    assert embedding_scorer.query_text("‹)› right parenthesis (60 % of top examples), ‹↵› newline (5 %)") == ") \n"
    assert embedding_scorer.query_text("fires on commas", prefix="Query:") == "Query:fires on commas"
    assert plain("fires on (5 %) of lines") == "fires on (5 %) of lines"  # no chips: untouched


def test_describe_names_up_to_five_peak_tokens_above_five_percent():
    # 20 top examples peaking on six different tokens: 8, 4, 3, 2, 2 and 1 of them
    peaks = [3] * 8 + [5] * 4 + [6] * 3 + [7] * 2 + [8] * 2 + [9]
    tokens = np.full((20, 4), -1)  # nothing before or after the peak
    tokens[:, 2] = peaks
    (st,) = token_pattern.stats_from_windows(np.zeros(20), tokens, np.full(20, 2), 1)
    text = token_pattern.describe(st, vt)
    # the sixth (1 of 20 = 5 %) is cut by the count, not the share; shares are of the top examples
    assert text.count("‹") == 5 and "(40 % of top examples)" in text and "(10 %)" in text
    assert embedding_scorer.query_text(text) == " ".join(vt(t).strip() for t in (3, 5, 6, 7, 8))


def test_token_kinds():
    kinds = {t: token_pattern.kind_of(t) for t in (" just", "This", "ited", " 1999", "__init__", "  ")}
    assert kinds == {" just": "the word", "This": "the word", "ited": "the word piece", " 1999": "the number",
                     "__init__": "the token", "  ": None}


def test_describe_names_punctuation_lists_runners_up_and_skips_dead_latents():
    tokens = np.full((10, 4), 9)
    tokens[:7, 2] = 8
    tokens[7:, 2] = 10
    (st, dead) = token_pattern.stats_from_windows(np.zeros(10), tokens, np.full(10, 2), 2)
    text = token_pattern.describe(st, vt)
    assert text.startswith("‹)› right parenthesis (70 % of top examples), ‹(› left parenthesis (30 %)")
    assert ", after ‹ x›" in text  # every peak follows " x"
    assert token_pattern.describe(dead, vt) is None  # never fired: nothing to say
    assert token_pattern.token_name("\n") == "newline" and token_pattern.token_name(" just") is None
    assert token_pattern.token_name("),") == "right parenthesis + comma"
    assert token_pattern.chip("a\nb\t") == "‹a↵b⇥›" and token_pattern.chip("\x00") == "‹\\x00›"  # no NUL in PostgreSQL


def test_auroc_matches_sklearn_and_mann_whitney():
    from scipy.stats import mannwhitneyu

    # sklearn.metrics.roc_auc_score docstring: y_true [0, 0, 1, 1], y_score [0.1, 0.4, 0.35, 0.8] -> 0.75
    assert embedding_scorer.auroc([0.35, 0.8], [0.1, 0.4]) == pytest.approx(0.75)
    assert embedding_scorer.auroc([0.5, 0.5], [0.5]) == 0.5  # ties count a half
    assert embedding_scorer.auroc([], [0.1]) is None
    rng = np.random.default_rng(0)
    p, n = rng.normal(0.3, 1, 17).round(1), rng.normal(0, 1, 11).round(1)  # rounded: ties happen
    assert embedding_scorer.auroc(p, n) == pytest.approx(mannwhitneyu(p, n).statistic / (17 * 11))


def test_derangement_and_shuffled_baseline():
    for seed in range(20):
        perm = embedding_scorer.derangement(7, seed)
        assert sorted(perm.tolist()) == list(range(7)) and not (perm == np.arange(7)).any()
    # three latents whose explanation points exactly at their own activating windows
    q = np.eye(3, dtype=np.float32)
    w = np.concatenate([np.eye(3), np.eye(3) * 0.1 + 0.05]).astype(np.float32)
    pos = [[0], [1], [2]]
    neg = [[1, 2], [0, 2], [0, 1]]
    true = embedding_scorer.score_latents(q, w, pos, neg, [0, 1, 2])
    shuffled = embedding_scorer.shuffled_scores(q, w, pos, neg, [0, 1, 2], seed=1)
    assert true.tolist() == [1.0, 1.0, 1.0] and (shuffled < 1.0).all()
    cmp = embedding_scorer.paired_comparison(true, shuffled)
    assert cmp["n"] == 3 and cmp["diff_mean"] > 0 and cmp["p_value"] is not None


def test_wilson_interval_matches_newcombe_1998():
    lo, hi = wilson_interval(81, 263)
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and round(hi, 4) == 0.1611
    lo, hi = wilson_interval(15, 148)
    assert (round(lo, 4), round(hi, 4)) == (0.0624, 0.1605)


def _score(preds: list[bool | None], truths: list[bool]) -> Score:
    return Score("detection", [JudgedExample("detection", None, "t", t, p, "raw") for p, t in zip(preds, truths)])


def test_constant_judges_are_flagged_and_intervals_follow_n():
    truths = [True] * 6 + [False] * 6
    yes = _score([True] * 12, truths)
    assert yes.balanced_accuracy == 0.5 and yes.uninformative and yes.constant_answer == "yes"
    assert _score([None] * 12, truths).constant_answer == "unreadable"
    good = _score(truths, truths)
    assert not good.uninformative and good.balanced_accuracy == 1.0
    s = good.summary()
    assert s["ci"][1] == 1.0 and s["ci"][0] == pytest.approx(wilson_interval(12, 12)[0], abs=1e-4)
    big = _score(truths * 10, truths * 10)
    assert big.ci[0] > good.ci[0]  # more examples, narrower interval


def _analysis():
    """Three latents in one document stream: 0 and 1 sparse, 2 dense (so it gets zero-run negatives)."""
    rows = []
    W, peak = 45, 32
    for lat in range(3):
        for kind, n in ((0, 3), (1, 4), (2, 4)):
            for r in range(n):
                pos = 1000 * lat + 100 * kind + 20 * r + 200
                tok = (np.arange(W) + pos) % 997
                acts = np.zeros(W, np.float16)
                acts[peak] = 1.0
                rows.append((lat, kind, r, r % 3 if kind == 1 else -1, 7, pos, tok, acts))
    ex = {"feature": np.array([r[0] for r in rows]), "kind": np.array([r[1] for r in rows], np.int8),
          "rank": np.array([r[2] for r in rows], np.int16), "interval": np.array([r[3] for r in rows], np.int8),
          "doc_id": np.array([r[4] for r in rows]), "doc_pos": np.array([r[5] for r in rows]),
          "tokens": np.stack([r[6] for r in rows]).astype(np.int32), "acts": np.stack([r[7] for r in rows]),
          "peak": np.full(len(rows), peak, np.int16)}
    feats = {"count": np.array([5, 5, 500]), "density": np.array([1e-4, 1e-4, 0.5]),
             "neighbor_ids": np.array([[1, 2], [0, 2], [0, 1]])}
    return ex, feats


def test_scoring_windows_hold_out_top_examples_and_pick_safe_negatives():
    ex, feats = _analysis()
    vocab = [f"w{i} " for i in range(997)]
    sw = windows.select(ex, feats, vocab, n_pos=3, n_neg=3, seed=0)
    assert all(len(p) == 3 for p in sw.pos)
    # the dense latent 2 gets stretches of its own windows where it is 0
    assert sw.neg_source[2] == "own_zero_runs" and sw.neg[2]
    feats["neighbor_ids"] = np.array([[-1, -1], [-1, -1], [-1, -1]])
    sw = windows.select(ex, feats, vocab, n_pos=3, n_neg=3, seed=0)
    assert sw.neg_source[0] == "other_latents" and set(sw.neg[0]).isdisjoint(sw.pos[0])
    assert all(k in sw.pos[1] + sw.pos[2] for k in sw.neg[0])
    assert len(sw.texts) == len(set(sw.texts))  # each distinct window embedded once
    assert all(len(t.split()) <= windows.WINDOW for t in sw.texts)


T, BEFORE, AFTER = 128, 32, 12  # context length, example window: 32 tokens before the peak, 12 after


def _stream_analysis(rows: list[tuple[int, int, int, int]], density: list[float]):
    """An analysis of one document cut into contexts of 128 tokens (BOS excluded), token at document
    position g = g % 997; rows are (latent, kind, rank, position of the activation), each latent
    firing only there."""
    out = {k: [] for k in ("feature", "kind", "rank", "interval", "doc_id", "doc_pos", "tokens", "acts")}
    fires = {}
    for lat, kind, rank, g in rows:
        fires.setdefault(lat, set()).add(g)
    for lat, kind, rank, g in rows:
        pos = np.arange(g - BEFORE, g + AFTER + 1)
        ctx0 = (g // T) * T
        inside = (pos > ctx0) & (pos < ctx0 + T)  # the window stays in its context; BOS (pos == ctx0) excluded
        out["tokens"].append(np.where(inside, pos % 997, -1))
        out["acts"].append(np.where(inside & np.isin(pos, list(fires[lat])), 1.0, 0.0))
        for k, v in (("feature", lat), ("kind", kind), ("rank", rank), ("interval", 3 if kind == 1 else -1),
                     ("doc_id", 0), ("doc_pos", g)):
            out[k].append(v)
    ex = {k: np.asarray(v) for k, v in out.items()}
    ex["tokens"] = ex["tokens"].astype(np.int32)
    ex["acts"] = ex["acts"].astype(np.float16)
    ex["peak"] = np.full(len(rows), BEFORE, np.int16)
    n = len(density)
    feats = {"count": np.full(n, 10), "density": np.asarray(density), "neighbor_ids": np.full((n, 2), -1)}
    return ex, feats


def test_fixed_block_windows_are_shared_held_out_and_fall_back_when_cut():
    top, interval, rand = 0, 1, 2
    rows = [(0, top, 0, 40), (0, rand, 0, 66), (0, rand, 1, 70), (0, rand, 2, 45), (0, rand, 3, 200),
            (1, rand, 0, 68), (1, rand, 1, 258), (1, interval, 0, 220), (1, top, 0, 350),
            (2, top, 0, 10), (2, rand, 0, 60), (2, rand, 1, 105), (3, rand, 0, 350)]
    ex, feats = _stream_analysis(rows, density=[1e-4, 1e-4, 0.5, 1e-4])
    vocab = [f"w{i} " for i in range(997)]
    sw = windows.select(ex, feats, vocab, n_pos=3, n_neg=3, seed=0, window=8)
    span = [sw.spans[k][1:] for k in range(len(sw.spans))]
    # latent 0: the block [64, 72) (activations at 66 and 70: one window) and [200, 208); its
    # activation at 45 is in the block [40, 48), which overlaps its top example's window [8, 53)
    assert [span[k] for k in sw.pos[0]] == [(64, 72), (200, 208)]
    assert sw.texts[sw.pos[0][0]] == "".join(f"w{g} " for g in range(64, 72))
    # latent 1 fires in the same block at 68: the same window, embedded once
    assert sw.pos[1][0] == sw.pos[0][0]
    # ... and at 258, in the block [256, 264) whose first token is the context's excluded BOS: the
    # window centred on the activation, moved to start at the window's first token; then its
    # interval example's block
    assert [span[k] for k in sw.pos[1]] == [(64, 72), (257, 265), (216, 224)]
    assert len(set(sw.spans)) == len(sw.spans) == len(sw.texts)
    # negatives of sparse latents: other latents' first windows away from every window of their own:
    # latent 1's [64, 72) and latent 2's [56, 64) overlap latent 0's windows, latent 3's [344, 352) does not
    assert sw.neg_source[0] == "other_latents" and [span[k] for k in sw.neg[0]] == [(344, 352)]
    # the dense latent 2 (firing at 10, 60, 105): blocks its windows [1, 23), [28, 73), [73, 118) show all 0
    assert sw.neg_source[2] == "own_zero_runs" and len(sw.neg[2]) == 3
    assert {span[k] for k in sw.neg[2]} <= {(b, b + 8) for b in (32, 40, 48, 64, 80, 88, 96)}
    # a decoder neighbour's windows are never negatives: then latent 0 has its own zero stretches
    feats["neighbor_ids"][0] = [3, -1]
    sw = windows.select(ex, feats, vocab, n_pos=3, n_neg=3, seed=0, window=8)
    assert sw.neg_source[0] == "own_zero_runs" and not set(sw.neg[0]) & set(sw.pos[3])
