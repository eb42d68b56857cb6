"""Benchmark: publishing a whole transcoder set (trainer/transcoders/publish_set.py), stage by stage.

    SAE_ATLAS_DATA_DIR=/tmp/tcpublish-data python benchmarks/transcoder_set_publish.py RUN_FOLDER
    python benchmarks/transcoder_set_publish.py RUN_FOLDER --tokens 20000 --block 15 --threads 1

RUN_FOLDER is a `sae-atlas train --site 'mlp.*'` run (its transcoder_set.json). On the LM the set
was trained on, with `--threads` torch threads:
1. `publish_transcoder_set(..., light=True)` with explanations, every analysis from scratch
   (restart) and every block published again (replace), into the store of SAE_ATLAS_DATA_DIR:
   the LM pass that fills one cache of every block's mlp_in.L, the analyses, and the publishes
   (token-pattern explanations, the embedding AUROC of LIGHT_SCORE_SAMPLE latents per block, the
   map when map_at_publish is on, the writes), each timed, with the load average before and after;
2. what the light option saves, on one block (--block): trainer.interpret.at_publish.prepare on its
   analysis with the embedding score sampled as a light publish does and on every latent (the
   in-process cache of embedded texts emptied before each), seconds and texts embedded.
Results go to benchmarks/results/transcoder_set_publish.json (or --out) with the CPU model and the
LM dtype.
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
from benchmarks.machine import cpu_model  # noqa: E402

os.environ.setdefault("SAE_ATLAS_MODEL_CACHE_DIR", str(REPO / "data" / "models"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("run", type=Path, help="a run folder of `train --site 'mlp.*'` (or its transcoder_set.json)")
    p.add_argument("--prefix", default="bench-tc")
    p.add_argument("--tokens", type=int, default=20_000, help="tokens each block's analysis reads")
    p.add_argument("--block", type=int, default=15, help="the block whose full vs sampled embedding score is timed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "transcoder_set_publish.json")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from store.db import get_engine, upgrade
    from trainer.interpret import at_publish
    from trainer.interpret.embedder import check_embedder
    from trainer.lm import load_lm
    from trainer.publish import Analysis
    from trainer.transcoders import load_transcoder_set
    from trainer.transcoders.publish_set import LIGHT_SCORE_SAMPLE, publish_transcoder_set

    upgrade(get_engine())
    tset = load_transcoder_set(args.run)
    result = {"cpu": cpu_model(), "threads": args.threads, "model": tset.model, "blocks": len(tset.layers),
              "d_sae": tset.d_sae, "k": tset.k, "tokens": args.tokens, "light_score_sample": LIGHT_SCORE_SAMPLE}
    started = time.perf_counter()
    lm = load_lm(tset.model, "cpu", "auto")
    result["lm_load_s"] = round(time.perf_counter() - started, 2)
    result["lm_dtype"] = str(lm.dtype).removeprefix("torch.")
    result["load_before"] = os.getloadavg()
    timings: dict = {}
    started = time.perf_counter()
    names = publish_transcoder_set(args.run, args.prefix, lm=lm, tokens=args.tokens, light=True, replace=True,
                                   explain=True, analysis={"restart": True}, timings=timings)
    result["publish_set_s"] = round(time.perf_counter() - started, 2)
    result["stages_s"] = {k: round(v, 2) for k, v in timings.items()}
    result["load_after"] = os.getloadavg()
    result["published"] = [names[0], names[-1]]

    analysis = Analysis.load(tset.folder(args.block))
    embedder = check_embedder()
    one = {}
    for label, sample in (("light", LIGHT_SCORE_SAMPLE), ("full", None)):
        at_publish._recent.clear()
        t0 = time.perf_counter()
        interp = at_publish.prepare(analysis.examples, analysis.features, analysis.vocab, embedder, progress=False,
                                    score_sample=sample)
        s = interp.summary
        one[label] = {"prepare_s": round(time.perf_counter() - t0, 2), "embed_s": s["seconds"]["embed"],
                      "texts_embedded": s["texts_embedded"], "latents_scored": s["latents_scored"],
                      "explained": s["explained"], "texts_per_s": s["texts_per_s"], "true_mean": s["true_mean"]}
    result["one_block_interpretation"] = {"block": args.block, **one, "load_after": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
