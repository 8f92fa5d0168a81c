#!/usr/bin/env python3
"""Falhas do banco de dados com o monitor de verdade em laço (`monitor_bemsoft.py`, processo
próprio), PostgreSQL de verdade e a API falsa do projeto em processo próprio.

O monitor esvazia um backlog (N solicitações x M itens) enquanto um escritor continua
inserindo solicitações novas; durante isso:

- terminate: as sessões do banco de teste (pool do monitor, conexão do bloqueio de instância,
  escritor) são derrubadas com `pg_terminate_backend` (pg_stat_activity, datname = banco de
  teste, pid <> pg_backend_pid()), repetidamente por `--kill-burst` segundos, para que as
  reconexões feitas nesse intervalo também caiam (uma queda curta de verdade, que o
  pool_pre_ping sozinho não esconde);
- restart: o PostgreSQL é reiniciado (`pg_ctlcluster ... restart`, espera o pg_isready).
  ATENÇÃO: afeta TODOS os bancos desta máquina; use com parcimônia (padrão: 1 vez);
- outage: uma queda longa só do banco de teste (`ALTER DATABASE ... ALLOW_CONNECTIONS false`
  + pg_terminate_backend por `--outage-seconds`): o monitor tenta reconectar várias vezes
  (espera crescente) e deve registrar a queda uma única vez;
- kill-in-record (opcional): a conexão do monitor morre exatamente no UPDATE do checkpoint
  em _MonitorState (um gatilho que chama pg_terminate_backend na própria sessão): uma queda
  que o monitor certamente percebe;
- kill-in-sending (opcional): a conexão morre exatamente no INSERT dos registros "enviando"
  em _MonitorItems; a primeira é armada antes de o monitor partir, então cai na primeira
  página do backlog (recuperação com páginas cheias).

Esperado (SPEC §6, README "Garantias de entrega"): o monitor reconecta sozinho; registra a
queda UMA vez por queda ("Banco de dados indisponível") e a volta uma vez ("Conexão com o
banco de dados restabelecida"); nenhum item perdido nem repetido (cada item guardado uma vez
pela API), nenhum arquivo de falha, checkpoint == último CodItemSol; e em nenhum instante o
checkpoint passa de um item sem resultado registrado (amostrado a cada 0,2 s numa única
leitura consistente do banco).

Uso: python -m reliability.db_faults [--solicitations 6000] [--items 2] [--kills 5]
     [--restarts 1] [--outages 1] [--outage-seconds 8] [--kill-in-record 1]
     [--kill-in-sending 0] [--interval 2]
     [--kill-burst 0.5] [--latency 0.01]
Sai com código 1 se qualquer verificação falhar (2 se o PostgreSQL estiver inacessível).
"""
from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
import time
from dataclasses import dataclass, field

from .common import (BACK_LINE, DOWN_LINE, CheckpointWatcher, CodAllocator,
                    FakeApiProcess, MonitorProcess, OrderWriter, PgDatabase, arm_session_killer,
                    block_database, checkpoint, count_in_log, format_table,
                    install_session_killer,
                    lab_item_ids, lines_per_fault, session_killer_fired,
                    log_events, max_order_cod, pg_unreachable, pg_ready, read_text,
                    restart_postgres, seed, sync_item_sequence, temp_dir, terminate_burst,
                    verify, wait_until, wait_drained, write_env)

STARTED_LINE = "Monitor iniciado"
LOCK_LOST_LINE = "Conexão do bloqueio de instância perdida"
LOCK_OTHER_LINE = "Bloqueio de instância perdido para outro monitor"
UNEXPECTED_LINE = "Erro inesperado no ciclo"


@dataclass
class Fault:
    kind: str
    started: dt.datetime
    offset: float            # seconds since the monitor started
    checkpoint: int | None   # checkpoint just before the fault
    detail: str = ""


SENDING_KILLER = "rel_kill_sending"   # trigger on INSERT INTO _MonitorItems
RECORD_KILLER = "rel_kill_record"     # trigger on UPDATE _MonitorState
DETERMINISTIC = {"sending", "record", "outage"}  # certainly noticed: exactly one log line


def plan(kills: int, restarts: int, record: int, sending: int, outages: int = 0) -> list[str]:
    """Kills in "sending" first (they must hit the catch-up), then the terminate bursts with
    the restarts, long outages and kills in "record" spread among them."""
    rest = ["terminate"] * kills
    others = ["restart"] * restarts + ["outage"] * outages + ["record"] * record
    for n, kind in enumerate(others):
        slots = len(others) + 1
        rest.insert(min(len(rest), (n + 1) * len(rest) // slots + n), kind)
    return ["sending"] * sending + rest


@dataclass
class Result:
    code: int                                   # 0 ok, 1 violation, 2 PostgreSQL unreachable
    violations: list[str] = field(default_factory=list)   # everything but the watcher's finding
    checkpoint_skips: dict = field(default_factory=dict)  # item -> seconds below the checkpoint
    outages_logged: int = 0
    faults: int = 0


def run(args) -> Result:
    if pg_unreachable():
        return Result(2)
    violations: list[str] = []
    work = temp_dir("bm_db_faults_")
    faults: list[Fault] = []
    database = PgDatabase()
    with database as url, FakeApiProcess(latency=args.latency) as api:
        t0 = time.monotonic()
        backlog = seed(url, args.solicitations, args.items)
        sync_item_sequence(url)
        seed_s = time.monotonic() - t0
        pre_armed = None
        if args.kill_in_sending:
            install_session_killer(url, "_MonitorItems", "INSERT", SENDING_KILLER)
            arm_session_killer(url, 0, SENDING_KILLER)  # the first page of the backlog
            pre_armed = Fault("sending", dt.datetime.now(), 0.0, 0)
        if args.kill_in_record:
            install_session_killer(url, "_MonitorState", "UPDATE", RECORD_KILLER)
        env = write_env(work, url, api.url, BEMSOFT_CONCURRENCY=args.concurrency,
                        BATCH_SIZE=args.batch_size, LOOKBACK_ITEMS=args.lookback)
        log_file = work / "monitor.log"
        watcher = CheckpointWatcher(url, lookback=args.lookback)
        watcher.start()
        monitor = MonitorProcess(env)
        writer = None
        started = time.monotonic()
        try:
            if not wait_until(lambda: STARTED_LINE in read_text(log_file) or not monitor.alive(), 60):
                violations.append("o monitor não iniciou em 60 s")
            writer = OrderWriter(url, CodAllocator(max_order_cod(url) + 1), rate=args.writer_rate,
                                 items=(1, 3), seed=args.seed, max_orders=100_000)
            writer.start()
            for number, kind in enumerate(plan(args.kills, args.restarts, args.kill_in_record,
                                                args.kill_in_sending, args.outages)):
                if number == 0 and pre_armed is not None:  # armed before the monitor started
                    fired = wait_until(lambda: session_killer_fired(url, SENDING_KILLER), 30,
                                       interval=0.05)
                    pre_armed.detail = ("conexão morta no INSERT de 'enviando' (1ª página)"
                                        if fired else "o gatilho não disparou em 30 s")
                    if not fired:
                        violations.append("gatilho 'sending' não disparou")
                    faults.append(pre_armed)
                    print(f"  [   0.0 s] sending   checkpoint antes=0  {pre_armed.detail}", flush=True)
                    continue
                time.sleep(args.interval)
                if not monitor.alive():
                    violations.append("o monitor terminou sozinho durante as falhas")
                    break
                cp = _safe_checkpoint(url)
                fault = Fault(kind, dt.datetime.now(), time.monotonic() - started, cp)
                if kind == "terminate":
                    n = terminate_burst(url, args.kill_burst)
                    fault.detail = f"{n} sessões derrubadas em {args.kill_burst:.1f} s"
                elif kind == "outage":
                    n = block_database(url, args.outage_seconds)
                    fault.detail = (f"banco fechado por {args.outage_seconds:.0f} s "
                                    f"({n} sessões derrubadas)")
                elif kind == "restart":
                    down = restart_postgres()
                    database.admin.dispose()  # its pooled connection died with the server
                    fault.detail = f"PostgreSQL de volta em {down:.1f} s"
                else:
                    killer = SENDING_KILLER if kind == "sending" else RECORD_KILLER
                    arm_session_killer(url, 0, killer)
                    fired = wait_until(lambda: session_killer_fired(url, killer), 30, interval=0.02)
                    fault.detail = (("conexão morta no INSERT de 'enviando'" if kind == "sending"
                                     else "conexão morta no UPDATE do checkpoint") if fired
                                    else "o gatilho não disparou em 30 s")
                    if not fired:
                        violations.append(f"gatilho '{kind}' não disparou")
                faults.append(fault)
                print(f"  [{fault.offset:6.1f} s] {kind:<9} checkpoint antes={cp}  {fault.detail}",
                      flush=True)
            time.sleep(args.interval)
            writer.stop()
            writer.join(30)
            faults_done = time.monotonic() - started
            if not wait_until(pg_ready, 60):
                violations.append("o PostgreSQL não voltou")
            drained = wait_drained(api, url, args.timeout, work / "failed", stall=args.stall)
            drain_s = time.monotonic() - started
            if not drained:
                violations.append(f"o monitor não terminou de entregar (limite {args.timeout:.0f} s; "
                                  f"sem progresso por {args.stall:.0f} s encerra antes)")
            alive_at_end = monitor.alive()
            if not alive_at_end:
                violations.append("o monitor não estava mais rodando no fim")
        finally:
            if writer is not None:
                writer.stop()
            code = monitor.stop(60)
            watcher.stop()
        items = lab_item_ids(url)
        report = verify(api, url, items, work / "failed")
        state = api.state()

    # ------------------------------------------------------------------ analysis
    down = log_events(log_file, DOWN_LINE)
    back = log_events(log_file, BACK_LINE)
    per_fault, before = lines_per_fault(down, [f.started for f in faults])
    back_per_fault, _ = lines_per_fault(back, [f.started for f in faults])
    unexpected = count_in_log(log_file, UNEXPECTED_LINE)
    tracebacks = read_text(work / "monitor.out").count("Traceback")
    lock_lost = count_in_log(log_file, LOCK_LOST_LINE)
    lock_other = count_in_log(log_file, LOCK_OTHER_LINE)
    recua = count_in_log(log_file, "Checkpoint recua")
    skipped = watcher.violations(grace=0.0)

    if not report["ok"]:
        violations.append("entrega incorreta: " + ", ".join(
            f"{k}={report[k] if not isinstance(report[k], list) else _ids(report[k])}"
            for k in ("missing", "duplicates", "stored_and_failed", "failure_files_items",
                      "checkpoint", "last_id")))
    if code != 0:
        violations.append(f"o monitor saiu com código {code} ao receber SIGTERM")
    if len(down) > len(faults):
        violations.append(f"{len(down)} linhas '{DOWN_LINE}' para {len(faults)} quedas")
    def outage_open_at(when) -> bool:
        """A fault that lands while the previous outage is still being reported (no
        'restabelecida' yet) belongs to that outage: one line for both is right."""
        last_down = max((d for d in down if d <= when), default=None)
        last_back = max((b for b in back if b <= when), default=None)
        return last_down is not None and (last_back is None or last_back < last_down)

    for fault, n in zip(faults, per_fault):
        if n > 1:
            violations.append(f"queda '{fault.kind}' em {fault.offset:.1f} s registrada {n} vezes")
        if n == 0 and fault.kind in DETERMINISTIC and not outage_open_at(fault.started):
            violations.append(f"queda '{fault.kind}' em {fault.offset:.1f} s não foi registrada")
    if before:
        violations.append(f"{before} linhas '{DOWN_LINE}' antes de qualquer falha")
    if len(back) != len(down):
        violations.append(f"{len(down)} quedas registradas, mas {len(back)} linhas '{BACK_LINE}'")
    if unexpected or tracebacks:
        violations.append(f"queda do banco tratada como erro inesperado: {unexpected} linhas "
                          f"'{UNEXPECTED_LINE}', {tracebacks} tracebacks na saída")
    result = Result(0, list(violations), skipped, len(down), len(faults))
    if skipped:
        violations.append(f"o checkpoint passou de {len(skipped)} itens sem resultado registrado "
                          f"(ex.: {_ids(list(skipped))})")

    # ------------------------------------------------------------------ report
    new_items = len(items) - len(backlog)
    print()
    print("=== Falhas do banco de dados (monitor em laço, PostgreSQL, API falsa) ===")
    print(f"Backlog inicial: {args.solicitations} solicitações x {args.items} itens = "
          f"{len(backlog)} itens (semeado em {seed_s:.1f} s); novos durante as falhas: "
          f"{writer.committed if writer else 0} solicitações, {new_items} itens "
          f"(escritor: {writer.errors if writer else 0} transações perdidas por queda, refeitas).")
    print(f"Configuração: BEMSOFT_CONCURRENCY={args.concurrency}, BATCH_SIZE={args.batch_size}, "
          f"LOOKBACK_ITEMS={args.lookback}, latência da API {args.latency * 1000:.0f} ms.")
    print()
    rows = [[f"{f.offset:.1f}", f.kind, f.checkpoint, f.detail, n, b]
            for f, n, b in zip(faults, per_fault, back_per_fault)]
    print(format_table(["t (s)", "falha", "checkpoint antes", "detalhe", "linhas 'indisponível'",
                        "linhas 'restabelecida'"], rows))
    print()
    unnoticed = [f"{f.kind}@{f.offset:.1f}s" for f, n in zip(faults, per_fault) if n == 0]
    if unnoticed:
        print(f"Quedas que o monitor não chegou a sentir (nenhum comando falhou: o pool_pre_ping "
              f"reconectou antes): {', '.join(unnoticed)}.")
    print(f"Linhas '{DOWN_LINE}': {len(down)} para {len(faults)} quedas provocadas "
          f"(antes da 1ª falha: {before}); '{BACK_LINE}': {len(back)}.")
    print(f"Bloqueio de instância: {lock_lost} reconexões ('{LOCK_LOST_LINE}'), "
          f"{lock_other} avisos '{LOCK_OTHER_LINE}'; 'Checkpoint recua': {recua}.")
    print(f"Erros inesperados no ciclo: {unexpected}; tracebacks na saída: {tracebacks}.")
    print(f"Vigia do checkpoint: {watcher.samples} amostras ({watcher.failed_samples} durante "
          f"quedas), {len(watcher.checkpoints)} valores; itens abaixo do checkpoint sem "
          f"resultado: {len(skipped)}.")
    if faults:
        print(f"Fim das falhas em {faults_done:.1f} s; tudo entregue em {drain_s:.1f} s "
              f"(desde o início do monitor).")
    print(f"API: {state['posts']} POSTs {state['posts_by_status']}; itens guardados "
          f"{report['stored']} de {report['items']}; duplicados {len(report['duplicates'])}; "
          f"perdidos {len(report['missing'])}; arquivos de falha (itens) "
          f"{report['failure_files_items']}.")
    print(f"Checkpoint final {report['checkpoint']} (último CodItemSol {report['last_id']}); "
          f"código de saída do monitor (SIGTERM): {code}.")
    print(f"Pasta de trabalho (log e saída do monitor): {work}")
    print()
    if violations:
        print("VIOLAÇÕES:")
        for v in violations:
            print(f"  - {v}")
        result.code = 1
        return result
    print("OK: o monitor reconectou sozinho, registrou cada queda uma vez e não perdeu nem "
          "repetiu nada.")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _safe_checkpoint(url: str) -> int | None:
    try:
        return checkpoint(url)
    except Exception:  # noqa: BLE001 - during an outage
        return None


def _ids(ids: list[int], limit: int = 12) -> str:
    if len(ids) <= limit:
        return str(ids)
    return f"{ids[:limit]}... ({len(ids)} no total)"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--solicitations", type=int, default=6000,
                        help="solicitações no backlog inicial (padrão 6000)")
    parser.add_argument("--items", type=int, default=2, help="itens por solicitação (padrão 2)")
    parser.add_argument("--kills", type=int, default=5,
                        help="quedas por pg_terminate_backend (padrão 5)")
    parser.add_argument("--kill-burst", type=float, default=0.5,
                        help="segundos derrubando as sessões em cada queda (padrão 0,5)")
    parser.add_argument("--restarts", type=int, default=1,
                        help="reinícios do PostgreSQL (padrão 1; afeta todos os bancos da máquina)")
    parser.add_argument("--outages", type=int, default=1,
                        help="quedas longas só do banco de teste (padrão 1)")
    parser.add_argument("--outage-seconds", type=float, default=8.0,
                        help="duração de cada queda longa (padrão 8 s)")
    parser.add_argument("--kill-in-record", type=int, default=1,
                        help="quedas exatamente no UPDATE do checkpoint (padrão 1)")
    parser.add_argument("--kill-in-sending", type=int, default=0,
                        help="quedas exatamente no INSERT de 'enviando' em _MonitorItems; a 1ª "
                             "atinge a 1ª página do backlog (padrão 0)")
    parser.add_argument("--interval", type=float, default=2.0,
                        help="segundos entre as falhas (padrão 2)")
    parser.add_argument("--writer-rate", type=float, default=5.0,
                        help="solicitações novas por segundo durante as falhas (padrão 5)")
    parser.add_argument("--latency", type=float, default=0.01,
                        help="latência da API falsa em segundos (padrão 0,01)")
    parser.add_argument("--concurrency", type=int, default=4, help="BEMSOFT_CONCURRENCY (padrão 4)")
    parser.add_argument("--batch-size", type=int, default=500, help="BATCH_SIZE (padrão 500)")
    parser.add_argument("--lookback", type=int, default=1000, help="LOOKBACK_ITEMS (padrão 1000)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="espera máxima para entregar tudo depois das falhas (padrão 300 s)")
    parser.add_argument("--stall", type=float, default=30.0,
                        help="desiste antes se nada progredir por N segundos (padrão 30)")
    parser.add_argument("--seed", type=int, default=7, help="semente do escritor")
    parser.add_argument("--keep", action="store_true", help="mantém a pasta de trabalho")
    args = parser.parse_args(argv)
    counts = (args.kills, args.restarts, args.kill_in_record, args.kill_in_sending, args.outages)
    if not 0 <= args.outage_seconds <= 300:
        parser.error("--outage-seconds: de 0 a 300")
    if min(counts) < 0 or sum(counts) > 50:
        parser.error("--kills/--restarts/--kill-in-*: de 0 a 50 quedas no total")
    return args


def main(argv=None) -> int:
    return run(parse_args(argv)).code


if __name__ == "__main__":
    sys.exit(main())
