#!/usr/bin/env python3
"""What the order history (_MonitorHistory, issue 16) costs the catch-up: the same
end-to-end run as `bench/run_bench.py` (seed -> fake API process -> `monitor_bemsoft.py
--drain` -> verification that each item arrived exactly once), with HISTORY_DAYS=400 (the
default: history on) and HISTORY_DAYS=0 (off), alternating run by run in one invocation,
in two scenarios:

* latency: API latency 20 ms, 5,000 solicitations x 3 items, concurrency 8 -> wall time;
  budget: history on within 5% of off (medians);
* zero latency: same N, API latency 0 -> monitor CPU per solicitation; budget: on minus off
  within 0.1 ms (medians).

Every "on" run also checks that the history holds one SENDING and one DELIVERED row per item
(otherwise the run is invalid and the benchmark stops with exit code 1).

    python -m bench.history_bench --db postgresql --repeat 3 --json bench/results/history.json

It reuses run_bench's run (`one_run`), with HISTORY_DAYS added to the .env it writes and a
database that counts the history rows before it is dropped."""
from __future__ import annotations

import argparse
import sys
import time

import sqlalchemy as sa

from bench import run_bench
from bemsoft_monitor.db import monitor_schema_map
from bemsoft_monitor.schema import HistoryEvent, monitor_history

BUDGET_WALL_RATIO = 1.05      # history on: wall within 5% of off (20 ms latency)
BUDGET_CPU_MS = 0.1           # history on: at most 0.1 ms more monitor CPU per solicitation
_counted: dict = {}


class _CountingDatabase(run_bench.BenchDatabase):
    """The run's database; the history rows are counted before it is dropped."""

    def checkpoint_and_max(self):
        engine = sa.create_engine(self.url, poolclass=sa.pool.NullPool)
        engine = engine.execution_options(schema_translate_map=monitor_schema_map(engine.dialect.name))
        h = monitor_history
        try:
            with engine.connect() as conn:
                _counted.clear()
                _counted.update(conn.execute(sa.select(h.c.Event, sa.func.count()).group_by(h.c.Event)).all())
        finally:
            engine.dispose()
        return super().checkpoint_and_max()


def run(args, days: str, repeat: int, latency: float) -> run_bench.RunResult:
    result = run_bench.one_run(args, args.concurrency, repeat, latency=latency,
                               env={"HISTORY_DAYS": days}, database=_CountingDatabase)
    items = args.solicitations * args.items
    expected = ({HistoryEvent.SENDING: items, HistoryEvent.DELIVERED: items} if days != "0" else {})
    if dict(_counted) != expected:
        raise run_bench.BenchError(f"histórico inesperado com HISTORY_DAYS={days}: {dict(_counted)} "
                                   f"(esperado {expected})")
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Custo do histórico (HISTORY_DAYS=400 x 0) na "
                                                 "vazão e na CPU do monitor.")
    run_bench.add_common_options(parser)
    parser.add_argument("--solicitations", type=int, default=5000)
    parser.add_argument("--items", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--skip-latency", action="store_true", help="só o cenário de latência zero")
    parser.add_argument("--skip-zero", action="store_true", help="só o cenário de 20 ms")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    scenarios = [(name, lat) for name, lat, skip in (("latência", args.latency, args.skip_latency),
                                                     ("latência zero", 0.0, args.skip_zero)) if not skip]
    print(f"Histórico: {args.db}, {args.solicitations} solicitações x {args.items} itens, "
          f"concorrência {args.concurrency}, {args.repeat} repetições", flush=True)
    results: dict = {}
    started = time.perf_counter()
    try:
        for name, latency in scenarios:
            for repeat in range(1, args.repeat + 1):
                # alternate which goes first, so a drift of the machine hits both
                order = ("400", "0") if repeat % 2 else ("0", "400")
                for days in order:
                    r = run(args, days, repeat, latency)
                    results.setdefault((name, days), []).append(r)
                    print(f"  {name}, HISTORY_DAYS={days}, repetição {repeat}: parede {r.wall_s:.2f} s, "
                          f"CPU {r.cpu_ms_per_sol:.3f} ms/sol, {r.rss_mb:.1f} MB", flush=True)
    except run_bench.BenchError as err:
        print(f"\nFALHA: {err}", file=sys.stderr)
        return 1
    print(f"\nMedianas ({time.perf_counter() - started:.0f} s no total):")
    summary = {}
    for name, latency in scenarios:
        on, off = results[(name, "400")], results[(name, "0")]
        wall_on, wall_off = (run_bench.median(r.wall_s for r in g) for g in (on, off))
        cpu_on, cpu_off = (run_bench.median(r.cpu_ms_per_sol for r in g) for g in (on, off))
        summary[name] = {"latency": latency, "wall_on": wall_on, "wall_off": wall_off,
                         "cpu_ms_on": cpu_on, "cpu_ms_off": cpu_off}
        print(f"  {name}: parede {wall_on:.2f} s com histórico x {wall_off:.2f} s sem "
              f"({(wall_on / wall_off - 1) * 100:+.1f}%); CPU {cpu_on:.3f} x {cpu_off:.3f} ms/sol "
              f"({cpu_on - cpu_off:+.3f} ms)")
        if latency > 0:
            ok = wall_on <= wall_off * BUDGET_WALL_RATIO
            print(f"    meta parede <= +5%: {'OK' if ok else 'NÃO'}")
        else:
            ok = cpu_on - cpu_off <= BUDGET_CPU_MS
            print(f"    meta CPU <= +{BUDGET_CPU_MS} ms/sol: {'OK' if ok else 'NÃO'}")
    if args.json:
        run_bench.save_json(args.json, {"argv": sys.argv, "args": vars(args), "summary": summary,
                                        "runs": {f"{k[0]}|{k[1]}": [r.to_json() for r in v]
                                                 for k, v in results.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
