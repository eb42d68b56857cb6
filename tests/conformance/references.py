"""The reference formulas of each format, written from that tool's own source or documentation
(never from SAE Atlas's code), shared by the conformance modules.

- SAELens 6.54 (sae_lens/saes/*.py): process_sae_in, then per architecture encode, decode;
- sparsify 1.3.3 (sparse_coder.py, fused_encoder.py): SparseCoder.encode / forward;
- Gemma Scope (its tutorial's JumpReLUSAE).
"""

from __future__ import annotations

import torch

JUMPRELU = ("jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder")
TRANSCODERS = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")


def saelens_norm_in(x, norm):
    if norm == "constant_norm_rescale":
        coeff = x.shape[-1] ** 0.5 / x.norm(dim=-1, keepdim=True)
        return x * coeff, lambda y: y / coeff
    if norm == "layer_norm":
        mu = x.mean(dim=-1, keepdim=True)
        x = x - mu
        std = x.std(dim=-1, keepdim=True)
        return x / (std + 1e-5), lambda y: y * std + mu
    return x, lambda y: y


def saelens_forward(arch: str, t: dict, cfg: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(feature activations, output) of SAELens's SAE.encode / SAE.forward."""
    transcoder = arch in TRANSCODERS
    sae_in, norm_out = saelens_norm_in(x, cfg["normalize_activations"])
    if not transcoder:
        sae_in = sae_in - t["b_dec"] * cfg["apply_b_dec_to_input"]
    if arch == "gated":
        active = (sae_in @ t["W_enc"] + t["b_gate"] > 0).float()
        f = active * torch.relu(sae_in @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"])
    else:
        z = sae_in @ t["W_enc"] + t["b_enc"]
        if arch == "topk":
            if cfg.get("rescale_acts_by_decoder_norm"):
                z = z * t["W_dec"].norm(dim=-1)
            values, idx = torch.topk(z, k=cfg["k"], dim=-1)
            f = torch.zeros_like(z).scatter(-1, idx, values.relu())
        elif arch in JUMPRELU:
            f = torch.relu(z) * (z > t["threshold"]).float()
        else:
            f = torch.relu(z)
    acts = f / t["W_dec"].norm(dim=-1) if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm") else f
    out = acts @ t["W_dec"] + t["b_dec"]
    if not transcoder:
        out = norm_out(out)
    if "W_skip" in t:
        out = out + x @ t["W_skip"].T
    return f, out


def sparsify_forward(t: dict, cfg: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense latent activations, output) as SparseCoder.encode / forward compute them."""
    sae_in = x if cfg["transcode"] else x - t["b_dec"]
    pre = torch.relu(sae_in @ t["encoder.weight"].T + t["encoder.bias"])
    top_acts, top_indices = pre.topk(cfg["k"], dim=-1, sorted=False)
    out = (top_acts[..., None] * t["W_dec"][top_indices]).sum(-2) + t["b_dec"]
    if cfg["skip_connection"]:
        out = out + x @ t["W_skip"].T
    return torch.zeros_like(pre).scatter(-1, top_indices, top_acts), out


def gemma_scope(p, x):
    """The tutorial's encode and decode."""
    pre_acts = x @ p["W_enc"] + p["b_enc"]
    acts = (pre_acts > p["threshold"]) * torch.nn.functional.relu(pre_acts)
    return acts, acts @ p["W_dec"] + p["b_dec"]
