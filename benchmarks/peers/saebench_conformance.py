"""Our SAEBench measures against sae-bench 0.6.0's own functions, on the same inputs.

    python benchmarks/peers/saebench_conformance.py [--model smollm2-135m --sae FOLDER --train 40 --test 16]

By default: the tiny random model of the tests (tests/helpers.py, written under --work) and a
ReLU SAE with seeded random weights written as SAELens writes it, so that each side loads it with
its own code (ours: trainer.formats.load_sae; sae-bench: sae_lens.SAE.load_from_disk).

Sparse probing. sae-bench's `run_eval` cannot run here: it loads its datasets and the model from
the Hugging Face Hub (HookedTransformer.from_pretrained). So this project's venv reads the per-token
activations [N, T, D] of our probing tasks (trainer/probing_tasks.py) with our hooks and saves them
with the token ids; the peers' venv (/work/main/.peers/venv, sae-bench 0.6.0) then runs, on those
arrays, exactly the calls its `run_eval_single_dataset` makes after collecting activations:
`activation_collection.get_bos_pad_eos_mask` (zeroing BOS/EOS/pad, as `get_llm_activations` does),
`create_meaned_model_activations`, `get_sae_meaned_activations` (with the SAELens SAE), and
the body of `probe_training.train_probe_on_activations` with select_top_k = k (scikit-learn) and
with select_top_k = None, use_sklearn = False, batch 250, 100 epochs, lr 1e-2 (its full-width
probes). That body is run call by call (prepare_probe_data, get_top_k_mean_diff_mask,
apply_topk_mask_reduce_dim, train_sklearn_probe, train_probe_gpu) rather than through
train_probe_on_activations itself: with jaxtyping 0.3.11 its shape check binds the per-class size
`train_dataset_size` in the outer call and then refuses the inner probe's twice-as-large input.
Its `prepare_probe_data` draws the balanced negatives with torch's RNG, ours with numpy's: its
balance is checked on its own draw, and its probes are then fed our draw (the same (X, y) as
ours), so the accuracies compare the probes and the top-k choice, not two random samples.
We check: pooled arrays equal (max |diff| < 1e-4), and every task's mean top-k accuracy within
0.04. The full-width accuracies are reported beside sae-bench's but not held to the tolerance: its
full-width probe is AdamW kept at the epoch of best *test* accuracy, ours a logistic regression
that never sees the test split, so on small test sets its number is higher by selection. On small
train sets it can also be lower: an epoch is then one step, and its early stopping ends training
within a few dozen steps (benchmarks/peers/saebench_full_width_probe.py runs it on the arrays this
script saves, with and without the stopping rule).
Results go to benchmarks/results/saebench_conformance.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PEERS_PY = ROOT / ".peers" / "venv" / "bin" / "python"
TOL = 0.04
KS = (1, 2, 5)


def setup(args):
    """(LM, site, SAE folder): the tiny random model or --model, and --sae or a seeded random ReLU
    SAE written as SAELens writes it."""
    sys.path.insert(0, str(ROOT))
    import torch

    from tests.conformance.layouts import saelens_cfg, write_saelens
    from trainer.lm import load_lm

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.model == "tiny":
        from tests.helpers import make_tiny_model

        model_dir = work / "tiny-model"
        if not (model_dir / "config.json").exists():
            make_tiny_model(model_dir)
        lm = load_lm(str(model_dir), "cpu", "float32")
    else:
        lm = load_lm(args.model, "cpu", "float32")
    site = lm.site(args.site)
    if args.sae:
        sae_dir = Path(args.sae)
    else:
        d, f = lm.d_model, args.width
        g = torch.Generator().manual_seed(0)
        cfg = saelens_cfg("standard", hook=f"blocks.{site.layer}.hook_resid_post")
        cfg.update(d_in=d, d_sae=f)
        sae_dir = write_saelens(work / "sae", cfg, {"W_enc": torch.randn(d, f, generator=g) * (2 / d ** 0.5),
                                                   "b_enc": torch.randn(f, generator=g) * 0.1,
                                                   "W_dec": torch.randn(f, d, generator=g) / d ** 0.5,
                                                   "b_dec": torch.randn(d, generator=g) * 0.1})
    return lm, site, sae_dir


def ours(args) -> dict:
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch

    from trainer.formats import load_sae
    from trainer.probing_tasks import build_tasks
    from trainer.sparse_probing import (
        class_accuracies,
        dense_encoder,
        mean_rows,
        pooled_activations,
        special_ids,
        text_tokens,
    )

    work = Path(args.work)
    lm, site, sae_dir = setup(args)
    sae = load_sae(sae_dir).sae.eval()
    encode = dense_encoder(sae)
    tasks = build_tasks("pydoc", ["module_family", "code_vs_prose"], args.train, args.test, seed=0)
    skip = special_ids(lm)
    arrays, result = {}, {"tasks": {}}
    t0 = time.time()
    for task in tasks:
        res = {"summary": task.summary(), "ours": {}}
        pooled = {}
        for split, data in (("train", task.train), ("test", task.test)):
            pooled[split] = {}
            for c, texts in data.items():
                pooled[split][c] = pooled_activations(lm, args.site, texts, args.ctx_len, 8, encode)
                # the per-token activations sae-bench will pool itself, padded to ctx_len like its tokenizer
                seqs = text_tokens(lm.tokenizer, texts, lm.bos_token_id, args.ctx_len)
                ids = torch.full((len(seqs), args.ctx_len), lm.separator_token_id, dtype=torch.long)
                for i, s in enumerate(seqs):
                    ids[i, :len(s)] = torch.tensor(s)
                acts = torch.cat([lm.read(ids[i:i + 8], [site])[site.name].float() for i in range(0, len(ids), 8)])
                key = f"{task.name}|{split}|{c}"
                arrays[key + "|acts"] = acts.numpy()
                arrays[key + "|tokens"] = ids.numpy()
                arrays[key + "|pooled_llm"] = pooled[split][c][0]
                arrays[key + "|pooled_sae"] = pooled[split][c][1]
        for which, j in (("llm", 0), ("sae", 1)):
            kept: dict = {}
            acc = class_accuracies({c: v[j] for c, v in pooled["train"].items()},
                                   {c: v[j] for c, v in pooled["test"].items()}, KS, seed=0, keep=kept)
            for c, (xtr, ytr, xte, yte) in kept.items():  # the very probe inputs, for sae-bench's probes
                for name, v in (("xtr", xtr), ("ytr", ytr), ("xte", xte), ("yte", yte)):
                    arrays[f"{task.name}|{which}|{c}|{name}"] = v
            res["ours"][which] = {"per_class": acc, "mean": mean_rows(list(acc.values()))}
        result["tasks"][task.name] = res
    result["ours_s"] = round(time.time() - t0, 1)
    np.savez(work / "arrays.npz", **arrays)
    meta = {"special_ids": sorted(skip), "pad": lm.separator_token_id, "bos": lm.bos_token_id,
            "eos": lm.tokenizer.eos_token_id, "sae_dir": str(sae_dir), "ks": list(KS),
            "tasks": {t.name: t.classes for t in tasks}}
    (work / "meta.json").write_text(json.dumps(meta))
    result["setup"] = {"model": args.model, "site": args.site, "sae": str(sae_dir), "ctx_len": args.ctx_len,
                       "train_per_class": args.train, "test_per_class": args.test}
    return result


def peer(work: Path) -> dict:
    """Runs in the peers' venv: sae-bench 0.6.0's functions on the saved arrays."""
    import random
    from types import SimpleNamespace

    import numpy as np
    import sae_bench.evals.sparse_probing.probe_training as pt
    import sae_bench.sae_bench_utils.activation_collection as ac
    import torch
    from sae_lens import SAE

    random.seed(42)
    torch.manual_seed(42)
    meta = json.loads((work / "meta.json").read_text())
    arrays = np.load(work / "arrays.npz")
    sae = SAE.load_from_disk(meta["sae_dir"], device="cpu")
    tok = SimpleNamespace(pad_token_id=meta["pad"], eos_token_id=meta["eos"], bos_token_id=meta["bos"])
    out = {}
    for task, classes in meta["tasks"].items():
        acts_bld, pooled_diff = {"train": {}, "test": {}}, {"llm": 0.0, "sae": 0.0}
        for split in ("train", "test"):
            for c in classes:
                key = f"{task}|{split}|{c}"
                tokens = torch.from_numpy(arrays[key + "|tokens"])
                acts = torch.from_numpy(arrays[key + "|acts"])
                mask = ac.get_bos_pad_eos_mask(tokens, tok)
                acts_bld[split][c] = acts * mask[:, :, None]
        pooled = {s: {"llm": ac.create_meaned_model_activations(acts_bld[s]),
                      "sae": ac.get_sae_meaned_activations(acts_bld[s], sae, 125)} for s in acts_bld}
        for s in pooled:
            for c in classes:
                for which in ("llm", "sae"):
                    ours_arr = arrays[f"{task}|{s}|{c}|pooled_{which}"]
                    d = float(np.abs(pooled[s][which][c].float().numpy() - ours_arr).max())
                    pooled_diff[which] = max(pooled_diff[which], d)
        res = {"pooled_max_abs_diff": pooled_diff}
        for which in ("llm", "sae"):
            tr = pooled["train"][which]
            per = {"test_accuracy": {}, **{f"top_{k}_test_accuracy": {} for k in meta["ks"]}}
            for c in classes:  # train_probe_on_activations' own loop, one call at a time (see the docstring)
                # its balancing, checked on its own draw; the probes then get our draw, the same inputs as ours
                _, by = pt.prepare_probe_data(tr, c)
                assert int(by.sum()) == len(tr[c]) == len(by) - int(by.sum())
                xtr, ytr, xte, yte = [torch.from_numpy(arrays[f"{task}|{which}|{c}|{n}"]) for n in ("xtr", "ytr", "xte", "yte")]
                ytr, yte = ytr.int(), yte.int()
                _, per["test_accuracy"][c] = pt.train_probe_gpu(xtr, ytr, xte, yte, dim=xtr.shape[1], batch_size=250,
                                                                epochs=100, lr=1e-2)
                for k in meta["ks"]:
                    mask = pt.get_top_k_mean_diff_mask(xtr, ytr, k)
                    _, per[f"top_{k}_test_accuracy"][c] = pt.train_sklearn_probe(
                        pt.apply_topk_mask_reduce_dim(xtr, mask), ytr, pt.apply_topk_mask_reduce_dim(xte, mask), yte)
            res[which] = {"per_class": {c: {m: per[m][c] for m in per} for c in classes},
                          "mean": {m: float(np.mean(list(v.values()))) for m, v in per.items()}}
        out[task] = res
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--site", default="resid_post.2")
    ap.add_argument("--sae", default=None, help="an SAE folder (SAELens layout, readable by both sides)")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--train", type=int, default=40, help="train texts per class")
    ap.add_argument("--test", type=int, default=16, help="test texts per class")
    ap.add_argument("--ctx-len", type=int, default=64)
    ap.add_argument("--work", default="/tmp/saebench-conformance")
    ap.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/saebench_conformance.json"))
    args = ap.parse_args()
    if args.peer:
        print(json.dumps(peer(Path(args.work))))
        return 0
    result = ours(args)
    t0 = time.time()
    proc = subprocess.run([str(PEERS_PY), __file__, "--peer", "--work", args.work], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        return 1
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    result["peer_s"] = round(time.time() - t0, 1)
    ok = True
    for task, res in result["tasks"].items():
        res["sae_bench"] = theirs[task]
        res["checks"] = {}
        for which in ("llm", "sae"):
            diff = theirs[task]["pooled_max_abs_diff"][which]
            res["checks"][f"pooled_{which}_equal"] = {"max_abs_diff": diff, "ok": diff < 1e-4}
            for m, v in res["ours"][which]["mean"].items():
                t = theirs[task][which]["mean"][m]
                check = {"ours": v, "sae_bench": t, "diff": abs(v - t), "ok": abs(v - t) <= TOL}
                if m == "test_accuracy":  # AdamW probe kept at its best test epoch vs our logistic regression
                    check["informational"] = True
                res["checks"][f"{which}_{m}"] = check
        for name, c in res["checks"].items():
            ok &= c["ok"] or c.get("informational", False)
            print(f"{task:14} {name:32} " + (f"ours {c['ours']:.3f}  sae-bench {c['sae_bench']:.3f}  "
                                             if "ours" in c else f"max|diff| {c['max_abs_diff']:.2e}  ")
                  + ("ok" if c["ok"] else "DIFFERS") + (" (different probe method)" if c.get("informational") else ""))
    result["tolerance"] = TOL
    result["all_ok"] = bool(ok)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("all within tolerance" if ok else "SOME DIFFER", "->", args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
