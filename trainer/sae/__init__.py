"""SAE architectures: a shared base (base.py) plus one small module per architecture."""

from __future__ import annotations

import torch

from trainer.config import ARCHITECTURES
from trainer.sae.base import (
    Codes,
    SAEConfig,
    SparseAutoencoder,
    StepContext,
    StepOutput,
    default_lr,
    lr_for_width,
)


def _registry() -> dict[str, type]:
    from trainer.sae.batchtopk import BatchTopKSAE
    from trainer.sae.jumprelu import JumpReLUSAE
    from trainer.sae.matryoshka import MatryoshkaSAE
    from trainer.sae.relu import ReLUSAE
    from trainer.sae.topk import TopKSAE

    return {cls.architecture: cls for cls in (TopKSAE, BatchTopKSAE, JumpReLUSAE, ReLUSAE, MatryoshkaSAE)}


def build_sae(cfg: SAEConfig, compute_dtype: torch.dtype = torch.float32) -> SparseAutoencoder:
    return _registry()[cfg.architecture](cfg, compute_dtype)


__all__ = ["ARCHITECTURES", "Codes", "SAEConfig", "SparseAutoencoder", "StepContext", "StepOutput", "build_sae", "default_lr", "lr_for_width"]
