"""What the LM explainer is shown and what it is scored on, through the worker's own loading path
(explain.load_feature_data) on a store written by publish's own example rows.

- Nothing of a held-out example reaches the explainer's prompt (issue 19, item 3).
- The LM explanation's embedding score uses the windows publish scores the token-pattern
  explanation on: one picker, so the two scores compare (issue 19, item 9).
"""

from __future__ import annotations

import json
import uuid
import zlib
from types import SimpleNamespace

import numpy as np
from sqlalchemy import insert
from sqlalchemy.orm import Session

import store
from app.autointerp.explain import JobRef, load_feature_data
from app.autointerp.prompts import PromptConfig, explain_messages, messages_text
from store.models import LM, SAE, Example, ExampleKind, Feature, SAEStatus
from trainer.interpret import windows
from store.publish import EXAMPLE_COLUMNS
from trainer.publish import example_tuples

DOC_LEN, BEFORE, AFTER = 400, 32, 12  # documents of 400 tokens; windows: 32 tokens before the peak, 12 after


def _analysis(n_latents: int = 10, dense: int = 9, vocab_size: int = 5000, seed: int = 0):
    """An analysis (examples.npz / features.npz as trainer.analyze writes them) over 6 documents,
    each its own context: position 0 is the excluded BOS, windows are padded with -1 outside the
    document. Token ids are unique per (document, position), so a text shows where it came from.
    Every latent fires at random places; top / interval / random examples as analyze picks them;
    latent `dense` is dense (zero-run negatives), the rest sparse (other latents' windows)."""
    rng = np.random.default_rng(seed)

    def token(doc: int, pos: int) -> int:
        return 1 + doc * DOC_LEN + pos

    fires = {i: {(int(d), int(p)): float(rng.uniform(0.5, 5.0))
                 for d, p in zip(rng.integers(0, 6, 40), rng.integers(1, DOC_LEN, 40))} for i in range(n_latents)}
    cols = {k: [] for k in ("feature", "kind", "rank", "interval", "activation", "doc_id", "doc_pos", "tokens",
                            "acts", "peak")}
    for i, hits in fires.items():
        by_act = sorted(hits, key=hits.get, reverse=True)
        picks = [(ExampleKind.top, r, -1, h) for r, h in enumerate(by_act[:5])]
        picks += [(ExampleKind.interval, r, 2 - r // 3, h) for r, h in enumerate(by_act[5:14])]
        sample = [by_act[k] for k in rng.choice(len(by_act), 8, replace=False)]  # may repeat a top one
        picks += [(ExampleKind.random, r, -1, h) for r, h in enumerate(sample)]
        for kind, rank, interval, (d, p) in picks:
            pos = np.arange(p - BEFORE, p + AFTER + 1)
            inside = (pos >= 1) & (pos < DOC_LEN)
            cols["tokens"].append(np.where(inside, token(d, pos), -1))
            cols["acts"].append(np.asarray([hits.get((d, int(q)), 0.0) if ok else 0.0 for q, ok in zip(pos, inside)]))
            for k, v in (("feature", i), ("kind", kind), ("rank", rank), ("interval", interval),
                         ("activation", hits[(d, p)]), ("doc_id", d), ("doc_pos", p), ("peak", BEFORE)):
                cols[k].append(v)
    ex = {k: np.asarray(v) for k, v in cols.items()}
    ex["tokens"] = ex["tokens"].astype(np.int32)
    ex["acts"] = ex["acts"].astype(np.float16)
    density = np.full(n_latents, 1e-4)
    density[dense] = 0.5
    neighbors = np.full((n_latents, 2), -1)
    neighbors[0] = [1, 2]  # latent 0's decoder neighbours: never its negatives
    feats = {"count": np.full(n_latents, 40), "density": density, "neighbor_ids": neighbors}
    vocab = ["<s>"] + [f" d{d}p{p}x" for d in range(6) for p in range(DOC_LEN)]  # none inside another
    return ex, feats, vocab + [f" x{t}" for t in range(vocab_size - len(vocab))]


def _store(engine, ex: dict, feats: dict, vocab: list[str]) -> tuple[int, list[int]]:
    """The analysis in the store, examples as publish writes them (example_tuples): (SAE id, feature ids)."""
    n = len(feats["count"])
    with Session(engine) as s, s.begin():
        lm = LM(name=f"lm-{uuid.uuid4().hex[:8]}", source="test", architecture="none", n_layers=1, d_model=8,
                vocab_size=len(vocab), bos_token_id=0, vocab=zlib.compress(json.dumps(vocab).encode()))
        s.add(lm)
        s.flush()
        sae = SAE(name="pick", lm_id=lm.id, site="resid_post.0", layer=0, architecture="topk", d_in=8, d_sae=n, k=4,
                  config={}, norm_scale=1.0, metrics={}, charts={}, n_tokens_analyzed=10_000,
                  status=SAEStatus.ready.value, version=uuid.uuid4().hex)
        s.add(sae)
        s.flush()
        ids = [s.execute(insert(Feature).returning(Feature.id), {
            "sae_id": sae.id, "index": i, "firing_count": 40, "density": float(feats["density"][i]), "mean_act": 1.0,
            "max_act": 5.0, "moments": {}, "act_hist": {}, "interval_shares": [], "logits": {},
            "neighbors": [[int(j), 0.5] for j in feats["neighbor_ids"][i]]}).scalar_one() for i in range(n)]
        rows = [dict(zip(EXAMPLE_COLUMNS, t)) for t in example_tuples(SimpleNamespace(examples=ex), np.asarray(ids))]
        s.execute(insert(Example), rows)
        return sae.id, ids


def _job(sae_id: int, feature_id: int) -> JobRef:
    return JobRef(id=0, feature_id=feature_id, sae_id=sae_id, attempts=1, max_attempts=3)


def test_the_explainer_prompt_holds_no_held_out_example(sqlite_engine):
    ex, feats, vocab = _analysis()
    sae_id, ids = _store(sqlite_engine, ex, feats, vocab)
    store.forget_caches()
    cfg = PromptConfig()  # statistics and activation lists on
    for i in range(len(ids)):
        data = load_feature_data(sqlite_engine, _job(sae_id, ids[i]), cfg)
        prompt = messages_text(explain_messages(data.split.explain, cfg, scale=data.max_act,
                                                statistics=data.statistics))
        assert data.statistics and data.split.held_out
        # every token names its document and position: none of a held-out window's may appear
        held = {t.strip() for w in data.split.held_out for t in w.tokens}
        leaked = sorted(t for t in held if t in prompt)
        assert not leaked, f"latent {i}: held-out tokens in the explainer's prompt: {leaked[:5]}"


def test_lm_and_token_pattern_scores_use_the_same_windows(sqlite_engine):
    ex, feats, vocab = _analysis()
    sae_id, ids = _store(sqlite_engine, ex, feats, vocab)
    store.forget_caches()
    window = windows.scoring_window()
    published = windows.select(ex, feats, vocab, seed=0, window=window)  # what publish scores token patterns on
    sources = set()
    for i in range(len(ids)):
        data = load_feature_data(sqlite_engine, _job(sae_id, ids[i]), PromptConfig(seed=0))
        assert data.scoring_pos == [published.texts[k] for k in published.pos[i]], f"latent {i}: positives"
        assert data.scoring_neg == [published.texts[k] for k in published.neg[i]], f"latent {i}: negatives"
        assert len(data.scoring_pos) == windows.N_POS and data.scoring_neg
        sources.add(published.neg_source[i])
        # the explainer never saw a scoring window: no shown window holds a positive's tokens
        shown = "".join("".join(w.tokens) for w in data.split.explain)
        assert not any(t in shown for t in data.scoring_pos)
    assert sources == {"other_latents", "own_zero_runs"}  # both kinds of negatives were compared
