"""What a training run may be asked to read, what its public views show, and the checks made before
any weights are read: paths confined to the configured roots, Hub ids, sweep names publish accepts,
int64 step counts, sites against a model's depth from its config or GGUF header."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from store.models import TrainingRun

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def api(engine, tmp_path, monkeypatch, tiny_model_dir):
    """(client, auth headers, corpus root, model root) with runs confined to two fresh roots."""
    from app.main import create_app
    from app.security import create_key
    from store.settings import get_settings

    corpora, models = tmp_path / "corpora", tmp_path / "models"
    corpora.mkdir()
    models.mkdir()
    (models / "tiny").symlink_to(tiny_model_dir)  # a link inside the roots to a folder outside: refused
    monkeypatch.setenv("SAE_ATLAS_CORPUS_ROOTS", str(corpora))
    monkeypatch.setenv("SAE_ATLAS_MODEL_ROOTS", f"{models}{os.pathsep}{tiny_model_dir}")
    get_settings.cache_clear()
    with Session(engine) as s, s.begin():
        key = create_key(s, "submitter")
    with TestClient(create_app(engine=engine)) as client:
        yield client, {"Authorization": f"Bearer {key}"}, corpora, models
    get_settings.cache_clear()


def body(model: str, **kw) -> dict:
    return {"model": model, "sites": ["resid_post.1"], "width": [64], "k": [4], "tokens": 16_384, "batch_size": 512,
            "analyze_tokens": 4000, "device": "cpu", **kw}


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_paths_outside_the_roots_are_refused_without_saying_whether_they_exist(api, tiny_model_dir, tmp_path):
    client, auth, corpora, _ = api
    outside = tmp_path / "secret.txt"
    outside.write_text("private notes\n")
    (corpora / "link.txt").symlink_to(outside)  # a file link out of the root
    (corpora / "dir").symlink_to(tmp_path)  # a folder link out of the root
    messages = {}
    for corpus in (str(outside), "/no/such/file.txt", "/", "/etc", "../secret.txt", "./../../secret.txt",
                   "./link.txt", "./dir", "./dir/secret.txt", "~/anything.txt"):
        r = client.post("/api/v1/runs", json=body(str(tiny_model_dir), corpus=corpus), headers=auth)
        assert r.status_code == 422, (corpus, r.text)
        message = r.json()["error"]["message"]
        assert "is not under the folders training runs may read" in message, (corpus, message)
        messages[corpus] = message.replace(repr(corpus), "PATH")
    assert len(set(messages.values())) == 1, messages  # one answer, whether the path exists or not
    models_root = Path(os.environ["SAE_ATLAS_MODEL_ROOTS"].split(os.pathsep)[0])
    (models_root / "elsewhere").symlink_to(tmp_path)  # a link out of the roots
    for model in ("/no/such/model", str(tmp_path), str(models_root / "elsewhere"), f"{models_root}/elsewhere/x.gguf",
                  "../secret.txt"):
        r = client.post("/api/v1/runs", json=body(model), headers=auth)
        assert r.status_code == 422 and "is not under the folders" in r.text, (model, r.text)


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_paths_inside_the_roots_are_accepted_and_shown_relative_to_them(api, engine, tiny_model_dir, tmp_path,
                                                                         monkeypatch):
    client, auth, corpora, _ = api
    (corpora / "docs").mkdir()
    (corpora / "docs" / "a.txt").write_text("Some text to train on.\n" * 50)
    r = client.post("/api/v1/runs", json=body(str(tiny_model_dir), corpus="./docs/a.txt", name="inside"), headers=auth)
    assert r.status_code == 201, r.text
    run_id = r.json()["id"]
    with Session(engine) as s:
        stored = s.get(TrainingRun, run_id).spec
    assert stored["corpus"] == str((corpora / "docs" / "a.txt").resolve())  # what the worker will read
    assert stored["model"] == str(tiny_model_dir.resolve())
    # a relative path inside a root, not existing: said so (the roots are the user's to read)
    r = client.post("/api/v1/runs", json=body(str(tiny_model_dir), corpus="./docs/missing.txt"), headers=auth)
    assert r.status_code == 422 and "does not exist" in r.text
    # Hub ids are never looked up on this machine's disk, even when such a folder exists here
    monkeypatch.chdir(tmp_path)
    (tmp_path / "some-org" / "some-model").mkdir(parents=True)
    r = client.post("/api/v1/runs", json=body("some-org/some-model", name="hub"), headers=auth)
    assert r.status_code == 201, r.text
    assert client.post("/api/v1/runs", json=body("org/../x"), headers=auth).status_code == 422

    # the public views: no host paths, working folders or worker names
    with Session(engine) as s, s.begin():
        s.execute(TrainingRun.__table__.update().where(TrainingRun.id == run_id).values(
            workdir=str(tmp_path / "runs" / "run-1"), lease_owner="gpu-box-7:4242:abcdef", status="running",
            log_tail=f"reading {corpora}/docs/a.txt\n=== train · attempt 1 · worker gpu-box-7:4242:abcdef ===",
            error=f"Traceback: File \"{sys.prefix}/lib/x.py\""))
    for url in (f"/api/v1/runs/{run_id}", "/api/v1/runs", f"/runs/{run_id}", "/runs", f"/runs/{run_id}/live",
                f"/runs/new?copy={run_id}"):
        text = client.get(url).text
        for secret in (str(tmp_path), "gpu-box-7", "4242", sys.prefix):
            assert secret not in text, (url, secret)
    shown = client.get(f"/api/v1/runs/{run_id}").json()
    assert shown["spec"]["corpus"] == "./docs/a.txt" and shown["spec"]["model"] == "."
    assert shown["leased"] is True and "workdir" not in shown and "lease_owner" not in shown
    assert "$CORPORA/docs/a.txt" in shown["log_tail"] and "(worker)" in shown["log_tail"]


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_a_sweep_whose_names_publish_would_refuse_is_refused_at_submission(api, tiny_model_dir):
    from app.runs.spec import RunSpec
    from store.publish import check_name

    client, auth, _, _ = api
    long_name = "n" * 96  # a valid run name, but the sweep's SAE names run past publish's 128 characters
    sweep = body(str(tiny_model_dir), name=long_name, width=[64, 1 << 20], k=[4, 8], arch=["topk", "matryoshka"])
    r = client.post("/api/v1/runs", json=sweep, headers=auth)
    assert r.status_code == 422 and "too long to publish" in r.text
    # whatever passes RunSpec publishes: every name goes through publish's own check
    for name in ("n" * 80, None, "a.b-c_d"):
        spec = RunSpec.model_validate({**sweep, "name": name})
        for _, published in spec.outputs(name or "run-2147483647"):
            check_name(published)


def test_step_counts_past_int32_round_trip(engine):
    from app.runs import service
    from app.runs.spec import RunSpec

    spec = RunSpec.model_validate({"tokens": 10**11, "batch_size": 16, "name": "long"})
    assert spec.tokens // spec.batch_size > 2**31
    with Session(engine) as s, s.begin():
        run = service.submit(s, spec)
        run.step = 2**31 + 5
    with Session(engine) as s:
        row = s.scalar(select(TrainingRun).where(TrainingRun.name == "long"))
        assert row.total_steps == 6_250_000_000 and row.step == 2**31 + 5


# --- sites before weights -------------------------------------------------------------------------

def test_depth_from_a_gguf_header_written_by_the_gguf_package(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    from store.errors import AtlasError
    from trainer.sources import _depth_from_gguf, check_sites

    path = tmp_path / "tiny.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(7)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"tok{i}" for i in range(5000)])  # a vocabulary to skip over
    writer.add_token_scores([0.0] * 5000)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert _depth_from_gguf(path) == 7
    assert [s.name for s in check_sites(str(path), ["resid_post.6", "mlp_out.0"])] == ["resid_post.6", "mlp_out.0"]
    with pytest.raises(AtlasError, match="the model has blocks 0..6"):
        check_sites(str(path), ["resid_post.7"])
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(AtlasError, match="cannot read the GGUF header"):
        _depth_from_gguf(tmp_path / "bad.gguf")


def test_depth_from_a_config_json(tmp_path, tiny_model_dir):
    from trainer.sources import model_depth

    assert model_depth(str(tiny_model_dir)) == 4  # tests/helpers.py: num_hidden_layers=4
    gpt2 = tmp_path / "gpt2-like"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text('{"model_type": "gpt2", "n_layer": 6}')
    assert model_depth(str(gpt2)) == 6
    nested = tmp_path / "vlm"
    nested.mkdir()
    (nested / "config.json").write_text('{"model_type": "x", "text_config": {"num_hidden_layers": 9}}')
    assert model_depth(str(nested)) == 9


def test_train_with_an_unknown_site_fails_before_the_model_is_converted(tmp_path):
    """`sae-atlas train --site resid_post.99` on a fresh data folder: the bundled model has 30
    blocks, which is known without converting or loading it; nothing is written to the model cache."""
    cache = tmp_path / "models"
    env = {**os.environ, "SAE_ATLAS_DATA_DIR": str(tmp_path / "data"), "SAE_ATLAS_MODEL_CACHE_DIR": str(cache),
           "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "app.cli", "train", "--site", "resid_post.99", "--out",
                           str(tmp_path / "out")], env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "unknown site 'resid_post.99': the model has blocks 0..29" in done.stderr
    assert not cache.exists() or not any(cache.iterdir())
    assert "torch" not in done.stderr  # no traceback, and nothing got as far as torch


def test_a_folder_corpus_reads_nothing_that_links_out_of_it(tmp_path):
    from trainer.corpus import LocalCorpus

    secret = tmp_path / "secret.txt"
    secret.write_text("private notes\n")
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "more.txt").write_text("more private notes\n")
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("public text\n")
    (folder / "sub" / "b.txt").write_text("more public text\n")
    (folder / "sub" / "inside.txt").symlink_to(folder / "a.txt")  # a link within the folder: fine
    (folder / "leak.txt").symlink_to(secret)
    (folder / "dir").symlink_to(tmp_path / "private")
    files = [p.relative_to(folder).as_posix() for p in LocalCorpus(folder).files()]
    assert files == ["a.txt", "sub/b.txt", "sub/inside.txt"]
