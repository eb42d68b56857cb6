"""Relating two SAEs: recovered splitting trees, exact matching, and each statistic against a
brute-force computation of its definition.

The synthetic hierarchy plants P parent directions u_p, each with C children u_c = a u_p + b v_c
(v_c orthonormal details, orthogonal to every parent), plus a few standalone directions. A token
switches on each parent with probability 0.15 and then one of its children; the standalone
features fire rarely. A narrow TopK SAE with P latents can only afford the parents (its latents
land on u_p); a wide one with P*C + standalone latents learns the children. The planted edges are
parent -> child; a relation must recover them, and call the standalone latents of the wide SAE
novel (nothing in the narrow SAE is their parent, and adding them lowers its error).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from store.errors import AtlasError
from trainer.relate import RelateConfig, Side, order_pair, relate_saes
from trainer.relate.candidates import decoder_candidates, match_vectors, pair_cost
from trainer.relate.cofiring import PairStats
from trainer.relate.matching import match
from trainer.relate.stitching import StitchStats

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D, P, C, NS = 64, 12, 3, 4
ALPHA = 0.8  # cos(child, parent)


def hierarchy():
    rng = np.random.default_rng(123)
    q, _ = np.linalg.qr(rng.standard_normal((D, D)))
    basis = q.T  # orthonormal rows
    parents = basis[:P]
    details = basis[P:P + P * C].reshape(P, C, D)
    standalone = basis[P + P * C:P + P * C + NS]
    children = ALPHA * parents[:, None, :] + np.sqrt(1 - ALPHA**2) * details
    return parents, children.reshape(P * C, D), standalone


def sample(n: int, seed: int) -> np.ndarray:
    parents, children, standalone = hierarchy()
    rng = np.random.default_rng(seed)
    on = rng.random((n, P)) < 0.15
    which = rng.integers(0, C, (n, P))
    mags = rng.uniform(0.5, 1.5, (n, P)) * on
    x = np.einsum("np,npd->nd", mags, children[np.arange(P)[None, :] * C + which])
    x += (rng.uniform(0.5, 1.5, (n, NS)) * (rng.random((n, NS)) < 0.04)) @ standalone
    x += rng.standard_normal((n, D)) * 0.01
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(narrow, wide) SAEs trained on the hierarchy with the real trainer (one sweep)."""
    from trainer.formats import load_sae
    from trainer.train import TrainConfig, train

    root = tmp_path_factory.mktemp("hierarchy")
    np.save(root / "acts.npy", sample(150_000, 0))
    cfg = TrainConfig(out=root / "sweep", activations=root / "acts.npy", site=["resid_post.0"], width=[P, P * C + NS],
                      k=[3], tokens=300_000, batch_size=512, device="cpu", ce_contexts=0, checkpoint_every=0,
                      log_every=200, eval_tokens=4096, lr=3e-3, dead_after_tokens=10_000, aux_coefficient=1 / 8, aux_k=4)
    narrow, wide = (load_sae(f).sae for f in train(cfg))
    return narrow, wide


def chunks(x: np.ndarray, site: str = "resid_post.0", step: int = 4096):
    t = torch.from_numpy(x)
    return ({site: t[s:s + step]} for s in range(0, len(t), step))


def unit(w) -> np.ndarray:
    w = np.asarray(w.detach() if isinstance(w, torch.Tensor) else w, dtype=np.float64)
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def test_synthetic_hierarchy_trees_are_recovered(pair):
    narrow, wide = pair
    parents, children, standalone = hierarchy()
    held_out = sample(40_000, 1)
    rel = relate_saes(Side("narrow", narrow, "resid_post.0", "m"), Side("wide", wide, "resid_post.0", "m"),
                      chunks(held_out), RelateConfig(tokens=40_000, encode_dtype="float32"), progress=False)
    assert rel.kind == "width" and rel.a.name == "narrow"
    # which planted direction each learned latent stands for
    p_of = (unit(narrow.W_dec) @ unit(parents).T).argmax(1)
    planted = np.concatenate([children, standalone])
    c_of = (unit(wide.W_dec) @ unit(planted).T).argmax(1)
    L = rel.links
    found = {(int(p_of[i]), int(c_of[j])) for i, j in zip(L["a"], L["b"]) if i >= 0 and j >= 0}
    truth = {(p, p * C + c) for p in range(P) for c in range(C)}
    precision = len(found & truth) / max(len(found), 1)
    recall = len(found & truth) / len(truth)
    assert precision >= 0.8 and recall >= 0.5, (precision, recall, json.dumps(rel.summary["splitting"]))
    # the standalone features have no parent in the narrow SAE: the wide latents that learned them are novel
    standalone_latents = [j for j in range(wide.W_dec.shape[0])
                          if c_of[j] >= P * C and (unit(wide.W_dec[j:j + 1]) @ unit(planted[c_of[j]:c_of[j] + 1]).T) > 0.9]
    labels = dict(zip(L["b"].tolist(), L["label"].tolist()))
    assert standalone_latents and all(labels.get(j) == "novel" for j in standalone_latents), \
        [(j, labels.get(j)) for j in standalone_latents]
    assert rel.summary["splitting"]["parents"]["split"] >= P // 2
    dm = rel.summary["dark_matter"]
    assert dm["novel_capture"]["share"] > 0 and 0 < dm["error_norm_correlation"] <= 1


def test_a_permuted_perturbed_copy_is_matched_exactly(pair):
    _, wide = pair
    gen = torch.Generator().manual_seed(7)
    perm = torch.randperm(wide.W_dec.shape[0], generator=gen)
    copy = type(wide)(wide.cfg)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec"):
            src = getattr(wide, name)[perm]
            getattr(copy, name).copy_(src + 0.01 * src.std() * torch.randn(src.shape, generator=gen))
        copy.b_dec.copy_(wide.b_dec)
    rel = relate_saes(Side("orig", wide, "resid_post.0", "m"), Side("perm", copy, "resid_post.0", "m"),
                      chunks(sample(20_000, 2)), RelateConfig(tokens=20_000, encode_dtype="float32"), progress=False)
    assert rel.kind == "seed"
    a, b = (rel.b, rel.a) if rel.a.name == "perm" else (rel.a, rel.b)
    L = rel.links
    pairs = dict(zip(L["a"].tolist(), L["b"].tolist())) if rel.a.name == "orig" else dict(zip(L["b"].tolist(), L["a"].tolist()))
    inverse = torch.argsort(perm).tolist()  # latent i of the original is latent inverse[i] of the copy
    assert len(pairs) == wide.W_dec.shape[0]
    assert all(pairs[i] == inverse[i] for i in range(wide.W_dec.shape[0]))
    assert (L["label"] == "matched").all() and rel.summary["matching"]["persistence"] == 1.0


def test_dense_and_sparse_matching_find_the_same_optimum():
    rng = np.random.default_rng(0)
    for trial in range(5):
        n_a, n_b = 40 + trial, 55
        a = rng.integers(0, n_a, 400)
        b = rng.integers(0, n_b, 400)
        key, first = np.unique(a * n_b + b, return_index=True)
        a, b = key // n_b, key % n_b
        cost = rng.random(len(a))

        def total(pairs):
            lookup = {(i, j): c for i, j, c in zip(a, b, cost)}
            m = list(zip(*pairs))
            assert len({i for i, _ in m}) == len(m) and len({j for _, j in m}) == len(m)  # one-to-one
            assert all(lookup[p] < 0.6 for p in m)
            return sum(lookup[p] for p in m) - 0.6 * len(m)  # the objective: matched cost minus max_cost each

        dense = match(n_a, n_b, a, b, cost, 0.6, "dense")
        sparse = match(n_a, n_b, a, b, cost, 0.6, "sparse")
        assert total(dense) == pytest.approx(total(sparse), abs=1e-9)
        assert len(dense[0]) > 0


def test_candidates_equal_a_dense_top_k():
    rng = np.random.default_rng(1)
    da, db = torch.from_numpy(rng.standard_normal((300, 16))).float(), torch.from_numpy(rng.standard_normal((410, 16))).float()
    cand = decoder_candidates(da, db, k=5, min_cos=0.1, block=64)
    sims = unit(da) @ unit(db).T
    want = set()
    for i in range(300):
        want |= {(i, int(j)) for j in np.argsort(-sims[i])[:5] if sims[i, j] >= 0.1}
    for j in range(410):
        want |= {(int(i), j) for i in np.argsort(-sims[:, j])[:5] if sims[i, j] >= 0.1}
    assert set(zip(cand.a.tolist(), cand.b.tolist())) == want
    np.testing.assert_allclose(cand.cos, sims[cand.a, cand.b], atol=1e-5)
    np.testing.assert_allclose(cand.best_a_cos, sims.max(1), atol=1e-5)
    np.testing.assert_allclose(cand.best_b_cos, sims.max(0), atol=1e-5)


def test_threshold_aware_cost_compares_theta_times_direction():
    from trainer.sae import SAEConfig, build_sae

    sae = build_sae(SAEConfig(d_in=8, d_sae=4, architecture="jumprelu"))
    with torch.no_grad():
        sae.threshold.copy_(torch.tensor([0.5, 1.0, 2.0, 4.0]))
    v, aware = match_vectors(sae)
    assert aware
    torch.testing.assert_close(v, sae.W_dec.detach() * sae.threshold.detach()[:, None])
    # the same direction at thresholds 0.5 and 2: cost ||0.5 d - 2 d||^2 / (0.25 + 4) ||d||^2 = 2.25 / 4.25
    same = torch.stack([sae.W_dec[0] * 0.5, sae.W_dec[0] * 2.0]).detach()
    assert pair_cost(same[:1], same[1:], np.array([0]), np.array([0]))[0] == pytest.approx(2.25 / 4.25, rel=1e-5)
    topk = build_sae(SAEConfig(d_in=8, d_sae=4, architecture="topk", k=2))
    u, aware = match_vectors(topk)
    assert not aware and torch.allclose(u.norm(dim=1), torch.ones(4))


def test_cofiring_statistics_equal_their_definitions():
    rng = np.random.default_rng(2)
    n, fa, fb, k = 3000, 30, 50, 4
    dense_a = np.zeros((n, fa))
    dense_b = np.zeros((n, fb))
    ia = np.stack([rng.choice(fa, k, replace=False) for _ in range(n)])
    # slot 0 of B follows slot 0 of A, so that some pairs co-fire often (indices stay distinct per token)
    ib = np.stack([np.concatenate([[first], rng.choice(np.setdiff1d(np.arange(fb), [first]), k - 1, replace=False)])
                   for first in ia[:, 0] % fb])
    va = rng.random((n, k)) * (rng.random((n, k)) < 0.8)
    vb = rng.random((n, k)) * (rng.random((n, k)) < 0.8)
    np.put_along_axis(dense_a, ia, va, 1)
    np.put_along_axis(dense_b, ib, vb, 1)
    a = rng.integers(0, fa, 200)
    b = rng.integers(0, fb, 200)
    key = np.unique(a * fb + b)
    a, b = key // fb, key % fb
    st = PairStats(fa, fb, a, b)
    for s in range(0, n, 700):
        st.update(*(torch.from_numpy(t[s:s + 700]) for t in (va, ia, vb, ib)))
    r = st.result()
    fire_a, fire_b = dense_a > 0, dense_b > 0
    for m in range(len(a)):
        i, j = a[m], b[m]
        both = (fire_a[:, i] & fire_b[:, j]).sum()
        assert r["n_ab"][m] == both
        assert r["p_b_given_a"][m] == pytest.approx(both / max(fire_a[:, i].sum(), 1))
        assert r["p_a_given_b"][m] == pytest.approx(both / max(fire_b[:, j].sum(), 1))
        assert r["rho"][m] == pytest.approx(np.corrcoef(dense_a[:, i], dense_b[:, j])[0, 1], abs=1e-6)  # float32 codes


def test_stitching_gain_equals_a_brute_force_recomputation():
    rng = np.random.default_rng(3)
    n, d, fb, k = 2000, 12, 20, 3
    dec = rng.standard_normal((fb, d))
    idx = np.stack([rng.choice(fb, k, replace=False) for _ in range(n)])
    val = rng.random((n, k)) * (rng.random((n, k)) < 0.7)
    f = np.zeros((n, fb))
    np.put_along_axis(f, idx, val, 1)
    # the narrow SAE's error: partly explained by latent 0's contribution, plus noise
    e = 0.7 * f[:, :1] * dec[0] + 0.3 * rng.standard_normal((n, d))
    fold = np.arange(n) % 2 == 1  # evaluation rows
    st = StitchStats(torch.from_numpy(dec).float())
    for s in range(0, n, 250):
        rows = slice(s, s + 250)
        for ev in (False, True):
            sel = fold[rows] == ev
            st.update(torch.from_numpy(e[rows][sel]).float(), torch.from_numpy(val[rows][sel]).float(),
                      torch.from_numpy(idx[rows][sel]), evaluate=ev)
    r = st.result()
    sse = (e[fold] ** 2).sum()
    for j in range(fb):
        x_fit = (f[~fold, j][:, None] * dec[j]).ravel()  # the extra latent's contribution, one regressor
        c, *_ = np.linalg.lstsq(x_fit[:, None], e[~fold].ravel(), rcond=None)
        added = c[0] * f[fold, j][:, None] * dec[j]
        gain = sse - ((e[fold] - added) ** 2).sum()
        delta = (e[fold] ** 2).sum(1) - ((e[fold] - added) ** 2).sum(1)  # per evaluation token
        t = delta.mean() / (delta.std() / np.sqrt(len(delta)))
        assert r["c"][j] == pytest.approx(c[0], rel=1e-4, abs=1e-6)
        assert r["gain"][j] == pytest.approx(gain, rel=1e-4, abs=1e-5)
        assert r["rel_gain"][j] == pytest.approx(gain / sse, rel=1e-4, abs=1e-7)
        assert r["t"][j] == pytest.approx(t, rel=1e-3, abs=1e-3)
    assert r["t"][0] > 5 and r["gain"][0] > 0  # the planted latent clearly lowers the error


def test_bad_pairs_are_refused_in_one_line(pair):
    narrow, wide = pair
    x = Side("x", narrow, "resid_post.0", "model-a")
    with pytest.raises(AtlasError, match="cannot relate 'x' to itself"):
        order_pair(x, Side("x", wide, "resid_post.0", "model-a"))
    with pytest.raises(AtlasError, match="only SAEs of one model"):
        order_pair(x, Side("y", wide, "resid_post.0", "model-b"))
    from trainer.sae import SAEConfig, build_sae

    other = build_sae(SAEConfig(d_in=32, d_sae=16, architecture="topk", k=2))
    with pytest.raises(AtlasError, match="64-dimensional activations but 'y' reads 32"):
        order_pair(x, Side("y", other, "resid_post.0", "model-a"))
    assert order_pair(Side("w", wide, "resid_post.3", "m"), Side("n", narrow, "resid_post.2", "m"))[2] == "layer"
    assert order_pair(Side("w", wide, "resid_post.3", "m"), Side("n", narrow, "resid_post.3", "m"))[0].name == "n"
    with pytest.raises(AtlasError, match="no tokens"):
        relate_saes(x, Side("y", wide, "resid_post.0", "model-a"), iter([]), RelateConfig(), progress=False)
    with pytest.raises(AtlasError, match="--min-cos"):
        RelateConfig(min_cos=3).validate()


def test_a_bfloat16_encoder_barely_moves_the_statistics(pair):
    """Relating encodes with a bfloat16 matmul where that is fast; the links must hardly change."""
    narrow, wide = pair
    held_out = sample(20_000, 3)
    rels = {dt: relate_saes(Side("narrow", narrow, "resid_post.0", "m"), Side("wide", wide, "resid_post.0", "m"),
                            chunks(held_out), RelateConfig(tokens=20_000, encode_dtype=dt), progress=False)
            for dt in ("float32", "bfloat16")}
    assert rels["bfloat16"].summary["encode_dtype"] == "bfloat16" and narrow.compute_dtype == torch.float32
    f, b = rels["float32"].links, rels["bfloat16"].links
    by_child = {dt: dict(zip(r.links["b"].tolist(), zip(r.links["a"].tolist(), r.links["label"].tolist())))
                for dt, r in rels.items()}
    same = sum(by_child["bfloat16"].get(j) == v for j, v in by_child["float32"].items())
    assert same / len(by_child["float32"]) >= 0.95
    rho_b = dict(zip(b["b"].tolist(), b["rho"].tolist()))
    diffs = [abs(r - rho_b[j]) for j, r in zip(f["b"].tolist(), f["rho"].tolist()) if j in rho_b and np.isfinite(r)
             and np.isfinite(rho_b[j])]
    assert diffs and max(diffs) < 0.02


# --- imported SAEs, dead latents, folds, co-firing links -------------------------------------------

def imported_topk(d: int, width: int, k: int, io_kind: str, seed: int):
    """A random TopK SAE with what imported SAEs add around it: SAELens's constant_norm_rescale, or a
    skip term W_skip x (sparsify's skip_connection)."""
    from trainer.formats.common import SiteIO
    from trainer.sae import SAEConfig, build_sae

    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(d_in=d, d_sae=width, architecture="topk", k=k)).eval().requires_grad_(False)
    with torch.no_grad():
        sae.b_dec.copy_(0.3 * torch.randn(d))
        sae.b_enc.copy_(0.1 * torch.randn(width))
    if io_kind == "norm":
        sae.io = SiteIO("constant_norm_rescale")
    else:
        sae.io = SiteIO(w_skip=0.2 * torch.randn(d, d))
    return sae


def brute_force(sae, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x_hat, dense f, raw-unit scale per token) of a TopK SAE with a SiteIO, from its definition."""
    w_enc, b_enc = sae.W_enc.double().numpy(), sae.b_enc.double().numpy()
    w_dec, b_dec = sae.W_dec.double().numpy(), sae.b_dec.double().numpy()
    x = x.astype(np.float64)
    d = x.shape[1]
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    scale = norm / np.sqrt(d) if sae.io.input_norm == "constant_norm_rescale" else np.ones_like(norm)
    z = (x / scale - b_dec) @ w_enc.T + b_enc
    f = np.zeros_like(z)
    top = np.argsort(-z, axis=1)[:, :sae.cfg.k]
    np.put_along_axis(f, top, np.maximum(np.take_along_axis(z, top, 1), 0), 1)
    x_hat = (f @ w_dec + b_dec) * scale
    if sae.io.W_skip is not None:
        x_hat += x @ sae.io.W_skip.double().numpy().T
    return x_hat, f, scale


@pytest.mark.parametrize("io_kind", ["norm", "skip"])
def test_relate_measures_errors_with_the_saes_own_reconstruction(io_kind):
    """Errors, their norms' correlation and the stitching gains of imported SAEs (input normalisation,
    skip term) against their definitions; x - decode(f) ignored both (FVU 0.922 for 0.986)."""
    d, n, batch = 12, 3000, 500
    narrow, wide = imported_topk(d, 16, 3, io_kind, 0), imported_topk(d, 40, 4, io_kind, 1)
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((n, d)) * rng.uniform(0.5, 3.0, (n, 1)) + 1.0).astype(np.float32)
    rel = relate_saes(Side("n", narrow, "resid_post.0", "m"), Side("w", wide, "resid_post.0", "m"),
                      [{"resid_post.0": torch.from_numpy(x)}], RelateConfig(tokens=n, batch_tokens=batch,
                                                                             encode_dtype="float32"), progress=False)
    xa, _, _ = brute_force(narrow, x)
    xb, fb, scale_b = brute_force(wide, x)
    ea, eb = x - xa, x - xb
    dm = rel.summary["dark_matter"]
    assert dm["narrow_mse"] == pytest.approx((ea**2).sum(1).mean(), rel=1e-4)
    assert dm["wide_mse"] == pytest.approx((eb**2).sum(1).mean(), rel=1e-4)
    na, nb = np.linalg.norm(ea, axis=1), np.linalg.norm(eb, axis=1)
    assert dm["error_norm_correlation"] == pytest.approx(np.corrcoef(na, nb)[0, 1], abs=1e-4)
    # the stitching test: B's latent j adds c f_j d_j in raw units (f_j times B's output scale); each
    # batch's first half fits c, its second half measures the gain
    fold = np.tile(np.arange(batch) >= batch // 2, n // batch)
    dec = wide.W_dec.double().numpy()
    contrib = fb * scale_b  # [n, F_B] raw-unit activations
    u = contrib * (ea @ dec.T)
    w = contrib**2 * (dec**2).sum(1)
    c = u[~fold].sum(0) / np.where(w[~fold].sum(0) > 0, w[~fold].sum(0), 1)
    gain = 2 * c * u[fold].sum(0) - c**2 * w[fold].sum(0)
    rel_gain = gain / (ea[fold] ** 2).sum()
    L = rel.links
    rows = L["b"] >= 0
    assert rows.sum() > 10
    np.testing.assert_allclose(L["stitch_gain"][rows], rel_gain[L["b"][rows]], rtol=1e-3, atol=1e-7)


def test_the_analysis_pass_gives_dark_matter_the_saes_own_error(tiny_lm, tiny_sae_dir, tmp_path, monkeypatch):
    """The analysis feeds dark matter e = x - x_hat with x_hat from the SAE's own output (here with
    SAELens's constant_norm_rescale and with a skip term), checked row by row against brute force."""
    from trainer.analyze import AnalyzeConfig, Analyzer
    from trainer.darkmatter import DarkMatter
    from trainer.formats import load_sae
    from trainer.formats.common import SiteIO

    seen = []
    real = DarkMatter.update

    def spy(self, x, e, *args, **kwargs):
        seen.append((x.detach().cpu().numpy().copy(), e.detach().cpu().numpy().copy()))
        return real(self, x, e, *args, **kwargs)

    monkeypatch.setattr(DarkMatter, "update", spy)
    for io in (SiteIO("constant_norm_rescale"), SiteIO(w_skip=0.1 * torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))):
        loaded = load_sae(tiny_sae_dir)
        loaded.sae.io = io
        seen.clear()
        Analyzer(AnalyzeConfig(sae_dir=tiny_sae_dir, tokens=600, device="cpu", lm_dtype="float32", shard_contexts=8,
                               out=tmp_path / io.input_norm, dm_ce_contexts=0, dm_warmup_tokens=200), tiny_lm,
                 loaded).run(progress=False)
        assert seen
        for x, e in seen:
            x_hat, _, _ = brute_force(loaded.sae, x)
            np.testing.assert_allclose(e, x - x_hat, rtol=1e-3, atol=1e-3 * np.abs(x).max())


def test_dead_latents_never_take_a_live_latents_match():
    """Seed pair: B holds a live, perturbed copy of each of A's first latents and a dead exact copy
    (it never fires). The dead copies are closer in direction; they must not take the matches."""
    from trainer.sae import SAEConfig, build_sae

    d, width, n_dead = 16, 32, 8
    torch.manual_seed(3)
    a = build_sae(SAEConfig(d_in=d, d_sae=width, architecture="topk", k=4)).eval().requires_grad_(False)
    b = build_sae(SAEConfig(d_in=d, d_sae=width, architecture="topk", k=4)).eval().requires_grad_(False)
    with torch.no_grad():
        noisy = a.W_dec[:width - n_dead] + 0.25 * torch.randn(width - n_dead, d) / d**0.5  # cos ~0.97
        noisy /= noisy.norm(dim=1, keepdim=True)
        b.W_dec[:width - n_dead] = noisy
        b.W_enc[:width - n_dead] = noisy
        b.W_dec[width - n_dead:] = a.W_dec[:n_dead]  # exact copies of A's first latents...
        b.W_enc[width - n_dead:] = a.W_enc[:n_dead]
        b.b_enc[width - n_dead:] = -1e4  # ...that never fire
    x = torch.randn(6000, d)
    rel = relate_saes(Side("a", a, "resid_post.0", "m"), Side("b", b, "resid_post.0", "m"), [{"resid_post.0": x}],
                      RelateConfig(tokens=6000, encode_dtype="float32"), progress=False)
    assert rel.kind == "seed"
    pairs = dict(zip(rel.links["a"].tolist(), rel.links["b"].tolist()))
    assert not set(pairs.values()) & set(range(width - n_dead, width))
    assert all(pairs.get(i) == i for i in range(n_dead)), pairs
    assert rel.summary["matching"]["excluded_dead"]["b"] == n_dead


def test_data_in_one_chunk_still_has_an_evaluation_fold(pair):
    """One chunk, one batch: half of it evaluates the stitching test (novel latents are found) and
    the share the novel latents capture is measured on the other half, the fit fold."""
    narrow, wide = pair
    n = 20_000
    x = sample(n, 4)
    rel = relate_saes(Side("narrow", narrow, "resid_post.0", "m"), Side("wide", wide, "resid_post.0", "m"),
                      [{"resid_post.0": torch.from_numpy(x)}], RelateConfig(tokens=n, batch_tokens=n,
                                                                             encode_dtype="float32"), progress=False)
    sp, cap = rel.summary["splitting"], rel.summary["dark_matter"]["novel_capture"]
    assert sp["stitch"]["eval_tokens"] == n // 2 and sp["children"]["novel"] > 0
    # brute force on the fit fold (rows [:n/2]): A's error, the novel latents' sum, one least-squares gain
    with torch.no_grad():
        fit = torch.from_numpy(x[:n // 2])
        e = (fit - narrow(fit)).double().numpy()
        novel = [j for j, lab in zip(rel.links["b"].tolist(), rel.links["label"].tolist()) if lab == "novel"]
        f = wide.encode(fit).dense(wide.cfg.d_sae).double().numpy()
    added = f[:, novel] @ wide.W_dec.detach().double().numpy()[novel]
    half = len(e) // 2
    c = (e[:half] * added[:half]).sum() / (added[:half] ** 2).sum()
    share = 1 - ((e[half:] - c * added[half:]) ** 2).sum() / (e[half:] ** 2).sum()
    assert cap["tokens"] == n // 2 and cap["share"] == pytest.approx(share, rel=1e-4)


def test_cofiring_q_values_are_benjamini_hochberg_by_hand():
    from trainer.relate.splitting import cofire_q

    # P(X >= n_ab), X ~ Binomial(count_b, rate): 4 of 4 at 0.5 -> 1/16; 1 of 2 at 0.5 -> 3/4; 3 of 3 at 0.1 -> 0.001.
    # Sorted 0.001, 0.0625, 0.75 (m = 3): p m / rank = 0.003, 0.09375, 0.75; running minimum from the
    # largest, in the original order: 0.09375, 0.75, 0.003.
    q = cofire_q(np.array([4, 1, 3]), np.array([4, 2, 3]), np.array([0.5, 0.5, 0.1]))
    assert q == pytest.approx([0.09375, 0.75, 0.003])


def test_children_are_linked_by_cofiring_and_a_surviving_parent_is_persisted_and_split():
    from trainer.relate.splitting import split_forest

    # A latent 0 (fires on 10% of 1000 tokens); B: 0 = its copy, 1 = a child pointing elsewhere that
    # fires only inside it, 2 = like 1 but not significant, 3 = inside a parent that fires everywhere
    a, b = np.array([0, 0, 0, 1]), np.array([0, 1, 2, 3])
    cos = np.array([0.97, 0.05, 0.05, 0.1])
    p_ab, p_ba = np.array([0.95, 0.9, 0.9, 0.95]), np.array([0.9, 0.3, 0.3, 0.1])
    q = np.array([1e-9, 1e-6, 0.2, 1e-9])
    forest = split_forest(2, 4, a, b, cos, p_ab, p_ba, q, count_a=np.array([100, 900]), count_b=np.array([95, 33, 5, 80]),
                          tokens=1000, novel_ok=np.zeros(4, bool))
    assert forest.parent.tolist() == [0, 0, -1, -1]
    assert forest.kind.tolist() == ["direction", "cofiring", "", ""]
    assert forest.parent_label[0] == "persisted_split" and forest.child_label[1] == "persisted_split"
    assert forest.child_label[2] == forest.child_label[3] == "reconstruction"
    # without the surviving copy, the same children make a plain split
    forest = split_forest(1, 3, np.array([0, 0]), np.array([1, 2]), np.array([0.05, 0.9]), np.array([0.9, 0.9]),
                          np.array([0.3, 0.3]), np.array([1e-6, 1e-6]), count_a=np.array([100]),
                          count_b=np.array([0, 33, 30]), tokens=1000, novel_ok=np.zeros(3, bool))
    assert forest.parent_label[0] == "split" and forest.kind.tolist() == ["", "cofiring", "direction"]


def test_relate_recovers_saelens_hierarchy_of_children_in_new_directions():
    """SAELens's sae_lens.synthetic hierarchy (tests/fixtures/hierarchy.npz, written by
    benchmarks/relate_hierarchy.py generate): two SAEs of our trainer, related; parent -> child links
    among recovered latents are scored against SAELens's ground-truth tree."""
    from pathlib import Path

    from benchmarks.relate_hierarchy import load, measure

    path = Path(__file__).parent / "fixtures" / "hierarchy.npz"
    data = load(path)
    np.testing.assert_allclose(data["x"][:len(data["check"])], data["check"], atol=1e-5)  # the rows SAELens made
    out = measure(path)
    assert out["truth"] >= 8 and out["precision"] >= 0.8 and out["recall"] >= 0.8, out
    assert out["correct_by_kind"].get("cofiring", 0) >= 1, out  # children linked whatever their direction
