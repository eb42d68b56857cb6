"""Benchmark: publishing's interpretation step (every latent) with the embedding model in float32
and in bfloat16 autocast, on one analysed SAE: time, and what changes.

    OMP_NUM_THREADS=1 python benchmarks/embedding_dtype_quality.py /work/demo-new/demo/sweep/resid_post.15-topk-w4608-k32

One torch thread; trainer.interpret.at_publish.prepare on every latent, the cache of embedded texts
emptied before each dtype. Prints, per dtype, wall and CPU seconds (getrusage), texts embedded and
texts/s, and the SAE's true vs shuffled embedding AUROC; then how many latents' AUROCs differ
between the two and by how much, and the smallest cosine between the two runs' search vectors.
Writes benchmarks/results/embedding_dtype_quality-<SAE folder>.json.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.machine import cpu_model  # noqa: E402


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> int:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from trainer.interpret import at_publish
    from trainer.interpret.embedder import BUNDLED, TransformersEmbedder
    from trainer.publish import Analysis

    folder = Path(sys.argv[1])
    a = Analysis.load(folder)
    out, kept = {"cpu": cpu_model(), "threads": 1, "sae": str(folder), "load_before": os.getloadavg()}, {}
    for dtype in ("float32", "bfloat16"):
        emb = TransformersEmbedder(model=BUNDLED, device="cpu", dtype=dtype)
        emb.embed(["warm up the embedding model"])
        at_publish._recent.clear()
        t, c = time.perf_counter(), cpu_s()
        interp = at_publish.prepare(a.examples, a.features, a.vocab, emb, progress=False)
        s = interp.summary
        out[dtype] = {"s": round(time.perf_counter() - t, 1), "cpu_s": round(cpu_s() - c, 1), "load": os.getloadavg(),
                      **{k: s[k] for k in ("true_mean", "shuffled_mean", "diff_mean", "p_value", "n", "texts_embedded",
                                           "texts_per_s", "embedding_dtype")}}
        kept[dtype] = interp
        print(dtype, json.dumps(out[dtype]), flush=True)
    f, b = kept["float32"], kept["bfloat16"]
    ok = np.isfinite(f.aurocs) & np.isfinite(b.aurocs)
    d = np.abs(f.aurocs[ok] - b.aurocs[ok])
    out["auroc_diff"] = {"latents": int(ok.sum()), "differing": int((d > 0).sum()), "max": float(d.max()),
                         "mean": float(d.mean())}
    out["search_vectors_min_cos"] = float((f.vectors * b.vectors).sum(1).min())
    print(json.dumps(out))
    (REPO / "benchmarks" / "results" / f"embedding_dtype_quality-{folder.name}.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
