#!/usr/bin/env python3
"""How long an order's story (`--trace`, the console's search) takes with a long history.

    python -m bench.trace_bench [--db sqlite|postgresql] [--orders 100000] [--repeat 200]

Seeds the LIS with N solicitations x 3 items (sampledata.bulk_orders) and, for each item, the
rows a delivery leaves: a "delivered" record in _MonitorItems for the last two look-back
windows only (the rest pruned, as the monitor does) and SENDING + DELIVERED rows in
_MonitorHistory (2 x 3 x N rows), plus 1,000 failure files in FAILED_DIR. Then times, with
time.perf_counter, `Tracer.story` for random solicitations and random items (the CLI's work
after connecting; the console's search is the same call) and reports median and p95 in ms.
Nothing is asserted: the figures are reported."""
from __future__ import annotations

import argparse
import datetime as dt
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from bemsoft_monitor.config import parse_settings
from bemsoft_monitor.db import create_db_engine, monitor_schema_map
from bemsoft_monitor.payload import idempotency_key
from bemsoft_monitor.schema import (HistoryEvent, ItemStatus, monitor_history, monitor_items,
                                    monitor_metadata, monitor_state)
from bemsoft_monitor.testing.harness import LAB, PgDatabase
from bemsoft_monitor.testing.sampledata import bulk_orders, create_legacy_schema
from bemsoft_monitor.trace import Tracer, parse_query
from bench.console_bench import write_failures

CHUNK = 5000


def seed(engine: sa.Engine, orders: int, name: str = "bemsoft") -> int:
    create_legacy_schema(engine)
    items = bulk_orders(engine, orders, 3, terceirizado=LAB)
    own = engine.execution_options(schema_translate_map=monitor_schema_map(engine.dialect.name))
    monitor_metadata.create_all(own)
    at = dt.datetime(2026, 11, 28, 11, 0, 0)
    recent = items - 2000     # _MonitorItems keeps about two look-back windows
    history, records = [], []
    with own.begin() as conn:
        for cod in range(1, orders + 1):
            ids = [(cod - 1) * 3 + k + 1 for k in range(3)]
            key = idempotency_key(str(cod), ids)
            for item_id in ids:
                for event in (HistoryEvent.SENDING, HistoryEvent.DELIVERED):
                    history.append({"Name": name, "At": at, "CodSolicitacao": str(cod),
                                    "CodItemSol": item_id, "ExamCode": "GLI", "Event": event,
                                    "IdemKey": key, "HttpStatus": 201 if event == HistoryEvent.DELIVERED else None,
                                    "LatencyMs": 20 if event == HistoryEvent.DELIVERED else None})
                if item_id > recent:
                    records.append({"Name": name, "CodItemSol": item_id, "CodSolicitacao": str(cod),
                                    "Status": ItemStatus.DELIVERED, "IdemKey": key, "UpdatedAt": at})
            if len(history) >= CHUNK:
                conn.execute(monitor_history.insert(), history)
                history = []
        for rows, table in ((history, monitor_history), (records, monitor_items)):
            for start in range(0, len(rows), CHUNK):
                conn.execute(table.insert(), rows[start:start + CHUNK])
        conn.execute(monitor_state.insert(), [
            {"Name": name, "LastItemId": items, "UpdatedAt": at},
            {"Name": f"{name}#inicio", "LastItemId": recent, "UpdatedAt": at}])
    return items


def timed(fn, args, repeat: int) -> list[float]:
    out = []
    for arg in args[:repeat]:
        start = time.perf_counter()
        fn(arg)
        out.append((time.perf_counter() - start) * 1000)
    return out


def report(name: str, values: list[float]) -> None:
    p95 = statistics.quantiles(values, n=20)[-1] if len(values) >= 20 else max(values)
    print(f"{name:<34} mediana {statistics.median(values):7.2f} ms   p95 {p95:7.2f} ms   (n={len(values)})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--orders", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="trace-bench-") as tmp:
        tmp = Path(tmp)
        pg = None
        if args.db == "postgresql":
            pg = PgDatabase("bm_bench_trace", legacy_schema=False)
            url = pg.create()
        else:
            url = f"sqlite:///{tmp / 'legado.db'}"
        try:
            settings = parse_settings({"DATABASE_URL": url, "TERCEIROS": LAB, "START_FROM": "0",
                                       "FAILED_DIR": str(tmp / "failed"), "BEMSOFT_DRY_RUN": "1"},
                                      base_dir=tmp)
            engine = create_db_engine(settings)
            started = time.perf_counter()
            items = seed(engine, args.orders)
            write_failures(settings.failed_dir, 1000)
            print(f"{args.db}: {args.orders} solicitações, {items} itens, {items * 2} linhas de "
                  f"histórico, 1000 arquivos de falha (semeado em {time.perf_counter() - started:.0f} s)")
            tracer = Tracer(settings, engine)
            rng = random.Random(7)
            sols = [str(rng.randint(1, args.orders)) for _ in range(args.repeat)]
            item_ids = [f"item:{rng.randint(1, items)}" for _ in range(args.repeat)]
            tracer(sols[0])  # connection pool and inspector warm
            report("--trace <solicitação> (Tracer)", timed(tracer, sols, args.repeat))
            report("--trace item:<CodItemSol> (Tracer)", timed(tracer, item_ids, args.repeat))
            story = tracer.story(parse_query(sols[0]))
            events = [s.event for s in story.steps]   # a seeded order is found whole
            assert events[:2] == [HistoryEvent.SENDING, HistoryEvent.DELIVERED], events
            engine.dispose()
        finally:
            if pg is not None:
                pg.drop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
