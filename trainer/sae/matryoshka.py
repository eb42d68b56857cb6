"""Matryoshka BatchTopK SAE: every prefix of the dictionary must reconstruct x on its own.

The loss averages the reconstruction error of the nested dictionaries [0, m_1) ⊂ [0, m_2) ⊂ …
⊂ [0, d_sae); early latents learn general features and later ones refinements, which reduces
feature absorption. Selection and inference are BatchTopK's.
"""

from __future__ import annotations

import torch

from trainer.sae.base import StepContext
from trainer.sae.batchtopk import BatchTopKSAE


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
