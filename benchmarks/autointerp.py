"""Benchmark: auto-interp queue overhead and local-model explanation throughput.

    python benchmarks/autointerp.py [--jobs 1000] [--sqlite-workers 2] [--pg-workers 4] [--local-jobs 5]

1. Queue overhead: a synthetic SAE (app.autointerp.synthetic) gets `--jobs` explain jobs, drained
   by worker PROCESSES (`python -m app.autointerp.worker --backend instant --once`) on a SQLite file
   and on a throwaway PostgreSQL server. The instant backend (tests/benchmarks only) answers at
   once, so what is measured is everything else a job costs: claim, lease, loading examples,
   building prompts, storing the explanation and ~24 judgements, completing. Reported as jobs per
   second over the wall time (process start-up included) and over the busy span (first claim to
   last completion, from the jobs table).
2. Local model: a small SAE on the bundled SmolLM2-135M (trained once and cached under
   data/bench), `--local-jobs` features explained and scored by one worker with the local backend
   (the same model explains and judges): explanations per minute, plus LM requests and tokens.
Results go to benchmarks/results/autointerp.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("SAE_ATLAS_DATA_DIR", str(REPO / "data" / "bench"))
os.environ.setdefault("SAE_ATLAS_MODEL_CACHE_DIR", str(REPO / "data" / "models"))

from sqlalchemy import func, select  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402


def drain(url: str, engine, n_jobs: int, n_workers: int, concurrency: int) -> dict:
    from app.autointerp import queue
    from app.autointerp.synthetic import make_synthetic_sae
    from app.models import Job

    make_synthetic_sae(engine, n_features=n_jobs)
    with Session(engine) as s, s.begin():
        queue.enqueue_for_sae(s, "synthetic")
    env = dict(os.environ, SAE_ATLAS_DATABASE_URL=url, SAE_ATLAS_LOG_LEVEL="WARNING", SAE_ATLAS_WORKER_POLL_S="0.2",
               PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "app.autointerp.worker", "--backend", "instant", "--once",
           "--concurrency", str(concurrency)]
    started = time.perf_counter()
    procs = [subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(n_workers)]
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"worker failed:\n{out}")
    wall = time.perf_counter() - started
    with Session(engine) as s:
        counts = queue.counts(s)
        first, last = s.execute(select(func.min(Job.started_at), func.max(Job.finished_at))).one()
        workers = len({j.result["worker"] for j in s.scalars(select(Job)) if j.result})
    busy = (last - first).total_seconds()
    if counts != {"done": n_jobs}:
        raise SystemExit(f"not every job finished: {counts}")
    return {"jobs": n_jobs, "workers": n_workers, "workers_that_worked": workers, "concurrency": concurrency,
            "wall_s": round(wall, 2), "busy_s": round(busy, 2), "jobs_per_s_wall": round(n_jobs / wall, 1),
            "jobs_per_s_busy": round(n_jobs / busy, 1)}


def queue_overhead(args) -> list[dict]:
    import tempfile

    from app.db import make_engine, upgrade
    from tests.helpers import PostgresServer, find_pg_bindir

    rows = []
    with tempfile.TemporaryDirectory(prefix="atlas-bench-") as tmp:
        url = f"sqlite:///{tmp}/atlas.db"
        engine = make_engine(url)
        upgrade(engine)
        rows.append({"store": "SQLite", **drain(url, engine, args.jobs, args.sqlite_workers, args.concurrency)})
        engine.dispose()
    if find_pg_bindir() is None:
        print("no PostgreSQL server binaries: skipping the PostgreSQL run", file=sys.stderr)
        return rows
    server = PostgresServer().start()
    try:
        url = server.create_database("bench")
        engine = make_engine(url)
        upgrade(engine)
        rows.append({"store": "PostgreSQL", **drain(url, engine, args.jobs, args.pg_workers, args.concurrency)})
        engine.dispose()
    finally:
        server.stop()
    return rows


def smollm_sae() -> Path:
    """A small SAE on the bundled model, trained and analysed once, then reused."""
    from trainer.analyze import AnalyzeConfig, analyze
    from trainer.train import TrainConfig, train

    out = Path(os.environ["SAE_ATLAS_DATA_DIR"]) / "autointerp-sae"
    done = next(out.glob("**/analysis/DONE"), None) if out.exists() else None
    if done is not None:
        return done.parent.parent
    cfg = TrainConfig(out=out, model="smollm2-135m", site=["resid_post.15"], width=[512], k=[16], tokens=16384,
                      ctx_len=64, batch_size=512, shuffle_buffer=2048, warmup_steps=2, eval_tokens=1024,
                      ce_contexts=0, device="cpu", log_every=10)
    (folder,) = train(cfg)
    analyze(AnalyzeConfig(sae_dir=folder, tokens=8192, ctx_len=64, device="cpu", shard_contexts=32), progress=False)
    return folder


def local_throughput(args) -> dict:
    import tempfile

    from app import store
    from app.autointerp import queue
    from app.autointerp.backends import LocalBackend
    from app.autointerp.worker import Worker
    from app.db import make_engine, upgrade
    from app.models import SAE, Explanation, Feature, Job
    from trainer.publish import publish

    folder = smollm_sae()
    with tempfile.TemporaryDirectory(prefix="atlas-bench-") as tmp:
        engine = make_engine(f"sqlite:///{tmp}/atlas.db")
        upgrade(engine)
        store.forget_caches()
        publish(folder, "smol", engine=engine, progress=False)
        with Session(engine) as s, s.begin():
            sae = s.scalar(select(SAE).where(SAE.name == "smol"))
            # Sparse latents first: the ones a user would want explained (dense ones are often junk).
            picks = list(s.scalars(select(Feature.index).where(Feature.sae_id == sae.id, Feature.firing_count >= 20)
                                   .order_by(Feature.density, Feature.index).limit(args.local_jobs)))
            queue.enqueue_for_sae(s, "smol", indices=picks)
        backend = LocalBackend()
        t = time.perf_counter()
        backend.load()
        load_s = time.perf_counter() - t
        worker = Worker(backend, engine, concurrency=1, once=True)
        t = time.perf_counter()
        asyncio.run(worker.run())
        wall = time.perf_counter() - t
        with Session(engine) as s:
            counts = queue.counts(s)
            texts = [(f, e.text, e.detection_score, e.fuzzing_score) for e, f in s.execute(
                select(Explanation, Feature.index).join(Feature, Explanation.feature_id == Feature.id)
                .order_by(Feature.index))]
            errors = [j.error for j in s.scalars(select(Job).where(Job.error.is_not(None)))]
        engine.dispose()
    done = counts.get("done", 0)
    st = backend.stats
    return {"model": backend.model, "jobs": len(picks), "done": done, "status": counts, "errors": errors,
            "load_s": round(load_s, 1), "wall_s": round(wall, 1),
            "explanations_per_min": round(60 * done / wall, 2) if wall else None,
            "lm_requests": st.requests, "prompt_tokens": st.prompt_tokens, "completion_tokens": st.completion_tokens,
            "lm_seconds": round(st.seconds, 1), "examples": texts}


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=1000, help="jobs for the queue-overhead runs")
    ap.add_argument("--sqlite-workers", type=int, default=2)
    ap.add_argument("--pg-workers", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=4, help="jobs in flight per worker process")
    ap.add_argument("--local-jobs", type=int, default=5, help="features explained with the local model (0 skips)")
    args = ap.parse_args()
    command = "python benchmarks/autointerp.py " + shlex.join(sys.argv[1:])
    import torch

    results = {"command": command.strip(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "queue": queue_overhead(args)}
    if args.local_jobs:
        results["local"] = local_throughput(args)

    print()
    print(f"$ {results['command']}")
    print()
    print("Queue overhead (instant backend, worker processes)")
    print("| store | workers x concurrency | jobs | wall | jobs/s (wall) | busy span | jobs/s (busy) |")
    print("|---|---|---|---|---|---|---|")
    for r in results["queue"]:
        print(f"| {r['store']} | {r['workers']} x {r['concurrency']} | {r['jobs']:,} | {r['wall_s']:.1f} s | "
              f"{r['jobs_per_s_wall']:.0f} | {r['busy_s']:.1f} s | {r['jobs_per_s_busy']:.0f} |")
    if "local" in results:
        r = results["local"]
        print()
        print(f"Local model ({r['model']}, explains and judges, 1 worker)")
        print("| jobs | done | wall | explanations/min | LM requests | prompt tokens | completion tokens |")
        print("|---|---|---|---|---|---|---|")
        print(f"| {r['jobs']} | {r['done']} | {r['wall_s']:.1f} s | {r['explanations_per_min']} | {r['lm_requests']} | "
              f"{r['prompt_tokens']:,} | {r['completion_tokens']:,} |")
        for index, text, det, fuzz in r["examples"]:
            print(f"  latent {index}: {text!r} (detection {_fmt(det)}, fuzzing {_fmt(fuzz)})")
        for e in r["errors"]:
            print(f"  error: {e[:200]}")
    out = REPO / "benchmarks" / "results" / "autointerp.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nresults written to {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
