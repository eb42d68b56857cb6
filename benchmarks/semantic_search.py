"""Benchmark: semantic and merged explanation search at 100k explanations (goal: p50 <= 50 ms on 2 cores).

    python benchmarks/semantic_search.py [--n 100000] [--queries 200] [--no-postgres]

A synthetic SAE (tests.synthetic_sae) gets `--n` explanations (random phrases from a word
list) with stored embeddings, in a SQLite file and in a throwaway PostgreSQL server. The stored
vectors are random unit vectors of the bundled model's width (384): the cost of exact search does
not depend on their values, and embedding 100k texts would take the benchmark an hour on 2 cores.
The query IS embedded with the real bundled model on every search (distinct queries, so the
query cache never hits). Measured through store.search.search, the function behind
GET /api/v1/search/explanations: the first search (cold: loads the SAE's matrix), then the
steady state (median and p95 over `--queries` searches) for semantic, keyword and merged modes,
and the two parts of a semantic search: embedding the query, and the search with its vector known.
Results go to benchmarks/results/semantic_search.json with the load average and CPU model.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("SAE_ATLAS_DATA_DIR", str(REPO / "data" / "bench"))

import numpy as np  # noqa: E402
from sqlalchemy import insert, select  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

WORDS = ("token bracket closing opening quote string number digit function call return value list dict key "
         "error file path name variable class method module import keyword comment newline space indent "
         "plural verb noun adjective after before start end python code documentation example argument").split()


def fill(engine, n: int, dim: int = 384, seed: int = 0) -> dict:
    """n latents with one explanation each and its stored vector; returns seconds per phase."""
    from tests.synthetic_sae import make_synthetic_sae
    from store.models import SAE, Explanation, Feature
    from store.vectors import write_embeddings

    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    make_synthetic_sae(engine, name="bench", n_features=n, examples_per_feature=1)
    t1 = time.perf_counter()
    t_vec = 0.0
    with Session(engine) as s, s.begin():
        sae = s.scalar(select(SAE).where(SAE.name == "bench"))
        fids = list(s.scalars(select(Feature.id).where(Feature.sae_id == sae.id).order_by(Feature.index)))
        for k in range(0, n, 10_000):
            chunk = fids[k:k + 10_000]
            rows = [{"feature_id": f, "text": " ".join(rng.choices(WORDS, k=6)), "method": "bench", "explainer": "bench",
                     "embedding_score": rng.random()} for f in chunk]
            ids = [i for (i,) in s.execute(insert(Explanation).returning(Explanation.id, sort_by_parameter_order=True),
                                           rows)]
            v = nrng.standard_normal((len(ids), dim)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            tv = time.perf_counter()
            write_embeddings(s, ids, [sae.id] * len(ids), v, "all-minilm-l6-v2")
            t_vec += time.perf_counter() - tv
    t2 = time.perf_counter()
    if engine.dialect.name == "postgresql":  # VACUUM refuses to run inside a transaction
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.exec_driver_sql("VACUUM ANALYZE explanation_embeddings")
            c.exec_driver_sql("VACUUM ANALYZE explanations")
    return {"latents_and_examples_s": round(t1 - t0, 1), "explanations_s": round(t2 - t1 - t_vec, 1),
            "vectors_s": round(t_vec, 1), "analyze_s": round(time.perf_counter() - t2, 1)}


def _stats(times: list[float]) -> dict:
    times = times[len(times) // 10:]  # steady state: drop the first 10 %
    return {"p50_ms": round(statistics.median(times), 2), "p95_ms": round(float(np.percentile(times, 95)), 2),
            "searches": len(times)}


def measure(engine, queries: list[str]) -> dict:
    """Latency of store.search.search: cold, then per mode over distinct queries (each embedded),
    the query embedding alone, and semantic search alone (the same queries again: their vectors cached)."""
    import store
    from store import search as search_store
    from trainer.interpret.embedder import get_embedder

    store.forget_caches()
    embedder = get_embedder()
    embedder.embed(["warm up the model"])
    out = {}
    with Session(engine) as s:
        t = time.perf_counter()
        search_store.search(s, "cold start query", "semantic", embedder=embedder)
        out["cold_first_search_ms"] = round(1000 * (time.perf_counter() - t), 1)
    times = []
    for i, q in enumerate(queries):
        t = time.perf_counter()
        embedder.embed([f"{q} embedding {i}"])
        times.append(1000 * (time.perf_counter() - t))
    out["query_embedding"] = _stats(times)
    for mode in ("semantic", "keyword", "merged"):
        times, cpu = [], []
        for i, q in enumerate(queries):
            with Session(engine) as s:
                t, c = time.perf_counter(), time.process_time()
                r = search_store.search(s, f"{q} {mode} {i}", mode, embedder=embedder)
                times.append(1000 * (time.perf_counter() - t))
                cpu.append(1000 * (time.process_time() - c))
        out[mode] = {**_stats(times), "cpu_p50_ms": round(statistics.median(cpu), 2), "last_total": r.total}
    times = []
    for i, q in enumerate(queries):  # the semantic queries again: embedded already, so this is the search
        with Session(engine) as s:
            t = time.perf_counter()
            search_store.search(s, f"{q} semantic {i}", "semantic", embedder=embedder)
            times.append(1000 * (time.perf_counter() - t))
    out["semantic_without_embedding"] = _stats(times)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--no-postgres", action="store_true")
    args = ap.parse_args()
    from store.db import make_engine, upgrade
    from tests.helpers import PostgresServer, find_pg_bindir

    rng = random.Random(1)
    queries = [" ".join(rng.choices(WORDS, k=3)) for _ in range(args.queries)]
    import torch

    result = {"command": "python benchmarks/semantic_search.py " + " ".join(sys.argv[1:]), "n": args.n,
              "loadavg_before": Path("/proc/loadavg").read_text().split()[:3],
              "cpu": next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                           if ln.startswith("model name")), "?"), "cpu_count": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "stores": {}}
    with tempfile.TemporaryDirectory(prefix="atlas-bench-") as tmp:
        engine = make_engine(f"sqlite:///{tmp}/atlas.db")
        upgrade(engine)
        t = time.perf_counter()
        phases = fill(engine, args.n)
        result["stores"]["SQLite"] = {"fill_s": round(time.perf_counter() - t, 1), "fill": phases,
                                      **measure(engine, queries)}
        print(json.dumps(result["stores"]["SQLite"]), flush=True)
        engine.dispose()
    if not args.no_postgres and find_pg_bindir() is not None:
        server = PostgresServer().start()
        try:
            engine = make_engine(server.create_database("bench"))
            upgrade(engine)
            t = time.perf_counter()
            phases = fill(engine, args.n)
            from store.vectors import has_pgvector

            with Session(engine) as s:
                pgv = has_pgvector(s)
            result["stores"]["PostgreSQL"] = {"fill_s": round(time.perf_counter() - t, 1), "fill": phases,
                                              "pgvector": pgv, **measure(engine, queries)}
            engine.dispose()
        finally:
            server.stop()
    result["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    print(json.dumps(result, indent=2))
    out = REPO / "benchmarks" / "results" / "semantic_search.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results written to {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
