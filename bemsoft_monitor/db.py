"""Database connection: the SQLAlchemy engine for the legacy LIS database and a clear,
one-line pt-BR explanation when it cannot be reached.

SQL Server is reached through pyodbc and Microsoft's ODBC driver. pyodbc is imported only
when SQL Server is actually used, so SQLite/PostgreSQL set-ups (tests, DATABASE_URL) work
without unixODBC installed.

Password hygiene: the password never appears in the engine URL (it is added to the ODBC
connection string only at connect time, see `create_db_engine`), in a log line or in a
message built here; driver texts quoted in messages are scrubbed as well.
"""
from __future__ import annotations

import logging
import re
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.pool import StaticPool

from .config import ConfigError, Settings
from .redaction import redact
from .schema import MONITOR_SCHEMA

log = logging.getLogger(__name__)

APP_NAME = "bemsoft-monitor"
RECOMMENDED_DRIVER = "ODBC Driver 18 for SQL Server"

# Monitor-owned tables are declared with `schema=MONITOR_SCHEMA`; the engine translates it
# to `dbo` on SQL Server and to the default schema (no prefix) elsewhere.
MSSQL_MONITOR_SCHEMA = "dbo"

# ODBC connection attribute set before connecting (sql.h): SQL_ATTR_LOGIN_TIMEOUT.
# Used instead of a connection-string keyword: ODBC Driver 18 only understands
# `ConnectTimeout` from v18.7 on and silently ignores `Connection Timeout` (ADO.NET
# spelling), so the attribute is the one way that works on every 17.x/18.x driver.
SQL_ATTR_LOGIN_TIMEOUT = 103

_ODBC_SPECIAL = re.compile(r"[;{}=]")


class DatabaseUnavailable(Exception):
    """The database cannot be used. `str()` is one pt-BR line for the operator."""

    def __init__(self, message: str = "Banco de dados indisponível."):
        super().__init__(message)


# --------------------------------------------------------------------------- ODBC string

def odbc_escape(value: str) -> str:
    """Quote one ODBC connection-string value when needed: values holding `;`, `{`, `}`,
    `=` or leading/trailing spaces are wrapped in braces, with every `}` doubled."""
    value = str(value)
    if _ODBC_SPECIAL.search(value) or value != value.strip():
        return "{" + value.replace("}", "}}") + "}"
    return value


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def odbc_connection_string(settings: Settings, *, include_password: bool = True) -> str:
    """The ODBC connection string for SQL Server built from DB_* settings.

    DB_SERVER goes as given: `host`, `host\\INSTANCE` (needs the SQL Server Browser),
    `host,port` or `tcp:host,port`. An empty DB_USER means Windows (integrated)
    authentication. The login timeout is not part of the string (see
    SQL_ATTR_LOGIN_TIMEOUT); `create_db_engine` applies DB_LOGIN_TIMEOUT.
    With include_password=False the PWD part is left out (for anything that may be
    shown or logged)."""
    driver = settings.odbc_driver or RECOMMENDED_DRIVER
    parts = [
        "DRIVER={" + driver.replace("}", "}}") + "}",
        f"SERVER={odbc_escape(settings.db_server)}",
        f"DATABASE={odbc_escape(settings.db_name)}",
    ]
    if settings.db_user:
        parts.append(f"UID={odbc_escape(settings.db_user)}")
        if include_password:
            parts.append(f"PWD={odbc_escape(settings.db_pass)}")
    else:
        parts.append("Trusted_Connection=yes")
    parts += [
        f"Encrypt={_yes_no(settings.db_encrypt)}",
        f"TrustServerCertificate={_yes_no(settings.db_trust_cert)}",
        f"APP={APP_NAME}",
    ]
    return ";".join(parts)


# --------------------------------------------------------------------------- engine

def is_mssql(settings: Settings) -> bool:
    if not settings.database_url:
        return True
    return settings.database_url.split(":", 1)[0].split("+", 1)[0].lower() == "mssql"


def monitor_schema_map(dialect_name: str) -> dict[str, str | None]:
    """schema_translate_map for monitor-owned tables on the given dialect."""
    return {MONITOR_SCHEMA: MSSQL_MONITOR_SCHEMA if dialect_name == "mssql" else None}


def create_db_engine(settings: Settings) -> Engine:
    """The engine for the configured database (nothing is connected yet).

    DATABASE_URL, when set, wins (SQLite/PostgreSQL in tests, or any SQLAlchemy URL);
    otherwise SQL Server through pyodbc with the DB_* settings. Raises ConfigError for an
    unusable DATABASE_URL and DatabaseUnavailable when the SQL Server client stack
    (pyodbc / unixODBC) is missing."""
    if settings.database_url:
        engine = _create_url_engine(settings)
    else:
        engine = _create_mssql_engine(settings)
    return engine.execution_options(schema_translate_map=monitor_schema_map(engine.dialect.name))


def _create_url_engine(settings: Settings) -> Engine:
    try:
        url = make_url(settings.database_url)
    except ArgumentError:
        raise ConfigError("DATABASE_URL", "não é uma URL do SQLAlchemy válida "
                                          "(ex.: postgresql+psycopg://usuario@host/base)") from None
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    backend = url.get_backend_name()
    pyodbc_engine = backend == "mssql" and url.get_driver_name() == "pyodbc"
    if backend == "sqlite":
        # `timeout`: how long a statement waits for another connection's lock (busy timeout)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": settings.db_query_timeout}
        if _is_sqlite_memory(url):
            # One shared connection, or every pool checkout would see an empty database.
            kwargs["poolclass"] = StaticPool
    elif backend == "postgresql" and url.get_driver_name() in ("psycopg", "psycopg2"):
        # statement_timeout bounds every statement (DB_QUERY_TIMEOUT), waits for locks included
        options = f"-c statement_timeout={settings.db_query_timeout * 1000}"
        if url.query.get("options"):
            options = f"{url.query['options']} {options}"
        kwargs["connect_args"] = {"connect_timeout": settings.db_login_timeout, "options": options}
    elif pyodbc_engine:
        kwargs["fast_executemany"] = True
    try:
        engine = create_engine(url, **kwargs)
    except NoSuchModuleError:
        raise ConfigError("DATABASE_URL", f"usa um tipo de banco desconhecido: "
                                          f"{url.drivername!r} (ex.: sqlite:///arquivo.db, "
                                          "postgresql+psycopg://usuario@host/base)") from None
    except ImportError as err:
        raise DatabaseUnavailable(
            f"Não foi possível usar DATABASE_URL ({url.drivername}): o pacote Python do "
            f"driver não está instalado ({err.name or err}). Instale-o com pip.") from err
    if pyodbc_engine:
        _bound_odbc_statements(engine, settings.db_query_timeout)
    return engine


def _is_sqlite_memory(url: URL) -> bool:
    database = url.database or ""
    return (database in ("", ":memory:") or database.startswith("file::memory:")
            or url.query.get("mode") == "memory")


def _create_mssql_engine(settings: Settings) -> Engine:
    try:
        import pyodbc  # noqa: F401  (only SQL Server needs it)
    except ImportError as err:
        raise DatabaseUnavailable(_pyodbc_import_message(err)) from err

    # The URL (which SQLAlchemy may show in reprs and logs) carries no password; it is
    # appended to the connection string only when a connection is opened.
    url = URL.create("mssql+pyodbc",
                     query={"odbc_connect": odbc_connection_string(settings, include_password=False)})
    engine = create_engine(
        url,
        pool_pre_ping=True,
        fast_executemany=True,
        connect_args={"attrs_before": {SQL_ATTR_LOGIN_TIMEOUT: int(settings.db_login_timeout)}},
    )
    _bound_odbc_statements(engine, settings.db_query_timeout)
    if settings.db_user:
        password_part = f"PWD={odbc_escape(settings.db_pass)}"

        @event.listens_for(engine, "do_connect")
        def _add_password(dialect, conn_rec, cargs, cparams):
            cargs[0] = f"{cargs[0]};{password_part}"

    return engine


def _bound_odbc_statements(engine: Engine, seconds: int) -> None:
    """DB_QUERY_TIMEOUT on SQL Server: pyodbc's `Connection.timeout` (the ODBC statement
    attribute SQL_ATTR_QUERY_TIMEOUT of every cursor of the connection). A statement that
    waits longer, e.g. a READ COMMITTED read queued behind a writer's open transaction, is
    cancelled by the driver with SQLSTATE HYT00 (see is_query_timeout)."""

    @event.listens_for(engine, "connect")
    def _set_query_timeout(dbapi_conn, conn_rec):
        dbapi_conn.timeout = seconds


def _pyodbc_import_message(err: ImportError) -> str:
    detail = str(err)
    if "libodbc" in detail:
        return ("Não foi possível usar o SQL Server: a biblioteca do unixODBC não está "
                "instalada (libodbc). No Linux instale o pacote 'unixodbc' e o "
                f"'{RECOMMENDED_DRIVER}' da Microsoft.")
    return ("Não foi possível usar o SQL Server: o pacote Python 'pyodbc' não está "
            "instalado ou não carregou. Instale-o com 'pip install pyodbc'.")


# --------------------------------------------------------------------------- errors

def server_label(settings: Settings) -> str:
    """The server as the operator configured it (never with a password)."""
    if not settings.database_url:
        return settings.db_server
    try:
        url = make_url(settings.database_url)
    except ArgumentError:
        return "DATABASE_URL"
    if url.get_backend_name() == "sqlite":
        return url.database or ":memory:"
    host = url.host or "localhost"
    return f"{host}:{url.port}" if url.port else host


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of a database (or any) error, for one log line."""
    text = str(getattr(err, "orig", None) or err).strip().splitlines()
    return text[0][:limit] if text else type(err).__name__


def _root_error(err: BaseException) -> BaseException:
    """The DBAPI error under SQLAlchemy's wrapper (or under our own re-raise)."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        orig = getattr(err, "orig", None)
        if isinstance(orig, BaseException):
            err = orig
            continue
        if isinstance(err, DatabaseUnavailable) and err.__cause__ is not None:
            err = err.__cause__
            continue
        break
    return err


def _error_text(err: BaseException) -> str:
    args = getattr(err, "args", ())
    # pyodbc: args = (sqlstate, message); the message already repeats the state.
    if (len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str)
            and re.fullmatch(r"[0-9A-Z]{5}", args[0])):
        return args[1] if args[0] in args[1] else f"[{args[0]}] {args[1]}"
    return str(err)


def _scrub(message: str, settings: Settings) -> str:
    """One line, without the password, trimmed to a readable length."""
    message = " ".join(redact(message, settings).split())
    return message if len(message) <= 400 else message[:397] + "..."


def _driver_detail(raw: str) -> str:
    """Driver text without the vendor prefixes and the ODBC function name."""
    detail = re.sub(r"\[(unixODBC|Microsoft|Driver Manager|ODBC Driver [^\]]*|SQL Server)\]", "", raw)
    detail = re.sub(r"\s*\((SQLDriverConnect|SQLConnect)\)", "", detail)
    detail = re.sub(r"\[[0-9A-Z]{5}\]\s*", "", detail)
    detail = re.sub(r"\s*\((0|-1)\)(?=\s*(;|$))", "", detail)
    return detail.strip(" ;")


def installed_odbc_drivers() -> list[str] | None:
    """`pyodbc.drivers()`, or None when pyodbc/unixODBC cannot be loaded."""
    try:
        import pyodbc
        return list(pyodbc.drivers())
    except Exception:  # ImportError, pyodbc.Error: nothing more to say than "unknown"
        return None


def describe_connect_error(err: BaseException, settings: Settings) -> str:
    """One pt-BR line explaining why connecting failed, naming the server and what to fix.
    Never contains the password."""
    root = _root_error(err)
    raw = _error_text(root)
    low = raw.lower()
    states = set(re.findall(r"\[([0-9A-Z]{5})\]", raw))
    args = getattr(root, "args", ())
    if args and isinstance(args[0], str) and re.fullmatch(r"[0-9A-Z]{5}", args[0]):
        states.add(args[0])
    numbers = set(re.findall(r"\((\d+)\)", raw))
    mssql = is_mssql(settings)
    server = server_label(settings)
    detail = _scrub(_driver_detail(raw), settings)

    if mssql and not settings.database_url:
        where = f"Não foi possível conectar ao SQL Server '{server}' (DB_SERVER)"
        if settings.db_name:
            where += f", base '{settings.db_name}'"
    elif mssql:
        where = f"Não foi possível conectar ao SQL Server '{server}' (DATABASE_URL)"
    else:
        where = f"Não foi possível conectar ao banco '{server}' (DATABASE_URL)"
    user = settings.db_user
    if settings.database_url:
        try:
            user = make_url(settings.database_url).username or ""
        except ArgumentError:
            user = ""

    if isinstance(root, ImportError):
        return _pyodbc_import_message(root) if mssql else f"{where}: {detail}"

    # ODBC driver not found / not loadable.
    if ("IM002" in states or "can't open lib" in low or "data source name not found" in low
            or ("01000" in states and "file not found" in low)):
        drivers = installed_odbc_drivers()
        if drivers is None:
            listed = "não foi possível listá-los"
        else:
            listed = ", ".join(f"'{d}'" for d in drivers) or "nenhum"
        return (f"{where}: o driver ODBC '{settings.odbc_driver}' (ODBC_DRIVER) não foi "
                f"encontrado ou não carregou. Drivers ODBC instalados: {listed}. Instale o "
                f"'{RECOMMENDED_DRIVER}' da Microsoft ou ajuste ODBC_DRIVER para um dos "
                "drivers instalados.")

    # The login worked but the database cannot be opened (SQL Server error 4060).
    if "4060" in numbers or "cannot open database" in low:
        return (f"{where}: a base '{settings.db_name}' (DB_NAME) não existe ou o usuário "
                f"'{user}' não tem acesso a ela. Confira DB_NAME e as permissões do usuário.")

    # Integrated (Windows/Kerberos) authentication could not even be attempted.
    if mssql and not user and ("sspi" in low or "kerberos" in low or "gss" in low):
        return (f"{where}: a autenticação integrada do Windows (DB_USER vazio) não está "
                f"disponível para a conta que executa o monitor ({detail}). Preencha DB_USER "
                "e DB_PASS com um login do SQL Server ou configure o Kerberos.")

    # Login refused.
    if ("28000" in states or "18456" in numbers or "login failed" in low
            or "password authentication failed" in low or "authentication failed" in low):
        if mssql and not user:
            return (f"{where}: login recusado: a autenticação integrada do Windows (DB_USER "
                    "vazio) foi recusada para a conta que executa o monitor. Dê acesso a essa "
                    "conta no SQL Server ou preencha DB_USER e DB_PASS.")
        keys = "DB_USER e DB_PASS" if not settings.database_url else "usuário e senha em DATABASE_URL"
        return (f"{where}: login recusado: o servidor recusou o usuário '{user}' ou a senha. "
                f"Confira {keys} no .env.")

    # TLS: the server offers no encryption while the client requires it.
    if "encryption not supported" in low:
        return (f"{where}: o servidor não oferece conexão criptografada (TLS). Configure um "
                "certificado no SQL Server ou, numa rede interna confiável, defina "
                "DB_ENCRYPT=0.")

    # TLS / certificate validation.
    if ("ssl provider" in low or "certificate" in low or "ssl" in low or " tls" in low
            or "encryption" in low):
        fix = ("defina DB_TRUST_CERT=1 para aceitar o certificado do servidor"
               if mssql else "ajuste os parâmetros sslmode/sslrootcert em DATABASE_URL")
        return (f"{where}: falha na conexão criptografada (TLS/certificado): {detail}. "
                f"Instale no servidor um certificado válido (emitido por uma autoridade "
                f"confiável e com o nome do servidor) ou {fix}.")

    # Server not reachable / not answering.
    if ("HYT00" in states or "08001" in states or "timeout" in low or "timed out" in low
            or "tcp provider" in low or "connection refused" in low
            or "could not translate host name" in low or "name or service not known" in low):
        timeout = settings.db_login_timeout
        if mssql:
            return (f"{where}: o servidor não respondeu em {timeout} s (DB_LOGIN_TIMEOUT). "
                    "Confira o host e o nome da instância em DB_SERVER, a porta 1433 (ou, "
                    "para instância nomeada, o serviço SQL Server Browser, UDP 1434), se o "
                    "SQL Server aceita conexões TCP/IP e se o firewall libera a conexão. "
                    f"Detalhe: {detail}")
        return (f"{where}: o servidor não respondeu ou recusou a conexão. Confira host, "
                f"porta e firewall. Detalhe: {detail}")

    if "unable to open database file" in low:
        return (f"{where}: não foi possível abrir o arquivo do SQLite. Confira o caminho em "
                "DATABASE_URL e as permissões da pasta.")

    return f"{where}: {detail or type(root).__name__}"


def is_query_timeout(err: BaseException) -> bool:
    """True when a statement was cancelled because it ran longer than DB_QUERY_TIMEOUT,
    typically waiting for locks held by another transaction: not an outage.

    ODBC: SQLSTATE HYT00 "Query timeout expired" (HYT00 is also the *login* timeout, which
    is a connection problem); PostgreSQL: 57014 from statement_timeout (57014 also covers a
    cancel by an operator, which is no timeout); SQLite: "database is locked" after the
    busy timeout."""
    root = _root_error(err)
    text = _error_text(root).lower()
    state = getattr(root, "sqlstate", None) or getattr(root, "pgcode", None)
    args = getattr(root, "args", ())
    if not state and args and isinstance(args[0], str) and re.fullmatch(r"[0-9A-Z]{5}", args[0]):
        state = args[0]
    if state == "HYT00":
        return "login" not in text
    if state == "57014":
        return "statement timeout" in text
    return "database is locked" in text or "query timeout expired" in text


def describe_query_timeout(settings: Settings) -> str:
    """The pt-BR line for a statement cancelled by DB_QUERY_TIMEOUT."""
    return (f"Consulta ao banco cancelada após {settings.db_query_timeout} s (DB_QUERY_TIMEOUT): "
            "provavelmente uma transação longa no sistema do laboratório (LIS) está segurando "
            "bloqueios em ItemSol/solicitacao/paciente. Nada foi pulado: a leitura é repetida "
            "no próximo ciclo. Se acontecer sempre, procure a transação aberta no SQL Server "
            "(sp_who2, coluna BlkBy) ou aumente DB_QUERY_TIMEOUT.")


def connect_check(engine: Engine, settings: Settings) -> None:
    """Open one connection and run `SELECT 1`; DatabaseUnavailable (one pt-BR line) if
    that fails."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1")).scalar()
    except Exception as err:  # any connect failure becomes one clear line
        message = describe_connect_error(err, settings)
        log.debug("Falha ao conectar (%s): %s", type(_root_error(err)).__name__, message)
        raise DatabaseUnavailable(message) from err
    log.info("Conexão com o banco OK: %s", server_label(settings))
