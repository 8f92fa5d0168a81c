"""README guarantees that had no test of their own, each run at BEMSOFT_CONCURRENCY 1 and at
the production default 4: dry run on an existing installation, pinned Idempotency-Keys, no
transaction or lock held during a POST, the legacy tables never written, the growing pause
capped at BEMSOFT_MAX_BACKOFF, and _MonitorItems pruning / the look-back window at their
exact boundaries."""
from __future__ import annotations

import collections
import logging
import re
import threading

import pytest
import sqlalchemy as sa

from bemsoft_monitor.payload import idempotency_key
from bemsoft_monitor.schema import legacy_metadata
from test_api_behaviour import fast_clocks

# Reference keys, computed once by hand (sha256 of the sorted ids joined by ","), never by
# the function under test: a constant or reordered key must fail here.
KEY_1001_ITEMS_1_2_3 = "sol-1001-8a6ae1512200"
KEY_1_ITEMS_1_2 = "sol-1-17f8af97ad4a"
KEY_2_ITEM_3 = "sol-2-4e07408562be"

LEGACY_TABLES = sorted(legacy_metadata.tables)


@pytest.fixture(params=[1, 4], ids=["conc1", "conc4"])
def concurrency(request):
    return request.param


def posts(api):
    return [r for r in api.requests if isinstance(r.get("body"), dict) and "batch" in r["body"]]


def stored(api):
    return collections.Counter(api.stored_tests())


def table_rows(engine, name):
    """Every row of `name`, read with its columns alone: reflecting the whole table would ask
    for its foreign keys too, which not every T-SQL engine answers."""
    table = sa.table(name, *[sa.column(c["name"]) for c in sa.inspect(engine).get_columns(name)])
    with engine.connect() as conn:
        return sorted(tuple(map(repr, row)) for row in conn.execute(sa.select(table)))


def monitor_state(engine):
    return {name: table_rows(engine, name) for name in ("_MonitorState", "_MonitorItems")}


# ------------------------------------------------------------------ Idempotency-Key values

def test_idempotency_key_reference_values():
    assert idempotency_key("1001", [1, 2, 3]) == KEY_1001_ITEMS_1_2_3
    assert idempotency_key("1001", [3, 1, 2]) == KEY_1001_ITEMS_1_2_3   # order does not matter
    assert idempotency_key("1", [1, 2]) == KEY_1_ITEMS_1_2
    assert idempotency_key("2", [3]) == KEY_2_ITEM_3
    assert idempotency_key("1001", [1, 2]) != KEY_1001_ITEMS_1_2_3


def test_pipeline_sends_the_reference_keys(harness, concurrency):
    harness.order(1, ["GLI", "HEMO"])
    harness.order(2, ["TSH"])
    harness.monitor(BEMSOFT_CONCURRENCY=concurrency).run("drain")
    assert sorted(r["key"] for r in posts(harness.api)) == [KEY_1_ITEMS_1_2, KEY_2_ITEM_3]


# ------------------------------------------------------------------ dry run on an installation

def test_dry_run_on_an_existing_installation_writes_nothing_and_skips_nothing(
        harness, tmp_path, concurrency):
    first = harness.order(1, ["GLI", "HEMO"])
    harness.monitor(BEMSOFT_CONCURRENCY=concurrency).run("drain")
    assert harness.checkpoint() == max(first)
    before = monitor_state(harness.engine)
    later = harness.order(2, ["TSH"])
    more = harness.order(3, ["GLI"])
    bad = harness.order(4, ["GLI"], patient={"sexo": None})     # would be a failure file
    legacy_before = {t: table_rows(harness.engine, t) for t in LEGACY_TABLES}

    dry = harness.monitor(BEMSOFT_DRY_RUN=1, BEMSOFT_CONCURRENCY=concurrency)
    dry.run("drain")
    assert sorted(key for key, _ in dry.printed) == [KEY_2_ITEM_3, idempotency_key("3", more)]
    assert len(posts(harness.api)) == 1                            # the real run's POST only
    assert monitor_state(harness.engine) == before                 # checkpoint and records
    assert harness.checkpoint() == max(first)
    assert not list((tmp_path / "failed").glob("*"))
    assert {t: table_rows(harness.engine, t) for t in LEGACY_TABLES} == legacy_before

    harness.monitor(BEMSOFT_CONCURRENCY=concurrency).run("drain")
    assert stored(harness.api) == {f"item-{i}": 1 for i in first + later + more}
    assert sorted(r["key"] for r in posts(harness.api)[1:]) == sorted(
        [KEY_2_ITEM_3, idempotency_key("3", more)])             # the keys the dry run printed
    assert len(list((tmp_path / "failed").glob("*.json"))) == 1
    assert harness.checkpoint() == max(bad)


def test_dry_run_on_state_left_by_an_older_monitor_without_a_floor_writes_nothing(harness):
    ids = harness.order(1, ["GLI", "HEMO"])
    monitor = harness.monitor()
    monitor.run("drain")
    with harness.engine.begin() as conn:           # older versions kept no look-back floor
        conn.execute(sa.text('DELETE FROM "_MonitorState" WHERE "Name" = :n'),
                     {"n": monitor.source.floor_name})
    before = monitor_state(harness.engine)
    harness.order(2, ["TSH"])
    dry = harness.monitor(BEMSOFT_DRY_RUN=1)
    dry.run("drain")
    assert [key for key, _ in dry.printed] == [KEY_2_ITEM_3]
    assert monitor_state(harness.engine) == before
    assert harness.checkpoint() == max(ids)


# ------------------------------------------------------------------ nothing held during a POST

@pytest.mark.postgres
def test_no_transaction_or_lock_is_held_while_a_post_is_in_flight(pg_url, api, settings_factory,
                                                                  concurrency):
    from conftest import Harness
    h = Harness(pg_url, api, settings_factory)
    other = sa.create_engine(pg_url)
    try:
        ids = h.order(1, ["GLI"]) + h.order(2, ["TSH"]) + h.order(3, ["HEMO"])
        monitor = h.monitor(BEMSOFT_CONCURRENCY=concurrency, BEMSOFT_TIMEOUT=60)
        monitor.start()
        held = api.hold_posts()
        errors = []

        def step():
            try:
                monitor.step()
            except Exception as err:  # reported by the main thread
                errors.append(err)

        stepper = threading.Thread(target=step)
        stepper.start()
        try:
            assert held.wait(30), "the monitor never POSTed"
            tables = ", ".join(f'"{t}"' for t in ["_MonitorItems", "_MonitorState", *LEGACY_TABLES])
            with other.connect() as conn:
                idle_in_tx = conn.execute(sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'")).scalar()
                conn.rollback()
                with conn.begin():
                    conn.execute(sa.text(f"LOCK TABLE {tables} IN ACCESS EXCLUSIVE MODE NOWAIT"))
            assert idle_in_tx == 0
            assert posts(api) == []                    # still inside the (first) POST
        finally:
            api.release_posts()
            stepper.join(60)
        assert not stepper.is_alive() and errors == []
        assert stored(api) == {f"item-{i}": 1 for i in ids}
        assert h.checkpoint() == max(ids)
    finally:
        api.release_posts()
        other.dispose()
        h.close()


# ------------------------------------------------------------------ legacy tables never written

LEGACY_AUDIT = """
CREATE TABLE IF NOT EXISTS legacy_writes (tbl text, op text);
CREATE OR REPLACE FUNCTION note_legacy_write() RETURNS trigger AS $$
BEGIN INSERT INTO legacy_writes VALUES (TG_TABLE_NAME, TG_OP); RETURN NULL; END $$
LANGUAGE plpgsql;
"""


@pytest.mark.postgres
def test_the_monitor_never_writes_the_legacy_tables(pg_url, api, settings_factory, tmp_path,
                                                    concurrency):
    """Even a write that changes nothing (UPDATE to the same value) fires the trigger."""
    from conftest import Harness
    h = Harness(pg_url, api, settings_factory)
    try:
        ok = h.order(1, ["GLI", "XYZ999"])                   # one item refused
        retried = h.order(2, ["TSH"])
        bad = h.order(3, ["GLI"], patient={"sexo": None})    # failure file
        with h.engine.begin() as conn:
            conn.execute(sa.text(LEGACY_AUDIT))
            for table in LEGACY_TABLES:
                conn.execute(sa.text(
                    f'CREATE TRIGGER audit_{table.lower()} AFTER INSERT OR UPDATE OR DELETE OR '
                    f'TRUNCATE ON "{table}" FOR EACH STATEMENT EXECUTE FUNCTION note_legacy_write()'))
        before = {t: table_rows(h.engine, t) for t in LEGACY_TABLES}
        api.fail_next(1, status=503)
        monitor = h.monitor(BEMSOFT_CONCURRENCY=concurrency, BEMSOFT_RETRIES=1)
        monitor.run("drain")
        h.monitor(BEMSOFT_CONCURRENCY=concurrency).run("drain")   # a restart reads it all again
        assert stored(api) == {f"item-{i}": 1 for i in [ok[0], *retried]}
        assert len(list((tmp_path / "failed").glob("*.json"))) == 2
        assert h.checkpoint() == max(bad)
        with h.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT tbl, op FROM legacy_writes")).all() == []
            conn.execute(sa.text(f'UPDATE "{LEGACY_TABLES[0]}" SET {first_column(h.engine)} = '
                                 f'{first_column(h.engine)} WHERE false'))
            assert len(conn.execute(sa.text("SELECT * FROM legacy_writes")).all()) == 1  # armed
            conn.rollback()
        assert {t: table_rows(h.engine, t) for t in LEGACY_TABLES} == before
    finally:
        h.close()


def first_column(engine):
    return '"{}"'.format(sa.inspect(engine).get_columns(LEGACY_TABLES[0])[0]["name"])


# ------------------------------------------------------------------ growing pause, capped

def test_the_pause_after_failed_cycles_doubles_up_to_max_backoff(harness, caplog, concurrency):
    harness.order(1, ["GLI"])
    harness.order(2, ["TSH"])
    monitor = fast_clocks(harness, harness.monitor(
        BEMSOFT_CONCURRENCY=concurrency, BEMSOFT_RETRIES=0, BEMSOFT_BACKOFF=1,
        BEMSOFT_MAX_BACKOFF=5, BEMSOFT_MAX_ATTEMPTS=100))
    harness.api.fail_next(1000, status=503)
    with caplog.at_level(logging.WARNING, logger="bemsoft_monitor.monitor"):
        for _ in range(6):
            assert monitor.step().transient >= 1
            assert monitor.gate.remaining() <= 5
            monitor.skip_pause()
    delays = [int(m) for m in re.findall(r"envio pausado por (\d+) s", caplog.text)]
    assert delays == [1, 2, 4, 5, 5, 5]
    harness.api.clear_faults()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bemsoft_monitor.monitor"):
        monitor.step()
        assert sorted(stored(harness.api)) == sorted(f"item-{i}" for i in (1, 2))
        harness.api.fail_next(1000, status=503)
        harness.order(3, ["HEMO"])
        monitor.step()                                # after a success the ladder starts over
    assert re.findall(r"envio pausado por (\d+) s", caplog.text) == ["1"]


# ------------------------------------------------------------------ pruning and look-back edges

def item(item_id, code="GLI"):
    return {"CodItemSol": item_id, "CodConvExames": code, "DescExames": code, "Origem": "A"}


def test_pruning_floor_and_look_back_at_the_lookback_items_boundary(harness, concurrency):
    """LOOKBACK_ITEMS=5, checkpoint 30: records <= 30 - 2*5 = 20 are pruned (21 kept), the
    floor is 20, and the window re-reads ids > 30 - 5 = 25: a late item 26 is sent, 25 and
    24 are beyond the look-back."""
    lookback = 5
    delivered = [i for i in range(1, 31) if i not in (24, 25, 26)]
    for i in delivered:
        harness.order(i, [item(i)])
    monitor = harness.monitor(BEMSOFT_CONCURRENCY=concurrency, LOOKBACK_ITEMS=lookback)
    monitor.run("drain")
    assert harness.checkpoint() == 30
    assert harness.checkpoint(monitor.source.floor_name) == 30 - 2 * lookback
    with harness.engine.connect() as conn:
        recorded = sorted(conn.execute(sa.text('SELECT "CodItemSol" FROM "_MonitorItems"')).scalars())
    assert recorded == [i for i in delivered if i > 30 - 2 * lookback]

    for i in (24, 25, 26):                              # late commits at edge-1, edge, edge+1
        harness.order(i, [item(i, "TSH")])
    monitor.step()
    assert stored(harness.api) == {f"item-{i}": 1 for i in delivered + [26]}
    assert harness.checkpoint() == 30
