"""Summary of the demo's transcoder set and example graphs, as `make demo` built them.

    SAE_ATLAS_DATA_DIR=data python benchmarks/demo_transcoders.py

Reads what the build recorded (nothing is recomputed): the registered set's manifest
(DATA_DIR/transcoder_sets/smollm2-135m-transcoders, app.demo_transcoders), each block's held-out
FVU against mlp_out.L, L0 and dead fraction (trainer.train's evaluation on the held-out
documents), the whole set's spliced-in CE recovered with its 95% interval, and each example
graph's unpruned replacement and completeness scores, size and attribution time from the store.
Prints a table and writes benchmarks/results/demo_transcoders.json (or --out).

    python benchmarks/demo_transcoders.py --manifest RUN_FOLDER --compute-graphs --out results.json

--compute-graphs attributes the demo's example prompts on the given set directly
(trainer.circuits.compute.compute_graph with the demo's graph settings, one torch thread unless
--threads), for a set `train --site 'mlp.*'` made outside the demo, so that its unpruned scores
can be read beside the demo's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifest", type=Path, default=None,
                    help="a set's manifest or run folder (default: the registered demo set)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "demo_transcoders.json")
    ap.add_argument("--compute-graphs", action="store_true",
                    help="attribute the demo's prompts on the set now instead of reading stored graphs")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()


    from app.demo_transcoders import DEMO_PROMPTS, DEMO_SET, registered_manifest
    from trainer.transcoders import load_transcoder_set

    tset = load_transcoder_set(args.manifest or registered_manifest())
    blocks = []
    for layer, entry in sorted(tset.layers.items()):
        m = entry.metrics
        blocks.append({"layer": layer, "fvu": m.get("fvu"), "l0": m.get("l0"), "dead_frac": m.get("dead_frac"),
                       "train_tokens": m.get("train_tokens")})
        print(f"block {layer:2d}: FVU {m['fvu']:.3f}  L0 {m['l0']:5.1f}  dead {m['dead_frac']:.1%}")
    fvus = [b["fvu"] for b in blocks]
    summary = {"mean_fvu": statistics.fmean(fvus), "median_fvu": statistics.median(fvus), "max_fvu": max(fvus),
               "blocks_fvu_le_0.2": sum(f <= 0.2 for f in fvus), "mean_l0": statistics.fmean(b["l0"] for b in blocks),
               "mean_dead_frac": statistics.fmean(b["dead_frac"] for b in blocks)}
    s = tset.metrics
    print(f"\n{DEMO_SET}: {tset.n_layers} blocks, {tset.architecture} width {tset.d_sae} k {tset.k}, "
          f"skip {tset.skip_connection}; mean FVU {summary['mean_fvu']:.3f} (median {summary['median_fvu']:.3f}, "
          f"max {summary['max_fvu']:.3f}), mean L0 {summary['mean_l0']:.1f}, mean dead {summary['mean_dead_frac']:.1%}")
    if s:
        print(f"whole set spliced in: CE recovered {s['ce_recovered']:.3f} ± {s['ce_recovered_ci95'] or float('nan'):.3f}, "
              f"Δ loss {s['delta_lm_loss']:.3f} ± {s['delta_lm_loss_ci95'] or float('nan'):.3f} "
              f"(clean {s['ce_clean']:.3f}, zero-ablated {s['ce_zero_ablation']:.3f}, {s['ce_contexts']} contexts)")
    graphs = compute_graphs(tset, args.threads) if args.compute_graphs else stored(DEMO_PROMPTS)
    report = {"set": DEMO_SET if args.manifest is None else str(args.manifest), "n_layers": tset.n_layers,
              "architecture": tset.architecture, "d_sae": tset.d_sae,
              "k": tset.k, "skip_connection": tset.skip_connection, "blocks": blocks, "summary": summary,
              "set_metrics": s, "graphs": graphs, "command": " ".join(["python"] + sys.argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


def compute_graphs(tset, threads: int) -> list[dict]:
    """The demo's example graphs attributed on `tset` now, with the demo's graph settings."""
    import os
    import time

    import torch

    from app.demo_transcoders import DEMO_PROMPTS, DemoTranscoders
    from benchmarks.machine import cpu_model
    from trainer.circuits.compute import GraphConfig, compute_graph, replacement_for

    torch.set_num_threads(threads)
    cfg = GraphConfig(**DemoTranscoders().graph_config())
    model = replacement_for(tset, None, "float32")
    graphs = []
    for example in DEMO_PROMPTS:
        load, started = os.getloadavg()[0], time.time()
        r = compute_graph(model, example.prompt, "benchmark", cfg)
        graphs.append({"kind": example.kind, "prompt": example.prompt, "replacement": r.replacement,
                       "completeness": r.completeness, "nodes": len(r.data["nodes"]), "links": len(r.data["links"]),
                       "seconds": r.seconds, "wall_s": time.time() - started, "load_avg": load, "threads": threads,
                       "cpu": cpu_model(), "dtype": "float32"})
        print(f"{example.kind}: replacement {r.replacement:.3f} completeness {r.completeness:.3f}, "
              f"{len(r.data['nodes'])} nodes, {r.seconds:.1f} s (load {load:.1f})")
    return graphs


def stored(prompts) -> list[dict]:
    """The demo's example graphs as the build stored them."""
    from sqlalchemy import select

    from app.demo_transcoders import stored_graphs
    from store.db import session_scope
    from store.models import AttributionGraph

    slugs = stored_graphs()
    graphs = []
    with session_scope() as session:
        for example in prompts:
            slug = slugs.get(example.prompt)
            if slug is None:
                print(f"{example.kind}: no graph stored")
                continue
            row = session.scalar(select(AttributionGraph).where(AttributionGraph.slug == slug))
            graphs.append({"kind": example.kind, "prompt": example.prompt, "slug": slug,
                           "replacement": row.replacement_score, "completeness": row.completeness_score,
                           "nodes": row.n_nodes, "links": row.n_links, "seconds": row.seconds})
            print(f"{example.kind}: /graphs/{slug} replacement {row.replacement_score:.3f} completeness "
                  f"{row.completeness_score:.3f}, {row.n_nodes} nodes, {row.n_links} edges, {row.seconds:.1f} s")
    return graphs


if __name__ == "__main__":
    main()
