"""Train our TopK SAE and the same configuration in EleutherAI sparsify and SAELens: steady-state speed and quality.

    python benchmarks/train_vs_peers.py            # the full benchmark: 1M tokens, width 4608, k 32, batch 4096,
                                                   # 3 rounds (about an hour on 2 idle cores)
    python benchmarks/train_vs_peers.py --quick    # a smoke run (40 steps, 2 rounds)

Self-contained: it caches the activations (step 1) and creates the peers' virtualenv (step 2) on
first use. Run it on an otherwise idle machine; the load average before every run is recorded.

1. Caches real activations once: float32 [N, 576] of the bundled smollm2-135m at resid_post.15 over
   the pydoc corpus (our LMActivations stream: BOS and attention sinks left out, as our trainer
   does) in data/bench/activations_resid15.npy (N = --n-activations, 500k by default).
2. Creates (or reuses) a separate virtualenv for the peers, .peers/venv, with the local CPU torch
   installed first and then pinned eai-sparsify and sae-lens. Nothing is installed in the project venv.
3. Splits the rows once (our ArrayActivations split: held-out rows for evaluation, the rest for
   training) and writes ONE batch order, order.npy [steps, batch_size], that every trainer follows:
   our trainer reproduces it itself from the same seed (checked here), the peers read it.
4. The same learning rate (Gao et al.'s width law), warm-up, AuxK (k_aux = d_in / 2) and dead window
   for everyone, and the same schedule and clipping within each comparison: SAELens takes ours
   exactly (warm-up, constant, linear decay to 0 over the last 20%, clipping at 1.0); sparsify
   cannot (warm-up then linear decay to 0 over the whole run, no clipping, fixed in its code), so
   our trainer runs a second time with sparsify's schedule ("ours-sparsify") and is compared with
   sparsify on that. Each peer otherwise runs in its documented regime; see benchmarks/peers/*.py.
5. Each trainer's FULL run, alone, in its own subprocess (ours in this venv: trainer.train.Trainer
   on the .npy, what `sae-atlas train --activations` runs; the peers in their venv), repeated for
   --rounds rounds with the order rotated each round, so that a change in the machine's load hits
   every trainer. Each run records when every step starts; its rate is the STEADY-STATE tokens/s
   from step steps/10 to the end of the last step (start-up excluded, batch fetching included: it
   is the same memmap read for all). The table gives the median over the rounds and the range.
6. Evaluates every SAE (first round; the rounds train identical SAEs) with ONE function on the SAME
   held-out rows: loaded from its own saved format by trainer.formats.load_sae and scored by
   trainer.evaluate.reconstruction_metrics (FVU against the held-out mean, L0, dead = latents that
   never fire on the held-out rows, by our one firing rule).
7. Prints one table and the per-pair ratios; writes benchmarks/results/train_vs_peers.json with
   every run's rate, load average, CPU model and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
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
LABELS = {"ours": "SAE Atlas", "ours-sparsify": "SAE Atlas, sparsify's schedule", "sparsify": "EleutherAI sparsify",
          "saelens": "SAELens"}


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

def steady_rate(step_starts: list[float], end: float, batch_size: int, skip_frac: float = 0.1) -> dict:
    """Tokens/s over the run after its first skip_frac of steps (start-up, allocator and cache warm-up
    excluded): from the start of step `skip` to the end of the last step. step_starts[i] is when step
    i began (perf_counter)."""
    steps = len(step_starts)
    skip = min(max(1, int(steps * skip_frac)), steps - 1)
    span = end - step_starts[skip]
    return {"steady_from_step": skip, "steady_s": span, "steady_tokens": (steps - skip) * batch_size,
            "tokens_per_s": (steps - skip) * batch_size / max(span, 1e-9),
            "whole_loop_tokens_per_s": steps * batch_size / max(end - step_starts[0], 1e-9)}


def run_ours(job: dict) -> None:
    """Runs in the subprocess: trainer.train.Trainer on the .npy, every step's start time recorded."""
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(PEERS_DIR))
    import torch

    from common import memory_report, save_check  # benchmarks/peers/common.py
    from trainer.evaluate import Evaluated
    from trainer.train import TrainConfig, Trainer

    class TimedTrainer(Trainer):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.step_starts: list[float] = []
            self.end = self.c0 = self.c1 = None

        def train_step(self, run, x):
            if self.c0 is None:
                self.c0 = time.process_time()
            self.step_starts.append(time.perf_counter())
            out = super().train_step(run, x)
            self.end, self.c1 = time.perf_counter(), time.process_time()
            return out

    cfg = TrainConfig(out=Path(job["out"]), activations=Path(job["activations"]), arch=["topk"], width=[job["width"]],
                      k=[job["k"]], tokens=job["steps"] * job["batch_size"], batch_size=job["batch_size"],
                      eval_fraction=job["eval_fraction"], seed=job["seed"], device=job.get("device", "cpu"), overwrite=True,
                      lr=job["lr"], warmup_steps=job["warmup_steps"], decay_frac=job["decay_steps"] / job["steps"],
                      grad_clip=job["grad_clip"], aux_coefficient=job["aux_alpha"], aux_k=job["aux_k"],
                      dead_after_tokens=job["dead_tokens"], eval_tokens=job.get("eval_tokens", 65_536),
                      checkpoint_every=0, log_every=1000)
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
        save_check(job, lambda x: model.reconstruct(torch.from_numpy(x).to(run.sae.W_dec.device))[0].float().cpu().numpy())
    from importlib.metadata import version

    result = {
        "trainer": job["name"], "package": "sae-atlas", "version": version("sae-atlas"), "torch": torch.__version__,
        "weights": str(folder), "format": "saelens", "steps": trainer.step, "tokens": trainer.step * cfg.batch_size,
        "step_starts": trainer.step_starts, "loop_end": trainer.end, "cpu_s": trainer.c1 - trainer.c0,
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


# --- 6. rounds and the table ----------------------------------------------------------------------

# Which trainer runs which schedule. SAELens takes ours exactly (warm-up from lr/W, constant, linear
# decay to 0 over the last 20%, clipping at 1.0, all options of its SAETrainerConfig). sparsify cannot:
# its schedule is fixed (warm-up, then linear decay to 0 over the whole run, no clipping), so our
# trainer also runs with sparsify's ("ours-sparsify") and each peer is compared with ours on its own.
SCHEDULES = {"ours": "ours", "saelens": "ours", "sparsify": "sparsify", "ours-sparsify": "sparsify"}
PAIRS = (("ours", "saelens"), ("ours-sparsify", "sparsify"))


def schedule(name: str, steps: int, warmup: int, decay_frac: float, clip: float) -> dict:
    if name == "sparsify":
        return {"warmup_steps": warmup, "decay_steps": steps - warmup, "grad_clip": 0.0, "schedule": "sparsify"}
    decay = steps - int(steps * (1 - decay_frac))
    return {"warmup_steps": warmup, "decay_steps": decay, "grad_clip": clip, "schedule": "ours"}


def table(rows: list[dict]) -> str:
    cols = [("trainer", "{}"), ("version", "{}"), ("schedule", "{}"), ("tok/s", "{:,.0f}"), ("tok/s range", "{}"),
            ("tok/CPU-s", "{:,.0f}"), ("peak RSS MB", "{:,.0f}"), ("FVU", "{:.4f}"), ("L0", "{:.2f}"),
            ("dead", "{:.2%}"), ("dense", "{:.2%}")]
    cells = [[fmt.format(r[c]) for c, fmt in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, (c, _) in enumerate(cols)]
    left = 3
    lines = ["  ".join(c.ljust(w) if i < left else c.rjust(w) for i, ((c, _), w) in enumerate(zip(cols, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        lines.append("  ".join(v.ljust(w) if i < left else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1_000_000,
                   help="training tokens per SAE (default 1M = 244 steps; one round of the four trainers takes "
                        "15-20 minutes on 2 idle cores)")
    p.add_argument("--width", type=int, default=4608, help="latents (default 8 x 576)")
    p.add_argument("--k", type=int, default=32, help="active latents per token (default 32)")
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per optimiser step (default 4096)")
    p.add_argument("--rounds", type=int, default=None, help="full runs of every trainer, alternated (default 3; --quick 2)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 40 steps, 2 rounds, 16k held-out rows")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the peers' venv needs a CUDA torch for cuda)")
    p.add_argument("--n-activations", type=int, default=500_000, help="rows of the cached activation file")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="held-out share of the rows (default 0.1)")
    p.add_argument("--eval-tokens", type=int, default=None, help="held-out rows scored (default: all of them)")
    p.add_argument("--trainers", default=",".join(SCHEDULES),
                   help="comma-separated subset of " + ",".join(SCHEDULES))
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
    unknown = set(trainers) - set(SCHEDULES)
    if unknown:
        p.error(f"unknown trainers {sorted(unknown)}; use {','.join(SCHEDULES)}")
    tokens = (40 * a.batch_size) if a.quick else a.tokens
    rounds = a.rounds or (2 if a.quick else 3)
    eval_tokens = a.eval_tokens or (16_384 if a.quick else None)
    if a.k >= a.width or tokens < a.batch_size:
        p.error("need k < width and tokens >= batch size")
    if a.quick and a.results == RESULTS:
        a.results = RESULTS.with_suffix(".quick.json")  # a smoke run never replaces the real numbers

    acts = prepare_activations(ACTS_FILE, a.n_activations)
    need_peers = any(t in ("sparsify", "saelens") for t in trainers)
    py_peers = peers_python(a.peers_venv) if need_peers else None
    if a.prepare_only:
        return 0

    sys.path.insert(0, str(REPO))
    import torch

    from benchmarks.machine import cpu_model

    from trainer.activations import ArrayActivations
    from trainer.sae import default_lr, lr_for_width
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

    # The configuration every trainer gets: our defaults, spelled out. The learning rate is our
    # default for this run length (Gao et al.'s width law, which sparsify uses by default, raised for
    # short runs: trainer/sae/base.py default_lr), the same for all three.
    ref = TrainConfig(tokens=steps * a.batch_size, batch_size=a.batch_size, width=[a.width], k=[a.k])
    ((_, sae_cfg),) = ref.sae_configs(d_in)
    warmup = max(1, min(ref.warmup_steps, steps // 10))
    job_base = {
        "activations": str(acts), "order": str(RUNS_DIR / "order.npy"), "d_in": d_in, "width": a.width, "k": a.k,
        "batch_size": a.batch_size, "steps": steps, "lr": default_lr(sae_cfg, ref.tokens, a.batch_size),
        "lr_width_law": lr_for_width(a.width), "aux_k": d_in // 2,
        "aux_alpha": 1 / 32, "dead_tokens": ref.dead_tokens(), "seed": a.seed,
        "eval_fraction": max(a.eval_fraction, 0.01), "device": a.device,
    }
    commands = {
        "ours": [sys.executable, str(Path(__file__).resolve()), "--_run-ours"],
        "ours-sparsify": [sys.executable, str(Path(__file__).resolve()), "--_run-ours"],
        "sparsify": [str(py_peers), str(PEERS_DIR / "run_sparsify.py")] if py_peers else None,
        "saelens": [str(py_peers), str(PEERS_DIR / "run_saelens.py")] if py_peers else None,
    }
    held_out = array.eval_tensor(eval_tokens)
    print(f"activations {acts} [{array.array.shape[0]:,} x {d_in}], {len(array.train_rows):,} training rows, "
          f"{held_out.shape[0]:,} held-out rows; {steps} steps x {a.batch_size} tokens, width {a.width}, k {a.k}, "
          f"lr {job_base['lr']:.3g}, warm-up {warmup}, dead after {job_base['dead_tokens']:,} tokens; "
          f"{rounds} rounds of {len(trainers)} full runs, alternated", flush=True)

    reports: dict[str, list[dict]] = {t: [] for t in trainers}
    for rnd in range(rounds):
        order_this_round = trainers[rnd % len(trainers):] + trainers[:rnd % len(trainers)]  # rotate who goes first
        for name in order_this_round:
            out = RUNS_DIR / f"round{rnd + 1}" / name
            job = {**job_base, **schedule(SCHEDULES[name], steps, warmup, ref.decay_frac, ref.grad_clip), "name": name,
                   "out": str(out), "result": str(out.parent / f"{name}.result.json"),
                   "check_rows": str(RUNS_DIR / "check_rows.npy"), "check_out": str(out.parent / f"{name}.xhat.npy")}
            rep = launch(name, commands[name], job, out.parent / f"{name}.log")
            rep.update(steady_rate(rep.pop("step_starts"), rep.pop("loop_end"), a.batch_size))
            rep["tokens_per_cpu_s"] = rep["tokens"] / max(rep["cpu_s"], 1e-9)
            rep["round"] = rnd + 1
            if rnd == 0:  # every round trains the same SAE from the same seed; score the first
                rep["eval"] = evaluate(rep["weights"], held_out,
                                       (torch.from_numpy(np.asarray(array.array[check_rows])), job["check_out"]))
            reports[name].append(rep)
            print(f"  round {rnd + 1} {name:14} {rep['tokens_per_s']:>8,.0f} tok/s steady "
                  f"(load {rep['loadavg_1m_before']:.2f} -> {rep['loadavg_1m_after']:.2f})", flush=True)

    rows = []
    for name in trainers:
        reps = reports[name]
        rates = [r["tokens_per_s"] for r in reps]
        m = reps[0]["eval"]
        rows.append({"trainer": LABELS.get(name, name), "key": name, "version": reps[0]["version"],
                     "schedule": SCHEDULES[name] + (" (clip 1.0)" if SCHEDULES[name] == "ours" else " (no clip)"),
                     "tok/s": statistics.median(rates), "tok/s range": f"{min(rates):,.0f}-{max(rates):,.0f}",
                     "tok/CPU-s": statistics.median(r["tokens_per_cpu_s"] for r in reps),
                     "peak RSS MB": max(r["ru_maxrss_mb"] for r in reps), "FVU": m["fvu"], "L0": m["l0"],
                     "dead": m["dead_frac_eval"], "dense": m["dense_frac"], "own_dead": reps[0].get("own_dead_frac"),
                     "load_check_rel_err": m.get("load_check_rel_err"), "reports": reps})
    print()
    print(table(rows))
    print(f"tok/s: median over {rounds} full runs per trainer (run alone, order rotated each round) of the steady-state "
          f"rate, from step {rows[0]['reports'][0]['steady_from_step']} to the last; range: min-max over the rounds")
    by_key = {r["key"]: r for r in rows}
    verdict = {}
    for ours, peer in PAIRS:
        if ours in by_key and peer in by_key:
            o, q = by_key[ours], by_key[peer]
            verdict[peer] = {"ours": ours, "speed_ratio": o["tok/s"] / q["tok/s"], "fvu_ours": o["FVU"],
                             "fvu_peer": q["FVU"], "l0_ours": o["L0"], "l0_peer": q["L0"]}
            print(f"{LABELS.get(ours, ours)} vs {LABELS[peer]} (same schedule and clipping): "
                  f"{o['tok/s'] / q['tok/s']:.2f}x tokens/s; FVU {o['FVU']:.4f} vs {q['FVU']:.4f} at L0 {o['L0']:.1f} vs {q['L0']:.1f}")
    loads = [r["loadavg_1m_before"] for reps in reports.values() for r in reps]
    print(f"load average before the runs: {min(loads):.2f}-{max(loads):.2f} on {os.cpu_count()} CPUs; "
          f"logs and weights in {RUNS_DIR}")

    a.results.parent.mkdir(parents=True, exist_ok=True)
    a.results.write_text(json.dumps({
        "command": "python benchmarks/train_vs_peers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "cpu_model": cpu_model(),
                    "python": platform.python_version(), "torch": torch.__version__, "device": a.device},
        "activations": {"file": str(acts.relative_to(REPO)) if acts.is_relative_to(REPO) else str(acts),
                        **json.loads(acts.with_suffix(".json").read_text()),
                        "train_rows": int(len(array.train_rows)), "held_out_rows": int(held_out.shape[0])},
        "config": {k: v for k, v in job_base.items() if k not in ("activations", "order")},
        "schedules": {name: schedule(SCHEDULES[name], steps, warmup, ref.decay_frac, ref.grad_clip) for name in trainers},
        "peers": {"venv": str(a.peers_venv), "pins": {"torch": TORCH_PIN.split("==")[1], **PEER_PINS}},
        "rounds": rounds,
        "results": [{k: (v if not (isinstance(v, float) and math.isnan(v)) else None) for k, v in r.items()}
                    for r in rows],
        "verdict": verdict,
    }, indent=1, default=str))
    print(f"wrote {a.results}")
    return 0




if __name__ == "__main__":
    raise SystemExit(main())
