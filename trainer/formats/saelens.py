"""The SAELens layout: our own save format, and SAELens folders (6.x, and older ones) brought in.

A folder holds `cfg.json` and `sae_weights.safetensors` with W_enc [d_in, d_sae], b_enc,
W_dec [d_sae, d_out], b_dec [d_out] and, per architecture, `threshold` (jumprelu), `b_gate`,
`b_mag`, `r_mag` (gated) or `W_skip` [d_out, d_in] (skip transcoders). SAELens encodes
  x' = norm_in(x) - (b_dec if apply_b_dec_to_input else 0);  z = x' W_enc + b_enc;  f = act(z)
and decodes x_hat = norm_out(f W_dec + b_dec) (transcoders: no norm_out, plus W_skip x).

Our saves: the input normalisation used in training is folded into the weights, so the saved SAE
reads raw activations. BatchTopK and Matryoshka SAEs are saved as JumpReLU with one global
threshold (their inference rule); transcoders as SAELens's transcoder classes (a TopK transcoder,
which SAELens lacks, as its TopK SAE with apply_b_dec_to_input false: the same numbers). cfg.json
carries the fields SAELens 6 reads at the top level, the model and hook names both flat (how
SAELens < 6 wrote them, and how SAELens 6 reads a cfg without a version) and under `metadata`,
and our own `sae_atlas` block with the real architecture, sites and everything else we know.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import torch

from store.errors import AtlasError
from trainer.config import ARCHITECTURES
from trainer.formats.common import (
    LoadedSAE,
    SiteIO,
    assemble,
    check_shape,
    fold_b_dec,
    jumprelu_threshold,
    read_json,
    read_safetensors,
    require,
    unfold_b_dec,
)
from trainer.formats.sites import hook_name_for, site_from_hook
from trainer.sae import SAEConfig, SparseAutoencoder
from trainer.sources import hf_model_id

WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"
SCALER_FILE = "activation_scaler.json"  # SAELens training checkpoints: the normalisation statistics
WHITENING_FILE = "activation_whitening.safetensors"
FORMAT_VERSION = 2  # 2: transcoders (kind, output_site, W_skip) and SAELens-6 metadata

TRANSCODERS = {"transcoder": "relu", "skip_transcoder": "relu",
               "jumprelu_transcoder": "jumprelu", "jumprelu_skip_transcoder": "jumprelu"}
SAE_ARCHS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "jumprelu"}
REFUSED = {
    "abstopk": "keeps signed activations (top k by magnitude)",
    "temporal": "mixes in attention over earlier tokens",
    "matching_pursuit": "encodes by iterative matching pursuit",
}


# --- saving -----------------------------------------------------------------------------------

def saelens_architecture(architecture: str, transcoder: bool = False, skip: bool = False) -> str | None:
    """SAELens's architecture with the same encode and decode, or None where SAELens has none."""
    base = {"topk": "topk", "relu": "standard"}.get(architecture, "jumprelu")
    if not transcoder:
        return None if skip else base
    if base == "topk":
        return None if skip else "topk"
    prefix = "jumprelu_" if base == "jumprelu" else ""
    return f"{prefix}{'skip_' if skip else ''}transcoder"


@torch.no_grad()
def export_tensors(sae: SparseAutoencoder, norm_scale: float, apply_b_dec_to_input: bool = True) -> dict[str, torch.Tensor]:
    """SAELens-layout tensors with the input scale c folded in: the SAE then reads raw x.

    f = act(W_enc (c x - b_dec) + b_enc) = act((c W_enc)(x - b_dec / c) + b_enc), and
    x_hat = (W_dec f + b_dec) / c, so W_enc' = c W_enc, W_dec' = W_dec / c, b_dec' = b_dec / c.
    With apply_b_dec_to_input false (transcoders), b_enc is given for an encoder without b_dec.
    """
    c = float(norm_scale)
    w_enc = sae.W_enc.detach().float() * c
    b_dec = sae.b_dec.detach().float() / c
    b_enc = sae.b_enc.detach().float()
    if not apply_b_dec_to_input:
        b_enc = unfold_b_dec(w_enc, b_enc, b_dec).float()
    out = {
        "W_enc": w_enc.T.contiguous().cpu(),
        "b_enc": b_enc.cpu().clone(),
        "W_dec": (sae.W_dec.detach().float() / c).contiguous().cpu(),
        "b_dec": b_dec.cpu().clone(),
    }
    threshold = sae.inference_threshold()
    if threshold is not None:
        out["threshold"] = threshold.detach().float().cpu().contiguous()
    skip = getattr(sae.io, "W_skip", None)
    if skip is not None:
        out["W_skip"] = skip.detach().float().cpu().contiguous()
    return out


def save_sae(folder: Path, sae: SparseAutoencoder, norm_scale: float, site: str, model: str,
             training: dict | None = None, metrics: dict | None = None, context_size: int = 128,
             corpus: str | None = None, output_site: str | None = None, transcoder: bool = False) -> None:
    """Write cfg.json + sae_weights.safetensors (each atomically replaced).

    A transcoder reads `site` and predicts `output_site`; sae.io's input normalisation and skip
    term are written as SAELens's normalize_activations and W_skip."""
    from safetensors.torch import save_file

    transcoder = transcoder or output_site is not None
    io = sae.io
    input_norm = getattr(io, "input_norm", "none")
    skip = getattr(io, "W_skip", None) is not None
    if norm_scale != 1.0 and io is not None:
        raise AtlasError("an SAE with run-time normalisation or a skip term cannot also fold an input scale")
    folder.mkdir(parents=True, exist_ok=True)
    cfg = sae.cfg
    arch = saelens_architecture(cfg.architecture, transcoder, skip)
    base = saelens_architecture(cfg.architecture)
    hook = hook_name_for(site)
    names = {
        "model_name": hf_model_id(model),
        "hook_name": hook,
        "hook_head_index": None,
        "context_size": context_size,
        "prepend_bos": True,
        "dataset_path": corpus,
    }
    if transcoder:
        names["hook_name_out"] = hook_name_for(output_site) if output_site else None
    saelens: dict = {
        "architecture": arch or base,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": not transcoder,
        "normalize_activations": input_norm,
        "reshape_activations": "none",
    }
    if transcoder:
        saelens["d_out"] = cfg.d_in
    if base == "topk":
        saelens.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    saelens.update(names)
    saelens.update({
        "hook_layer": int(site.split(".")[1]),
        "activation_fn_str": "topk" if base == "topk" else "relu",
        "activation_fn_kwargs": {"k": cfg.k} if base == "topk" else {},
        "finetuning_scaling_factor": False,
        "sae_lens_training_version": None,
        "metadata": dict(names),
    })
    saelens["sae_atlas"] = {
        "format_version": FORMAT_VERSION,
        "architecture": cfg.architecture,
        "kind": "transcoder" if transcoder else "sae",
        "site": site,
        "output_site": output_site,
        "model": model,
        "saelens_loadable": arch is not None,
        "norm_scale_folded": float(norm_scale),
        "sae": asdict(cfg),
        "training": training or {},
        "metrics": metrics or {},
    }
    tmp_w = folder / (WEIGHTS_FILE + ".tmp")
    save_file(export_tensors(sae, norm_scale, apply_b_dec_to_input=not transcoder), str(tmp_w))
    os.replace(tmp_w, folder / WEIGHTS_FILE)
    tmp_c = folder / (CFG_FILE + ".tmp")
    tmp_c.write_text(json.dumps(saelens, indent=2, default=_json_default))
    os.replace(tmp_c, folder / CFG_FILE)


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"cannot serialise {type(o).__name__}")


# --- loading ----------------------------------------------------------------------------------

def _architecture(cfg: dict) -> str:
    arch = cfg.get("architecture")
    act = cfg.get("activation_fn") or cfg.get("activation_fn_str")
    if act == "topk" and (cfg.get("activation_fn_kwargs") or {}).get("k") is not None:
        return "topk"  # SAELens < 6 marked TopK SAEs by their activation function only
    return arch or "standard"


def _fold_runtime_statistics(path: Path, norm: str, w_enc, b_enc, w_dec, b_dec, apply_b_dec: bool):
    """Fold SAELens's training-time normalisation into the weights, as its trainer does at the end
    of training (fold_activation_norm_scaling_factor / fold_activation_whitening). A saved SAE has
    it folded already (normalize_activations none); a training checkpoint keeps the statistics in
    activation_scaler.json (+ activation_whitening.safetensors) next to the weights.
    Tensors in the SAELens layout (W_enc [d_in, d_sae], W_dec [d_sae, d_out]), float64."""
    scaler_path = path / SCALER_FILE
    if not scaler_path.is_file():
        raise AtlasError(
            f"{path}: normalize_activations={norm!r} but the folder has no {SCALER_FILE} with its statistics",
            "fold them into the weights in SAELens (fold_activation_norm_scaling_factor / fold_activation_whitening) "
            "and save with normalize_activations none")
    scaler = read_json(scaler_path)
    if norm == "expected_average_only_in":
        s = scaler.get("scaling_factor")
        if not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
            raise AtlasError(f"{scaler_path} has no positive scaling_factor", "restore the file")
        return w_enc * s, b_enc, w_dec / s, b_dec / s
    white = read_safetensors(path / WHITENING_FILE)
    require(white, ("mean", "matrix", "inverse_matrix"), path / WHITENING_FILE, "a SAELens whitening file")
    d_in = w_enc.shape[0]
    mean = check_shape("mean", white["mean"], (d_in,), path)
    m = check_shape("matrix", white["matrix"], (d_in, d_in), path)
    m_inv = check_shape("inverse_matrix", white["inverse_matrix"], (d_in, d_in), path)
    w_enc = m @ w_enc
    if not apply_b_dec:
        b_enc = b_enc - mean @ w_enc
    return w_enc, b_enc, w_dec @ m_inv, b_dec @ m_inv + mean


def load_saelens(path: Path, cfg: dict) -> LoadedSAE:
    ours = cfg.get("sae_atlas") or {}
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    tensors = read_safetensors(path / WEIGHTS_FILE)
    try:
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    except (KeyError, TypeError, ValueError):
        raise AtlasError(f"{path / CFG_FILE} lacks d_in or d_sae", "add them to cfg.json") from None
    arch = _architecture(cfg)
    if arch in REFUSED:
        raise AtlasError(f"{path}: SAELens architecture {arch!r} is not supported: it {REFUSED[arch]}",
                         "SAE Atlas reads standard, gated, topk and jumprelu SAEs and transcoders")
    if arch not in SAE_ARCHS and arch not in TRANSCODERS:
        raise AtlasError(f"{path}: SAELens architecture {arch!r} is not supported",
                         f"supported: {', '.join([*SAE_ARCHS, *TRANSCODERS])}")
    transcoder = arch in TRANSCODERS or ours.get("kind") == "transcoder"
    d_out = int(cfg.get("d_out") or d_in) if transcoder else d_in
    if d_out != d_in:
        raise AtlasError(f"{path}: a transcoder from {d_in} to {d_out} dimensions is not supported",
                         "SAE Atlas reads transcoders whose input and output have the same width")
    head = cfg.get("hook_head_index", meta.get("hook_head_index"))
    if head is not None:
        raise AtlasError(f"{path}: SAEs on a single attention head (hook_head_index={head}) are not supported")
    scale = tensors.pop("scaling_factor", None)  # SAELens < 6: a fine-tuned scale of the latents
    if scale is not None and not torch.allclose(scale.float(), torch.ones_like(scale.float())):
        raise AtlasError(f"{path}: SAEs with a fine-tuned scaling_factor are not supported", "fold it into W_dec first")

    # The encoder in SAELens's layout, as float64.
    if arch == "gated":
        # f = 1[x' W + b_gate > 0] * relu(x' (W * e^r) + b_mag): a JumpReLU on z = x' (W e^r) + b_mag
        # with threshold b_mag - e^r b_gate, since e^r > 0 (Rajamanoharan et al. 2024, JumpReLU paper).
        require(tensors, ("W_enc", "b_gate", "b_mag", "r_mag", "W_dec", "b_dec"), path / WEIGHTS_FILE, "a SAELens gated SAE")
        r = check_shape("r_mag", tensors["r_mag"], (d_sae,), path).exp()
        w_enc = check_shape("W_enc", tensors["W_enc"], (d_in, d_sae), path) * r
        b_enc = check_shape("b_mag", tensors["b_mag"], (d_sae,), path)
        threshold = b_enc - r * check_shape("b_gate", tensors["b_gate"], (d_sae,), path)
    else:
        require(tensors, ("W_enc", "b_enc", "W_dec", "b_dec"), path / WEIGHTS_FILE, "an SAELens SAE")
        w_enc = check_shape("W_enc", tensors["W_enc"], (d_in, d_sae), path)
        b_enc = check_shape("b_enc", tensors["b_enc"], (d_sae,), path)
        threshold = None
        if "threshold" in tensors:
            threshold = check_shape("threshold", tensors["threshold"], (d_sae,), path)
        elif "log_threshold" in tensors:
            threshold = check_shape("log_threshold", tensors["log_threshold"], (d_sae,), path).exp()
    w_dec = check_shape("W_dec", tensors["W_dec"], (d_sae, d_out), path)
    b_dec = check_shape("b_dec", tensors["b_dec"], (d_out,), path)
    w_skip = None
    if "W_skip" in tensors:
        w_skip = check_shape("W_skip", tensors["W_skip"], (d_out, d_in), path).float()
    elif arch.endswith("skip_transcoder"):
        raise AtlasError(f"{path / WEIGHTS_FILE} lacks W_skip", "is the file complete?")
    apply_b_dec = bool(cfg.get("apply_b_dec_to_input", True)) and not transcoder

    k = None
    if arch == "topk":
        k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
        if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
            raise AtlasError(f"{path / CFG_FILE}: a topk SAE needs a positive integer k", "add \"k\" to cfg.json")
        if cfg.get("rescale_acts_by_decoder_norm"):
            # SAELens selects the top k of z * ||W_dec,i|| and decodes f / ||W_dec,i||: the same as
            # folding the norms into the encoder (TopKTrainingSAE's _fold_norm_topk).
            norms = w_dec.norm(dim=1).clamp_min(1e-8)
            w_enc, b_enc, w_dec = w_enc * norms, b_enc * norms, w_dec / norms[:, None]

    norm = cfg.get("normalize_activations", "none")
    if isinstance(norm, bool):  # SAELens < 6
        norm = "expected_average_only_in" if norm else "none"
    norm = norm or "none"
    if norm in ("expected_average_only_in", "covariance_whitening"):
        w_enc, b_enc, w_dec, b_dec = _fold_runtime_statistics(path, norm, w_enc, b_enc, w_dec, b_dec, apply_b_dec)
        norm = "none"
    elif norm not in ("none", "constant_norm_rescale", "layer_norm"):
        raise AtlasError(f"{path}: normalize_activations={norm!r} is not supported",
                         "supported: none, expected_average_only_in, constant_norm_rescale, layer_norm, covariance_whitening")

    w_enc_fd = w_enc.T
    if not apply_b_dec:
        b_enc = fold_b_dec(w_enc_fd, b_enc, b_dec)
    if ours.get("architecture") in ARCHITECTURES:
        sae_cfg = SAEConfig.from_dict({**ours.get("sae", {}), "d_in": d_in, "d_sae": d_sae,
                                       "architecture": ours["architecture"]})
    else:
        our_arch = TRANSCODERS.get(arch) or SAE_ARCHS[arch]
        sae_cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture=our_arch, **({"k": k} if k else {}))
    if sae_cfg.architecture in ("jumprelu", "batchtopk", "matryoshka"):
        if threshold is None:
            raise AtlasError(f"{path / WEIGHTS_FILE} lacks the threshold tensor", "is the file complete?")
        threshold = jumprelu_threshold(threshold)
    io = None
    if norm != "none" or w_skip is not None:
        io = SiteIO(norm, restore_output=not transcoder, w_skip=w_skip)
    sae = assemble(sae_cfg, w_enc_fd, b_enc, w_dec, b_dec, threshold, io)

    hook = cfg.get("hook_name") or meta.get("hook_name")
    hook_out = cfg.get("hook_name_out") or meta.get("hook_name_out")
    site = ours.get("site") or site_from_hook(hook) or site_from_hook(cfg.get("hf_hook_name") or meta.get("hf_hook_name"))
    output_site = None
    if transcoder:
        output_site = ours.get("output_site") or site_from_hook(hook_out) or site_from_hook(
            cfg.get("hf_hook_name_out") or meta.get("hf_hook_name_out"))
    model = ours.get("model") or cfg.get("model_name") or meta.get("model_name")
    native = (ours.get("training") or {}).get("native_hook")
    return LoadedSAE(sae, path, "saelens", sae_cfg.architecture, site, model, ours, transcoder, output_site, native)
