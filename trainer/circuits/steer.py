"""Steering from a graph: change one node at one position and read how the logits change, in one of
two models.

A node edit (NodeEdit) is a transcoder feature set to a value or scaled by a multiplier (0 ablates
it), or an error node scaled (0 ablates it: the MLP's output at that position becomes the
transcoder's reconstruction). Either way it shifts block L's MLP output at position p by a vector:

- feature f, from a to v:  delta = sae.output_delta((v - a) W_dec,f)   (the transcoder's contribution;
                                                                        its error stays)
- error, scaled by m:      delta = (m - 1) (mlp_out - reconstruction)

"frozen" (steer_frozen): through the prompt's local replacement model (replacement.py), where
attention patterns, norm scales and every other feature's activation are frozen, so the change
propagates along the same linear paths that the graph's edges measure: the logits move by the
frozen model's Jacobian times delta (exact: the frozen model is linear there). It is the graph's
own prediction.

"live" (steer_live): through the real model, delta added to mlp_out.L at position p by a forward
hook (LoadedLM.logits_with), and everything downstream (attention, norms, the MLPs and so the other
features) recomputed. The inference service runs this one (app/inference/graph_steer.py).

With no change both give the real logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from store.errors import AtlasError
from trainer.circuits.replacement import ZERO_POSITIONS, ReplacementModel, prompt_tokens
from trainer.lm import LoadedLM


@dataclass
class NodeEdit:
    """What to change: one feature or error node of a graph."""

    kind: str
    """"feature" or "error"."""
    layer: int
    """The block whose MLP output it writes to."""
    position: int
    """Its token position (BOS = 0, which has no feature or error nodes)."""
    feature: int | None = None
    """The transcoder feature (feature nodes)."""
    value: float | None = None
    """Set the feature's activation to this (feature nodes)."""
    multiplier: float | None = None
    """Else scale it (a feature's activation, or the error vector) by this; 0 ablates."""

    def __post_init__(self):
        if self.kind not in ("feature", "error"):
            raise AtlasError(f"node kind {self.kind!r} is neither feature nor error")
        if self.value is not None and self.multiplier is not None:
            raise AtlasError("give a value or a multiplier, not both")
        if self.kind == "error" and self.value is not None:
            raise AtlasError("an error node has no activation to set", "scale it with a multiplier (0 ablates it)")
        if self.kind == "feature" and self.feature is None:
            raise AtlasError("a feature node needs its feature index")
        if self.value is None and self.multiplier is None:
            self.multiplier = 0.0

    def new_activation(self, a: float) -> float:
        return float(self.value) if self.value is not None else float(self.multiplier) * a


def parse_node(node_id: str, kind: str = "feature", value: float | None = None,
               multiplier: float | None = None) -> NodeEdit:
    """A NodeEdit from a graph node id (export.py): a feature "{layer}_{feature}_{pos}" or an error
    "0_{layer}_{pos}" (the two formats overlap, hence the kind)."""
    parts = node_id.split("_")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        what = "a feature node id: LAYER_FEATURE_POSITION" if kind == "feature" else "an error node id: 0_LAYER_POSITION"
        raise AtlasError(f"{node_id!r} is not a {kind} node id", f"steer {what}")
    a, b, pos = map(int, parts)
    if kind == "error":
        if a != 0:
            raise AtlasError(f"{node_id!r} is not an error node id", "error nodes are 0_LAYER_POSITION")
        return NodeEdit("error", b, pos, None, value, multiplier)
    return NodeEdit(kind, a, pos, b, value, multiplier)


def check_edit(edit: NodeEdit, n_layers: int, d_sae: int, n_tokens: int) -> None:
    """AtlasError unless the node exists in a model of n_layers blocks and a prompt of n_tokens."""
    if not 0 <= edit.layer < n_layers:
        raise AtlasError(f"layer {edit.layer} is outside 0..{n_layers - 1}")
    if edit.kind == "feature" and not 0 <= edit.feature < d_sae:
        raise AtlasError(f"feature {edit.feature} is outside 0..{d_sae - 1} of layer {edit.layer}'s transcoder")
    if not ZERO_POSITIONS <= edit.position < n_tokens:
        raise AtlasError(f"position {edit.position} is outside {ZERO_POSITIONS}..{n_tokens - 1} of the prompt")


@dataclass
class SteerResult:
    """The last position's logits before and after the edit."""

    activation: float | None
    """The feature's activation in the prompt (0 when it was not active there); None for an error node."""
    value: float | None
    """What the feature was set to; None for an error node."""
    before: list[dict]
    """[{token_id, token, logit, prob}] of the top tokens without the edit."""
    after: list[dict]
    """The same with the edit."""
    targets: list[dict]
    """[{token_id, token, logit_before, logit_after, prob_before, prob_after}] of the given target tokens."""


def _top(logits: torch.Tensor, k: int, decode) -> list[dict]:
    probs = torch.softmax(logits.float(), -1)
    p, ids = probs.topk(k)
    return [{"token_id": int(i), "token": decode([int(i)]), "logit": float(logits[i]), "prob": float(q)}
            for i, q in zip(ids, p)]


def _result(activation, value, before: torch.Tensor, after: torch.Tensor, top_k: int, targets, decode) -> SteerResult:
    before, after = before.float().cpu(), after.float().cpu()
    pb, pa = torch.softmax(before, -1), torch.softmax(after, -1)
    vocab = before.shape[-1]
    bad = [t for t in targets or [] if not 0 <= int(t) < vocab]
    if bad:
        raise AtlasError(f"target token {bad[0]} is outside the vocabulary (0..{vocab - 1})")
    rows = [{"token_id": int(t), "token": decode([int(t)]), "logit_before": float(before[t]),
             "logit_after": float(after[t]), "prob_before": float(pb[t]), "prob_after": float(pa[t])}
            for t in targets or []]
    return SteerResult(activation, value, _top(before, top_k, decode), _top(after, top_k, decode), rows)


def feature_activation(sae, x: torch.Tensor, feature: int) -> float:
    """The feature's activation on one input vector x [D] (0 when it is not among the active)."""
    codes = sae.encode(x.float()[None])
    hit = (codes.indices[0] == feature) & (codes.values[0] > 0)
    return float(codes.values[0][hit].float().sum()) if bool(hit.any()) else 0.0


def feature_delta(sae, x: torch.Tensor, feature: int, change: float) -> torch.Tensor:
    """[D] float32: what changing the feature's activation by `change` adds to the output on input x [D]."""
    vec = change * sae.W_dec[feature].detach().float()[None]
    return sae.output_delta(vec, x.float()[None]).float()[0]


@torch.no_grad()
def steer_frozen(model: ReplacementModel, prompt: str | list[int], edit: NodeEdit, top_k: int = 10,
                 max_tokens: int = 64, targets: list[int] | None = None) -> SteerResult:
    """The edit through the prompt's frozen replacement model (the graph's linear prediction)."""
    tokens = model.tokenize(prompt, max_tokens)
    tc = model.transcoders[min(max(edit.layer, 0), model.n_layers - 1)]
    check_edit(edit, model.n_layers, tc.sae.cfg.d_sae, len(tokens))
    prep = model.prepare(tokens)
    layer, position = edit.layer, edit.position
    if edit.kind == "feature":
        codes = prep.layers[layer]
        at = ((codes.positions == position) & (codes.features == edit.feature)).nonzero()[:, 0]
        activation = float(codes.activations[at[0]]) if len(at) else 0.0
        value = edit.new_activation(activation)
        x = prep.mlp_in[layer, position].to(tc.sae.W_dec.device)
        delta = feature_delta(tc.sae, x, edit.feature, value - activation)
    else:
        activation = value = None
        delta = (float(edit.multiplier) - 1.0) * prep.errors[layer, position].float()
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
    return _result(activation, value, prep.logits[-1], steered, top_k, targets, model.lm.tokenizer.decode)


@torch.no_grad()
def steer_live(lm: LoadedLM, sae, prompt: str | list[int], edit: NodeEdit, top_k: int = 10, max_tokens: int = 64,
               targets: list[int] | None = None) -> SteerResult:
    """The edit through the real model: `sae` is block edit.layer's transcoder (mlp_in.L -> mlp_out.L);
    one forward pass of two rows, the second with delta added to mlp_out.L at the node's position."""
    tokens = prompt_tokens(lm, prompt, max_tokens)
    check_edit(edit, lm.n_layers, sae.cfg.d_sae, len(tokens))
    p = edit.position
    seen: dict = {}

    def replace(out: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
        x = x_in[1, p].float().to(sae.W_dec.device)
        if edit.kind == "feature":
            a = feature_activation(sae, x, edit.feature)
            seen["activation"], seen["value"] = a, edit.new_activation(a)
            delta = feature_delta(sae, x, edit.feature, seen["value"] - a)
        else:
            reconstruction = sae.output(sae.encode(x[None]), x[None]).float()[0]
            delta = (float(edit.multiplier) - 1.0) * (out[1, p].float() - reconstruction.to(out.device))
        out = out.clone()
        out[1, p] = (out[1, p].float() + delta.to(out.device)).to(out.dtype)
        return out

    ids = tokens[None].repeat(2, 1)
    logits = lm.logits_with(ids, lm.site(f"mlp_out.{edit.layer}"), replace, source=lm.site(f"mlp_in.{edit.layer}"))
    return _result(seen.get("activation"), seen.get("value"), logits[0, -1], logits[1, -1], top_k, targets,
                   lm.tokenizer.decode)
