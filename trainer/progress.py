"""Progress reports for whoever supervises this process (the trainer worker), through a file.

When SAE_ATLAS_PROGRESS_FILE is set, `report` rewrites that JSON file atomically at most once a
second: {phase, done, total, unit, item}; item is "i/n" while the i-th of n SAEs is analysed. A file, not the database, so the training code stays free of
the store and works the same under torchrun (only rank 0 reports).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

ENV = "SAE_ATLAS_PROGRESS_FILE"
_last = 0.0


def report(phase: str, done: int, total: int, unit: str = "step", force: bool = False) -> None:
    global _last
    target = os.environ.get(ENV)
    if not target:
        return
    now = time.monotonic()
    if not force and now - _last < 1.0 and done < total:
        return
    _last = now
    path = Path(target)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"phase": phase, "done": int(done), "total": int(total), "unit": unit,
                               "item": os.environ.get("SAE_ATLAS_PROGRESS_ITEM"), "time": time.time()}))
    os.replace(tmp, path)


def read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def die_with_parent(parent_pid: int | None = None) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (the worker was killed), so that
    no orphaned trainer keeps writing into a run another worker is about to resume. parent_pid:
    the parent expected; if it is already gone, exit now."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        return
    if parent_pid is not None and os.getppid() != parent_pid:  # it died before prctl took effect
        os._exit(137)
