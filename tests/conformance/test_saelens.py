"""SAELens folders, built as SAELens 6.54 writes them, against SAELens's own encode and decode.

Files: `SAE.save_model` writes cfg.json = `cfg.to_dict()` (the config's dataclass fields, then
`metadata`'s dict and `architecture`) and sae_weights.safetensors = the module's state_dict;
`TrainingSAE.save_inference_model` writes the inference class's fields (BatchTopK and Matryoshka
become `jumprelu` with `threshold = topk_threshold` for every latent); a training checkpoint keeps
the normalisation statistics in activation_scaler.json (+ activation_whitening.safetensors);
SAELens < 6 wrote the model and hook names flat at the top level.

The reference (references.saelens_forward) is written from SAELens's source (sae_lens/saes/*.py,
training/activation_scaler.py):
  process_sae_in: x' = norm_in(x) - b_dec * apply_b_dec_to_input   (transcoders: no b_dec)
  standard: relu(x' W_enc + b_enc);  topk: top k of z (times ||W_dec,i|| when rescale_acts_by_decoder_norm), relu
  jumprelu: relu(z) * (z > threshold);  gated: (x' W_enc + b_gate > 0) * relu(x' (W_enc e^r_mag) + b_mag)
  decode: norm_out(f W_dec + b_dec) (transcoders: no norm_out, + x W_skip^T for skip transcoders)
  constant_norm_rescale: x * sqrt(d_in) / ||x||;  layer_norm: (x - mean) / (std + 1e-5), out * std + mean
  checkpoints: ActivationScaler.scale (x * s, or (x - mean) M) before, unscale after.
Inputs and every bias are random and non-zero; thresholds include negative values.
"""

from __future__ import annotations

import json
import zlib

import pytest
import torch
from safetensors.torch import save_file

from store.errors import AtlasError
from tests.conformance.layouts import D, F, K, saelens_cfg, write_saelens
from tests.conformance.layouts import saelens_weights as weights
from tests.conformance.references import TRANSCODERS, saelens_forward
from trainer.formats import load_sae

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def inputs(seed: int = 100, n: int = 96) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g) * 2.0 + torch.randn(D, generator=g)  # varied norms, non-zero mean


def assert_conforms(loaded, f_ref, out_ref, x):
    with torch.no_grad():
        f = loaded.sae.encode_dense(x)
        out = loaded.sae(x)
    assert torch.equal(f > 0, f_ref > 0), f"{int(((f > 0) != (f_ref > 0)).sum())} latents switched on or off"
    torch.testing.assert_close(f, f_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    assert (f_ref > 0).any() and not (f_ref > 0).all()


# --- the tests ----------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["none", "constant_norm_rescale", "layer_norm"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("arch, rescale", [("standard", False), ("topk", False), ("topk", True),
                                           ("jumprelu", False), ("gated", False)])
def test_sae_encodes_and_decodes_as_saelens(tmp_path, arch, rescale, apply_b_dec, norm):
    t = weights(arch, seed=zlib.crc32(f"{arch}{rescale}{apply_b_dec}{norm}".encode()))
    cfg = saelens_cfg(arch, apply_b_dec, norm, rescale=rescale)
    loaded = load_sae(write_saelens(tmp_path / "sae", cfg, t))
    assert (loaded.site, loaded.model, loaded.transcoder) == ("resid_post.3", "gpt2", False)
    x = inputs()
    assert_conforms(loaded, *saelens_forward(arch, t, cfg, x), x)


@pytest.mark.parametrize("norm", ["none", "layer_norm"])
@pytest.mark.parametrize("arch", TRANSCODERS)
def test_transcoders_read_one_site_and_predict_another(tmp_path, arch, norm):
    t = weights(arch, seed=7)
    cfg = saelens_cfg(arch, apply_b_dec=False, norm=norm, hook="blocks.3.ln2.hook_normalized",
                      hook_out="blocks.3.hook_mlp_out")
    loaded = load_sae(write_saelens(tmp_path / "tc", cfg, t))
    assert loaded.transcoder and (loaded.site, loaded.output_site) == ("mlp_in.3", "mlp_out.3")
    assert loaded.kind == ("skip_transcoder" if "skip" in arch else "transcoder")
    x = inputs(seed=3)
    assert_conforms(loaded, *saelens_forward(arch, t, cfg, x), x)


def _whitening(seed: int):
    """ActivationScaler.estimate_whitening's statistics on a random correlated sample."""
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(500, D, generator=g, dtype=torch.float64) @ torch.randn(D, D, generator=g, dtype=torch.float64)
    acts += torch.randn(D, generator=g, dtype=torch.float64) * 3
    mean = acts.mean(0)
    cov = (acts - mean).T @ (acts - mean) / (len(acts) - 1)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    eigenvalues = eigenvalues.clamp(min=0) + 1e-3
    return mean, (eigenvectors * eigenvalues.rsqrt()).contiguous(), (eigenvalues.sqrt().unsqueeze(1) * eigenvectors.T).contiguous()


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
@pytest.mark.parametrize("norm", ["expected_average_only_in", "covariance_whitening"])
def test_training_checkpoint_normalisation_is_applied(tmp_path, norm, arch, apply_b_dec):
    """A checkpoint's weights read normalised activations; its statistics sit beside them. SAELens's
    trainer folds them at the end; the SAE must encode raw x as scale(x) and decode to unscale(.)."""
    t = weights(arch, seed=11)
    cfg = saelens_cfg(arch, apply_b_dec, norm)
    folder = write_saelens(tmp_path / "checkpoint", cfg, t)
    x = inputs(seed=5) * 7.0
    if norm == "expected_average_only_in":
        s = 0.37
        (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": s, "has_whitening": False}))
        scale, unscale = (lambda a: a * s), (lambda a: a / s)
    else:
        mean, m, m_inv = _whitening(seed=2)
        (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": None, "has_whitening": True}))
        save_file({"mean": mean, "matrix": m, "inverse_matrix": m_inv}, str(folder / "activation_whitening.safetensors"))
        scale = lambda a: ((a.double() - mean) @ m).float()  # noqa: E731
        unscale = lambda a: (a.double() @ m_inv + mean).float()  # noqa: E731
    f_ref, out_ref = saelens_forward(arch, t, {**cfg, "normalize_activations": "none"}, scale(x))
    assert_conforms(load_sae(folder), f_ref, unscale(out_ref), x)


@pytest.mark.parametrize("norm", ["expected_average_only_in", "covariance_whitening"])
def test_normalisation_without_its_statistics_is_refused(tmp_path, norm):
    folder = write_saelens(tmp_path / "sae", saelens_cfg("standard", norm=norm), weights("standard", 0))
    with pytest.raises(AtlasError, match="activation_scaler.json"):
        load_sae(folder)


def test_batchtopk_saved_for_inference_is_a_jumprelu(tmp_path):
    """save_inference_model of a BatchTopK SAE: JumpReLU config, one threshold for every latent."""
    t = weights("standard", seed=4)
    t["threshold"] = torch.full((F,), 0.45)
    cfg = saelens_cfg("jumprelu", apply_b_dec=True)
    cfg["metadata"].update(training_architecture="batchtopk",
                           training_architecture_details={"k": 6.0, "topk_threshold_lr": 0.01, "aux_loss_coefficient": 1.0,
                                                          "rescale_acts_by_decoder_norm": True, "use_sparse_activations": False,
                                                          "decoder_init_norm": 0.1})
    loaded = load_sae(write_saelens(tmp_path / "bt", cfg, t))
    assert loaded.architecture == "jumprelu"
    x = inputs(seed=9)
    assert_conforms(loaded, *saelens_forward("jumprelu", t, cfg, x), x)


def test_saelens_5_config_with_flat_names(tmp_path):
    """SAELens < 6: names at the top level, TopK told by activation_fn_str, a bool
    normalize_activations and a scaling_factor tensor of ones."""
    t = weights("topk", seed=6)
    cfg = {"architecture": "standard", "d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu",
           "model_name": "pythia-70m-deduped", "hook_name": "blocks.4.hook_resid_pre", "hook_layer": 4,
           "hook_head_index": None, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K},
           "apply_b_dec_to_input": True, "finetuning_scaling_factor": False, "context_size": 128,
           "normalize_activations": False, "prepend_bos": True, "sae_lens_training_version": "3.13.0"}
    loaded = load_sae(write_saelens(tmp_path / "old", cfg, {**t, "scaling_factor": torch.ones(F)}))
    assert (loaded.architecture, loaded.site, loaded.model) == ("topk", "resid_post.3", "pythia-70m-deduped")
    x = inputs(seed=10)
    ref_cfg = {"normalize_activations": "none", "apply_b_dec_to_input": True, "k": K, "rescale_acts_by_decoder_norm": False}
    assert_conforms(loaded, *saelens_forward("topk", t, ref_cfg, x), x)
    write_saelens(tmp_path / "scaled", cfg, {**t, "scaling_factor": torch.full((F,), 1.5)})
    with pytest.raises(AtlasError, match="scaling_factor"):
        load_sae(tmp_path / "scaled")


def test_weights_saved_in_bfloat16(tmp_path):
    t = weights("jumprelu", seed=12)
    cfg = {**saelens_cfg("jumprelu", apply_b_dec=False), "dtype": "bfloat16"}
    loaded = load_sae(write_saelens(tmp_path / "bf16", cfg, t, dtype=torch.bfloat16))
    as_read = {k: v.to(torch.bfloat16).float() for k, v in t.items()}
    x = inputs(seed=13)
    assert_conforms(loaded, *saelens_forward("jumprelu", as_read, cfg, x), x)


@pytest.mark.parametrize("change, message", [
    (lambda c, t: c.update(architecture="abstopk", k=K), "signed activations"),
    (lambda c, t: c.update(architecture="temporal"), "attention over earlier tokens"),
    (lambda c, t: c.update(architecture="matching_pursuit"), "matching pursuit"),
    (lambda c, t: c.update(architecture="gated_v2"), "'gated_v2' is not supported"),
    (lambda c, t: c["metadata"].update(hook_head_index=3), "single attention head"),
    (lambda c, t: c.update(normalize_activations="whatever"), "normalize_activations='whatever'"),
    (lambda c, t: (c.update(architecture="transcoder", d_out=8, apply_b_dec_to_input=False),
                   t.update(W_dec=torch.zeros(F, 8), b_dec=torch.zeros(8))), "from 16 to 8 dimensions"),
    (lambda c, t: c.update(architecture="skip_transcoder", d_out=D, apply_b_dec_to_input=False), "lacks W_skip"),
])
def test_what_cannot_be_read_exactly_is_refused(tmp_path, change, message):
    cfg, t = saelens_cfg("standard"), weights("standard", 1)
    change(cfg, t)
    with pytest.raises(AtlasError, match=message):
        load_sae(write_saelens(tmp_path / "sae", cfg, t))
