"""The live-model pages in headless Chromium: the try box (htmx), search by text with clicked
tokens, steering with tokens streaming onto the page, and a contrastive query to its permalink.
The inference service runs as its own server (Unix socket) behind the API, as in production;
the page fixture (htmx from the npm package, console errors and CSP violations recorded) is the
one of tests/test_pages_browser.py."""

from __future__ import annotations

import pytest

from tests.test_pages_browser import ARTIFACTS, CHROMIUM_ARGS, browser, page, wait_for_htmx  # noqa: F401

pytestmark = [pytest.mark.browser, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def atlas(tmp_path_factory, tiny_sae_dir):
    """(base URL, API key, settings) of the API with the inference service behind it."""
    from sqlalchemy.orm import Session

    from store.db import make_engine, upgrade
    from app.security import create_key
    from tests.live_support import live_stack
    from trainer.publish import publish

    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('live-browser') / 'atlas.db'}")
    upgrade(engine)
    publish(tiny_sae_dir, "tiny", engine=engine, progress=False)
    with Session(engine) as s, s.begin():
        key = create_key(s, "browser")
    with live_stack(engine, tmp_path_factory.mktemp("live-browser-sock"),
                    api_overrides={"inference_rate_per_minute": 0}) as (base, settings, _):
        yield base, key, settings
    engine.dispose()


def test_try_box_colours_tokens_in_place(page, atlas):  # noqa: F811
    base, _, _ = atlas
    page.goto(f"{base}/saes/tiny/features/4")
    wait_for_htmx(page)
    page.evaluate("() => { window.__still_here = true; }")
    page.fill("#try-text textarea[name=text]", "import sys\nsys.exit(main())")
    page.click("#try-text button[type=submit]")
    page.wait_for_selector("#try-result .tryresult .extext .t")
    assert page.evaluate("() => window.__still_here === true")  # swapped in place
    assert page.locator("#try-result .extext .t").count() >= 8
    assert page.locator("#try-result .t.masked").count() >= 1  # BOS
    assert "max in the analysis" in page.locator("#try-result .trysummary").inner_text()
    assert page.locator("#try-text a[href='/steer?sae=tiny&index=4']").count() == 1
    page.screenshot(path=str(ARTIFACTS / "live-try-box.png"), full_page=True)
    assert page.errors == [], page.errors


def test_search_by_text_then_click_tokens(page, atlas):  # noqa: F811
    base, _, _ = atlas
    page.goto(f"{base}/search")
    page.click("nav.modes a[href='/search/text']")
    page.wait_for_url(f"{base}/search/text")
    wait_for_htmx(page)
    page.evaluate("() => { window.__still_here = true; }")
    page.fill("#textsearch textarea[name=text]", "with open(path) as handle:\n    data = handle.read()")
    page.click("#textsearch button[type=submit]")
    page.wait_for_selector("#live-results table.livehits tbody tr")
    assert "Ranking by every token" in page.locator("#live-results").inner_text()
    page.locator("#live-results label.pick:not(.off)").nth(3).click()
    page.wait_for_function("() => document.querySelector('#live-results').textContent.includes('1 selected token')")
    page.locator("#live-results label.pick:not(.off)").nth(5).click()
    page.wait_for_function("() => document.querySelector('#live-results').textContent.includes('2 selected tokens')")
    assert page.locator("#live-results input[name=positions]:checked").count() == 2
    assert page.evaluate("() => window.__still_here === true")
    page.screenshot(path=str(ARTIFACTS / "live-search-text.png"), full_page=True)
    assert page.errors == [], page.errors


def test_steering_streams_tokens_onto_the_page(page, atlas):  # noqa: F811
    base, _, _ = atlas
    page.goto(f"{base}/saes/tiny/features/3")
    page.click("a[href='/steer?sae=tiny&index=3']")
    page.wait_for_url(f"{base}/steer?sae=tiny&index=3")
    assert page.input_value("select[name=sae] >> nth=0") == "tiny"
    page.evaluate("""() => {
        window.__still_here = true;
        window.__pieces = 0;  // text nodes appended while the answer streams in
        new MutationObserver(ms => ms.forEach(m => m.addedNodes.forEach(n => {
            if (n.nodeType === Node.TEXT_NODE) window.__pieces++; })))
            .observe(document.querySelector('#steer-default'), {childList: true});
    }""")
    page.fill("textarea[name=prompt]", "def main():")
    page.fill("input[name=strength] >> nth=0", "30")
    page.fill("input[name=max_new_tokens]", "40")
    page.fill("input[name=temperature]", "0")
    with page.expect_response(lambda r: r.url.endswith("/api/v1/steer")) as resp:
        page.click("#steerform button[type=submit]")
    assert resp.value.headers["content-type"].startswith("text/event-stream")
    page.wait_for_function("() => document.querySelector('#steer-status').textContent.includes('new tokens')",
                           timeout=60_000)
    assert page.evaluate("() => window.__still_here === true")  # no form post: streamed by live.js
    assert page.evaluate("() => window.__pieces") >= 10  # token by token, not one final write
    default = page.locator("#steer-default").inner_text()
    steered = page.locator("#steer-steered").inner_text()
    assert default and steered and default != steered
    page.screenshot(path=str(ARTIFACTS / "live-steer.png"), full_page=True)
    # a bad strength is refused by the API and shown on the page
    page.fill("input[name=strength] >> nth=0", "1e9")
    page.click("#steerform button[type=submit]")
    page.wait_for_selector("#steer-error:not([hidden])")
    assert "strength" in page.locator("#steer-error").inner_text()
    assert [e for e in page.errors if "422" not in e] == [], page.errors


def test_contrastive_query_lands_on_its_permalink(page, atlas):  # noqa: F811
    base, _, _ = atlas
    page.goto(f"{base}/contrast")
    code = "\n\n".join(f"def handler_{i}(request):\n    return respond(request, {i})" for i in range(10))
    prose = "\n\n".join(f"The library keeps a record of every change, number {i}, in its history." for i in range(10))
    page.fill("input[name=label_a]", "code")
    page.fill("input[name=label_b]", "prose")
    page.fill("textarea[name=texts_a]", code)
    page.fill("textarea[name=texts_b]", prose)
    page.click(".contrastform button[type=submit]")
    page.wait_for_url(f"{base}/contrast/*")
    url = page.url
    assert "code" in page.locator("h1").inner_text()
    assert page.locator("table.contrast tbody tr").count() >= 1
    page.goto(url)  # the permalink reads the stored query
    assert page.locator("table.contrast tbody tr").count() >= 1
    page.screenshot(path=str(ARTIFACTS / "live-contrast.png"), full_page=True)
    assert page.errors == [], page.errors


def test_try_box_without_javascript(browser, atlas):  # noqa: F811
    base, _, _ = atlas
    context = browser.new_context(java_script_enabled=False, viewport={"width": 1300, "height": 900})
    context.route("**/*", lambda r: r.continue_() if r.request.url.startswith(base) else r.abort())
    pg = context.new_page()
    try:
        pg.goto(f"{base}/saes/tiny/features/4")
        pg.fill("#try-text textarea[name=text]", "for item in items: print(item)")
        pg.click("#try-text button[type=submit]")
        pg.wait_for_url(f"{base}/saes/tiny/features/4/try")
        assert pg.locator("#try-result .extext .t").count() >= 6
        pg.goto(f"{base}/steer?sae=tiny&index=4")
        pg.fill("textarea[name=prompt]", "import")
        pg.fill("input[name=max_new_tokens]", "5")
        pg.click("#steerform button[type=submit]")
        pg.wait_for_url(f"{base}/steer")
        assert pg.locator("#steer-default").inner_text().strip()
    finally:
        context.close()
