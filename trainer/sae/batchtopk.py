"""BatchTopK SAE (Bussmann et al. 2024): keep the k*B largest activations of the whole batch.

At inference a single global threshold (an EMA of the smallest kept activation) replaces the
batch selection, so the SAE behaves as a JumpReLU with one threshold for every latent.
"""

from __future__ import annotations

import torch

from trainer.sae.base import Codes, SAEConfig, SparseAutoencoder, StepContext, StepOutput


def batch_topk_select(z: torch.Tensor, k: int, per_row: int = 4):
    """Select the k * N largest positive entries of z [N, F], padded per token.

    Fast path: only each row's top (per_row * k) can be among the batch's top k * N unless a row
    holds more than that many; when one does, fall back to the exact selection over all of z.
    """
    n, width = z.shape
    z = z.clamp_min(0)
    m = min(width, per_row * k)
    values, indices = z.topk(m, dim=-1, sorted=False)
    kth = values.reshape(-1).topk(min(k * n, values.numel()), sorted=False).values.min()
    if m < width and bool((values.min(dim=-1).values >= kth).any()):
        values, indices = z.topk(width, dim=-1, sorted=False)
        kth = values.reshape(-1).topk(min(k * n, values.numel()), sorted=False).values.min()
    keep = (values >= kth) & (values > 0)
    most = max(int(keep.sum(-1).max().item()), 1)
    if most < values.shape[1]:
        values, order = (values * keep).topk(most, dim=-1, sorted=False)
        indices = indices.gather(1, order)
        keep = values > 0
    values = values * keep
    return values, indices, keep.to(z.dtype), kth


class BatchTopKSAE(SparseAutoencoder):
    architecture = "batchtopk"
    sparse_training = True

    def __init__(self, cfg: SAEConfig, compute_dtype: torch.dtype = torch.float32):
        super().__init__(cfg, compute_dtype)
        self.register_buffer("threshold", torch.zeros(()))
        self._last_kth: torch.Tensor | None = None

    def _select(self, z: torch.Tensor):
        values, indices, mask, kth = batch_topk_select(z, self.cfg.k)
        self._last_kth = kth
        return values, indices, mask

    def activation(self, z: torch.Tensor) -> torch.Tensor:
        return z * (z > self.threshold)

    def training_step(self, x: torch.Tensor, ctx: StepContext) -> StepOutput:
        acts, indices, z, x_c = self.select_train(x, self._select)
        x_hat = self.decode_sparse(acts, indices)
        loss, terms = self.reconstruction(x, x_hat, acts, indices, ctx)
        aux, aux_terms = self.auxk_loss(x, x_hat, z, x_c, ctx)
        return StepOutput(loss + aux, x_hat, Codes(acts.detach(), indices), {**terms, **aux_terms})

    def reconstruction(self, x, x_hat, acts, indices, ctx: StepContext):
        recon = self.recon_loss(x, x_hat, ctx)
        return recon, {"recon": float(recon)}

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        super().after_step(ctx)
        if self._last_kth is not None:
            kth = self._last_kth.to(self.threshold)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(kth)
                kth /= torch.distributed.get_world_size()
            m = self.cfg.threshold_momentum if ctx.step > 0 else 0.0
            self.threshold.mul_(m).add_((1 - m) * kth)

    def inference_threshold(self) -> torch.Tensor:
        return self.threshold.expand(self.cfg.d_sae).clone()
