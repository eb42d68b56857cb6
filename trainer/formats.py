"""Interchange formats: save in the SAELens layout; load SAELens, Gemma Scope and EleutherAI sparsify.

Saved folders hold `cfg.json` and `sae_weights.safetensors` with W_enc [d_in, d_sae], b_enc,
W_dec [d_sae, d_in], b_dec (and `threshold` for JumpReLU-style inference). The input
normalisation used in training is folded into the weights, so the saved SAE reads raw activations.
BatchTopK and Matryoshka SAEs are saved as JumpReLU with one global threshold (their inference
rule); cfg.json's `sae_atlas` block remembers the real architecture and everything else we know.

Nothing is ever unpickled: safetensors, JSON and numpy arrays loaded with allow_pickle=False only.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from app.errors import AtlasError
from trainer.sae import SAEConfig, SparseAutoencoder, build_sae

WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
FORMAT_VERSION = 1


@dataclass
class LoadedSAE:
    """An SAE read from disk: reads raw activations of `site` (normalisation folded in)."""

    sae: SparseAutoencoder
    path: Path
    source_format: str  # saelens | sparsify | gemmascope
    architecture: str
    site: str | None = None
    model: str | None = None
    meta: dict = field(default_factory=dict)  # the sae_atlas block of our own saves

    @property
    def metrics(self) -> dict:
        return self.meta.get("metrics", {})


# --- site names -------------------------------------------------------------------------------

def hook_name_for(site: str) -> str:
    """Our site name as a TransformerLens hook name (what SAELens cfgs use)."""
    kind, layer = site.split(".")
    return f"blocks.{layer}.hook_{kind}"


def site_from_hook(hook: str | None) -> str | None:
    """TransformerLens or sparsify hook names back to our site names, where they map exactly."""
    if not hook:
        return None
    m = re.fullmatch(r"blocks\.(\d+)\.hook_(resid_post|mlp_out|attn_out|resid_pre)", hook)
    if m:
        layer, kind = int(m.group(1)), m.group(2)
        if kind == "resid_pre":
            return f"resid_post.{layer - 1}" if layer > 0 else None
        return f"{kind}.{layer}"
    m = re.fullmatch(r"(?:model\.|gpt_neox\.|transformer\.)?(?:layers|h)\.(\d+)(\.mlp|\.self_attn|\.attn|\.attention)?", hook)
    if m:
        kind = {None: "resid_post", ".mlp": "mlp_out"}.get(m.group(2), "attn_out")
        return f"{kind}.{m.group(1)}"
    return None


# --- saving -----------------------------------------------------------------------------------

@torch.no_grad()
def export_tensors(sae: SparseAutoencoder, norm_scale: float) -> dict[str, torch.Tensor]:
    """SAELens-layout tensors with the input scale c folded in: the SAE then reads raw x.

    f = act(W_enc (c x - b_dec) + b_enc) = act((c W_enc)(x - b_dec / c) + b_enc), and
    x_hat = (W_dec f + b_dec) / c, so W_enc' = c W_enc, W_dec' = W_dec / c, b_dec' = b_dec / c.
    """
    c = float(norm_scale)
    out = {
        "W_enc": (sae.W_enc.detach().float() * c).T.contiguous().cpu(),
        "b_enc": sae.b_enc.detach().float().cpu().clone(),
        "W_dec": (sae.W_dec.detach().float() / c).contiguous().cpu(),
        "b_dec": (sae.b_dec.detach().float() / c).cpu(),
    }
    threshold = sae.inference_threshold()
    if threshold is not None:
        out["threshold"] = threshold.detach().float().cpu().contiguous()
    return out


def saelens_architecture(architecture: str) -> str:
    return {"topk": "topk", "relu": "standard"}.get(architecture, "jumprelu")


def save_sae(folder: Path, sae: SparseAutoencoder, norm_scale: float, site: str, model: str,
             training: dict | None = None, metrics: dict | None = None, context_size: int = 128,
             corpus: str | None = None) -> None:
    """Write cfg.json + sae_weights.safetensors (atomically replaced)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = sae.cfg
    layer = int(site.split(".")[1])
    arch = saelens_architecture(cfg.architecture)
    saelens = {
        "architecture": arch,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "model_name": model,
        "hook_name": hook_name_for(site),
        "hook_layer": layer,
        "hook_head_index": None,
        "activation_fn_str": "topk" if arch == "topk" else "relu",
        "activation_fn_kwargs": {"k": cfg.k} if arch == "topk" else {},
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "normalize_activations": "none",
        "prepend_bos": True,
        "context_size": context_size,
        "dataset_path": corpus,
        "sae_lens_training_version": None,
    }
    if arch == "topk":
        saelens["k"] = cfg.k
    saelens["sae_atlas"] = {
        "format_version": FORMAT_VERSION,
        "architecture": cfg.architecture,
        "site": site,
        "model": model,
        "norm_scale_folded": float(norm_scale),
        "sae": asdict(cfg),
        "training": training or {},
        "metrics": metrics or {},
    }
    tmp_w = folder / (WEIGHTS_FILE + ".tmp")
    save_file(export_tensors(sae, norm_scale), str(tmp_w))
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

def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AtlasError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})", "restore the file") from None
    if not isinstance(data, dict):
        raise AtlasError(f"{path} does not hold a JSON object", "restore the file")
    return data


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise AtlasError(f"weights file {path} is missing", "copy the SAE's weights into the folder")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises SafetensorError / OSError / ValueError
        raise AtlasError(f"weights file {path} is corrupt or truncated ({str(exc).splitlines()[0][:200]})",
                         "re-download or re-save the SAE") from None


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], path: Path) -> torch.Tensor:
    if tuple(t.shape) != shape:
        raise AtlasError(f"{path}: {name} has shape {tuple(t.shape)}, expected {shape}", "the weights do not match cfg.json")
    if not torch.isfinite(t).all():
        raise AtlasError(f"{path}: {name} contains NaN or infinite values", "the SAE is broken; retrain or re-download it")
    return t.float()


def _assemble(cfg: SAEConfig, w_enc_fd: torch.Tensor, b_enc, w_dec, b_dec, threshold=None) -> SparseAutoencoder:
    sae = build_sae(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(w_enc_fd)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(w_dec)
        sae.b_dec.copy_(b_dec)
        if threshold is not None:
            sae.threshold.copy_(threshold if sae.threshold.ndim else threshold.max())
    return sae.eval().requires_grad_(False)


def load_sae(folder: str | Path) -> LoadedSAE:
    """Load an SAE folder in SAELens (incl. Gemma Scope) or sparsify layout, or a Gemma Scope params.npz."""
    path = Path(folder).expanduser()
    if path.is_file() and path.suffix == ".npz":
        return _load_gemmascope_npz(path, {})
    if not path.is_dir():
        raise AtlasError(f"SAE folder {path} does not exist", "point at a folder with cfg.json and the weights")
    cfg_path = path / CFG_FILE
    if not cfg_path.is_file():
        if (path / "params.npz").is_file():
            return _load_gemmascope_npz(path / "params.npz", {})
        raise AtlasError(f"{path} has no cfg.json", "an SAE folder needs cfg.json plus sae_weights.safetensors (SAELens) or sae.safetensors (sparsify)")
    cfg = _read_json(cfg_path)
    if (path / WEIGHTS_FILE).is_file():
        return _load_saelens(path, cfg)
    if (path / SPARSIFY_WEIGHTS).is_file():
        return _load_sparsify(path, cfg)
    if (path / "params.npz").is_file():
        return _load_gemmascope_npz(path / "params.npz", cfg)
    raise AtlasError(f"weights file {path / WEIGHTS_FILE} is missing", "copy the SAE's weights into the folder")


def _load_saelens(path: Path, cfg: dict) -> LoadedSAE:
    ours = cfg.get("sae_atlas") or {}
    tensors = _read_safetensors(path / WEIGHTS_FILE)
    try:
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    except (KeyError, TypeError, ValueError):
        raise AtlasError(f"{path / CFG_FILE} lacks d_in or d_sae", "add them to cfg.json") from None
    arch = cfg.get("architecture", "standard")
    norm = cfg.get("normalize_activations", "none") or "none"
    if norm not in ("none", "expected_average_only_in"):
        raise AtlasError(f"{path}: normalize_activations={norm!r} is not supported", "fold the normalisation into the weights first")
    missing = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k not in tensors]
    if missing:
        raise AtlasError(f"{path / WEIGHTS_FILE} lacks {', '.join(missing)}", "is this an SAELens SAE?")
    w_enc = _check_shape("W_enc", tensors["W_enc"], (d_in, d_sae), path).T
    b_enc = _check_shape("b_enc", tensors["b_enc"], (d_sae,), path)
    w_dec = _check_shape("W_dec", tensors["W_dec"], (d_sae, d_in), path)
    b_dec = _check_shape("b_dec", tensors["b_dec"], (d_in,), path)
    if cfg.get("apply_b_dec_to_input", True) is False:
        # act(W_enc x + b_enc) == act(W_enc (x - b_dec) + (b_enc + W_enc b_dec))
        b_enc = b_enc + w_enc @ b_dec
    threshold = None
    if "threshold" in tensors:
        threshold = _check_shape("threshold", tensors["threshold"], (d_sae,), path)
    elif "log_threshold" in tensors:
        threshold = _check_shape("log_threshold", tensors["log_threshold"], (d_sae,), path).exp()
    if ours.get("architecture") in ("batchtopk", "matryoshka", "topk", "relu", "jumprelu"):
        sae_cfg = SAEConfig.from_dict({**ours.get("sae", {}), "d_in": d_in, "d_sae": d_sae,
                                       "architecture": ours["architecture"]})
    elif arch == "topk":
        k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
        if not k:
            raise AtlasError(f"{path / CFG_FILE}: a topk SAE needs k", "add \"k\" to cfg.json")
        sae_cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=int(k))
    elif arch == "jumprelu":
        if threshold is None:
            raise AtlasError(f"{path / WEIGHTS_FILE}: a jumprelu SAE needs a threshold tensor", "is the file complete?")
        sae_cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture="jumprelu")
    elif arch == "standard":
        sae_cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture="relu")
    else:
        raise AtlasError(f"{path}: SAELens architecture {arch!r} is not supported", "supported: standard, topk, jumprelu")
    if sae_cfg.architecture in ("jumprelu", "batchtopk", "matryoshka") and threshold is None:
        raise AtlasError(f"{path / WEIGHTS_FILE} lacks the threshold tensor", "is the file complete?")
    sae = _assemble(sae_cfg, w_enc, b_enc, w_dec, b_dec, threshold)
    site = ours.get("site") or site_from_hook(cfg.get("hook_name"))
    return LoadedSAE(sae, path, "saelens", sae_cfg.architecture, site, ours.get("model") or cfg.get("model_name"), ours)


def _load_sparsify(path: Path, cfg: dict) -> LoadedSAE:
    tensors = _read_safetensors(path / SPARSIFY_WEIGHTS)
    if cfg.get("skip_connection"):
        raise AtlasError(f"{path}: sparsify SAEs with a skip connection are not supported", "train without --skip_connection")
    missing = [k for k in ("encoder.weight", "encoder.bias", "W_dec", "b_dec") if k not in tensors]
    if missing:
        raise AtlasError(f"{path / SPARSIFY_WEIGHTS} lacks {', '.join(missing)}", "is this a sparsify SAE?")
    d_sae, d_in = tensors["encoder.weight"].shape
    if cfg.get("d_in") not in (None, d_in):
        raise AtlasError(f"{path}: cfg.json says d_in={cfg['d_in']} but the weights have {d_in}", "the folder is inconsistent")
    k = cfg.get("k")
    if not isinstance(k, int) or k <= 0:
        raise AtlasError(f"{path / CFG_FILE}: sparsify cfg needs a positive integer k", "add \"k\" to cfg.json")
    sae_cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k)
    sae = _assemble(
        sae_cfg,
        _check_shape("encoder.weight", tensors["encoder.weight"], (d_sae, d_in), path),
        _check_shape("encoder.bias", tensors["encoder.bias"], (d_sae,), path),
        _check_shape("W_dec", tensors["W_dec"], (d_sae, d_in), path),
        _check_shape("b_dec", tensors["b_dec"], (d_in,), path),
    )
    return LoadedSAE(sae, path, "sparsify", "topk", site_from_hook(path.name), None, {})


def _load_gemmascope_npz(path: Path, cfg: dict) -> LoadedSAE:
    try:
        params = np.load(path, allow_pickle=False)
        arrays = {k: torch.from_numpy(np.asarray(params[k], dtype=np.float32)) for k in params.files}
    except (ValueError, OSError, KeyError) as exc:
        raise AtlasError(f"cannot read {path}: {exc}", "re-download params.npz") from None
    missing = [k for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold") if k not in arrays]
    if missing:
        raise AtlasError(f"{path} lacks {', '.join(missing)}", "is this a Gemma Scope params.npz?")
    d_in, d_sae = arrays["W_enc"].shape
    sae_cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture="jumprelu")
    sae = _assemble(
        sae_cfg,
        _check_shape("W_enc", arrays["W_enc"], (d_in, d_sae), path).T,
        _check_shape("b_enc", arrays["b_enc"], (d_sae,), path),
        _check_shape("W_dec", arrays["W_dec"], (d_sae, d_in), path),
        _check_shape("b_dec", arrays["b_dec"], (d_in,), path),
        _check_shape("threshold", arrays["threshold"], (d_sae,), path),
    )
    return LoadedSAE(sae, path.parent if path.name == "params.npz" else path, "gemmascope", "jumprelu",
                     site_from_hook(cfg.get("hook_name")), cfg.get("model_name"), {})
