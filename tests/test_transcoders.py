"""Transcoders trained here (train --site mlp.L / 'mlp.*'), on the tiny random Llama.

Expected values come from hooks and formulas written in this file (forward hooks registered on the
MLP modules directly, the transcoder's prediction written out by hand), never from the code under
test: the loss is against the output site, a skip-transcoder's W_skip x enters its output, a
multi-block run feeds each block's transcoder exactly the (mlp_in, mlp_out) pairs of one LM pass,
the whole set spliced in at once gives the CE of a hand-written forward with every MLP replaced,
the set manifest round-trips, and bad input gets one-line errors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from store.errors import AtlasError
from trainer.config import TrainConfig
from trainer.evaluate import Evaluated, spliced_set_loss
from trainer.formats import SiteIO, load_sae
from trainer.sae import SAEConfig, StepContext, build_sae
from trainer.train import Trainer, train
from trainer.transcoders import finished_transcoder, load_transcoder_set

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from trainer.corpus import PydocCorpus

    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(d.text.replace("\n\n", "\n") for d in PydocCorpus().docs[:1500]))
    return path


def config(out: Path, model_dir: Path, corpus: Path, **kw) -> TrainConfig:
    base = dict(out=out, model=str(model_dir), corpus=str(corpus), site=["mlp.1"], width=[256], k=[16],
                tokens=61_440, batch_size=512, ctx_len=64, lm_batch_size=16, shuffle_buffer=8192, eval_tokens=4096,
                ce_contexts=16, log_every=5, checkpoint_every=0, device="cpu", lm_dtype="float32")
    base.update(kw)
    return TrainConfig(**base)


def mlps(lm):
    return [block.mlp for block in lm.model.model.layers]


def hand_capture(lm, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each block's MLP input and output [B, T, D] for ids, by forward hooks on the MLP modules."""
    ins, outs = {}, {}
    handles = []
    for i, mlp in enumerate(mlps(lm)):
        def hook(_m, inputs, output, i=i):
            ins[i], outs[i] = inputs[0].detach().clone(), output.detach().clone()
        handles.append(mlp.register_forward_hook(hook))
    try:
        with torch.no_grad():
            lm.model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    n = len(mlps(lm))
    return [ins[i] for i in range(n)], [outs[i] for i in range(n)]


def fvu(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def held_out_ids(lm, n: int = 8, length: int = 48, random: bool = False, seed: int = 5) -> torch.Tensor:
    """Contexts [n, length] starting with BOS: pydoc text the corpus fixture leaves out, or random tokens."""
    if random:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(2, lm.vocab_size, (n, length), generator=g)
    else:
        from trainer.corpus import PydocCorpus

        text = "\n".join(d.text for d in PydocCorpus().docs[2000:2400])
        flat = lm.tokenizer(text, add_special_tokens=False)["input_ids"][:n * length]
        ids = torch.tensor(flat).view(n, length)
    ids[:, 0] = lm.bos_token_id
    return ids


# --- the loss is against the output site ----------------------------------------------------------

@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "matryoshka", "relu"])
def test_a_transcoder_learns_its_mlp_output(tmp_path, tiny_model_dir, tiny_lm, corpus, arch):
    (folder,) = train(config(tmp_path / "tc", tiny_model_dir, corpus, arch=[arch]), lm=tiny_lm)
    log = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    # W_dec starts at zero and b_dec at mean(y): the first prediction is the mean of mlp_out
    assert log[0]["fvu"] == pytest.approx(1.0, abs=0.05)
    loaded = load_sae(folder)
    assert (loaded.transcoder, loaded.site, loaded.output_site, loaded.kind) == (True, "mlp_in.1", "mlp_out.1", "transcoder")
    # by hand: mlp_in / mlp_out of block 1 on contexts the run never saw
    ins, outs = hand_capture(tiny_lm, held_out_ids(tiny_lm))
    x, y = ins[1][:, 1:].reshape(-1, tiny_lm.d_model), outs[1][:, 1:].reshape(-1, tiny_lm.d_model)
    with torch.no_grad():
        pred = loaded.sae(x)
    assert fvu(pred, y) < 0.5  # well below the mean predictor's 1
    assert fvu(pred, x) > 0.9  # it predicts the MLP's output, not its input
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["fvu"] < 0.5 and metrics["l0"] <= 16 * 1.5
    # spliced in (the tiny random model's CE barely depends on one MLP, so only its presence here;
    # the splice itself is checked against a hand-written forward below)
    assert metrics["ce_contexts"] >= 16 and math.isfinite(metrics["ce_sae"])
    assert "output_norm_scale" in metrics


def test_a_skip_transcoder_adds_its_skip_term(tmp_path, tiny_model_dir, tiny_lm, corpus):
    (folder,) = train(config(tmp_path / "skip", tiny_model_dir, corpus, skip_connection=True, tokens=10_240,
                             ce_contexts=0), lm=tiny_lm)
    loaded = load_sae(folder)
    assert loaded.kind == "skip_transcoder"
    from safetensors.torch import load_file

    w = {k: v.double() for k, v in load_file(str(folder / "sae_weights.safetensors")).items()}
    assert float(w["W_skip"].abs().max()) > 0  # it was trained from zero
    ins, outs = hand_capture(tiny_lm, held_out_ids(tiny_lm))
    x = ins[1][:, 1:].reshape(-1, tiny_lm.d_model).double()
    # SAELens's skip transcoder, written out: z = x W_enc + b_enc (no b_dec), TopK(k), y = f W_dec + b_dec + x W_skip^T
    z = x @ w["W_enc"] + w["b_enc"]
    top = z.topk(16, dim=-1)
    f = torch.zeros_like(z).scatter_(1, top.indices, top.values.clamp_min(0))
    expected = f @ w["W_dec"] + w["b_dec"] + x @ w["W_skip"].T
    with torch.no_grad():
        got = loaded.sae(x.float()).double()
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    without = f @ w["W_dec"] + w["b_dec"]
    assert float((got - without).abs().max()) > 1e-3  # the skip term is in the output


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "matryoshka", "relu"])
def test_the_saved_form_predicts_what_the_trained_one_did(arch):
    """finished_transcoder folds the two scales and moves b_dec out of the encoder: the same codes
    and the same prediction, in raw units, as the training form on scaled inputs."""
    torch.manual_seed(0)
    d, c_x, c_y = 16, 3.0, 0.25
    sae = build_sae(SAEConfig(d_in=d, d_sae=64, architecture=arch, k=4, transcode=True, skip_connection=True))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        if hasattr(sae, "threshold"):
            sae.threshold.fill_(0.2)
    x = torch.randn(200, d)
    xs = x * c_x
    codes = sae.encode(xs)
    trained = sae.output(codes, xs) / c_y
    # the training form, written out: z = W_enc x_s + b_enc; y_s = W_dec f + b_dec + W_skip x_s
    dense = codes.dense(64)
    assert torch.allclose(trained * c_y, dense @ sae.W_dec + sae.b_dec + xs @ sae.io.W_skip.T, atol=1e-4)
    done = finished_transcoder(sae, c_x, c_y)
    assert isinstance(done.io, SiteIO) and not done.cfg.transcode
    with torch.no_grad():
        assert torch.allclose(done.encode_dense(x), sae.encode_dense(xs).detach(), atol=1e-4)
        assert torch.allclose(done(x), trained.detach(), atol=1e-4)


# --- many blocks from one LM pass -------------------------------------------------------------------

@pytest.fixture(scope="module")
def set_run(tmp_path_factory, tiny_model_dir, tiny_lm, corpus):
    """A 4-block set trained from one pass, recording the batches every transcoder got at step 0
    and every MLP's input and output in every LM forward pass (forward hooks written here)."""
    out = tmp_path_factory.mktemp("set") / "run"
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    forwards: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
    original = Trainer.train_step

    def recording(self, run, x, y=None):
        if self.step == 0:
            seen[run.name] = (x.clone(), y.clone())
        return original(self, run, x, y)

    ins: dict[int, torch.Tensor] = {}
    outs: dict[int, torch.Tensor] = {}

    def hook(_m, inputs, output, i):
        ins[i], outs[i] = inputs[0].detach().clone(), output.detach().clone()
        if len(outs) == len(mlps(tiny_lm)):
            forwards.append(([ins[j] for j in range(len(outs))], [outs[j] for j in range(len(outs))]))
            ins.clear()
            outs.clear()

    handles = [m.register_forward_hook(lambda m, a, o, i=i: hook(m, a, o, i)) for i, m in enumerate(mlps(tiny_lm))]
    mp = pytest.MonkeyPatch()
    mp.setattr(Trainer, "train_step", recording)
    try:
        cfg = config(out, tiny_model_dir, corpus, site=["mlp.*"], tokens=10_240, sink_norm_ratio=None,
                     ce_contexts=16, width=[128], k=[8])
        folders = train(cfg, lm=tiny_lm)
    finally:
        mp.undo()
        for h in handles:
            h.remove()
    return out, folders, seen, forwards


def test_every_block_gets_the_mlp_pairs_of_one_pass(set_run, tiny_lm):
    out, folders, seen, forwards = set_run
    n_layers, d = len(mlps(tiny_lm)), tiny_lm.d_model
    assert sorted(seen) == [f"mlp.{i}-topk-w128-k8" for i in range(n_layers)]
    # every token of the hand-captured passes, BOS left out (exclude_bos; no sink rule here)
    hand_in = [torch.cat([f[0][i][:, 1:].reshape(-1, d) for f in forwards]) for i in range(n_layers)]
    hand_out = [torch.cat([f[1][i][:, 1:].reshape(-1, d) for f in forwards]) for i in range(n_layers)]
    rows = None
    for i in range(n_layers):
        x, y = seen[f"mlp.{i}-topk-w128-k8"]
        assert x.shape == (512, d)
        dist = torch.cdist(x.double(), hand_in[i].double())
        best = dist.argmin(dim=1)
        assert float(dist.min(dim=1).values.max()) < 1e-5  # every input row is a token's mlp_in.i
        assert torch.allclose(y, hand_out[i][best], atol=1e-6)  # and its target that token's mlp_out.i
        if rows is None:
            rows = best
        # row r of every block is the same token (hand_in[0] has no duplicate rows to confuse it)
        assert torch.equal(hand_in[0][best], hand_in[0][rows])


def test_one_block_alone_sees_the_same_batch(set_run, tmp_path, tiny_model_dir, tiny_lm, corpus):
    _, _, seen_all, _ = set_run
    got = {}
    original = Trainer.train_step

    def recording(self, run, x, y=None):
        if self.step == 0:
            got[run.name] = (x.clone(), y.clone())
        return original(self, run, x, y)

    mp = pytest.MonkeyPatch()
    mp.setattr(Trainer, "train_step", recording)
    try:
        cfg = config(tmp_path / "one", tiny_model_dir, corpus, site=["mlp.2"], tokens=1024, sink_norm_ratio=None,
                     ce_contexts=0, width=[128], k=[8], eval_tokens=512)
        train(cfg, lm=tiny_lm)
    finally:
        mp.undo()
    x1, y1 = got["mlp.2-topk-w128-k8"]
    xa, ya = seen_all["mlp.2-topk-w128-k8"]
    assert torch.equal(x1, xa) and torch.equal(y1, ya)


def test_the_set_manifest_round_trips_and_refuses_a_missing_block(set_run, tiny_lm, tmp_path):
    out, folders, _, _ = set_run
    tset = load_transcoder_set(out)
    assert (tset.n_layers, sorted(tset.layers), tset.architecture, tset.d_sae, tset.k) == (4, [0, 1, 2, 3], "topk", 128, 8)
    loaded = tset.load_all()
    for layer, sae in loaded.items():
        assert (sae.site, sae.output_site, sae.transcoder) == (f"mlp_in.{layer}", f"mlp_out.{layer}", True)
        assert tset.folder(layer) in folders
        assert tset.layers[layer].metrics["fvu"] == json.loads((tset.folder(layer) / "metrics.json").read_text())["fvu"]
    m = tset.metrics
    # the whole set spliced in at once (its numbers are checked against a hand-written forward below)
    assert m["spliced_sites"] == [f"mlp_out.{i}" for i in range(4)] and m["ce_contexts"] >= 16
    assert all(math.isfinite(m[k]) for k in ("ce_recovered", "ce_recovered_ci95", "delta_lm_loss", "delta_lm_loss_ci95"))
    # a set lacking block 2
    data = json.loads((out / "transcoder_set.json").read_text())
    data["layers"] = [e for e in data["layers"] if e["layer"] != 2]
    partial = tmp_path / "transcoder_set.json"
    partial.write_text(json.dumps(data))
    with pytest.raises(AtlasError, match=r"lacks block\(s\) 2 of") as exc:
        load_transcoder_set(partial)
    assert "\n" not in str(exc.value)
    assert sorted(load_transcoder_set(partial, complete=False).layers) == [0, 1, 3]
    # a manifest whose folder is gone
    data = json.loads((out / "transcoder_set.json").read_text())
    data["layers"][1]["folder"] = "nowhere"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(data))
    with pytest.raises(AtlasError, match="folder .* is missing"):
        load_transcoder_set(broken).load_all()


def test_a_block_of_the_set_is_analysed_on_its_input_site(set_run, tiny_lm, tmp_path, corpus):
    from trainer.analyze import AnalyzeConfig, Analyzer

    out, _, _, _ = set_run
    folder = load_transcoder_set(out).folder(2)
    cfg = AnalyzeConfig(sae_dir=folder, model="tiny", out=tmp_path / "an", tokens=1200, shard_contexts=4,
                        corpus=str(corpus), device="cpu", lm_dtype="float32")
    analyzer = Analyzer(cfg, lm=tiny_lm)
    assert analyzer.site.name == "mlp_in.2"
    stats = analyzer.stream(progress=False)
    assert int(stats.count.sum()) > 0
    assert analyzer.summary(np.zeros(128), 1)["sae"]["output_site"] == "mlp_out.2"


# --- the whole set spliced in at once ---------------------------------------------------------------

def test_the_whole_set_spliced_in_matches_a_hand_written_forward(tiny_lm):
    lm, d = tiny_lm, tiny_lm.d_model
    torch.manual_seed(3)
    saes = []
    for layer in range(len(mlps(lm))):
        sae = build_sae(SAEConfig(d_in=d, d_sae=96, architecture="topk", k=6))
        with torch.no_grad():
            sae.b_dec.normal_(0, 0.01)
            sae.W_dec.mul_(0.05)
        if layer == 2:
            sae.io = SiteIO(w_skip=torch.randn(d, d) * 0.01)
        saes.append(sae.eval())
    models = [Evaluated(s, f"mlp_in.{i}", 1.0, f"mlp_out.{i}") for i, s in enumerate(saes)]
    ids = held_out_ids(lm, n=12, length=32, random=True, seed=9)
    got = spliced_set_loss(lm, models, [ids[:6], ids[6:]], exclude_bos=True, sink_norm_ratio=None,
                           max_contexts=12, min_contexts=12)

    def predict(sae, x):  # written out: TopK of W_enc (x - b_dec) + b_enc, decoded, plus W_skip x
        z = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
        top = z.topk(6, dim=-1)
        f = torch.zeros_like(z).scatter_(-1, top.indices, top.values.clamp_min(0))
        y = f @ sae.W_dec + sae.b_dec
        return y if sae.io is None else y + x @ sae.io.W_skip.T

    def per_context_ce(replace) -> np.ndarray:
        handles = []
        if replace is not None:
            for i, mlp in enumerate(mlps(lm)):
                def hook(_m, inputs, output, i=i):
                    pred = replace(i, inputs[0][:, 1:])
                    if pred is None:
                        return None
                    new = output.clone()
                    new[:, 1:] = pred  # BOS keeps its MLP output
                    return new
                handles.append(mlp.register_forward_hook(hook))
        try:
            with torch.no_grad():
                logits = lm.model(input_ids=ids).logits
        finally:
            for h in handles:
                h.remove()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        return loss.view(ids.shape[0], -1).double().mean(1).numpy()

    clean = per_context_ce(None)
    zero = per_context_ce(lambda i, x: torch.zeros_like(x))
    spliced = per_context_ce(lambda i, x: predict(saes[i], x))
    assert got["ce_contexts"] == 12
    assert got["ce_clean"] == pytest.approx(clean.mean(), abs=1e-5)
    assert got["ce_zero_ablation"] == pytest.approx(zero.mean(), abs=1e-4)
    assert got["ce_sae"] == pytest.approx(spliced.mean(), abs=1e-4)
    recovered = (zero.mean() - spliced.mean()) / (zero.mean() - clean.mean())
    assert got["ce_recovered"] == pytest.approx(recovered, abs=1e-4)
    from scipy import stats

    delta = spliced - clean
    half = stats.t.ppf(0.975, 11) * delta.std(ddof=1) / math.sqrt(12)
    assert got["delta_lm_loss_ci95"] == pytest.approx(half, rel=1e-3)
    # replacing every MLP at once is not replacing the last one alone: upstream changes propagate
    last_only = per_context_ce(lambda i, x: predict(saes[i], x) if i == 3 else None)
    assert abs(last_only.mean() - spliced.mean()) > 1e-3


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, fragments", [
    (["--site", "mlp.x"], ["unknown transcoder site 'mlp.x'", "mlp.*"]),
    (["--site", "mlp.30"], ["unknown transcoder site 'mlp.30'", "blocks 0..29"]),
    (["--site", "mlp.5-2"], ["runs backwards", "mlp.2-5"]),
    (["--skip-connection"], ["--skip-connection only applies to transcoders"]),
    (["--site", "mlp.*", "--cache-activations"], ["--cache-activations", "drop --cache-activations"]),
    (["--site", "mlp.3", "--activations", "x.npy"], ["a transcoder reads mlp_in.L", "drop --activations"]),
])
def test_bad_transcoder_flags_get_one_line_errors(capsys, tmp_path, argv, fragments):
    from app.cli import main

    code = main(["train", *argv, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code != 0 and lines and lines[-1].startswith("error: ") and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[-1], (f, lines[-1])


def test_a_transcoder_step_is_scored_against_its_target():
    """StepContext.target, not x, is what the loss and the logged prediction are compared with."""
    torch.manual_seed(1)
    sae = build_sae(SAEConfig(d_in=8, d_sae=32, architecture="topk", k=4, transcode=True))
    x, y = torch.randn(64, 8), torch.randn(64, 8) * 2 + 1
    sae.initialise_from(x, y)
    assert torch.allclose(sae.b_dec, y.mean(0)) and torch.allclose(sae.b_enc, -(x.mean(0) @ sae.W_enc.T), atol=1e-6)
    out = sae.training_step(x, StepContext(0, 10, None, 3.0, target=y))
    expected = (out.x_hat - y).pow(2).sum(-1).mean() / 3.0
    assert float(out.terms["recon"]) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert torch.allclose(out.x_hat, y.mean(0).expand_as(y))  # W_dec starts at zero


def test_a_stopped_transcoder_run_resumes_to_the_same_weights(tmp_path, tiny_model_dir, tiny_lm, corpus):
    """The checkpoint keeps the output scale and W_skip: stopped and resumed, a two-block
    skip-transcoder run saves exactly the weights of a run that was never stopped."""
    from safetensors.torch import load_file

    from trainer import train as train_module

    kw = dict(site=["mlp.1-2"], skip_connection=True, tokens=20 * 512, ce_contexts=0, eval_tokens=1024,
              checkpoint_every=5)
    full = train(config(tmp_path / "full", tiny_model_dir, corpus, **kw), lm=tiny_lm)
    original = Trainer.train_step

    def stopping(self, run, x, y=None):
        out = original(self, run, x, y)
        if self.step + 1 == 7:
            self._stop_requested = True
        return out

    mp = pytest.MonkeyPatch()
    mp.setattr(Trainer, "train_step", stopping)
    try:
        with pytest.raises(train_module.Interrupted):
            train(config(tmp_path / "part", tiny_model_dir, corpus, **kw), lm=tiny_lm)
    finally:
        mp.undo()
    resumed = train(config(tmp_path / "part", tiny_model_dir, corpus, resume=True, **kw), lm=tiny_lm)
    assert [f.name for f in full] == [f.name for f in resumed] == ["mlp.1-topk-w256-k16", "mlp.2-topk-w256-k16"]
    for a, b in zip(full, resumed):
        wa, wb = load_file(str(a / "sae_weights.safetensors")), load_file(str(b / "sae_weights.safetensors"))
        assert sorted(wa) == ["W_dec", "W_enc", "W_skip", "b_dec", "b_enc"]
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("autocast, native_bf16, expected", [
    ("auto", True, (torch.bfloat16, torch.float32)),  # transcoders take bf16 where the CPU has it; SAEs keep fp32
    ("auto", False, (torch.float32, torch.float32)),
    ("float32", True, (torch.float32, torch.float32)),
    ("bfloat16", False, (torch.bfloat16, torch.bfloat16)),
])
def test_bf16_is_the_cpu_default_for_transcoders_only(tmp_path, tiny_model_dir, tiny_lm, corpus, monkeypatch,
                                                      autocast, native_bf16, expected):
    import trainer.lm

    monkeypatch.setattr(trainer.lm, "cpu_has_bf16_matmul", lambda: native_bf16)
    trainer = Trainer(config(tmp_path / "o", tiny_model_dir, corpus, site=["mlp.1", "resid_post.1"], autocast=autocast),
                      lm=tiny_lm)
    trainer.build_runs(trainer.load_inputs())
    by_site = {r.site: r.sae.compute_dtype for r in trainer.runs}
    assert (by_site["mlp_in.1"], by_site["resid_post.1"]) == expected
