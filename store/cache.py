"""A bounded cache of rendered feature responses."""

from __future__ import annotations

import threading
from collections import OrderedDict


class RenderCache:
    """A bounded (by bytes) LRU of rendered responses keyed by (kind, SAE, index, ETag).

    Keys carry the ETag, which changes with the SAE's version and the feature's explanations (and
    job, for pages), so entries never go stale; they only age out."""

    def __init__(self, max_bytes: int = 48 << 20, max_entry: int = 2 << 20):
        self.max_bytes, self.max_entry = max_bytes, max_entry
        self._data: OrderedDict[tuple, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            body = self._data.get(key)
            if body is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return body

    def put(self, key: tuple, body: bytes) -> None:
        if len(body) > self.max_entry or self.max_bytes <= 0:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._data[key] = body
            self._bytes += len(body)
            while self._bytes > self.max_bytes and self._data:
                _, dropped = self._data.popitem(last=False)
                self._bytes -= len(dropped)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._data)


RENDERED = RenderCache()
