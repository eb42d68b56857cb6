"""Experiment: tune the embedding scorer's window length, query wording and the token-pattern
explanations' peak-token count on one set of latents, and report the chosen setting on another.

    SAE_ATLAS_DATA_DIR=... python benchmarks/embedding_queries.py --tune TUNE_SAE --report REPORT_SAE
    ... --tune SAE                 # one SAE: tune on its even latents, report on its odd ones
    ... --windows 32,16,8,6,4      # window lengths to compare (tokens; the default is windows.WINDOW)
    ... --peak-tokens 3:0.1,5:0.05 # token-pattern-v2 (3 peak tokens down to 10 %) and v3 (5, down to 5 %)

An SAE is an analysed SAE folder or a demo SAE's published name (smollm2-135m-resid14-topk).
A setting is a (window length, query wording, peak tokens) triple. For each, the windows are chosen
and embedded once per SAE exactly as at publish (trainer.interpret.windows.select, N_POS / N_NEG);
every latent is scored with its own explanation and with another latent's of the same set (the
shuffled baseline), and the paired difference is tested (embedding_scorer.paired_comparison). The
setting with the largest true-minus-shuffled AUROC on the tuning set is chosen there alone; the
report set's number for that setting is the one to quote (its own best is printed too, to show how
much picking on the reported data would have flattered it). Writes
benchmarks/results/embedding_queries.json.
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

SPLIT_SEED = 0  # which latents are "even" and "odd" when one SAE is split in two


def sae_folder(arg: str) -> Path:
    """A folder as given, or a demo SAE's published name."""
    from app.demo import demo_folders, demo_names

    if Path(arg).is_dir():
        return Path(arg)
    folders = demo_folders()
    for key, name in demo_names().items():
        if name == arg:
            return folders[key]
    raise SystemExit(f"{arg}: neither an analysed SAE folder nor a demo SAE name ({', '.join(demo_names().values())})")


def query_forms() -> dict:
    from store.vectors import plain
    from trainer.interpret import embedding_scorer as es
    from trainer.interpret import token_pattern as tp

    return {
        "delphi prefix + whole explanation": lambda t: es.DELPHI_QUERY_PREFIX + plain(t),
        "whole explanation, chips as quotes": lambda t: plain(t),
        "input side, chips as quotes": lambda t: plain(t.split(tp.PROMOTES)[0]),
        "input side, bare tokens (query_text)": lambda t: es.query_text(t, prefix=""),
    }


def explanations(a, peak_tokens: int, min_share: float) -> list[str | None]:
    from trainer.interpret import token_pattern as tp

    saved = tp.MAX_PEAK_TOKENS, tp.MIN_PEAK_SHARE
    tp.MAX_PEAK_TOKENS, tp.MIN_PEAK_SHARE = peak_tokens, min_share
    try:
        vocab = a.vocab
        return [tp.describe(st, lambda t: vocab[t] if 0 <= t < len(vocab) else f"<{t}>")
                for st in tp.stats_from_analysis(a.examples, a.features)]
    finally:
        tp.MAX_PEAK_TOKENS, tp.MIN_PEAK_SHARE = saved


_vectors: dict[str, np.ndarray] = {}  # by text: the SAEs of one corpus share most windows


def embed(embedder, texts: list[str], label: str) -> tuple[np.ndarray, int]:
    """Vectors of texts, each text embedded once in this run; returns (vectors, texts embedded now)."""
    from trainer.interpret.at_publish import embed_all

    todo = list(dict.fromkeys(t for t in texts if t not in _vectors))
    if todo:
        _vectors.update(zip(todo, embed_all(embedder, todo, True, label)))
    return np.stack([_vectors[t] for t in texts]), len(todo)


def score_sets(a, embedder, lengths: list[int], peaks: list[tuple[int, float]], sets: dict[str, list[int]],
               label: str) -> dict[tuple, dict[str, dict]]:
    """{(window, query, peak tokens): {set name: paired comparison}} for the latents of each set."""
    from trainer.interpret import embedding_scorer as es
    from trainer.interpret import windows

    forms = query_forms()
    n = len(a.features["count"])
    queries = {}
    for k, share in peaks:
        texts = explanations(a, k, share)
        explained = [i for i, t in enumerate(texts) if t]
        for name, write in forms.items():
            v, _ = embed(embedder, [write(texts[i]) for i in explained], "queries")
            q = np.zeros((n, v.shape[1]), np.float32)
            q[explained] = v
            queries[name, k] = (q, set(explained))
    out: dict[tuple, dict[str, dict]] = {}
    for length in lengths:
        started = time.time()
        w = windows.select(a.examples, a.features, a.vocab, seed=0, window=length)
        vectors, embedded = embed(embedder, w.texts, f"{label}: {length}-token windows")
        print(f"{label}: {len(w.texts)} windows of {length} tokens ({embedded} embedded now) in "
              f"{time.time() - started:.0f} s", flush=True)
        for (name, k), (q, explained) in queries.items():
            auroc = es.score_latents(q, vectors, w.pos, w.neg, range(n))
            row = {}
            for set_name, members in sets.items():
                scored = [i for i in members if i in explained and np.isfinite(auroc[i])]
                shuffled = es.shuffled_scores(q, vectors, w.pos, w.neg, scored, 0)
                row[set_name] = es.paired_comparison(auroc[scored], shuffled)
            out[length, name, k] = row
    return out


def main() -> None:
    from trainer.interpret import token_pattern, windows
    from trainer.interpret.embedder import get_embedder
    from trainer.publish import Analysis

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tune", required=True, help="the SAE the setting is chosen on (folder or demo name)")
    ap.add_argument("--report", help="the SAE it is reported on; without it, --tune's odd latents")
    ap.add_argument("--windows", default=str(windows.WINDOW), help="comma-separated window lengths in tokens")
    ap.add_argument("--peak-tokens", default=f"{token_pattern.MAX_PEAK_TOKENS}:{token_pattern.MIN_PEAK_SHARE}",
                    help="comma-separated PEAK_TOKENS:MIN_SHARE settings of the token-pattern explanations")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "embedding_queries.json"))
    args = ap.parse_args()
    try:
        lengths = [int(x) for x in args.windows.split(",")]
        peaks = [(int(k), float(s)) for k, s in (x.split(":") for x in args.peak_tokens.split(","))]
    except ValueError:
        ap.error("--windows takes integers (32,8,6), --peak-tokens PEAK:SHARE pairs (3:0.1,5:0.05)")
    if min(lengths) < 1 or not all(1 <= k <= 8 and 0 <= s <= 1 for k, s in peaks):
        ap.error("window lengths must be >= 1, peak tokens in 1..8 and shares in [0, 1]")

    embedder = get_embedder()
    tune_dir = sae_folder(args.tune)
    a = Analysis.load(tune_dir)
    n = len(a.features["count"])
    if args.report:
        report_dir = sae_folder(args.report)
        tuned = score_sets(a, embedder, lengths, peaks, {"tune": list(range(n))}, tune_dir.name)
        b = Analysis.load(report_dir)
        reported = score_sets(b, embedder, lengths, peaks, {"report": list(range(len(b.features["count"])))},
                              report_dir.name)
        results = {key: {**tuned[key], **reported[key]} for key in tuned}
        protocol = f"tuned on {tune_dir.name}, reported on {report_dir.name}"
    else:
        order = np.random.default_rng(SPLIT_SEED).permutation(n)
        halves = {"tune": sorted(order[0::2].tolist()), "report": sorted(order[1::2].tolist())}
        results = score_sets(a, embedder, lengths, peaks, halves, tune_dir.name)
        protocol = f"{tune_dir.name}: tuned on half its latents, reported on the other half (seed {SPLIT_SEED})"

    def gap(key, which):
        return results[key][which]["diff_mean"] if results[key][which]["diff_mean"] is not None else -np.inf

    rows = []
    for key, r in results.items():
        rows.append({"window": key[0], "query": key[1], "peak_tokens": key[2], **{s: r[s] for s in ("tune", "report")}})
        print(f"window {key[0]:3d}  peak {key[2]}  {key[1]:38s}  tune: diff {r['tune']['diff_mean']}  "
              f"report: true {r['report']['true_mean']} shuffled {r['report']['shuffled_mean']} diff "
              f"{r['report']['diff_mean']} (p={r['report']['p_value']})", flush=True)
    chosen = max(results, key=lambda k: gap(k, "tune"))
    best_report = max(results, key=lambda k: gap(k, "report"))
    current = (windows.WINDOW, "input side, bare tokens (query_text)", token_pattern.MAX_PEAK_TOKENS)
    summary = {
        "protocol": protocol,
        "chosen_on_tune": {"window": chosen[0], "query": chosen[1], "peak_tokens": chosen[2],
                           "tune": results[chosen]["tune"], "report": results[chosen]["report"]},
        "best_on_report_itself": {"window": best_report[0], "query": best_report[1], "peak_tokens": best_report[2],
                                  "report": results[best_report]["report"]},
        "current_defaults": {"window": current[0], "query": current[1], "peak_tokens": current[2],
                             "report": results[current]["report"]} if current in results else None,
    }
    print(json.dumps(summary, indent=2))
    out = {"command": "python benchmarks/embedding_queries.py " + " ".join(sys.argv[1:]), "model": embedder.name,
           "n_pos": windows.N_POS, "n_neg": windows.N_NEG, **summary, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
