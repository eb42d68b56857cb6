"""Run-length rules of the SAE trainer: the dead-latent window and the default learning rate."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.sae.base import SAEConfig


def dead_window(architecture: str, tokens: int, batch_size: int) -> int:
    """Training tokens without firing after which a latent counts as dead (and AuxK revives it).

    TopK, JumpReLU and ReLU: 5% of the run, within [10k, 10M] tokens (Gao et al. use 10M at scale).
    BatchTopK and Matryoshka: latents that lose the batch-wide competition early must be revived
    early or they never fire again, so 5 batches, at least 20k tokens (Bussmann et al. count a latent
    dead after 5 batches)."""
    if architecture in ("batchtopk", "matryoshka"):
        return int(max(20_000, 5 * batch_size))
    return int(min(10_000_000, max(10_000, tokens // 20)))


def lr_for_width(d_sae: int) -> float:
    """Gao et al.'s learning-rate law for TopK SAEs: 2e-4 / sqrt(d_sae / 2^14)."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


LONG_RUN_STEPS = 16_000
"""Runs of at least this many optimiser steps use Gao et al.'s learning rate as it is."""


def default_lr(cfg: SAEConfig, tokens: int, batch_size: int) -> float:
    """The Adam learning rate a run uses unless --lr is given: Gao et al.'s width law, raised for
    short runs by sqrt(LONG_RUN_STEPS / steps), at most 12x.

    Gao et al.'s law was fitted to runs of tens of thousands of steps; the runs users make on a CPU
    (and the demo) are a few hundred. Measured at 244 steps (1M tokens, batch 4096) on SmolLM2
    resid_post.15, width 2304, k 32, held-out FVU: 0.235 at the width law, 0.171 at 4x, 0.157 at 8x
    (dead latents 0.5%). On the synthetic grid (benchmarks/synthetic_recovery.py), TopK's mmcs at
    122 steps rose from 0.50-0.71 at the width law to 0.85-0.99 at 8-16x, and at 488 steps from
    0.69-0.98 to 0.94-0.99 at 8x. The square root follows the usual noise-scale argument: with fewer
    steps each may be larger; past LONG_RUN_STEPS the factor is 1.
    """
    steps = max(1, tokens // max(1, batch_size))
    return lr_for_width(cfg.d_sae) * min(12.0, max(1.0, math.sqrt(LONG_RUN_STEPS / steps)))
