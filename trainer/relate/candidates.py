"""Data-free candidate pairs between the latents of two SAEs, from their decoder directions.

S = D_A D_B^T over unit decoder rows is computed in blocks of rows; each A latent keeps its k best
B latents and each B latent its k best A latents (a running top-k over the blocks), so memory is
O(block x F_B + k x (F_A + F_B)) whatever the widths. The candidates are the union of both lists
above a cosine floor; each latent's best cosine (its "best match") comes for free.

Cost of a pair, threshold-aware as in SAE Match (Balagansky et al.): for SAEs with a per-latent
threshold (JumpReLU) latent i is represented by v_i = theta_i d_i, the smallest vector it ever adds
to the stream, so two latents that point the same way but switch on at very different strengths
are not called the same; other SAEs use unit directions. The cost is SAE Match's squared distance
normalised by the two norms, ||v_i - v_j||^2 / (||v_i||^2 + ||v_j||^2), which lies in [0, 2] and is
exactly 1 - cos for unit vectors, so one "unmatched" cost serves every architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Candidates:
    a: np.ndarray  # [M] int64 latent of A
    b: np.ndarray  # [M] int64 latent of B
    cos: np.ndarray  # [M] float32 decoder cosine
    best_a_cos: np.ndarray  # [F_A] each A latent's best cosine with any B latent
    best_a: np.ndarray  # [F_A] and which
    best_b_cos: np.ndarray  # [F_B]
    best_b: np.ndarray  # [F_B]

    def __len__(self) -> int:
        return len(self.a)


def unit_rows(w: torch.Tensor) -> torch.Tensor:
    w = w.detach().float()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def match_vectors(sae) -> tuple[torch.Tensor, bool]:
    """(vectors [F, D], threshold_aware): theta_i * d_i for per-latent thresholds, else unit rows."""
    theta = getattr(sae, "threshold", None)
    if isinstance(theta, torch.Tensor) and theta.ndim == 1 and theta.shape[0] == sae.W_dec.shape[0]:
        return sae.W_dec.detach().float() * theta.detach().float()[:, None], True
    return unit_rows(sae.W_dec), False


@torch.no_grad()
def decoder_candidates(dec_a: torch.Tensor, dec_b: torch.Tensor, k: int = 8, min_cos: float = 0.2,
                       block: int = 2048) -> Candidates:
    """Top-k decoder-cosine pairs in both directions (see the module docstring)."""
    ua, ub = unit_rows(dec_a), unit_rows(dec_b)
    fa, fb = ua.shape[0], ub.shape[0]
    kb, ka = min(k, fb), min(k, fa)
    col_val = torch.full((ka, fb), -2.0, device=ub.device)
    col_idx = torch.zeros((ka, fb), dtype=torch.long, device=ub.device)
    best_a_cos = np.zeros(fa, np.float32)
    best_a = np.zeros(fa, np.int64)
    ra, rb, rc = [], [], []
    for s in range(0, fa, block):
        sims = ua[s:s + block] @ ub.T  # [b, F_B]
        v, j = sims.topk(kb, dim=1)
        best_a_cos[s:s + block], best_a[s:s + block] = v[:, 0].cpu().numpy(), j[:, 0].cpu().numpy()
        rows = torch.arange(s, s + sims.shape[0], device=sims.device)[:, None].expand_as(j)
        keep = v >= min_cos
        ra.append(rows[keep].cpu())
        rb.append(j[keep].cpu())
        rc.append(v[keep].cpu())
        cv, ci = sims.topk(min(ka, sims.shape[0]), dim=0)  # this block's best rows for every column
        merged_v = torch.cat([col_val, cv])
        merged_i = torch.cat([col_idx, ci + s])
        top_v, pos = merged_v.topk(ka, dim=0)
        col_val, col_idx = top_v, merged_i.gather(0, pos)
    keep = col_val >= min_cos
    cols = torch.arange(fb, device=col_val.device)[None, :].expand_as(col_idx)
    ra.append(col_idx[keep].cpu())
    rb.append(cols[keep].cpu())
    rc.append(col_val[keep].cpu())
    a = torch.cat(ra).numpy().astype(np.int64)
    b = torch.cat(rb).numpy().astype(np.int64)
    c = torch.cat(rc).numpy().astype(np.float32)
    key, first = np.unique(a * fb + b, return_index=True)
    return Candidates(a=key // fb, b=key % fb, cos=c[first], best_a_cos=best_a_cos, best_a=best_a,
                      best_b_cos=col_val[0].cpu().numpy(), best_b=col_idx[0].cpu().numpy().astype(np.int64))


@torch.no_grad()
def pair_cost(va: torch.Tensor, vb: torch.Tensor, a: np.ndarray, b: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """||v_a - v_b||^2 / (||v_a||^2 + ||v_b||^2) for the pairs (a[m], b[m])."""
    out = np.zeros(len(a), np.float64)
    for s in range(0, len(a), chunk):
        x = va[torch.from_numpy(a[s:s + chunk]).to(va.device)]
        y = vb[torch.from_numpy(b[s:s + chunk]).to(vb.device)]
        num = (x - y).pow(2).sum(1)
        den = (x.pow(2).sum(1) + y.pow(2).sum(1)).clamp_min(1e-30)
        out[s:s + chunk] = (num / den).double().cpu().numpy()
    return out


def with_pairs(cand: Candidates, a: np.ndarray, b: np.ndarray, dec_a: torch.Tensor, dec_b: torch.Tensor) -> Candidates:
    """The candidates plus the pairs (a, b) not already among them (with their decoder cosines)."""
    fb = len(cand.best_b)
    key = np.concatenate([cand.a * fb + cand.b, a.astype(np.int64) * fb + b.astype(np.int64)])
    key, first = np.unique(key, return_index=True)
    na, nb = key // fb, key % fb
    old = first < len(cand.a)
    cos = np.zeros(len(key), np.float32)
    cos[old] = cand.cos[first[old]]
    if (~old).any():
        ua, ub = unit_rows(dec_a), unit_rows(dec_b)
        ia, ib = torch.from_numpy(na[~old]).to(ua.device), torch.from_numpy(nb[~old]).to(ub.device)
        cos[~old] = (ua[ia] * ub[ib]).sum(1).cpu().numpy()
    return Candidates(a=na, b=nb, cos=cos, best_a_cos=cand.best_a_cos, best_a=cand.best_a, best_b_cos=cand.best_b_cos,
                      best_b=cand.best_b)
