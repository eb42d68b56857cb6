"""The live model's parts on their own: contrastive statistics (against their definitions and
hand-worked numbers), calibration on real pooled activations of the tiny model, the engine's
bounded queue and deadlines, the rate limiter, URLs and uploads."""

from __future__ import annotations

import itertools
import math
import threading

import numpy as np
import pytest

from app.inference.contrastive import contrast, rank
from app.inference.schemas import ServiceError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- statistics against their definitions ------------------------------------------------------

def test_auroc_is_the_pairwise_win_rate_with_ties_as_half():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, size=(9, 5)).astype(float)  # small integers: many ties
    b = rng.integers(0, 4, size=(7, 5)).astype(float)
    b[:, 4] = a[0, 4]  # a column with a constant B
    a[:, 3] = b[:, 3] = 2.0  # a constant column: no evidence at all
    s = contrast(a, b)
    for j in range(5):
        wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in itertools.product(a[:, j], b[:, j]))
        assert s.auroc[j] == pytest.approx(wins / (9 * 7))
    assert s.p[3] == 1.0 and s.auroc[3] == 0.5 and s.cohens_d[3] == 0.0


def test_cohens_d_densities_and_means_by_hand():
    a = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 1.0]])
    b = np.array([[4.0, 0.0], [5.0, 0.0], [6.0, 0.0]])
    s = contrast(a, b)
    # means 2 and 5, both variances 1 (ddof 1), pooled sd 1
    assert s.cohens_d[0] == pytest.approx(-3.0)
    assert s.mean_a[0] == 2.0 and s.mean_b[0] == 5.0
    assert s.density_a.tolist() == [1.0, pytest.approx(1 / 3)] and s.density_b.tolist() == [1.0, 0.0]
    # both sets constant but different: d is infinite, reported as undefined
    assert np.isnan(contrast(np.ones((3, 1)), np.zeros((3, 1))).cohens_d[0])


def test_benjamini_hochberg_by_hand_over_every_latent():
    # p = 0.01, 0.04, 0.03, 0.005 (m = 4): sorted 0.005, 0.01, 0.03, 0.04; p * m / rank = 0.02, 0.02, 0.04,
    # 0.04; running minimum from the largest: q = 0.02, 0.04, 0.04, 0.02 in the original order.
    from scipy.stats import false_discovery_control

    assert false_discovery_control([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.02, 0.04, 0.04, 0.02])
    # constant latents enter with p = 1 and count in m: one strong latent among 1000 silent ones
    a = np.zeros((30, 1000))
    b = np.zeros((30, 1000))
    a[:, 0] = np.linspace(1, 2, 30)
    s = contrast(a, b)
    assert s.n_tests == 1000 and s.p[1:].tolist() == [1.0] * 999
    assert s.q[0] == pytest.approx(min(1.0, s.p[0] * 1000))


def test_rank_orders_by_q_then_effect_and_filters_direction():
    rng = np.random.default_rng(1)
    a = rng.random((40, 6))
    b = rng.random((40, 6))
    a[:, 2] += 0.5  # strongly more active in A
    b[:, 4] += 0.3  # more active in B
    s = contrast(a, b)
    order = rank(s, "both")
    assert order[0] == 2 and s.q[order].tolist() == sorted(s.q[order].tolist())
    assert all(s.auroc[i] > 0.5 for i in rank(s, "a"))
    assert rank(s, "b")[0] == 4
    allowed = np.ones(6, bool)
    allowed[2] = False
    assert 2 not in rank(s, "both", allowed).tolist()


# --- calibration on the tiny model's real pooled activations -----------------------------------

@pytest.fixture(scope="module")
def pooled(tmp_path_factory, tiny_sae_dir):
    """Every latent of the tiny SAE, max-pooled over each of 120 pydoc paragraphs, by the
    service's own code path (registry -> encode_texts -> pooled max)."""
    from store.db import make_engine, upgrade
    from app.inference.encode import encode_texts
    from app.inference.registry import Registry, lookup_saes
    from trainer.corpus import PydocCorpus
    from trainer.publish import publish

    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('calib') / 'atlas.db'}")
    upgrade(engine)
    publish(tiny_sae_dir, "tiny", engine=engine, progress=False)
    (meta,) = lookup_saes(engine, ["tiny"])
    reg = Registry(engine, "cpu", 512)
    model = reg.model(meta)
    sae = reg.sae(meta, model.lm)
    texts = [p.strip()[:400] for d in PydocCorpus().docs[:400] for p in d.text.split("\n\n") if len(p.strip()) > 80][:120]
    assert len(texts) == 120
    ids = [[model.lm.bos_token_id, *model.tokenizer(t, add_special_tokens=False)["input_ids"][:96]] for t in texts]
    rows = []
    for start in range(0, len(ids), 40):
        codes = encode_texts(model, ids[start:start + 40], [[sae]] * len(ids[start:start + 40]))
        rows += [c[meta.key].pooled_max(meta.d_sae).numpy() for c in codes]
    engine.dispose()
    return np.stack(rows)


def test_random_halves_of_one_set_find_nothing_in_95_percent_of_trials(pooled):
    """Under the complete null, BH at 5 % is Simes' test: it reports something in about 5 % of
    trials by construction (measured: 11 of these 200 splits, 5.5 %). So the 95 % is checked as a
    rate, with the binomial allowance of 200 trials (one-sided 99 %: at most 17 of 200), and the
    per-latent p-values must be calibrated (uniform under the null: about 5 % below 0.05)."""
    n = len(pooled)
    hits, below, tests = 0, 0, 0
    for seed in range(200):
        perm = np.random.default_rng(seed).permutation(n)
        s = contrast(pooled[perm[: n // 2]], pooled[perm[n // 2:]])
        hits += bool((s.q < 0.05).any())
        tested = s.p < 1.0
        below += int((s.p[tested] < 0.05).sum())
        tests += int(tested.sum())
    from scipy.stats import binom

    allowed = int(binom.ppf(0.99, 200, 0.05))
    assert hits <= allowed, f"{hits} of 200 null splits reported a latent at q < 0.05 (at most {allowed} expected)"
    assert 0.03 <= below / tests <= 0.06, f"{below / tests:.3f} of null p-values are below 0.05"


def test_a_planted_difference_ranks_the_planted_latent_first(pooled):
    rng = np.random.default_rng(7)
    n = len(pooled)
    perm = rng.permutation(n)
    a, b = pooled[perm[: n // 2]].copy(), pooled[perm[n // 2:]].copy()
    firing = (pooled > 0).mean(0)
    planted = int(np.flatnonzero((firing > 0.02) & (firing < 0.3))[0])  # a latent that is usually quiet
    top = float(pooled[:, planted].max())
    lift = rng.random(len(a)) < 0.5  # half of set A gets it at its usual peak
    a[lift, planted] = np.maximum(a[lift, planted], top * rng.uniform(0.8, 1.0, lift.sum()))
    s = contrast(a, b)
    order = rank(s, "both", limit=10)
    assert order[0] == planted and s.q[planted] < 0.05
    assert s.auroc[planted] > 0.6


# --- the engine: bounded queue, deadlines ------------------------------------------------------

def test_engine_refuses_when_full_and_answers_expired_jobs_503(tmp_path, tiny_sae_dir):
    from store.db import make_engine, upgrade
    from app.inference.batcher import Engine
    from app.inference.jobs import ActivationsJob
    from app.inference.registry import Registry, lookup_saes
    from trainer.publish import publish

    engine = make_engine(f"sqlite:///{tmp_path / 'atlas.db'}")
    upgrade(engine)
    publish(tiny_sae_dir, "tiny", engine=engine, progress=False)
    (meta,) = lookup_saes(engine, ["tiny"])
    answers = []
    done = threading.Event()

    def on_done(result, error):
        answers.append((result, error))
        done.set()

    eng = Engine(Registry(engine, "cpu", 512), queue_size=1)
    eng.submit(ActivationsJob(meta, [1], "hello", None, -1.0, on_done))  # already past its deadline
    with pytest.raises(ServiceError) as busy:
        eng.submit(ActivationsJob(meta, [1], "hello", None, 30.0, on_done))
    assert busy.value.status == 503 and busy.value.code == "busy" and busy.value.retry_after >= 1
    eng.start()
    try:
        assert done.wait(30)
        result, error = answers[0]
        assert result is None and error.status == 503 and error.code == "timeout"
        done.clear()
        eng.submit(ActivationsJob(meta, [1, 2], "hello world", None, 30.0, on_done))  # room again
        assert done.wait(60)
        result, error = answers[1]
        assert error is None and len(result["activations"]) == 2
    finally:
        eng.stop()
        engine.dispose()


# --- small parts -------------------------------------------------------------------------------

def test_rate_limiter_buckets():
    from app.inference.ratelimit import RateLimiter

    lim = RateLimiter(per_minute=60)  # bursts of 10, one more per second
    assert [lim.acquire("a", now=0.0) for _ in range(10)] == [0.0] * 10
    assert lim.acquire("a", now=0.0) == pytest.approx(1.0)
    assert lim.acquire("b", now=0.0) == 0.0  # per client
    assert lim.acquire("a", now=1.5) == 0.0
    assert RateLimiter(per_minute=0).acquire("a") == 0.0
    small = RateLimiter(per_minute=60, max_clients=3)
    for c in "wxyz":
        small.acquire(c, now=0.0)
    assert len(small._buckets) == 3


def test_inference_urls():
    from store.errors import AtlasError
    from app.inference.client import parse_url

    assert parse_url("http://127.0.0.1:8765") == ("tcp", ("127.0.0.1", 8765))
    assert parse_url("unix:/run/atlas/inference.sock") == ("unix", "/run/atlas/inference.sock")
    assert parse_url("unix:///tmp/x.sock") == ("unix", "/tmp/x.sock")
    for bad in ("ftp://x", "127.0.0.1:80", "unix:"):
        with pytest.raises(AtlasError):
            parse_url(bad)


def test_sets_of_texts_from_paste_and_uploads():
    from app.inference.queries import parse_upload, split_texts

    assert split_texts("one\ntwo\n\n\nthree\r\n\r\nfour", "blank") == ["one\ntwo", "three", "four"]
    assert split_texts("one\n\ntwo\n", "line") == ["one", "two"]
    jsonl = b'{"text": "a b"}\n"just a string"\n\n{"text": "c"}\n'
    assert parse_upload("s.jsonl", jsonl, "blank", 10_000, "set A") == ["a b", "just a string", "c"]
    assert parse_upload("s.txt", b"x\n\ny", "blank", 10_000, "set A") == ["x", "y"]
    for name, data, status in (("s.jsonl", b'{"txt": 1}', 422), ("s.jsonl", b"{oops", 422), ("s.csv", b"a", 422),
                               ("s.txt", b"\xff\xfe", 422), ("s.txt", b"x" * 20_000, 413)):
        with pytest.raises(ServiceError) as err:
            parse_upload(name, data, "blank", 10_000, "set A")
        assert err.value.status == status and "set A" in err.value.message


def test_contrast_queries_are_stored_on_both_backends(engine):
    """The permalink's row (migration 0006) on SQLite and PostgreSQL: texts, answer, labels."""
    from sqlalchemy.orm import Session

    from store.errors import NotFound
    from app.inference.queries import load_query, query_texts, save_query
    from app.inference.schemas import ContrastRequest

    body = ContrastRequest(set_a=["def f(): pass", "x = 1"], set_b=["Some prose.", "More prose, ünïcode ✓."],
                           label_a="code", label_b="prose", direction="a")
    answer = {"model": "m", "n_a": 2, "n_b": 2, "n_tests": 3, "n_significant": 0, "saes": [], "items": [
        {"sae": "s", "index": 1, "auroc": 0.75, "q_value": 0.5}]}
    with Session(engine) as s:
        row = save_query(s, body, answer, None)
        qid = row.id
    with Session(engine) as s:
        got = load_query(s, qid)
        assert got.label_a == "code" and got.result == answer and got.params["direction"] == "a"
        assert query_texts(got) == (body.set_a, body.set_b)
        for bad in ("nope", "x" * 40, "a/b", ""):
            with pytest.raises(NotFound):
                load_query(s, bad)


def test_registry_loads_on_first_use_and_evicts_the_least_recently_used(tmp_path, tiny_sae_dir):
    from store.db import make_engine, upgrade
    from app.inference.registry import Registry, lookup_saes
    from trainer.publish import publish

    engine = make_engine(f"sqlite:///{tmp_path / 'atlas.db'}")
    upgrade(engine)
    publish(tiny_sae_dir, "tiny", engine=engine, progress=False)
    publish(tiny_sae_dir, "tiny-copy", engine=engine, progress=False)
    one, two = lookup_saes(engine, ["tiny", "tiny-copy"])
    reg = Registry(engine, "cpu", 1024)
    model = reg.model(one)
    assert reg.model(one) is model and reg.loads == 1  # loaded once, then reused
    first = reg.sae(one, model.lm)
    room = model.nbytes + first.nbytes * 1.5  # the model and one SAE fit, not two
    reg.budget = int(room)
    reg.pin(model.key)
    reg.sae(two, model.lm)
    names = [e["name"] for e in reg.describe()]
    assert reg.evictions == 1 and "tiny" not in names and "tiny-copy" in names and len(names) == 2
    again = reg.sae(one, model.lm)  # reloaded on its next use, evicting the other (the model is pinned)
    assert again is not first and [e["name"] for e in reg.describe()][-1] == "tiny"
    reg.budget = 10
    reg.unpin(model.key)
    with pytest.raises(ServiceError) as err:
        Registry(engine, "cpu", 0.0001).model(one)
    assert err.value.status == 503 and "SAE_ATLAS_INFERENCE_MEMORY_MB" in err.value.message
    engine.dispose()


def test_cli_inference_command_and_serve_spawning(tmp_path, monkeypatch, capsys):
    import socket

    from app.cli import main
    from app.cli.service import _clear_stale_socket, start_inference_beside
    from store.errors import AtlasError
    from store.settings import Settings, get_settings

    monkeypatch.setenv("SAE_ATLAS_INFERENCE", "off")
    get_settings.cache_clear()
    try:
        assert main(["inference"]) != 0
        assert "SAE_ATLAS_INFERENCE=off" in capsys.readouterr().err
    finally:
        monkeypatch.delenv("SAE_ATLAS_INFERENCE")
        get_settings.cache_clear()
    # serve starts no service when inference is off, when told not to, or when it runs elsewhere
    assert start_inference_beside(Settings(inference="off")) is None
    assert start_inference_beside(Settings(inference_spawn=False)) is None
    assert start_inference_beside(Settings(), disabled=True) is None
    # a socket file left by a dead service is removed; a live one is refused
    path = str(tmp_path / "s.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()
    _clear_stale_socket(path)
    assert not (tmp_path / "s.sock").exists()
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen(1)
    try:
        with pytest.raises(AtlasError, match="already listening"):
            _clear_stale_socket(path)
    finally:
        live.close()


# --- live activations and the registry ---------------------------------------------------------

def test_sink_mask_is_the_per_row_median_rule_by_brute_force():
    """valid_token_mask drops BOS and every token whose norm exceeds the ratio times the lower median
    of its row's norms after BOS (non-finite tokens kept, not counted), whatever else is in the batch."""
    import torch

    from trainer.activations import valid_token_mask

    gen = torch.Generator().manual_seed(0)
    norms = torch.rand(3, 40, generator=gen) + 1
    norms[0, 5] = norms[1, 1] = norms[2, 30] = 50.0  # sinks, one right after BOS
    norms[1, 10:14] = 1.5  # ties
    norms[2, 7] = float("nan")
    acts = norms[..., None] * torch.nn.functional.normalize(torch.randn(3, 40, 8, generator=gen), dim=-1)
    got = valid_token_mask(acts, 1.4, True)
    n = acts.norm(dim=-1).tolist()
    for b in range(3):
        row = sorted(v for v in n[b][1:] if math.isfinite(v))
        for t in range(40):
            keep = t > 0 and (not math.isfinite(n[b][t]) or n[b][t] <= 1.4 * row[(len(row) - 1) // 2])
            assert bool(got[b, t]) == keep, (b, t)
    assert not got[0, 5] and not got[2, 30] and not got[1, 1] and got[2, 7]  # a sink right after BOS too
    for b in range(3):  # a row alone is masked as in the batch
        assert torch.equal(valid_token_mask(acts[b:b + 1], 1.4, True)[0], got[b])


def test_a_texts_live_activations_equal_the_analysis_paths(tiny_lm, tiny_sae_dir):
    """The analysis masks BOS and attention sinks over a batch of contexts; live inference sees one
    text, one of those contexts. Its masked tokens and activations must be the ones the analysis
    path keeps. (The tiny random model has no real sinks; a
    ratio this low masks a few of its tokens, so the rule matters.)"""
    import torch

    from app.inference.encode import encode_texts
    from app.inference.registry import ModelHandle, SAEHandle, SAEMeta
    from trainer.analyze import AnalyzeConfig, Analyzer
    from trainer.formats import load_sae

    ratio = 1.05
    loaded = load_sae(tiny_sae_dir)
    analyzer = Analyzer(AnalyzeConfig(sae_dir=tiny_sae_dir, tokens=4000, lm_batch_size=8, device="cpu",
                                      lm_dtype="float32", sink_norm_ratio=ratio), lm=tiny_lm, loaded=loaded)
    batches, _ = analyzer.source.batches(0)
    _, tokens, _, _, load = next(iter(batches))
    mask, acts = load()
    sae = analyzer.sae
    dec_norm = sae.W_dec.norm(dim=1)
    with torch.no_grad():
        codes = sae.encode(acts.float())
        shown = codes.values * dec_norm[codes.indices]
        analysed = torch.zeros(acts.shape[0], sae.cfg.d_sae).scatter_add_(1, codes.indices, shown)
    first_row = torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(1).cumsum(0)])
    assert 0 < int((~mask[:, 1:]).sum()) < mask[:, 1:].numel() // 2  # some sinks, not most tokens

    model = ModelHandle(("model", "tiny", "float32"), tiny_lm, 0, False)
    meta = SAEMeta(1, "tiny", "1", 1, "tiny", loaded.site, sae.cfg.d_in, sae.cfg.d_sae, str(tiny_sae_dir), "float32",
                   ratio, True)
    handle = SAEHandle(meta, sae, tiny_lm.site(loaded.site), dec_norm.float(), np.ones(sae.cfg.d_sae),
                       np.zeros(sae.cfg.d_sae), 0)
    differs = 0
    for b in range(tokens.shape[0]):
        for length in (tokens.shape[1],):
            live = encode_texts(model, [tokens[b, :length].tolist()], [[handle]])[0][meta.key]
            keep = mask[b, :length]
            assert torch.equal(live.masked, ~keep), (b, length)
            want = analysed[first_row[b]:first_row[b] + int(keep.sum())]
            got = torch.zeros_like(want).scatter_add_(1, live.indices, live.values)
            assert torch.allclose(got, want, atol=1e-5), (b, length)
            differs += int(keep.sum()) < length - 1
    assert differs  # some of the short texts had a sink masked


def test_the_registry_steers_a_transcoder_at_its_output_site(tmp_path, tiny_lm, tiny_model_dir, sqlite_engine):
    from app.inference.registry import Registry, SAEMeta
    from trainer.formats import save_sae
    from trainer.sae import SAEConfig, build_sae

    d = tiny_lm.d_model
    save_sae(tmp_path / "tc", build_sae(SAEConfig(d_in=d, d_sae=32, architecture="topk", k=4)), 1.0, "mlp_in.1",
             str(tiny_model_dir), output_site="mlp_out.1", transcoder=True)
    meta = SAEMeta(1, "tc", "1", 1, str(tiny_model_dir), "mlp_in.1", d, 32, str(tmp_path / "tc"), "float32", 10.0, True)
    handle = Registry(sqlite_engine, "cpu").sae(meta, tiny_lm)
    assert (handle.site.name, handle.target_site.name) == ("mlp_in.1", "mlp_out.1")
