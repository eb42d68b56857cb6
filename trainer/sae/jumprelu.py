"""JumpReLU SAE (Rajamanoharan et al. 2024, Gemma Scope): f_i = z_i * H(z_i - theta_i).

theta is learned through a straight-through estimator with a rectangle kernel of bandwidth eps:
  d f_i / d theta_i = -(theta_i / eps) K((z_i - theta_i) / eps),  d L0 / d theta_i = -(1/eps) K(...)
and no pseudo-gradient to z from the L0 term. theta is a plain parameter (not log theta) and
eps = 0.05: with the log parameterisation and eps = 0.001 the thresholds barely move under Adam and
L0 does not fall. Even parameterised directly a threshold moves about one learning rate per step,
so by default the thresholds start where a BatchTopK SAE with k = jumprelu_init_l0 (default: k)
would put its threshold on the first batch instead of at theta_0 = 0.01 (see initialise_from).
The L0 penalty is in units of the input variance, like the reconstruction loss.
"""

from __future__ import annotations

import torch

from trainer.sae.base import SAEConfig, SparseAutoencoder, StepContext, StepOutput, dense_to_codes
from trainer.sae.batchtopk import batch_topk_flat


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class JumpReLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta, eps: float):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_z = grad * (z > theta)
        grad_theta = (grad * -(theta / eps) * _rectangle((z - theta) / eps)).sum(0)
        return grad_z, grad_theta, None


class StepFn(torch.autograd.Function):
    """H(z - theta), whose pseudo-gradient goes to theta only."""

    @staticmethod
    def forward(ctx, z, theta, eps: float):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        grad_theta = (grad * -(1.0 / ctx.eps) * _rectangle((z - theta) / ctx.eps)).sum(0)
        return torch.zeros_like(z), grad_theta, None


class JumpReLUSAE(SparseAutoencoder):
    architecture = "jumprelu"

    def __init__(self, cfg: SAEConfig, compute_dtype: torch.dtype = torch.float32):
        super().__init__(cfg, compute_dtype)
        self.threshold = torch.nn.Parameter(torch.full((cfg.d_sae,), float(cfg.jumprelu_init_threshold)))

    def activation(self, z: torch.Tensor) -> torch.Tensor:
        return z * (z > self.threshold)

    def training_step(self, x: torch.Tensor, ctx: StepContext) -> StepOutput:
        z = self.preacts(x)
        eps = self.cfg.jumprelu_bandwidth
        f = JumpReLUFn.apply(z, self.threshold, eps)
        x_hat = f @ self.W_dec + self.b_dec
        recon = self.recon_loss(x, x_hat, ctx)
        l0 = StepFn.apply(z, self.threshold, eps).sum(-1).mean()
        loss = recon + self.cfg.l0_coefficient * l0
        return StepOutput(loss, x_hat, dense_to_codes(f.detach()), {"recon": float(recon.detach()), "l0_penalty": float(l0.detach())})

    def init_l0(self) -> int:
        target = self.cfg.jumprelu_init_l0 if self.cfg.jumprelu_init_l0 is not None else self.cfg.k
        return int(min(max(target, 0), self.cfg.d_sae - 1))

    def initial_selection(self, x: torch.Tensor) -> torch.Tensor:
        values, indices, offsets, _ = batch_topk_flat(self.preacts(x), self.init_l0())
        return self.decode_sparse(values, indices, bias=False, offsets=offsets)

    @torch.no_grad()
    def initialise_from(self, sample: torch.Tensor) -> None:
        """b_dec at the geometric median; then, unless jumprelu_init_l0 is 0, start as the BatchTopK
        SAE with k = jumprelu_init_l0 would: encoder scale fitted to the first batch and every
        threshold at the smallest pre-activation that batch selection keeps.

        Why: thresholds move by about one learning rate per Adam step, while the pre-activations
        of normalised inputs are O(1). From theta_0 = 0.01 a run of a few thousand steps spends most
        of its budget raising thresholds through a dense code (L0 in the hundreds on LM
        activations after 400 steps). Starting at a sensible L0 leaves the L0 penalty only the
        per-latent adjustment to make. This is our initialisation, not the Gemma Scope recipe
        (theta_0 = 0.001, b_enc = 0, long runs); jumprelu_init_l0 = 0 restores theta_0.
        """
        super().initialise_from(sample)
        target = self.init_l0()
        if target <= 0:
            return
        sample = sample[:4096].float()
        self.fit_encoder_scale(sample)
        _, _, _, kth = batch_topk_flat(self.preacts(sample), target)
        if float(kth) > 0:
            self.threshold.fill_(float(kth))

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        super().after_step(ctx)
        self.threshold.clamp_(min=1e-6)  # a threshold at or below 0 would make the latent plain ReLU

    def inference_threshold(self) -> torch.Tensor:
        return self.threshold.detach().clone()
