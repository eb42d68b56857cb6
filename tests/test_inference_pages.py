"""The live-model pages over HTTP without a browser: every form works as a plain POST (no
JavaScript), htmx requests get just the partial, errors are pages, and inference off says so."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.live_support import live_settings, live_stack, serving

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HTMX = {"HX-Request": "true"}


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_sae_dir):
    from store.db import make_engine, upgrade
    from trainer.publish import publish

    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('live-pages') / 'atlas.db'}")
    upgrade(engine)
    publish(tiny_sae_dir, "tiny", engine=engine, progress=False)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def web(store, tmp_path_factory):
    with live_stack(store, tmp_path_factory.mktemp("live-pages-sock"),
                    api_overrides={"inference_rate_per_minute": 0}) as (base, _, _):
        with httpx.Client(base_url=base, timeout=120) as http:
            yield http


def test_feature_page_has_the_try_box_and_a_steer_link(web):
    page = web.get("/saes/tiny/features/5").text
    assert 'action="/saes/tiny/features/5/try"' in page and 'hx-post="/saes/tiny/features/5/try"' in page
    assert 'href="/steer?sae=tiny&amp;index=5"' in page


def test_try_text_without_javascript_and_with_htmx(web):
    r = web.post("/saes/tiny/features/5/try", data={"text": "import os\nprint(os.getcwd())"})
    assert r.status_code == 200 and "<html" in r.text
    assert r.text.count('class="t') >= 8 and "not scored (BOS or attention sink)" in r.text
    assert "import os" in r.text  # the textarea keeps the text
    assert ("max in the analysis" in r.text) or ("does not fire" in r.text)
    part = web.post("/saes/tiny/features/5/try", data={"text": "import os"}, headers=HTMX)
    assert part.status_code == 200 and "<html" not in part.text and 'class="tryresult"' in part.text
    bad = web.post("/saes/tiny/features/5/try", data={"text": "   "})
    assert bad.status_code == 422 and "<html" in bad.text and "text is empty" in bad.text
    bad = web.post("/saes/tiny/features/5/try", data={"text": ""}, headers=HTMX)
    assert bad.status_code == 422 and 'class="notice err"' in bad.text and "<html" not in bad.text
    assert web.post("/saes/tiny/features/999/try", data={"text": "x"}).status_code == 404


def test_search_by_text_and_clicked_tokens(web):
    assert 'aria-current="page">By text' in web.get("/search/text").text
    assert 'href="/search/text"' in web.get("/search").text
    text = "for key, value in items.items():"
    r = web.post("/search/text", data={"text": text, "limit": "8"})
    assert r.status_code == 200
    boxes = re.findall(r'name="positions" value="(\d+)"', r.text)
    assert len(boxes) >= 8 and "Ranking by every token" in r.text
    for_text = re.search(r'name="for_text" value="([0-9a-f]+)"', r.text).group(1)
    links = re.findall(r'href="/saes/tiny/features/(\d+)"', r.text)
    assert 1 <= len(links) <= 8
    picked = web.post("/search/text", data={"text": text, "positions": ["2", "3"], "for_text": for_text},
                      headers={**HTMX, "HX-Target": "live-results"})
    assert picked.status_code == 200 and "<html" not in picked.text
    assert "Ranking by the 2 selected tokens" in picked.text
    assert len(re.findall(r'value="[23]" checked', picked.text)) == 2
    # the clicked tokens belonged to another text: a new text starts with none selected
    fresh = web.post("/search/text", data={"text": text + " more", "positions": ["2"], "for_text": for_text})
    assert "Ranking by every token" in fresh.text
    assert web.post("/search/text", data={"text": text, "density_min": "abc"}).status_code == 422


def test_steer_page_without_javascript(web):
    form = web.get("/steer", params={"sae": "tiny", "index": "3"}).text
    assert '<option value="tiny" selected>' in form and 'name="index" value="3"' in form
    assert '<script src="/static/live.js' in form
    r = web.post("/steer", data={"prompt": "import", "sae": ["tiny", "", ""], "index": ["3", "", ""],
                                 "strength": ["0", "", ""], "max_new_tokens": "8", "temperature": "0", "seed": "1",
                                 "method": "add"})
    assert r.status_code == 200
    default = re.search(r'id="steer-default"[^>]*>(.*?)</pre>', r.text, re.S).group(1)
    steered = re.search(r'id="steer-steered"[^>]*>(.*?)</pre>', r.text, re.S).group(1)
    assert default and default == steered  # strength 0
    assert web.post("/steer", data={"prompt": "x", "sae": ["tiny"], "index": ["3"], "strength": ["nan"]}).status_code == 422
    assert web.post("/steer", data={"prompt": "x", "sae": ["tiny"], "index": ["3"], "strength": ["1e9"]}).status_code == 422
    assert web.get("/steer", params={"sae": "nope"}).status_code == 404


def test_contrast_form_upload_and_permalink(web):
    code = "\n".join('{"text": "def f%d(x):\\n    return x + %d"}' % (i, i) for i in range(12))
    prose = "\n\n".join(f"This section describes how the module handles case number {i} in detail." for i in range(12))
    r = web.post("/contrast", data={"texts_b": prose, "label_a": "code", "label_b": "prose", "limit": "15"},
                 files={"file_a": ("code.jsonl", code.encode(), "application/jsonl")}, follow_redirects=False)
    assert r.status_code == 303, r.text
    url = r.headers["location"]
    assert re.fullmatch(r"/contrast/[0-9a-f]{20}", url)
    page = web.get(url)
    assert page.status_code == 200 and "code" in page.text and "prose" in page.text
    assert "12 vs 12" in page.text and page.text.count("/saes/tiny/features/") >= 1
    data = web.get("/api/v1" + url).json()
    assert data["n_a"] == 12 and data["label_a"] == "code"
    too_big = web.post("/contrast", data={"texts_b": prose},
                       files={"file_a": ("a.txt", b"x\n\n" * 1_100_000, "text/plain")})
    assert too_big.status_code == 413 and "<html" in too_big.text
    one = web.post("/contrast", data={"texts_a": "only one", "texts_b": prose})
    assert one.status_code == 422


def test_pages_say_when_inference_is_off(store, tmp_path, web):
    # a query stored while inference was on stays readable on a read-only mirror
    r = web.post("/contrast", data={"texts_a": "a b c\n\nd e f", "texts_b": "1 2 3\n\n4 5 6"}, follow_redirects=False)
    url = r.headers["location"]
    import store as atlas_store
    from app.main import create_app

    atlas_store.RENDERED.clear()  # rendered pages are cached per process; inference is fixed per process
    with serving(create_app(engine=store, settings=live_settings(tmp_path, "http://127.0.0.1:1", inference="off"))) as srv:
        with httpx.Client(base_url=f"http://127.0.0.1:{srv.config.port}", timeout=30) as c:
            for path in ("/saes/tiny/features/5", "/steer", "/contrast", "/search/text", "/saes/tiny/features/5/try"):
                page = c.get(path)
                assert page.status_code == 200 and "Live inference is turned off" in page.text, path
                assert "<textarea" not in page.text, path
            assert c.post("/saes/tiny/features/5/try", data={"text": "x"}).status_code == 503
            assert c.get(url).status_code == 200


def test_steer_page_title_is_plain_text(web):
    page = web.get("/steer").text
    assert re.search(r"<title>(.*?)</title>", page, re.DOTALL).group(1) == "Steer · SAE Atlas"
    assert page.count('<script src="/static/live.js') == 1  # loaded once, in the body
