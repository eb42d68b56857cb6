"""Benchmark: auto-interp queue overhead and local-model explanation throughput.

    python benchmarks/autointerp.py [--jobs 1000] [--sqlite-workers 2] [--pg-workers 4] [--local-jobs 5]

1. Queue overhead: a synthetic SAE (tests.synthetic_sae) gets `--jobs` explain jobs, drained
   by worker PROCESSES (`python -m app.autointerp.worker --backend instant --once`) on a SQLite file
   and on a throwaway PostgreSQL server. The instant backend (tests/benchmarks only) answers at
   once, so what is measured is everything else a job costs: claim, lease, loading examples,
   building prompts, storing the explanation and ~24 judgements, completing. Reported as jobs per
   second over the wall time (process start-up included) and over the busy span (first claim to
   last completion, from the jobs table).
2. Local model: a small SAE on the bundled SmolLM2-135M (trained once and cached under
   data/bench), `--local-jobs` features explained and scored by one worker with the local backend
   (the same model explains and judges): explanations per minute, plus LM requests and tokens.
3. --embedding-demo: the embedding scorer on every latent of the demo SAE (built by `make demo`,
   or --demo-sae FOLDER): token-pattern explanations vs the same explanations permuted across
   latents, mean AUROC of each, the paired difference and its Wilcoxon signed-rank p-value.
4. --judge-latents N: the local LM explains N demo-SAE latents, with and without the token
   statistics in its prompt; detection, fuzzing and embedding scores of each explanation and of a
   shuffled one (the next latent's explanation on this latent's held-out windows), paired.
   Wilcoxon signed-rank, not a paired t-test: balanced accuracies from 12 judgements move in steps
   of 1/12 and pile up at 0.5, far from normal.
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

import numpy as np  # noqa: E402
from sqlalchemy import func, select  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402


def drain(url: str, engine, n_jobs: int, n_workers: int, concurrency: int) -> dict:
    from app.autointerp import queue
    from tests.synthetic_sae import make_synthetic_sae
    from store.models import Job

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

    from store.db import make_engine, upgrade
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

    import store
    from app.autointerp import queue
    from app.autointerp.backends import LocalBackend
    from app.autointerp.worker import Worker
    from store.db import make_engine, upgrade
    from store.models import SAE, Explanation, Feature, Job
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


# --- explanations vs shuffled explanations, per scorer (the demo SAE) ----------------------------

def demo_sae_dir() -> Path:
    """The demo's main SAE (layer 15, the widest), where `make demo` builds it under DATA_DIR."""
    from app.demo import DEMO_LAYERS, DEMO_WIDTHS, demo_folders

    return demo_folders()[max(DEMO_LAYERS), max(DEMO_WIDTHS)]


# the done-when searches: a query, and which latents it should find (their main peak token, >= half
# of their top examples); the explanations never contain the query's words except "just" itself
SEARCH_CHECKS = {
    "closing bracket": lambda tok: tok.strip() in (")", "]", "}", "),", ");", "))", ")."),
    "the word just": lambda tok: tok.strip() == "just",
}


def embedding_vs_shuffled(folder: Path) -> dict:
    """The publish-time embedding scorer on every latent of an analysed SAE: token-pattern
    explanations vs the same explanations permuted across latents (paired Wilcoxon), its time,
    and the done-when semantic searches over the explanations it embedded."""
    from trainer.interpret import at_publish, token_pattern
    from trainer.interpret.embedder import get_embedder
    from trainer.publish import Analysis

    a = Analysis.load(folder)
    embedder = get_embedder()
    embedder.embed(["load the model before the clock starts"])
    load = Path("/proc/loadavg").read_text().split()[:3]
    t, c = time.perf_counter(), time.process_time()
    interp = at_publish.prepare(a.examples, a.features, a.vocab, embedder, progress=True)
    out = dict(interp.summary)
    out["wall_s"] = round(time.perf_counter() - t, 1)
    out["cpu_s"] = round(time.process_time() - c, 1)
    out["loadavg_before"], out["loadavg_after"] = load, Path("/proc/loadavg").read_text().split()[:3]
    out["latents_per_s"] = round(out["latents"] / out["wall_s"], 1)
    out["search"] = search_check(interp, token_pattern.stats_from_analysis(a.examples, a.features), a.vocab,
                                 embedder)
    return out


def search_check(interp, stats, vocab, embedder) -> dict:
    """Rank the explanations by cosine similarity to each SEARCH_CHECKS query (semantic search's
    ranking) and report where the first latent that should match lands, with the top hits."""
    from store.search import DEFAULT_MIN_SIMILARITY
    from store.vectors import document_text

    explained = [i for i, t in enumerate(interp.texts) if t]
    out = {}
    for q, matches in SEARCH_CHECKS.items():
        target = {i for i in explained if stats[i].peak and stats[i].peak[0][1] >= 0.5
                  and matches(vocab[stats[i].peak[0][0]])}
        sims = interp.vectors @ embedder.embed([document_text(q)])[0]
        order = np.argsort(-sims, kind="stable")
        ranked = [explained[k] for k in order]
        first = next((r for r, i in enumerate(ranked, 1) if i in target), None)
        out[q] = {"latents_that_match": len(target), "first_match_rank": first,
                  "first_match_similarity": round(float(sims[order[first - 1]]), 3) if first else None,
                  "above_cut_off": int((sims >= DEFAULT_MIN_SIMILARITY).sum()),
                  "top": [(explained[k], interp.texts[explained[k]], round(float(sims[k]), 3)) for k in order[:5]]}
    return out


async def _judge_latent(backend, engine, feature_id: int, sae_id: int, cfg, other_text: str | None):
    from app.autointerp.explain import JobRef, embedding_score, load_feature_data
    from app.autointerp.prompts import clean_explanation, explain_messages
    from app.autointerp.scoring import detection, fuzzing

    data = await asyncio.to_thread(load_feature_data, engine, JobRef(0, feature_id, sae_id, 1, 1), cfg)
    raw = await backend.complete(explain_messages(data.split.explain, cfg, data.max_act, data.statistics),
                                 cfg.explain_max_tokens, "explain")
    try:
        text = clean_explanation(raw, cfg)
    except Exception:  # an unusable answer: scored as the raw text, which is what a user would see fail
        text = (raw or "").strip()[:200] or "nothing"
    seed = cfg.seed * 1_000_003 + feature_id
    pos, neg = data.split.held_out, data.negatives
    out = {"feature_id": feature_id, "text": text}
    for label, expl in (("true", text), ("shuffled", other_text)):
        if expl is None:
            continue
        det = await detection(backend, expl, pos, neg, cfg, seed)
        fuzz = await fuzzing(backend, expl, pos, neg, cfg, seed)
        emb = await asyncio.to_thread(embedding_score, expl, pos, neg, None)
        out[label] = {"detection": det.balanced_accuracy, "fuzzing": fuzz.balanced_accuracy,
                      "embedding": emb.auroc if emb else None, "detection_uninformative": det.uninformative,
                      "fuzzing_uninformative": fuzz.uninformative}
    return out


def lm_scorers_vs_shuffled(folder: Path, n: int, seed: int = 0) -> dict:
    """The local LM explains n latents of the demo SAE (with and without the token statistics in
    its prompt); detection, fuzzing and embedding scores of each explanation and of a shuffled one
    (another latent's explanation on this latent's windows), paired tests per scorer."""
    import tempfile
    from dataclasses import replace

    import store
    from app.autointerp.backends import LocalBackend
    from app.autointerp.prompts import PromptConfig
    from store.db import make_engine, upgrade
    from store.models import SAE, Feature
    from trainer.interpret.embedding_scorer import paired_comparison
    from trainer.publish import publish

    backend = LocalBackend()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="atlas-bench-") as tmp:
        engine = make_engine(f"sqlite:///{tmp}/atlas.db")
        upgrade(engine)
        store.forget_caches()
        publish(folder, "demo", engine=engine, progress=False, explain=False)
        with Session(engine) as s:
            sae = s.scalar(select(SAE).where(SAE.name == "demo"))
            # latents with enough examples, spread over the density range, seeded
            cands = list(s.scalars(select(Feature.id).where(Feature.sae_id == sae.id, Feature.firing_count >= 40,
                                                            Feature.density < 0.05).order_by(Feature.index)))
            import random

            picks = random.Random(seed).sample(cands, min(n, len(cands)))
            sae_id = sae.id
        base = PromptConfig.for_backend("local")
        for variant, cfg in (("with_statistics", base), ("without_statistics", replace(base, show_statistics=False))):
            first = [asyncio.run(_judge_latent(backend, engine, f, sae_id, cfg, None)) for f in picks]
            texts = [r["text"] for r in first]
            perm = list(range(1, len(picks))) + [0]  # each latent judged with the next one's explanation
            judged = [asyncio.run(_judge_latent(backend, engine, f, sae_id, cfg, texts[perm[k]]))
                      for k, f in enumerate(picks)]
            per_scorer = {}
            for scorer in ("detection", "fuzzing", "embedding"):
                t = [r["true"][scorer] for r in judged]
                sh = [r["shuffled"][scorer] for r in judged]
                per_scorer[scorer] = paired_comparison(np.array(t, float), np.array(sh, float))
            per_scorer["uninformative_share"] = {
                k: float(np.mean([r["true"][f"{k}_uninformative"] for r in judged])) for k in ("detection", "fuzzing")}
            rows[variant] = {"latents": len(picks), "scorers": per_scorer,
                             "examples": [(r["feature_id"], r["text"]) for r in judged[:8]]}
        engine.dispose()
    w, wo = rows["with_statistics"]["scorers"], rows["without_statistics"]["scorers"]
    rows["statistics_effect"] = {k: {"with": w[k]["true_mean"], "without": wo[k]["true_mean"]}
                                 for k in ("detection", "fuzzing", "embedding")}
    return rows


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=1000, help="jobs for the queue-overhead runs")
    ap.add_argument("--sqlite-workers", type=int, default=2)
    ap.add_argument("--pg-workers", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=4, help="jobs in flight per worker process")
    ap.add_argument("--local-jobs", type=int, default=5, help="features explained with the local model (0 skips)")
    ap.add_argument("--embedding-demo", action="store_true",
                    help="embedding scorer: token-pattern vs shuffled explanations on every latent of the demo SAE")
    ap.add_argument("--judge-latents", type=int, default=0,
                    help="demo-SAE latents explained by the local LM and scored (detection, fuzzing, embedding) "
                         "against shuffled explanations, with and without token statistics in the prompt")
    ap.add_argument("--demo-sae", type=Path, default=None, help="the demo SAE folder (default: DATA_DIR/demo/...)")
    args = ap.parse_args()
    command = "python benchmarks/autointerp.py " + shlex.join(sys.argv[1:])
    import torch

    results = {"command": command.strip(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "loadavg": Path("/proc/loadavg").read_text().split()[:3],
               "queue": queue_overhead(args) if args.jobs else []}
    if args.local_jobs:
        results["local"] = local_throughput(args)
    folder = args.demo_sae or demo_sae_dir()
    if args.embedding_demo:
        results["embedding_vs_shuffled"] = embedding_vs_shuffled(folder)
        print(json.dumps(results["embedding_vs_shuffled"], indent=2))
    if args.judge_latents:
        results["lm_scorers_vs_shuffled"] = lm_scorers_vs_shuffled(folder, args.judge_latents)
        print(json.dumps(results["lm_scorers_vs_shuffled"], indent=2, default=str))

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
