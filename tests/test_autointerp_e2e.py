"""End to end with the bundled model: train a small SAE on SmolLM2-135M, publish it, queue one
feature, run a worker with the local backend (the same model explains and judges), and read the
explanation and its scores back from the feature page."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm_sae_dir(tmp_path_factory) -> Path:
    """A 256-latent TopK SAE on resid_post.15 of the real bundled model, from a few thousand tokens."""
    from trainer.analyze import AnalyzeConfig, analyze
    from trainer.train import TrainConfig, train

    out = tmp_path_factory.mktemp("smollm-sae") / "sae"
    cfg = TrainConfig(out=out, model="smollm2-135m", site=["resid_post.15"], width=[256], k=[8], tokens=4096,
                      ctx_len=64, batch_size=512, shuffle_buffer=1024, warmup_steps=1, eval_tokens=512,
                      ce_contexts=0, lm_dtype="float32", device="cpu", log_every=10)
    (folder,) = train(cfg)
    analyze(AnalyzeConfig(sae_dir=folder, tokens=2048, ctx_len=64, device="cpu", lm_dtype="float32",
                          shard_contexts=16, n_top=10, per_interval=3, n_random=10), progress=False)
    return folder


def test_local_model_explains_and_scores_a_feature(smollm_sae_dir, sqlite_engine):
    from fastapi.testclient import TestClient

    import store
    from app.autointerp import queue
    from app.autointerp.worker import run_worker
    from app.main import create_app
    from store.models import SAE, Example, Explanation, Feature, Job, Judgement, utcnow
    from trainer.publish import publish

    store.forget_caches()  # vocabularies are cached by LM id, which other tests' stores reuse
    publish(smollm_sae_dir, "smol", engine=sqlite_engine, progress=False)
    with Session(sqlite_engine) as s, s.begin():
        sae = s.scalar(select(SAE).where(SAE.name == "smol"))
        # The latent with the most stored examples: plenty to explain and to hold out.
        index, fid = s.execute(select(Feature.index, Feature.id).join(Example, Example.feature_id == Feature.id)
                               .where(Feature.sae_id == sae.id).group_by(Feature.id)
                               .order_by(func.count(Example.id).desc(), Feature.index).limit(1)).one()
        job, created = queue.enqueue(s, sae, s.get(Feature, fid), requested_by="test")
        assert created
        s.flush()
        job_id = job.id

    # An unusable answer puts the job back after a backoff; pretend the backoff passed (at most
    # max_attempts runs in all) so the test does not sleep.
    for _ in range(3):
        assert run_worker(once=True, backend="local", engine=sqlite_engine) == 0
        with Session(sqlite_engine) as s, s.begin():
            j = s.get(Job, job_id)
            if j.status != "queued":
                break
            s.execute(update(Job).where(Job.id == job_id).values(run_after=utcnow() - timedelta(seconds=1)))
    with Session(sqlite_engine) as s:
        j = s.get(Job, job_id)
        assert j.status == "done", j.error
        expl = s.get(Explanation, j.result["explanation_id"])
        assert expl.text.strip() and expl.explainer == "local:smollm2-135m" and expl.method == "explain-v4"
        assert expl.raw_response and "<<" in expl.prompt
        for score in (expl.detection_score, expl.fuzzing_score):
            assert score is not None and 0.0 <= score <= 1.0
        n_judged = s.scalar(select(func.count(Judgement.id)).where(Judgement.explanation_id == expl.id))
        assert n_judged == j.result["detection"]["n"] + j.result["fuzzing"]["n"] > 0
        feature = s.get(Feature, fid)
        # an uninformative detection score (the 135M judge often answers every example alike) is
        # never a feature's best score
        best = None if expl.detection_uninformative else expl.detection_score
        assert feature.explanation == expl.text and feature.best_score == best

    client = TestClient(create_app(engine=sqlite_engine))
    page = client.get(f"/saes/smol/features/{index}")
    assert page.status_code == 200
    from markupsafe import escape

    assert str(escape(expl.text)) in page.text
    body = client.get(f"/api/v1/saes/smol/features/{index}").json()
    assert body["explanation"] == expl.text
    (shown,) = body["explanations"]
    assert shown["detection_score"] == pytest.approx(expl.detection_score)
    assert shown["fuzzing_score"] == pytest.approx(expl.fuzzing_score)
