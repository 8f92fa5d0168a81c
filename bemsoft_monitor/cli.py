"""`python monitor_bemsoft.py`: the monitor's command line (thin: opens, calls, explains)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import threading

from .config import ConfigError, Settings, load_settings_or_report

log = logging.getLogger(__name__)

DESCRIPTION = """Monitor SQL -> Bemsoft: lê os itens de exames terceirizados do banco legado
(ItemSol + solicitacao + paciente), agrupa por solicitação e envia à API Bemsoft
(POST /requests), com checkpoint, retentativas, Idempotency-Key e pasta de falhas."""

EPILOG = """Sem opções, roda em laço até receber Ctrl+C / SIGTERM (termina a solicitação em
andamento antes de sair). Configuração: arquivo .env (veja .env.example)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monitor_bemsoft.py", description=DESCRIPTION,
                                     epilog=EPILOG)
    parser.add_argument("--env-file", metavar="ARQUIVO",
                        help="arquivo de configuração (padrão: .env ao lado do script)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true",
                      help="roda um ciclo (envia o que está pronto agora) e sai")
    mode.add_argument("--drain", action="store_true",
                      help="repete os ciclos até não restar nada a enviar e sai com código 0")
    mode.add_argument("--check", action="store_true",
                      help="valida a configuração, conecta ao banco, conta o backlog e carrega "
                           "o catálogo /tests; código de saída diferente de 0 se algo falhar")
    mode.add_argument("--status", action="store_true",
                      help="mostra checkpoint, backlog, arquivos de falha e a última entrega")
    mode.add_argument("--test-alert", action="store_true",
                      help="envia uma mensagem de teste por canal de alerta configurado (e-mail, "
                           "webhook, heartbeat); código 0 se todos enviaram, 1 se algum falhou")
    mode.add_argument("--trace", metavar="NÚMERO",
                      help="a história de uma solicitação (--trace 43335) ou de um item "
                           "(--trace item:52009): quando foi lida, cada envio com a chave e a "
                           "resposta, arquivo de falha e reenvio, o que está pendente e por quê; "
                           "código 0 se o monitor a registrou, 1 se nunca a registrou (e diz por quê)")
    mode.add_argument("--demo", action="store_true",
                      help="demonstração completa sem SQL Server, sem token e sem rede "
                           "(SQLite + API falsa local)")
    parser.add_argument("--dry-run", action="store_true",
                        help="força BEMSOFT_DRY_RUN=1: só imprime os payloads, não grava nada")
    parser.add_argument("--stop-file", metavar="ARQUIVO",
                        help="sai com segurança quando este arquivo aparecer (usado pelos atalhos em scripts/)")
    add_report_arguments(parser, mode)
    return parser


def add_report_arguments(parser, mode) -> None:
    """`--report PERIODO [--output ARQUIVO]` (bemsoft_monitor.report)."""
    mode.add_argument("--report", metavar="PERIODO",
                      help="relatório CSV (UTF-8 com BOM, separador ';') do que foi entregue e do "
                           "que falhou num dia (AAAA-MM-DD) ou num mês (AAAA-MM), com uma linha "
                           "final de totais; vai para a saída padrão ou para --output")
    parser.add_argument("--output", metavar="ARQUIVO",
                        help="com --report: grava o CSV neste arquivo")


def without_separators(argv) -> list[str]:
    """A lone `--` at either end is not an argument (a wrapper or PowerShell's -File may pass
    one on): dropped, so `monitor_bemsoft.py --once --` works."""
    args = list(sys.argv[1:] if argv is None else argv)
    while args and args[0] == "--":
        args.pop(0)
    while args and args[-1] == "--":
        args.pop()
    return args


def main(argv=None) -> int:
    args = build_parser().parse_args(without_separators(argv))
    if args.demo:
        from .demo import run_demo
        return run_demo()
    settings = load_settings_or_report(args.env_file, sys.stderr)
    if settings is None:
        return 2
    if args.dry_run:
        settings = settings.with_overrides(dry_run=True)
    if args.output and args.report is None:
        build_parser().error("--output só vale com --report")
    if args.report is not None:   # `--report ""` (an empty variable) is a bad period, not a start
        from .report import run_report
        return run_report(settings, args.report, args.output)

    from .app import setup_output
    reading = args.check or args.status or args.test_alert or args.trace is not None
    setup_output(settings, writes_files=not reading)
    if args.trace is not None:
        return run_trace(settings, args.trace)
    if args.test_alert:
        return run_test_alert(settings)
    if args.check:
        from .checks import run_checks
        return run_checks(settings)
    if args.status:
        from .checks import print_status
        return print_status(settings, env_file=args.env_file)
    return run_monitor(settings, "once" if args.once else "drain" if args.drain else "loop",
                       stop_file=args.stop_file, env_file=args.env_file)


def run_test_alert(settings: Settings, out=None) -> int:
    """`--test-alert`: one test message on each configured channel, one pt-BR line each."""
    from .alerts import send_test_alerts
    from .redaction import RedactedStream

    out = RedactedStream(out or sys.stdout, settings)
    results = send_test_alerts(settings)
    if not results:
        print("[ERRO] Nenhum canal de alerta configurado: defina ALERT_EMAIL_TO (com SMTP_HOST), "
              "ALERT_WEBHOOK_URL ou HEARTBEAT_URL no .env.", file=out, flush=True)
        return 1
    for name, target, error in results:
        if error is None:
            print(f"[OK]   {name} {target}: mensagem de teste enviada", file=out, flush=True)
        else:
            print(f"[ERRO] {name} {target}: {error}", file=out, flush=True)
    return 0 if all(error is None for _, _, error in results) else 1


def run_trace(settings: Settings, text: str, out=None) -> int:
    """`--trace`: an order's story in pt-BR. 0: the monitor has a record of it; 1: it never
    took it up (the story says why); 2: the search names nothing; 3: the database is down."""
    from sqlalchemy.exc import DBAPIError

    from .db import DatabaseUnavailable, connect_check, create_db_engine, describe_connect_error
    from .redaction import RedactedStream
    from .trace import QueryError, Tracer, parse_query, story_lines

    out = RedactedStream(out or sys.stdout, settings)
    try:
        query = parse_query(text)
    except QueryError as err:
        print(f"[ERRO] --trace {text!r}: {err}", file=out, flush=True)
        return 2
    engine = None
    try:
        engine = create_db_engine(settings)
        connect_check(engine, settings)
        story = Tracer(settings, engine).story(query)
    except ConfigError as err:
        print(f"[ERRO] {err}", file=out, flush=True)
        return 2
    except DatabaseUnavailable as err:
        print(f"[ERRO] {err}", file=out, flush=True)
        return 3
    except DBAPIError as err:
        print(f"[ERRO] Banco de dados: {describe_connect_error(err, settings)}", file=out, flush=True)
        return 3
    finally:
        if engine is not None:
            engine.dispose()
    for line in story_lines(story, settings.tz):
        print(line, file=out)
    out.flush()
    return 0 if story.found else 1


def run_monitor(settings: Settings, mode: str, stop_file: str | None = None,
                env_file: str | None = None) -> int:
    from .app import build_monitor, install_signal_handlers, watch_stop_file
    from sqlalchemy.exc import DBAPIError

    from .db import (DatabaseUnavailable, connect_check, create_db_engine, describe_connect_error,
                     describe_query_timeout, is_query_timeout)
    from .lock import InstanceLock
    from .monitor import StartError
    from .status import StatusBoard

    shutdown = threading.Event()
    install_signal_handlers(shutdown)
    if settings.concurrency > 1:
        # a sender whose answer arrived waits for the GIL while the main thread builds the
        # next page; 1 ms instead of the default 5 ms keeps that wait out of every POST
        sys.setswitchinterval(0.001)
    if stop_file:
        watch_stop_file(stop_file, shutdown)
    monitor = lock = metrics = None
    board = StatusBoard(tz=settings.tz, dry_run=settings.dry_run)
    alerter = _start_alerts(settings, board, env_file)
    try:
        engine = create_db_engine(settings)
        # DRY_RUN writes nothing and sends nothing: no lock needed. The monitor gets the lock
        # it verifies before each page; it is acquired below, before the monitor starts.
        lock = None if settings.dry_run else InstanceLock(engine, settings.monitor_name)
        monitor = build_monitor(settings, engine=engine, shutdown=shutdown, on_dry_run=_print_payload,
                                status=board, lock=lock)
        connect_check(engine, settings)
        if settings.metrics_port:  # before the lock: a standby shows its state too
            metrics = _start_metrics(monitor, settings, board, env_file, alerter)
            if metrics is None:
                return 2
        if lock is not None and not wait_for_lock(lock, mode, shutdown, standby_retry(settings),
                                                  status=board):
            return 0 if shutdown.is_set() else 4
        monitor.start()
        log.info("Monitor iniciado (%s): laboratórios %s, %s, concorrência %d.",
                 mode, ", ".join(settings.terceiros),
                 "DRY_RUN (nada é enviado nem gravado)" if settings.dry_run else settings.requests_url,
                 settings.concurrency)
        code = monitor.run(mode)
    except DatabaseUnavailable as err:
        log.error("%s", err)
        return 3
    except DBAPIError as err:  # --once: the database failed mid-cycle; nothing was lost
        if is_query_timeout(err):
            log.error("%s", describe_query_timeout(settings))
        else:
            log.error("Banco de dados falhou durante o ciclo: %s", describe_connect_error(err, settings))
        return 3
    except (ConfigError, StartError) as err:
        log.error("%s", err)
        return 2
    except Exception as err:  # --once/--drain: one line; the details at DEBUG
        log.debug("Erro inesperado", exc_info=True)
        log.error("Erro inesperado: %r. Nada foi perdido: o que não tem resultado registrado "
                  "será tentado de novo na próxima execução.", err)
        return 1
    finally:
        if monitor is not None:
            monitor.close()
        if lock is not None:
            lock.release()
        if metrics is not None:
            metrics.shutdown()
        if alerter is not None:  # what is queued gets a short chance to leave
            alerter.stop(flush=settings.alert_timeout)
    s = monitor.stats
    log.info("Monitor encerrado: %d solicitações entregues (%d itens), %d com falha, checkpoint %s.",
             s.delivered, s.delivered_items, s.failed, monitor.checkpoint)
    return code


def _start_alerts(settings: Settings, board, env_file: str | None):
    """The alerts' thread (not in DRY_RUN: it sends nothing), and the log file reporting a
    write it could not make."""
    from .alerts import build_alerter
    from .app import watch_log_file
    from .console.words import replay_command

    if settings.dry_run:
        return None
    watch_log_file(lambda problem: board.disk_error("LOG_FILE", problem))
    alerter = build_alerter(settings, board, replay=replay_command(settings.failed_dir, env_file))
    return alerter.start() if alerter is not None else None


def _start_metrics(monitor, settings: Settings, board, env_file: str | None, alerter=None):
    """/metrics, /healthz and the operator console at /; None if the port cannot be opened."""
    from .console import Console
    from .metrics import start_metrics_server

    from .trace import Tracer

    console = Console(board, settings, env_file=env_file, alerts=alerter,
                      trace=Tracer(settings, monitor.source.engine))
    console.scan.warm()
    try:
        return start_metrics_server(monitor, settings.metrics_port, settings.health_max_age,
                                    settings.metrics_host, console=console)
    except OSError as err:
        log.error("Não foi possível abrir METRICS_PORT=%s em %s: %s", settings.metrics_port,
                  settings.metrics_host, err)
        return None


def wait_for_lock(lock, mode: str, shutdown: threading.Event, retry_every: float = 15.0,
                  status=None) -> bool:
    """Single instance: --once/--drain exit at once (an error trying propagates); the loop
    waits as a standby, and an error while waiting (database down, lock file unreadable)
    is logged and waited out, never the end of the process."""
    from .db import first_line
    if mode != "loop":
        if lock.acquire():
            return True
        log.error("Outro monitor '%s' já está ativo neste banco (%s); nada foi feito. "
                  "Pare o outro ou use outro MONITOR_NAME.", lock.name, lock.describe())
        return False
    standby = failing = False
    while True:
        try:
            if lock.acquire():
                if standby or failing:
                    log.info("Bloqueio obtido: este monitor assume o envio.")
                return True
            if failing:
                log.info("Banco acessível de novo; o bloqueio continua com o outro monitor.")
                failing = False
            if not standby:
                log.warning("Outro monitor '%s' já está ativo neste banco (%s). Este fica em "
                            "espera e assume quando o outro parar (nova tentativa a cada %.0f s).",
                            lock.name, lock.describe(), retry_every)
                standby = True
                if status is not None:
                    status.standby()
        except Exception as err:  # the standby outlives any outage: log it once, keep waiting
            log.debug("Falha ao tentar obter o bloqueio", exc_info=True)
            if not failing:
                log.warning("Não foi possível verificar o bloqueio de instância (%s): %s. Este "
                            "monitor continua em espera e tenta de novo a cada %.0f s.",
                            lock.describe(), first_line(err), retry_every)
                failing = True
        if shutdown.wait(retry_every):
            return False


def standby_retry(settings: Settings) -> float:
    """How often a standby monitor tries the lock: the polling interval, between 1 and 15 s
    (one trivial query each time)."""
    return min(15.0, max(1.0, settings.poll_seconds))


def _print_payload(payload: dict, key: str) -> None:
    print(f"[DRY_RUN] Idempotency-Key: {key}")
    print(json.dumps(payload, ensure_ascii=False, indent=2), flush=True)
