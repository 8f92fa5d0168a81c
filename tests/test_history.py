"""The order history (_MonitorHistory, issue 16): written with the records it accompanies,
kept by age, none in DRY_RUN; the replay adds its rows. Real SQLite and PostgreSQL (SQL Server
with TEST_MSSQL_URL), the project's fake API on loopback."""
from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from bemsoft_monitor.db import monitor_schema_map
from bemsoft_monitor.history import History
from bemsoft_monitor.payload import idempotency_key
from bemsoft_monitor.schema import HistoryEvent as E, monitor_history


def history(engine, **where):
    """(CodItemSol, Event, IdemKey, HttpStatus, ExamCode, FileName) in order."""
    h = monitor_history
    query = sa.select(h.c.CodItemSol, h.c.Event, h.c.IdemKey, h.c.HttpStatus, h.c.ExamCode,
                      h.c.FileName).order_by(h.c.At, h.c.Id)
    for column, value in where.items():
        query = query.where(h.c[column] == value)
    engine = engine.execution_options(schema_translate_map=monitor_schema_map(engine.dialect.name))
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(query)]


def events(engine, **where):
    return [(r[0], r[1]) for r in history(engine, **where)]


def test_an_order_delivered_in_two_parts(harness):
    first = harness.order(43335, ["GLI", "HEMO"])
    monitor = harness.monitor()
    monitor.run("drain")
    later = harness.items(43335, ["TSH"])          # an exam added after the first send
    monitor.run("drain")
    rows = history(harness.engine, CodSolicitacao="43335")
    key1, key2 = idempotency_key("43335", first), idempotency_key("43335", later)
    assert rows == [
        (first[0], E.SENDING, key1, None, "GLI", None),
        (first[1], E.SENDING, key1, None, "HEMO", None),
        (first[0], E.DELIVERED, key1, 201, "GLI", None),
        (first[1], E.DELIVERED, key1, 201, "HEMO", None),
        (later[0], E.SENDING, key2, None, "TSH", None),
        (later[0], E.DELIVERED, key2, 201, "TSH", None),
    ]


def test_transient_answers_are_attempts_then_delivered(harness):
    ids = harness.order(7, ["GLI"])
    harness.api.fail_next(1, status=503)
    monitor = harness.monitor(BEMSOFT_RETRIES="0")
    monitor.step()
    assert events(harness.engine) == [(ids[0], E.SENDING)]     # the attempt waits in memory
    harness.clock_value += 1000
    monitor.gate.pause(0)
    monitor.run("drain")
    assert [(i, e, s) for i, e, _, s, _, _ in history(harness.engine)] == [
        (ids[0], E.SENDING, None), (ids[0], E.ATTEMPT, 503), (ids[0], E.DELIVERED, 201)]


def test_dry_run_writes_no_history(harness):
    harness.order(8, ["GLI"])
    harness.monitor().start()   # the tables exist (a normal start made them)
    harness.monitor(BEMSOFT_DRY_RUN="1").run("drain")
    assert events(harness.engine) == []


def test_history_days_zero_keeps_none(harness):
    harness.order(9, ["GLI"])
    harness.monitor(HISTORY_DAYS="0").run("drain")
    assert events(harness.engine) == []
    assert harness.checkpoint() is not None
