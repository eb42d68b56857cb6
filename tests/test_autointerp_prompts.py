"""Prompts, example selection, answer parsing and score arithmetic (pure functions, no model)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from app.autointerp.backends import InstantBackend
from app.autointerp.prompts import (
    InvalidExplanation,
    InvalidParams,
    PromptConfig,
    StoredExample,
    TooFewExamples,
    Window,
    clean_explanation,
    explain_messages,
    render,
    split_examples,
    to_window,
    token_text,
)
from app.autointerp.scoring import JudgedExample, Score, detection, fuzzing, parse_answers
from store.models import ExampleKind

KIND_TOP, KIND_INTERVAL, KIND_RANDOM = ExampleKind.top, ExampleKind.interval, ExampleKind.random

VOCAB = [f" w{i}" for i in range(100)] + ["\n", "<|im_end|>"]


def vocab_text(i: int) -> str:
    return VOCAB[i]


def example(kind: int, rank: int, doc: int, act: float = 5.0, interval: int | None = None, n: int = 45,
            peak: int = 32, ex_id: int | None = None) -> StoredExample:
    rng = np.random.default_rng(doc)
    acts = np.zeros(n, dtype=np.float32)
    acts[peak] = act
    acts[peak - 1] = 0.2 * act  # below the 0.3 x max mark threshold
    acts[peak + 2] = 0.5 * act
    return StoredExample(id=ex_id or doc + 1, kind=kind, rank=rank, interval=interval, activation=act, peak=peak,
                         doc_id=doc, doc_offset=1000, token_ids=rng.integers(0, 100, n).astype("<i4"), acts=acts)


def feature_examples() -> list[StoredExample]:
    out = [example(KIND_TOP, r, doc=r, act=10 - 0.2 * r) for r in range(20)]
    out += [example(KIND_INTERVAL, r, doc=100 + 10 * i + r, act=i + 0.5, interval=i) for i in range(10)
            for r in range(3)]
    out += [example(KIND_RANDOM, r, doc=500 + r, act=2.0) for r in range(10)]
    out.append(example(KIND_RANDOM, 10, doc=3, act=9.4))  # the same activation as top rank 3
    return out


def test_window_puts_the_peak_three_quarters_in():
    # the one centred-window rule (trainer.interpret.windows.centred_start), as the explainer's windows use it
    for n, peak, lo in ((45, 32, 9), (45, 3, 0), (45, 40, 13), (20, 10, 0)):  # peak at index 23 of 32 when it can
        ex = example(KIND_TOP, 0, doc=1, n=n, peak=peak)
        w = to_window(ex, vocab_text, PromptConfig())
        assert w.tokens == tuple(vocab_text(int(t)) for t in ex.token_ids[lo:lo + 32]) and w.start == ex.span[0] + lo


def test_split_keeps_held_out_examples_away_from_the_explainer():
    cfg = PromptConfig()
    split = split_examples(feature_examples(), vocab_text, cfg, latent=0)
    assert split.n_distinct == 60  # the duplicated activation counted once
    explain_docs = {w.doc_id for w in split.explain}
    held_docs = {w.doc_id for w in split.held_out}
    assert not explain_docs & held_docs
    tops = [w for w in split.explain if w.source == "top"]
    assert [w.doc_id for w in tops] == list(range(cfg.n_explain_top))  # the very top: never held out
    # held out as publish holds out (trainer.interpret.windows): the random sample (docs 500-509;
    # the one that repeats top rank 3 overlaps it), then the highest intervals (9, 8, 7, then 6)
    assert len(split.held_out) == cfg.n_score
    assert [w.doc_id for w in split.held_out] == (list(range(500, 510)) + [190, 191, 192, 180, 181, 182, 170, 171,
                                                                            172, 160])
    # the explainer gets the intervals left, spread over their groups from the top
    intervals = [w for w in split.explain if w.source == "interval"]
    assert [w.doc_id for w in intervals] == [161, 150, 140, 130, 120, 110, 100, 162, 151, 141, 131, 121]
    for w in split.explain + split.held_out:
        assert len(w.tokens) == cfg.window and w.activating
        assert w.acts.index(max(w.acts)) == 23


def test_too_few_examples():
    with pytest.raises(TooFewExamples, match="3 distinct activating examples"):
        split_examples([example(KIND_TOP, r, doc=r) for r in range(3)], vocab_text, PromptConfig(), latent=0)


def test_render_marks_active_tokens_and_escapes():
    w = Window(tokens=(" the", " big", " cat", "\\n", " sat"), acts=(0.0, 3.0, 2.0, 0.0, 0.5), activating=True,
               source="top", example_id=1, doc_id=0, start=0)
    assert render(w, w.active_positions(0.3)) == "the <<big cat>>\\n sat"
    assert render(w) == "the big cat\\n sat"
    assert token_text("\n") == "\\n" and token_text("<|im_end|>") == "[im_end]"


def test_explainer_prompt_lists_examples_and_activations():
    cfg = PromptConfig(show_activations=True)
    split = split_examples(feature_examples(), vocab_text, cfg, latent=0)
    messages = explain_messages(split.explain, cfg, scale=10.0)
    user = messages[-1]["content"]
    assert messages[0]["role"] == "system" and [m["role"] for m in messages[1:]] == ["user", "assistant", "user"]
    assert user.count("Example ") == len(split.explain) and user.count("<<") >= len(split.explain)
    assert "Activations 1: ('w" in user and ", 10)" in user  # the top example peaks at 10 on the 0-10 scale
    small = PromptConfig.for_backend("local", {"n_score": "4", "unknown": 1, "one_shot": "false"})
    assert small.n_score == 4 and not small.show_activations and small.per_prompt == 1 and not small.one_shot
    with pytest.raises(InvalidParams, match="n_score='many' is not a valid int"):
        PromptConfig.for_backend("openai", {"n_score": "many"})
    assert "Activations" not in explain_messages(split.explain, small, 10.0)[-1]["content"]


@pytest.mark.parametrize("raw, expected", [
    ("Explanation: words introducing a reason.", "words introducing a reason"),
    ('"numbers in dates".', "numbers in dates"),
    ("This feature detects **closing brackets** in code", "closing brackets in code"),
    ("- the token 'def'\nmore text", "the token 'def'"),
])
def test_clean_explanation(raw, expected):
    assert clean_explanation(raw, PromptConfig()) == expected


@pytest.mark.parametrize("raw, problem", [
    ("", "nothing"), ("   \n ", "nothing"), ("x" * 300, "not one short phrase"), ("12 34 !! ??", "look like words"),
    ("a type of a type of a type of a type of a type of a type", "repeats itself"),
])
def test_unusable_explanations_are_rejected(raw, problem):
    with pytest.raises(InvalidExplanation, match=problem):
        clean_explanation(raw, PromptConfig())


@pytest.mark.parametrize("answer, n, expected", [
    ("Example 1: yes\nExample 2: no\nExample 3: YES", 3, [True, False, True]),
    ("Example 2: no\nExample 1: yes", 2, [True, False]),
    ("1. yes\n2) no\n3: is not active", 3, [True, False, False]),
    ("[1, 0, 1]", 3, [True, False, True]),
    ('["yes", "no"]', 2, [True, False]),
    ("yes no yes", 3, [True, False, True]),
    ("Example 1: yes\nExample 3: no", 3, [True, None, False]),  # a missing answer stays missing
    ("Example 1: yes\nExample 1: no", 1, [None]),  # contradicting itself
    ("Example N: yes", 2, [None, None]),
    ("I cannot tell.", 2, [None, None]),
    ("The feature is not active here.", 1, [False]),
    ("Yes.", 1, [True]),
])
def test_parse_answers(answer, n, expected):
    assert parse_answers(answer, n) == expected


def test_unparsable_answers_count_as_wrong():
    s = Score("detection", [
        JudgedExample("detection", 1, "a", True, True, ""), JudgedExample("detection", 2, "b", True, None, "?"),
        JudgedExample("detection", None, "c", False, False, ""),
        JudgedExample("detection", None, "d", False, None, "?"),
    ])
    assert (s.tp, s.fn, s.tn, s.fp, s.unparsed) == (1, 1, 1, 1, 2)
    assert s.balanced_accuracy == pytest.approx(0.5) and s.f1 == pytest.approx(0.5)
    assert Score("x", [JudgedExample("x", 1, "a", True, True, "")]).balanced_accuracy is None  # no negatives


def test_a_judge_nobody_can_read_scores_chance():
    """The module's documented rule: a judge that gives every example the same answer, nothing
    readable included, scores 0.5 and is flagged uninformative (one unreadable answer among
    readable ones still counts as wrong)."""
    truths = [True] * 4 + [False] * 3
    unread = Score("detection", [JudgedExample("detection", k, "t", t, None, "???") for k, t in enumerate(truths)])
    assert unread.balanced_accuracy == 0.5 and unread.uninformative and unread.constant_answer == "unreadable"
    assert unread.summary()["balanced_accuracy"] == 0.5 and unread.f1 == 0.0
    one_read = Score("detection", unread.items[:-1] + [JudgedExample("detection", 9, "t", False, False, "no")])
    assert one_read.balanced_accuracy == pytest.approx((0 / 4 + 1 / 3) / 2)


def test_scorers_judge_every_example_and_keep_answers():
    cfg = PromptConfig(per_prompt=5)
    split = split_examples(feature_examples(), vocab_text, cfg, latent=0)
    negatives = [to_window(example(KIND_TOP, 0, doc=d), vocab_text, cfg, activating=False, source="negative",
                           zero_acts=True) for d in (900, 901, 902)]
    positives = split.held_out[:7]
    backend = InstantBackend()

    det = asyncio.run(detection(backend, "w-things", positives, negatives, cfg, seed=0))
    assert len(det.items) == 10 and sum(j.truth for j in det.items) == 7
    assert backend.stats.requests == 2  # 10 examples, 5 to a prompt
    assert all(j.raw.startswith("Example 1:") and j.prediction is not None for j in det.items)
    assert {j.example_id for j in det.items if j.truth} == {w.example_id for w in positives}
    assert all("<<" not in j.text for j in det.items)  # detection shows unmarked text

    fz = asyncio.run(fuzzing(backend, "w-things", positives, negatives, cfg, seed=0))
    assert len(fz.items) == 10 and all("<<" in j.text for j in fz.items)
    assert 0.0 <= fz.balanced_accuracy <= 1.0
