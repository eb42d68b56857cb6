"""Held-out evaluation: reconstruction metrics and the spliced-in LM loss.

- MSE (per token, summed over dimensions), FVU = sum||x - x_hat||^2 / sum||x - mean||^2 with the
  held-out mean, and explained variance = 1 - FVU;
- L0, the mean number of active latents per token;
- dense fraction: latents active on more than 10% of held-out tokens; dead fraction: latents that
  did not fire on any held-out token (training also reports its own window-based count);
- CE recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean) and delta LM loss = CE_sae - CE_clean,
  from running the LM with the site's activations replaced by the reconstruction (or by zeros)
  at every position the SAE is trained on (BOS and attention-sink positions keep their values).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.activations import valid_token_mask
from trainer.sae.base import SparseAutoencoder


@dataclass
class Evaluated:
    """An SAE together with what it needs to read raw activations of its site.

    A transcoder (output_site set) reads `site` and predicts `output_site`: its prediction is
    compared with, and spliced into, the output site, never its own input."""

    sae: SparseAutoencoder
    site: str
    norm_scale: float = 1.0  # multiply raw activations by this before encoding
    output_site: str | None = None

    @property
    def target_site(self) -> str:
        return self.output_site or self.site

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction in raw units, codes) for raw activations x [n, D] of the site."""
        xs = x.float() * self.norm_scale
        codes = self.sae.encode(xs)
        return self.sae.output(codes, xs) / self.norm_scale, codes


@torch.no_grad()
def reconstruction_metrics(model: Evaluated, x: torch.Tensor, batch_size: int = 4096,
                           target: torch.Tensor | None = None) -> dict[str, float]:
    """Metrics over held-out activations x [n, D] (raw units) of the site. A transcoder's
    prediction is scored against `target`, the same tokens' activations at its output site."""
    if model.output_site is not None and target is None:
        raise ValueError("a transcoder is scored against its output site: pass target")
    target = x if target is None else target
    d_sae = model.sae.cfg.d_sae
    device = model.sae.W_dec.device
    sq_err = 0.0
    sum_x = torch.zeros(x.shape[1], dtype=torch.float64, device=device)
    sum_sq = 0.0
    l0 = 0.0
    fires = torch.zeros(d_sae, dtype=torch.float64, device=device)
    n = x.shape[0]
    for start in range(0, n, batch_size):
        xb = x[start:start + batch_size].to(device).float()
        yb = target[start:start + batch_size].to(device).float()
        x_hat, codes = model.reconstruct(xb)
        sq_err += float((x_hat - yb).double().pow(2).sum())
        sum_x += yb.double().sum(0)
        sum_sq += float(yb.double().pow(2).sum())
        active = codes.values > 0
        l0 += float(active.sum())
        fires.index_add_(0, codes.indices[active], torch.ones(int(active.sum()), dtype=torch.float64, device=device))
    total_var = sum_sq - float(sum_x.pow(2).sum()) / n
    fvu = sq_err / total_var if total_var > 0 else float("nan")
    density = fires / n
    return {
        "mse": sq_err / n,
        "fvu": fvu,
        "explained_variance": 1.0 - fvu,
        "l0": l0 / n,
        "dead_frac_eval": float((fires == 0).double().mean()),
        "dense_frac": float((density > 0.1).double().mean()),
        "eval_tokens": n,
    }


def _ce(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy and the number of predictions."""
    logits = logits[:, :-1].float()
    target = tokens[:, 1:].to(logits.device)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
    return float(loss), target.numel()


@torch.no_grad()
def spliced_lm_loss(lm, models: list[Evaluated], contexts: torch.Tensor, exclude_bos: bool = True,
                    sink_norm_ratio: float | None = 10.0, batch_size: int = 8) -> dict[int, dict[str, float]]:
    """CE recovered and delta LM loss for each model, on token contexts [B, T] (one clean run shared)."""
    sums = {"clean": [0.0, 0]}
    # zero ablation per replaced site (and, for transcoders, the input site that picks the positions)
    zero_sums = {(m.target_site, m.site if m.output_site else None): [0.0, 0] for m in models}
    sae_sums = {i: [0.0, 0] for i in range(len(models))}

    def add(acc, value):
        acc[0] += value[0]
        acc[1] += value[1]

    def splice(fn):
        def replace(out: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
            # A transcoder's prediction comes from its input site (`source`), whose tokens decide
            # which positions are replaced, as they decide what the SAE is trained and analysed on.
            src = out if source is None else source
            mask = valid_token_mask(src, sink_norm_ratio, exclude_bos)
            new = out.clone()
            new[mask] = fn(src[mask].float()).to(out.dtype)
            return new
        return replace

    for start in range(0, contexts.shape[0], batch_size):
        tokens = contexts[start:start + batch_size]
        add(sums["clean"], _ce(lm.logits_with(tokens), tokens))
        for site, source in zero_sums:
            add(zero_sums[site, source], _ce(lm.logits_with(tokens, lm.site(site), splice(torch.zeros_like),
                                                            source=lm.site(source) if source else None), tokens))
        for i, m in enumerate(models):
            fn = splice(lambda a, m=m: m.reconstruct(a.to(m.sae.W_dec.device))[0].to(a.device))
            source = lm.site(m.site) if m.output_site else None
            add(sae_sums[i], _ce(lm.logits_with(tokens, lm.site(m.target_site), fn, source=source), tokens))

    clean = sums["clean"][0] / sums["clean"][1]
    out = {}
    for i, m in enumerate(models):
        key = (m.target_site, m.site if m.output_site else None)
        zero = zero_sums[key][0] / zero_sums[key][1]
        sae = sae_sums[i][0] / sae_sums[i][1]
        recovered = (zero - sae) / (zero - clean) if not math.isclose(zero, clean) else float("nan")
        out[i] = {"ce_clean": clean, "ce_zero_ablation": zero, "ce_sae": sae,
                  "ce_recovered": recovered, "delta_lm_loss": sae - clean}
    return out
