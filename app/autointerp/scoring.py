"""Detection and fuzzing scores of an explanation (REFERENCE §4), on held-out examples only.

- Detection: the judge sees the explanation and unmarked windows, activating and non-activating
  mixed, `per_prompt` to a prompt, and says for each whether the feature fires in it.
- Fuzzing: activating windows are shown with their true activating tokens marked; non-activating
  windows with as many randomly chosen tokens marked; the judge says whether the marks fit.

Both report balanced accuracy (TPR + TNR) / 2 and F1. An answer that cannot be parsed counts as
wrong (a missed positive or a false alarm) and is recorded with prediction = None: never dropped,
so a judge that rambles scores badly instead of silently scoring on fewer examples. (delphi drops
unparsed answers and counts them as failed; with none left its zero-denominator guards give 0.)
When no answer at all can be read the score is 0.5, as for any judge that answers everything alike.

Scores you can trust:
- A 95 % Wilson score interval comes with every balanced accuracy (`wilson_interval`). With as
  many negatives as positives (what the scorers build) balanced accuracy is plain accuracy, a
  binomial proportion of correct answers out of n. Wilson is used rather than the Wald interval
  (which collapses to zero width at 0 or n correct and undercovers at the n = 12 of a small local
  judge) and rather than the exact Clopper-Pearson interval (guaranteed coverage, but wider than
  it needs to be). With unequal classes, n is the effective sample size 4 / (1/P + 1/N), which
  gives balanced accuracy's binomial variance.
- A judge that gives every example the same answer (all yes, all no, or nothing readable) scores
  exactly 0.5 whatever the explanation: such a score is flagged `uninformative` and stored so.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

from app.autointerp.backends import Backend, Message
from app.autointerp.prompts import PromptConfig, Window, render

JUDGE_MAX_TOKENS_PER_EXAMPLE = 8


@dataclass
class JudgedExample:
    """One example as the judge saw it and what it said (becomes a Judgement row)."""

    method: str
    example_id: int | None
    text: str
    truth: bool
    prediction: bool | None
    raw: str

    @property
    def correct(self) -> bool:
        return self.prediction is not None and self.prediction == self.truth


@dataclass
class Score:
    method: str
    items: list[JudgedExample] = field(default_factory=list)

    def _count(self, truth: bool, predicted: bool) -> int:
        return sum(1 for j in self.items if j.truth == truth and j.prediction is predicted)

    @property
    def tp(self) -> int:
        return self._count(True, True)

    @property
    def tn(self) -> int:
        return self._count(False, False)

    @property
    def positives(self) -> int:
        return sum(1 for j in self.items if j.truth)

    @property
    def negatives(self) -> int:
        return sum(1 for j in self.items if not j.truth)

    @property
    def unparsed(self) -> int:
        return sum(1 for j in self.items if j.prediction is None)

    @property
    def fn(self) -> int:  # unparsable positives count as missed
        return self.positives - self.tp

    @property
    def fp(self) -> int:  # unparsable negatives count as false alarms
        return self.negatives - self.tn

    @property
    def balanced_accuracy(self) -> float | None:
        if not self.positives or not self.negatives:
            return None
        if self.unparsed == len(self.items):
            # Nothing readable is no information, like all-yes or all-no: chance (0.5), flagged
            # uninformative. Counting each as wrong would give 0, a judge that is always wrong.
            return 0.5
        return (self.tp / self.positives + self.tn / self.negatives) / 2

    @property
    def f1(self) -> float | None:
        denom = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denom if denom else None

    @property
    def uninformative(self) -> bool:
        """The judge gave every example the same answer: the score is 0.5 whatever the explanation."""
        return bool(self.items) and len({j.prediction for j in self.items}) == 1

    @property
    def constant_answer(self) -> str | None:
        if not self.uninformative:
            return None
        p = self.items[0].prediction
        return "unreadable" if p is None else ("yes" if p else "no")

    @property
    def ci(self) -> tuple[float, float] | None:
        """95 % Wilson interval of the balanced accuracy (see the module docstring)."""
        ba = self.balanced_accuracy
        if ba is None:
            return None
        n_eff = 4.0 / (1.0 / self.positives + 1.0 / self.negatives)
        return wilson_interval(ba * n_eff, n_eff)

    def summary(self) -> dict:
        ci = self.ci
        return {"balanced_accuracy": self.balanced_accuracy, "f1": self.f1, "n": len(self.items),
                "positives": self.positives, "negatives": self.negatives, "tp": self.tp, "tn": self.tn,
                "fp": self.fp, "fn": self.fn, "unparsed": self.unparsed,
                "ci": [round(ci[0], 4), round(ci[1], 4)] if ci else None, "ci_method": "wilson 95%",
                "uninformative": self.uninformative, "constant_answer": self.constant_answer}


def wilson_interval(successes: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (successes may be fractional: an effective count)."""
    from scipy.stats import norm

    if n <= 0:
        raise ValueError("n must be positive")
    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


# --- parsing the judge's answers --------------------------------------------------------------

_YES = {"yes", "y", "true", "1", "active", "activates", "activated", "fires", "match", "matches", "correct"}
_NO = {"no", "n", "false", "0", "inactive", "not", "none", "doesn't", "isn't", "incorrect"}
_STRONG = {"yes", "no", "true", "false"}
# "Example 3: yes", "Example 3 - no", "3. yes", "3) no"; the verdict is the first yes/no word after it.
_LINE = re.compile(r"(?:\b(?:example|excerpt)\s*#?\s*(\d+)\s*[:.)\-=]*|^\s*#?(\d+)\s*[:.)\-=]+)"  # the number
                   r"((?:(?!\b(?:example|excerpt)\b)[^\n])*)",  # the rest of the line, up to the next example
                   re.IGNORECASE | re.MULTILINE)
_LIST = re.compile(r"\[([^\[\]]*)\]")
_WORD = re.compile(r"[a-z']+|\d+", re.I)


def _verdict(word: str) -> bool | None:
    w = word.lower().strip("'\"*_ ")
    if w in _YES:
        return True
    if w in _NO:
        return False
    return None


def _line_verdict(rest: str) -> bool | None:
    for w in _WORD.findall(rest):  # "is not active" reads as no: the first verdict word wins
        v = _verdict(w)
        if v is not None:
            return v
    return None


def parse_answers(answer: str, n: int) -> list[bool | None]:
    """One verdict per example 1..n from a judge's answer; None where it cannot be read.

    Accepts 'Example 3: yes' lines (any order, numbering 1..n), a list like [1, 0, 1, 0, 0] or
    ["yes", "no", ...] with exactly n entries, or exactly n bare yes/no/true/false words.
    """
    text = answer or ""
    numbered: dict[int, bool | None] = {}
    for m in _LINE.finditer(text):
        k = int(m.group(1) or m.group(2))
        v = _line_verdict(m.group(3))
        if 1 <= k <= n and v is not None:
            if k in numbered and numbered[k] != v:
                numbered[k] = None  # contradicts itself: unreadable
            elif k not in numbered:
                numbered[k] = v
    if numbered:
        return [numbered.get(k) for k in range(1, n + 1)]
    for m in _LIST.finditer(text):
        items = [x.strip() for x in m.group(1).split(",") if x.strip()]
        verdicts = [_verdict(x) for x in items]
        if len(items) == n and all(v is not None for v in verdicts):
            return verdicts
    words = [w.lower() for w in _WORD.findall(text) if w.lower() in _STRONG]
    if len(words) == n:
        return [w in ("yes", "true") for w in words]
    if n == 1:  # one question: the first verdict word answers it ("The feature is not active" -> no)
        return [_line_verdict(" ".join(w for w in _WORD.findall(text) if not w.isdigit()))]
    return [None] * n


# --- prompts ----------------------------------------------------------------------------------

JUDGE_SYSTEM = ("You check descriptions of features of a language model against text examples. "
                "Answer exactly in the format asked for, nothing else.")


def _judge_messages(explanation: str, texts: list[str], task: str) -> list[Message]:
    if len(texts) == 1:  # one example per prompt (small local judges): a plain yes/no question
        user = (f"Feature description: \"{explanation}\"\n\n{task}\n\nExample 1: {texts[0]}\n\n"
                "Answer with one word: yes or no.")
    else:
        body = "\n".join(f"Example {i}: {t}" for i, t in enumerate(texts, 1))
        user = (f"Feature description: \"{explanation}\"\n\n{task}\n\n{body}\n\n"
                "Answer with one line per example: \"Example 1: yes\" or \"Example 1: no\", "
                "then Example 2, and so on.")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


DETECTION_TASK = ("Decide whether the feature is active on some tokens of the example, i.e. whether the "
                  "example contains what the description says.")
FUZZING_TASK = ("Some tokens of the example are marked <<like this>>. Decide whether the marked tokens are "
                "what the description is about (yes) or were marked at random (no).")


def detection_messages(explanation: str, texts: list[str]) -> list[Message]:
    return _judge_messages(explanation, texts, DETECTION_TASK)


def fuzzing_messages(explanation: str, texts: list[str]) -> list[Message]:
    return _judge_messages(explanation, texts, FUZZING_TASK)


# --- scorers ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shown:
    """A window rendered for the judge, with its truth."""

    window: Window
    text: str
    truth: bool


def _mix(positives: list[Window], negatives: list[Window], rng: random.Random) -> list[Window]:
    items = positives + negatives
    rng.shuffle(items)
    return items


async def _judge(backend: Backend, method: str, explanation: str, shown: list[Shown], cfg: PromptConfig,
                 build) -> Score:
    chunks = [shown[i:i + cfg.per_prompt] for i in range(0, len(shown), cfg.per_prompt)]
    prompts = [build(explanation, [s.text for s in chunk]) for chunk in chunks]
    max_tokens = JUDGE_MAX_TOKENS_PER_EXAMPLE * cfg.per_prompt + (8 if cfg.per_prompt > 1 else 0)
    answers = await backend.complete_many(prompts, max_tokens, "judge")
    score = Score(method)
    for chunk, answer in zip(chunks, answers):
        verdicts = parse_answers(answer, len(chunk))
        for s, v in zip(chunk, verdicts):
            score.items.append(JudgedExample(method, s.window.example_id, s.text, s.truth, v, answer))
    return score


async def detection(backend: Backend, explanation: str, positives: list[Window], negatives: list[Window],
                    cfg: PromptConfig, seed: int) -> Score:
    rng = random.Random(seed)
    shown = [Shown(w, render(w), w.activating) for w in _mix(positives, negatives, rng)]
    return await _judge(backend, "detection", explanation, shown, cfg, detection_messages)


async def fuzzing(backend: Backend, explanation: str, positives: list[Window], negatives: list[Window],
                  cfg: PromptConfig, seed: int) -> Score:
    rng = random.Random(seed + 1)
    true_marks = [w.active_positions(cfg.mark_threshold) for w in positives]
    counts = [len(m) for m in true_marks if m] or [1]
    shown = [Shown(w, render(w, m), True) for w, m in zip(positives, true_marks)]
    for w in negatives:
        # As many random marks as a real example has, so the number of marks gives nothing away.
        k = min(len(w.tokens), rng.choice(counts))
        shown.append(Shown(w, render(w, rng.sample(range(len(w.tokens)), k)), False))
    rng.shuffle(shown)
    return await _judge(backend, "fuzzing", explanation, shown, cfg, fuzzing_messages)
