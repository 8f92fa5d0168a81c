"""Retry policy as a value (backoff is a pure function) and the pause gate that every
sender shares, so one `429`/`503` with `Retry-After` pauses all of them."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """The one backoff ladder: delay n (1-based) = backoff * factor**(n-1), capped at
    max_backoff. A server's Retry-After replaces the computed delay (`retry_after="replace"`,
    per request) or only raises it (`"floor"`, the cycle pause). Used for the per-request
    retries, the pause after a failed cycle, the database reconnect and the catalog cadence."""
    retries: int = 3          # extra attempts after the first
    backoff: float = 1.0      # first delay
    max_backoff: float = 300.0
    factor: float = 2.0       # 1.0: a constant cadence
    retry_after: str = "replace"

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based), capped at
        max_backoff (a Retry-After too)."""
        computed = self.backoff * (self.factor ** max(0, attempt - 1))
        if retry_after is not None and retry_after >= 0:
            computed = retry_after if self.retry_after == "replace" else max(computed, retry_after)
        return min(computed, self.max_backoff)

    def delays(self) -> list[float]:
        return [self.delay(n) for n in range(1, self.retries + 1)]

    def due(self, last_attempt: float | None, now: float, attempt: int = 1) -> bool:
        """Whether the next try may run: never tried, or delay(attempt) has passed since."""
        return last_attempt is None or now - last_attempt >= self.delay(attempt)


def cycle_pause(backoff: float, max_backoff: float) -> RetryPolicy:
    """The pause of every sender after a failed cycle: at least 1 s, doubling, capped; a
    server's Retry-After raises it."""
    return RetryPolicy(backoff=max(backoff, 1.0), max_backoff=max_backoff, retry_after="floor")


DB_RECONNECT = RetryPolicy(backoff=1.0, max_backoff=10.0)   # database outage: 1, 2, 4, 8, 10 s
DB_ERROR = RetryPolicy(backoff=1.0, max_backoff=60.0)       # refused statement, unexpected error
CATALOG_UNLOADED = RetryPolicy(backoff=5.0, factor=1.0)     # never loaded: try every 5 s


def catalog_refresh(ttl: float) -> RetryPolicy:
    """A stale catalog is refreshed at most every min(ttl, 60 s)."""
    return RetryPolicy(backoff=min(ttl, 60.0), factor=1.0, max_backoff=min(ttl, 60.0))


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """`Retry-After` as seconds or an HTTP date -> seconds from now (None if absent/bad)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


class PauseGate:
    """Shared by every sender: `pause(s)` holds all of them until the time has passed."""

    def __init__(self, shutdown: threading.Event | None = None, clock=time.monotonic):
        self._until = 0.0
        self._lock = threading.Lock()
        self._clock = clock
        self.shutdown = shutdown or threading.Event()

    def pause(self, seconds: float) -> None:
        with self._lock:
            self._until = max(self._until, self._clock() + seconds)

    def remaining(self) -> float:
        return max(0.0, self._until - self._clock())

    def wait(self) -> bool:
        """Block while paused; False if shutdown was requested meanwhile."""
        while True:
            left = self.remaining()
            if self.shutdown.is_set():
                return False
            if left <= 0:
                return True
            self.shutdown.wait(min(left, 0.5))

    def sleep(self, seconds: float) -> bool:
        """Sleep in short slices; False if shutdown was requested meanwhile."""
        end = self._clock() + seconds
        while not self.shutdown.is_set():
            left = end - self._clock()
            if left <= 0:
                return True
            self.shutdown.wait(min(left, 0.5))
        return False
