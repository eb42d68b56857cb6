"""A synthetic SAE written straight into the store, for queue tests and the queue benchmark
(test support: it lives beside the tests, outside the packages that ship).

No model and no analysis: a small vocabulary of words, and for every latent a handful of random
example windows whose activation peaks on the latent's own "topic" word. Enough for the whole
explain pipeline (prompts, negatives, scoring, storing) to run with the instant backend, so that
what is measured is the queue and the store, not an LM.
"""

from __future__ import annotations

import json
import uuid
import zlib

import numpy as np
from sqlalchemy import Engine, insert
from sqlalchemy.orm import Session

from store.models import LM, SAE, Example, Feature, SAEStatus, utcnow

WORDS = ("the cat dog house river tree blue red green run jump swim code list dict value key error file "
         "read write open close time day night year city road car train ship bird fish song music art "
         "book page word letter number one two three four five six seven eight nine ten and or not").split()


def make_synthetic_sae(engine: Engine, name: str = "synthetic", n_features: int = 500, examples_per_feature: int = 8,
                       window: int = 45, peak: int = 32, seed: int = 0) -> int:
    """Publish a synthetic SAE of n_features latents (status ready); returns its id."""
    rng = np.random.default_rng(seed)
    vocab = [" " + w for w in WORDS]
    with Session(engine) as session, session.begin():
        lm = LM(name=f"synthetic-lm-{uuid.uuid4().hex[:8]}", source="synthetic", architecture="none", n_layers=1,
                d_model=8, vocab_size=len(vocab), bos_token_id=None,
                vocab=zlib.compress(json.dumps(vocab).encode()))
        session.add(lm)
        session.flush()
        sae = SAE(name=name, lm_id=lm.id, site="resid_post.0", layer=0, architecture="topk", d_in=8,
                  d_sae=n_features, k=4, config={}, norm_scale=1.0, metrics={}, charts={}, n_tokens_analyzed=10_000,
                  status=SAEStatus.publishing.value, version=uuid.uuid4().hex, description="synthetic (tests)")
        session.add(sae)
        session.flush()
        rows = [{"sae_id": sae.id, "index": i, "firing_count": 10, "density": 0.001, "mean_act": 1.0, "max_act": 4.0,
                 "moments": {}, "act_hist": {}, "interval_shares": [], "logits": {}, "neighbors": [],
                 "peak_token_id": i % len(vocab), "peak_token_share": 1.0} for i in range(n_features)]
        ids = [fid for (fid,) in session.execute(insert(Feature).returning(Feature.id, sort_by_parameter_order=True),
                                                 rows)]
        examples = []
        for i, fid in enumerate(ids):
            topic = i % len(vocab)
            for r in range(examples_per_feature):
                kind = 0 if r < examples_per_feature // 2 else 2
                tokens = rng.integers(0, len(vocab), window).astype("<i4")
                tokens[peak] = topic
                acts = np.zeros(window, dtype="<f2")
                act = float(4.0 - 0.3 * r)
                acts[peak] = act
                examples.append({"feature_id": fid, "kind": kind, "rank": r, "interval": None, "activation": act,
                                 "peak": peak, "doc_id": i * 1000 + r, "doc_offset": 100,
                                 "token_ids": tokens.tobytes(), "acts": acts.tobytes()})
        for k in range(0, len(examples), 5000):
            session.execute(insert(Example), examples[k:k + 5000])
        sae.status = SAEStatus.ready.value
        sae.published_at = utcnow()
        session.flush()
        return sae.id
