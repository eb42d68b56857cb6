"""Token display and LM vocabularies, decoded once per process."""

from __future__ import annotations

import json
import operator
import re
import unicodedata
import zlib
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from markupsafe import escape
from sqlalchemy import select
from sqlalchemy.orm import Session

from store.errors import NotFound
from store.models import LM

_VISIBLE = {"\n": "↵", "\r": "⏎", "\t": "⇥", "": "∅"}
_INVISIBLE_CATEGORIES = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))


def visible(token: str) -> str:
    """A token as a person should see it in running text: newlines, tabs and invisible characters
    made visible (↵ ⇥ ⟨U+200B⟩ …); ordinary spaces stay spaces."""
    if token in _VISIBLE:
        return _VISIBLE[token]
    if token.isprintable():  # the common case: nothing to replace (spaces count as printable)
        return token
    out = []
    for ch in token:
        if ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif unicodedata.category(ch) in _INVISIBLE_CATEGORIES or (not ch.isprintable() and ch != " "):
            out.append(f"⟨U+{ord(ch):04X}⟩")
        else:
            out.append(ch)
    return "".join(out)


def chip(token: str) -> str:
    """A token shown on its own (logit tables, peak tokens): like visible(), and spaces become ␣
    so that ' the' and 'the' can be told apart."""
    return visible(token).replace(" ", "␣") or "∅"


def _clean(token) -> str:
    """Vocabulary entries as valid Unicode: lone surrogates (which JSON cannot carry) become U+FFFD."""
    if not isinstance(token, str):
        token = str(token)
    try:
        token.encode("utf-8")
        return token
    except UnicodeEncodeError:
        return token.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


_UNMARK = str.maketrans({"↵": "\n", "⏎": "\r", "⇥": "\t", "␣": " "})


@dataclass(frozen=True, eq=False)
class Vocab:
    raw: tuple[str, ...]
    html: tuple[str, ...]  # visible() then HTML-escaped: ready to drop into running text
    chips: tuple[str, ...] = ()  # chip() then HTML-escaped: a token on its own
    _index: dict = field(default_factory=dict, repr=False)

    def text(self, token_id: int) -> str:
        return self.raw[token_id] if 0 <= token_id < len(self.raw) else f"<{token_id}>"

    def texts(self, ids: np.ndarray) -> list[str] | tuple[str, ...]:
        """Token strings of many ids at once (C speed when all ids are in range)."""
        n = len(ids)
        if n == 0:
            return []
        if int(ids.min()) >= 0 and int(ids.max()) < len(self.raw):
            if n == 1:
                return [self.raw[int(ids[0])]]
            return operator.itemgetter(*ids.tolist())(self.raw)
        return [self.text(int(i)) for i in ids.tolist()]

    @property
    def spans(self) -> tuple[str, ...]:
        """Each token as an inactive example span, `<span class="t">…</span>` (built once)."""
        spans = self._index.get("__spans__")
        if spans is None:
            spans = tuple(f'<span class="t">{h}</span>' for h in self.html)
            self._index["__spans__"] = spans
        return spans

    def display_html(self, token_id: int) -> str:
        return self.html[token_id] if 0 <= token_id < len(self.html) else str(escape(f"<{token_id}>"))

    def chip_html(self, token_id: int) -> str:
        return self.chips[token_id] if 0 <= token_id < len(self.chips) else str(escape(f"<{token_id}>"))

    def find(self, query: str, limit: int = 200) -> list[int]:
        """Token ids whose text equals the query up to surrounding spaces and case.

        ↵ ⇥ ␣ in the query stand for newline, tab and space; a query of only whitespace matches
        tokens that are exactly that whitespace."""
        q = query.translate(_UNMARK)
        if not q:
            return []
        if not q.strip():
            return [i for i, t in enumerate(self.raw) if t == q][:limit]
        index = self._index.get("__find__")
        if index is None:
            index = {}
            for i, t in enumerate(self.raw):
                index.setdefault(t.strip().lower(), []).append(i)
            self._index["__find__"] = index
        return index.get(q.strip().lower(), [])[:limit]


_SPECIAL = re.compile(r"<\|[^<>|]{1,40}\|>|<(?:s|/s|bos|eos|pad|unk|mask|cls|sep|start_of_turn|end_of_turn)>|\[(?:CLS|SEP|PAD|UNK|MASK)\]")
_MARKS = re.compile("([↵⏎⇥␣∅]+|⟨U\\+[0-9A-F]{4,6}⟩)")


def token_html(token: str, as_chip: bool = False) -> str:
    """A token as safe HTML: visible() or chip(), escaped; the markers for whitespace and invisible
    characters are wrapped in <span class="ws"> (drawn lighter) and special tokens such as
    <|endoftext|> in <span class="sp">, so that they read as structure rather than text."""
    shown = chip(token) if as_chip else visible(token)
    if _SPECIAL.fullmatch(token):
        return f'<span class="sp">{escape(shown)}</span>'
    html = str(escape(shown))
    if _MARKS.search(html):
        html = _MARKS.sub(r'<span class="ws">\1</span>', html)
    return html


def make_vocab(tokens) -> Vocab:
    raw = tuple(_clean(t) for t in tokens)
    return Vocab(raw, tuple(token_html(t) for t in raw), tuple(token_html(t, as_chip=True) for t in raw))


@lru_cache(maxsize=16)
def _decode_vocab(lm_id: int, blob: bytes) -> Vocab:
    return make_vocab(json.loads(zlib.decompress(blob)))


_vocab_by_lm: dict[tuple[int, int], Vocab] = {}


def vocab_for(session: Session, lm_id: int) -> Vocab:
    """The LM's vocabulary, decoded once per process (and per database: ids are per database)."""
    key = (id(session.get_bind().pool), lm_id)
    v = _vocab_by_lm.get(key)
    if v is None:
        blob = session.scalar(select(LM.vocab).where(LM.id == lm_id))
        if blob is None:
            raise NotFound(f"language model {lm_id} has gone")
        v = _decode_vocab(lm_id, blob)
        _vocab_by_lm[key] = v
    return v
