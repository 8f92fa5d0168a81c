"""The status board: what the running monitor is doing, kept in memory for the operator
console (`/`) — the state and since when, the last outcomes, deliveries and failures per
minute, API latencies, the checkpoint.

The loop feeds it through a handful of calls (`settled`, `progress`, `cycle_done`,
`api_paused`, `db_down`, `standby`, `token_refused`/`token_accepted`, `disk_error`); the
console reads a `Snapshot`, the alerts (bemsoft_monitor.alerts) read `Conditions`. Everything is bounded
(last 50 outcomes, one hour of minutes, the last latencies) and thread-safe: sender
threads, the loop and the HTTP thread may call it at once. It never holds patient data:
an outcome is a solicitation code, an item count, an HTTP status, a duration and a key.
"""
from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import threading
import time
from dataclasses import dataclass
from typing import Callable
from zoneinfo import ZoneInfo

from .client import Verdict
from .reasons import categorize
from .schema import ItemStatus

# states
STARTING = "starting"
SENDING = "sending"
UP_TO_DATE = "up_to_date"
API_DOWN = "api_down"
DB_DOWN = "db_down"
STANDBY = "standby"
TOKEN_REFUSED = "token_refused"
DRY_RUN = "dry_run"

# outcomes of one solicitation (or part of one)
DELIVERED = "delivered"   # 2xx
DUPLICATE = "duplicate"   # 409: the API already had it
FAILED = "failed"         # written to FAILED_DIR
RETRY = "retry"           # transient: stays pending, sent again with the same key
REFUSED = "refused"       # the API refused the token: stays pending, every sender paused
SIMULATED = "simulated"   # DRY_RUN: nothing was sent

MAX_OUTCOMES = 50
MAX_FILED = 1000          # filed failures kept for the alerts' digest


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


@dataclass(frozen=True)
class FiledFailure:
    seq: int                  # 1, 2, 3... in the order they were filed
    at: float
    category: str             # reasons.Category.key: never the reason's own text
    cod: str
    items: int


@dataclass
class DayCounts:
    delivered: int = 0        # solicitations (or parts) delivered
    delivered_items: int = 0
    failed: int = 0           # written to FAILED_DIR
    failed_items: int = 0


@dataclass(frozen=True)
class Conditions:
    """What the alerts watch: since when each condition holds (None: it does not)."""
    now: float
    started: float
    state: str
    token: tuple[float, int | None] | None     # since, HTTP status
    api_failing_since: float | None            # transient failures with no success since
    db_failing: tuple[float, str] | None       # since, what fails
    standby_since: float | None
    waiting_since: float | None                # items waiting, continuously, since
    last_progress: float | None                # last delivery or filed failure
    disk_error: tuple[float, str] | None       # since, what cannot be written and why
    last_cycle: float | None                   # last cycle that completed (the loop turns)
    backlog: int | None


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
        self._started = self._since
        self._token: tuple[float, int | None] | None = None
        self._api_failing: float | None = None
        self._db_failing: tuple[float, str] | None = None
        self._standby_since: float | None = None
        self._waiting_since: float | None = None
        self._last_progress: float | None = None
        self._disk_errors: dict[str, tuple[float, str]] = {}   # where -> (since, problem)
        self._last_cycle: float | None = None
        self._filed: collections.deque[FiledFailure] = collections.deque(maxlen=MAX_FILED)
        self._filed_count = 0
        self._days: dict[dt.date, DayCounts] = {}

    # ------------------------------------------------------------------ fed by the loop
    def settled(self, cod: str, items: int, key: str, outcome: str | None, delivery=None,
                reason: str | None = None) -> None:
        """One job is settled. `outcome`: the recorded outcome ("delivered"/"failed") or None
        (still pending); `delivery`: the client's Delivery when a POST was made; `reason`:
        why it failed (kept only as its category)."""
        kind = _outcome_kind(outcome, delivery, self.dry_run)
        if kind is None:
            return  # never sent (halted before its turn): nothing happened to report
        status = getattr(delivery, "status", None)
        duration = getattr(delivery, "duration", None)
        with self._lock:
            now = self.clock()
            self._outcomes.appendleft(OutcomeEntry(now, str(cod), items, status, duration, kind, key))
            column = {DELIVERED: 0, DUPLICATE: 0, SIMULATED: 0, FAILED: 1, RETRY: 2, REFUSED: 2}[kind]
            self._count_minute(now, column)
            if column < 2:
                self._roll_day(now)
                self._today[column] += 1
                self._last_progress = now
                self._count_day(now, column, items)
            if column == 0:
                self._last_delivery = now
            if duration is not None and status is not None:
                self._latencies.append(duration)
            if kind == RETRY:
                if self._api_failing is None:
                    self._api_failing = now
            elif status is not None and kind != REFUSED:
                self._api_failing = None  # the API answered
            if kind == FAILED:
                self._filed_count += 1
                self._filed.append(FiledFailure(self._filed_count, now, categorize(reason or "").key,
                                                str(cod), items))

    def progress(self, checkpoint: int | None, backlog: int | None, more: bool = False) -> None:
        with self._lock:
            self._checkpoint, self._backlog, self._backlog_more = checkpoint, backlog, more
            if not backlog:
                self._waiting_since = None
            elif self._waiting_since is None:
                self._waiting_since = self.clock()

    def cycle_done(self, busy: bool, paused_for: float = 0.0) -> None:
        """A cycle ended (the database answered, the lock is ours): the state follows from
        the token, whether work is waiting and the API pause."""
        with self._lock:
            self._last_cycle = self.clock()
            self._db_failing = self._standby_since = None
            token = self._token
        if token is not None:
            self._set(TOKEN_REFUSED, self.clock() + paused_for if paused_for > 0 else None)
        elif paused_for > 0:
            self.api_paused(paused_for)
        else:
            self._set(DRY_RUN if self.dry_run else SENDING if busy else UP_TO_DATE)

    def api_paused(self, seconds: float) -> None:
        with self._lock:
            token = self._token is not None
            if not token and self._api_failing is None:
                self._api_failing = self.clock()
        self._set(TOKEN_REFUSED if token else API_DOWN, self.clock() + seconds)

    def db_down(self, detail: str = "banco de dados indisponível") -> None:
        """The database does not answer (or its reads keep timing out)."""
        with self._lock:
            if self._db_failing is None:
                self._db_failing = (self.clock(), detail)
        self._set(DB_DOWN)

    def standby(self) -> None:
        with self._lock:
            if self._standby_since is None:
                self._standby_since = self.clock()
        self._set(STANDBY)

    def token_refused(self, status: int | None) -> None:
        with self._lock:
            if self._token is None:
                self._token = (self.clock(), status)
            self._api_failing = None  # the API answers: it is the token, not an outage
        self._set(TOKEN_REFUSED)

    def token_accepted(self) -> None:
        with self._lock:
            self._token = None

    def disk_error(self, where: str, problem: str | None) -> None:
        """`where` (FAILED_DIR, LOG_FILE) cannot be written, and why; None: it can again."""
        with self._lock:
            if problem is None:
                self._disk_errors.pop(where, None)
            elif where not in self._disk_errors:
                self._disk_errors[where] = (self.clock(), f"{where}: {problem}")

    # ------------------------------------------------------------------ read by the alerts
    def conditions(self) -> Conditions:
        with self._lock:
            return Conditions(
                now=self.clock(), started=self._started, state=self._state, token=self._token,
                api_failing_since=self._api_failing, db_failing=self._db_failing,
                standby_since=self._standby_since, waiting_since=self._waiting_since,
                last_progress=self._last_progress,
                disk_error=min(self._disk_errors.values(), default=None),
                last_cycle=self._last_cycle, backlog=self._backlog)

    def filed_after(self, seq: int) -> list[FiledFailure]:
        """Failures written to FAILED_DIR after the one numbered `seq` (oldest first)."""
        with self._lock:
            return [f for f in self._filed if f.seq > seq]

    def day(self, day: dt.date) -> DayCounts:
        with self._lock:
            return dataclasses.replace(self._days.get(day) or DayCounts())

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
                paused_until=self._paused_until if self._state in (API_DOWN, TOKEN_REFUSED) else None,
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

    def _count_day(self, now: float, column: int, items: int) -> None:
        day = dt.datetime.fromtimestamp(now, self.tz).date()
        counts = self._days.get(day)
        if counts is None:
            for old in sorted(self._days)[:-2]:  # today, yesterday and the day before
                del self._days[old]
            counts = self._days[day] = DayCounts()
        if column == 0:
            counts.delivered += 1
            counts.delivered_items += items
        else:
            counts.failed += 1
            counts.failed_items += items

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
    if delivery.outcome == Verdict.TOKEN_REFUSED:
        return REFUSED
    if outcome == ItemStatus.DELIVERED:
        return DUPLICATE if delivery.outcome == Verdict.DUPLICATE else DELIVERED
    return RETRY
