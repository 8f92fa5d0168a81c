"""The status board: exact counts per minute, per day and per hour, bounded memory, latency
percentiles and state changes, all with an injected clock."""
from __future__ import annotations

import datetime as dt
import threading
from zoneinfo import ZoneInfo

from bemsoft_monitor.client import Delivery
from bemsoft_monitor.status import (API_DOWN, DB_DOWN, DELIVERED, DRY_RUN, DUPLICATE, FAILED,
                                    MAX_LATENCIES, MAX_OUTCOMES, RETRY, SENDING, SIMULATED,
                                    STANDBY, STARTING, UP_TO_DATE, StatusBoard, percentile)

SP = ZoneInfo("America/Sao_Paulo")
# 2026-11-29 10:00:00 in São Paulo (-03:00)
T0 = dt.datetime(2026, 11, 29, 10, 0, tzinfo=SP).timestamp()


class Clock:
    def __init__(self, now=T0):
        self.now = now

    def __call__(self):
        return self.now


def board(**kwargs):
    clock = Clock()
    return StatusBoard(clock=clock, tz=SP, **kwargs), clock


def ok(status=201, duration=0.1, outcome="delivered"):
    return Delivery(outcome, status, 1, "", duration=duration)


def transient(status=503, duration=0.2):
    return Delivery("transient", status, 2, "API indisponível", duration=duration)


def test_outcomes_are_counted_per_minute_hour_and_day():
    b, clock = board()
    b.settled("1", 2, "sol-1-a", DELIVERED, ok())
    b.settled("2", 1, "sol-2-b", DELIVERED, ok(status=409, outcome="duplicate"))
    clock.now += 60
    b.settled("3", 1, "sol-3-c", FAILED, ok(status=400, outcome="permanent"))
    b.settled("4", 3, "sol-4-d", None, transient())
    b.settled("5", 1, "sol-5-e", None, None)          # never sent: not an outcome
    snap = b.snapshot()
    assert [o.outcome for o in snap.outcomes] == [RETRY, FAILED, DUPLICATE, DELIVERED]
    assert snap.outcomes[0].cod == "4" and snap.outcomes[0].items == 3
    assert snap.outcomes[0].http_status == 503 and snap.outcomes[0].key == "sol-4-d"
    assert (snap.delivered_today, snap.failed_today) == (2, 1)
    assert (snap.delivered_hour, snap.failed_hour) == (2, 1)
    last, before = snap.minutes[-1], snap.minutes[-2]
    assert (before.delivered, before.failed, before.retried) == (2, 0, 0)
    assert (last.delivered, last.failed, last.retried) == (0, 1, 1)
    assert len(snap.minutes) == 60 and all(m.delivered == 0 for m in snap.minutes[:-2])
    assert snap.last_delivery == T0


def test_the_hour_slides_and_the_day_restarts_at_local_midnight():
    b, clock = board()
    b.settled("1", 1, "k1", DELIVERED, ok())
    clock.now += 59 * 60
    assert b.snapshot().delivered_hour == 1 and b.snapshot().minutes[0].delivered == 1
    clock.now += 60
    snap = b.snapshot()
    assert snap.delivered_hour == 0 and snap.delivered_today == 1
    # 23:59:30 local, then 00:00:30 local: today's totals restart (São Paulo, not UTC)
    clock.now = dt.datetime(2026, 11, 29, 23, 59, 30, tzinfo=SP).timestamp()
    b.settled("2", 1, "k2", FAILED, None)
    assert b.snapshot().failed_today == 1 and b.snapshot().delivered_today == 1
    clock.now += 60
    snap = b.snapshot()
    assert (snap.delivered_today, snap.failed_today) == (0, 0)
    assert snap.failed_hour == 1


def test_memory_is_bounded():
    b, clock = board()
    for n in range(3000):
        clock.now += 7  # a bit over 5.8 hours
        b.settled(str(n), 1, f"k{n}", DELIVERED, ok(duration=n / 1000))
    snap = b.snapshot()
    assert len(snap.outcomes) == MAX_OUTCOMES and snap.outcomes[0].cod == "2999"
    assert len(b._minutes) <= 60
    assert len(b._latencies) == MAX_LATENCIES
    assert snap.delivered_hour == sum(m.delivered for m in snap.minutes)


def test_latency_median_and_p95_over_answered_requests():
    b, _ = board()
    for ms in range(1, 101):
        b.settled(str(ms), 1, "k", DELIVERED, ok(duration=ms / 1000))
    b.settled("x", 1, "k", FAILED, None)  # failed before any POST: no latency
    snap = b.snapshot()
    assert snap.latency_median == 0.050 and snap.latency_p95 == 0.095
    assert percentile([], 0.5) is None and percentile([3.0], 0.95) == 3.0


def test_states_keep_their_since_until_they_change():
    b, clock = board()
    assert b.snapshot().state == STARTING
    clock.now += 5
    b.cycle_done(busy=True)
    assert (b.snapshot().state, b.snapshot().since) == (SENDING, T0 + 5)
    clock.now += 5
    b.cycle_done(busy=True)
    assert b.snapshot().since == T0 + 5
    b.cycle_done(busy=False)
    assert (b.snapshot().state, b.snapshot().since) == (UP_TO_DATE, T0 + 10)
    b.api_paused(30)
    snap = b.snapshot()
    assert (snap.state, snap.paused_until) == (API_DOWN, T0 + 40)
    clock.now += 10
    b.cycle_done(busy=False, paused_for=20)           # still paused: same state, same since
    snap = b.snapshot()
    assert (snap.state, snap.since, snap.paused_until) == (API_DOWN, T0 + 10, T0 + 40)
    b.db_down()
    assert b.snapshot().state == DB_DOWN and b.snapshot().paused_until is None
    b.standby()
    assert b.snapshot().state == STANDBY
    b.progress(1234, 17, more=True)
    snap = b.snapshot()
    assert (snap.checkpoint, snap.backlog, snap.backlog_more) == (1234, 17, True)


def test_dry_run_is_its_own_state_and_counts_simulated_sends():
    b, _ = board(dry_run=True)
    b.settled("1", 2, "k", DELIVERED, None)
    b.cycle_done(busy=True)
    snap = b.snapshot()
    assert snap.state == DRY_RUN and snap.outcomes[0].outcome == SIMULATED
    assert snap.delivered_today == 1 and snap.outcomes[0].http_status is None


def test_concurrent_feeding_loses_nothing():
    b, _ = board()

    def feed():
        for n in range(500):
            b.settled(str(n), 1, "k", DELIVERED, ok())
            b.snapshot()

    threads = [threading.Thread(target=feed) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert b.snapshot().delivered_today == 2000
