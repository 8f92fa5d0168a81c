"""Concurrent delivery: several solicitations in flight, pages read while earlier ones are
still being sent, and a checkpoint that only moves over items with a recorded outcome."""
from __future__ import annotations

import collections
import threading

from bemsoft_monitor.payload import idempotency_key


def stored_ids(api):
    return collections.Counter(int(t[5:]) for t in api.stored_tests())


def test_checkpoint_only_covers_recorded_items_while_pages_overlap(harness):
    ids = []
    for cod in range(1, 31):
        ids += harness.order(cod, ["GLI", "TSH"])
    harness.api.set_latency(0.01)
    monitor = harness.monitor(BEMSOFT_CONCURRENCY=4, BATCH_SIZE=6)
    overlapped = False
    for _ in range(200):
        result = monitor.step()
        overlapped |= len(monitor._inflight) > 0 and result.more
        checkpoint = harness.checkpoint()
        if checkpoint is not None:
            # nothing at or below the checkpoint is still in flight or unsent
            assert all(i > checkpoint for i in monitor._inflight_ids)
            delivered = stored_ids(harness.api)
            assert all(delivered[i] == 1 for i in ids if i <= checkpoint)
        if not result.more:
            break
    assert overlapped, "catch-up should read the next page while the previous one is sent"
    assert stored_ids(harness.api) == {i: 1 for i in ids}
    assert harness.checkpoint() == max(ids)


def test_concurrency_sends_in_parallel_and_keeps_one_key_per_solicitation(harness):
    ids = {}
    for cod in range(1, 13):
        ids[cod] = harness.order(cod, ["GLI"])
    harness.api.set_latency(0.1)
    monitor = harness.monitor(BEMSOFT_CONCURRENCY=6)
    monitor.run("drain")
    posts = [r for r in harness.api.requests if r.get("body") and "batch" in r["body"]]
    assert sorted(r["key"] for r in posts) == sorted(idempotency_key(str(c), i) for c, i in ids.items())
    # one after the other, six requests of 100 ms would arrive at least 0.5 s apart
    times = sorted(r["time"] for r in posts)
    assert times[5] - times[0] < 0.3


def test_graceful_stop_mid_catch_up_records_what_was_sent_and_loses_nothing(harness):
    ids = []
    for cod in range(1, 41):
        ids += harness.order(cod, ["GLI"])
    harness.api.set_latency(0.02)
    shutdown = threading.Event()
    monitor = harness.monitor(BEMSOFT_CONCURRENCY=4, BATCH_SIZE=5)
    monitor.shutdown = shutdown
    monitor.gate.shutdown = shutdown
    steps = 0

    def stop_soon():
        while steps < 3:
            threading.Event().wait(0.005)
        shutdown.set()

    stopper = threading.Thread(target=stop_soon)
    stopper.start()
    original = monitor.step

    def counting_step():
        nonlocal steps
        steps += 1
        return original()

    monitor.step = counting_step
    monitor.run("drain")
    stopper.join()
    assert not monitor._inflight and not monitor._unrecorded
    first = stored_ids(harness.api)
    assert 0 < len(first) < len(ids)
    assert set(first.values()) == {1}
    assert harness.checkpoint() < max(ids)

    restarted = harness.monitor(BEMSOFT_CONCURRENCY=4, BATCH_SIZE=5)
    restarted.run("drain")
    assert stored_ids(harness.api) == {i: 1 for i in ids}
    assert harness.checkpoint() == max(ids)


def test_a_pending_send_cut_by_the_page_goes_out_whole_under_its_key(harness):
    """Review finding: order 2 spans the page edge (items 3-5 with BATCH_SIZE=4); its first
    send fails; the next read from the cursor sees only item 5. It must not go alone under
    the key of 3-5 (the rest would then get 409 and count as delivered, never stored)."""
    one = harness.order(1, ["GLI", "TSH"])
    two = harness.order(2, ["GLI", "TSH", "HEMO"])
    harness.api.fail_next(2, status=503)
    monitor = harness.monitor(BEMSOFT_CONCURRENCY=4, BATCH_SIZE=4, BEMSOFT_RETRIES=0,
                              BEMSOFT_BACKOFF=0.01)
    monitor.step()                    # page 1 dispatched, still in flight (catching up)
    threading.Event().wait(0.5)       # both sends fail meanwhile
    for _ in range(50):
        result = monitor.step()
        while monitor.gate.remaining() > 0:
            threading.Event().wait(0.05)
        if not result.more and not result.ready and not result.held and not monitor._waiting:
            break
    assert stored_ids(harness.api) == {i: 1 for i in one + two}
    keys = [(r["key"], [t["externalId"] for t in r["body"]["batch"]["order"]["tests"]])
            for r in harness.api.requests if r.get("body") and "batch" in r["body"]]
    for key, tests in keys:
        if key == idempotency_key("2", two):
            assert tests == [f"item-{i}" for i in two]       # always the whole group
    assert harness.checkpoint() == max(two)
