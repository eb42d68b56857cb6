"""HTML pages without a browser: every page renders, partials for htmx, forms work without
JavaScript, errors are pages (not tracebacks), and nothing breaks the Content-Security-Policy.
(tests/test_pages_browser.py drives the same pages in headless Chromium.)"""

from __future__ import annotations

import re
from pathlib import Path
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from store.models import SAE, Explanation, Feature, Job

REPO = Path(__file__).resolve().parents[1]

N = 128


def make_client(engine, **settings) -> TestClient:
    from app.main import create_app
    from store.settings import get_settings

    s = get_settings().model_copy(update=settings) if settings else None
    return TestClient(create_app(engine=engine, settings=s), raise_server_exceptions=False, follow_redirects=False)


def make_key(engine, name: str = "pages") -> str:
    from app.security import create_key

    with Session(engine) as s, s.begin():
        return create_key(s, name)


def explain(engine, index: int, text: str, score: float) -> None:
    with Session(engine) as s, s.begin():
        sae_id = s.scalar(select(SAE.id).where(SAE.name == "tiny"))
        f = s.scalar(select(Feature).where(Feature.sae_id == sae_id, Feature.index == index))
        s.add(Explanation(feature_id=f.id, text=text, method="explain-v1", explainer="test-llm", detection_score=score))
        f.explanation, f.best_score = text, score


class Inspect(HTMLParser):
    """Collects what the CSP cares about: scripts, style attributes/elements, event handlers."""

    def __init__(self):
        super().__init__()
        self.scripts: list[dict] = []
        self.violations: list[str] = []
        self.ids: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "script":
            self.scripts.append(a)
            if not a.get("src"):
                self.violations.append("inline <script>")
        if tag == "style":
            self.violations.append("<style> element")
        for name, value in attrs:
            if name == "style":
                self.violations.append(f"style attribute on <{tag}>")
            if name.startswith("on"):
                self.violations.append(f"event handler {name} on <{tag}>")
            if name in ("href", "src", "action") and value and value.strip().lower().startswith("javascript:"):
                self.violations.append(f"javascript: URL on <{tag}>")


def check_page(r, settings=None) -> Inspect:
    """A full page that the CSP allows: only our script and htmx (pinned, with SRI), no inline anything."""
    from store.settings import get_settings

    settings = settings or get_settings()
    assert r.headers["content-type"].startswith("text/html")
    p = Inspect()
    p.feed(r.text)
    assert p.violations == [], p.violations
    srcs = sorted(s["src"].split("?")[0] for s in p.scripts)
    assert srcs == sorted(["/static/atlas.js", settings.htmx_url]), srcs
    htmx = next(s for s in p.scripts if s["src"] == settings.htmx_url)
    assert htmx["integrity"] == settings.htmx_integrity and htmx["crossorigin"] == "anonymous"
    assert "Traceback" not in r.text
    return p


@pytest.fixture
def client(published):
    engine, _ = published
    with make_client(engine) as c:
        yield c


def test_home_lists_models_and_saes(published):
    engine, _ = published
    with make_client(engine) as c:
        r = c.get("/")
        assert r.status_code == 200
        check_page(r)
        assert 'href="/saes/tiny"' in r.text and "topk" in r.text and "FVU" in r.text and "CE recovered" in r.text


def test_home_without_saes_explains_what_to_do(engine):
    with make_client(engine) as c:
        r = c.get("/")
        assert r.status_code == 200 and "No SAEs yet" in r.text and "make demo" in r.text
        check_page(r)


def test_sae_page_metrics_histogram_and_table(client):
    r = client.get("/saes/tiny")
    assert r.status_code == 200
    p = check_page(r)
    for label in ("FVU", "L0", "dead", "CE recovered", "Feature density"):
        assert label in r.text
    assert '<svg class="chart bars wide"' in r.text and "log10 feature density" in r.text
    assert "feature-table" in p.ids and r.text.count('href="/saes/tiny/features/') >= 50
    assert "Latents 1–50 of 128" in r.text
    # sorting links, filters and pagination all work as plain links / GET forms
    desc = client.get("/saes/tiny", params={"sort": "density", "order": "desc", "per_page": 200})
    rows = re.findall(r'<td><a href="/saes/tiny/features/(\d+)">', desc.text)
    assert len(rows) == N
    page3 = client.get("/saes/tiny", params={"page": 3})
    assert re.findall(r'<td><a href="/saes/tiny/features/(\d+)">', page3.text)[0] == "100"
    assert "Latents 101–128 of 128" in page3.text
    filtered = client.get("/saes/tiny", params={"density_min": "1", "density_max": "1"})
    assert filtered.status_code == 200 and "No latent matches" in filtered.text
    pct = client.get("/saes/tiny", params={"density_min": "5%"})
    assert pct.status_code == 200


def test_sae_page_htmx_partial_is_only_the_table(client):
    r = client.get("/saes/tiny", params={"sort": "max", "order": "desc"},
                   headers={"HX-Request": "true", "HX-Target": "feature-table"})
    assert r.status_code == 200
    assert "<html" not in r.text and "<table" in r.text and "Feature density" not in r.text
    assert "hx-get" in r.text  # pager and sort links keep swapping the table
    full = client.get("/saes/tiny", headers={"HX-Request": "true", "HX-History-Restore-Request": "true"})
    assert "<html" in full.text  # a history restore gets the whole page


def test_sae_page_bad_input(client):
    for params in ({"sort": "nope"}, {"order": "sideways"}, {"density_min": "abc"}, {"density_min": "2"},
                   {"density_min": "0.5", "density_max": "0.1"}, {"has_explanation": "perhaps"}, {"page": "0"},
                   {"per_page": "1000"}, {"score_min": "nan"}):
        r = client.get("/saes/tiny", params=params)
        assert r.status_code == 422, params
        check_page(r)
        assert "422" in r.text
    r = client.get("/saes/nope")
    assert r.status_code == 404 and "no SAE named" in r.text
    check_page(r)


def test_jump_box(client):
    r = client.get("/saes/tiny/jump", params={"index": "42"})
    assert r.status_code == 303 and r.headers["location"] == "/saes/tiny/features/42"
    assert client.get("/saes/tiny/jump", params={"index": " #7 "}).headers["location"] == "/saes/tiny/features/7"
    assert client.get("/saes/tiny/jump", params={"index": "128"}).status_code == 404
    assert client.get("/saes/tiny/jump", params={"index": "x"}).status_code == 422
    assert client.get("/saes/tiny/jump", params={"index": ""}).status_code == 422
    assert client.get("/saes/nope/jump", params={"index": "1"}).status_code == 404


def busiest_latent(engine) -> int:
    """The tiny SAE's most frequently firing latent that is not dense (full example panels), away
    from the ends (it has a previous and a next latent)."""
    with Session(engine) as s:
        return s.scalar(select(Feature.index).join(SAE).where(SAE.name == "tiny", Feature.index.between(1, N - 2),
                                                              Feature.density < 0.1)
                        .order_by(Feature.firing_count.desc()).limit(1))


def test_feature_page_has_every_panel(published):
    engine, _ = published
    i = busiest_latent(engine)
    explain(engine, i, "commas between arguments", 0.77)
    with make_client(engine) as c:
        r = c.get(f"/saes/tiny/features/{i}")
        assert r.status_code == 200
        p = check_page(r)
        for panel in ("stats", "logits", "neighbors", "explanations", "top-examples", "intervals", "random-sample",
                      "job-status"):
            assert panel in p.ids, panel
        t = r.text
        for text in ("density", "max activation", "mean when active", "E[a²]", "skewness", "kurtosis", "promotes",
                     "suppresses", "Over the whole vocabulary", "Nearest latents", "Top activations",
                     "Across the activation range", "of activations", "Random sample", "commas between arguments",
                     "0.77", "Request another", "permalink"):
            assert text in t, text
        assert t.count('<svg class="chart') >= 2  # activation and logit histograms
        assert f'rel="prev" href="/saes/tiny/features/{i - 1}"' in t and f'rel="next" href="/saes/tiny/features/{i + 1}"' in t
        assert f'href="/saes/tiny/features/{i}" rel="bookmark"' in t
        assert re.search(r'<span class="t a\d( pk)?" title="[0-9.e-]+">', t)  # coloured tokens with values
        assert t.count(' pk"') >= 5  # every example marks its peak token
        neighbours = re.findall(r'<li><a href="/saes/tiny/features/(\d+)">#\d+</a><span class="cos"', t)
        assert len(neighbours) >= 10
        assert f'method="post" action="/saes/tiny/features/{i}/explain"' in t
        first = c.get("/saes/tiny/features/0").text
        assert 'rel="prev"' not in first and "No explanation yet" in first
        last = c.get(f"/saes/tiny/features/{N - 1}").text
        assert 'rel="next"' not in last


def test_feature_page_etag_and_errors(client):
    r = client.get("/saes/tiny/features/2")
    etag = r.headers["etag"]
    assert client.get("/saes/tiny/features/2", headers={"If-None-Match": etag}).status_code == 304
    for path, status in (("/saes/tiny/features/128", 404), ("/saes/nope/features/1", 404),
                         ("/saes/tiny/features/-1", 422), ("/saes/tiny/features/x", 422),
                         ("/saes/tiny/features/1e3", 422), ("/nothing/here", 404)):
        r = client.get(path)
        assert r.status_code == status, path
        check_page(r)
        assert f"<h1>{status}" in r.text


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert m, "the page has no CSRF token"
    return m.group(1)


def test_request_an_explanation_without_javascript(published):
    engine, _ = published
    key = make_key(engine)
    with make_client(engine) as c:
        page = c.get("/saes/tiny/features/6")
        token = csrf_of(page.text)
        assert token == c.cookies["atlas_csrf"]  # before signing in: a double-submit cookie
        url = "/saes/tiny/features/6/explain"
        r = c.post(url, data={"api_key": key})  # no token: from another site, or a stale page
        assert r.status_code == 403 and "expired or was sent from another site" in r.text
        r = c.post(url, data={"api_key": key, "csrf_token": "x" * 43})
        assert r.status_code == 403
        r = c.post(url, data={"api_key": "", "csrf_token": token})
        assert r.status_code == 401 and "API key is needed" in r.text
        check_page(r)
        r = c.post(url, data={"api_key": "wrong", "csrf_token": token})
        assert r.status_code == 403 and "not valid" in r.text
        r = c.post(url, data={"api_key": key, "csrf_token": token})
        assert r.status_code == 303 and r.headers["location"].startswith("/saes/tiny/features/6?queued=1")
        page = c.get(r.headers["location"])
        assert "Explanation job" in page.text and "queued" in page.text and page.headers["cache-control"] == "no-store"
        plain = c.get("/saes/tiny/features/6")
        assert "Explanation job" in plain.text  # the live job is shown (and part of the page's ETag)
        # htmx: the same form answers with the status partial only
        again = c.post(url, data={"api_key": key, "csrf_token": token}, headers={"HX-Request": "true"})
        assert again.status_code == 200 and "<html" not in again.text and "already queued" in again.text
        denied = c.post(url, data={"api_key": "nope", "csrf_token": token}, headers={"HX-Request": "true"})
        assert denied.status_code == 403 and "<html" not in denied.text and "not valid" in denied.text
        status = c.get("/saes/tiny/features/6/job")
        assert status.status_code == 200 and "queued" in status.text and 'hx-trigger="every 5s"' in status.text
        assert c.post("/saes/tiny/features/999/explain", data={"api_key": key, "csrf_token": token}).status_code == 404
    with Session(engine) as s:
        assert s.scalar(select(Job).where(Job.requested_by == "pages")).status == "queued"


def test_search_page(published):
    engine, _ = published
    explain(engine, 3, "closing parentheses in function calls", 0.9)
    with make_client(engine) as c:
        r = c.get("/search")
        assert r.status_code == 200 and "Type an explanation word" in r.text
        check_page(r)
        r = c.get("/search", params={"q": "function call"})
        assert 'href="/saes/tiny/features/3"' in r.text and "0.90" in r.text
        check_page(r)
        none = c.get("/search", params={"q": "zebra"})
        assert "No explanation matches" in none.text
        token = c.get("/api/v1/saes/tiny/features/0").json()["peak_token"]["token"]
        r = c.get("/search", params={"token": token})
        assert 'href="/saes/tiny/features/0"' in r.text
        part = c.get("/search", params={"q": "function"}, headers={"HX-Request": "true", "HX-Target": "results"})
        assert "<html" not in part.text and 'href="/saes/tiny/features/3"' in part.text
        assert c.get("/search", params={"q": "x", "sae": "nope"}).status_code == 404
        assert c.get("/search", params={"q": "x" * 500}).status_code == 422


def test_jobs_page(published):
    engine, _ = published
    key = make_key(engine)
    with make_client(engine) as c:
        empty = c.get("/jobs")
        assert empty.status_code == 200 and "No jobs" in empty.text
        check_page(empty)
        c.post("/api/v1/jobs", json={"sae": "tiny", "indices": [1, 2]}, headers={"Authorization": f"Bearer {key}"})
        r = c.get("/jobs")
        assert 'href="/saes/tiny/features/1"' in r.text and "queued" in r.text
        assert c.get("/jobs", params={"status": "done"}).text.count('href="/saes/tiny/features/') == 0
        part = c.get("/jobs", headers={"HX-Request": "true", "HX-Target": "jobs-table"})
        assert "<html" not in part.text and "<table" in part.text
        assert c.get("/jobs", params={"status": "bogus"}).status_code == 422


def test_private_atlas_sign_in(published):
    engine, _ = published
    key = make_key(engine)
    with make_client(engine, public_reads=False) as c:
        r = c.get("/saes/tiny")
        assert r.status_code == 401 and "/login?next=" in r.text
        check_page(r)
        form = c.get("/login", params={"next": "/saes/tiny"})
        assert form.status_code == 200 and 'name="next" value="/saes/tiny"' in form.text
        token = csrf_of(form.text)
        assert c.post("/login", data={"api_key": key, "next": "/saes/tiny"}).status_code == 403  # no CSRF token
        bad = c.post("/login", data={"api_key": "wrong", "next": "/saes/tiny", "csrf_token": token})
        assert bad.status_code == 403 and "not valid" in bad.text
        ok = c.post("/login", data={"api_key": key, "next": "/saes/tiny", "csrf_token": token})
        assert ok.status_code == 303 and ok.headers["location"] == "/saes/tiny"
        cookie = next(h for h in ok.headers.get_list("set-cookie") if h.startswith("atlas_session="))
        assert "httponly" in cookie.lower() and "samesite=lax" in cookie.lower()
        assert key not in cookie and "secure" not in cookie.lower()  # plain HTTP, no trusted proxy
        assert c.get("/saes/tiny").status_code == 200
        signed_in = c.get("/login")
        assert "signed in with the key <b>pages</b>" in signed_in.text
        session_token = csrf_of(signed_in.text)
        assert session_token != token  # after signing in, forms carry the session's own token
        for evil in ("//evil.example/x", "https://evil.example", "/\\evil.example", "javascript:alert(1)"):
            r = c.post("/login", data={"api_key": key, "next": evil, "csrf_token": session_token})
            assert r.headers["location"] == "/", evil
            session_token = csrf_of(c.get("/login").text)  # each sign-in is a new session
        stolen = c.cookies["atlas_session"]
        assert c.post("/logout").status_code == 403  # no CSRF token: a cross-site sign-out is refused
        assert c.post("/logout", data={"csrf_token": session_token}).status_code == 303
        assert c.get("/").status_code == 401
        c.cookies.set("atlas_session", stolen)  # the session ended on the server, not only in this browser
        assert c.get("/").status_code == 401


def test_static_files(client):
    for path, kind in (("/static/atlas.css", "text/css"), ("/static/atlas.js", "javascript"),
                       ("/static/favicon.svg", "image/svg+xml")):
        r = client.get(path)
        assert r.status_code == 200 and kind in r.headers["content-type"], path


@pytest.fixture
def live_server(published):
    """The app under a real uvicorn on a loopback port (in a thread), for requests a test client
    would normalise before sending."""
    import threading
    import time

    import uvicorn

    from app.main import create_app
    from tests.helpers import free_port

    engine, _ = published
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine=engine), host="127.0.0.1", port=port, log_level="error",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(timeout=30)


def raw_get(port: int, target: str) -> tuple[int, bytes]:
    """GET `target` byte for byte as written (no client normalises ../ or %2e%2e away)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


TRAVERSALS = ["/static/../store/settings.py", "/static/%2e%2e/store/settings.py", "/static/%2E%2E/store/settings.py",
              "/static/..%2fstore/settings.py", "/static/%2e%2e%2fstore%2fsettings.py", "/static/....//store/settings.py",
              "/static/..\\app\\settings.py", "/static/%2e%2e%5capp%5csettings.py", "/static//etc/passwd",
              "/static/%2fetc%2fpasswd", "/static/../../../../etc/passwd", "/static/.%2e/.%2e/.%2e/etc/passwd"]


def test_static_files_cannot_be_left_over_a_raw_socket(live_server):
    status, body = raw_get(live_server, "/static/atlas.css")
    assert status == 200 and b"{" in body  # the server does serve its static folder
    secret = (REPO / "store" / "settings.py").read_bytes()[:200]
    for target in TRAVERSALS:
        status, body = raw_get(live_server, target)
        assert status in (400, 404), (target, status)
        assert secret not in body and b"root:" not in body, target


def test_an_explanation_of_an_unrelated_latent_keeps_a_features_etag(published):
    """ETags are keyed on what a response shows: the feature, its neighbours' explanations, its
    job. A new explanation anywhere else (here: a latent that is neither it nor a neighbour) must
    not invalidate it; one of its neighbours must."""
    engine, _ = published
    with make_client(engine) as c:
        api = c.get("/api/v1/saes/tiny/features/3")
        page = c.get("/saes/tiny/features/3")
        shown = {3} | {n["index"] for n in api.json()["neighbors"]}
        other = next(i for i in range(128) if i not in shown)
        explain(engine, other, "an unrelated latent's explanation", 0.7)
        assert c.get("/api/v1/saes/tiny/features/3", headers={"If-None-Match": api.headers["etag"]}).status_code == 304
        assert c.get("/saes/tiny/features/3", headers={"If-None-Match": page.headers["etag"]}).status_code == 304
        neighbour = api.json()["neighbors"][-1]["index"]
        explain(engine, neighbour, "a neighbour's explanation", 0.7)
        fresh = c.get("/api/v1/saes/tiny/features/3", headers={"If-None-Match": api.headers["etag"]})
        assert fresh.status_code == 200 and "a neighbour's explanation" in fresh.text
        assert c.get("/saes/tiny/features/3", headers={"If-None-Match": page.headers["etag"]}).status_code == 200
        # the page's ETag is per browser (its form carries the browser's CSRF token)
        other_browser = make_client(engine)
        with other_browser:
            r = other_browser.get("/saes/tiny/features/3", headers={"If-None-Match": page.headers["etag"]})
            assert r.status_code == 200 and csrf_of(r.text) != csrf_of(page.text)
