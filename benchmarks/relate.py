"""Benchmark: relating two SAEs, and the cost of measuring what an SAE misses in the analysis pass.

    python benchmarks/relate.py [--width 16384] [--tokens 200000] [--repeats 2] [--dm-tokens 200000]

1. Relating two `width`-latent TopK SAEs (k=32) of SmolLM2-135M at resid_post.14 and resid_post.15 (a
   layer pair: decoder-cosine candidates in blocks, both SAEs encoding `tokens` tokens, co-firing and
   correlation of every candidate pair, one-to-one matching), plus a width pair (width/4 -> width at
   resid_post.15: the splitting forest, the stitching test, the pair's dark matter). The activations
   come from the activation cache, filled once beforehand (that LM pass is timed separately and is
   not part of relating). Baseline in the same script: the bare encode of both SAEs over the same
   tokens, which any data-checked relation has to do; goal for the layer pair: <= 60 s on 2 cores.
   SAE A is randomly initialised (speed does not depend on what its latents mean); B is A with its
   latents permuted and perturbed (decoder cosine ~0.95 with their originals), so the candidate graph
   and the matching have the structure of a real pair of related SAEs.
2. The dark-matter overhead: the analysis pass (trainer.analyze, LM path, `dm_tokens` tokens, a random
   `width`-latent SAE) with dark_matter on and off, alternating; goal: overhead <= 20 % of the pass.

Reports medians over repeats, the load average before and after, the CPU and the LM dtype; writes
benchmarks/results/relate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.machine import cpu_model  # noqa: E402
os.environ.setdefault("SAE_ATLAS_DATA_DIR", str(REPO / "data" / "bench"))
os.environ.setdefault("SAE_ATLAS_MODEL_CACHE_DIR", str(REPO / "data" / "models"))

import torch  # noqa: E402

SITES = ("resid_post.14", "resid_post.15")


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "n/a"


def random_sae(d_in: int, width: int, k: int, seed: int, mean: torch.Tensor):
    from trainer.sae import SAEConfig, build_sae

    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(d_in=d_in, d_sae=width, architecture="topk", k=k)).eval().requires_grad_(False)
    with torch.no_grad():
        sae.b_dec.copy_(mean)
    return sae


def perturbed_copy(sae, noise: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(sae.W_dec.shape[0], generator=gen)
    out = type(sae)(sae.cfg).eval().requires_grad_(False)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec"):
            src = getattr(sae, name)[perm]
            scale = src.norm(dim=-1, keepdim=True) / src.shape[-1] ** 0.5 if src.ndim == 2 else src.abs().mean()
            getattr(out, name).copy_(src + noise * scale * torch.randn(src.shape, generator=gen))
        out.b_dec.copy_(sae.b_dec)
    return out


def bare_encode(a, b, cache, tokens: int, batch: int = 4096) -> float:
    """Encode both SAEs over the same tokens and nothing else."""
    start = time.perf_counter()
    seen = 0
    with torch.no_grad():
        for chunk in cache.reader(epochs=1, chunk_tokens=batch):
            n = min(chunk[SITES[0]].shape[0], tokens - seen)
            a.encode(chunk[SITES[0]][:n].float())
            b.encode(chunk[SITES[1]][:n].float())
            seen += n
            if seen >= tokens:
                break
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=16_384)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=200_000, help="tokens of data for the relation statistics")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dm-tokens", type=int, default=200_000, help="tokens of the analysis pass (dark-matter overhead)")
    ap.add_argument("--skip-dark-matter", action="store_true")
    args = ap.parse_args()

    from store.settings import get_settings
    from trainer.activations import ActivationCache, LMStreamSpec
    from trainer.analyze import AnalyzeConfig, Analyzer
    from trainer.formats import load_sae, save_sae
    from trainer.lm import load_lm
    from trainer.relate import RelateConfig, Side, relate_saes

    result: dict = {"command": "python benchmarks/relate.py " + " ".join(sys.argv[1:]), "cpu": cpu_model(),
                    "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loadavg_start": loadavg()}
    lm = load_lm("smollm2-135m")
    result["lm_dtype"] = str(lm.dtype)
    print(f"LM {lm.name} ({lm.dtype}); {args.width:,}-latent SAEs, k={args.k}; {args.tokens:,} tokens; "
          f"{torch.get_num_threads()} torch threads; {result['cpu']}; load {result['loadavg_start']}", flush=True)

    # --- data: one LM pass into the cache (not part of relating) ------------------------------------
    spec = LMStreamSpec(model="smollm2-135m", sites=list(SITES), corpus="pydoc", text_field="text", ctx_len=128,
                        split="all", eval_fraction=0.1, seed=0, exclude_bos=True, sink_norm_ratio=10.0,
                        lm_dtype=str(lm.dtype))
    cache = ActivationCache(get_settings().data_dir / "activations", spec)
    started = time.perf_counter()
    filled = not cache.covers(args.tokens)
    cache.fill(lm, args.tokens, 32, desc="LM pass into the activation cache (once)")
    result["lm_pass_into_cache_s"] = time.perf_counter() - started if filled else None
    tokens = min(args.tokens, cache.meta()["tokens"])
    first = next(cache.reader(epochs=1, chunk_tokens=8192))
    mean = {s: first[s].float().mean(0) for s in SITES}

    def chunks():
        return cache.reader(epochs=1, chunk_tokens=8192)

    # --- 1. relating ---------------------------------------------------------------------------------
    a = random_sae(lm.d_model, args.width, args.k, 0, mean[SITES[0]])
    b = perturbed_copy(a, 0.3, 1)
    with torch.no_grad():
        b.b_dec.copy_(mean[SITES[1]])
    narrow = random_sae(lm.d_model, args.width // 4, args.k, 2, mean[SITES[1]])
    cfg = RelateConfig(tokens=tokens)
    runs = {"layer": [], "width": [], "bare_encode": []}
    summaries = {}
    for r in range(args.repeats):
        runs["bare_encode"].append(bare_encode(a, b, cache, tokens))
        t = time.perf_counter()
        rel = relate_saes(Side("A@14", a, SITES[0], "m"), Side("B@15", b, SITES[1], "m"), chunks(), cfg, progress=False)
        runs["layer"].append(time.perf_counter() - t)
        summaries["layer"] = rel.summary
        t = time.perf_counter()
        rel = relate_saes(Side("narrow@15", narrow, SITES[1], "m"), Side("B@15", b, SITES[1], "m"), chunks(), cfg,
                          progress=False)
        runs["width"].append(time.perf_counter() - t)
        summaries["width"] = rel.summary
        print(f"  repeat {r + 1}: bare encode of both {runs['bare_encode'][-1]:.1f} s; layer pair {runs['layer'][-1]:.1f} s "
              f"({', '.join(f'{k} {v:.1f}' for k, v in summaries['layer']['timings'].items())}); width pair "
              f"{runs['width'][-1]:.1f} s", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    m = summaries["layer"]["matching"]
    result["relate"] = {
        "width": args.width, "k": args.k, "tokens": tokens, "runs_s": runs, "median_s": med,
        "layer_over_bare_encode": med["layer"] / med["bare_encode"],
        "layer_phases_s": summaries["layer"]["timings"], "width_phases_s": summaries["width"]["timings"],
        "candidates": summaries["layer"]["candidates"], "matched_pairs": m["pairs"], "persistence": m["persistence"],
        "width_pair": {"narrow": args.width // 4, "candidates": summaries["width"]["candidates"],
                       "splitting": summaries["width"]["splitting"]["parents"]},
    }
    print(f"relating two {args.width:,}-latent SAEs over {tokens:,} tokens: {med['layer']:.1f} s median "
          f"(goal <= 60 s; bare encode of both {med['bare_encode']:.1f} s, ratio {med['layer'] / med['bare_encode']:.2f}); "
          f"{m['pairs']:,} matches of {args.width:,}", flush=True)
    print(f"width pair {args.width // 4:,} -> {args.width:,}: {med['width']:.1f} s median", flush=True)

    # --- 2. the dark-matter overhead of the analysis pass ---------------------------------------------
    if not args.skip_dark_matter:
        bench = Path(os.environ["SAE_ATLAS_DATA_DIR"])
        sae_dir = bench / f"random-topk-w{args.width}-k{args.k}-l15"
        if not (sae_dir / "cfg.json").is_file():
            save_sae(sae_dir, random_sae(lm.d_model, args.width, args.k, 0, mean[SITES[1]]), 1.0, SITES[1], "smollm2-135m")
        loaded = load_sae(sae_dir)
        times: dict[str, list[float]] = {"off": [], "on": []}
        passes: dict[str, list[float]] = {"off": [], "on": []}
        in_pass, finish = [], []
        for r in range(args.repeats):
            for mode in ("off", "on"):
                cfg_a = AnalyzeConfig(sae_dir=sae_dir, tokens=args.dm_tokens, split="all", restart=True,
                                      dark_matter=mode == "on", out=bench / f"analysis-dm-{mode}")
                t = time.perf_counter()
                Analyzer(cfg_a, lm=lm, loaded=loaded).run(progress=False)
                times[mode].append(time.perf_counter() - t)
                summary = json.loads((cfg_a.out_dir / "summary.json").read_text())
                passes[mode].append(summary["timings"]["pass1_s"])
                if mode == "on":
                    dm = json.loads((cfg_a.out_dir / "darkmatter.json").read_text())
                    in_pass.append(dm["timings"]["in_pass_s"])
                    finish.append(dm["timings"]["finish_s"])
            print(f"  repeat {r + 1}: analysis without dark matter {times['off'][-1]:.1f} s (pass {passes['off'][-1]:.1f} s), "
                  f"with {times['on'][-1]:.1f} s (pass {passes['on'][-1]:.1f} s; in-pass statistics {in_pass[-1]:.1f} s, "
                  f"spliced-loss sample and finishing {finish[-1]:.1f} s)", flush=True)
        off, on = statistics.median(times["off"]), statistics.median(times["on"])
        p_off, p_on = statistics.median(passes["off"]), statistics.median(passes["on"])
        dm_s = statistics.median([a + b for a, b in zip(in_pass, finish)])
        result["dark_matter"] = {
            "tokens": args.dm_tokens, "width": args.width, "analysis_s": times, "pass1_s": passes,
            "in_pass_s": in_pass, "finish_s": finish, "median_analysis_off_s": off, "median_analysis_on_s": on,
            "overhead_of_analysis": on / off - 1, "overhead_of_pass1": p_on / p_off - 1,
            "dark_matter_s_over_pass1_off": dm_s / p_off,
        }
        print(f"dark matter: analysis {off:.1f} s -> {on:.1f} s ({100 * (on / off - 1):+.1f} %); pass 1 {p_off:.1f} s -> "
              f"{p_on:.1f} s ({100 * (p_on / p_off - 1):+.1f} %); its own time {dm_s:.1f} s = {100 * dm_s / p_off:.1f} % "
              f"of the pass (goal <= 20 %)", flush=True)
    result["loadavg_end"] = loadavg()
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "relate.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"load average: start {result['loadavg_start']}, end {result['loadavg_end']}")


if __name__ == "__main__":
    main()
