"""Gemma Scope's original release: `params.npz` with W_enc [d_in, d_sae], W_dec [d_sae, d_in],
b_enc, b_dec and threshold, no cfg.json. Its tutorial encodes
  f = relu(x W_enc + b_enc) * (x W_enc + b_enc > threshold)   (no b_dec subtraction)
and decodes x_hat = f W_dec + b_dec. The Hub folders say what the SAE reads:
google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_41/params.npz is resid_post.12 of
google/gemma-2-2b (`-mlp`: mlp_out; `-att`: the attention heads' concatenated outputs, no site of
ours; `-transcoders`: mlp_in -> mlp_out).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from store.errors import AtlasError
from trainer.formats.common import (
    LoadedSAE,
    assemble,
    check_shape,
    fold_b_dec,
    jumprelu_threshold,
    require,
)
from trainer.formats.sites import site_from_hook
from trainer.sae import SAEConfig

_RELEASE = re.compile(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att|transcoders)")


def sites_from_path(path: Path) -> tuple[str | None, str | None, bool, str | None]:
    """(site, output_site, transcoder, model) from a Gemma Scope Hub path, where it says."""
    text = path.as_posix()
    release = _RELEASE.search(text)
    layer = re.search(r"(?:^|/)layer_(\d+)(?:/|$)", text)
    if not release:
        return None, None, False, None
    size, variant, kind = release.groups()
    model = f"google/gemma-2-{size}" + ("-it" if variant == "it" else "")
    if not layer:
        return None, None, kind == "transcoders", model
    L = layer.group(1)
    if kind == "transcoders":
        return f"mlp_in.{L}", f"mlp_out.{L}", True, model
    return {"res": f"resid_post.{L}", "mlp": f"mlp_out.{L}"}.get(kind), None, False, model


def load_gemmascope_npz(path: Path, cfg: dict) -> LoadedSAE:
    try:
        with np.load(path, allow_pickle=False) as params:
            arrays = {k: torch.from_numpy(np.asarray(params[k], dtype=np.float64)) for k in params.files}
    except (ValueError, OSError, KeyError) as exc:
        raise AtlasError(f"cannot read {path}: {exc}", "re-download params.npz") from None
    require(arrays, ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"), path, "a Gemma Scope params.npz")
    if arrays["W_enc"].ndim != 2:
        raise AtlasError(f"{path}: W_enc has shape {tuple(arrays['W_enc'].shape)}, expected [d_in, d_sae]")
    d_in, d_sae = arrays["W_enc"].shape
    w_enc = check_shape("W_enc", arrays["W_enc"], (d_in, d_sae), path).T
    b_dec = check_shape("b_dec", arrays["b_dec"], (d_in,), path)
    b_enc = fold_b_dec(w_enc, check_shape("b_enc", arrays["b_enc"], (d_sae,), path), b_dec)
    threshold = jumprelu_threshold(check_shape("threshold", arrays["threshold"], (d_sae,), path))
    sae = assemble(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="jumprelu"), w_enc, b_enc,
                   check_shape("W_dec", arrays["W_dec"], (d_sae, d_in), path), b_dec, threshold)
    site, output_site, transcoder, model = sites_from_path(path.resolve())
    site = site_from_hook(cfg.get("hook_name")) or site
    return LoadedSAE(sae, path.parent if path.name == "params.npz" else path, "gemmascope", "jumprelu",
                     site, cfg.get("model_name") or model, {}, transcoder, output_site)
