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
