"""Serving benchmark: the feature page and the feature JSON of random latents, under wrk.

    python benchmarks/serve.py                      # build (or reuse) a 16k-latent atlas, SQLite and PostgreSQL
    python benchmarks/serve.py --duration 30 --concurrency 16 --workers 2
    python benchmarks/serve.py --build-only         # only build/publish the atlas
    # an SAE of an existing atlas (issue 23's setup: the demo's 4,608-wide SAE), this checkout
    # against another one (e.g. `git worktree add --detach /tmp/base main`), alternating rounds:
    SAE_ATLAS_DATA_DIR=/work/demo-data python benchmarks/serve.py --sae smollm2-135m-resid15-topk \
        --baseline /tmp/base --rounds 3
    SAE_ATLAS_DATA_DIR=/work/demo-data python benchmarks/serve.py --sae smollm2-135m-resid15-topk --profile 300
    # the same shapes without the demo (random numbers, built in about a minute):
    python benchmarks/serve.py --synthetic --baseline /tmp/base --rounds 3

What it does:
1. Builds (once; reused from data/bench afterwards) a TopK SAE of width 16384, k=32 on the bundled
   `smollm2-135m` at `resid_post.15`. Only serving speed matters, so it is not trained: every
   encoder/decoder row is a (centred, normalised) activation of a random corpus token, which
   spreads the firing over all latents like a trained SAE does. It is analysed with
   trainer.analyze on enough tokens for ~70 examples per latent and published with
   trainer.publish into SQLite (data/bench/atlas.db) and a throwaway PostgreSQL cluster
   (data/bench/pg, kept between runs, started on a free loopback port).
2. Serves the app with uvicorn (N worker processes) on 127.0.0.1 for each backend.
3. Runs a load generator with C concurrent connections for D seconds per endpoint: `wrk` with a
   Lua script that requests uniformly random latent indices over the whole SAE when wrk is
   installed, else a bounded asyncio + httpx generator doing the same. Every request is a fresh
   GET (no If-None-Match), so ETag revalidation never shortcuts the work.
4. Prints a table (throughput, p50, p99, errors) and writes benchmarks/results/serve.json.

With --sae NAME nothing is built or written: the SAE is read from the atlas the settings name
(SAE_ATLAS_DATABASE_URL, else SAE_ATLAS_DATA_DIR/atlas.db) and the servers only read it. With
--baseline DIR every round serves that checkout and this one in turn (the order alternating from
round to round, so that a machine growing busier favours neither), and the table gives each
one's median over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "data" / "bench"
RESULTS = REPO / "benchmarks" / "results"
SAE_NAME = "bench-16k"
MODEL = "smollm2-135m"
SITE = "resid_post.15"
WIDTH = 16384
K = 32

os.environ.setdefault("SAE_ATLAS_MODEL_CACHE_DIR", str(REPO / "data" / "models"))
os.environ.setdefault("SAE_ATLAS_DATA_DIR", str(BENCH / "home"))
sys.path.insert(0, str(REPO))


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- 1. the atlas ---------------------------------------------------------------------------------

def build_sae_dir(tokens: int) -> Path:
    """An untrained-but-realistic TopK SAE folder, analysed; reused when already there."""
    import torch

    from trainer.analyze import ANALYSIS_DIR, AnalyzeConfig, analyze

    folder = BENCH / "sae-16k"
    if (folder / ANALYSIS_DIR / "DONE").is_file():
        log(f"reusing the analysed SAE in {folder}")
        return folder
    from trainer.corpus import Packer, open_corpus, split_documents
    from trainer.formats import save_sae
    from trainer.lm import load_lm
    from trainer.sae import SAEConfig, build_sae

    torch.manual_seed(0)
    if not (folder / "cfg.json").is_file():
        log(f"loading {MODEL} and sampling {WIDTH} activations for the SAE's rows")
        lm = load_lm(MODEL, "cpu", "auto")
        site = lm.site(SITE)
        packer = Packer(lm.tokenizer, 128, lm.bos_token_id, lm.separator_token_id)
        docs = split_documents(open_corpus("pydoc"), "train", 0.1, seed=1)
        rows = []
        n = 0
        for batch in packer.batches(docs, 16, max_contexts=600):
            x = lm.read(batch.tokens, [site])[site.name][:, 1:].reshape(-1, lm.d_model).float()
            norms = x.norm(dim=1)
            x = x[norms < 10 * norms.median()]  # no attention sinks
            rows.append(x)
            n += len(x)
            if n >= 4 * WIDTH:
                break
        x = torch.cat(rows)
        scale = (lm.d_model ** 0.5) / float(x.norm(dim=1).mean())
        xs = x * scale
        sae = build_sae(SAEConfig(d_in=lm.d_model, d_sae=WIDTH, architecture="topk", k=K))
        with torch.no_grad():
            sae.initialise_from(xs)
            pick = xs[torch.randperm(len(xs))[:WIDTH]] - sae.b_dec
            pick = pick / pick.norm(dim=1, keepdim=True)
            sae.W_dec.copy_(pick)
            sae.W_enc.copy_(pick)
            sae.b_enc.zero_()
        save_sae(folder, sae, scale, SITE, MODEL, training={"note": "untrained: rows are sampled activations"},
                 metrics={}, corpus="pydoc")
        del lm
    log(f"analysing {tokens:,} tokens (resumable; progress below)")
    analyze(AnalyzeConfig(sae_dir=folder, split="all", tokens=tokens, device="cpu", n_random=20,
                          shard_contexts=256), progress=True)
    return folder


def published_in(url: str, name: str = SAE_NAME) -> bool:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(text("SELECT status FROM saes WHERE name = :n"), {"n": name}).first()
            return bool(row and row[0] == "ready")
    except Exception:
        return False
    finally:
        engine.dispose()


def publish_to(url: str, sae_dir: Path) -> None:
    from store.db import make_engine, upgrade
    from trainer.publish import publish

    engine = make_engine(url)
    upgrade(engine)  # a store kept from an older version gets the new migrations first
    if published_in(url):
        log(f"reusing the published SAE at {url.split('@')[-1]}")
        engine.dispose()
        return
    t = time.time()
    publish(sae_dir, SAE_NAME, replace=True, engine=engine, progress=False)
    engine.dispose()
    log(f"published {SAE_NAME} to {url.split('@')[-1]} in {time.time() - t:.0f} s")


class BenchPostgres:
    """A PostgreSQL cluster kept under data/bench/pg between runs; started on a free loopback port."""

    def __init__(self, root: Path):
        sys.path.insert(0, str(REPO / "tests"))
        from helpers import find_pg_bindir

        self.bindir = find_pg_bindir()
        if self.bindir is None:
            raise RuntimeError("no PostgreSQL server binaries (initdb, pg_ctl) found; install postgresql")
        self.root = root
        self.datadir = root / "data"
        self.sock = Path(tempfile.mkdtemp(prefix="atlas-bench-pg-"))
        self.port = free_port()
        self.as_postgres = os.geteuid() == 0

    def _run(self, *args: str, check: bool = True):
        cmd = list(args)
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True)

    def start(self) -> BenchPostgres:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(self.sock, "postgres", "postgres")
        if not (self.datadir / "PG_VERSION").is_file():
            self._run(str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", "postgres", "-A", "trust",
                      "--no-sync", "-E", "UTF8", "--locale=C")
            with open(self.datadir / "postgresql.conf", "a") as fh:
                fh.write("listen_addresses = '127.0.0.1'\nfsync = off\nsynchronous_commit = off\n"
                         "full_page_writes = off\nmax_connections = 200\nshared_buffers = 256MB\n")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.root / "log"), "-w", "-t", "60",
                  "-o", f"-p {self.port} -k {self.sock}", "start")
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as c:
            if not c.execute("SELECT 1 FROM pg_database WHERE datname = 'atlas'").fetchone():
                c.execute("CREATE DATABASE atlas")
        return self

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/atlas"

    def stop(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "stop", check=False)
        shutil.rmtree(self.sock, ignore_errors=True)


# --- 1b. a synthetic atlas shaped like the demo's ---------------------------------------------------

SYNTH_DB = BENCH / "synthetic" / "atlas.db"
SYNTH_SAE = "synth-4608"
SYNTH_PARTNERS = {"synth-4608-w1152": (1152, "resid_post.15"), "synth-4608-l14": (4608, "resid_post.14")}


def _synthetic_analysis(folder: Path, width: int, site: str, lm, vocab: list[str], seed: int) -> Path:
    """An analysis folder (what trainer.analyze writes) with random numbers in the demo's shapes: per
    latent 20 top, 10 x 5 interval and 20 random examples of 45 tokens, 32 neighbours, 10 + 10 logits."""
    import numpy as np

    from store.models import ExampleKind
    from trainer.analyze import ANALYSIS_DIR

    out = folder / ANALYSIS_DIR
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    V, F, W = len(vocab), width, 45
    count = rng.integers(1, 20_000, F)
    count[: F // 100] = 0  # a few dead latents
    mx = rng.gamma(2.0, 3.0, F).astype(np.float32)
    np.savez(out / "features.npz", count=count, density=count / 1e6, max=mx, mean=mx / 3, e_a2=mx, std=mx / 4,
             skew=mx / 5, kurtosis=mx, hist=rng.integers(0, 1000, (F, 50)).astype(np.int32),
             interval_count=rng.integers(0, 1000, (F, 10)).astype(np.int32),
             peak_token=rng.integers(0, V, F).astype(np.int32), peak_token_share=rng.random(F).astype(np.float32),
             logit_top_ids=rng.integers(0, V, (F, 10)).astype(np.int32), logit_top=rng.random((F, 10)).astype(np.float32),
             logit_bottom_ids=rng.integers(0, V, (F, 10)).astype(np.int32),
             logit_bottom=-rng.random((F, 10)).astype(np.float32), logit_hist=rng.integers(0, 5000, (F, 40)).astype(np.int32),
             logit_range=np.tile([-1.0, 1.0], (F, 1)).astype(np.float32),
             neighbor_ids=rng.integers(0, F, (F, 32)).astype(np.int32), neighbor_cos=rng.random((F, 32)).astype(np.float32))
    kinds = np.array([ExampleKind.top] * 20 + [ExampleKind.interval] * 50 + [ExampleKind.random] * 20)
    alive = np.flatnonzero(count > 0)
    E = len(alive) * len(kinds)
    tokens = rng.integers(0, V, (E, W)).astype(np.int32)
    acts = (rng.random((E, W)) * (rng.random((E, W)) < 0.15) * 5).astype(np.float16)  # ~15% of tokens fire
    np.savez(out / "examples.npz", feature=np.repeat(alive, len(kinds)), kind=np.tile(kinds, len(alive)),
             rank=np.tile(np.r_[np.arange(20), np.tile(np.arange(5), 10), np.arange(20)], len(alive)),
             interval=np.tile(np.r_[np.zeros(20), np.repeat(np.arange(10), 5), np.zeros(20)], len(alive)).astype(np.int16),
             token=tokens[:, 32], activation=acts[:, 32].astype(np.float32) + 1.0,
             doc_id=rng.integers(0, 5000, E).astype(np.int32), doc_pos=rng.integers(0, 500, E).astype(np.int32),
             tokens=tokens, acts=acts, peak=np.full(E, 32, np.int16))
    (out / "vocab.json").write_text(json.dumps(vocab))
    summary = {"sae": {"architecture": "topk", "d_in": lm.d_model, "d_sae": F, "k": K, "site": site, "norm_scale": 1.0},
               "metrics": {}, "lm": {"name": MODEL, "source": lm.source, "architecture": "llama", "n_layers": lm.n_layers,
                                     "d_model": lm.d_model, "vocab_size": V, "bos_token_id": lm.bos_token_id},
               "analysis": {"n_tokens": 1_000_000},
               "log_density_hist": {"edges": np.linspace(-8, 0, 49).tolist(), "counts": [0] * 48, "dead": F // 100},
               "dead": list(range(F // 100)), "dense": []}
    (out / "summary.json").write_text(json.dumps(summary))
    (out / "DONE").write_text("{}")
    return folder


def build_synthetic() -> str:
    """A SQLite atlas shaped like the demo's (data/bench/synthetic; built once, ~1 min): the 4,608-wide
    SAE at resid_post.15 of smollm2-135m, a 1,152-wide one at the same site (a width pair: each wide
    latent has a parent) and a 4,608-wide one at resid_post.14 (a layer pair: every latent matched).
    Nothing is trained: numbers are random, only their shapes (and SmolLM2's vocabulary) are the demo's."""
    import numpy as np

    url = f"sqlite:///{SYNTH_DB}"
    if published_in(url, SYNTH_SAE):
        log(f"reusing the synthetic atlas {SYNTH_DB}")
        return url
    from store.db import make_engine, upgrade
    from store.relations import write_relation
    from trainer.lm import load_lm
    from trainer.publish import publish

    log(f"building the synthetic atlas {SYNTH_DB}")
    lm = load_lm(MODEL, "cpu", "auto")
    vocab = lm.vocab_strings()
    engine = make_engine(url)
    upgrade(engine)
    for seed, (name, (width, site)) in enumerate({**SYNTH_PARTNERS, SYNTH_SAE: (4608, SITE)}.items()):
        folder = _synthetic_analysis(SYNTH_DB.parent / name, width, site, lm, vocab, seed)
        publish(folder, name, replace=True, engine=engine, progress=False, explain=False, relate=False)
    rng = np.random.default_rng(0)
    n, blank = 4608, np.full(4608, np.nan)
    parents = rng.integers(0, 1152, n)
    label = np.where(np.bincount(parents, minlength=1152)[parents] > 1, "split", "persisted")
    write_relation(engine, "synth-4608-w1152", SYNTH_SAE, "width", {"tokens": 1_000_000},
                   {"a": parents, "b": np.arange(n), "label": label, "kind": np.full(n, "direction"), "cos": rng.random(n),
                    "rho": rng.random(n), "p_b_given_a": rng.random(n), "p_a_given_b": rng.random(n), "stitch_gain": blank})
    write_relation(engine, "synth-4608-l14", SYNTH_SAE, "layer", {"tokens": 1_000_000},
                   {"a": rng.permutation(n), "b": np.arange(n), "label": np.full(n, "matched"), "kind": np.full(n, ""),
                    "cos": rng.random(n), "rho": rng.random(n), "p_b_given_a": blank, "p_a_given_b": blank, "stitch_gain": blank})
    engine.dispose()
    return url


# --- 2. the server --------------------------------------------------------------------------------

class Server:
    """uvicorn serving the checkout `tree` (this one by default) from the store at `url`."""

    def __init__(self, url: str, workers: int, port: int | None = None, extra: list[str] | None = None,
                 sae: str = SAE_NAME, tree: Path = REPO):
        self.url, self.workers, self.extra, self.sae, self.tree = url, workers, extra or [], sae, tree
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        env = {**os.environ, "SAE_ATLAS_DATABASE_URL": self.url, "SAE_ATLAS_LOG_LEVEL": "WARNING"}
        cmd = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", str(self.workers), "--no-access-log", "--log-level", "warning",
               "--backlog", "2048", "--no-server-header", *self.extra]
        # `python -m` puts the working directory first on sys.path: the server runs `tree`'s code
        self.proc = subprocess.Popen(cmd, cwd=self.tree, env=env, start_new_session=True)
        deadline = time.time() + 60
        import httpx

        while time.time() < deadline:
            try:
                if httpx.get(f"{self.base}/api/v1/saes/{self.sae}", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("the server exited during start-up")
            time.sleep(0.3)
        else:
            raise RuntimeError("the server did not answer within 60 s")
        return self

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the server's processes (master and workers)."""
        tick = os.sysconf("SC_CLK_TCK")
        pids = {self.proc.pid}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid:
                pids.add(int(stat.parent.name))
        total = 0
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime (after the ")" the state is field 0)
        return total / tick

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


# --- 3. load generators ---------------------------------------------------------------------------

WRK_LUA = """
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
local prefix = "%(prefix)s"
local width = %(width)d
request = function()
  return wrk.format("GET", prefix .. math.random(0, width - 1) .. "%(suffix)s")
end
done = function(summary, latency, requests)
  local f = io.open("%(out)s", "w")
  f:write(string.format('{"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p90_us": %%d, "p99_us": %%d, ' ..
    '"max_us": %%d, "mean_us": %%f, "errors": %%d, "non_2xx": %%d, "bytes": %%d}',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean, summary.errors.connect + summary.errors.read + summary.errors.write +
    summary.errors.timeout, summary.errors.status, summary.bytes))
  f:close()
end
"""


def run_wrk(base: str, path_prefix: str, suffix: str, concurrency: int, duration: float, threads: int,
            width: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        script = Path(tmp) / "random.lua"
        script.write_text(WRK_LUA % {"prefix": path_prefix, "suffix": suffix, "width": width, "out": out})
        cmd = ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{int(duration)}s", "--timeout", "10s", "-s", str(script), base]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        r = json.loads(out.read_text())
    secs = r["duration_us"] / 1e6
    return {"requests": r["requests"], "rps": r["requests"] / secs, "p50_ms": r["p50_us"] / 1e3,
            "p90_ms": r["p90_us"] / 1e3, "p99_ms": r["p99_us"] / 1e3, "max_ms": r["max_us"] / 1e3,
            "errors": r["errors"] + r["non_2xx"], "mb_per_s": r["bytes"] / secs / 1e6, "generator": "wrk"}


async def _python_load(base: str, path_prefix: str, suffix: str, concurrency: int, duration: float,
                       width: int) -> dict:
    import httpx

    latencies: list[float] = []
    errors = 0
    nbytes = 0
    stop_at = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=10) as client:
        async def one_client():
            nonlocal errors, nbytes
            rng = random.Random()
            while time.perf_counter() < stop_at:
                t = time.perf_counter()
                try:
                    r = await client.get(f"{path_prefix}{rng.randrange(width)}{suffix}")
                    nbytes += len(r.content)
                    if r.status_code != 200:
                        errors += 1
                except httpx.HTTPError:
                    errors += 1
                latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        secs = time.perf_counter() - start
    latencies.sort()

    def pct(p):
        return 1e3 * latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] if latencies else float("nan")

    return {"requests": len(latencies), "rps": len(latencies) / secs, "p50_ms": pct(50), "p90_ms": pct(90),
            "p99_ms": pct(99), "max_ms": 1e3 * latencies[-1] if latencies else float("nan"), "errors": errors,
            "mb_per_s": nbytes / secs / 1e6, "generator": "python-httpx"}


def load(base: str, path_prefix: str, suffix: str, concurrency: int, duration: float, threads: int,
         width: int) -> dict:
    if shutil.which("wrk"):
        return run_wrk(base, path_prefix, suffix, concurrency, duration, threads, width)
    return asyncio.run(_python_load(base, path_prefix, suffix, concurrency, duration, width))


# --- 4. main --------------------------------------------------------------------------------------

ENDPOINTS = {
    "feature JSON": ("/api/v1/saes/{sae}/features/", ""),
    "feature page": ("/saes/{sae}/features/", ""),
}


def db_facts(url: str, sae: str) -> dict:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.connect() as conn:
        sae_id, width = conn.execute(text("SELECT id, d_sae FROM saes WHERE name = :n AND status = 'ready'"),
                                     {"n": sae}).one()
        n_feat = conn.execute(text("SELECT count(*) FROM features WHERE sae_id = :s"), {"s": sae_id}).scalar()
        n_ex = conn.execute(text("SELECT count(*) FROM examples e JOIN features f ON f.id = e.feature_id "
                                 "WHERE f.sae_id = :s"), {"s": sae_id}).scalar()
        n_rel = conn.execute(text("SELECT count(*) FROM sae_relations WHERE sae_a_id = :s OR sae_b_id = :s"),
                             {"s": sae_id}).scalar()
    engine.dispose()
    return {"width": width, "features": n_feat, "examples": n_ex, "examples_per_feature": round(n_ex / max(n_feat, 1), 1),
            "relations": n_rel}


def git_head(tree: Path) -> str:
    r = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (r.stdout.strip() or "?") + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load per endpoint and backend")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of unmeasured load first")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    ap.add_argument("--threads", type=int, default=2, help="wrk threads")
    ap.add_argument("--tokens", type=int, default=400_000, help="tokens to analyse when building the SAE")
    ap.add_argument("--backends", default="sqlite,postgres", help="for the built atlas (not with --sae)")
    ap.add_argument("--endpoints", default=",".join(ENDPOINTS))
    ap.add_argument("--sae", metavar="NAME", help="measure this published SAE of the atlas the settings name "
                    "(SAE_ATLAS_DATABASE_URL, else SAE_ATLAS_DATA_DIR/atlas.db) instead of building bench-16k")
    ap.add_argument("--synthetic", action="store_true", help=f"measure {SYNTH_SAE} of a synthetic SQLite atlas shaped "
                    "like the demo's (built once into data/bench/synthetic): the 4,608-wide SAE and its relations")
    ap.add_argument("--baseline", type=Path, metavar="DIR", help="another checkout of the repository (e.g. a "
                    "worktree of the base commit): every round serves it and this one, in alternating order")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of every cell (medians are reported)")
    ap.add_argument("--uvicorn-args", default="", help="extra uvicorn options, e.g. '--loop asyncio --http h11'")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="instead of the load test: profile N requests of each endpoint in-process "
                         "(pyinstrument), with the render cache cleared, into benchmarks/results/serve_profile.txt")
    args = ap.parse_args(argv)
    endpoints = [e.strip() for e in args.endpoints.split(",") if e.strip()]

    pg = None
    urls = {}
    sae = args.sae or (SYNTH_SAE if args.synthetic else SAE_NAME)
    try:
        if args.synthetic:
            urls["sqlite"] = build_synthetic()
        elif args.sae:
            from store.settings import get_settings

            url = get_settings().sqlalchemy_url
            urls["postgres" if url.startswith("postgresql") else "sqlite"] = url
        else:
            BENCH.mkdir(parents=True, exist_ok=True)
            sae_dir = build_sae_dir(args.tokens)
            backends = [b.strip() for b in args.backends.split(",") if b.strip()]
            if "sqlite" in backends:
                urls["sqlite"] = f"sqlite:///{BENCH / 'atlas.db'}"
                publish_to(urls["sqlite"], sae_dir)
            if "postgres" in backends:
                pg = BenchPostgres(BENCH / "pg").start()
                urls["postgres"] = pg.url
                publish_to(pg.url, sae_dir)
        if args.build_only:
            return 0
        if args.profile:
            return profile(next(iter(urls.values())), sae, args.profile, endpoints)
        trees = {"this": REPO}
        if args.baseline:
            trees = {"baseline": args.baseline.resolve(), "this": REPO}
        commits = {label: git_head(tree) for label, tree in trees.items()}
        log(f"load average {os.getloadavg()}; {cpu_info()['cpu_model']}, {os.cpu_count()} CPUs; "
            + ", ".join(f"{label} = {tree} ({commits[label]})" for label, tree in trees.items()))
        results = []
        for rnd in range(args.rounds):
            order = list(trees.items())
            if rnd % 2:
                order.reverse()
            for backend, url in urls.items():
                facts = db_facts(url, sae)
                if rnd == 0:
                    log(f"{backend}: {sae}, {facts['width']:,} latents, {facts['examples']:,} examples "
                        f"({facts['examples_per_feature']} per feature), {facts['relations']} relations")
                for label, tree in order:
                    with Server(url, args.workers, extra=args.uvicorn_args.split(), sae=sae, tree=tree) as server:
                        for name in endpoints:
                            prefix, suffix = ENDPOINTS[name]
                            prefix = prefix.format(sae=sae)
                            if args.warmup > 0:
                                load(server.base, prefix, suffix, args.concurrency, args.warmup, args.threads,
                                     facts["width"])
                            load_before = round(os.getloadavg()[0], 2)
                            log(f"round {rnd + 1}/{args.rounds} · {label} · {backend} · {name}: "
                                f"{args.concurrency} connections for {args.duration:.0f} s (load {load_before})")
                            cpu0 = server.cpu_seconds()
                            r = load(server.base, prefix, suffix, args.concurrency, args.duration, args.threads,
                                     facts["width"])
                            cpu = server.cpu_seconds() - cpu0
                            r.update(tree=label, commit=commits[label], round=rnd + 1, backend=backend, endpoint=name,
                                     sae=sae, **facts, server_cpu_ms_per_request=round(1000 * cpu / max(r["requests"], 1), 3),
                                     load_before=load_before, load_average=round(os.getloadavg()[0], 2))
                            results.append(r)
                            log(f"  {r['rps']:.0f} req/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
                                f"{r['errors']} errors, {r['server_cpu_ms_per_request']:.2f} CPU ms/req")
    finally:
        if pg is not None:
            pg.stop()
    summary = medians(results)
    print_table(summary, args, sae)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.platform(), "cpus": os.cpu_count(),
            **cpu_info(), "python": platform.python_version(), "concurrency": args.concurrency,
            "wrk_threads": args.threads, "duration_s": args.duration, "rounds": args.rounds, "workers": args.workers,
            "uvicorn_args": args.uvicorn_args, "sae": sae, "trees": {k: str(v) for k, v in trees.items()},
            "commits": commits, "load_average_at_end": os.getloadavg()}
    if not args.sae and not args.synthetic:
        meta["built"] = {"name": SAE_NAME, "model": MODEL, "site": SITE, "width": WIDTH, "k": K}
    (RESULTS / "serve.json").write_text(json.dumps({"meta": meta, "summary": summary, "results": results}, indent=2))
    log(f"wrote {RESULTS / 'serve.json'}")
    return 0


def medians(results: list[dict]) -> list[dict]:
    """One row per (tree, backend, endpoint): the median of each number over the rounds."""
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["endpoint"], r["backend"], r["tree"]), []).append(r)
    out = []
    for (endpoint, backend, tree), rs in groups.items():
        row = {"endpoint": endpoint, "backend": backend, "tree": tree, "commit": rs[0]["commit"], "rounds": len(rs),
               "errors": sum(r["errors"] for r in rs), "p99_ms_rounds": [round(r["p99_ms"], 1) for r in rs],
               "load_rounds": [r["load_before"] for r in rs]}
        for key in ("rps", "p50_ms", "p90_ms", "p99_ms", "max_ms", "mb_per_s", "server_cpu_ms_per_request", "load_average"):
            row[key] = statistics.median(r[key] for r in rs)
        out.append(row)
    return sorted(out, key=lambda r: (r["endpoint"], r["backend"], r["tree"] != "baseline"))


def cpu_info() -> dict:
    """The CPU model and the vector/matrix extensions that change serving speed (AVX-512, AMX):
    the latency goal (p99 <= 50 ms at 16 connections) must hold on CPUs without them too."""
    from benchmarks.machine import cpu_model

    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"cpu_model": cpu_model(), "avx2": "avx2" in flags, "avx512": sorted(f for f in flags if f.startswith("avx512")),
            "amx": sorted(f for f in flags if f.startswith("amx"))}


def profile(url: str, sae: str, n: int, endpoints: list[str]) -> int:
    """Each endpoint's handler (app.api.features.get_feature, app.web.pages.feature_page) called N
    times in-process on random latents with the render cache cleared each time, under pyinstrument:
    where one response's time goes, without the HTTP server and the load generator."""
    from pyinstrument import Profiler
    from starlette.requests import Request

    import store
    from app.api.features import get_feature
    from app.main import create_app, warm_up
    from app.web.pages import feature_page
    from store.db import make_engine

    app = create_app(engine=make_engine(url), check=False)
    warm_up(app)
    width = db_facts(url, sae)["width"]
    handlers = {"feature JSON": lambda req, i, s: get_feature(req, sae, i, s),
                "feature page": lambda req, i, s: feature_page(req, sae, i, None, s)}
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b"", "app": app,
             "scheme": "http", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1), "root_path": ""}
    text = f"load average {os.getloadavg()}; {cpu_info()}\n"
    for name in endpoints:
        rng = random.Random(0)

        def one() -> None:
            session = app.state.read_sessionmaker()
            try:
                store.RENDERED.clear()
                handlers[name](Request(dict(scope)), rng.randrange(width), session)
            finally:
                session.close()

        for _ in range(min(50, n)):  # warm: statements compiled, connections pooled, per-SAE caches filled
            one()
        started, cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            one()
        ms, cpu_ms = 1000 * (time.perf_counter() - started) / n, 1000 * (time.process_time() - cpu) / n
        profiler = Profiler(interval=0.0002)
        profiler.start()
        for _ in range(n):
            one()
        profiler.stop()
        text += (f"\n=== {name}: {n} uncached responses of {sae} in-process: {ms:.2f} ms each "
                 f"({cpu_ms:.2f} ms CPU), without the profiler\n\n" + profiler.output_text(unicode=False, color=False))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve_profile.txt").write_text(text)
    print(text)
    return 0


def print_table(rows: list[dict], args, sae: str) -> None:
    print()
    print(f"{args.concurrency} connections ({args.threads} wrk threads), {args.duration:.0f} s per cell, "
          f"{args.workers} uvicorn workers, random latents of {sae}; medians of {args.rounds} round(s)")
    head = (f"{'endpoint':<14} {'backend':<9} {'tree':<9} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
            f"{'errors':>6} {'CPU ms/req':>10} {'load':>5}  p99 per round")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['endpoint']:<14} {r['backend']:<9} {r['tree']:<9} {r['rps']:>7.0f} {r['p50_ms']:>7.1f} "
              f"{r['p99_ms']:>7.1f} {r['max_ms']:>7.1f} {r['errors']:>6} {r['server_cpu_ms_per_request']:>10.2f} "
              f"{r['load_average']:>5.1f}  {r['p99_ms_rounds']}")
    print("CPU ms/req: server CPU time (all workers) per response, independent of other load on the machine;"
          " load: 1-minute load average at the end of the cell (2 cores).")
    print()


if __name__ == "__main__":
    raise SystemExit(main())
