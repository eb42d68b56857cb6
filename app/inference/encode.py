"""One shared forward pass for many texts, then every SAE the batch needs, as the analysis does it.

Texts are right-padded into one batch: the model is causal, so padding after a text never
changes that text's activations, and positions stay 0..T-1 as in the analysis. The pass hooks
every site that the batch's SAEs read and stops after the deepest block (LoadedLM.read). Each
text is masked by the analysis's own rule (valid_token_mask: BOS, and attention sinks by the norm
ratio the analysis used; causal, so neither the padding nor the other texts change it, and a text
that starts like an analysed context is masked as that context was), and the SAE encodes the kept
tokens in float32 exactly as `sae-atlas analyze` does, so the shown activation f_i * ||W_dec,i||
matches the stored examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from app.inference.registry import ModelHandle, SAEHandle
from trainer.activations import valid_token_mask


@dataclass
class TextCodes:
    """One text's sparse codes under one SAE: row j of values/indices belongs to token positions[j]."""

    length: int
    positions: torch.Tensor  # [n] long: kept token positions
    values: torch.Tensor  # [n, k] float32: shown activations (f * ||W_dec||)
    indices: torch.Tensor  # [n, k] long
    masked: torch.Tensor  # [length] bool: BOS and sinks

    def latent_per_token(self, latent: int) -> torch.Tensor:
        """[length] activation of one latent on every token (0 on masked tokens)."""
        out = torch.zeros(self.length, dtype=torch.float32, device=self.values.device)
        hit = (self.indices == latent)
        out[self.positions] = (self.values * hit).sum(-1)
        return out

    def pooled_max(self, d_sae: int, select: torch.Tensor | None = None) -> torch.Tensor:
        """[d_sae] max activation of every latent over the kept tokens (or those in `select`, a [length] bool)."""
        values, indices = self.values, self.indices
        if select is not None:
            keep = select[self.positions]
            values, indices = values[keep], indices[keep]
        out = torch.zeros(d_sae, dtype=torch.float32, device=values.device)
        if values.numel():
            out.scatter_reduce_(0, indices.reshape(-1), values.reshape(-1), reduce="amax")
        return out


@torch.inference_mode()
def encode_texts(model: ModelHandle, texts: list[list[int]], needs: list[list[SAEHandle]]) -> list[dict[tuple, TextCodes]]:
    """texts[b] (BOS first) under every SAE in needs[b]; one forward pass for the whole batch."""
    lm = model.lm
    lengths = [len(t) for t in texts]
    T = max(lengths)
    ids = torch.full((len(texts), T), lm.separator_token_id, dtype=torch.long)
    for b, t in enumerate(texts):
        ids[b, :len(t)] = torch.as_tensor(t, dtype=torch.long)
    saes: dict[tuple, SAEHandle] = {}
    for group in needs:
        for s in group:
            saes.setdefault(s.meta.key, s)
    sites = list({s.site.name: s.site for s in saes.values()}.values())
    acts = lm.read(ids, sites)
    out: list[dict[tuple, TextCodes]] = [{} for _ in texts]
    for key, sae in saes.items():
        site_acts = acts[sae.site.name]
        rows = [b for b, group in enumerate(needs) if any(s.meta.key == key for s in group)]
        masks = valid_token_mask(site_acts[rows], sae.meta.sink_norm_ratio, sae.meta.exclude_bos)
        kept = [m[:lengths[b]] for b, m in zip(rows, masks)]
        xs = [site_acts[b, :lengths[b]][m] for b, m in zip(rows, kept)]
        x = torch.cat(xs).float().to(sae.dec_norm.device)
        codes = sae.sae.encode(x)
        shown = sae.shown(codes.values, codes.indices)
        start = 0
        for b, mask in zip(rows, kept):
            n = int(mask.sum())
            out[b][key] = TextCodes(lengths[b], torch.nonzero(mask)[:, 0].to(shown.device), shown[start:start + n],
                                    codes.indices[start:start + n], ~mask.to(shown.device))
            start += n
    return out
