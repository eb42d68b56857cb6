"""Labelled text tasks for sparse probing (trainer/sparse_probing.py), built from a corpus itself.

SAEBench's sparse probing reads datasets from the Hugging Face Hub (bias-in-bios, Amazon reviews,
GitHub code, AG News, Europarl); these tasks need nothing but the bundled corpus, so they run
offline. Each task is a set of classes, each with its own train and test texts; a probe is then
trained per class, one class against the task's others (as SAEBench does).

- `module_family`: which top-level standard-library package a docstring comes from. Documents of
  the pydoc corpus are titled with the qualified name of what they document (`email.message.
  Message.get`); the label is the first part of that name. The classes are the `classes` most
  frequent packages (ties broken by name; the pydoc topics are not a package and are left out),
  each document is one text, and a text whose exact string occurs under two or more packages is
  dropped (so no text has two labels). Class sizes are equal: min(per-class cap, the smallest
  class's documents), split train/test by a seeded shuffle of each class's documents.
- `code_vs_prose`: lines of code against lines of prose, from the same docstrings. A code line is
  the source of a doctest prompt (`>>> x = f(1)`, prompt removed) that parses as Python and has
  at least 8 characters; a prose line has at least 6 words, starts with an upper-case letter,
  ends with a full stop and does not parse as Python. Lines repeated in the corpus are kept once,
  and documents (not lines) are split between train and test, so no document gives lines to both.

Both tasks are balanced: every class has the same number of train texts and of test texts.
"""

from __future__ import annotations

import ast
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from store.errors import AtlasError

TASKS = ("module_family", "code_vs_prose")


@dataclass
class ProbingTask:
    """One labelled task: for each class, its train and its test texts (disjoint)."""

    name: str
    description: str
    train: dict[str, list[str]]
    test: dict[str, list[str]]
    sources: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    """{"train"|"test": {class: [document id of each text]}}: where each text came from."""

    @property
    def classes(self) -> list[str]:
        return list(self.train)

    def summary(self) -> dict:
        """Sizes and balance, as the report card records them."""
        return {"description": self.description, "classes": self.classes,
                "train_per_class": {c: len(v) for c, v in self.train.items()},
                "test_per_class": {c: len(v) for c, v in self.test.items()}}


def _check_sizes(n_train: int, n_test: int) -> None:
    if n_train < 2 or n_test < 1:
        raise AtlasError(f"probing needs at least 2 train and 1 test text per class, got {n_train} and {n_test}",
                         "raise --probe-train and --probe-test")


def module_family_task(docs, n_train: int, n_test: int, classes: int = 5, seed: int = 0) -> ProbingTask:
    """The `module_family` task (module docstring) from documents with qualified-name titles."""
    _check_sizes(n_train, n_test)
    if classes < 2:
        raise AtlasError(f"module_family needs at least 2 classes, got {classes}")
    by_text: dict[str, set[str]] = defaultdict(set)
    doc_of: dict[tuple[str, str], int] = {}
    for d in docs:
        if d.title.startswith("pydoc topic") or not d.title.strip():
            continue
        family = d.title.split(".")[0]
        by_text[d.text].add(family)
        doc_of.setdefault((family, d.text), d.id)
    per_family: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for text, families in by_text.items():
        if len(families) == 1:
            family = next(iter(families))
            per_family[family].append((doc_of[(family, text)], text))
    counts = Counter({f: len(v) for f, v in per_family.items()})
    chosen = sorted(counts, key=lambda f: (-counts[f], f))[:classes]
    if len(chosen) < classes:
        raise AtlasError(f"the corpus documents only {len(chosen)} packages; module_family needs {classes}",
                         "use the pydoc corpus (titles are qualified names)")
    per_class = min(counts[f] for f in chosen)
    if per_class < n_train + n_test:
        n_test = max(1, min(n_test, per_class // 5))
        n_train = per_class - n_test
        _check_sizes(n_train, n_test)
    rng = random.Random(seed)
    train, test, sources = {}, {}, {"train": {}, "test": {}}
    for f in chosen:
        items = sorted(per_family[f])
        rng.shuffle(items)
        train[f] = [t for _, t in items[:n_train]]
        test[f] = [t for _, t in items[n_train:n_train + n_test]]
        sources["train"][f] = [i for i, _ in items[:n_train]]
        sources["test"][f] = [i for i, _ in items[n_train:n_train + n_test]]
    return ProbingTask("module_family", f"which of {len(chosen)} top-level stdlib packages a docstring documents",
                       train, test, sources)


def _parses(src: str) -> bool:
    try:
        ast.parse(src)
    except (SyntaxError, ValueError):
        return False
    return True


def code_line(line: str) -> str | None:
    """The code of a doctest line (`>>> ...`), or None when the line is not one that parses."""
    s = line.strip()
    if not s.startswith(">>> "):
        return None
    src = s[4:].strip()
    return src if len(src) >= 8 and _parses(src) else None


def prose_line(line: str) -> str | None:
    """The line when it is prose: >= 6 words, capitalised, ending in '.', not valid Python."""
    s = line.strip()
    if len(s.split()) < 6 or not s[:1].isupper() or not s.endswith(".") or _parses(s):
        return None
    return s


def code_vs_prose_task(docs, n_train: int, n_test: int, seed: int = 0) -> ProbingTask:
    """The `code_vs_prose` task (module docstring): documents split first, then lines labelled."""
    _check_sizes(n_train, n_test)
    docs = sorted(docs, key=lambda d: d.id)
    rng = random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    # Documents are assigned to test until its quota of code lines is met, the rest to train.
    seen: set[str] = set()
    lines: dict[str, dict[str, list[tuple[int, str]]]] = {"train": {"code": [], "prose": []},
                                                          "test": {"code": [], "prose": []}}
    for i in order:
        d = docs[i]
        labelled = []
        for raw in d.text.splitlines():
            for label, fn in (("code", code_line), ("prose", prose_line)):
                text = fn(raw)
                if text is not None and text not in seen:
                    seen.add(text)
                    labelled.append((label, text))
        if not labelled:
            continue
        split = "test" if min(len(lines["test"]["code"]), len(lines["test"]["prose"])) < n_test else "train"
        for label, text in labelled:
            lines[split][label].append((d.id, text))
    have_train = min(len(v) for v in lines["train"].values())
    if have_train < n_train:
        if have_train < 2:
            raise AtlasError(f"the corpus has too few doctest lines for code_vs_prose ({have_train} for training)",
                             "use the pydoc corpus")
        n_train = have_train
    n_test = min(n_test, *(len(v) for v in lines["test"].values()))
    _check_sizes(n_train, n_test)
    train, test, sources = {}, {}, {"train": {}, "test": {}}
    for split, n, out in (("train", n_train, train), ("test", n_test, test)):
        for label in ("code", "prose"):
            items = lines[split][label]
            rng.shuffle(items)
            out[label] = [t for _, t in items[:n]]
            sources[split][label] = [i for i, _ in items[:n]]
    return ProbingTask("code_vs_prose", "a doctest line of code against a line of prose", train, test, sources)


def build_tasks(corpus, names: tuple[str, ...] | list[str], n_train: int, n_test: int, seed: int = 0,
                classes: int = 5) -> list[ProbingTask]:
    """The named tasks from a corpus (trainer.corpus spec or Corpus)."""
    from trainer.corpus import open_corpus

    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise AtlasError(f"unknown probing task(s) {', '.join(unknown)}", f"use {', '.join(TASKS)}")
    docs = list((open_corpus(corpus) if isinstance(corpus, str) else corpus).documents())
    out = []
    for name in names:
        if name == "module_family":
            out.append(module_family_task(docs, n_train, n_test, classes, seed))
        else:
            out.append(code_vs_prose_task(docs, n_train, n_test, seed))
    return out
