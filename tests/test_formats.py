"""Bringing SAEs from elsewhere, beyond the encode/decode conformance (tests/conformance/): broken
and hostile files, site names, transcoders in the pipeline (import, analysis, evaluation), and
`sae-atlas add` in one command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from store.errors import AtlasError
from trainer.activations import valid_token_mask
from trainer.evaluate import Evaluated, reconstruction_metrics, spliced_lm_loss
from trainer.formats import (
    SiteIO,
    check_native_hook,
    hook_name_for,
    load_sae,
    save_sae,
    site_from_hook,
)
from trainer.sae import SAEConfig, build_sae


def random_weights(d=16, f=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(f, d, generator=g), torch.randn(f, generator=g) * 0.1, torch.randn(f, d, generator=g),
            torch.randn(d, generator=g))


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """A few hundred paragraphs of the pydoc corpus: analyses here need thousands of tokens, and
    counting the whole corpus's tokens would cost more than the analysis."""
    from trainer.corpus import PydocCorpus

    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text("\n\n".join(d.text.replace("\n\n", "\n") for d in PydocCorpus().docs[:400]))
    return path


def sparsify_folder(folder, d=16, f=48, k=5, transcode=False, seed=0):
    w_enc, b_enc, w_dec, b_dec = random_weights(d, f, seed)
    folder.mkdir(parents=True)
    save_file({"encoder.weight": w_enc * 0.3, "encoder.bias": b_enc, "W_dec": w_dec * 0.1, "b_dec": b_dec * 0.1},
              str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "k": k, "d_in": d, "num_latents": f,
                                                 "transcode": transcode, "skip_connection": False}))
    return folder


@pytest.mark.parametrize("mutate, message", [
    (lambda t, c: t.update(W_enc=torch.zeros(3, 3)), "W_enc has shape"),
    (lambda t, c: t.pop("b_dec"), "lacks b_dec"),
    (lambda t, c: t.update(b_enc=torch.full((48,), float("nan"))), "NaN or infinite"),
    (lambda t, c: c.update(architecture="gated"), "lacks b_gate"),
    (lambda t, c: c.update(architecture="topk"), "positive integer k"),
    (lambda t, c: c.update(architecture="jumprelu"), "lacks the threshold"),
    (lambda t, c: c.pop("d_sae"), "lacks d_in or d_sae"),
])
def test_broken_saelens_folders(tmp_path, mutate, message):
    w_enc, b_enc, w_dec, b_dec = random_weights()
    tensors = {"W_enc": w_enc.T.contiguous(), "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}
    cfg = {"architecture": "standard", "d_in": 16, "d_sae": 48}
    mutate(tensors, cfg)
    save_file(tensors, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(AtlasError, match=message):
        load_sae(tmp_path)


def test_cfg_that_is_not_json(tmp_path):
    (tmp_path / "cfg.json").write_text("{oops")
    with pytest.raises(AtlasError, match="not valid JSON"):
        load_sae(tmp_path)


def test_truncated_weights_and_npz(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": 16, "d_sae": 48}))
    (tmp_path / "a" / "sae_weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(AtlasError, match="corrupt or truncated"):
        load_sae(tmp_path / "a")
    np.savez(tmp_path / "params.npz", W_enc=np.zeros((4, 8), np.float32))
    with pytest.raises(AtlasError, match="lacks W_dec"):
        load_sae(tmp_path / "params.npz")


def test_pickles_are_never_loaded(tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": 16, "d_sae": 48}))
    torch.save({"W_enc": torch.zeros(16, 48)}, tmp_path / "sae_weights.pt")  # a pickle: must be ignored
    with pytest.raises(AtlasError, match="is missing"):
        load_sae(tmp_path)
    (tmp_path / "pickled").mkdir()
    np.save(tmp_path / "pickled" / "x.npy", np.array([{"a": 1}], dtype=object))
    np.savez(tmp_path / "pickled" / "params.npz", W_enc=np.array([{"a": 1}], dtype=object))
    with pytest.raises(AtlasError, match="cannot read"):
        load_sae(tmp_path / "pickled")


def test_hook_names_map_both_ways():
    for site in ("resid_post.3", "mlp_out.0", "attn_out.11", "mlp_in.5"):
        assert site_from_hook(hook_name_for(site)) == site
    assert site_from_hook("blocks.4.hook_resid_pre") == "resid_post.3"
    assert site_from_hook("blocks.0.hook_resid_pre") is None  # the embeddings: no site
    assert site_from_hook("blocks.4.hook_mlp_in") is None  # TransformerLens: before the pre-MLP norm
    assert site_from_hook("blocks.4.mlp.hook_in") == "mlp_in.4"
    assert site_from_hook("model.layers.7") == "resid_post.7"
    assert site_from_hook("layers.7.mlp") == "mlp_out.7"
    assert site_from_hook("h.7.attn") == "attn_out.7"
    assert site_from_hook("model.layers.7.post_feedforward_layernorm") == "mlp_out.7"
    assert site_from_hook("model.layers.7.post_attention_layernorm") is None  # a pre-MLP norm in Llama


def test_importing_a_transcoder_needs_both_sites(tmp_path):
    from trainer.importer import import_sae

    sparsify_folder(tmp_path / "some-name", transcode=True)  # the folder name says nothing
    with pytest.raises(AtlasError, match="pass --site"):
        import_sae(tmp_path / "some-name", "gpt2", None, "t1")
    with pytest.raises(AtlasError, match="--output-site"):
        import_sae(tmp_path / "some-name", "gpt2", "mlp_in.2", "t1")
    dest = import_sae(tmp_path / "some-name", "gpt2", "mlp_in.2", "t1", output_site="mlp_out.2")
    back = load_sae(dest)
    assert (back.transcoder, back.site, back.output_site, back.model) == (True, "mlp_in.2", "mlp_out.2", "gpt2")
    sparsify_folder(tmp_path / "layers.2", transcode=False)
    with pytest.raises(AtlasError, match="not a transcoder"):
        import_sae(tmp_path / "layers.2", "gpt2", None, "t2", output_site="mlp_out.2")


def test_sparsify_modules_that_are_not_our_site_on_this_family_are_refused():
    """On Gemma 2 the MLP module's output is normalised before it joins the residual stream: a
    sparsify transcoder on layers.1.mlp predicts something no site of ours holds."""
    import transformers

    from tests.helpers import FAMILY_CONFIGS
    from trainer.lm import FAMILIES, LoadedLM

    def tiny(family, model_type):
        cls_name, kwargs = FAMILY_CONFIGS[family]
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(vocab_size=64, **kwargs))
        return LoadedLM(model, None, family, family, FAMILIES[model_type])

    gemma2, llama = tiny("gemma2", "gemma2"), tiny("llama", "llama")
    with pytest.raises(AtlasError, match="post_feedforward_layernorm"):
        check_native_hook("layers.1.mlp", gemma2, "mlp_out.1", "mlp_in.1")
    check_native_hook("layers.1.mlp", llama, "mlp_out.1", "mlp_in.1")
    check_native_hook("layers.1", gemma2, "resid_post.1")  # blocks are blocks everywhere
    with pytest.raises(AtlasError, match="does not have"):
        check_native_hook("layers.9.mlp", llama, "mlp_out.9")


def _linear_mlp(lm, layer):
    """Make block `layer`'s MLP linear (act(gate(x)) * up(x) with act = 1), so a skip transcoder
    can predict it exactly; returns (the exact W_skip, a function that undoes the patch)."""
    class One(torch.nn.Module):
        def forward(self, t):
            return torch.ones_like(t)

    mlp = lm.blocks[layer].mlp
    act = mlp.act_fn
    mlp.act_fn = One()
    return mlp.down_proj.weight.detach() @ mlp.up_proj.weight.detach(), lambda: setattr(mlp, "act_fn", act)


def test_a_transcoder_is_evaluated_against_its_output_site(tiny_lm):
    lm, layer, d = tiny_lm, 1, tiny_lm.d_model
    w_skip, undo = _linear_mlp(lm, layer)
    try:
        exact = build_sae(SAEConfig(d_in=d, d_sae=4 * d, architecture="topk", k=4))
        with torch.no_grad():
            exact.W_dec.zero_()  # the latents contribute nothing: the prediction is the skip term alone
        exact.io = SiteIO(w_skip=w_skip)
        silent = build_sae(SAEConfig(d_in=d, d_sae=4 * d, architecture="topk", k=4))
        with torch.no_grad():
            silent.W_dec.zero_()
        models = [Evaluated(exact.eval(), f"mlp_in.{layer}", output_site=f"mlp_out.{layer}"),
                  Evaluated(silent.eval(), f"mlp_in.{layer}", output_site=f"mlp_out.{layer}")]
        ids = torch.randint(2, lm.vocab_size, (4, 16))
        acts = lm.read(ids, [lm.site(f"mlp_in.{layer}"), lm.site(f"mlp_out.{layer}")])
        x, y = acts[f"mlp_in.{layer}"].reshape(-1, d), acts[f"mlp_out.{layer}"].reshape(-1, d)
        assert reconstruction_metrics(models[0], x, target=y)["fvu"] < 1e-8
        assert reconstruction_metrics(models[1], x, target=y)["fvu"] > 0.9
        with pytest.raises(ValueError, match="target"):
            reconstruction_metrics(models[0], x)
        ce = spliced_lm_loss(lm, models, [ids], sink_norm_ratio=None)
        assert ce[0]["ce_recovered"] == pytest.approx(1.0, abs=1e-4)
        assert ce[0]["delta_lm_loss"] == pytest.approx(0.0, abs=1e-4)
        assert ce[1]["ce_sae"] == pytest.approx(ce[1]["ce_zero_ablation"], abs=1e-6)
    finally:
        undo()


def test_a_transcoder_is_analysed_on_its_input_site(tiny_lm, tmp_path, small_corpus):
    from trainer.analyze import AnalyzeConfig, Analyzer

    loaded = load_sae(sparsify_folder(tmp_path / "layers.2.mlp", d=tiny_lm.d_model, f=96, transcode=True, seed=3))
    save_sae(tmp_path / "tc", loaded.sae, 1.0, loaded.site, str(tmp_path), output_site=loaded.output_site)
    cfg = AnalyzeConfig(sae_dir=tmp_path / "tc", model="tiny", out=tmp_path / "an", tokens=1200, shard_contexts=4,
                        corpus=str(small_corpus), device="cpu", lm_dtype="float32")
    analyzer = Analyzer(cfg, lm=tiny_lm)
    assert analyzer.site.name == "mlp_in.2"
    stats = analyzer.stream(progress=False)
    batches, _ = analyzer._contexts()
    counts = torch.zeros(96, dtype=torch.int64)
    for batch in batches:
        a = tiny_lm.read(batch.tokens, [tiny_lm.site("mlp_in.2")])["mlp_in.2"]
        x = a[valid_token_mask(a, cfg.sink_norm_ratio, cfg.exclude_bos)].float()
        with torch.no_grad():
            counts += (loaded.sae.encode_dense(x) > 0).sum(0)
    assert torch.equal(stats.count.cpu(), counts) and counts.sum() > 0
    assert analyzer.summary(np.zeros(96), 1)["sae"]["output_site"] == "mlp_out.2"


@pytest.mark.parametrize("transcode", [False, True])
def test_add_brings_a_sparsify_sae_to_the_store_in_one_command(tmp_path, tiny_model_dir, capsys, monkeypatch, transcode,
                                                               small_corpus):
    from app.cli import main
    from store.db import get_engine
    from store.settings import get_settings

    d = 64
    folder = sparsify_folder(tmp_path / ("layers.2.mlp" if transcode else "layers.2"), d=d, f=96, k=6,
                             transcode=transcode, seed=4)
    monkeypatch.setenv("SAE_ATLAS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SAE_ATLAS_DEVICE", "cpu")
    monkeypatch.setenv("SAE_ATLAS_LM_DTYPE", "float32")
    get_settings.cache_clear()
    get_engine.cache_clear()
    try:
        assert main(["db", "upgrade"]) == 0
        add = ["add", str(folder), "--model", str(tiny_model_dir), "--name", "mine", "--tokens", "3000",
               "--corpus", str(small_corpus)]
        assert main(add) == 0
        assert "published mine" in capsys.readouterr().out
        from fastapi.testclient import TestClient

        from app.main import create_app

        body = TestClient(create_app()).get("/api/v1/saes/mine").json()
        assert body["site"] == ("mlp_in.2" if transcode else "resid_post.2")
        assert body["d_sae"] == 96 and body["architecture"] == "topk"
        summary = json.loads((tmp_path / "data" / "saes" / "mine" / "analysis" / "summary.json").read_text())
        assert (summary["sae"]["kind"], summary["sae"]["output_site"]) == (
            ("transcoder", "mlp_out.2") if transcode else ("sae", None))
        assert main(add) == 2
        assert "--replace" in capsys.readouterr().err
    finally:
        get_settings.cache_clear()
        get_engine.cache_clear()
