"""Benchmark: transcoders of several blocks trained from one LM pass, float32 against bfloat16.

    python benchmarks/transcoders.py                                   # blocks 3, 15, 27; 49k tokens each dtype
    python benchmarks/transcoders.py --layers 0,1,2 --ce-contexts 0    # the quick dtype comparison (~5 min)
    python benchmarks/transcoders.py --layers 0-29 --tokens 1000000    # every block of the bundled model

The LM pass dominates on a small CPU: the stream runs the model up to the deepest block named, and
every CE splice (one per block, the zero-ablations and the whole set) runs all of it; on 2 shared
cores (load ~6) the defaults took over 15 minutes, blocks 0-2 without CE 4.6 minutes.

On the bundled SmolLM2-135M (pydoc corpus), for each --dtypes value in turn, one `train` run
(trainer.train.Trainer, what `sae-atlas train --site mlp.A-B --autocast DTYPE` runs) of TopK
transcoders (mlp_in.L -> mlp_out.L) for the chosen blocks, on the same tokens (same seed, same
stream). --autocast sets the SAE step's encoder precision: float32, or bfloat16 for the dense
encoder matmul with float32 master weights (the TopK family's sparse backward and decoder stay
in float32). The LM runs in --lm-dtype for both.

Reported per dtype:
- steady-state run tokens/s (LM pass + every transcoder's step, batch fetching included), from
  the first step that starts --warmup-s seconds after the first one, to the end of the last step;
- steady-state transcoder-step tokens/s: tokens one transcoder's optimiser step processes per
  second of its own time (Trainer.train_step, timed around each call), over the same steps;
- per block, held-out FVU against mlp_out.L, L0, dead fraction (training window and held-out),
  CE recovered with that block's transcoder spliced in alone, and with several blocks, the whole
  set spliced in at once.
With the CPU model (/proc/cpuinfo), torch's thread count and the load average before and after
each run. Results go to benchmarks/results/transcoders.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.machine import cpu_model  # noqa: E402

os.environ.setdefault("SAE_ATLAS_DATA_DIR", str(REPO / "data" / "bench"))
os.environ.setdefault("SAE_ATLAS_MODEL_CACHE_DIR", str(REPO / "data" / "models"))

import torch  # noqa: E402

from trainer.config import TrainConfig  # noqa: E402
from trainer.train import Trainer  # noqa: E402


class TimedTrainer(Trainer):
    """The trainer, with every transcoder step's start and end recorded."""

    def __init__(self, cfg, lm=None):
        super().__init__(cfg, lm)
        self.calls: list[tuple[int, float, float]] = []  # (step, start, end)

    def train_step(self, run, x, y=None):
        start = time.perf_counter()
        out = super().train_step(run, x, y)
        self.calls.append((self.step, start, time.perf_counter()))
        return out


def steady_rates(calls: list[tuple[int, float, float]], batch_size: int, warmup_s: float) -> dict:
    """Run and transcoder-step tokens/s over the steps that start warmup_s after the first."""
    first = min(c[1] for c in calls)
    by_step: dict[int, list[tuple[float, float]]] = {}
    for step, start, end in calls:
        by_step.setdefault(step, []).append((start, end))
    steady = sorted(s for s, spans in by_step.items() if min(a for a, _ in spans) >= first + warmup_s and s > 0)
    if len(steady) < 2:
        raise SystemExit(f"only {len(steady)} steps after the {warmup_s} s warm-up: raise --tokens or lower --warmup-s")
    # a step's LM time is spent in the stream before its first transcoder call: measure from the end
    # of the step before the first steady one
    begin = max(e for _, e in by_step[steady[0] - 1])
    end = max(e for _, e in by_step[steady[-1]])
    n_steps = len(steady)
    step_time = sum(e - a for s in steady for a, e in by_step[s])
    n_calls = sum(len(by_step[s]) for s in steady)
    return {"steady_steps": n_steps, "run_tok_s": n_steps * batch_size / (end - begin),
            "transcoder_step_tok_s": n_calls * batch_size / step_time,
            "transcoder_time_share": step_time / (end - begin)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", default="3,15,27", help="blocks: a comma list and/or ranges A-B")
    ap.add_argument("--tokens", type=int, default=49_152, help="training tokens per dtype")
    ap.add_argument("--width", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--arch", default="topk")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--lm-dtype", default="auto")
    ap.add_argument("--warmup-s", type=float, default=5.0, help="seconds left out at the start of each run")
    ap.add_argument("--shuffle-buffer", type=int, default=32_768,
                    help="tokens the shuffle buffer mixes (the trainer's 262k default would make a short run read that many first)")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--ce-contexts", type=int, default=32)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "transcoders.json")
    args = ap.parse_args()

    from trainer.lm import load_lm, pick_device

    sites = [f"mlp.{part}" for part in args.layers.split(",") if part.strip()]
    lm = load_lm(args.model, pick_device("cpu"), args.lm_dtype)
    runs_dir = Path(os.environ["SAE_ATLAS_DATA_DIR"]) / "transcoders"
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else []
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "cpu_model": cpu_model(),
              "bf16_cpu_flags": sorted({f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile")}),
              "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "model": args.model,
              "lm_dtype": str(lm.dtype), "sites": sites, "tokens": args.tokens, "width": args.width, "k": args.k,
              "arch": args.arch, "batch_size": args.batch_size, "warmup_s": args.warmup_s, "runs": {}}
    for dtype in args.dtypes.split(","):
        cfg = TrainConfig(out=runs_dir / dtype, model=args.model, site=sites, arch=[args.arch], width=[args.width],
                          k=[args.k], tokens=args.tokens, batch_size=args.batch_size, autocast=dtype, device="cpu",
                          lm_dtype=args.lm_dtype, eval_tokens=args.eval_tokens, ce_contexts=args.ce_contexts,
                          shuffle_buffer=args.shuffle_buffer,
                          checkpoint_every=0, overwrite=True)
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        trainer = TimedTrainer(cfg, lm)
        folders = trainer.fit()
        wall = time.perf_counter() - t0
        rates = steady_rates(trainer.calls, args.batch_size, args.warmup_s)
        per_layer = {}
        for folder in folders:
            m = json.loads((folder / "metrics.json").read_text())
            per_layer[folder.name] = {k: m.get(k) for k in ("fvu", "l0", "dead_frac", "dead_frac_eval", "ce_recovered",
                                                             "ce_recovered_ci95", "delta_lm_loss", "eval_tokens")}
        set_metrics = {tag: v for tag, v in trainer.set_metrics.items()}
        report["runs"][dtype] = {**rates, "wall_s": wall, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                                 "layers": per_layer, "set": set_metrics}
        print(f"\n{dtype}: run {rates['run_tok_s']:.0f} tok/s, transcoder step {rates['transcoder_step_tok_s']:.0f} tok/s "
              f"(steps {rates['transcoder_time_share']:.0%} of the time; {rates['steady_steps']} steady steps), "
              f"load {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}", flush=True)
        for name, m in per_layer.items():
            print(f"  {name:28} FVU {m['fvu']:.4f}  L0 {m['l0']:.1f}  dead {m['dead_frac']:.1%} "
                  f"(held-out {m['dead_frac_eval']:.1%})  CE recovered {m['ce_recovered']}", flush=True)
        for tag, m in set_metrics.items():
            print(f"  set {tag}: CE recovered {m.get('ce_recovered')} ± {m.get('ce_recovered_ci95')}, "
                  f"Δ LM loss {m.get('delta_lm_loss')}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)  # after every dtype: a run cut short keeps its results
        args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwrote {args.out}; CPU {report['cpu_model']}, {report['torch_threads']} torch threads, LM {report['lm_dtype']}")


if __name__ == "__main__":
    main()
