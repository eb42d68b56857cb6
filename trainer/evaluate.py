"""Held-out evaluation: reconstruction metrics and the spliced-in LM loss.

- MSE (per token, summed over dimensions), FVU = sum||x - x_hat||^2 / sum||x - mean||^2 with the
  held-out mean, and explained variance = 1 - FVU;
- L0, the mean number of active latents per token;
- cosine: the mean over tokens of the cosine similarity of x_hat and x (direction kept, scale aside);
- dense fraction: latents firing on more than 10% of held-out tokens; dead fraction: latents that
  did not fire on any held-out token (training also reports its own window-based count); "firing"
  is SparseAutoencoder.fires, one rule for every architecture;
- CE recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean) and delta LM loss = CE_sae - CE_clean,
  for one SAE spliced in (spliced_lm_loss) or a whole transcoder set at once (spliced_set_loss),
  from running the LM with the site's activations replaced by the reconstruction (or by zeros)
  at every position the SAE is trained on (BOS and attention-sink positions keep their values),
  with 95% confidence intervals from the per-context losses (ce_interval); held-out contexts are
  added until both intervals are within +-0.5% (see interval_met) or a cap is reached.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
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
        """(prediction in raw units, the sparse codes) for raw activations x [n, D] of the site."""
        xs = x.float() * self.norm_scale
        codes = self.sae.encode(xs)
        return self.sae.output(codes, xs) / self.norm_scale, codes


class ReconstructionStats:
    """Running sums for reconstruction_metrics, fed batch by batch (a many-site run streams its
    held-out tokens instead of holding every site's activations at once)."""

    def __init__(self, model: Evaluated):
        self.model = model
        self.device = model.sae.W_dec.device
        self.sq_err = 0.0
        self.sum_y = torch.zeros(model.sae.W_dec.shape[1], dtype=torch.float64, device=self.device)
        self.sum_sq = 0.0
        self.l0 = 0.0
        self.cos = 0.0
        self.n = 0
        self.fires = torch.zeros(model.sae.cfg.d_sae, dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def update(self, x: torch.Tensor, target: torch.Tensor | None = None, batch_size: int = 4096) -> None:
        """Add held-out activations x [n, D] of the site (raw units); a transcoder's `target` is the
        same tokens' activations at its output site."""
        model = self.model
        if model.output_site is not None and target is None:
            raise ValueError("a transcoder is scored against its output site: pass target")
        target = x if target is None else target
        for start in range(0, x.shape[0], batch_size):
            xb = x[start:start + batch_size].to(self.device).float()
            yb = target[start:start + batch_size].to(self.device).float()
            x_hat, codes = model.reconstruct(xb)
            self.sq_err += float((x_hat - yb).double().pow(2).sum())
            self.sum_y += yb.double().sum(0)
            self.sum_sq += float(yb.double().pow(2).sum())
            self.l0 += float((codes.values > 0).sum())
            self.cos += float(F.cosine_similarity(x_hat.double(), yb.double(), dim=1).sum())
            # A latent fires when its contribution to the prediction passes the floor relative to
            # the norm of what is predicted (the output site, for a transcoder).
            fired = model.sae.fires(codes, float(yb.norm(dim=1).mean()) * model.norm_scale)
            self.fires.index_add_(0, codes.indices[fired],
                                  torch.ones(int(fired.sum()), dtype=torch.float64, device=self.device))
            self.n += xb.shape[0]

    def result(self) -> dict[str, float]:
        n = max(self.n, 1)
        total_var = self.sum_sq - float(self.sum_y.pow(2).sum()) / n
        fvu = self.sq_err / total_var if total_var > 0 else float("nan")
        density = self.fires / n
        return {
            "mse": self.sq_err / n,
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "l0": self.l0 / n,
            "cos_sim": self.cos / n,
            "dead_frac_eval": float((self.fires == 0).double().mean()),
            "dense_frac": float((density > 0.1).double().mean()),
            "eval_tokens": self.n,
        }


@torch.no_grad()
def reconstruction_metrics(model: Evaluated, x: torch.Tensor, batch_size: int = 4096,
                           target: torch.Tensor | None = None) -> dict[str, float]:
    """Metrics over held-out activations x [n, D] (raw units) of the site. A transcoder's
    prediction is scored against `target`, the same tokens' activations at its output site."""
    stats = ReconstructionStats(model)
    stats.update(x, target, batch_size)
    return stats.result()


def _ce_per_context(logits: torch.Tensor, tokens: torch.Tensor) -> np.ndarray:
    """Mean next-token cross-entropy of each context [B] (float64)."""
    logits = logits[:, :-1].float()
    target = tokens[:, 1:].to(logits.device)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return loss.view(target.shape).double().mean(1).cpu().numpy()


def ce_interval(clean: np.ndarray, zero: np.ndarray, sae: np.ndarray, confidence: float = 0.95) -> dict[str, float]:
    """CE recovered and delta LM loss with confidence intervals, from per-context losses.

    The same contexts are run clean, zero-ablated and with the SAE, so the differences are paired:
    d_i = CE_sae,i - CE_clean,i and z_i = CE_zero,i - CE_clean,i. Delta LM loss = mean(d), with a
    Student t interval on the mean of d. CE recovered = 1 - mean(d) / mean(z), a ratio of means; its
    standard error comes from the delta method, sd(d_i - r z_i) / (sqrt(n) mean(z)) with
    r = mean(d) / mean(z), which is cheap enough to recompute after every batch of contexts (a
    bootstrap would cost as much as the LM passes). Every context has the same length, so the mean
    over contexts is the mean over predicted tokens. Contexts are treated as independent draws;
    consecutive contexts cut from one long document are not quite, so on a corpus of long documents
    the interval is somewhat optimistic. The intervals are the half-widths (*_ci95; None
when there is a single context or zero-ablation does not change the loss)."""
    from scipy import stats

    d, z = sae - clean, zero - clean
    n = len(d)
    d_mean, z_mean = float(d.mean()), float(z.mean())
    t = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) if n > 1 else float("inf")
    recovered = 1.0 - d_mean / z_mean if z_mean != 0 else float("nan")
    if n > 1 and z_mean != 0:
        u = d - (d_mean / z_mean) * z
        recovered_hw = t * float(u.std(ddof=1)) / (math.sqrt(n) * abs(z_mean))
        delta_hw = t * float(d.std(ddof=1)) / math.sqrt(n)
    else:  # one context, or no zero-ablation effect: no interval to give
        recovered_hw = delta_hw = None
    clean_mean = float(clean.mean())
    return {"ce_clean": clean_mean, "ce_zero_ablation": float(zero.mean()), "ce_sae": float(sae.mean()),
            "ce_recovered": recovered, "ce_recovered_ci95": recovered_hw,
            "delta_lm_loss": d_mean, "delta_lm_loss_ci95": delta_hw, "ce_contexts": n}


def interval_met(m: dict[str, float], target: float) -> bool:
    """Whether CE recovered is known to +-target (absolute) and delta LM loss to +-target of the
    clean loss (0.005: half a percentage point, and half a percent of the clean loss)."""
    if m["ce_recovered_ci95"] is None or m["delta_lm_loss_ci95"] is None:
        return False
    return m["ce_recovered_ci95"] <= target and m["delta_lm_loss_ci95"] <= target * m["ce_clean"]


def _splice(fn, exclude_bos: bool, sink_norm_ratio: float | None):
    """replace(out, source=None) for LoadedLM.logits_with: out at the valid positions becomes
    fn(activations read there). A transcoder's prediction comes from its input site (`source`);
    a position is replaced where both its input and its output are valid tokens (the rule of the
    training stream, which keeps a token only where every site it reads is valid), so BOS and
    sink positions keep their values."""
    def replace(out: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        src = out if source is None else source
        mask = valid_token_mask(src, sink_norm_ratio, exclude_bos)
        if source is not None:
            mask &= valid_token_mask(out, sink_norm_ratio, exclude_bos)
        new = out.clone()
        new[mask] = fn(src[mask].float()).to(out.dtype)
        return new
    return replace


@torch.no_grad()
def spliced_lm_loss(lm, models: list[Evaluated], contexts: Iterable[torch.Tensor], exclude_bos: bool = True,
                    sink_norm_ratio: float | None = 10.0, max_contexts: int = 256, min_contexts: int = 32,
                    target: float = 0.005) -> dict[int, dict[str, float]]:
    """CE recovered and delta LM loss for each model, with 95% intervals, over held-out contexts.

    `contexts` yields token batches [B, T]. Contexts are added batch by batch until every model's
    intervals meet `target` (interval_met) with at least min_contexts, or max_contexts are used, or
    the contexts run out; `ce_ci_met` says which. One clean run and one zero-ablation per site are
    shared by all models (a transcoder's zero-ablation is of its output site, at the positions its
    input site selects)."""
    def zkey(m: Evaluated) -> tuple[str, str | None]:
        return (m.target_site, m.site if m.output_site else None)

    sites = list(dict.fromkeys(zkey(m) for m in models))
    clean: list[np.ndarray] = []
    zero: dict[tuple[str, str | None], list[np.ndarray]] = {s: [] for s in sites}
    sae: list[list[np.ndarray]] = [[] for _ in models]

    def splice(fn):
        return _splice(fn, exclude_bos, sink_norm_ratio)

    def summary() -> dict[int, dict[str, float]]:
        c = np.concatenate(clean)
        return {i: ce_interval(c, np.concatenate(zero[zkey(m)]), np.concatenate(sae[i])) for i, m in enumerate(models)}

    n, out = 0, {}
    for batch in contexts:
        tokens = batch[:max_contexts - n]
        if not len(tokens):
            break
        clean.append(_ce_per_context(lm.logits_with(tokens), tokens))
        for site, source in sites:
            zero[site, source].append(_ce_per_context(lm.logits_with(
                tokens, lm.site(site), splice(torch.zeros_like), source=lm.site(source) if source else None), tokens))
        for i, m in enumerate(models):
            fn = splice(lambda a, m=m: m.reconstruct(a.to(m.sae.W_dec.device))[0].to(a.device))
            source = lm.site(m.site) if m.output_site else None
            sae[i].append(_ce_per_context(lm.logits_with(tokens, lm.site(m.target_site), fn, source=source), tokens))
        n += len(tokens)
        out = summary()
        if n >= max_contexts or (n >= min_contexts and all(interval_met(m, target) for m in out.values())):
            break
    for m in out.values():
        m["ce_ci_met"] = bool(interval_met(m, target))
        m["ce_ci_target"] = target
    return out


@torch.no_grad()
def spliced_set_loss(lm, models: list[Evaluated], contexts: Iterable[torch.Tensor], exclude_bos: bool = True,
                     sink_norm_ratio: float | None = 10.0, max_contexts: int = 256, min_contexts: int = 32,
                     target: float = 0.005) -> dict[str, float]:
    """CE recovered and delta LM loss, with 95% intervals, when every model is spliced in at once
    (a transcoder set: every MLP replaced by its transcoder in the same forward pass, so each one
    reads an input that the transcoders upstream of it have already changed).

    The zero-ablation replaces every target site by zeros at once. Per-context losses are paired
    (clean, zero-ablated, spliced on the same contexts) and summarised by ce_interval; contexts
    are added until both intervals meet `target` (after min_contexts) or max_contexts are used."""
    def splices(fn_of):
        out = []
        for m in models:
            source = lm.site(m.site) if m.output_site else None
            out.append((lm.site(m.target_site), _splice(fn_of(m), exclude_bos, sink_norm_ratio), source))
        return out

    zero = splices(lambda m: torch.zeros_like)
    spliced = splices(lambda m: lambda a: m.reconstruct(a.to(m.sae.W_dec.device))[0].to(a.device))
    clean_ce: list[np.ndarray] = []
    zero_ce: list[np.ndarray] = []
    set_ce: list[np.ndarray] = []
    n, out = 0, {}
    for batch in contexts:
        tokens = batch[:max_contexts - n]
        if not len(tokens):
            break
        clean_ce.append(_ce_per_context(lm.logits_with(tokens), tokens))
        zero_ce.append(_ce_per_context(lm.logits_spliced(tokens, zero), tokens))
        set_ce.append(_ce_per_context(lm.logits_spliced(tokens, spliced), tokens))
        n += len(tokens)
        out = ce_interval(np.concatenate(clean_ce), np.concatenate(zero_ce), np.concatenate(set_ce))
        if n >= max_contexts or (n >= min_contexts and interval_met(out, target)):
            break
    if out:
        out["ce_ci_met"] = bool(interval_met(out, target))
        out["ce_ci_target"] = target
        out["spliced_sites"] = [m.target_site for m in models]
    return out
