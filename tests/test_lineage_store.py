"""Lineage in the store, the API and the pages, on SQLite and PostgreSQL: a sweep of four tiny
SAEs (two widths at two adjacent layers) trained, analysed and related from one LM pass, as the
demo does, then published (relating at publish) and served."""

from __future__ import annotations

import json
import shutil

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from store.models import SAE, FeatureLink, SAEDarkMatter, SAERelation
from tests.test_cli import assert_one_line_error, run
from tests.test_pages import check_page, make_client

SITES = ("resid_post.1", "resid_post.2")
WIDTHS = (32, 96)


def name(site: str, width: int) -> str:
    return f"tiny-l{site.split('.')[1]}-w{width}"


def topics_corpus(folder) -> str:
    """Python's pydoc topics as a local .txt corpus (one document per paragraph): real text that
    loads in milliseconds, where the full pydoc corpus parses the whole standard library."""
    from pydoc_data.topics import topics

    path = folder / "topics.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)))
    return str(path)


@pytest.fixture(scope="module")
def sweep(tiny_model_dir, tiny_lm, tmp_path_factory):
    """{published name: analysed SAE folder}: the held-out split and the training split go through the
    LM once each (both sites hooked); training, the analyses and the relations read the cache."""
    from store.settings import get_settings
    from trainer.activations import ActivationCache, LMStreamSpec
    from trainer.analyze import AnalyzeConfig, analyze
    from trainer.train import TrainConfig, train

    root = tmp_path_factory.mktemp("lineage")
    corpus = topics_corpus(root)
    cfg = TrainConfig(out=root / "sweep", model=str(tiny_model_dir), site=list(SITES), width=list(WIDTHS), k=[4],
                      tokens=12_288, batch_size=512, eval_tokens=2048, ce_contexts=2, lm_dtype="float32", device="cpu",
                      log_every=10, cache_activations=True, ctx_len=64, corpus=corpus)
    held_out = LMStreamSpec(model=cfg.model, sites=list(SITES), corpus=corpus, text_field="text", ctx_len=64, split="eval",
                            eval_fraction=0.1, seed=0, exclude_bos=True, sink_norm_ratio=10.0, lm_dtype=str(tiny_lm.dtype))
    ActivationCache(get_settings().data_dir / "activations", held_out).fill(tiny_lm, 6000, 16)
    folders = train(cfg, lm=tiny_lm)
    named = {}
    for folder in folders:
        site, width = folder.name.split("-topk-w")
        width = int(width.split("-")[0])
        analyze(AnalyzeConfig(sae_dir=folder, tokens=4000, device="cpu", lm_dtype="float32", shard_contexts=16,
                              cache_activations=True, dm_ce_contexts=2, dm_warmup_tokens=1000), tiny_lm, progress=False)
        named[name(site, width)] = folder
    return named


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def related(request, sweep, tiny_lm, tmp_path_factory):
    """A store on each backend with the four SAEs published (and related as they are published)."""
    from tests.conftest import _pg_engine, _sqlite_engine
    from trainer.publish import publish

    if request.param == "sqlite":
        engine = _sqlite_engine(tmp_path_factory.mktemp("lineage-db"))
    else:
        engine = _pg_engine(request.getfixturevalue("pg_server"))
    for n, folder in sweep.items():
        publish(folder, n, engine=engine, progress=False, relate=True, lm=tiny_lm)
    yield engine
    engine.dispose()


def test_publishing_relates_width_and_layer_pairs_from_the_cache(related, sweep):
    with Session(related) as s:
        rels = {(r.sae_a.name, r.sae_b.name): r for r in s.scalars(select(SAERelation))}
        assert set(rels) == {(name(SITES[0], 32), name(SITES[0], 96)), (name(SITES[1], 32), name(SITES[1], 96)),
                             (name(SITES[0], 32), name(SITES[1], 32)), (name(SITES[0], 96), name(SITES[1], 96))}
        for (a, b), r in rels.items():
            assert r.kind == ("width" if a.split("-w")[0] == b.split("-w")[0] else "layer")
            assert r.summary["data"]["source"].startswith("activation cache")  # no second LM pass
            assert r.n_tokens > 1000
            n_links = s.scalar(select(func.count()).select_from(FeatureLink).where(FeatureLink.relation_id == r.id))
            if r.kind == "width":  # every live child of B has exactly one row
                assert n_links == r.summary["b"]["alive"] + r.summary["splitting"]["parents"]["vanished"]
                # each parent link records how it was made, as the relation counted them
                kinds = dict(s.execute(select(FeatureLink.kind, func.count()).where(
                    FeatureLink.relation_id == r.id, FeatureLink.a_index.is_not(None),
                    FeatureLink.b_index.is_not(None)).group_by(FeatureLink.kind)).all())
                assert kinds == {k: v for k, v in r.summary["splitting"]["links"].items() if v}
            else:
                assert n_links == r.summary["matching"]["pairs"]
        assert s.scalar(select(func.count()).select_from(SAEDarkMatter)) == 4
        dm = s.get(SAEDarkMatter, s.scalar(select(SAE.id).where(SAE.name == name(SITES[1], 96)))).data
        assert dm["n_tokens"] > 0 and len(dm["by_position"]["fvu"]) == 64 and dm["spliced"]["tokens"] == 2 * 63


def test_republishing_replaces_the_relations(related, sweep, tiny_lm):
    from trainer.publish import publish

    n = name(SITES[0], 96)
    with Session(related) as s:
        before = s.scalar(select(func.count()).select_from(SAERelation))
        old_version = s.scalar(select(SAE.version).where(SAE.name == name(SITES[0], 32)))
    publish(sweep[n], n, replace=True, engine=related, progress=False, relate=True, lm=tiny_lm)
    with Session(related) as s:
        assert s.scalar(select(func.count()).select_from(SAERelation)) == before
        # its partner's pages now show the new relation: its version (part of every ETag) moved
        assert s.scalar(select(SAE.version).where(SAE.name == name(SITES[0], 32))) != old_version


def test_the_api_serves_relations_links_lineage_and_dark_matter(related):
    narrow, wide, up = name(SITES[0], 32), name(SITES[0], 96), name(SITES[1], 32)
    with make_client(related) as c:
        r = c.get("/api/v1/relations", params={"per_page": 3})
        body = r.json()
        assert r.status_code == 200 and body["total"] == 4 and body["pages"] == 2 and len(body["items"]) == 3
        assert c.get("/api/v1/relations", params={"per_page": 3, "page": 2}).json()["items"]
        assert c.get("/api/v1/relations", params={"kind": "width"}).json()["total"] == 2
        assert c.get("/api/v1/relations", params={"sae": up}).json()["total"] == 2
        one = c.get(f"/api/v1/relations/{wide}/{narrow}").json()  # either order
        assert one["a"]["name"] == narrow and one["kind"] == "width" and one["summary"]["splitting"]
        links = c.get(f"/api/v1/relations/{narrow}/{wide}/links", params={"per_page": 5, "sort": "stitch_gain",
                                                                          "order": "desc"}).json()
        assert links["total"] >= len(links["items"]) > 0 and links["per_page"] == 5
        child = next(i for i in links["items"] if i["b_index"] is not None)
        assert all(i["kind"] in ("direction", "cofiring") if i["a_index"] is not None and i["b_index"] is not None
                   else i["kind"] is None for i in links["items"])
        lin = c.get(f"/api/v1/saes/{wide}/features/{child['b_index']}/lineage").json()
        family = next(w for w in lin["widths"] if w["role"] == "child")
        assert family["other"]["name"] == narrow and family["parent"]["b_index"] == child["b_index"]
        matches = c.get(f"/api/v1/relations/{narrow}/{up}/links", params={"per_page": 500}).json()["items"]
        if matches:  # a matched latent's chain goes forward to the next layer
            m = matches[0]
            fwd = c.get(f"/api/v1/saes/{narrow}/features/{m['a_index']}/lineage").json()["forward"]
            assert fwd[0]["sae"] == up and fwd[0]["index"] == m["b_index"]
        dm = c.get(f"/api/v1/saes/{narrow}/dark-matter").json()
        assert dm["data"]["linear"]["tokens"] > 0 and dm["pairs"][0]["wider"] == wide
        lm = c.get("/api/v1/models").json()["items"][0]["name"]
        layer_map = c.get(f"/api/v1/models/{lm}/layer-map").json()
        assert layer_map["layers"] == [1, 2] and {len(r["pairs"]) for r in layer_map["rows"]} == {1}
        spec = c.get("/api/v1/openapi.json").json()
        assert "RelationList" in spec["components"]["schemas"] and "LineageOut" in spec["components"]["schemas"]
        # errors: one shape, the right status
        for url, status in ((f"/api/v1/relations/{narrow}/nope", 404), (f"/api/v1/relations/{narrow}/{name(SITES[1], 96)}", 404),
                            (f"/api/v1/relations/{narrow}/{wide}/links?label=bogus", 422),
                            ("/api/v1/relations?per_page=5000", 422), (f"/api/v1/saes/{narrow}/features/99999/lineage", 404),
                            ("/api/v1/models/nope/layer-map", 404), ("/api/v1/saes/nope/dark-matter", 404)):
            r = c.get(url)
            assert r.status_code == status, (url, r.text)
            assert set(r.json()["error"]) >= {"status", "code", "message"}


def test_the_pages_show_lineage_pairs_the_layer_map_and_what_an_sae_misses(related):
    narrow, wide, up = name(SITES[0], 32), name(SITES[0], 96), name(SITES[1], 32)
    with make_client(related) as c:
        lm = c.get("/api/v1/models").json()["items"][0]["name"]
        for url, text in ((f"/relations/{narrow}/{wide}?view=split", "splitting forest"), (f"/relations/{narrow}/{wide}", "Width pair"), (f"/relations/{narrow}/{wide}?view=novel", "Novel"),
                          (f"/relations/{narrow}/{wide}?view=vanished", "Vanished"), (f"/relations/{narrow}/{up}", "Layer pair"),
                          (f"/relations/{narrow}/{up}?view=unconfirmed", "Unconfirmed"), ("/relations", "Relations between SAEs"),
                          (f"/models/{lm}", "Layer map"), (f"/saes/{narrow}/misses", "Loss concentration"),
                          (f"/saes/{narrow}", "What this SAE misses"), (f"/saes/{narrow}/features/0", "Lineage"),
                          (f"/saes/{wide}/features/0", "Across widths")):
            r = c.get(url)
            assert r.status_code == 200 and text in r.text, (url, r.status_code)
            check_page(r)
            assert "<svg" in r.text or url.endswith("/features/0") or "relations" in url
        assert c.get(f"/relations/{narrow}/{wide}?view=persisted_split").status_code == 200
        assert "persisted and split" in c.get(f"/relations/{narrow}/{wide}").text
        # the layer map's bars name their width: both widths have a 1 -> 2 pair
        page = c.get(f"/models/{lm}").text
        assert "1→2 · 32" in page and "1→2 · 96" in page
        assert c.get(f"/relations/{narrow}/{wide}?view=matched").status_code == 422
        assert c.get(f"/relations/{narrow}/{narrow}").status_code == 404
        assert c.get(f"/saes/{narrow}/misses").text.count('class="ex"') > 0  # the nonlinear-error contexts


def test_feature_pages_follow_their_relations_from_the_render_cache(related):
    """The feature page keeps the relation graph in memory while no published SAE changes: a page
    from the render cache equals a fresh render, a rewritten relation (a new row, new links) shows
    at once under a new ETag, and so does a relation written further along an SAE's chains (its
    own version unchanged)."""
    import numpy as np

    import store
    from store import lineage
    from store.relations import write_relation

    low, high, side = name(SITES[0], 96), name(SITES[1], 96), name(SITES[0], 32)
    with make_client(related) as c:
        url, side_url = f"/saes/{high}/features/0", f"/saes/{side}/features/0"
        first, side_first = c.get(url), c.get(side_url)
        assert first.status_code == 200 and "Lineage" in first.text
        assert c.get(url).text == first.text  # the same browser (CSRF cookie): the cached page
        store.RENDERED.clear()
        assert c.get(url).text == first.text  # ... equals a fresh render
        with Session(related) as s:
            side_version = s.scalar(select(SAE.version).where(SAE.name == side))
            side_tag = lineage.relation_graph(s).tag(s.scalar(select(SAE.id).where(SAE.name == side)))
        # the layer pair rewritten: latent 0 of the upper SAE now matches latent 95 of the lower one
        one = {"a": np.array([95]), "b": np.array([0]), "label": np.array(["matched"]), "kind": np.array([""]),
               "cos": np.array([0.987]), "rho": np.array([0.5])}
        one.update({k: np.array([np.nan]) for k in ("p_b_given_a", "p_a_given_b", "stitch_gain")})
        write_relation(related, low, high, "layer", {"tokens": 1}, one)
        again = c.get(url, headers={"If-None-Match": first.headers["etag"]})
        assert again.status_code == 200 and again.headers["etag"] != first.headers["etag"]
        assert f'href="/saes/{low}/features/95"' in again.text and "cos 0.99" in again.text
        store.RENDERED.clear()
        assert c.get(url).text == again.text
        # the narrower SAE at the lower layer is not part of that relation, but its chains run through it
        with Session(related) as s:
            assert s.scalar(select(SAE.version).where(SAE.name == side)) == side_version
            assert lineage.relation_graph(s).tag(s.scalar(select(SAE.id).where(SAE.name == side))) != side_tag
        side_again = c.get(side_url, headers={"If-None-Match": side_first.headers["etag"]})
        assert side_again.status_code == 200 and side_again.headers["etag"] != side_first.headers["etag"]
        # the API's lineage reads the same graph
        back = c.get(f"/api/v1/saes/{high}/features/0/lineage").json()["backward"]
        assert back == [{"sae": low, "site": SITES[0], "layer": 1, "index": 95, "cos": 0.987, "rho": 0.5,
                         "label": "matched", "page": f"/saes/{low}/features/95"}]


def test_relate_command_and_its_one_line_errors(related, sweep, capsys, monkeypatch, tmp_path):
    from app.cli import main
    from store.db import get_engine
    from store.settings import get_settings
    from trainer.publish import publish

    monkeypatch.setenv("DATABASE_URL", related.url.render_as_string(hide_password=False))
    get_settings.cache_clear()
    get_engine.cache_clear()
    try:
        narrow, wide = name(SITES[0], 32), name(SITES[1], 96)
        code = main(["relate", wide, narrow, "--tokens", "3000"])
        out = capsys.readouterr().out
        assert code == 0 and f"related {narrow} (A) and {wide} (B) as a layer pair on 3,000 tokens" in out
        assert_one_line_error(*run(capsys, "relate", narrow, "nope"), "no published SAE named 'nope'")
        assert_one_line_error(*run(capsys, "relate", narrow, narrow), "cannot relate", "to itself")
        assert_one_line_error(*run(capsys, "relate", narrow, wide, "--tokens", "0"), "must be positive")
        # an SAE of another model: the same analysis published under another LM name
        other = tmp_path / "other"
        shutil.copytree(sweep[narrow], other)
        summary = json.loads((other / "analysis" / "summary.json").read_text())
        summary["lm"]["name"] = "another-model"
        (other / "analysis" / "summary.json").write_text(json.dumps(summary))
        publish(other, "elsewhere", engine=related, progress=False, relate=False)
        assert_one_line_error(*run(capsys, "relate", narrow, "elsewhere"), "only SAEs of one model")
        with Session(related) as s, s.begin():
            s.delete(s.scalar(select(SAE).where(SAE.name == "elsewhere")))
    finally:
        get_settings.cache_clear()
        get_engine.cache_clear()


def test_the_migration_goes_down_and_up_again(engine):
    from alembic import command
    from sqlalchemy import inspect

    from store.db import alembic_config, upgrade

    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0003")
    assert "sae_relations" not in inspect(engine).get_table_names()
    upgrade(engine, "head")
    assert {"sae_relations", "feature_links", "sae_dark_matter"} <= set(inspect(engine).get_table_names())


@pytest.mark.browser
def test_lineage_pages_in_headless_chromium(related, tmp_path):
    """The pair page, a tree of its forest, a child's feature page and the misses page in Chromium:
    the links lead where they say, and nothing trips the Content-Security-Policy."""
    import os
    import threading
    import time
    from pathlib import Path

    if related.dialect.name != "sqlite":
        pytest.skip("one backend is enough in the browser")
    chromium = os.environ.get("SAE_ATLAS_CHROMIUM", "/usr/bin/chromium")
    if not Path(chromium).is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"Chromium is missing at {chromium} in CI")
        pytest.skip(f"headless Chromium is not installed at {chromium}")
    import uvicorn
    from playwright.sync_api import sync_playwright

    from app.main import create_app
    from store.settings import get_settings
    from tests.helpers import free_port
    from tests.test_pages_browser import CHROMIUM_ARGS, htmx_file

    settings = get_settings()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine=related, settings=settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    htmx = htmx_file().read_bytes()
    narrow, wide = name(SITES[0], 32), name(SITES[0], 96)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
            context = browser.new_context()

            def route(r):
                if r.request.url == settings.htmx_url:
                    return r.fulfill(status=200, body=htmx, headers={"Content-Type": "application/javascript"})
                return r.continue_() if r.request.url.startswith(base) else r.abort()

            context.route("**/*", route)
            page = context.new_page()
            errors = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.add_init_script("document.addEventListener('securitypolicyviolation', e => "
                                 "console.error('CSP violation: ' + e.violatedDirective));")
            with make_client(related) as c:  # a view of the pair that lists latents of the wider SAE
                view = next(v for v in ("split", "persisted", "novel", "reconstruction") if c.get(
                    f"/api/v1/relations/{narrow}/{wide}/links", params={"label": v, "per_page": 1}).json()["total"])
            page.goto(f"{base}/relations/{narrow}/{wide}?view={view}")
            assert page.locator("svg.chart").count() >= 2  # the best-match histograms
            link = page.locator(f"#links a[href^='/saes/{wide}/features/']").first
            href = link.get_attribute("href")
            assert href.startswith(f"/saes/{wide}/features/")
            link.click()
            page.wait_for_url(f"{base}{href}")
            assert page.locator("#lineage").is_visible() and "Across widths" in page.locator("#lineage").inner_text()
            page.goto(f"{base}/saes/{narrow}/misses")
            assert page.locator("svg.chart").count() >= 2 and page.locator(".ex").count() > 0
            page.screenshot(path=str(tmp_path / "misses.png"), full_page=True)
            assert errors == [], errors
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
