"""Experiment: which query text lets the embedding model separate a latent's activating windows from
its non-activating ones best, on an analysed SAE's token-pattern explanations.

    SAE_ATLAS_DATA_DIR=... python benchmarks/embedding_queries.py [SAE_FOLDER]   # default: the demo's main SAE

The windows are chosen and embedded once, exactly as at publish (trainer.interpret.windows,
at_publish.N_POS / N_NEG); then, for each way of writing the query, every latent is scored with its
own explanation and with another latent's (the shuffled baseline), and the paired difference is
tested (embedding_scorer.paired_comparison). Prints one line per variant.
"""

from __future__ import annotations

import re
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

    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else demo_sae_dir()
    a = Analysis.load(folder)
    embedder = get_embedder()
    vocab = a.vocab
    stats = token_pattern.stats_from_analysis(a.examples, a.features)
    texts = [token_pattern.describe(st, lambda t: vocab[t] if 0 <= t < len(vocab) else f"<{t}>") for st in stats]
    analysis = (a.summary or {}).get("analysis") or {}
    w = windows.select(a.examples, a.features, vocab, n_pos=N_POS, n_neg=N_NEG, seed=0,
                       ctx_len=analysis.get("ctx_len"), exclude_bos=bool(analysis.get("exclude_bos", True)))
    started = time.time()
    vectors = embed_all(embedder, w.texts, True, "windows")
    print(f"{folder.name}: {len(w.texts)} windows embedded in {time.time() - started:.0f} s", flush=True)
    explained = [i for i, t in enumerate(texts) if t]
    n = len(texts)

    def no_after(t: str) -> str:
        return re.sub(r", after .*$", "", t.split(token_pattern.PROMOTES)[0])

    variants = {
        "delphi prefix + whole explanation": lambda t: es.DELPHI_QUERY_PREFIX + token_pattern.plain(t),
        "whole explanation": lambda t: token_pattern.plain(t),
        "input side (default query_text)": lambda t: es.query_text(t, prefix=""),
        "peak tokens only": lambda t: token_pattern.plain(no_after(t)),
        "delphi prefix + input side": lambda t: es.query_text(t, prefix=es.DELPHI_QUERY_PREFIX),
    }
    for name, write in variants.items():
        q = np.zeros((n, vectors.shape[1]), np.float32)
        q[explained] = embed_all(embedder, [write(texts[i]) for i in explained], False, "queries")
        auroc = np.full(n, np.nan)
        auroc[explained] = es.score_latents(q, vectors, w.pos, w.neg, explained)
        scored = [i for i in explained if np.isfinite(auroc[i])]
        r = es.paired_comparison(auroc[scored], es.shuffled_scores(q, vectors, w.pos, w.neg, scored, 0))
        print(f"{name:36s} n={r['n']}  true {r['true_mean']:.4f}  shuffled {r['shuffled_mean']:.4f}  "
              f"diff {r['diff_mean']:.4f}  p={r['p_value']:.1e}", flush=True)


if __name__ == "__main__":
    main()
