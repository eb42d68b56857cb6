"""Who writes and judges explanations: one small async interface, three backends.

- HTTPBackend: any OpenAI-compatible chat-completions server (OpenAI, OpenRouter, vLLM, Ollama)
  over httpx. Retries 429, 5xx, timeouts and connection errors with exponential backoff and full
  jitter (a Retry-After header wins), never other 4xx; a semaphore bounds requests in flight.
- LocalBackend: a `transformers` causal LM used through its chat template, greedy by default
  (the bundled SmolLM2-135M-Instruct unless `local_model` says otherwise). Loaded once per process;
  generation runs in a thread so the worker's event loop keeps heartbeating.
- InstantBackend: a TEST AND BENCHMARK backend. It answers at once with canned text and never
  runs a model, so the queue and the store can be measured and tested without an LM. Its
  explanations are meaningless; never point a real deployment at it.

Every backend has `complete(messages, max_tokens) -> str` and `complete_many(prompts, max_tokens)
-> list[str]` (one answer per prompt, in order), and counts its requests and retries in `stats`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Literal, Protocol

from store.errors import AtlasError
from store.retry import RETRYABLE_STATUS, backoff_delay, parse_retry_after
from store.settings import get_settings

log = logging.getLogger(__name__)

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}
Purpose = Literal["explain", "judge"]


# --- errors -----------------------------------------------------------------------------------

class LLMError(AtlasError):
    """The explainer/judge LM could not answer. `retryable`: whether the job should be tried again later."""

    retryable = True


class LLMGaveUp(LLMError):
    """Every attempt hit a retryable failure (429, 5xx, connection error, timeout)."""

    def __init__(self, message: str, hint: str | None = None, attempts: int = 0, status: int | None = None):
        super().__init__(message, hint)
        self.attempts = attempts
        self.status = status


class LLMTimeout(LLMGaveUp):
    """Gave up, and the last attempt ran past llm_timeout_s."""


class LLMMalformedResponse(LLMError):
    """The server answered 2xx, but not with a chat completion we can read."""


class LLMRejected(LLMError):
    """The server refused the request with a 4xx other than 408/429: retrying cannot help."""

    retryable = False

    def __init__(self, message: str, hint: str | None = None, status: int | None = None):
        super().__init__(message, hint)
        self.status = status


class PromptTooLong(LLMError):
    """The prompt does not fit the local model's context window: the same job would fail again."""

    retryable = False


# --- the interface ----------------------------------------------------------------------------

@dataclass
class BackendStats:
    """Counters for logs and the benchmark (per backend instance, i.e. per worker process)."""

    requests: int = 0  # HTTP requests sent, or prompts run through the local model
    retries: int = 0
    failures: int = 0  # calls that ended in an error
    timeouts: int = 0  # attempts that ran past the timeout
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0  # time spent waiting for answers

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Backend(Protocol):
    kind: str
    stats: BackendStats

    def model_name(self, purpose: Purpose) -> str: ...

    async def complete(self, messages: list[Message], max_tokens: int, purpose: Purpose = "explain",
                       temperature: float = 0.0) -> str: ...

    async def complete_many(self, prompts: list[list[Message]], max_tokens: int, purpose: Purpose = "judge",
                            temperature: float = 0.0) -> list[str]: ...

    async def aclose(self) -> None: ...


# --- OpenAI-compatible HTTP -------------------------------------------------------------------

# Retry rules shared with the embeddings client: store/retry.py


@dataclass
class HTTPBackend:
    """An OpenAI-compatible /chat/completions client. Fields default to the settings."""

    base_url: str | None = None
    api_key: str | None = None
    explainer_model: str | None = None
    judge_model: str | None = None
    timeout_s: float | None = None
    max_retries: int | None = None
    concurrency: int | None = None
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    kind: str = "openai"
    stats: BackendStats = field(default_factory=BackendStats)

    def __post_init__(self):
        s = get_settings()
        self.base_url = (self.base_url or s.openai_base_url).rstrip("/")
        self.api_key = self.api_key if self.api_key is not None else s.openai_api_key
        self.explainer_model = self.explainer_model or s.explainer_model
        self.judge_model = self.judge_model or s.judge_model or self.explainer_model
        self.timeout_s = self.timeout_s or s.llm_timeout_s
        self.max_retries = s.llm_max_retries if self.max_retries is None else self.max_retries
        self.concurrency = self.concurrency or s.llm_concurrency
        self._client = None
        self._semaphore: asyncio.Semaphore | None = None

    def model_name(self, purpose: Purpose) -> str:
        return self.judge_model if purpose == "judge" else self.explainer_model

    def _http(self):
        import httpx

        if self._client is None:
            headers = {"Content-Type": "application/json", "User-Agent": "sae-atlas"}
            if self.api_key:
                headers["Authorization"] = f"Bearer {self.api_key}"
            limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
            self._client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(self.timeout_s), limits=limits)
            self._semaphore = asyncio.Semaphore(self.concurrency)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def complete(self, messages: list[Message], max_tokens: int, purpose: Purpose = "explain",
                       temperature: float = 0.0) -> str:
        import httpx

        client = self._http()
        url = f"{self.base_url}/chat/completions"
        body = {"model": self.model_name(purpose), "messages": messages, "max_tokens": max_tokens,
                "temperature": temperature}
        last: str = ""
        last_status: int | None = None
        timed_out = False
        started = time.perf_counter()
        try:
            for attempt in range(self.max_retries + 1):
                retry_after = None
                if attempt:
                    self.stats.retries += 1
                async with self._semaphore:
                    self.stats.requests += 1
                    try:
                        # httpx's timeout is per phase (connect, each read); this bounds the whole request.
                        async with asyncio.timeout(self.timeout_s):
                            response = await client.post(url, json=body)
                            content = response.content
                    except (TimeoutError, httpx.TimeoutException):
                        self.stats.timeouts += 1
                        timed_out, last_status = True, None
                        last = f"no answer within {self.timeout_s:g} s"
                    except httpx.TransportError as exc:  # refused, reset, DNS: the server may come back
                        timed_out, last_status = False, None
                        last = f"connection error: {type(exc).__name__}: {exc}"
                    else:
                        timed_out = False
                        status = response.status_code
                        if 200 <= status < 300:
                            return self._parse(content, status)
                        last_status = status
                        excerpt = content[:300].decode("utf-8", "replace").strip()
                        last = f"HTTP {status}: {excerpt}"
                        if status not in RETRYABLE_STATUS and status < 500:
                            raise LLMRejected(
                                f"{url} refused the request with HTTP {status}: {excerpt}",
                                _hint_for(status), status=status)
                        retry_after = parse_retry_after(response.headers.get("retry-after"))
                if attempt < self.max_retries:
                    delay = backoff_delay(attempt, self.backoff_base_s, self.backoff_max_s, retry_after)
                    log.info("%s: %s; retry %d/%d in %.2f s", self.kind, last, attempt + 1, self.max_retries, delay)
                    await asyncio.sleep(delay)
            n = self.max_retries + 1
            what = f"{n} attempt{'s' if n > 1 else ''}"
            if timed_out:
                raise LLMTimeout(f"{url} timed out after {what} ({last})",
                                 "raise SAE_ATLAS_LLM_TIMEOUT_S or check that the server is not overloaded",
                                 attempts=n)
            raise LLMGaveUp(f"gave up on {url} after {what}; last error: {last}",
                            "check the server; the job will be retried later", attempts=n, status=last_status)
        except LLMError:
            self.stats.failures += 1
            raise
        finally:
            self.stats.seconds += time.perf_counter() - started

    def _parse(self, content: bytes, status: int) -> str:
        import json

        try:
            data = json.loads(content)
            choice = data["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError("message.content is not a string")
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            excerpt = content[:200].decode("utf-8", "replace")
            raise LLMMalformedResponse(
                f"the server answered HTTP {status} but not with a chat completion ({type(exc).__name__}: {exc}); "
                f"body starts {excerpt!r}",
                "check openai_base_url points at an OpenAI-compatible /v1 endpoint") from None
        usage = data.get("usage") or {}
        if isinstance(usage, dict):
            self.stats.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.stats.completion_tokens += int(usage.get("completion_tokens") or 0)
        return text

    async def complete_many(self, prompts: list[list[Message]], max_tokens: int, purpose: Purpose = "judge",
                            temperature: float = 0.0) -> list[str]:
        # The semaphore inside complete() bounds how many of these are in flight.
        tasks = [asyncio.ensure_future(self.complete(p, max_tokens, purpose, temperature)) for p in prompts]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:  # one failed: the job fails, so stop spending requests on the rest
                t.cancel()
            raise


def _hint_for(status: int) -> str:
    if status in (401, 403):
        return "check SAE_ATLAS_OPENAI_API_KEY"
    if status == 404:
        return "check SAE_ATLAS_OPENAI_BASE_URL (it usually ends in /v1) and the model name"
    return "check SAE_ATLAS_EXPLAINER_MODEL / SAE_ATLAS_JUDGE_MODEL and the server's logs"


# --- local transformers model -----------------------------------------------------------------

_models: dict[str, object] = {}
_models_lock = threading.Lock()
# One generation at a time per process, whatever the number of backends or jobs: parallel
# generations on the same cores (or GPU) only slow each other down.
_generate_lock = threading.Lock()


def _load_local(name: str):
    """The LoadedLM for `name`, loaded once per process whatever the number of backends."""
    with _models_lock:
        lm = _models.get(name)
        if lm is None:
            from trainer.lm import load_lm

            started = time.perf_counter()
            lm = load_lm(name)
            tok = lm.tokenizer
            if tok.pad_token_id is None:  # batched generation needs a pad token; EOS is never attended
                tok.pad_token = tok.eos_token
            if getattr(tok, "chat_template", None) is None:
                raise LLMError(f"model {name!r} has no chat template",
                               "set SAE_ATLAS_LOCAL_MODEL to an instruction-tuned model, e.g. smollm2-135m")
            log.info("loaded local explainer %s on %s in %.1f s", name, lm.device, time.perf_counter() - started)
            _models[name] = lm
        return lm


@dataclass
class LocalBackend:
    """A transformers chat model in this process; the same model writes and judges."""

    model: str | None = None
    batch_size: int = 4
    kind: str = "local"
    stats: BackendStats = field(default_factory=BackendStats)

    def __post_init__(self):
        self.model = self.model or get_settings().local_model

    def model_name(self, purpose: Purpose) -> str:
        return self.model

    def load(self):
        return _load_local(self.model)

    async def aclose(self) -> None:
        pass  # the model stays loaded for the life of the process

    async def complete(self, messages: list[Message], max_tokens: int, purpose: Purpose = "explain",
                       temperature: float = 0.0) -> str:
        return (await self.complete_many([messages], max_tokens, purpose, temperature))[0]

    async def complete_many(self, prompts: list[list[Message]], max_tokens: int, purpose: Purpose = "judge",
                            temperature: float = 0.0) -> list[str]:
        out: list[str] = []
        for i in range(0, len(prompts), self.batch_size):
            out += await asyncio.to_thread(self._generate, prompts[i:i + self.batch_size], max_tokens, temperature,
                                           purpose)
        return out

    def _generate(self, prompts: list[list[Message]], max_tokens: int, temperature: float,
                  purpose: Purpose = "judge") -> list[str]:
        import torch

        lm = self.load()
        tok, model = lm.tokenizer, lm.model
        texts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
        with _generate_lock:
            started = time.perf_counter()
            try:
                enc = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
                limit = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
                if enc["input_ids"].shape[1] + max_tokens > limit:
                    n = enc["input_ids"].shape[1]
                    raise PromptTooLong(f"the prompt has {n} tokens; {self.model} reads at most {limit}",
                                        "show fewer or shorter examples (job params n_explain_top, "
                                        "n_explain_interval, window)")
                enc = {k: v.to(lm.device) for k, v in enc.items()}
                sample = temperature > 0
                # Small models loop ("the feature is the feature is ..."); a one-phrase answer never
                # needs a repeated trigram. Not for judges, whose "Example N: yes" lines repeat by design.
                no_repeat = 3 if purpose == "explain" else 0
                with torch.inference_mode():
                    out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=sample,
                                         temperature=temperature if sample else None, top_p=None, top_k=None,
                                         no_repeat_ngram_size=no_repeat, pad_token_id=tok.pad_token_id)
                new = out[:, enc["input_ids"].shape[1]:]
                answers = tok.batch_decode(new, skip_special_tokens=True)
                self.stats.requests += len(prompts)
                self.stats.prompt_tokens += int(enc["attention_mask"].sum())
                self.stats.completion_tokens += int((new != tok.pad_token_id).sum())
                return answers
            except LLMError:
                self.stats.failures += 1
                raise
            finally:
                self.stats.seconds += time.perf_counter() - started


# --- instant (tests and benchmarks only) ------------------------------------------------------

INSTANT_EXPLANATION = "instant-backend placeholder explanation"
_EXAMPLE_LINE = re.compile(r"^Example (\d+):", re.M)


@dataclass
class InstantBackend:
    """TEST/BENCHMARK ONLY: canned answers with no model, to measure and test the queue itself.

    Explanations are a fixed placeholder; a judge prompt is answered 'yes' or 'no' per numbered
    example (a deterministic hash of the prompt), in the format the scorers ask for. `delay_s`
    sleeps before every answer, to simulate a slow model (tests of leases and shutdown use it).
    """

    delay_s: float = 0.0
    kind: str = "instant"
    stats: BackendStats = field(default_factory=BackendStats)

    def model_name(self, purpose: Purpose) -> str:
        return "instant"

    async def aclose(self) -> None:
        pass

    async def complete(self, messages: list[Message], max_tokens: int, purpose: Purpose = "explain",
                       temperature: float = 0.0) -> str:
        self.stats.requests += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if purpose == "explain":
            return INSTANT_EXPLANATION
        prompt = messages[-1]["content"]
        numbers = [int(n) for n in _EXAMPLE_LINE.findall(prompt)]
        digest = hashlib.sha256(prompt.encode()).digest()
        return "\n".join(f"Example {n}: {'yes' if digest[i % len(digest)] & 1 else 'no'}"
                         for i, n in enumerate(numbers))

    async def complete_many(self, prompts: list[list[Message]], max_tokens: int, purpose: Purpose = "judge",
                            temperature: float = 0.0) -> list[str]:
        return [await self.complete(p, max_tokens, purpose, temperature) for p in prompts]


# --- choosing one -----------------------------------------------------------------------------

BACKEND_KINDS = ("local", "openai", "instant")


def make_backend(spec: str | None = None) -> Backend:
    """A backend from a spec: local[:MODEL], openai, or instant[:DELAY_S] (tests/benchmarks).

    None means the `explainer_backend` setting.
    """
    spec = spec or get_settings().explainer_backend
    kind, _, arg = spec.partition(":")
    if kind == "local":
        return LocalBackend(model=arg or None)
    if kind == "openai":
        return HTTPBackend()
    if kind == "instant":
        try:
            return InstantBackend(delay_s=float(arg) if arg else 0.0)
        except ValueError:
            raise AtlasError(f"bad instant backend delay {arg!r}", "use instant or instant:SECONDS") from None
    raise AtlasError(f"unknown explainer backend {spec!r}", "use local, openai or instant (tests and benchmarks only)")
