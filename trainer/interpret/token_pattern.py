"""Token-pattern explanations: what a latent peaks on, what comes just before, what it promotes.

Written for every latent from its dashboard statistics alone, with no LM:
- the tokens its top examples peak on, with their shares of the top examples;
- the tokens just before the peak, when a few of them cover a good share of the top examples;
- the tokens its decoder direction promotes most (direct logit effect).

For example `the word ‹ just› (100 % of top examples), after ‹This›/‹It›; promotes ‹accred›, ‹ited›`.
The main token says what it is (the word, the number, the word piece, the token), and punctuation
and whitespace tokens get their name in words (`‹)› right parenthesis`), so that semantic search
for "the word just" or "closing bracket" finds them. The same statistics go into the LM
explainer's prompt (app/autointerp/prompts.py).

The token chips ‹ › and the shares are for people. The embedding model's vocabulary has no `‹`
(it reads as [UNK]), so `plain()` writes chips as straight quotes and drops the shares before
anything is embedded: search vectors, scorer queries and search queries all go through it
(embedding_scorer.query_text/document_text).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from store.models import ExampleKind
from store.vectors import CHIP

EXPLAINER = "token-pattern"
METHOD = "token-pattern-v3"  # Explanation.method; bump when the wording changes (v2: "the word ‹…›"; v3: up to 5 peak tokens)

# Up to 5 peak tokens down to 5 % of the top examples (v2: 3, down to 10 %): held-out activations
# peak on more tokens than the top examples' favourite few, and naming them raised the demo SAE's
# embedding-scorer AUROC over the shuffled baseline (BENCHMARKS.md, benchmarks/embedding_queries.py).
MAX_PEAK_TOKENS = 5
MIN_PEAK_SHARE = 0.05  # besides the first, peak tokens listed only above this share of top examples
MAX_BEFORE_TOKENS = 3
MIN_BEFORE_SHARE = 0.15  # a preceding token is listed only above this share
MIN_BEFORE_TOTAL = 0.4  # ... and only when the listed ones cover this much together
MAX_PROMOTED = 3
PROMOTES = "; promotes "  # where the output side of an explanation starts (embedding_scorer.query_text)
AFTER = ", after "  # where the tokens before the peak are listed

# Names in words for punctuation and whitespace, so an explanation of `)` reads as a closing bracket.
CHAR_NAMES = {
    "(": "left parenthesis", ")": "right parenthesis", "[": "left square bracket",
    "]": "right square bracket", "{": "left curly brace", "}": "right curly brace", "<": "less-than sign",
    ">": "greater-than sign", ",": "comma", ".": "full stop", ":": "colon", ";": "semicolon", "!": "exclamation mark",
    "?": "question mark", "'": "single quote", '"': "double quote", "`": "backtick", "=": "equals sign",
    "+": "plus sign", "-": "hyphen or minus", "*": "asterisk", "/": "slash", "\\": "backslash", "|": "vertical bar",
    "&": "ampersand", "%": "percent sign", "#": "hash sign", "@": "at sign", "$": "dollar sign", "^": "caret",
    "~": "tilde", "_": "underscore", "\n": "newline", "\t": "tab", " ": "space",
}


@dataclass
class TokenStats:
    """One latent's statistics: (token id, share of top examples), best first."""

    n_top: int = 0
    peak: list[tuple[int, float]] = field(default_factory=list)
    before: list[tuple[int, float]] = field(default_factory=list)
    promotes: list[int] = field(default_factory=list)


def _ranked(groups: np.ndarray, tokens: np.ndarray, n_groups: int) -> list[list[tuple[int, int]]]:
    """Per group: [(token, count)] most frequent first (ties: lower token id), tokens < 0 ignored."""
    out: list[list[tuple[int, int]]] = [[] for _ in range(n_groups)]
    ok = tokens >= 0
    if not ok.any():
        return out
    pairs, counts = np.unique(np.stack([groups[ok], tokens[ok]], 1), axis=0, return_counts=True)
    order = np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))
    for (g, t), c in zip(pairs[order].tolist(), counts[order].tolist()):
        if len(out[g]) < 8:
            out[g].append((t, c))
    return out


def stats_from_windows(feature: np.ndarray, tokens: np.ndarray, peak: np.ndarray, n_latents: int,
                       promotes: np.ndarray | None = None) -> list[TokenStats]:
    """TokenStats for every latent from its top-example windows.

    feature [E]: latent of each top example; tokens [E, W]: token ids (-1 where none); peak [E]: the
    peak's position in its window; promotes [n_latents, k]: top logit-effect token ids.
    """
    feature = np.asarray(feature, np.int64)
    tokens = np.asarray(tokens)
    peak = np.asarray(peak, np.int64)
    rows = np.arange(len(feature))
    at_peak = tokens[rows, peak].astype(np.int64) if len(feature) else np.zeros(0, np.int64)
    before = np.where(peak >= 1, tokens[rows, np.maximum(peak - 1, 0)], -1).astype(np.int64) \
        if len(feature) else np.zeros(0, np.int64)
    totals = np.bincount(feature, minlength=n_latents)
    peaks = _ranked(feature, at_peak, n_latents)
    befores = _ranked(feature, before, n_latents)
    out = []
    for i in range(n_latents):
        n = int(totals[i])
        st = TokenStats(n_top=n)
        if n:
            st.peak = [(t, c / n) for t, c in peaks[i]]
            st.before = [(t, c / n) for t, c in befores[i]]
        if promotes is not None:
            st.promotes = [int(t) for t in promotes[i][:MAX_PROMOTED] if t >= 0]
        out.append(st)
    return out


def stats_from_analysis(examples: dict[str, np.ndarray], features: dict[str, np.ndarray]) -> list[TokenStats]:
    """TokenStats for every latent of an analysis (trainer.analyze's examples.npz / features.npz)."""
    n = len(features["count"])
    top = examples["kind"] == ExampleKind.top
    promotes = features.get("logit_top_ids")
    return stats_from_windows(examples["feature"][top], examples["tokens"][top], examples["peak"][top], n,
                              promotes)


# --- wording ---------------------------------------------------------------------------------------

def chip(text: str) -> str:
    """A token as it reads inside an explanation: ‹ just›, with line breaks and tabs as symbols and
    other control characters escaped (\\x00: PostgreSQL text cannot hold NUL)."""
    text = text.replace("\r", "").replace("\n", "↵").replace("\t", "⇥")
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() or ch == " " else f"\\x{ord(ch):02x}" if ord(ch) < 256
                       else f"\\u{ord(ch):04x}" for ch in text)
    return "‹" + text + "›"


def token_name(text: str) -> str | None:
    """Punctuation and whitespace tokens in words ('closing parenthesis'); None for word tokens."""
    core = text.strip(" ") or text
    if any(ch.isalnum() for ch in core) or len(core) > 3:
        return None
    names = []
    for ch in core:
        name = CHAR_NAMES.get(ch)
        if name is None:
            return None
        if not names or names[-1] != name:
            names.append(name)
    return " + ".join(names) if names else None


def kind_of(text: str) -> str | None:
    """What a (non-punctuation) token is, in words: the word, the word piece, the number, the token."""
    core = text.strip()
    if not core:
        return None
    if core.isalpha():
        return "the word" if text[0] in " \u2581" or core[0].isupper() else "the word piece"
    if core.isdigit():
        return "the number"
    return "the token"


def chip_tokens(text: str) -> list[str]:
    """The tokens the chips of `text` show, in order, as the model's text reads them without the
    surrounding spaces (‹ just› -> "just", ‹↵› -> a line break)."""
    out = []
    for m in CHIP.finditer(text):
        t = m.group(1).replace("↵", "\n").replace("⇥", "\t")
        out.append(t.strip() or t)
    return out


def _pct(share: float) -> str:
    return f"{round(100 * share)} %"


def describe(stats: TokenStats, vocab_text) -> str | None:
    """The explanation text, or None when the latent has no top examples (it never fired)."""
    peaks = [(t, s) for k, (t, s) in enumerate(stats.peak[:MAX_PEAK_TOKENS]) if k == 0 or s >= MIN_PEAK_SHARE]
    if not peaks:
        return None
    parts = []
    for k, (t, s) in enumerate(peaks):
        text = vocab_text(t)
        name = token_name(text)
        if name:
            label = f"{chip(text)} {name}"
        else:
            kind = kind_of(text) if k == 0 else None
            label = f"{kind} {chip(text)}" if kind else chip(text)
        parts.append(f"{label} ({_pct(s)}{' of top examples' if k == 0 else ''})")
    out = ", ".join(parts)
    before = [(t, s) for t, s in stats.before[:MAX_BEFORE_TOKENS] if s >= MIN_BEFORE_SHARE]
    if before and sum(s for _, s in before) >= MIN_BEFORE_TOTAL:
        out += AFTER + "/".join(chip(vocab_text(t)) for t, _ in before)
    if stats.promotes:
        out += PROMOTES + ", ".join(chip(vocab_text(t)) for t in stats.promotes)
    return out


def prompt_lines(stats: TokenStats, vocab_text) -> list[str]:
    """The statistics as plain sentences for an LM explainer's prompt."""
    lines = []
    if stats.peak:
        lines.append("Tokens the top examples peak on: " + ", ".join(
            f"{chip(vocab_text(t))} ({_pct(s)})" for t, s in stats.peak[:MAX_PEAK_TOKENS]))
    if stats.before:
        lines.append("Tokens just before the peak: " + ", ".join(
            f"{chip(vocab_text(t))} ({_pct(s)})" for t, s in stats.before[:MAX_BEFORE_TOKENS]))
    if stats.promotes:
        lines.append("Tokens the feature makes more likely next: " + ", ".join(
            chip(vocab_text(t)) for t in stats.promotes))
    return lines
