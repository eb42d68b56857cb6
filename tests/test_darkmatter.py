"""What an SAE misses: the streamed statistics against numpy computing their definitions, and the
analysis pass reading the activation cache exactly as it reads the LM."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trainer.darkmatter import DarkMatter, DarkMatterConfig, concentration, ridge_fit, spliced_token_losses

pytestmark = pytest.mark.usefixtures("one_torch_thread")

T, D, V = 16, 12, 50


def synthetic(n_ctx: int, seed: int = 0):
    """Contexts of T tokens: x with a non-zero mean and correlated dimensions; an error that is
    partly linear in x (plus an offset), partly nonlinear, partly noise."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((D, D))
    x = (rng.standard_normal((n_ctx * T, D)) @ mix + 3.0).astype(np.float32)
    a = rng.standard_normal((D, D)) * 0.2
    e = (x @ a + 0.5 + 0.3 * np.tanh(x[:, :1] * x[:, 1:2]) + 0.1 * rng.standard_normal((n_ctx * T, D))).astype(np.float32)
    tokens = rng.integers(0, V, (n_ctx, T))
    return x, e, tokens


def feed(dm: DarkMatter, x, e, tokens, batch_ctx: int = 7, mask=None) -> np.ndarray:
    """Stream the contexts in batches; returns each row's fold (the first half of each batch's
    contexts in fold 0, the rest in fold 1; a batch of one context alternates)."""
    n_ctx = tokens.shape[0]
    mask = np.ones((n_ctx, T), bool) if mask is None else mask
    rows = np.concatenate([[0], np.cumsum(mask.sum(1))])
    fold = np.zeros(rows[-1], int)
    for c0 in range(0, n_ctx, batch_ctx):
        c1 = min(c0 + batch_ctx, n_ctx)
        r = slice(rows[c0], rows[c1])
        if c1 - c0 >= 2:
            half = c0 + (c1 - c0) // 2
            fold[rows[c0]:rows[half]], fold[rows[half]:rows[c1]] = 0, 1
        else:
            fold[r] = c0 % 2
        dm.update(torch.from_numpy(x[r]), torch.from_numpy(e[r]), torch.from_numpy(mask[c0:c1]),
                  torch.from_numpy(tokens[c0:c1]), c0)
    return fold


def lstsq_r2(xf, yf, xg, yg):
    """OLS with an intercept fitted on (xf, yf), scored on (xg, yg): (SSE, SST)."""
    af = np.hstack([xf, np.ones((len(xf), 1))])
    w, *_ = np.linalg.lstsq(af, yf, rcond=None)
    pred = np.hstack([xg, np.ones((len(xg), 1))]) @ w
    return ((yg - pred) ** 2).sum(), ((yg - yg.mean(0)) ** 2).sum()


def test_streamed_ridge_agrees_with_numpy_least_squares():
    n_ctx = 400
    x, e, tokens = synthetic(n_ctx)
    dm = DarkMatter(D, T, V, DarkMatterConfig(ridge=1e-10, warmup_tokens=10**9), torch.device("cpu"))
    fold = feed(dm, x, e, tokens)
    lin = dm.linear_predictability()
    x64, e64 = x.astype(np.float64), e.astype(np.float64)
    r = np.linalg.norm(e64, axis=1)[:, None]
    sse = sst = sse_r = sst_r = 0.0
    for f, g in ((0, 1), (1, 0)):
        s1, s2 = lstsq_r2(x64[fold == f], e64[fold == f], x64[fold == g], e64[fold == g])
        sse, sst = sse + s1, sst + s2
        s1, s2 = lstsq_r2(x64[fold == f], r[fold == f], x64[fold == g], r[fold == g])
        sse_r, sst_r = sse_r + s1, sst_r + s2
    assert lin["r2_error"] == pytest.approx(1 - sse / sst, rel=1e-5)
    assert lin["r2_norm"] == pytest.approx(1 - sse_r / sst_r, rel=1e-5)
    s1, s2 = lstsq_r2(x64, e64, x64, e64)
    assert lin["r2_error_in_sample"] == pytest.approx(1 - s1 / s2, rel=1e-5)
    assert 0.3 < lin["r2_error"] < 0.99  # the planted error is neither all linear nor all noise
    # the map itself: ridge on the merged sums equals numpy's coefficients
    both = dm.folds[0].merged(dm.folds[1])
    w, mx, me, _ = ridge_fit(both.sxx, both.sx, both.se, both.sxe, float(both.n), 1e-10)
    w_np, *_ = np.linalg.lstsq(np.hstack([x64, np.ones((len(x64), 1))]), e64, rcond=None)
    np.testing.assert_allclose(w.numpy(), w_np[:D], rtol=1e-3, atol=1e-4)  # float32 products per batch


def test_fvu_by_position_and_token_are_shares_of_the_total_variance():
    n_ctx = 120
    x, e, tokens = synthetic(n_ctx, seed=1)
    mask = np.ones((n_ctx, T), bool)
    mask[:, 0] = False  # BOS
    x, e = x.reshape(n_ctx, T, D)[mask], e.reshape(n_ctx, T, D)[mask]
    dm = DarkMatter(D, T, V, DarkMatterConfig(min_token_count=1, listed_tokens=V), torch.device("cpu"))
    feed(dm, x, e, tokens, mask=mask)
    out = dm.finalize()
    x64, e64 = x.astype(np.float64), e.astype(np.float64)
    err = (e64**2).sum(1)
    var = ((x64 - x64.mean(0)) ** 2).sum()
    assert out["fvu"] == pytest.approx(err.sum() / var, rel=1e-6)
    pos = np.nonzero(mask)[1]
    per_token_var = var / len(x64)
    fvu_pos = out["by_position"]["fvu"]
    assert fvu_pos[0] is None
    for p in range(1, T):
        assert fvu_pos[p] == pytest.approx(err[pos == p].mean() / per_token_var, rel=1e-6)
    counts = np.array(out["by_position"]["count"])
    assert np.dot(counts[1:], fvu_pos[1:]) / counts.sum() == pytest.approx(out["fvu"], rel=1e-6)
    tok = tokens[mask]
    rows = out["by_token"]["most_error"]
    assert sum(r["error_share"] for r in rows) == pytest.approx(1.0)
    for r in rows:
        v = r["token_id"]
        assert r["count"] == (tok == v).sum()
        assert r["fvu"] == pytest.approx(err[tok == v].mean() / per_token_var, rel=1e-6)
    fvus = [r["fvu"] for r in out["by_token"]["highest_fvu"]]
    assert fvus == sorted(fvus, reverse=True)


def test_the_largest_nonlinear_errors_are_kept_in_order():
    n_ctx = 300
    x, e, tokens = synthetic(n_ctx, seed=2)
    spikes = {250: 40.0, 200: 25.0, 280: 60.0}  # contexts after the warm-up with a large non-linear error
    for c, size in spikes.items():
        e[c * T + 5, 3] += size
    dm = DarkMatter(D, T, V, DarkMatterConfig(warmup_tokens=100 * T, top_contexts=3, window_before=4, window_after=2),
                    torch.device("cpu"))
    feed(dm, x, e, tokens)
    contexts = dm.finalize()["nonlinear"]["contexts"]
    assert [c["context"] for c in contexts] == [280, 250, 200]
    assert all(c["peak"] == 4 and len(c["token_ids"]) == 7 for c in contexts)
    assert contexts[0]["token_ids"] == tokens[280, 1:8].tolist()
    # resuming from the saved state gives the same answer
    again = DarkMatter(D, T, V, dm.cfg, torch.device("cpu"))
    again.load({k: np.asarray(v) for k, v in dm.state().items()})
    assert json.dumps(again.finalize(), default=str) == json.dumps(dm.finalize(), default=str)


def test_loss_concentration_is_the_share_held_by_the_top_tokens():
    values = np.array([6.0, 2.0, 1.0, 1.0] + [0.0] * 96)
    shares = concentration(values, (0.01, 0.02, 0.04, 1.0))
    assert shares == pytest.approx([0.6, 0.8, 1.0, 1.0])
    assert concentration(np.zeros(10), (0.5,)) == [None]


def test_spliced_losses_vanish_for_a_perfect_reconstruction(tiny_lm):
    contexts = torch.randint(0, tiny_lm.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    site = tiny_lm.site("resid_post.1")
    d_ce, kl = spliced_token_losses(tiny_lm, site, lambda a: a, contexts)
    assert d_ce.shape == (4, 23) and np.abs(d_ce).max() < 1e-5 and np.abs(kl).max() < 1e-5
    d_ce, kl = spliced_token_losses(tiny_lm, site, torch.zeros_like, contexts)
    assert kl.mean() > 0 and (kl >= 0).all() and np.abs(d_ce).sum() > 0


def test_the_analysis_reads_the_cache_exactly_as_it_reads_the_lm(tiny_lm, tiny_sae_dir, tmp_path):
    from tests.test_lineage_store import topics_corpus
    from trainer.analyze import AnalyzeConfig, analyze

    corpus = topics_corpus(tmp_path)
    outs = {}
    for cached in (False, True):
        out = tmp_path / ("cache" if cached else "lm")
        analyze(AnalyzeConfig(sae_dir=tiny_sae_dir, tokens=3000, device="cpu", lm_dtype="float32", shard_contexts=8,
                              out=out, cache_activations=cached, dm_ce_contexts=4, dm_warmup_tokens=1000, corpus=corpus),
                tiny_lm, progress=False)
        outs[cached] = out
    summary = json.loads((outs[True] / "summary.json").read_text())
    assert summary["analysis"]["source"].startswith("activation cache")
    with np.load(outs[False] / "features.npz") as a, np.load(outs[True] / "features.npz") as b:
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    da, db = (json.loads((o / "darkmatter.json").read_text()) for o in outs.values())
    for d in (da, db):
        d.pop("timings"), d.pop("elapsed_s")
    assert da == db
    assert 0 < da["fvu"] and da["linear"]["r2_error"] is not None and da["spliced"]["tokens"] == 4 * 127


def test_training_evaluation_reads_a_cached_held_out_split(tiny_lm, tmp_path):
    from store.settings import get_settings
    from tests.test_lineage_store import topics_corpus
    from trainer.activations import ActivationCache, LMActivations, LMStreamSpec, cached_eval_activations

    spec = LMStreamSpec(model="tiny", sites=["resid_post.1", "resid_post.2"], corpus=topics_corpus(tmp_path), text_field="text",
                        ctx_len=64, split="eval", eval_fraction=0.1, seed=0, exclude_bos=True, sink_norm_ratio=10.0,
                        lm_dtype=str(tiny_lm.dtype))
    root = get_settings().data_dir / "activations-eval-test"
    ActivationCache(root, spec).fill(tiny_lm, 3000, 8)
    cached = cached_eval_activations(root, spec, 2000)
    parts = {s: [] for s in spec.sites}
    for chunk in LMActivations(tiny_lm, spec, 8, max_tokens=2000, epochs=1):
        for s, v in chunk.items():
            parts[s].append(v)
    for s in spec.sites:
        torch.testing.assert_close(cached[s], torch.cat(parts[s])[:2000], rtol=0, atol=0)
