"""One settings object, read from environment variables and `.env`.

Every field is documented in README.md's settings table; `sae-atlas settings` prints the live values.
Environment variables are the field names in upper case with the `SAE_ATLAS_` prefix, except
`DATABASE_URL`, which is also read without the prefix because every hosting platform sets it so.
"""

import ipaddress
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from store.errors import AtlasError


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "sae-atlas"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SAE_ATLAS_", env_file=".env", extra="ignore", validate_default=True
    )

    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Folder for the SQLite store, converted model weights, activation caches and trained SAEs.",
    )
    model_cache_dir: Path | None = Field(
        default=None, description="Where converted model weights are cached; unset means DATA_DIR/models."
    )
    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("SAE_ATLAS_DATABASE_URL", "DATABASE_URL"),
        description="SQLAlchemy URL of the store; unset means SQLite at DATA_DIR/atlas.db. "
        "postgresql://user:pass@host/db selects PostgreSQL (psycopg 3).",
    )
    device: str = Field(
        default="auto", description="Torch device for the LM and SAEs: auto (CUDA when present), cpu, cuda, cuda:1."
    )
    lm_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="Precision of the LM forward pass; auto is bfloat16 on CUDA and on CPUs with AMX, else float32.",
    )
    host: str = Field(default="127.0.0.1", description="Address the web server binds to.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port the web server listens on.")
    web_workers: int = Field(
        default=0, ge=0, le=64,
        description="Web server processes for `serve` and `demo`; 0 means one per CPU core, at most 4.",
    )
    public_reads: bool = Field(
        default=True, description="Serve pages and GET endpoints without an API key; false requires a key for reads too."
    )
    htmx_url: str = Field(
        default="https://unpkg.com/htmx.org@2.0.4/dist/htmx.min.js",
        description="Where pages load htmx from (pinned version); the Content-Security-Policy allows this exact URL only.",
    )
    htmx_integrity: str = Field(
        default="sha384-HGfztofotfshcF7+8n44JQL2oJmowVChPTg48S+jvZoztPfvwD79OC/LTtG6dMp+",
        description="Subresource-integrity hash of htmx_url.",
    )
    explainer_backend: Literal["local", "openai"] = Field(
        default="local",
        description="Who writes and scores explanations: local (a transformers model) or openai (any OpenAI-compatible HTTP server).",
    )
    local_model: str = Field(
        default="smollm2-135m", description="Model of the local explainer/judge backend (alias, HF id or path)."
    )
    openai_base_url: str = Field(
        default="http://127.0.0.1:11434/v1",
        description="Base URL of the OpenAI-compatible server (OpenAI, OpenRouter, vLLM, Ollama).",
    )
    openai_api_key: str | None = Field(default=None, description="Bearer key sent to the OpenAI-compatible server.")
    explainer_model: str = Field(default="gpt-4o-mini", description="Model name asked to write explanations (HTTP backend).")
    judge_model: str | None = Field(
        default=None, description="Model name asked to score explanations (HTTP backend); unset means explainer_model."
    )
    llm_timeout_s: float = Field(default=60.0, gt=0, description="Timeout of one HTTP request to the explainer server.")
    llm_max_retries: int = Field(default=5, ge=0, le=20, description="Retries on 429/5xx/timeouts, with exponential backoff and jitter.")
    llm_concurrency: int = Field(default=4, ge=1, le=256, description="Most requests in flight to the explainer server per worker.")
    embedding_backend: Literal["local", "openai"] = Field(
        default="local",
        description="Who embeds explanations and example windows (semantic search, embedding scorer): local (a transformers sentence-embedding model) or openai (an OpenAI-compatible /embeddings endpoint).",
    )
    embedding_model: str = Field(
        default="all-minilm-l6-v2",
        description="Sentence-embedding model: the bundled all-minilm-l6-v2, a Hugging Face id or a local folder (local backend), or the model name sent to the /embeddings endpoint (openai backend).",
    )
    embedding_base_url: str | None = Field(
        default=None, description="Base URL of the OpenAI-compatible /embeddings endpoint; unset means SAE_ATLAS_OPENAI_BASE_URL."
    )
    embedding_api_key: str | None = Field(
        default=None, description="Bearer key sent to the embeddings endpoint; unset means SAE_ATLAS_OPENAI_API_KEY."
    )
    embedding_batch_size: int = Field(default=64, ge=1, le=4096, description="Texts per forward pass or per /embeddings request.")
    embedding_query_prefix: str = Field(
        default="", max_length=1000,
        description="Text before an explanation embedded as the embedding scorer's query: empty for models that are not "
        "instruction-tuned, like the bundled all-MiniLM-L6-v2; delphi's 'Instruct: Retrieve sentences that could be "
        "related to the explanation.\nQuery:' for instruction-tuned ones.",
    )
    embedding_window: int | None = Field(
        default=None, ge=1, le=128,
        description="Tokens in each window the embedding scorer embeds, for token-pattern and LM explanations alike; unset means 6 (trainer.interpret.windows.WINDOW). "
        "delphi embeds 32; shorter windows measured a wider gap between true and shuffled explanations on the demo SAE.",
    )
    publish_explanations: bool = Field(
        default=True,
        description="At publish, write a token-pattern explanation for every latent and score it with the embedding scorer (needs the embedding model).",
    )
    job_lease_s: float = Field(default=300.0, gt=0, description="Seconds a worker holds a job without a heartbeat before it returns to the queue.")
    job_max_attempts: int = Field(default=3, ge=1, le=100, description="Attempts before a job is marked failed.")
    worker_poll_s: float = Field(default=1.0, gt=0, description="How often an idle worker looks for new jobs.")
    run_lease_s: float = Field(default=60.0, gt=0, description="Seconds a trainer worker holds a training run without a heartbeat before another worker may resume it.")
    run_heartbeat_s: float = Field(default=2.0, gt=0, description="How often a trainer worker writes a run's progress, metrics and log tail to the store (and notices a cancel).")
    run_checkpoint_s: float = Field(default=120.0, ge=0, description="A training run checkpoints at least this often (seconds; 0: only every 500 steps), bounding the work a dead worker loses.")
    run_max_attempts: int = Field(default=3, ge=1, le=100, description="Attempts (worker deaths, crashes) before a training run is marked failed.")
    inference: Literal["on", "off"] = Field(
        default="on",
        description="Live model features (try your own text, search by text, steering, contrastive search); "
        "off for read-only mirrors (the pages then say so and the live endpoints answer 503).",
    )
    inference_url: str = Field(
        default="http://127.0.0.1:8765",
        description="Where the inference service listens and API processes reach it: http://HOST:PORT or unix:/path/to.sock.",
    )
    inference_spawn: bool = Field(
        default=True,
        description="`sae-atlas serve` starts the inference service beside the web server; false when it runs elsewhere (its own container).",
    )
    inference_memory_mb: int = Field(
        default=6144, ge=64,
        description="Memory budget (MiB) of the models and SAEs the inference service keeps loaded; beyond it the least recently used are unloaded.",
    )
    inference_max_tokens: int = Field(
        default=512, ge=8, le=8192, description="Longest text, in tokens, that one live request may send (contrastive texts are cut to it)."
    )
    inference_queue_size: int = Field(
        default=64, ge=1, le=100_000,
        description="Live requests the inference service holds at once; more are answered 503 with Retry-After.",
    )
    inference_timeout_s: float = Field(
        default=60.0, gt=0, le=3600, description="A live request that has not finished after this many seconds is dropped with a 503."
    )
    inference_batch_tokens: int = Field(
        default=8192, ge=256, le=1_048_576, description="Most (padded) tokens in one micro-batched forward pass of the inference service."
    )
    inference_batch_wait_ms: float = Field(
        default=2.0, ge=0, le=1000, description="How long an idle inference service waits for more requests to share a forward pass."
    )
    inference_threads: int = Field(
        default=0, ge=0, le=1024,
        description="CPU threads of the inference service's torch ops; 0 keeps torch's default (one per core).",
    )
    inference_rate_per_minute: int = Field(
        default=60, ge=0,
        description="Live requests per minute per anonymous client (by IP address); 0 turns the limit off. Requests with an API key are not limited.",
    )
    inference_contrast_max_texts: int = Field(
        default=500, ge=2, le=100_000, description="Most texts in each set of a contrastive query."
    )
    inference_contrast_max_bytes: int = Field(
        default=2_000_000, ge=1000, description="Largest set of texts (bytes of UTF-8, pasted or uploaded) of a contrastive query."
    )
    map_at_publish: bool = Field(
        default=True, description="Publishing an SAE makes its map: a UMAP layout of the decoder directions, Leiden "
        "clusters of the cosine and co-firing graph, and a label per cluster from its explanations.")
    relate_at_publish: bool = Field(
        default=True, description="Publishing an SAE relates it to the published SAEs of the same model that share its "
        "site (a width pair) or sit one layer away (a layer pair).")
    relate_tokens: int = Field(
        default=200_000, ge=1000, le=100_000_000,
        description="Tokens of data on which two SAEs are related (co-firing, correlation, the stitching test); "
        "read from the activation cache when one holds both sites, else from one LM pass.")
    log_level: str = Field(default="INFO", description="Python logging level.")
    corpus_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Folders whose files training runs submitted through the API, the pages or `train --submit` may read "
        "as a corpus (os.pathsep-separated); unset means DATA_DIR/corpora.",
    )
    model_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Folders whose models (transformers folders, .gguf files) submitted training runs may load "
        "(os.pathsep-separated); unset means DATA_DIR/models. Aliases and Hugging Face ids are always allowed.",
    )
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Addresses or networks (CIDR) of reverse proxies whose X-Forwarded-Proto and X-Forwarded-For are "
        "believed (comma-separated); behind a TLS proxy listed here the session cookie is marked Secure.",
    )
    max_body_bytes: int = Field(
        default=2 << 20, ge=1024, le=1 << 30,
        description="Largest request body the server reads; bigger ones are refused with 413 before parsing.",
    )
    session_ttl_s: float = Field(
        default=14 * 24 * 3600.0, gt=0, description="Seconds a sign-in session lasts (server-side, revoked by signing out)."
    )

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @field_validator("corpus_roots", "model_roots", "trusted_proxies", mode="before")
    @classmethod
    def _split(cls, v):
        """Environment variables give plain text: os.pathsep- or comma-separated (JSON lists work too)."""
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("["):
                import json

                return json.loads(v)
            return [p.strip() for p in re.split(r"[,%s]" % re.escape(os.pathsep), v) if p.strip()] if v else []
        return v

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for item in v:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network") from None
        return v

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.upper()
        if v not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return v

    @property
    def sqlalchemy_url(self) -> str:
        """The store URL with the driver spelled out (postgresql:// means psycopg 3 here)."""
        if not self.database_url:
            return f"sqlite:///{self.data_dir / 'atlas.db'}"
        url = self.database_url
        for prefix in ("postgres://", "postgresql://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix):]
        return url

    @property
    def models_dir(self) -> Path:
        return (self.model_cache_dir or self.data_dir / "models").expanduser().resolve()

    @property
    def runs_dir(self) -> Path:
        """Where training runs keep their checkpoints and logs; shared by every trainer worker."""
        return self.data_dir / "runs"

    @property
    def corpus_root_dirs(self) -> list[Path]:
        """Where submitted runs may read corpora from (resolved, symlinks followed)."""
        return [p.expanduser().resolve() for p in (self.corpus_roots or [self.data_dir / "corpora"])]

    @property
    def model_root_dirs(self) -> list[Path]:
        """Where submitted runs may load local models from (resolved, symlinks followed)."""
        return [p.expanduser().resolve() for p in (self.model_roots or [self.data_dir / "models"])]

    @property
    def server_processes(self) -> int:
        return self.web_workers or max(1, min(4, os.cpu_count() or 1))

    @property
    def judge(self) -> str:
        return self.judge_model or self.explainer_model


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings; tests call get_settings.cache_clear() after changing the environment."""
    try:
        return Settings()
    except Exception as exc:  # pydantic.ValidationError: turn it into one readable line
        errors = getattr(exc, "errors", None)
        if callable(errors):
            parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors()]
            raise AtlasError("invalid setting: " + "; ".join(parts), "fix the SAE_ATLAS_* environment variable or .env") from None
        raise
