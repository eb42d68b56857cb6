"""The output folder and the checkpoint a run resumes from.

checkpoint.pt holds, for every SAE of the sweep, its weights, Adam state, dead-latent counters and
input scale (and a transcoder's output scale), plus the step and EVERY rank's stream position (trainer.stream): under DDP each rank
reads its own share of the data, so each resumes at its own place. With those positions a resumed
run trains on exactly the tokens an uninterrupted run would have (none twice, none skipped); it
recomputes at most one shuffle window of activations per rank to rebuild its buffer.
It is written atomically (temporary file + rename) by rank 0.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from store.errors import AtlasError
from trainer.config import TrainConfig
from trainer.distributed import gather_objects

CHECKPOINT = "checkpoint.pt"
FORMAT = 2  # 1: chunks_consumed of rank 0 only (pre-2026-12); 2: a position per rank


def prepare_output(cfg: TrainConfig) -> None:
    """Check (and with --overwrite clear) the output folder; refuse to touch what is not a run."""
    out = cfg.out
    if out.exists() and not out.is_dir():
        raise AtlasError(f"output {out} is a file", "choose a folder for --out")
    if out.is_dir() and any(out.iterdir()):
        has_run = (out / CHECKPOINT).exists() or (out / "cfg.json").exists() or (out / "run.json").exists()
        if cfg.resume:
            if not (out / CHECKPOINT).exists():
                raise AtlasError(f"--resume: {out} has no checkpoint to resume from", "start a new run without --resume")
            return
        if cfg.overwrite:
            if not has_run:
                raise AtlasError(f"{out} is not empty and does not look like an SAE run; refusing to delete it",
                                 "choose an empty or new folder for --out")
            shutil.rmtree(out)
        else:
            what = "holds another run" if has_run else "is not empty"
            raise AtlasError(f"output folder {out} {what}",
                             "use --overwrite to replace it, --resume to continue it, or another --out")
    elif cfg.resume:
        raise AtlasError(f"--resume: {out} has no checkpoint to resume from", "start a new run without --resume")
    out.mkdir(parents=True, exist_ok=True)
    # Marks the folder as a run from the start, so that --overwrite recognises a run killed before
    # its first checkpoint; save_checkpoint rewrites it.
    (out / "run.json").write_text(json.dumps({"config": cfg.to_json(), "step": 0, "saes": []}, indent=1))


def save_checkpoint(trainer) -> None:
    """Every rank takes part (their stream positions are gathered); rank 0 writes."""
    positions = gather_objects(trainer.stream.position())
    if not trainer.is_main:
        return
    state = {
        "format": FORMAT,
        "step": int(trainer.step),
        "world_size": trainer.world,
        "positions": positions,
        "runs": {r.name: {"sae": r.sae.state_dict(), "optimizer": r.optimizer.state_dict(),
                          "tokens_since_fired": r.tokens_since_fired.cpu(), "norm_scale": r.norm_scale,
                          "variance": r.variance, "out_scale": r.out_scale} for r in trainer.runs},
    }
    out = trainer.cfg.out
    path = out / CHECKPOINT
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    (out / "run.json").write_text(json.dumps({"config": trainer.cfg.to_json(), "step": int(trainer.step),
                                              "saes": [r.name for r in trainer.runs]}, indent=1))


def load_checkpoint(trainer) -> dict:
    """Restore every SAE's state and the step into `trainer`; returns this rank's stream position."""
    path = trainer.cfg.out / CHECKPOINT
    try:
        state = torch.load(path, map_location=trainer.device, weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise AtlasError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0][:200]}",
                         "start again with --overwrite") from None
    if state.get("format") != FORMAT:
        raise AtlasError(f"checkpoint {path} was written by an older version that kept one rank's data position only",
                         "start the run again with --overwrite")
    if int(state["world_size"]) != trainer.world:
        raise AtlasError(f"checkpoint {path} was written by {state['world_size']} processes, this run has {trainer.world}",
                         f"resume with the same number of processes (torchrun --nproc_per_node {state['world_size']})")
    missing = [r.name for r in trainer.runs if r.name not in state["runs"]]
    if missing:
        raise AtlasError(f"checkpoint {path} has no state for {', '.join(missing)}",
                         "resume with the same sweep settings as the original run")
    for r in trainer.runs:
        s = state["runs"][r.name]
        r.sae.load_state_dict(s["sae"])
        try:
            r.optimizer.load_state_dict(s["optimizer"])
        except ValueError as exc:  # e.g. JumpReLU's thresholds got their own parameter group
            raise AtlasError(f"checkpoint {path} holds optimizer state for {r.name} that this version cannot "
                             f"use ({str(exc).splitlines()[0][:120]})", "start the run again with --overwrite") from None
        r.tokens_since_fired.copy_(s["tokens_since_fired"].to(trainer.device))
        r.norm_scale, r.variance = float(s["norm_scale"]), float(s["variance"])
        r.out_scale = float(s.get("out_scale", 1.0))  # a transcoder's output scale (absent before transcoders)
    trainer.step = int(state["step"])
    return state["positions"][trainer.rank]
