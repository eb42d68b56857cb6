"""Shared plumbing for the benchmark's trainer subprocesses (ours and the peers').

Standard library + numpy only, so it imports in the project venv and in the peers venv alike.
Every trainer reads the SAME float32 [N, D] activation file through a read-only memmap and the
SAME batch order (`order.npy`, [steps, batch_size] row indices written by train_vs_peers.py), so
the data each trainer sees, and the cost of fetching it, are identical.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np


def load_job(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python run_<trainer>.py JOB.json")
    return json.loads(Path(argv[0]).read_text())


class Batches:
    """The benchmark's batches, read from the memmapped matrix, with the fetch time counted."""

    def __init__(self, job: dict):
        self.array = np.load(job["activations"], mmap_mode="r", allow_pickle=False)
        self.order = np.load(job["order"], allow_pickle=False)
        self.fetch_s = 0.0
        self.fetched = 0

    def __len__(self) -> int:
        return len(self.order)

    def rows(self, idx: np.ndarray) -> np.ndarray:
        t = time.perf_counter()
        out = np.asarray(self.array[idx])  # the same fancy-indexing copy ArrayActivations does
        self.fetch_s += time.perf_counter() - t
        self.fetched += 1
        return out

    def batch(self, step: int) -> np.ndarray:
        return self.rows(self.order[step])


def save_check(job: dict, reconstruct) -> None:
    """Save the trainer's OWN reconstruction of a few held-out rows, so the benchmark can check
    that loading its saved weights into our evaluation reproduces exactly what the trainer computes."""
    if not job.get("check_rows"):
        return
    rows = np.load(job["check_rows"], allow_pickle=False)
    array = np.load(job["activations"], mmap_mode="r", allow_pickle=False)
    np.save(job["check_out"], np.asarray(reconstruct(np.asarray(array[rows])), dtype=np.float32))


def memory_report() -> dict:
    """Peak RSS (ru_maxrss) and the current anonymous / file-backed split of this process."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM"):
                out[key.lower() + "_mb"] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return out


def write_result(job: dict, result: dict) -> None:
    result = {**result, **memory_report()}
    Path(job["result"]).write_text(json.dumps(result, indent=1))
