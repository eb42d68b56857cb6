"""The live endpoints end to end: API -> inference service (its own server, a Unix socket) -> the
tiny model and the tiny published SAE. Exactness against the stored examples, steering with
strength 0, and every kind of bad input answered 422 / 404 / 429 / 503 in the one error shape."""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from tests.live_support import live_stack

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_sae_dir):
    """A SQLite store with the tiny SAE published (module scope: the service keeps it loaded)."""
    from store.db import make_engine, upgrade
    from trainer.publish import publish

    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('live-api') / 'atlas.db'}")
    upgrade(engine)
    publish(tiny_sae_dir, "tiny", engine=engine, progress=False)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def live(store, tmp_path_factory):
    with live_stack(store, tmp_path_factory.mktemp("live-sock"),
                    api_overrides={"inference_rate_per_minute": 0}) as (base, settings, _):
        with httpx.Client(base_url=base, timeout=120) as http:
            yield http


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["status"] == status and err["message"]
    if code:
        assert err["code"] == code
    if status == 503 and err["code"] != "inference_off":  # off is not "busy": there is nothing to wait for
        assert int(r.headers["retry-after"]) >= 1
    return err


def reproducible_top_examples(engine, tiny_sae_dir, n: int = 6):
    """Top examples whose window starts at the context's first token after BOS (their peak is closer
    to the start than the window reaches back): [BOS] + their tokens up to the peak is exactly the
    context the analysis ran, so the live value must equal the stored one."""
    from store.models import SAE, Example, Feature

    with Session(engine) as s:
        sae = s.scalar(select(SAE).where(SAE.name == "tiny"))
        before = sae.config["analysis"]["window_before"]
        rows = s.execute(select(Feature.index, Example).join(Example, Example.feature_id == Feature.id)
                         .where(Feature.sae_id == sae.id, Example.kind == 0, Example.peak < before)
                         .order_by(Example.activation.desc()).limit(400)).all()
    picked, seen = [], set()
    for index, ex in rows:
        if index not in seen:
            seen.add(index)
            picked.append((index, ex.token_array().tolist(), ex.act_array(), ex.peak, ex.activation))
        if len(picked) == n:
            break
    assert len(picked) == n, "the tiny analysis should have top examples near the start of a context"
    return picked


def test_live_activation_equals_stored_examples(live, store, tiny_sae_dir):
    for index, tokens, acts, peak, activation in reproducible_top_examples(store, tiny_sae_dir):
        r = live.post(f"/api/v1/saes/tiny/features/{index}/activations", json={"token_ids": tokens[:peak + 1]})
        assert r.status_code == 200, r.text
        d = r.json()
        assert d["masked"][0] is True and d["tokens"][0]  # BOS first, not scored
        got = np.array(d["activations"][1:], dtype=np.float32)
        # the peak: stored as float32 by the analysis
        assert got[peak] == pytest.approx(activation, rel=1e-4, abs=1e-6)
        # every token of the window up to the peak: stored as float16
        np.testing.assert_allclose(got, acts[:peak + 1], rtol=2e-3, atol=2e-3)
        assert d["peak"]["activation"] >= got[peak] - 1e-6
        assert d["peak"]["relative"] == pytest.approx(d["peak"]["activation"] / d["max_activation"])


def test_try_text_and_search_by_text(live):
    text = "def parse(path):\n    return open(path).read()"
    r = live.post("/api/v1/saes/tiny/features/5/activations", json={"text": text})
    assert r.status_code == 200
    d = r.json()
    assert len(d["tokens"]) == len(d["activations"]) == len(d["masked"]) == len(d["token_ids"])
    assert "".join(d["tokens"][1:]) == text
    r = live.post("/api/v1/search/inference", json={"text": text, "limit": 7})
    assert r.status_code == 200, r.text
    s = r.json()
    assert s["saes"] == ["tiny"] and 0 < len(s["items"]) <= 7
    rel = [it["relative"] for it in s["items"]]
    assert rel == sorted(rel, reverse=True)
    top = s["items"][0]
    assert top["links"]["page"] == f"/saes/tiny/features/{top['index']}"
    assert top["activations"][top["position"]] == pytest.approx(top["activation"])
    assert not s["masked"][top["position"]]
    # the same latent through the single-latent endpoint gives the same values
    one = live.post(f"/api/v1/saes/tiny/features/{top['index']}/activations", json={"text": text}).json()
    np.testing.assert_allclose(one["activations"], top["activations"], rtol=1e-5, atol=1e-6)
    # raw ranking, selected tokens, density filter
    raw = live.post("/api/v1/search/inference", json={"text": text, "rank_by": "activation", "limit": 5}).json()
    acts = [it["activation"] for it in raw["items"]]
    assert acts == sorted(acts, reverse=True)
    pos = [3, 4]
    sel = live.post("/api/v1/search/inference", json={"text": text, "positions": pos, "limit": 10}).json()
    for it in sel["items"]:
        assert it["position"] in pos
        assert it["activation"] == pytest.approx(max(it["activations"][p] for p in pos))
    dens = live.post("/api/v1/search/inference", json={"text": text, "density_max": 0.02, "limit": 50}).json()
    assert all(it["density"] <= 0.02 for it in dens["items"])


def test_steering_strength_zero_reproduces_the_default(live):
    for temperature in (0.0, 0.9):
        body = {"prompt": "import os\nimport", "features": [{"sae": "tiny", "index": 3, "strength": 0.0},
                                                            {"sae": "tiny", "index": 9, "strength": 0.0}],
                "max_new_tokens": 24, "temperature": temperature, "seed": 11}
        d = live.post("/api/v1/steer", json=body).json()
        assert len(d["default"]["token_ids"]) > 0
        assert d["steered"]["token_ids"] == d["default"]["token_ids"]
        assert d["steered"]["text"] == d["default"]["text"]
    # a strong push does change the continuation, from the same seed
    body["features"] = [{"sae": "tiny", "index": 3, "strength": 60.0}]
    d = live.post("/api/v1/steer", json=body).json()
    assert d["steered"]["token_ids"] != d["default"]["token_ids"]
    again = live.post("/api/v1/steer", json=body).json()
    assert again["default"] == d["default"] and again["steered"] == d["steered"]  # seeded
    clamp = live.post("/api/v1/steer", json={**body, "method": "clamp", "features": [{"sae": "tiny", "index": 3,
                                                                                       "strength": 40.0}]}).json()
    assert clamp["default"] == d["default"] and clamp["method"] == "clamp"


def test_steering_streams_server_sent_events(live):
    body = {"prompt": "The", "features": [{"sae": "tiny", "index": 3, "strength": 2.0}], "max_new_tokens": 6,
            "temperature": 0, "stream": True}
    events = []
    with live.stream("POST", "/api/v1/steer", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, line[6:]))
    kinds = [k for k, _ in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert 2 <= kinds.count("token") <= 12
    import json

    done = json.loads(events[-1][1])
    rows = {"default": "", "steered": ""}
    for k, data in events:
        if k == "token":
            e = json.loads(data)
            rows[e["row"]] += e["text"]
    assert rows["default"] == done["default"]["text"] and rows["steered"] == done["steered"]["text"]


def test_contrastive_query_and_permalink(live):
    from trainer.corpus import PydocCorpus

    docs = [d.text[:300] for d in PydocCorpus().docs[:80] if d.text.strip()]
    code = [f"def f{i}(x):\n    return x * {i} + len(x)" for i in range(20)]
    r = live.post("/api/v1/contrast", json={"set_a": code, "set_b": docs[:20], "label_a": "code", "label_b": "prose",
                                             "limit": 20})
    assert r.status_code == 201, r.text
    d = r.json()
    assert d["n_a"] == 20 and d["n_b"] == 20 and d["n_tests"] == 128
    assert d["n_significant"] > 0 and d["items"][0]["q_value"] < 0.05
    qs = [it["q_value"] for it in d["items"]]
    assert qs == sorted(qs)
    assert r.headers["location"] == d["links"]["self"]
    again = live.get(d["links"]["self"])
    assert again.status_code == 200 and again.json()["items"] == d["items"]
    assert_error(live.get("/api/v1/contrast/doesnotexist"), 404, "not_found")
    a_only = live.post("/api/v1/contrast", json={"set_a": code, "set_b": docs[:20], "direction": "a"}).json()
    assert all(it["auroc"] > 0.5 for it in a_only["items"])


def test_bad_input_is_422_or_404_never_500(live):
    post = live.post
    assert_error(post("/api/v1/saes/tiny/features/1/activations", json={"text": ""}), 422, "invalid_parameters")
    assert_error(post("/api/v1/saes/tiny/features/1/activations", json={"text": "  \n "}), 422)
    assert_error(post("/api/v1/saes/tiny/features/1/activations", json={}), 422)
    # 10 MB of text is over the request-body limit (SAE_ATLAS_MAX_BODY_BYTES): 413 before parsing;
    # a text under that limit but over the character cap is a 422
    ten_mb = "a" * (10 * 2**20)
    assert_error(post("/api/v1/saes/tiny/features/1/activations", json={"text": ten_mb}), 413, "too_large")
    assert_error(post("/api/v1/search/inference", json={"text": ten_mb}), 413, "too_large")
    assert_error(post("/api/v1/steer", json={"prompt": ten_mb, "features": [{"sae": "tiny", "index": 1, "strength": 1}]}), 413)
    one_mb = "a" * 2**20
    assert_error(post("/api/v1/saes/tiny/features/1/activations", json={"text": one_mb}), 422)
    assert_error(post("/api/v1/search/inference", json={"text": one_mb}), 422)
    assert_error(post("/api/v1/steer", json={"prompt": one_mb, "features": [{"sae": "tiny", "index": 1, "strength": 1}]}), 422)
    # over the token cap, but under the character cap: the service counts the tokens
    err = assert_error(post("/api/v1/saes/tiny/features/1/activations", json={"text": "x y " * 700}), 422)
    assert "512" in err["message"]
    assert_error(post("/api/v1/saes/tiny/features/1/activations", json={"token_ids": [10**6]}), 422)
    # unknown latents and SAEs
    assert_error(post("/api/v1/saes/tiny/features/128/activations", json={"text": "x"}), 404, "not_found")
    assert_error(post("/api/v1/saes/nope/features/1/activations", json={"text": "x"}), 404, "not_found")
    steer = {"prompt": "hi", "features": [{"sae": "tiny", "index": 1, "strength": 1.0}]}
    assert_error(post("/api/v1/steer", json={**steer, "features": [{"sae": "tiny", "index": 5000, "strength": 1}]}), 422)
    assert_error(post("/api/v1/steer", json={**steer, "features": [{"sae": "nope", "index": 1, "strength": 1}]}), 422)
    assert_error(post("/api/v1/search/inference", json={"text": "x", "saes": ["nope"]}), 422)
    assert_error(post("/api/v1/search/inference", json={"text": "x", "positions": [99]}), 422)
    assert_error(post("/api/v1/search/inference", json={"text": "x y", "positions": [0]}), 422)  # only BOS
    # NaN, infinities and huge numbers
    for bad in ("NaN", "Infinity", "-Infinity", "1e308", "101"):
        raw = '{"prompt": "hi", "features": [{"sae": "tiny", "index": 1, "strength": %s}]}' % bad
        assert_error(post("/api/v1/steer", content=raw, headers={"content-type": "application/json"}), 422)
    for field, value in (("max_new_tokens", 129), ("max_new_tokens", 0), ("temperature", -1), ("seed", -5),
                         ("method", "boost"), ("features", [])):
        assert_error(post("/api/v1/steer", json={**steer, field: value}), 422)
    assert_error(post("/api/v1/search/inference", json={"text": "x", "limit": 101}), 422)
    assert_error(post("/api/v1/search/inference", json={"text": "x", "density_min": 0.5, "density_max": 0.1}), 422)
    assert_error(post("/api/v1/contrast", json={"set_a": ["a"], "set_b": ["b", "c"]}), 422)
    assert_error(post("/api/v1/contrast", json={"set_a": ["a"] * 501, "set_b": ["b", "c"]}), 422)
    assert_error(post("/api/v1/steer", content=b"{not json", headers={"content-type": "application/json"}), 422)
    # the service is still healthy after all that
    assert post("/api/v1/saes/tiny/features/1/activations", json={"text": "ok"}).status_code == 200


def test_a_hundred_concurrent_requests_get_answers_or_503(store, tmp_path):
    """A small queue: every request is answered 200 or 503 (with Retry-After), none hangs or fails."""
    with live_stack(store, tmp_path, service_overrides={"inference_queue_size": 4},
                    api_overrides={"inference_rate_per_minute": 0}) as (base, _, _):
        def one(i):
            with httpx.Client(base_url=base, timeout=120) as c:
                if i % 3 == 0:
                    return c.post("/api/v1/search/inference", json={"text": f"text number {i} " * 8})
                if i % 3 == 1:
                    return c.post(f"/api/v1/saes/tiny/features/{i % 128}/activations", json={"text": f"value {i}"})
                return c.post("/api/v1/steer", json={"prompt": f"n{i}", "max_new_tokens": 4,
                                                     "features": [{"sae": "tiny", "index": i % 128, "strength": 1.0}]})

        with cf.ThreadPoolExecutor(max_workers=100) as pool:
            answers = list(pool.map(one, range(100)))
        codes = [r.status_code for r in answers]
        assert set(codes) <= {200, 503}, codes
        assert codes.count(200) >= 4 and codes.count(503) >= 1
        for r in answers:
            if r.status_code == 503:
                assert_error(r, 503, "busy")
        with httpx.Client(base_url=base, timeout=60) as c:  # not hung: it still answers
            assert c.post("/api/v1/saes/tiny/features/2/activations", json={"text": "after"}).status_code == 200


def test_rate_limit_for_anonymous_clients_not_for_keys(store, tmp_path):
    from app.security import create_key

    with Session(store) as s, s.begin():
        key = create_key(s, "live-rate")
    with live_stack(store, tmp_path, api_overrides={"inference_rate_per_minute": 6}) as (base, _, _):
        with httpx.Client(base_url=base, timeout=60) as c:
            codes = [c.post("/api/v1/saes/tiny/features/1/activations", json={"text": "a"}).status_code for _ in range(7)]
            assert codes[:5] == [200] * 5 and codes[-1] == 429
            r = c.post("/api/v1/saes/tiny/features/1/activations", json={"text": "a"})
            assert_error(r, 429, "rate_limited")
            assert int(r.headers["retry-after"]) >= 1
            auth = {"Authorization": f"Bearer {key}"}
            assert all(c.post("/api/v1/saes/tiny/features/1/activations", json={"text": "a"}, headers=auth).status_code == 200
                       for _ in range(8))
            bad = c.post("/api/v1/saes/tiny/features/1/activations", json={"text": "a"},
                         headers={"Authorization": "Bearer atlas_wrong"})
            assert_error(bad, 403, "forbidden")


def test_inference_off_and_service_down(store, tmp_path):
    from app.main import create_app
    from tests.helpers import free_port
    from tests.live_support import live_settings, serving

    with serving(create_app(engine=store, settings=live_settings(tmp_path, "http://127.0.0.1:1", inference="off"))) as srv:
        base = f"http://127.0.0.1:{srv.config.port}"
        with httpx.Client(base_url=base, timeout=30) as c:
            assert_error(c.post("/api/v1/saes/tiny/features/1/activations", json={"text": "a"}), 503, "inference_off")
            assert_error(c.post("/api/v1/steer", json={"prompt": "a", "features": [{"sae": "tiny", "index": 1,
                                                                                     "strength": 1}]}), 503)
            assert c.get("/api/v1/inference").json()["enabled"] is False
    nobody = f"http://127.0.0.1:{free_port()}"
    with serving(create_app(engine=store, settings=live_settings(tmp_path, nobody))) as srv:
        with httpx.Client(base_url=f"http://127.0.0.1:{srv.config.port}", timeout=30) as c:
            err = assert_error(c.post("/api/v1/search/inference", json={"text": "a"}), 503, "unavailable")
            assert "sae-atlas inference" in err["message"]
            status = c.get("/api/v1/inference").json()
            assert status["enabled"] is True and status["reachable"] is False
