"""Scores you can trust, through the real worker into the store (SQLite and PostgreSQL).

The judge is the one outside part: the instant backend (the documented test backend: a
deterministic mix of yes and no) and a judge that says "yes" to everything, the failure the issue
saw with the 135M model. Everything else is the worker's own path: explain, detection, fuzzing,
embedding scorer, store, feature update, page.
"""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

import store
from app.autointerp import queue
from app.autointerp.backends import _EXAMPLE_LINE, InstantBackend
from app.autointerp.scoring import wilson_interval
from tests.synthetic_sae import make_synthetic_sae
from store.models import Explanation, ExplanationEmbedding, Feature, Job, Judgement
from tests.test_api import make_client

EXPLANATION = "the word river, as in names of rivers and streams"


class YesJudge(InstantBackend):
    """A judge that answers "yes" to every example, whatever the explanation."""

    async def complete(self, messages, max_tokens, purpose="explain", temperature=0.0):
        if purpose == "explain":
            return EXPLANATION
        numbers = _EXAMPLE_LINE.findall(messages[-1]["content"])
        return "\n".join(f"Example {n}: yes" for n in numbers)


@pytest.fixture
def explained(engine, one_torch_thread):
    """Two latents explained by the worker: one judged by the instant backend, one by YesJudge."""
    import asyncio

    from app.autointerp.worker import Worker

    store.forget_caches()
    make_synthetic_sae(engine, n_features=4)
    out = {}
    for index, backend in ((1, InstantBackend()), (2, YesJudge())):
        with Session(engine) as s, s.begin():
            queue.enqueue_for_sae(s, "synthetic", indices=[index])
        assert asyncio.run(Worker(backend, engine, concurrency=1, once=True).run()) == 0
        with Session(engine) as s:
            (job,) = s.scalars(select(Job).join(Feature, Job.feature_id == Feature.id).where(Feature.index == index))
            assert job.status == "done", job.error
            out[index] = job.result["explanation_id"]
    return engine, out


def _recomputed(s: Session, explanation_id: int, method: str) -> tuple[float, tuple[float, float], int]:
    """Balanced accuracy, its Wilson interval and n, from the judgements stored for the explanation."""
    js = list(s.scalars(select(Judgement).where(Judgement.explanation_id == explanation_id,
                                                Judgement.method == method)))
    pos = [j for j in js if j.truth]
    neg = [j for j in js if not j.truth]
    tpr = sum(j.prediction is True for j in pos) / len(pos)
    tnr = sum(j.prediction is False for j in neg) / len(neg)
    ba = (tpr + tnr) / 2
    n_eff = 4 / (1 / len(pos) + 1 / len(neg))
    return ba, wilson_interval(ba * n_eff, n_eff), len(js)


def test_intervals_and_uninformative_judges_reach_the_store(explained):
    engine, ids = explained
    with Session(engine) as s:
        mixed, yes = s.get(Explanation, ids[1]), s.get(Explanation, ids[2])
        for method in ("detection", "fuzzing"):
            ba, (lo, hi), n = _recomputed(s, mixed.id, method)
            stored = mixed.scores[method]
            assert getattr(mixed, f"{method}_score") == pytest.approx(ba) and stored["n"] == n
            assert stored["ci"] == [round(lo, 4), round(hi, 4)] and lo < ba < hi
            assert getattr(mixed, f"{method}_uninformative") is False and stored["constant_answer"] is None
            # all "yes": balanced accuracy 0.5 whatever the explanation, flagged as such
            assert getattr(yes, f"{method}_score") == 0.5 and getattr(yes, f"{method}_uninformative") is True
            assert yes.scores[method]["constant_answer"] == "yes"
        # every LM explanation gets an embedding score and a search vector, like the token-pattern ones
        for e in (mixed, yes):
            assert e.embedding_score is not None and 0.0 <= e.embedding_score <= 1.0
            assert e.scores["embedding"]["n_pos"] > 0 and e.scores["embedding"]["model"] == "all-minilm-l6-v2"
            (v,) = s.scalars(select(ExplanationEmbedding.vector).where(ExplanationEmbedding.explanation_id == e.id))
            assert np.linalg.norm(np.frombuffer(v, "<f4")) == pytest.approx(1.0, abs=1e-4)
        # an uninformative detection score never becomes the latent's best score
        f_mixed, f_yes = s.get(Feature, mixed.feature_id), s.get(Feature, yes.feature_id)
        assert f_mixed.best_score == mixed.detection_score
        assert f_yes.best_score is None and f_yes.explanation == EXPLANATION
    with make_client(engine) as c:
        html = c.get(f"/saes/synthetic/features/{f_yes.index}").text
        assert "uninformative: the judge answered “yes” to all" in html
        html = c.get(f"/saes/synthetic/features/{f_mixed.index}").text
        assert "95 % CI" in html and "uninformative" not in html
        api = c.get(f"/api/v1/saes/synthetic/features/{f_yes.index}").json()["explanations"][0]
        assert api["detection_uninformative"] is True and api["scores"]["detection"]["constant_answer"] == "yes"
