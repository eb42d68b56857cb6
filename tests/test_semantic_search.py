"""Semantic and merged explanation search on real embeddings, the API's errors, and publishing with
explanations (every latent that fired gets a token-pattern explanation and an embedding score)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

import store
from tests.synthetic_sae import make_synthetic_sae
from store.models import SAE, Example, Explanation, ExplanationEmbedding, Feature
from tests.test_api import assert_error, make_client
from trainer.interpret import token_pattern
from trainer.interpret.embedder import get_embedder
from store.vectors import document_text
from store.vectors import write_embeddings

# Crafted explanations in token_pattern's wording, and two an LM might write. The queries below
# share no word with the one they must find, except "just", which is the token itself.
CRAFTED = {
    3: "‹)› right parenthesis (97 % of top examples), after ‹ x›; promotes ‹:›",
    5: "the word ‹ just› (100 % of top examples), after ‹This›/‹It›; promotes ‹ accred›",
    7: "names of rivers and lakes in Europe",
    9: "the keyword def that starts a function definition",
    11: "numbers written as digits, like 42 or 1999",
    # token-pattern distractors: everything below also says "the word"
    12: "the word ‹ the› (60 % of top examples), ‹ a› (20 %); promotes ‹ function›",
    14: "the word ‹ return› (90 % of top examples), after ‹    ›; promotes ‹ None›",
    15: "the word piece ‹ited› (50 % of top examples), after ‹ accred›; promotes ‹ by›",
    16: "the word ‹ import› (85 % of top examples), after ‹↵›; promotes ‹ os›",
    17: "‹,› comma (88 % of top examples); promotes ‹ and›",
}


def add_explained(engine, items: dict[int, str], sae: str = "synthetic", vectors: bool = True) -> list[int]:
    """Explanations with their real embeddings, as publish and the worker store them (vectors=False:
    as stored before migration 0005 or while the embedding model was missing)."""
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
        if vectors:
            write_embeddings(s, [r.id for r in rows], [sae_row.id] * len(rows),
                             embedder.embed([document_text(t) for t in items.values()]), embedder.name)
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

        # well above the 0.2 cut-off, and first among explanations that all say "the word ‹…›"
        for q, index in (("closing bracket", 3), ("the word just", 5)):
            hit = top(q)["items"][0]
            assert hit["index"] == index and hit["match"]["similarity"] >= 0.35, hit
        assert not words("closing bracket") & words(CRAFTED[3])
        assert top("closing bracket", "keyword")["items"] == []  # no shared word: keyword search finds nothing
        merged = top("closing bracket", "merged")
        assert merged["mode"] == "merged" and merged["items"][0]["index"] == 3
        assert merged["semantic"] == {"model": "all-minilm-l6-v2", "available": True, "message": None}
        assert top("zebra crossing stripes")["items"] == []  # nothing about it: below min_similarity
        both = top("function definition keyword", "merged")["items"]
        assert both[0]["index"] == 9 and both[0]["match"]["keyword_rank"] == 1 and both[0]["match"]["semantic_rank"] == 1
        page = c.get("/api/v1/search/explanations", params={"q": "text", "min_similarity": -1, "per_page": 4,
                                                            "page": 3, "mode": "semantic"}).json()
        assert page["total"] == 10 and page["pages"] == 3 and len(page["items"]) == 2 and page["per_page"] == 4
        html = c.get("/search", params={"q": "closing bracket"}).text
        assert "/saes/synthetic/features/3" in html and "by words and meaning" in html


COMMON = ["the", "a", "return", "def", "import", "for", "in", "if", "else", "self", "value", "list", "string", "file",
          "name", "class", "function", "module", "type", "print", "error", "data", "number", "object", "key", "path",
          "line", "code", "with", "while"]


def test_the_floor_follows_the_query_when_every_explanation_says_the_word(engine, one_torch_thread):
    """30 latents explained by token_pattern as "the word ‹ X›", and the just-latent: "the word just"
    is 0.2-0.4 similar to a third of them (above the fixed 0.2 floor), 0.55 to its own."""
    from trainer.interpret import token_pattern

    store.forget_caches()
    make_synthetic_sae(engine, name="words", n_features=40)
    vocab = [" " + w for w in COMMON] + [" just", "This", "It", " accred"]
    st = token_pattern.TokenStats
    texts = {i: token_pattern.describe(st(10, [(i, 0.8)], [], [i + 1 if i + 1 < len(COMMON) else 0]), vocab.__getitem__)
             for i in range(len(COMMON))}
    just = len(COMMON)
    texts[just] = token_pattern.describe(st(10, [(just, 1.0)], [(just + 1, 0.6), (just + 2, 0.4)], [just + 3]),
                                         vocab.__getitem__)
    assert texts[just] == "the word ‹ just› (100 % of top examples), after ‹This›/‹It›; promotes ‹ accred›"
    add_explained(engine, texts, sae="words")
    with make_client(engine) as c:
        def hits(**params):
            r = c.get("/api/v1/search/explanations", params={"q": "the word just", "mode": "semantic", **params})
            assert r.status_code == 200, r.text
            return r.json()["items"]

        fixed_only = hits(min_above_typical=0)
        assert len(fixed_only) >= 10 and fixed_only[0]["index"] == just  # ranked right, but a third pass
        relative = hits()
        assert relative[0]["index"] == just and relative[0]["match"]["similarity"] >= 0.35
        assert len(relative) <= 3  # the query is ~0.18 similar to the typical one: the floor is ~0.28
        assert c.get("/api/v1/search/explanations", params={"q": "x", "min_above_typical": -1}).status_code == 422


def test_new_explanations_are_found_without_reloading_everything(searchable):
    from store import search as search_store

    with make_client(searchable) as c:
        assert c.get("/api/v1/search/explanations", params={"q": "colour of the sky"}).json()["items"] == []
        (key,) = [k for k in search_store._matrices]
        before = search_store._matrices[key]
        add_explained(searchable, {13: "blue and azure shades"})
        hit = c.get("/api/v1/search/explanations", params={"q": "colour of the sky"}).json()["items"][0]
        assert hit["index"] == 13
        after = search_store._matrices[key]
        assert len(after.ids) == len(before.ids) + 1 and after.watermark[1] == len(CRAFTED) + 1
        assert np.shares_memory(before.vectors, before.vectors)  # the old matrix is untouched, not mutated


def test_bad_queries_and_a_missing_model(searchable, monkeypatch):
    from store.settings import get_settings

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


class StopsAfter:
    """The real embedder, interrupted (as by Ctrl-C) after `calls` embed calls."""

    def __init__(self, inner, calls: int):
        self.inner, self.calls, self.name = inner, calls, inner.name

    def check(self):
        self.inner.check()

    def embed(self, texts):
        self.calls -= 1
        if self.calls < 0:
            raise KeyboardInterrupt
        return self.inner.embed(texts)


def test_backfill_embeds_what_has_no_vector_resumably(searchable, monkeypatch, capsys):
    from app.cli import main
    from store.db import get_engine
    from store.settings import get_settings
    from trainer.interpret.backfill import embed_missing

    add_explained(searchable, {18: "strings in double quotes", 19: "the colour of the sky", 2: "blue-green algae"},
                  vectors=False)
    with make_client(searchable) as c:
        def found(q):
            r = c.get("/api/v1/search/explanations", params={"q": q, "mode": "semantic"})
            return [i["index"] for i in r.json()["items"]]

        assert 19 not in found("blue heavens")  # no vector: semantic search cannot see it
        with pytest.raises(KeyboardInterrupt):
            embed_missing(searchable, StopsAfter(get_embedder(), 1), sae_name="synthetic", chunk=2, progress=False)
        with Session(searchable) as s:  # the first chunk was committed before the interruption
            assert s.scalar(select(func.count()).select_from(ExplanationEmbedding)) == len(CRAFTED) + 2
        monkeypatch.setenv("SAE_ATLAS_DATABASE_URL", searchable.url.render_as_string(hide_password=False))
        get_settings.cache_clear()
        get_engine.cache_clear()  # the CLI's store: this test's
        try:
            assert main(["embed-explanations", "--sae", "synthetic", "--chunk", "2"]) == 0
            assert "embedded 1 explanations of SAE synthetic with all-minilm-l6-v2 (12 already" in capsys.readouterr().out
            assert main(["embed-explanations"]) == 0  # nothing left: nothing redone
            assert "embedded 0 explanations of all SAEs" in capsys.readouterr().out
            assert main(["embed-explanations", "--sae", "nope"]) != 0
            assert "no SAE named 'nope'" in capsys.readouterr().err
            assert main(["embed-explanations", "--chunk", "0"]) != 0
        finally:
            get_engine().dispose()
            get_engine.cache_clear()
            monkeypatch.delenv("SAE_ATLAS_DATABASE_URL")
            get_settings.cache_clear()
        assert found("blue heavens")[0] == 19 and found("text between quotation marks")[0] == 18
        with Session(searchable) as s:
            ids = s.scalars(select(ExplanationEmbedding.explanation_id)).all()
            assert len(ids) == len(set(ids)) == len(CRAFTED) + 3


def test_publish_explains_and_scores_every_latent(engine, tiny_sae_dir, one_torch_thread, monkeypatch):
    from trainer.interpret import windows
    from trainer.publish import publish

    monkeypatch.setattr(windows, "N_POS", 2)  # few windows: this checks the wiring, not the scores
    monkeypatch.setattr(windows, "N_NEG", 2)
    store.forget_caches()
    publish(tiny_sae_dir, "tiny", engine=engine, progress=False, explain=True)
    with Session(engine) as s:
        sae = s.scalar(select(SAE).where(SAE.name == "tiny"))
        feats = s.scalars(select(Feature).where(Feature.sae_id == sae.id)).all()
        fired = [f for f in feats if f.firing_count > 0]
        expls = {e.feature_id: e for e in s.scalars(select(Explanation))}
        assert fired and all(f.explanation and f.id in expls for f in fired)
        assert all(expls[f.id].explainer == "token-pattern" and expls[f.id].method == token_pattern.METHOD for f in fired)
        # the score is on held-out windows (not the top examples the explanation was written from):
        # a latent that fired so rarely that its few other examples overlap its top examples has
        # none to score on
        held_out = dict(s.execute(select(Example.feature_id, func.count()).where(Example.kind != 0)
                                  .group_by(Example.feature_id)).all())
        unscored = [f for f in fired if expls[f.id].embedding_score is None]
        assert len(unscored) <= 0.1 * len(fired)
        assert all(held_out.get(f.id, 0) <= 4 for f in unscored), [(f.index, held_out.get(f.id)) for f in unscored]
        auto = sae.metrics["autointerp"]
        assert auto["n"] == len(fired) - len(unscored) and auto["shuffled_mean"] is not None and auto["model"] == "all-minilm-l6-v2"
        assert auto["n_pos"] == 2 and sum(auto["negatives_from"].values()) == len(feats)
        # windows shared between latents are embedded once: far fewer than 2 per latent
        assert auto["fixed_blocks"] > 0 and auto["distinct_texts"] <= auto["windows"] + 2 * len(fired)
        # the stored search vector is the explanation's own embedding (chips read as quotes)
        e = expls[fired[0].id]
        (v,) = s.scalars(select(ExplanationEmbedding.vector).where(ExplanationEmbedding.explanation_id == e.id))
        ref = get_embedder().embed([document_text(e.text)])[0]
        assert s.query(ExplanationEmbedding).count() == len(expls)
        assert float(np.frombuffer(v, "<f4") @ ref) > 0.999
        f = fired[0]
    with make_client(engine) as c:
        html = c.get(f"/saes/tiny/features/{f.index}").text
        assert 'id="interpretation"' in html and "embedding AUROC" in html and "shuffled explanations" in html
        api = c.get(f"/api/v1/saes/tiny/features/{f.index}").json()
        assert api["explanation"] == f.explanation and api["explanations"][0]["embedding_score"] is not None
