"""Concurrent delivery: several solicitations in flight, pages read while earlier ones are
still being sent, and a checkpoint that only moves over items with a recorded outcome."""
from __future__ import annotations

import collections
import threading
from concurrent import futures

from bemsoft_monitor.payload import idempotency_key
from conftest import wait_until


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
        overlapped |= monitor.sender.pages > 0 and result.more
        checkpoint = harness.checkpoint()
        if checkpoint is not None:
            # nothing at or below the checkpoint is still in flight or unsent
            assert all(i > checkpoint for i in monitor.ledger.inflight)
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
    monitor = harness.monitor(BEMSOFT_CONCURRENCY=6, BEMSOFT_TIMEOUT=120)  # no retry while held
    harness.api.hold_posts()             # every POST waits at the fake until released
    drain = threading.Thread(target=monitor.run, args=("drain",))
    drain.start()
    try:
        # six POSTs held at once: they were sent in parallel (one after the other, the
        # second would never arrive while the first is held)
        assert wait_until(lambda: harness.api.posts_held == 6), harness.api.posts_held
    finally:
        harness.api.release_posts()
        drain.join(60)
    assert not drain.is_alive()
    posts = [r for r in harness.api.requests if r.get("body") and "batch" in r["body"]]
    assert sorted(r["key"] for r in posts) == sorted(idempotency_key(str(c), i) for c, i in ids.items())


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
    original = monitor.step

    def step_then_stop_at_the_third():
        # SIGTERM after the third step, exactly: at most 3 pages of 5 were dispatched
        nonlocal steps
        steps += 1
        result = original()
        if steps == 3:
            shutdown.set()
        return result

    monitor.step = step_then_stop_at_the_third
    monitor.run("drain")
    assert steps == 3
    assert not monitor.sender.inflight and not monitor.ledger.unrecorded
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
    futures.wait([f for batch in monitor.sender.inflight for f in batch.futures])  # both sends fail
    for _ in range(50):
        result = monitor.step()
        while monitor.gate.remaining() > 0:
            threading.Event().wait(0.05)
        if not result.more and not result.ready and not result.held and not monitor.ledger.waiting:
            break
    assert stored_ids(harness.api) == {i: 1 for i in one + two}
    keys = [(r["key"], [t["externalId"] for t in r["body"]["batch"]["order"]["tests"]])
            for r in harness.api.requests if r.get("body") and "batch" in r["body"]]
    for key, tests in keys:
        if key == idempotency_key("2", two):
            assert tests == [f"item-{i}" for i in two]       # always the whole group
    assert harness.checkpoint() == max(two)
