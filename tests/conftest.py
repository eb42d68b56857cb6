"""Shared fixtures: an isolated data folder, tiny models, SQLite and a real throwaway PostgreSQL."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI") == "true"


def pytest_configure(config):
    # Every test session gets its own data folder; converted model weights are shared with
    # `make demo` (they take ~20 s to convert) unless the caller points elsewhere.
    import tempfile

    data = Path(tempfile.mkdtemp(prefix="atlas-test-"))
    os.environ["SAE_ATLAS_DATA_DIR"] = str(data)
    os.environ.setdefault("SAE_ATLAS_MODEL_CACHE_DIR", str(REPO / "data" / "models"))
    # Publishing explains every latent with the embedding model; tests that want it ask for it
    # (publish(..., explain=True)), the rest keep the tiny SAEs unexplained as their checks expect.
    os.environ.setdefault("SAE_ATLAS_PUBLISH_EXPLANATIONS", "false")
    # Likewise the map (UMAP's first call in a process spends seconds compiling): tests that want
    # one ask for it (publish(..., make_map=True)).
    os.environ.setdefault("SAE_ATLAS_MAP_AT_PUBLISH", "false")
    os.environ.pop("DATABASE_URL", None)
    os.environ.pop("SAE_ATLAS_DATABASE_URL", None)
    from store.settings import get_settings

    get_settings.cache_clear()


@pytest.fixture(scope="module")
def one_torch_thread():
    """For files of tiny matrices: one thread is faster, and on a busy machine several OpenMP
    threads spinning against each other made such files many times slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tests.helpers import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    from trainer.lm import load_lm

    return load_lm(str(tiny_model_dir), "cpu", "float32")


@pytest.fixture(scope="session")
def pg_server():
    from tests.helpers import PostgresServer, find_pg_bindir

    if find_pg_bindir() is None:
        if IN_CI:
            pytest.fail("PostgreSQL server binaries are missing in CI; .ci/run must install them")
        pytest.skip("no PostgreSQL server binaries (initdb/pg_ctl) on this machine")
    server = PostgresServer().start()
    yield server
    server.stop()


def _sqlite_engine(tmp_path):
    from store.db import make_engine, upgrade

    engine = make_engine(f"sqlite:///{tmp_path / 'atlas.db'}")
    upgrade(engine)
    return engine


def _pg_engine(pg_server):
    from store.db import make_engine, upgrade

    engine = make_engine(pg_server.create_database("t_" + uuid.uuid4().hex[:12]))
    upgrade(engine)
    return engine


@pytest.fixture
def sqlite_engine(tmp_path):
    engine = _sqlite_engine(tmp_path)
    yield engine
    engine.dispose()


@pytest.fixture
def pg_engine(pg_server):
    engine = _pg_engine(pg_server)
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request, tmp_path):
    """A migrated, empty store on each backend."""
    if request.param == "sqlite":
        eng = _sqlite_engine(tmp_path)
    else:
        eng = _pg_engine(request.getfixturevalue("pg_server"))
    yield eng
    eng.dispose()


@pytest.fixture(scope="session")
def tiny_sae_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A small TopK SAE trained on the tiny model and analysed: ready to publish."""
    from trainer.analyze import AnalyzeConfig, analyze
    from trainer.train import TrainConfig, train

    out = tmp_path_factory.mktemp("tiny-sae") / "sae"
    cfg = TrainConfig(out=out, model=str(tiny_model_dir), site=["resid_post.2"], width=[128], k=[8], tokens=16_384,
                      batch_size=512, eval_tokens=2048, ce_contexts=4, lm_dtype="float32", device="cpu", log_every=10)
    (folder,) = train(cfg)
    analyze(AnalyzeConfig(sae_dir=folder, tokens=6000, device="cpu", lm_dtype="float32", shard_contexts=16), progress=False)
    return folder


@pytest.fixture
def published(engine, tiny_sae_dir):
    """(engine, SAE name) with the tiny SAE published."""
    from trainer.publish import publish

    publish(tiny_sae_dir, "tiny", engine=engine, progress=False)
    return engine, "tiny"
