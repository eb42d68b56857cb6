"""Steering against forward passes with the push written out by hand: at every site kind, for a
transcoder (reads mlp_in.L, writes mlp_out.L) and for SAEs that normalise their input, on a tiny
Llama and a tiny Gemma 2 (whose attn_out / mlp_out are the outputs of post-norms). Strength 0
reproduces the plain model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from app.inference.registry import ModelHandle, SAEHandle, SAEMeta
from app.inference.schemas import SteerFeature, SteerRequest
from app.inference.steering import GenerateJob, GenerationBatch, next_token_logits
from trainer.formats import SiteIO
from trainer.sae import SAEConfig, build_sae

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYER = 1
LATENTS = {3: 2.0, 7: -1.5}  # latent -> strength


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def model(request, tmp_path_factory, tiny_model_dir):
    from tests.helpers import load_family_lm

    lm = load_family_lm(tmp_path_factory.mktemp(request.param), tiny_model_dir, request.param)
    return ModelHandle(("model", request.param, "float32"), lm, 0, False)


def make_handle(lm, site: str, target: str | None = None, input_norm: str = "none", seed: int = 0) -> SAEHandle:
    """A TopK SAE with random, non-unit decoder rows and biases (so units and norms matter)."""
    torch.manual_seed(seed)
    d = lm.d_model
    sae = build_sae(SAEConfig(d_in=d, d_sae=48, architecture="topk", k=6))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(48, 1) * 2 + 0.3)
        sae.W_enc.mul_(3.0)
        sae.b_enc.copy_(torch.randn(48) * 0.1)
        sae.b_dec.copy_(torch.randn(d) * 0.1)
    if input_norm != "none":
        sae.io = SiteIO(input_norm)
    sae = sae.eval().requires_grad_(False)
    max_act = np.random.default_rng(seed).uniform(1.0, 4.0, 48)
    meta = SAEMeta(seed, f"sae{seed}", "1", 1, "tiny", site, d, 48, None, "float32", 10.0, True)
    return SAEHandle(meta, sae, lm.site(site), sae.W_dec.norm(dim=1).float(), max_act, np.zeros(48), 0,
                     lm.site(target) if target else None)


# --- the intervention, by hand ----------------------------------------------------------------

def module_by_hand(lm, kind: str) -> tuple[torch.nn.Module, bool]:
    """(module, whether the site is its input) for site kind.LAYER, from the transformers classes."""
    layer = lm.model.model.layers[LAYER]
    post_norms = lm.config.model_type == "gemma2"
    return {
        "resid_post": (layer, False),
        "attn_out": (layer.post_attention_layernorm if post_norms else layer.self_attn, False),
        "mlp_out": (layer.post_feedforward_layernorm if post_norms else layer.mlp, False),
        "mlp_in": (layer.mlp, True),
    }[kind]


def codes_by_hand(h: SAEHandle, x: torch.Tensor) -> torch.Tensor:
    """[T, F] TopK activations of the SAE's (normalised) input x."""
    sae = h.sae
    z = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    values, idx = z.topk(sae.cfg.k, dim=-1)
    return torch.zeros_like(z).scatter(-1, idx, values.relu())


def normalise_by_hand(x: torch.Tensor, input_norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the SAE's input, the factor that turns its decoder units back into the model's)."""
    if input_norm == "constant_norm_rescale":
        scale = x.norm(dim=-1, keepdim=True) / math.sqrt(x.shape[-1])
        return x / scale, scale
    if input_norm == "layer_norm":
        mu, sd = x.mean(-1, keepdim=True), x.std(-1, keepdim=True)
        return (x - mu) / (sd + 1e-5), sd
    return x, torch.ones_like(x[..., :1])


def push_by_hand(h: SAEHandle, x_in: torch.Tensor, method: str, input_norm: str = "none") -> torch.Tensor:
    """[T, D]: sum over LATENTS of c_i W_dec,i in the model's units, c_i = v_i (add) or v_i - f_i (clamp),
    v_i = strength * analysed max / ||W_dec,i||."""
    x_n, scale = normalise_by_hand(x_in, input_norm)
    f = codes_by_hand(h, x_n)
    out = torch.zeros_like(x_in)
    for i, strength in LATENTS.items():
        w = h.sae.W_dec[i]
        v = strength * float(h.max_act[i]) / float(w.norm())
        c = torch.full_like(x_in[:, 0], v) if method == "add" else v - f[:, i]
        out += c[:, None] * w[None, :]
    return out * scale


def steered_by_hand(lm, ids: list[int], h: SAEHandle, target_kind: str, method: str,
                    input_norm: str = "none", source_kind: str | None = None) -> torch.Tensor:
    """Next-token logits of a plain forward pass whose hooks (written here) add the push at the
    target module, reading the SAE's input at the source module (default: the target itself)."""
    module, is_input = module_by_hand(lm, target_kind)
    seen = {}
    handles = []
    if source_kind is not None:
        src_module, src_is_input = module_by_hand(lm, source_kind)
        assert src_is_input
        handles.append(src_module.register_forward_pre_hook(lambda _m, args: seen.update(x=args[0][0])))

    def push(a):  # a [1, T, D]
        return a + push_by_hand(h, seen.get("x", a[0]), method, input_norm)[None]

    if is_input:
        handles.append(module.register_forward_pre_hook(lambda _m, args: (push(args[0]),) + tuple(args[1:])))
    else:
        def out_hook(_m, _inputs, output):
            if isinstance(output, tuple):
                return (push(output[0]),) + tuple(output[1:])
            return push(output)
        handles.append(module.register_forward_hook(out_hook))
    try:
        with torch.no_grad():
            return lm.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()
    finally:
        for handle in handles:
            handle.remove()


def plain_logits(lm, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()


def prompt(lm) -> list[int]:
    return [lm.bos_token_id, *lm.tokenizer("def read(path):\n    with open", add_special_tokens=False)["input_ids"]]


def steer(model, h: SAEHandle, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    return next_token_logits(model, prompt(model.lm), [(h, i, s) for i, s in LATENTS.items()], method)


def assert_steered(got: torch.Tensor, want: torch.Tensor, clean: torch.Tensor) -> None:
    assert (want - clean).abs().max() > 1e-2  # the push moves the logits at all
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())


# --- the tests --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["resid_post", "attn_out", "mlp_out", "mlp_in"])
def test_add_pushes_at_every_site_kind(model, kind):
    lm = model.lm
    h = make_handle(lm, f"{kind}.{LAYER}")
    default, steered = steer(model, h, "add")
    clean = plain_logits(lm, prompt(lm))
    assert torch.allclose(default, clean, atol=1e-4)
    assert_steered(steered, steered_by_hand(lm, prompt(lm), h, kind, "add"), clean)


@pytest.mark.parametrize("kind", ["resid_post", "mlp_in"])
def test_clamp_encodes_and_pushes_at_the_site(model, kind):
    lm = model.lm
    h = make_handle(lm, f"{kind}.{LAYER}")
    _, steered = steer(model, h, "clamp")
    assert_steered(steered, steered_by_hand(lm, prompt(lm), h, kind, "clamp"), plain_logits(lm, prompt(lm)))


@pytest.mark.parametrize("method", ["add", "clamp"])
def test_a_transcoder_reads_mlp_in_and_pushes_at_mlp_out(model, method):
    lm = model.lm
    h = make_handle(lm, f"mlp_in.{LAYER}", target=f"mlp_out.{LAYER}")
    _, steered = steer(model, h, method)
    want = steered_by_hand(lm, prompt(lm), h, "mlp_out", method, source_kind="mlp_in")
    assert_steered(steered, want, plain_logits(lm, prompt(lm)))


@pytest.mark.parametrize("input_norm", ["constant_norm_rescale", "layer_norm"])
@pytest.mark.parametrize("method", ["add", "clamp"])
def test_an_sae_that_normalises_its_input_pushes_in_the_models_units(model, input_norm, method):
    lm = model.lm
    h = make_handle(lm, f"resid_post.{LAYER}", input_norm=input_norm)
    _, steered = steer(model, h, method)
    want = steered_by_hand(lm, prompt(lm), h, "resid_post", method, input_norm)
    assert_steered(steered, want, plain_logits(lm, prompt(lm)))


def generate(model, h: SAEHandle, temperature: float, n: int = 12) -> dict:
    events = []
    req = SteerRequest(prompt="x", features=[SteerFeature(sae=h.meta.name, index=3, strength=0.0)],
                       max_new_tokens=n, temperature=temperature, seed=7)
    job = GenerateJob([h.meta], req, 60.0, lambda *_: None, events.append)
    job.model, job.prompt_ids, job.interventions = model, prompt(model.lm), [(h, 3, 0.0)]
    batch = GenerationBatch(model, [job])
    while batch.active():
        batch.step()
    return events[-1]


def test_strength_zero_generates_what_the_model_generates(model):
    lm = model.lm
    h = make_handle(lm, f"mlp_in.{LAYER}")
    ids = prompt(lm)
    done = generate(model, h, temperature=0.0)
    with torch.no_grad():
        out = lm.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                do_sample=False, max_new_tokens=12, pad_token_id=lm.separator_token_id)
    want = [t for t in out[0, len(ids):].tolist() if t != lm.tokenizer.eos_token_id]
    assert done["default"]["token_ids"] == want
    assert done["steered"]["token_ids"] == want
    sampled = generate(model, h, temperature=1.0)
    assert sampled["steered"] == sampled["default"]
