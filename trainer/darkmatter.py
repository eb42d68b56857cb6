"""What an SAE misses ("dark matter", Engels et al. 2024), measured inside the analysis pass.

With x an activation and e = x - x_hat the SAE's error at every analysed token:

- FVU by context position and by token. Each group's value is its mean ||e||^2 over the data's
  total variance per token, so the groups' values, weighted by their token counts, average to the
  SAE's FVU on the same tokens.
- The linear part of the error: a ridge regression e ~ (x - mean x) A + mean e from streamed
  float64 sums (X^T X, X^T E, ...). Each batch's contexts are split between two folds; each fold's
  map is scored on the other fold, so R2_lin (the share of the error's variance linearly predictable from
  x) is out of sample. The same sums give R2 of the error's norm ||e|| (how predictable the size of
  the error is). Products are computed per batch in float32 on inputs shifted by a first-batch
  mean (no cancellation) and accumulated in float64.
- The nonlinear error e_nl = e - linear prediction, with the map fitted on the first warm-up
  tokens of the pass; the contexts with the largest per-token ||e_nl|| are kept.
- On a sample of contexts, the LM runs clean and with x_hat spliced in at the site: per-token
  spliced-loss increase dCE_t and KL_t(p_clean || p_sae), and the concentration curve: the share
  of the total dCE (and KL) held by the top q% of tokens.

Everything here is exact streaming arithmetic on the tokens the analysis reads; nothing is
subsampled except the spliced-loss sample.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from trainer.activations import valid_token_mask

QUANTILES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


@dataclass
class DarkMatterConfig:
    ridge: float = 1e-3
    """Ridge lambda as a fraction of the mean eigenvalue of Cov(x)."""
    warmup_tokens: int = 65_536
    """Tokens whose sums fit the map that scores the nonlinear error of the tokens after them."""
    top_contexts: int = 20
    """Contexts with the largest nonlinear error to keep."""
    min_token_count: int = 20
    """A token must occur this often to be listed by FVU."""
    listed_tokens: int = 50
    """Tokens listed by FVU and by share of the error."""
    window_before: int = 32
    window_after: int = 12


def ridge_fit(sxx: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor, sxy: torch.Tensor, n: float,
              ridge: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Ridge regression y ~ (x - mx) W + my from sums (float64): returns (W, mx, my, lambda).

    sxx = sum x x^T [D, D], sx = sum x [D], sy = sum y [K], sxy = sum x y^T [D, K], over n rows.
    lambda = ridge * trace(Cov x) / D, so `ridge` is free of the data's scale."""
    mx, my = sx / n, sy / n
    cxx = sxx - n * torch.outer(mx, mx)
    cxy = sxy - n * torch.outer(mx, my)
    lam = ridge * float(torch.trace(cxx)) / cxx.shape[0]
    eye = torch.eye(cxx.shape[0], dtype=cxx.dtype, device=cxx.device)
    w = torch.linalg.solve(cxx + max(lam, 1e-12) * eye, cxy)
    return w, mx, my, lam


def ridge_sse(w: torch.Tensor, mx: torch.Tensor, my: torch.Tensor, sxx: torch.Tensor, sx: torch.Tensor,
              sy: torch.Tensor, sxy: torch.Tensor, syy: float, n: float) -> float:
    """Sum of squared residuals of y - ((x - mx) W + my) over rows summarised by the sums
    (sxx, sx, sy, sxy, syy = sum ||y||^2, n rows): expands ||(y - my) - (x - mx) W||^2."""
    suu = sxx - torch.outer(sx, mx) - torch.outer(mx, sx) + n * torch.outer(mx, mx)
    suv = sxy - torch.outer(sx, my) - torch.outer(mx, sy) + n * torch.outer(mx, my)
    svv = syy - 2 * float(my @ sy) + n * float(my @ my)
    return float(svv - 2 * torch.sum(w * suv) + torch.sum(w * (suu @ w)))


def fold_cut(n_rows: int, mask: torch.Tensor | None = None) -> int | None:
    """The two held-out folds of one batch of rows: rows [:cut] go to the first (fit) fold, rows
    [cut:] to the second. With the batch's context mask [B, T] (rows in context order), the cut is
    at the first row of the second half of its contexts, so a context's tokens stay together;
    None for a batch of one context (alternate by context instead). Without contexts (rows of
    valid tokens, as relate reads them) the cut is at half the rows. Either way every batch fills
    both folds, so even data that arrives as one batch has something to evaluate on; each part is
    a view (no per-row copies)."""
    if mask is None:
        return n_rows // 2
    if mask.shape[0] < 2:
        return None
    return int(mask[:mask.shape[0] // 2].sum())


class _Fold:
    """Float64 sums over one fold's tokens, x and e shifted by fixed reference vectors."""

    KEYS = ("n", "sx", "se", "sxx", "sxe", "see", "sr", "srr", "sxr")

    def __init__(self, d: int, device):
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)
        self.n, self.sx, self.se, self.sxx, self.sxe = z(()), z(d), z(d), z(d, d), z(d, d)
        self.see, self.sr, self.srr, self.sxr = z(()), z(()), z(()), z(d)

    def add(self, xs: torch.Tensor, es: torch.Tensor, es2: torch.Tensor, r: torch.Tensor) -> None:
        """One batch: shifted x and e [n, D], the rows' ||e - eps0||^2 and ||e|| [n]. Products and
        column sums over the batch are float32 (one GEMM for X^T [X | E]), the running sums float64."""
        if xs.shape[0] == 0:
            return
        self.n += xs.shape[0]
        self.sx += xs.sum(0).double()
        self.se += es.sum(0).double()
        d = xs.shape[1]
        prod = (xs.T @ torch.cat([xs, es, r[:, None]], 1)).double()  # [D, 2D + 1]
        self.sxx += prod[:, :d]
        self.sxe += prod[:, d:2 * d]
        self.sxr += prod[:, 2 * d]
        self.see += es2.double().sum()
        rd = r.double()
        self.sr += rd.sum()
        self.srr += rd.pow(2).sum()

    def merged(self, other: _Fold) -> _Fold:
        out = _Fold(self.sx.shape[0], self.sx.device)
        for k in self.KEYS:
            setattr(out, k, getattr(self, k) + getattr(other, k))
        return out


class DarkMatter:
    """Streaming accumulator of the dark-matter statistics of one SAE over an analysis pass."""

    def __init__(self, d_in: int, ctx_len: int, vocab_size: int, cfg: DarkMatterConfig, device,
                 expected_tokens: int | None = None):
        self.cfg, self.device = cfg, device
        self.d, self.T, self.V = d_in, ctx_len, vocab_size
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)
        self.pos_count, self.pos_err = z(ctx_len), z(ctx_len)
        self.tok_count, self.tok_err = z(vocab_size), z(vocab_size)
        self.n, self.sum_err, self.sum_x, self.sum_x2 = z(()), z(()), z(d_in), z(())
        self.folds = [_Fold(d_in, device), _Fold(d_in, device)]
        self.mu0: torch.Tensor | None = None  # reference shifts, fixed by the first batch
        self.eps0: torch.Tensor | None = None
        warm = cfg.warmup_tokens
        if expected_tokens:
            warm = min(warm, max(expected_tokens // 4, 1))
        self.warmup = int(max(warm, 2 * d_in))  # a map needs more tokens than dimensions
        self.map: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (A, mx, me), float32
        self.map_tokens = 0
        self.sum_nl = z(())
        self.n_nl = z(())
        self.top: list[tuple[float, int, dict]] = []  # min-heap of (score, context, record)
        self.elapsed = 0.0

    # --- streaming ---------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, x: torch.Tensor, e: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor, first_context: int,
               doc_ids: torch.Tensor | None = None, doc_pos: torch.Tensor | None = None) -> None:
        """x, e: [n, D] float32 rows of the valid tokens of contexts [B, T] (mask), in mask order."""
        started = time.perf_counter()
        dev = self.device
        x, e = x.to(dev).float(), e.to(dev).float()
        mask = mask.to(dev)
        if self.mu0 is None:
            self.mu0, self.eps0 = x.mean(0), e.mean(0)
        rows, pos = torch.nonzero(mask, as_tuple=True)
        tok = tokens.to(dev)[mask].long()
        err2 = torch.linalg.vector_norm(e, dim=1).pow_(2)  # per-row sums stay float32 (D terms)
        err2d = err2.double()
        xs, es = x - self.mu0, e - self.eps0
        self.n += x.shape[0]
        self.sum_err += err2d.sum()
        self.sum_x += xs.sum(0).double()
        self.sum_x2 += torch.linalg.vector_norm(xs, dim=1).double().pow(2).sum()
        self.pos_count.index_add_(0, pos, torch.ones_like(err2d))
        self.pos_err.index_add_(0, pos, err2d)
        ok = tok < self.V
        self.tok_count.index_add_(0, tok[ok], torch.ones_like(err2d[ok]))
        self.tok_err.index_add_(0, tok[ok], err2d[ok])
        es2, r = torch.linalg.vector_norm(es, dim=1).pow_(2), err2.sqrt()
        cut = fold_cut(x.shape[0], mask)
        if cut is not None:
            self.folds[0].add(xs[:cut], es[:cut], es2[:cut], r[:cut])
            self.folds[1].add(xs[cut:], es[cut:], es2[cut:], r[cut:])
        else:  # one context per batch: alternate
            self.folds[first_context % 2].add(xs, es, es2, r)
        if self.map is not None:
            self._score_contexts(xs, es, err2, mask, rows, pos, tokens, first_context, doc_ids, doc_pos)
        elif float(self.n) >= self.warmup:
            self._fit_map()
        self.elapsed += time.perf_counter() - started

    def _fit_map(self) -> None:
        both = self.folds[0].merged(self.folds[1])
        n = float(both.n)
        a, mx, me, _ = ridge_fit(both.sxx, both.sx, both.se, both.sxe, n, self.cfg.ridge)
        self.map = (a.float(), mx.float(), me.float())
        self.map_tokens = int(n)

    def _score_contexts(self, xs, es, err2, mask, rows, pos, tokens, first_context, doc_ids, doc_pos) -> None:
        a, mx, me = self.map
        nl = torch.addmm(es - (me - mx @ a), xs, a, alpha=-1)  # (e - me) - (x - mx) A, one pass over the batch
        nl2 = torch.linalg.vector_norm(nl, dim=1).pow_(2)
        self.sum_nl += nl2.double().sum()
        self.n_nl += nl2.shape[0]
        B, T = mask.shape
        nl_ctx = torch.zeros(B, T, device=nl2.device)
        nl_ctx[rows, pos] = nl2.sqrt()
        score, peak = nl_ctx.max(1)
        k = min(self.cfg.top_contexts, B)
        if k <= 0:
            return
        floor = self.top[0][0] if len(self.top) >= self.cfg.top_contexts else -math.inf
        best = torch.topk(score, k)
        err_ctx = None
        for s, b in zip(best.values.tolist(), best.indices.tolist()):
            if s <= floor:
                break
            if err_ctx is None:
                err_ctx = torch.zeros(B, T, device=nl2.device)
                err_ctx[rows, pos] = err2.sqrt()
            p = int(peak[b])
            rec = {"context": first_context + b, "peak": p, "score": s,
                   "tokens": tokens[b].cpu().numpy().astype(np.int32), "nonlinear": nl_ctx[b].cpu().numpy(),
                   "error": err_ctx[b].cpu().numpy(),
                   "doc_id": int(doc_ids[b, p]) if doc_ids is not None else -1,
                   "doc_pos": int(doc_pos[b, p]) if doc_pos is not None else -1}
            item = (s, first_context + b, rec)
            if len(self.top) < self.cfg.top_contexts:
                heapq.heappush(self.top, item)
            else:
                heapq.heappushpop(self.top, item)
            floor = self.top[0][0] if len(self.top) >= self.cfg.top_contexts else -math.inf

    # --- resume ------------------------------------------------------------------------------

    def state(self) -> dict[str, np.ndarray]:
        """Everything needed to resume the pass (npz-ready)."""
        out = {k: getattr(self, k).cpu().numpy() for k in ("pos_count", "pos_err", "tok_count", "tok_err", "n",
                                                             "sum_err", "sum_x", "sum_x2", "sum_nl", "n_nl")}
        for f, fold in enumerate(self.folds):
            out.update({f"fold{f}_{k}": getattr(fold, k).cpu().numpy() for k in _Fold.KEYS})
        if self.mu0 is not None:
            out["mu0"], out["eps0"] = self.mu0.cpu().numpy(), self.eps0.cpu().numpy()
        if self.map is not None:
            out["map_a"], out["map_mx"], out["map_me"] = (t.cpu().numpy() for t in self.map)
            out["map_tokens"] = np.array(self.map_tokens)
        for i, (s, c, rec) in enumerate(sorted(self.top, key=lambda t: -t[0])):
            for k, v in rec.items():
                out[f"top{i}_{k}"] = np.asarray(v)
        out["n_top"] = np.array(len(self.top))
        out["elapsed"] = np.array(self.elapsed)
        return out

    def load(self, state) -> None:
        dev = self.device
        t = lambda k: torch.from_numpy(np.asarray(state[k])).to(dev)
        for k in ("pos_count", "pos_err", "tok_count", "tok_err", "n", "sum_err", "sum_x", "sum_x2", "sum_nl", "n_nl"):
            setattr(self, k, t(k).double())
        for f, fold in enumerate(self.folds):
            for k in _Fold.KEYS:
                setattr(fold, k, t(f"fold{f}_{k}").double())
        if "mu0" in state:
            self.mu0, self.eps0 = t("mu0").float(), t("eps0").float()
        if "map_a" in state:
            self.map = (t("map_a").float(), t("map_mx").float(), t("map_me").float())
            self.map_tokens = int(state["map_tokens"])
        self.top = []
        for i in range(int(state["n_top"])):
            rec = {k: state[f"top{i}_{k}"] for k in ("context", "peak", "score", "tokens", "nonlinear", "error",
                                                    "doc_id", "doc_pos")}
            rec = {k: (v.item() if np.ndim(v) == 0 else v) for k, v in rec.items()}
            heapq.heappush(self.top, (float(rec["score"]), int(rec["context"]), rec))
        self.elapsed = float(state["elapsed"])

    # --- results -----------------------------------------------------------------------------

    def linear_predictability(self) -> dict:
        """Cross-fitted R2 of e (vector) and of ||e|| from x, plus the in-sample values."""
        sse = sst = sse_r = sst_r = 0.0
        lam = 0.0
        for f, g in ((0, 1), (1, 0)):
            fit, ev = self.folds[f], self.folds[g]
            nf, ng = float(fit.n), float(ev.n)
            if nf <= self.d or ng < 2:
                return {"r2_error": None, "r2_norm": None, "r2_error_in_sample": None, "ridge_lambda": None,
                        "tokens": int(float(self.n))}
            w, mx, me, lam = ridge_fit(fit.sxx, fit.sx, fit.se, fit.sxe, nf, self.cfg.ridge)
            sse += ridge_sse(w, mx, me, ev.sxx, ev.sx, ev.se, ev.sxe, float(ev.see), ng)
            sst += float(ev.see) - float(ev.se @ ev.se) / ng
            wr, _, mr, _ = ridge_fit(fit.sxx, fit.sx, fit.sr.reshape(1), fit.sxr.reshape(-1, 1), nf, self.cfg.ridge)
            sse_r += ridge_sse(wr, mx, mr, ev.sxx, ev.sx, ev.sr.reshape(1), ev.sxr.reshape(-1, 1), float(ev.srr), ng)
            sst_r += float(ev.srr) - float(ev.sr) ** 2 / ng
        both = self.folds[0].merged(self.folds[1])
        n = float(both.n)
        w, mx, me, _ = ridge_fit(both.sxx, both.sx, both.se, both.sxe, n, self.cfg.ridge)
        sse_in = ridge_sse(w, mx, me, both.sxx, both.sx, both.se, both.sxe, float(both.see), n)
        sst_in = float(both.see) - float(both.se @ both.se) / n
        return {"r2_error": 1 - sse / sst if sst > 0 else None, "r2_norm": 1 - sse_r / sst_r if sst_r > 0 else None,
                "r2_error_in_sample": 1 - sse_in / sst_in if sst_in > 0 else None, "ridge_lambda": lam,
                "error_variance": sst_in / n, "tokens": int(n)}

    def finalize(self) -> dict:
        cfg = self.cfg
        n = float(self.n)
        if n == 0:
            return {"n_tokens": 0}
        mean_shift = self.sum_x / n
        total_var = float(self.sum_x2) - n * float(mean_shift @ mean_shift)
        per_token_var = total_var / n
        fvu = float(self.sum_err) / total_var if total_var > 0 else None
        pos_count = self.pos_count.cpu().numpy()
        pos_err = self.pos_err.cpu().numpy()
        pos_fvu = [float(e / c / per_token_var) if c > 0 and per_token_var > 0 else None
                   for e, c in zip(pos_err, pos_count)]
        tc, te = self.tok_count.cpu().numpy(), self.tok_err.cpu().numpy()
        total_err = float(self.sum_err)

        def token_row(v: int) -> dict:
            return {"token_id": int(v), "count": int(tc[v]), "fvu": float(te[v] / tc[v] / per_token_var),
                    "error_share": float(te[v] / total_err) if total_err > 0 else 0.0}

        frequent = np.flatnonzero(tc >= cfg.min_token_count)
        by_fvu = frequent[np.argsort(-(te[frequent] / tc[frequent]), kind="stable")][:cfg.listed_tokens]
        seen = np.flatnonzero(tc > 0)
        by_share = seen[np.argsort(-te[seen], kind="stable")][:cfg.listed_tokens]
        W = (cfg.window_before, cfg.window_after)
        contexts = []
        for s, c, rec in sorted(self.top, key=lambda t: -t[0]):
            lo = max(0, int(rec["peak"]) - W[0])
            hi = min(self.T, int(rec["peak"]) + W[1] + 1)
            contexts.append({"context": int(c), "score": float(s), "peak": int(rec["peak"]) - lo,
                             "doc_id": int(rec["doc_id"]), "doc_pos": int(rec["doc_pos"]),
                             "token_ids": np.asarray(rec["tokens"])[lo:hi].astype(int).tolist(),
                             "nonlinear": [round(float(v), 4) for v in np.asarray(rec["nonlinear"])[lo:hi]],
                             "error": [round(float(v), 4) for v in np.asarray(rec["error"])[lo:hi]]})
        lin = self.linear_predictability()
        return {
            "n_tokens": int(n), "fvu": fvu, "variance_per_token": per_token_var, "mse": total_err / n,
            "by_position": {"fvu": pos_fvu, "count": pos_count.astype(int).tolist()},
            "by_token": {"highest_fvu": [token_row(v) for v in by_fvu], "most_error": [token_row(v) for v in by_share],
                         "min_count": cfg.min_token_count, "distinct": len(seen)},
            "linear": lin,
            "nonlinear": {"map_fitted_on_tokens": self.map_tokens, "scored_tokens": int(float(self.n_nl)),
                          "mean_sq": float(self.sum_nl) / float(self.n_nl) if float(self.n_nl) else None,
                          "contexts": contexts},
            "elapsed_s": self.elapsed,
        }


# --- the spliced-loss sample -----------------------------------------------------------------

@torch.no_grad()
def spliced_token_losses(lm, site, reconstruct, contexts: torch.Tensor, exclude_bos: bool = True,
                         sink_norm_ratio: float | None = 10.0, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Per-token dCE and KL(p_clean || p_sae) [B, T-1] with x_hat = reconstruct(x) spliced in at the
    site's valid tokens (BOS and attention sinks keep their values), position t predicting t+1."""
    d_ce, kl = [], []

    def replace(out: torch.Tensor) -> torch.Tensor:
        mask = valid_token_mask(out, sink_norm_ratio, exclude_bos)
        new = out.clone()
        new[mask] = reconstruct(out[mask].float()).to(out.dtype)
        return new

    for start in range(0, contexts.shape[0], batch_size):
        tokens = contexts[start:start + batch_size]
        target = tokens[:, 1:].to(lm.device)
        clean = F.log_softmax(lm.logits_with(tokens)[:, :-1].float(), -1)
        spliced = F.log_softmax(lm.logits_with(tokens, site, replace)[:, :-1].float(), -1)
        ce_clean = -clean.gather(-1, target[..., None])[..., 0]
        ce_sae = -spliced.gather(-1, target[..., None])[..., 0]
        d_ce.append((ce_sae - ce_clean).cpu().numpy())
        kl.append((clean.exp() * (clean - spliced)).sum(-1).clamp_min(0).cpu().numpy())
    return np.concatenate(d_ce), np.concatenate(kl)


def concentration(values: np.ndarray, quantiles=QUANTILES) -> list[float | None]:
    """Share of sum(values) held by the top q of tokens, for each q (None when the sum is not positive)."""
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())[::-1]
    total = float(v.sum())
    if not v.size or total <= 0:
        return [None] * len(quantiles)
    cum = np.cumsum(v)
    return [float(cum[max(1, math.ceil(q * v.size)) - 1] / total) for q in quantiles]


def spliced_summary(d_ce: np.ndarray, kl: np.ndarray, contexts: torch.Tensor, window: tuple[int, int],
                    n_listed: int = 12) -> dict:
    """The sample's loss increase, its concentration, and the tokens where it is largest."""
    flat = d_ce.ravel()
    order = np.argsort(-flat, kind="stable")[:n_listed]
    T = d_ce.shape[1] + 1
    top = []
    for i in order.tolist():
        b, t = divmod(i, d_ce.shape[1])
        lo, hi = max(0, t - window[0]), min(T, t + window[1] + 2)
        top.append({"context": int(b), "position": int(t), "delta_ce": float(flat[i]), "kl": float(kl.ravel()[i]),
                    "token_ids": contexts[b, lo:hi].tolist(), "peak": int(t - lo)})
    return {"contexts": int(d_ce.shape[0]), "tokens": int(flat.size), "mean_delta_ce": float(flat.mean()),
            "mean_kl": float(kl.mean()), "share_positive": float((flat > 0).mean()),
            "concentration": {"q": list(QUANTILES), "delta_ce": concentration(np.clip(flat, 0, None)),
                              "kl": concentration(kl), "delta_ce_net": concentration(flat)},
            "top_tokens": top}
