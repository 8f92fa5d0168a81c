"""`python monitor_bemsoft.py`: the monitor's command line (thin: opens, calls, explains)."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

from .config import ConfigError, Settings, load_settings

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
    mode.add_argument("--demo", action="store_true",
                      help="demonstração completa sem SQL Server, sem token e sem rede "
                           "(SQLite + API falsa local)")
    parser.add_argument("--dry-run", action="store_true",
                        help="força BEMSOFT_DRY_RUN=1: só imprime os payloads, não grava nada")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.demo:
        from .demo import run_demo
        return run_demo()
    try:
        settings = load_settings(args.env_file)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    if args.dry_run:
        settings = settings.with_overrides(dry_run=True)

    from .app import setup_logging
    setup_logging(settings, to_file=not (args.check or args.status))
    if args.check:
        from .checks import run_checks
        return run_checks(settings)
    if args.status:
        from .checks import print_status
        return print_status(settings)
    return run_monitor(settings, "once" if args.once else "drain" if args.drain else "loop")


def run_monitor(settings: Settings, mode: str) -> int:
    from .app import build_monitor
    from .db import DatabaseUnavailable, connect_check
    from .monitor import StartError

    shutdown = threading.Event()
    _install_signal_handlers(shutdown)
    monitor = build_monitor(settings, shutdown=shutdown, on_dry_run=_print_payload)
    try:
        connect_check(monitor.source.engine, settings)
        monitor.start()
        log.info("Monitor iniciado (%s): laboratórios %s, %s, concorrência %d.",
                 mode, ", ".join(settings.terceiros),
                 "DRY_RUN (nada é enviado nem gravado)" if settings.dry_run else settings.requests_url,
                 settings.concurrency)
        code = monitor.run(mode)
    except DatabaseUnavailable as err:
        log.error("%s", err)
        return 3
    except StartError as err:
        log.error("%s", err)
        return 2
    finally:
        monitor.close()
    s = monitor.stats
    log.info("Monitor encerrado: %d solicitações entregues (%d itens), %d com falha, checkpoint %s.",
             s.delivered, s.delivered_items, s.failed, monitor.checkpoint)
    return code


def _print_payload(payload: dict, key: str) -> None:
    print(f"[DRY_RUN] Idempotency-Key: {key}")
    print(json.dumps(payload, ensure_ascii=False, indent=2), flush=True)


def _install_signal_handlers(shutdown: threading.Event) -> None:
    def handler(signum, frame):
        if not shutdown.is_set():
            log.info("Sinal %s recebido: terminando a solicitação em andamento e saindo.", signum)
        shutdown.set()

    for name in ("SIGINT", "SIGTERM", "SIGBREAK"):
        sig = getattr(signal, name, None)
        if sig is not None:
            try:
                signal.signal(sig, handler)
            except ValueError:  # not in the main thread (embedded use)
                pass
