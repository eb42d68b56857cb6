"""ReLU SAE with a decoder-norm-weighted L1 penalty (Anthropic, April 2024 update).

No decoder norm constraint: the penalty lambda * sum_i f_i ||W_dec,i|| makes the scale of each
latent irrelevant, and lambda warms up linearly over the first l1_warmup_frac of the steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.sae.base import SparseAutoencoder, StepContext, StepOutput, dense_to_codes


class ReLUSAE(SparseAutoencoder):
    architecture = "relu"
    unit_norm_decoder = False

    def initial_decoder_norm(self) -> float:
        return 0.1

    def activation(self, z: torch.Tensor) -> torch.Tensor:
        return F.relu(z)

    def l1_lambda(self, ctx: StepContext) -> float:
        warmup = max(1, int(self.cfg.l1_warmup_frac * ctx.total_steps))
        return self.cfg.l1_coefficient * min(1.0, (ctx.step + 1) / warmup)

    def training_step(self, x: torch.Tensor, ctx: StepContext) -> StepOutput:
        f = F.relu(self.preacts(x))
        x_hat = self.finish(f @ self.W_dec + self.b_dec, x)
        recon = self.recon_loss(x, x_hat, ctx)
        # The penalty is measured in the same units as recon: per token, relative to the variance.
        l1 = (f * self.W_dec.norm(dim=1)).sum(-1).mean() / ctx.variance ** 0.5
        lam = self.l1_lambda(ctx)
        return StepOutput(recon + lam * l1, x_hat, dense_to_codes(f.detach()),
                          {"recon": float(recon.detach()), "l1": float(l1.detach()), "l1_lambda": lam})
