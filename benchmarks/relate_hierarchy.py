"""Does relating a narrow and a wide SAE recover a known feature hierarchy? Ground truth from SAELens.

    # 1. the data, with SAELens's own generator (run in a virtualenv that has sae_lens, e.g. the peers'):
    /work/main/.peers/venv/bin/python benchmarks/relate_hierarchy.py generate --out tests/fixtures/hierarchy.npz
    # 2. the measurement, with our trainer and relate (the project's virtualenv):
    .venv/bin/python benchmarks/relate_hierarchy.py measure --data tests/fixtures/hierarchy.npz

`generate` builds a `sae_lens.synthetic.SyntheticModel` with a hierarchy: ROOTS root features with
BRANCHING mutually exclusive children each (a child fires only when its root does, and in a
direction unrelated to the root's: SAELens draws every feature's direction independently), plus
STANDALONE features outside the hierarchy. It samples ROWS rows of ground-truth feature firings and
writes them to an .npz: the firings as bits (magnitudes are constant 1, so a row's activation is
the sum of its firing features' vectors plus the bias, SAELens's FeatureDictionary), the feature
vectors, the bias, the hierarchy's (parent, child) feature pairs, and CHECK_ROWS rows of SAELens's
own hidden activations to check that rebuilding rows from the bits reproduces them.

`measure` trains two TopK SAEs of our trainer (widths NARROW and WIDE) on the first TRAIN_ROWS rows,
relates them on the rest (trainer.relate.relate_saes) and scores the parent -> child links among
recovered latents: a latent stands for the true feature it detects best on the held-out rows (F1 of
"the latent fires" against "the feature fires", SynthSAEBench's per-latent F1) when that F1 is at
least RECOVERED_F1. (By decoder cosine, a wide SAE's child latents are blends of child and root
directions, cos ~0.7 with each: they detect the child, but point halfway.) Truth: (root, child) pairs whose root a latent of the narrow SAE stands
for and whose child a latent of the wide one stands for. Found: links from a latent standing for a
root to one standing for a different feature (a root's own copy in the wide SAE is its persistence,
not a child). precision = |found & truth| / |found|, recall = |found & truth| / |truth|; both are
printed with the links by kind (direction or co-firing), and written to benchmarks/results/.
tests/test_relate.py runs `measure` on the committed fixture.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
D, ROOTS, BRANCHING, STANDALONE = 32, 8, 3, 8
N_FEATURES = ROOTS * (1 + BRANCHING) + STANDALONE
ROWS, CHECK_ROWS, SEED = 60_000, 64, 0
TRAIN_ROWS = 40_000
NARROW, WIDE, K = ROOTS + STANDALONE, N_FEATURES, 4
RECOVERED_F1 = 0.6


def generate(out: Path) -> None:
    import torch
    from sae_lens.synthetic import (
        HierarchyConfig,
        OrthogonalizationConfig,
        SyntheticModel,
        SyntheticModelConfig,
        ZipfianFiringProbabilityConfig,
    )

    cfg = SyntheticModelConfig(
        num_features=N_FEATURES, hidden_dim=D,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.3, min_prob=0.05),
        hierarchy=HierarchyConfig(total_root_nodes=ROOTS, branching_factor=BRANCHING, max_depth=1,
                                  mutually_exclusive_portion=1.0),
        orthogonalization=OrthogonalizationConfig(), std_firing_magnitudes=0.0, mean_firing_magnitudes=1.0,
        bias=1.0, seed=SEED)
    model = SyntheticModel(cfg)
    torch.manual_seed(SEED)
    hidden, feats = model.sample_with_features(ROWS)
    feats = feats.to_dense() if feats.is_sparse else feats
    if not torch.all((feats == 0) | (feats == 1)):
        raise SystemExit("expected binary firings (constant magnitude 1)")
    edges = [(r.feature_index, c.feature_index) for r in model.hierarchy.roots for c in r.children]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, fires=np.packbits(feats.numpy().astype(bool), axis=1),
                        vectors=model.feature_dict.feature_vectors.detach().numpy().astype(np.float32),
                        bias=model.feature_dict.bias.detach().numpy().astype(np.float32),
                        edges=np.array(edges, np.int64), check=hidden[:CHECK_ROWS].numpy().astype(np.float32),
                        config=np.array(json.dumps(cfg.to_dict(), default=str)))
    fired = feats.numpy() > 0
    roots = [p for p, _ in edges]
    p_parent = [fired[fired[:, c], p].mean() for p, c in edges]
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB): {ROWS} rows, {N_FEATURES} features in d={D}, "
          f"{len(edges)} (root, child) edges; true L0 {fired.sum(1).mean():.2f}; root firing rates "
          f"{np.round(fired[:, sorted(set(roots))].mean(0), 3).tolist()}; P(root | child) = {np.mean(p_parent):.2f}")


def load(path: Path) -> dict:
    """The rows rebuilt from the fixture: x [ROWS, D] float32, the true firings [ROWS, F] bool, the
    true vectors, the (root, child) edges, and SAELens's own first rows (check)."""
    z = np.load(path)
    n_features = z["vectors"].shape[0]
    fires = np.unpackbits(z["fires"], axis=1, count=n_features).astype(bool)
    x = fires.astype(np.float32) @ z["vectors"] + z["bias"]
    return {"x": x.astype(np.float32), "fires": fires, "vectors": z["vectors"], "edges": z["edges"], "check": z["check"]}


def stands_for(sae, x: np.ndarray, fires: np.ndarray) -> np.ndarray:
    """The true feature each latent detects best on rows x (F1 against the true firings), -1 when
    that F1 is below RECOVERED_F1."""
    import torch

    with torch.no_grad():
        on = (sae.encode(torch.from_numpy(x)).dense(sae.cfg.d_sae) > 0).numpy().astype(np.float64)
    truth = fires.astype(np.float64)
    both = on.T @ truth  # [latents, features] rows where both fire
    f1 = 2 * both / np.maximum(on.sum(0)[:, None] + truth.sum(0)[None, :], 1)
    return np.where(f1.max(1) >= RECOVERED_F1, f1.argmax(1), -1)


def train_pair(x: np.ndarray, root: Path, tokens: int = 1_000_000):
    from trainer.formats import load_sae
    from trainer.train import TrainConfig, train

    np.save(root / "acts.npy", x)
    cfg = TrainConfig(out=root / "sweep", activations=root / "acts.npy", site=["resid_post.0"], width=[NARROW, WIDE],
                      k=[K], tokens=tokens, batch_size=512, device="cpu", ce_contexts=0, checkpoint_every=0,
                      log_every=200, eval_tokens=4096, lr=3e-3, dead_after_tokens=10_000, aux_coefficient=1 / 8, aux_k=4)
    return tuple(load_sae(f).sae for f in train(cfg))


def score(rel, narrow, wide, data: dict) -> dict:
    """Precision and recall of the relation's parent -> child links among recovered latents (judged on
    the held-out rows)."""
    x, fires = data["x"][TRAIN_ROWS:], data["fires"][TRAIN_ROWS:]
    of_a, of_b = stands_for(narrow, x, fires), stands_for(wide, x, fires)
    edges = {(int(p), int(c)) for p, c in data["edges"]}
    truth = {(p, c) for p, c in edges if p in set(of_a.tolist()) and c in set(of_b.tolist())}
    L = rel.links
    roots = {p for p, _ in edges}
    found, by_kind = set(), {}
    for i, j, kind in zip(L["a"].tolist(), L["b"].tolist(), L["kind"].tolist()):
        if i < 0 or j < 0 or of_a[i] < 0 or of_b[j] < 0 or of_a[i] not in roots or of_a[i] == of_b[j]:
            continue
        pair = (int(of_a[i]), int(of_b[j]))
        found.add(pair)
        by_kind.setdefault(kind, set()).add(pair)
    hit = found & truth
    return {"precision": len(hit) / max(len(found), 1), "recall": len(hit) / max(len(truth), 1), "truth": len(truth),
            "found": len(found), "correct": len(hit),
            "correct_by_kind": {k: len(v & truth) for k, v in by_kind.items()},
            "found_by_kind": {k: len(v) for k, v in by_kind.items()},
            "recovered": {"narrow": int((of_a >= 0).sum()), "wide": int((of_b >= 0).sum())},
            "splitting": rel.summary["splitting"]}


def measure(path: Path, tokens: int = 1_000_000) -> dict:
    import torch

    from trainer.relate import RelateConfig, Side, relate_saes

    data = load(path)
    x = data["x"]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        narrow, wide = train_pair(x[:TRAIN_ROWS], Path(tmp), tokens)
        held = torch.from_numpy(x[TRAIN_ROWS:])
        rel = relate_saes(Side("narrow", narrow, "resid_post.0", "synthetic"), Side("wide", wide, "resid_post.0", "synthetic"),
                          [{"resid_post.0": held}], RelateConfig(tokens=len(held), encode_dtype="float32"), progress=False)
        out = score(rel, narrow, wide, data)
        out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write the fixture with sae_lens.synthetic (needs sae_lens)")
    g.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "hierarchy.npz")
    m = sub.add_parser("measure", help="train, relate and score (the project's virtualenv)")
    m.add_argument("--data", type=Path, default=REPO / "tests" / "fixtures" / "hierarchy.npz")
    m.add_argument("--tokens", type=int, default=1_000_000)
    args = ap.parse_args(argv)
    if args.cmd == "generate":
        generate(args.out)
        return
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    out = measure(args.data, args.tokens)
    print(json.dumps({k: v for k, v in out.items() if k != "splitting"}, indent=1))
    results = REPO / "benchmarks" / "results" / "relate_hierarchy.json"
    results.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
