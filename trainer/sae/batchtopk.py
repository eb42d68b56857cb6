"""BatchTopK SAE (Bussmann et al. 2024): keep the k*B largest activations of the whole batch.

At inference a single global threshold (an EMA of the smallest kept activation) replaces the
batch selection, so the SAE behaves as a JumpReLU with one threshold for every latent.

Training keeps the selection flat (a varying number of latents per token, see SelectedPreacts):
early in training a few tokens hold many times k latents, and padding every token to that count
made the sparse backward pass several times slower than TopK's.
"""

from __future__ import annotations

import torch

from trainer.sae.base import (
    Codes,
    SAEConfig,
    SelectedPreacts,
    SparseAutoencoder,
    StepContext,
    StepOutput,
)


def batch_topk_flat(z: torch.Tensor, k: int, per_row: int = 4):
    """Select the k * N largest positive entries of z [N, F].

    Returns (values [M], indices [M], offsets [N], kth): token n owns entries offsets[n] to
    offsets[n+1] (row-major), M = k * N unless there are fewer positive entries (or ties), and kth
    is the smallest kept value. Fast path: only each row's top (per_row * k) can be among the
    batch's top k * N unless a row holds more than that many; when one does, fall back to the exact
    selection over all of z.
    """
    n, width = z.shape
    z = z.clamp_min(0)
    target = k * n
    m = min(width, per_row * k)
    values, indices = z.topk(m, dim=-1, sorted=False)
    kth = values.reshape(-1).topk(min(target, values.numel()), sorted=False).values.min()
    if m < width and bool((values.min(dim=-1).values >= kth).any()):
        values, indices = z, None
        kth = z.reshape(-1).topk(min(target, z.numel()), sorted=False).values.min()
    keep = (values >= kth) & (values > 0)
    rows, pos = keep.nonzero(as_tuple=True)  # row-major, so each token's entries are contiguous
    counts = keep.sum(-1)
    offsets = counts.cumsum(0) - counts
    cols = pos if indices is None else indices[rows, pos]
    return values[rows, pos], cols, offsets, kth


def flat_to_codes(values: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor) -> Codes:
    """Flat per-token selections to padded Codes (padding: index 0 with value 0)."""
    n, m = offsets.shape[0], values.shape[0]
    counts = torch.diff(offsets, append=offsets.new_tensor([m]))
    width = max(int(counts.max()) if n else 1, 1)
    rows = torch.repeat_interleave(torch.arange(n, device=values.device), counts)
    pos = torch.arange(m, device=values.device) - offsets[rows]
    v = values.new_zeros(n, width)
    i = indices.new_zeros(n, width)
    v[rows, pos] = values
    i[rows, pos] = indices
    return Codes(v, i)


class BatchTopKSAE(SparseAutoencoder):
    architecture = "batchtopk"
    sparse_training = True

    def __init__(self, cfg: SAEConfig, compute_dtype: torch.dtype = torch.float32):
        super().__init__(cfg, compute_dtype)
        self.register_buffer("threshold", torch.zeros(()))
        self._last_kth: torch.Tensor | None = None

    def activation(self, z: torch.Tensor) -> torch.Tensor:
        return z * (z > self.threshold)

    def training_step(self, x: torch.Tensor, ctx: StepContext) -> StepOutput:
        acts, indices, offsets, z, x_c = self.select_batch(x, ctx)
        x_hat = self.finish(self.decode_sparse(acts, indices, offsets=offsets), x)
        loss, terms = self.reconstruction(x, x_hat, acts, indices, offsets, ctx)
        aux, aux_terms = self.auxk_loss(x, x_hat, z, x_c, ctx)
        codes = flat_to_codes(acts.detach(), indices, offsets)
        return StepOutput(loss + aux, x_hat, codes, {**terms, **aux_terms})

    def select_batch(self, x: torch.Tensor, ctx: StepContext | None = None):
        """The batch selection with gradients on the kept pre-activations: (acts, indices, offsets, z, x_c)."""
        x_c = self.encoder_input(x)
        with torch.no_grad():
            z = self.preacts(x)
            values, indices, offsets, kth = batch_topk_flat(z, self.cfg.k)
        self._last_kth = kth
        pre = SelectedPreacts.apply(x_c, self.W_enc, self.b_enc, indices, values, offsets)
        return torch.relu(pre), indices, offsets, z, x_c

    def initial_selection(self, x: torch.Tensor) -> torch.Tensor:
        values, indices, offsets, _ = batch_topk_flat(self.preacts(x), self.cfg.k)
        return self.decode_sparse(values, indices, bias=False, offsets=offsets)

    def reconstruction(self, x, x_hat, acts, indices, offsets, ctx: StepContext):
        recon = self.recon_loss(x, x_hat, ctx)
        return recon, {"recon": float(recon.detach())}

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        super().after_step(ctx)
        if self._last_kth is not None:
            kth = self._last_kth.to(self.threshold)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(kth)
                kth /= torch.distributed.get_world_size()
            # An EMA over ~100 steps would still remember the first steps' selections at the end of a
            # short run (inference L0 7.3 for k = 5 after 122 steps): its horizon is at most a tenth
            # of the run.
            m = min(self.cfg.threshold_momentum, 1 - 10 / max(ctx.total_steps, 20)) if ctx.step > 0 else 0.0
            self.threshold.mul_(m).add_((1 - m) * kth)

    def inference_threshold(self) -> torch.Tensor:
        return self.threshold.expand(self.cfg.d_sae).clone()
