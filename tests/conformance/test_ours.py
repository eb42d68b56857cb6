"""Our own save format and `sae-atlas export`, read with the other tools' formulas.

Our folders are SAELens folders (plus a `sae_atlas` block and, for skip terms, a W_skip tensor):
what we write must mean, under SAELens's semantics (references.saelens_forward on the files
themselves), what the SAE meant in memory, and must load back as the same SAE. Exports to
sparsify must mean the same under sparsify's SparseCoder.forward (references.sparsify_forward).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from store.errors import AtlasError
from tests.conformance.layouts import saelens_cfg, saelens_weights, sparsify_folder, write_saelens
from tests.conformance.references import saelens_forward, sparsify_forward
from trainer.formats import export_folder, load_sae, save_sae
from trainer.sae import SAEConfig, build_sae

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D, F, K = 16, 64, 5
SAELENS_CLASSES = {"standard", "topk", "jumprelu", "transcoder", "skip_transcoder", "jumprelu_transcoder",
                   "jumprelu_skip_transcoder"}  # sae_lens.registry's inference classes we may write


def trained_like(arch: str, seed: int = 0):
    """One of our SAEs with every parameter random and non-zero (as if trained)."""
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(d_in=D, d_sae=F, architecture=arch, k=K))
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.5)
        sae.b_enc.normal_(0, 0.3)
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        if arch == "jumprelu":
            sae.threshold.uniform_(0.05, 0.6)
        if arch in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(0.3)
    return sae.eval()


def read_folder(folder):
    return json.loads((folder / "cfg.json").read_text()), load_file(str(folder / "sae_weights.safetensors"))


def inputs(seed=1, n=80, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, D, generator=g) + torch.randn(D, generator=g)) * scale


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "relu", "matryoshka"])
def test_saved_sae_means_the_same_under_saelens_semantics(tmp_path, arch):
    """Trained SAEs read inputs scaled by c (mean norm sqrt(d)); the saved one must read raw x."""
    sae, c = trained_like(arch), 2.5
    save_sae(tmp_path / arch, sae, c, "resid_post.3", "smollm2-135m", corpus="pydoc")
    cfg, w = read_folder(tmp_path / arch)
    assert cfg["architecture"] in SAELENS_CLASSES and cfg["normalize_activations"] == "none"
    assert cfg["apply_b_dec_to_input"] is True and (cfg["d_in"], cfg["d_sae"]) == (D, F)
    assert cfg["metadata"]["model_name"] == cfg["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert (cfg["sae_atlas"]["model"], cfg["sae_atlas"]["architecture"]) == ("smollm2-135m", arch)
    x = inputs(scale=1 / c)
    f_ref, out_ref = saelens_forward(cfg["architecture"], w, cfg, x)
    with torch.no_grad():
        f_mem = sae.encode_dense(x * c)  # the SAE in memory, on the inputs it was trained on
        out_mem = sae(x * c) / c
        loaded = load_sae(tmp_path / arch)
        f_back, out_back = loaded.sae.encode_dense(x), loaded.sae(x)
    assert (f_ref > 0).any() and torch.equal(f_ref > 0, f_mem > 0)
    torch.testing.assert_close(f_ref, f_mem, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_ref, out_mem, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f_back, f_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_back, out_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("skip", [False, True])
def test_a_transcoder_round_trips_with_its_sites_and_skip_term(tmp_path, skip):
    t, scfg = sparsify_folder(tmp_path / "layers.2.mlp", transcode=True, skip=skip, seed=3, d=D, f=F, k=K)
    loaded = load_sae(tmp_path / "layers.2.mlp")
    save_sae(tmp_path / "ours", loaded.sae, 1.0, loaded.site, "gpt2", output_site=loaded.output_site)
    cfg, w = read_folder(tmp_path / "ours")
    block = cfg["sae_atlas"]
    assert (block["kind"], block["site"], block["output_site"]) == ("transcoder", "mlp_in.2", "mlp_out.2")
    assert (cfg["metadata"]["hook_name"], cfg["metadata"]["hook_name_out"]) == ("blocks.2.ln2.hook_normalized",
                                                                              "blocks.2.hook_mlp_out")
    assert cfg["apply_b_dec_to_input"] is False and cfg["d_out"] == D
    assert ("W_skip" in w) == skip and block["saelens_loadable"] == (not skip)
    x = inputs(seed=4)
    f_ref, out_ref = sparsify_forward(t, scfg, x)
    if not skip:  # SAELens has no TopK transcoder: its TopK SAE without b_dec on the input computes the same
        assert cfg["architecture"] == "topk"
        f_sl, out_sl = saelens_forward("topk", w, cfg, x)
        torch.testing.assert_close(f_sl, f_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out_sl, out_ref, rtol=1e-4, atol=1e-4)
    back = load_sae(tmp_path / "ours")
    assert (back.transcoder, back.site, back.output_site, back.kind) == (True, "mlp_in.2", "mlp_out.2", loaded.kind)
    with torch.no_grad():
        torch.testing.assert_close(back.sae.encode_dense(x), f_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(back.sae(x), out_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["jumprelu_skip_transcoder", "transcoder"])
def test_saelens_transcoders_are_saved_as_saelens_transcoders(tmp_path, arch):
    t = saelens_weights(arch, seed=8)
    src = saelens_cfg(arch, apply_b_dec=False, hook="blocks.3.ln2.hook_normalized", hook_out="blocks.3.hook_mlp_out")
    loaded = load_sae(write_saelens(tmp_path / "src", src, t))
    save_sae(tmp_path / "ours", loaded.sae, 1.0, loaded.site, "gpt2", output_site=loaded.output_site)
    cfg, w = read_folder(tmp_path / "ours")
    assert cfg["architecture"] == arch and set(w) == set(t)
    x = inputs(seed=5)
    f_ref, out_ref = saelens_forward(arch, t, src, x)
    f_ours, out_ours = saelens_forward(arch, w, cfg, x)
    torch.testing.assert_close(f_ours, f_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_ours, out_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm", ["layer_norm", "constant_norm_rescale"])
def test_run_time_normalisation_is_written_back(tmp_path, norm):
    t = saelens_weights("jumprelu", seed=9)
    src = saelens_cfg("jumprelu", apply_b_dec=False, norm=norm)
    loaded = load_sae(write_saelens(tmp_path / "src", src, t))
    save_sae(tmp_path / "ours", loaded.sae, 1.0, loaded.site, "gpt2")
    cfg, w = read_folder(tmp_path / "ours")
    assert cfg["normalize_activations"] == norm
    x = inputs(seed=6, scale=3.0)
    torch.testing.assert_close(saelens_forward("jumprelu", w, cfg, x)[1], saelens_forward("jumprelu", t, src, x)[1],
                               rtol=1e-4, atol=1e-4)


def test_export_to_sparsify_writes_what_sparsify_reads(tmp_path, capsys):
    from app.cli import main

    sae = trained_like("topk", seed=2)
    save_sae(tmp_path / "ours", sae, 1.0, "resid_post.3", "smollm2-135m")
    assert main(["export", str(tmp_path / "ours"), "--format", "sparsify", "--out", str(tmp_path / "layers.3")]) == 0
    assert "SparseCoder.load_from_disk" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "layers.3" / "cfg.json").read_text())
    t = load_file(str(tmp_path / "layers.3" / "sae.safetensors"))
    assert set(cfg) == {"activation", "expansion_factor", "normalize_decoder", "num_latents", "k", "multi_topk",
                        "skip_connection", "transcode", "d_in"}
    assert set(t) == {"encoder.weight", "encoder.bias", "W_dec", "b_dec"} and t["encoder.weight"].shape == (F, D)
    x = inputs(seed=7)
    f_ref, out_ref = sparsify_forward(t, cfg, x)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode_dense(x), f_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sae(x), out_ref, rtol=1e-4, atol=1e-4)
    assert load_sae(tmp_path / "layers.3").site == "resid_post.3"


def test_export_of_a_skip_transcoder_to_sparsify(tmp_path):
    t, scfg = sparsify_folder(tmp_path / "layers.1.mlp", transcode=True, skip=True, seed=3, d=D, f=F, k=K)
    export_folder(tmp_path / "layers.1.mlp", "sparsify", tmp_path / "out" / "layers.1.mlp")
    cfg = json.loads((tmp_path / "out" / "layers.1.mlp" / "cfg.json").read_text())
    t2 = load_file(str(tmp_path / "out" / "layers.1.mlp" / "sae.safetensors"))
    assert cfg["transcode"] and cfg["skip_connection"]
    x = inputs(seed=8)
    torch.testing.assert_close(sparsify_forward(t2, cfg, x)[1], sparsify_forward(t, scfg, x)[1], rtol=1e-4, atol=1e-4)


def test_exports_that_the_tool_could_not_read_are_refused(tmp_path):
    save_sae(tmp_path / "jr", trained_like("jumprelu"), 1.0, "resid_post.1", "gpt2")
    with pytest.raises(AtlasError, match="sparsify has no jumprelu SAEs"):
        export_folder(tmp_path / "jr", "sparsify", tmp_path / "x")
    sparsify_folder(tmp_path / "layers.1.mlp", transcode=True, skip=True, seed=3, d=D, f=F, k=K)
    with pytest.raises(AtlasError, match="SAELens has no class for TopK skip-transcoders"):
        export_folder(tmp_path / "layers.1.mlp", "saelens", tmp_path / "y")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("")
    with pytest.raises(AtlasError, match="not empty"):
        export_folder(tmp_path / "jr", "saelens", tmp_path / "full")
