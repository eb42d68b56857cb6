"""Keys with scopes, sign-in sessions, Secure cookies behind trusted proxies, the body limit and
the write-key gate (both before any body is parsed)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from store.models import APIKey, Job, WebSession
from tests.test_pages import make_client

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def key_of(engine, name: str, scope: str) -> str:
    from app.security import create_key

    with Session(engine) as s, s.begin():
        return create_key(s, name, scope=scope)


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def sign_in(c, key: str, **headers):
    token = csrf_of(c.get("/login").text)
    return c.post("/login", data={"api_key": key, "csrf_token": token}, headers=headers)


def test_read_keys_read_and_only_write_keys_write(published):
    engine, name = published
    reader, writer = key_of(engine, "reader", "read"), key_of(engine, "writer", "write")
    with make_client(engine, public_reads=False) as c:
        assert c.get("/api/v1/saes", headers={"Authorization": f"Bearer {reader}"}).status_code == 200
        r = c.post("/api/v1/jobs", json={"sae": name, "index": 1}, headers={"Authorization": f"Bearer {reader}"})
        assert r.status_code == 403 and "can only read" in r.json()["error"]["message"]
        r = c.post("/api/v1/jobs", json={"sae": name, "index": 1}, headers={"Authorization": f"Bearer {writer}"})
        assert r.status_code == 201
        # a read-only key signed in browses, and its session cannot request explanations
        assert sign_in(c, reader).status_code == 303
        page = c.get(f"/saes/{name}/features/2")
        assert page.status_code == 200
        r = c.post(f"/saes/{name}/features/2/explain", data={"csrf_token": csrf_of(page.text)})
        assert r.status_code == 403 and "can only read" in r.text
        # a write key's session can, without typing the key again
        assert sign_in(c, writer).status_code == 303
        page = c.get(f"/saes/{name}/features/2")
        r = c.post(f"/saes/{name}/features/2/explain", data={"csrf_token": csrf_of(page.text)})
        assert r.status_code == 303
        # a CSRF token of another browser's session is refused
        assert c.post(f"/saes/{name}/features/3/explain", data={"csrf_token": "0" * 64}).status_code == 403
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(Job).where(Job.requested_by == "writer")) == 2
        assert s.scalar(select(func.count()).select_from(Job).where(Job.requested_by == "reader")) == 0


def test_keys_create_with_a_scope_on_the_command_line(engine, tmp_path):
    env = {**__import__("os").environ, "DATABASE_URL": engine.url.render_as_string(hide_password=False),
           "PYTHONPATH": str(REPO)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "app.cli", "keys", *a], env=env, capture_output=True,  # noqa: E731
                                    text=True, cwd=REPO)
    made = run("create", "viewer", "--scope", "read")
    assert made.returncode == 0 and made.stdout.startswith("atlas_"), made.stderr
    assert run("create", "other", "--scope", "admin").returncode == 2
    listed = run("list")
    assert re.search(r"viewer\s+atlas_\S+…\s+read", listed.stdout), listed.stdout
    with Session(engine) as s:
        assert s.scalar(select(APIKey.scope).where(APIKey.name == "viewer")) == "read"


def test_the_session_cookie_is_secure_only_behind_a_trusted_tls_proxy(published):
    engine, _ = published
    key = key_of(engine, "k", "read")
    with make_client(engine) as c:  # no trusted proxies: the header is ignored
        r = sign_in(c, key, **{"X-Forwarded-Proto": "https"})
        assert "secure" not in r.headers["set-cookie"].lower()
    from fastapi.testclient import TestClient

    from app.main import create_app
    from store.settings import get_settings

    settings = get_settings().model_copy(update={"trusted_proxies": ["127.0.0.1"]})
    app = create_app(engine=engine, settings=settings)
    with TestClient(app, follow_redirects=False, client=("127.0.0.1", 50000)) as c:
        r = sign_in(c, key, **{"X-Forwarded-Proto": "https"})
        cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith("atlas_session="))
        assert "secure" in cookie.lower()
        c.cookies.clear()
        r = sign_in(c, key)  # the proxy said nothing about TLS
        cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith("atlas_session="))
        assert "secure" not in cookie.lower()
    with TestClient(app, follow_redirects=False, client=("203.0.113.9", 50000)) as c:  # not the proxy
        r = sign_in(c, key, **{"X-Forwarded-Proto": "https"})
        cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith("atlas_session="))
        assert "secure" not in cookie.lower()


def test_revoking_a_key_ends_its_sessions(published):
    from app.security import revoke_key

    engine, _ = published
    key = key_of(engine, "leaving", "read")
    with make_client(engine, public_reads=False) as c:
        assert sign_in(c, key).status_code == 303
        assert c.get("/").status_code == 200
        with Session(engine) as s, s.begin():
            revoke_key(s, "leaving")
        assert c.get("/").status_code == 401
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(WebSession)) == 0
        token_hashes = s.scalars(select(WebSession.token_hash)).all()
        assert key not in str(token_hashes)


def test_bodies_over_the_limit_are_413_before_parsing(published):
    engine, name = published
    key = key_of(engine, "w", "write")
    auth = {"Authorization": f"Bearer {key}"}
    with make_client(engine, max_body_bytes=4096) as c:
        big = b'{"sae": "' + b"x" * 10_000 + b'"}'
        r = c.post("/api/v1/jobs", content=big, headers={**auth, "Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        # no Content-Length (chunked): counted while it streams in
        r = c.post("/api/v1/jobs", content=iter([big[:3000], big[3000:]]),
                   headers={**auth, "Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        # the same limit for forms
        r = c.post(f"/saes/{name}/features/1/explain", data={"api_key": "k" * 5000})
        assert r.status_code == 413
        # under the limit, all is as usual
        assert c.post("/api/v1/jobs", json={"sae": name, "index": 1}, headers=auth).status_code == 201


def test_the_key_is_checked_before_the_body_is_parsed(published):
    engine, _ = published
    reader = key_of(engine, "r", "read")
    with make_client(engine) as c:
        garbage = {"Content-Type": "application/json"}
        r = c.post("/api/v1/jobs", content=b"{not json", headers=garbage)
        assert r.status_code == 401  # not 422: nothing was parsed for a caller without a key
        r = c.post("/api/v1/runs", content=b"[" * 100_000, headers={**garbage, "Authorization": "Bearer wrong"})
        assert r.status_code == 403
        r = c.post("/api/v1/jobs", content=b"{not json", headers={**garbage, "Authorization": f"Bearer {reader}"})
        assert r.status_code == 403
        # unknown routes and methods still answer 404 / 405, keys or not
        assert c.post("/api/v1/nothing").status_code == 404
        assert c.delete("/api/v1/saes/x").status_code == 405


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_login_cookie_never_holds_the_key(published):
    engine, _ = published
    key = key_of(engine, "s", "read")
    with make_client(engine) as c:
        r = sign_in(c, key)
        for header in r.headers.get_list("set-cookie"):
            assert key not in header
        token = c.cookies["atlas_session"]
        with Session(engine) as s:
            stored = s.scalars(select(WebSession.token_hash)).all()
        assert token not in stored and __import__("hashlib").sha256(token.encode()).hexdigest() in stored
