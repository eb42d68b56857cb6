"""Gemma Scope's params.npz, as the release ships it, against the formula of its tutorial.

File: numpy's savez of float32 arrays W_enc [d_model, d_sae], W_dec [d_sae, d_model], b_enc [d_sae],
b_dec [d_model], threshold [d_sae], in Hub folders such as
gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_41/params.npz.

The Gemma Scope tutorial's JumpReLUSAE: pre = x @ W_enc + b_enc (no b_dec subtraction);
f = (pre > threshold) * relu(pre); x_hat = f @ W_dec + b_dec.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conformance.references import gemma_scope
from trainer.formats import load_sae

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D, F = 32, 96


def params_npz(path, seed=0):
    """Weights of the scale Gemma Scope's residual SAEs have (activations of norm ~100)."""
    rng = np.random.default_rng(seed)
    params = {"W_enc": rng.normal(0, 0.05, (D, F)), "W_dec": rng.normal(0, 0.1, (F, D)),
              "b_enc": rng.normal(0, 0.5, F), "b_dec": rng.normal(0, 2.0, D),
              "threshold": rng.uniform(-0.1, 2.0, F)}
    params = {k: v.astype(np.float32) for k, v in params.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **params)
    return {k: torch.from_numpy(v) for k, v in params.items()}


def residual_like(seed=1, n=128):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g) * 15 + torch.randn(D, generator=g) * 8


def test_params_npz_encodes_without_subtracting_b_dec(tmp_path):
    p = params_npz(tmp_path / "params.npz")
    x = residual_like()
    f_ref, out_ref = gemma_scope(p, x)
    for source in (tmp_path, tmp_path / "params.npz"):  # the folder or the file
        loaded = load_sae(source)
        assert (loaded.source_format, loaded.architecture, loaded.transcoder) == ("gemmascope", "jumprelu", False)
        with torch.no_grad():
            f, out = loaded.sae.encode_dense(x), loaded.sae(x)
        assert torch.equal(f > 0, f_ref > 0), f"{int(((f > 0) != (f_ref > 0)).sum())} latents switched"
        torch.testing.assert_close(f, f_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    # the former bug: subtracting b_dec first switches many latents on random inputs
    pre_wrong = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    assert int(((pre_wrong > p["threshold"]) != (f_ref > 0)).sum()) > 100


@pytest.mark.parametrize("release, site, output_site, model", [
    ("gemma-scope-2b-pt-res", "resid_post.12", None, "google/gemma-2-2b"),
    ("gemma-scope-9b-it-res", "resid_post.12", None, "google/gemma-2-9b-it"),
    ("gemma-scope-2b-pt-mlp-canonical", "mlp_out.12", None, "google/gemma-2-2b"),
    ("gemma-scope-2b-pt-transcoders", "mlp_in.12", "mlp_out.12", "google/gemma-2-2b"),
    ("gemma-scope-2b-pt-att", None, None, "google/gemma-2-2b"),  # concatenated head outputs: no site of ours
])
def test_hub_folders_say_what_the_sae_reads(tmp_path, release, site, output_site, model):
    path = tmp_path / f"models--google--{release}" / "snapshots" / "0abc" / "layer_12" / "width_16k" / "average_l0_41" / "params.npz"
    params_npz(path)
    loaded = load_sae(path.parent)
    assert (loaded.site, loaded.output_site, loaded.transcoder, loaded.model) == (site, output_site, output_site is not None, model)


def test_imported_params_npz_reads_back_in_saelens_under_saelens_semantics(tmp_path, capsys):
    """Done-when of issue 11: `sae-atlas import` of a params.npz writes a SAELens folder whose encode,
    computed as SAELens's JumpReLUSAE computes it from the files, is Gemma Scope's within 1e-4."""
    from app.cli import main
    from store.settings import get_settings

    npz = tmp_path / "gemma-scope-2b-pt-res" / "layer_3" / "width_16k" / "average_l0_9" / "params.npz"
    p = params_npz(npz, seed=5)
    assert main(["import", str(npz), "--model", "google/gemma-2-2b", "--name", "gs-l3"]) == 0
    folder = get_settings().data_dir / "saes" / "gs-l3"
    cfg = json.loads((folder / "cfg.json").read_text())
    w = load_file(str(folder / "sae_weights.safetensors"))
    assert cfg["architecture"] == "jumprelu" and cfg["normalize_activations"] == "none"
    assert (cfg["metadata"]["hook_name"], cfg["metadata"]["model_name"]) == ("blocks.3.hook_resid_post", "google/gemma-2-2b")
    # SAELens's JumpReLUSAE.encode / decode on the saved tensors (sae_lens/saes/jumprelu_sae.py)
    x = residual_like(seed=6)
    sae_in = x - w["b_dec"] * cfg["apply_b_dec_to_input"]
    hidden_pre = sae_in @ w["W_enc"] + w["b_enc"]
    f = torch.relu(hidden_pre) * (hidden_pre > w["threshold"]).float()
    f_ref, out_ref = gemma_scope(p, x)
    assert torch.equal(f > 0, f_ref > 0)
    torch.testing.assert_close(f, f_ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(f @ w["W_dec"] + w["b_dec"], out_ref, rtol=0, atol=1e-4)
