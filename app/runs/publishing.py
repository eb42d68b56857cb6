"""A trainer worker's last step: publish what a run trained and mark the run done, together.

- A run of SAEs: every SAE of the sweep is written in one transaction (trainer.publish.publish_many),
  whose last statement marks the run done only if it is still the worker's.
- A run of transcoder sets: the child `analyze` has analysed every block (one LM pass per set,
  trainer.transcoders.publish_set.analyze_blocks). Here every block of every set is written in one
  transaction, each block's config recording its set, light or full as the spec asks
  (RunSpec.set_publish); inside it, once the run is marked done, each set is registered
  (DATA_DIR/transcoder_sets/<name>) so /graphs and POST /api/v1/graphs find it. If the commit
  fails the registrations written are removed again, so a failed or cancelled publish leaves no
  block published and no set registered; a retry publishes the whole run again.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from sqlalchemy import update
from sqlalchemy.orm import Session

from app import leases
from app.runs.heartbeat import RunLost
from store.errors import AtlasError
from store.models import JobStatus, TrainingRun, utcnow
from store.settings import get_settings

if TYPE_CHECKING:
    from app.runs.worker import Execution

log = logging.getLogger("app.runs.worker")

# Tests of long publishes: with this set to a folder, the worker writes FOLDER/publishing once every
# SAE is written, and commits only when FOLDER/release exists (the heartbeat goes on meanwhile).
HOLD_PUBLISH_ENV = "SAE_ATLAS_RUN_HOLD_PUBLISH"


def hold_before_commit(workdir: Path) -> None:
    folder = os.environ.get(HOLD_PUBLISH_ENV)
    if not folder:
        return
    Path(folder, "publishing").write_text(str(workdir))
    while not Path(folder, "release").exists():
        time.sleep(0.05)


def mark_done(ex: Execution) -> Callable[[Session], None]:
    """The before_commit of a run's publish: the run becomes done in the same transaction, only if
    it is still this worker's (RunLost otherwise, which rolls the publish back)."""

    def before_commit(session: Session) -> None:
        hold_before_commit(ex.workdir)
        n = session.execute(update(TrainingRun).where(leases.owned(ex.run_id, ex.worker.id, TrainingRun)).values(
            status=JobStatus.done.value, phase=None, progress=1.0, step=ex.total_steps, finished_at=utcnow(),
            lease_owner=None, lease_expires_at=None, error=None)).rowcount
        if not n:
            raise RunLost(f"run {ex.run_id} was cancelled or taken over before it was published")

    return before_commit


def publish_run(ex: Execution) -> str:
    """Publish the run's SAEs or transcoder sets and mark it done; returns the run's outcome."""
    try:
        names = publish_sets(ex) if ex.spec.trains_transcoders else publish_saes(ex)
    except RunLost:
        return ex._lost()
    except AtlasError as exc:
        return ex._fail(f"publishing failed: {exc.one_line()}", retryable=False)
    from trainer.train import CHECKPOINT

    (ex.out / CHECKPOINT).unlink(missing_ok=True)  # optimiser state: not needed once published
    log.info("run %d (%s): done, published %s", ex.run_id, ex.name, ", ".join(names))
    return JobStatus.done.value


def publish_saes(ex: Execution) -> list[str]:
    from trainer.publish import publish_many

    items = [(ex.out / folder, name) for folder, name in ex.outputs]
    publish_many(items, engine=ex.worker.engine, description=ex.spec.description or f"training run {ex.run_id}",
                 run_id=ex.run_id, before_commit=mark_done(ex), progress=False)
    return [name for _, name in items]


def publish_sets(ex: Execution) -> list[str]:
    """Every block of the run's sets in one transaction, then (inside it) the sets registered."""
    from trainer.publish import publish_many
    from trainer.transcoders.publish_set import LIGHT_SCORE_SAMPLE, plan_set_publish, register_set

    plans = [plan_set_publish(ex.out / manifest, name, name=name, engine=ex.worker.engine)
             for manifest, name, _ in ex.spec.transcoder_sets(ex.name)]
    items, per_item = [], []
    for plan in plans:
        block_items, block_options = plan.items()
        items += block_items
        per_item += block_options
    light = ex.spec.set_publish == "light"
    done = mark_done(ex)

    def before_commit(session: Session) -> None:
        done(session)
        for plan in plans:
            register_set(plan.tset, plan.name, plan.names)

    try:
        publish_many(items, engine=ex.worker.engine, description=ex.spec.description or f"training run {ex.run_id}",
                     run_id=ex.run_id, before_commit=before_commit, progress=False, per_item=per_item,
                     score_sample=LIGHT_SCORE_SAMPLE if light else None, relate=False)
    except BaseException:
        unregister_sets(ex)  # the blocks were not committed: neither is any set
        raise
    names = [name for _, name in items]
    if not light and get_settings().relate_at_publish:  # after the commit: a failure here leaves the run done
        from trainer.relate.published import relate_new

        try:
            relate_new(names, ex.worker.engine, progress=False)
        except Exception as exc:
            log.warning("run %d: relating the published blocks failed (%s); they are published unrelated", ex.run_id, exc)
    return [plan.name for plan in plans] + names


def unregister_sets(ex: Execution) -> None:
    """Remove the registrations of this run's sets (those whose source is a manifest in the run's
    folder): after a failed or cancelled publish, no set of the run stays registered."""
    import json

    from trainer.transcoders.publish_set import registered_dir
    from trainer.transcoders.sets import SET_FILE

    if not ex.spec.trains_transcoders:
        return
    for manifest, name, _ in ex.spec.transcoder_sets(ex.name):
        path = registered_dir(name) / SET_FILE
        try:
            source = json.loads(path.read_text()).get("source")
        except (OSError, ValueError, AttributeError):
            continue
        if source == str((ex.out / manifest).resolve()):
            path.unlink(missing_ok=True)
            try:
                path.parent.rmdir()
            except OSError:
                pass
            log.info("run %d: unregistered the transcoder set %s", ex.run_id, name)
