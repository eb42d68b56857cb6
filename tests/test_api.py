"""The JSON API under /api/v1 through httpx (TestClient), on SQLite and on a real PostgreSQL.

Every endpoint, pagination and filters, full text search (FTS5 / tsvector) over explanation rows
written here directly, jobs with API keys, the one error shape, and bad input of every kind —
which must never produce a 500.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from store.models import SAE, Explanation, Feature, Job

N = 128  # latents of the tiny SAE the `published` fixture publishes

EXPLANATIONS = {
    0: ("closing parentheses in function calls", 0.91),
    5: ("the keyword return at the start of a statement", 0.82),
    9: ("module names after import statements", 0.55),
    17: ("numbers inside version strings", 0.35),
}


def make_client(engine, check: bool = True, **settings) -> TestClient:
    from app.main import create_app
    from store.settings import get_settings

    s = get_settings().model_copy(update=settings) if settings else None
    return TestClient(create_app(engine=engine, settings=s, check=check), raise_server_exceptions=False)


def add_explanations(engine, sae: str = "tiny", items: dict | None = None) -> None:
    """Explanation rows as the auto-interp worker writes them, plus the denormalised best one."""
    items = EXPLANATIONS if items is None else items
    with Session(engine) as s, s.begin():
        sae_id = s.scalar(select(SAE.id).where(SAE.name == sae))
        for index, (text_, score) in items.items():
            f = s.scalar(select(Feature).where(Feature.sae_id == sae_id, Feature.index == index))
            s.add(Explanation(feature_id=f.id, text=text_, method="explain-v1", explainer="test-llm",
                              detection_score=score, detection_f1=score - 0.05, fuzzing_score=score - 0.1))
            f.explanation, f.best_score = text_, score


def make_key(engine, name: str = "tester") -> str:
    from app.security import create_key

    with Session(engine) as s, s.begin():
        return create_key(s, name)


def assert_error(r, status: int, code: str | None = None) -> dict:
    """The one error shape: {"error": {"status", "code", "message", "details"?}}."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert err["status"] == status
    assert isinstance(err["code"], str) and err["code"]
    assert isinstance(err["message"], str) and err["message"]
    assert set(err) <= {"status", "code", "message", "details"}
    assert "Traceback" not in r.text and 'File "' not in r.text
    if code:
        assert err["code"] == code, err
    return err


@pytest.fixture
def client(published):
    engine, _ = published
    with make_client(engine) as c:
        yield c


# --- models and SAEs ------------------------------------------------------------------------------

def test_models_and_saes(published):
    engine, name = published
    with make_client(engine) as c:
        models = c.get("/api/v1/models").json()["items"]
        assert len(models) == 1 and models[0]["saes"] == [name]
        assert models[0]["vocab_size"] > 0 and models[0]["d_model"] == 64

        saes = c.get("/api/v1/saes").json()["items"]
        assert [s["name"] for s in saes] == [name]
        assert saes[0]["d_sae"] == N and saes[0]["links"]["features"] == f"/api/v1/saes/{name}/features"

        r = c.get(f"/api/v1/saes/{name}")
        assert r.status_code == 200
        body = r.json()
        assert body["charts"]["log_density_hist"]["counts"] and "config" in body
        assert set(body["metrics"]) >= {"fvu", "l0"}
        etag = r.headers["etag"]
        r2 = c.get(f"/api/v1/saes/{name}", headers={"If-None-Match": etag})
        assert r2.status_code == 304 and r2.content == b"" and r2.headers["etag"] == etag
        assert c.get(f"/api/v1/saes/{name}", headers={"If-None-Match": 'W/"other", ' + etag}).status_code == 304
        assert c.get(f"/api/v1/saes/{name}", headers={"If-None-Match": 'W/"other"'}).status_code == 200

        assert_error(c.get("/api/v1/saes/nope"), 404, "not_found")
        assert_error(c.get("/api/v1/saes/" + "x" * 300), 422, "invalid_parameters")


# --- the feature table ----------------------------------------------------------------------------

def test_feature_table_pagination_sorting_filters(published):
    engine, name = published
    add_explanations(engine)
    url = f"/api/v1/saes/{name}/features"
    with make_client(engine) as c:
        first = c.get(url).json()
        assert first["total"] == N and first["page"] == 1 and first["per_page"] == 50 and first["pages"] == 3
        assert [f["index"] for f in first["items"]] == list(range(50))

        page2 = c.get(url, params={"per_page": 10, "page": 2}).json()
        assert [f["index"] for f in page2["items"]] == list(range(10, 20)) and page2["pages"] == 13
        beyond = c.get(url, params={"page": 99}).json()
        assert beyond["items"] == [] and beyond["total"] == N

        dens = [f["density"] for f in c.get(url, params={"sort": "density", "order": "desc", "per_page": 200}).json()["items"]]
        assert len(dens) == N and dens == sorted(dens, reverse=True)
        maxes = [f["max"] for f in c.get(url, params={"sort": "max", "order": "asc", "per_page": 200}).json()["items"]]
        assert maxes == sorted(maxes)

        lo, hi = sorted(dens)[N // 4], sorted(dens)[3 * N // 4]
        ranged = c.get(url, params={"density_min": lo, "density_max": hi, "per_page": 200}).json()
        assert ranged["total"] == sum(lo <= d <= hi for d in dens) > 0
        assert all(lo <= f["density"] <= hi for f in ranged["items"])

        explained = c.get(url, params={"has_explanation": "true"}).json()
        assert [f["index"] for f in explained["items"]] == sorted(EXPLANATIONS)
        assert explained["items"][0]["explanation"] == EXPLANATIONS[0][0]
        assert c.get(url, params={"has_explanation": "false"}).json()["total"] == N - len(EXPLANATIONS)

        good = c.get(url, params={"score_min": 0.5, "sort": "score", "order": "desc"}).json()
        assert [f["index"] for f in good["items"]] == [0, 5, 9]
        scored = c.get(url, params={"sort": "score", "order": "desc", "per_page": 5}).json()["items"]
        assert [f["index"] for f in scored[:4]] == [0, 5, 9, 17]  # unexplained (null) last

        summary = first["items"][0]
        assert set(summary) >= {"index", "density", "max", "mean", "firing_count", "explanation", "best_score",
                                "peak_token", "top_logits"}


BAD_TABLE_PARAMS = [
    {"sort": "bogus"}, {"order": "up"}, {"per_page": 0}, {"per_page": 201}, {"per_page": 10**30}, {"page": 0},
    {"page": -1}, {"page": "two"}, {"density_min": -0.1}, {"density_max": 2}, {"density_min": "abc"},
    {"density_min": 0.5, "density_max": 0.1}, {"density_min": "nan"}, {"density_max": "inf"}, {"score_min": 1.5},
    {"has_explanation": "maybe"},
]


def test_feature_table_bad_parameters_are_422(client):
    for params in BAD_TABLE_PARAMS:
        err = assert_error(client.get("/api/v1/saes/tiny/features", params=params), 422, "invalid_parameters")
        assert err["details"], params
    assert_error(client.get("/api/v1/saes/nope/features"), 404)


# --- one feature ----------------------------------------------------------------------------------

def test_feature_has_every_dashboard_panel(published):
    engine, name = published
    add_explanations(engine)
    with make_client(engine) as c:
        r = c.get(f"/api/v1/saes/{name}/features/0")
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        f = r.json()
        assert f["sae"] == name and f["index"] == 0 and f["d_sae"] == N
        st = f["stats"]
        assert set(st) >= {"firing_count", "density", "log10_density", "mean", "max", "e_a2", "std", "skew", "kurtosis",
                           "tokens_analyzed"}
        assert 0 < st["density"] <= 1 and st["max"] >= st["mean"] > 0
        h = f["activation_histogram"]
        assert len(h["edges"]) == len(h["counts"]) + 1 and sum(h["counts"]) == st["firing_count"]
        lg = f["logits"]
        assert len(lg["top"]) == 10 and len(lg["bottom"]) == 10
        assert lg["top"][0]["value"] >= lg["top"][-1]["value"] and isinstance(lg["top"][0]["token"], str)
        assert len(lg["histogram"]["edges"]) == len(lg["histogram"]["counts"]) + 1
        assert 10 <= len(f["neighbors"]) and all(-1 <= n["cosine"] <= 1 for n in f["neighbors"])
        ex = f["examples"]
        assert 0 < len(ex["top"]) <= 20 and ex["random"] and len(ex["intervals"]) == 10
        acts = [e["activation"] for e in ex["top"]]
        assert acts == sorted(acts, reverse=True) and abs(acts[0] - st["max"]) < 1e-3 * max(1, st["max"])
        e0 = ex["top"][0]
        assert len(e0["tokens"]) == len(e0["token_ids"]) == len(e0["acts"])
        assert abs(max(e0["acts"]) - e0["activation"]) < 2e-3 * max(1.0, e0["activation"]) + 1e-3
        assert 0 <= e0["peak"] < len(e0["tokens"])
        ranges = [g["range"] for g in ex["intervals"]]
        assert ranges == sorted(ranges, reverse=True)
        for g in ex["intervals"]:
            assert all(g["range"][0] - 1e-3 <= e["activation"] <= g["range"][1] + 1e-3 for e in g["examples"])
        assert f["explanation"] == EXPLANATIONS[0][0] and f["best_score"] == EXPLANATIONS[0][1]
        assert f["explanations"][0]["text"] == EXPLANATIONS[0][0] and f["explanations"][0]["detection_score"] == 0.91
        assert f["links"]["prev"] is None and f["links"]["next"] == f"/api/v1/saes/{name}/features/1"
        last = c.get(f"/api/v1/saes/{name}/features/{N - 1}").json()
        assert last["links"]["next"] is None and last["links"]["prev"].endswith(f"/{N - 2}")


def test_feature_etag_and_revalidation(published):
    engine, name = published
    with make_client(engine) as c:
        r = c.get(f"/api/v1/saes/{name}/features/5")
        etag = r.headers["etag"]
        assert etag.startswith('W/"') and "no-cache" in r.headers["cache-control"]
        again = c.get(f"/api/v1/saes/{name}/features/5", headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b""
        assert c.get(f"/api/v1/saes/{name}/features/6", headers={"If-None-Match": etag}).status_code == 200
        add_explanations(engine, items={5: ("something new", 0.7)})
        changed = c.get(f"/api/v1/saes/{name}/features/5", headers={"If-None-Match": etag})
        assert changed.status_code == 200 and changed.headers["etag"] != etag
        assert changed.json()["explanation"] == "something new"  # not a stale cached body


def test_neighbour_explanations_stay_fresh(published):
    engine, name = published
    with make_client(engine) as c:
        url = f"/api/v1/saes/{name}/features/3"
        first = c.get(url)
        n = first.json()["neighbors"][0]["index"]
        assert first.json()["neighbors"][0]["explanation"] is None
        add_explanations(engine, items={n: ("a neighbour's explanation", 0.6)})
        again = c.get(url, headers={"If-None-Match": first.headers["etag"]})
        assert again.status_code == 200  # a neighbour's new explanation changes this page too
        assert again.json()["neighbors"][0]["explanation"] == "a neighbour's explanation"
        near = c.get(url + "/neighbors", params={"k": 1}).json()["items"]
        assert near[0]["index"] == n and near[0]["explanation"] == "a neighbour's explanation"
        assert "a neighbour&#39;s explanation" in c.get(f"/saes/{name}/features/3").text


FEATURE_ERRORS = [
    ("/api/v1/saes/tiny/features/128", 404), ("/api/v1/saes/tiny/features/99999", 404),
    ("/api/v1/saes/nope/features/0", 404), ("/api/v1/saes/tiny/features/-1", 422),
    ("/api/v1/saes/tiny/features/abc", 422), ("/api/v1/saes/tiny/features/1.5", 422),
    ("/api/v1/saes/tiny/features/99999999999999999999999", 422), ("/api/v1/saes/tiny/features/%20", 422),
    ("/api/v1/saes/tiny/features/128/neighbors", 404), ("/api/v1/saes/nope/features/0/examples", 404),
    ("/api/v1/saes/tiny/features/-5/examples", 422),
]


def test_feature_errors(client):
    for path, status in FEATURE_ERRORS:
        assert_error(client.get(path), status)


def test_neighbors(client):
    r = client.get("/api/v1/saes/tiny/features/3/neighbors")
    body = r.json()
    assert r.status_code == 200 and body["k"] == 10 and len(body["items"]) == 10 and body["available"] >= 10
    cos = [n["cosine"] for n in body["items"]]
    assert cos == sorted(cos, reverse=True) and 3 not in [n["index"] for n in body["items"]]
    assert all(0 <= n["index"] < N for n in body["items"])
    assert len(client.get("/api/v1/saes/tiny/features/3/neighbors", params={"k": 3}).json()["items"]) == 3
    assert len(client.get("/api/v1/saes/tiny/features/3/neighbors", params={"k": 100}).json()["items"]) == body["available"]
    etag = r.headers["etag"]
    assert client.get("/api/v1/saes/tiny/features/3/neighbors", headers={"If-None-Match": etag}).status_code == 304
    for k in (0, -1, 101, 10**6, 10**30, "abc", "", "1e3", "3.5"):
        assert_error(client.get(f"/api/v1/saes/tiny/features/3/neighbors?k={k}"), 422, "invalid_parameters")


def test_examples(client):
    every = client.get("/api/v1/saes/tiny/features/2/examples").json()["items"]
    kinds = {e["kind"] for e in every}
    assert kinds == {"top", "interval", "random"}
    top = client.get("/api/v1/saes/tiny/features/2/examples", params={"kind": "top"}).json()["items"]
    assert top and all(e["kind"] == "top" for e in top) and len(top) == sum(e["kind"] == "top" for e in every)
    inter = client.get("/api/v1/saes/tiny/features/2/examples", params={"kind": "interval"}).json()["items"]
    assert all(e["kind"] == "interval" and e["interval"] is not None for e in inter)
    assert_error(client.get("/api/v1/saes/tiny/features/2/examples", params={"kind": "best"}), 422)


# --- search ---------------------------------------------------------------------------------------

def test_explanation_search_full_text(published):
    engine, name = published
    add_explanations(engine)
    dialect = engine.dialect.name
    assert dialect in ("sqlite", "postgresql")
    with make_client(engine) as c:
        def hits(q, **kw):
            r = c.get("/api/v1/search/explanations", params={"q": q, **kw})
            assert r.status_code == 200, r.text
            return [(i["sae"], i["index"]) for i in r.json()["items"]]

        assert hits("function call") == [(name, 0)]  # stemmed on both backends: calls ~ call
        assert hits("Parentheses") == [(name, 0)]
        assert hits("import") == [(name, 9)]
        assert hits("version strings") == [(name, 17)]
        assert hits("zebra") == []
        assert hits("function call", sae=name) == [(name, 0)]
        item = c.get("/api/v1/search/explanations", params={"q": "return"}).json()["items"][0]
        assert item["text"] == EXPLANATIONS[5][0] and item["detection_score"] == 0.82 and item["explainer"] == "test-llm"
        # Query syntax of either engine is treated as text, never as an error
        for q in ['"', '"unbalanced', "NEAR(a b)", "a AND OR NOT", "*", "col:val", "x' OR '1'='1", "'; DROP TABLE x; --",
                  "-", "!!!", "(((", "a & | ! b", "\\", "\u200b", "return -keyword", "ünïcödé"]:
            hits(q)
        assert_error(c.get("/api/v1/search/explanations"), 422)
        assert_error(c.get("/api/v1/search/explanations", params={"q": ""}), 422)
        assert_error(c.get("/api/v1/search/explanations", params={"q": "x" * 201}), 422)
        assert_error(c.get("/api/v1/search/explanations", params={"q": "x", "per_page": 0}), 422)
        assert_error(c.get("/api/v1/search/explanations", params={"q": "x", "per_page": 10**9}), 422)
        assert_error(c.get("/api/v1/search/explanations", params={"q": "x", "sae": "nope"}), 404)


def test_search_features_by_peak_token(published):
    engine, name = published
    with make_client(engine) as c:
        f = c.get(f"/api/v1/saes/{name}/features/0").json()
        token = f["peak_token"]["token"]
        r = c.get("/api/v1/search/tokens", params={"q": token})
        assert r.status_code == 200
        items = r.json()["items"]
        assert 0 in [i["index"] for i in items]
        assert all(i["peak_token"].strip().lower() == token.strip().lower() for i in items)
        shares = [i["peak_token_share"] for i in items]
        assert shares == sorted(shares, reverse=True)
        assert c.get("/api/v1/search/tokens", params={"q": "no-such-token-anywhere"}).json()["items"] == []
        assert_error(c.get("/api/v1/search/tokens", params={"q": ""}), 422)
        assert_error(c.get("/api/v1/search/tokens", params={"q": "x", "sae": "nope"}), 404)


# --- jobs and keys --------------------------------------------------------------------------------

def test_jobs_need_a_key_and_round_trip(published):
    engine, name = published
    key = make_key(engine)
    auth = {"Authorization": f"Bearer {key}"}
    with make_client(engine) as c:
        # writes: 401 without a key (with a WWW-Authenticate challenge), 403 with a wrong one
        r = c.post("/api/v1/jobs", json={"sae": name, "index": 3})
        assert_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert_error(c.post("/api/v1/jobs", json={"sae": name, "index": 3}, headers={"Authorization": "Bearer nope"}),
                     403, "forbidden")
        assert_error(c.post("/api/v1/jobs", json={"sae": name, "index": 3}, headers={"X-API-Key": key + "x"}), 403)
        assert_error(c.post("/api/v1/jobs", json={"garbage": True}), 401)  # auth is checked before the body
        assert_error(c.post("/api/v1/jobs", json={"sae": name, "index": 3}, headers={"Authorization": "Bearer é".encode()}), 403)

        r = c.post("/api/v1/jobs", json={"sae": name, "index": 3}, headers=auth)
        assert r.status_code == 201, r.text
        job = r.json()["job"]
        assert r.json()["created"] == 1 and job["status"] == "queued" and job["requested_by"] == "tester"
        again = c.post("/api/v1/jobs", json={"sae": name, "index": 3}, headers={"X-API-Key": key})
        assert again.status_code == 200 and again.json()["created"] == 0 and again.json()["job"]["id"] == job["id"]

        bulk = c.post("/api/v1/jobs", json={"sae": name, "indices": [3, 4, 5]}, headers=auth)
        assert bulk.status_code == 201 and bulk.json() == {"created": 2, "skipped": 1}

        listed = c.get("/api/v1/jobs").json()
        assert listed["counts"]["queued"] == 3 and len(listed["items"]) == 3
        assert {i["index"] for i in listed["items"]} == {3, 4, 5} and listed["items"][0]["sae"] == name
        assert len(c.get("/api/v1/jobs", params={"status": "done"}).json()["items"]) == 0
        two = c.get("/api/v1/jobs", params={"sae": name, "per_page": 2}).json()
        assert len(two["items"]) == 2 and two["total"] == 3 and two["pages"] == 2 and two["page"] == 1
        last = c.get("/api/v1/jobs", params={"sae": name, "per_page": 2, "page": 2}).json()
        assert [i["id"] for i in last["items"]] == [min(i["id"] for i in listed["items"])]
        assert c.get(f"/api/v1/jobs/{job['id']}").json()["status"] == "queued"

        assert_error(c.post(f"/api/v1/jobs/{job['id']}/cancel"), 401)
        assert_error(c.post(f"/api/v1/jobs/{job['id']}/cancel", headers={"Authorization": "Bearer wrong"}), 403)
        cancelled = c.post(f"/api/v1/jobs/{job['id']}/cancel", headers=auth)
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert_error(c.post(f"/api/v1/jobs/{job['id']}/cancel", headers=auth), 409, "conflict")
        assert c.get("/api/v1/jobs").json()["counts"]["cancelled"] == 1

        assert_error(c.get("/api/v1/jobs/999999"), 404)
        assert_error(c.post("/api/v1/jobs/999999/cancel", headers=auth), 404)
        assert_error(c.get("/api/v1/jobs/0"), 422)
        assert_error(c.get("/api/v1/jobs/abc"), 422)
        assert_error(c.get("/api/v1/jobs", params={"status": "sleeping"}), 422)
        assert_error(c.get("/api/v1/jobs", params={"sae": "nope"}), 404)
        assert_error(c.get("/api/v1/jobs", params={"per_page": 0}), 422)

    with Session(engine) as s:
        assert s.scalar(select(Job).where(Job.id == job["id"])).status == "cancelled"


BAD_JOB_BODIES = [
    ({"sae": "nope", "index": 1}, 404),
    ({"sae": "tiny", "index": N}, 404),
    ({"sae": "tiny", "indices": [1, N + 5]}, 404),
    ({"sae": "tiny", "index": -1}, 422),
    ({"sae": "tiny", "index": 1, "indices": [2]}, 422),
    ({"sae": "tiny", "index": 1, "surprise": 1}, 422),
    ({"sae": "tiny", "indices": []}, 422),
    ({"sae": "tiny", "density_min": 0.5, "density_max": 0.1}, 422),
    ({"sae": "tiny", "priority": 10**9}, 422),
    ({"sae": "tiny", "kind": "rm -rf"}, 422),
    ({"sae": "", "index": 1}, 422),
    ({"index": 1}, 422),
    ([1, 2, 3], 422),
    ("not json", 422),
]


def test_job_requests_with_bad_bodies(published):
    engine, _ = published
    key = make_key(engine)
    with make_client(engine) as c:
        headers = {"Authorization": f"Bearer {key}"}
        for body, status in BAD_JOB_BODIES:
            if isinstance(body, str):
                r = c.post("/api/v1/jobs", content=body, headers={**headers, "Content-Type": "application/json"})
            else:
                r = c.post("/api/v1/jobs", json=body, headers=headers)
            assert_error(r, status)
        assert c.get("/api/v1/jobs").json()["items"] == []


def test_bulk_jobs_by_density(published):
    engine, name = published
    key = make_key(engine)
    with make_client(engine) as c:
        r = c.post("/api/v1/jobs", json={"sae": name, "density_min": 0, "density_max": 1, "limit": 7},
                   headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 201 and r.json()["created"] == 7
        assert c.get("/api/v1/jobs").json()["counts"] == {"queued": 7}


def test_private_reads_need_a_key(published):
    engine, name = published
    key = make_key(engine)
    with make_client(engine, public_reads=False) as c:
        for path in ("/api/v1/models", "/api/v1/saes", f"/api/v1/saes/{name}", f"/api/v1/saes/{name}/features",
                     f"/api/v1/saes/{name}/features/1", f"/api/v1/saes/{name}/features/1/neighbors",
                     f"/api/v1/saes/{name}/features/1/examples", "/api/v1/search/explanations?q=x",
                     "/api/v1/search/tokens?q=x", "/api/v1/jobs"):
            assert_error(c.get(path), 401, "unauthorized")
            assert_error(c.get(path, headers={"Authorization": "Bearer wrong"}), 403, "forbidden")
            assert c.get(path, headers={"Authorization": f"Bearer {key}"}).status_code == 200, path
        # unknown names stay 404 (after authentication), bad parameters 422
        assert_error(c.get("/api/v1/saes/nope", headers={"X-API-Key": key}), 404)
        assert c.get("/api/v1/saes/nope").status_code == 401  # no existence oracle without a key
        # a raw key in a cookie grants nothing; a sign-in session grants reads but never API writes
        c.cookies.set("atlas_key", key)
        assert c.get("/api/v1/saes").status_code == 401
        c.cookies.clear()
        c.get("/login")
        assert c.post("/login", data={"api_key": key, "csrf_token": c.cookies["atlas_csrf"]},
                      follow_redirects=False).status_code == 303
        assert c.get("/api/v1/saes").status_code == 200
        assert_error(c.post("/api/v1/jobs", json={"sae": name, "index": 1}), 401)
    with make_client(engine) as c:  # public by default
        assert c.get("/api/v1/saes").status_code == 200


# --- the error shape everywhere -------------------------------------------------------------------

def test_nul_bytes_and_control_characters_are_not_500(client):
    for path, ok in (("/api/v1/saes/%00", 404), ("/api/v1/saes/a%00b/features/1", 404),
                     ("/api/v1/saes/tiny/features?sort=%00", 422), ("/api/v1/search/explanations?q=%00", 200),
                     ("/api/v1/search/explanations?q=a%00b%01c", 200), ("/api/v1/search/tokens?q=%00", 200),
                     ("/api/v1/search/explanations?q=x&sae=%00", 404), ("/api/v1/jobs?sae=%00", 404),
                     ("/saes/%00", 404), ("/search?q=%00&token=%00", 200), ("/search?sae=%00&q=x", 404)):
        r = client.get(path)
        assert r.status_code == ok, (path, r.status_code, r.text[:200])
        if path.startswith("/api") and ok != 200:
            assert_error(r, ok)


def test_one_error_shape_for_routing_errors(client):
    assert_error(client.get("/api/v1/nothing-here"), 404, "not_found")
    assert_error(client.get("/api/v2/saes"), 404)
    assert_error(client.delete("/api/v1/saes/tiny"), 405, "method_not_allowed")
    assert_error(client.put("/api/v1/jobs"), 405)
    assert_error(client.get("/api/v1/jobs/1/cancel"), 405)


MALFORMED_QUERIES = [
    "?%zz=1", "?k=%ff%fe", "?k=1&k=2", "?k=%00", "?=&=&&", "?k", "?k=" + "9" * 5000, "?" + "a=1&" * 2000,
    "?k=1%", "?k=%C0%AF", "?q=%ff&sort=%ff&page=%ff", "?q=%00&token=%00", "?q=" + "%e2%80%8b" * 50,
]


def test_malformed_query_strings_never_500(client):
    for query in MALFORMED_QUERIES:
        for base in ("/api/v1/saes/tiny/features/1/neighbors", "/api/v1/saes/tiny/features",
                     "/api/v1/search/explanations", "/api/v1/search/tokens", "/api/v1/jobs",
                     "/saes/tiny", "/search", "/jobs"):
            r = client.get(base + query)
            assert r.status_code in (200, 404, 422), (base + query[:40], r.status_code, r.text[:300])
            if r.status_code != 200 and base.startswith("/api"):
                assert_error(r, r.status_code)


def test_unexpected_errors_are_500_in_the_error_shape(published, monkeypatch):
    engine, name = published
    import store

    def boom(*a, **kw):
        raise RuntimeError("secret internal detail /etc/passwd")

    monkeypatch.setattr(store, "load_feature", boom)
    monkeypatch.setattr(store, "list_saes", boom)
    with make_client(engine) as c:
        for path in (f"/api/v1/saes/{name}/features/1", "/api/v1/saes"):
            r = c.get(path)
            err = assert_error(r, 500, "internal_error")
            assert "secret" not in r.text and "RuntimeError" not in r.text
            assert "content-security-policy" in r.headers and r.headers["x-content-type-options"] == "nosniff"
        page = c.get(f"/saes/{name}/features/1")
        assert page.status_code == 500 and page.headers["content-type"].startswith("text/html")
        assert "secret" not in page.text and "Traceback" not in page.text and "<h1>500" in page.text
        assert err["message"]


def test_database_down_is_503_not_a_traceback():
    from store.db import make_engine

    engine = make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    with make_client(engine, check=False) as c:
        r = c.get("/api/v1/saes")
        assert_error(r, 503, "unavailable")
        assert r.headers.get("retry-after")
        assert c.get("/").status_code == 503
