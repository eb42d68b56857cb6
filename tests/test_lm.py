"""Model loading, site names and hooks on tiny models of each family, and on the bundled model."""

from __future__ import annotations

import pytest
import torch

from store.errors import AtlasError
from trainer.lm import load_lm, parse_site

FAMILIES = ["llama", "gpt2", "gpt_neox", "gemma", "gemma2", "gemma3", "olmo2"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_lm(request, tmp_path_factory, tiny_model_dir):
    from tests.helpers import load_family_lm

    return load_family_lm(tmp_path_factory.mktemp(request.param), tiny_model_dir, request.param)


def test_sites_read_the_right_tensors(family_lm):
    lm = family_lm
    ids = torch.randint(2, lm.vocab_size, (2, 12))
    sites = [lm.site(s) for s in ("resid_post.1", "mlp_out.2", "attn_out.0", "mlp_in.3")]
    acts = lm.read(ids, sites)
    for s in sites:
        assert acts[s.name].shape == (2, 12, lm.d_model)
    # resid_post.L is what the model's own hidden_states report after block L
    out = lm.model(input_ids=ids, output_hidden_states=True, use_cache=False)
    assert torch.allclose(acts["resid_post.1"], out.hidden_states[2], atol=1e-5)


def test_attention_and_mlp_outputs_add_up_to_the_residual_stream(family_lm):
    """resid_post.L - resid_post.(L-1) = attn_out.L + mlp_out.L (the embeddings for L = 0): what the
    blocks of every family add to the residual stream. The left side comes from the model's own
    hidden_states (the last of which is after the final norm, so the last block uses our read)."""
    lm = family_lm
    ids = torch.randint(2, lm.vocab_size, (2, 12))
    hidden = lm.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    n = lm.n_layers
    acts = lm.read(ids, [lm.site(f"{kind}.{layer}") for layer in range(n) for kind in ("attn_out", "mlp_out")]
                   + [lm.site(f"resid_post.{n - 1}")])
    for layer in range(n):
        after = hidden[layer + 1] if layer < n - 1 else acts[f"resid_post.{n - 1}"]
        added = acts[f"attn_out.{layer}"] + acts[f"mlp_out.{layer}"]
        assert torch.allclose(after - hidden[layer], added, atol=1e-4), (lm.config.model_type, layer)
        assert added.abs().max() > 1e-3  # not a trivial identity


def test_mlp_in_is_what_the_mlp_reads(family_lm):
    lm = family_lm
    ids = torch.randint(2, lm.vocab_size, (2, 12))
    acts = lm.read(ids, [lm.site("mlp_in.1"), lm.site("mlp_out.1")])
    mlp = lm.blocks[1].get_submodule(lm.family.mlp)
    raw_out = mlp(acts["mlp_in.1"])
    if lm.family.mlp_out:  # post-norm families add the normalised MLP output
        raw_out = lm.blocks[1].get_submodule(lm.family.mlp_out)(raw_out)
    assert torch.allclose(raw_out, acts["mlp_out.1"], atol=1e-5)


def test_forward_stops_after_the_deepest_hooked_block(family_lm):
    lm = family_lm
    ran = []
    handle = lm.blocks[3].register_forward_hook(lambda *a: ran.append(3))
    try:
        lm.read(torch.randint(2, lm.vocab_size, (1, 8)), [lm.site("resid_post.1")])
    finally:
        handle.remove()
    assert ran == []


@pytest.mark.parametrize("site", ["resid_post.2", "attn_out.1", "mlp_out.1", "mlp_in.2"])
def test_replacing_a_site_with_itself_changes_nothing(family_lm, site):
    lm = family_lm
    ids = torch.randint(2, lm.vocab_size, (2, 10))
    clean = lm.logits_with(ids)
    same = lm.logits_with(ids, lm.site(site), lambda x: x)
    zeroed = lm.logits_with(ids, lm.site(site), torch.zeros_like)
    assert torch.allclose(clean, same, atol=1e-5)
    assert not torch.allclose(clean, zeroed, atol=1e-3)


def test_adding_to_mlp_out_is_adding_to_the_residual_stream(family_lm):
    """mlp_out.L is added to the stream as it is: shifting it by v is shifting resid_post.L by v
    (it would not be if the hook sat before a post-feedforward norm)."""
    lm = family_lm
    ids = torch.randint(2, lm.vocab_size, (2, 10))
    v = torch.randn(lm.d_model)
    via_mlp = lm.logits_with(ids, lm.site("mlp_out.1"), lambda a: a + v)
    via_resid = lm.logits_with(ids, lm.site("resid_post.1"), lambda a: a + v)
    assert torch.allclose(via_mlp, via_resid, atol=1e-4)
    assert not torch.allclose(via_mlp, lm.logits_with(ids), atol=1e-3)


def test_a_source_site_feeds_the_replacement(family_lm):
    """logits_with(source=...) hands the replacement the activations of an earlier site: replacing
    the MLP's output by the MLP applied to its input (mlp_in) changes nothing."""
    lm = family_lm
    ids = torch.randint(2, lm.vocab_size, (2, 10))
    block = lm.blocks[1]
    mlp = block.get_submodule(lm.family.mlp)
    post = block.get_submodule(lm.family.mlp_out).forward if lm.family.mlp_out else (lambda a: a)
    # .forward: the modules carry the hooks themselves
    redo = lm.logits_with(ids, lm.site("mlp_out.1"), lambda out, src: post(mlp.forward(src)), source=lm.site("mlp_in.1"))
    assert torch.allclose(redo, lm.logits_with(ids), atol=1e-5)
    with pytest.raises(AtlasError, match="not computed before"):
        lm.logits_with(ids, lm.site("mlp_in.1"), lambda out, src: out, source=lm.site("mlp_out.1"))


def test_direct_logit_weights_follow_the_real_final_norm(family_lm):
    """W d must point where the real final norm and unembedding send a direction d: the norm's
    linear part (LayerNorm: centring and scale; RMSNorm: scale, 1 + w for Gemma) up to its positive
    division by the RMS / standard deviation. Computed here through the modules themselves."""
    lm = family_lm
    norm = lm.model.get_submodule(lm.family.final_norm)
    saved = {k: v.clone() for k, v in norm.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    try:
        with torch.no_grad():
            for p in norm.parameters():  # a norm that is not the identity at init
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if p.ndim and lm.family.norm_offset == 0 else 0.0))
        d = torch.randn(6, lm.d_model, generator=g) + 3.0  # a large mean: centring matters
        ours = d @ lm.direct_logit_weights().T
        head = lm.model.get_output_embeddings()
        with torch.no_grad():
            zero = torch.zeros(1, lm.d_model)
            normed = norm(d) - norm(zero)  # removes a LayerNorm's bias (the norm of 0 is its bias)
            ref = head(normed) - head(zero)
        cos = torch.nn.functional.cosine_similarity(ours, ref, dim=1)
        assert torch.all(cos > 1 - 1e-5), cos
    finally:
        norm.load_state_dict(saved)


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
