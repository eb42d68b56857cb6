"""Bad input at the command line: one line naming the problem and the fix, non-zero exit, no traceback."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from app.cli import main


def run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code: int, err: str, *fragments: str):
    assert code != 0
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert lines and lines[-1].startswith("error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[-1], (f, lines[-1])


def test_console_script_exits_non_zero_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "app.cli", "train", "--model", "no-such-alias", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown model alias 'no-such-alias'")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv, fragments", [
    (["train", "--arch", "gated"], ["unknown architecture 'gated'", "topk"]),
    (["train", "--k", "64", "--width", "64"], ["k=64 must be smaller than width=64"]),
    (["train", "--site", "resid_mid.3"], ["unknown site 'resid_mid.3'", "resid_post.L"]),
    (["train", "--tokens", "lots"], ["--tokens", "not a valid int"]),
    (["train", "--bogus-flag", "1"], ["unrecognized"]),
    (["train", "--model", "./missing-model"], ["does not exist"]),
])
def test_train_bad_flags(capsys, tmp_path, argv, fragments):
    if "--bogus-flag" in argv:  # argparse reports unknown flags itself, with exit status 2
        with pytest.raises(SystemExit) as exc:
            main(argv + ["--out", str(tmp_path / "o")])
        assert exc.value.code == 2
        return
    code, err = run(capsys, *argv, "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, *fragments)


def test_site_beyond_the_model(capsys, tmp_path, tiny_model_dir):
    code, err = run(capsys, "train", "--model", str(tiny_model_dir), "--site", "resid_post.9", "--out", str(tmp_path / "o"),
                    "--device", "cpu", "--lm-dtype", "float32")
    assert_one_line_error(code, err, "blocks 0..3")


@pytest.mark.parametrize("array, fragment", [
    (np.zeros((1000, 8), dtype=np.float64), "dtype float64, expected float32"),
    (np.zeros((10, 8, 2), dtype=np.float32), "expected [N, D]"),
    (np.zeros((10, 8), dtype=np.float32), "only 10 rows"),
])
def test_activation_file_of_the_wrong_shape_or_dtype(capsys, tmp_path, array, fragment):
    path = tmp_path / "acts.npy"
    np.save(path, array)
    code, err = run(capsys, "train", "--activations", str(path), "--out", str(tmp_path / "o"), "--width", "32", "--k", "4",
                    "--batch-size", "64", "--tokens", "640")
    assert_one_line_error(code, err, fragment)


def test_activation_file_that_is_not_numpy(capsys, tmp_path):
    path = tmp_path / "acts.npy"
    path.write_bytes(b"PK\x03\x04 definitely not an array")
    code, err = run(capsys, "train", "--activations", str(path), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "cannot read")


def test_output_folder_holding_another_run_is_refused(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "cfg.json").write_text("{}")
    np.save(tmp_path / "a.npy", np.random.default_rng(0).standard_normal((2000, 8)).astype(np.float32))
    code, err = run(capsys, "train", "--activations", str(tmp_path / "a.npy"), "--out", str(out), "--width", "16", "--k", "2",
                    "--batch-size", "100", "--tokens", "1000")
    assert_one_line_error(code, err, "holds another run", "--overwrite", "--resume")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, err = run(capsys, "train", "--activations", str(tmp_path / "a.npy"), "--out", str(tmp_path / "other"),
                    "--overwrite", "--width", "16", "--k", "2", "--batch-size", "100", "--tokens", "1000")
    assert_one_line_error(code, err, "does not look like an SAE run")
    assert (tmp_path / "other" / "notes.txt").exists()


def test_toml_config_with_unknown_key(capsys, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('model = "smollm2-135m"\nwidht = 100\n')
    code, err = run(capsys, "train", "--config", str(cfg))
    assert_one_line_error(code, err, "unknown option 'widht'")
    cfg.write_text("model = [unclosed\n")
    code, err = run(capsys, "train", "--config", str(cfg))
    assert_one_line_error(code, err, "not valid TOML")


@pytest.mark.parametrize("spec, fragment", [("", "has no documents"), ("missing-dir/x.txt", "no such file")])
def test_empty_or_missing_corpus(capsys, tmp_path, tiny_model_dir, spec, fragment):
    corpus = tmp_path / "empty.txt"
    corpus.write_text("")
    code, err = run(capsys, "train", "--model", str(tiny_model_dir), "--site", "resid_post.1", "--corpus",
                    str(corpus) if not spec else str(tmp_path / spec), "--out", str(tmp_path / "o"), "--device", "cpu",
                    "--lm-dtype", "float32", "--tokens", "4096", "--batch-size", "512", "--width", "64", "--k", "4")
    assert_one_line_error(code, err, fragment)


def test_unreachable_and_out_of_date_database(capsys, tmp_path, monkeypatch):
    from store.db import get_engine
    from store.settings import get_settings

    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    get_settings.cache_clear()
    get_engine.cache_clear()
    try:
        code, err = run(capsys, "db", "check")
        assert_one_line_error(code, err, "cannot reach the database", "DATABASE_URL")
        monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'fresh.db'}")
        get_settings.cache_clear()
        get_engine.cache_clear()
        code, err = run(capsys, "serve")
        assert_one_line_error(code, err, "has no SAE Atlas schema", "sae-atlas db upgrade")
        code, err = run(capsys, "publish", str(tmp_path), "--name", "x")
        assert_one_line_error(code, err, "sae-atlas db upgrade")
    finally:
        get_settings.cache_clear()
        get_engine.cache_clear()
