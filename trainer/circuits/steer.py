"""Steering from a graph: set one transcoder feature's activation at one position (0 ablates it)
and read how the top logits change, through the prompt's frozen local replacement model.

In that model (replacement.py) attention patterns, norm scales and every other feature's
activation are frozen, so the change propagates along the same linear paths that the graph's
edges measure: setting feature s from a_s to v shifts its layer's MLP output at its position by
sae.output_delta((v - a_s) W_dec,s), and the logits move by the frozen model's Jacobian times
that shift (exact: the frozen model is linear there). With no change they are the real logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from store.errors import AtlasError
from trainer.circuits.replacement import ZERO_POSITIONS, ReplacementModel


@dataclass
class SteerResult:
    """The top logits of the last position before and after the intervention."""

    activation: float
    """The feature's activation in the prompt (0 when it was not active there)."""
    value: float
    """What it was set to."""
    before: list[dict]
    """[{token_id, token, logit, prob}] of the top tokens without the intervention."""
    after: list[dict]
    """The same with the intervention."""


def parse_node_id(node_id: str, n_layers: int) -> tuple[int, int, int]:
    """(layer, feature, position) of a feature node's id "{layer}_{feature}_{pos}" (export.py)."""
    parts = node_id.split("_")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise AtlasError(f"{node_id!r} is not a feature node id", "steer a transcoder feature: LAYER_FEATURE_POSITION")
    layer, feature, pos = map(int, parts)
    if not 0 <= layer < n_layers:
        raise AtlasError(f"node {node_id}: layer {layer} is outside 0..{n_layers - 1}")
    return layer, feature, pos


def _top(logits: torch.Tensor, k: int, decode) -> list[dict]:
    probs = torch.softmax(logits.float(), -1)
    p, ids = probs.topk(k)
    return [{"token_id": int(i), "token": decode([int(i)]), "logit": float(logits[i]), "prob": float(q)}
            for i, q in zip(ids, p)]


@torch.no_grad()
def steer_feature(model: ReplacementModel, prompt: str | list[int], layer: int, feature: int, position: int,
                  value: float, top_k: int = 10, max_tokens: int = 64) -> SteerResult:
    """Set feature `feature` of `layer`'s transcoder at token `position` (BOS = 0) to `value`."""
    tokens = model.tokenize(prompt, max_tokens)
    tc = model.transcoders[layer]
    if not 0 <= feature < tc.sae.cfg.d_sae:
        raise AtlasError(f"feature {feature} is outside 0..{tc.sae.cfg.d_sae - 1} of layer {layer}'s transcoder")
    if not ZERO_POSITIONS <= position < len(tokens):
        raise AtlasError(f"position {position} is outside {ZERO_POSITIONS}..{len(tokens) - 1} of the prompt")
    prep = model.prepare(tokens)
    codes = prep.layers[layer]
    at = ((codes.positions == position) & (codes.features == feature)).nonzero()[:, 0]
    activation = float(codes.activations[at[0]]) if len(at) else 0.0
    x = prep.mlp_in[layer, position][None].to(tc.sae.W_dec.device)
    vec = (float(value) - activation) * tc.sae.W_dec[feature].float()[None]
    delta = tc.sae.output_delta(vec, x).float()[0]
    # The math attention kernel: the fused CPU / flash kernels have no double backward.
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        lin = model.linear_forward(prep)
        logits = lin.logits[0, -1]
        # The frozen model is linear in what the MLPs write, but linear_forward freezes attention
        # patterns and norm scales for gradients only (they are recomputed from its input), so a
        # shifted input cannot simply be run through it. The exact change is the Jacobian at the
        # prompt times the shift: J·delta, by differentiating the (u-linear) gradient u·J once more.
        u = torch.zeros_like(logits, requires_grad=True)
        (grad,) = torch.autograd.grad(logits, lin.mlp_out[layer], grad_outputs=u, create_graph=True)
        (change,) = torch.autograd.grad(grad[0, position], u, grad_outputs=delta.to(grad.device, grad.dtype))
    steered = prep.logits[-1] + change.float().cpu()
    decode = model.lm.tokenizer.decode
    return SteerResult(activation, float(value), _top(prep.logits[-1], top_k, decode), _top(steered, top_k, decode))
