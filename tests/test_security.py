"""Hostile strings through the store render inert everywhere; security headers; keys stored hashed.

The published tiny SAE's vocabulary (the LM.vocab blob) is rewritten so that the tokens of a
feature's examples, its logit tables and its peak token are markup, quotes, entities, newlines,
tabs and invisible characters; explanation text and the SAE description get payloads too. Every
page must show them as text (escaped, made visible) and the JSON must carry them unchanged.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from store.models import LM, SAE, APIKey, Explanation, Feature

SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(1)>'
NASTY = [SCRIPT, IMG, "\n", "\u200b", "&amp;", "\t", "'", "</span><b>bold</b>", "{{ 7*7 }}", "\r\n", "\u202eevil",
         " ", "", "<!--", "]]>", "\x00", "javascript:alert(1)", '" onmouseover="alert(1)']


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.bad: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.scripts += 1
            if not dict(attrs).get("src"):
                self.bad.append("inline script")
        if tag in ("img", "iframe", "object", "embed", "style"):
            self.bad.append(f"<{tag}>")
        for name, value in attrs:
            if name.startswith("on") or name == "style":
                self.bad.append(f"{name} on <{tag}>")

    def handle_comment(self, data):
        self.bad.append("comment injected")


def make_client(engine) -> TestClient:
    from app.main import create_app

    return TestClient(create_app(engine=engine), raise_server_exceptions=False)


@pytest.fixture
def hostile(published):
    """(client, nasty token ids): the tiny SAE with a vocabulary full of hostile strings."""
    import store

    engine, name = published
    with make_client(engine) as c:
        f0 = c.get(f"/api/v1/saes/{name}/features/0").json()
    ids: list[int] = []
    for t in [f0["peak_token"]["token_id"], f0["logits"]["top"][0]["token_id"], f0["logits"]["bottom"][0]["token_id"]]:
        if t not in ids:
            ids.append(t)
    for ex in f0["examples"]["top"]:
        for t in ex["token_ids"]:
            if t not in ids and len(ids) < len(NASTY):
                ids.append(t)
    mapping = dict(zip(ids, NASTY))
    with Session(engine) as s, s.begin():
        lm = s.scalar(select(LM))
        vocab = json.loads(zlib.decompress(lm.vocab))
        for t, text in mapping.items():
            vocab[t] = text
        lm.vocab = zlib.compress(json.dumps(vocab).encode())
        sae = s.scalar(select(SAE).where(SAE.name == name))
        sae.description = f"described by {SCRIPT}"
        f = s.scalar(select(Feature).where(Feature.sae_id == sae.id, Feature.index == 0))
        s.add(Explanation(feature_id=f.id, text=f"fires on {IMG} and {SCRIPT}", method="explain-v1",
                          explainer=SCRIPT, detection_score=0.9))
        f.explanation, f.best_score = f"fires on {IMG} and {SCRIPT}", 0.9
    store.forget_caches()
    with make_client(engine) as c:
        yield c, mapping
    store.forget_caches()


def assert_inert(html: str) -> None:
    p = Tags()
    p.feed(html)
    assert p.bad == [], p.bad
    assert p.scripts == 2  # atlas.js and htmx, nothing else
    assert SCRIPT not in html and "<img" not in html and "<b>bold" not in html
    assert "\u202e" not in html and "\u200b" not in html and "\x00" not in html


def test_hostile_tokens_render_inert_on_every_page(hostile):
    c, mapping = hostile
    assert next(iter(mapping.values())) == SCRIPT  # the peak token of latent 0
    pages = ["/", "/saes/tiny", "/saes/tiny?sort=score&order=desc", "/saes/tiny/features/0", "/search?q=fires",
             f"/search?token={SCRIPT}", f"/search?q={SCRIPT}&token={IMG}", "/jobs"]
    for path in pages:
        r = c.get(path)
        assert r.status_code == 200, path
        assert_inert(r.text)
    feature = c.get("/saes/tiny/features/0").text
    # shown as text, visibly
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in feature
    assert "&#34;&gt;&lt;img" in feature
    assert "&amp;amp;" in feature  # the literal token "&amp;" stays literal
    assert "↵" in feature and "⇥" in feature and "⟨U+200B⟩" in feature and "⟨U+202E⟩" in feature
    assert "⟨U+0000⟩" in feature
    assert "&lt;/span&gt;&lt;b&gt;bold&lt;/b&gt;" in feature
    assert "{{ 7*7 }}" in feature  # not evaluated
    assert "fires on &#34;&gt;&lt;img src=x onerror=alert(1)&gt; and &lt;script&gt;" in feature
    sae_page = c.get("/saes/tiny").text
    assert "described by &lt;script&gt;" in sae_page
    # a hostile token searched for by peak token is found and shown escaped
    found = c.get("/search", params={"token": SCRIPT}).text
    assert 'href="/saes/tiny/features/0"' in found


def test_hostile_tokens_round_trip_unchanged_in_json(hostile):
    c, mapping = hostile
    r = c.get("/api/v1/saes/tiny/features/0")
    assert r.headers["content-type"] == "application/json" and r.headers["x-content-type-options"] == "nosniff"
    f = r.json()
    assert f["peak_token"]["token"] == SCRIPT
    top = f["logits"]["top"][0]
    assert top["token"] == mapping[top["token_id"]] and top["token"] in (SCRIPT, IMG)
    by_id = {}
    for ex in f["examples"]["top"]:
        for t, s in zip(ex["token_ids"], ex["tokens"]):
            by_id[t] = s
    for t, text in mapping.items():
        if t in by_id:
            assert by_id[t] == text  # exact, including "\n", "\u200b", "" and "\x00"
    assert SCRIPT in f["explanation"] and f["explanations"][0]["explainer"] == SCRIPT
    # raw JSON escapes nothing a browser could run: it is served as JSON with nosniff, not HTML
    assert b"<script>" in r.content
    items = c.get("/api/v1/search/tokens", params={"q": SCRIPT}).json()["items"]
    assert items and items[0]["peak_token"] == SCRIPT
    table = c.get("/api/v1/saes/tiny/features", params={"per_page": 1}).json()["items"][0]
    assert table["peak_token"] == SCRIPT


def test_lone_surrogates_in_a_vocabulary_do_not_break_json_or_pages(published):
    import store

    engine, name = published
    with Session(engine) as s, s.begin():
        lm = s.scalar(select(LM))
        vocab = json.loads(zlib.decompress(lm.vocab))
        vocab = ["\ud800" + t for t in vocab]  # invalid Unicode that json.dumps happily writes
        lm.vocab = zlib.compress(json.dumps(vocab).encode())
    store.forget_caches()
    try:
        with make_client(engine) as c:
            assert c.get(f"/api/v1/saes/{name}/features/1").status_code == 200
            assert c.get(f"/saes/{name}/features/1").status_code == 200
            assert c.get(f"/saes/{name}").status_code == 200
    finally:
        store.forget_caches()


def test_security_headers_everywhere(published):
    from store.settings import get_settings

    engine, name = published
    htmx_url = get_settings().htmx_url
    with make_client(engine) as c:
        responses = [c.get("/"), c.get(f"/saes/{name}/features/1"), c.get("/api/v1/saes"), c.get("/api/v1/nope"),
                     c.get("/nope"), c.get("/static/atlas.css"), c.post("/api/v1/jobs", json={}),
                     c.get(f"/api/v1/saes/{name}/features/1/neighbors?k=-1")]
        etag = c.get(f"/api/v1/saes/{name}").headers["etag"]
        responses.append(c.get(f"/api/v1/saes/{name}", headers={"If-None-Match": etag}))
        for r in responses:
            h = r.headers
            assert h["x-content-type-options"] == "nosniff", r.url
            assert h["x-frame-options"] == "DENY"
            assert h["referrer-policy"] == "same-origin"
            csp = h["content-security-policy"]
            assert "default-src 'self'" in csp and "object-src 'none'" in csp and "frame-ancestors 'none'" in csp
            script_src = next(p for p in csp.split(";") if p.strip().startswith("script-src")).split()[1:]
            # the one htmx file, not its CDN's whole origin; no 'unsafe-inline', no 'unsafe-eval'
            assert script_src == ["'self'", htmx_url], script_src
            style_src = next(p for p in csp.split(";") if p.strip().startswith("style-src")).split()[1:]
            assert style_src == ["'self'"]
            assert "base-uri 'none'" in csp and "form-action 'self'" in csp
        docs = c.get("/docs")
        assert docs.status_code == 200 and "x-frame-options" in docs.headers


def test_api_keys_are_stored_hashed(engine):
    from app.security import create_key, verify_key

    with Session(engine) as s, s.begin():
        key = create_key(s, "alice")
    with Session(engine) as s:
        row = s.scalar(select(APIKey))
        assert row.key_hash == hashlib.sha256(key.encode()).hexdigest() and key not in (row.key_hash, row.prefix)
        assert verify_key(s, key).name == "alice"
        assert verify_key(s, key + "x") is None and verify_key(s, "") is None and verify_key(s, "é" * 10) is None
        assert verify_key(s, "a" * 10_000) is None


def test_no_stack_trace_in_any_error(published, monkeypatch):
    engine, name = published
    import store

    def boom(*a, **kw):
        raise ZeroDivisionError("do not show this: password=hunter2")

    monkeypatch.setattr(store, "feature_payload", boom)
    with make_client(engine) as c:
        for path in (f"/api/v1/saes/{name}/features/2", f"/saes/{name}/features/2"):
            r = c.get(path)
            assert r.status_code == 500
            assert "hunter2" not in r.text and "ZeroDivisionError" not in r.text and "Traceback" not in r.text
            assert r.headers["content-security-policy"]
