"""Training runs as jobs: submitted through the API or CLI, executed by `sae-atlas trainer-worker`
processes, killed and resumed, cancelled, failed; and submission-time validation."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from store.models import SAE, RunMetric, TrainingRun
from app.runs.child import PAUSE_AT_STEP_ENV, PAUSED_FILE
from app.runs.worker import HOLD_PUBLISH_ENV

REPO = Path(__file__).resolve().parents[1]
SOURCES = "./sources.jsonl"


def source_corpus(data: Path) -> str:
    """A small .jsonl corpus of this repository's trainer sources under DATA_DIR/corpora, the runs'
    default here: read in well under a second, where pydoc parses the standard library in every
    process that reads it (about 7 s each time on a loaded 2-core machine)."""
    folder = data / "corpora"
    folder.mkdir(exist_ok=True)
    with open(folder / "sources.jsonl", "w") as fh:
        for path in sorted((REPO / "trainer").glob("*.py")):
            text = path.read_text()
            for i in range(0, len(text), 2000):  # many documents, so that the held-out split has some
                fh.write(json.dumps({"text": text[i:i + 2000]}) + "\n")
    return SOURCES


@pytest.fixture
def atlas(engine, tmp_path, monkeypatch, tiny_model_dir):
    """(engine, TestClient, API key, env for worker processes) over one store and data folder; runs
    may load models from the tiny model's folder and read corpora from DATA_DIR/corpora."""
    from store.db import session_scope
    from app.main import create_app
    from app.security import create_key
    from store.settings import get_settings

    url = engine.url.render_as_string(hide_password=False)
    data = tmp_path / "data"
    data.mkdir()
    env = {**os.environ, "DATABASE_URL": url, "SAE_ATLAS_DATA_DIR": str(data), "SAE_ATLAS_RUN_HEARTBEAT_S": "0.5",
           "SAE_ATLAS_RUN_LEASE_S": "4", "SAE_ATLAS_RUN_CHECKPOINT_S": "1", "SAE_ATLAS_WORKER_POLL_S": "0.2",
           "PYTHONPATH": str(REPO), "SAE_ATLAS_MODEL_ROOTS": str(tmp_path / "models") + os.pathsep + str(tiny_model_dir.parent)}
    (tmp_path / "models").mkdir()
    source_corpus(data)
    for k in ("DATABASE_URL", "SAE_ATLAS_DATA_DIR", "SAE_ATLAS_MODEL_ROOTS"):
        monkeypatch.setenv(k, env[k])
    get_settings.cache_clear()
    with session_scope(engine) as session:
        key = create_key(session, "tester")
    with TestClient(create_app(engine=engine)) as client:
        yield engine, client, key, env
    get_settings.cache_clear()


def spec(model_dir: Path, **kw) -> dict:
    return {"model": str(model_dir), "sites": ["resid_post.1"], "width": [64], "k": [4], "tokens": 16_384,
            "batch_size": 512, "analyze_tokens": 4000, "device": "cpu", "lm_dtype": "float32", "corpus": SOURCES, **kw}


def submit(client, key, body: dict) -> dict:
    r = client.post("/api/v1/runs", json=body, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 201, r.text
    return r.json()


def start_worker(env: dict, *args: str, log: Path) -> subprocess.Popen:
    fh = open(log, "ab")
    return subprocess.Popen([sys.executable, "-m", "app.cli", "trainer-worker", *args], env=env, stdout=fh,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def run_row(engine, run_id: int) -> TrainingRun:
    with Session(engine, expire_on_commit=False) as session:
        return session.get(TrainingRun, run_id)


def child_processes(workdir: Path) -> list[int]:
    """PIDs of app.runs.child processes working in this run's folder."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"app.runs.child" in cmd and str(workdir).encode() in cmd:
            pids.append(int(proc.name))
    return pids


# --- submission-time validation ---------------------------------------------------------------

@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_invalid_configs_are_refused_at_submission_with_the_reason(atlas, tiny_model_dir):
    engine, client, key, _ = atlas
    auth = {"Authorization": f"Bearer {key}"}
    cases = [
        ({"k": [64], "width": [32]}, "k=64 must be smaller than width=32"),
        ({"sites": ["resid_post.9"]}, "unknown site 'resid_post.9': the model has blocks 0..3"),
        ({"sites": ["residual.1"]}, "unknown site 'residual.1'"),
        ({"sites": ["mlp.0-1"]}, "leave block(s) 2, 3 of the model's 4 without a transcoder"),
        ({"sites": ["mlp.*", "resid_post.1"]}, "sites mlp.* train transcoder sets and resid_post.1 SAEs"),
        ({"sites": ["mlp.0-9"]}, "unknown transcoder site 'mlp.0-9': the model has blocks 0..3"),
        ({"sites": ["mlp.3-1"]}, "runs backwards"),
        ({"sites": ["mlp.0-99999999999"]}, "names blocks past 999"),
        ({"skip_connection": True}, "--skip-connection only applies to transcoders"),
        ({"sites": ["mlp.*"], "set_publish": "heavy"}, "set_publish"),
        ({"model": "no-such-alias"}, "unknown model alias 'no-such-alias'"),
        ({"model": "/nowhere/model.gguf"}, "is not under the folders training runs may read"),
        ({"model": "./nowhere.gguf"}, "does not exist"),
        ({"arch": ["sparsest"]}, "arch"),
        ({"tokens": 100}, "less than one batch"),
        ({"corpus": "/nowhere/corpus.txt"}, "corpus '/nowhere/corpus.txt' is not under the folders"),
        ({"corpus": "./nowhere.txt"}, "does not exist"),
        ({"corpus": "hf:bad name"}, "bad corpus spec"),
        ({"gpus": 0}, "gpus"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"width": [64, 128], "k": [4, 8, 16], "sites": ["resid_post.0", "resid_post.1", "resid_post.2"],
          "arch": ["topk", "batchtopk"]}, "at most 32"),
    ]
    for change, reason in cases:
        r = client.post("/api/v1/runs", json=spec(tiny_model_dir, **change), headers=auth)
        assert r.status_code == 422, (change, r.text)
        assert reason in r.text, (change, r.json())
    # no key, a bad key, a taken name
    assert client.post("/api/v1/runs", json=spec(tiny_model_dir)).status_code == 401
    assert client.post("/api/v1/runs", json=spec(tiny_model_dir), headers={"Authorization": "Bearer nope"}).status_code == 403
    submit(client, key, spec(tiny_model_dir, name="taken"))
    r = client.post("/api/v1/runs", json=spec(tiny_model_dir, name="taken"), headers=auth)
    assert r.status_code == 409 and "already used" in r.text
    with Session(engine) as session:
        assert session.scalar(select(TrainingRun.name)) == "taken"  # nothing else was queued
        assert len(session.scalars(select(TrainingRun)).all()) == 1


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_cli_submit_validates_and_queues(atlas, tiny_model_dir):
    engine, _, _, env = atlas
    base = [sys.executable, "-m", "app.cli", "train", "--submit", "--model", str(tiny_model_dir), "--site", "resid_post.1"]
    bad = subprocess.run([*base, "--k", "64", "--width", "32"], env=env, capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "k=64 must be smaller than width=32" in bad.stderr
    bad = subprocess.run([*base, "--out", "/tmp/x"], env=env, capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "--out cannot be used with --submit" in bad.stderr
    ok = subprocess.run([*base, "--width", "64", "--k", "4", "--tokens", "8192", "--batch-size", "512", "--name", "cli-run"],
                        env=env, capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    assert "queued run" in ok.stdout
    with Session(engine) as session:
        run = session.scalar(select(TrainingRun).where(TrainingRun.name == "cli-run"))
        assert run.status == "queued" and run.spec["width"] == [64] and run.requested_by == "cli"


# --- a run from the API to a published SAE ------------------------------------------------------

def test_api_run_is_trained_analysed_and_published_by_a_worker(atlas, tiny_model_dir, tmp_path):
    engine, client, key, env = atlas
    run = submit(client, key, spec(tiny_model_dir, name="tiny-run", description="made by a test"))
    assert run["status"] == "queued" and run["total_steps"] == 32

    worker = start_worker(env, "--once", log=tmp_path / "worker.log")
    assert worker.wait(timeout=300) == 0, (tmp_path / "worker.log").read_text()[-3000:]

    r = client.get(f"/api/v1/runs/{run['id']}").json()
    assert r["status"] == "done", r
    assert r["progress"] == 1.0 and r["step"] == 32 and r["attempts"] == 1
    [sae] = r["saes"]
    assert sae["name"] == "tiny-run" and sae["d_sae"] == 64
    for metric in ("fvu", "l0", "ce_recovered", "dead_frac"):
        assert isinstance(sae["metrics"][metric], float), metric
    assert "training:" in r["log_tail"] and "analysing:" in r["log_tail"]
    assert "workdir" not in r and "lease_owner" not in r  # not shown publicly
    workdir = Path(run_row(engine, run["id"]).workdir)
    assert not (workdir / "sae" / "checkpoint.pt").exists()  # optimiser state dropped once published

    history = client.get(f"/api/v1/runs/{run['id']}/metrics").json()["saes"]["tiny-run"]
    assert [h["step"] for h in history] == list(range(32))  # every step logged once, in order
    assert all(0 < h["fvu"] < 2 and h["l0"] == 4 and h["loss"] > 0 for h in history)
    assert history[-1]["fvu"] < history[0]["fvu"]  # it learned

    # published with its link back to the run, and browsable
    with Session(engine) as session:
        row = session.scalar(select(SAE).where(SAE.name == "tiny-run"))
        assert row.run_id == run["id"] and row.status == "ready" and row.description == "made by a test"
    assert client.get("/api/v1/saes/tiny-run").status_code == 200
    page = client.get(f"/runs/{run['id']}")
    assert page.status_code == 200 and "<svg" in page.text and "/saes/tiny-run" in page.text
    assert f"/runs/{run['id']}" in client.get("/saes/tiny-run").text


# --- a transcoder set from the API to a registered, published set ----------------------------------

def two_block_model(tiny_model_dir: Path, models: Path) -> Path:
    """The tiny model cut to its first 2 blocks (the weights of the others are left unread)."""
    folder = models / "tiny-2-blocks"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    return folder


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_a_queued_transcoder_set_is_trained_published_and_registered_for_graphs(atlas, tiny_model_dir, tmp_path):
    from store.graphs import published_layers
    from trainer.transcoders.sets import load_transcoder_set, sets_dir

    engine, client, key, env = atlas
    model = two_block_model(tiny_model_dir, tmp_path / "models")
    body = spec(model, name="tc", sites=["mlp.*"], width=[32], k=[4], tokens=512 * 8, analyze_tokens=2000)
    run = submit(client, key, body)
    assert run["spec"]["sites"] == ["mlp.0-1"]  # stored with the blocks it names
    r = client.post("/api/v1/runs", json=body, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 409 and "already used" in r.text

    worker = start_worker(env, "--once", log=tmp_path / "worker.log")
    assert worker.wait(timeout=300) == 0, (tmp_path / "worker.log").read_text()[-3000:]

    r = client.get(f"/api/v1/runs/{run['id']}").json()
    assert r["status"] == "done", r
    assert r["progress"] == 1.0 and r["step"] == 8
    assert sorted(s["name"] for s in r["saes"]) == ["tc-L0", "tc-L1"]
    assert sorted(client.get(f"/api/v1/runs/{run['id']}/metrics").json()["saes"]) == ["tc-L0", "tc-L1"]
    with Session(engine) as session:
        rows = {row.name: row for row in session.scalars(select(SAE).where(SAE.run_id == run["id"]))}
        for layer in (0, 1):
            block = rows[f"tc-L{layer}"]
            assert block.status == "ready" and block.site == f"mlp_in.{layer}"
            assert block.config["transcoder_set"]["name"] == "tc" and block.config["transcoder_set"]["layer"] == layer
        # registered under the run's name, complete, each block linked to its published SAE
        registered = sets_dir() / "tc" / "transcoder_set.json"
        tset = load_transcoder_set(registered)
        assert sorted(tset.layers) == [0, 1] and json.loads(registered.read_text())["published"] == {"0": "tc-L0", "1": "tc-L1"}
        folders = {layer: str(tset.folder(layer)) for layer in tset.layers}
        assert published_layers(session, tset.model, folders, "tc") == {0: "tc-L0", 1: "tc-L1"}
    assert "tc" in client.get("/api/v1/graphs/sets").json()["sets"]
    r = client.post("/api/v1/graphs", json={"set": "tc", "prompt": "def f(x):"}, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("engine", ["postgres"], indirect=True)  # SQLite's writer holds the whole file while publishing
def test_a_transcoder_set_cancelled_while_publishing_publishes_and_registers_nothing(atlas, tiny_model_dir, tmp_path):
    from trainer.transcoders.sets import sets_dir

    engine, client, key, env = atlas
    model = two_block_model(tiny_model_dir, tmp_path / "models")
    run = submit(client, key, spec(model, name="tc2", sites=["mlp.*"], width=[32], k=[4], tokens=512 * 4,
                                   analyze_tokens=1000))
    hold = tmp_path / "hold"
    hold.mkdir()
    worker = start_worker({**env, HOLD_PUBLISH_ENV: str(hold)}, "--once", log=tmp_path / "worker.log")
    wait_for(lambda: (hold / "publishing").exists(), 240, "the publish to start")
    assert client.post(f"/api/v1/runs/{run['id']}/cancel", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    (hold / "release").touch()
    assert worker.wait(timeout=60) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    r = client.get(f"/api/v1/runs/{run['id']}").json()
    assert r["status"] == "cancelled" and r["saes"] == []
    assert not (sets_dir() / "tc2").exists()
    assert "cancelled" in (tmp_path / "worker.log").read_text()


# --- a worker killed mid-run; another resumes it ---------------------------------------------------

@pytest.mark.parametrize("engine", ["postgres"], indirect=True)
def test_a_killed_workers_run_is_resumed_from_its_checkpoint_by_another(atlas, tiny_model_dir, tmp_path):
    engine, client, key, env = atlas
    run = submit(client, key, spec(tiny_model_dir, name="resumed", tokens=512 * 64, width=[128], k=[8]))
    run_id = run["id"]
    # The first worker's trainer checkpoints at step 16 and waits there (child.PAUSE_AT_STEP_ENV):
    # the kill lands mid-run at a step the test chose, whatever the machine's speed.
    first = start_worker({**env, PAUSE_AT_STEP_ENV: "16"}, log=tmp_path / "first.log")
    try:
        workdir = Path(wait_for(lambda: run_row(engine, run_id).workdir, 120, "the run to start"))
        wait_for(lambda: (workdir / PAUSED_FILE).is_file(), 240, "the trainer to reach its checkpoint at step 16")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    killed_at = run_row(engine, run_id)
    assert killed_at.status == "running"
    # the trainer died with its worker (PDEATHSIG): nobody else writes into the run folder
    wait_for(lambda: not child_processes(workdir), 10, "the orphaned trainer to die")
    saved_step = json.loads((workdir / "sae" / "run.json").read_text())["step"]
    assert saved_step == 16
    from store.models import utcnow

    wait_for(lambda: run_row(engine, run_id).lease_expires_at < utcnow(), 30, "the dead worker's lease to expire")
    second = start_worker(env, "--once", log=tmp_path / "second.log")
    assert second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()[-3000:]
    done = run_row(engine, run_id)
    assert done.status == "done", (done.status, done.error)
    assert done.attempts == 2 and done.resumed_from_step == saved_step

    with Session(engine) as session:
        rows = session.execute(select(RunMetric.attempt, RunMetric.step).where(RunMetric.run_id == run_id)).all()
    first_steps = sorted(s for a, s in rows if a == 1)
    second_steps = sorted(s for a, s in rows if a == 2)
    # Steps before the checkpoint were trained (and logged) once, by the first worker; the second
    # started at the checkpoint and trained the rest once.
    assert first_steps == list(range(16)) and second_steps == list(range(16, 64)), (first_steps, second_steps)
    assert "resum" in (tmp_path / "second.log").read_text()
    assert len(client.get(f"/api/v1/runs/{run_id}").json()["saes"]) == 1


@pytest.mark.parametrize("engine", ["postgres"], indirect=True)
def test_a_publish_longer_than_the_lease_completes_once_beside_a_second_trainer(atlas, tiny_model_dir, tmp_path):
    """The worker keeps heartbeating while it publishes: held before its commit for three lease
    lengths (HOLD_PUBLISH_ENV), with a second trainer polling the queue all along, the run is
    published once, by its first attempt."""
    engine, client, key, env = atlas
    lease_s = float(env["SAE_ATLAS_RUN_LEASE_S"])
    hold = tmp_path / "hold"
    hold.mkdir()
    run = submit(client, key, spec(tiny_model_dir, name="long-publish"))
    first = start_worker({**env, HOLD_PUBLISH_ENV: str(hold)}, "--once", log=tmp_path / "first.log")
    second = None
    try:
        wait_for(lambda: (hold / "publishing").is_file(), 240, "the publish to be written and held")
        second = start_worker(env, log=tmp_path / "second.log")
        held_since = time.monotonic()
        from store.models import utcnow

        while time.monotonic() < held_since + 3 * lease_s:  # without heartbeats the lease would expire
            row = run_row(engine, run["id"])
            assert row.status == "running" and row.attempts == 1 and row.lease_expires_at > utcnow(), row.error
            time.sleep(0.25)
        (hold / "release").write_text("")
        assert first.wait(timeout=120) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
    done = run_row(engine, run["id"])
    assert done.status == "done" and done.attempts == 1, (done.status, done.attempts, done.error)
    with Session(engine) as session:
        assert [s.name for s in session.scalars(select(SAE).where(SAE.run_id == run["id"]))] == ["long-publish"]
    assert "claimed" not in (tmp_path / "second.log").read_text()


# --- cancel, failure, moving on -----------------------------------------------------------------

@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_a_cancelled_run_stops_within_seconds_and_publishes_nothing(atlas, tiny_model_dir, tmp_path):
    engine, client, key, env = atlas
    run = submit(client, key, spec(tiny_model_dir, name="cancelled", tokens=512 * 20_000))
    worker = start_worker(env, "--once", log=tmp_path / "worker.log")
    try:
        wait_for(lambda: run_row(engine, run["id"]).step > 5, 120, "training to start")
        workdir = Path(run_row(engine, run["id"]).workdir)
        assert child_processes(workdir)
        r = client.post(f"/api/v1/runs/{run['id']}/cancel", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        cancelled_at = time.monotonic()
        wait_for(lambda: not child_processes(workdir), 15, "the trainer to stop")
        stopped_in = time.monotonic() - cancelled_at
        assert worker.wait(timeout=30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    assert stopped_in < 10, stopped_in
    row = run_row(engine, run["id"])
    assert row.status == "cancelled" and row.step < row.total_steps
    with Session(engine) as session:
        assert session.scalar(select(SAE).where(SAE.run_id == run["id"])) is None
    assert not (workdir / "sae").exists()  # checkpoints of a cancelled run are removed
    assert "cancelled" in (tmp_path / "worker.log").read_text()
    # cancelling again is a conflict
    r = client.post(f"/api/v1/runs/{run['id']}/cancel", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 409


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_a_diverging_run_fails_with_its_message_and_the_worker_moves_on(atlas, tiny_model_dir, tmp_path):
    import torch
    import transformers

    engine, client, key, env = atlas
    broken = tmp_path / "nan-model"
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(broken)
    for f in tiny_model_dir.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            (broken / f.name).write_bytes(f.read_bytes())

    bad = submit(client, key, spec(broken, name="diverges", priority=10))
    good = submit(client, key, spec(tiny_model_dir, name="after-the-failure"))
    worker = start_worker(env, "--once", log=tmp_path / "worker.log")
    assert worker.wait(timeout=300) == 0, (tmp_path / "worker.log").read_text()[-3000:]

    failed = client.get(f"/api/v1/runs/{bad['id']}").json()
    assert failed["status"] == "failed" and failed["attempts"] == 1  # not retried: it would diverge again
    assert "NaN" in failed["error"], failed["error"]
    assert failed["saes"] == []
    page = client.get(f"/runs/{bad['id']}").text
    assert "NaN" in page and "failed" in page
    assert client.get(f"/api/v1/runs/{good['id']}").json()["status"] == "done"


def test_device_slots_give_each_worker_its_own_gpus(tmp_path):
    """Scaled trainer workers on one host see every GPU; the flock'd slots keep them apart."""
    from app.runs.worker import DeviceSlots

    keys = ["gpu-a", "gpu-b", "gpu-c"]
    first, second = DeviceSlots(tmp_path, keys), DeviceSlots(tmp_path, keys)
    assert first.free() == [0, 1, 2]
    first.keep([0, 1])  # a two-GPU run
    assert second.free() == [2]
    second.keep([2])
    first.release()
    assert sorted(DeviceSlots(tmp_path, keys).free()) == [0, 1]
    second.release()


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_a_two_device_run_is_launched_with_torchrun(atlas, tiny_model_dir, tmp_path):
    """gpus=2 goes through `torchrun --nproc_per_node 2` (gloo on this CPU machine, NCCL on GPUs)."""
    engine, client, key, env = atlas
    run = submit(client, key, spec(tiny_model_dir, name="ddp-run", gpus=2, device="auto"))
    worker = start_worker(env, "--once", "--gpus", "2", log=tmp_path / "worker.log")
    assert worker.wait(timeout=400) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    r = client.get(f"/api/v1/runs/{run['id']}").json()
    assert r["status"] == "done", r
    assert r["saes"][0]["name"] == "ddp-run"
    cfg = json.loads((Path(run_row(engine, run["id"]).workdir) / "sae" / "cfg.json").read_text())
    assert cfg["sae_atlas"]["training"]["world_size"] == 2  # trained data-parallel by two ranks
    steps = [h["step"] for h in client.get(f"/api/v1/runs/{run['id']}/metrics").json()["saes"]["ddp-run"]]
    assert steps == list(range(32))
    # a worker that can only take one device leaves such a run queued
    run2 = submit(client, key, spec(tiny_model_dir, name="ddp-run-2", gpus=2, device="auto"))
    single = start_worker(env, "--once", log=tmp_path / "single.log")
    assert single.wait(timeout=120) == 0
    assert client.get(f"/api/v1/runs/{run2['id']}").json()["status"] == "queued"
