"""SAEBench's sparse probing (trainer/sparse_probing.py) and its tasks (trainer/probing_tasks.py):
the pooling on the tiny model against a forward pass and an SAE encoder written out here, the top-k
choice and the probes against SAEBench's definitions written out here, the task builders (labels,
balance, no text or document in both splits), and one-line refusals of bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from store.errors import AtlasError
from trainer.corpus import Document
from trainer.probing_tasks import build_tasks, code_vs_prose_task, module_family_task
from trainer.sparse_probing import class_accuracies, dense_encoder, pooled_activations, top_k_dims


@pytest.fixture(scope="module")
def pydoc_docs():
    from trainer.corpus import PydocCorpus

    return PydocCorpus().docs


# --- task builders ------------------------------------------------------------------------------

def test_module_family_labels_balance_and_splits(pydoc_docs):
    task = module_family_task(pydoc_docs, n_train=30, n_test=10, classes=4, seed=1)
    by_id = {d.id: d for d in pydoc_docs}
    assert len(task.classes) == 4
    for split, data in (("train", task.train), ("test", task.test)):
        assert {len(v) for v in data.values()} == {30 if split == "train" else 10}
        for c, texts in data.items():
            for doc_id, text in zip(task.sources[split][c], texts):
                assert by_id[doc_id].title.split(".")[0] == c and by_id[doc_id].text == text
    train_texts = {t for v in task.train.values() for t in v}
    test_texts = {t for v in task.test.values() for t in v}
    assert not train_texts & test_texts
    train_ids = {i for v in task.sources["train"].values() for i in v}
    assert not train_ids & {i for v in task.sources["test"].values() for i in v}
    # the classes are the most frequent packages
    counts = {}
    for d in pydoc_docs:
        if not d.title.startswith("pydoc topic"):
            counts[d.title.split(".")[0]] = counts.get(d.title.split(".")[0], 0) + 1
    assert set(task.classes) <= set(sorted(counts, key=lambda f: -counts[f])[:8])
    # another seed: another split of the same classes
    other = module_family_task(pydoc_docs, n_train=30, n_test=10, classes=4, seed=2)
    assert other.classes == task.classes and other.train != task.train


def test_module_family_drops_texts_with_two_labels():
    docs = [Document(i, f"{fam}.f{i}", f"text {i} of {fam}") for i, fam in enumerate(["a"] * 6 + ["b"] * 6)]
    docs += [Document(20, "a.x", "shared text here"), Document(21, "b.y", "shared text here")]
    task = module_family_task(docs, n_train=4, n_test=2, classes=2)
    assert all("shared" not in t for v in (*task.train.values(), *task.test.values()) for t in v)


def test_code_vs_prose_lines(pydoc_docs):
    import ast

    task = code_vs_prose_task(pydoc_docs, n_train=40, n_test=15, seed=0)
    assert task.classes == ["code", "prose"]
    assert [len(v) for v in task.train.values()] == [40, 40] and [len(v) for v in task.test.values()] == [15, 15]
    for split in (task.train, task.test):
        for line in split["code"]:
            ast.parse(line)
            assert not line.startswith(">>>")
        for line in split["prose"]:
            assert len(line.split()) >= 6 and line[0].isupper() and line.endswith(".")
            with pytest.raises(SyntaxError):
                ast.parse(line)
    train_ids = {i for v in task.sources["train"].values() for i in v}
    test_ids = {i for v in task.sources["test"].values() for i in v}
    assert not train_ids & test_ids  # split by document
    assert not {t for v in task.train.values() for t in v} & {t for v in task.test.values() for t in v}


def test_task_bad_inputs(pydoc_docs):
    with pytest.raises(AtlasError, match="unknown probing task"):
        build_tasks(pydoc_docs_corpus(pydoc_docs), ["sentiment"], 10, 5)
    with pytest.raises(AtlasError, match="at least 2 train"):
        module_family_task(pydoc_docs, n_train=1, n_test=5)
    with pytest.raises(AtlasError, match="at least 2 classes"):
        module_family_task(pydoc_docs, n_train=10, n_test=5, classes=1)
    with pytest.raises(AtlasError, match="too few doctest"):
        code_vs_prose_task([Document(0, "m", "Just some prose words that are here.")], 10, 5)


def pydoc_docs_corpus(docs):
    class C:
        def documents(self):
            return iter(docs)
    return C()


# --- probes against SAEBench's definitions ------------------------------------------------------

def _mean_diff_top_k(x, y, k):
    """SAEBench: the k dims of largest |mean(x | y=1) - mean(x | y=0)| on the train split."""
    pos, neg = x[y == 1], x[y == 0]
    diffs = [abs(float(np.mean(pos[:, j])) - float(np.mean(neg[:, j]))) for j in range(x.shape[1])]
    return sorted(range(x.shape[1]), key=lambda j: -diffs[j])[:k]


def test_top_k_dims_is_mean_difference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 20))
    y = np.repeat([1, 0], 30)
    x[y == 1, 7] += 3.0
    x[y == 1, 3] -= 2.0  # a large negative difference counts (absolute value)
    assert list(top_k_dims(x, y, 2)) == [7, 3]
    assert list(top_k_dims(x, y, 5)) == _mean_diff_top_k(x, y, 5)


def test_class_accuracies_match_written_out_probes():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(3)
    classes = ["a", "b", "c"]

    def split(n):
        out = {}
        for i, c in enumerate(classes):
            x = rng.normal(size=(n, 12))
            x[:, i] += 3.0  # class c is visible on dim i
            out[c] = x.astype(np.float32)
        return out

    train, test = split(40), split(20)
    kept: dict = {}
    acc = class_accuracies(train, test, (1, 2), seed=0, keep=kept)
    for c in classes:
        xtr, ytr, xte, yte = kept[c]
        # SAEBench's balance: every positive, as many negatives, ceil(n / 2) at most from each other class
        assert ytr.sum() == len(train[c]) == (ytr == 0).sum() and yte.sum() == len(test[c]) == (yte == 0).sum()
        for other in classes:
            if other != c:
                from_other = sum(any(np.array_equal(r, o) for o in train[other]) for r in xtr[ytr == 0])
                assert from_other <= math.ceil(len(train[c]) / 2)
        for k in (1, 2):
            dims = _mean_diff_top_k(xtr, ytr, k)
            probe = LogisticRegression(C=1.0, max_iter=1000).fit(xtr[:, dims], ytr)
            want = float(np.mean(probe.predict(xte[:, dims]) == yte))
            assert acc[c][f"top_{k}_test_accuracy"] == pytest.approx(want)
        full = LogisticRegression(C=1.0, max_iter=1000).fit(xtr, ytr)
        assert acc[c]["test_accuracy"] == pytest.approx(float(np.mean(full.predict(xte) == yte)))
        assert acc[c]["top_1_test_accuracy"] > 0.75  # the class's own dim is found


def test_class_accuracies_bad_inputs():
    x = {"a": np.zeros((4, 3), np.float32), "b": np.ones((4, 3), np.float32)}
    with pytest.raises(AtlasError, match="different classes"):
        class_accuracies(x, {"a": x["a"]}, (1,))
    with pytest.raises(AtlasError, match="k >= 1"):
        class_accuracies(x, x, (0,))
    with pytest.raises(AtlasError, match="different widths"):
        class_accuracies(x, {"a": np.zeros((4, 5), np.float32), "b": x["b"]}, (1,))
    with pytest.raises(AtlasError, match="at least two classes"):
        class_accuracies({"a": x["a"]}, {"a": x["a"]}, (1,))


# --- pooling on the tiny model ------------------------------------------------------------------

def test_pooling_matches_written_out_forward_and_encoder(tiny_lm, tmp_path):
    from tests.conformance.layouts import saelens_cfg, write_saelens
    from trainer.formats import load_sae

    lm = tiny_lm
    d, f = lm.d_model, 40
    g = torch.Generator().manual_seed(0)
    w = {"W_enc": torch.randn(d, f, generator=g) * 0.3, "b_enc": torch.randn(f, generator=g) * 0.1,
         "W_dec": torch.randn(f, d, generator=g) * 0.2, "b_dec": torch.randn(d, generator=g) * 0.1}
    cfg = saelens_cfg("standard", hook="blocks.1.hook_resid_post")
    cfg.update(d_in=d, d_sae=f)
    sae = load_sae(write_saelens(tmp_path / "sae", cfg, w)).sae.eval()
    texts = ["Return the value of x.", "def f(a, b):\n    return a + b", "A much longer text " * 20]
    acts, codes = pooled_activations(lm, "resid_post.1", texts, ctx_len=32, batch_size=2, encode=dense_encoder(sae))
    assert acts.shape == (3, d) and codes.shape == (3, f)
    for i, text in enumerate(texts):
        ids = [lm.bos_token_id] + lm.tokenizer(text, add_special_tokens=False)["input_ids"][:31]
        with torch.no_grad():
            hs = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0]
        keep = [j for j, t in enumerate(ids) if t not in (lm.bos_token_id, lm.tokenizer.eos_token_id)]
        want = hs[keep].mean(0)
        np.testing.assert_allclose(acts[i], want.numpy(), atol=1e-5)
        z = torch.relu((hs[keep] - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).mean(0)  # SAELens standard encode
        np.testing.assert_allclose(codes[i], z.numpy(), atol=1e-5)


# --- absorption ---------------------------------------------------------------------------------

def _saebench_absorption(act, codes, direction, w_dec, main):
    """SAEBench's absorption of one word, written out with plain Python numbers."""
    d = [v / math.sqrt(sum(u * u for u in direction)) for v in direction]
    cos = []
    for row in w_dec:
        cos.append(sum(a * b for a, b in zip(row, d)) / math.sqrt(sum(a * a for a in row)))
    p = [f * c for f, c in zip(codes, cos)]
    big_p = sum(a * b for a, b in zip(act, d))
    m = sum(p[i] for i in main)
    cand = sorted((p[i] for i in range(len(p)) if i not in main and cos[i] >= 0.1 and p[i] > 0), reverse=True)[:3]
    t = sum(cand)
    if m >= big_p or t / big_p < 0.4:
        frac = 0.0
    elif m <= 0:
        frac = 1.0
    else:
        a = min(t, big_p - m)
        frac = min(max(a / (a + m), 0.0), 1.0)
    top = max(range(len(p)), key=lambda i: p[i])
    full = all(codes[i] < 1e-8 for i in main) and cos[top] >= 0.025 and big_p >= 0 and p[top] / big_p >= 0.4
    return frac, full


@pytest.mark.parametrize("case", ["absorbed", "main_fires", "partial", "no_absorber", "random"])
def test_absorption_of_word_matches_saebench(case):
    from trainer.absorption import absorption_of_word

    g = torch.Generator().manual_seed(5)
    d, f = 8, 12
    w_dec = torch.randn(f, d, generator=g)
    direction = torch.randn(d, generator=g)
    unit = direction / direction.norm()
    w_dec[0] = unit * 2  # the main latent: along the probe
    w_dec[1] = unit + 0.3 * torch.randn(d, generator=g)  # an absorber: close to the probe
    codes = torch.zeros(f)
    act = unit * 3.0
    if case == "absorbed":
        codes[1] = 3.0
    elif case == "main_fires":
        codes[0] = 2.0
    elif case == "partial":
        codes[0], codes[1] = 0.5, 2.0
    elif case == "no_absorber":
        codes[5] = 0.1
    else:
        codes = torch.relu(torch.randn(f, generator=g))
        act = torch.randn(d, generator=g) + unit * 2
    got = absorption_of_word(act, codes, direction, w_dec, [0])
    want = _saebench_absorption(act.tolist(), codes.tolist(), direction.tolist(), w_dec.tolist(), [0])
    assert got[0] == pytest.approx(want[0], abs=1e-5) and got[1] == want[1]
    if case == "absorbed":
        assert got == (pytest.approx(1.0), True)
    if case == "main_fires":
        assert got == (0.0, False)
    if case == "partial":
        assert 0 < got[0] < 1 and got[1] is False


def test_main_latents_follow_f1_jumps():
    from trainer.absorption import main_latents

    rows = [([3], 0.5), ([3, 7], 0.6), ([3, 7, 1], 0.62), ([3, 7, 1, 2], 0.9)]
    assert main_latents(rows, 0.03) == [3, 7]  # stops at the first step of <= 0.03
    assert main_latents([([4], 0.0)], 0.03) == [4]


def test_words_prompts_and_split(tiny_lm):
    import random

    from trainer.absorption import (
        TEMPLATE_SUFFIX,
        alpha_words,
        first_letter,
        prompt_ids,
        split_words,
    )

    vocab = alpha_words(tiny_lm.tokenizer)
    assert vocab and all(t.lstrip(" ").isalpha() and t.lstrip(" ").isascii() for _, t in vocab)
    splits = split_words(vocab, 200, 10, random.Random(0))
    assert not {w for w in splits["train"]} & {w for w in splits["test"]}
    assert len(splits["train"]) == int(0.8 * min(200, len(vocab)))
    word = splits["test"][0]
    ids = prompt_ids(tiny_lm.tokenizer, tiny_lm.bos_token_id, word, splits["test"][1:4])
    tail = len(tiny_lm.tokenizer(TEMPLATE_SUFFIX, add_special_tokens=False)["input_ids"]) + 1
    assert ids[0] == tiny_lm.bos_token_id and ids[len(ids) - tail] == word[0]
    text = tiny_lm.tokenizer.decode(ids[1:])
    assert text.endswith(f"{word[1]} has the first letter:") and text.count("has the first letter") == 4
    assert first_letter(" Apple") == 0 and first_letter("zebra") == 25
    with pytest.raises(AtlasError, match="alphabetic tokens"):
        split_words(vocab[:5], 200, 10, random.Random(0))


def test_absorption_end_to_end_on_tiny_model(tiny_lm):
    from trainer.absorption import AbsorptionConfig, absorption

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, tiny_lm.d_model, generator=g)
    encode = lambda a: torch.relu(a @ w.T)
    cfg = AbsorptionConfig(n_words=150, icl_examples=3, max_k=3, min_letters=27, batch_size=32)
    refused = absorption(tiny_lm, "resid_post.1", encode, w, cfg)
    assert refused["evaluated"] is False and "cannot do the first-letter task" in refused["reason"]
    assert 0 <= refused["probe_accuracy"] <= 1 and set(refused["probe_f1"]) == set("abcdefghijklmnopqrstuvwxyz")
    cfg.min_letters, cfg.min_probe_f1 = 1, 0.0
    out = absorption(tiny_lm, "resid_post.1", encode, w, cfg)
    assert out["evaluated"] is True and out["per_letter"]
    for row in out["per_letter"].values():
        assert 0 <= row["mean_absorption_fraction"] <= 1 and 0 <= row["full_absorption_rate"] <= 1
        assert 1 <= len(row["main_latents"]) <= 3
    with pytest.raises(AtlasError):
        absorption(tiny_lm, "resid_post.1", encode, w, AbsorptionConfig(n_words=5))


# --- the report card ----------------------------------------------------------------------------

def test_report_card_with_probing_and_absorption(tiny_model_dir, tmp_path):
    from app.cli.evaluate import format_card
    from tests.conformance.layouts import saelens_cfg, write_saelens
    from trainer.corpus import PydocCorpus
    from trainer.report_card import EvaluateConfig, evaluate_folder

    corpus = tmp_path / "small.txt"
    corpus.write_text("\n\n".join(d.text.replace("\n\n", "\n") for d in PydocCorpus().docs[:300]))
    g = torch.Generator().manual_seed(1)
    cfg = saelens_cfg("standard", hook="blocks.1.hook_resid_post")
    cfg.update(d_in=64, d_sae=96)
    cfg["metadata"]["model_name"] = str(tiny_model_dir)
    folder = write_saelens(tmp_path / "sae", cfg, {"W_enc": torch.randn(64, 96, generator=g) * 0.3,
                                                  "b_enc": torch.randn(96, generator=g) * 0.1,
                                                  "W_dec": torch.randn(96, 64, generator=g) * 0.2,
                                                  "b_dec": torch.randn(64, generator=g) * 0.1})
    ev = EvaluateConfig(sae_dir=folder, corpus=str(corpus), tokens=512, contexts=2, ctx_len=32, device="cpu",
                        lm_dtype="float32", probing=True, probe_train=12, probe_test=6, probe_k=[1, 2],
                        probe_ctx_len=32, absorption=True, absorption_words=120)
    card = evaluate_folder(ev, progress=False)
    sp, ab = card.metrics["sparse_probing"], card.metrics["absorption"]
    assert set(sp["tasks"]) == {"module_family", "code_vs_prose"} and sp["k_values"] == [1, 2]
    for key in ("llm_test_accuracy", "sae_test_accuracy", "sae_top_1_test_accuracy", "sae_top_2_test_accuracy"):
        assert 0 <= sp[key] <= 1
        assert sp[key] == pytest.approx(np.mean([t[key] for t in sp["tasks"].values()]))
    mf = sp["tasks"]["module_family"]
    assert set(mf["train_per_class"].values()) == {12} and set(mf["test_per_class"].values()) == {6}
    assert ab["evaluated"] is False and "first-letter" in ab["reason"]  # a random model cannot spell
    text = format_card(card)
    assert "sparse probing" in text and "top-1" in text and "absorption" in text and "not measured" in text
    with pytest.raises(AtlasError, match="probe-train"):
        EvaluateConfig(sae_dir=folder, probing=True, probe_train=1).validate()
