"""`python retry_failed.py`: replays failure files (thin CLI over bemsoft_monitor.replay)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from pathlib import Path

from .config import load_settings_or_report
from .redaction import redact

log = logging.getLogger(__name__)

DESCRIPTION = """Reprocessa as falhas salvas em FAILED_DIR: remonta o pedido a partir do evento
guardado, com a configuração e o catálogo atuais (um mapeamento corrigido ou um exame recém
cadastrado passam a valer), e envia à Bemsoft. Sem --send, só mostra o que faria."""

EPILOG = """Cada arquivo enviado com sucesso sai de FAILED_DIR (vai para --move-ok, padrão:
a pasta 'sent' ao lado de FAILED_DIR), então nunca é reenviado. Um arquivo ilegível é
informado e deixado no lugar. Código de saída 1 se algum arquivo falhar."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retry_failed.py", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--env-file", metavar="ARQUIVO",
                        help="arquivo de configuração (padrão: .env ao lado do script)")
    parser.add_argument("--dir", metavar="PASTA", help="pasta das falhas (padrão: FAILED_DIR)")
    parser.add_argument("--file", metavar="ARQUIVO", action="append",
                        help="processa só este arquivo (pode repetir)")
    parser.add_argument("--send", action="store_true",
                        help="envia de fato (força BEMSOFT_DRY_RUN=0 neste processo)")
    parser.add_argument("--move-ok", metavar="PASTA",
                        help="para onde mover os arquivos enviados com sucesso")
    parser.add_argument("--limit", type=int, metavar="N", help="processa no máximo N arquivos")
    parser.add_argument("--verbose", action="store_true",
                        help="mostra o payload e a resposta da API de cada arquivo")
    parser.add_argument("--watch", type=float, metavar="SEGUNDOS",
                        help="repete a cada N segundos até receber Ctrl+C / SIGTERM")
    parser.add_argument("--stop-file", metavar="ARQUIVO",
                        help="sai com segurança quando este arquivo aparecer (usado pelos scripts)")
    return parser


def main(argv=None, out=None) -> int:
    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        print("Opção inválida: --limit deve ser um número inteiro >= 1", file=sys.stderr)
        return 2
    settings = load_settings_or_report(args.env_file, sys.stderr)
    if settings is None:
        return 2
    if args.send:
        if not settings.token:
            print("Configuração inválida: BEMSOFT_TOKEN é obrigatório para --send", file=sys.stderr)
            return 2
        settings = settings.with_overrides(dry_run=False)

    from .app import install_signal_handlers, make_catalog, setup_output, watch_stop_file
    from .client import BemsoftClient
    from .retry import PauseGate

    setup_output(settings, writes_files=args.send)
    directory = Path(args.dir) if args.dir else settings.failed_dir
    move_ok = Path(args.move_ok) if args.move_ok else directory.parent / "sent"
    shutdown = threading.Event()
    install_signal_handlers(shutdown)
    if args.stop_file:
        watch_stop_file(args.stop_file, shutdown)
    client = BemsoftClient(settings, PauseGate(shutdown)) if settings.token else None
    catalog = make_catalog(settings, client)
    history = None
    if args.send:  # what it sends goes into the order history, when the database is reachable
        from .history import ReplayHistory
        history = ReplayHistory.open(settings)
    try:
        while True:
            try:
                code = replay_once(args, settings, client, catalog, directory, move_ok, out,
                                   shutdown, history)
            except Exception as err:  # --watch goes on: the next round may work
                if not args.watch:
                    raise
                log.error("Rodada de reenvio falhou (%s); nova tentativa em %g s.",
                          redact(repr(err), settings), args.watch)
                code = 1
            if not args.watch or shutdown.wait(args.watch):
                return code
    finally:
        if client:
            client.close()
        if history is not None:
            history.close()


def show(text: str, out, settings, *, lines: bool = False) -> None:
    """Print one line (several with `lines`), redacted, even when it holds text the console
    cannot encode (a lone surrogate read from a failure file): such characters are shown
    escaped, as are control characters and, in one line, newlines."""
    encoding = getattr(out, "encoding", None) or "utf-8"
    text = redact(text, settings, one_line=not lines)
    text = text.encode(encoding, "backslashreplace").decode(encoding, "replace")
    print(text, file=out, flush=True)


def replay_once(args, settings, client, catalog, directory: Path, move_ok: Path, out,
                shutdown: threading.Event | None = None, history=None) -> int:
    """One round over the failure files; a stop asked meanwhile (Ctrl+C, SIGTERM, the stop
    file) ends it after the file being sent, the others stay for the next round."""
    from .failures import FailureStore, release_stale_claims
    from .replay import ReplayStatus, replay_file
    OK, WOULD_SEND, FAILED, SKIPPED, REFUSED = (ReplayStatus.OK, ReplayStatus.WOULD_SEND,
                                                ReplayStatus.FAILED, ReplayStatus.SKIPPED,
                                                ReplayStatus.TOKEN_REFUSED)

    if args.file:
        paths = [Path(f) for f in args.file]
    else:
        for path in release_stale_claims(directory):
            log.warning("Arquivo %s estava preso por um reenvio interrompido; liberado.", path.name)
        paths = FailureStore(directory).files()
    if args.limit:
        paths = paths[:args.limit]
    counts = {OK: 0, WOULD_SEND: 0, FAILED: 0, SKIPPED: 0}
    for done, path in enumerate(paths):
        if shutdown is not None and shutdown.is_set():
            show(f"Parada pedida: {len(paths) - done} arquivo(s) ficam para a próxima rodada.",
                 out, settings)
            paths = paths[:done]
            break
        if not path.exists():
            show(f"[ERRO] {path}: arquivo não encontrado", out, settings)
            counts[FAILED] += 1
            continue
        try:
            result = replay_file(path, settings, client, catalog, send=args.send, move_ok=move_ok)
        except Exception as err:  # one bad file is reported; the others still go
            log.debug("Erro inesperado em %s", path.name, exc_info=True)
            show(f"[ERRO] {path.name}: erro inesperado: {err!r}", out, settings)
            counts[FAILED] += 1
            continue
        if result.status == REFUSED:  # the installation's problem: stop, touch nothing more
            left = len(paths) - done
            show(f"[PARADO] {result.message}. Nenhum arquivo foi alterado; {left} arquivo(s) "
                 "continuam em FAILED_DIR para depois que o token for corrigido.", out, settings)
            counts[FAILED] += 1
            paths = paths[:done + 1]
            break
        counts[result.status] += 1
        if history is not None:
            history.add(result.record, result.delivery, result.key, path.name)
        label = {OK: "[OK]", WOULD_SEND: "[DRY-RUN]", FAILED: "[ERRO]", SKIPPED: "[PULADO]"}[result.status]
        show(f"{label} {path.name}: {result.message}", out, settings)
        if result.payload is not None and (args.verbose or not args.send):
            show(json.dumps(result.payload, ensure_ascii=False, indent=2), out, settings, lines=True)
        if args.verbose and result.delivery is not None:
            show(f"      HTTP {result.delivery.status}, {result.delivery.attempts} tentativa(s): "
                 f"{result.delivery.shown_body(settings)}", out, settings)
    show(f"Resumo: {len(paths)} arquivo(s); enviados {counts[OK]}, com erro {counts[FAILED]}, "
         f"a enviar (dry-run) {counts[WOULD_SEND]}, pulados {counts[SKIPPED]}.", out, settings)
    if history is not None and history.problem and (counts[OK] or counts[FAILED]):
        show(f"Histórico (_MonitorHistory) não gravado: {history.problem}. Os reenvios acima "
             "valem do mesmo jeito.", out, settings)
    return 1 if counts[FAILED] else 0
