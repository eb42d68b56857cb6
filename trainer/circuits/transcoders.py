"""A transcoder set: one transcoder per block, each reading mlp_in.L and predicting mlp_out.L.

A transcoder is an SAE object of trainer/sae whose codes come from its input site and whose
prediction, sae.output(codes, x), belongs to its output site (trainer.formats.LoadedSAE carries
the pair; trainer.evaluate.Evaluated likewise). A skip-transcoder adds W_skip x after its decoder
(sae.io, see trainer.formats.common.SiteIO); that term is linear in x, so in the local replacement
model it stays live and carries gradients, while everything else the MLP computes is frozen.

Per prompt, `encode_layer` gives what attribution needs from one layer: the active features
(position, feature, activation), their encoder rows (the gradient of a pre-activation with respect
to the input) and their decoder contributions a_s * W_dec,s (what each adds to the output), the
reconstruction sae.output(...) and the part of it that still depends on x (b_dec + W_skip x).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from store.errors import AtlasError
from trainer.sae.base import Codes, SparseAutoencoder
from trainer.sources import parse_site


@dataclass
class LayerCodes:
    """One layer's transcoder applied to one prompt (T positions)."""

    positions: torch.Tensor
    """[n] long: position of each active feature, sorted by (position, feature)."""
    features: torch.Tensor
    """[n] long: the feature (latent) index."""
    activations: torch.Tensor
    """[n] float32: its activation a_s (> 0)."""
    encoder: torch.Tensor
    """[n, D] float32: W_enc,s, the gradient of the feature's pre-activation with respect to x."""
    decoder: torch.Tensor
    """[n, D] float32: what the feature adds to the prediction, a_s * W_dec,s (through sae.output_delta)."""
    reconstruction: torch.Tensor
    """[T, D] float32: sae.output(codes, x) with the zeroed positions' features removed."""


@dataclass
class Transcoder:
    """One layer's transcoder: the SAE and the sites it reads and predicts."""

    sae: SparseAutoencoder
    """The transcoder; a skip-transcoder's W_skip lives in sae.io."""
    site: str
    """What it reads: mlp_in.L."""
    output_site: str
    """What it predicts: mlp_out.L."""

    @property
    def has_skip(self) -> bool:
        return getattr(self.sae.io, "W_skip", None) is not None

    def linear_part(self, x: torch.Tensor) -> torch.Tensor:
        """b_dec + W_skip x (just b_dec without a skip term): sae.output with no feature active,
        the part of the prediction that the local replacement model keeps as a function of x."""
        flat = x.reshape(-1, x.shape[-1]).float()
        none = Codes(flat.new_zeros(flat.shape[0], 1), torch.zeros(flat.shape[0], 1, dtype=torch.long, device=flat.device))
        return self.sae.output(none, flat).reshape(*x.shape[:-1], -1)

    @torch.no_grad()
    def encode_layer(self, x: torch.Tensor, zero_positions: int = 1) -> LayerCodes:
        """x [T, D]: the layer's mlp_in activations for one prompt. Features at the first
        `zero_positions` positions (the BOS) are dropped, as circuit-tracer zeroes them."""
        x = x.float()
        codes = self.sae.encode(x)
        values = codes.values.float().clone()
        values[:zero_positions] = 0
        codes = Codes(values.to(codes.values.dtype), codes.indices)
        reconstruction = self.sae.output(codes, x).float()
        rows, slots = (values > 0).nonzero(as_tuple=True)
        features = codes.indices[rows, slots]
        order = torch.argsort(rows * self.sae.cfg.d_sae + features)
        rows, features = rows[order], features[order]
        acts = values[rows, slots[order]]
        decoder = self.sae.output_delta(acts[:, None] * self.sae.W_dec[features].float(), x[rows]).float()
        return LayerCodes(rows, features, acts, self.sae.W_enc[features].float(), decoder, reconstruction)


def _as_transcoder(item, layer: int) -> Transcoder:
    """A LoadedSAE / Evaluated-like object (sae, site, output_site, transcoder) or a Transcoder."""
    if isinstance(item, Transcoder):
        return item
    sae = getattr(item, "sae", None)
    if not isinstance(sae, SparseAutoencoder):
        raise AtlasError(f"layer {layer}: {type(item).__name__} is not an SAE", "pass loaded transcoders (trainer.formats.load_sae)")
    output_site = getattr(item, "output_site", None)
    if not output_site or getattr(item, "transcoder", True) is False:
        raise AtlasError(f"layer {layer}: the SAE on {getattr(item, 'site', '?')} is not a transcoder "
                         "(it reconstructs its own site)", "attribution graphs need transcoders mlp_in.L -> mlp_out.L")
    return Transcoder(sae, str(item.site), str(output_site))


class TranscoderSet:
    """Transcoders for every block 0..n_layers-1 of one model (circuit-tracer requires the same)."""

    def __init__(self, transcoders: Mapping[int, object] | Sequence[object], n_layers: int, d_model: int):
        items = dict(transcoders) if isinstance(transcoders, Mapping) else dict(enumerate(transcoders))
        layers: dict[int, Transcoder] = {}
        for layer, item in items.items():
            tc = _as_transcoder(item, int(layer))
            site, out = parse_site(tc.site), parse_site(tc.output_site)
            if (site.kind, out.kind) != ("mlp_in", "mlp_out") or site.layer != out.layer:
                raise AtlasError(f"the transcoder given for layer {layer} maps {tc.site} -> {tc.output_site}",
                                 "attribution graphs need transcoders mlp_in.L -> mlp_out.L")
            if site.layer != int(layer):
                raise AtlasError(f"the transcoder given for layer {layer} reads {tc.site}", "key each transcoder by its own block")
            if tc.sae.cfg.d_in != d_model:
                raise AtlasError(f"the transcoder for layer {layer} reads width {tc.sae.cfg.d_in}, the model's is {d_model}",
                                 "use transcoders trained on this model")
            norm = getattr(tc.sae.io, "input_norm", "none")
            if norm != "none":
                raise AtlasError(f"the transcoder for layer {layer} normalises its input at run time ({norm})",
                                 "attribution needs an encoder that is affine in the input")
            layers[int(layer)] = tc
        missing = [layer for layer in range(n_layers) if layer not in layers]
        extra = sorted(layer for layer in layers if not 0 <= layer < n_layers)
        if missing or extra:
            what = f"lacks layers {missing}" if missing else f"has layers {extra} the model does not"
            raise AtlasError(f"the transcoder set {what} (the model has blocks 0..{n_layers - 1})",
                             "a replacement model needs one transcoder per block")
        self.layers = [layers[layer] for layer in range(n_layers)]

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer: int) -> Transcoder:
        return self.layers[layer]

    def __iter__(self):
        return iter(self.layers)
