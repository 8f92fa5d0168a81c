"""The status board: what the running monitor is doing, kept in memory for the operator
console (`/`) — the state and since when, the last outcomes, deliveries and failures per
minute, API latencies, the checkpoint.

The loop feeds it through a handful of calls (`settled`, `progress`, `cycle_done`,
`api_paused`, `db_down`, `standby`); the console reads a `Snapshot`. Everything is bounded
(last 50 outcomes, one hour of minutes, the last latencies) and thread-safe: sender
threads, the loop and the HTTP thread may call it at once. It never holds patient data:
an outcome is a solicitation code, an item count, an HTTP status, a duration and a key.
"""
from __future__ import annotations

import collections
import datetime as dt
import threading
import time
from dataclasses import dataclass
from typing import Callable
from zoneinfo import ZoneInfo

from .client import Verdict
from .schema import ItemStatus

# states
STARTING = "starting"
SENDING = "sending"
UP_TO_DATE = "up_to_date"
API_DOWN = "api_down"
DB_DOWN = "db_down"
STANDBY = "standby"
DRY_RUN = "dry_run"

# outcomes of one solicitation (or part of one)
DELIVERED = "delivered"   # 2xx
DUPLICATE = "duplicate"   # 409: the API already had it
FAILED = "failed"         # written to FAILED_DIR
RETRY = "retry"           # transient: stays pending, sent again with the same key
SIMULATED = "simulated"   # DRY_RUN: nothing was sent

MAX_OUTCOMES = 50


def count_items(n: int) -> str:
    return "1 item" if n == 1 else f"{n} itens"

MINUTES = 60
MAX_LATENCIES = 1000


@dataclass(frozen=True)
class OutcomeEntry:
    at: float                 # time.time()
    cod: str
    items: int
    http_status: int | None
    duration: float | None    # seconds, None when nothing was POSTed
    outcome: str
    key: str


@dataclass(frozen=True)
class Minute:
    start: float              # time.time() of the minute's first second
    delivered: int = 0
    failed: int = 0
    retried: int = 0


@dataclass(frozen=True)
class Snapshot:
    now: float
    state: str
    since: float
    paused_until: float | None
    checkpoint: int | None
    backlog: int | None       # items beyond the checkpoint still without an outcome
    backlog_more: bool        # reading in pages: there may be more beyond those
    last_delivery: float | None
    outcomes: tuple[OutcomeEntry, ...]   # newest first
    minutes: tuple[Minute, ...]          # the last hour, oldest first
    delivered_hour: int
    failed_hour: int
    delivered_today: int
    failed_today: int
    latency_median: float | None
    latency_p95: float | None


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of `values` (0 < fraction <= 1); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * fraction // 1))  # ceil
    return ordered[int(rank) - 1]


class StatusBoard:
    def __init__(self, *, clock: Callable[[], float] = time.time, tz: ZoneInfo | None = None,
                 dry_run: bool = False):
        self.clock = clock
        self.tz = tz or ZoneInfo("UTC")
        self.dry_run = dry_run
        self._lock = threading.Lock()
        self._state = STARTING
        self._since = clock()
        self._paused_until: float | None = None
        self._checkpoint: int | None = None
        self._backlog: int | None = None
        self._backlog_more = False
        self._last_delivery: float | None = None
        self._outcomes: collections.deque[OutcomeEntry] = collections.deque(maxlen=MAX_OUTCOMES)
        self._minutes: dict[int, list[int]] = {}    # minute number -> [delivered, failed, retried]
        self._day: dt.date | None = None
        self._today = [0, 0]                         # delivered, failed
        self._latencies: collections.deque[float] = collections.deque(maxlen=MAX_LATENCIES)

    # ------------------------------------------------------------------ fed by the loop
    def settled(self, cod: str, items: int, key: str, outcome: str | None, delivery=None) -> None:
        """One job is settled. `outcome`: the recorded outcome ("delivered"/"failed") or None
        (still pending); `delivery`: the client's Delivery when a POST was made."""
        kind = _outcome_kind(outcome, delivery, self.dry_run)
        if kind is None:
            return  # never sent (halted before its turn): nothing happened to report
        status = getattr(delivery, "status", None)
        duration = getattr(delivery, "duration", None)
        with self._lock:
            now = self.clock()
            self._outcomes.appendleft(OutcomeEntry(now, str(cod), items, status, duration, kind, key))
            column = {DELIVERED: 0, DUPLICATE: 0, SIMULATED: 0, FAILED: 1, RETRY: 2}[kind]
            self._count_minute(now, column)
            if column < 2:
                self._roll_day(now)
                self._today[column] += 1
            if column == 0:
                self._last_delivery = now
            if duration is not None and status is not None:
                self._latencies.append(duration)

    def progress(self, checkpoint: int | None, backlog: int | None, more: bool = False) -> None:
        with self._lock:
            self._checkpoint, self._backlog, self._backlog_more = checkpoint, backlog, more

    def cycle_done(self, busy: bool, paused_for: float = 0.0) -> None:
        """A cycle ended: the state follows from whether work is waiting and the API pause."""
        if paused_for > 0:
            self.api_paused(paused_for)
        else:
            self._set(DRY_RUN if self.dry_run else SENDING if busy else UP_TO_DATE)

    def api_paused(self, seconds: float) -> None:
        self._set(API_DOWN, self.clock() + seconds)

    def db_down(self) -> None:
        self._set(DB_DOWN)

    def standby(self) -> None:
        self._set(STANDBY)

    # ------------------------------------------------------------------ read by the console
    def snapshot(self) -> Snapshot:
        with self._lock:
            now = self.clock()
            self._roll_day(now)
            current = int(now // 60)
            minutes = tuple(Minute(m * 60.0, *self._minutes.get(m, (0, 0, 0)))
                            for m in range(current - MINUTES + 1, current + 1))
            latencies = list(self._latencies)
            return Snapshot(
                now=now, state=self._state, since=self._since,
                paused_until=self._paused_until if self._state == API_DOWN else None,
                checkpoint=self._checkpoint, backlog=self._backlog,
                backlog_more=self._backlog_more, last_delivery=self._last_delivery,
                outcomes=tuple(self._outcomes), minutes=minutes,
                delivered_hour=sum(m.delivered for m in minutes),
                failed_hour=sum(m.failed for m in minutes),
                delivered_today=self._today[0], failed_today=self._today[1],
                latency_median=percentile(latencies, 0.5),
                latency_p95=percentile(latencies, 0.95))

    # ------------------------------------------------------------------ internals
    def _set(self, state: str, until: float | None = None) -> None:
        with self._lock:
            if state != self._state:
                self._state, self._since = state, self.clock()
            self._paused_until = until

    def _count_minute(self, now: float, column: int) -> None:
        minute = int(now // 60)
        counts = self._minutes.get(minute)
        if counts is None:
            for old in [m for m in self._minutes if m <= minute - MINUTES]:
                del self._minutes[old]
            counts = self._minutes[minute] = [0, 0, 0]
        counts[column] += 1

    def _roll_day(self, now: float) -> None:
        day = dt.datetime.fromtimestamp(now, self.tz).date()
        if day != self._day:
            self._day, self._today = day, [0, 0]


def _outcome_kind(outcome: str | None, delivery, dry_run: bool) -> str | None:
    """The board's kind of a settled job: `outcome` is the item's stored status
    (schema.ItemStatus), `delivery.outcome` the API's answer (client.Verdict)."""
    if outcome == ItemStatus.FAILED:
        return FAILED
    if outcome == ItemStatus.DELIVERED and delivery is None:
        return SIMULATED if dry_run else None  # recovered after a crash: reported then
    if delivery is None:
        return None
    if outcome == ItemStatus.DELIVERED:
        return DUPLICATE if delivery.outcome == Verdict.DUPLICATE else DELIVERED
    return RETRY
