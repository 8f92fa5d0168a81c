#!/usr/bin/env python3
"""Peak RSS of the monitor draining a small and a large backlog (zero API latency).

Same machinery as run_bench.py (fresh database per run, fake API in its own process, the
real `monitor_bemsoft.py --drain` reaped with os.wait4() for ru_maxrss, delivery verified
exactly once). Default: 20,000 and 200,000 items waiting, 4 items per solicitation
(5,000 and 50,000 solicitations), concurrency 8, 3 repetitions; the report gives the median
peak RSS of each size and the ratio large/small.

    python -m bench.memory_bench --db postgresql --json bench/results/memory_pg.json
"""
from __future__ import annotations

import argparse
import sys
import time

from . import run_bench as rb

TARGET_RSS_MB = 150.0        # 200,000 items waiting: peak RSS at most 150 MB
TARGET_RSS_GROWTH = 1.10     # ... and no more than 10% above the peak for 20,000 items


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Pico de RSS do monitor com um backlog pequeno e um grande (latência zero).")
    rb.add_common_options(parser)
    parser.add_argument("--small", type=int, default=20_000, help="itens aguardando (pequeno)")
    parser.add_argument("--large", type=int, default=200_000, help="itens aguardando (grande)")
    parser.add_argument("--items", type=int, default=4, help="itens por solicitação (M)")
    parser.add_argument("--concurrency", type=int, default=8, help="BEMSOFT_CONCURRENCY")
    parser.add_argument("--latency", type=float, default=0.0, help="latência da API falsa (s)")
    args = parser.parse_args(argv)
    for size in (args.small, args.large):
        if size % args.items:
            parser.error(f"{size} itens não é múltiplo de --items {args.items}")
    args.solicitations = args.small // args.items  # only used by one_run's defaults

    info = rb.machine_info(args.db, args.pg_url)
    print(f"Memória: {args.db}, {args.small} e {args.large} itens aguardando ({args.items} por "
          f"solicitação), latência {args.latency * 1000:.0f} ms, concorrência {args.concurrency}, "
          f"BATCH_SIZE {args.batch_size}, {args.repeat} repetições, LOG_LEVEL {args.log_level}")
    print("Máquina: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    runs: dict[int, list[rb.RunResult]] = {args.small: [], args.large: []}
    started = time.perf_counter()
    try:
        for repeat in range(1, args.repeat + 1):
            for size in (args.small, args.large):
                result = rb.one_run(args, args.concurrency, repeat, solicitations=size // args.items,
                                    items=args.items, latency=args.latency)
                runs[size].append(result)
                print(f"  repetição {repeat}, {size} itens: pico RSS {result.rss_mb:.1f} MB, "
                      f"{result.wall_s:.1f} s, {result.sol_per_s:.0f} sol/s, "
                      f"{result.cpu_ms_per_sol:.3f} ms CPU/sol (verificado: {result.stored_tests} "
                      f"testes, checkpoint {result.checkpoint}; código {result.code})", flush=True)
    except rb.BenchError as err:
        print(f"\nFALHA: {err}", file=sys.stderr)
        return 1

    print(f"\nMedianas ({time.perf_counter() - started:.0f} s no total):")
    print(f"{'itens':>8} {'solic.':>7} {'exec':>4} {'RSS MB (mediana)':>16} {'RSS MB (máx)':>12} "
          f"{'parede s':>9} {'sol/s':>7} {'CPU ms/sol':>10}")
    summary = {}
    for size, group in runs.items():
        s = summary[size] = {
            "solicitations": size // args.items,
            "rss_mb": rb.median(r.rss_mb for r in group),
            "rss_mb_max": max(r.rss_mb for r in group),
            "rss_mb_all": [r.rss_mb for r in group],
            "wall_s": rb.median(r.wall_s for r in group),
            "sol_per_s": rb.median(r.sol_per_s for r in group),
            "cpu_ms_per_sol": rb.median(r.cpu_ms_per_sol for r in group),
        }
        print(f"{size:>8} {s['solicitations']:>7} {len(group):>4} {s['rss_mb']:>16.1f} "
              f"{s['rss_mb_max']:>12.1f} {s['wall_s']:>9.1f} {s['sol_per_s']:>7.0f} "
              f"{s['cpu_ms_per_sol']:>10.3f}")
    large, small = summary[args.large]["rss_mb"], summary[args.small]["rss_mb"]
    ratio = large / small
    print(f"\nRazão pico RSS {args.large} / {args.small} itens: {ratio:.3f} "
          f"({large:.1f} MB / {small:.1f} MB)")
    checks = [
        (f"{args.large} itens: pico RSS <= {TARGET_RSS_MB:.0f} MB", large <= TARGET_RSS_MB,
         f"{large:.1f} MB"),
        ((f"{args.large} itens: no máximo {100 * (TARGET_RSS_GROWTH - 1):.0f}% acima de "
          f"{args.small} itens"), ratio <= TARGET_RSS_GROWTH, f"{100 * (ratio - 1):+.1f}%"),
    ]
    print("\nMetas:")
    for name, ok, value in checks:
        print(f"  [{'OK' if ok else 'NÃO ATINGIDA'}] {name}: {value}")
    if args.json:
        rb.save_json(args.json, {
            "argv": sys.argv, "args": vars(args), "machine": info,
            "runs": {str(k): [r.to_json() for r in v] for k, v in runs.items()},
            "summary": {str(k): v for k, v in summary.items()}, "ratio": ratio,
            "targets": [{"target": n, "met": ok, "value": v} for n, ok, v in checks]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
