"""The stitching test: does a latent of the wider SAE add something the narrower one misses?

Leask et al. ("Sparse autoencoders do not find canonical units of analysis") insert latents of a
larger SAE into a smaller one: "novel" latents lower the smaller SAE's reconstruction error,
"reconstruction" latents re-encode what it already has. Here, precisely:

    the narrow SAE A has error e = x - x_hat_A on held-out activations x; the wide latent j, with its
    own activation f_j(x) (B's encoder) and decoder row d_j, is added to A's reconstruction as an
    extra latent with one gain c_j fitted by least squares on the fit fold,
        c_j = sum_t f_j <e_t, d_j> / sum_t f_j^2 ||d_j||^2,
    and the decrease of A's squared error it brings is measured on the other (evaluation) fold:
        gain_j = sum_t ||e_t||^2 - ||e_t - c_j f_j d_j||^2 = 2 c_j sum u_t - c_j^2 sum w_t,
    with u_t = f_j <e_t, d_j> and w_t = f_j^2 ||d_j||^2.

On the fit fold the gain is never negative (least squares with one more regressor), which is why
it is measured on held-out tokens. j counts as novel when the held-out gain is positive and its
t statistic over the evaluation tokens, from the streamed moments of
delta_t = 2 c u_t - c^2 w_t, reaches `t_min`. Everything streams: per latent and fold, sums of
u, w (and u^2, u w, w^2 on the evaluation fold).
"""

from __future__ import annotations

import numpy as np
import torch

_CELLS_PER_STEP = 1 << 23  # tokens x F_B dot products computed at once (32 MiB of float32)


class StitchStats:
    def __init__(self, dec_b: torch.Tensor, device=None, dtype: torch.dtype = torch.float32):
        dev = device or dec_b.device
        self.dec = dec_b.detach().float().to(dev)
        self.dec_t = self.dec.to(dtype).T.contiguous()  # [D, F_B] in the matmul's precision
        self.norm2 = self.dec.pow(2).sum(1).double()
        f = self.dec.shape[0]
        z = lambda: torch.zeros(f, dtype=torch.float64, device=dev)
        self.fit_u, self.fit_w = z(), z()
        self.ev_u, self.ev_w, self.ev_uu, self.ev_uw, self.ev_ww = z(), z(), z(), z(), z()
        self.ev_sse = 0.0
        self.ev_tokens = 0

    @torch.no_grad()
    def update(self, e_a: torch.Tensor, vb: torch.Tensor, ib: torch.Tensor, evaluate: bool) -> None:
        """A's error e_a [n, D] and B's codes (values, indices [n, k_B]) on the same tokens; evaluate
        selects the evaluation fold (else the fit fold). <e_t, d_j> comes from one matmul against all
        of B's decoder rows (read at the active slots), in the precision the SAEs encode with."""
        dev = self.dec.device
        e_a, vb, ib = e_a.to(dev).float(), vb.to(dev).float(), ib.to(dev).long()
        if evaluate:
            self.ev_sse += float(e_a.double().pow(2).sum())
            self.ev_tokens += e_a.shape[0]
        step = max(1, _CELLS_PER_STEP // self.dec.shape[0])
        for s in range(0, e_a.shape[0], step):
            v, i, e = vb[s:s + step], ib[s:s + step], e_a[s:s + step]
            active = v > 0
            dots = (e.to(self.dec_t.dtype) @ self.dec_t).float().gather(1, i)  # <e_t, d_j> for each slot
            j = i[active]
            f = v[active].double()
            u = f * dots[active].double()
            w = f * f * self.norm2[j]
            if evaluate:
                self.ev_u.index_add_(0, j, u)
                self.ev_w.index_add_(0, j, w)
                self.ev_uu.index_add_(0, j, u * u)
                self.ev_uw.index_add_(0, j, u * w)
                self.ev_ww.index_add_(0, j, w * w)
            else:
                self.fit_u.index_add_(0, j, u)
                self.fit_w.index_add_(0, j, w)

    def result(self) -> dict[str, np.ndarray]:
        """Per wide latent: the fitted gain c, the held-out decrease of A's squared error (absolute and
        relative to A's held-out squared error) and its t statistic."""
        c = torch.where(self.fit_w > 0, self.fit_u / self.fit_w.clamp_min(1e-300), torch.zeros_like(self.fit_w))
        gain = 2 * c * self.ev_u - c * c * self.ev_w
        n = max(self.ev_tokens, 1)
        second = 4 * c**2 * self.ev_uu - 4 * c**3 * self.ev_uw + c**4 * self.ev_ww
        mean = gain / n
        var = (second / n - mean**2).clamp_min(0)
        se = (var / n).sqrt()
        t = torch.where(se > 0, mean / se.clamp_min(1e-300), torch.zeros_like(mean))
        return {"c": c.cpu().numpy(), "gain": gain.cpu().numpy(),
                "rel_gain": (gain / self.ev_sse).cpu().numpy() if self.ev_sse > 0 else np.zeros(len(c)),
                "t": t.cpu().numpy(), "eval_sse": self.ev_sse, "eval_tokens": self.ev_tokens}
