"""Does each SAE architecture recover known features? Synthetic data with ground truth.

    python benchmarks/synthetic_recovery.py [--quick] [--arch topk batchtopk ...] [--tokens N]

Data (trainer.synthetic.superposition_data): 4x more true unit directions than dimensions, each
firing rarely and independently (the most frequent 9x as often as the rarest), with log-normal
magnitudes and a constant offset. Every architecture is trained through the real entry point,
trainer.train.train(), on the same .npy file, then scored on held-out rows:

  FVU    fraction of variance unexplained (train.py's held-out evaluation)
  L0     active latents per token
  dead   share of latents that did not fire within the trainer's dead window
  mmcs   mean over true directions of the best cosine with a decoder row (1 = all recovered)
  >0.9   share of true directions some decoder row matches with cosine above 0.9

Settings are the library defaults (SAEConfig's coefficients, lr_for_width, train.py's schedule,
AuxK settings and dead window) unless overridden by a flag, except that the sparsity coefficients
of JumpReLU and ReLU default here to values that aim at the true L0 of the data (about mean_active),
so that recovery is compared at a like L0; --default-coefficients uses the library's instead.
Wall time is the train() call (training plus evaluation and saving), on whatever device --device gives.

What moves BatchTopK and Matryoshka most here is AuxK's dead window: with the 5%-of-run window
TopK uses (200k tokens of 4M), latents that lose the batch-wide competition early are never
declared dead and revived (BatchTopK mmcs 0.93); train.py therefore defaults BatchTopK and
Matryoshka to 5 batches, at least 20k tokens (Bussmann et al. use 5 batches of 4096): mmcs 0.99.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from trainer.sae import ARCHITECTURES, SAEConfig
from trainer.synthetic import max_cosines, superposition_data

# name: (d, n_features, mean_active, width, k, tokens, batch_size, rows)
PROBLEMS = {
    "full": (64, 256, 6.0, 512, 8, 4_000_000, 1024, 1_000_000),
    "quick": (32, 128, 5.0, 256, 6, 1_000_000, 512, 200_000),
}
# Sparsity coefficients that put JumpReLU's and ReLU's L0 near the true L0 of these problems
# (about mean_active); the library defaults aim at the tens of latents LM activations need.
MATCHED = {"l0_coefficient": 0.03, "l1_coefficient": 0.3}


def sae_default(name: str):
    return {f.name: f.default for f in fields(SAEConfig)}[name]


def run(args) -> list[dict]:
    from trainer.formats import load_sae
    from trainer.train import TrainConfig, train

    d, n_features, mean_active, width, k, tokens, batch, rows = PROBLEMS["quick" if args.quick else "full"]
    tokens = args.tokens or tokens
    root = Path(args.out or tempfile.mkdtemp(prefix="synthetic-recovery-"))
    root.mkdir(parents=True, exist_ok=True)
    data = root / f"superposition_d{d}_f{n_features}_n{rows}_s{args.seed}.npy"
    x, true_dirs = superposition_data(rows, d=d, n_features=n_features, mean_active=mean_active, seed=args.seed)
    if not data.exists():
        np.save(data, x)
    del x
    coefficients = {
        "l0_coefficient": args.l0_coefficient or (sae_default("l0_coefficient") if args.default_coefficients else MATCHED["l0_coefficient"]),
        "l1_coefficient": args.l1_coefficient or (sae_default("l1_coefficient") if args.default_coefficients else MATCHED["l1_coefficient"]),
    }
    print(f"problem: d={d}, {n_features} true features, ~{mean_active:g} active per row; SAE width {width}, k={k}; "
          f"{tokens:,} tokens in batches of {batch}; {coefficients}", flush=True)
    results = []
    for arch in args.arch:
        out = root / arch
        overrides = {key: getattr(args, key) for key in ("lr", "dead_after_tokens", "aux_coefficient", "aux_k")
                     if getattr(args, key) is not None}
        cfg = TrainConfig(out=out, activations=data, site=["resid_post.0"], arch=[arch], width=[width], k=[k],
                          tokens=tokens, batch_size=batch, device=args.device, ce_contexts=0, seed=args.seed,
                          overwrite=True, checkpoint_every=0, log_every=100, eval_tokens=min(65_536, rows // 10),
                          jumprelu_init_threshold=sae_default("jumprelu_init_threshold"),
                          jumprelu_bandwidth=sae_default("jumprelu_bandwidth"), **coefficients, **overrides)
        start = time.time()
        train(cfg)
        wall = time.time() - start
        metrics = json.loads((out / "metrics.json").read_text())
        cos = max_cosines(load_sae(out).sae.W_dec, true_dirs)
        row = {"architecture": arch, "tokens": metrics["train_tokens"], "wall_s": wall, "fvu": metrics["fvu"],
               "l0": metrics["l0"], "dead": metrics["dead_frac"], "mmcs": float(cos.mean()),
               "recovered_0.9": float((cos > 0.9).float().mean())}
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def table(results: list[dict]) -> str:
    head = f"{'architecture':<12} {'tokens':>10} {'wall s':>7} {'FVU':>7} {'L0':>6} {'dead':>6} {'mmcs':>6} {'>0.9':>6}"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['architecture']:<12} {r['tokens']:>10,} {r['wall_s']:>7.1f} {r['fvu']:>7.4f} {r['l0']:>6.2f} "
                     f"{r['dead']:>6.1%} {r['mmcs']:>6.3f} {r['recovered_0.9']:>6.1%}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the small problem (d=32, 1M tokens): about a minute per architecture on a laptop CPU")
    p.add_argument("--arch", nargs="+", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    p.add_argument("--tokens", type=int, default=None, help="training tokens per SAE (default: 4M, or 1M with --quick)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for the data and the SAEs (default: a temporary folder)")
    p.add_argument("--default-coefficients", action="store_true",
                   help="use the library's JumpReLU/ReLU coefficients instead of ones matched to the true L0")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--dead-after-tokens", type=int, default=None)
    p.add_argument("--aux-coefficient", type=float, default=None)
    p.add_argument("--aux-k", type=int, default=None)
    p.add_argument("--l0-coefficient", type=float, default=None)
    p.add_argument("--l1-coefficient", type=float, default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: these matrices are small, and on a busy machine extra "
                        "OpenMP threads spinning against each other made TopK 20x slower); 0 keeps torch's default")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    results = run(args)
    print()
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
