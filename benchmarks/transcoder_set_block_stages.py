"""Benchmark: what publishing one analysed block of a transcoder set costs, stage by stage.

    SAE_ATLAS_DATA_DIR=/tmp/tcpublish-data OMP_NUM_THREADS=1 \
        python benchmarks/transcoder_set_block_stages.py /tmp/tcpublish-data/run 20 [--light-only]
    SAE_ATLAS_DATA_DIR=... OMP_NUM_THREADS=1 python benchmarks/transcoder_set_block_stages.py RUN 20 \
        --publish 18 19 21 [--code /work/main]

On block BLOCK of a set whose analyses are done (`sae-atlas publish-set` or `analyze` ran), with
one torch thread, after one warm-up text through the embedding model:
- trainer.interpret.at_publish.prepare with the embedding score on LIGHT_SCORE_SAMPLE latents
  (what `publish-set --light` does), once with the encoder in float32 and once in the embedder's
  own dtype (auto: bfloat16 autocast where the CPU multiplies bfloat16 natively), the cache of
  embedded texts emptied before each: wall and CPU seconds, texts and tokens embedded of each
  kind (scoring windows, explanation search documents, scorer queries), texts/s, and the largest
  difference between the two runs' search vectors (1 - cosine) and AUROCs;
- unless --light-only, the same on every latent (dtype auto);
- the map (trainer.publish._map: UMAP + Leiden), twice (the first call in a process compiles);
- the writes alone (publish without explanations, map or relations) as `stage-test-L<BLOCK>`.
--publish B...: then the whole light publish of each of these blocks in turn in this process
(trainer.publish.publish with the arguments trainer.transcoders.publish_set gives it, as
`stage-test-L<B>`), wall and CPU seconds each: the per-block cost of `publish-set --light`.
--set-texts: then, without embedding, the texts a light publish of EVERY block would embed (the
same sample): per kind, how many and how many tokens, how many were also embedded for an earlier
block and for the block just before, and the padding of the search documents batched per block
against batched for the whole set.
--code DIR: import trainer/ and store/ from another checkout (the "before" of a change).
CPU seconds are the process's (resource.getrusage). Prints one JSON line and writes
benchmarks/results/transcoder_set_block_stages-<BLOCK>[-<label>].json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run", type=Path)
    p.add_argument("block", type=int)
    p.add_argument("--light-only", action="store_true", help="skip the prepare on every latent")
    p.add_argument("--publish", type=int, nargs="*", default=[], help="blocks to publish whole, light, in turn")
    p.add_argument("--set-texts", action="store_true", help="count the texts every block's light publish embeds")
    p.add_argument("--code", type=Path, default=REPO, help="the checkout whose trainer/ and store/ are measured")
    p.add_argument("--label", default="", help="suffix of the results file")
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    from benchmarks.machine import cpu_model

    sys.path.insert(0, str(args.code.resolve()))
    import numpy as np
    import torch

    torch.set_num_threads(1)
    import trainer
    from store.db import get_engine, upgrade
    from store.vectors import document_text
    from trainer.interpret import at_publish, embedding_scorer
    from trainer.interpret.embedder import check_embedder
    from trainer.publish import Analysis, _map, publish
    from trainer.transcoders import load_transcoder_set
    from trainer.transcoders.publish_set import LIGHT_SCORE_SAMPLE

    upgrade(get_engine())
    tset = load_transcoder_set(args.run)
    folder = tset.folder(args.block)
    out = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "block": args.block,
           "code": str(Path(trainer.__file__).parents[1]), "load_before": os.getloadavg()}
    a = Analysis.load(folder)
    emb = check_embedder()
    tokenizer = emb.load()[0] if hasattr(emb, "load") else None
    emb.embed(["warm up the embedding model"])
    runs = {}
    for label, sample, dtype in (("light_float32", LIGHT_SCORE_SAMPLE, "float32"), ("light", LIGHT_SCORE_SAMPLE, None),
                                 ("full", None, None)):
        if label == "full" and args.light_only:
            continue
        default_dtype = getattr(emb, "dtype", None)
        if dtype is not None and default_dtype is not None:
            emb.dtype = dtype
        at_publish._recent.clear()
        t, c = time.perf_counter(), cpu_s()
        interp = at_publish.prepare(a.examples, a.features, a.vocab, emb, progress=False, score_sample=sample)
        wall, cpu = time.perf_counter() - t, cpu_s() - c
        if default_dtype is not None:
            emb.dtype = default_dtype
        s = interp.summary
        runs[label] = interp
        kinds = _kinds(interp, a, s, tokenizer, document_text, embedding_scorer.query_text)
        out[label] = {"s": round(wall, 1), "cpu_s": round(cpu, 1), "seconds": s["seconds"],
                      "dtype": s.get("embedding_dtype"), "texts_embedded": s["texts_embedded"],
                      "texts_per_s": s["texts_per_s"], "scored": s["latents_scored"], "true_mean": s["true_mean"],
                      "shuffled_mean": s["shuffled_mean"], "p_value": s["p_value"], "texts": kinds}
    f32, auto = runs["light_float32"], runs["light"]
    ok = np.isfinite(f32.aurocs) & np.isfinite(auto.aurocs)
    out["light_float32_vs_auto"] = {
        "max_1_minus_cos_search_vectors": float(1 - (f32.vectors * auto.vectors).sum(1).min()),
        "max_abs_auroc_diff": float(np.abs(f32.aurocs[ok] - auto.aurocs[ok]).max()) if ok.any() else None}
    for key in ("map_s", "map_again_s"):
        t = time.perf_counter()
        _map(folder, a, auto)
        out[key] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    publish(folder, f"stage-test-L{args.block}", replace=True, explain=False, make_map=False, relate=False,
            progress=False)
    out["writes_s"] = round(time.perf_counter() - t, 1)
    out["publish"] = []
    for block in args.publish:  # what trainer.transcoders.publish_set._publish_blocks does for a light block
        t, c = time.perf_counter(), cpu_s()
        publish(tset.folder(block), f"stage-test-L{block}", replace=True, progress=False,
                score_sample=LIGHT_SCORE_SAMPLE, relate=False,
                extra_config={"transcoder_set": {"name": "stage-test", "layer": block, "n_layers": tset.n_layers}})
        out["publish"].append({"block": block, "s": round(time.perf_counter() - t, 1),
                               "cpu_s": round(cpu_s() - c, 1), "load": os.getloadavg()})
    if args.set_texts:
        out["set_texts"] = _set_texts(tset, tokenizer, emb, LIGHT_SCORE_SAMPLE)
    out["load_after"] = os.getloadavg()
    print(json.dumps(out))
    suffix = f"-{args.label}" if args.label else ""
    path = REPO / "benchmarks" / "results" / f"transcoder_set_block_stages-{args.block}{suffix}.json"
    path.write_text(json.dumps(out, indent=1))
    return 0


def _set_texts(tset, tokenizer, emb, sample: int) -> dict:
    """What the light publish of every block embeds, counted with the tokenizer only (the sampled
    latents drawn as at_publish.prepare draws them)."""
    import numpy as np

    from store.vectors import document_text
    from trainer.interpret import embedding_scorer, token_pattern, windows
    from trainer.interpret.embedder import _batches
    from trainer.publish import Analysis

    kinds = ("windows", "documents", "queries")
    out = {k: {"texts": 0, "tokens": 0, "in_earlier_block": 0, "in_earlier_block_tokens": 0,
               "in_block_before": 0, "in_block_before_tokens": 0} for k in kinds}
    n_tokens: dict[str, int] = {}
    seen, before, doc_lengths, padded = set(), set(), [], 0
    for layer in sorted(tset.layers):
        a = Analysis.load(tset.folder(layer))
        vocab = a.vocab
        texts = [token_pattern.describe(st, lambda t: vocab[t] if 0 <= t < len(vocab) else f"<{t}>")
                 for st in token_pattern.stats_from_analysis(a.examples, a.features)]
        wins = windows.select(a.examples, a.features, vocab, n_pos=windows.N_POS, n_neg=windows.N_NEG, seed=0,
                              window=windows.scoring_window())
        explained = [i for i, t in enumerate(texts) if t]
        pick = np.random.default_rng(0).choice(len(explained), size=min(sample, len(explained)), replace=False)
        scored = sorted(explained[j] for j in pick.tolist())
        used = sorted({j for i in scored for j in wins.pos[i] + wins.neg[i]})
        block = {"windows": [wins.texts[j] for j in used], "documents": [document_text(texts[i]) for i in explained],
                 "queries": [embedding_scorer.query_text(texts[i]) for i in scored]}
        here: set[str] = set()
        for kind in kinds:
            distinct = [t for t in dict.fromkeys(block[kind]) if t not in here]
            here.update(distinct)
            new = [t for t in distinct if t not in n_tokens]
            if new:
                n_tokens.update(zip(new, (len(x) for x in tokenizer(new)["input_ids"])))
            o = out[kind]
            o["texts"] += len(distinct)
            o["tokens"] += sum(n_tokens[t] for t in distinct)
            for key, pool in (("in_earlier_block", seen), ("in_block_before", before)):
                hits = [t for t in distinct if t in pool]
                o[key] += len(hits)
                o[key + "_tokens"] += sum(n_tokens[t] for t in hits)
        lengths = np.sort([n_tokens[t] for t in block["documents"]])
        doc_lengths.append(lengths)
        padded += sum((b.stop - b.start) * int(lengths[b.stop - 1])
                      for b in _batches(lengths, emb.batch_size, emb.tokens_per_batch))
        before, seen = here, seen | here
    every = np.sort(np.concatenate(doc_lengths))
    together = sum((b.stop - b.start) * int(every[b.stop - 1]) for b in _batches(every, emb.batch_size, emb.tokens_per_batch))
    total = sum(o["tokens"] for o in out.values())
    for o in out.values():
        o["share_of_tokens"] = round(o["tokens"] / max(total, 1), 4)
    out["document_padding_per_block"] = round(padded / max(int(every.sum()), 1) - 1, 4)
    out["document_padding_whole_set"] = round(together / max(int(every.sum()), 1) - 1, 4)
    return out


def _kinds(interp, a, s, tokenizer, document_text, query_text) -> dict:
    """Texts and tokens (the encoder's) of each kind that one prepare embeds, before deduplication:
    scoring windows, explanation search documents, scorer queries."""
    explained = [i for i, t in enumerate(interp.texts) if t]
    scored = [i for i in explained if i not in interp.unscored]
    docs = [document_text(interp.texts[i]) for i in explained]
    queries = [query_text(interp.texts[i]) for i in scored]
    out = {"windows": {"n": s["windows"]}, "documents": {"n": len(docs)}, "queries": {"n": len(queries)}}
    if tokenizer is not None:
        for key, texts in (("documents", docs), ("queries", queries)):
            lengths = [len(x) for x in tokenizer(texts)["input_ids"]] if texts else [0]
            out[key].update(tokens=int(sum(lengths)), mean_tokens=round(sum(lengths) / max(len(texts), 1), 1))
    return out


if __name__ == "__main__":
    sys.exit(main())
