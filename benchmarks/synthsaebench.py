"""SynthSAEBench-16k: our architectures against the published table, scored by SAELens's own metrics.

    python benchmarks/synthsaebench.py --tokens 250000 1000000          # two budgets, the trend
    python benchmarks/synthsaebench.py --tokens 1000000 --no-saelens    # ours only

What it runs (every SAELens step in the peers' virtualenv, benchmarks/peers/synthsaebench_peer.py):

1. build: SynthSAEBench-16k from its published configuration by sae_lens.synthetic.SyntheticModel
   (16,384 ground-truth features in 768 dimensions, Zipfian firing, 128-root hierarchy with mutually
   exclusive children, low-rank correlations, orthogonalised dictionary, seed 42; the peer script's
   docstring lists every value and the one substitution, a faster but equal orthogonaliser checked
   against SAELens's). No Hugging Face access here, so it is regenerated, not downloaded.
2. sample: N rows of its hidden activations into a float32 .npy, filled by two processes (the largest
   budget's rows plus the 1% our trainer holds out; runs longer than N would repeat them, while the
   published runs draw every sample fresh).
3. ours: one `sae-atlas train --activations` sweep (trainer.train.train) per budget over TopK,
   BatchTopK, JumpReLU, ReLU and Matryoshka at the published width 4096, k = 20 (JumpReLU aims its
   L0 at k; ReLU has no L0 target and comes as it comes), batch 1024 as published, Matryoshka
   prefixes 128/512/2048/4096 as published, our default learning rate (trainer/sae/schedule.py).
4. saelens: SAELens's BatchTopK and Matryoshka (the published configurations, lr 3e-4 constant,
   batch 1024) trained by SAELens's SAETrainer on the same rows in the same order, at the same
   budget: the same-machine reference. Its JumpReLU and Standard rows in the published table use
   L0 autotuners from synth-sae-bench-experiments that SAELens itself does not ship, so they have
   no same-machine reference here.
5. eval: every SAE, ours loaded from its saved folder by SAELens's SAE.load_from_disk, scored by
   sae_lens.synthetic.eval_sae_on_synthetic_data on the same fresh samples: explained variance,
   MCC (Hungarian matching of decoder rows to true features, mean |cos|), per-latent F1 (each latent
   a classifier of its best-matching true feature), dead latents, L0. Our BatchTopK and Matryoshka
   are scored as saved (a JumpReLU with the learned global threshold, how the atlas runs them);
   SAELens's as its runner scores them (the training SAE, top-k over each 1024-row batch).

Published rows (SAELens docs/synth_sae_bench.md, "Raw results for SynthSAEBench-16k at selected
L0s", L0 = 20; mean of 5 seeds; width 4096, 200M samples, lr 3e-4, batch 1024; code in
github.com/decoderesearch/synth-sae-bench-experiments experiments/sweeps/sweep_l0.py; paper
arXiv:2602.14687). The published budget, 200M samples (195k steps), is out of reach on a shared
2-core CPU (a step of the five 4096-wide SAEs took 6-17 s there), hence the budgets and the trend;
--extra-saelens adds a SAELens run at our learning rate to separate the learning rate from the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from benchmarks.machine import cpu_model  # noqa: E402

PEER = REPO / "benchmarks" / "peers" / "synthsaebench_peer.py"
PEERS_PYTHON = Path(os.environ.get("SAE_ATLAS_PEERS_PYTHON", str(REPO / ".peers" / "venv" / "bin" / "python")))
ARCHS = ("topk", "batchtopk", "jumprelu", "relu", "matryoshka")
SAELENS_ARCHS = ("batchtopk", "matryoshka")
SAELENS_LR = 3e-4  # the published learning rate (constant)
WIDTH, K, BATCH = 4096, 20, 1024
MATRYOSHKA_PREFIXES = [128, 512, 2048, 4096]
EVAL_FRACTION = 0.01  # of the .npy, held out by our trainer (its own metrics; not the reported ones)
# SAELens docs/synth_sae_bench.md, L0 = 20 (mean ± std over 5 seeds)
PUBLISHED = {
    "batchtopk": {"f1": 0.8183, "mcc": 0.7526, "uniqueness": 0.9760, "explained_variance": 0.7889},
    "matryoshka": {"f1": 0.8601, "mcc": 0.7455, "uniqueness": 0.9874, "explained_variance": 0.7699},
    "jumprelu": {"f1": 0.8241, "mcc": 0.7434, "uniqueness": 0.9781, "explained_variance": 0.7906},
    "relu": {"f1": 0.5777, "mcc": 0.5834, "uniqueness": 0.8528, "explained_variance": 0.7501},  # "Standard L1"
}


def peer(*args: str, threads: int = 1) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [str(PEERS_PYTHON), str(PEER), *args, "--threads", str(threads)]
    print("$", " ".join(cmd), flush=True)
    return subprocess.Popen(cmd, env=env)


def wait(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.wait() != 0:
            sys.exit(f"{p.args[2:4]} failed with exit code {p.returncode}")


def train_ours(root: Path, data: Path, tokens: int, seed: int) -> Path:
    """One sweep, every architecture on the same batches; returns the sweep folder."""
    import torch

    torch.set_num_threads(1)
    from trainer.train import TrainConfig, train

    out = root / f"ours-{tokens}"
    if (out / "done").exists():
        return out
    cfg = TrainConfig(out=out, activations=data, site=["resid_post.0"], arch=list(ARCHS), width=[WIDTH], k=[K],
                      tokens=tokens, batch_size=BATCH, device="cpu", ce_contexts=0, seed=seed, overwrite=True,
                      checkpoint_every=0, log_every=50, eval_tokens=8192, eval_fraction=EVAL_FRACTION,
                      matryoshka_prefixes=MATRYOSHKA_PREFIXES)
    start = time.time()
    train(cfg)
    (out / "done").write_text(json.dumps({"wall_s": round(time.time() - start, 1)}))
    return out


def sweep_folders(out: Path) -> dict[str, Path]:
    """Architecture -> saved SAE folder of one sweep."""
    found = {}
    for cfg_file in sorted(out.glob("*/cfg.json")):
        arch = json.loads(cfg_file.read_text()).get("sae_atlas", {}).get("architecture")
        if arch in ARCHS:
            found[arch] = cfg_file.parent
    return found


def table(rows: list[dict]) -> str:
    head = (f"{'budget':>9} {'who':<8} {'architecture':<11} {'L0':>6} {'dead':>5} {'expl.var':>8} {'MCC':>6} "
            f"{'F1':>6} {'uniq':>6} | {'pub F1':>6} {'pub MCC':>7} {'pub EV':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        pub = PUBLISHED.get(r["architecture"], {})
        fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else "-"  # noqa: E731
        lines.append(f"{r['tokens'] / 1e6:>8.2f}M {r['who']:<8} {r['architecture']:<11} {r['sae_l0']:>6.1f} "
                     f"{r['dead_latents']:>5} {r['explained_variance']:>8.3f} {r['mcc']:>6.3f} "
                     f"{r['classification']['f1_score']:>6.3f} {r['uniqueness']:>6.3f} | {fmt(pub.get('f1')):>6} "
                     f"{fmt(pub.get('mcc')):>7} {fmt(pub.get('explained_variance')):>6}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=lambda s: int(float(s)), nargs="+", default=[250_000, 1_000_000],
                   help="training samples per SAE, one run per value (the published budget is 200M)")
    p.add_argument("--rows", type=lambda s: int(float(s)), default=None,
                   help="rows of data to generate (default: the largest budget / (1 - held-out share), capped at 2M)")
    p.add_argument("--eval-samples", type=int, default=50_176, help="fresh samples for the SAELens evaluation "
                   "(a multiple of 1024; drawn once, every SAE scored on the same ones)")
    p.add_argument("--no-saelens", action="store_true", help="skip the same-machine SAELens reference rows")
    p.add_argument("--extra-saelens", action="append", default=[], metavar="ARCH:LR",
                   help="one more SAELens run at the largest budget with another learning rate than the published "
                        "3e-4 (e.g. batchtopk:0.0048, our default for these runs); marked saelens* (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", default="/tmp/synthsaebench", help="folder for the model, the data and the SAEs")
    p.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "synthsaebench.json"))
    args = p.parse_args(argv)
    for x in args.extra_saelens:
        arch, sep, lr = x.partition(":")
        if not sep or arch not in SAELENS_ARCHS:
            p.error(f"--extra-saelens takes ARCH:LR with ARCH one of {', '.join(SAELENS_ARCHS)}; got {x!r}")
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    started = time.time()
    load_start = os.getloadavg()
    if not (root / "model" / "synthetic_model.safetensors").exists():
        wait(peer("build", "--dir", str(root)))
    rows_n = args.rows or min(2_000_000, int(max(args.tokens) / (1 - EVAL_FRACTION)) + BATCH)
    data = root / f"train-{rows_n}.npy"
    if not data.exists():  # two processes fill one file
        wait(*[peer("sample", "--dir", str(root), "--rows", str(rows_n), "--out", str(data), "--seed", str(args.seed),
                    "--part", str(i), "--parts", "2") for i in range(2)])
        Path(str(data) + ".tmp.npy").rename(data)
    results = []
    for tokens in sorted(args.tokens):
        refs = []
        if not args.no_saelens:  # in parallel with ours: one thread each
            runs = [(arch, SAELENS_LR) for arch in SAELENS_ARCHS]
            if tokens == max(args.tokens):
                runs += [(arch, float(lr)) for arch, _, lr in (x.partition(":") for x in args.extra_saelens)]
            for arch, lr in runs:
                tag = "" if lr == SAELENS_LR else f"lr{lr:g}-"
                refs.append((arch, lr, root / f"saelens-{arch}-{tag}{tokens}.json"))
        pending = [(arch, lr, js) for arch, lr, js in refs if not js.exists()]
        # SAELens's runs one after the other, next to our sweep
        chain = None
        if pending:
            chain = subprocess.Popen(
                " && ".join(f"OMP_NUM_THREADS=1 {PEERS_PYTHON} {PEER} train --dir {root} --data {data} --arch {arch} "
                            f"--tokens {tokens} --k {K} --width {WIDTH} --batch-size {BATCH} --lr {lr:g} "
                            f"--eval-fraction {EVAL_FRACTION} --seed {args.seed} --eval-samples {args.eval_samples} "
                            f"--json {js}" for arch, lr, js in pending), shell=True)
        out = train_ours(root, data, tokens, args.seed)
        folders = sweep_folders(out)
        ours_json = root / f"ours-{tokens}.eval.json"
        if not ours_json.exists():
            wait(peer("eval", "--dir", str(root), "--eval-samples", str(args.eval_samples), "--json", str(ours_json),
                      *[x for arch, f in folders.items() for x in ("--sae", f"{arch}={f}")]))
        if chain is not None and chain.wait() != 0:
            sys.exit("a SAELens reference run failed")
        wall = json.loads((out / "done").read_text())["wall_s"]
        for r in json.loads(ours_json.read_text()):
            results.append({**r, "who": "ours", "architecture": r["name"], "tokens": tokens, "train_wall_s": wall,
                            "sweep_of": len(folders)})
        for arch, lr, js in refs:
            results.append({**json.loads(js.read_text()), "who": "saelens" if lr == SAELENS_LR else "saelens*",
                            "architecture": arch})
        print(table(results), flush=True)
    order = {a: i for i, a in enumerate(ARCHS)}
    results.sort(key=lambda r: (r["tokens"], order[r["architecture"]], r["who"]))
    print()
    print(table(results))
    info = json.loads((root / "model_info.json").read_text())
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python benchmarks/synthsaebench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_s": round(time.time() - started, 1),
        "machine": {"platform": platform.platform(), "cpu": cpu_model(), "cpus": os.cpu_count(),
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "threads_per_process": 1},
        "dtype": "float32 (no autocast)", "model": {k: v for k, v in info.items() if k != "config"},
        "model_config": info["config"], "data_rows": rows_n, "width": WIDTH, "k": K, "batch_size": BATCH,
        "eval_samples": args.eval_samples, "published_l0_20": PUBLISHED, "rows": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
