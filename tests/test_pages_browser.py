"""The pages in real headless Chromium (Playwright for Python, the system's /usr/bin/chromium).

The app is served by uvicorn on 127.0.0.1 in a background thread. htmx is not fetched from its
CDN: the pinned CDN URL is routed to dist/htmx.min.js of the `htmx.org` npm package installed
for the tests (npm install, cached under data/test-deps), and the integrity hash in the settings
must match that file — so these tests also prove that the SRI hash and the CSP let htmx run.
Every other request that leaves the machine is aborted. Screenshots go to test-artifacts/.

Skipped (with the reason) only when Chromium is missing and CI is not "true"; in CI they must run.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("SAE_ATLAS_CHROMIUM", "/usr/bin/chromium")
IN_CI = os.environ.get("CI") == "true"
ARTIFACTS = REPO / "test-artifacts"
HTMX_VERSION = "2.0.4"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]

pytestmark = pytest.mark.browser

if not Path(CHROMIUM).is_file() and not IN_CI:
    pytest.skip(f"headless Chromium is not installed at {CHROMIUM} (apt-get install chromium); "
                "these tests run in CI", allow_module_level=True)


def htmx_file() -> Path:
    """dist/htmx.min.js of the htmx.org npm package, installed once under data/test-deps."""
    prefix = Path(os.environ.get("SAE_ATLAS_TEST_DEPS", REPO / "data" / "test-deps"))
    path = prefix / "node_modules" / "htmx.org" / "dist" / "htmx.min.js"
    if not path.is_file():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("npm is needed to install the htmx.org package for the browser tests (apt-get install npm)")
        prefix.mkdir(parents=True, exist_ok=True)
        subprocess.run([npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--no-save",
                        f"htmx.org@{HTMX_VERSION}"], check=True, capture_output=True, text=True, timeout=300)
    return path


@pytest.fixture(scope="module")
def atlas_db(tmp_path_factory, tiny_sae_dir):
    """(engine, API key): the tiny SAE published to SQLite, with two explanations."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from store.db import make_engine, upgrade
    from store.models import SAE, Explanation, Feature
    from app.security import create_key
    from trainer.publish import publish

    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('browser') / 'atlas.db'}")
    upgrade(engine)
    publish(tiny_sae_dir, "tiny", engine=engine, progress=False)
    with Session(engine) as s, s.begin():
        sae_id = s.scalar(select(SAE.id).where(SAE.name == "tiny"))
        for index, text in ((0, "closing parentheses in function calls"), (7, "import statements")):
            f = s.scalar(select(Feature).where(Feature.sae_id == sae_id, Feature.index == index))
            s.add(Explanation(feature_id=f.id, text=text, method="explain-v1", explainer="test", detection_score=0.8))
            f.explanation, f.best_score = text, 0.8
        key = create_key(s, "browser")
    yield engine, key
    engine.dispose()


@pytest.fixture(scope="module")
def atlas(atlas_db):
    """(base URL, API key, settings): the store of atlas_db served by uvicorn."""
    import uvicorn

    from app.main import create_app
    from store.settings import get_settings
    from tests.helpers import free_port

    engine, key = atlas_db
    settings = get_settings()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine=engine, settings=settings), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", key, settings
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium is missing at {CHROMIUM} in CI; .ci/run must install it")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, atlas, request):
    """A page whose htmx comes from the npm package and which records console errors and CSP violations."""
    base, _, settings = atlas
    path = htmx_file()
    body = path.read_bytes()
    digest = "sha384-" + base64.b64encode(hashlib.sha384(body).digest()).decode()
    assert digest == settings.htmx_integrity, "settings.htmx_integrity does not match htmx.org's htmx.min.js"
    assert f"htmx.org@{HTMX_VERSION}" in settings.htmx_url

    context = browser.new_context(viewport={"width": 1400, "height": 1000})

    def route(r):
        url = r.request.url
        if url == settings.htmx_url:
            return r.fulfill(status=200, body=body, headers={"Content-Type": "application/javascript; charset=utf-8",
                                                             "Access-Control-Allow-Origin": "*"})
        if url.startswith(base):
            return r.continue_()
        return r.abort()  # nothing else may leave the machine

    context.route("**/*", route)
    pg = context.new_page()
    pg.errors = []
    pg.on("console", lambda m: pg.errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.add_init_script("document.addEventListener('securitypolicyviolation', e => "
                       "console.error('CSP violation: ' + e.violatedDirective + ' ' + e.blockedURI));")
    yield pg
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        pg.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    except Exception:  # a screenshot is a courtesy, never the failure
        pass
    context.close()


def wait_for_htmx(pg) -> None:
    pg.wait_for_function("() => window.htmx && window.htmx.version === '%s'" % HTMX_VERSION, timeout=10_000)


def test_feature_page_hover_shows_activation(page, atlas):
    base, _, _ = atlas
    page.goto(f"{base}/saes/tiny/features/0")
    wait_for_htmx(page)  # htmx ran: its SRI hash matched and the CSP allowed its origin
    assert page.locator("h1").first.inner_text().startswith("Latent 0")
    for panel in ("#stats", "#logits", "#neighbors", "#explanations", "#top-examples", "#intervals", "#random-sample"):
        assert page.locator(panel).is_visible(), panel
    token = page.locator("#top-examples .extext .t.pk").first
    expected = token.get_attribute("title")
    assert expected and float(expected) > 0
    token.hover()
    tip = page.locator("#tip")
    tip.wait_for(state="visible", timeout=5000)
    assert expected in tip.inner_text()
    assert token.inner_text() in tip.inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "feature-hover.png"))
    page.mouse.move(5, 5)
    tip.wait_for(state="hidden", timeout=5000)
    assert page.errors == [], page.errors


def test_follow_a_neighbour_and_walk_with_keys(page, atlas):
    base, _, _ = atlas
    page.goto(f"{base}/saes/tiny/features/3")
    link = page.locator("ol.neighbors a").first
    target = link.get_attribute("href")
    link.click()
    page.wait_for_url(f"{base}{target}")
    index = int(target.rsplit("/", 1)[1])
    assert page.locator("h1").first.inner_text().startswith(f"Latent {index}")
    page.keyboard.press("]")
    page.wait_for_url(f"{base}/saes/tiny/features/{index + 1}")
    page.keyboard.press("[")
    page.wait_for_url(f"{base}/saes/tiny/features/{index}")
    assert page.errors == [], page.errors


def test_feature_table_filter_swaps_only_the_table(page, atlas):
    base, _, _ = atlas
    page.goto(f"{base}/saes/tiny")
    wait_for_htmx(page)
    page.evaluate("() => { window.__still_here = true; document.querySelector('svg.chart').dataset.mark = 'kept'; }")
    first_before = page.locator("#feature-table tbody tr td a").first.inner_text()
    assert first_before == "0"
    page.select_option("form.filters select[name=sort]", "density")
    page.select_option("form.filters select[name=order]", "desc")
    with page.expect_response(lambda r: "/saes/tiny?" in r.url and r.request.headers.get("hx-request") == "true") as resp:
        page.click("form.filters button[type=submit]")
    assert resp.value.status == 200
    page.wait_for_url("**/saes/tiny?**sort=density**")
    page.wait_for_function("() => document.querySelector('#feature-table th a.sorted') !== null")
    assert page.evaluate("() => window.__still_here === true")  # no page load happened
    assert page.evaluate("() => document.querySelector('svg.chart').dataset.mark") == "kept"  # only the table changed
    densities = page.locator("#feature-table tbody tr td:nth-child(2)").all_inner_texts()
    assert len(densities) == 50
    # the table's own pager swaps the table too
    with page.expect_response(lambda r: "page=2" in r.url):
        page.click("#feature-table .pager a[rel=next]")
    page.wait_for_function("() => document.querySelector('.tablecount').textContent.includes('51–100')")
    assert page.evaluate("() => window.__still_here === true")
    assert page.errors == [], page.errors


def test_request_an_explanation_with_htmx(page, atlas):
    base, key, _ = atlas
    page.goto(f"{base}/saes/tiny/features/9")
    wait_for_htmx(page)
    page.evaluate("() => { window.__still_here = true; }")
    page.fill("form.explain input[name=api_key]", "not-a-key")
    page.click("form.explain button")
    page.wait_for_function("() => document.querySelector('#job-status').textContent.includes('not valid')")
    page.fill("form.explain input[name=api_key]", key)
    page.click("form.explain button")
    page.wait_for_function("() => document.querySelector('#job-status').textContent.includes('queued')")
    assert page.evaluate("() => window.__still_here === true")
    assert "/jobs/" in page.locator("#job-status a").first.get_attribute("href")
    page.goto(f"{base}/jobs")
    assert page.locator("table.jobs").inner_text().count("tiny #9") == 1
    # the browser logs the deliberate 403 itself; nothing else may have gone wrong
    assert [e for e in page.errors if "403" not in e] == [], page.errors


def test_search(page, atlas):
    base, _, _ = atlas
    page.goto(f"{base}/")
    page.fill(".topsearch input[name=q]", "function calls")
    page.press(".topsearch input[name=q]", "Enter")
    page.wait_for_url("**/search?q=function+calls")
    link = page.locator("#results a[href='/saes/tiny/features/0']")
    assert link.count() == 1
    # the search page's own form swaps only the results
    wait_for_htmx(page)
    page.evaluate("() => { window.__still_here = true; }")
    page.fill("form.searchform input[name=q]", "import")
    page.click("form.searchform button")
    page.wait_for_function("() => document.querySelector(\"#results a[href='/saes/tiny/features/7']\") !== null")
    assert page.evaluate("() => window.__still_here === true")
    assert page.errors == [], page.errors


def test_pages_work_without_javascript(browser, atlas):
    base, _, _ = atlas
    context = browser.new_context(java_script_enabled=False, viewport={"width": 1400, "height": 1000})
    context.route("**/*", lambda r: r.continue_() if r.request.url.startswith(base) else r.abort())
    pg = context.new_page()
    try:
        pg.goto(f"{base}/saes/tiny")
        pg.select_option("form.filters select[name=sort]", "max")
        pg.select_option("form.filters select[name=order]", "desc")
        pg.click("form.filters button[type=submit]")
        pg.wait_for_url("**/saes/tiny?**sort=max**")
        assert pg.locator("#feature-table th a.sorted").count() == 1
        pg.fill("form.jump input[name=index]", "12")
        pg.click("form.jump button")
        pg.wait_for_url(f"{base}/saes/tiny/features/12")
        assert pg.locator(".extext .t").count() > 100
        pg.click("a[rel=next]")
        pg.wait_for_url(f"{base}/saes/tiny/features/13")
        ARTIFACTS.mkdir(exist_ok=True)
        pg.screenshot(path=str(ARTIFACTS / "feature-no-js.png"), full_page=True)
    finally:
        context.close()


def test_training_run_page_updates_live_and_new_run_form(page, atlas, atlas_db):
    """A running run's curves and progress refresh by htmx polling (no reload) as the worker
    writes, polling stops when it is done, and the new-run form lands on the new run's page."""
    import re

    from sqlalchemy.orm import Session

    from store.models import RunMetric, TrainingRun, utcnow

    base, key, _ = atlas
    engine, _ = atlas_db

    def records(run_id, steps):
        return [RunMetric(run_id=run_id, sae=sae, attempt=1, step=s, tokens=s * 1024, loss=5.0 / (1 + s),
                          fvu=f0 / (1 + 0.1 * s), l0=16.0, dead_frac=0.2 / (1 + s), lr=1e-3)
                for sae, f0 in (("resid_post.3-topk-w256-k16", 0.9), ("resid_post.3-topk-w512-k16", 0.7))
                for s in steps]

    spec = {"name": "live-sweep", "model": "smollm2-135m", "sites": ["resid_post.3"], "arch": ["topk"],
            "width": [256, 512], "k": [16], "tokens": 40960, "batch_size": 1024, "corpus": "pydoc"}
    with Session(engine) as s, s.begin():
        run = TrainingRun(name="live-sweep", spec=spec, status="running", phase="train", progress=0.2, step=10,
                          total_steps=40, attempts=1, started_at=utcnow(), heartbeat_at=utcnow(), log_tail="step 10")
        s.add(run)
        s.flush()
        run_id = run.id
        s.add_all(records(run_id, range(0, 11, 2)))

    page.goto(f"{base}/runs")
    wait_for_htmx(page)
    page.click(f"a[href='/runs/{run_id}']")
    page.wait_for_url(f"{base}/runs/{run_id}")
    wait_for_htmx(page)
    assert page.locator("#run-curves svg.chart").count() == 4
    assert page.locator("#run-curves path.line").count() == 8  # 4 metrics x 2 SAEs
    assert page.locator(".runstep").inner_text() == "10 / 40"
    first_line = page.locator("#run-curves figure.curve-fvu path.line.s0").get_attribute("d")
    page.evaluate("() => { window.__still_here = true; }")

    with Session(engine) as s, s.begin():  # the worker's next heartbeats
        s.add_all(records(run_id, range(12, 31, 2)))
        r = s.get(TrainingRun, run_id)
        r.step, r.progress, r.log_tail = 30, 0.6, "step 30 fvu 0.2"
    page.wait_for_function("() => document.querySelector('.runstep').textContent.trim() === '30 / 40'", timeout=10_000)
    assert page.evaluate("() => window.__still_here === true")  # swapped in place, no reload
    assert page.locator("#run-curves figure.curve-fvu path.line.s0").get_attribute("d") != first_line
    assert "step 30 fvu 0.2" in page.locator("pre.logtail").inner_text()
    assert page.locator("#run-live[hx-trigger]").count() == 1 and page.locator("form[action$='/cancel']").count() == 1

    with Session(engine) as s, s.begin():
        r = s.get(TrainingRun, run_id)
        r.status, r.phase, r.progress, r.step, r.finished_at = "done", None, 1.0, 40, utcnow()
    page.wait_for_selector("#run-live[data-status=done]", timeout=10_000)
    assert page.locator("#run-live[hx-trigger]").count() == 0  # polling stopped
    assert page.locator("form[action$='/cancel']").count() == 0  # replaced out of band
    assert "nothing to cancel" in page.locator("#run-cancel").inner_text()
    assert page.evaluate("() => window.__still_here === true")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "run-page.png"), full_page=True)

    # the new-run form: a wrong key is refused with the values kept, a valid one lands on the run
    page.click("header nav a[href='/runs']")
    page.wait_for_url(f"{base}/runs")
    assert page.locator(f"table.runs a[href='/runs/{run_id}']").count() == 1
    page.screenshot(path=str(ARTIFACTS / "runs-list.png"))
    page.click("a[href='/runs/new']")
    page.wait_for_url(f"{base}/runs/new")
    page.fill("input[name=name]", "browser-run")
    page.fill("input[name=sites]", "resid_post.3, resid_post.5")
    page.fill("input[name=width]", "256")
    page.fill("input[name=k]", "16")
    page.fill("input[name=tokens]", "40k")
    page.fill("input[name=batch_size]", "1024")
    page.fill("input[name=analyze_tokens]", "10k")
    page.check("input[name=arch][value=batchtopk]")
    page.fill("input[name=api_key]", "atlas_not_a_key")
    page.click("form.runspec button[type=submit]")
    page.wait_for_selector("#form-errors")
    assert "not valid" in page.locator("#form-errors").inner_text()
    assert page.input_value("input[name=sites]") == "resid_post.3, resid_post.5"
    assert page.is_checked("input[name=arch][value=batchtopk]")
    page.screenshot(path=str(ARTIFACTS / "run-form-refused.png"), full_page=True)
    page.fill("input[name=api_key]", key)
    page.click("form.runspec button[type=submit]")
    page.wait_for_url(re.compile(rf"{re.escape(base)}/runs/\d+$"))
    assert "browser-run" in page.locator("h1").first.inner_text()
    assert page.locator("#run-live .pill").inner_text() == "queued"
    assert page.locator("#run-live[hx-trigger]").count() == 1
    # the browser logs the deliberate 403 itself; nothing else may have gone wrong
    assert [e for e in page.errors if "403" not in e] == [], page.errors


def test_compare_page_points_lead_to_sae_pages(page, atlas):
    """/compare from the home page: the Pareto plots are drawn (inline SVG, nothing fetched), a point
    is a link to its SAE's page, and a table header sorts."""
    import re

    base, _, _ = atlas
    page.goto(f"{base}/")
    page.click("a[href='/compare']")
    page.wait_for_url(f"{base}/compare")
    assert page.locator("svg.chart.pareto").count() == 3
    point = page.locator("figure.pareto-fvu svg.chart.pareto a").first
    box = point.bounding_box()
    assert box and box["width"] > 0 and box["height"] > 0  # drawn, with a size, by the browser
    page.screenshot(path=str(ARTIFACTS / "compare.png"), full_page=True)
    point.click()
    page.wait_for_url(f"{base}/saes/tiny")
    assert page.locator("#report-card").is_visible()
    page.go_back()
    page.click("table.comparetable thead a:text('FVU')")
    page.wait_for_url(re.compile(r".*sort=fvu.*"))
    assert page.locator("table.comparetable th[aria-sort]").inner_text().startswith("FVU")
    assert page.errors == [], page.errors


def test_compare_page_shows_saebench_measures_of_report_cards(page, atlas, atlas_db):
    """An SAE whose report card has sparse probing and absorption (`evaluate --probing --absorption`)
    gets a point in those two Pareto plots and numbers in their columns; the point leads to its
    SAE page, whose report card shows them too. (The card is removed again: the other tests see the
    SAE with its training metrics only.)"""
    import re

    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from store.evaluations import write_evaluation
    from store.models import SAE, SAEEvaluation

    engine, _ = atlas_db
    base, _, _ = atlas
    with Session(engine) as s, s.begin():
        sae = s.scalar(select(SAE).where(SAE.name == "tiny"))
        ev_id = write_evaluation(s, sae.id, {"contexts": 8, "probing": True, "absorption": True},
                                 {"l0": 8.0, "fvu": 0.3, "ce_recovered": 0.9, "ce_recovered_ci95": 0.02,
                                  "sparse_probing": {"k_values": [1, 5], "sae_top_1_test_accuracy": 0.625,
                                                     "sae_top_5_test_accuracy": 0.8125, "llm_test_accuracy": 0.9,
                                                     "sae_test_accuracy": 0.85, "tasks": {}},
                                  "absorption": {"evaluated": True, "probe_accuracy": 0.875,
                                                 "mean_absorption_fraction": 0.1875, "mean_full_absorption_rate": 0.0625,
                                                 "letters_counted": list("abcdefghijklmnopqrstu")}}, 1000)
    try:
        page.goto(f"{base}/compare")
        assert page.locator("svg.chart.pareto").count() == 5
        for key in ("probing_top_1", "absorption"):
            point = page.locator(f"figure.pareto-{key} svg.chart.pareto a circle")
            assert point.count() == 1
            assert "hollow" not in point.get_attribute("class")  # a report card's numbers, not the training run's
            box = point.bounding_box()
            assert box and box["width"] > 0 and box["height"] > 0
        assert "sparse probing top-1" in page.locator("figure.pareto-probing_top_1 figcaption").inner_text()
        headers = page.locator("table.comparetable thead th").all_inner_texts()
        row = page.locator("table.comparetable tbody tr").first.locator("td").all_inner_texts()
        cells = dict(zip([h.strip() for h in headers], [c.strip() for c in row]))
        assert (cells["probing top-1"], cells["probing top-5"], cells["absorption"]) == ("62.5%", "81.2%", "0.188")
        assert cells["numbers from"] == "report card"
        page.screenshot(path=str(ARTIFACTS / "compare-saebench.png"), full_page=True)
        page.click("table.comparetable thead a:text('probing top-1')")
        page.wait_for_url(re.compile(r".*sort=probing_top_1.*"))
        assert page.locator("table.comparetable th[aria-sort]").inner_text().startswith("probing top-1")
        page.locator("figure.pareto-absorption svg.chart.pareto a").first.click()
        page.wait_for_url(f"{base}/saes/tiny")
        card = page.locator("#report-card").inner_text().lower()  # its labels are shown in capitals by CSS
        assert "probing top-1 / top-5\n62.5% / 81.2%" in card and "absorption\n0.188 (probe accuracy 87.5%)" in card
        assert page.errors == [], page.errors
    finally:
        with Session(engine) as s, s.begin():
            s.delete(s.get(SAEEvaluation, ev_id))
