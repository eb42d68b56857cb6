"""Choose the feature-group rule on one SAE and report it on another (issue 22).

    python benchmarks/structure_groups.py \
        --tune   /work/demo-data/demo/sweep/resid_post.14-topk-w4608-k32 \
        --report /work/demo-data/demo/sweep/resid_post.15-topk-w4608-k32 \
        --cache  /work/demo-data/activations

Each SAE encodes the activations of its site in the cache the demo trained from (the token ids come
from the cache's contexts), which gives the same codes as the analysis pass: (token, latent,
activation x |decoder row|, vocabulary id). Co-firing partners and decoder-cosine neighbours are
computed once per SAE; then every rule of a small grid (GroupConfig's min_share, min_lift and
cos_alone: link latents whose decoder directions are this similar even when they do not co-fire,
which is how Engels et al. cluster, and how the days of a week, that never fire on one token, can
still form one group) finds and measures groups.

What counts as a found multi-dimensional feature is fixed before looking at either SAE: a group whose
2-D scatter is not a mixture (mixture index <= MAX_MIXTURE) and not separable (separability index >=
MIN_SEPARABILITY), the thresholds halfway between a planted circle and a planted pair of independent
features (both measured here by the same indices). The rule that finds most such groups on --tune is
then run once on --report, and both tables, the chosen rule and the report's groups (their
latents, indices and the tokens they fire on) go to benchmarks/results/structure_groups.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu_model  # noqa: E402
from trainer.analyze import decoder_neighbors  # noqa: E402
from trainer.formats import load_sae  # noqa: E402
from trainer.relate.cofiring import cofiring_partners  # noqa: E402
from trainer.structure.groups import (  # noqa: E402
    GroupConfig,
    collect_group_codes,
    find_groups,
    measure_groups,
    mixture_index,
    separability_index,
)

RESULTS = Path(__file__).resolve().parent / "results"
GRID = {"min_cos": [0.0, 0.15, 0.3], "min_share": [0.1, 0.2, 0.4], "min_lift": [2.0], "cos_alone": [None, 0.4, 0.5]}


def planted_thresholds(seed: int = 0) -> tuple[float, float, dict]:
    """Indices of a planted circle and of a planted pair of independent 1-D features (each on half
    the points, as two latents that split tokens between them), and the midpoints between them."""
    rng = np.random.default_rng(seed)
    th = rng.uniform(0, 2 * np.pi, 1500)
    circle = np.column_stack([np.cos(th), np.sin(th)]) * rng.uniform(0.9, 1.1, (1500, 1))
    a = rng.lognormal(0, 0.5, 1500)
    on_x = rng.random(1500) < 0.5
    pair = np.column_stack([np.where(on_x, a, 0.0), np.where(on_x, 0.0, a)])
    pair = pair - pair.mean(0)
    ind = {"circle": {"separability": separability_index(circle), "mixture": mixture_index(circle)},
           "pair": {"separability": separability_index(pair), "mixture": mixture_index(pair)}}
    sep = (ind["circle"]["separability"] + ind["pair"]["separability"]) / 2
    mix = (ind["circle"]["mixture"] + ind["pair"]["mixture"]) / 2
    return sep, mix, ind


def codes_of(folder: Path, cache_root: Path, max_tokens: int, batch: int = 4096):
    """The SAE's codes on its site's cached training activations, as the analysis computes them."""
    loaded = load_sae(folder)
    sae = loaded.sae.eval()
    site = loaded.site
    cache = None
    for d in sorted(cache_root.iterdir()):
        meta = json.loads((d / "meta.json").read_text()) if (d / "meta.json").is_file() else None
        if meta and site in meta["spec"]["sites"] and meta["spec"]["split"] == "train":
            cache = (d, meta)
    if cache is None:
        raise SystemExit(f"no training cache of {site} under {cache_root}")
    d, meta = cache
    dec_norm = sae.W_dec.detach().float().norm(dim=1)
    toks, lats, acts, vids = [], [], [], []
    n = 0
    for sh in meta["shards"]:
        x_all = np.load(d / site / sh["file"], mmap_mode="r")
        ctx = np.load(d / "contexts" / sh["file"].replace(".npy", ".npz"))
        vocab_ids = ctx["tokens"].reshape(-1)[ctx["mask"].reshape(-1).astype(bool)]
        for s in range(0, len(x_all), batch):
            if n >= max_tokens:
                break
            x = torch.from_numpy(np.array(x_all[s:s + batch], np.float32))
            with torch.no_grad():
                c = sae.encode(x)
            v = (c.values.float() * dec_norm[c.indices]).numpy()
            rows, slot = np.nonzero(v > 0)
            toks.append(rows + n)
            lats.append(c.indices.numpy()[rows, slot])
            acts.append(v[rows, slot])
            vids.append(vocab_ids[s + rows])
            n += len(x)
    tok, lat, act, vid = (np.concatenate(a) for a in (toks, lats, acts, vids))
    return sae.W_dec.detach().float().numpy(), tok, lat, act, vid, n


def run_rule(directions, partners, neighbors, codes, cfg: GroupConfig, sep_min: float, mix_max: float):
    t0 = time.time()
    groups = find_groups(directions, partners, cfg, neighbors)
    counts = partners.counts
    sampled = collect_group_codes(groups, len(directions), counts, codes, cfg)
    measured = measure_groups(groups, directions, sampled, cfg)
    found = [g for g in measured if g["separability"] >= sep_min and g["mixture"] <= mix_max]
    return {"groups": len(measured), "irreducible": len(found), "seconds": round(time.time() - t0, 1)}, measured, found


def describe(g: dict, vocab: list[str] | None) -> dict:
    top = Counter(g["scatter"]["token"]).most_common(8)
    return {"latents": g["latents"], "n_tokens": g["n_tokens"], "separability": round(g["separability"], 3),
            "mixture": round(g["mixture"], 3), "circle_residual": round(g["circle_residual"], 3),
            "variance_share": [round(v, 3) for v in g["variance_share"]],
            "top_tokens": [[vocab[t] if vocab else t, c] for t, c in top]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tune", type=Path, required=True, help="SAE folder the rule is chosen on")
    ap.add_argument("--report", type=Path, required=True, help="SAE folder the chosen rule is reported on")
    ap.add_argument("--cache", type=Path, required=True, help="activation cache root (DATA_DIR/activations)")
    ap.add_argument("--tokens", type=int, default=300_000)
    ap.add_argument("--max-groups", type=int, default=1000, help="groups measured per rule (publish measures 200)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    sep_min, mix_max, planted = planted_thresholds()
    print(f"planted: {planted}; irreducible = separability >= {sep_min:.3f} and mixture <= {mix_max:.3f}", flush=True)
    vocab_file = args.report / "analysis" / "vocab.json"  # the analysis's token strings
    vocab = json.loads(vocab_file.read_text()) if vocab_file.is_file() else None
    out = {"machine": {"cpu": cpu_model(), "load_average": os.getloadavg()}, "planted": planted,
           "thresholds": {"min_separability": sep_min, "max_mixture": mix_max}, "grid": GRID}
    prepared = {}
    for role, folder in (("tune", args.tune), ("report", args.report)):
        t0 = time.time()
        directions, tok, lat, act, vid, n = codes_of(folder, args.cache, args.tokens)
        codes = lambda with_vocab=True, tok=tok, lat=lat, act=act, vid=vid: iter([(tok, lat, act, vid)])
        partners = cofiring_partners(lambda: iter([(tok, lat)]), len(directions), n, 16, 5)
        nb = decoder_neighbors(torch.from_numpy(directions), 32)
        prepared[role] = (directions, partners, (nb["neighbor_ids"], nb["neighbor_cos"]), codes)
        print(f"{role}: {folder.name}: {n:,} tokens encoded, partners in {time.time() - t0:.1f} s", flush=True)
    directions, partners, neighbors, codes = prepared["tune"]
    table = []
    for values in itertools.product(*GRID.values()):
        rule = dict(zip(GRID, values))
        row, _, _ = run_rule(directions, partners, neighbors, codes, GroupConfig(**rule, max_groups=args.max_groups),
                             sep_min, mix_max)
        table.append({**rule, **row})
        print(f"tune  {rule} -> {row}", flush=True)
    best = max(table, key=lambda r: (r["irreducible"], -r["groups"]))
    chosen = GroupConfig(**{k: best[k] for k in GRID}, max_groups=args.max_groups)
    default = GroupConfig(max_groups=args.max_groups)
    out["tune"] = {"sae": str(args.tune), "table": table, "chosen": asdict(chosen)}
    directions, partners, neighbors, codes = prepared["report"]
    report = {"sae": str(args.report)}
    for name, cfg in (("chosen", chosen), ("default", default)):
        row, measured, found = run_rule(directions, partners, neighbors, codes, cfg, sep_min, mix_max)
        report[name] = {**row, "config": asdict(cfg), "top_groups": [describe(g, vocab) for g in measured[:15]]}
        print(f"report {name}: {row}", flush=True)
        for g in report[name]["top_groups"][:10]:
            print("   ", g, flush=True)
    out["report"] = report
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "structure_groups.json").write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {RESULTS / 'structure_groups.json'}")


if __name__ == "__main__":
    main()
