"""The SAELens side of benchmarks/synthsaebench.py; runs in the peers' virtualenv (sae_lens 6.54.x).

    python benchmarks/peers/synthsaebench_peer.py build  --dir D
    python benchmarks/peers/synthsaebench_peer.py sample --dir D --rows N --out D/train.npy
    python benchmarks/peers/synthsaebench_peer.py train  --dir D --data D/train.npy --arch batchtopk --k 20 ...
    python benchmarks/peers/synthsaebench_peer.py eval   --dir D --sae NAME=FOLDER ... --json out.json

build: SynthSAEBench-16k from its published configuration (SAELens docs/synth_sae_bench.md and
decoderesearch/synth-sae-bench-experiments experiments/create_synth_bench_16k_model.py: 16,384
features, hidden 768, Zipf exponent 0.5 from p 0.4 to 5e-4, hierarchy 128 roots x branching 4 x
depth 3 all mutually exclusive with children scaled by their parent, low-rank correlation rank 25
scale 0.1, 100 orthogonalisation steps at lr 3e-4, mean magnitudes 5 -> 4, folded-normal std
(0.5, 0.5), bias norm 0.5, seed 42), built by sae_lens.synthetic.SyntheticModel itself. This
machine cannot reach the Hugging Face hub, so the released weights (decoderesearch/
synth-sae-bench-16k-v2) are regenerated from the configuration; they are the same construction but
not bit-identical (the release was drawn on CUDA, whose generator differs from the CPU one).

One substitution: SAELens's orthogonalize_embeddings forms the 16,384 x 16,384 Gram matrix in
chunks, about 1.2 TFLOP a step (2 hours for 100 steps on one shared CPU core). The loss
sum_{i != j} (d_i.d_j)^2 + N sum_i (|d_i|^2 - 1)^2 equals |D^T D|_F^2 - sum_i |d_i|^4 + N sum_i (|d_i|^2 - 1)^2,
whose gradient needs only the 768 x 768 matrix D^T D; gram_orthogonalize takes the same Adam steps
on it. `build` first checks it against SAELens's own orthogonalize_embeddings on a small dictionary
and refuses to go on if they disagree.

sample: hidden activations of the model (SyntheticModel.sample, sparse feature tensors), seeded,
written as a float32 [N, 768] .npy that `sae-atlas train --activations` reads.

train: a SAELens SAE trained by SAELens's own SAETrainer on the rows of that .npy in exactly the
order our trainer reads them (trainer.activations.ArrayActivations: one seeded permutation to hold
out eval_fraction, then one seeded permutation of the training rows per epoch), then evaluated as
SyntheticSAERunner evaluates (eval_sae_on_synthetic_data on the training SAE).

eval: eval_sae_on_synthetic_data (SAELens's definitions of explained variance, MCC, per-latent
F1, dead latents and L0) on saved SAE folders loaded with SAE.load_from_disk, every SAE on the same
fresh samples (torch seeded before each).
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

N_FEATURES, HIDDEN = 16_384, 768
SEED = 42


def published_config():
    from sae_lens.synthetic import (
        FoldedNormalMagnitudeConfig,
        HierarchyConfig,
        LinearMagnitudeConfig,
        LowRankCorrelationConfig,
        OrthogonalizationConfig,
        SyntheticModelConfig,
        ZipfianFiringProbabilityConfig,
    )

    return SyntheticModelConfig(
        num_features=N_FEATURES, hidden_dim=HIDDEN,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4, min_prob=5e-4),
        hierarchy=HierarchyConfig(total_root_nodes=128, branching_factor=4, max_depth=3, mutually_exclusive_portion=1.0,
                                  mutually_exclusive_min_depth=0, compensate_probabilities=True,
                                  scale_children_by_parent=True),
        orthogonalization=OrthogonalizationConfig(num_steps=100, lr=3e-4),
        correlation=LowRankCorrelationConfig(rank=25, correlation_scale=0.1),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
        bias=0.5, seed=SEED)


def gram_orthogonalize(embeddings: torch.Tensor, num_steps: int, lr: float) -> torch.Tensor:
    """SAELens's orthogonalize_embeddings (same loss, same Adam, same final normalisation) with the
    loss written through D^T D instead of D D^T."""
    n = embeddings.shape[0]
    e = embeddings.detach().clone()
    e = (e / e.norm(dim=1, keepdim=True).clamp(min=1e-8)).requires_grad_(True)
    opt = torch.optim.Adam([e], lr=lr)
    for _ in range(num_steps):
        opt.zero_grad()
        sq = (e * e).sum(1)
        loss = (e.T @ e).pow(2).sum() - sq.pow(2).sum() + n * (sq - 1).pow(2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        e = e / e.norm(dim=1, keepdim=True).clamp(min=1e-8)
    return e.detach().clone()


def check_orthogonalizer() -> float:
    """Largest difference between gram_orthogonalize and SAELens's orthogonalize_embeddings on a
    small random dictionary (2048 x 96, 20 steps at the published lr and at 100x it)."""
    from sae_lens.synthetic import orthogonalize_embeddings

    worst = 0.0
    for lr in (3e-4, 3e-2):
        emb = torch.randn(2048, 96, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        theirs = orthogonalize_embeddings(emb, num_steps=20, lr=lr, chunk_size=512)
        ours = gram_orthogonalize(emb, num_steps=20, lr=lr)
        worst = max(worst, float((theirs - ours).abs().max()))
    return worst


def build(args) -> None:
    from sae_lens.synthetic import FeatureDictionary, SyntheticModel, compute_superposition_stats

    gap = check_orthogonalizer()
    print(f"gram_orthogonalize vs sae_lens orthogonalize_embeddings: max |diff| {gap:.2e}", flush=True)
    if gap > 1e-6:
        sys.exit(f"the fast orthogonaliser disagrees with SAELens's ({gap:.2e}); not building")
    cfg = published_config()
    start = time.time()

    def initializer(fd: FeatureDictionary) -> None:
        fd.feature_vectors.data = gram_orthogonalize(fd.feature_vectors, cfg.orthogonalization.num_steps,
                                                     cfg.orthogonalization.lr)

    # what SyntheticModel._create_feature_dict builds, with the orthogonaliser swapped
    fd = FeatureDictionary(num_features=cfg.num_features, hidden_dim=cfg.hidden_dim, bias=cfg.bias,
                           initializer=initializer, device="cpu", seed=cfg.seed)
    model = SyntheticModel(cfg, feature_dict=fd, device="cpu")
    model.save(Path(args.dir) / "model")
    stats = compute_superposition_stats(model.feature_dict, batch_size=1024, percentiles=[95, 99])
    torch.manual_seed(0)
    feats = model.activation_generator.sample(8192)
    info = {"build_s": round(time.time() - start, 1), "orthogonalizer_max_diff": gap,
            "mean_max_abs_cos_sim": stats.mean_max_abs_cos_sim, "true_l0": float((feats > 0).sum(1).float().mean()),
            "true_l0_first_4096": float((feats[:, :4096] > 0).sum(1).float().mean()), "config": cfg.to_dict()}
    (Path(args.dir) / "model_info.json").write_text(json.dumps(info, indent=1))
    print(json.dumps({k: v for k, v in info.items() if k != "config"}), flush=True)


def load_model(folder: Path):
    """The saved model, dense feature tensors (on a CPU SAELens's sparse COO path is ~10x slower)."""
    from sae_lens.synthetic import SyntheticModel

    return SyntheticModel.load_from_disk(folder / "model")


class SparseProduct:
    """model.feature_dict with the product taken through a sparse copy of the (dense, ~34 of 16,384
    non-zero) feature activations: the same hidden activations as FeatureDictionary.forward's dense
    product, without its 26 GFLOP per 1024 rows."""

    def __init__(self, feature_dict):
        self.feature_vectors, self.bias = feature_dict.feature_vectors.detach(), feature_dict.bias.detach()

    def __call__(self, feature_acts: torch.Tensor) -> torch.Tensor:
        return torch.sparse.mm(feature_acts.to_sparse(), self.feature_vectors) + self.bias


class Replay:
    """An ActivationGenerator stand-in that hands out the same pre-drawn feature activations (drawn
    by the model's own generator, kept sparse) to every SAE evaluated."""

    def __init__(self, generator, samples: int, seed: int, cache: Path, chunk: int = 1024):
        from tqdm import tqdm

        path = cache / f"eval-samples-{samples}-seed{seed}.pt"
        if path.exists():
            self.chunks = torch.load(path)
        else:
            torch.manual_seed(seed)
            self.chunks = [generator.sample(min(chunk, samples - s)).to_sparse()
                           for s in tqdm(range(0, samples, chunk), desc="eval samples", mininterval=10)]
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            torch.save(self.chunks, tmp)
            tmp.rename(path)
        self.next = 0

    def rewind(self) -> None:
        self.next = 0

    def sample(self, batch_size: int) -> torch.Tensor:
        out = self.chunks[self.next].to_dense()
        self.next += 1
        if out.shape[0] != batch_size:
            raise ValueError(f"replay chunks are {out.shape[0]} rows, asked for {batch_size}")
        return out


def sample(args) -> None:
    """Rows [part * rows / parts, (part + 1) * rows / parts) of the file, seeded by (seed, part), so
    that several processes can fill one file."""
    from tqdm import tqdm

    model = load_model(Path(args.dir))
    product = SparseProduct(model.feature_dict)
    torch.manual_seed(args.seed * 1000 + args.part)
    tmp = args.out + ".tmp.npy"
    if args.part == 0 and not Path(tmp).exists():
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(args.rows, HIDDEN)).flush()
    while not Path(tmp).exists():
        time.sleep(1)
    time.sleep(2)
    out = np.load(tmp, mmap_mode="r+")
    lo, hi = args.part * args.rows // args.parts, (args.part + 1) * args.rows // args.parts
    chunk = 1024
    for start in tqdm(range(lo, hi, chunk), desc=f"sampling part {args.part}", mininterval=10):
        n = min(chunk, hi - start)
        out[start:start + n] = product(model.activation_generator.sample(n)).numpy()
    out.flush()


def array_batches(path: Path, batch_size: int, eval_fraction: float, seed: int):
    """The batches trainer.activations.ArrayActivations.batches yields for this file, in order."""
    arr = np.load(path, mmap_mode="r")
    perm = np.random.default_rng(seed).permutation(arr.shape[0])
    rows = perm[max(1, int(round(arr.shape[0] * eval_fraction))):]
    epoch = 0
    while True:
        order = np.random.default_rng(seed + 1 + epoch).permutation(rows)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield torch.from_numpy(np.asarray(arr[np.sort(order[start:start + batch_size])]))
        epoch += 1


def evaluate(sae, model, replay: Replay, samples: int) -> dict:
    from sae_lens.synthetic import eval_sae_on_synthetic_data

    replay.rewind()  # every SAE sees the same samples
    res = eval_sae_on_synthetic_data(sae, SparseProduct(model.feature_dict), replay, num_samples=samples,
                                     batch_size=1024)
    return res.to_dict()


def train(args) -> None:
    from sae_lens import BatchTopKTrainingSAEConfig, LoggingConfig, MatryoshkaBatchTopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.registry import get_sae_training_class
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(args.seed)
    if args.arch == "batchtopk":
        sae_cfg = BatchTopKTrainingSAEConfig(d_in=HIDDEN, d_sae=args.width, k=args.k)
    elif args.arch == "matryoshka":  # synth-sae-bench-experiments get_matryoshka_config
        sae_cfg = MatryoshkaBatchTopKTrainingSAEConfig(d_in=HIDDEN, d_sae=args.width, k=args.k,
                                                       matryoshka_widths=[w for w in (128, 512, 2048) if w < args.width],
                                                       use_matryoshka_aux_loss=True)
    else:
        sys.exit(f"unknown arch {args.arch}")
    sae = get_sae_training_class(sae_cfg.architecture())[0](sae_cfg)
    # SyntheticSAERunnerConfig's defaults (constant lr, Adam 0.9/0.999, dead window 1000, ...)
    trainer_cfg = SAETrainerConfig(
        n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False, total_training_samples=args.tokens,
        device="cpu", autocast=False, lr=args.lr, lr_end=args.lr / 10, lr_scheduler_name="constant",
        lr_warm_up_steps=0, adam_beta1=0.9, adam_beta2=0.999, lr_decay_steps=0, n_restart_cycles=1,
        train_batch_size_samples=args.batch_size, dead_feature_window=1000, feature_sampling_window=2000,
        logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1), n_batches_for_norm_estimate=1000)
    start = time.time()
    data = array_batches(Path(args.data), args.batch_size, args.eval_fraction, args.seed)
    sae = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=data).fit()
    wall = time.time() - start
    model = load_model(Path(args.dir))
    row = {"name": f"saelens-{args.arch}", "tool": "sae_lens", "architecture": args.arch, "width": args.width,
           "k": args.k, "tokens": args.tokens, "lr": args.lr, "batch_size": args.batch_size, "train_wall_s": round(wall, 1),
           **evaluate(sae, model, Replay(model.activation_generator, args.eval_samples, args.eval_seed, Path(args.dir)), args.eval_samples)}
    print(json.dumps(row), flush=True)
    Path(args.json).write_text(json.dumps(row))


def eval_folders(args) -> None:
    from sae_lens import SAE

    model = load_model(Path(args.dir))
    replay = Replay(model.activation_generator, args.eval_samples, args.eval_seed, Path(args.dir))
    rows = []
    for item in args.sae:
        name, _, folder = item.partition("=")
        sae = SAE.load_from_disk(folder, device="cpu")
        start = time.time()
        row = {"name": name, "folder": folder, "saelens_class": type(sae).__name__,
               **evaluate(sae, model, replay, args.eval_samples), "eval_s": 0.0}
        row["eval_s"] = round(time.time() - start, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(args.json).write_text(json.dumps(rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=("build", "sample", "train", "eval"))
    p.add_argument("--dir", required=True, help="folder of the synthetic model")
    p.add_argument("--rows", type=int, default=0)
    p.add_argument("--out", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--part", type=int, default=0)
    p.add_argument("--parts", type=int, default=1)
    p.add_argument("--data", default="")
    p.add_argument("--arch", default="batchtopk")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--tokens", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--eval-fraction", type=float, default=0.01)
    p.add_argument("--eval-samples", type=int, default=50_176)
    p.add_argument("--eval-seed", type=int, default=1234)
    p.add_argument("--sae", action="append", default=[], help="NAME=FOLDER (repeatable)")
    p.add_argument("--json", default="")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    {"build": build, "sample": sample, "train": train, "eval": eval_folders}[args.stage](args)


if __name__ == "__main__":
    main()
