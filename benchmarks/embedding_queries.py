"""Experiment: how the embedding scorer's window length and query wording change how well it separates
a latent's activating windows from its non-activating ones, on an analysed SAE's token-pattern explanations.

    SAE_ATLAS_DATA_DIR=... python benchmarks/embedding_queries.py [SAE_FOLDER]            # default: the demo's main SAE
    ... --windows 32,16,8,6,4      # window lengths to compare (tokens; the default is windows.WINDOW)
    ... --peak-tokens 3 --min-peak-share 0.1                         # explanations worded as token-pattern-v2

For each window length, the windows are chosen and embedded once, exactly as at publish
(trainer.interpret.windows, at_publish.N_POS / N_NEG); then, for each way of writing the query,
every latent is scored with its own explanation and with another latent's (the shuffled baseline),
and the paired difference is tested (embedding_scorer.paired_comparison). Prints one line per
(window, query) and writes benchmarks/results/embedding_queries.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    from benchmarks.autointerp import demo_sae_dir
    from trainer.interpret import embedding_scorer as es
    from trainer.interpret import token_pattern, windows
    from trainer.interpret.at_publish import N_NEG, N_POS, embed_all
    from trainer.interpret.embedder import get_embedder
    from trainer.publish import Analysis

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", help="an analysed SAE folder (default: the demo's main SAE)")
    ap.add_argument("--windows", default=str(windows.WINDOW), help="comma-separated window lengths in tokens")
    ap.add_argument("--peak-tokens", type=int, default=token_pattern.MAX_PEAK_TOKENS)
    ap.add_argument("--min-peak-share", type=float, default=token_pattern.MIN_PEAK_SHARE)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "embedding_queries.json"))
    args = ap.parse_args()
    try:
        lengths = [int(x) for x in args.windows.split(",")]
    except ValueError:
        ap.error("--windows takes comma-separated integers, e.g. 32,8,6")
    if not lengths or min(lengths) < 1 or not 1 <= args.peak_tokens <= 8 or not 0 <= args.min_peak_share <= 1:
        ap.error("window lengths must be >= 1, --peak-tokens in 1..8 and --min-peak-share in [0, 1]")
    token_pattern.MAX_PEAK_TOKENS, token_pattern.MIN_PEAK_SHARE = args.peak_tokens, args.min_peak_share

    folder = Path(args.folder) if args.folder else demo_sae_dir()
    a = Analysis.load(folder)
    embedder = get_embedder()
    vocab = a.vocab
    stats = token_pattern.stats_from_analysis(a.examples, a.features)
    texts = [token_pattern.describe(st, lambda t: vocab[t] if 0 <= t < len(vocab) else f"<{t}>") for st in stats]
    analysis = (a.summary or {}).get("analysis") or {}
    explained = [i for i, t in enumerate(texts) if t]
    n = len(texts)

    variants = {
        "delphi prefix + whole explanation": lambda t: es.DELPHI_QUERY_PREFIX + token_pattern.plain(t),
        "whole explanation, chips as quotes": lambda t: token_pattern.plain(t),
        "input side, chips as quotes": lambda t: token_pattern.plain(t.split(token_pattern.PROMOTES)[0]),
        "input side, bare tokens (query_text)": lambda t: es.query_text(t, prefix=""),
    }
    queries = {}
    for name, write in variants.items():
        v = embed_all(embedder, [write(texts[i]) for i in explained], False, "queries")
        q = np.zeros((n, v.shape[1]), np.float32)
        q[explained] = v
        queries[name] = q

    rows = []
    for length in lengths:
        w = windows.select(a.examples, a.features, vocab, n_pos=N_POS, n_neg=N_NEG, seed=0, window=length,
                           ctx_len=analysis.get("ctx_len"), exclude_bos=bool(analysis.get("exclude_bos", True)))
        started = time.time()
        vectors = embed_all(embedder, w.texts, True, f"{length}-token windows")
        seconds = time.time() - started
        print(f"{folder.name}: {len(w.texts)} windows of {length} tokens embedded in {seconds:.0f} s", flush=True)
        for name, q in queries.items():
            auroc = np.full(n, np.nan)
            auroc[explained] = es.score_latents(q, vectors, w.pos, w.neg, explained)
            scored = [i for i in explained if np.isfinite(auroc[i])]
            r = es.paired_comparison(auroc[scored], es.shuffled_scores(q, vectors, w.pos, w.neg, scored, 0))
            rows.append({"window": length, "query": name, "windows_embedded": len(w.texts),
                         "embed_s": round(seconds, 1), **r})
            print(f"window {length:3d}  {name:38s} n={r['n']}  true {r['true_mean']:.4f}  shuffled "
                  f"{r['shuffled_mean']:.4f}  diff {r['diff_mean']:.4f}  p={r['p_value']:.1e}", flush=True)
    out = {"command": "python benchmarks/embedding_queries.py " + " ".join(sys.argv[1:]), "sae": folder.name,
           "model": embedder.name, "explanations": token_pattern.METHOD, "peak_tokens": args.peak_tokens,
           "min_peak_share": args.min_peak_share, "n_pos": N_POS, "n_neg": N_NEG, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
