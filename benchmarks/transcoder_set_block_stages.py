"""Benchmark: what publishing one analysed block of a transcoder set costs, stage by stage.

    SAE_ATLAS_DATA_DIR=/tmp/tcpublish-data OMP_NUM_THREADS=1 \
        python benchmarks/transcoder_set_block_stages.py /tmp/tcpublish-data/run 20

On block BLOCK of a set whose analyses are done (`sae-atlas publish-set` or `analyze` ran), with
one torch thread, after one warm-up text through the embedding model:
- trainer.interpret.at_publish.prepare with the embedding score on LIGHT_SCORE_SAMPLE latents
  (what `publish-set --light` does) and on every latent (the in-process cache of embedded texts
  emptied before each; light runs first): seconds, texts embedded, texts/s, latents scored;
- the map (trainer.publish._map: UMAP + Leiden), twice (the first call in a process compiles);
- the writes alone (publish without explanations, map or relations) as `stage-test-L<BLOCK>`.
Prints one JSON line and writes benchmarks/results/transcoder_set_block_stages-<BLOCK>.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.machine import cpu_model  # noqa: E402


def main() -> int:
    import torch

    torch.set_num_threads(1)
    from store.db import get_engine, upgrade
    from trainer.interpret import at_publish
    from trainer.interpret.embedder import check_embedder
    from trainer.publish import Analysis, _map, publish
    from trainer.transcoders import load_transcoder_set
    from trainer.transcoders.publish_set import LIGHT_SCORE_SAMPLE

    run, block = Path(sys.argv[1]), int(sys.argv[2])
    upgrade(get_engine())
    folder = load_transcoder_set(run).folder(block)
    out = {"cpu": cpu_model(), "threads": 1, "block": block, "load_before": os.getloadavg()}
    a = Analysis.load(folder)
    emb = check_embedder()
    emb.embed(["warm up the embedding model"])
    interp = None
    for label, sample in (("light", LIGHT_SCORE_SAMPLE), ("full", None)):
        at_publish._recent.clear()
        t = time.perf_counter()
        interp = at_publish.prepare(a.examples, a.features, a.vocab, emb, progress=False, score_sample=sample)
        s = interp.summary
        out[label] = {"s": round(time.perf_counter() - t, 1), "texts_embedded": s["texts_embedded"],
                      "texts_per_s": s["texts_per_s"], "scored": s["latents_scored"], "true_mean": s["true_mean"]}
    for key in ("map_s", "map_again_s"):
        t = time.perf_counter()
        _map(folder, a, interp)
        out[key] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    publish(folder, f"stage-test-L{block}", replace=True, explain=False, make_map=False, relate=False, progress=False)
    out["writes_s"] = round(time.perf_counter() - t, 1)
    out["load_after"] = os.getloadavg()
    print(json.dumps(out))
    path = REPO / "benchmarks" / "results" / f"transcoder_set_block_stages-{block}.json"
    path.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
