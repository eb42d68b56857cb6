"""Benchmark: dashboard analysis of a TRAINED SAE against the bare LM forward + SAE encode, and bulk publish.

    python benchmarks/analyze.py                       # the full benchmark (see below; self-contained)
    python benchmarks/analyze.py --quick               # a smoke run: small SAE, 20k tokens, no PostgreSQL

On the bundled SmolLM2-135M (resid_post.15, pydoc corpus):
0. trains a TopK SAE (k=32, `--width` latents, default 16,384) on `--train-tokens` tokens of the
   training split with the library defaults (`sae-atlas train`'s code, activation cache on), unless
   it is already in DATA_DIR/bench. A trained SAE, not a random one: a random SAE's latents all fire
   about equally often, while a trained one has the rare latents and the dense ones whose examples,
   histograms and intervals the analysis must handle; that is the load users put on it;
1. the bare pass: the LM forward over the analysed contexts plus SAE encode, nothing else;
2. the full analysis (`trainer.analyze`, every latent at once), run alternately with (1);
   reported as medians and the ratio analysis / bare (goal <= 1.3), with peak memory, and the
   examples stored per latent (mean and the share of latents with at least 70; goal: mean >= 70);
3. publishing the analysed SAE into a fresh SQLite file and into a throwaway PostgreSQL server
   (goal <= 60 s for PostgreSQL), without the interpretation step, which is timed on its own:
4. what publish adds by default: token-pattern explanations for every latent, scored with the
   embedding scorer (goal <= 60 s for 16k latents).
Defaults analyse the whole corpus (--tokens 1M; the pydoc corpus has ~570k tokens) with 2 repeats.
Results go to benchmarks/results/analyze.json with the load average and the CPU model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.machine import cpu_model  # noqa: E402
os.environ.setdefault("SAE_ATLAS_DATA_DIR", str(REPO / "data" / "bench"))
os.environ.setdefault("SAE_ATLAS_MODEL_CACHE_DIR", str(REPO / "data" / "models"))

import numpy as np  # noqa: E402
import torch  # noqa: E402


class PeakRSS:
    """Samples this process's resident memory every 50 ms (VmRSS), keeping the peak."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def current() -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def __enter__(self):
        self.peak = self.current()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.current())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def bare_pass(analyzer) -> tuple[float, int]:
    """LM forward + mask + SAE encode over exactly the contexts the analysis reads."""
    from trainer.activations import valid_token_mask

    c = analyzer.cfg
    batches, _ = analyzer._contexts()
    start = time.perf_counter()
    n = 0
    with torch.no_grad():
        for batch in batches:
            acts = analyzer.lm.read(batch.tokens, [analyzer.site])[analyzer.site.name]
            mask = valid_token_mask(acts, c.sink_norm_ratio, c.exclude_bos)
            codes = analyzer.sae.encode(acts[mask].float())
            n += int(mask.sum())
            del codes
    return time.perf_counter() - start, n


def trained_sae(bench: Path, width: int, k: int, train_tokens: int, lm) -> Path:
    """A TopK SAE trained with the library defaults (cached in `bench`)."""
    from trainer.train import TrainConfig, train

    sae_dir = bench / f"trained-topk-w{width}-k{k}-t{train_tokens}"
    if (sae_dir / "cfg.json").is_file() and (sae_dir / "metrics.json").is_file():
        return sae_dir
    print(f"training a TopK SAE ({width} latents, k={k}) on {train_tokens:,} tokens ...", flush=True)
    train(TrainConfig(out=sae_dir, model="smollm2-135m", site=["resid_post.15"], arch=["topk"], width=[width], k=[k],
                      tokens=train_tokens, cache_activations=True, ce_contexts=0, overwrite=True, checkpoint_every=0),
          lm=lm)
    return sae_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1_000_000, help="tokens to analyse (default 1M: the whole corpus)")
    ap.add_argument("--width", type=int, default=16_384)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--train-tokens", type=int, default=2_000_000, help="tokens the SAE is trained on")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-postgres", action="store_true")
    ap.add_argument("--skip-interpretation", action="store_true", help="do not time token-pattern explanations + embedding scores")
    ap.add_argument("--quick", action="store_true", help="width 1024, 60k training tokens, 20k analysed, 1 repeat, no PostgreSQL")
    args = ap.parse_args()
    if args.quick:
        args.width, args.train_tokens, args.tokens, args.repeats, args.skip_postgres = 1024, 60_000, 20_000, 1, True

    from store.db import make_engine, upgrade
    from trainer.analyze import AnalyzeConfig, Analyzer
    from trainer.formats import load_sae
    from trainer.lm import load_lm
    from trainer.publish import Analysis, publish

    bench = Path(os.environ["SAE_ATLAS_DATA_DIR"])
    load_before = os.getloadavg()
    lm = load_lm("smollm2-135m")
    sae_dir = trained_sae(bench, args.width, args.k, args.train_tokens, lm)
    loaded = load_sae(sae_dir)
    print(f"LM {lm.name} ({lm.dtype}), SAE {args.width} latents k={args.k}, {args.tokens:,} tokens, "
          f"torch threads {torch.get_num_threads()}", flush=True)

    def config():
        return AnalyzeConfig(sae_dir=sae_dir, tokens=args.tokens, split="all", restart=True)

    bare_times, analysis_times, peaks = [], [], []
    n_tokens = 0
    for r in range(args.repeats):
        t, n_tokens = bare_pass(Analyzer(config(), lm=lm, loaded=loaded))
        bare_times.append(t)
        with PeakRSS() as mem:
            start = time.perf_counter()
            Analyzer(config(), lm=lm, loaded=loaded).run(progress=False)
            analysis_times.append(time.perf_counter() - start)
        peaks.append(mem.peak)
        print(f"  repeat {r + 1}: bare {bare_times[-1]:.1f} s, analysis {analysis_times[-1]:.1f} s, "
              f"peak RSS {mem.peak / 2**30:.2f} GiB", flush=True)
    bare, full = statistics.median(bare_times), statistics.median(analysis_times)
    summary = json.loads((sae_dir / "analysis" / "summary.json").read_text())
    a = Analysis.load(sae_dir)
    per_latent = len(a.examples["feature"]) / args.width
    counts = np.bincount(np.asarray(a.examples["feature"]), minlength=args.width)
    at_least_70 = float((counts >= 70).mean())
    print(f"examples per latent: mean {per_latent:.1f} (goal >= 70); {at_least_70:.1%} of latents have >= 70", flush=True)

    publish_times = {}
    for leftover in bench.glob("publish-bench.db*"):
        leftover.unlink()
    engine = make_engine(f"sqlite:///{bench / 'publish-bench.db'}")
    upgrade(engine)
    start = time.perf_counter()
    # bulk publishing alone: the interpretation step is timed on its own below
    publish(sae_dir, "bench", engine=engine, explain=False, progress=False)
    publish_times["sqlite"] = time.perf_counter() - start
    engine.dispose()
    if not args.skip_postgres:
        from tests.helpers import PostgresServer

        server = PostgresServer().start()
        try:
            engine = make_engine(server.create_database("bench"))
            upgrade(engine)
            start = time.perf_counter()
            publish(sae_dir, "bench", engine=engine, explain=False, progress=False)
            publish_times["postgresql"] = time.perf_counter() - start
            engine.dispose()
        finally:
            server.stop()

    # 4. what publish adds by default: a token-pattern explanation for every latent, scored by the
    # embedding scorer (trainer.interpret.at_publish.prepare: explanations, windows, embeddings, AUROCs)
    interp = None
    if not args.skip_interpretation:
        from trainer.interpret.at_publish import prepare
        from trainer.interpret.embedder import check_embedder

        embedder = check_embedder()
        start = time.perf_counter()
        done = prepare(a.examples, a.features, a.vocab, embedder, progress=False)
        interp = {**done.summary, "wall_s": time.perf_counter() - start}
        print(f"interpretation at publish: {interp['wall_s']:.1f} s for {args.width:,} latents "
              f"({interp['texts_embedded']:,} texts embedded); embedding AUROC {interp['true_mean']} vs shuffled "
              f"{interp['shuffled_mean']}", flush=True)

    result = {
        "command": "python benchmarks/analyze.py " + " ".join(sys.argv[1:]),
        "tokens": n_tokens, "width": args.width, "k": args.k, "lm_dtype": str(lm.dtype),
        "bare_lm_plus_encode_s": bare_times, "analysis_s": analysis_times,
        "median_bare_s": bare, "median_analysis_s": full, "ratio": full / bare,
        "analysis_phases_s": summary["timings"], "peak_rss_gib": max(peaks) / 2**30,
        "examples_per_latent": per_latent, "share_of_latents_with_70_examples": at_least_70,
        "examples": len(a.examples["feature"]), "publish_s": publish_times, "interpretation": interp, "sae": str(sae_dir),
        "sae_metrics": json.loads((sae_dir / "metrics.json").read_text()), "train_tokens": args.train_tokens,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "cpu_model": cpu_model(),
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / ("analyze.quick.json" if args.quick else "analyze.json")).write_text(json.dumps(result, indent=2))
    print()
    print("| tokens | latents | bare LM+encode (median) | analysis (median) | ratio | peak RSS | examples/latent |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {n_tokens:,} | {args.width:,} | {bare:.1f} s | {full:.1f} s | {full / bare:.2f} | "
          f"{max(peaks) / 2**30:.2f} GiB | {per_latent:.1f} |")
    print()
    for db, t in publish_times.items():
        print(f"publish {args.width:,} latents, {len(a.examples['feature']):,} examples into {db}: {t:.1f} s")


if __name__ == "__main__":
    main()
