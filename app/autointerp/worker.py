"""The auto-interp worker: claims jobs from the store's queue and runs them, many workers at once.

- Up to `concurrency` jobs run at a time, as asyncio tasks; database calls run in threads.
- Each job is heartbeated every lease/3 seconds (at most 30 s). When a heartbeat finds the job is no longer ours
  (its lease expired and another worker took it, or it was cancelled), the job's task is
  cancelled and its work dropped; results commit only together with the job's completion, in one
  transaction that checks ownership (app.autointerp.explain.store_result), so a job is stored once.
- Failures go back through queue.fail (retry with backoff, or `failed` after max_attempts, the
  error kept). Errors marked not retryable (a 4xx from the LLM server, too few examples) fail at once.
- SIGTERM / SIGINT: stop claiming, let running jobs finish within `grace_s`, then release the rest
  untouched (the attempt does not count). A second signal releases at once.
- Safe with many workers on many machines against one PostgreSQL: claims use SKIP LOCKED and
  every state change is conditional on (status = running, lease_owner = this worker).

Run it with `sae-atlas worker`, or `python -m app.autointerp.worker --backend instant` (the
instant backend is for tests and benchmarks only).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from app.autointerp import queue
from app.autointerp.backends import Backend, make_backend
from app.autointerp.explain import JobRef, LeaseLost, run_explain_job
from store.settings import get_settings

log = logging.getLogger("app.autointerp.worker")

DEFAULT_GRACE_S = 30.0


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass
class WorkerStats:
    claimed: int = 0
    done: int = 0
    retried: int = 0
    failed: int = 0
    skipped: int = 0  # failed without retry because the feature cannot be explained (too few examples)
    lost: int = 0
    released: int = 0
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        return (f"claimed {self.claimed}, done {self.done}, retried {self.retried}, failed {self.failed} "
                f"(skipped for too few examples {self.skipped}), lost {self.lost}, released {self.released} "
                f"in {time.monotonic() - self.started:.1f} s")


class Worker:
    def __init__(self, backend: Backend, engine: Engine, concurrency: int, once: bool = False,
                 max_jobs: int | None = None, worker_id: str | None = None, grace_s: float = DEFAULT_GRACE_S,
                 lease_s: float | None = None, poll_s: float | None = None):
        s = get_settings()
        self.backend = backend
        self.engine = engine
        self.concurrency = max(1, concurrency)
        self.once = once
        self.max_jobs = max_jobs
        self.id = worker_id or new_worker_id()
        self.grace_s = grace_s
        self.lease_s = lease_s or s.job_lease_s
        self.poll_s = poll_s or s.worker_poll_s
        self.stats = WorkerStats()
        self.active: dict[int, asyncio.Task] = {}
        self.jobs: dict[int, JobRef] = {}
        self.lost: set[int] = set()
        self.stopping = asyncio.Event()
        self.hurry = False  # a second signal: release now instead of waiting for the grace period

    # --- database calls, each in its own session, run in a thread ---------------------------

    def _db(self, fn, *args, **kwargs):
        with Session(self.engine, expire_on_commit=False) as session:
            return fn(session, *args, **kwargs)

    async def db(self, fn, *args, **kwargs):
        return await asyncio.to_thread(self._db, fn, *args, **kwargs)

    # --- signals ----------------------------------------------------------------------------

    def request_stop(self, signame: str = "signal") -> None:
        if self.stopping.is_set():
            log.warning("%s again: releasing %d running job(s) now", signame, len(self.active))
            self.hurry = True
            for task in self.active.values():
                task.cancel()
            return
        log.info("%s: no new jobs; waiting up to %.0f s for %d running job(s), then releasing them",
                 signame, self.grace_s, len(self.active))
        self.stopping.set()

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.request_stop, sig.name)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or Windows
                pass

    # --- one job ----------------------------------------------------------------------------

    async def _heartbeat(self, job: JobRef, work: asyncio.Task) -> None:
        # Three beats per lease, and at least every 30 s so that a cancel is noticed quickly.
        interval = max(0.2, min(self.lease_s / 3, 30.0))
        while not work.done():
            await asyncio.sleep(interval)
            if work.done():
                return
            try:
                ours = await self.db(queue.heartbeat, job.id, self.id, self.lease_s)
            except Exception as exc:  # database blip: keep working; if the lease lapses, the final write says so
                log.warning("job %d: heartbeat failed (%s); will try again", job.id, str(exc).splitlines()[0][:200])
                continue
            if not ours:
                log.warning("job %d: lease lost (cancelled, or expired and taken by another worker); "
                            "dropping its work", job.id)
                self.lost.add(job.id)
                work.cancel()
                return

    async def _run(self, job: JobRef) -> None:
        work = asyncio.create_task(run_explain_job(job, self.backend, self.engine, self.id))
        beat = asyncio.create_task(self._heartbeat(job, work))
        try:
            result = await asyncio.shield(work)
            self.stats.done += 1
            log.debug("job %d done: %s", job.id, result.get("text"))
        except asyncio.CancelledError:
            # Either the heartbeat found the job is not ours, or shutdown is releasing it.
            work.cancel()
            if job.id in self.lost:
                self.stats.lost += 1
            else:
                await self._release(job)
        except LeaseLost as exc:
            self.stats.lost += 1
            log.warning("job %d: %s; its results were not stored", job.id, exc)
        except Exception as exc:
            await self._fail(job, exc)
        finally:
            beat.cancel()
            self.active.pop(job.id, None)
            self.jobs.pop(job.id, None)

    async def _fail(self, job: JobRef, exc: BaseException) -> None:
        retryable = bool(getattr(exc, "retryable", True))
        message = f"{type(exc).__name__}: {exc}"
        if not hasattr(exc, "retryable"):  # not one of our expected failures: keep the traceback in the log
            log.error("job %d: unexpected error", job.id, exc_info=exc)
        try:
            status = await self.db(queue.fail, job, self.id, message, retryable)
        except Exception as db_exc:
            log.error("job %d failed (%s) and recording the failure failed too (%s); the lease will expire",
                      job.id, message, db_exc)
            return
        if status == "queued":
            self.stats.retried += 1
            log.warning("job %d failed (attempt %d/%d), will retry after a backoff: %s", job.id, job.attempts,
                        job.max_attempts, message)
        elif status == "failed":
            self.stats.failed += 1
            if type(exc).__name__ == "TooFewExamples":
                self.stats.skipped += 1
                log.info("job %d skipped: %s", job.id, message)
            else:
                log.error("job %d failed for good after %d attempt(s): %s", job.id, job.attempts, message)
        else:
            self.stats.lost += 1
            log.warning("job %d failed (%s) but is no longer ours", job.id, message)

    async def _release(self, job: JobRef) -> None:
        try:
            if await self.db(queue.release, job.id, self.id):
                self.stats.released += 1
                log.info("job %d released back to the queue", job.id)
        except Exception as exc:
            log.error("job %d: release failed (%s); its lease will expire", job.id, exc)

    # --- the loop ---------------------------------------------------------------------------

    def _wanted(self) -> int:
        free = self.concurrency - len(self.active)
        if self.max_jobs is not None:
            free = min(free, self.max_jobs - self.stats.claimed)
        return max(0, free)

    async def _claim(self, n: int) -> list[JobRef]:
        try:
            jobs = await self.db(queue.claim, self.id, n, self.lease_s)
        except Exception as exc:
            log.warning("claiming jobs failed (%s); retrying in %.1f s", str(exc).splitlines()[0][:200], self.poll_s)
            return []
        return [JobRef(id=j.id, feature_id=j.feature_id, sae_id=j.sae_id, attempts=j.attempts,
                       max_attempts=j.max_attempts, params=dict(j.params or {})) for j in jobs]

    async def run(self) -> int:
        self._install_signals()
        log.info("worker %s started: backend %s (%s), concurrency %d, lease %.0f s, store %s", self.id,
                 self.backend.kind, self.backend.model_name("explain"), self.concurrency, self.lease_s,
                 self.engine.url.render_as_string(hide_password=True))
        try:
            while not self.stopping.is_set():
                n = self._wanted()
                claimed: list[JobRef] = []
                if n:
                    claimed = await self._claim(n)
                    for job in claimed:
                        self.stats.claimed += 1
                        self.jobs[job.id] = job
                        log.info("job %d claimed (feature %d, attempt %d/%d)", job.id, job.feature_id, job.attempts,
                                 job.max_attempts)
                        self.active[job.id] = asyncio.create_task(self._run(job))
                out_of_jobs = self.max_jobs is not None and self.stats.claimed >= self.max_jobs
                if not self.active and (out_of_jobs or (self.once and not claimed)):
                    break
                if claimed and len(claimed) == n and self._wanted():
                    continue  # the queue has more and we have room: claim again at once
                waiters = [*self.active.values(), asyncio.create_task(self.stopping.wait())]
                timeout = None if (out_of_jobs or not self._wanted()) else self.poll_s
                await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                waiters[-1].cancel()
            await self._drain()
        finally:
            await self.backend.aclose()
            log.info("worker %s stopped: %s; backend %s", self.id, self.stats.line(), self.backend.stats.as_dict())
        return 0

    async def _drain(self) -> None:
        """On shutdown: give running jobs the grace period, then release what is left."""
        if not self.active:
            return
        if not self.hurry:
            await asyncio.wait(list(self.active.values()), timeout=self.grace_s)
        for task in list(self.active.values()):
            task.cancel()  # _run releases the job
        if self.active:
            await asyncio.wait(list(self.active.values()), timeout=30)


def setup_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=get_settings().log_level,
                            format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")


def default_concurrency(backend: Backend) -> int:
    if backend.kind == "local":
        return 1  # one model, generations run one at a time anyway
    if backend.kind == "instant":
        return 4
    return get_settings().llm_concurrency


def run_worker(concurrency: int | None = None, once: bool = False, max_jobs: int | None = None, *,
               backend: Backend | str | None = None, engine: Engine | None = None, worker_id: str | None = None,
               grace_s: float = DEFAULT_GRACE_S) -> int:
    """Run a worker until stopped (or, with once, until nothing is claimable); returns an exit code."""
    from store.db import get_engine

    setup_logging()
    backend = backend if backend is not None and not isinstance(backend, str) else make_backend(backend)
    engine = engine or get_engine()
    worker = Worker(backend, engine, concurrency or default_concurrency(backend), once=once, max_jobs=max_jobs,
                    worker_id=worker_id, grace_s=grace_s)
    return asyncio.run(worker.run())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.autointerp.worker", description=__doc__.splitlines()[0])
    p.add_argument("--backend", default=None,
                   help="local[:MODEL], openai, or instant[:DELAY_S] (tests/benchmarks only); default: the setting")
    p.add_argument("--concurrency", type=int, default=None)
    p.add_argument("--once", action="store_true", help="exit when nothing is claimable")
    p.add_argument("--max-jobs", type=int, default=None)
    p.add_argument("--grace", type=float, default=DEFAULT_GRACE_S, help="seconds running jobs get on SIGTERM")
    args = p.parse_args(argv)
    from store.errors import AtlasError

    try:
        return run_worker(args.concurrency, args.once, args.max_jobs, backend=args.backend, grace_s=args.grace)
    except AtlasError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
