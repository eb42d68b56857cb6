"""Attribution graphs stored, served and browsable: migration 0011, `sae-atlas graph`, graphs as
jobs (POST, the worker's claim, GET), the graph pages, and steering from a graph's node.

The graphs themselves are checked in tests/test_circuits.py; here a tiny random model with a
random transcoder set (saved to disk as a real set) goes through the CLI, the queue and the API.
"""

from __future__ import annotations

import json

import pytest
import torch
from sqlalchemy import inspect

from tests.test_circuits import PROMPT, save_transcoder_set

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SET_NAME = "tiny-set"


# --- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_set(tiny_model_dir, tiny_lm):
    """A complete random transcoder set of the tiny model, saved as a run folder with its
    manifest in DATA_DIR/transcoder_sets/tiny-set."""
    from store.settings import get_settings

    root = get_settings().data_dir / "transcoder_sets" / SET_NAME
    if (root / "transcoder_set.json").is_file():
        return root
    return save_transcoder_set(root, tiny_model_dir, tiny_lm, seed=3)


@pytest.fixture(scope="module")
def store_engine():
    """The settings' own store (what the CLI and the app use), migrated."""
    from store.db import get_engine, upgrade

    engine = get_engine()
    upgrade(engine)
    return engine


def _rows(engine):
    from sqlalchemy.orm import Session

    from store import graphs as gstore

    with Session(engine) as session:
        return gstore.list_graphs(session, limit=1000)


# --- storage ----------------------------------------------------------------------------------

def test_migration_0011_goes_down_and_up(engine):
    from alembic import command

    from store.db import alembic_config, current_revision, upgrade

    assert "graphs" in inspect(engine).get_table_names()
    assert {"ix_graphs_claim", "ix_graphs_created_at"} <= {ix["name"] for ix in inspect(engine).get_indexes("graphs")}
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0010")
    assert current_revision(engine) == "0010"
    assert "graphs" not in inspect(engine).get_table_names()
    upgrade(engine)
    assert current_revision(engine) == "0011"
    assert "graphs" in inspect(engine).get_table_names()


def test_a_graph_row_round_trips_compressed(engine):
    from sqlalchemy.orm import Session

    from store import graphs as gstore

    data = {"metadata": {"slug": "x"}, "nodes": [{"node_id": f"n{i}"} for i in range(500)], "links": []}
    with Session(engine) as session:
        row = gstore.queue_graph(session, "m", "s", "/p", "hello", {"node_threshold": 0.8}, status="running")
        session.commit()
        slug = row.slug
        assert gstore.store_result(session, row.id, data, 0.5, 0.9, 1.5)
        session.commit()
    with Session(engine) as session:
        got = gstore.get_graph(session, slug)
        assert (got.status, got.progress, got.n_nodes, got.replacement_score) == ("done", 1.0, 500, 0.5)
        assert gstore.unpack(got.graph) == data
        assert len(got.graph) < len(json.dumps(data)) / 5


# --- the CLI ----------------------------------------------------------------------------------

def test_the_cli_computes_and_stores_a_graph(tiny_set, store_engine, tiny_lm, capsys):
    from sqlalchemy.orm import Session

    from app.cli import main
    from store import graphs as gstore
    from trainer.circuits.attribute import AttributionConfig, attribute
    from trainer.circuits.export import graph_json
    from trainer.circuits.prune import graph_scores
    from trainer.circuits.replacement import ReplacementModel
    from trainer.transcoders.sets import load_transcoder_set

    before = {r.slug for r in _rows(store_engine)}
    assert main(["graph", "--set", str(tiny_set), PROMPT, "--max-feature-nodes", "200", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    (row,) = [r for r in _rows(store_engine) if r.slug not in before]
    assert f"graph {row.slug}:" in out and "attribution:" in err and "100%" in err
    assert (row.status, row.progress, row.set_name, row.prompt) == ("done", 1.0, SET_NAME, PROMPT)
    assert row.config["attribution"]["max_feature_nodes"] == 200
    with Session(store_engine) as session:
        data = gstore.unpack(gstore.get_graph(session, row.slug).graph)
    # the same graph computed here through the library, loaded from the same folders
    model = ReplacementModel(tiny_lm, load_transcoder_set(tiny_set).load_all())
    graph = attribute(PROMPT, model, AttributionConfig(max_feature_nodes=200))
    expected = graph_json(graph, row.slug, tiny_lm.name, tiny_lm.tokenizer.decode)
    assert {n["node_id"] for n in data["nodes"]} == {n["node_id"] for n in expected["nodes"]}
    assert len(data["links"]) == len(expected["links"]) == row.n_links
    assert (row.replacement_score, row.completeness_score) == pytest.approx(graph_scores(graph), abs=1e-5)
    # circuit-tracer's frontend format
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    assert data["metadata"]["schema_version"] == 1 and data["metadata"]["prompt"].endswith(PROMPT)
    kinds = {n["feature_type"] for n in data["nodes"]}
    assert {"embedding", "logit"} <= kinds


@pytest.mark.parametrize("argv, fragment", [
    (["graph", "--set", "/nowhere/at/all", "hi"], "does not exist"),
    (["graph", "--set", "SET", "x " * 80], "more than the 64"),
    (["graph", "--set", "SET", "hi", "--node-threshold", "2"], "node_threshold must lie in"),
])
def test_graph_cli_errors_are_one_line(argv, fragment, tiny_set, store_engine, capsys):
    from app.cli import main

    argv = [str(tiny_set) if a == "SET" else a for a in argv]
    before = len(_rows(store_engine))
    assert main(argv) != 0
    assert len(_rows(store_engine)) == before  # nothing stored for a bad request
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bar of the model loader
    assert err.startswith("error: ") and fragment in err


# --- the API and the worker -------------------------------------------------------------------

@pytest.fixture
def api(tiny_set, store_engine):
    """(client, auth headers) on the settings' store."""
    from tests.test_api import make_client, make_key

    key = make_key(store_engine, "graphs-" + __import__("uuid").uuid4().hex[:8])
    with make_client(store_engine) as client:
        yield client, {"Authorization": f"Bearer {key}"}


def test_graph_requests_are_validated(api, tiny_set, tiny_model_dir):
    from transformers import AutoTokenizer

    from tests.test_api import assert_error

    client, auth = api
    body = {"set": SET_NAME, "prompt": PROMPT}
    assert_error(client.post("/api/v1/graphs", json=body), 401)
    long = "x " * 40
    n = len(AutoTokenizer.from_pretrained(tiny_model_dir)(long, add_special_tokens=False)["input_ids"])
    assert n > 64
    err = assert_error(client.post("/api/v1/graphs", json={**body, "prompt": long}, headers=auth), 422, "invalid_parameters")
    assert f"{n} tokens, more than the 64" in err["message"] and "\n" not in err["message"]
    assert_error(client.post("/api/v1/graphs", json={**body, "set": "no-such-set"}, headers=auth), 404, "not_found")
    assert_error(client.post("/api/v1/graphs", json={**body, "set": "../etc"}, headers=auth), 422)
    assert_error(client.post("/api/v1/graphs", json={**body, "prompt": ""}, headers=auth), 422)
    assert_error(client.post("/api/v1/graphs", json={**body, "node_threshold": 1.5}, headers=auth), 422)
    # a set that lacks block 1
    data = json.loads((tiny_set / "transcoder_set.json").read_text())
    data["layers"] = [e for e in data["layers"] if e["layer"] != 1]
    partial = tiny_set.parent / "partial.json"
    partial.write_text(json.dumps({**data, "layers": [{**e, "folder": f"{SET_NAME}/{e['folder']}"} for e in data["layers"]]}))
    # and a complete set of a model this machine does not hold
    elsewhere = tiny_set.parent / "elsewhere.json"
    elsewhere.write_text(json.dumps({**data, "model": "/no/such/model",
                                     "layers": [{**e, "folder": f"{SET_NAME}/{e['folder']}"}
                                                for e in json.loads((tiny_set / "transcoder_set.json").read_text())["layers"]]}))
    try:
        err = assert_error(client.post("/api/v1/graphs", json={**body, "set": "partial"}, headers=auth), 422)
        assert "lacks block(s) 1" in err["message"]
        err = assert_error(client.post("/api/v1/graphs", json={**body, "set": "elsewhere"}, headers=auth), 422)
        assert "/no/such/model" in err["message"] and "\n" not in err["message"]
    finally:
        partial.unlink()
        elsewhere.unlink()
    assert_error(client.get("/api/v1/graphs/0123456789ab"), 404, "not_found")
    assert SET_NAME in client.get("/api/v1/graphs/sets").json()["sets"]


def test_a_queued_graph_is_claimed_computed_and_served(api, store_engine):
    from app.graphs import GraphWorker

    client, auth = api
    r = client.post("/api/v1/graphs", json={"set": SET_NAME, "prompt": PROMPT, "max_feature_nodes": 150}, headers=auth)
    assert r.status_code == 201, r.text
    slug = r.json()["slug"]
    assert r.headers["location"] == f"/api/v1/graphs/{slug}"
    got = client.get(f"/api/v1/graphs/{slug}").json()
    assert (got["status"], got["progress"], got["graph"]) == ("queued", 0.0, None)
    assert got["config"]["attribution"]["max_feature_nodes"] == 150
    # a worker claims it (through the shared lease code), records progress and stores the graph
    seen = []
    from store import graphs as gstore

    real = gstore.set_progress

    def spy(session, graph_id, progress, worker_id=None):
        seen.append(progress)
        return real(session, graph_id, progress, worker_id)

    mp = pytest.MonkeyPatch()
    mp.setattr(gstore, "set_progress", spy)
    mp.setattr("app.graphs.PROGRESS_EVERY_S", 0.0)
    try:
        worker = GraphWorker(store_engine, worker_id="test-worker")
        done = worker.run_one()
    finally:
        mp.undo()
    assert done is not None and done.slug == slug and done.status == "done"
    assert seen and seen == sorted(seen) and 0 < seen[-1] <= 1
    assert GraphWorker(store_engine).run_one() is None  # nothing left to claim
    got = client.get(f"/api/v1/graphs/{slug}").json()
    assert (got["status"], got["progress"], got["error"]) == ("done", 1.0, None)
    assert 0 < got["replacement_score"] <= 1 and 0 < got["completeness_score"] <= 1
    graph = got["graph"]
    assert set(graph) == {"metadata", "qParams", "nodes", "links"} and graph["metadata"]["slug"] == slug
    ids = {n["node_id"] for n in graph["nodes"]}
    assert len(ids) == got["n_nodes"] and all(link["source"] in ids and link["target"] in ids for link in graph["links"])
    features = [n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert 0 < len(features) <= 150
    listed = client.get("/api/v1/graphs").json()
    assert slug in [g["slug"] for g in listed["items"]] and "graph" not in listed["items"][0]


def test_the_worker_claims_on_each_backend(engine, tiny_set):
    """The claim (app.leases: FOR UPDATE SKIP LOCKED on PostgreSQL) takes the highest priority
    first, and a second worker finds nothing while the first holds its row."""
    from sqlalchemy.orm import Session

    from app import leases
    from app.graphs import GraphWorker
    from store import graphs as gstore
    from store.models import AttributionGraph

    path = str((tiny_set / "transcoder_set.json").resolve())
    with Session(engine) as session:
        low = gstore.queue_graph(session, "m", SET_NAME, path, PROMPT, {"attribution": {"max_feature_nodes": 50}})
        high = gstore.queue_graph(session, "m", SET_NAME, path, "x = [1, 2", {"attribution": {"max_feature_nodes": 50}})
        high.priority = 5
        session.commit()
        low_slug, high_slug = low.slug, high.slug
    with Session(engine) as a, Session(engine) as b:
        (first,) = leases.claim(a, "wa", model=AttributionGraph)
        (second,) = leases.claim(b, "wb", model=AttributionGraph)
        assert (first.slug, second.slug) == (high_slug, low_slug)
        assert leases.claim(b, "wb", model=AttributionGraph) == []
        assert leases.release(a, first.id, "wa", model=AttributionGraph)
        assert leases.release(b, second.id, "wb", model=AttributionGraph)
    done = [GraphWorker(engine, worker_id="w").run_one() for _ in range(2)]
    assert [(g.slug, g.status) for g in done] == [(high_slug, "done"), (low_slug, "done")]
    assert all(g.attempts == 1 and g.n_nodes > 0 for g in done)
    assert GraphWorker(engine).run_one() is None


def test_a_graph_that_cannot_be_computed_fails_with_its_error(api, store_engine, tiny_set):
    from sqlalchemy.orm import Session

    from app.graphs import GraphWorker
    from store import graphs as gstore

    with Session(store_engine) as session:
        row = gstore.queue_graph(session, "m", SET_NAME, str(tiny_set / "gone.json"), PROMPT, {})
        session.commit()
        slug = row.slug
    got = GraphWorker(store_engine, worker_id="w2").run_one()
    assert got.slug == slug and got.status == "failed" and "does not exist" in got.error


# --- the pages --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def done_graph(tiny_set, store_engine):
    """A graph computed and stored (as `sae-atlas graph` does)."""
    from app.graphs import compute_and_store

    row = compute_and_store(store_engine, tiny_set, PROMPT, {"attribution": {"max_feature_nodes": 120}, "device": "cpu"})
    assert row.status == "done"
    return row.slug


def test_the_graph_pages_render(api, done_graph, store_engine):
    client, _ = api
    r = client.get("/graphs")
    assert r.status_code == 200 and f'href="/graphs/{done_graph}"' in r.text and 'name="prompt"' in r.text
    assert SET_NAME in r.text  # offered in the form's set choice
    r = client.get(f"/graphs/{done_graph}")
    assert r.status_code == 200
    assert f'data-src="/api/v1/graphs/{done_graph}"' in r.text and "/static/graph.js" in r.text
    assert "Replacement score" in r.text and "Completeness score" in r.text
    assert "<script>" not in r.text and " style=" not in r.text  # the CSP forbids both
    assert '<option value="live">' in r.text  # steering in the live model is offered while inference is on
    from tests.test_api import make_client

    with make_client(store_engine, inference="off") as off:
        page = off.get(f"/graphs/{done_graph}").text
        assert '<option value="frozen">' in page and 'value="live"' not in page and "live model is off" in page
    assert client.get("/graphs/0123456789ab").status_code == 404
    assert client.get("/static/graph.js").status_code == 200


def test_hover_looks_up_the_published_transcoders(api, done_graph, tiny_set, tiny_model_dir, store_engine):
    """The page names, per layer, the published SAE of that layer's transcoder: while none of the
    set's blocks is published, one of the same model reading mlp_in.L; once one is (published from
    the set's own folder), only the set's own blocks, never another dictionary at the same site."""
    import html

    from sqlalchemy.orm import Session

    from store.models import LM, SAE
    from trainer.transcoders.sets import load_transcoder_set

    tset = load_transcoder_set(tiny_set)
    with Session(store_engine) as s, s.begin():
        lm = LM(name="tiny-graph-lm", source=str(tiny_model_dir), architecture="llama", n_layers=4, d_model=64,
                vocab_size=512, vocab=b"")
        s.add(lm)
        s.flush()
        common = {"lm_id": lm.id, "architecture": "topk", "d_in": 64, "d_sae": 96, "status": "ready", "version": "1"}
        s.add(SAE(name="g-l2-same-model", site="mlp_in.2", layer=2, weights_path="/elsewhere", **common))
        s.add(SAE(name="g-l3-resid", site="resid_post.3", layer=3, weights_path="/elsewhere", **common))
    client, _ = api

    def shown():
        page = client.get(f"/graphs/{done_graph}").text
        return json.loads(html.unescape(page.split('data-saes="', 1)[1].split('"', 1)[0]))

    assert shown() == {"2": "g-l2-same-model"}
    with Session(store_engine) as s, s.begin():
        s.add(SAE(name="g-l1-own", site="mlp_in.1", layer=1, weights_path=str(tset.folder(1).resolve()), **common))
    assert shown() == {"1": "g-l1-own"}


def test_the_graph_form_needs_a_key_and_queues(api, store_engine):
    import re

    client, auth = api
    page = client.get("/graphs")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    form = {"csrf_token": csrf, "set": SET_NAME, "prompt": PROMPT}
    r = client.post("/graphs", data=form, follow_redirects=False)
    assert r.status_code == 401 and "API key is needed" in r.text
    key = auth["Authorization"].split()[1]
    r = client.post("/graphs", data={**form, "prompt": "x " * 40, "api_key": key}, follow_redirects=False)
    assert r.status_code == 422 and "more than the 64" in r.text
    r = client.post("/graphs", data={**form, "api_key": key}, follow_redirects=False)
    assert r.status_code == 303
    slug = r.headers["location"].rsplit("/", 1)[1]
    page = client.get(f"/graphs/{slug}")
    assert page.status_code == 200 and "queued" in page.text and 'http-equiv="refresh"' in page.text


# --- steering from a graph --------------------------------------------------------------------

def test_steering_a_node_matches_a_hand_written_frozen_forward(api, done_graph, tiny_set, tiny_lm):
    """The endpoint's logits after setting a feature against the frozen replacement model written
    out with forward hooks in tests/test_circuits.py (HandFrozen), the feature's change added by
    hand to its layer's MLP output: (v - a) * W_dec[f] at its position."""
    from tests.test_circuits import HandFrozen, hand_codes
    from trainer.transcoders.sets import load_transcoder_set

    client, _ = api
    graph = client.get(f"/api/v1/graphs/{done_graph}").json()["graph"]
    features = [n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"]
    node = max(features, key=lambda n: n["activation"])
    layer, feature, pos = map(int, node["node_id"].split("_"))
    tcs = [load_transcoder_set(tiny_set).load_all()[i] for i in range(tiny_lm.n_layers)]
    tokens = torch.tensor([tiny_lm.bos_token_id] + tiny_lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    hand = HandFrozen("llama", tiny_lm, tokens, tcs)
    a = float(hand_codes(tcs[layer], hand.x_clean[layer])[pos, feature])
    assert a == pytest.approx(node["activation"], rel=1e-5)
    head = tiny_lm.model.get_output_embeddings()
    with torch.no_grad():
        real = tiny_lm.model(input_ids=tokens[None], use_cache=False).logits[0, -1]
    for value in (0.0, 3 * a):
        r = client.post(f"/api/v1/graphs/{done_graph}/steer", json={"node_id": node["node_id"], "value": value, "top_k": 5})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["activation"] == pytest.approx(a, rel=1e-5) and body["value"] == value
        _, head_in = hand.run(out_delta={(layer, pos): (value - a) * tcs[layer].sae.W_dec[feature].detach()})
        with torch.no_grad():
            want = torch.softmax(head(head_in[-1]).float(), -1)
        before = torch.softmax(real.float(), -1)
        assert [t["token_id"] for t in body["before"]] == before.topk(5).indices.tolist()
        assert [t["token_id"] for t in body["after"]] == want.topk(5).indices.tolist()
        torch.testing.assert_close(torch.tensor([t["prob"] for t in body["after"]]), want.topk(5).values, atol=1e-5, rtol=1e-4)
        assert body["after"] != body["before"]


def test_scaling_an_error_node_matches_a_hand_written_frozen_forward(api, done_graph, tiny_set, tiny_lm):
    """mode "frozen" on an error node against HandFrozen with the change written out: the error at
    (L, p), the clean MLP output minus the hand-computed reconstruction, scaled by m (0 ablates)."""
    from tests.test_circuits import HandFrozen, hand_codes
    from trainer.transcoders.sets import load_transcoder_set

    client, _ = api
    _features, errors, targets = _graph_nodes(client, done_graph)
    tcs = [load_transcoder_set(tiny_set).load_all()[i] for i in range(tiny_lm.n_layers)]
    tokens = torch.tensor([tiny_lm.bos_token_id] + tiny_lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    hand = HandFrozen("llama", tiny_lm, tokens, tcs)
    head = tiny_lm.model.get_output_embeddings()
    node = min(errors, key=lambda n: int(n["layer"]))
    _, layer, pos = map(int, node["node_id"].split("_"))
    sae = tcs[layer].sae
    recon = hand_codes(tcs[layer], hand.x_clean[layer])[pos] @ sae.W_dec.detach() + sae.b_dec.detach()
    error = hand.clean[("y", layer)][0, pos] - recon
    for multiplier in (0.0, 3.0):
        r = client.post(f"/api/v1/graphs/{done_graph}/steer",
                        json={"node_id": node["node_id"], "kind": "error", "multiplier": multiplier, "top_k": 5})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["mode"], body["kind"], body["multiplier"], body["activation"]) == ("frozen", "error", multiplier, None)
        _, head_in = hand.run(out_delta={(layer, pos): (multiplier - 1.0) * error})
        with torch.no_grad():
            want = head(head_in[-1]).float()
        assert [t["token_id"] for t in body["after"]] == torch.softmax(want, -1).topk(5).indices.tolist()
        torch.testing.assert_close(torch.tensor([t["logit_after"] for t in body["targets"]]), want[targets],
                                   atol=1e-4, rtol=1e-4)


def test_steering_errors(api, done_graph, store_engine):
    from sqlalchemy.orm import Session

    from store import graphs as gstore
    from tests.test_api import assert_error

    client, _ = api
    url = f"/api/v1/graphs/{done_graph}/steer"
    assert_error(client.post(url, json={"node_id": "E_12_3", "value": 1}), 422, "invalid_parameters")
    assert_error(client.post(url, json={"node_id": "99_1_1", "value": 1}), 422)
    assert_error(client.post(url, json={"node_id": "0_100000_1", "value": 1}), 422)
    assert_error(client.post(url, json={"node_id": "0_1_0", "value": 1}), 422)  # the BOS has no features
    assert_error(client.post("/api/v1/graphs/0123456789ab/steer", json={"node_id": "0_1_1"}), 404)
    with Session(store_engine) as session:
        row = gstore.queue_graph(session, "m", SET_NAME, "/nowhere", PROMPT, {}, status="failed")
        session.commit()
        slug = row.slug
    assert_error(client.post(f"/api/v1/graphs/{slug}/steer", json={"node_id": "0_1_1"}), 409, "conflict")


# --- steering from a graph in the live model -------------------------------------------------

def hand_live_logits(lm, tokens: torch.Tensor, layer: int, pos: int, delta_of) -> torch.Tensor:
    """The real model's last logits with block `layer`'s MLP output at `pos` shifted by
    delta_of(x, out) (x: the MLP's input there, out: its output there), written with plain torch
    hooks on the Llama MLP module; everything downstream is recomputed."""
    mlp = lm.model.model.layers[layer].mlp
    seen = {}

    def add(_m, _args, out):
        out = out.clone()
        out[0, pos] = out[0, pos] + delta_of(seen["x"][0, pos].float(), out[0, pos].float())
        return out

    handles = [mlp.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0])),
               mlp.register_forward_hook(add)]
    try:
        with torch.no_grad():
            return lm.model(input_ids=tokens[None], use_cache=False).logits[0, -1].float()
    finally:
        for h in handles:
            h.remove()


def _hand_feature(tc, feature: int, value=None, multiplier=None):
    """delta_of for a feature set to `value` (or scaled): (v - a) W_dec[f], a by the TopK rule."""
    from tests.test_circuits import hand_codes

    def delta_of(x, _out):
        a = float(hand_codes(tc, x[None])[0, feature])
        v = value if value is not None else multiplier * a
        return (v - a) * tc.sae.W_dec[feature].detach().float()
    return delta_of


def _hand_error(tc, multiplier: float):
    """delta_of for an error node scaled by m: (m - 1)(out - reconstruction), the reconstruction
    written out (TopK codes times W_dec plus b_dec; the set has no skip term)."""
    from tests.test_circuits import hand_codes

    def delta_of(x, out):
        recon = hand_codes(tc, x[None])[0] @ tc.sae.W_dec.detach().float() + tc.sae.b_dec.detach().float()
        return (multiplier - 1.0) * (out - recon)
    return delta_of


def _graph_nodes(client, slug):
    graph = client.get(f"/api/v1/graphs/{slug}").json()["graph"]
    features = [n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"]
    errors = [n for n in graph["nodes"] if n["feature_type"] == "mlp reconstruction error"]
    logits = [n["feature"] for n in graph["nodes"] if n["feature_type"] == "logit"]
    return features, errors, logits


def _assert_matches(body: dict, want_logits: torch.Tensor, base_logits: torch.Tensor, targets: list[int]):
    want, base = torch.softmax(want_logits, -1), torch.softmax(base_logits, -1)
    k = len(body["after"])
    assert [t["token_id"] for t in body["before"]] == base.topk(k).indices.tolist()
    assert [t["token_id"] for t in body["after"]] == want.topk(k).indices.tolist()
    torch.testing.assert_close(torch.tensor([t["prob"] for t in body["after"]]), want.topk(k).values, atol=1e-5, rtol=1e-4)
    assert [t["token_id"] for t in body["targets"]] == targets
    torch.testing.assert_close(torch.tensor([t["logit_after"] for t in body["targets"]]), want_logits[targets],
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor([t["logit_before"] for t in body["targets"]]), base_logits[targets],
                               atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def live_api(store_engine, tmp_path_factory):
    """The API and the inference service (a Unix socket) on the settings' store."""
    import httpx

    from tests.live_support import live_stack

    with live_stack(store_engine, tmp_path_factory.mktemp("graph-live"), service_overrides={"inference_threads": 1},
                    api_overrides={"inference_rate_per_minute": 0}) as (base, _settings, _app):
        with httpx.Client(base_url=base, timeout=120) as http:
            yield http


def test_live_steering_matches_a_hand_written_forward(live_api, api, done_graph, tiny_set, tiny_lm):
    """mode "live" through the inference service against the real model with the edit written out
    by hand (tests' own hooks on the MLP module): a feature set to a value, scaled, ablated; an error
    node ablated and scaled. The frozen mode, the graph's linear prediction, differs from it."""
    from trainer.transcoders.sets import load_transcoder_set

    client, _ = api
    features, errors, targets = _graph_nodes(client, done_graph)
    tcs = load_transcoder_set(tiny_set).load_all()
    tokens = torch.tensor([tiny_lm.bos_token_id] + tiny_lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        base = tiny_lm.model(input_ids=tokens[None], use_cache=False).logits[0, -1].float()
    url = f"/api/v1/graphs/{done_graph}/steer"
    node = max(features, key=lambda n: n["activation"])
    layer, feature, pos = map(int, node["node_id"].split("_"))
    tc = tcs[layer]
    a = node["activation"]
    for edit, hand in (({"value": 3 * a}, _hand_feature(tc, feature, value=3 * a)),
                       ({"multiplier": -2.0}, _hand_feature(tc, feature, multiplier=-2.0)),
                       ({}, _hand_feature(tc, feature, value=0.0))):
        r = live_api.post(url, json={"node_id": node["node_id"], "mode": "live", "top_k": 5, **edit})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["mode"], body["kind"]) == ("live", "feature")
        assert body["activation"] == pytest.approx(a, rel=1e-5)
        _assert_matches(body, hand_live_logits(tiny_lm, tokens, layer, pos, hand), base, targets)
    frozen = live_api.post(url, json={"node_id": node["node_id"], "mode": "frozen", "value": 3 * a, "top_k": 5}).json()
    live = live_api.post(url, json={"node_id": node["node_id"], "mode": "live", "value": 3 * a, "top_k": 5}).json()
    assert frozen["mode"] == "frozen"
    assert [t["token_id"] for t in frozen["before"]] == [t["token_id"] for t in live["before"]]
    assert [t["logit"] for t in frozen["before"]] == pytest.approx([t["logit"] for t in live["before"]], abs=1e-4)
    assert max(abs(f["logit_after"] - g["logit_after"]) for f, g in zip(frozen["targets"], live["targets"])) > 1e-3
    # an error node: ablated (the MLP's output there becomes the transcoder's reconstruction), scaled
    err = max(errors, key=lambda n: int(n["layer"]))
    _, e_layer, e_pos = map(int, err["node_id"].split("_"))
    for multiplier in (None, 2.5):
        edit = {} if multiplier is None else {"multiplier": multiplier}
        r = live_api.post(url, json={"node_id": err["node_id"], "kind": "error", "mode": "live", "top_k": 5, **edit})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["kind"], body["activation"], body["value"]) == ("error", None, None)
        hand = _hand_error(tcs[e_layer], 0.0 if multiplier is None else multiplier)
        _assert_matches(body, hand_live_logits(tiny_lm, tokens, e_layer, e_pos, hand), base, targets)
    # the frozen error ablation is the graph's prediction: J times minus the error, not the live answer
    r = live_api.post(url, json={"node_id": err["node_id"], "kind": "error", "mode": "frozen", "top_k": 5})
    assert r.status_code == 200 and r.json()["activation"] is None


def test_live_steering_errors(live_api, api, done_graph, tiny_set, store_engine):
    from sqlalchemy.orm import Session

    from store import graphs as gstore
    from tests.test_api import assert_error

    url = f"/api/v1/graphs/{done_graph}/steer"
    live = {"mode": "live"}
    assert_error(live_api.post(url, json={"node_id": "0_100000_1", **live}), 422, "invalid_parameters")
    assert_error(live_api.post(url, json={"node_id": "99_1_1", **live}), 422, "invalid_parameters")
    assert_error(live_api.post(url, json={"node_id": "0_1_99", **live}), 422, "invalid_parameters")
    assert_error(live_api.post(url, json={"node_id": "0_1_1", "kind": "error", "value": 2, **live}), 422)
    assert_error(live_api.post(url, json={"node_id": "1_1_1", "kind": "error", **live}), 422)
    assert_error(live_api.post(url, json={"node_id": "0_1_1", "value": 1, "multiplier": 2, **live}), 422)
    assert_error(live_api.post(url, json={"node_id": "0_1_1", "mode": "warp"}), 422)

    def done_row(model: str, set_path: str) -> str:
        with Session(store_engine) as session:
            row = gstore.queue_graph(session, model, SET_NAME, set_path, PROMPT, {}, status="running")
            session.commit()
            gstore.store_result(session, row.id, {"nodes": [], "links": []}, 0.5, 0.5, 1.0)
            session.commit()
            return row.slug

    manifest = str((tiny_set / "transcoder_set.json").resolve())
    model = load_transcoder_set_model(tiny_set)
    # the service does not hold the graph's transcoder set, or cannot load its model
    err = assert_error(live_api.post(f"/api/v1/graphs/{done_row(model, '/nowhere/set.json')}/steer",
                                     json={"node_id": "0_1_1", **live}), 409, "conflict")
    assert "does not hold the graph's transcoder set" in err["message"]
    err = assert_error(live_api.post(f"/api/v1/graphs/{done_row('/no/such/model', manifest)}/steer",
                                     json={"node_id": "0_1_1", **live}), 503, "unavailable")
    assert "cannot load model '/no/such/model'" in err["message"]
    # inference turned off: the frozen mode still answers, the live one says so
    from tests.test_api import make_client

    with make_client(store_engine, inference="off") as off:
        assert_error(off.post(url, json={"node_id": "0_1_1", **live}), 503, "inference_off")
        assert off.post(url, json={"node_id": "0_1_1"}).status_code == 200


def load_transcoder_set_model(tiny_set) -> str:
    from trainer.transcoders.sets import load_transcoder_set

    return load_transcoder_set(tiny_set).model


# --- cancelling a graph -----------------------------------------------------------------------

def test_a_queued_graph_is_cancelled(api, store_engine):
    from sqlalchemy.orm import Session

    from app import leases
    from store.models import AttributionGraph
    from tests.test_api import assert_error

    client, auth = api
    slug = client.post("/api/v1/graphs", json={"set": SET_NAME, "prompt": PROMPT}, headers=auth).json()["slug"]
    assert_error(client.post(f"/api/v1/graphs/{slug}/cancel"), 401)
    r = client.post(f"/api/v1/graphs/{slug}/cancel", headers=auth)
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["graph"]) == ("cancelled", None) and r.json()["finished_at"]
    assert_error(client.post(f"/api/v1/graphs/{slug}/cancel", headers=auth), 409, "conflict")
    assert_error(client.post("/api/v1/graphs/0123456789ab/cancel", headers=auth), 404, "not_found")
    with Session(store_engine) as session:  # a worker's claim passes it by
        assert leases.claim(session, "after-cancel", model=AttributionGraph, where=(AttributionGraph.slug == slug,)) == []
    assert client.get(f"/api/v1/graphs/{slug}").json()["status"] == "cancelled"


def test_graph_cancel_cli(api, capsys):
    from app.cli import main

    client, auth = api
    slug = client.post("/api/v1/graphs", json={"set": SET_NAME, "prompt": PROMPT}, headers=auth).json()["slug"]
    assert main(["graph-cancel", slug]) == 0
    assert f"graph {slug} cancelled" in capsys.readouterr().out
    assert client.get(f"/api/v1/graphs/{slug}").json()["status"] == "cancelled"
    assert main(["graph-cancel", slug]) != 0
    assert f"graph {slug} is already cancelled" in capsys.readouterr().err
    assert main(["graph-cancel", "0123456789ab"]) != 0
    assert "no graph '0123456789ab'" in capsys.readouterr().err


def test_a_running_graph_stops_when_cancelled(api, store_engine):
    """Cancelled through the API while the worker computes it: the worker's next progress write
    finds the row no longer its own, stops, and stores no graph."""
    from sqlalchemy import update
    from sqlalchemy.orm import Session

    from app.graphs import GraphWorker
    from store import graphs as gstore
    from store.models import AttributionGraph

    client, auth = api
    slug = client.post("/api/v1/graphs", json={"set": SET_NAME, "prompt": PROMPT, "max_feature_nodes": 150},
                       headers=auth).json()["slug"]
    with Session(store_engine) as session:  # claimed before any graph other tests left queued
        session.execute(update(AttributionGraph).where(AttributionGraph.slug == slug).values(priority=100))
        session.commit()
    real = gstore.set_progress
    calls = []

    def cancel_then_write(session, graph_id, progress, worker_id=None):
        calls.append(progress)
        if len(calls) == 1:
            assert client.get(f"/api/v1/graphs/{slug}").json()["status"] == "running"
            r = client.post(f"/api/v1/graphs/{slug}/cancel", headers=auth)
            assert r.status_code == 200, r.text
        return real(session, graph_id, progress, worker_id)

    mp = pytest.MonkeyPatch()
    mp.setattr(gstore, "set_progress", cancel_then_write)
    mp.setattr("app.graphs.PROGRESS_EVERY_S", 0.0)
    try:
        row = GraphWorker(store_engine, worker_id="cancel-worker").run_one()
    finally:
        mp.undo()
    assert len(calls) == 1  # it stopped at the first write after the cancel
    assert row.slug == slug and row.status == "cancelled" and row.graph is None and row.lease_owner is None
    got = client.get(f"/api/v1/graphs/{slug}").json()
    assert (got["status"], got["graph"], got["n_nodes"]) == ("cancelled", None, None)
