"""JumpReLU SAE (Rajamanoharan et al. 2024, Gemma Scope): f_i = z_i * H(z_i - theta_i).

theta is learned through a straight-through estimator with a rectangle kernel of bandwidth eps:
  d f_i / d theta_i = -(theta_i / eps) K((z_i - theta_i) / eps),  d L0 / d theta_i = -(1/eps) K(...)
and no pseudo-gradient to z from the L0 term. theta is a plain parameter (not log theta) and
eps = 0.05: with the log parameterisation and eps = 0.001 the thresholds barely move under Adam and
L0 does not fall.

Sparsity: by default L0 is aimed at k with the penalty c * (L0 / k - 1)^2 (the target-L0 form of
Marks et al.'s dictionary_learning JumpReLU trainer), so a JumpReLU SAE trained with the defaults
has the L0 a TopK SAE with the same k has; with l0_coefficient set it is Gemma Scope's lambda * L0.
Both are in units of the input variance, like the reconstruction loss.

Dead latents: a latent whose threshold is above all its pre-activations gets no gradient from
the reconstruction or the penalty, so JumpReLU uses the TopK family's AuxK loss to revive it.

Initialisation: a threshold moves about one learning rate per Adam step, while the pre-activations
of normalised inputs are O(1); from theta_0 = 0.01 a short run spends most of its budget raising
thresholds through a dense code. So unless jumprelu_init_threshold is given, the thresholds start
where a BatchTopK SAE with this k would on the first batch (see initialise_from).
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
        theta0 = cfg.jumprelu_init_threshold if cfg.jumprelu_init_threshold is not None else 0.01
        self.threshold = torch.nn.Parameter(torch.full((cfg.d_sae,), float(theta0)))

    def activation(self, z: torch.Tensor) -> torch.Tensor:
        return z * (z > self.threshold)

    def sparsity_penalty(self, l0: torch.Tensor) -> torch.Tensor:
        if self.cfg.l0_coefficient is not None:
            return self.cfg.l0_coefficient * l0
        return self.cfg.target_l0_coefficient * (l0 / self.cfg.k - 1).pow(2)

    def training_step(self, x: torch.Tensor, ctx: StepContext) -> StepOutput:
        z = self.preacts(x)
        eps = self.cfg.jumprelu_bandwidth
        f = JumpReLUFn.apply(z, self.threshold, eps)
        x_hat = self.finish(f @ self.W_dec + self.b_dec, x)
        recon = self.recon_loss(x, x_hat, ctx)
        l0 = StepFn.apply(z, self.threshold, eps).sum(-1).mean()
        penalty = self.sparsity_penalty(l0)
        # A latent whose threshold rose above all its pre-activations gets no gradient from either
        # term again; AuxK (as in the TopK family) lets the dead ones model the residual and return.
        aux, aux_terms = self.auxk_loss(x, x_hat, z.detach(), self.encoder_input(x), ctx)
        return StepOutput(recon + penalty + aux, x_hat, dense_to_codes(f.detach()),
                          {"recon": float(recon.detach()), "l0_penalty": float(penalty.detach()), **aux_terms})

    def initial_selection(self, x: torch.Tensor) -> torch.Tensor:
        values, indices, offsets, _ = batch_topk_flat(self.preacts(x), self.cfg.k)
        return self.decode_sparse(values, indices, bias=False, offsets=offsets)

    @torch.no_grad()
    def initialise_from(self, sample: torch.Tensor, target: torch.Tensor | None = None) -> None:
        """b_dec at the geometric median; then, unless jumprelu_init_threshold is given, start as a
        BatchTopK SAE with this k would: encoder scale fitted to the first batch and every threshold
        at the smallest pre-activation that batch selection keeps. Leaving the penalty only the
        per-latent adjustment to make is our initialisation, not the Gemma Scope recipe
        (theta_0 = 0.001, b_enc = 0, long runs); a given jumprelu_init_threshold restores that."""
        super().initialise_from(sample, target)
        if self.cfg.jumprelu_init_threshold is not None:
            return
        sample = sample[:4096].float()
        if not self.cfg.transcode:  # a transcoder's decoder starts at zero: there is no scale to fit
            self.fit_encoder_scale(sample)
        _, _, _, kth = batch_topk_flat(self.preacts(sample), self.cfg.k)
        if float(kth) > 0:
            self.threshold.fill_(float(kth))

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        super().after_step(ctx)
        self.threshold.clamp_(min=1e-6)  # a threshold at or below 0 would make the latent plain ReLU

    def inference_threshold(self) -> torch.Tensor:
        return self.threshold.detach().clone()
