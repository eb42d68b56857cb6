"""Attribution graphs as jobs: naming transcoder sets, queueing a graph, and the worker that claims
and computes queued graphs (the rows of store.models.AttributionGraph, claimed through app.leases
like training runs). `sae-atlas graph` computes one in the foreground with `compute_and_store`.

Transcoder sets are named by their folder under DATA_DIR/transcoder_sets (a run folder holding
one transcoder_set.json, or a manifest file NAME.json); the CLI also takes any folder.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from app import leases
from app.autointerp.worker import new_worker_id
from store import graphs as gstore
from store.db import session_factory
from store.errors import AtlasError, NotFound
from store.models import AttributionGraph, JobStatus
from store.settings import get_settings
from trainer.transcoders.sets import SET_NAME, sets_dir

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 1.0


def resolve_set(name: str):
    """The manifest of the set named `name` (NotFound: no such set; AtlasError: it lacks a block)."""
    from trainer.circuits.compute import open_set

    if not SET_NAME.fullmatch(name or ""):
        raise NotFound(f"no transcoder set named {name!r}", "name a folder of DATA_DIR/transcoder_sets")
    root = sets_dir()
    for candidate in (root / name, root / f"{name}.json"):
        if candidate.exists():
            return open_set(candidate)
    raise NotFound(f"no transcoder set named {name!r}", f"put the set's run folder in {root}")


def set_name_of(path: Path) -> str:
    """What a set read from `path` is called: its folder's name (or the manifest's stem)."""
    path = Path(path)
    if path.is_file():
        return path.parent.name if path.name == "transcoder_set.json" else path.stem
    return path.name


def check_prompt(model: str, prompt: str, limit: int) -> None:
    """AtlasError unless the model's tokenizer (loaded alone) makes 1..limit tokens of `prompt`:
    checked before a graph is stored, so a bad request leaves no row."""
    from trainer.lm import load_tokenizer

    n = len(load_tokenizer(model)(prompt, add_special_tokens=False)["input_ids"])
    if n == 0:
        raise AtlasError("the prompt is empty", "give at least one token to attribute")
    if n > limit:
        raise AtlasError(f"the prompt has {n} tokens, more than the {limit} an attribution graph allows", "shorten the prompt")


def available_sets() -> list[str]:
    """Names of the sets in DATA_DIR/transcoder_sets."""
    root = sets_dir()
    if not root.is_dir():
        return []
    return sorted(p.name if p.is_dir() else p.stem for p in root.iterdir()
                  if (p.is_dir() and any(p.glob("transcoder_set*.json"))) or p.suffix == ".json")


def submit(session: Session, set_name: str, prompt: str, config: dict | None = None,
           requested_by: str | None = None) -> AttributionGraph:
    """Validate a graph request and queue it (the caller commits). NotFound: no such set;
    AtlasError: the set lacks a block, its model's tokenizer is not here, or the prompt is empty
    or longer than the limit."""
    from trainer.circuits.compute import GraphConfig

    cfg = GraphConfig(**(config or {}))
    tset = resolve_set(set_name)
    check_prompt(tset.model, prompt, cfg.attribution.max_tokens)
    return gstore.queue_graph(session, tset.model, set_name, str(tset.path.resolve()), prompt, cfg.to_dict(),
                              requested_by=requested_by)


class _Progress:
    """progress(done, total) for attribute(): writes the share done at most once a PROGRESS_EVERY_S,
    heartbeating the lease when there is one; raises when the row is no longer ours."""

    def __init__(self, session: Session, graph_id: int, worker_id: str | None, echo=None):
        self.session, self.graph_id, self.worker_id, self.echo = session, graph_id, worker_id, echo
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY_S and done < total:
            return
        self.last = now
        if self.echo:
            self.echo(done, total)
        ok = gstore.set_progress(self.session, self.graph_id, 0.99 * done / max(total, 1), self.worker_id)
        if self.worker_id is not None:
            ok = ok and leases.heartbeat(self.session, self.graph_id, self.worker_id, model=AttributionGraph)
        if not ok:
            raise _Lost(f"graph {self.graph_id} is no longer ours (its lease expired or it was cancelled)")


class _Lost(Exception):
    pass


def _compute(session: Session, row: AttributionGraph, worker_id: str | None, echo=None) -> None:
    from trainer.circuits.compute import GraphConfig, compute_graph, open_set, replacement_for

    cfg = GraphConfig(**row.config)
    model = replacement_for(open_set(row.set_path), cfg.device, cfg.lm_dtype)
    result = compute_graph(model, row.prompt, row.slug, cfg, _Progress(session, row.id, worker_id, echo))
    if not gstore.store_result(session, row.id, result.data, result.replacement, result.completeness,
                               result.seconds, worker_id):
        session.rollback()
        raise _Lost(f"graph {row.slug} is no longer ours")
    session.commit()


def compute_and_store(engine: Engine, set_path: Path, prompt: str, config: dict, echo=None) -> AttributionGraph:
    """Compute one graph now and store it (`sae-atlas graph`); a failure is stored, then raised."""
    from trainer.circuits.compute import GraphConfig, open_set

    cfg = GraphConfig(**config)
    tset = open_set(set_path)
    check_prompt(tset.model, prompt, cfg.attribution.max_tokens)
    with session_factory(engine)() as session:
        row = gstore.queue_graph(session, tset.model, set_name_of(set_path), str(tset.path.resolve()), prompt,
                                 cfg.to_dict(), status=JobStatus.running.value)
        session.commit()
        try:
            _compute(session, row, None, echo)
        except BaseException as exc:
            session.rollback()
            gstore.mark_failed(session, row.id, _one_line(exc))
            session.commit()
            raise
        session.refresh(row)
        return row


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, AtlasError):
        return exc.one_line()
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def steer_node(row: AttributionGraph, node_id: str, value: float, top_k: int = 10):
    """Steer one feature node of a stored graph (trainer.circuits.steer), with the graph's set."""
    from trainer.circuits.compute import GraphConfig, open_set, replacement_for
    from trainer.circuits.steer import parse_node_id, steer_feature

    cfg = GraphConfig(**row.config)
    model = replacement_for(open_set(row.set_path), cfg.device, cfg.lm_dtype)
    layer, feature, pos = parse_node_id(node_id, model.n_layers)
    return steer_feature(model, row.prompt, layer, feature, pos, value, top_k, cfg.attribution.max_tokens)


class GraphWorker:
    """Claims queued graphs one at a time and computes them (`sae-atlas graph-worker`)."""

    def __init__(self, engine: Engine, worker_id: str | None = None, once: bool = False, poll_s: float = 2.0,
                 max_graphs: int | None = None):
        self.engine, self.id, self.once, self.poll_s, self.max_graphs = engine, worker_id or new_worker_id(), once, poll_s, max_graphs
        self.stopping = False
        self.done = 0

    def request_stop(self, signum=None, frame=None) -> None:
        self.stopping = True

    def run_one(self) -> AttributionGraph | None:
        """Claim and compute one queued graph; None when the queue is empty."""
        with session_factory(self.engine)() as session:
            rows = leases.claim(session, self.id, limit=1, lease_s=get_settings().job_lease_s, model=AttributionGraph)
            if not rows:
                return None
            row = rows[0]
            log.info("graph %s: %r through %s", row.slug, row.prompt[:60], row.set_name)
            try:
                _compute(session, row, self.id)
            except _Lost as exc:
                log.warning("%s", exc)
            except KeyboardInterrupt:  # stopped by hand: the graph goes back to the queue untouched
                session.rollback()
                leases.release(session, row.id, self.id, model=AttributionGraph)
                raise
            except Exception as exc:  # noqa: BLE001  (stored on the row; a bad graph must not stop the worker)
                session.rollback()
                retryable = not isinstance(exc, AtlasError)
                leases.fail(session, row, self.id, _one_line(exc), retryable=retryable)
            session.expire_all()
            return session.get(AttributionGraph, row.id)

    def serve(self) -> int:
        signal.signal(signal.SIGTERM, self.request_stop)
        log.info("graph worker %s started", self.id)
        while not self.stopping:
            row = self.run_one()
            if row is None:
                if self.once:
                    break
                time.sleep(self.poll_s)
                continue
            self.done += 1
            if self.once or (self.max_graphs is not None and self.done >= self.max_graphs):
                break
        return 0
