"""Relating two SAEs of one model: candidates from the decoders, statistics from one data pass,
then a one-to-one matching (layer and seed pairs) or a splitting forest (width pairs).

    relate_saes(A, B, chunks) -> Relation

`chunks` yields aligned activations {site: [n, D]} of both SAEs' sites on the same tokens: one LM
pass with both sites hooked, or the activation cache (see data.py). Both SAEs encode each chunk;
their codes feed the co-firing statistics of the candidate pairs, and for width pairs the
narrow SAE's error feeds the stitching test and the pair's dark-matter numbers (the per-token
correlation of the two SAEs' error norms, and the share of the narrow SAE's error that the wide
SAE's novel latents capture, measured on a sample of the fit fold once the novel latents are known:
the stitching test selects them on the evaluation fold, so the share is measured on other tokens).

Errors are x - sae.output(codes, x), the SAEs' own reconstructions (an imported SAE's input
normalisation and skip term included). Every batch is split in two folds by the rule dark matter
uses (trainer.darkmatter.fold_cut), so data that arrives as one chunk still has an evaluation fold.
Width pairs also find candidates on data: the co-firing pairs of the first `cofire_tokens` tokens
(cofiring.cofiring_pairs) join the decoder candidates before the co-firing statistics are counted,
so a child is linked to its parent whatever its direction. Latents that never fire on the data are
left out of one-to-one matching.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from store.errors import AtlasError
from trainer.darkmatter import fold_cut
from trainer.relate.candidates import decoder_candidates, match_vectors, pair_cost, with_pairs
from trainer.relate.cofiring import PairStats, cofiring_pairs
from trainer.relate.matching import match
from trainer.relate.splitting import COFIRE_LIFT, cofire_q, split_forest
from trainer.relate.stitching import StitchStats

log = logging.getLogger(__name__)

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MATCHED, UNCONFIRMED = "matched", "unconfirmed"


@dataclass
class RelateConfig:
    """How two SAEs are related (CLI flags of `sae-atlas relate` have the same names)."""

    tokens: int = 200_000
    """Tokens of data for the co-firing statistics and the stitching test."""
    k: int = 8
    """Candidate partners per latent, in each direction, by decoder cosine."""
    min_cos: float = 0.2
    """Candidates need at least this decoder cosine."""
    match_cos: float = 0.5
    """Layer and seed pairs: a one-to-one match needs a cost below 1 - match_cos (for unit directions:
    a cosine above match_cos)."""
    confirm_rho: float = 0.3
    """Layer and seed pairs: a match is confirmed when the two latents' activations correlate this much."""
    link_cos: float = 0.5
    """Width pairs: a child's decoder must have at least this cosine with its parent's."""
    link_cofire: float = 0.5
    """Width pairs: P(parent fires | child fires) must be at least this."""
    cofire_link: float = 0.7
    """Width pairs: a child whose decoder points elsewhere is linked to its parent by co-firing alone when
    P(parent fires | child fires) is at least this (and significant, see link_q)."""
    link_q: float = 0.01
    """Width pairs: a co-firing link needs a Benjamini-Hochberg q-value at most this (binomial test of
    the co-firing count against the parent's firing rate, over every candidate pair)."""
    cofire_tokens: int = 16_384
    """Width pairs: tokens whose co-firing pairs join the decoder candidates."""
    stitch_t: float = 3.0
    """Width pairs: a child without a parent is novel when its held-out stitching gain has this t statistic."""
    sample_tokens: int = 32_768
    """Width pairs: fit-fold tokens kept to measure the share of error the novel latents capture."""
    batch_tokens: int = 4096
    """Tokens encoded at once."""
    encode_dtype: str = "auto"
    """Precision of the SAEs' dense encoder matmul while relating: auto (bfloat16 on CUDA and on CPUs with
    AMX, where it is several times faster, else float32), bfloat16 or float32. Statistics of codes
    barely move with it (tests/test_relate.py measures how much)."""
    block: int = 2048
    """Rows of the decoder-cosine matrix computed at once."""

    def validate(self) -> None:
        if (self.tokens <= 0 or self.k <= 0 or self.batch_tokens <= 0 or self.block <= 0 or self.sample_tokens < 0
                or self.cofire_tokens < 0):
            raise AtlasError("--tokens, --k, --batch-tokens and --block must be positive")
        if self.encode_dtype not in ("auto", "bfloat16", "float32"):
            raise AtlasError(f"unknown --encode-dtype {self.encode_dtype!r}", "use auto, bfloat16 or float32")
        for name in ("min_cos", "match_cos", "link_cos", "link_cofire", "cofire_link", "confirm_rho", "link_q"):
            v = getattr(self, name)
            if not -1 <= v <= 1:
                raise AtlasError(f"--{name.replace('_', '-')} {v} must lie in [-1, 1]")


@dataclass
class Side:
    """One SAE of the pair: its name, site and loaded weights (reading raw activations)."""

    name: str
    sae: torch.nn.Module
    site: str
    model: str
    architecture: str = ""

    @property
    def d_in(self) -> int:
        return int(self.sae.cfg.d_in)

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def layer(self) -> int:
        return int(self.site.split(".")[1])


@dataclass
class Relation:
    kind: str  # width | layer | seed
    a: Side
    b: Side
    links: dict[str, np.ndarray]  # a, b (-1 for none), label, kind, cos, rho, p_b_given_a, p_a_given_b, stitch_gain
    summary: dict = field(default_factory=dict)


def order_pair(x: Side, y: Side) -> tuple[Side, Side, str]:
    """Check that two SAEs can be related; return them as (A, B, kind) in canonical order: the
    narrower SAE first for a width pair, the earlier layer first for a layer pair."""
    if x.name == y.name:
        raise AtlasError(f"cannot relate {x.name!r} to itself", "name two different SAEs")
    if x.model != y.model:
        raise AtlasError(f"{x.name!r} reads {x.model} but {y.name!r} reads {y.model}: only SAEs of one model can be related",
                         "pick two SAEs of the same model")
    if x.d_in != y.d_in:
        raise AtlasError(f"{x.name!r} reads {x.d_in}-dimensional activations but {y.name!r} reads {y.d_in}",
                         "relate SAEs of the same model's residual stream (or of sites of equal width)")
    if x.site == y.site:
        if x.d_sae == y.d_sae:
            return (x, y, "seed") if x.name < y.name else (y, x, "seed")
        return (x, y, "width") if x.d_sae < y.d_sae else (y, x, "width")
    return (x, y, "layer") if (x.layer, x.site) < (y.layer, y.site) else (y, x, "layer")


def _share(mask: np.ndarray, of: np.ndarray) -> float:
    return float((mask & of).sum() / max(of.sum(), 1))


def _best_match_hist(best: np.ndarray, alive: np.ndarray, bins: int = 20) -> dict:
    edges = np.linspace(0.0, 1.0, bins + 1)
    counts, _ = np.histogram(np.clip(best[alive], 0.0, 1.0), bins=edges)
    return {"edges": edges.round(4).tolist(), "counts": counts.astype(int).tolist()}


def encode_dtype(cfg: RelateConfig, device: torch.device) -> torch.dtype:
    if cfg.encode_dtype == "auto":
        from trainer.lm import cpu_has_fast_bf16

        fast = device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
        return torch.bfloat16 if fast else torch.float32
    return torch.bfloat16 if cfg.encode_dtype == "bfloat16" else torch.float32


@torch.no_grad()
def relate_saes(x: Side, y: Side, chunks: Iterable[dict[str, torch.Tensor]], cfg: RelateConfig | None = None,
                device=None, progress: bool = True) -> Relation:
    cfg = cfg or RelateConfig()
    cfg.validate()
    a, b, kind = order_pair(x, y)
    dev = torch.device(device) if device is not None else a.sae.W_dec.device
    sae_a, sae_b = a.sae.to(dev).eval(), b.sae.to(dev).eval()
    dtype = encode_dtype(cfg, dev)
    saved = sae_a.compute_dtype, sae_b.compute_dtype
    sae_a.compute_dtype = sae_b.compute_dtype = dtype  # the dense preactivation matmul only
    try:
        return _relate(a, b, kind, sae_a, sae_b, chunks, cfg, dev, progress, dtype)
    finally:
        sae_a.compute_dtype, sae_b.compute_dtype = saved


def _relate(a, b, kind, sae_a, sae_b, chunks, cfg, dev, progress, dtype) -> Relation:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    cand = decoder_candidates(sae_a.W_dec, sae_b.W_dec, cfg.k, cfg.min_cos, cfg.block)
    timings["candidates_s"] = time.perf_counter() - t0
    width = kind == "width"
    # width pairs: the codes of the first cofire_tokens tokens wait until their co-firing pairs have
    # joined the candidates, then go through the statistics like every later batch
    pending: list[tuple] | None = [] if width and cfg.cofire_tokens > 0 else None
    pending_n = 0
    stats = None if pending is not None else PairStats(a.d_sae, b.d_sae, cand.a, cand.b, dev)
    n_decoder = len(cand)

    def start_stats():
        nonlocal cand, stats, pending
        pa, pb = cofiring_pairs(pending, a.d_sae, b.d_sae, min(cfg.link_cofire, cfg.cofire_link), cfg.k)
        cand = with_pairs(cand, pa, pb, sae_a.W_dec, sae_b.W_dec)
        stats = PairStats(a.d_sae, b.d_sae, cand.a, cand.b, dev)
        for codes in pending:
            stats.update(*codes)
        pending = None

    stitch = StitchStats(sae_b.W_dec, dev, dtype) if width else None
    norm_sums = np.zeros(5)  # sum e_a, e_b, e_a^2, e_b^2, e_a e_b (per-token error norms)
    sample_e, sample_v, sample_i, sample_n = [], [], [], 0
    t1 = time.perf_counter()
    seen = 0
    from tqdm import tqdm

    bar = tqdm(total=cfg.tokens, unit="tok", unit_scale=True, desc=f"relating {a.name} and {b.name}",
               dynamic_ncols=True, disable=not progress, mininterval=1.0)
    for chunk in chunks:
        if a.site not in chunk or b.site not in chunk:
            raise AtlasError(f"the data has no {a.site if a.site not in chunk else b.site} activations",
                             "read both SAEs' sites in one pass")
        xa_all, xb_all = chunk[a.site], chunk[b.site]
        n_chunk = min(xa_all.shape[0], cfg.tokens - seen)
        for s in range(0, n_chunk, cfg.batch_tokens):
            e = min(s + cfg.batch_tokens, n_chunk)
            xa = xa_all[s:e].to(dev).float()
            xb = xa if a.site == b.site else xb_all[s:e].to(dev).float()
            ca, cb = sae_a.encode(xa), sae_b.encode(xb)
            if pending is not None:
                pending.append((ca.values, ca.indices, cb.values, cb.indices))
                pending_n += e - s
                if pending_n >= cfg.cofire_tokens:
                    start_stats()
            else:
                stats.update(ca.values, ca.indices, cb.values, cb.indices)
            if width:
                ea = xa - sae_a.output(ca, xa)
                eb = xb - sae_b.output(cb, xb)
                # B's latents as they add to the site: f_j d_j times B's output scale (imported SAEs)
                scale = sae_b.output_scale(xb)
                vb = cb.values.float() if scale is None else cb.values.float() * scale.float()
                cut = fold_cut(e - s)  # rows [:cut] fit the stitching gains, rows [cut:] evaluate them
                stitch.update(ea[:cut], vb[:cut], cb.indices[:cut], evaluate=False)
                stitch.update(ea[cut:], vb[cut:], cb.indices[cut:], evaluate=True)
                na, nb = ea.norm(dim=1).double(), eb.norm(dim=1).double()
                norm_sums += [float(na.sum()), float(nb.sum()), float((na * na).sum()), float((nb * nb).sum()),
                              float((na * nb).sum())]
                if sample_n < cfg.sample_tokens:  # from the fit fold: novel latents are chosen on the other
                    take = min(cut, cfg.sample_tokens - sample_n)
                    sample_e.append(ea[:take].cpu())
                    sample_v.append(vb[:take].cpu())
                    sample_i.append(cb.indices[:take].cpu())
                    sample_n += take
        seen += n_chunk
        bar.update(n_chunk)
        if seen >= cfg.tokens:
            break
    bar.close()
    if seen == 0:
        raise AtlasError("no tokens to relate the SAEs on", "check the corpus and split, or use a larger --tokens")
    if pending is not None:
        start_stats()
    timings["data_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    st = stats.result()
    alive_a, alive_b = st["count_a"] > 0, st["count_b"] > 0
    summary = {
        "kind": kind, "tokens": seen, "candidates": len(cand), "config": cfg.__dict__.copy(),
        "candidates_by_cofiring": len(cand) - n_decoder,
        "encode_dtype": str(dtype).removeprefix("torch."),
        "a": {"name": a.name, "site": a.site, "d_sae": a.d_sae, "alive": int(alive_a.sum())},
        "b": {"name": b.name, "site": b.site, "d_sae": b.d_sae, "alive": int(alive_b.sum())},
        "best_match": {"a": _best_match_hist(cand.best_a_cos, alive_a), "b": _best_match_hist(cand.best_b_cos, alive_b),
                       "mean_a": float(cand.best_a_cos[alive_a].mean()) if alive_a.any() else None,
                       "mean_b": float(cand.best_b_cos[alive_b].mean()) if alive_b.any() else None},
    }
    thresholds = []
    if width:
        links = _width_links(a, b, cand, st, stitch.result(), cfg, summary, sample_e, sample_v, sample_i, sae_b,
                             norm_sums, seen)
    else:
        links = _match_links(a, b, cand, st, cfg, summary, sae_a, sae_b)
    matched = links["label"] != ""
    for tau in THRESHOLDS:
        row = {"cos": tau, "a_best": _share(cand.best_a_cos >= tau, alive_a),
               "b_best": _share(cand.best_b_cos >= tau, alive_b)}
        if not width:
            good = matched & (links["cos"] >= tau)
            row["a_matched"] = float(good.sum() / max(alive_a.sum(), 1))
            row["a_confirmed"] = float((good & (links["label"] == MATCHED)).sum() / max(alive_a.sum(), 1))
        thresholds.append(row)
    summary["thresholds"] = thresholds
    timings["links_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t0
    summary["timings"] = timings
    return Relation(kind, a, b, links, summary)


def _match_links(a, b, cand, st, cfg, summary, sae_a, sae_b) -> dict[str, np.ndarray]:
    va, aware_a = match_vectors(sae_a)
    vb, aware_b = match_vectors(sae_b)
    if aware_a != aware_b:  # compare like with like: unit directions on both sides
        va, vb = va / va.norm(dim=1, keepdim=True).clamp_min(1e-12), vb / vb.norm(dim=1, keepdim=True).clamp_min(1e-12)
    alive_a, alive_b = st["count_a"] > 0, st["count_b"] > 0
    # a latent that never fired on the data has no activations to confirm a match with; left in,
    # dead near-copies of a latent take the matches of the live ones (in a seed pair, 225 of 431
    # pairs had a dead side)
    live = np.flatnonzero(alive_a[cand.a] & alive_b[cand.b])
    cost = pair_cost(va, vb, cand.a[live], cand.b[live])
    ma, mb = match(a.d_sae, b.d_sae, cand.a[live], cand.b[live], cost, max_cost=1.0 - cfg.match_cos)
    lookup = {(int(i), int(j)): m for m, (i, j) in enumerate(zip(cand.a, cand.b))}
    idx = np.array([lookup[(int(i), int(j))] for i, j in zip(ma, mb)], dtype=np.int64)
    rho = st["rho"][idx]
    label = np.where(rho >= cfg.confirm_rho, MATCHED, UNCONFIRMED).astype(object)
    n_alive = max(int(alive_a.sum()), 1)
    summary["matching"] = {
        "threshold_aware": bool(aware_a and aware_b), "pairs": len(idx),
        "excluded_dead": {"a": int((~alive_a).sum()), "b": int((~alive_b).sum()),
                          "rule": "latents that never fire on the data are not matched"},
        "confirmed": int((label == MATCHED).sum()),
        "persistence": float(((label == MATCHED) & alive_a[ma]).sum() / n_alive),
        "matched_share": float(alive_a[ma].sum() / n_alive),
        "mean_cos": float(cand.cos[idx].mean()) if len(idx) else None,
        "mean_rho": float(rho.mean()) if len(idx) else None,
        "rho_hist": {"edges": np.linspace(-1, 1, 21).round(2).tolist(),
                     "counts": np.histogram(rho, bins=np.linspace(-1, 1, 21))[0].astype(int).tolist()},
    }
    return {"a": ma, "b": mb, "label": label, "kind": np.full(len(idx), "", dtype=object),
            "cos": cand.cos[idx].astype(np.float64), "rho": rho,
            "p_b_given_a": st["p_b_given_a"][idx], "p_a_given_b": st["p_a_given_b"][idx],
            "stitch_gain": np.full(len(idx), np.nan)}


def _width_links(a, b, cand, st, stitched, cfg, summary, sample_e, sample_v, sample_i, sae_b, norm_sums, seen):
    novel_ok = (stitched["gain"] > 0) & (stitched["t"] >= cfg.stitch_t)
    q = cofire_q(st["n_ab"], st["count_b"][cand.b], st["count_a"][cand.a] / max(seen, 1))
    forest = split_forest(a.d_sae, b.d_sae, cand.a, cand.b, cand.cos, st["p_a_given_b"], st["p_b_given_a"], q,
                          st["count_a"], st["count_b"], seen, novel_ok, cfg.link_cos, cfg.link_cofire, cfg.cofire_link,
                          cfg.link_q)
    rows_a, rows_b, labels, kinds, cos, rho, pba, pab, gain = [], [], [], [], [], [], [], [], []
    for j in np.flatnonzero(forest.child_label != ""):
        m = forest.link[j]
        rows_a.append(forest.parent[j])
        rows_b.append(j)
        labels.append(forest.child_label[j])
        kinds.append(forest.kind[j])
        cos.append(cand.cos[m] if m >= 0 else cand.best_b_cos[j])
        rho.append(st["rho"][m] if m >= 0 else np.nan)
        pba.append(st["p_b_given_a"][m] if m >= 0 else np.nan)
        pab.append(st["p_a_given_b"][m] if m >= 0 else np.nan)
        gain.append(stitched["rel_gain"][j])
    for i in np.flatnonzero(forest.parent_label == "vanished"):
        rows_a.append(i)
        rows_b.append(-1)
        labels.append("vanished")
        kinds.append("")
        cos.append(cand.best_a_cos[i])
        rho += [np.nan]
        pba += [np.nan]
        pab += [np.nan]
        gain += [np.nan]
    links = {"a": np.array(rows_a, np.int64), "b": np.array(rows_b, np.int64), "label": np.array(labels, dtype=object),
             "kind": np.array(kinds, dtype=object), "cos": np.array(cos, np.float64), "rho": np.array(rho, np.float64),
             "p_b_given_a": np.array(pba, np.float64), "p_a_given_b": np.array(pab, np.float64),
             "stitch_gain": np.array(gain, np.float64)}
    pl, cl = forest.parent_label, forest.child_label
    split_children = forest.n_children[(pl == "split") | (pl == "persisted_split")]
    novel = cl == "novel"
    linked = forest.parent >= 0
    summary["splitting"] = {
        "parents": {k: int((pl == k).sum()) for k in ("persisted", "split", "persisted_split", "vanished")},
        "children": {k: int((cl == k).sum()) for k in ("persisted", "split", "persisted_split", "novel", "reconstruction")},
        "links": {k: int((forest.kind[linked] == k).sum()) for k in ("direction", "cofiring")},
        "cofiring_rule": {"min_share": cfg.cofire_link, "lift": COFIRE_LIFT, "q_max": cfg.link_q},
        "children_per_split": float(split_children.mean()) if len(split_children) else None,
        "max_children": int(forest.n_children.max()) if len(forest.n_children) else 0,
        "children_hist": np.bincount(np.minimum(forest.n_children[st["count_a"] > 0], 10), minlength=11).astype(int).tolist(),
        "stitch": {"eval_tokens": stitched["eval_tokens"], "t_min": cfg.stitch_t,
                   "novel_gain_sum": float(stitched["rel_gain"][novel].sum())},
    }
    s = norm_sums / max(seen, 1)
    var_a, var_b = s[2] - s[0] ** 2, s[3] - s[1] ** 2
    corr = (s[4] - s[0] * s[1]) / math.sqrt(var_a * var_b) if var_a > 0 and var_b > 0 else None
    capture = None
    if sample_e:
        e = torch.cat(sample_e).to(sae_b.W_dec.device)
        v = torch.cat(sample_v).to(e.device).float()
        i = torch.cat(sample_i).to(e.device).long()
        keep = torch.from_numpy(novel).to(e.device)[i] & (v > 0)
        added = F.embedding_bag(i, sae_b.W_dec.float(), per_sample_weights=(v * keep).float(), mode="sum").double()
        e = e.double()
        # the novel latents together as one extra component of A: its gain fitted by least squares on
        # the first half of the sample (fit-fold tokens), the share of A's error it removes measured on the second
        half = e.shape[0] // 2
        den = float(added[:half].pow(2).sum())
        c = float((e[:half] * added[:half]).sum()) / den if den > 0 else 0.0
        before = float(e[half:].pow(2).sum())
        fitted = float((e[half:] - c * added[half:]).pow(2).sum())
        as_is = float((e - added).pow(2).sum())
        capture = {"share": 1 - fitted / before if before > 0 else None, "gain": c,
                   "share_unscaled": 1 - as_is / float(e.pow(2).sum()) if before > 0 else None,
                   "tokens": int(e.shape[0]), "novel_latents": int(novel.sum()),
                   "measured_on": "fit fold (novel latents are selected on the evaluation fold)"}
    summary["dark_matter"] = {"error_norm_correlation": corr, "novel_capture": capture,
                              "narrow_mse": s[2], "wide_mse": s[3]}
    return links
