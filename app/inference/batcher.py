"""The engine: one thread per service that owns the device and micro-batches every live request.

Requests become jobs (jobs.py, steering.py) in a bounded queue: when `queue_size` jobs are held,
submit() refuses with 503 and a Retry-After estimated from recent job times. The thread loops:

1. prepare new jobs: load their model and SAEs (registry.py, first use only), tokenise, validate;
   a direct job (graph_steer.py: one forward pass of its own) is answered right there;
2. one encode pass: texts of waiting jobs for one model (smallest jobs first, so an interactive
   request is not stuck behind a 200-text contrastive query), padded to at most `batch_tokens`
   tokens, run through one forward pass that hooks every site they need (encode.py);
3. one generation step: every row of the running steering batch gets its next token; when no
   batch runs, waiting steering jobs of one model start a new one.

So concurrent requests share forward passes, a long generation never blocks an encode request
for more than a token, and every job has a deadline: one that expires while waiting or running is
answered 503 and its rows stop. Only this thread touches the model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import torch

from app.inference.encode import encode_texts
from app.inference.jobs import DirectJob, EncodeJob, Job
from app.inference.registry import Registry
from app.inference.schemas import ServiceError
from app.inference.steering import GenerateJob, GenerationBatch

log = logging.getLogger(__name__)

MAX_GENERATION_JOBS = 8  # steering requests per generation batch (two rows each)


def timeout_error() -> ServiceError:
    return ServiceError(503, "timeout", "the request waited or ran past its time limit (SAE_ATLAS_INFERENCE_TIMEOUT_S); "
                                        "the service is busy, try again shortly", retry_after=5)


class Engine:
    def __init__(self, registry: Registry, max_tokens: int = 512, queue_size: int = 64, batch_tokens: int = 8192,
                 batch_wait_ms: float = 2.0):
        self.registry = registry
        self.max_tokens, self.queue_size = max_tokens, queue_size
        self.batch_tokens, self.batch_wait = batch_tokens, batch_wait_ms / 1000.0
        self._cond = threading.Condition()
        self._incoming: deque[Job] = deque()
        self._encode: list[EncodeJob] = []
        self._generate: deque[GenerateJob] = deque()
        self._batch: GenerationBatch | None = None
        self._held = 0
        self._stop = False
        self._job_seconds = 0.5  # moving average, for Retry-After
        self.counters = {"jobs": 0, "forward_passes": 0, "texts": 0, "tokens": 0, "generation_steps": 0, "refused": 0,
                         "timeouts": 0}
        self._thread = threading.Thread(target=self._run, name="inference-engine", daemon=True)

    # --- the outside: submit, status, stop -----------------------------------------------------

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    def retry_after(self) -> float:
        return min(60.0, max(1.0, self._job_seconds * max(1, self._held) / 2))

    def submit(self, job: Job) -> None:
        done = job.on_done

        def on_done(result, error):
            for key in job.pins:
                self.registry.unpin(key)
            job.pins = []
            elapsed = time.monotonic() - job.created
            with self._cond:
                self._held -= 1
                self._job_seconds = 0.8 * self._job_seconds + 0.2 * elapsed
            if isinstance(error, ServiceError) and error.code == "timeout":
                self.counters["timeouts"] += 1
            done(result, error)

        job.on_done = on_done
        with self._cond:
            if self._stop:
                raise ServiceError(503, "unavailable", "the inference service is shutting down", retry_after=10)
            if self._held >= self.queue_size:
                self.counters["refused"] += 1
                raise ServiceError(503, "busy", f"the inference service is busy ({self._held} requests in hand); "
                                                "try again shortly", retry_after=self.retry_after())
            self._held += 1
            self.counters["jobs"] += 1
            self._incoming.append(job)
            self._cond.notify()

    def status(self) -> dict:
        with self._cond:
            return {"held": self._held, "queue_size": self.queue_size, "generating": self._batch is not None,
                    **self.counters}

    # --- the thread ----------------------------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(self._incoming or self._encode or self._generate or self._batch is not None)

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                idle = not self._has_work()
                while not self._stop and not self._has_work():
                    self._cond.wait()
                if self._stop:
                    break
            if idle and self.batch_wait > 0:
                time.sleep(self.batch_wait)  # let requests that arrive together share the pass
            try:
                self._prepare_incoming()
                self._encode_once()
                self._generate_once()
            except Exception:  # a bug: never leave a request hanging because of it
                log.exception("inference engine error")
                self._fail_all_running(ServiceError(500, "internal_error", "internal error in the inference service; "
                                                                           "its log has the details"))
        self._fail_all_running(ServiceError(503, "unavailable", "the inference service stopped", retry_after=10))
        with self._cond:
            pending = list(self._incoming)
            self._incoming.clear()
        for job in pending:
            job.complete(None, ServiceError(503, "unavailable", "the inference service stopped", retry_after=10))

    def _fail_all_running(self, error: ServiceError) -> None:
        jobs = list(self._encode) + list(self._generate) + (self._batch.jobs if self._batch else [])
        self._encode, self._batch = [], None
        self._generate.clear()
        for job in jobs:
            job.complete(None, error)

    @staticmethod
    def _gone(job: Job) -> bool:
        """Complete a cancelled or expired job; True when it should be dropped."""
        if job.finished:
            return True
        if job.cancelled:
            job.complete(None, None)
            return True
        if job.expired():
            job.complete(None, timeout_error())
            return True
        return False

    def _prepare_incoming(self) -> None:
        with self._cond:
            jobs = list(self._incoming)
            self._incoming.clear()
        for job in jobs:
            if self._gone(job):
                continue
            try:
                job.load(self.registry)
                job.prepare(self.max_tokens)
                if isinstance(job, DirectJob):
                    job.complete(job.run())
                    continue
            except ServiceError as exc:
                job.complete(None, exc)
                continue
            except torch.OutOfMemoryError:
                job.complete(None, ServiceError(503, "unavailable", "the device ran out of memory loading the model",
                                                retry_after=30))
                continue
            except Exception:  # a bug: answer this job, as _run answers the running ones
                log.exception("inference engine error in a %s job", job.kind)
                job.complete(None, ServiceError(500, "internal_error", "internal error in the inference service; "
                                                                       "its log has the details"))
                continue
            if isinstance(job, GenerateJob):
                self._generate.append(job)
            else:
                self._encode.append(job)

    def _encode_once(self) -> None:
        self._encode = [j for j in self._encode if not self._gone(j)]
        if not self._encode:
            return
        model = self._encode[0].model
        texts, needs, owners = [], [], []
        longest = 0
        for job in sorted((j for j in self._encode if j.model_key == model.key), key=EncodeJob.remaining):
            while job.remaining():
                n = len(job.ids[job.cursor])
                if texts and max(longest, n) * (len(texts) + 1) > self.batch_tokens:
                    break
                i, ids = job.take()
                texts.append(ids)
                needs.append(job.saes)
                owners.append((job, i))
                longest = max(longest, n)
            else:
                continue
            break
        self._encode = [j for j in self._encode if j.remaining()]
        try:
            codes = encode_texts(model, texts, needs)
        except torch.OutOfMemoryError:
            err = ServiceError(503, "unavailable", "the device ran out of memory; try a shorter text", retry_after=10)
            for job in {id(j): j for j, _ in owners}.values():
                job.complete(None, err)
            return
        self.counters["forward_passes"] += 1
        self.counters["texts"] += len(texts)
        self.counters["tokens"] += sum(len(t) for t in texts)
        for (job, i), c in zip(owners, codes):
            if job.finished:
                continue
            try:
                job.consume(i, c)
            except ServiceError as exc:
                job.complete(None, exc)

    def _generate_once(self) -> None:
        if self._batch is not None and not self._batch.active():
            self._batch = None  # every job of a finished batch has been answered
        if self._batch is None:
            while self._generate and self._gone(self._generate[0]):
                self._generate.popleft()
            if not self._generate:
                return
            key = self._generate[0].model_key
            jobs = []
            for job in list(self._generate):
                if len(jobs) < MAX_GENERATION_JOBS and job.model_key == key and not self._gone(job):
                    jobs.append(job)
            for job in jobs:
                self._generate.remove(job)
            self._generate = deque(j for j in self._generate if not j.finished)
            if not jobs:
                return
            self._batch = GenerationBatch(jobs[0].model, jobs)
        try:
            self._batch.step()
        except torch.OutOfMemoryError:
            err = ServiceError(503, "unavailable", "the device ran out of memory while generating; try fewer tokens",
                               retry_after=10)
            for job in self._batch.jobs:
                job.complete(None, err)
            self._batch = None
            return
        self.counters["generation_steps"] += 1
        if not self._batch.active():
            self._batch = None
