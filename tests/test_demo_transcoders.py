"""The demo's transcoder stage (app.demo_transcoders), on the tiny random Llama: `build_demo` on an
atlas whose four SAEs are already published runs only that stage (train every block, publish and
register the set, store the three example graphs with their captions and pins), a second run does
nothing, and the graph pages answer.

The pins are checked against the stored graph's own links, read here: the target logit and the
feature nodes with the largest |weight| of a link into it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from trainer.corpus import PydocCorpus

    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(d.text.replace("\n\n", "\n") for d in PydocCorpus().docs[:300]))
    return path


def tiny_settings(model_dir: Path, corpus: Path):
    from app.demo_transcoders import DemoTranscoders

    return DemoTranscoders(model=str(model_dir), width=64, k=4, tokens=4096, batch_size=512, corpus=str(corpus),
                           ce_contexts=4, eval_tokens=2048, analysis_tokens=2048, max_feature_nodes=128, pins=3,
                           train_overrides=dict(ctx_len=64, lm_batch_size=16, shuffle_buffer=4096,
                                                device="cpu", lm_dtype="float32"),
                           analysis_overrides=dict(ctx_len=64, lm_batch_size=16, shard_contexts=8, device="cpu",
                                                   lm_dtype="float32"))


def test_a_built_demo_gets_only_its_transcoder_stage_and_a_second_run_nothing(
        monkeypatch, tiny_model_dir, tiny_lm, corpus, capsys):
    import app.demo as demo
    import app.demo_transcoders as stage
    import trainer.lm
    from store import graphs as gstore
    from store.db import get_engine, session_scope, upgrade

    upgrade(get_engine())
    settings = tiny_settings(tiny_model_dir, corpus)
    calls = {"train": 0, "graphs": 0}

    def no_saes(*a, **k):
        raise AssertionError("the SAE stage ran although its SAEs are published")

    import app.graphs
    import trainer.train

    real_train, real_graph = trainer.train.train, app.graphs.compute_and_store

    def counted_train(*a, **k):
        calls["train"] += 1
        return real_train(*a, **k)

    def counted_graph(*a, **k):
        calls["graphs"] += 1
        return real_graph(*a, **k)

    monkeypatch.setattr(demo, "saes_ready", lambda: True)
    monkeypatch.setattr(demo, "build_saes", no_saes)
    monkeypatch.setattr(trainer.lm, "load_lm", lambda *a, **k: tiny_lm)
    monkeypatch.setattr(stage, "DemoTranscoders", lambda: settings)
    monkeypatch.setattr(trainer.train, "train", counted_train)
    monkeypatch.setattr(app.graphs, "compute_and_store", counted_graph)
    monkeypatch.setattr(demo, "ensure_demo_key", lambda: None)

    assert not demo.demo_ready(circuits=True)
    demo.build_demo()  # the circuits stage is opt-in: a plain demo does not train the set
    assert calls == {"train": 0, "graphs": 0} and demo.demo_ready() and not demo.demo_ready(circuits=True)
    demo.build_demo(circuits=True)
    assert calls == {"train": 1, "graphs": 3}
    assert demo.demo_ready(circuits=True)
    slugs = stage.stored_graphs(settings)
    assert set(slugs) == {p.prompt for p in settings.prompts}

    from trainer.transcoders.sets import load_transcoder_set

    tset = load_transcoder_set(stage.registered_manifest())
    assert sorted(tset.layers) == list(range(tiny_lm.n_layers))
    # the whole set's CE is measured, not each block's alone (the demo's ce_each=False)
    assert tset.metrics["ce_contexts"] == 4 and tset.metrics["ce_recovered_ci95"] is not None
    assert all("ce_recovered" not in e.metrics and "fvu" in e.metrics for e in tset.layers.values())
    with session_scope() as session:
        for example in settings.prompts:
            row = gstore.get_graph(session, slugs[example.prompt])
            data = gstore.unpack(row.graph)
            assert row.set_name == stage.DEMO_SET
            caption = data["metadata"]["caption"]
            assert caption.startswith(example.kind) and f"{row.replacement_score:.2f}" in caption
            target = next(n["node_id"] for n in data["nodes"] if n["is_target_logit"])
            kinds = {n["node_id"]: n["feature_type"] for n in data["nodes"]}
            into = sorted(((abs(link["weight"]), link["source"]) for link in data["links"]
                           if link["target"] == target and kinds[link["source"]] == "cross layer transcoder"),
                          reverse=True)
            pinned = data["qParams"]["pinnedIds"]
            assert pinned[0] == target and len(pinned) == 1 + min(3, len(into))
            assert {w for w, s in into[:3]} == {w for w, s in into if s in pinned[1:]}
            for group in data["qParams"]["supernodes"]:
                assert len(group) >= 3 and set(group[1:]) <= set(pinned[1:])

    demo.build_demo(circuits=True)  # everything is there: nothing is trained or attributed again
    assert calls == {"train": 1, "graphs": 3}
    assert stage.stored_graphs(settings) == slugs

    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app()) as client:
        for slug in slugs.values():
            page = client.get(f"/graphs/{slug}")
            assert page.status_code == 200 and 'id="graphcaption"' in page.text
            assert client.get(f"/api/v1/graphs/{slug}").json()["graph"]["metadata"]["caption"]

