"""Publishing into the store: bulk, all-or-nothing, never half-visible, replace only when asked."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

import store
from store.db import make_engine, upgrade
from store.errors import AtlasError
from store.models import SAE, Example, Feature
from trainer import publish as publish_module
from trainer.publish import Analysis, publish


def counts(engine) -> tuple[int, int, int]:
    with Session(engine) as s:
        return (s.scalar(select(func.count()).select_from(SAE)), s.scalar(select(func.count()).select_from(Feature)),
                s.scalar(select(func.count()).select_from(Example)))


def test_publish_writes_every_feature_and_example(engine, tiny_sae_dir):
    a = Analysis.load(tiny_sae_dir)
    publish(tiny_sae_dir, "tiny", engine=engine)
    n_features, n_examples = len(a.features["count"]), len(a.examples["feature"])
    assert counts(engine) == (1, n_features, n_examples)
    with Session(engine) as s:
        sae = store.sae_by_name(s, "tiny")
        assert sae.status == "ready" and sae.published_at is not None and sae.d_sae == n_features
        f = store.feature_by_index(s, sae, int(np.argmax(a.features["count"])))
        ex = s.scalars(select(Example).where(Example.feature_id == f.id).order_by(Example.kind, Example.rank)).all()
        top = [e for e in ex if e.kind == 0]
        assert top and top[0].activation == pytest.approx(float(a.features["max"][f.index]), rel=1e-4)
        # the peak token of the window is the one the example is about
        assert top[0].act_array()[top[0].peak] == pytest.approx(top[0].activation, rel=1e-2)
        vocab = store.vocab_for(s, sae.lm_id)
        assert len(vocab.raw) == len(a.vocab)


def test_same_name_is_refused_without_replace_and_replaced_cleanly_with_it(engine, tiny_sae_dir):
    publish(tiny_sae_dir, "tiny", engine=engine)
    before = counts(engine)
    with Session(engine) as s:
        old_version = store.sae_by_name(s, "tiny").version
    with pytest.raises(AtlasError, match="already published.*--replace"):
        publish(tiny_sae_dir, "tiny", engine=engine)
    assert counts(engine) == before
    publish(tiny_sae_dir, "tiny", engine=engine, replace=True)
    assert counts(engine) == before
    with Session(engine) as s:
        assert store.sae_by_name(s, "tiny").version != old_version


@pytest.mark.parametrize("name", ["", "a b", "../x", "x" * 200, "-lead"])
def test_bad_names(engine, tiny_sae_dir, name):
    with pytest.raises(AtlasError, match="invalid SAE name"):
        publish(tiny_sae_dir, name, engine=engine)


def test_unanalysed_folder(engine, tmp_path):
    with pytest.raises(AtlasError, match="no finished analysis"):
        publish(tmp_path, "x", engine=engine)


def test_readers_never_see_a_half_written_sae(engine, tiny_sae_dir, monkeypatch):
    seen = []
    original = publish_module.example_tuples

    def watching(a, ids):
        for i, row in enumerate(original(a, ids)):
            if i == 200:  # mid-publish, another connection looks at the store
                with Session(engine) as other:
                    seen.append((store.list_saes(other), other.scalar(text("SELECT count(*) FROM features"))))
            yield row

    monkeypatch.setattr(publish_module, "example_tuples", watching)
    publish(tiny_sae_dir, "tiny", engine=engine)
    assert seen == [([], 0)]
    with Session(engine) as s:
        assert [x.name for x in store.list_saes(s)] == ["tiny"]


def test_sqlite_failure_mid_publish_leaves_the_old_sae_intact(tmp_path, tiny_sae_dir, monkeypatch):
    engine = make_engine(f"sqlite:///{tmp_path / 'a.db'}")
    upgrade(engine)
    publish(tiny_sae_dir, "tiny", engine=engine)
    before = counts(engine)
    original = publish_module.example_tuples

    def failing(a, ids):
        for i, row in enumerate(original(a, ids)):
            if i == 300:
                raise sqlite3.OperationalError("disk I/O error")
            yield row

    monkeypatch.setattr(publish_module, "example_tuples", failing)
    with pytest.raises(AtlasError, match="went away.*nothing was written"):
        publish(tiny_sae_dir, "tiny", engine=engine, replace=True)
    assert counts(engine) == before
    with Session(engine) as s:
        assert store.sae_by_name(s, "tiny").status == "ready"


def test_postgres_going_away_mid_publish(tiny_sae_dir, monkeypatch):
    from tests.helpers import PostgresServer, find_pg_bindir

    if find_pg_bindir() is None:
        pytest.skip("no PostgreSQL binaries")
    server = PostgresServer().start()
    try:
        engine = make_engine(server.create_database("goaway"))
        upgrade(engine)
        original = publish_module.example_tuples

        def killing(a, ids):
            for i, row in enumerate(original(a, ids)):
                if i == 500:
                    server.restart()  # the server stops in the middle of COPY (sessions cut), then comes back
                yield row

        monkeypatch.setattr(publish_module, "example_tuples", killing)
        with pytest.raises(AtlasError, match="went away.*nothing was written"):
            publish(tiny_sae_dir, "tiny", engine=engine)
        engine.dispose()
        engine = make_engine(server.url("goaway"))
        assert counts(engine) == (0, 0, 0)
        monkeypatch.setattr(publish_module, "example_tuples", original)
        publish(tiny_sae_dir, "tiny", engine=engine)  # the same command again works
        assert counts(engine)[0] == 1
        engine.dispose()
    finally:
        server.stop()
