"""Serving benchmark: the feature page and the feature JSON of a 16k-latent SAE, SQLite vs PostgreSQL.

    python benchmarks/serve.py                      # build (or reuse) the atlas, then measure
    python benchmarks/serve.py --duration 30 --concurrency 16 --workers 2
    python benchmarks/serve.py --build-only         # only build/publish the atlas

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


def published_in(url: str) -> bool:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(text("SELECT status FROM saes WHERE name = :n"), {"n": SAE_NAME}).first()
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


# --- 2. the server --------------------------------------------------------------------------------

class Server:
    def __init__(self, url: str, workers: int, port: int | None = None, extra: list[str] | None = None):
        self.url, self.workers, self.extra = url, workers, extra or []
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        env = {**os.environ, "SAE_ATLAS_DATABASE_URL": self.url, "SAE_ATLAS_LOG_LEVEL": "WARNING"}
        cmd = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", str(self.workers), "--no-access-log", "--log-level", "warning",
               "--backlog", "2048", "--no-server-header", *self.extra]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
        deadline = time.time() + 60
        import httpx

        while time.time() < deadline:
            try:
                if httpx.get(f"{self.base}/api/v1/saes/{SAE_NAME}", timeout=2).status_code == 200:
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


def run_wrk(base: str, path_prefix: str, suffix: str, concurrency: int, duration: float, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        script = Path(tmp) / "random.lua"
        script.write_text(WRK_LUA % {"prefix": path_prefix, "suffix": suffix, "width": WIDTH, "out": out})
        cmd = ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{int(duration)}s", "--timeout", "10s", "-s", str(script), base]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        r = json.loads(out.read_text())
    secs = r["duration_us"] / 1e6
    return {"requests": r["requests"], "rps": r["requests"] / secs, "p50_ms": r["p50_us"] / 1e3,
            "p90_ms": r["p90_us"] / 1e3, "p99_ms": r["p99_us"] / 1e3, "max_ms": r["max_us"] / 1e3,
            "errors": r["errors"] + r["non_2xx"], "mb_per_s": r["bytes"] / secs / 1e6, "generator": "wrk"}


async def _python_load(base: str, path_prefix: str, suffix: str, concurrency: int, duration: float) -> dict:
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
                    r = await client.get(f"{path_prefix}{rng.randrange(WIDTH)}{suffix}")
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


def load(base: str, path_prefix: str, suffix: str, concurrency: int, duration: float, threads: int) -> dict:
    if shutil.which("wrk"):
        return run_wrk(base, path_prefix, suffix, concurrency, duration, threads)
    return asyncio.run(_python_load(base, path_prefix, suffix, concurrency, duration))


# --- 4. main --------------------------------------------------------------------------------------

ENDPOINTS = {
    "feature JSON": (f"/api/v1/saes/{SAE_NAME}/features/", ""),
    "feature page": (f"/saes/{SAE_NAME}/features/", ""),
}


def db_facts(url: str) -> dict:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.connect() as conn:
        sae_id = conn.execute(text("SELECT id FROM saes WHERE name = :n"), {"n": SAE_NAME}).scalar()
        n_feat = conn.execute(text("SELECT count(*) FROM features WHERE sae_id = :s"), {"s": sae_id}).scalar()
        n_ex = conn.execute(text("SELECT count(*) FROM examples e JOIN features f ON f.id = e.feature_id "
                                 "WHERE f.sae_id = :s"), {"s": sae_id}).scalar()
    engine.dispose()
    return {"features": n_feat, "examples": n_ex, "examples_per_feature": round(n_ex / max(n_feat, 1), 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load per endpoint and backend")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of unmeasured load first")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    ap.add_argument("--threads", type=int, default=1, help="wrk threads")
    ap.add_argument("--tokens", type=int, default=400_000, help="tokens to analyse when building the SAE")
    ap.add_argument("--backends", default="sqlite,postgres")
    ap.add_argument("--endpoints", default=",".join(ENDPOINTS))
    ap.add_argument("--uvicorn-args", default="", help="extra uvicorn options, e.g. '--loop asyncio --http h11'")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="instead of the load test: profile N feature-JSON requests in-process (pyinstrument), "
                         "uncached, and write benchmarks/results/serve_profile.txt")
    args = ap.parse_args(argv)

    BENCH.mkdir(parents=True, exist_ok=True)
    sae_dir = build_sae_dir(args.tokens)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    pg = None
    urls = {}
    try:
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
            return profile_feature_json(urls[backends[0]], args.profile)
        results = []
        for backend, url in urls.items():
            facts = db_facts(url)
            log(f"{backend}: {facts['features']:,} features, {facts['examples']:,} examples "
                f"({facts['examples_per_feature']} per feature)")
            with Server(url, args.workers, extra=args.uvicorn_args.split()) as server:
                for name in [e.strip() for e in args.endpoints.split(",") if e.strip()]:
                    prefix, suffix = ENDPOINTS[name]
                    if args.warmup > 0:
                        load(server.base, prefix, suffix, args.concurrency, args.warmup, args.threads)
                    log(f"{backend} · {name}: {args.concurrency} clients for {args.duration:.0f} s")
                    cpu0 = server.cpu_seconds()
                    r = load(server.base, prefix, suffix, args.concurrency, args.duration, args.threads)
                    cpu = server.cpu_seconds() - cpu0
                    r.update(backend=backend, endpoint=name, **facts,
                             server_cpu_ms_per_request=round(1000 * cpu / max(r["requests"], 1), 3),
                             load_average=round(os.getloadavg()[0], 2))
                    results.append(r)
                    log(f"  {r['rps']:.0f} req/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
                        f"{r['errors']} errors")
    finally:
        if pg is not None:
            pg.stop()
    print_table(results, args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.platform(), "cpus": os.cpu_count(),
            **cpu_info(),
            "python": platform.python_version(), "concurrency": args.concurrency, "duration_s": args.duration,
            "workers": args.workers, "uvicorn_args": args.uvicorn_args, "sae": {"name": SAE_NAME, "model": MODEL, "site": SITE, "width": WIDTH, "k": K},
            "load_average_at_end": os.getloadavg()}
    (RESULTS / "serve.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    log(f"wrote {RESULTS / 'serve.json'}")
    return 0


def cpu_info() -> dict:
    """The CPU model and the vector/matrix extensions that change serving speed (AVX-512, AMX):
    the latency goal (p99 <= 50 ms at 16 connections) must hold on CPUs without them too."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu_model": model, "avx2": "avx2" in flags, "avx512": sorted(f for f in flags if f.startswith("avx512")),
            "amx": sorted(f for f in flags if f.startswith("amx"))}


def profile_feature_json(url: str, n: int) -> int:
    """The feature-JSON handler (app.api.features.get_feature) called N times in-process on random
    latents with the render cache cleared each time, under pyinstrument: where a request's time goes."""
    from pyinstrument import Profiler
    from starlette.requests import Request

    import store
    from app.api.features import get_feature
    from store.db import make_engine
    from app.main import create_app

    app = create_app(engine=make_engine(url), check=False)
    rng = random.Random(0)
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b"", "app": app}

    def one() -> None:
        session = app.state.read_sessionmaker()
        try:
            store.RENDERED.clear()
            get_feature(Request(scope), SAE_NAME, rng.randrange(WIDTH), session)
        finally:
            session.close()

    for _ in range(min(50, n)):  # warm: vocabulary decoded, statements compiled, connections pooled
        one()
    profiler = Profiler(interval=0.0002)
    started = time.perf_counter()
    profiler.start()
    for _ in range(n):
        one()
    profiler.stop()
    ms = 1000 * (time.perf_counter() - started) / n
    text = (f"{n} uncached feature-JSON requests in-process: {ms:.2f} ms each; load {os.getloadavg()}; "
            f"{cpu_info()}\n\n" + profiler.output_text(unicode=False, color=False))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve_profile.txt").write_text(text)
    print(text[:4000])
    return 0


def print_table(results: list[dict], args) -> None:
    print()
    print(f"{args.concurrency} concurrent clients, {args.duration:.0f} s per cell, {args.workers} uvicorn workers, "
          f"random latents of a {WIDTH:,}-latent SAE")
    head = (f"{'endpoint':<14} {'backend':<9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'MB/s':>7} "
            f"{'errors':>6} {'CPU ms/req':>10} {'load':>5}")
    print(head)
    print("-" * len(head))
    for r in sorted(results, key=lambda r: (r["endpoint"], r["backend"])):
        print(f"{r['endpoint']:<14} {r['backend']:<9} {r['rps']:>8.0f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
              f"{r['max_ms']:>8.1f} {r['mb_per_s']:>7.1f} {r['errors']:>6} {r['server_cpu_ms_per_request']:>10.2f} "
              f"{r['load_average']:>5.1f}")
    print("CPU ms/req: server CPU time (all workers) per response, independent of other load on the machine;"
          " load: 1-minute load average at the end of the cell (2 cores).")
    print()


if __name__ == "__main__":
    raise SystemExit(main())
