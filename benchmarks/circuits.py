"""Attribution-graph speed: one prompt's graph on a model with one transcoder per block.

    python benchmarks/circuits.py --model smollm2-135m --random 4608 64 --tokens 32 --threads 2
    python benchmarks/circuits.py --model smollm2-135m --transcoders DIR   # DIR/<anything>/ per layer

--random W K: random TopK transcoders of width W keeping K latents per token (timing only: the
graph's content means nothing, but its size, K active features per layer and position, is that of
a trained set at L0 = K). --transcoders: a set's run folder (its transcoder_set.json), or a folder of transcoder folders
(trainer.formats.load_sae), one reading each mlp_in.L. The prompt is cut or repeated to --tokens tokens (BOS not counted).
--layers N keeps the first N blocks (the same width, a shallower model) for quick timings.
Runs the graph --repeat times and reports each (the last is the steady state), with pruning and
the scores, the CPU model, threads and dtype. Writes benchmarks/results/circuits.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPT = ("def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
          "print(fibonacci(10))  # the tenth Fibonacci number is")


def random_set(lm, width: int, k: int, seed: int = 0):
    import torch

    from trainer.circuits.transcoders import Transcoder
    from trainer.sae import SAEConfig, build_sae

    g = torch.Generator().manual_seed(seed)
    out = []
    for layer in range(lm.n_layers):
        sae = build_sae(SAEConfig(d_in=lm.d_model, d_sae=width, architecture="topk", k=k))
        with torch.no_grad():
            sae.W_enc.copy_(torch.randn(width, lm.d_model, generator=g) / lm.d_model ** 0.5)
            sae.W_dec.copy_(torch.randn(width, lm.d_model, generator=g) * 0.05)
            sae.b_enc.fill_(2.0)  # every one of the top k positive: K active features per token
        out.append(Transcoder(sae, f"mlp_in.{layer}", f"mlp_out.{layer}"))
    return out


def loaded_set(folder: Path) -> dict:
    """block -> transcoder: a set's manifest (transcoder_set*.json) when the folder has one, else
    every sub-folder keyed by the block of the site it reads."""
    from trainer.formats import load_sae
    from trainer.sources import parse_site
    from trainer.transcoders import load_transcoder_set

    if any(folder.glob("transcoder_set*.json")):
        return load_transcoder_set(folder).load_all()
    loaded = [load_sae(p) for p in sorted(folder.iterdir()) if p.is_dir()]
    return {parse_site(t.site).layer: t for t in loaded}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--random", nargs=2, type=int, metavar=("WIDTH", "K"))
    ap.add_argument("--transcoders", type=Path)
    ap.add_argument("--layers", type=int, default=None,
                    help="keep only the first N blocks of the model (timing a shallower copy of the same width)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=512, help="re-ranking step (circuit-tracer's batch_size)")
    ap.add_argument("--backward-batch", type=int, default=64)
    ap.add_argument("--max-feature-nodes", type=int, default=7500)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "circuits.json")
    args = ap.parse_args()
    if (args.random is None) == (args.transcoders is None):
        ap.error("give one of --random WIDTH K and --transcoders DIR")

    import torch

    from benchmarks.machine import cpu_model
    from trainer.circuits.attribute import AttributionConfig, attribute
    from trainer.circuits.prune import graph_scores, prune
    from trainer.circuits.replacement import ReplacementModel
    from trainer.lm import load_lm

    torch.set_num_threads(args.threads)
    lm = load_lm(args.model, "cpu", args.dtype)
    if args.layers is not None:
        del lm.blocks[args.layers:]
        lm.model.config.num_hidden_layers = args.layers
    tcs = random_set(lm, *args.random) if args.random else loaded_set(args.transcoders)
    rm = ReplacementModel(lm, tcs)
    ids = lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    ids = (ids * (args.tokens // len(ids) + 1))[:args.tokens]
    cfg = AttributionConfig(batch_size=args.batch_size, backward_batch=args.backward_batch,
                            max_feature_nodes=args.max_feature_nodes)
    runs = []
    load_before = os.getloadavg()
    for _ in range(args.repeat):
        graph = attribute(ids, rm, cfg)
        t = time.perf_counter()
        pruned = prune(graph)
        t_prune = time.perf_counter() - t
        t = time.perf_counter()
        scores = graph_scores(graph)
        t_scores = time.perf_counter() - t
        runs.append({"attribute_s": round(graph.seconds, 2), "prune_s": round(t_prune, 2), "scores_s": round(t_scores, 2),
                     "active_features": len(graph.active_features), "feature_nodes": graph.n_features,
                     "nodes": graph.n_nodes, "kept_nodes": int(pruned.node_mask.sum()),
                     "replacement": round(scores[0], 4), "completeness": round(scores[1], 4)})
        print(json.dumps(runs[-1]), flush=True)
    report = {"model": args.model, "layers": lm.n_layers, "transcoders": str(args.transcoders) if args.transcoders else f"random topk {args.random}",
              "tokens": args.tokens, "threads": args.threads, "dtype": args.dtype, "cpu": cpu_model(),
              "torch": torch.__version__, "batch_size": args.batch_size, "backward_batch": args.backward_batch, "max_feature_nodes": args.max_feature_nodes,
              "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in os.getloadavg()],
              "runs": runs, "command": " ".join(["python"] + sys.argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
