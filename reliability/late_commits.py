#!/usr/bin/env python3
"""Commits tardios: escritores concorrentes (padrão 4) abrem uma transação, inserem uma
solicitação com itens (o CodItemSol sai da identidade NO INSERT), esperam 0-2 s ao acaso e só
então fazem o commit — então as linhas ficam visíveis fora da ordem do CodItemSol, como no
SQL Server em produção. Uma parte das transações acrescenta itens a uma solicitação já
gravada (exames acrescentados depois). Tudo isso com o monitor de verdade em laço
(`monitor_bemsoft.py`, processo próprio), PostgreSQL de verdade e a API falsa do projeto em
processo próprio, por `--minutes` minutos; depois os escritores param e o monitor esvazia.

Esperado (SPEC §6 "Late commits", README "Commits tardios"): cada item guardado pela API
exatamente uma vez (nada perdido, nada repetido), nenhum arquivo de falha, checkpoint ==
último CodItemSol; um item que aparece abaixo do checkpoint por commit tardio é apanhado pela
janela LOOKBACK_ITEMS em poucos segundos (`--grace`), nunca fica esquecido. Com
`--debounce N` (DEBOUNCE_SECONDS) vale o mesmo: segurar não é pular.

Uso: python -m reliability.late_commits [--minutes 3] [--writers 4] [--hold-max 2]
     [--debounce 0] [--append-fraction 0.2] [--grace 10]
Sai com código 1 se qualquer verificação falhar (2 se o PostgreSQL estiver inacessível).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time

from .common import (CheckpointWatcher, CodAllocator, FakeApiProcess, MonitorProcess,
                    OrderWriter, PgDatabase, checkpoint, count_in_log, lab_item_ids, pg_unreachable,
                    read_text, temp_dir, verify, wait_drained, wait_until, write_env)

STARTED_LINE = "Monitor iniciado"


def out_of_order(commit_log: list[tuple[float, list[int]]]) -> tuple[int, int]:
    """(items committed after an item with a higher CodItemSol was already visible,
    largest id gap behind the highest visible id)."""
    late, gap, highest = 0, 0, 0
    for _, ids in sorted(commit_log, key=lambda entry: entry[0]):
        for item in ids:
            if item < highest:
                late += 1
                gap = max(gap, highest - item)
        highest = max([highest] + ids)
    return late, gap


def run(args) -> int:
    if pg_unreachable():
        return 2
    violations: list[str] = []
    work = temp_dir("bm_late_commits_")
    commit_log: list = []
    duration = args.minutes * 60
    with PgDatabase() as url, FakeApiProcess(latency=args.latency) as api:
        env = write_env(work, url, api.url, DEBOUNCE_SECONDS=args.debounce,
                        LOOKBACK_ITEMS=args.lookback, BEMSOFT_CONCURRENCY=args.concurrency)
        log_file = work / "monitor.log"
        watcher = CheckpointWatcher(url, lookback=args.lookback)
        watcher.start()
        monitor = MonitorProcess(env)
        cods = CodAllocator(1)
        writers = [OrderWriter(url, cods, hold=(0.0, args.hold_max), items=(1, 4),
                               append_fraction=args.append_fraction, seed=args.seed + n,
                               name=f"escritor{n}", commit_log=commit_log)
                   for n in range(args.writers)]
        started = time.monotonic()
        try:
            if not wait_until(lambda: STARTED_LINE in read_text(log_file) or not monitor.alive(), 60):
                violations.append("o monitor não iniciou em 60 s")
            for writer in writers:
                writer.start()
            next_report = 30.0
            for _ in range(int(duration / 0.5) + 1):
                elapsed = time.monotonic() - started
                if elapsed >= duration or not monitor.alive():
                    break
                if elapsed >= next_report:
                    print(f"  [{elapsed:5.0f} s] commits {len(commit_log)}, checkpoint "
                          f"{_safe(checkpoint, url)}, guardados pela API "
                          f"{api.state()['stored_tests_total']}", flush=True)
                    next_report += 30.0
                time.sleep(0.5)
            for writer in writers:
                writer.stop()
            for writer in writers:
                writer.join(30)
            writing_s = time.monotonic() - started
            stop_writing = time.monotonic()
            drained = wait_drained(api, url, args.timeout, work / "failed", stall=args.stall)
            drain_s = time.monotonic() - stop_writing
            if not drained:
                violations.append(f"o monitor não esvaziou em {args.timeout:.0f} s depois que os "
                                  "escritores pararam")
            if not monitor.alive():
                violations.append("o monitor terminou sozinho")
        finally:
            for writer in writers:
                writer.stop()
            code = monitor.stop(60)
            watcher.stop()
        items = lab_item_ids(url)
        report = verify(api, url, items, work / "failed")
        state = api.state()

    late, gap = out_of_order(commit_log)
    transient = watcher.violations(grace=0.0)
    stuck = watcher.violations(grace=args.grace)
    recua = count_in_log(log_file, "Checkpoint recua")
    unexpected = count_in_log(log_file, "Erro inesperado no ciclo")
    tracebacks = read_text(work / "monitor.out").count("Traceback")
    committed = sum(w.committed for w in writers)
    appended = sum(w.appended for w in writers)
    errors = sum(w.errors for w in writers)

    if not report["ok"]:
        violations.append(
            f"entrega incorreta: perdidos {_ids(report['missing'])}, duplicados "
            f"{_ids(report['duplicates'])}, itens em arquivos de falha "
            f"{report['failure_files_items']}, checkpoint {report['checkpoint']} (último "
            f"{report['last_id']})")
    if stuck:
        violations.append(f"{len(stuck)} itens ficaram abaixo do checkpoint sem resultado por mais "
                          f"de {args.grace:.0f} s: {_ids(list(stuck))}")
    if code != 0:
        violations.append(f"o monitor saiu com código {code} ao receber SIGTERM")
    if unexpected or tracebacks:
        violations.append(f"{unexpected} erros inesperados, {tracebacks} tracebacks")
    if late == 0 and args.writers > 1 and args.hold_max > 0:
        violations.append("nenhum commit fora de ordem aconteceu: o cenário não exercitou nada")

    print()
    title = f"DEBOUNCE_SECONDS={args.debounce:g}" if args.debounce else "sem debounce"
    print(f"=== Commits tardios ({args.writers} escritores, {title}) ===")
    print(f"Escrita por {writing_s:.0f} s: {committed} solicitações novas + {appended} acréscimos "
          f"de itens a solicitações existentes = {len(items)} itens "
          f"({len(items) / max(writing_s, 1):.1f} itens/s); {errors} transações com erro.")
    print(f"Fora de ordem: {late} itens ({100 * late / max(len(items), 1):.0f}%) ficaram "
          f"visíveis depois de um CodItemSol maior; maior distância {gap} ids "
          f"(LOOKBACK_ITEMS={args.lookback}).")
    longest = max(transient.values(), default=0.0)
    print(f"Vigia do checkpoint ({watcher.samples} amostras): {len(transient)} itens vistos "
          f"abaixo do checkpoint ainda sem resultado (commit tardio ainda não relido), o mais "
          f"longo por {longest:.1f} s; mais de {args.grace:.0f} s: {len(stuck)}. "
          f"'Checkpoint recua' no log: {recua}.")
    print(f"Depois que os escritores pararam, o monitor esvaziou em {drain_s:.1f} s.")
    print(f"API: {state['posts']} POSTs {state['posts_by_status']}, {state['batches']} lotes "
          f"(solicitações), {state['keys']} chaves; itens guardados {report['stored']} de "
          f"{report['items']}; duplicados {len(report['duplicates'])}; perdidos "
          f"{len(report['missing'])}; arquivos de falha (itens) {report['failure_files_items']}.")
    print(f"Checkpoint final {report['checkpoint']} (último CodItemSol {report['last_id']}); "
          f"código de saída do monitor (SIGTERM): {code}.")
    print(f"Pasta de trabalho: {work}")
    print()
    if violations:
        print("VIOLAÇÕES:")
        for v in violations:
            print(f"  - {v}")
        return 1
    print("OK: nenhum item perdido nem repetido com commits fora de ordem.")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _safe(function, *args):
    try:
        return function(*args)
    except Exception:  # noqa: BLE001
        return None


def _ids(ids: list[int], limit: int = 12) -> str:
    if len(ids) <= limit:
        return str(ids)
    return f"{ids[:limit]}... ({len(ids)} no total)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0,
                        help="minutos com os escritores ativos (padrão 3)")
    parser.add_argument("--writers", type=int, default=4, help="escritores concorrentes (padrão 4)")
    parser.add_argument("--hold-max", type=float, default=2.0,
                        help="cada transação fica aberta 0..N s antes do commit (padrão 2)")
    parser.add_argument("--append-fraction", type=float, default=0.2,
                        help="fração das transações que acrescentam itens a uma solicitação "
                             "existente (padrão 0,2)")
    parser.add_argument("--debounce", type=float, default=0.0, help="DEBOUNCE_SECONDS (padrão 0)")
    parser.add_argument("--lookback", type=int, default=1000, help="LOOKBACK_ITEMS (padrão 1000)")
    parser.add_argument("--concurrency", type=int, default=4, help="BEMSOFT_CONCURRENCY (padrão 4)")
    parser.add_argument("--latency", type=float, default=0.005,
                        help="latência da API falsa em segundos (padrão 0,005)")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="tempo máximo de um commit tardio abaixo do checkpoint sem "
                             "resultado (padrão 10 s)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="espera máxima para esvaziar depois dos escritores (padrão 120 s)")
    parser.add_argument("--stall", type=float, default=30.0,
                        help="desiste antes se nada progredir por N segundos (padrão 30)")
    parser.add_argument("--seed", type=int, default=11, help="semente dos escritores")
    parser.add_argument("--keep", action="store_true", help="mantém a pasta de trabalho")
    args = parser.parse_args(argv)
    if not 0 < args.minutes <= 120 or not 1 <= args.writers <= 32:
        parser.error("--minutes de 0 a 120 e --writers de 1 a 32")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
