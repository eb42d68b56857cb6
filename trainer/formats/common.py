"""What every format shares: the loaded SAE, what an imported SAE does around its encoder and
decoder (SiteIO), safe readers, and the assembly of our SAE classes from another tool's tensors.

Every loader returns an SAE whose encode() takes the raw activations of its site and whose
forward() returns what the SAE predicts there (or, for a transcoder, at its output site). Where
a format encodes without subtracting b_dec (SAELens apply_b_dec_to_input = false, Gemma Scope,
transcoders), b_dec is folded into the encoder bias: W (x - b_dec) + (b_enc + W b_dec) = W x + b_enc.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from store.errors import AtlasError
from trainer.sae import SAEConfig, SparseAutoencoder, build_sae

# SAELens's run-time input normalisations (sae_lens.saes.sae.SAE._setup_activation_normalization).
RUNTIME_NORMS = ("none", "constant_norm_rescale", "layer_norm")
LAYER_NORM_EPS = 1e-5  # SAELens's run_time_activation_ln_in default


@dataclass
class LoadedSAE:
    """An SAE read from disk. It reads raw activations of `site` (any normalisation folded in or
    applied by sae.io); a transcoder predicts the activations of `output_site` instead."""

    sae: SparseAutoencoder
    path: Path
    source_format: str  # saelens | sparsify | gemmascope (our own folders are saelens)
    architecture: str
    site: str | None = None
    model: str | None = None
    meta: dict = field(default_factory=dict)  # the sae_atlas block of our own saves
    transcoder: bool = False
    output_site: str | None = None  # a transcoder's output site (None for an autoencoder)
    native_hook: str | None = None  # the tool's own name of the hooked module (sparsify hookpoint)

    @property
    def metrics(self) -> dict:
        return self.meta.get("metrics", {})

    @property
    def kind(self) -> str:
        skip = self.sae.io is not None and getattr(self.sae.io, "W_skip", None) is not None
        if self.transcoder:
            return "skip_transcoder" if skip else "transcoder"
        return "sae_with_skip" if skip else "sae"

    @property
    def target_site(self) -> str | None:
        """Where the SAE's output belongs: the output site of a transcoder, else its own site."""
        return self.output_site if self.transcoder else self.site


class SiteIO(nn.Module):
    """What an imported SAE does around its encoder and decoder (SparseAutoencoder.io).

    - input_norm: SAELens's run-time normalisation of the encoder input, `constant_norm_rescale`
      (x * sqrt(d_in) / ||x||) or `layer_norm` ((x - mean) / (std + 1e-5), std with Bessel's
      correction as torch.std computes it);
    - restore_output: undo that normalisation on the decoder output (SAELens does for SAEs, not
      for transcoders, whose output lives at another site);
    - W_skip [d_out, d_in]: a linear skip term W_skip x of the raw input added to the output
      (skip-transcoders; sparsify's skip_connection).
    finish() recomputes the statistics of x rather than keeping them from normalise() (as SAELens
    does), so encode and output stay pure functions of x.
    """

    def __init__(self, input_norm: str = "none", restore_output: bool = True, w_skip: torch.Tensor | None = None):
        super().__init__()
        if input_norm not in RUNTIME_NORMS:
            raise ValueError(f"unknown run-time normalisation {input_norm!r}")
        self.input_norm = input_norm
        self.restore_output = restore_output
        self.register_buffer("W_skip", None if w_skip is None else w_skip.float().contiguous())

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_norm == "none":
            return x
        xf = x.float()
        if self.input_norm == "constant_norm_rescale":
            out = xf * (math.sqrt(xf.shape[-1]) / xf.norm(dim=-1, keepdim=True))
        else:
            centred = xf - xf.mean(dim=-1, keepdim=True)
            out = centred / (centred.std(dim=-1, keepdim=True) + LAYER_NORM_EPS)
        return out.to(x.dtype)

    def output_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """[..., 1]: the factor finish() multiplies the decoder output by to undo normalise() (None
        when it does not), so a change d of the decoder output is a change d * scale of the output."""
        if not self.restore_output or self.input_norm == "none":
            return None
        xf = x.float()
        if self.input_norm == "constant_norm_rescale":
            return 1 / (math.sqrt(xf.shape[-1]) / xf.norm(dim=-1, keepdim=True))
        return (xf - xf.mean(dim=-1, keepdim=True)).std(dim=-1, keepdim=True)

    def finish(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        scale = self.output_scale(x)
        if scale is not None:
            x_hat = x_hat * scale
            if self.input_norm == "layer_norm":
                x_hat = x_hat + xf.mean(dim=-1, keepdim=True)
        if self.W_skip is not None:
            x_hat = x_hat + xf @ self.W_skip.T
        return x_hat

    def extra_repr(self) -> str:
        return f"input_norm={self.input_norm}, restore_output={self.restore_output}, skip={self.W_skip is not None}"


# --- reading ----------------------------------------------------------------------------------

def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AtlasError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})", "restore the file") from None
    if not isinstance(data, dict):
        raise AtlasError(f"{path} does not hold a JSON object", "restore the file")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise AtlasError(f"weights file {path} is missing", "copy the SAE's weights into the folder")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises SafetensorError / OSError / ValueError
        raise AtlasError(f"weights file {path} is corrupt or truncated ({str(exc).splitlines()[0][:200]})",
                         "re-download or re-save the SAE") from None


def check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], path: Path) -> torch.Tensor:
    if tuple(t.shape) != shape:
        raise AtlasError(f"{path}: {name} has shape {tuple(t.shape)}, expected {shape}", "the weights do not match cfg.json")
    if not torch.isfinite(t).all():
        raise AtlasError(f"{path}: {name} contains NaN or infinite values", "the SAE is broken; retrain or re-download it")
    return t.double()  # folds below are done in float64, then stored as float32


def require(tensors: dict, names: tuple[str, ...], path: Path, what: str) -> None:
    missing = [k for k in names if k not in tensors]
    if missing:
        raise AtlasError(f"{path} lacks {', '.join(missing)}", f"is this {what}?")


# --- assembling -------------------------------------------------------------------------------

def fold_b_dec(w_enc_fd: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """b_enc' with W (x - b_dec) + b_enc' = W x + b_enc: an encoder that leaves b_dec alone."""
    return b_enc + w_enc_fd @ b_dec


def unfold_b_dec(w_enc_fd: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    return b_enc - w_enc_fd.double() @ b_dec.double()


def jumprelu_threshold(threshold: torch.Tensor) -> torch.Tensor:
    """SAELens and Gemma Scope compute relu(z) * (z > theta); our JumpReLU computes z * (z > theta).
    The two agree for theta >= 0, and relu(z) * (z > theta) = z * (z > max(theta, 0)) for any theta."""
    return threshold.clamp_min(0)


def assemble(cfg: SAEConfig, w_enc_fd, b_enc, w_dec, b_dec, threshold=None, io: SiteIO | None = None) -> SparseAutoencoder:
    sae = build_sae(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(w_enc_fd.float())
        sae.b_enc.copy_(b_enc.float())
        sae.W_dec.copy_(w_dec.float())
        sae.b_dec.copy_(b_dec.float())
        if threshold is not None:
            t = threshold.float()
            sae.threshold.copy_(t if sae.threshold.ndim else t.max())
    sae.io = io
    return sae.eval().requires_grad_(False)
