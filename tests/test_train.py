"""The training loop: sweeps, TOML configs, resume, divergence, Ctrl-C, DDP, the activation cache."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from app.cli import main
from trainer.formats import load_sae
from trainer.synthetic import superposition_data
from trainer.train import CHECKPOINT, Diverged, TrainConfig, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def acts_file(tmp_path_factory) -> Path:
    x, _ = superposition_data(30_000, d=32, n_features=96, seed=1)
    path = tmp_path_factory.mktemp("acts") / "acts.npy"
    np.save(path, x)
    return path


def small(out: Path, acts: Path, **kw) -> TrainConfig:
    base = dict(out=out, activations=acts, site=["resid_post.0"], width=[64], k=[4], tokens=12_800, batch_size=256,
                log_every=5, checkpoint_every=0, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "sae_weights.safetensors"))


def test_run_writes_saelens_folder_metrics_and_log(tmp_path, acts_file):
    (folder,) = train(small(tmp_path / "run", acts_file))
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 4 and cfg["d_in"] == 32 and cfg["d_sae"] == 64
    w = weights(folder)
    assert w["W_enc"].shape == (32, 64) and w["W_dec"].shape == (64, 32)
    metrics = json.loads((folder / "metrics.json").read_text())
    # TopK keeps k latents and ReLU drops those whose pre-activation is not positive: L0 <= k
    assert 0 < metrics["fvu"] < 1 and 3.5 < metrics["l0"] <= 4
    log = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and log[-1]["step"] == 49
    assert log[-1]["fvu"] < log[0]["fvu"]


def test_sweep_trains_every_combination_from_one_stream(tmp_path, acts_file):
    folders = train(small(tmp_path / "sweep", acts_file, width=[32, 64], k=[2, 4], arch=["topk", "relu"]))
    names = sorted(f.name for f in folders)
    assert names == sorted(["resid_post.0-topk-w32-k2", "resid_post.0-topk-w32-k4", "resid_post.0-topk-w64-k2",
                            "resid_post.0-topk-w64-k4", "resid_post.0-relu-w32", "resid_post.0-relu-w64"])
    for f in folders:
        assert (f / "metrics.json").is_file() and (f / "sae_weights.safetensors").is_file()


def test_toml_config_and_flags_give_the_same_sae(tmp_path, acts_file, capsys):
    flags = ["--activations", str(acts_file), "--width", "64", "--k", "4", "--tokens", "5120", "--batch-size", "256",
             "--site", "resid_post.0", "--device", "cpu"]
    assert main(["train", *flags, "--out", str(tmp_path / "a")]) == 0
    toml = tmp_path / "run.toml"
    toml.write_text(f'activations = "{acts_file}"\nwidth = [64]\nk = 4\ntokens = 5120\nbatch_size = 256\n'
                    f'site = "resid_post.0"\ndevice = "cpu"\nout = "{tmp_path / "b"}"\n')
    assert main(["train", "--config", str(toml)]) == 0
    out = capsys.readouterr().out
    assert "FVU" in out and str(tmp_path / "b") in out
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_continues_from_the_checkpoint(tmp_path, acts_file):
    full = train(small(tmp_path / "full", acts_file, checkpoint_every=20))[0]
    part = small(tmp_path / "part", acts_file, checkpoint_every=20, tokens=12_800)
    trainer_steps = {"n": 0}

    # Stop after 30 steps by asking the trainer to stop, exactly as Ctrl-C does.
    from trainer import train as train_module

    original = train_module.Trainer.train_step

    def counting(self, run, x):
        trainer_steps["n"] += 1
        if trainer_steps["n"] == 30:
            self._stop_requested = True
        return original(self, run, x)

    train_module.Trainer.train_step = counting
    try:
        with pytest.raises(train_module.Interrupted, match="--resume"):
            train(part)
    finally:
        train_module.Trainer.train_step = original
    state = torch.load(tmp_path / "part" / CHECKPOINT, weights_only=True)
    assert state["step"] == 30 and state["positions"] == [{"array_batches": 30}]
    assert "exp_avg" in str(state["runs"]["resid_post.0-topk-w64-k4"]["optimizer"]["state"][0].keys())
    resumed = small(tmp_path / "part", acts_file, checkpoint_every=20, resume=True)
    (folder,) = train(resumed)
    log = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 49
    w_full, w_res = weights(full), weights(folder)
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)  # same batches, same optimiser state


def test_shuffle_buffer_bookmark_is_exact_and_loses_no_token():
    """Chunks of numbered tokens: every batch of a window-by-window shuffle is a set of distinct
    tokens, all of a window's tokens come out (the remainder is carried, not dropped), and a buffer
    rebuilt from the bookmark taken after any batch yields exactly the batches that follow."""
    from trainer.activations import BufferPosition, ShuffleBuffer

    sizes = [37, 5, 61, 23, 40, 18, 52, 9, 33, 27, 44, 15] * 3
    starts = np.cumsum([0, *sizes])

    def open_chunks(skip: int):
        for i in range(skip, len(sizes)):
            yield {"s": torch.arange(starts[i], starts[i + 1], dtype=torch.float32)[:, None]}

    def batches(position=None):
        return ShuffleBuffer(open_chunks, batch_size=16, capacity=100, seed=3, position=position)

    buf = batches()
    reference, bookmarks = [], []
    for b in buf:
        reference.append(b["s"][:, 0].long())
        bookmarks.append(BufferPosition.from_state(buf.position.to_state()))
    seen = torch.cat(reference)
    assert len(seen) == len(set(seen.tolist()))  # no token twice
    assert len(seen) > starts[-1] - 16  # and none lost but the last partial batch at the very end
    for i, mark in enumerate(bookmarks[:-1]):
        rest = [b["s"][:, 0].long() for b in batches(mark)]
        assert len(rest) == len(reference) - i - 1
        assert all(torch.equal(a, b) for a, b in zip(rest, reference[i + 1:])), f"resume after batch {i} differs"


def record_batches(monkeypatch) -> list[torch.Tensor]:
    """Every batch the trainer trains on (its first SAE's), in order."""
    from trainer import train as train_module

    seen: list[torch.Tensor] = []
    original = train_module.Trainer.train_step

    def recording(self, run, x):
        if run is self.runs[0]:
            seen.append(x.detach().clone())
        return original(self, run, x)

    monkeypatch.setattr(train_module.Trainer, "train_step", recording)
    return seen


def stop_at(monkeypatch, step: int) -> None:
    """Ask the trainer to stop (as Ctrl-C does) once it has trained `step` steps."""
    from trainer import train as train_module

    original = train_module.Trainer.train_step

    def stopping(self, run, x):
        out = original(self, run, x)
        if self.step + 1 == step:
            self._stop_requested = True
        return out

    monkeypatch.setattr(train_module.Trainer, "train_step", stopping)


@pytest.mark.parametrize("cache", [False, True], ids=["lm", "cache"])
def test_resume_sees_exactly_the_batches_of_an_uninterrupted_run(tmp_path, tiny_lm, monkeypatch, cache):
    """Stopped mid-window of the shuffle buffer and resumed, the run trains on the same batches, in
    the same order, as one that was never stopped: no token twice, none skipped."""
    from trainer import train as train_module

    monkeypatch.setenv("SAE_ATLAS_DATA_DIR", str(tmp_path / "data"))
    from store.settings import get_settings

    get_settings.cache_clear()
    cfg = dict(model=str(tiny_lm.source), site=["resid_post.1"], width=[32], k=[4], tokens=40 * 128, batch_size=128,
               shuffle_buffer=1000, cache_activations=cache, eval_tokens=500, ce_contexts=0, device="cpu",
               lm_dtype="float32", lm_batch_size=4, checkpoint_every=0)
    with monkeypatch.context() as m:
        full_batches = record_batches(m)
        (full,) = train(TrainConfig(out=tmp_path / "full", **cfg), lm=tiny_lm)
    with monkeypatch.context() as m:
        first_batches = record_batches(m)
        stop_at(m, 13)  # 13 batches of 128 = 1664 tokens: inside the buffer's second window
        with pytest.raises(train_module.Interrupted):
            train(TrainConfig(out=tmp_path / "part", **cfg), lm=tiny_lm)
    state = torch.load(tmp_path / "part" / CHECKPOINT, weights_only=True)
    (position,) = state["positions"]
    assert state["step"] == 13 and position["buffer"]["emitted"] > 0  # stopped inside a window
    assert position["buffer"]["window"] > 0 or cache  # (the cache's one 8192-token chunk is a single window)
    with monkeypatch.context() as m:
        rest_batches = record_batches(m)
        (resumed,) = train(TrainConfig(out=tmp_path / "part", resume=True, **cfg), lm=tiny_lm)
    assert len(first_batches) == 13 and len(full_batches) == 40
    assert len(first_batches) + len(rest_batches) == len(full_batches)
    for i, (a, b) in enumerate(zip(full_batches, first_batches + rest_batches)):
        assert torch.equal(a, b), f"batch {i} differs"
    w_full, w_res = weights(full), weights(resumed)
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)
    get_settings.cache_clear()


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, acts_file):
    from trainer.activations import ArrayActivations

    x = np.load(acts_file).copy()
    arr = ArrayActivations(acts_file, eval_fraction=0.1, seed=0)
    order = np.random.default_rng(0 + 1).permutation(arr.train_rows)
    x[order[12 * 256]] = np.inf  # a row of step 12's batch
    poisoned = tmp_path / "poisoned.npy"
    np.save(poisoned, x)
    cfg = small(tmp_path / "nan", poisoned, checkpoint_every=5)
    with pytest.raises(Diverged, match=r"became (inf|nan) at step 12.*last good checkpoint"):
        train(cfg)
    state = torch.load(tmp_path / "nan" / CHECKPOINT, weights_only=True)
    assert state["step"] == 10
    assert all(torch.isfinite(v).all() for v in state["runs"]["resid_post.0-topk-w64-k4"]["sae"].values())


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path, acts_file):
    out = tmp_path / "sigint"
    cmd = [sys.executable, "-m", "app.cli", "train", "--activations", str(acts_file), "--out", str(out), "--width", "64",
           "--k", "4", "--tokens", "2000000", "--batch-size", "256", "--device", "cpu", "--checkpoint-every", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    log = out / "metrics.jsonl"
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "checkpoint saved" in err and "--resume" in err and "Traceback" not in err
    step = torch.load(out / CHECKPOINT, weights_only=True)["step"]
    assert step > 0
    resumed = subprocess.run(cmd[:cmd.index("2000000")] + ["20480"] + cmd[cmd.index("2000000") + 1:] + ["--resume"],
                             capture_output=True, text=True, timeout=300)
    # the resumed run trains for the (shorter) remaining budget and saves the SAE
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "sae_weights.safetensors").is_file()


@pytest.mark.skipif(not shutil.which("torchrun", path=os.path.dirname(sys.executable)), reason="torchrun missing")
def test_two_process_ddp_matches_one_process(tmp_path, acts_file):
    common = ["--activations", str(acts_file), "--width", "64", "--k", "4", "--tokens", "7680", "--batch-size", "256",
              "--device", "cpu", "--dead-after-tokens", "100000000", "--site", "resid_post.0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "app.cli", "train", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "app.cli", "train", *common,
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=2e-4, rtol=1e-3), (k, (w1[k] - w2[k]).abs().max())
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m2["fvu"] == pytest.approx(m1["fvu"], rel=1e-3)


# Runs `sae-atlas train` under torchrun, saving every batch each rank trains on to RECORD.rank<r>.pt;
# with CRASH_AFTER_CHECKPOINT set, every rank dies right after the first checkpoint is written.
RECORDER = """
import os, sys, torch
from trainer import train as t
seen, original_step, original_save = [], t.Trainer.train_step, t.save_checkpoint

def step(self, run, x):
    seen.append(x.detach().clone())
    return original_step(self, run, x)

def save(trainer):
    original_save(trainer)
    if os.environ.get("CRASH_AFTER_CHECKPOINT"):
        torch.distributed.barrier()  # rank 0 has written the file
        torch.save(seen, os.environ["RECORD"] + f".rank{trainer.rank}.pt")
        os._exit(17)

t.Trainer.train_step, t.save_checkpoint = step, save
from app.cli import main
code = main(sys.argv[1:])
torch.save(seen, os.environ["RECORD"] + f".rank{os.environ.get('RANK', '0')}.pt")
sys.exit(code)
"""


@pytest.mark.skipif(not shutil.which("torchrun", path=os.path.dirname(sys.executable)), reason="torchrun missing")
def test_two_process_resume_sees_exactly_the_batches_of_an_uninterrupted_run(tmp_path, tiny_model_dir):
    """2-process gloo DDP on the tiny LM: killed right after a checkpoint taken inside a shuffle window
    and resumed, every rank trains on exactly the batches it would have without the interruption."""
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    common = ["train", "--model", str(tiny_model_dir), "--site", "resid_post.1", "--width", "32", "--k", "4",
              "--tokens", str(24 * 128), "--batch-size", "128", "--shuffle-buffer", "1000", "--lm-batch-size", "4",
              "--eval-tokens", "300", "--ce-contexts", "0", "--device", "cpu", "--lm-dtype", "float32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def run(out: str, record: str, *extra: str, crash: bool = False) -> subprocess.CompletedProcess:
        e = {**env, "RECORD": str(tmp_path / record), **({"CRASH_AFTER_CHECKPOINT": "1"} if crash else {})}
        return subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script), *common,
                               "--out", str(tmp_path / out), *extra], capture_output=True, text=True, timeout=300, env=e)

    full = run("full", "full")
    assert full.returncode == 0, full.stderr[-3000:]
    crashed = run("part", "first", "--checkpoint-every", "9", crash=True)
    assert crashed.returncode != 0
    state = torch.load(tmp_path / "part" / CHECKPOINT, weights_only=True)
    assert state["step"] == 9 and state["world_size"] == 2 and len(state["positions"]) == 2
    assert all(p["buffer"]["window"] > 0 and p["buffer"]["emitted"] > 0 for p in state["positions"])
    resumed = run("part", "rest", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for rank in (0, 1):
        whole = torch.load(tmp_path / f"full.rank{rank}.pt")
        parts = torch.load(tmp_path / f"first.rank{rank}.pt") + torch.load(tmp_path / f"rest.rank{rank}.pt")
        assert len(whole) == len(parts) == 24
        for i, (a, b) in enumerate(zip(whole, parts)):
            assert torch.equal(a, b), f"rank {rank}, batch {i} differs"
    w_full, w_res = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert all(torch.allclose(w_full[k], w_res[k], atol=1e-6) for k in w_full)


def test_activation_cache_lets_a_second_run_skip_the_lm(tmp_path, tiny_lm, monkeypatch):
    calls = {"n": 0}
    original = type(tiny_lm).read

    def counted(self, *a, **kw):
        calls["n"] += 1
        return original(self, *a, **kw)

    monkeypatch.setattr(type(tiny_lm), "read", counted)
    cfg = dict(model=str(tiny_lm.source), site=["resid_post.1"], width=[64], k=[4], tokens=20_000, batch_size=500,
               cache_activations=True, eval_tokens=1000, ce_contexts=2, device="cpu", lm_dtype="float32", lm_batch_size=16)
    train(TrainConfig(out=tmp_path / "first", **cfg), lm=tiny_lm)
    first = calls["n"]
    calls["n"] = 0
    train(TrainConfig(out=tmp_path / "second", **{**cfg, "width": [32]}), lm=tiny_lm)
    second = calls["n"]
    assert first > 10 and second <= 2, (first, second)  # the second run reads the LM only for held-out evaluation
    assert load_sae(tmp_path / "second").sae.cfg.d_sae == 32


@pytest.mark.slow
def test_gpu_check_script_runs_end_to_end_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.sh --cpu: the GPU check's steps (bf16 sweep of TopK + JumpReLU on the
    bundled model, analysis, publishing, the summary table) as a tiny CPU smoke test."""
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path),
           "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu"], capture_output=True,
                          text=True, timeout=900, env=env)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-2000:]
    table = out[out.index("gpu_check summary (cpu)"):]
    for step, status in (("env", "PASS"), ("train", "PASS"), ("analyze", "PASS"), ("ddp", "SKIP"), ("speed", "SKIP")):
        assert any(line.split()[:2] == [step, status] for line in table.splitlines()), table
    assert "jumprelu FVU" in table and "topk FVU" in table and "CE rec" in table and "1152 latents" in table
