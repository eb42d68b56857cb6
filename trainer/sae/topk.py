"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations per token, with AuxK."""

from __future__ import annotations

import torch

from trainer.sae.base import Codes, SparseAutoencoder, StepContext, StepOutput


class TopKSAE(SparseAutoencoder):
    architecture = "topk"
    sparse_training = True

    def _select(self, z: torch.Tensor):
        values, indices = z.topk(self.cfg.k, dim=-1, sorted=False)
        return values, indices, (values > 0).to(z.dtype)

    def activation(self, z: torch.Tensor) -> torch.Tensor:
        return self.encode_from_preacts(z).dense(self.cfg.d_sae)

    def encode_from_preacts(self, z: torch.Tensor) -> Codes:
        values, indices = z.topk(self.cfg.k, dim=-1, sorted=False)
        return Codes(values.clamp_min(0), indices)

    def encode(self, x: torch.Tensor) -> Codes:
        return self.encode_from_preacts(self.preacts(x))

    def initial_selection(self, x: torch.Tensor) -> torch.Tensor:
        codes = self.encode(x)
        return self.decode_sparse(codes.values, codes.indices, bias=False)

    def training_step(self, x: torch.Tensor, ctx: StepContext) -> StepOutput:
        acts, indices, z, x_c = self.select_train(x, self._select)
        x_hat = self.finish(self.decode_sparse(acts, indices), x)
        recon = self.recon_loss(x, x_hat, ctx)
        aux, aux_terms = self.auxk_loss(x, x_hat, z, x_c, ctx)
        codes = Codes(acts.detach(), indices)
        return StepOutput(recon + aux, x_hat, codes, {"recon": float(recon.detach()), **aux_terms})
