"""Text corpora, tokenised and packed into fixed-length contexts that can be traced back to source.

A corpus spec is one of:
- `pydoc` (default): the documentation inside the running Python, that is `pydoc_data.topics`
  plus the docstrings of the standard library's modules, classes and functions (read with `ast`,
  so nothing is imported or executed);
- a local `.txt` (one document per blank-line-separated paragraph), `.jsonl` (one document per
  line, field `text`) or `.parquet` (column `text`) file, or a folder of such files;
- `hf:NAME[:CONFIG][@SPLIT]`: a Hugging Face dataset (or a local dataset folder), streamed.

Documents have stable ids (their position in the corpus's own order), so every token of every
context carries (document id, token offset in that document). Documents are split between
`train` and `eval` by a hash of their id, then shuffled with the seed and packed back to back,
separated by the EOS token, into contexts of `ctx_len` tokens that start with BOS.
"""

from __future__ import annotations

import ast
import json
import logging
import random
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from store.errors import AtlasError

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass(frozen=True)
class Document:
    id: int
    title: str
    text: str


@dataclass
class ContextBatch:
    """Packed contexts. doc_ids/doc_pos give each token's source (-1 for the leading BOS)."""

    tokens: torch.Tensor  # [B, T] int64
    doc_ids: torch.Tensor  # [B, T] int32
    doc_pos: torch.Tensor  # [B, T] int32

    def __len__(self) -> int:
        return self.tokens.shape[0]


# --- corpus sources ------------------------------------------------------------------------------

class Corpus:
    """A deterministic sequence of documents."""

    spec: str

    def documents(self) -> Iterator[Document]:
        raise NotImplementedError

    def document(self, doc_id: int) -> Document:
        for doc in self.documents():
            if doc.id == doc_id:
                return doc
        raise AtlasError(f"document {doc_id} is not in corpus {self.spec}", "check the document id")

    @property
    def finite(self) -> bool:
        return True


class ListedCorpus(Corpus):
    """A corpus small enough to list whole (pydoc, local files): random access by id."""

    def _load(self) -> list[Document]:
        raise NotImplementedError

    @cached_property
    def docs(self) -> list[Document]:
        docs = self._load()
        if not docs:
            raise AtlasError(f"corpus {self.spec!r} has no documents", "point at files with text in them")
        return docs

    def documents(self) -> Iterator[Document]:
        return iter(self.docs)

    def document(self, doc_id: int) -> Document:
        if not 0 <= doc_id < len(self.docs):
            raise AtlasError(f"document {doc_id} is not in corpus {self.spec} ({len(self.docs)} documents)")
        return self.docs[doc_id]


def _qualified_docstrings(tree: ast.Module, module: str) -> Iterator[tuple[str, str]]:
    doc = ast.get_docstring(tree)
    if doc:
        yield module, doc

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    yield name, doc
                yield from walk(child, name)

    yield from walk(tree, module)


class PydocCorpus(ListedCorpus):
    """The running Python's own documentation: pydoc topics, then stdlib docstrings."""

    spec = "pydoc"
    min_chars = 20

    def _load(self) -> list[Document]:
        texts: list[tuple[str, str]] = []
        try:
            from pydoc_data.topics import topics
        except ImportError:  # some distributions strip pydoc_data
            topics = {}
        texts += [(f"pydoc topic {name}", topics[name]) for name in sorted(topics)]
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        for path in sorted(stdlib.rglob("*.py")):
            rel = path.relative_to(stdlib)
            if rel.parts[0] in ("site-packages", "dist-packages") or {"test", "tests"} & set(rel.parts[:-1]):
                continue
            if rel.name.startswith("test_"):
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
                continue
            module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
            texts += list(_qualified_docstrings(tree, module))
        return [Document(i, title, text) for i, (title, text) in
                enumerate((t, x.strip()) for t, x in texts if len(x.strip()) >= self.min_chars)]


class LocalCorpus(ListedCorpus):
    """.txt / .jsonl / .parquet files, or a folder of them (sorted by path)."""

    def __init__(self, path: Path, text_field: str = "text"):
        self.path = path
        self.spec = str(path)
        self.text_field = text_field

    def files(self) -> list[Path]:
        if self.path.is_dir():
            # Files only inside the folder itself: a link that leads out of it (to another
            # folder, or to any file on the machine) is not followed; rglob does not descend
            # into linked folders either.
            root = self.path.resolve()
            files = sorted(p for p in self.path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES
                           and p.resolve().is_relative_to(root))
            if not files:
                raise AtlasError(f"folder {self.path} has no .txt, .jsonl or .parquet files", "point at a folder with text files")
            return files
        if self.path.suffix not in LOCAL_SUFFIXES:
            raise AtlasError(f"cannot read {self.path}: unsupported file type {self.path.suffix!r}",
                             "use .txt, .jsonl or .parquet")
        return [self.path]

    def _load(self) -> list[Document]:
        out: list[tuple[str, str]] = []
        for file in self.files():
            try:
                out += list(self._read(file))
            except AtlasError:
                raise
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                raise AtlasError(f"cannot read {file}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                                 "check that the file is readable and well-formed") from None
        return [Document(i, title, text) for i, (title, text) in enumerate(out)]

    def _read(self, file: Path) -> Iterator[tuple[str, str]]:
        if file.suffix == ".txt":
            text = file.read_text(encoding="utf-8")
            for n, para in enumerate(p.strip() for p in text.split("\n\n")):
                if para:
                    yield f"{file.name} ¶{n + 1}", para
        elif file.suffix == ".jsonl":
            with file.open(encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise AtlasError(f"{file}:{n} is not valid JSON ({exc.msg})", "fix or remove that line") from None
                    text = row.get(self.text_field) if isinstance(row, dict) else None
                    if not isinstance(text, str):
                        raise AtlasError(f"{file}:{n} has no string field {self.text_field!r}",
                                         "set --text-field to the field that holds the text")
                    if text.strip():
                        yield f"{file.name}:{n}", text
        else:
            import pyarrow.parquet as pq

            try:
                pf = pq.ParquetFile(file)
            except Exception as exc:  # pyarrow raises its own error types
                raise AtlasError(f"cannot read {file} as parquet: {exc}", "check the file") from None
            if self.text_field not in pf.schema_arrow.names:
                raise AtlasError(f"{file} has no column {self.text_field!r} (columns: {', '.join(pf.schema_arrow.names)})",
                                 "set --text-field to the column that holds the text")
            row = 0
            for batch in pf.iter_batches(columns=[self.text_field]):
                for text in batch.column(0).to_pylist():
                    row += 1
                    if isinstance(text, str) and text.strip():
                        yield f"{file.name}#{row}", text


class HFCorpus(Corpus):
    """A Hugging Face dataset streamed in its own order; ids are row numbers."""

    def __init__(self, name: str, config: str | None, split: str, text_field: str = "text"):
        self.name, self.config, self.split, self.text_field = name, config, split, text_field
        self.spec = f"hf:{name}" + (f":{config}" if config else "") + f"@{split}"

    @property
    def finite(self) -> bool:
        return False

    def _stream(self):
        try:
            import datasets
        except ImportError:
            raise AtlasError("the `datasets` package is needed for Hugging Face corpora", "pip install datasets") from None
        try:
            return datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
        except Exception as exc:  # datasets raises many types (FileNotFoundError, ConnectionError, ValueError)
            raise AtlasError(f"cannot open dataset {self.spec}: {str(exc).splitlines()[0][:300]}",
                             "check the name, config and split, and the network") from None

    def documents(self) -> Iterator[Document]:
        for row_id, row in enumerate(self._stream()):
            text = row.get(self.text_field)
            if text is None:
                raise AtlasError(f"dataset {self.spec} has no field {self.text_field!r} (fields: {', '.join(row)})",
                                 "set --text-field")
            if isinstance(text, str) and text.strip():
                yield Document(row_id, f"{self.name} row {row_id}", text)

    def document(self, doc_id: int) -> Document:
        for doc in islice(self.documents(), doc_id, None):
            if doc.id == doc_id:
                return doc
        raise AtlasError(f"document {doc_id} is not in {self.spec}")


def open_corpus(spec: str = "pydoc", text_field: str = "text") -> Corpus:
    """Turn a corpus spec into a Corpus; errors are one line that says what is valid."""
    spec = (spec or "pydoc").strip()
    if spec == "pydoc":
        return PydocCorpus()
    if spec.startswith("hf:"):
        rest, _, split = spec[3:].partition("@")
        name, _, config = rest.partition(":") if not rest.startswith(("/", ".")) else (rest, "", "")
        if not name:
            raise AtlasError(f"bad corpus spec {spec!r}", "use hf:NAME[:CONFIG][@SPLIT], e.g. hf:allenai/c4:en@train")
        return HFCorpus(name, config or None, split or "train", text_field)
    path = Path(spec).expanduser()
    if path.exists():
        return LocalCorpus(path, text_field)
    raise AtlasError(
        f"unknown corpus {spec!r}: no such file or folder",
        "use pydoc, a .txt/.jsonl/.parquet file or folder, or hf:NAME[:CONFIG][@SPLIT]",
    )


# --- splitting, tokenising and packing --------------------------------------------------------

def _mix(doc_id: int, seed: int) -> int:
    """A fixed 64-bit hash (splitmix64) so that splits agree across runs and platforms."""
    z = (doc_id * 0x9E3779B97F4A7C15 + seed * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def in_split(doc_id: int, split: str, eval_fraction: float) -> bool:
    """Whether a document belongs to `split` (train, eval or all); independent of the shuffling seed."""
    if split == "all":
        return True
    is_eval = (_mix(doc_id, 1_000_003) % 1_000_000) < eval_fraction * 1_000_000
    return is_eval if split == "eval" else not is_eval


@dataclass
class Packer:
    """Tokenises documents and packs them into contexts of ctx_len tokens starting with BOS."""

    tokenizer: object
    ctx_len: int = 128
    bos_token_id: int = 0
    separator_token_id: int = 0
    tokenize_batch: int = 256

    def __post_init__(self):
        if self.ctx_len < 4:
            raise AtlasError(f"context length {self.ctx_len} is too short", "use at least 4 tokens (default 128)")

    def _tokenized(self, docs: Iterable[Document]) -> Iterator[tuple[Document, list[int]]]:
        it = iter(docs)
        while chunk := list(islice(it, self.tokenize_batch)):
            ids = self.tokenizer([d.text for d in chunk], add_special_tokens=False)["input_ids"]
            yield from zip(chunk, ids)

    def contexts(self, docs: Iterable[Document]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield (tokens, doc_ids, doc_pos) int arrays of length ctx_len, one context at a time."""
        body = self.ctx_len - 1
        tok: list[int] = []
        did: list[int] = []
        pos: list[int] = []
        for doc, ids in self._tokenized(docs):
            n = len(ids)
            tok += ids
            tok.append(self.separator_token_id)
            did += [doc.id] * (n + 1)
            pos += range(n + 1)  # the separator counts as the document's last token
            while len(tok) >= body:
                yield (np.array([self.bos_token_id] + tok[:body], dtype=np.int64),
                       np.array([-1] + did[:body], dtype=np.int32),
                       np.array([-1] + pos[:body], dtype=np.int32))
                del tok[:body], did[:body], pos[:body]

    def batches(self, docs: Iterable[Document], batch_size: int, max_contexts: int | None = None) -> Iterator[ContextBatch]:
        it = self.contexts(docs)
        if max_contexts is not None:
            it = islice(it, max_contexts)
        while chunk := list(islice(it, batch_size)):
            t, d, p = zip(*chunk)
            yield ContextBatch(torch.from_numpy(np.stack(t)), torch.from_numpy(np.stack(d)), torch.from_numpy(np.stack(p)))


def split_documents(corpus: Corpus, split: str = "train", eval_fraction: float = 0.1, seed: int = 0,
                    shuffle_buffer: int = 10_000) -> Iterator[Document]:
    """The corpus's documents of one split, in an order shuffled deterministically by `seed`."""
    if split not in ("train", "eval", "all"):
        raise AtlasError(f"unknown split {split!r}", "use train, eval or all")
    if not 0.0 <= eval_fraction < 1.0:
        raise AtlasError(f"eval fraction {eval_fraction} is out of range", "use a number in [0, 1)")
    docs = (d for d in corpus.documents() if in_split(d.id, split, eval_fraction))
    rng = random.Random(seed)
    if corpus.finite:
        listed = list(docs)
        rng.shuffle(listed)
        yield from listed
        return
    buffer: list[Document] = []  # streaming corpora: a shuffle buffer
    for doc in docs:
        buffer.append(doc)
        if len(buffer) >= shuffle_buffer:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


def count_tokens(corpus: Corpus, tokenizer, split: str = "all", eval_fraction: float = 0.1, limit_docs: int | None = None) -> int:
    packer = Packer(tokenizer)
    docs = (d for d in corpus.documents() if in_split(d.id, split, eval_fraction))
    return sum(len(ids) + 1 for _, ids in packer._tokenized(islice(docs, limit_docs)))
