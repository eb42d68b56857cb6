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

The thresholds are their own float32 parameter group (jumprelu_threshold_lr_scale multiplies their
learning rate; 0 freezes them), whatever the compute dtype: Adam's steps of about one learning rate
round away on a bfloat16 threshold (SAELens #718/#728). Two options aim at recovering the true
features of the synthetic grid (benchmarks/synthetic_recovery.py; numbers in BENCHMARKS.md):
jumprelu_topk_warmup trains the first part of the run with TopK's per-token selection and then sets
each threshold so that its latent fires as often as TopK chose it (calibrate_thresholds), and
jumprelu_l0_per_token puts the target-L0 penalty on every token's L0 (Gemma Scope 2's quadratic form).
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
        """The penalty from per-token L0 [N] (with the STE's pseudo-gradient to the thresholds)."""
        if self.cfg.l0_coefficient is not None:
            return self.cfg.l0_coefficient * l0.mean()
        if self.cfg.jumprelu_l0_per_token:
            return self.cfg.target_l0_coefficient * (l0 / self.cfg.k - 1).pow(2).mean()
        return self.cfg.target_l0_coefficient * (l0.mean() / self.cfg.k - 1).pow(2)

    def param_groups(self) -> list[dict]:
        rest = [p for name, p in self.named_parameters() if name != "threshold"]
        return [{"params": rest, "lr_scale": 1.0},
                {"params": [self.threshold], "lr_scale": self.cfg.jumprelu_threshold_lr_scale}]

    def warmup_steps(self, total_steps: int) -> int:
        return int(round(self.cfg.jumprelu_topk_warmup * total_steps))

    def training_step(self, x: torch.Tensor, ctx: StepContext) -> StepOutput:
        z = self.preacts(x)
        warm = self.warmup_steps(ctx.total_steps)
        if ctx.step < warm:
            return self.topk_step(x, z, ctx)
        if ctx.step == warm and warm > 0:
            self.calibrate_thresholds(z)
        eps = self.cfg.jumprelu_bandwidth
        f = JumpReLUFn.apply(z, self.threshold, eps)
        x_hat = self.finish(f @ self.W_dec + self.b_dec, x)
        recon = self.recon_loss(x, x_hat, ctx)
        l0 = StepFn.apply(z, self.threshold, eps).sum(-1)
        penalty = self.sparsity_penalty(l0)
        # A latent whose threshold rose above all its pre-activations gets no gradient from either
        # term again; AuxK (as in the TopK family) lets the dead ones model the residual and return.
        aux, aux_terms = self.auxk_loss(x, x_hat, z.detach(), self.encoder_input(x), ctx)
        return StepOutput(recon + penalty + aux, x_hat, dense_to_codes(f.detach()),
                          {"recon": float(recon.detach()), "l0_penalty": float(penalty.detach()), **aux_terms})

    def topk_mask(self, z: torch.Tensor) -> torch.Tensor:
        """[N, F] 0/1: the k largest positive pre-activations of each token (a TopK SAE's selection)."""
        with torch.no_grad():
            mask = torch.zeros_like(z).scatter_(1, z.topk(self.cfg.k, dim=-1).indices, 1.0)
            return mask * (z > 0)

    def topk_step(self, x: torch.Tensor, z: torch.Tensor, ctx: StepContext) -> StepOutput:
        """A warm-up step trained as a TopK SAE (the thresholds get no gradient)."""
        f = z * self.topk_mask(z)
        x_hat = self.finish(f @ self.W_dec + self.b_dec, x)
        recon = self.recon_loss(x, x_hat, ctx)
        aux, aux_terms = self.auxk_loss(x, x_hat, z.detach(), self.encoder_input(x), ctx)
        return StepOutput(recon + aux, x_hat, dense_to_codes(f.detach()), {"recon": float(recon.detach()), **aux_terms})

    @torch.no_grad()
    def calibrate_thresholds(self, z: torch.Tensor) -> None:
        """At the end of the TopK warm-up: each latent's threshold such that, on this batch, it fires
        on as many tokens as TopK selected it for (between its n-th and (n+1)-th largest
        pre-activation); a latent TopK never selected keeps the batch-wide k-th value."""
        z = z.detach().float()
        counts = self.topk_mask(z).sum(0).long()  # [F]
        _, _, _, kth = batch_topk_flat(z, self.cfg.k)
        ordered = z.sort(dim=0, descending=True).values  # [N, F]
        n = z.shape[0]
        cols = torch.arange(z.shape[1], device=z.device)
        above = ordered[(counts - 1).clamp(0, n - 1), cols]
        below = ordered[counts.clamp(0, n - 1), cols]
        theta = torch.where(counts > 0, (above + below) / 2, torch.full_like(above, float(kth)))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(theta)  # every rank calibrated on its own batch: one mean for all
            theta /= torch.distributed.get_world_size()
        self.threshold.copy_(theta.clamp_min(1e-6).to(self.threshold))

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
