"""Explainer and judge prompts built from a feature's stored examples (REFERENCE §4).

The explainer sees top examples plus examples sampled across the interval groups, each cut to a
~32-token window with the peak about 3/4 of the way in, activating tokens (> 0.3 x the example's
max) marked <<like this>>, optionally followed by (token, activation 0-10) lists. The held-out
positives the judges and the embedding scorer see are picked first, by the same picker as the
token-pattern explanations' (trainer.interpret.windows); the explainer never sees an example that
overlaps one, and everything in its prompt comes from the examples it is shown.

Everything here is pure (no database, no model) so it can be unit-tested and reused.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field, fields, replace

import numpy as np

from app.autointerp.backends import Message
from store.errors import AtlasError
from store.models import ExampleKind
from trainer.interpret import windows

# Stored as Explanation.method; bump when the prompts or the examples they show change meaning.
# v1/v2 showed every other top example and statistics over all of them, some of which were the
# held-out scoring positives; v3/v4 show only examples disjoint from the scoring set.
PROMPT_VERSION = "explain-v3"
PROMPT_VERSION_STATS = "explain-v4"  # explain-v3 plus the token statistics (show_statistics)



@dataclass(frozen=True)
class PromptConfig:
    """How many examples to show and how. Job params with the same names override these."""

    window: int = 32
    """Tokens per example window shown to an LM."""
    peak_frac: float = 0.75
    """Where the peak token sits in the window (0 = first token, 1 = last)."""
    mark_threshold: float = 0.3
    """Tokens above this fraction of the example's max activation are marked << >>."""
    n_explain_top: int = 12
    """Top examples shown to the explainer (every other one of the top list; the rest are held out)."""
    n_explain_interval: int = 12
    """Interval examples shown to the explainer, spread over the interval groups."""
    show_activations: bool = True
    """Append (token, activation 0-10) lists to the explainer's examples."""
    show_statistics: bool = True
    """Tell the explainer the token statistics (peak tokens, tokens before the peak, promoted tokens)."""
    n_score: int = 20
    """Held-out activating examples judged per scorer (and as many non-activating ones)."""
    per_prompt: int = 5
    """Examples per judge prompt."""
    min_examples: int = 4
    """Fewer distinct activating examples than this and the feature is skipped."""
    explain_max_tokens: int = 48
    """Most tokens the explainer may answer with (one phrase)."""
    one_shot: bool = True
    """Show the explainer one made-up question and answer first, to pin down the answer's form."""
    max_explanation_chars: int = 200
    """Longer explanations are rejected as not 'one short phrase'."""
    seed: int = 0
    """Seed of every random choice (mixed with the feature id)."""

    @classmethod
    def for_backend(cls, kind: str, overrides: dict | None = None) -> PromptConfig:
        """Defaults per backend: a 135M local model gets fewer, plainer examples; then job params."""
        cfg = cls()
        if kind == "local":
            # Small context and weak reading: fewer examples, no number lists, fewer judge calls.
            # A 135M judge cannot keep five numbered answers apart: one example per prompt.
            cfg = replace(cfg, n_explain_top=6, n_explain_interval=4, show_activations=False, n_score=6,
                          explain_max_tokens=32, per_prompt=1)
        if overrides:
            known = {f.name for f in fields(cls)}
            picked = {}
            for k, v in overrides.items():
                if k in known:
                    default = getattr(cfg, k)
                    try:
                        picked[k] = _as_bool(v) if isinstance(default, bool) else type(default)(v)
                    except (TypeError, ValueError):
                        raise InvalidParams(f"job parameter {k}={v!r} is not a valid {type(default).__name__}",
                                            "queue the job again with a valid value") from None
            cfg = replace(cfg, **picked)
        return cfg


def _as_bool(v) -> bool:
    if isinstance(v, str):
        if v.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if v.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(v)
    return bool(v)


@dataclass(frozen=True)
class StoredExample:
    """One row of the examples table, decoded (see store.models.Example)."""

    id: int | None
    kind: int
    rank: int
    interval: int | None
    activation: float
    peak: int
    doc_id: int
    doc_offset: int
    token_ids: np.ndarray
    acts: np.ndarray

    @property
    def span(self) -> tuple[int, int]:
        """Document token range [start, end) of the stored window."""
        start = self.doc_offset - self.peak
        return start, start + len(self.token_ids)


@dataclass(frozen=True)
class Window:
    """A window as shown to an LM: token texts and this feature's activation on each token."""

    tokens: tuple[str, ...]
    acts: tuple[float, ...]
    activating: bool
    source: str  # top, interval, random, or negative:<where it came from>
    example_id: int | None
    doc_id: int
    start: int  # document offset of the first token

    @property
    def max_act(self) -> float:
        return max(self.acts) if self.acts else 0.0

    def active_positions(self, threshold: float) -> list[int]:
        m = self.max_act
        if m <= 0:
            return []
        return [i for i, a in enumerate(self.acts) if a > threshold * m]


@dataclass
class ExampleSplit:
    explain: list[Window] = field(default_factory=list)
    held_out: list[Window] = field(default_factory=list)  # the judges' positives: the first positives, shown
    n_distinct: int = 0
    shown: list[StoredExample] = field(default_factory=list)  # what `explain` is cut from
    examples: list[StoredExample] = field(default_factory=list)  # all of them, as given
    own: windows.Examples | None = None  # `examples` as the picker reads it (row k: examples[k])
    positives: list[windows.Win] = field(default_factory=list)  # held-out activating windows, best first


class InvalidParams(AtlasError):
    """A job parameter cannot be used; retrying the same job cannot help."""

    retryable = False


class TooFewExamples(Exception):
    """The feature has too few examples to explain and score; the job is skipped, not retried."""

    retryable = False


# --- windows ----------------------------------------------------------------------------------

_SPECIAL = re.compile(r"^<\|([^|<>]{1,40})\|>$|^<(/?s|bos|eos|pad|unk|start_of_turn|end_of_turn)>$")


def token_text(t: str) -> str:
    """A token as an LM should read it inside a one-line example: escapes instead of line breaks.

    Special tokens (<|im_end|>, <bos>, ...) become [im_end], [bos]: left as they are, the chat
    template's tokenizer would read them as real control tokens and break the prompt.
    """
    m = _SPECIAL.match(t)
    if m:
        return f"[{m.group(1) or m.group(2)}]"
    t = t.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")
    return "".join(ch if unicodedata.category(ch)[0] != "C" else f"\\u{ord(ch):04x}" for ch in t)


def to_window(ex: StoredExample, vocab_text, cfg: PromptConfig, activating: bool = True,
              source: str | None = None, zero_acts: bool = False, cut: tuple[int, int] | None = None) -> Window:
    """The stored window cut to cfg.window tokens around its peak (or to `cut`, [lo, hi) of it)."""
    if cut is None:
        lo = int(windows.centred_start(ex.peak, len(ex.token_ids), cfg.window, cfg.peak_frac))
        cut = lo, min(len(ex.token_ids), lo + cfg.window)
    lo, hi = cut
    ids = ex.token_ids[lo:hi]
    acts = [0.0] * len(ids) if zero_acts else [max(0.0, float(a)) for a in ex.acts[lo:hi]]
    return Window(tokens=tuple(token_text(vocab_text(int(i))) for i in ids), acts=tuple(acts), activating=activating,
                  source=source or _kind_name(ex.kind), example_id=ex.id, doc_id=ex.doc_id, start=ex.span[0] + lo)


def _kind_name(kind: int) -> str:
    return ExampleKind(kind).name if kind in ExampleKind._value2member_map_ else "example"


def render(w: Window, marks: set[int] | list[int] | None = None) -> str:
    """The window as one line of text; marked tokens wrapped in << >> (adjacent ones share a pair)."""
    marks = set(marks or ())
    out: list[str] = []
    i, n = 0, len(w.tokens)
    while i < n:
        if i not in marks:
            out.append(w.tokens[i])
            i += 1
            continue
        j = i
        while j < n and j in marks:
            j += 1
        span = "".join(w.tokens[i:j])
        lead = span[: len(span) - len(span.lstrip())]  # keep the space outside: " <<cat>>", not "<< cat>>"
        out.append(f"{lead}<<{span.strip() or span}>>")
        i = j
    return "".join(out).strip()


def activation_list(w: Window, scale: float, threshold: float) -> str:
    """(token, activation rescaled to 0-10 by the feature's max) for the marked tokens."""
    scale = scale if scale > 0 else (w.max_act or 1.0)
    pairs = [f"({(w.tokens[i].strip() or w.tokens[i])!r}, {min(10, round(10 * w.acts[i] / scale))})"
             for i in w.active_positions(threshold)]  # quoted: a token may be a comma or a space
    return ", ".join(pairs)


# --- choosing examples ------------------------------------------------------------------------

def _overlaps(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    """(doc, start, end) ranges that share a token."""
    return a[0] == b[0] and a[1] < b[2] and b[1] < a[2]


def split_examples(examples: list[StoredExample], vocab_text, cfg: PromptConfig, latent: int,
                   window: int = windows.WINDOW) -> ExampleSplit:
    """Held-out activating windows (trainer.interpret.windows.positives: the same picker, and so the
    same windows, as the token-pattern explanation's score) and the explainer's examples: top
    examples plus interval samples, none overlapping a held-out one."""
    # top, interval and random lists can hold the same activation: one copy of each.
    seen: set[tuple[int, int]] = set()
    distinct: list[StoredExample] = []
    for ex in sorted(examples, key=lambda e: (e.kind, -(e.interval or 0), e.rank)):
        key = (ex.doc_id, ex.doc_offset)
        if key not in seen and ex.activation > 0:
            seen.add(key)
            distinct.append(ex)
    if len(distinct) < cfg.min_examples:
        raise TooFewExamples(f"the feature has {len(distinct)} distinct activating examples; "
                             f"explaining needs at least {cfg.min_examples}")
    # the picker reads every example as given, exactly as publish reads the analysis's
    own = windows.Examples.from_rows(examples, [latent] * len(examples))
    tops = [e for e in distinct if e.kind == ExampleKind.top]
    n_pos = max(cfg.n_score, windows.N_POS)
    if tops:
        positives = windows.positives(own, np.arange(len(examples)), n_pos, window)
    else:  # no top list (imported data): show every other example, hold out what overlaps none of them
        shown = distinct[0::2]
        positives = windows.positives(own, np.arange(len(examples)), n_pos, window, held_back=(
            np.asarray([e.doc_id for e in shown]), *(np.asarray([e.span[k] for e in shown]) for k in (0, 1))))
    if not positives:
        raise TooFewExamples("every activating example overlaps one the explainer is shown: none left to score on")
    held = [examples[w.row] for w in positives]
    held_spans = [(e.doc_id, *e.span) for e in held]

    def free(e: StoredExample) -> bool:
        return not any(_overlaps((e.doc_id, *e.span), h) for h in held_spans)

    if tops:
        groups: dict[int, list[StoredExample]] = {}
        for e in distinct:
            if e.kind == ExampleKind.interval and free(e):
                groups.setdefault(e.interval or 0, []).append(e)
        chosen = [e for e in tops if free(e)][: cfg.n_explain_top]  # a held-out window may reach into a top one
        picked_interval: list[StoredExample] = []
        order = sorted(groups, reverse=True)
        depth = 0
        while len(picked_interval) < cfg.n_explain_interval and any(len(groups[g]) > depth for g in order):
            for g in order:
                if depth < len(groups[g]) and len(picked_interval) < cfg.n_explain_interval:
                    picked_interval.append(groups[g][depth])
            depth += 1
        chosen += picked_interval
    else:
        chosen = distinct[0::2]
    if not chosen:
        raise TooFewExamples("every example the explainer could be shown overlaps a held-out one")
    return ExampleSplit(explain=[to_window(e, vocab_text, cfg) for e in chosen],
                        held_out=[to_window(e, vocab_text, cfg) for e in held[: cfg.n_score]],
                        n_distinct=len(distinct), shown=chosen, examples=list(examples), own=own, positives=positives)


# --- explainer prompt -------------------------------------------------------------------------

EXPLAIN_SYSTEM = (
    "You are an interpretability researcher. You study one feature of a language model: a unit that "
    "activates on some tokens. You see text excerpts where the feature is active; the tokens where it "
    "activates are marked <<like this>>. Find what the marked tokens have in common (the words themselves, "
    "their meaning, or their context) and describe it in one short phrase of at most 12 words. "
    "Reply with the phrase only, no preamble."
)


# A made-up demonstration of the answer's form: small models copy it, large ones ignore it.
ONE_SHOT_USER = (
    "Excerpts where the feature activates (marked tokens <<like this>>):\n\n"
    "Example 1: He stayed at home<< because>> it was raining.\n"
    "Example 2: We left early<< because>> of the traffic.\n"
    "Example 3: The build failed,<< since>> the file was missing.\n\n"
    "What does this feature detect? Answer with one short phrase."
)
ONE_SHOT_ANSWER = "words that introduce a reason, like \"because\" and \"since\""


def method_name(cfg: PromptConfig) -> str:
    """Explanation.method for explanations written with this config."""
    return PROMPT_VERSION_STATS if cfg.show_statistics else PROMPT_VERSION


def explain_messages(windows: list[Window], cfg: PromptConfig, scale: float,
                     statistics: list[str] | None = None) -> list[Message]:
    """The explainer's chat; `statistics` (token_pattern.prompt_lines) is shown when cfg.show_statistics."""
    lines = []
    for n, w in enumerate(windows, 1):
        lines.append(f"Example {n}: {render(w, w.active_positions(cfg.mark_threshold))}")
        if cfg.show_activations:
            acts = activation_list(w, scale, cfg.mark_threshold)
            if acts:
                lines.append(f"Activations {n}: {acts}")
    stats = ""
    if cfg.show_statistics and statistics:
        stats = ("\n\nStatistics over the feature's top examples:\n" + "\n".join(f"- {ln}" for ln in statistics))
    user = ("Excerpts where the feature activates (marked tokens <<like this>>):\n\n" + "\n".join(lines)
            + stats + "\n\nWhat does this feature detect? Answer with one short phrase.")
    shot = [{"role": "user", "content": ONE_SHOT_USER}, {"role": "assistant", "content": ONE_SHOT_ANSWER}]
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, *(shot if cfg.one_shot else []),
            {"role": "user", "content": user}]


def messages_text(messages: list[Message]) -> str:
    """A chat as plain text, for Explanation.prompt."""
    return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in messages)


# Leading labels and lead-ins models like to add; they carry no meaning.
_PREFIX = re.compile(
    r"^\s*(?:(?:the\s+)?(?:explanation|answer|description|phrase|feature|short phrase)\s*[:\-–]\s*"
    r"|(?:this|the)\s+(?:feature|neuron|unit)\s+(?:detects|activates on|fires on|responds to|is about|is)"
    r"(?:\s+that\b)?\s*:?\s*"
    r"|it\s+(?:detects|activates on|fires on)(?:\s+that\b)?\s*:?\s*)", re.I)


class InvalidExplanation(Exception):
    """The explainer's answer is not a usable phrase; the job fails and is retried (error kept)."""

    retryable = True


_QUOTE_PAIRS = {('"', '"'), ("'", "'"), ("“", "”"), ("‘", "’"), ("`", "`")}
_QUOTES = "\"'“”‘’`"


def _unquote(s: str) -> str:
    """'"a phrase".' -> 'a phrase'; quotes inside the phrase ("the token 'def'") stay."""
    for _ in range(3):
        s = s.strip(" *_").rstrip(".").strip()
        if len(s) >= 2 and (s[0], s[-1]) in _QUOTE_PAIRS:
            s = s[1:-1]
        elif s[:1] in _QUOTES and s[:1] and s.count(s[0]) == 1:  # an opening quote that never closes
            s = s[1:]
        elif s[-1:] in _QUOTES and s[-1:] and s.count(s[-1]) == 1:
            s = s[:-1]
        else:
            break
    return s.strip()


def clean_explanation(raw: str, cfg: PromptConfig) -> str:
    """The phrase in an explainer's answer, or InvalidExplanation saying what is wrong with it."""
    text = (raw or "").strip()
    if not text:
        raise InvalidExplanation("the explainer answered with nothing")
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    first = re.sub(r"^[#>\-\s]+", "", first)  # markdown bullets and headers
    first = first.replace("**", "").replace("__", "")
    for _ in range(2):  # "Answer: This feature detects ..." has two lead-ins
        first = _PREFIX.sub("", first, count=1).strip()
    first = re.split(r"(?<=[a-z0-9\"')])\.\s", first, maxsplit=1)[0]  # the first sentence
    first = _unquote(first)
    if not first:
        raise InvalidExplanation(f"the explainer's answer has no phrase in it: {raw[:200]!r}")
    if len(first) > cfg.max_explanation_chars:
        raise InvalidExplanation(f"the explainer answered with {len(first)} characters, not one short phrase "
                                 f"(limit {cfg.max_explanation_chars}): {first[:200]!r}")
    letters = sum(ch.isalpha() for ch in first)
    if letters < 3 or letters < 0.5 * len(first.replace(" ", "")):
        raise InvalidExplanation(f"the explainer's answer does not look like words: {first[:200]!r}")
    words = re.findall(r"\w+", first.lower())
    trigrams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    if len(trigrams) >= 4 and len(set(trigrams)) <= len(trigrams) // 2:
        raise InvalidExplanation(f"the explainer's answer repeats itself: {first[:200]!r}")
    return first
