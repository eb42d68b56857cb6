"""Which GPUs a trainer worker may use: one lock file per device, shared between the trainer
workers of a host (see DeviceSlots)."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def cuda_device_keys() -> list[str]:
    """A stable name per visible CUDA device (its UUID where torch exposes it), [] without CUDA."""
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        keys = []
        for i in range(torch.cuda.device_count()):
            uuid = getattr(torch.cuda.get_device_properties(i), "uuid", None)
            keys.append(f"gpu-{uuid}" if uuid else f"{socket.gethostname()}-cuda{i}")
        return keys
    except Exception:  # torch without a usable CUDA runtime
        return []


class DeviceSlots:
    """Which GPUs this worker may use for its next run, shared fairly between trainer workers.

    Scaled trainer containers on one host all see every GPU. Before a run, a worker takes an
    exclusive lock (flock, released by the kernel if the worker dies) on a file per device under
    DATA_DIR/runs/.devices, keyed by the device's UUID, so two workers never train on one GPU;
    the run's children get CUDA_VISIBLE_DEVICES for exactly the devices locked."""

    def __init__(self, folder: Path, keys: list[str]):
        self.folder = folder
        self.keys = keys
        self.held: dict[int, int] = {}  # device index -> open file descriptor

    def free(self) -> list[int]:
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        out = []
        for i, key in enumerate(self.keys):
            if i in self.held:
                out.append(i)
                continue
            fd = os.open(self.folder / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            self.held[i] = fd
            out.append(i)
        return out

    def keep(self, indices: list[int]) -> None:
        """Hold these devices, release the others."""
        for i in list(self.held):
            if i not in indices:
                os.close(self.held.pop(i))

    def release(self) -> None:
        self.keep([])
