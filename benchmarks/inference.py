"""Live-model benchmark: the inference service (micro-batched) against a naive per-request forward.

    python benchmarks/inference.py                        # the demo SAE of `make demo` (SAE_ATLAS_DATA_DIR)
    python benchmarks/inference.py --clients 1,8 --requests 20,20,4,2
    python benchmarks/inference.py --quick                # a few requests of each: proves it runs
    python benchmarks/inference.py --stand-in             # no demo atlas: build a same-shaped SAE first

Workloads (the issue's goals on 2 CPU cores in brackets):
  (a) one latent on a 64-token text            POST /api/v1/saes/{sae}/features/{i}/activations  [p50 <= 150 ms]
  (b) search across every SAE on 64 tokens     POST /api/v1/search/inference                   [p50 <= 250 ms]
  (c) 32 steered tokens (default + steered)    POST /api/v1/steer                              [p50 <= 2.5 s]
  (d) a contrastive query of 2 x 100 texts     POST /api/v1/contrast
With 8 concurrent clients the service's throughput should be >= 3x the naive baseline's.

The service runs as its own process (`sae-atlas inference` on a Unix socket) behind the API
(`sae-atlas serve --no-inference`), as in production; clients are threads of this script with
one HTTP connection each. The naive baseline runs in this script on its own copy of the model:
each request does its own unbatched, full forward pass (and two separate generations for
steering, one forward per text for contrast), with the same number of concurrent client threads
sharing the model. Latencies are measured after a warm-up; the load average and CPU model are
recorded because the numbers mean little without them. Results: benchmarks/results/inference.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))
from benchmarks.machine import cpu_model  # noqa: E402
os.environ.setdefault("SAE_ATLAS_DATA_DIR", str(REPO / "data"))
os.environ.setdefault("SAE_ATLAS_MODEL_CACHE_DIR", str(REPO / "data" / "models"))
STAND_IN = "bench-live-standin"
WORKLOADS = ("a", "b", "c", "d")
NAMES = {"a": "one latent, 64 tokens", "b": "search every SAE, 64 tokens", "c": "32 steered tokens",
         "d": "contrast 2 x 100 texts"}
GOALS_P50 = {"a": 0.150, "b": 0.250, "c": 2.5}


def log(msg: str) -> None:
    print(f"[inference-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


# --- the SAE to measure ------------------------------------------------------------------------

def find_sae(stand_in: bool) -> str:
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from store.db import current_revision, get_engine, head_revision, upgrade
    from app.demo import DEMO_NAME
    from store.models import SAE, SAEStatus

    engine = get_engine()
    if current_revision(engine) != head_revision():
        upgrade(engine)
    with Session(engine) as s:
        names = set(s.scalars(select(SAE.name).where(SAE.status == SAEStatus.ready.value)))
    if DEMO_NAME in names:
        return DEMO_NAME
    if STAND_IN in names:
        return STAND_IN
    if not stand_in:
        sys.exit(f"no demo SAE ({DEMO_NAME}) in the store at {engine.url}: run `make demo` (or "
                 "`python -m app.cli demo --no-serve`) first, or pass --stand-in")
    build_stand_in()
    return STAND_IN


def build_stand_in() -> None:
    """A TopK SAE of the demo's shape (k=32, 4608 latents, resid_post.15) whose rows are centred,
    normalised activations of random corpus tokens (as benchmarks/serve.py builds its SAE): the
    speed of inference does not depend on training. Analysed on 40k tokens and published."""
    import torch

    from trainer.analyze import AnalyzeConfig, analyze
    from trainer.corpus import Packer, open_corpus, split_documents
    from trainer.formats import save_sae
    from trainer.lm import load_lm
    from trainer.publish import publish
    from trainer.sae import SAEConfig, build_sae

    folder = Path(os.environ["SAE_ATLAS_DATA_DIR"]) / "bench-live" / STAND_IN
    log(f"building a stand-in SAE in {folder}")
    lm = load_lm("smollm2-135m")
    site = lm.site("resid_post.15")
    packer = Packer(lm.tokenizer, 128, lm.bos_token_id, lm.separator_token_id)
    docs = split_documents(open_corpus("pydoc"), "train", 0.1, 1)
    acts = []
    for batch in packer.batches(docs, 16, max_contexts=48):
        a = lm.read(batch.tokens, [site])[site.name][:, 1:].reshape(-1, lm.d_model).float()
        acts.append(a)
    x = torch.cat(acts)
    g = torch.Generator().manual_seed(0)
    rows = x[torch.randperm(len(x), generator=g)[:4608]]
    rows = rows - x.mean(0)
    rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-6)
    sae = build_sae(SAEConfig(d_in=lm.d_model, d_sae=4608, architecture="topk", k=32))
    with torch.no_grad():
        sae.W_dec.copy_(rows)
        sae.W_enc.copy_(rows)  # f_i = the projection on d_i: activations in the units of the residual stream
        sae.b_dec.copy_(x.mean(0))
    save_sae(folder, sae, 1.0, "resid_post.15", "smollm2-135m", training={"corpus": "pydoc", "ctx_len": 128})
    analyze(AnalyzeConfig(sae_dir=folder, tokens=40_000, split="all"), lm=lm)
    publish(folder, STAND_IN, replace=True, description="inference benchmark stand-in (untrained)")


# --- the service under test ----------------------------------------------------------------------

class Stack:
    """`sae-atlas inference` on a Unix socket and `sae-atlas serve --no-inference` on a port."""

    def __init__(self, workdir: Path, threads: int):
        from tests.helpers import free_port

        self.sock = workdir / "inference.sock"
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO), "SAE_ATLAS_INFERENCE_URL": f"unix:{self.sock}",
               "SAE_ATLAS_INFERENCE_RATE_PER_MINUTE": "0", "SAE_ATLAS_INFERENCE_QUEUE_SIZE": "256",
               "SAE_ATLAS_LOG_LEVEL": "WARNING", "SAE_ATLAS_INFERENCE_TIMEOUT_S": "900",
               "SAE_ATLAS_INFERENCE_THREADS": str(threads)}
        self.logs = [open(workdir / "inference.log", "wb"), open(workdir / "api.log", "wb")]
        self.procs = [
            subprocess.Popen([sys.executable, "-m", "app.cli", "inference"], env=env, stdout=self.logs[0],
                             stderr=subprocess.STDOUT),
            subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--no-inference", "--port", str(self.port)],
                             env=env, stdout=self.logs[1], stderr=subprocess.STDOUT),
        ]
        self.base = f"http://127.0.0.1:{self.port}"
        self._wait()

    def _wait(self) -> None:
        import httpx

        deadline = time.time() + 180
        while time.time() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise SystemExit("the inference service or the API exited; see their logs")
            try:
                st = httpx.get(self.base + "/api/v1/inference", timeout=2).json()
                if st.get("reachable"):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise SystemExit("the service did not come up in 180 s")

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in self.logs:
            f.close()


# --- workloads ---------------------------------------------------------------------------------

class Inputs:
    """64-token texts, 100+100 texts for the contrastive query, a steering latent."""

    def __init__(self, lm, sae_name: str, latent: int, strength: float = 4.0):
        from trainer.corpus import PydocCorpus

        tok = lm.tokenizer
        texts = []
        for d in PydocCorpus().docs:
            ids = tok(d.text, add_special_tokens=False)["input_ids"]
            if len(ids) >= 64:
                texts.append(tok.decode(ids[:64]))
            if len(texts) == 400:
                break
        # decoding and re-encoding may shift a token or two; keep those that are exactly 64 long
        self.texts64 = [t for t in texts if len(tok(t, add_special_tokens=False)["input_ids"]) == 64][:200]
        self.code = [t for t in self.texts64 if ("(" in t and ")" in t)][:100]
        self.prose = [t for t in self.texts64 if t not in self.code][:100]
        while len(self.code) < 100:
            self.code.append(self.texts64[len(self.code) % len(self.texts64)])
        self.sae, self.latent, self.strength = sae_name, latent, strength


def service_call(http, w: str, inp: Inputs, i: int) -> None:
    text = inp.texts64[i % len(inp.texts64)]
    if w == "a":
        r = http.post(f"/api/v1/saes/{inp.sae}/features/{inp.latent}/activations", json={"text": text})
    elif w == "b":
        r = http.post("/api/v1/search/inference", json={"text": text, "limit": 50})
    elif w == "c":
        r = http.post("/api/v1/steer", json={"prompt": text[:120], "max_new_tokens": 32, "temperature": 0.5, "seed": i,
                                             "features": [{"sae": inp.sae, "index": inp.latent, "strength": inp.strength}]})
    else:
        r = http.post("/api/v1/contrast", json={"set_a": inp.code, "set_b": inp.prose, "limit": 50})
    if r.status_code >= 300:
        raise RuntimeError(f"{w}: {r.status_code} {r.text[:200]}")
    if w == "c":
        d = r.json()
        if len(d["default"]["token_ids"]) + len(d["steered"]["token_ids"]) == 0:
            raise RuntimeError("no tokens generated")


class Naive:
    """The same work done the simple way: one request, one full unbatched forward pass."""

    def __init__(self, lm, sae_dir: str, site: str, max_act):
        import torch

        from trainer.formats import load_sae

        self.lm, self.torch = lm, torch
        self.sae = load_sae(sae_dir).sae.eval()
        self.site = lm.site(site)
        self.dec_norm = self.sae.W_dec.detach().norm(dim=1)
        self.max_act = torch.as_tensor(max_act, dtype=torch.float32)

    def _acts(self, text: str):
        lm = self.lm
        ids = [lm.bos_token_id, *lm.tokenizer(text, add_special_tokens=False)["input_ids"]]
        out = lm.model(input_ids=self.torch.tensor([ids]), output_hidden_states=True, use_cache=False)
        x = out.hidden_states[self.site.layer + 1][0, 1:].float()
        codes = self.sae.encode(x)
        return codes.dense(self.sae.cfg.d_sae) * self.dec_norm

    def call(self, w: str, inp: Inputs, i: int) -> None:
        torch = self.torch
        with torch.inference_mode():
            text = inp.texts64[i % len(inp.texts64)]
            if w == "a":
                self._acts(text)[:, inp.latent].tolist()
            elif w == "b":
                rel = self._acts(text).max(0).values / self.max_act.clamp_min(1e-12)
                rel.topk(50)
            elif w == "c":
                for steered in (False, True):
                    self._generate(text[:120], 32, inp.latent if steered else None, inp.strength, seed=i)
            else:
                from app.inference.contrastive import contrast

                pooled = [self._acts(t).max(0).values.numpy() for t in inp.code + inp.prose]
                import numpy as np

                contrast(np.stack(pooled[:100]), np.stack(pooled[100:]))

    def _generate(self, prompt: str, n: int, latent: int | None, strength: float, seed: int) -> list[int]:
        torch, lm = self.torch, self.lm
        ids = torch.tensor([[lm.bos_token_id, *lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]]])
        handle = None
        if latent is not None:
            d = self.sae.W_dec[latent].detach().float()
            delta = strength * float(self.max_act[latent]) * d / d.norm()

            def hook(_m, _i, out):
                if isinstance(out, tuple):
                    return (out[0] + delta.to(out[0].dtype),) + tuple(out[1:])
                return out + delta.to(out.dtype)
            handle = lm.site_module(self.site).register_forward_hook(hook)
        g = torch.Generator().manual_seed(seed)
        try:
            from app.inference.steering import _CACHE_ARG

            cache, out_ids, nxt = None, [], ids
            for _ in range(n):
                out = lm.model(input_ids=nxt, use_cache=True, logits_to_keep=1, **{_CACHE_ARG: cache})
                cache = getattr(out, _CACHE_ARG)
                probs = torch.softmax(out.logits[0, -1].float() / 0.5, -1)
                t = int(torch.multinomial(probs, 1, generator=g))
                out_ids.append(t)
                nxt = torch.tensor([[t]])
            return out_ids
        finally:
            if handle is not None:
                handle.remove()


def measure(fn, clients: int, per_client: int, warmup: int) -> dict:
    """`clients` threads, each making `per_client` calls after `warmup` unmeasured ones."""
    for i in range(warmup):
        fn(None, 10_000 + i)
    latencies: list[float] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        state = {}
        for j in range(per_client):
            t0 = time.perf_counter()
            fn(state, c * 1000 + j)
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - started
    return {"requests": len(latencies), "p50_s": round(statistics.median(latencies), 4),
            "p99_s": round(pct(latencies, 0.99), 4), "mean_s": round(statistics.fmean(latencies), 4),
            "throughput_rps": round(len(latencies) / wall, 3), "wall_s": round(wall, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,8", help="comma-separated client counts")
    ap.add_argument("--requests", default="20,20,4,2",
                    help="measured requests per client at 1 client for a,b,c,d (at N clients: max(1, n*2//N))")
    ap.add_argument("--workloads", default="a,b,c,d")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive baseline")
    ap.add_argument("--contrast-clients", type=int, default=None,
                    help="run (d) only up to this many clients (it is the slowest workload on a CPU)")
    ap.add_argument("--quick", action="store_true", help="2 requests each, clients 1,2: proves the script works")
    ap.add_argument("--stand-in", action="store_true", help="build a demo-shaped SAE when there is no demo atlas")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads of the service and of the naive baseline (0: torch's default, one per core); "
                         "1 avoids OpenMP spinning on a heavily loaded machine")
    ap.add_argument("--out", default=str(RESULTS / "inference.json"))
    args = ap.parse_args()
    if args.quick:
        args.clients, args.requests = "1,2", "2,2,1,1"
    clients = [int(c) for c in args.clients.split(",")]
    counts = dict(zip(WORKLOADS, (int(n) for n in args.requests.split(","))))
    workloads = [w for w in args.workloads.split(",") if w in WORKLOADS]

    import httpx
    import torch
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from store.db import get_engine
    from store.models import SAE, Feature
    from trainer.lm import load_lm

    if args.threads:
        torch.set_num_threads(args.threads)

    def clients_for(w: str) -> list[int]:
        if w == "d" and args.contrast_clients:
            return [c for c in clients if c <= args.contrast_clients]
        return clients
    load_before = loadavg()
    sae_name = find_sae(args.stand_in)
    with Session(get_engine()) as s:
        sae = s.scalar(select(SAE).where(SAE.name == sae_name))
        rows = s.execute(select(Feature.index, Feature.max_act, Feature.logits).where(Feature.sae_id == sae.id)
                         .order_by(Feature.index)).all()
        weights, site, d_sae = sae.weights_path, sae.site, sae.d_sae
        dtype = (sae.config.get("analysis") or {}).get("lm_dtype_used", "auto")
    max_act = [r[1] or 0.0 for r in rows]
    # a latent that fires (so steering has a unit) and has a clear logit effect
    latent = max((r for r in rows if (r[1] or 0) > 0), key=lambda r: (r[2] or {}).get("top", [[0, 0]])[0][1])[0]
    log(f"SAE {sae_name} ({d_sae} latents at {site}); steering latent {latent}; LM dtype {dtype}")
    lm = load_lm("smollm2-135m", "cpu", None if dtype == "auto" else dtype)
    inp = Inputs(lm, sae_name, latent)
    results = {"service": {}, "naive": {}}
    with tempfile.TemporaryDirectory(prefix="inference-bench-") as tmp:
        stack = Stack(Path(tmp), args.threads)
        try:
            local = threading.local()

            def call_service(_state, i, w):
                http = getattr(local, "http", None)
                if http is None:
                    http = local.http = httpx.Client(base_url=stack.base, timeout=600)
                service_call(http, w, inp, i)

            for w in workloads:
                for c in clients_for(w):
                    n = counts[w] if c == 1 else max(1, counts[w] * 2 // c)
                    log(f"service ({w}) {NAMES[w]}: {c} client(s) x {n}")
                    results["service"][f"{w}/{c}"] = measure(lambda st, i, w=w: call_service(st, i, w), c, n,
                                                             warmup=2 if w in "ab" else 1)
                    log(f"  -> {results['service'][f'{w}/{c}']}")
        finally:
            stack.close()
    if not args.no_naive:
        naive = Naive(lm, weights, site, max_act)
        for w in workloads:
            for c in clients_for(w):
                n = counts[w] if c == 1 else max(1, counts[w] * 2 // c)
                log(f"naive ({w}) {NAMES[w]}: {c} client(s) x {n}")
                results["naive"][f"{w}/{c}"] = measure(lambda st, i, w=w: naive.call(w, inp, i), c, n,
                                                       warmup=1)
                log(f"  -> {results['naive'][f'{w}/{c}']}")
    summary = {}
    for key, svc in results["service"].items():
        w, c = key.split("/")
        nv = results["naive"].get(key)
        row = {"p50_s": svc["p50_s"], "p99_s": svc["p99_s"], "throughput_rps": svc["throughput_rps"]}
        if nv:
            row["naive_p50_s"], row["naive_throughput_rps"] = nv["p50_s"], nv["throughput_rps"]
            row["throughput_vs_naive"] = round(svc["throughput_rps"] / nv["throughput_rps"], 2)
        if c == "1" and w in GOALS_P50:
            row["goal_p50_s"], row["meets_goal"] = GOALS_P50[w], svc["p50_s"] <= GOALS_P50[w]
        if c == "8" and nv:
            row["goal_throughput_vs_naive"], row["meets_throughput_goal"] = 3.0, row["throughput_vs_naive"] >= 3.0
        summary[key] = row
    out = {"benchmark": "inference", "sae": sae_name, "stand_in": sae_name == STAND_IN, "d_sae": d_sae, "site": site,
           "model": "smollm2-135m", "lm_dtype": str(lm.dtype).removeprefix("torch."), "device": "cpu",
           "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "loadavg_before": load_before, "loadavg_after": loadavg(), "clients": clients, "requests": counts,
           "summary": summary, "results": results, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"\n{'workload':32} {'clients':>7} {'p50 ms':>9} {'p99 ms':>9} {'req/s':>8} {'naive req/s':>12} {'ratio':>6}")
    for key, row in summary.items():
        w, c = key.split("/")
        print(f"({w}) {NAMES[w]:28} {c:>7} {row['p50_s'] * 1000:9.0f} {row['p99_s'] * 1000:9.0f} "
              f"{row['throughput_rps']:8.2f} {row.get('naive_throughput_rps', float('nan')):12.2f} "
              f"{row.get('throughput_vs_naive', float('nan')):6.2f}")
    print(f"load average {load_before} -> {loadavg()}; results in {args.out}")


if __name__ == "__main__":
    main()
