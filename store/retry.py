"""Retrying HTTP calls to OpenAI-compatible servers: which statuses to retry, how long to wait.

Shared by the explainer / judge client (app.autointerp.backends) and the embeddings client
(trainer.interpret.embedder)."""

from __future__ import annotations

import email.utils
import random
import time

RETRYABLE_STATUS = {408, 425, 429}  # plus every 5xx


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


def backoff_delay(retry: int, base_s: float, max_s: float, retry_after: float | None = None) -> float:
    """Full jitter: uniform in [0, min(max, base * 2^retry)]; the server's Retry-After wins when given."""
    if retry_after is not None:
        return min(retry_after, max(max_s, 60.0))  # honour it, but never sleep for hours
    return random.uniform(0.0, min(max_s, base_s * 2 ** retry))
