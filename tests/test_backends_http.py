"""The OpenAI-compatible HTTP backend against a real local server process on loopback.

The server (a stdlib ThreadingHTTPServer in a subprocess) plays a scenario chosen by the URL
path, /s/<scenario>-<key>/v1/chat/completions, and counts requests per key, so every test reads
exactly what the client sent: the documented retries, recorded failures and timeouts.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid

import pytest

from tests.helpers import free_port

SERVER = textwrap.dedent('''
    import json, sys, threading, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    counts, inflight, peak = {}, {}, {}
    lock = threading.Lock()

    def completion(text):
        return {"id": "x", "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3}}

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

        def do_GET(self):  # /stats/<key>
            key = self.path.rsplit("/", 1)[-1]
            with lock:
                self.send(200, {"count": counts.get(key, 0), "peak": peak.get(key, 0)})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            key = self.path.split("/")[2]
            scenario = key.split("-")[0]
            with lock:
                counts[key] = n = counts.get(key, 0) + 1
                inflight[key] = inflight.get(key, 0) + 1
                peak[key] = max(peak.get(key, 0), inflight[key])
            try:
                self.play(scenario, n, body)
            finally:
                with lock:
                    inflight[key] -= 1

        def play(self, scenario, n, body):
            if scenario == "ok":
                auth = self.headers.get("Authorization", "")
                self.send(200, completion(f"model={body['model']} auth={auth} max_tokens={body['max_tokens']}"))
            elif scenario == "flaky429":  # two 429s, then an answer
                if n <= 2:
                    self.send(429, {"error": "rate limited"}, [("Retry-After", "0")])
                else:
                    self.send(200, completion("fine"))
            elif scenario == "retryafter":  # one 429 asking for 1 s, then an answer
                if n == 1:
                    self.send(429, {"error": "slow down"}, [("Retry-After", "1")])
                else:
                    self.send(200, completion("fine"))
            elif scenario == "flaky503":
                self.send(503, {"error": "overloaded"}) if n == 1 else self.send(200, completion("fine"))
            elif scenario == "always500":
                self.send(500, {"error": "boom"})
            elif scenario == "malformed":
                self.send(200, b"this is not json {")
            elif scenario == "nochoices":
                self.send(200, {"object": "chat.completion", "choices": []})
            elif scenario == "slow":
                time.sleep(3)
                self.send(200, completion("too late"))
            elif scenario == "busy":  # 0.3 s per answer, to see how many are in flight at once
                time.sleep(0.3)
                self.send(200, completion("busy"))
            elif scenario.isdigit():
                self.send(int(scenario), {"error": {"message": f"status {scenario}"}})
            else:
                self.send(404, {"error": "unknown scenario"})

    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()
''')


@pytest.fixture(scope="module")
def llm_server(tmp_path_factory):
    script = tmp_path_factory.mktemp("llm-server") / "server.py"
    script.write_text(SERVER)
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(script), str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def scenario(server: str, name: str) -> tuple[str, str]:
    """(base URL, key) of a fresh run of a scenario."""
    key = f"{name}-{uuid.uuid4().hex[:8]}"
    return f"{server}/s/{key}/v1", key


def server_stats(server: str, key: str) -> dict:
    with urllib.request.urlopen(f"{server}/stats/{key}", timeout=5) as r:
        return json.loads(r.read())


def backend(base_url: str, **kw):
    from app.autointerp.backends import HTTPBackend

    opts = dict(base_url=base_url, api_key="sk-test", explainer_model="explainer-m", judge_model="judge-m",
                timeout_s=5.0, max_retries=3, concurrency=4, backoff_base_s=0.01, backoff_max_s=0.05)
    opts.update(kw)
    return HTTPBackend(**opts)


MSG = [{"role": "user", "content": "hi"}]


def run(coro):
    return asyncio.run(coro)


def test_answer_carries_model_key_and_limits(llm_server):
    url, _ = scenario(llm_server, "ok")
    b = backend(url)

    async def go():
        try:
            return await b.complete(MSG, 12), await b.complete(MSG, 5, "judge")
        finally:
            await b.aclose()

    explain, judge = run(go())
    assert explain == "model=explainer-m auth=Bearer sk-test max_tokens=12"
    assert judge.startswith("model=judge-m")
    assert (b.stats.requests, b.stats.retries, b.stats.failures) == (2, 0, 0)
    assert b.stats.prompt_tokens == 14 and b.stats.completion_tokens == 6


def test_429_is_retried_then_succeeds(llm_server):
    url, key = scenario(llm_server, "flaky429")
    b = backend(url)
    assert run(b.complete(MSG, 8)) == "fine"
    assert server_stats(llm_server, key)["count"] == 3
    assert (b.stats.requests, b.stats.retries, b.stats.failures) == (3, 2, 0)


def test_retry_after_is_honoured(llm_server):
    url, _ = scenario(llm_server, "retryafter")
    b = backend(url, backoff_base_s=0.001, backoff_max_s=0.001)  # jitter alone would retry at once
    started = time.monotonic()
    assert run(b.complete(MSG, 8)) == "fine"
    assert time.monotonic() - started >= 0.95
    assert b.stats.retries == 1


def test_5xx_is_retried(llm_server):
    url, key = scenario(llm_server, "flaky503")
    b = backend(url)
    assert run(b.complete(MSG, 8)) == "fine"
    assert server_stats(llm_server, key)["count"] == 2


def test_gives_up_after_max_retries(llm_server):
    from app.autointerp.backends import LLMGaveUp, LLMTimeout

    url, key = scenario(llm_server, "always500")
    b = backend(url, max_retries=2)
    with pytest.raises(LLMGaveUp) as err:
        run(b.complete(MSG, 8))
    assert not isinstance(err.value, LLMTimeout)
    assert err.value.attempts == 3 and err.value.status == 500 and err.value.retryable
    assert "after 3 attempts" in str(err.value) and "HTTP 500" in str(err.value)
    assert server_stats(llm_server, key)["count"] == 3
    assert (b.stats.requests, b.stats.retries, b.stats.failures) == (3, 2, 1)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_other_4xx_is_not_retried(llm_server, status):
    from app.autointerp.backends import LLMRejected

    url, key = scenario(llm_server, str(status))
    b = backend(url)
    with pytest.raises(LLMRejected) as err:
        run(b.complete(MSG, 8))
    assert err.value.status == status and not err.value.retryable
    assert server_stats(llm_server, key)["count"] == 1
    assert b.stats.retries == 0 and b.stats.failures == 1
    if status == 401:
        assert "OPENAI_API_KEY" in str(err.value)


@pytest.mark.parametrize("name", ["malformed", "nochoices"])
def test_malformed_response_is_a_recorded_failure(llm_server, name):
    from app.autointerp.backends import LLMMalformedResponse

    url, key = scenario(llm_server, name)
    b = backend(url)
    with pytest.raises(LLMMalformedResponse) as err:
        run(b.complete(MSG, 8))
    assert "not with a chat completion" in str(err.value)
    assert server_stats(llm_server, key)["count"] == 1  # a broken answer is not retried at once
    assert b.stats.failures == 1


def test_slow_server_times_out(llm_server):
    from app.autointerp.backends import LLMTimeout

    url, key = scenario(llm_server, "slow")
    b = backend(url, timeout_s=0.3, max_retries=1)
    started = time.monotonic()
    with pytest.raises(LLMTimeout) as err:
        run(b.complete(MSG, 8))
    assert time.monotonic() - started < 2.5  # the client does not wait for the 3 s answer
    assert err.value.attempts == 2 and "timed out after 2 attempts" in str(err.value)
    assert b.stats.timeouts == 2 and b.stats.retries == 1
    assert server_stats(llm_server, key)["count"] == 2


def test_connection_refused_is_retried_then_gives_up():
    from app.autointerp.backends import LLMGaveUp

    b = backend(f"http://127.0.0.1:{free_port()}/v1", max_retries=2)
    with pytest.raises(LLMGaveUp) as err:
        run(b.complete(MSG, 8))
    assert "connection error" in str(err.value)
    assert b.stats.requests == 3


def test_concurrency_is_bounded(llm_server):
    url, key = scenario(llm_server, "busy")
    b = backend(url, concurrency=2)

    async def go():
        try:
            return await b.complete_many([MSG] * 6, 4)
        finally:
            await b.aclose()

    assert run(go()) == ["busy"] * 6
    stats = server_stats(llm_server, key)
    assert stats["count"] == 6 and stats["peak"] == 2


def test_backoff_has_full_jitter_and_honours_retry_after():
    from store.retry import backoff_delay, parse_retry_after

    delays = [backoff_delay(3, 0.5, 30.0) for _ in range(200)]
    assert 0 <= min(delays) < 0.5 and 3.0 < max(delays) <= 4.0  # uniform in [0, 0.5 * 2^3]
    assert max(backoff_delay(10, 0.5, 30.0) for _ in range(50)) <= 30.0
    assert backoff_delay(0, 0.5, 30.0, retry_after=7.0) == 7.0
    assert parse_retry_after("3") == 3.0 and parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert 9 <= parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) <= 11


def test_job_failure_is_recorded_with_its_error(llm_server, sqlite_engine, monkeypatch):
    """A worker whose LLM server answers garbage puts the job back with the error kept."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from app.autointerp import queue
    from tests.synthetic_sae import make_synthetic_sae
    from app.autointerp.worker import run_worker
    from store.models import Explanation, Job

    make_synthetic_sae(sqlite_engine, n_features=3)
    with Session(sqlite_engine) as s, s.begin():
        queue.enqueue_for_sae(s, "synthetic", indices=[1])
    url, _ = scenario(llm_server, "malformed")
    assert run_worker(once=True, backend=backend(url), engine=sqlite_engine) == 0
    with Session(sqlite_engine) as s:
        job = s.scalar(select(Job))
        assert job.status == "queued" and job.attempts == 1 and job.run_after > job.started_at
        assert job.error.startswith("LLMMalformedResponse: the server answered HTTP 200")
        assert s.scalar(select(Explanation)) is None
    url, _ = scenario(llm_server, "401")
    with Session(sqlite_engine) as s, s.begin():  # time passes: the retry is due
        s.execute(Job.__table__.update().values(run_after=job.started_at))
    assert run_worker(once=True, backend=backend(url), engine=sqlite_engine) == 0
    with Session(sqlite_engine) as s:
        job = s.scalar(select(Job))
        assert job.status == "failed" and job.attempts == 2  # a 4xx is not retried
        assert job.error.startswith("LLMRejected:") and "HTTP 401" in job.error
