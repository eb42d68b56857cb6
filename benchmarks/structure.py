"""How long the shape of a 16k-latent SAE takes: co-firing partners, feature groups and the map.

    python benchmarks/structure.py                      # 16,384 latents, d 576, 300k tokens at k 32
    python benchmarks/structure.py --latents 4608 --tokens 100000

Synthetic but shaped like a real analysis: decoder directions in 512 families (a centre plus noise,
so cosine neighbours and clusters exist), and per token k active latents, a quarter of them drawn
from one family (so partners co-fire) and the rest by a Zipf-like frequency, with log-normal
activations. Each step is the code publish and the analysis run, on the same arrays:

  neighbours  the analysis's exact decoder-cosine neighbours (decoder_neighbors; already paid by
              every analysis, shown for scale)
  cofiring    exact co-occurrence counts and each latent's partners (trainer/relate/cofiring.py)
  groups      find, sample and measure the groups (trainer/structure/groups.py)
  map         UMAP layout, Leiden clusters and labels (trainer/structure/layout.py), including
              UMAP's one-off numba compilation when it is the process's first call

The goal (issue 22) is map + groups <= 60 s on 2 cores; "structure_s" is cofiring + groups + map.
With --page, the map is also stored (with a synthetic SAE of as many latents, tests/synthetic_sae.py),
served, and opened in headless Chromium: "map_page_first_paint_ms" is the time from navigation
to the canvas's first paint of every point (the page sets data-ready after drawing), the median of
3 loads (goal: <= 1 s for 16k points). Results go to benchmarks/results/structure.json with the load average and the CPU model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu_model  # noqa: E402
from trainer.analyze import decoder_neighbors  # noqa: E402
from trainer.relate.cofiring import cofiring_partners  # noqa: E402
from trainer.structure.groups import GroupConfig, collect_group_codes, find_groups, measure_groups  # noqa: E402
from trainer.structure.layout import build_map  # noqa: E402


def synthetic(F: int, d: int, n_tokens: int, k: int, families: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    fam = rng.integers(0, families, F)
    directions = (rng.standard_normal((families, d))[fam] + 0.8 * rng.standard_normal((F, d))).astype(np.float32)
    members = [np.nonzero(fam == f)[0] for f in range(families)]
    p = 1.0 / np.arange(1, F + 1) ** 0.8
    p = p[rng.permutation(F)]
    p /= p.sum()
    chunks, chunk = [], 32_768
    for start in range(0, n_tokens, chunk):
        n = min(chunk, n_tokens - start)
        lat = rng.choice(F, size=(n, k), p=p)
        topic = rng.integers(0, families, n)
        for t in range(n):  # a quarter of each token's latents from its topic family
            m = members[topic[t]]
            if len(m):
                lat[t, : k // 4] = rng.choice(m, k // 4)
        lat.sort(1)
        dup = np.zeros_like(lat, bool)
        dup[:, 1:] = lat[:, 1:] == lat[:, :-1]  # a latent fires once per token
        tok = np.repeat(np.arange(start, start + n), k)
        keep = ~dup.ravel()
        act = rng.lognormal(0, 0.5, keep.sum()).astype(np.float32)
        chunks.append((tok[keep], lat.ravel()[keep].astype(np.int32), act, tok[keep] % 50_000))
    return directions, chunks


def page_first_paint(m: dict, n_latents: int) -> float:
    """Median milliseconds from navigation to the map's first full paint, over 3 loads."""
    import tempfile
    import threading

    import uvicorn
    from playwright.sync_api import sync_playwright
    from sqlalchemy.orm import Session

    from app.main import create_app
    from store import publish as writes
    from store.db import make_engine, upgrade
    from store.settings import get_settings
    from tests.helpers import free_port
    from tests.synthetic_sae import make_synthetic_sae

    engine = make_engine(f"sqlite:///{tempfile.mkdtemp()}/atlas.db")
    upgrade(engine)
    sae_id = make_synthetic_sae(engine, name="bench", n_features=n_latents, examples_per_feature=0)
    with Session(engine) as s, s.begin():
        writes.insert_structure(s, sae_id, [[] for _ in range(n_latents)], np.column_stack([m["x"], m["y"]]), m["cluster"])
        writes.insert_map(s, sae_id, m["config"], m["clusters"])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine=engine, settings=get_settings()), host="127.0.0.1",
                                           port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    times = []
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                    "--disable-component-update"])
        for _ in range(3):
            pg = b.new_page(viewport={"width": 1400, "height": 1000})
            pg.route("**/*", lambda r: r.continue_() if r.request.url.startswith(f"http://127.0.0.1:{port}") else r.abort())
            pg.goto(f"http://127.0.0.1:{port}/saes/bench/map")
            pg.wait_for_selector("#atlasmap[data-ready='1']", timeout=60_000)
            times.append(pg.evaluate("() => window.atlasMap.firstPaintMs"))
            pg.close()
        b.close()
    server.should_exit = True
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latents", type=int, default=16_384)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--tokens", type=int, default=300_000)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--families", type=int, default=512)
    ap.add_argument("--page", action="store_true", help="also time the map page in Chromium (/usr/bin/chromium)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "structure.json")
    args = ap.parse_args()
    load_before = os.getloadavg()
    started = time.perf_counter()
    directions, chunks = synthetic(args.latents, args.d, args.tokens, args.k, args.families)
    t = {"synthetic_data_s": time.perf_counter() - started}

    s = time.perf_counter()
    nb = decoder_neighbors(torch.from_numpy(directions), 32)
    t["neighbours_s"] = time.perf_counter() - s

    s = time.perf_counter()
    counts = np.bincount(np.concatenate([c[1] for c in chunks]), minlength=args.latents)
    partners = cofiring_partners(lambda: ((c[0], c[1]) for c in chunks), args.latents, args.tokens, counts=counts)
    t["cofiring_s"] = time.perf_counter() - s

    s = time.perf_counter()
    gcfg = GroupConfig()
    groups = find_groups(directions, partners, gcfg, (nb["neighbor_ids"], nb["neighbor_cos"]))
    sampled = collect_group_codes(groups, args.latents, counts, lambda: iter(chunks), gcfg)
    measured = measure_groups(groups, directions, sampled, gcfg)
    t["groups_s"] = time.perf_counter() - s

    s = time.perf_counter()
    texts = [f"family word{i % 97} thing{i % 13}" for i in range(args.latents)]
    m = build_map(directions, nb["neighbor_ids"], nb["neighbor_cos"], partners, texts)
    t["map_s"] = time.perf_counter() - s
    t["structure_s"] = t["cofiring_s"] + t["groups_s"] + t["map_s"]
    if args.page:
        t["map_page_first_paint_ms"] = page_first_paint(m, args.latents)
    result = {"latents": args.latents, "d": args.d, "tokens": args.tokens, "k": args.k, "timings": t,
              "groups": len(measured), "clusters": len(m["clusters"]),
              "torch_threads": torch.get_num_threads(), "cpu_model": cpu_model(), "cpus": os.cpu_count(),
              "load_average_before": load_before, "load_average_after": os.getloadavg()}
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
