"""Does each SAE architecture recover known features, on every shape of problem? A grid with ground truth.

    python benchmarks/synthetic_recovery.py                # the full grid (see GRID; hours on 2 cores)
    python benchmarks/synthetic_recovery.py --jobs 8       # the same, 8 trainings at a time
    python benchmarks/synthetic_recovery.py --quick        # 2 shapes at 0.5M tokens: a smoke run
    python benchmarks/synthetic_recovery.py --shape 48,3,6,1500000   # one held-out style shape

Data (trainer.synthetic.superposition_data): n_features = 4 x D true unit directions in
superposition, each firing independently (the most frequent 9x as often as the rarest), on average
`true L0` per row, log-normal magnitudes, a constant offset. The grid crosses

    D (input width)                     32, 96
    width / true features               2, 4
    true L0                             4, 10
    training tokens                     0.5M, 2M, 8M

and every cell trains TopK, BatchTopK, JumpReLU, ReLU and Matryoshka through the real entry point
(trainer.train.train() on the .npy, what `sae-atlas train --activations` runs) with the LIBRARY
DEFAULTS for everything but the problem's size: width, k = ceil(1.25 x true L0), tokens, batch
4096 (the default). JumpReLU aims its L0 at k by default and Matryoshka is BatchTopK-based, so
both are compared with TopK at a matched L0; ReLU has no L0 target (its L1 default is tuned for LM
activations) and is reported as it comes. A baseline row per cell is REFERENCE TopK: twenty lines of
plain PyTorch (dense TopK, Adam at a fixed larger learning rate REF_LR, decoder rows renormalised,
no AuxK, no warm-up) trained on the same rows in the same batch size.

Each row is scored on held-out rows by ONE evaluation (trainer.evaluate.reconstruction_metrics; the
reference is loaded into our TopK module for it):

  FVU    fraction of variance unexplained
  L0     active latents per token
  dead   latents that never fire on the held-out rows (SparseAutoencoder.fires, one rule for all)
  mmcs   mean over true directions of the best cosine with a decoder row (1 = all recovered)
  >0.9   share of true directions some decoder row matches with cosine above 0.9

Every row is printed and written (benchmarks/results/synthetic_recovery.json); the summary gives
per architecture the worst and the median mmcs over the grid, and the goal check (JumpReLU and
Matryoshka: mmcs >= 0.97 with <= 5% dead at TopK's L0) is made on every cell, not the best.
The default learning rate (trainer/sae/base.py default_lr) and dead window (dead_window) were
chosen on this grid; `--lr-scale` multiplies the default learning rate for such sweeps, and
`--set aux_coefficient=0.25` (repeatable) overrides one architecture setting of TrainConfig.

Run it on a quiet machine: `nice` is fine, but other processes change only the wall times. Each
training is one process with one torch thread (`--jobs` of them at a time).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ARCHS = ("topk", "batchtopk", "jumprelu", "relu", "matryoshka")
ROWS = ("reference", *ARCHS)
GRID = {"d": (32, 96), "ratio": (2, 4), "l0": (4, 10), "tokens": (500_000, 2_000_000, 8_000_000)}
QUICK = [(32, 4, 4, 500_000), (48, 1, 10, 500_000)]
REF_LR = 4e-3  # the reference's fixed learning rate
BATCH = 4096
# what --set may override (TrainConfig fields; None there means the SAEConfig default)
TUNABLE = ("aux_k", "aux_coefficient", "dead_after_tokens", "l1_coefficient", "l0_coefficient", "jumprelu_bandwidth",
           "jumprelu_init_threshold", "jumprelu_threshold_lr_scale", "jumprelu_l0_per_token", "jumprelu_topk_warmup",
           "matryoshka_topk_warmup")
FLAGS = ("jumprelu_l0_per_token",)  # --set values that are true or false
MAX_ROWS = 1_000_000  # training rows per data set (longer runs repeat them; ~4 passes at 8M tokens)
EVAL_ROWS = 32_768


def k_for(l0: float) -> int:
    return math.ceil(1.25 * l0)


def shape_name(d, ratio, l0, tokens) -> str:
    return f"D{d}-r{ratio}-L{l0}-{tokens / 1e6:g}M"


def data_for(root: Path, d: int, l0: float, tokens: int, seed: int) -> tuple[Path, Path]:
    """The shape's data file and its true directions, generated once per (D, L0, rows, seed)."""
    from trainer.synthetic import superposition_data

    n_features = 4 * d
    rows = min(tokens, MAX_ROWS) + EVAL_ROWS * 10  # train() holds out a tenth of the file
    path = root / f"superposition_d{d}_f{n_features}_l{l0}_n{rows}_s{seed}.npy"
    directions = path.with_name(path.stem + ".directions.npy")
    if not (path.exists() and directions.exists()):
        x, dirs = superposition_data(rows, d=d, n_features=n_features, mean_active=float(l0), seed=seed)
        np.save(directions, dirs)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, x)
        os.replace(tmp, path)
    return path, directions


def reference_topk(x: np.ndarray, width: int, k: int, tokens: int, batch: int, lr: float, seed: int):
    """The baseline: plain TopK in twenty lines. Returns (W_enc, b_enc, W_dec, b_dec, scale)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    data = torch.from_numpy(x)
    scale = math.sqrt(data.shape[1]) / float(data[:4096].norm(dim=1).mean())
    W_dec = F.normalize(torch.randn(width, data.shape[1]), dim=1).requires_grad_()
    W_enc = W_dec.detach().clone().requires_grad_()
    b_enc = torch.zeros(width, requires_grad=True)
    b_dec = (data[:4096] * scale).mean(0).requires_grad_()
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    steps = tokens // batch
    for step in range(steps):
        xb = data[torch.randint(0, data.shape[0], (batch,), generator=gen)] * scale
        values, indices = ((xb - b_dec) @ W_enc.T + b_enc).topk(k, dim=-1)
        f = torch.zeros(batch, width).scatter(1, indices, F.relu(values))
        loss = (f @ W_dec + b_dec - xb).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.param_groups[0]["lr"] = lr * min(1.0, (steps - step) / (0.2 * steps))  # linear decay, last 20%
        opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=1, keepdim=True)
    return W_enc.detach(), b_enc.detach(), W_dec.detach(), b_dec.detach(), scale


def run_row(job: dict) -> dict:
    """One training and its scoring, in a worker process; a failure is a row too (with its error)."""
    try:
        return train_and_score(job)
    except Exception as exc:  # noqa: BLE001  (the grid goes on; the row says what failed)
        keys = ("shape", "d", "ratio", "true_l0", "n_features", "width", "k", "tokens", "seed")
        return {**{k_: job[k_] for k_ in keys}, "architecture": job["arch"], "error": f"{type(exc).__name__}: {exc}",
                "trained_tokens": 0, "lr": float("nan"), "wall_s": 0.0, "fvu": float("nan"), "l0": float("nan"),
                "dead": float("nan"), "dense": float("nan"), "mmcs": float("nan"), "recovered_0.9": float("nan")}


def train_and_score(job: dict) -> dict:
    """One training and its scoring, in a worker process (one torch thread)."""
    import torch

    torch.set_num_threads(1)
    from trainer.activations import ArrayActivations
    from trainer.evaluate import Evaluated, reconstruction_metrics
    from trainer.formats import load_sae
    from trainer.sae import SAEConfig, build_sae, default_lr
    from trainer.synthetic import max_cosines
    from trainer.train import TrainConfig, train

    data, arch, width, k, tokens, seed = (Path(job["data"]), job["arch"], job["width"], job["k"], job["tokens"],
                                          job["seed"])
    directions = np.load(job["directions"])
    array = ArrayActivations(data, eval_fraction=0.1, seed=seed)  # train()'s own split of the file
    held_out = array.eval_tensor(EVAL_ROWS)
    start = time.time()
    if arch == "reference":
        x = np.asarray(array.array[np.sort(array.train_rows)])
        W_enc, b_enc, W_dec, b_dec, scale = reference_topk(x, width, k, tokens, BATCH, REF_LR, seed)
        sae = build_sae(SAEConfig(d_in=x.shape[1], d_sae=width, architecture="topk", k=k))
        with torch.no_grad():
            for name, value in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
                getattr(sae, name).copy_(value)
        model, lr, trained = Evaluated(sae.eval(), "resid_post.0", scale), REF_LR, (tokens // BATCH) * BATCH
    else:
        out = Path(job["out"])
        cfg = TrainConfig(out=out, activations=data, site=["resid_post.0"], arch=[arch], width=[width], k=[k],
                          tokens=tokens, batch_size=BATCH, device="cpu", ce_contexts=0, seed=seed, overwrite=True,
                          checkpoint_every=0, log_every=1000, eval_tokens=EVAL_ROWS, eval_fraction=0.1,
                          **job.get("settings", {}))
        if job.get("lr_scale", 1.0) != 1.0:
            ((_, sae_cfg),) = cfg.sae_configs(held_out.shape[1])
            cfg.lr = default_lr(sae_cfg, tokens, BATCH) * job["lr_scale"]
        train(cfg)
        model = Evaluated(load_sae(out).sae.eval(), "resid_post.0", 1.0)  # the saved SAE, scale folded in
        metrics = json.loads((out / "metrics.json").read_text())
        lr, trained = metrics["lr"], metrics["train_tokens"]
    wall = time.time() - start
    m = reconstruction_metrics(model, held_out)
    cos = max_cosines(model.sae.W_dec, directions)
    return {**{k_: job[k_] for k_ in ("shape", "d", "ratio", "true_l0", "n_features", "width", "k", "tokens", "seed")},
            "architecture": arch, "settings": {} if arch == "reference" else job.get("settings", {}),
            "trained_tokens": trained, "lr": lr, "wall_s": round(wall, 1), "fvu": m["fvu"],
            "l0": m["l0"], "dead": m["dead_frac_eval"], "dense": m["dense_frac"], "mmcs": float(cos.mean()),
            "recovered_0.9": float((cos > 0.9).float().mean())}


def shapes(args) -> list[tuple[int, int, int, int]]:
    if args.shape:
        return [tuple(int(float(v)) for v in s.split(",")) for s in args.shape]
    if args.quick:
        return QUICK
    return list(itertools.product(args.d, args.ratio, args.l0, args.tokens))


def table(results: list[dict]) -> str:
    head = (f"{'shape':<20} {'architecture':<12} {'width':>6} {'k':>3} {'lr':>8} {'FVU':>7} {'L0':>6} {'dead':>6} "
            f"{'mmcs':>6} {'>0.9':>6} {'wall s':>7}")
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['shape']:<20} {r['architecture']:<12} FAILED: {r['error'][:150]}")
            continue
        lines.append(f"{r['shape']:<20} {r['architecture']:<12} {r['width']:>6} {r['k']:>3} {r['lr']:>8.2e} "
                     f"{r['fvu']:>7.4f} {r['l0']:>6.2f} {r['dead']:>6.1%} {r['mmcs']:>6.3f} {r['recovered_0.9']:>6.1%} "
                     f"{r['wall_s']:>7.1f}")
    return "\n".join(lines)


def summary(results: list[dict]) -> tuple[str, dict]:
    lines = [f"{'architecture':<12} {'cells':>5} {'worst mmcs':>10} {'median mmcs':>11} {'worst dead':>10} "
             f"{'median FVU':>10}"]
    by_arch = {}
    for arch in ROWS:
        rows = [r for r in results if r["architecture"] == arch and "error" not in r]
        if not rows:
            continue
        by_arch[arch] = {"cells": len(rows), "worst_mmcs": min(r["mmcs"] for r in rows),
                         "median_mmcs": statistics.median(r["mmcs"] for r in rows),
                         "worst_dead": max(r["dead"] for r in rows),
                         "median_fvu": statistics.median(r["fvu"] for r in rows)}
        s = by_arch[arch]
        lines.append(f"{arch:<12} {s['cells']:>5} {s['worst_mmcs']:>10.3f} {s['median_mmcs']:>11.3f} "
                     f"{s['worst_dead']:>10.1%} {s['median_fvu']:>10.4f}")
    # The goal, cell by cell: JumpReLU and Matryoshka at TopK's L0 (within 15%), mmcs >= 0.97, <= 5% dead.
    goal = {}
    for arch in ("jumprelu", "matryoshka"):
        cells = []
        for r in (r for r in results if r["architecture"] == arch and "error" not in r):
            topk = next((t for t in results if t["architecture"] == "topk" and t["shape"] == r["shape"]), None)
            matched = topk is not None and abs(r["l0"] - topk["l0"]) <= 0.15 * topk["l0"]
            cells.append({"shape": r["shape"], "ok": r["mmcs"] >= 0.97 and r["dead"] <= 0.05 and matched,
                          "mmcs": r["mmcs"], "dead": r["dead"], "l0": r["l0"], "topk_l0": topk and topk["l0"]})
        if cells:
            goal[arch] = {"met_in": sum(c["ok"] for c in cells), "cells": len(cells),
                          "failed": [c for c in cells if not c["ok"]]}
            lines.append(f"goal {arch}: mmcs >= 0.97, dead <= 5%, L0 within 15% of TopK's: met in "
                         f"{goal[arch]['met_in']} of {len(cells)} cells"
                         + ("" if not goal[arch]["failed"] else
                            "; failed: " + ", ".join(f"{c['shape']} (mmcs {c['mmcs']:.3f}, dead {c['dead']:.1%}, "
                                                     f"L0 {c['l0']:.1f} vs " + (f"{c['topk_l0']:.1f})" if c["topk_l0"] else "no TopK row)")
                                                     for c in goal[arch]["failed"])))
    return "\n".join(lines), {"by_architecture": by_arch, "goal": goal}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two small shapes at 0.5M tokens (a smoke run)")
    p.add_argument("--d", type=int, nargs="+", default=list(GRID["d"]), help="input widths D")
    p.add_argument("--ratio", type=int, nargs="+", default=list(GRID["ratio"]), help="SAE width / true features")
    p.add_argument("--l0", type=int, nargs="+", default=list(GRID["l0"]), help="true L0 (features active per row)")
    p.add_argument("--tokens", type=lambda s: int(float(s)), nargs="+", default=list(GRID["tokens"]),
                   help="training tokens")
    p.add_argument("--shape", action="append", help="D,ratio,L0,tokens: run only these cells (repeatable)")
    p.add_argument("--arch", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--lr-scale", type=float, default=1.0, help="multiply the default learning rate (tuning sweeps)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a TrainConfig setting for every row but the reference ({', '.join(TUNABLE)})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="trainings at a time (one torch thread each)")
    p.add_argument("--out", default=None, help="folder for the data and the SAEs (default: a temporary folder)")
    p.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "synthetic_recovery.json"),
                   help="where to write the rows (default benchmarks/results/synthetic_recovery.json)")
    args = p.parse_args(argv)
    settings = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in TUNABLE:
            p.error(f"--set takes KEY=VALUE with KEY one of {', '.join(TUNABLE)}; got {item!r}")
        if key in FLAGS:
            if value.lower() not in ("true", "false"):
                p.error(f"--set {key} takes true or false, got {value!r}")
            settings[key] = value.lower() == "true"
            continue
        try:
            settings[key] = int(value) if key in ("aux_k", "dead_after_tokens") else float(value)
        except ValueError:
            p.error(f"--set {key} needs a number, got {value!r}")
    if args.quick and args.json == p.get_default("json"):
        args.json = args.json.replace(".json", ".quick.json")  # a smoke run never replaces the real numbers

    root = Path(args.out or tempfile.mkdtemp(prefix="synthetic-recovery-"))
    root.mkdir(parents=True, exist_ok=True)
    jobs = []
    tag = "-".join(f"{k}={v}" if isinstance(v, bool) else f"{k}={v:g}" for k, v in sorted(settings.items())) or "defaults"
    for d, ratio, l0, tokens in shapes(args):
        path, dir_file = data_for(root, d, l0, tokens, args.seed)
        name = shape_name(d, ratio, l0, tokens)
        for arch in args.arch:
            jobs.append({"shape": name, "d": d, "ratio": ratio, "true_l0": l0, "n_features": 4 * d,
                         "width": ratio * 4 * d, "k": k_for(l0), "tokens": tokens, "seed": args.seed, "arch": arch,
                         "data": str(path), "directions": str(dir_file),
                         "out": str(root / f"lr-scale-{args.lr_scale:g}" / tag / name / arch),
                         "lr_scale": args.lr_scale, "settings": settings})
    print(f"{len(jobs)} trainings ({len(jobs) // len(args.arch)} shapes x {len(args.arch)} rows), {args.jobs} at a time; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    started, results = time.time(), []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for row in pool.map(run_row, jobs):
            results.append(row)
            print(json.dumps(row), flush=True)
    text, agg = summary(results)
    print()
    print(table(results))
    print()
    print(text)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python benchmarks/synthetic_recovery.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_s": round(time.time() - started, 1),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_end": os.getloadavg()},
        "settings": {"overrides": settings, "batch_size": BATCH, "reference_lr": REF_LR, "lr_scale": args.lr_scale, "k": "ceil(1.25 x true L0)",
                     "n_features": "4 x D", "max_train_rows": MAX_ROWS, "eval_rows": EVAL_ROWS},
        "rows": results, **agg}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
