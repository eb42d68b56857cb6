"""Which training settings buy a transcoder the most at a fixed budget (issue 20's FVU goal).

    python benchmarks/transcoder_levers.py collect --tokens 262144 --seed 1     # one LM pass, cached
    python benchmarks/transcoder_levers.py run --tag base
    python benchmarks/transcoder_levers.py run --tag ridge --skip-init ridge
    python benchmarks/transcoder_levers.py run --tag b256 --batch-size 256
    python benchmarks/transcoder_levers.py run --tag lr0.5 --lr-mult 0.5
    python benchmarks/transcoder_levers.py run --tag 2-epochs --tokens 131072 --data-tokens 65536

`collect` streams mlp_in.L / mlp_out.L of a few blocks (default 4, 15, 26) from the LM once, with
the trainer's own stream (trainer.stream.TrainingStream, seed 1: other documents than the demo's
held-out split, which is seed 0's), plus the held-out tokens trainer.train evaluates on. `run`
trains skip-transcoders on that cache with trainer.train.Trainer's own optimiser step
(Trainer.train_step; only the batches come from the cache instead of the LM) and prints one JSON
line: held-out FVU against mlp_out.L, L0 and dead fraction per block, appended to --results.

Levers: the token budget (and epochs over fewer tokens: --data-tokens), batch size, the learning
rate as a multiple of trainer.sae.default_lr, width, k, and --skip-init ridge: W_skip and b_dec
set to the ridge regression of the output on the input over the first --init-tokens before the
first step (sparsify starts W_skip at zero; this asks whether a solved linear term frees the
sparse code for the rest). Report the levers on the demo's 30 blocks, not on these three.
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

import torch  # noqa: E402

CACHE = Path("/tmp/transcoder-levers")


def config(blocks: list[int], tokens: int, batch_size: int, seed: int, width: int = 2304, k: int = 32,
           skip: bool = True):
    from trainer.train import TrainConfig

    return TrainConfig(out=CACHE / "run", model="smollm2-135m", site=[f"mlp.{b}" for b in blocks], arch=["topk"],
                       width=[width], k=[k], skip_connection=skip, tokens=tokens, batch_size=batch_size, seed=seed,
                       eval_tokens=16_384, ce_contexts=0, shuffle_buffer_mb=512, corpus="pydoc", overwrite=True)


def collect(args) -> None:
    from trainer.stream import TrainingStream, held_out_chunks
    from trainer.train import Trainer

    blocks = [int(b) for b in args.blocks.split(",")]
    t = Trainer(config(blocks, args.tokens, 1024, args.seed))
    t.build_runs(t.load_inputs())
    sites = sorted({s for r in t.runs for s in (r.site, r.output_site)})
    stream = TrainingStream(t.cfg, t.device, 0, 1, lm=t.lm, array=None, position=None)
    train = {s: [] for s in sites}
    n, started = 0, time.time()
    for batch in stream:
        for s in sites:
            train[s].append(batch[s].float().clone())
        n += batch[sites[0]].shape[0]
        if n >= args.tokens:
            break
    held = {s: [] for s in sites}
    for chunk in held_out_chunks(t.cfg, t.lm, None):
        for s in sites:
            held[s].append(chunk[s].float().clone())
    args.cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"blocks": blocks, "seed": args.seed, "train": {s: torch.cat(v)[:args.tokens] for s, v in train.items()},
                "eval": {s: torch.cat(v) for s, v in held.items()}}, args.cache)
    print(f"cached {n} training tokens of {sites} in {time.time() - started:.0f} s -> {args.cache}")


@torch.no_grad()
def ridge_skip(run, x: torch.Tensor, y: torch.Tensor, ridge: float) -> None:
    """W_skip, b_dec := the ridge regression y ~ W x + b on normalised activations (ridge in units
    of the mean input variance)."""
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    gram = xc.T @ xc / len(x)
    lam = ridge * gram.diagonal().mean()
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0]), xc.T @ yc / len(x)).T
    run.sae.io.W_skip.copy_(w)
    run.sae.b_dec.copy_(my - w @ mx)


def run(args) -> None:
    from trainer.train import Trainer

    torch.set_num_threads(args.threads)
    data = torch.load(args.cache)
    train, held = data["train"], data["eval"]
    cfg = config(data["blocks"], args.tokens, args.batch_size, data["seed"], args.width, args.k, not args.no_skip)
    t = Trainer(cfg)
    t.build_runs(train[f"mlp_in.{data['blocks'][0]}"].shape[1])
    for r in t.runs:
        r.base_lr *= args.lr_mult
    t.initialise({s: v[:args.batch_size] for s, v in train.items()})
    if args.skip_init == "ridge":
        for r in t.runs:
            ridge_skip(r, train[r.site][:args.init_tokens] * r.norm_scale,
                       train[r.output_site][:args.init_tokens] * r.out_scale, args.ridge)
    n = min(train[t.runs[0].site].shape[0], args.data_tokens or 1 << 62)
    started = time.time()
    cpu0 = time.process_time()
    for step in range(t.total_steps):
        lo = (step * args.batch_size) % n
        for r in t.runs:
            t.train_step(r, train[r.site][lo:lo + args.batch_size], train[r.output_site][lo:lo + args.batch_size])
        t.step += 1
    seconds, cpu = time.time() - started, time.process_time() - cpu0
    blocks = {}
    for r in t.runs:
        sae, _ = t.saved_form(r)
        with torch.no_grad():
            x, y = held[r.site], held[r.output_site]
            fvu = float((sae(x) - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
            l0 = float((sae.encode_dense(x) > 0).sum(-1).float().mean())
        blocks[r.layer] = {"fvu": round(fvu, 4), "l0": round(l0, 1), "dead": round(float(t.dead_mask(r).float().mean()), 3)}
    from benchmarks.machine import cpu_model

    record = {"tag": args.tag, "tokens": args.tokens, "data_tokens": args.data_tokens or None,
              "batch_size": args.batch_size, "lr_mult": args.lr_mult, "skip_init": args.skip_init, "width": args.width,
              "k": args.k, "skip": not args.no_skip, "blocks": blocks,
              "mean_fvu": round(sum(b["fvu"] for b in blocks.values()) / len(blocks), 4),
              "train_s": round(seconds, 1), "cpu_s": round(cpu, 1), "threads": args.threads,
              "load_avg": os.getloadavg()[0], "cpu": cpu_model(), "dtype": str(t.runs[0].sae.compute_dtype)}
    print(json.dumps(record), flush=True)
    with open(args.results, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--tokens", type=int, default=262_144)
    c.add_argument("--blocks", default="4,15,26")
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--cache", type=Path, default=CACHE / "acts.pt")
    r = sub.add_parser("run")
    r.add_argument("--tag", required=True)
    r.add_argument("--cache", type=Path, default=CACHE / "acts.pt")
    r.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "transcoder_levers.jsonl")
    r.add_argument("--tokens", type=int, default=65_536, help="training tokens (steps x batch size)")
    r.add_argument("--data-tokens", type=int, default=0, help="cycle over only the first N cached tokens (epochs)")
    r.add_argument("--batch-size", type=int, default=1024)
    r.add_argument("--lr-mult", type=float, default=1.0, help="multiple of trainer.sae.default_lr")
    r.add_argument("--skip-init", choices=["zero", "ridge"], default="zero")
    r.add_argument("--ridge", type=float, default=1e-2)
    r.add_argument("--init-tokens", type=int, default=4096)
    r.add_argument("--width", type=int, default=2304)
    r.add_argument("--k", type=int, default=32)
    r.add_argument("--no-skip", action="store_true", help="a plain transcoder (no W_skip)")
    r.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    collect(args) if args.cmd == "collect" else run(args)


if __name__ == "__main__":
    main()
