"""A transcoder set published as a unit (trainer/transcoders/publish_set.py, `sae-atlas publish-set`).

A random, complete set of the tiny model (4 blocks) saved as a real run folder is published with
one LM pass: every block's examples must be what its encoder gives on mlp_in.L (hooked here on
the MLP modules, encoded by hand), the set registered so a graph through it links every feature
node to its block's published SAE, a light publish must say which scores it did not compute, and
a re-run must skip what is done.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from store.errors import AtlasError
from tests.test_circuits import PROMPT, hand_codes, random_transcoders
from tests.test_circuits import save_transcoder_set as save_set

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PREFIX = "tcs"
REPO = Path(__file__).resolve().parents[1]
ANALYSIS = {"ctx_len": 32, "lm_batch_size": 16, "shard_contexts": 16, "device": "cpu", "lm_dtype": "float32",
            "groups": False, "n_top": 5, "n_random": 4, "per_interval": 2}
TOKENS = 2400


@pytest.fixture(scope="module")
def analysis(tmp_path_factory) -> dict:
    """The blocks' analysis settings, on a small text corpus (this repository's trainer sources, a
    document per blank-line paragraph): the bundled pydoc corpus takes seconds to list."""
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(p.read_text() for p in sorted((REPO / "trainer").glob("*.py"))))
    return {**ANALYSIS, "corpus": str(path)}


@pytest.fixture(scope="module")
def store_engine():
    from store.db import get_engine, upgrade

    engine = get_engine()
    upgrade(engine)
    return engine


@pytest.fixture(scope="module")
def published(tmp_path_factory, tiny_model_dir, tiny_lm, store_engine, analysis):
    """The set published light, with explanations (few scoring windows: this checks the wiring)."""
    from trainer.interpret import windows
    from trainer.transcoders import publish_set

    run = save_set(tmp_path_factory.mktemp("tcset") / "run", tiny_model_dir, tiny_lm)
    mp = pytest.MonkeyPatch()
    mp.setattr(windows, "N_POS", 2)
    mp.setattr(windows, "N_NEG", 2)
    mp.setattr(publish_set, "LIGHT_SCORE_SAMPLE", 8)
    timings: dict = {}
    try:
        names = publish_set.publish_transcoder_set(run, PREFIX, lm=tiny_lm, tokens=TOKENS, light=True, engine=store_engine,
                                                   progress=False, analysis=analysis, explain=True, timings=timings)
    finally:
        mp.undo()
    return run, names, timings


def _sae(session, name):
    from store.models import SAE

    return session.scalar(select(SAE).where(SAE.name == name))


def test_every_block_is_published_with_its_set(published, store_engine, tiny_model_dir):
    from store.models import Feature
    from store.settings import get_settings

    run, names, timings = published
    assert names == [f"{PREFIX}-L{layer}" for layer in range(4)]
    assert timings["lm_pass_s"] > 0 and timings["analyses_s"] > 0 and timings["publish_s"] > 0
    # the one LM pass filled one cache of every input site, deleted once the blocks were analysed
    for block in run.glob("mlp.*"):
        source = json.loads((block / "analysis" / "summary.json").read_text())["analysis"]["source"]
        assert source.startswith("activation cache eval:")
    assert len({json.loads((b / "analysis" / "summary.json").read_text())["analysis"]["source"]
                for b in run.glob("mlp.*")}) == 1
    caches = [json.loads(m.read_text())["spec"]["sites"] for m in (get_settings().data_dir / "activations").glob("*/meta.json")]
    assert [f"mlp_in.{i}" for i in range(4)] not in caches
    with Session(store_engine) as s:
        for layer, name in enumerate(names):
            sae = _sae(s, name)
            assert (sae.status, sae.site, sae.layer, sae.d_sae) == ("ready", f"mlp_in.{layer}", layer, 96)
            assert sae.weights_path == str((run / f"mlp.{layer}-topk-w96-k6").resolve())
            member = sae.config["transcoder_set"]
            assert (member["name"], member["layer"], member["output_site"]) == (PREFIX, layer, f"mlp_out.{layer}")
            assert f"Block {layer} of the transcoder set {PREFIX}" in sae.description
            assert s.scalar(select(Feature.id).where(Feature.sae_id == sae.id, Feature.index == 95)) is not None


def test_examples_are_read_at_the_mlp_input(published, store_engine, tiny_lm):
    """The top example of block 2's most active latent, recomputed by hand: the window holds the
    whole context after BOS (ctx_len 32 <= window_before), the MLP's input is hooked on the module,
    and the latent's activation is the encoder's output times its decoder norm."""
    from store.models import Example, ExampleKind, Feature
    from trainer.transcoders import load_transcoder_set

    run, names, _ = published
    tc = load_transcoder_set(run).load(2)
    with Session(store_engine) as s:
        sae = _sae(s, names[2])
        feat = s.scalar(select(Feature).where(Feature.sae_id == sae.id).order_by(Feature.max_act.desc()).limit(1))
        ex = s.scalar(select(Example).where(Example.feature_id == feat.id, Example.kind == ExampleKind.top,
                                            Example.rank == 0))
        tokens = np.frombuffer(ex.token_ids, "<i4")
        peak = ex.peak
    ids = torch.tensor([[tiny_lm.bos_token_id] + tokens[:peak + 1].tolist()])
    seen = {}
    mlp = tiny_lm.model.model.layers[2].mlp
    handle = mlp.register_forward_hook(lambda m, a, o: seen.setdefault("x", a[0].detach().clone()))
    try:
        with torch.no_grad():
            tiny_lm.model(input_ids=ids)
    finally:
        handle.remove()
    codes = hand_codes(tc, seen["x"][0].float())
    want = float(codes[-1, feat.index] * tc.sae.W_dec[feat.index].norm())
    assert want > 0
    assert ex.activation == pytest.approx(want, rel=2e-3)
    assert feat.max_act == pytest.approx(want, rel=2e-3)


def test_a_light_publish_says_which_scores_it_did_not_compute(published, store_engine):
    from store.models import Explanation, Feature
    from tests.test_api import make_client

    _, names, _ = published
    with Session(store_engine) as s:
        sae = _sae(s, names[0])
        rows = s.execute(select(Feature.index, Explanation.embedding_score, Explanation.scores)
                         .join(Explanation, Explanation.feature_id == Feature.id).where(Feature.sae_id == sae.id)).all()
        auto = sae.metrics["autointerp"]
    assert len(rows) > 8 and auto["score_sample"] == 8 and auto["latents_scored"] == 8
    skipped = [r for r in rows if r.scores["embedding"].get("not_computed")]
    assert len(skipped) == len(rows) - 8
    assert all(r.embedding_score is None and r.scores["embedding"]["auroc"] is None for r in skipped)
    assert any(r.embedding_score is not None for r in rows)  # the sample was scored
    index = skipped[0].index
    with make_client(store_engine) as client:
        page = client.get(f"/saes/{names[0]}/features/{index}")
        assert page.status_code == 200 and "not computed" in page.text
        body = client.get(f"/api/v1/saes/{names[0]}/features/{index}").json()
    (e,) = [e for e in body["explanations"] if e["explainer"] == "token-pattern"]
    assert e["embedding_score"] is None and "not_computed" in e["scores"]["embedding"]


def test_the_set_is_registered_and_graphs_link_to_its_blocks(published, store_engine, tiny_model_dir, capsys):
    from app.cli import main
    from app.graphs import available_sets, resolve_set
    from app.web.graph_pages import layer_saes
    from store import graphs as gstore
    from store.models import LM, SAE
    from trainer.transcoders.sets import sets_dir

    run, names, _ = published
    registered = sets_dir() / PREFIX / "transcoder_set.json"
    data = json.loads(registered.read_text())
    assert data["published"] == {str(i): n for i, n in enumerate(names)} and data["source"] == str((run / "transcoder_set.json").resolve())
    assert PREFIX in available_sets() and sorted(resolve_set(PREFIX).layers) == [0, 1, 2, 3]
    # an unrelated SAE of the same model at mlp_in.0 is another dictionary: never linked
    with Session(store_engine) as s, s.begin():
        lm = s.scalar(select(LM).where(LM.name == str(tiny_model_dir)))
        s.add(SAE(name="tcs-decoy", lm_id=lm.id, site="mlp_in.0", layer=0, architecture="topk", d_in=64, d_sae=96,
                  status="ready", version="1", weights_path="/elsewhere"))
    # `sae-atlas graph --set NAME` finds the registered set by its name
    assert main(["graph", "--set", PREFIX, PROMPT, "--max-feature-nodes", "60", "--device", "cpu", "--quiet"]) == 0
    slug = capsys.readouterr().out.split("graph ", 1)[1].split(":", 1)[0]
    with Session(store_engine) as s:
        row = gstore.get_graph(s, slug)
        assert (row.status, row.set_name, row.set_path) == ("done", PREFIX, str(registered.resolve()))
        saes = layer_saes(s, row)
        assert saes == {i: n for i, n in enumerate(names)}
        data = gstore.unpack(gstore.get_graph(s, row.slug).graph)
        nodes = [n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"]
        assert nodes
        for n in nodes:  # every feature node's latent is a published feature of its block
            layer, feature, _ = map(int, n["node_id"].split("_"))
            from store.models import Feature

            sae = _sae(s, saes[layer])
            assert s.scalar(select(Feature.id).where(Feature.sae_id == sae.id, Feature.index == feature)) is not None
    with Session(store_engine) as s, s.begin():  # other files' graphs of the tiny model share this store
        s.delete(_sae(s, "tcs-decoy"))


def test_a_rerun_skips_what_is_published(published, store_engine, tiny_lm, analysis):
    from trainer.transcoders import publish_transcoder_set

    run, names, _ = published
    with Session(store_engine) as s:
        before = {n: _sae(s, n).version for n in names}
    timings: dict = {}
    assert publish_transcoder_set(run / "transcoder_set.json", PREFIX, lm=tiny_lm, tokens=TOKENS, light=True,
                                  engine=store_engine, progress=False, analysis=analysis, timings=timings) == names
    assert timings == {"lm_pass_s": 0.0, "analyses_s": 0.0, "publish_s": 0.0}
    with Session(store_engine) as s:
        assert {n: _sae(s, n).version for n in names} == before


def test_bad_sets_get_one_line_errors(published, tmp_path, tiny_model_dir, tiny_lm, store_engine, capsys, analysis):
    from app.cli import main
    from trainer.formats.saelens import save_sae
    from trainer.transcoders import publish_transcoder_set

    run, _, _ = published

    def refused(path, prefix="other", match="", name=None):
        with pytest.raises(AtlasError, match=match) as exc:
            publish_transcoder_set(path, prefix, lm=tiny_lm, tokens=TOKENS, engine=store_engine, progress=False,
                                   analysis=analysis, name=name)
        assert "\n" not in exc.value.one_line()

    # a folder that is not a set (an SAE folder)
    refused(run / "mlp.0-topk-w96-k6", match="holds no transcoder set")
    # a set missing a block
    refused(save_set(tmp_path / "partial", tiny_model_dir, tiny_lm, drop=1), match=r"lacks block\(s\) 1 of")
    # a block that is not a transcoder (a plain SAE at mlp_in.3)
    broken = save_set(tmp_path / "broken", tiny_model_dir, tiny_lm)
    tc = random_transcoders(tiny_lm, seed=1)[3]
    save_sae(broken / "mlp.3-topk-w96-k6", tc.sae, 1.0, "mlp_in.3", str(tiny_model_dir))
    refused(broken, match="is not a transcoder from mlp_in.3 to mlp_out.3")
    # names taken by another set's blocks; a set name registered for another set
    another = save_set(tmp_path / "another", tiny_model_dir, tiny_lm)
    refused(another, prefix=PREFIX, name="another", match="already published from")
    refused(another, prefix="another", name=PREFIX, match=f"a transcoder set named '{PREFIX}' is already registered")
    # the CLI
    assert main(["publish", str(run), "--name", "x"]) != 0
    assert "is a transcoder set, not one SAE" in capsys.readouterr().err
    assert main(["publish-set", "/no/such/set", "--prefix", "x"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "does not exist" in err[0]
    assert main(["publish-set", str(run), "--prefix", "bad name"]) != 0
    assert "invalid transcoder set name" in capsys.readouterr().err


def test_the_run_queue_refuses_a_partial_transcoder_set_naming_the_cli(capsys, tiny_model_dir, monkeypatch):
    from app.cli import main
    from store.settings import get_settings

    monkeypatch.setenv("SAE_ATLAS_MODEL_ROOTS", str(tiny_model_dir.parent))
    get_settings.cache_clear()
    assert main(["train", "--submit", "--site", "mlp.0-1", "--model", str(tiny_model_dir)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "leave block(s) 2, 3 of the model's 4 without a transcoder" in err[0]
    assert "sae-atlas train --site mlp.L" in err[0]
    monkeypatch.undo()
    get_settings.cache_clear()

