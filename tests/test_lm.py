"""Model loading, site names and hooks on tiny models of each family, and on the bundled model."""

from __future__ import annotations

import pytest
import torch

from app.errors import AtlasError
from trainer.lm import load_lm, parse_site


@pytest.fixture(scope="module", params=["llama", "gpt2", "gpt_neox", "gemma"])
def family_lm(request, tmp_path_factory):
    from tests.helpers import make_tiny_model

    folder = make_tiny_model(tmp_path_factory.mktemp(request.param), request.param)
    return load_lm(str(folder), "cpu", "float32")


def test_sites_read_the_right_tensors(family_lm):
    lm = family_lm
    ids = torch.randint(2, lm.vocab_size, (2, 12))
    sites = [lm.site(s) for s in ("resid_post.1", "mlp_out.2", "attn_out.0")]
    acts = lm.read(ids, sites)
    for s in sites:
        assert acts[s.name].shape == (2, 12, lm.d_model)
    # resid_post.L is what the model's own hidden_states report after block L
    out = lm.model(input_ids=ids, output_hidden_states=True, use_cache=False)
    assert torch.allclose(acts["resid_post.1"], out.hidden_states[2], atol=1e-5)


def test_forward_stops_after_the_deepest_hooked_block(family_lm):
    lm = family_lm
    ran = []
    handle = lm.blocks[3].register_forward_hook(lambda *a: ran.append(3))
    try:
        lm.read(torch.randint(2, lm.vocab_size, (1, 8)), [lm.site("resid_post.1")])
    finally:
        handle.remove()
    assert ran == []


def test_replacing_a_site_with_itself_changes_nothing(family_lm):
    lm = family_lm
    ids = torch.randint(2, lm.vocab_size, (2, 10))
    clean = lm.logits_with(ids)
    same = lm.logits_with(ids, lm.site("resid_post.2"), lambda x: x)
    zeroed = lm.logits_with(ids, lm.site("resid_post.2"), torch.zeros_like)
    assert torch.allclose(clean, same, atol=1e-5)
    assert not torch.allclose(clean, zeroed, atol=1e-3)


def test_unembedding_folds_the_final_norm_scale(family_lm):
    lm = family_lm
    w = lm.unembed_with_norm()
    assert w.shape == (lm.vocab_size, lm.d_model)


@pytest.mark.parametrize("name, message", [
    ("resid_post", "unknown site"), ("resid_pre.3", "unknown site"), ("resid_post.x", "unknown site"),
])
def test_bad_site_names(name, message):
    with pytest.raises(AtlasError, match=message):
        parse_site(name)


def test_site_beyond_the_model_lists_what_is_valid(tiny_lm):
    with pytest.raises(AtlasError, match=r"blocks 0\.\.3"):
        tiny_lm.site("resid_post.4")


@pytest.mark.parametrize("name, message", [
    ("./no/such/folder", "does not exist"),
    ("missing.gguf", "does not exist"),
    ("not a model!", "unknown model"),
    ("gpt-nothing", "unknown model alias"),
])
def test_unknown_models_are_one_clear_error(name, message):
    with pytest.raises(AtlasError, match=message):
        load_lm(name, "cpu", "float32")


def test_folder_without_config(tmp_path):
    with pytest.raises(AtlasError, match="no config.json"):
        load_lm(str(tmp_path), "cpu", "float32")


@pytest.mark.slow
def test_bundled_model_loads_and_reads_resid_post_15(monkeypatch):
    import trainer.lm as lm_module

    lm = load_lm("smollm2-135m", "cpu", "float32")
    assert (lm.n_layers, lm.d_model) == (30, 576)
    ids = torch.tensor([[lm.bos_token_id] + lm.tokenizer("def f(x): return x", add_special_tokens=False)["input_ids"]])
    acts = lm.read(ids, [lm.site("resid_post.15")])["resid_post.15"]
    assert acts.shape == (1, ids.shape[1], 576)
    assert torch.isfinite(acts).all()
    # The second load uses the cached safetensors: converting again would fail here.
    monkeypatch.setattr(lm_module, "_convert_gguf", lambda *a: pytest.fail("the GGUF was converted twice"))
    again = load_lm("smollm2-135m", "cpu", "float32")
    assert torch.allclose(again.read(ids, [again.site("resid_post.15")])["resid_post.15"], acts)
