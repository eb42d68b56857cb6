"""A trained transcoder in the form every saved transcoder has.

In training, a transcoder reads x_s = c_x x (its input site, scaled so the mean norm is sqrt(D))
and predicts y_s = c_y y (its output site, scaled alike):

    z = W_enc x_s + b_enc            (no b_dec: sparsify's SparseCoder.encode with transcode)
    y_s_hat = W_dec f(z) + b_dec [+ W_skip x_s]

Readers of saved SAEs (trainer.formats, Evaluated, analysis, steering, export) take the standard
form z = W'(x - b_dec') + b_enc' on raw x with a raw prediction y_hat = W_dec' f + b_dec' [+ W_skip' x].
Equating the two for every raw x:

    W' = c_x W_enc,   b_dec' = b_dec / c_y,   b_enc' = b_enc + W' b_dec',
    W_dec' = W_dec / c_y,   W_skip' = W_skip c_x / c_y,

and z, hence every latent, its activation and every threshold, is unchanged.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from trainer.formats.common import SiteIO
from trainer.sae import SparseAutoencoder, build_sae


@torch.no_grad()
def finished_transcoder(sae: SparseAutoencoder, in_scale: float, out_scale: float) -> SparseAutoencoder:
    """The standard-form, raw-units copy of a transcoder trained with cfg.transcode (see the module
    docstring); in eval mode, without gradients, on the SAE's device."""
    if not sae.cfg.transcode:
        raise ValueError("finished_transcoder takes a transcoder in its training form (cfg.transcode)")
    c_x, c_y = float(in_scale), float(out_scale)
    out = build_sae(replace(sae.cfg, transcode=False, skip_connection=False)).to(sae.W_enc.device)
    out.load_state_dict({k: v for k, v in sae.state_dict().items() if not k.startswith("io.")})
    w_enc = sae.W_enc.double() * c_x
    b_dec = sae.b_dec.double() / c_y
    out.W_enc.copy_(w_enc)
    out.b_dec.copy_(b_dec)
    out.b_enc.copy_(sae.b_enc.double() + w_enc @ b_dec)
    out.W_dec.copy_(sae.W_dec.double() / c_y)
    if sae.io is not None:
        out.io = SiteIO(w_skip=sae.io.W_skip.detach().double() * (c_x / c_y)).to(sae.W_enc.device)
    return out.eval().requires_grad_(False)
