"""Benchmark: bulk-publish an analysed 16k-latent SAE (~70 examples per latent) into a fresh
SQLite file and a fresh database on a throwaway PostgreSQL server.

    python benchmarks/serve.py --build-only     # once: builds and analyses data/bench/sae-16k
    python benchmarks/publish.py [--sae-dir data/bench/sae-16k] [--repeats 3]

Each repeat publishes into a new, migrated, empty database; the table gives the median wall time
of trainer.publish.publish() (one transaction: PostgreSQL COPY, SQLite executemany), without the
interpretation step publish adds by default (timed by benchmarks/analyze.py).
Results go to benchmarks/results/publish.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("SAE_ATLAS_DATA_DIR", str(REPO / "data" / "bench"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sae-dir", type=Path, default=REPO / "data" / "bench" / "sae-16k")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if not (args.sae_dir / "analysis" / "DONE").is_file():
        ap.error(f"{args.sae_dir} is not an analysed SAE; run `python benchmarks/serve.py --build-only` first")

    from store.db import make_engine, upgrade
    from tests.helpers import PostgresServer
    from trainer.publish import publish

    pg = PostgresServer().start()
    results = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for store in ("sqlite", "postgresql"):
                times, examples = [], 0
                for r in range(args.repeats):
                    url = (f"sqlite:///{tmp}/publish-{r}.db" if store == "sqlite"
                           else pg.create_database("pub_" + uuid.uuid4().hex[:10]))
                    engine = make_engine(url)
                    upgrade(engine)
                    t = time.perf_counter()
                    publish(args.sae_dir, "bench-16k", engine=engine, progress=False, explain=False)
                    times.append(time.perf_counter() - t)
                    with engine.connect() as conn:
                        latents = conn.exec_driver_sql("SELECT count(*) FROM features").scalar()
                        examples = conn.exec_driver_sql("SELECT count(*) FROM examples").scalar()
                    engine.dispose()
                    print(f"{store} repeat {r + 1}: {times[-1]:.1f} s", flush=True)
                results[store] = {"median_s": statistics.median(times), "times_s": times, "latents": latents,
                                  "examples": examples, "examples_per_latent": examples / max(latents, 1)}
    finally:
        pg.stop()
    print("\n| store | latents | examples | per latent | publish (median) |\n|---|---:|---:|---:|---:|")
    for store, r in results.items():
        print(f"| {store} | {r['latents']:,} | {r['examples']:,} | {r['examples_per_latent']:.1f} | {r['median_s']:.1f} s |")
    out = REPO / "benchmarks" / "results" / "publish.json"
    out.write_text(json.dumps({"command": "python benchmarks/publish.py " + " ".join(argv or sys.argv[1:]),
                               "sae_dir": str(args.sae_dir), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
