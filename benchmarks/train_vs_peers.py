"""Train our TopK SAE and the same configuration in EleutherAI sparsify and SAELens, side by side.

    python benchmarks/train_vs_peers.py            # default: 1M tokens, width 4608, k 32, batch 4096
    python benchmarks/train_vs_peers.py --quick    # a smoke run (64 steps, one timing round)

What it does, in one run:
1. Caches real activations once: float32 [N, 576] of the bundled smollm2-135m at resid_post.15 over
   the pydoc corpus (our LMActivations stream: BOS and attention sinks left out, as our trainer
   does) in data/bench/activations_resid15.npy (N = --n-activations, 500k by default).
2. Creates (or reuses) a separate virtualenv for the peers, .peers/venv, with the local CPU torch
   installed first and then pinned eai-sparsify and sae-lens. Nothing is installed in the project venv.
3. Splits the rows once (our ArrayActivations split: held-out rows for evaluation, the rest for
   training) and writes ONE batch order, order.npy [steps, batch_size], that every trainer follows:
   our trainer reproduces it itself from the same seed (checked here), the peers read it.
4. Trains each SAE in its own subprocess: ours in this venv (trainer.train.Trainer on the .npy,
   exactly what `sae-atlas train --activations` runs), sparsify and SAELens in the peers venv
   (benchmarks/peers/run_*.py, whose docstrings say exactly how each is driven). Each reports the
   wall time and CPU time of its training loop (first step to last step; the time spent copying
   batches out of the memmap, identical work for all three, is measured and left out) and the
   subprocess's peak RSS (ru_maxrss from wait4).
5. Evaluates all three SAEs with ONE function on the SAME held-out rows: each trained SAE is loaded
   from its own saved format by trainer.formats.load_sae and scored by
   trainer.evaluate.reconstruction_metrics (FVU against the held-out mean, L0, dead = latents that
   never fire on the held-out rows).
6. Prints one table and writes benchmarks/results/train_vs_peers.json.

Timings on a shared machine are noisy, and a load that changes between the three sequential full
runs would decide the speed comparison. So after the full runs each trainer is timed again in
--speed-trials rounds of --trial-steps steps (fresh subprocesses, round-robin: ours, sparsify,
SAELens, ours, ...; same batches, same dead-latent window) and the table's `tok/s` is the best
round's wall-clock tokens/s (the round least disturbed by other processes). `tok/s full run` is the
wall-clock rate of the full run and `tok/CPU-s` its tokens per CPU-second (user + system time of
the training loop over all threads). CPU time is disturbed by other processes too (hyperthreads
share a core; spinning OpenMP workers burn CPU time), so the speed verdict uses `tok/s` only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "data" / "bench"
MODELS_DIR = REPO / "data" / "models"
ACTS_FILE = DATA_DIR / "activations_resid15.npy"
RUNS_DIR = DATA_DIR / "train_vs_peers"
PEERS_VENV = REPO / ".peers" / "venv"
PEERS_DIR = Path(__file__).resolve().parent / "peers"
RESULTS = Path(__file__).resolve().parent / "results" / "train_vs_peers.json"

# The peer versions this benchmark was written against and run with.
TORCH_PIN = "torch==2.13.0"  # the local CPU build (/opt/wheels); unpinned would fetch CUDA wheels
PEER_PINS = {"eai-sparsify": "1.3.3", "sae-lens": "6.54.12"}

SITE = "resid_post.15"
TRAINERS = ("ours", "sparsify", "saelens")
LABELS = {"ours": "SAE Atlas", "sparsify": "EleutherAI sparsify", "saelens": "SAELens"}


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("SAE_ATLAS_MODEL_CACHE_DIR", str(MODELS_DIR))
    env.setdefault("SAE_ATLAS_DATA_DIR", str(DATA_DIR))
    env.setdefault("WANDB_MODE", "disabled")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --- 1. activations ------------------------------------------------------------------------------

def prepare_activations(path: Path, n_tokens: int, model: str = "smollm2-135m", site: str = SITE,
                        ctx_len: int = 128, lm_batch_size: int = 32, seed: int = 0) -> Path:
    """Real activations of the bundled LM over the pydoc corpus, float32 [N, D], cached at `path`."""
    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file():
        info = json.loads(meta.read_text())
        if info.get("tokens", 0) >= n_tokens and info.get("site") == site and info.get("model") == model:
            return path
    os.environ.update({k: v for k, v in _env().items() if k.startswith("SAE_ATLAS_")})
    sys.path.insert(0, str(REPO))
    import torch
    from tqdm import tqdm

    from trainer.activations import LMActivations, LMStreamSpec
    from trainer.lm import load_lm

    path.parent.mkdir(parents=True, exist_ok=True)
    lm = load_lm(model, "cpu")
    spec = LMStreamSpec(model=model, sites=[site], corpus="pydoc", text_field="text", ctx_len=ctx_len, split="all",
                        eval_fraction=0.0, seed=seed, exclude_bos=True, sink_norm_ratio=10.0, lm_dtype=str(lm.dtype))
    stream = LMActivations(lm, spec, lm_batch_size, max_tokens=n_tokens, epochs=1)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_tokens, lm.d_model))
    n, t0 = 0, time.time()
    with torch.inference_mode(), tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="LM activations") as bar:
        for chunk in stream:
            a = chunk[site].float().cpu().numpy()
            take = min(len(a), n_tokens - n)
            out[n:n + take] = a[:take]
            n += take
            bar.update(take)
            if n >= n_tokens:
                break
    out.flush()
    del out
    if n < n_tokens:  # the corpus ran out first: keep what there is
        full = np.load(tmp, mmap_mode="r")
        np.save(path, np.ascontiguousarray(full[:n]))
        del full
        tmp.unlink()
    else:
        os.replace(tmp, path)
    meta.write_text(json.dumps({"tokens": n, "d_in": lm.d_model, "model": model, "site": site, "corpus": "pydoc",
                                "split": "all", "ctx_len": ctx_len, "lm_dtype": str(lm.dtype), "exclude_bos": True,
                                "sink_norm_ratio": 10.0, "seconds": round(time.time() - t0, 1)}, indent=1))
    return path


# --- 2. the peers' virtualenv --------------------------------------------------------------------

def peers_python(venv: Path) -> Path:
    """The peers venv's python, created and filled on first use (pinned versions)."""
    py = venv / "bin" / "python"
    if not py.is_file():
        print(f"creating the peers virtualenv {venv}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    probe = ("import importlib.metadata as m, json\n"
             "out = {}\n"
             "for n in ['torch', 'eai-sparsify', 'sae-lens']:\n"
             "    try: out[n] = m.version(n)\n"
             "    except m.PackageNotFoundError: out[n] = None\n"
             "print(json.dumps(out))")
    have = json.loads(subprocess.run([str(py), "-c", probe], check=True, capture_output=True, text=True).stdout)
    pip = [str(py), "-m", "pip", "install", "--quiet"]
    if not (have["torch"] or "").startswith(TORCH_PIN.split("==")[1]):
        print(f"installing {TORCH_PIN} into {venv}", flush=True)
        subprocess.run(pip + [TORCH_PIN], check=True)
    wanted = [f"{n}=={v}" for n, v in PEER_PINS.items() if have.get(n) != v]
    if wanted:
        print(f"installing {' '.join(wanted)} into {venv}", flush=True)
        # the torch pin again, so that pip cannot swap the CPU build for another one
        subprocess.run(pip + [TORCH_PIN] + wanted, check=True)
    return py


# --- 3. split and batch order --------------------------------------------------------------------

def batch_order(train_rows: np.ndarray, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """The batches ArrayActivations.batches yields (one seeded permutation per epoch), as row indices."""
    out = np.empty((steps, batch_size), dtype=np.int64)
    epoch, n = 0, 0
    while n < steps:
        order = np.random.default_rng(seed + 1 + epoch).permutation(train_rows)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            if n == steps:
                break
            out[n] = np.sort(order[start:start + batch_size])
            n += 1
        epoch += 1
    return out


# --- 4. our trainer, in a subprocess of this venv ------------------------------------------------

def run_ours(job: dict) -> None:
    """Runs in the subprocess: trainer.train.Trainer on the .npy, timed around its training steps."""
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(PEERS_DIR))
    import torch

    from common import memory_report, save_check  # benchmarks/peers/common.py
    from trainer.evaluate import Evaluated
    from trainer.train import TrainConfig, Trainer

    class TimedTrainer(Trainer):
        t0 = c0 = t1 = c1 = None
        fetch_s = 0.0

        def training_batches(self, skip_chunks: int = 0):
            it = super().training_batches(skip_chunks)
            while True:
                t = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    return
                if self.t0 is not None:  # fetches inside the timed loop
                    self.fetch_s += time.perf_counter() - t
                yield batch

        def train_step(self, run, x, total_steps):
            if self.t0 is None:
                self.t0, self.c0 = time.perf_counter(), time.process_time()
            out = super().train_step(run, x, total_steps)
            self.t1, self.c1 = time.perf_counter(), time.process_time()
            return out

    cfg = TrainConfig(out=Path(job["out"]), activations=Path(job["activations"]), arch=["topk"], width=[job["width"]],
                      k=[job["k"]], tokens=job["steps"] * job["batch_size"], batch_size=job["batch_size"],
                      eval_fraction=job["eval_fraction"], seed=job["seed"], device="cpu", overwrite=True,
                      dead_after_tokens=job["dead_tokens"], eval_tokens=job.get("eval_tokens", 65_536))
    import hashlib

    # The trainer is under active development: record exactly which code was measured.
    digest = hashlib.sha256()
    for f in sorted((REPO / "trainer").rglob("*.py")):
        digest.update(f.relative_to(REPO).as_posix().encode() + b"\0" + f.read_bytes())
    trainer = TimedTrainer(cfg)
    [folder] = trainer.fit()
    run = trainer.runs[0]
    model = Evaluated(run.sae.eval(), SITE, run.norm_scale)
    with torch.no_grad():
        save_check(job, lambda x: model.reconstruct(torch.from_numpy(x))[0].float().numpy())
    from importlib.metadata import version

    result = {
        "trainer": "ours", "package": "sae-atlas", "version": version("sae-atlas"), "torch": torch.__version__,
        "weights": str(folder), "format": "saelens", "steps": trainer.step, "tokens": trainer.step * cfg.batch_size,
        "loop_s": trainer.t1 - trainer.t0, "cpu_s": trainer.c1 - trainer.c0, "fetch_s": trainer.fetch_s,
        "own_dead_frac": float((run.tokens_since_fired >= run.sae.cfg.dead_after_tokens).float().mean()),
        "norm_scale": run.norm_scale, "lr": run.base_lr, "dead_after_tokens": run.sae.cfg.dead_after_tokens,
        "threads": torch.get_num_threads(), "trainer_sha256": digest.hexdigest()[:16], **memory_report(),
    }
    Path(job["result"]).write_text(json.dumps(result, indent=1))


def launch(name: str, cmd: list[str], job: dict, log: Path) -> dict:
    """Run one trainer; returns its own report plus the subprocess's ru_maxrss and wall time."""
    job_file = Path(job["out"]).parent / f"{name}.job.json"
    Path(job["out"]).parent.mkdir(parents=True, exist_ok=True)
    job_file.write_text(json.dumps(job, indent=1))
    Path(job["result"]).unlink(missing_ok=True)
    t = time.time()
    load = os.getloadavg()[0]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd + [str(job_file)], stdout=fh, stderr=subprocess.STDOUT, env=_env(), cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not Path(job["result"]).is_file():
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{name} failed (exit {proc.returncode}); the end of {log}:\n{tail}")
    report = json.loads(Path(job["result"]).read_text())
    report.update({"subprocess_wall_s": time.time() - t, "ru_maxrss_mb": usage.ru_maxrss / 1024,
                   "loadavg_1m_before": load, "loadavg_1m_after": os.getloadavg()[0], "log": str(log)})
    return report


# --- 5. one evaluation for all -------------------------------------------------------------------

def evaluate(weights: str, held_out, check: tuple | None = None) -> dict:
    """The one evaluation every SAE gets: loaded from its saved folder, scored on the held-out rows.

    check = (rows, x_hat_file): the trainer's own reconstruction of those rows, which the loaded
    SAE must reproduce (proves that the conversion to our loader is exact)."""
    sys.path.insert(0, str(REPO))
    import torch

    from trainer.evaluate import Evaluated, reconstruction_metrics
    from trainer.formats import load_sae

    loaded = load_sae(weights)  # SAELens layout (ours, SAELens) or sparsify layout
    model = Evaluated(loaded.sae, SITE, 1.0)
    metrics = reconstruction_metrics(model, held_out)
    metrics["architecture"] = loaded.architecture
    metrics["source_format"] = loaded.source_format
    if check is not None and Path(check[1]).is_file():
        theirs = torch.from_numpy(np.load(check[1]))
        mine = model.reconstruct(check[0])[0]
        metrics["load_check_rel_err"] = float((mine - theirs).norm() / theirs.norm().clamp_min(1e-12))
    return metrics


# --- 6. the table --------------------------------------------------------------------------------

def table(rows: list[dict]) -> str:
    cols = [("trainer", "{}"), ("version", "{}"), ("tok/s", "{:,.0f}")]
    if "tok/s full run" in rows[0]:
        cols.append(("tok/s full run", "{:,.0f}"))
    cols += [("tok/CPU-s", "{:,.0f}"),
            ("loop s", "{:.1f}"), ("peak RSS MB", "{:,.0f}"), ("FVU", "{:.4f}"), ("L0", "{:.2f}"),
            ("dead", "{:.2%}"), ("dense", "{:.2%}")]
    cells = [[fmt.format(r[c]) for c, fmt in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, (c, _) in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, ((c, _), w) in enumerate(zip(cols, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        lines.append("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1_000_000,
                   help="training tokens per SAE (default 1M = 244 steps: 10-15 minutes in all on 2 idle cores, "
                        "20-30 on a busy shared machine)")
    p.add_argument("--width", type=int, default=4608, help="latents (default 8 x 576)")
    p.add_argument("--k", type=int, default=32, help="active latents per token (default 32)")
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per optimiser step (default 4096)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 64 steps, 16k held-out rows")
    p.add_argument("--n-activations", type=int, default=500_000, help="rows of the cached activation file")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="held-out share of the rows (default 0.1)")
    p.add_argument("--eval-tokens", type=int, default=None, help="held-out rows scored (default: all of them)")
    p.add_argument("--trainers", default=",".join(TRAINERS), help="comma-separated subset of ours,sparsify,saelens")
    p.add_argument("--speed-trials", type=int, default=None,
                   help="after the full runs, this many interleaved rounds of short timing runs "
                        "(default 3, with --quick 1; 0: none)")
    p.add_argument("--trial-steps", type=int, default=16, help="steps per timing run (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the batch order and every initialisation")
    p.add_argument("--peers-venv", type=Path, default=PEERS_VENV, help="the peers' virtualenv (default .peers/venv)")
    p.add_argument("--results", type=Path, default=RESULTS,
                   help="where to write the JSON results (default benchmarks/results/train_vs_peers.json)")
    p.add_argument("--prepare-only", action="store_true", help="cache the activations and the peers venv, then stop")
    p.add_argument("--_run-ours", dest="run_ours", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.run_ours:
        run_ours(json.loads(a.run_ours.read_text()))
        return 0

    trainers = [t.strip() for t in a.trainers.split(",") if t.strip()]
    unknown = set(trainers) - set(TRAINERS)
    if unknown:
        p.error(f"unknown trainers {sorted(unknown)}; use {','.join(TRAINERS)}")
    tokens = (64 * a.batch_size) if a.quick else a.tokens
    if a.speed_trials is None:
        a.speed_trials = 1 if a.quick else 3
    eval_tokens = a.eval_tokens or (16_384 if a.quick else None)
    if a.k >= a.width or tokens < a.batch_size:
        p.error("need k < width and tokens >= batch size")

    acts = prepare_activations(ACTS_FILE, a.n_activations)
    need_peers = any(t != "ours" for t in trainers)
    py_peers = peers_python(a.peers_venv) if need_peers else None
    if a.prepare_only:
        return 0

    sys.path.insert(0, str(REPO))
    import torch

    from trainer.activations import ArrayActivations
    from trainer.sae import lr_for_width
    from trainer.train import TrainConfig

    array = ArrayActivations(acts, eval_fraction=max(a.eval_fraction, 0.01), seed=a.seed)
    d_in = array.d_in
    steps = tokens // a.batch_size
    order = batch_order(array.train_rows, a.batch_size, steps, a.seed)
    check = array.batches(a.batch_size)
    for i in range(min(2, steps)):  # our trainer will draw exactly these batches
        assert np.array_equal(next(check).numpy(), np.asarray(array.array[order[i]])), "batch order mismatch"
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    np.save(RUNS_DIR / "order.npy", order)
    check_rows = array.eval_rows[:1024]
    np.save(RUNS_DIR / "check_rows.npy", check_rows)

    # The configuration every trainer gets (our trainer's defaults, spelled out for the peers).
    ref = TrainConfig(tokens=steps * a.batch_size, batch_size=a.batch_size, width=[a.width], k=[a.k])
    decay_start = int(steps * (1 - ref.decay_frac))
    job_base = {
        "activations": str(acts), "order": str(RUNS_DIR / "order.npy"), "d_in": d_in, "width": a.width, "k": a.k,
        "batch_size": a.batch_size, "steps": steps, "lr": lr_for_width(a.width),
        "warmup_steps": max(1, min(ref.warmup_steps, steps // 10)), "decay_steps": steps - decay_start,
        "aux_k": d_in // 2, "aux_alpha": ref.aux_coefficient, "dead_tokens": ref.dead_tokens(),
        "grad_clip": ref.grad_clip, "seed": a.seed, "eval_fraction": max(a.eval_fraction, 0.01),
    }
    commands = {
        "ours": [sys.executable, str(Path(__file__).resolve()), "--_run-ours"],
        "sparsify": [str(py_peers), str(PEERS_DIR / "run_sparsify.py")] if py_peers else None,
        "saelens": [str(py_peers), str(PEERS_DIR / "run_saelens.py")] if py_peers else None,
    }
    held_out = array.eval_tensor(eval_tokens)
    print(f"activations {acts} [{array.array.shape[0]:,} x {d_in}], {len(array.train_rows):,} training rows, "
          f"{held_out.shape[0]:,} held-out rows; {steps} steps x {a.batch_size} tokens, width {a.width}, k {a.k}, "
          f"lr {job_base['lr']:.3g}, warm-up {job_base['warmup_steps']}, decay {job_base['decay_steps']} steps, "
          f"dead after {job_base['dead_tokens']:,} tokens", flush=True)

    rows = []
    for name in trainers:
        out = RUNS_DIR / name
        job = {**job_base, "out": str(out), "result": str(RUNS_DIR / f"{name}.result.json"),
               "check_rows": str(RUNS_DIR / "check_rows.npy"), "check_out": str(RUNS_DIR / f"{name}.xhat.npy")}
        print(f"training {LABELS[name]} ...", flush=True)
        rep = launch(name, commands[name], job, RUNS_DIR / f"{name}.log")
        fetch = rep.get("fetch_s", 0.0)
        train_s = max(1e-9, rep["loop_s"] - fetch)
        rep["tokens_per_s"] = rep["tokens"] / train_s
        if rep.get("cpu_s"):
            rep["tokens_per_cpu_s"] = rep["tokens"] / max(1e-9, rep["cpu_s"] - fetch)
        m = evaluate(rep["weights"], held_out, (torch.from_numpy(np.asarray(array.array[check_rows])), job["check_out"]))
        rep["eval"] = m
        rows.append({"trainer": LABELS[name], "key": name, "version": rep["version"], "tok/s": rep["tokens_per_s"],
                     "tok/CPU-s": rep.get("tokens_per_cpu_s", float("nan")), "loop s": rep["loop_s"],
                     "peak RSS MB": rep["ru_maxrss_mb"], "FVU": m["fvu"], "L0": m["l0"], "dead": m["dead_frac_eval"],
                     "dense": m["dense_frac"], "report": rep})
        print(f"  {LABELS[name]}: {rep['tokens_per_s']:,.0f} tokens/s, FVU {m['fvu']:.4f}, L0 {m['l0']:.2f} "
              f"(saved weights reproduce the trainer's own reconstruction to {m.get('load_check_rel_err', float('nan')):.1e})",
              flush=True)

    # Timing trials: short runs of every trainer in round-robin order, so that a change in the load
    # other processes put on the machine hits all trainers alike; the best round counts.
    if a.speed_trials > 0 and rows:
        t_steps = min(a.trial_steps, steps)
        np.save(RUNS_DIR / "order_trial.npy", order[:t_steps])
        print(f"timing trials: {a.speed_trials} rounds x {t_steps} steps per trainer, interleaved ...", flush=True)
        for rnd in range(a.speed_trials):
            for row in rows:
                name = row["key"]
                job = {**job_base, "steps": t_steps, "order": str(RUNS_DIR / "order_trial.npy"), "eval_tokens": 4096,
                       "out": str(RUNS_DIR / "trials" / name), "result": str(RUNS_DIR / "trials" / f"{name}.result.json")}
                rep = launch(name, commands[name], job, RUNS_DIR / "trials" / f"{name}.log")
                rep["tokens_per_s"] = rep["tokens"] / max(1e-9, rep["loop_s"] - rep.get("fetch_s", 0.0))
                rep["tokens_per_cpu_s"] = rep["tokens"] / max(1e-9, rep["cpu_s"] - rep.get("fetch_s", 0.0))
                row["report"].setdefault("trials", []).append(
                    {k: rep[k] for k in ("tokens", "loop_s", "cpu_s", "fetch_s", "tokens_per_s", "tokens_per_cpu_s",
                                         "ru_maxrss_mb", "loadavg_1m_before")})
                print(f"  round {rnd + 1} {LABELS[name]}: {rep['tokens_per_s']:,.0f} tokens/s", flush=True)
        for row in rows:
            trials = row["report"]["trials"]
            row["tok/s full run"] = row["tok/s"]
            row["tok/s"] = max(t["tokens_per_s"] for t in trials)

    print()
    print(table(rows))
    if "tok/s full run" in rows[0]:
        print(f"tok/s: best of {a.speed_trials} interleaved timing rounds of {t_steps} steps each; tok/s full run and "
              f"tok/CPU-s: the full {steps}-step run (disturbed by whatever else ran at that time)")
    verdict = None
    ours = next((r for r in rows if r["key"] == "ours"), None)
    peers = [r for r in rows if r["key"] != "ours"]
    if ours and peers:
        fastest = max(peers, key=lambda r: r["tok/s"])
        best = min(peers, key=lambda r: r["FVU"])
        same_l0 = all(abs(r["L0"] - ours["L0"]) <= 0.5 for r in peers)
        verdict = {
            "fastest_peer": fastest["key"], "speed_ratio_vs_fastest_peer": ours["tok/s"] / fastest["tok/s"],
            "cpu_speed_ratio_vs_fastest_peer": ours["tok/CPU-s"] / fastest["tok/CPU-s"],
            "best_fvu_peer": best["key"], "fvu_minus_best_peer": ours["FVU"] - best["FVU"], "same_l0": same_l0,
            "at_least_as_fast": ours["tok/s"] >= fastest["tok/s"],
            "at_least_as_good_fvu": ours["FVU"] <= best["FVU"] and same_l0,
        }
        print(f"\nours vs fastest peer ({LABELS[fastest['key']]}): {verdict['speed_ratio_vs_fastest_peer']:.2f}x tokens/s; "
              f"FVU {ours['FVU']:.4f} vs best peer "
              f"({LABELS[best['key']]}) {best['FVU']:.4f} at L0 {ours['L0']:.1f}")
        print("goal (at least as fast as the fastest peer and at least as good in FVU at the same L0): "
              + ("MET" if verdict["at_least_as_fast"] and verdict["at_least_as_good_fvu"] else "NOT MET"))
    print(f"load average now {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; logs and weights in {RUNS_DIR}")

    a.results.parent.mkdir(parents=True, exist_ok=True)
    a.results.write_text(json.dumps({
        "command": "python benchmarks/train_vs_peers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "device": "cpu"},
        "activations": {"file": str(acts.relative_to(REPO)) if acts.is_relative_to(REPO) else str(acts),
                        **json.loads(acts.with_suffix(".json").read_text()),
                        "train_rows": int(len(array.train_rows)), "held_out_rows": int(held_out.shape[0])},
        "config": {k: v for k, v in job_base.items() if k not in ("activations", "order")},
        "peers": {"venv": str(a.peers_venv), "pins": {"torch": TORCH_PIN.split("==")[1], **PEER_PINS}},
        "results": [{k: (v if not (isinstance(v, float) and math.isnan(v)) else None) for k, v in r.items()}
                    for r in rows],
        "verdict": verdict,
    }, indent=1, default=str))
    print(f"wrote {a.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
