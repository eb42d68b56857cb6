"""The graph page in real headless Chromium (Playwright, the system's /usr/bin/chromium), with every
request that leaves the machine aborted (htmx's CDN too): static/graph.js draws the nodes, the
pruning slider hides nodes, a click pins a node into the URL, hover shows the node, steering it fills the
before/after table (an "after" column for the frozen and the live model, the latter through an
inference service on a Unix socket), and the CSP reports no violation. Skipped only where Chromium is missing outside CI (as test_pages_browser.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_graphs import PROMPT, done_graph, store_engine, tiny_set  # noqa: F401  (fixtures)
from tests.test_pages_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, IN_CI

pytestmark = [pytest.mark.browser, pytest.mark.usefixtures("one_torch_thread")]

if not Path(CHROMIUM).is_file() and not IN_CI:
    pytest.skip(f"headless Chromium is not installed at {CHROMIUM}", allow_module_level=True)


@pytest.fixture(scope="module")
def served(store_engine, tmp_path_factory):  # noqa: F811
    """The site on a port, with an inference service (a Unix socket) for the live steering."""
    from app.inference.service import create_service_app
    from app.main import create_app
    from store.settings import get_settings
    from tests.helpers import free_port
    from tests.live_support import serving

    sock = str(tmp_path_factory.mktemp("graph-page-live") / "inference.sock")
    settings = get_settings().model_copy(update={"inference": "on", "inference_url": f"unix:{sock}", "device": "cpu",
                                                 "inference_threads": 1, "inference_rate_per_minute": 0})
    with serving(create_service_app(settings, db_engine=store_engine), uds=sock):
        port = free_port()
        with serving(create_app(engine=store_engine, settings=settings), port=port):
            yield f"http://127.0.0.1:{port}"


def test_the_graph_draws_prunes_and_pins_offline(served, done_graph):  # noqa: F811
    from playwright.sync_api import sync_playwright

    base = served
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        context.route("**/*", lambda r: r.continue_() if r.request.url.startswith(base) else r.abort())
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "CSP" in m.text else None)
        page.add_init_script("document.addEventListener('securitypolicyviolation', e => "
                             "console.error('CSP violation: ' + e.violatedDirective + ' ' + e.blockedURI));")
        try:
            page.goto(f"{base}/graphs/{done_graph}")
            page.wait_for_selector("#graphsvg[data-ready='1']", timeout=15_000)
            nodes = page.locator("#graphsvg .node")
            total = nodes.count()
            assert total > 10
            assert page.locator("#graphsvg circle.cross-layer-transcoder").count() > 0
            assert page.locator("#graphsvg line").count() > 0
            # prune to the most influential 10 %: fewer nodes (embeddings and logits stay)
            page.locator("#graphprune").fill("0.1")
            page.locator("#graphprune").dispatch_event("input")
            pruned = nodes.count()
            kept = page.locator("#graphsvg .embedding, #graphsvg .logit").count()
            assert kept <= pruned < total
            page.locator("#graphprune").fill("1")
            page.locator("#graphprune").dispatch_event("input")
            assert nodes.count() == total
            # hover, then pin a feature node: it lands in the URL's fragment and the pinned list
            feature = page.locator("#graphsvg circle.cross-layer-transcoder").first
            node_id = feature.get_attribute("data-id")
            feature.hover()
            page.locator("#graphtip").wait_for(state="visible", timeout=5000)
            assert node_id in page.locator("#graphtip").inner_text()
            feature.click()
            assert f"pinned={node_id}" in page.evaluate("location.hash")
            assert page.locator("#graphpinned li").count() == 1
            assert page.locator(f"#graphsvg .node.pinned[data-id='{node_id}']").count() == 1
            # pin a second node and group both into a supernode (the name prompt is dismissed: a default name)
            other = page.locator("#graphsvg .node:not(.pinned)").first
            other_id = other.get_attribute("data-id")
            other.click()
            page.locator("#graphgroup").click()
            assert page.locator("#graphsupernodes li").count() == 1
            assert page.locator("#graphsvg .node.super").count() == 2
            assert "supernodes=" in page.evaluate("location.hash") and other_id in page.evaluate("location.hash")
            # reloading restores pins and supernodes from the URL
            page.reload()
            page.wait_for_selector("#graphsvg[data-ready='1']", timeout=15_000)
            assert page.locator("#graphsvg .node.super").count() == 2 and page.locator("#graphpinned li").count() == 2
            other = page.locator(f"#graphsvg .node[data-id='{other_id}']")
            if other.evaluate("e => e.classList.contains('cross-layer-transcoder')"):
                other.click()  # unpin it, so that the feature pinned first is the one steered
            # steer the pinned feature: ablate it in the frozen and the live model (the default): the
            # top-10 table gets an "after" column for each, and the graph's logits their changes
            page.locator("#steervalue").fill("0")
            page.locator("#graphsteer button[type=submit]").click()
            page.wait_for_selector("#steerresult table.steertop", timeout=60_000)
            top = page.locator("#steerresult table.steertop")
            assert top.locator("tr").count() == 11, page.locator("#steerresult").inner_text()  # a header and the top 10
            header = top.locator("tr").first.inner_text()
            assert "after, frozen" in header and "after, live" in header, header
            assert page.locator("#steerresult .steererror").count() == 0, page.locator("#steerresult").inner_text()
            n_logits = page.locator("#graphsvg .logit").count()
            assert page.locator("#steerresult table.steertargets tr").count() == n_logits + 1
            # only the live model, doubling the feature
            page.locator("#steerhow").select_option("multiplier")
            page.locator("#steervalue").fill("2")
            page.locator("#steermode").select_option("live")
            page.locator("#graphsteer button[type=submit]").click()
            page.wait_for_function("() => { const t = document.querySelector('#steerresult table.steertop');"
                                   " return t && !t.rows[0].innerText.includes('frozen'); }", timeout=60_000)
            assert "after, live" in top.locator("tr").first.inner_text()
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "graph-page.png"), full_page=True)
        finally:
            context.close()
            browser.close()
    assert errors == [], errors


def test_a_stored_caption_pins_and_supernodes_open_with_the_graph(served, done_graph, store_engine):  # noqa: F811
    """A graph stored with metadata.caption and qParams (as the demo's example graphs are) opens
    with that caption, those pins and that supernode when the URL names none; a URL's own pins win."""
    from playwright.sync_api import sync_playwright
    from sqlalchemy.orm import Session

    from store import graphs as gstore

    with Session(store_engine) as session:
        row = gstore.get_graph(session, done_graph)
        original = gstore.unpack(row.graph)
        data = gstore.unpack(row.graph)
        features = [n["node_id"] for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"][:3]
        data["metadata"]["caption"] = "A caption stored with the graph."
        data["qParams"]["pinnedIds"] = features
        data["qParams"]["supernodes"] = [["two features", *features[:2]]]
        gstore.set_graph_data(session, row.id, data)
        session.commit()
    base = served
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            context.route("**/*", lambda r: r.continue_() if r.request.url.startswith(base) else r.abort())
            page = context.new_page()
            page.goto(f"{base}/graphs/{done_graph}")
            page.wait_for_selector("#graphsvg[data-ready='1']", timeout=15_000)
            assert page.locator("#graphcaption").inner_text() == "A caption stored with the graph."
            assert page.locator("#graphpinned li").count() == 3
            assert page.locator("#graphsupernodes li").count() == 1
            assert page.locator("#graphsupernodes li").inner_text().startswith("two features")
            page.goto(f"{base}/graphs/{done_graph}#pinned={features[2]}")
            page.reload()
            page.wait_for_selector("#graphsvg[data-ready='1']", timeout=15_000)
            assert page.locator("#graphpinned li").count() == 1 and page.locator("#graphsupernodes li").count() == 0
            browser.close()
    finally:
        with Session(store_engine) as session:
            gstore.set_graph_data(session, gstore.get_graph(session, done_graph).id, original)
            session.commit()
