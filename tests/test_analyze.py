"""The streaming analysis: exact against brute force, a planted feature, resume, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from store.errors import AtlasError
from store.models import ExampleKind
from trainer.activations import valid_token_mask
from trainer.analyze import AnalyzeConfig, Analyzer, analyze
from trainer.formats import load_sae, save_sae
from trainer.sae import SAEConfig, build_sae


def brute_force(cfg: AnalyzeConfig, lm, sae) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Dense shown activations [n_valid, F], their global token ids and doc ids, over the same contexts."""
    analyzer = Analyzer(AnalyzeConfig(**{**cfg.__dict__}), lm=lm, loaded=load_sae(cfg.sae_dir))
    batches, _ = analyzer._contexts()
    dec_norm = sae.W_dec.norm(dim=1)
    rows, tokens, docs = [], [], []
    seen = 0
    T = analyzer.cfg.ctx_len
    for batch in batches:
        acts = lm.read(batch.tokens, [lm.site(analyzer.cfg.site)])[analyzer.cfg.site]
        mask = valid_token_mask(acts, cfg.sink_norm_ratio, cfg.exclude_bos)
        with torch.no_grad():
            f = sae.encode_dense(acts[mask].float()) * dec_norm
        ids = (torch.arange(seen, seen + batch.tokens.shape[0])[:, None] * T + torch.arange(T)[None, :])[mask]
        rows.append(f.numpy())
        tokens.append(ids.numpy())
        docs.append(batch.doc_ids[mask].numpy())
        seen += batch.tokens.shape[0]
    return np.concatenate(rows), np.concatenate(tokens), np.concatenate(docs), seen


def test_streamed_dashboards_equal_brute_force(tiny_lm, tiny_sae_dir, tmp_path):
    cfg = AnalyzeConfig(sae_dir=tiny_sae_dir, out=tmp_path / "analysis", tokens=5000, shard_contexts=8, device="cpu",
                        lm_dtype="float32", n_top=6, n_intervals=4, per_interval=3, n_random=5, hist_bins=10)
    out = analyze(cfg, lm=tiny_lm, progress=False)
    sae = load_sae(tiny_sae_dir).sae
    dense, tok, doc, _ = brute_force(cfg, tiny_lm, sae)
    with np.load(out / "features.npz") as f, np.load(out / "examples.npz") as e:
        feats, ex = dict(f), dict(e)
    n = dense.shape[0]
    rng = np.random.default_rng(0)
    alive = np.nonzero((dense > 0).sum(0) >= 3)[0]
    assert len(alive) > 10
    for j in rng.choice(alive, size=min(25, len(alive)), replace=False):
        a = dense[:, j]
        on = a > 0
        assert feats["count"][j] == on.sum()
        assert feats["density"][j] == pytest.approx(on.sum() / n, rel=1e-12)
        assert feats["max"][j] == pytest.approx(a.max(), rel=1e-5)
        assert feats["mean"][j] == pytest.approx(a[on].mean(), rel=1e-5)
        # top examples: the best activation of each document, best documents first
        best = {}
        for t, d, v in zip(tok[on], doc[on], a[on]):
            if d not in best or v > best[d][0] or (v == best[d][0] and t < best[d][1]):
                best[d] = (v, t)
        expected = sorted(best.values(), key=lambda p: (-p[0], p[1]))[:6]
        sel = (ex["feature"] == j) & (ex["kind"] == ExampleKind.top)
        got = sorted(zip(ex["rank"][sel], ex["token"][sel], ex["activation"][sel]))
        assert [t for _, t, _ in got] == [t for _, t in expected]
        assert np.allclose([v for _, _, v in got], [v for v, _ in expected], rtol=1e-3)  # windows hold float16
        # interval shares and histogram from the exact max
        rel = a[on] / a.max()
        bins = np.minimum((rel * 4).astype(int), 3)
        assert feats["interval_count"][j].tolist() == np.bincount(bins, minlength=4).tolist()
        assert feats["hist"][j].sum() == on.sum()
        # interval and random examples: real activations of this latent, in the right interval
        for kind in (ExampleKind.interval, ExampleKind.random):
            sel = (ex["feature"] == j) & (ex["kind"] == kind)
            lookup = dict(zip(tok[on], a[on]))
            for t, interval in zip(ex["token"][sel], ex["interval"][sel]):
                assert t in lookup
                if kind == ExampleKind.interval:
                    assert min(int(lookup[t] / a.max() * 4), 3) == interval
        sel = (feats is not None) & (ex["feature"] == j) & (ex["kind"] == ExampleKind.random)
        assert sel.sum() == min(5, on.sum())
    # every window's activations are that latent's activations on those tokens
    pos = {t: i for i, t in enumerate(tok)}
    for i in rng.choice(len(ex["feature"]), size=200, replace=False):
        j, centre = ex["feature"][i], ex["token"][i]
        for off, (t_id, act) in enumerate(zip(ex["tokens"][i], ex["acts"][i])):
            t = centre - cfg.window_before + off
            if t_id < 0:
                continue
            expected = dense[pos[t], j] if t in pos else 0.0
            assert float(act) == pytest.approx(expected, rel=2e-3, abs=2e-3)


def planted_sae(lm, folder, site="resid_post.0", n_tokens=4000):
    """A JumpReLU SAE whose latent 0 fires on one token only, with a chosen decoder direction."""
    from trainer.corpus import Packer, open_corpus, split_documents

    packer = Packer(lm.tokenizer, 128, lm.bos_token_id, lm.separator_token_id)
    batch = next(packer.batches(split_documents(open_corpus("pydoc"), "eval", 0.1, 0), 40))
    acts = lm.read(batch.tokens, [lm.site(site)])[site]
    mask = valid_token_mask(acts, 10.0, True)
    x, ids = acts[mask].float(), batch.tokens[mask]
    counts = torch.bincount(ids, minlength=lm.vocab_size)
    counts[[lm.bos_token_id, lm.separator_token_id]] = 0
    target = int(counts.argmax())
    on = ids == target
    w = x[on].mean(0) - x[~on].mean(0)
    w /= w.norm()
    proj = x @ w
    theta = float(proj[~on].max()) + 1e-3
    assert (proj[on] > theta).any()
    d = lm.d_model
    cfg = SAEConfig(d_in=d, d_sae=8, architecture="jumprelu")
    sae = build_sae(cfg)
    decoder = torch.randn(d, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[0] = w
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.threshold.fill_(1e6)
        sae.threshold[0] = theta
        sae.W_dec.copy_(torch.randn(8, d))
        sae.W_dec[0] = decoder
    save_sae(folder, sae, 1.0, site, lm.source)
    return target, decoder


def test_planted_feature_peaks_on_its_token_and_its_logits_match_by_hand(tiny_lm, tmp_path):
    folder = tmp_path / "planted"
    target, decoder = planted_sae(tiny_lm, folder)
    out = analyze(AnalyzeConfig(sae_dir=folder, tokens=6000, device="cpu", lm_dtype="float32"), lm=tiny_lm, progress=False)
    with np.load(out / "features.npz") as f, np.load(out / "examples.npz") as e:
        feats, ex = dict(f), dict(e)
    sel = (ex["feature"] == 0) & (ex["kind"] == ExampleKind.top)
    assert sel.sum() >= 3
    peaks = ex["tokens"][sel][:, ex["peak"][0]]
    assert (peaks == target).all()
    assert feats["peak_token"][0] == target and feats["peak_token_share"][0] == 1.0
    # every other token in those windows is silent: the latent fires on that token only
    acts = ex["acts"][sel].astype(np.float32)
    toks = ex["tokens"][sel]
    assert (acts[toks != target] == 0).all()
    assert feats["count"][1:].sum() == 0
    # direct logit effect by hand: W_U (with the final norm's scale) times the unit decoder direction
    w_u = tiny_lm.model.get_output_embeddings().weight.detach().double().numpy()
    scale = tiny_lm.model.model.norm.weight.detach().double().numpy()
    direction = decoder.double().numpy() / np.linalg.norm(decoder.double().numpy())
    logits = (w_u * scale) @ direction
    top = np.argsort(-logits)[:10]
    bottom = np.argsort(logits)[:10]
    assert feats["logit_top_ids"][0].tolist() == top.tolist()
    assert feats["logit_bottom_ids"][0].tolist() == bottom.tolist()
    assert np.allclose(feats["logit_top"][0], logits[top], rtol=1e-4, atol=1e-5)
    assert feats["logit_hist"][0].sum() == tiny_lm.vocab_size
    assert feats["neighbor_ids"][0].shape == (7,)
    assert math.isclose(float(feats["density"][1]), 0.0)


def test_interrupted_analysis_resumes_from_its_last_shard(tiny_lm, tiny_sae_dir, tmp_path, monkeypatch):
    cfg = dict(sae_dir=tiny_sae_dir, tokens=4000, shard_contexts=4, device="cpu", lm_dtype="float32", n_random=3)
    whole = analyze(AnalyzeConfig(out=tmp_path / "whole", **cfg), lm=tiny_lm, progress=False)
    calls = {"n": 0}
    original = type(tiny_lm).read

    def flaky(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, *a, **kw)

    monkeypatch.setattr(type(tiny_lm), "read", flaky)
    cfg["lm_batch_size"] = 4
    with pytest.raises(KeyboardInterrupt):
        analyze(AnalyzeConfig(out=tmp_path / "resumed", **cfg), lm=tiny_lm, progress=False)
    state = (tmp_path / "resumed" / "state.json").read_text()
    assert '"contexts_done": 12' in state
    calls["n"] = -10_000
    analyze(AnalyzeConfig(out=tmp_path / "resumed", **cfg), lm=tiny_lm, progress=False)
    skipped_reads = calls["n"] + 10_000
    total_reads = math.ceil(4000 / 127 / 4)
    assert skipped_reads == total_reads - 3
    with np.load(whole / "examples.npz") as a, np.load(tmp_path / "resumed" / "examples.npz") as b:
        assert np.array_equal(a["token"], b["token"]) and np.array_equal(a["acts"], b["acts"])
    with np.load(whole / "features.npz") as a, np.load(tmp_path / "resumed" / "features.npz") as b:
        assert np.array_equal(a["count"], b["count"]) and np.allclose(a["max"], b["max"])

    # Run again once complete (a worker that died between analysis and publishing): nothing to do,
    # and in particular no need for the shards it deleted when it finished.
    calls["n"] = -10_000
    before = (tmp_path / "resumed" / "features.npz").stat().st_mtime_ns
    analyze(AnalyzeConfig(out=tmp_path / "resumed", **cfg), lm=tiny_lm, progress=False)
    assert calls["n"] == -10_000 and (tmp_path / "resumed" / "features.npz").stat().st_mtime_ns == before
    # other settings redo it
    analyze(AnalyzeConfig(out=tmp_path / "resumed", **{**cfg, "tokens": 2000}), lm=tiny_lm, progress=False)
    assert calls["n"] > -10_000


def test_sae_width_that_does_not_match_the_site(tiny_lm, tmp_path):
    sae = build_sae(SAEConfig(d_in=32, d_sae=16, architecture="topk", k=2))
    save_sae(tmp_path / "wrong", sae, 1.0, "resid_post.1", tiny_lm.source)
    with pytest.raises(AtlasError, match="reads 32-dimensional activations but .* has 64"):
        analyze(AnalyzeConfig(sae_dir=tmp_path / "wrong", device="cpu", lm_dtype="float32"), lm=tiny_lm)


def test_corrupt_or_missing_weights(tiny_sae_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_sae_dir, broken, ignore=shutil.ignore_patterns("analysis"))
    weights = broken / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    with pytest.raises(AtlasError, match="corrupt or truncated"):
        load_sae(broken)
    weights.unlink()
    with pytest.raises(AtlasError, match="is missing"):
        load_sae(broken)
    with pytest.raises(AtlasError, match="does not exist"):
        load_sae(tmp_path / "nowhere")
