"""The processes a trainer worker starts for one run: `train`, `analyze`, or `exec` (torchrun).

    python -m app.runs.child train WORKDIR       # resumes from WORKDIR/sae/checkpoint.pt if present
    python -m app.runs.child analyze WORKDIR     # every SAE (or transcoder set) of the run; resumes a partial analysis
    python -m app.runs.child exec -- CMD ...     # torchrun for multi-GPU runs, tied to the worker

They read WORKDIR/spec.json, report progress through SAE_ATLAS_PROGRESS_FILE (trainer.progress)
and die with the worker (Linux PDEATHSIG), so a run never has two writers. Exit codes: 0 done,
3 diverged (NaN/inf), 2 another user-fixable error (message in WORKDIR/error.txt), 130 stopped
by SIGINT after saving a checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

from store.errors import AtlasError
from app.runs.spec import RunSpec
from store.settings import get_settings
from trainer import progress

SAE_DIR = "sae"
SPEC_FILE = "spec.json"
ERROR_FILE = "error.txt"
PARENT_ENV = "SAE_ATLAS_PARENT_PID"
# Tests of worker death: checkpoint exactly at this step, write WORKDIR/PAUSED_FILE, and wait there
# to be killed, so a test kills mid-run at a step it chose instead of racing the trainer's speed.
PAUSE_AT_STEP_ENV = "SAE_ATLAS_RUN_PAUSE_AT_STEP"
PAUSED_FILE = "paused-at-checkpoint"


def _pause_at_checkpoint(workdir: Path, step: int) -> dict:
    """Make the trainer's checkpoint at `step` the last thing it does (see PAUSE_AT_STEP_ENV);
    returns the TrainConfig overrides that put a checkpoint exactly there."""
    import time

    from trainer import train as training

    save = training.save_checkpoint  # the name the training loop calls

    def save_then_pause(trainer) -> None:
        save(trainer)
        if trainer.is_main and trainer.step == step:
            (workdir / PAUSED_FILE).write_text(str(step))
            while True:  # until the test kills the worker (and this process with it)
                time.sleep(60)

    training.save_checkpoint = save_then_pause
    return {"checkpoint_every": step, "checkpoint_every_s": 0}


def load_spec(workdir: Path) -> RunSpec:
    return RunSpec.model_validate(json.loads((workdir / SPEC_FILE).read_text()))


def log_every(total_steps: int) -> int:
    """About a thousand records per SAE, whatever the length of the run."""
    return max(1, min(100, total_steps // 1000))


def train(workdir: Path) -> None:
    from trainer.train import CHECKPOINT
    from trainer.train import train as run_training

    spec = load_spec(workdir)
    out = workdir / SAE_DIR
    resume = (out / CHECKPOINT).is_file()
    if not resume and out.exists() and int(os.environ.get("RANK", "0")) == 0:
        shutil.rmtree(out)  # a previous attempt died before its first checkpoint: start clean
    overrides = {"checkpoint_every_s": get_settings().run_checkpoint_s}
    if os.environ.get(PAUSE_AT_STEP_ENV) and not resume:
        overrides.update(_pause_at_checkpoint(workdir, int(os.environ[PAUSE_AT_STEP_ENV])))
    cfg = spec.train_config(out, resume=resume, log_every=log_every(spec.tokens // spec.batch_size), **overrides)
    run_training(cfg)


def analyze(workdir: Path) -> None:
    from trainer.analyze import AnalyzeConfig
    from trainer.analyze import analyze as run_analysis
    from trainer.lm import load_lm

    spec = load_spec(workdir)
    lm = load_lm(spec.model, spec.device, spec.lm_dtype)
    if spec.trains_transcoders:
        return analyze_sets(workdir, spec, lm)
    folders = [folder for folder, _ in spec.outputs(prefix="")]
    for i, folder in enumerate(folders):
        os.environ["SAE_ATLAS_PROGRESS_ITEM"] = f"{i + 1}/{len(folders)}"
        run_analysis(AnalyzeConfig(sae_dir=workdir / SAE_DIR / folder, tokens=spec.analysis_tokens(),
                                   split=spec.analyze_split, device=spec.device, lm_dtype=spec.lm_dtype), lm=lm)


def analyze_sets(workdir: Path, spec: RunSpec, lm) -> None:
    """Each transcoder set's blocks, analysed from one LM pass per set (publish_set.analyze_blocks);
    the progress items are each set's pass and then its blocks."""
    from trainer.transcoders.publish_set import analyze_blocks
    from trainer.transcoders.sets import load_transcoder_set

    sets = [load_transcoder_set(workdir / SAE_DIR / manifest) for manifest, _, _ in spec.transcoder_sets("run")]
    total = sum(1 + len(tset.layers) for tset in sets)
    first = 1
    for tset in sets:
        analyze_blocks(tset, sorted(tset.layers), lm=lm, tokens=spec.analysis_tokens(),
                       analysis={"split": spec.analyze_split, "device": spec.device, "lm_dtype": spec.lm_dtype},
                       progress_items=(first, total))
        first += 1 + len(tset.layers)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parent = os.environ.get(PARENT_ENV)
    if argv and argv[0] == "exec":  # tie torchrun (and through it the ranks) to the worker's life
        progress.die_with_parent(int(parent) if parent else None)
        cmd = argv[2:] if len(argv) > 1 and argv[1] == "--" else argv[1:]
        os.environ.pop(PARENT_ENV, None)
        os.environ["SAE_ATLAS_DIE_WITH_PARENT"] = "1"
        os.execvp(cmd[0], cmd)
    if parent:
        progress.die_with_parent(int(parent))
    elif os.environ.get("SAE_ATLAS_DIE_WITH_PARENT"):  # a torchrun rank: its parent is torchrun
        progress.die_with_parent(None)
    if len(argv) != 2 or argv[0] not in ("train", "analyze"):
        print("usage: python -m app.runs.child {train|analyze} WORKDIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=get_settings().log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    workdir = Path(argv[1])
    try:
        (train if argv[0] == "train" else analyze)(workdir)
    except AtlasError as exc:
        message = exc.one_line()
        print(f"error: {message}", file=sys.stderr, flush=True)
        if int(os.environ.get("RANK", "0")) == 0:
            (workdir / ERROR_FILE).write_text(message + "\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
