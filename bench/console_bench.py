#!/usr/bin/env python3
"""How long the operator console (`/`) takes to render with N failure files in FAILED_DIR.

    python -m bench.console_bench [--files 1000] [--repeat 200]

Writes N failure files (FailureStore, realistic size: a solicitation with 3 items and its
patient) to a temporary folder, fills a StatusBoard with an hour of outcomes, then measures
with time.perf_counter:
  - cold: the first render (every file read once);
  - listing: a render right after the scan cache expired (directory listed and stat'ed,
    no file read again: files never change once written);
  - cached: a render within SCAN_TTL (in-memory state only).
Reports the median (and p95) of each in ms. The page targets 20 ms with 1,000 files."""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bemsoft_monitor.client import Delivery
from bemsoft_monitor.config import parse_settings
from bemsoft_monitor.console import Console
from bemsoft_monitor.console.scan import FailureScan
from bemsoft_monitor.failures import FailureRecord, FailureStore
from bemsoft_monitor.status import DELIVERED, FAILED, StatusBoard

REASONS = ["paciente pat-{n} sem sexo M/F: preencha paciente.sexo ou defina DEFAULT_GENDER",
           "API rejeitou o pedido (HTTP 400, validação): {{\"errors\": [\"x\"]}}",
           "item {n}: exame 'X{m}' não existe no catálogo /tests da Bemsoft: cadastre-o"]


def write_failures(directory: Path, count: int) -> None:
    store = FailureStore(directory)
    rng = random.Random(1)
    for n in range(count):
        items = [{"CodItemSol": n * 3 + k, "CodConvExames": "GLI", "DescExames": "GLICOSE",
                  "Origem": "AMB", "DataEntrada": "2026-11-29T08:31:00"} for k in range(3)]
        store.write(FailureRecord(
            reason=rng.choice(REASONS).format(n=n, m=n % 7), key=f"sol-{n}-{n:012x}", cod=str(n),
            item_ids=[i["CodItemSol"] for i in items], http_status=400,
            event={"cod_solicitacao": n, "solicitacao": {"codsolicitacao": n, "dtaentrada": "2026-11-29"},
                   "paciente": {"codpaciente": n, "nome": "Paciente de Teste da Silva",
                                "cpf": "000.000.000-00", "datanasc": "1970-01-01", "sexo": None},
                   "items": items}))


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def report(name: str, values: list[float]) -> None:
    ordered = sorted(values)
    p95 = ordered[max(0, int(len(ordered) * 0.95) - 1)]
    print(f"{name:<9} mediana {statistics.median(values):7.2f} ms   p95 {p95:7.2f} ms   (n={len(values)})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="console-bench-") as tmp:
        failed = Path(tmp) / "failed"
        write_failures(failed, args.files)
        settings = parse_settings({"DATABASE_URL": "sqlite://", "TERCEIROS": "LAB", "BEMSOFT_DRY_RUN": "1",
                                   "FAILED_DIR": str(failed)})
        now = [time.time() - 3600]
        board = StatusBoard(clock=lambda: now[0], tz=settings.tz)
        for n in range(3600):
            now[0] += 1
            board.settled(str(n), 2, f"sol-{n}-abcdef012345", DELIVERED if n % 50 else FAILED,
                          Delivery("delivered", 201, 1, "", duration=0.2))
        board.progress(123456, 0)
        scan_clock = [0.0]
        scan = FailureScan(failed, clock=lambda: scan_clock[0])
        console = Console(board, settings, scan=scan)

        cold = timed(console.render, 1)
        size = len(console.render().encode())

        def expire_then_render():
            scan_clock[0] += 3600
            console.render()

        listing = timed(expire_then_render, args.repeat)
        cached = timed(console.render, args.repeat)
        summary = scan.summary()
        print(f"{args.files} arquivos de falha ({summary.count} contados, {len(summary.groups)} motivos); "
              f"página de {size / 1024:.0f} KiB")
        report("fria", cold)
        report("listagem", listing)
        report("cache", cached)
    return 0


if __name__ == "__main__":
    sys.exit(main())
