"""`sae-atlas trainer-worker`: claims training runs from the store and carries them out.

    claim (lease) -> train -> evaluate -> analyze -> publish (+ mark done, one transaction)

A run of transcoder sets goes the same way: its analysis is each set's (one LM pass for all its
blocks) and its publish writes every block and registers each set (app.runs.publishing). Which GPUs
a worker may use is app.runs.devices; what its heartbeat carries, app.runs.heartbeat.

- The heavy phases run in child processes (app.runs.child) in their own process group, so a
  cancel can stop them at once and a multi-GPU run is simply `torchrun` (tied to the worker's
  life by PDEATHSIG). The worker itself stays light: a monitor thread writes the run's progress,
  new metric records and log tail to the store every SAE_ATLAS_RUN_HEARTBEAT_S seconds, in the
  same conditional UPDATE that extends the lease.
- When that UPDATE finds the run is no longer ours (cancelled, or the lease expired and another
  worker took it), the children are killed and nothing is published.
- A worker that dies (SIGKILL, OOM, lost GPU) stops heartbeating; after SAE_ATLAS_RUN_LEASE_S the
  run goes back to the queue and the next worker resumes it from the run folder's checkpoint
  (the run folder lives under DATA_DIR/runs, which all trainer workers share).
- SIGTERM/SIGINT: the trainer checkpoints, and the run is released untouched for another worker.
- Publishing writes every SAE of the run and marks the run done in one transaction, only if the
  run is still ours: a cancelled run never has half its SAEs published. The monitor keeps
  heartbeating through analysis and publishing, so a publish longer than the lease is not taken
  over by another trainer.
- The run's local model and corpus paths are checked against the configured roots again before
  anything runs (app.runs.spec.confine_spec), and the children run in the run's folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

from sqlalchemy import Engine, insert, update
from sqlalchemy.orm import Session

from app import leases
from app.autointerp.worker import new_worker_id
from app.runs import child
from app.runs.devices import DeviceSlots, cuda_device_keys
from app.runs.heartbeat import LOG_TAIL_LINES, MetricsReader, RunLost, _finite, log_tail
from app.runs.publishing import HOLD_PUBLISH_ENV, hold_before_commit, publish_run, unregister_sets
from app.runs.service import METRIC_FIELDS
from app.runs.spec import RunSpec, confine_spec
from store.errors import AtlasError
from store.models import JobStatus, RunMetric, TrainingRun, utcnow
from store.settings import get_settings
from trainer import progress as progress_file

# Their homes are app.runs.devices, .heartbeat and .publishing; importable from here as before.
__all__ = ["DeviceSlots", "Execution", "HOLD_PUBLISH_ENV", "LOG_TAIL_LINES", "MetricsReader", "RunLost", "TrainerWorker",
           "cuda_device_keys", "hold_before_commit", "log_tail"]

log = logging.getLogger("app.runs.worker")

# Share of the pipeline's progress bar each phase covers.
PHASES = {"train": (0.0, 0.85), "evaluate": (0.85, 0.88), "analyze": (0.88, 0.97), "select": (0.88, 0.97),
          "publish": (0.97, 1.0)}
KILL_GRACE_S = 5.0


class Execution:
    """One attempt at one run, by one worker."""

    def __init__(self, worker: TrainerWorker, run: TrainingRun, devices: list[int] | None = None):
        s = get_settings()
        self.devices = devices
        self.worker = worker
        self.run_id = run.id
        self.attempt = run.attempts
        self.name = run.name
        self.spec = RunSpec.model_validate(run.spec)
        self.workdir = Path(run.workdir) if run.workdir else s.runs_dir / f"run-{run.id}"
        self.out = self.workdir / child.SAE_DIR
        self.outputs = self.spec.outputs(run.name)
        self.total_steps = self.spec.tokens // self.spec.batch_size
        files = {name: self.out / folder / "metrics.jsonl" for folder, name in self.outputs}
        self.reader = MetricsReader(files, dict(run.log_offsets or {}))
        self.latest: dict = dict(run.latest or {})
        self.phase = "train"
        self.lost = threading.Event()
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.progress_path = self.workdir / "progress.json"
        self.log_path = self.workdir / "log.txt"

    # --- writing to the store -------------------------------------------------------------------

    def _progress(self) -> tuple[str, float, int]:
        p = progress_file.read(self.progress_path) or {}
        phase = p.get("phase") or self.phase
        lo, hi = PHASES.get(phase, (0.0, 0.0))
        done, total = p.get("done", 0), max(1, p.get("total", 1))
        frac = min(1.0, done / total)
        item = p.get("item")
        if phase in ("analyze", "select") and item:
            i, n = (int(x) for x in item.split("/"))
            frac = ((i - 1) + (frac if phase == "analyze" else 1.0)) / max(1, n)
        step = int(done) if phase == "train" else self.total_steps
        return phase, lo + (hi - lo) * frac, step

    def flush(self, attempt: int | None = None, extra: dict | None = None) -> None:
        """Write new metrics, progress and the log tail, and extend the lease; RunLost if the run
        is no longer ours. attempt: the attempt the new records belong to (default this one)."""
        with self.lock:
            records, offsets = self.reader.read()
            phase, frac, step = self._progress()
            rows = []
            for sae, recs in records.items():
                for r in recs:
                    rows.append({"run_id": self.run_id, "sae": sae, "attempt": attempt or self.attempt,
                                 **{f: _finite(r.get(f)) for f in METRIC_FIELDS if f != "tokens"},
                                 "tokens": int(r.get("tokens", 0))})
                self.latest[sae] = {f: _finite(recs[-1].get(f)) for f in METRIC_FIELDS}
            values = {"phase": phase, "progress": frac, "step": step, "latest": self.latest,
                      "log_tail": log_tail(self.log_path), "log_offsets": offsets, **(extra or {})}
            now = utcnow()
            lease = get_settings().run_lease_s
            def attempt_write():
                with Session(self.worker.engine) as session:
                    try:
                        n = session.execute(update(TrainingRun).where(leases.owned(self.run_id, self.worker.id, TrainingRun))
                                            .values(heartbeat_at=now, lease_expires_at=now + timedelta(seconds=lease),
                                                    **values)).rowcount
                        if not n:
                            session.rollback()
                            return False
                        if rows:
                            session.execute(insert(RunMetric), rows)
                        session.commit()
                        return True
                    except BaseException:
                        session.rollback()
                        raise

            if not leases.retry_busy(attempt_write):
                self.lost.set()
                raise RunLost(f"run {self.run_id} is no longer ours")
            self.reader.offsets = offsets

    def monitor(self, stop: threading.Event) -> None:
        interval = get_settings().run_heartbeat_s
        while not stop.wait(interval):
            try:
                self.flush()
            except RunLost:
                self.kill_child()
                return
            except Exception as exc:  # a database hiccup: keep going; the lease has slack
                log.warning("run %d: could not write progress (%s); retrying", self.run_id, exc)

    # --- children -------------------------------------------------------------------------------

    def _child_cmd(self, what: str) -> list[str]:
        cmd = [sys.executable, "-m", "app.runs.child", what, str(self.workdir)]
        if what == "train" and self.spec.gpus > 1:
            cmd = [sys.executable, "-m", "app.runs.child", "exec", "--", sys.executable, "-m", "torch.distributed.run",
                   "--standalone", f"--nproc_per_node={self.spec.gpus}", "-m", "app.runs.child", what, str(self.workdir)]
        return cmd

    def run_child(self, what: str) -> int:
        self.phase = what
        env = {**os.environ, child.PARENT_ENV: str(os.getpid()), progress_file.ENV: str(self.progress_path),
               "PYTHONUNBUFFERED": "1"}
        if self.devices is not None:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            names = visible.split(",") if visible else [str(i) for i in range(max(self.devices) + 1)]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(names[i] for i in self.devices)
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n=== {what} · attempt {self.attempt} · worker {self.worker.id} · {utcnow():%Y-%m-%d %H:%M:%S} UTC ===\n"
                       .encode())
            logf.flush()
            # cwd: the run's folder, so that no name in the spec resolves against the worker's folder
            self.proc = subprocess.Popen(self._child_cmd(what), stdout=logf, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.workdir)
        interrupted = False
        while True:
            try:
                return self.proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
            if self.lost.is_set():
                self.kill_child()
            elif self.worker.stopping.is_set() and not interrupted:
                interrupted = True  # the trainer saves a checkpoint on SIGINT and exits 130
                self._signal_child(signal.SIGINT)
            elif self.worker.hurry.is_set():
                self.kill_child()

    def _signal_child(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def kill_child(self) -> None:
        """SIGTERM the child's process group, then SIGKILL what is left after a few seconds."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        self._signal_child(signal.SIGTERM)
        try:
            proc.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            self._signal_child(signal.SIGKILL)
            proc.wait()

    def child_error(self, what: str, rc: int) -> str:
        err = self.workdir / child.ERROR_FILE
        if err.is_file():
            return err.read_text().strip()[:2000]
        if rc < 0:
            return f"the {what} process was killed by signal {signal.Signals(-rc).name}"
        last = [line for line in log_tail(self.log_path, 200).splitlines() if line.strip()]
        return f"the {what} process exited with status {rc}: " + (last[-1][:500] if last else "no output")

    # --- the pipeline ---------------------------------------------------------------------------

    def trained(self) -> bool:
        sets = self.spec.transcoder_sets(self.name) if self.spec.trains_transcoders else []
        return all((self.out / folder / "cfg.json").is_file() and (self.out / folder / "metrics.json").is_file()
                   for folder, _ in self.outputs) and all((self.out / manifest).is_file() for manifest, _, _ in sets)

    def execute(self) -> str:
        """Carry the run to done, failed, cancelled or released; returns that status ('lost' if
        it stopped being ours)."""
        from trainer.train import CHECKPOINT

        self.workdir.mkdir(parents=True, exist_ok=True)
        try:  # checked again here: the roots may have changed since the run was queued
            self.spec = confine_spec(self.spec)
        except AtlasError as exc:
            return self._fail(exc.one_line(), retryable=False)
        (self.workdir / child.SPEC_FILE).write_text(self.spec.model_dump_json(indent=1))
        (self.workdir / child.ERROR_FILE).unlink(missing_ok=True)
        resumed_from = None
        if (self.out / CHECKPOINT).is_file() and not self.trained():
            try:
                resumed_from = int(json.loads((self.out / "run.json").read_text())["step"])
            except (OSError, ValueError, KeyError):
                resumed_from = None
        # Records the previous attempt wrote after its last flush belong to that attempt.
        self.flush(attempt=max(1, self.attempt - 1),
                   extra={"workdir": str(self.workdir), "resumed_from_step": resumed_from, "error": None})
        if resumed_from is not None:
            log.info("run %d: resuming from the checkpoint at step %d (attempt %d)", self.run_id, resumed_from, self.attempt)
        stop = threading.Event()
        monitor = threading.Thread(target=self.monitor, args=(stop,), name=f"run-{self.run_id}-monitor", daemon=True)
        monitor.start()
        try:
            for what in ("train", "analyze"):
                if what == "train" and self.trained():
                    continue
                rc = self.run_child(what)
                if self.lost.is_set():
                    return self._lost()
                if rc != 0:
                    return self._child_failed(what, rc)
            # The monitor keeps heartbeating through the publish: a publish of a big sweep can
            # outlast the lease, and another trainer must not take the run over meanwhile.
            self.phase = "publish"
            self.progress_path.write_text(json.dumps({"phase": "publish", "done": 0, "total": 1}))
            self.flush()
            return publish_run(self)
        except RunLost:
            return self._lost()
        finally:
            stop.set()
            monitor.join(timeout=10)
            self.kill_child()

    def _status_now(self) -> str | None:
        with Session(self.worker.engine) as session:
            run = session.get(TrainingRun, self.run_id)
            return run.status if run else None

    def _lost(self) -> str:
        self.kill_child()
        status = self._status_now()
        if status == JobStatus.cancelled.value:
            log.info("run %d: cancelled; stopped its processes, published nothing", self.run_id)
            unregister_sets(self)
            shutil.rmtree(self.out, ignore_errors=True)  # checkpoints and partial analyses of a cancelled run
            return JobStatus.cancelled.value
        log.warning("run %d: no longer ours (status %s); dropped this attempt", self.run_id, status)
        return "lost"

    def _child_failed(self, what: str, rc: int) -> str:
        if self.worker.stopping.is_set() and rc in (130, -signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL):
            with Session(self.worker.engine) as session:
                leases.release(session, self.run_id, self.worker.id, TrainingRun)
            log.info("run %d: stopped for shutdown at its checkpoint; released for another worker", self.run_id)
            return "released"
        message = self.child_error(what, rc)
        # 2 and 3: the child explained a problem that another attempt would meet again.
        return self._fail(message, retryable=rc not in (2, 3))

    def _fail(self, message: str, retryable: bool) -> str:
        with Session(self.worker.engine) as session:
            run = session.get(TrainingRun, self.run_id)
            outcome = leases.fail(session, run, self.worker.id, message, retryable=retryable)
        log.warning("run %d: %s -> %s", self.run_id, message, outcome)
        return outcome


class TrainerWorker:
    def __init__(self, engine: Engine, worker_id: str | None = None, gpus: int | None = None, once: bool = False,
                 max_runs: int | None = None, poll_s: float | None = None):
        s = get_settings()
        self.engine = engine
        self.id = worker_id or new_worker_id()
        keys = cuda_device_keys()
        self.slots = DeviceSlots(s.runs_dir / ".devices", keys) if keys else None
        self.gpus = gpus or max(1, len(keys))
        self.once = once
        self.max_runs = max_runs
        self.poll_s = poll_s or s.worker_poll_s
        self.stopping = threading.Event()
        self.hurry = threading.Event()
        self.outcomes: list[tuple[int, str]] = []

    def request_stop(self, signum=None, frame=None) -> None:
        if self.stopping.is_set():
            self.hurry.set()
            return
        log.info("stopping: the current run checkpoints and goes back to the queue (signal again to kill it now)")
        self.stopping.set()

    def claim(self) -> tuple[TrainingRun | None, list[int] | None]:
        """A run that fits the GPUs free right now (all of ours without CUDA), and those GPUs."""
        free = None
        capacity = self.gpus
        if self.slots is not None:
            free = self.slots.free()[: self.gpus]
            capacity = len(free)
            if not capacity:
                return None, None
        with Session(self.engine, expire_on_commit=False) as session:
            runs = leases.claim(session, self.id, limit=1, lease_s=get_settings().run_lease_s, model=TrainingRun,
                               where=(TrainingRun.gpus <= capacity,))
        if not runs:
            if self.slots is not None:
                self.slots.release()
            return None, None
        devices = None
        if self.slots is not None:
            devices = free[: runs[0].gpus]
            self.slots.keep(devices)
        return runs[0], devices

    def serve(self) -> int:
        """Run until stopped (or, with once, until the queue has nothing for us); returns an exit code."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        log.info("trainer worker %s: up to %d GPU(s) per run; polling every %.1f s", self.id, self.gpus, self.poll_s)
        while not self.stopping.is_set():
            if self.max_runs is not None and len(self.outcomes) >= self.max_runs:
                break
            run, devices = self.claim()
            if run is None:
                if self.once:
                    break
                self.stopping.wait(self.poll_s)
                continue
            log.info("run %d (%s): claimed, attempt %d of %d", run.id, run.name, run.attempts, run.max_attempts)
            try:
                outcome = Execution(self, run, devices).execute()
            except RunLost:
                outcome = "lost"
            except Exception as exc:  # a bug or the database going away: give the run back to the queue
                log.exception("run %d: the worker failed", run.id)
                try:
                    with Session(self.engine) as session:
                        leases.fail(session, run, self.id, f"trainer worker error: {type(exc).__name__}: {exc}")
                except Exception:
                    log.exception("run %d: could not record the failure; its lease will expire", run.id)
                outcome = "error"
            finally:
                if self.slots is not None:
                    self.slots.release()
            self.outcomes.append((run.id, outcome))
            print(f"run {run.id} ({run.name}): {outcome}", flush=True)
        return 0
