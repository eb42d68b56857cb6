"""The comparison of SAEs: /compare (Pareto plots and a sortable table, every point and row a link)
and GET /api/v1/compare with the same numbers, on SQLite and PostgreSQL. (The page in Chromium:
tests/test_pages_browser.py.)"""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from store.compare import pareto_front
from store.models import SAE, Explanation, Feature
from tests.test_pages import check_page, make_client


def test_pareto_front():
    pts = [(4.0, 0.9), (8.0, 0.5), (20.0, 0.95), (8.0, 0.6), (None, 0.1), (30.0, float("nan")), (2.0, 0.99)]
    assert pareto_front(pts, lower_y_better=True) == [True, True, False, False, False, False, True]
    # higher is better: (2, 0.99) beats everything with more L0
    assert pareto_front(pts, lower_y_better=False) == [False, False, False, False, False, False, True]
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)], lower_y_better=True) == [True, True]  # ties dominate neither


@pytest.fixture
def three(published, tiny_sae_dir):
    """(engine, model): "tiny" with its training metrics, "b" and "c" with report cards, "b" with
    interpretation scores (one of them uninformative)."""
    from store.evaluations import write_evaluation
    from trainer.publish import publish

    engine, _ = published
    for name in ("b", "c"):
        publish(tiny_sae_dir, name, engine=engine, progress=False, relate=False)
    with Session(engine) as s, s.begin():
        ids = {n: s.scalar(select(SAE.id).where(SAE.name == n)) for n in ("tiny", "b", "c")}
        write_evaluation(s, ids["b"], {"contexts": 8}, {"l0": 99.0, "fvu": 0.1}, 100)  # superseded below
        write_evaluation(s, ids["b"], {"contexts": 8}, {"l0": 4.0, "fvu": 0.9, "ce_recovered": 0.5,
                                                        "ce_recovered_ci95": 0.05, "dead_frac_eval": 0.25}, 1000)
        write_evaluation(s, ids["c"], {"contexts": 8}, {"l0": 20.0, "fvu": 0.95, "ce_recovered": 0.4,
                                                        "sparse_probing": {"sae_top_1_test_accuracy": 0.7,
                                                                           "sae_top_5_test_accuracy": 0.8},
                                                        "absorption": {"evaluated": True, "probe_accuracy": 0.9,
                                                                       "mean_absorption_fraction": 0.2}}, 1000)
        feats = {f.index: f for f in s.scalars(select(Feature).where(Feature.sae_id == ids["b"], Feature.index < 4))}
        for index, det, uninformative, emb in ((0, 0.9, False, None), (0, 0.6, False, None), (1, 0.7, False, None),
                                               (2, 1.0, True, None), (3, None, None, 0.75)):
            s.add(Explanation(feature_id=feats[index].id, text=f"latent {index}", method="explain-v1", explainer="t",
                              detection_score=det, detection_uninformative=uninformative, embedding_score=emb))
        model = s.get(SAE, ids["tiny"]).lm.name
    return engine, model


def test_compare_api_numbers_and_fronts(three):
    engine, model = three
    with make_client(engine) as c:
        body = c.get("/api/v1/compare", params={"model": model}).json()
        assert body["model"] == model and body["score"] == "detection"
        rows = {r["name"]: r for r in body["saes"]}
        assert sorted(rows) == ["b", "c", "tiny"]
        b, cc, tiny = rows["b"], rows["c"], rows["tiny"]
        assert (b["source"], b["l0"], b["fvu"], b["ce_recovered"], b["ce_recovered_ci95"], b["dead_frac"]) == (
            "evaluation", 4.0, 0.9, 0.5, 0.05, 0.25)
        # the best informative detection score of latents 0 (0.9) and 1 (0.7); latent 2's is uninformative
        assert b["interpretability"] == pytest.approx(0.8) and b["scored_latents"] == 2
        assert b["scores"]["embedding"] == {"mean": 0.75, "latents": 1}
        assert b["front"] == {"fvu": True, "ce_recovered": True, "interpretability": True, "probing_top_1": False,
                              "absorption": False}
        assert cc["front"] == {"fvu": False, "ce_recovered": False, "interpretability": False, "probing_top_1": True,
                               "absorption": True}
        assert (cc["probing_top_1"], cc["probing_top_5"], cc["absorption"]) == (0.7, 0.8, 0.2)
        assert b["probing_top_1"] is None and b["absorption"] is None
        assert tiny["source"] == "training" and tiny["l0"] is not None and tiny["interpretability"] is None
        assert b["links"] == {"page": "/saes/b", "api": "/api/v1/saes/b"}
        emb = c.get("/api/v1/compare", params={"score": "embedding"}).json()
        assert emb["model"] is None and {r["name"]: r["interpretability"] for r in emb["saes"]}["b"] == 0.75
        assert c.get("/api/v1/compare", params={"model": "nope"}).status_code == 404
        assert c.get("/api/v1/compare", params={"score": "vibes"}).status_code == 422


def test_compare_page_plots_and_table(three):
    engine, model = three
    with make_client(engine) as c:
        home = c.get("/")
        assert 'href="/compare"' in home.text and "/compare?model=" in home.text
        r = c.get("/compare", params={"model": model})
        assert r.status_code == 200
        check_page(r)
        svgs = re.findall(r'<svg class="chart pareto".*?</svg>', r.text, flags=re.DOTALL)
        assert len(svgs) == 5
        fvu, ce, interp, probing, absorbed = svgs
        assert re.findall(r'<a href="/saes/(\w+)">', probing) == ["c"] == re.findall(r'<a href="/saes/(\w+)">', absorbed)
        for svg in (fvu, ce):  # every SAE with both numbers is a point, each a link to its page
            assert sorted(re.findall(r'<a href="/saes/(\w+)">', svg)) == ["b", "c", "tiny"]
        assert re.findall(r'<a href="/saes/(\w+)">', interp) == ["b"]
        assert 'class="front"' in fvu or fvu.count("onfront") >= 1
        assert 'class="err' in ce  # b's interval
        assert "hollow" in fvu  # tiny's numbers are its training run's
        table = r.text.split('<table class="grid comparetable">')[1]
        assert re.findall(r'<td><a href="/saes/(\w+)"><b>', table) == ["b", "tiny", "c"]  # by L0, ascending
        fvus = {row["name"]: row["fvu"] for row in c.get("/api/v1/compare", params={"model": model}).json()["saes"]}
        desc = c.get("/compare", params={"model": model, "sort": "fvu", "order": "desc"}).text
        order = re.findall(r'<td><a href="/saes/(\w+)"><b>', desc.split('<table class="grid comparetable">')[1])
        assert order == sorted(fvus, key=lambda n: -fvus[n])
        assert c.get("/compare").status_code == 200
        assert c.get("/compare", params={"sort": "bogus"}).status_code == 422
        assert c.get("/compare", params={"model": "nope"}).status_code == 404
        sae_page = c.get("/saes/b").text
        assert "/compare?model=" in sae_page and "Report card" in sae_page
        assert "probing top-1" not in sae_page  # b's report card has no SAEBench measures
        c_page = c.get("/saes/c").text.split('id="report-card"')[1].split("</section>")[0]
        assert "probing top-1" in c_page and "70.0% / 80.0%" in c_page and "absorption" in c_page
        assert "probe accuracy 90.0%" in c_page


def test_compare_saebench_cases_on_both_backends(three):
    """SQLite and PostgreSQL alike: a report card with probing but an absorption the probe could not
    measure (no absorption number, its probe accuracy kept), a NaN stored as null, the fronts of the
    SAEBench columns, sorting on them with missing values last, and a NUL in the model name."""
    from store.evaluations import write_evaluation

    engine, model = three
    with Session(engine) as s, s.begin():
        tiny = s.scalar(select(SAE.id).where(SAE.name == "tiny"))
        write_evaluation(s, tiny, {"contexts": 160, "from_training": True},
                         {"l0": 30.0, "fvu": 0.5, "sparse_probing": {"sae_top_1_test_accuracy": 0.9,
                                                                     "sae_top_5_test_accuracy": float("nan")},
                          "absorption": {"evaluated": False, "probe_accuracy": 0.49,
                                         "reason": "the probe reaches F1 > 0.6 on 3 letters, fewer than 20"}}, 500)
    with make_client(engine) as c:
        rows = {r["name"]: r for r in c.get("/api/v1/compare", params={"model": model}).json()["saes"]}
        t = rows["tiny"]
        assert (t["source"], t["l0"], t["probing_top_1"], t["probing_top_5"]) == ("evaluation", 30.0, 0.9, None)
        assert (t["absorption"], t["absorption_probe_accuracy"]) == (None, 0.49)
        # probing top-1: c (L0 20, 0.7) and tiny (L0 30, 0.9) each beat the other on one axis
        assert {n: r["front"]["probing_top_1"] for n, r in rows.items()} == {"b": False, "c": True, "tiny": True}
        assert {n: r["front"]["absorption"] for n, r in rows.items()} == {"b": False, "c": True, "tiny": False}
        page = c.get("/compare", params={"model": model, "sort": "probing_top_1", "order": "desc"})
        assert page.status_code == 200
        table = page.text.split('<table class="grid comparetable">')[1]
        assert re.findall(r'<td><a href="/saes/(\w+)"><b>', table) == ["tiny", "c", "b"]  # b has none: last
        absorbed = re.findall(r'<svg class="chart pareto".*?</svg>', page.text, flags=re.DOTALL)[4]
        assert re.findall(r'<a href="/saes/(\w+)">', absorbed) == ["c"]  # tiny's absorption was not measured
        assert c.get("/api/v1/compare", params={"model": "a\x00b"}).status_code == 404
        assert c.get("/compare", params={"model": "a\x00b"}).status_code == 404
