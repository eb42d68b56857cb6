"""Why sae-bench's full-width probe scores lower than ours on the bundled model's arrays (issue 21).

    /work/main/.peers/venv/bin/python benchmarks/peers/saebench_full_width_probe.py --work /tmp/saebench-probe-real

Reads the probe inputs that benchmarks/peers/saebench_conformance.py saved in --work/arrays.npz
(each class's balanced train and test rows, `task|llm|class|xtr` ...: the very arrays both sides'
probes were given) and runs only sae-bench 0.6.0's own functions on them, in the peers' venv:

- `train_probe_gpu` as its sparse_probing `run_eval` calls it for the full-width probes: AdamW
  (weight decay 0.01), lr 1e-2, batch 250, 100 epochs, early stopping after 10 epochs without a
  better test accuracy, keeping the best-test-accuracy probe; over --seeds seeds (its initial
  weights and shuffles come from torch's global RNG);
- the same function on inputs divided by one number, the mean L2 norm of the train rows (the same
  number divides the test rows): only the scale of the inputs changes;
- the same function unscaled at lr 1e-4, and unscaled without early stopping (--long-epochs);
- `train_sklearn_probe` (L2 logistic regression, C = 1), the probe trainer of its top-k probes and
  the method of our full-width probe (trainer/sparse_probing.py).

It also prints, for one class, the per-epoch test accuracy of the first run, and the inputs' scale
(mean row norm, largest entry) and the initial logits' spread. Results: --out (JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/saebench-probe-real")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--long-epochs", type=int, default=1000)
    ap.add_argument("--tasks", nargs="+", default=["module_family", "code_vs_prose"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/saebench_full_width_probe.json"))
    args = ap.parse_args()

    import numpy as np
    import sae_bench.evals.sparse_probing.probe_training as pt
    import torch

    torch.set_num_threads(1)
    work = Path(args.work)
    meta = json.loads((work / "meta.json").read_text())
    arrays = np.load(work / "arrays.npz")

    def gpu(xtr, ytr, xte, yte, seed, lr=1e-2, epochs=100, patience=10, verbose=False):
        torch.manual_seed(seed)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            _, acc = pt.train_probe_gpu(xtr, ytr, xte, yte, dim=xtr.shape[1], batch_size=250, epochs=epochs, lr=lr,
                                        verbose=verbose, early_stopping_patience=patience)
        text = buf.getvalue()
        stop = re.search(r"early stopping triggered after (\d+) epochs", text)
        trace = [float(m) for m in re.findall(r"test accuracy: ([0-9.]+)", text)]
        return acc, int(stop.group(1)) if stop else epochs, trace

    result: dict = {"setup": vars(args), "tasks": {}}
    t0 = time.time()
    for task in args.tasks:
        classes = meta["tasks"][task]
        for which in ("llm", "sae"):
            rows: dict = {}
            scale_info = {}
            for ci, c in enumerate(classes):
                xtr, ytr, xte, yte = [torch.from_numpy(arrays[f"{task}|{which}|{c}|{n}"]) for n in ("xtr", "ytr", "xte", "yte")]
                xtr, xte, ytr, yte = xtr.float(), xte.float(), ytr.int(), yte.int()
                norm = float(xtr.norm(dim=1).mean())
                if ci == 0:
                    torch.manual_seed(0)
                    init = pt.Probe(xtr.shape[1], torch.float32)
                    with torch.no_grad():
                        logits = init(xtr)
                    scale_info = {"mean_row_norm": norm, "max_abs_entry": float(xtr.abs().max()),
                                  "dims": int(xtr.shape[1]), "train_rows": len(xtr), "test_rows": len(xte),
                                  "initial_logit_sd": float(logits.std())}
                r: dict = {}
                runs = [gpu(xtr, ytr, xte, yte, s, verbose=(s == 0 and ci == 0)) for s in range(args.seeds)]
                r["saebench_as_run"] = [a for a, _, _ in runs]
                r["saebench_as_run_epochs"] = [e for _, e, _ in runs]
                if ci == 0:
                    scale_info["trace_first_class_seed0"] = runs[0][2]
                scaled = [gpu(xtr / norm, ytr, xte / norm, yte, s) for s in range(args.seeds)]
                r["saebench_scaled_inputs"] = [a for a, _, _ in scaled]
                r["saebench_scaled_inputs_epochs"] = [e for _, e, _ in scaled]
                r["saebench_lr_1e-4"] = [gpu(xtr, ytr, xte, yte, s, lr=1e-4)[0] for s in range(args.seeds)]
                r["saebench_no_early_stop"] = [gpu(xtr, ytr, xte, yte, s, epochs=args.long_epochs,
                                                   patience=10 ** 9)[0] for s in range(args.seeds)]
                r["sklearn_logistic_regression"] = pt.train_sklearn_probe(xtr, ytr, xte, yte)[1]
                rows[c] = r
                print(f"{task:14} {which} {c:10} as run {statistics.mean(r['saebench_as_run']):.3f} "
                      f"(epochs {r['saebench_as_run_epochs']})  scaled {statistics.mean(r['saebench_scaled_inputs']):.3f}  "
                      f"lr1e-4 {statistics.mean(r['saebench_lr_1e-4']):.3f}  no-stop {statistics.mean(r['saebench_no_early_stop']):.3f}  "
                      f"sklearn {r['sklearn_logistic_regression']:.3f}", flush=True)
            keys = [k for k in next(iter(rows.values())) if not k.endswith("_epochs")]
            means = {}
            for k in keys:
                per_seed = [statistics.mean(rows[c][k][s] if isinstance(rows[c][k], list) else rows[c][k] for c in classes)
                            for s in range(args.seeds)]
                means[k] = {"median_over_seeds": statistics.median(per_seed), "min": min(per_seed), "max": max(per_seed)}
            result["tasks"][f"{task}|{which}"] = {"inputs": scale_info, "per_class": rows, "task_mean": means}
            print(f"{task} {which}: " + ", ".join(f"{k} {v['median_over_seeds']:.3f} [{v['min']:.3f}, {v['max']:.3f}]"
                                                  for k, v in means.items()), flush=True)
    result["elapsed_s"] = round(time.time() - t0, 1)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("->", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
