"""Our feature absorption (trainer/absorption.py) against sae-bench 0.6.0's own functions, on the same inputs.

    python benchmarks/peers/saebench_absorption_conformance.py [--model smollm2-135m --site resid_post.15 --words 1500]

The LM and SAE are set up as in saebench_conformance.py (the tiny random model or --model; --sae or
a seeded random ReLU SAE in SAELens's layout). sae-bench's `run_eval` cannot run here: it loads the
model through HookedTransformer.from_pretrained (the Hub). This venv measures everything with our
code and saves the arrays: the train and test words' activations, their letters, and the test
words' activations in their second prompt (examples from the whole vocabulary). The peers' venv
then runs sae-bench's chain on those arrays:
`probing.train_linear_probe_for_task` (its first-letter probe), `k_sparse_probing.
train_k_sparse_probes` (precalc_sae_acts=True), `eval_probe_and_sae_k_sparse_raw_scores`,
`sae_k_sparse_metadata`, `build_metrics_df`, `add_feature_splits_to_metrics_df`, the probe's true
positives as `get_stats_and_likely_false_negative_tokens` selects them, and
`FeatureAbsorptionCalculator.calculate_absorption` with SAEBench's thresholds, given a stand-in
for the HookedTransformer whose `run_with_cache` returns the saved activation of each prompt's word
(word_token_pos = -1), then `main._aggregate_results_df` and its mean over letters with probe F1 > 0.6.
The probes start from random weights: each chain is run with --seeds seeds, and seed s seeds
torch's global RNG right before each probe is made on both sides (ours: train_multi_probe(seed=s);
sae-bench's: torch.manual_seed(s) before `train_linear_probe_for_task` and before
`train_k_sparse_probes`), so at the same seed both probes start from the same initial weights (one
nn.Linear of the same shape, made first after the seed). Checked, each within 0.04: for every seed,
ours against sae-bench's at that seed (the probe's mean F1 over letters, the mean absorption
fraction and the full-absorption rate), and the medians over seeds; the spread over seeds of each
side is reported beside. A rate exists only with --min-letters letters at probe F1 > --min-f1
(SAEBench's run_eval stops otherwise): at every seed both sides must make the same call, and the
rates are compared at the seeds where they make one (the medians over those). Then the calculator alone is run with OUR seed-0 probe, main latents and
true positives, which must give our per-letter numbers to 1e-4. --reuse reads the arrays a
previous run left in --work instead of running the LM again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from saebench_conformance import PEERS_PY, ROOT, TOL, setup

sys.path.insert(0, str(ROOT))

MIN_F1 = 0.6


def ours(args) -> dict:
    """Our chain for every seed: {"runs": [result of seed 0, 1, ...], "elapsed_s": ...}."""
    import dataclasses

    import numpy as np
    import torch

    from trainer.absorption import (
        LETTERS,
        AbsorptionConfig,
        absorption,
        absorption_from_activations,
    )
    from trainer.formats import load_sae
    from trainer.sparse_probing import dense_encoder

    work = Path(args.work)
    cfg = AbsorptionConfig(n_words=args.words, max_k=args.max_k, min_letters=args.min_letters, batch_size=16,
                           min_probe_f1=args.min_f1)
    t0 = time.time()
    if args.reuse:
        sae_dir = Path(json.loads((work / "absorption_meta.json").read_text())["sae_dir"])
        keep = dict(np.load(work / "absorption.npz"))
        layer = json.loads((work / "absorption_meta.json").read_text())["layer"]
        sae = load_sae(sae_dir).sae.eval()
    else:
        lm, site, sae_dir = setup(args)
        layer = site.layer
        sae = load_sae(sae_dir).sae.eval()
        keep = {}
        first = absorption(lm, site.name, dense_encoder(sae), sae.W_dec.detach().float(), cfg, keep=keep)
        if not first["evaluated"]:
            return {"runs": [first], "elapsed_s": round(time.time() - t0, 1), "sae_dir": str(sae_dir), "layer": layer}
    acts = {"train": torch.from_numpy(keep["train_acts"]), "test": torch.from_numpy(keep["test_acts"])}
    y = {"train": keep["y_train"], "test": keep["y_test"]}
    fresh = torch.from_numpy(keep["fresh_acts"])
    runs = []
    for seed in range(args.seeds):
        kept = keep if seed == 0 else None  # seed 0's probe is the one the calculator-alone check uses
        runs.append(absorption_from_activations(acts, y, fresh, dense_encoder(sae), sae.W_dec.detach().float(),
                                                dataclasses.replace(cfg, seed=seed), keep=kept))
    np.savez(work / "absorption.npz", **{k: np.asarray(v) for k, v in keep.items()})
    (work / "absorption_meta.json").write_text(json.dumps({
        "sae_dir": str(sae_dir), "layer": layer, "max_k": args.max_k, "letters": LETTERS, "seeds": args.seeds,
        "ours_per_letter": runs[0].get("per_letter", {}), "min_f1": args.min_f1}))
    return {"runs": runs, "elapsed_s": round(time.time() - t0, 1), "sae_dir": str(sae_dir), "layer": layer}


def peer(work: Path) -> dict:
    """Runs in the peers' venv (module docstring)."""
    import random
    import statistics
    from types import SimpleNamespace

    import numpy as np
    import pandas as pd
    import torch
    from sae_bench.evals.absorption import feature_absorption as fa
    from sae_bench.evals.absorption import k_sparse_probing as ksp
    from sae_bench.evals.absorption.feature_absorption_calculator import FeatureAbsorptionCalculator
    from sae_bench.evals.absorption.main import _aggregate_results_df
    from sae_bench.evals.absorption.probing import LinearProbe, train_linear_probe_for_task
    from sae_bench.evals.absorption.prompting import first_letter_formatter
    from sae_lens import SAE

    meta = json.loads((work / "absorption_meta.json").read_text())
    a = np.load(work / "absorption.npz")
    letters = meta["letters"]
    sae = SAE.load_from_disk(meta["sae_dir"], device="cpu")
    train_w, test_w = a["train_words"].tolist(), a["test_words"].tolist()
    ytr, yte = a["y_train"], a["y_test"]
    train_df = pd.DataFrame({"answer_class": ytr, "token": train_w})
    test_df = pd.DataFrame({"answer_class": yte, "token": test_w})
    train_labels = list(zip(train_w, ytr.tolist()))
    test_labels = list(zip(test_w, yte.tolist()))
    fresh = {w: torch.from_numpy(a["fresh_acts"][i]) for i, w in reversed(list(enumerate(test_w)))}

    class Stand:  # what calculate_absorption asks of a HookedTransformer
        tokenizer = SimpleNamespace()

        def run_with_cache(self, bases, names_filter):
            words = [b.rsplit("\n", 1)[-1].removesuffix(" has the first letter:") for b in bases]
            return None, {names_filter[0]: torch.stack([fresh[w] for w in words])[:, None, :]}

        def to_tokens(self, _base):
            return torch.zeros(1, 3, dtype=torch.long)

    calc = FeatureAbsorptionCalculator(
        model=Stand(), icl_word_list=train_w + test_w, max_icl_examples=10, base_template="{word} has the first letter:",
        answer_formatter=first_letter_formatter(), word_token_pos=-1,
        full_absorption_probe_cos_sim_threshold=fa.FULL_ABSORPTION_PROBE_COS_THRESHOLD,
        absorption_fraction_probe_cos_sim_threshold=fa.ABSORPTION_FRACTION_PROBE_COS_THRESHOLD,
        probe_projection_proportion_threshold=fa.ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD,
        absorption_fraction_max_absorbing_latents=fa.ABSORPTION_FRACTION_MAX_ABSORBING_LATENTS)

    def chain(seed: int) -> dict:
        random.seed(seed)
        torch.manual_seed(seed)  # the probe's initial weights: the first draw after the seed, as in ours
        probe, _ = train_linear_probe_for_task(train_df, test_df, torch.device("cpu"), a["train_acts"], a["test_acts"],
                                               num_classes=26, batch_size=4096, num_epochs=50, lr=1e-2)
        torch.manual_seed(seed)  # likewise the L1 probe of the k-sparse probes
        ks = ksp.train_k_sparse_probes(sae, train_labels, torch.from_numpy(a["train_acts"]),
                                       ks=list(range(1, meta["max_k"] + 1)), precalc_sae_acts=True)
        raw = ksp.eval_probe_and_sae_k_sparse_raw_scores(sae, probe, ks, test_labels, torch.from_numpy(a["test_acts"]))
        md = ksp.sae_k_sparse_metadata(sae, probe, ks, sae_name="conformance", layer=meta["layer"])
        metrics = ksp.build_metrics_df(raw, md, meta["max_k"])
        ksp.add_feature_splits_to_metrics_df(metrics, meta["max_k"], 0.03)
        return one_chain(probe, raw, metrics)

    def one_chain(probe, raw, metrics) -> dict:
        rows = []
        for letter in letters:
            split = metrics[metrics["letter"] == letter]["split_feats"].iloc[0]
            tp = raw[(raw["answer_letter"] == letter) & (raw[f"score_probe_{letter}"] > 0)]["token"].tolist()
            if not tp:
                continue
            res = calc.calculate_absorption(sae, tp, probe.weights[letters.index(letter)].detach(), list(split),
                                            layer=meta["layer"], show_progress=False)
            for r in res.word_results:
                rows.append({"letter": letter, "absorption_fraction": r.absorption_fraction,
                             "is_full_absorption": r.is_full_absorption, "num_probe_true_positives": len(tp),
                             "split_feats": list(split)})
        agg = _aggregate_results_df(pd.DataFrame(rows)) if rows else pd.DataFrame()
        f1 = {r["letter"]: float(r["f1_probe"]) for _, r in metrics.iterrows()}
        counted = [r for _, r in agg.iterrows() if f1[r["letter"]] > meta["min_f1"]]
        return {"probe_f1": f1, "letters_counted": [r["letter"] for r in counted],
                "mean_absorption_fraction": statistics.mean(r["mean_absorption_fraction"] for r in counted) if counted else None,
                "mean_full_absorption_rate": statistics.mean(r["full_absorption_rate"] for r in counted) if counted else None}

    theirs = {"runs": [chain(seed) for seed in range(meta["seeds"])]}

    # the calculator alone with our probe, our main latents and our true positives
    our_probe = LinearProbe(a["probe_weight"].shape[1], 26)
    with torch.no_grad():
        our_probe.fc.weight.copy_(torch.from_numpy(a["probe_weight"]))
        our_probe.fc.bias.copy_(torch.from_numpy(a["probe_bias"]))
    scores = our_probe(torch.from_numpy(a["test_acts"])).detach().numpy()
    same = {}
    for letter, row in meta["ours_per_letter"].items():
        i = letters.index(letter)
        tp = [w for j, w in enumerate(test_w) if yte[j] == i and scores[j, i] > 0]
        res = calc.calculate_absorption(sae, tp, our_probe.weights[i].detach(), row["main_latents"],
                                        layer=meta["layer"], show_progress=False)
        same[letter] = {"mean_absorption_fraction": float(np.mean([r.absorption_fraction for r in res.word_results])),
                        "full_absorption_rate": float(np.mean([r.is_full_absorption for r in res.word_results]))}
    theirs["with_our_probe"] = same
    return theirs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--site", default="resid_post.15")
    ap.add_argument("--sae", default=None)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--words", type=int, default=1500)
    ap.add_argument("--max-k", type=int, default=10)
    ap.add_argument("--min-letters", type=int, default=20, help="letters at probe F1 > 0.6 needed (SAEBench: 20)")
    ap.add_argument("--min-f1", type=float, default=MIN_F1, help="probe F1 a letter needs to count (SAEBench: 0.6)")
    ap.add_argument("--work", default="/tmp/saebench-conformance")
    ap.add_argument("--seeds", type=int, default=5, help="probe seeds run on each side")
    ap.add_argument("--reuse", action="store_true", help="read the arrays a previous run left in --work (no LM pass)")
    ap.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/saebench_absorption_conformance.json"))
    args = ap.parse_args()
    if args.peer:
        print(json.dumps(peer(Path(args.work))))
        return 0
    import statistics

    import numpy as np

    mine = ours(args)
    runs = mine["runs"]
    result = {"setup": vars(args), "ours": mine}
    first = runs[0]
    print(f"ours: probe accuracy {first['probe_accuracy']:.3f}, {len(first['letters_counted'])} letters at F1 > "
          f"{args.min_f1}, evaluated {first['evaluated']} ({mine['elapsed_s']} s)")
    if not first["evaluated"]:
        result["all_ok"] = None
        Path(args.out).write_text(json.dumps(result, indent=1))
        print("the model cannot do the task at this size: nothing to compare beyond the probe ->", args.out)
        return 0
    t0 = time.time()
    proc = subprocess.run([str(PEERS_PY), __file__, "--peer", "--work", args.work], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        return 1
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    theirs["elapsed_s"] = round(time.time() - t0, 1)
    result["sae_bench"] = theirs

    def numbers(run: dict) -> dict:
        return {"probe_mean_f1": float(np.mean(list(run["probe_f1"].values()))),
                "mean_absorption_fraction": run.get("mean_absorption_fraction"),
                "mean_full_absorption_rate": run.get("mean_full_absorption_rate"),
                "letters_counted": len(run.get("letters_counted", []))}

    per_seed = [(numbers(o), numbers(t)) for o, t in zip(runs, theirs["runs"])]
    # SAEBench reports a rate only with --min-letters letters at F1 > --min-f1 (its run_eval stops
    # otherwise; the peer chain above computes the means regardless): both sides must make the same
    # call at each seed, and the rates are compared where they make one.
    for o, t in per_seed:
        t["evaluated"] = t["letters_counted"] >= args.min_letters
        if not t["evaluated"]:
            t["mean_absorption_fraction"] = t["mean_full_absorption_rate"] = None
    checks = {}
    for seed, (o, t) in enumerate(per_seed):
        o["evaluated"] = runs[seed]["evaluated"]
        checks[f"seed_{seed}_same_call"] = (float(o["evaluated"]), float(t["evaluated"]), 0.0)
    for key in ("probe_mean_f1", "mean_absorption_fraction", "mean_full_absorption_rate"):
        for seed, (o, t) in enumerate(per_seed):
            if key == "probe_mean_f1" or o["evaluated"]:
                checks[f"seed_{seed}_{key}"] = (o[key], t[key], TOL)
        mo = [o[key] for o, _ in per_seed if o[key] is not None]
        mt = [t[key] for _, t in per_seed if t[key] is not None]
        checks[f"median_{key}"] = (statistics.median(mo) if mo else None, statistics.median(mt) if mt else None, TOL)
        result.setdefault("spread", {})[key] = {"ours": [min(mo), max(mo)] if mo else None,
                                                "sae_bench": [min(mt), max(mt)] if mt else None}
    for letter, row in first["per_letter"].items():
        for key in ("mean_absorption_fraction", "full_absorption_rate"):
            checks[f"same_probe_{letter}_{key}"] = (row[key], theirs["with_our_probe"][letter][key], 1e-4)
    result["per_seed"] = [{"seed": s, "ours": o, "sae_bench": t} for s, (o, t) in enumerate(per_seed)]
    for s, (o, t) in enumerate(per_seed):
        print(f"seed {s}: " + "  ".join(f"{k} {o[k]} / {t[k]}" for k in o))
    ok = True
    result["checks"] = {}
    for name, (v, t, tol) in checks.items():
        good = v is not None and t is not None and abs(v - t) <= tol
        ok &= good
        result["checks"][name] = {"ours": v, "sae_bench": t, "tolerance": tol, "ok": good}
        if name.startswith("median_") or not good:
            print(f"{name:40} ours {v}  sae-bench {t}  " + ("ok" if good else "DIFFERS"))
    print("spread over seeds (min, max):", json.dumps(result["spread"]))
    result["all_ok"] = bool(ok)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("all within tolerance" if ok else "SOME DIFFER", "->", args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
