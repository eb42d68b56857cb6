"""`sae-atlas evaluate`: the report card of an SAE (trainer/report_card.py), end to end on the tiny
model: an SAE of ours and an imported SAELens folder, the losses against a splice written out here,
the intervals, one-line errors, storing with a published SAE, and migration 0010."""

from __future__ import annotations

import contextlib
import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from sqlalchemy import inspect, select
from sqlalchemy.orm import Session

from tests.conformance.layouts import saelens_cfg, saelens_weights, write_saelens
from tests.test_cli import assert_one_line_error, run

D, WIDTH, K = 64, 96, 6  # the tiny model's d_model; the imported SAE's latents and k
FAST = ["--device", "cpu", "--lm-dtype", "float32", "--lm-batch-size", "4"]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """1,500 pydoc docstrings (150 held out: dozens of contexts), cheaper to open than all of pydoc."""
    from trainer.corpus import PydocCorpus

    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text("\n\n".join(d.text.replace("\n\n", "\n") for d in PydocCorpus().docs[:1500]))
    return path


def hand_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(D, WIDTH, generator=g) * 0.3, "b_enc": torch.randn(WIDTH, generator=g) * 0.1,
            "W_dec": torch.randn(WIDTH, D, generator=g) * 0.15, "b_dec": torch.randn(D, generator=g) * 0.1}


@pytest.fixture(scope="module")
def sharp_lm(tiny_model_dir):
    """The tiny model with its final norm's weight times 30. The random model's logits are nearly
    flat, so zero-ablating a site moves its loss by ~0.004 nats and CE recovered, a ratio over that
    difference, is noise; sharper logits make the loss depend on the residual stream (the
    activations, hence the SAEs, are unchanged)."""
    from trainer.lm import load_lm

    lm = load_lm(str(tiny_model_dir), "cpu", "float32")
    with torch.no_grad():
        lm.model.model.norm.weight.mul_(30.0)
    return lm


@pytest.fixture(scope="module")
def saelens_dir(tmp_path_factory, tiny_model_dir):
    """A TopK SAE on resid_post.1 written as SAELens 6 writes it (not by our save code)."""
    cfg = saelens_cfg("topk", hook="blocks.1.hook_resid_post")
    cfg.update(d_in=D, d_sae=WIDTH, k=K)
    cfg["metadata"]["model_name"] = str(tiny_model_dir)
    return write_saelens(tmp_path_factory.mktemp("saelens") / "sae", cfg, hand_weights())


@contextlib.contextmanager
def store_at(url: str, monkeypatch):
    """Point the CLI's settings (and engine) at `url` for the duration."""
    from store.db import get_engine
    from store.settings import get_settings

    monkeypatch.setenv("DATABASE_URL", url)
    get_settings.cache_clear()
    get_engine.cache_clear()
    try:
        yield
    finally:
        get_settings.cache_clear()
        get_engine.cache_clear()


def evaluations_of(engine, name: str) -> list:
    from store.models import SAE, SAEEvaluation

    with Session(engine) as s:
        sae_id = s.scalar(select(SAE.id).where(SAE.name == name))
        return list(s.scalars(select(SAEEvaluation).where(SAEEvaluation.sae_id == sae_id).order_by(SAEEvaluation.id)))


# --- an imported SAE, against the splice written out by hand ------------------------------------

def test_imported_saelens_sae_end_to_end(saelens_dir, tiny_model_dir, small_corpus, tmp_path, capsys, monkeypatch):
    """`import` then `evaluate FOLDER`: every metric is there and finite, the interval brackets the
    estimate, and an unpublished folder is reported but not stored."""
    with store_at(f"sqlite:///{tmp_path / 'fresh.db'}", monkeypatch):
        assert main_ok(capsys, "db", "upgrade")
        assert main_ok(capsys, "import", str(saelens_dir), "--model", str(tiny_model_dir), "--name", "imported")
        from store.settings import get_settings

        folder = get_settings().data_dir / "saes" / "imported"
        code, out = run_out(capsys, "evaluate", str(folder), "--corpus", str(small_corpus), "--tokens", "1000",
                            "--contexts", "8", *FAST)
        assert code == 0, out
        assert "CE recovered" in out and "Δ LM loss" in out and "FVU" in out
        assert "not stored: the folder is not published" in out
        code, out = run_out(capsys, "evaluate", str(folder), "--json", "--corpus", str(small_corpus), "--tokens", "1000",
                            "--contexts", "8", *FAST)
        assert code == 0
        card = json.loads(out)
    m = card["metrics"]
    assert card["evaluation_id"] is None and card["sae"] is None
    assert card["settings"]["site"] == "resid_post.1" and card["settings"]["source_format"] == "saelens"
    assert m["eval_tokens"] == card["n_tokens"] == 1000 and m["ce_contexts"] == 8
    for key in ("fvu", "explained_variance", "l0", "dead_frac_eval", "dense_frac", "cos_sim", "ce_clean", "ce_sae",
                "ce_zero_ablation", "ce_recovered", "delta_lm_loss", "ce_recovered_ci95", "delta_lm_loss_ci95"):
        assert isinstance(m[key], float), key
    assert 0 < m["l0"] <= K
    for key in ("ce_recovered", "delta_lm_loss"):
        lo, hi = m[f"{key}_interval"]
        assert lo < m[key] < hi
        assert hi - lo == pytest.approx(2 * m[f"{key}_ci95"])


def main_ok(capsys, *argv) -> bool:
    return run_out(capsys, *argv)[0] == 0


def run_out(capsys, *argv) -> tuple[int, str]:
    from app.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + (captured.err if code else "")


def test_losses_match_a_splice_written_by_hand(saelens_dir, tiny_model_dir, sharp_lm, small_corpus):
    """The SAELens SAE's output computed here from its safetensors (SAELens's TopK: top k of the
    pre-activations, then ReLU), spliced into block 1's output at every position but BOS by a hook
    written here: the clean, spliced and zero-ablated losses, FVU and L0 agree with the report card."""
    from trainer.report_card import EvaluateConfig, evaluate_folder
    from trainer.stream import held_out_contexts

    cfg = EvaluateConfig(sae_dir=saelens_dir, model=str(tiny_model_dir), corpus=str(small_corpus), tokens=600,
                         contexts=6, lm_batch_size=3, sink_norm_ratio=None, device="cpu", lm_dtype="float32")
    card = evaluate_folder(cfg, lm=sharp_lm, progress=False)
    tokens = torch.cat(list(itertools.islice(held_out_contexts(cfg, sharp_lm, 3), 2)))
    assert tokens.shape == (6, 128)

    w = hand_weights()

    def sae_out(x: torch.Tensor) -> torch.Tensor:
        pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
        top = pre.topk(K, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        return z @ w["W_dec"] + w["b_dec"], z

    block = sharp_lm.model.model.layers[1]
    seen: list[torch.Tensor] = []

    def loss(replace=None) -> float:
        def hook(_module, _inputs, output):
            a = output[0] if isinstance(output, tuple) else output
            seen.append(a.detach().clone())
            if replace is None:
                return None
            new = a.clone()
            new[:, 1:] = replace(a[:, 1:])
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handle = block.register_forward_hook(hook)
        try:
            with torch.no_grad():
                logits = sharp_lm.model(input_ids=tokens, use_cache=False).logits
        finally:
            handle.remove()
        return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)))

    clean = loss()
    spliced = loss(lambda a: sae_out(a)[0])
    zero = loss(torch.zeros_like)
    m = card.metrics
    assert m["ce_clean"] == pytest.approx(clean, rel=1e-5)
    assert m["ce_sae"] == pytest.approx(spliced, rel=1e-5)
    assert m["ce_zero_ablation"] == pytest.approx(zero, rel=1e-5)
    assert m["ce_recovered"] == pytest.approx((zero - spliced) / (zero - clean), rel=1e-4)
    assert m["delta_lm_loss"] == pytest.approx(spliced - clean, rel=1e-4, abs=1e-6)
    assert spliced != pytest.approx(clean, rel=1e-3)  # the splice changed something

    x = seen[0][:, 1:].reshape(-1, D)[:600]  # the clean run's activations, in the order the card reads them
    x_hat, z = sae_out(x)
    fvu = float((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert m["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert m["l0"] == pytest.approx(float((z > 0).sum(1).float().mean()), rel=1e-6)
    assert m["cos_sim"] == pytest.approx(float(F.cosine_similarity(x_hat, x, dim=1).mean()), rel=1e-4)


def test_the_interval_brackets_the_estimate_and_shrinks_with_more_contexts(tiny_sae_dir, sharp_lm, small_corpus):
    from trainer.report_card import EvaluateConfig, evaluate_folder

    cards = {}
    for n in (8, 48):
        cfg = EvaluateConfig(sae_dir=tiny_sae_dir, tokens=256, contexts=n, lm_batch_size=8, device="cpu",
                             lm_dtype="float32", corpus=str(small_corpus))
        cards[n] = evaluate_folder(cfg, lm=sharp_lm, progress=False).metrics
        assert cards[n]["ce_contexts"] == n
    for n, m in cards.items():
        for key in ("ce_recovered", "delta_lm_loss"):
            lo, hi = m[f"{key}_interval"]
            assert lo <= m[key] <= hi, (n, key)
    for key in ("ce_recovered", "delta_lm_loss"):
        assert 0 < cards[48][f"{key}_ci95"] < cards[8][f"{key}_ci95"], key
        # the few contexts' interval holds the estimate from six times as many (a 95% interval that
        # were much too narrow would miss it)
        lo, hi = cards[8][f"{key}_interval"]
        assert lo <= cards[48][key] <= hi, key
    assert cards[8]["ce_clean"] != cards[48]["ce_clean"]  # more text, another estimate


# --- the card from the training run's own held-out evaluation -----------------------------------

def test_card_from_training_is_what_evaluate_measures_on_the_same_split(tiny_sae_dir, tiny_lm, monkeypatch):
    """--from-training takes the numbers the end of training measured; measuring the card afresh on
    the training run's held-out tokens and contexts (its eval_tokens, the ce_contexts it used) gives
    the same numbers, so the card it stores is the card evaluate would have made. It runs no LM."""
    import trainer.lm
    from trainer.report_card import EvaluateConfig, card_from_training, evaluate_folder

    training = json.loads((tiny_sae_dir / "cfg.json").read_text())["sae_atlas"]["training"]
    used = json.loads((tiny_sae_dir / "metrics.json").read_text())["ce_contexts"]

    def no_lm(*a, **k):
        raise AssertionError("--from-training without --probing / --absorption must not load an LM")

    monkeypatch.setattr(trainer.lm, "load_lm", no_lm)
    reused = card_from_training(EvaluateConfig(sae_dir=tiny_sae_dir, from_training=True), progress=False)
    monkeypatch.undo()
    fresh = evaluate_folder(EvaluateConfig(sae_dir=tiny_sae_dir, tokens=training["eval_tokens"], contexts=used,
                                           lm_batch_size=4, device="cpu", lm_dtype="float32"), lm=tiny_lm, progress=False)
    r, f = reused.metrics, fresh.metrics
    assert reused.settings["metrics_from"] == "training run's held-out evaluation"
    assert (reused.settings["tokens"], reused.settings["contexts"]) == (training["eval_tokens"], used)
    assert r["eval_tokens"] == f["eval_tokens"] == reused.n_tokens and r["ce_contexts"] == f["ce_contexts"] == used
    assert r["ce_tokens"] == f["ce_tokens"]
    for key in ("mse", "fvu", "l0", "cos_sim", "dead_frac_eval", "dense_frac", "ce_clean", "ce_sae", "ce_zero_ablation",
                "ce_recovered", "ce_recovered_ci95", "delta_lm_loss", "delta_lm_loss_ci95"):
        assert r[key] == pytest.approx(f[key], rel=1e-4, abs=1e-6), key
    for key in ("ce_recovered", "delta_lm_loss"):
        assert r[f"{key}_interval"] == pytest.approx(f[f"{key}_interval"], rel=1e-4, abs=1e-6)
    assert "dead_frac" not in r and "lr" not in r  # the run's own numbers are not the card's


def test_from_training_refusals(tiny_sae_dir, saelens_dir, tmp_path, capsys, monkeypatch):
    with store_at(f"sqlite:///{tmp_path / 'ft.db'}", monkeypatch):
        assert main_ok(capsys, "db", "upgrade")
        assert_one_line_error(*run(capsys, "evaluate", str(saelens_dir), "--from-training"),
                              "has no training run", "without --from-training")
        assert_one_line_error(*run(capsys, "evaluate", str(tiny_sae_dir), "--from-training", "--seed", "3"),
                              "--seed 3 is not the training run's 0", "--seed 0")
        assert_one_line_error(*run(capsys, "evaluate", str(tiny_sae_dir), "--from-training", "--ctx-len", "64"),
                              "--ctx-len 64", "without --from-training")
        code, out = run_out(capsys, "evaluate", str(tiny_sae_dir), "--from-training")
        assert code == 0 and "CE recovered" in out and "not stored: the folder is not published" in out


def test_demo_stores_its_report_cards_once(tiny_sae_dir, tmp_path, monkeypatch):
    """`make demo`'s step: each published demo SAE without a report card gets the one its training
    evaluation makes; one that has a card keeps it."""
    from app import demo
    from store.db import get_engine
    from trainer.publish import publish

    with store_at(f"sqlite:///{tmp_path / 'demo.db'}", monkeypatch):
        from store.db import upgrade

        engine = get_engine()
        upgrade(engine)
        publish(tiny_sae_dir, demo.DEMO_NAME, engine=engine, progress=False, relate=False)
        demo.store_demo_report_cards()
        demo.store_demo_report_cards()
        (card,) = evaluations_of(engine, demo.DEMO_NAME)
    metrics = json.loads((tiny_sae_dir / "metrics.json").read_text())
    assert card.metrics["fvu"] == metrics["fvu"] and card.metrics["ce_recovered"] == metrics["ce_recovered"]
    assert card.settings["from_training"] is True and card.n_tokens == metrics["eval_tokens"]
    from tests.test_pages import make_client

    with make_client(engine) as c:
        page = c.get(f"/saes/{demo.DEMO_NAME}").text.split('id="report-card"')[1].split("</section>")[0]
    assert "From the training run's held-out evaluation" in page and "Not evaluated yet" not in page


# --- storing with a published SAE ---------------------------------------------------------------

def test_a_published_sae_gets_its_report_card(published, tiny_sae_dir, small_corpus, capsys, monkeypatch):
    """By folder and by name: stored each time (newest first), shown on the SAE page and in the API
    response, whose ETag changes with it; --no-store keeps it out."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    engine, name = published
    client = TestClient(create_app(engine=engine))
    before = client.get(f"/api/v1/saes/{name}")
    assert before.json()["evaluation"] is None
    assert "Not evaluated yet" in client.get(f"/saes/{name}").text
    with store_at(engine.url.render_as_string(hide_password=False), monkeypatch):
        code, out = run_out(capsys, "evaluate", str(tiny_sae_dir), "--corpus", str(small_corpus), "--tokens", "500",
                            "--contexts", "4", *FAST)
        assert code == 0, out
        assert "stored as evaluation" in out and f"of {name}" in out
        code, out = run_out(capsys, "evaluate", name, "--json", "--tokens", "700", "--contexts", "6", *FAST)
        assert code == 0, out
        card = json.loads(out)
        code, out = run_out(capsys, "evaluate", name, "--no-store", "--corpus", str(small_corpus), "--tokens", "300",
                            "--contexts", "2", *FAST)
        assert code == 0 and "not stored (--no-store)" in out
        code, out = run_out(capsys, "evaluate", str(tiny_sae_dir), "--site", "resid_post.1", "--corpus", str(small_corpus),
                            "--tokens", "300", "--contexts", "2", *FAST)
        assert code == 0 and "not stored: evaluated on" in out and "resid_post.1" in out  # not this SAE's card
    rows = evaluations_of(engine, name)
    assert [r.n_tokens for r in rows] == [500, 700]
    assert card["sae"] == name and card["evaluation_id"] == rows[-1].id
    # by name, the defaults are the analysis's: its corpus, context length and split
    assert (card["settings"]["corpus"], card["settings"]["ctx_len"], card["settings"]["eval_fraction"]) == ("pydoc", 128, 0.1)

    after = client.get(f"/api/v1/saes/{name}")
    ev = after.json()["evaluation"]
    assert ev["id"] == rows[-1].id and ev["n_tokens"] == 700
    assert ev["metrics"]["ce_recovered"] == pytest.approx(card["metrics"]["ce_recovered"])
    assert ev["metrics"]["ce_recovered_interval"] == pytest.approx(card["metrics"]["ce_recovered_interval"])
    assert after.headers["etag"] != before.headers["etag"]
    assert client.get(f"/api/v1/saes/{name}", headers={"If-None-Match": after.headers["etag"]}).status_code == 304
    page = client.get(f"/saes/{name}").text
    assert "Report card" in page and "Not evaluated yet" not in page
    assert "700 held-out tokens" in page


# --- bad input: one line that says what to do ----------------------------------------------------

def test_bad_inputs_give_one_line_errors(tiny_sae_dir, tiny_model_dir, tmp_path, capsys, monkeypatch):
    with store_at(f"sqlite:///{tmp_path / 'errors.db'}", monkeypatch):
        assert main_ok(capsys, "db", "upgrade")
        assert_one_line_error(*run(capsys, "evaluate", "no-such-sae"), "no published SAE named 'no-such-sae'",
                              "or an SAE folder")
        assert_one_line_error(*run(capsys, "evaluate", str(tmp_path / "nowhere" / "sae")), "does not exist")
        (tmp_path / "empty").mkdir()
        assert_one_line_error(*run(capsys, "evaluate", str(tmp_path / "empty")), "has no cfg.json")
        assert_one_line_error(*run(capsys, "evaluate", str(tiny_sae_dir), "--site", "resid_post.9", *FAST),
                              "unknown site 'resid_post.9'", "blocks 0..3")
        assert_one_line_error(*run(capsys, "evaluate", str(tiny_sae_dir), "--contexts", "1"), "at least 2 contexts")
        assert_one_line_error(*run(capsys, "evaluate", str(tiny_sae_dir), "--tokens", "0"), "--tokens must be positive")
        assert_one_line_error(*run(capsys, "evaluate", str(tiny_sae_dir), "--eval-fraction", "0"), "--eval-fraction")
        assert_one_line_error(*run(capsys, "evaluate", str(tiny_sae_dir), "--contexts", "many"), "not a valid int")
        narrow = write_saelens(tmp_path / "narrow", saelens_cfg("topk", hook="blocks.1.hook_resid_post"),
                               saelens_weights("topk", 0))
        assert_one_line_error(*run(capsys, "evaluate", str(narrow), "--model", str(tiny_model_dir), *FAST),
                              "reads 16-dimensional activations", "--model")
        assert_one_line_error(*run(capsys, "evaluate", str(tiny_sae_dir), "--model", "no-such-alias", *FAST),
                              "no-such-alias")


# --- the schema ---------------------------------------------------------------------------------

def test_migration_0010_goes_down_and_up(engine):
    from alembic import command

    from store.db import alembic_config, current_revision, head_revision, upgrade

    assert "sae_evaluations" in inspect(engine).get_table_names()
    index = {ix["name"] for ix in inspect(engine).get_indexes("sae_evaluations")}
    assert "ix_sae_evaluations_sae_created" in index
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0009")
    assert current_revision(engine) == "0009"
    assert "sae_evaluations" not in inspect(engine).get_table_names()
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    assert "sae_evaluations" in inspect(engine).get_table_names()


def test_evaluations_go_with_their_sae(published):
    """A republished SAE is a new row: the evaluations of the old one go with it (ON DELETE CASCADE)."""
    from store.evaluations import latest_evaluation, write_evaluation
    from store.models import SAE

    engine, name = published
    with Session(engine) as s, s.begin():
        sae = s.scalar(select(SAE).where(SAE.name == name))
        first = write_evaluation(s, sae.id, {"contexts": 2}, {"fvu": 0.5, "ce_recovered": float("nan")}, 10)
        second = write_evaluation(s, sae.id, {"contexts": 4}, {"fvu": 0.25}, 20)
    with Session(engine) as s:
        latest = latest_evaluation(s, s.scalar(select(SAE.id).where(SAE.name == name)))
        assert latest.id == second > first and latest.metrics == {"fvu": 0.25}
    assert evaluations_of(engine, name)[0].metrics == {"fvu": 0.5, "ce_recovered": None}  # NaN is stored as null
    with Session(engine) as s, s.begin():
        s.delete(s.scalar(select(SAE).where(SAE.name == name)))
    with Session(engine) as s:
        from store.models import SAEEvaluation

        assert s.scalar(select(SAEEvaluation.id)) is None
