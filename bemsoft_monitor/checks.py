"""`--check` and `--status`: what an operator runs to see whether the set-up works and
where things stand. Output is pt-BR text on stdout."""
from __future__ import annotations

import datetime as dt
import logging
import sys
import time

from .catalog import Catalog, CatalogUnavailable
from .client import ApiError, BemsoftClient
from .config import ConfigError, Settings
from .failures import FailureStore
from .monitor import count_items
from .redaction import RedactedStream

log = logging.getLogger(__name__)


def _line(ok: bool | None, text: str, out) -> None:
    mark = {True: "[OK]  ", False: "[ERRO]", None: "[AVISO]"}[ok]
    print(f"{mark} {text}", file=out, flush=True)


def run_checks(settings: Settings, out=None) -> int:
    from .db import DatabaseUnavailable, connect_check, create_db_engine
    from .source import LegacySource

    out = RedactedStream(out or sys.stdout, settings)
    problems = 0
    _line(True, f"Configuração válida (laboratórios: {', '.join(settings.terceiros)}; "
                f"DRY_RUN={'1' if settings.dry_run else '0'})", out)
    engine = None
    try:
        engine = create_db_engine(settings)
        connect_check(engine, settings)
    except (DatabaseUnavailable, ConfigError) as err:
        _line(False, str(err), out)
        problems += 1
    else:
        _line(True, f"Banco de dados acessível ({engine.dialect.name})", out)
        source = LegacySource(engine, settings.monitor_name, settings.terceiros)
        try:
            has_state = source.state_tables_exist()
            checkpoint = source.read_checkpoint() if has_state else None
            if checkpoint is None:
                total = source.count_backlog(0)
                start = settings.start_from
                msg = (f"Sem checkpoint ainda (primeira execução): {count_items(total)} de apoio no banco; "
                       + (f"START_FROM={start}" if start is not None else
                          "defina START_FROM (latest, 0 ou um CodItemSol) antes de iniciar"))
                _line(True if start is not None else False, msg, out)
                problems += start is None
            else:
                _line(True, f"Checkpoint {checkpoint}; backlog: "
                            f"{count_items(source.count_backlog(checkpoint))}", out)
        except Exception as err:  # report, do not crash the check
            _line(False, f"Não foi possível ler as tabelas do legado: {err}", out)
            problems += 1
    finally:
        if engine is not None:
            engine.dispose()

    for ok, text in describe_route(settings):
        _line(ok, text, out)
    for ok, text in describe_alerts(settings):
        _line(ok, text, out)
    if settings.token:
        client = BemsoftClient(settings)
        catalog = Catalog(client.fetch_tests, settings.tests_ttl)
        try:
            catalog.refresh()
            _line(True, f"Catálogo /tests carregado com o token: {catalog.size()} exames", out)
            missing = sorted({m.test_id for m in settings.test_map.values()} - set(catalog._by_id))
            if missing:
                _line(None, "Códigos do BEMSOFT_TEST_MAP_PATH ausentes do catálogo: "
                            + ", ".join(missing), out)
        except (CatalogUnavailable, ApiError) as err:
            _line(False, f"Catálogo /tests: {err}", out)
            problems += 1
        finally:
            client.close()
    elif settings.dry_run:
        _line(None, "Sem BEMSOFT_TOKEN: DRY_RUN usará o material fictício SPECIMEN-TEST", out)
    failures = FailureStore(settings.failed_dir).files()
    if failures:
        _line(None, f"{len(failures)} arquivo(s) de falha em {settings.failed_dir} "
                    "(reenvie com retry_failed.py)", out)
    print(("Tudo certo." if not problems else f"{problems} problema(s) encontrado(s)."),
          file=out, flush=True)
    return 1 if problems else 0


def describe_route(settings: Settings) -> list[tuple[bool | None, str]]:
    """How the monitor reaches the API: which proxy (credentials masked) and which CAs."""
    lines = []
    proxy = settings.proxy
    if proxy is None:
        lines.append((True, f"Rota até a API: direta, sem proxy ({settings.base_url})"))
    else:
        lines.append((True, f"Rota até a API: via proxy {proxy.display} (de {proxy.source})"))
    if not settings.base_url.startswith("https"):
        lines.append((None, f"BEMSOFT_BASE_URL usa http:// sem criptografia ({settings.base_url})"))
    elif not settings.verify_tls:
        lines.append((None, "BEMSOFT_VERIFY=0: o certificado da API NÃO é verificado"))
    elif settings.ca_bundle is not None:
        lines.append((True, f"Certificados: os do sistema + BEMSOFT_CA_BUNDLE={settings.ca_bundle}"))
    else:
        lines.append((True, "Certificados: os do sistema (sem BEMSOFT_CA_BUNDLE)"))
    return lines


def describe_alerts(settings: Settings) -> list[tuple[bool | None, str]]:
    """The configured alert channels (secrets never shown), or a warning that nobody is told."""
    from .alerts import describe_channels
    channels = describe_channels(settings)
    if not channels:
        return [(None, "Nenhum canal de alerta configurado (ALERT_EMAIL_TO, ALERT_WEBHOOK_URL, "
                       "HEARTBEAT_URL): ninguém será avisado quando algo precisar de uma pessoa")]
    lines = [(True, f"Alertas por {name}: {target}") for name, target in channels]
    lines.append((True, "Teste os canais com: python monitor_bemsoft.py --test-alert"))
    return lines


def print_status(settings: Settings, out=None, env_file: str | None = None) -> int:
    """Checkpoint, backlog and last delivery from the database; FAILED_DIR grouped by reason.
    The words are the operator console's (bemsoft_monitor.console.words), so both say the same."""
    from sqlalchemy.exc import DBAPIError

    from .console.scan import FailureScan
    from .console.words import (backlog_text, checkpoint_text, failure_lines, last_delivery_text,
                                replay_command)
    from .db import DatabaseUnavailable, connect_check, create_db_engine, describe_connect_error
    from .source import LegacySource

    out = RedactedStream(out or sys.stdout, settings)
    code = 0
    engine = None
    try:
        engine = create_db_engine(settings)
        connect_check(engine, settings)
        source = LegacySource(engine, settings.monitor_name, settings.terceiros)
        token = None
        if source.state_tables_exist():
            checkpoint = source.read_checkpoint()
            last = source.last_delivery()
            token = source.read_note(source.token_note_name)
        else:
            checkpoint, last = None, None
        if checkpoint is None:
            print(f"Checkpoint: nenhum (o monitor '{settings.monitor_name}' ainda não rodou)", file=out)
            print(f"Backlog: {count_items(source.count_backlog(0))} de apoio no banco", file=out)
        else:
            print(f"Checkpoint: {checkpoint_text(checkpoint)}", file=out)
            print(f"Backlog: {backlog_text(source.count_backlog(checkpoint))}", file=out)
        when = None if last is None else last.replace(tzinfo=dt.timezone.utc).timestamp()
        print(f"Última entrega: {last_delivery_text(when, time.time(), settings.tz)}", file=out)
        if token is not None:
            status, since = token
            since_ts = since.replace(tzinfo=dt.timezone.utc).timestamp()
            print(f"Envio: Token recusado pela API (HTTP {status}) desde "
                  f"{last_delivery_text(since_ts, time.time(), settings.tz)}: confira "
                  "BEMSOFT_TOKEN no .env. Nada vai para FAILED_DIR; o monitor retoma sozinho "
                  "quando o token for aceito.", file=out)
    except (DatabaseUnavailable, ConfigError) as err:
        print(f"Banco de dados: {err}", file=out)
        code = 1
    except DBAPIError as err:  # connected, but the tables cannot be read
        print(f"Banco de dados: {describe_connect_error(err, settings)}", file=out)
        code = 1
    finally:
        if engine is not None:
            engine.dispose()
    summary = FailureScan(settings.failed_dir).summary()
    for line in failure_lines(summary, settings.tz, replay_command(settings.failed_dir, env_file)):
        print(line, file=out)
    out.flush()
    return code
