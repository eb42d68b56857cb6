"""Training runs in the store: submit, cancel, read, and their metric history.

Shared by the REST API, the pages and the CLI, so every way in validates the same way.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from store.errors import Conflict, NotFound
from store.models import SAE, JobStatus, RunMetric, TrainingRun, utcnow
from app.runs.spec import RunSpec, public_spec, validate_spec
from store.settings import get_settings

LIVE = (JobStatus.queued.value, JobStatus.running.value)
STATUSES = ("queued", "running", "done", "failed", "cancelled")
METRIC_FIELDS = ("step", "tokens", "loss", "fvu", "l0", "dead_frac", "lr", "elapsed_s")


class NameTaken(Conflict):
    pass


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat() if dt else None


def submit(session: Session, spec: RunSpec, requested_by: str | None = None) -> TrainingRun:
    """Validate and queue a run (flushes; the caller commits). AtlasError says what is wrong."""
    spec = validate_spec(spec)  # local paths come back resolved: the worker reads exactly what was checked
    name = spec.name
    if name is not None:
        taken_run = session.scalar(select(TrainingRun.id).where(TrainingRun.name == name))
        published = [n for _, n in spec.outputs(name)]
        taken_sae = session.scalar(select(SAE.id).where(SAE.name.in_(published)).limit(1))
        if taken_run is not None or taken_sae is not None:
            raise NameTaken(f"the name {name!r} is already used by another run or SAE", "choose another name")
        if spec.trains_transcoders:
            from trainer.transcoders.publish_set import registered_dir
            from trainer.transcoders.sets import SET_FILE

            for _, set_name, _ in spec.transcoder_sets(name):
                if (registered_dir(set_name) / SET_FILE).exists():
                    raise NameTaken(f"a transcoder set named {set_name!r} is already registered", "choose another name")
    run = TrainingRun(name=name or f"pending-{utcnow().timestamp():.6f}", spec=spec.model_dump(mode="json"),
                      status=JobStatus.queued.value, gpus=spec.gpus, priority=spec.priority,
                      max_attempts=get_settings().run_max_attempts, requested_by=requested_by,
                      total_steps=spec.tokens // spec.batch_size)
    try:
        with session.begin_nested():
            session.add(run)
            session.flush()
            if name is None:
                run.name = f"run-{run.id}"
                session.flush()
    except IntegrityError:
        raise NameTaken(f"the name {name!r} is already used by another run", "choose another name") from None
    return run


def cancel(session: Session, run_id: int) -> TrainingRun:
    """Cancel a queued or running run (the caller commits). A running run's worker notices at its
    next heartbeat (every SAE_ATLAS_RUN_HEARTBEAT_S seconds), stops its trainer and publishes nothing."""
    run = get(session, run_id)
    n = session.execute(update(TrainingRun).where(TrainingRun.id == run_id, TrainingRun.status.in_(LIVE)).values(
        status=JobStatus.cancelled.value, finished_at=utcnow(), lease_owner=None, lease_expires_at=None,
        phase=None)).rowcount
    session.flush()
    session.refresh(run)
    if not n:  # it had ended, or ended between our read and the conditional update
        raise Conflict(f"run {run_id} is already {run.status}", "only queued or running runs can be cancelled")
    return run


def get(session: Session, run_id: int) -> TrainingRun:
    run = session.get(TrainingRun, run_id)
    if run is None:
        raise NotFound(f"no training run {run_id}")
    return run


def recent(session: Session, limit: int = 50, offset: int = 0, status: str | None = None) -> tuple[list[TrainingRun], int]:
    q = select(TrainingRun)
    count = select(func.count()).select_from(TrainingRun)
    if status:
        q = q.where(TrainingRun.status == status)
        count = count.where(TrainingRun.status == status)
    rows = list(session.scalars(q.order_by(TrainingRun.id.desc()).limit(limit).offset(offset)))
    return rows, int(session.scalar(count) or 0)


def counts(session: Session) -> dict[str, int]:
    return {k: int(v) for k, v in session.execute(select(TrainingRun.status, func.count()).group_by(TrainingRun.status))}


def published_saes(session: Session, run_id: int) -> list[SAE]:
    return list(session.scalars(select(SAE).where(SAE.run_id == run_id).order_by(SAE.id)))


def history(session: Session, run_id: int, sae: str | None = None, max_points: int = 2000) -> dict[str, list[dict]]:
    """Each SAE's metric records by step. A step logged twice (the steps between a checkpoint and a
    worker's death are trained again after the resume) keeps its newest record. Long histories are
    thinned in SQL to about max_points per SAE (every n-th step), always keeping the last record."""
    conds = [RunMetric.run_id == run_id]
    if sae:
        conds.append(RunMetric.sae == sae)
    n, last = session.execute(select(func.count(), func.max(RunMetric.step)).where(*conds)).one()
    n_saes = max(1, int(session.scalar(select(func.count(func.distinct(RunMetric.sae))).where(*conds)) or 1))
    q = select(RunMetric).where(*conds)
    if n and n / n_saes > max_points and last:
        stride = -(-int(last) // max_points)  # ceil
        q = q.where((RunMetric.step % stride == 0) | (RunMetric.step == last))
    by_sae: dict[str, dict[int, dict]] = {}
    for m in session.scalars(q.order_by(RunMetric.id)):
        by_sae.setdefault(m.sae, {})[m.step] = {**{f: getattr(m, f) for f in METRIC_FIELDS}, "attempt": m.attempt}
    out = {}
    for name, steps in by_sae.items():
        rows = [steps[s] for s in sorted(steps)]
        if len(rows) > max_points:  # logged steps that share no multiple of the stride
            stride_f = len(rows) / max_points
            rows = [rows[int(i * stride_f)] for i in range(max_points - 1)] + [rows[-1]]
        out[name] = rows
    return out


def run_dict(run: TrainingRun, saes: list[SAE] | None = None, full: bool = True) -> dict:
    """A run as the API and pages show it to anyone who may read: local paths relative to their
    roots, no working directory, no worker host names or process ids (`leased` says whether a
    worker holds it), and the log tail and error with host paths masked."""
    d = {
        "id": run.id, "name": run.name, "status": run.status, "phase": run.phase, "progress": round(run.progress, 4),
        "step": run.step, "total_steps": run.total_steps, "gpus": run.gpus, "priority": run.priority,
        "attempts": run.attempts, "max_attempts": run.max_attempts, "resumed_from_step": run.resumed_from_step,
        "error": redact(run.error), "requested_by": run.requested_by, "leased": run.lease_owner is not None,
        "created_at": _iso(run.created_at), "started_at": _iso(run.started_at), "finished_at": _iso(run.finished_at),
        "heartbeat_at": _iso(run.heartbeat_at), "latest": run.latest or {},
        "spec": public_spec(run.spec or {}),
    }
    if saes is not None:
        d["saes"] = [{"id": s.id, "name": s.name, "site": s.site, "architecture": s.architecture, "d_sae": s.d_sae,
                      "k": s.k, "metrics": s.metrics, "url": f"/saes/{s.name}"} for s in saes]
    if full:
        d["log_tail"] = redact(run.log_tail) or ""
    return d


_WORKER_ID = re.compile(r"\b[\w.-]+:\d+:[0-9a-f]{6}\b")  # host:pid:random (app.autointerp.worker.new_worker_id)


def redact(text: str | None) -> str | None:
    """Host paths and worker ids out of text the public sees (log tails, errors): the data folder,
    the run roots, the home folder and the Python installation become short names."""
    if not text:
        return text
    import sys

    s = get_settings()
    names = [(str(s.runs_dir), "$RUNS"), *((str(r), "$MODELS") for r in s.model_root_dirs),
             *((str(r), "$CORPORA") for r in s.corpus_root_dirs), (str(s.models_dir), "$MODELS"),
             (str(s.data_dir), "$DATA_DIR"), (sys.prefix, "$PYTHON"), (sys.base_prefix, "$PYTHON"),
             (str(Path.home()), "~")]
    for prefix, name in sorted(names, key=lambda p: -len(p[0])):  # longest first: nested folders
        if len(prefix) > 1:
            text = text.replace(prefix, name)
    return _WORKER_ID.sub("(worker)", text)


class PublicRun:
    """A run as pages show it: the ORM row with its spec's local paths relative to their roots, its
    error and log tail masked (redact), and no working directory or lease owner."""

    _HIDDEN = frozenset(("workdir", "lease_owner", "log_offsets"))

    def __init__(self, run: TrainingRun):
        self._run = run
        self.spec = public_spec(run.spec or {})
        self.error = redact(run.error)
        self.log_tail = redact(run.log_tail) or ""
        self.leased = run.lease_owner is not None

    def __getattr__(self, name: str):
        if name in self._HIDDEN:
            raise AttributeError(f"{name} is not shown publicly")
        return getattr(self._run, name)


def public_view(run: TrainingRun | PublicRun) -> PublicRun:
    return run if isinstance(run, PublicRun) else PublicRun(run)
