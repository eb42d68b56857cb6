"""Semantic and merged explanation search on real embeddings, the API's errors, and publishing with
explanations (every latent that fired gets a token-pattern explanation and an embedding score)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import store
from app.autointerp.synthetic import make_synthetic_sae
from app.models import SAE, Explanation, ExplanationEmbedding, Feature
from tests.test_api import assert_error, make_client
from trainer.interpret.embedder import get_embedder
from trainer.interpret.vectors import write_embeddings

# Crafted explanations: none of them shares a word with the queries below.
CRAFTED = {
    3: "‹)› right parenthesis (97 % of top examples), after ‹ x›; promotes ‹:›",  # token_pattern's wording
    5: "‹ just› (100 % of top examples), after ‹This›/‹It›; promotes ‹ accred›",
    7: "names of rivers and lakes in Europe",
    9: "the keyword def that starts a function definition",
    11: "numbers written as digits, like 42 or 1999",
}


def add_explained(engine, items: dict[int, str], sae: str = "synthetic") -> list[int]:
    """Explanations with their real embeddings, as publish and the worker store them."""
    embedder = get_embedder()
    with Session(engine) as s, s.begin():
        sae_row = s.scalar(select(SAE).where(SAE.name == sae))
        feats = {f.index: f for f in s.scalars(select(Feature).where(Feature.sae_id == sae_row.id,
                                                                     Feature.index.in_(list(items))))}
        rows = [Explanation(feature_id=feats[i].id, text=t, method="test", explainer="test") for i, t in items.items()]
        s.add_all(rows)
        s.flush()
        for i, r in zip(items, rows):
            feats[i].explanation = r.text
        write_embeddings(s, [r.id for r in rows], [sae_row.id] * len(rows), embedder.embed(list(items.values())),
                         embedder.name)
        return [r.id for r in rows]


@pytest.fixture
def searchable(engine, one_torch_thread):
    store.forget_caches()
    make_synthetic_sae(engine, n_features=20)
    add_explained(engine, CRAFTED)
    yield engine
    store.forget_caches()


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_semantic_search_finds_meaning_without_shared_words(searchable):
    with make_client(searchable) as c:
        def top(q, mode="semantic"):
            r = c.get("/api/v1/search/explanations", params={"q": q, "mode": mode})
            assert r.status_code == 200, r.text
            return r.json()

        for q, index in (("closing bracket", 3), ("the word just", 5)):
            hit = top(q)["items"][0]
            assert hit["index"] == index and hit["match"]["similarity"] >= 0.2, hit
        assert not words("closing bracket") & words(CRAFTED[3])
        assert top("closing bracket", "keyword")["items"] == []  # no shared word: keyword search finds nothing
        merged = top("closing bracket", "merged")
        assert merged["mode"] == "merged" and merged["items"][0]["index"] == 3
        assert merged["semantic"] == {"model": "all-minilm-l6-v2", "available": True, "message": None}
        assert top("zebra crossing stripes")["items"] == []  # nothing about it: below min_similarity
        both = top("function definition keyword", "merged")["items"]
        assert both[0]["index"] == 9 and both[0]["match"]["keyword_rank"] == 1 and both[0]["match"]["semantic_rank"] == 1
        page = c.get("/api/v1/search/explanations", params={"q": "text", "min_similarity": -1, "per_page": 2,
                                                            "page": 2, "mode": "semantic"}).json()
        assert page["total"] == 5 and page["pages"] == 3 and len(page["items"]) == 2 and page["per_page"] == 2
        html = c.get("/search", params={"q": "closing bracket"}).text
        assert "/saes/synthetic/features/3" in html and "by words and meaning" in html


def test_new_explanations_are_found_without_reloading_everything(searchable):
    from app.store import search as search_store

    with make_client(searchable) as c:
        assert c.get("/api/v1/search/explanations", params={"q": "colour of the sky"}).json()["items"] == []
        (key,) = [k for k in search_store._matrices]
        before = search_store._matrices[key]
        add_explained(searchable, {13: "blue and azure shades"})
        hit = c.get("/api/v1/search/explanations", params={"q": "colour of the sky"}).json()["items"][0]
        assert hit["index"] == 13
        after = search_store._matrices[key]
        assert len(after.ids) == len(before.ids) + 1 and after.watermark[1] == 6
        assert np.shares_memory(before.vectors, before.vectors)  # the old matrix is untouched, not mutated


def test_bad_queries_and_a_missing_model(searchable, monkeypatch):
    from app.settings import get_settings

    with make_client(searchable) as c:
        url = "/api/v1/search/explanations"
        assert_error(c.get(url, params={"q": ""}), 422)
        assert "empty" in assert_error(c.get(url, params={"q": "   "}), 422)["message"]
        assert_error(c.get(url, params={"q": "x" * 10_000}), 422)
        assert_error(c.get(url, params={"q": "x", "mode": "fuzzy"}), 422)
        monkeypatch.setenv("SAE_ATLAS_EMBEDDING_MODEL", "/no/such/embedding-model")
        get_settings.cache_clear()
        try:
            err = assert_error(c.get(url, params={"q": "closing bracket", "mode": "semantic"}), 503)
            assert err["code"] == "embedding_model_unavailable" and "/no/such/embedding-model" in err["message"]
            kw = c.get(url, params={"q": "rivers", "mode": "keyword"}).json()
            assert [i["index"] for i in kw["items"]] == [7]
            merged = c.get(url, params={"q": "rivers"}).json()  # merged falls back to keyword, and says so
            assert merged["mode"] == "keyword" and [i["index"] for i in merged["items"]] == [7]
            assert merged["semantic"]["available"] is False and "no/such" in merged["semantic"]["message"]
            page = c.get("/search", params={"q": "rivers", "mode": "semantic"})
            assert page.status_code == 200 and "Semantic search is unavailable" in page.text
            assert "/saes/synthetic/features/7" in page.text
        finally:
            monkeypatch.delenv("SAE_ATLAS_EMBEDDING_MODEL")
            get_settings.cache_clear()


def test_publish_explains_and_scores_every_latent(engine, tiny_sae_dir, one_torch_thread, monkeypatch):
    from trainer.interpret import at_publish
    from trainer.publish import publish

    monkeypatch.setattr(at_publish, "N_POS", 4)
    monkeypatch.setattr(at_publish, "N_NEG", 4)
    store.forget_caches()
    publish(tiny_sae_dir, "tiny", engine=engine, progress=False, explain=True)
    with Session(engine) as s:
        sae = s.scalar(select(SAE).where(SAE.name == "tiny"))
        feats = s.scalars(select(Feature).where(Feature.sae_id == sae.id)).all()
        fired = [f for f in feats if f.firing_count > 0]
        expls = {e.feature_id: e for e in s.scalars(select(Explanation))}
        assert fired and all(f.explanation and f.id in expls for f in fired)
        assert all(expls[f.id].explainer == "token-pattern" and expls[f.id].embedding_score is not None for f in fired)
        assert s.query(ExplanationEmbedding).count() == len(expls)
        auto = sae.metrics["autointerp"]
        assert auto["n"] == len(fired) and auto["shuffled_mean"] is not None and auto["model"] == "all-minilm-l6-v2"
        f = fired[0]
    with make_client(engine) as c:
        html = c.get(f"/saes/tiny/features/{f.index}").text
        assert 'id="interpretation"' in html and "embedding AUROC" in html and "shuffled explanations" in html
        api = c.get(f"/api/v1/saes/tiny/features/{f.index}").json()
        assert api["explanation"] == f.explanation and api["explanations"][0]["embedding_score"] is not None
