"""What a trainer worker's heartbeat carries to the store besides the lease: the run's new metric
records (MetricsReader), the tail of its log, and JSON-safe values; RunLost when the run stopped
being the worker's."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

LOG_TAIL_LINES = 60


class RunLost(Exception):
    """The run stopped being ours: cancelled, or re-leased by another worker."""


def _finite(v):
    """NaN and inf become None: JSON (and PostgreSQL's json type) has no spelling for them."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The end of a child's log as a terminal would show it: progress bars redraw with \\r, so
    only the text after a line's last \\r is kept."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 32_768))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    shown = [line.rsplit("\r", 1)[-1].rstrip() for line in text.split("\n")]
    return "\n".join([line for line in shown if line][-lines:])


@dataclass
class MetricsReader:
    """Reads the new records of each SAE's metrics.jsonl from stored byte offsets, so every record
    reaches the store once even across workers (the offsets commit with the rows)."""

    files: dict[str, Path]  # SAE name within the run -> metrics.jsonl
    offsets: dict[str, int] = field(default_factory=dict)

    def read(self) -> tuple[dict[str, list[dict]], dict[str, int]]:
        new, offsets = {}, dict(self.offsets)
        for name, path in self.files.items():
            start = offsets.get(name, 0)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            if size < start:  # the file was started again (an attempt that died before its first checkpoint)
                start = 0
            with open(path, "rb") as fh:
                fh.seek(start)
                chunk = fh.read(size - start)
            end = chunk.rfind(b"\n") + 1  # only whole lines; a half-written one waits for the next read
            records = []
            for line in chunk[:end].splitlines():
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
            offsets[name] = start + end
            if records:
                new[name] = records
        return new, offsets
