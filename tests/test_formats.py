"""Bringing SAEs from elsewhere: SAELens (incl. Gemma Scope), EleutherAI sparsify, params.npz; `sae-atlas add`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from app.errors import AtlasError
from trainer.formats import hook_name_for, load_sae, site_from_hook


def reference_topk(x, w_enc_fd, b_enc, w_dec, b_dec, k):
    z = (x - b_dec) @ w_enc_fd.T + b_enc
    v, i = z.topk(k, dim=-1)
    f = torch.zeros_like(z).scatter(-1, i, v.clamp_min(0))
    return f @ w_dec + b_dec


def random_weights(d=16, f=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(f, d, generator=g), torch.randn(f, generator=g) * 0.1, torch.randn(f, d, generator=g),
            torch.randn(d, generator=g))


def test_sparsify_folder(tmp_path):
    w_enc, b_enc, w_dec, b_dec = random_weights()
    folder = tmp_path / "layers.6"
    folder.mkdir()
    save_file({"encoder.weight": w_enc, "encoder.bias": b_enc, "W_dec": w_dec, "b_dec": b_dec}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"expansion_factor": 3, "normalize_decoder": True, "num_latents": 48,
                                                 "k": 5, "multi_topk": False, "skip_connection": False, "d_in": 16}))
    loaded = load_sae(folder)
    assert (loaded.source_format, loaded.architecture, loaded.site, loaded.sae.cfg.k) == ("sparsify", "topk", "resid_post.6", 5)
    x = torch.randn(20, 16)
    assert torch.allclose(loaded.sae(x), reference_topk(x, w_enc, b_enc, w_dec, b_dec, 5), atol=1e-5)


def test_sparsify_skip_connection_is_refused(tmp_path):
    w_enc, b_enc, w_dec, b_dec = random_weights()
    save_file({"encoder.weight": w_enc, "encoder.bias": b_enc, "W_dec": w_dec, "b_dec": b_dec}, str(tmp_path / "sae.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"k": 5, "skip_connection": True}))
    with pytest.raises(AtlasError, match="skip connection"):
        load_sae(tmp_path)


def test_saelens_jumprelu_like_gemma_scope(tmp_path):
    w_enc, b_enc, w_dec, b_dec = random_weights(seed=1)
    threshold = torch.rand(48) * 0.5
    save_file({"W_enc": w_enc.T.contiguous(), "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec, "threshold": threshold},
              str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "jumprelu", "d_in": 16, "d_sae": 48,
                                                   "hook_name": "blocks.12.hook_resid_post", "model_name": "gemma-2-2b",
                                                   "apply_b_dec_to_input": False, "normalize_activations": "none"}))
    loaded = load_sae(tmp_path)
    assert (loaded.architecture, loaded.site, loaded.model) == ("jumprelu", "resid_post.12", "gemma-2-2b")
    x = torch.randn(30, 16)
    z = x @ w_enc.T + b_enc  # apply_b_dec_to_input = false: b_dec is not subtracted
    f = z * (z > threshold)
    assert torch.allclose(loaded.sae.encode_dense(x), f, atol=1e-4)
    assert torch.allclose(loaded.sae(x), f @ w_dec + b_dec, atol=1e-4)


def test_gemma_scope_params_npz(tmp_path):
    w_enc, b_enc, w_dec, b_dec = random_weights(seed=2)
    threshold = torch.rand(48)
    np.savez(tmp_path / "params.npz", W_enc=w_enc.T.numpy(), W_dec=w_dec.numpy(), b_enc=b_enc.numpy(),
             b_dec=b_dec.numpy(), threshold=threshold.numpy())
    loaded = load_sae(tmp_path)
    assert loaded.source_format == "gemmascope" and loaded.sae.cfg.d_sae == 48
    x = torch.randn(10, 16)
    z = (x - b_dec) @ w_enc.T + b_enc
    assert torch.allclose(loaded.sae.encode_dense(x), z * (z > threshold), atol=1e-4)


def test_saelens_standard_and_topk_with_log_threshold_variants(tmp_path):
    w_enc, b_enc, w_dec, b_dec = random_weights(seed=3)
    save_file({"W_enc": w_enc.T.contiguous(), "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": 16, "d_sae": 48,
                                                   "activation_fn_kwargs": {"k": 7}, "hook_name": "blocks.3.hook_mlp_out"}))
    loaded = load_sae(tmp_path)
    assert loaded.sae.cfg.k == 7 and loaded.site == "mlp_out.3"
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": 16, "d_sae": 48}))
    relu = load_sae(tmp_path)
    x = torch.randn(5, 16)
    assert torch.allclose(relu.sae.encode_dense(x), torch.relu((x - b_dec) @ w_enc.T + b_enc), atol=1e-5)


@pytest.mark.parametrize("mutate, message", [
    (lambda t, c: t.update(W_enc=torch.zeros(3, 3)), "W_enc has shape"),
    (lambda t, c: t.pop("b_dec"), "lacks b_dec"),
    (lambda t, c: t.update(b_enc=torch.full((48,), float("nan"))), "NaN or infinite"),
    (lambda t, c: c.update(architecture="gated"), "'gated' is not supported"),
    (lambda t, c: c.update(normalize_activations="layer_norm"), "normalize_activations"),
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


def test_pickles_are_never_loaded(tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": 16, "d_sae": 48}))
    torch.save({"W_enc": torch.zeros(16, 48)}, tmp_path / "sae_weights.pt")  # a pickle: must be ignored
    with pytest.raises(AtlasError, match="is missing"):
        load_sae(tmp_path)


def test_hook_names_map_both_ways():
    for site in ("resid_post.3", "mlp_out.0", "attn_out.11"):
        assert site_from_hook(hook_name_for(site)) == site
    assert site_from_hook("blocks.4.hook_resid_pre") == "resid_post.3"
    assert site_from_hook("blocks.0.hook_resid_pre") is None
    assert site_from_hook("model.layers.7") == "resid_post.7"
    assert site_from_hook("layers.7.mlp") == "mlp_out.7"


def test_add_brings_a_sparsify_sae_to_the_store_in_one_command(tmp_path, tiny_model_dir, capsys, monkeypatch):
    from app.cli import main
    from app.db import get_engine
    from app.settings import get_settings

    d = 64
    w_enc, b_enc, w_dec, b_dec = random_weights(d=d, f=96, seed=4)
    folder = tmp_path / "layers.2"
    folder.mkdir()
    save_file({"encoder.weight": w_enc, "encoder.bias": b_enc, "W_dec": w_dec, "b_dec": b_dec}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"k": 6, "d_in": d}))
    monkeypatch.setenv("SAE_ATLAS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SAE_ATLAS_DEVICE", "cpu")
    monkeypatch.setenv("SAE_ATLAS_LM_DTYPE", "float32")
    get_settings.cache_clear()
    get_engine.cache_clear()
    try:
        assert main(["db", "upgrade"]) == 0
        assert main(["add", str(folder), "--model", str(tiny_model_dir), "--name", "mine", "--tokens", "3000"]) == 0
        assert "published mine" in capsys.readouterr().out
        from fastapi.testclient import TestClient

        from app.main import create_app

        body = TestClient(create_app()).get("/api/v1/saes/mine").json()
        assert body["site"] == "resid_post.2" and body["d_sae"] == 96 and body["architecture"] == "topk"
        assert main(["add", str(folder), "--model", str(tiny_model_dir), "--name", "mine", "--tokens", "3000"]) == 2
        assert "--replace" in capsys.readouterr().err
    finally:
        get_settings.cache_clear()
        get_engine.cache_clear()
