"""Data-parallel plumbing: joining torchrun's process group and the few collectives the trainer needs."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on CUDA, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return dist_info()


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank; [obj] in one process."""
    _, world = dist_info()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's flag on every rank (so every rank takes the same branch)."""
    if dist_info()[1] == 1:
        return flag
    t = torch.tensor(int(flag), device=device)
    dist.broadcast(t, 0)
    return bool(t)


def barrier() -> None:
    if dist_info()[1] > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
