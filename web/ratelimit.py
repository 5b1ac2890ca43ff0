"""Rate limiting of the REST API (issue 15): a token bucket per API key, or per client address
for requests made without one; 429 with ``Retry-After`` when a bucket is empty.

Buckets live in this process's memory: with ``mantle serve --workers N`` each worker keeps its
own, so a client spread over N workers may get up to N times the rate (docs/api.md).
"""

from __future__ import annotations

import collections
import math
import threading
import time

from web.auth import PROTECTED
from web.errors import ApiError

__all__ = ["TokenBuckets", "RateLimit", "RATE_LIMITED", "LONGEST_RETRY_AFTER"]

RATE_LIMITED = "rate limit exceeded"
# The longest Retry-After (seconds; 31 years): as slow a rate as the settings allow
# (``api.rate_limit: 1e-300``) would wait beyond any float, and no integer holds that.
LONGEST_RETRY_AFTER = 1e9


class TokenBuckets:
    """``rate`` tokens per second into buckets of ``burst`` tokens, one per key.

    A new key starts full. At most ``max_buckets`` are kept: the least recently used one is
    forgotten first (it would refill to full meanwhile anyway, unless it is being hammered,
    and a hammered bucket is never the least recently used). Thread-safe.
    """

    def __init__(self, rate: float, burst: float, max_buckets: int = 10000,
                 clock=time.monotonic):
        self.rate = rate
        self.burst = burst
        self._max = max_buckets
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = (
            collections.OrderedDict())

    def take(self, key: str) -> float:
        """Take one token: 0.0 when granted, else the seconds until one is available."""
        now = self._clock()
        with self._lock:
            tokens, stamp = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - stamp) * self.rate)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens, now)
            if len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
            return wait


class RateLimit:
    """Middleware after ``Authentication``: charges ``/api/v1`` and ``/hooks`` requests to the
    key's bucket (``key:<name>``) or the client address's (``addr:<ip>``)."""

    def __init__(self, buckets: TokenBuckets):
        self._buckets = buckets

    def process_request(self, req, resp) -> None:
        if not any(req.path == p or req.path.startswith(p + "/") for p in PROTECTED):
            return
        key = req.context.get("key")
        bucket = f"key:{key.name}" if key is not None else f"addr:{req.remote_addr}"
        wait = self._buckets.take(bucket)
        if wait > 0:
            seconds = max(1, math.ceil(min(wait, LONGEST_RETRY_AFTER)))
            raise ApiError(429, RATE_LIMITED, headers={"Retry-After": str(seconds)})
