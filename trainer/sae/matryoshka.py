"""Matryoshka BatchTopK SAE: every prefix of the dictionary must reconstruct x on its own.

The loss averages the reconstruction error of the nested dictionaries [0, m_1) ⊂ [0, m_2) ⊂ …
⊂ [0, d_sae); early latents learn general features and later ones refinements, which reduces
feature absorption. Selection and inference are BatchTopK's; with matryoshka_topk_warmup the first
part of the run selects as TopK does, the k largest pre-activations of each token (inference keeps
BatchTopK's global threshold, an EMA of the batch's k x N-th largest pre-activation, so the L0 at
inference is about k either way).
"""

from __future__ import annotations

import torch

from trainer.sae.base import SelectedPreacts, StepContext
from trainer.sae.batchtopk import BatchTopKSAE, batch_topk_flat


class MatryoshkaSAE(BatchTopKSAE):
    architecture = "matryoshka"

    def reconstruction(self, x, x_hat, acts, indices, offsets, ctx: StepContext):
        losses = []
        for m in self.cfg.matryoshka_prefixes:
            if m >= self.cfg.d_sae:
                losses.append(self.recon_loss(x, x_hat, ctx))
            else:
                partial = self.finish(self.decode_sparse(acts * (indices < m), indices, offsets=offsets), x)
                losses.append(self.recon_loss(x, partial, ctx))
        loss = torch.stack(losses).mean()
        return loss, {"recon": float(losses[-1].detach()), "recon_smallest_prefix": float(losses[0].detach())}

    def select_batch(self, x: torch.Tensor, ctx: StepContext | None = None):
        if ctx is None or ctx.step >= round(self.cfg.matryoshka_topk_warmup * ctx.total_steps):
            return super().select_batch(x, ctx)
        x_c = self.encoder_input(x)
        with torch.no_grad():
            z = self.preacts(x)
            values, indices = z.topk(self.cfg.k, dim=-1, sorted=False)
            keep = values > 0
            rows, pos = keep.nonzero(as_tuple=True)
            counts = keep.sum(-1)
            offsets = counts.cumsum(0) - counts
            values, indices = values[rows, pos], indices[rows, pos]
            self._last_kth = batch_topk_flat(z, self.cfg.k)[3]
        pre = SelectedPreacts.apply(x_c, self.W_enc, self.b_enc, indices, values, offsets)
        return torch.relu(pre), indices, offsets, z, x_c
