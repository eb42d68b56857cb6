"""EleutherAI sparsify (1.x): one folder per hookpoint with `cfg.json` and `sae.safetensors`.

Tensors (sparsify.SparseCoder's state dict): encoder.weight [F, D], encoder.bias [F], W_dec [F, D],
b_dec [D] and, with skip_connection, W_skip [D, D]. cfg.json is SparseCoderConfig plus d_in:
activation (topk | groupmax), expansion_factor, normalize_decoder, num_latents, k, multi_topk,
skip_connection, transcode. SparseCoder.encode computes
  z = relu(encoder(x - b_dec))   (x itself when transcode: a transcoder leaves b_dec alone)
and keeps the top k of z (topk) or the largest of each of k contiguous groups (groupmax);
forward returns W_dec^T f + b_dec (+ W_skip x). A transcoder on module M reads M's input and
predicts M's output (the hookpoint `layers.6.mlp`: mlp_in.6 -> mlp_out.6); an SAE reads M's output.
The folder is named after the hookpoint (`layers.6`, or `layers.6/seed0` with several seeds).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from store.errors import AtlasError
from trainer.formats.common import (
    LoadedSAE,
    SiteIO,
    assemble,
    check_shape,
    fold_b_dec,
    read_safetensors,
    require,
    unfold_b_dec,
)
from trainer.formats.sites import module_input_site, module_output_site
from trainer.sae import SAEConfig

SPARSIFY_WEIGHTS = "sae.safetensors"
SPARSIFY_CFG = "cfg.json"


def hookpoint_of(path: Path) -> str:
    """sparsify names the folder after the hookpoint; with several seeds, `hookpoint/seedN`."""
    return path.parent.name if re.fullmatch(r"seed\d+", path.name) else path.name


def load_sparsify(path: Path, cfg: dict) -> LoadedSAE:
    tensors = read_safetensors(path / SPARSIFY_WEIGHTS)
    require(tensors, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), path / SPARSIFY_WEIGHTS, "a sparsify SAE")
    d_sae, d_in = tensors["encoder.weight"].shape
    if cfg.get("d_in") not in (None, d_in):
        raise AtlasError(f"{path}: cfg.json says d_in={cfg['d_in']} but the weights have {d_in}", "the folder is inconsistent")
    if cfg.get("num_latents") not in (None, 0, d_sae):
        raise AtlasError(f"{path}: cfg.json says num_latents={cfg['num_latents']} but the weights have {d_sae}",
                         "the folder is inconsistent")
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise AtlasError(f"{path}: sparsify activation {activation!r} is not supported",
                         "SAE Atlas reads sparsify TopK SAEs and transcoders (groupmax has no SAELens or SAE Atlas equivalent)")
    k = cfg.get("k")
    if not isinstance(k, int) or isinstance(k, bool) or not 0 < k < d_sae:
        raise AtlasError(f"{path / SPARSIFY_CFG}: sparsify cfg needs an integer k between 1 and {d_sae - 1}",
                         "add \"k\" to cfg.json")
    transcode = bool(cfg.get("transcode", False))
    w_enc = check_shape("encoder.weight", tensors["encoder.weight"], (d_sae, d_in), path)
    b_enc = check_shape("encoder.bias", tensors["encoder.bias"], (d_sae,), path)
    w_dec = check_shape("W_dec", tensors["W_dec"], (d_sae, d_in), path)
    b_dec = check_shape("b_dec", tensors["b_dec"], (d_in,), path)
    io = None
    if cfg.get("skip_connection") or "W_skip" in tensors:
        require(tensors, ("W_skip",), path / SPARSIFY_WEIGHTS, "a sparsify SAE with skip_connection")
        io = SiteIO(w_skip=check_shape("W_skip", tensors["W_skip"], (d_in, d_in), path))
    if transcode:
        b_enc = fold_b_dec(w_enc, b_enc, b_dec)
    sae = assemble(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k), w_enc, b_enc, w_dec, b_dec, io=io)
    hook = hookpoint_of(path)
    if transcode:
        site, output_site = module_input_site(hook), module_output_site(hook)
    else:
        site, output_site = module_output_site(hook), None
    return LoadedSAE(sae, path, "sparsify", "topk", site, None, {}, transcode, output_site, hook)


def save_sparsify(loaded: LoadedSAE, out: Path) -> None:
    """Write `out` as sparsify's SparseCoder.save_to_disk does (TopK SAEs and transcoders only)."""
    from safetensors.torch import save_file

    sae = loaded.sae
    if loaded.architecture != "topk":
        raise AtlasError(f"sparsify has no {loaded.architecture} SAEs", "export --format saelens, or a TopK SAE")
    io = sae.io
    if getattr(io, "input_norm", "none") != "none":
        raise AtlasError(f"sparsify cannot normalise inputs at run time ({io.input_norm})", "export --format saelens")
    w_enc = sae.W_enc.detach().float()
    b_dec = sae.b_dec.detach().float()
    b_enc = sae.b_enc.detach().float()
    if loaded.transcoder:
        b_enc = unfold_b_dec(w_enc, b_enc, b_dec).float()
    tensors = {"encoder.weight": w_enc.contiguous(), "encoder.bias": b_enc.contiguous(),
               "W_dec": sae.W_dec.detach().float().contiguous(), "b_dec": b_dec.contiguous()}
    skip = getattr(io, "W_skip", None)
    if skip is not None:
        tensors["W_skip"] = skip.detach().float().contiguous()
    d_sae, d_in = sae.cfg.d_sae, sae.cfg.d_in
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, d_sae // d_in),
        "normalize_decoder": bool(torch.allclose(sae.W_dec.norm(dim=1), torch.ones(d_sae), atol=1e-4)),
        "num_latents": d_sae,
        "k": sae.cfg.k,
        "multi_topk": False,
        "skip_connection": skip is not None,
        "transcode": loaded.transcoder,
        "d_in": d_in,
    }
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (SPARSIFY_WEIGHTS + ".tmp")
    save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, out / SPARSIFY_WEIGHTS)
    tmp = out / (SPARSIFY_CFG + ".tmp")
    tmp.write_text(json.dumps(cfg))
    os.replace(tmp, out / SPARSIFY_CFG)
