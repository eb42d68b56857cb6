"""Corpora: pydoc, local files, HF datasets (on a local folder), deterministic traceable packing."""

from __future__ import annotations

import json

import pytest

from store.errors import AtlasError
from trainer.corpus import Packer, PydocCorpus, open_corpus, split_documents


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _packer(tok, ctx_len=32):
    return Packer(tok, ctx_len, tok.bos_token_id, tok.eos_token_id)


def test_pydoc_corpus_is_the_running_pythons_documentation():
    docs = PydocCorpus().docs
    assert len(docs) > 1000
    titles = {d.title for d in docs}
    assert any(t.startswith("pydoc topic ") for t in titles)
    assert "json.dumps" in titles and "collections.OrderedDict" in titles
    assert all(len(d.text) >= 20 for d in docs)
    assert [d.id for d in docs] == list(range(len(docs)))


def test_packing_is_deterministic_for_a_seed(tokenizer):
    corpus = open_corpus("pydoc")
    first = [b.tokens for b in _packer(tokenizer).batches(split_documents(corpus, "train", 0.1, seed=3), 8, max_contexts=24)]
    again = [b.tokens for b in _packer(tokenizer).batches(split_documents(corpus, "train", 0.1, seed=3), 8, max_contexts=24)]
    other = [b.tokens for b in _packer(tokenizer).batches(split_documents(corpus, "train", 0.1, seed=4), 8, max_contexts=24)]
    assert all((a == b).all() for a, b in zip(first, again))
    assert not all((a == b).all() for a, b in zip(first, other))
    assert all((t[:, 0] == tokenizer.bos_token_id).all() for t in first)


def test_every_token_maps_back_to_its_document(tokenizer):
    corpus = open_corpus("pydoc")
    batch = next(_packer(tokenizer, 64).batches(split_documents(corpus, "eval", 0.1, seed=1), 16))
    checked = 0
    for c in range(batch.tokens.shape[0]):
        for pos in range(1, 64):
            doc_id, offset = int(batch.doc_ids[c, pos]), int(batch.doc_pos[c, pos])
            ids = tokenizer(corpus.document(doc_id).text, add_special_tokens=False)["input_ids"]
            expected = ids[offset] if offset < len(ids) else tokenizer.eos_token_id  # the separator ends a document
            assert int(batch.tokens[c, pos]) == expected
            checked += 1
    assert checked == 16 * 63
    assert (batch.doc_ids[:, 0] == -1).all()


def test_train_and_eval_splits_are_disjoint():
    corpus = open_corpus("pydoc")
    train = {d.id for d in split_documents(corpus, "train", 0.2)}
    held = {d.id for d in split_documents(corpus, "eval", 0.2)}
    assert train and held and not train & held
    assert len(train | held) == len(corpus.docs)
    assert 0.15 < len(held) / len(corpus.docs) < 0.25


def test_local_txt_jsonl_parquet_and_folder(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("First paragraph here.\n\nSecond paragraph there.\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "json line one"}) + "\n\n" + json.dumps({"text": "json two"}) + "\n")
    pq.write_table(pa.table({"text": ["parquet row", "another row"], "other": [1, 2]}), tmp_path / "c.parquet")
    assert [d.text for d in open_corpus(str(tmp_path / "a.txt")).documents()] == ["First paragraph here.", "Second paragraph there."]
    assert [d.title for d in open_corpus(str(tmp_path / "b.jsonl")).documents()] == ["b.jsonl:1", "b.jsonl:3"]
    assert [d.text for d in open_corpus(str(tmp_path / "c.parquet")).documents()] == ["parquet row", "another row"]
    folder = open_corpus(str(tmp_path))
    assert len(folder.docs) == 6
    assert folder.document(5).text == "another row"


def test_hugging_face_datasets_path_streams_a_local_dataset(tmp_path):
    data = tmp_path / "ds"
    data.mkdir()
    rows = [{"text": f"document number {i} about things", "id": i} for i in range(30)]
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    corpus = open_corpus(f"hf:{data}@train")
    assert not corpus.finite
    docs = list(corpus.documents())
    assert [d.text for d in docs] == [r["text"] for r in rows]
    assert corpus.document(7).text == "document number 7 about things"
    shuffled = [d.id for d in split_documents(corpus, "all", 0.0, seed=1, shuffle_buffer=8)]
    assert sorted(shuffled) == list(range(30)) and shuffled != list(range(30))


@pytest.mark.parametrize("content, suffix, message", [
    ("", ".txt", "has no documents"),
    ("\n\n   \n", ".txt", "has no documents"),
    ('{"text": "ok"}\n{not json\n', ".jsonl", "is not valid JSON"),
    ('{"body": "no text field"}\n', ".jsonl", "has no string field 'text'"),
    ("x", ".csv", "unsupported file type"),
])
def test_bad_corpora_are_one_clear_error(tmp_path, content, suffix, message):
    path = tmp_path / f"corpus{suffix}"
    path.write_text(content)
    with pytest.raises(AtlasError, match=message):
        list(open_corpus(str(path)).documents())


def test_unreadable_and_missing_corpora(tmp_path):
    with pytest.raises(AtlasError, match="no such file"):
        open_corpus(str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\xfa not utf-8 \xff")
    with pytest.raises(AtlasError, match="cannot read"):
        list(open_corpus(str(bad)).documents())
    with pytest.raises(AtlasError, match="cannot open dataset"):
        list(open_corpus(f"hf:{tmp_path / 'nothing-here'}").documents())
