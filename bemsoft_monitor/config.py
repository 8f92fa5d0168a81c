"""Settings: read once at start-up from `.env` (and the process environment), validated
into one immutable object that every stage receives.

Only this module reads the environment. A bad value raises ConfigError with one pt-BR line
that names the key and what is expected.
"""
from __future__ import annotations

import datetime as dt
import io
import ipaddress
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Mapping
from urllib.parse import unquote, urlsplit
from urllib.request import proxy_bypass_environment
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dotenv import dotenv_values

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULT_ENV_FILE = PROJECT_DIR / ".env"

_TRUE = {"1", "true", "yes", "sim", "s", "y", "on"}
_FALSE = {"0", "false", "no", "nao", "não", "n", "off"}

# Every key the monitor understands; anything else in the process environment is ignored.
KNOWN_KEYS = (
    "DATABASE_URL", "DB_SERVER", "DB_NAME", "DB_USER", "DB_PASS", "ODBC_DRIVER",
    "DB_ENCRYPT", "DB_TRUST_CERT", "DB_LOGIN_TIMEOUT", "DB_QUERY_TIMEOUT",
    "POLL_SECONDS", "DEBOUNCE_SECONDS", "TERCEIROS", "TERCEIRO", "FAILED_DIR",
    "BEMSOFT_BASE_URL", "BEMSOFT_ENDPOINT", "BEMSOFT_TOKEN", "BEMSOFT_TIMEOUT",
    "BEMSOFT_RETRIES", "BEMSOFT_BACKOFF", "BEMSOFT_MAX_BACKOFF", "BEMSOFT_VERIFY",
    "BEMSOFT_DRY_RUN", "BEMSOFT_TESTS_TTL", "BEMSOFT_MAX_ATTEMPTS", "BEMSOFT_CONCURRENCY",
    "BEMSOFT_TEST_MAP_PATH", "BEMSOFT_PROXY", "BEMSOFT_CA_BUNDLE", "BEMSOFT_ALLOW_HTTP",
    "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy",
    "DEFAULT_GENDER", "DEFAULT_BIRTHDATE",
    "PHYSICIAN_NAME", "PHYSICIAN_COUNCIL", "PHYSICIAN_NUMBER", "PHYSICIAN_UF",
    "TIMEZONE", "START_FROM", "LOOKBACK_ITEMS", "BATCH_SIZE", "MONITOR_NAME",
    "LOG_LEVEL", "LOG_FILE", "METRICS_PORT", "METRICS_HOST", "HEALTH_MAX_AGE", "STATUS_TOKEN",
)


class ConfigError(Exception):
    """A setting is missing or malformed. `str()` is the pt-BR line shown to the operator."""

    def __init__(self, key: str, expected: str):
        self.key = key
        super().__init__(f"Configuração inválida: {key} {expected}")


@dataclass(frozen=True)
class TestMapping:
    """Where a local exam code goes: the support lab's test id and, optionally, the specimen
    to use when the catalog lists several variants of that test."""
    test_id: str
    specimen_id: str | None = None


@dataclass(frozen=True)
class Physician:
    name: str
    council: str
    number: str
    uf: str


@dataclass(frozen=True)
class Settings:
    # database
    database_url: str | None = field(default=None, repr=False)  # may hold a password
    db_server: str = ""
    db_name: str = ""
    db_user: str = ""
    db_pass: str = field(default="", repr=False)
    odbc_driver: str = "ODBC Driver 18 for SQL Server"
    db_encrypt: bool = True
    db_trust_cert: bool = False
    db_login_timeout: int = 15
    db_query_timeout: int = 60  # seconds any one statement may take (blocked reads included)
    # reading
    terceiros: tuple[str, ...] = ()
    poll_seconds: float = 5.0
    debounce_seconds: float = 0.0
    start_from: str | None = None  # "0", "latest" or an id; None = not configured
    lookback_items: int = 1000
    batch_size: int = 500
    monitor_name: str = "bemsoft"
    timezone: str = "America/Sao_Paulo"
    # failures
    failed_dir: Path = PROJECT_DIR / "completo" / "failed_events"
    # Bemsoft API
    base_url: str = "https://bemsoft.ws.wiselab.com.br"
    endpoint: str = "/requests"
    token: str = field(default="", repr=False)
    timeout: float = 30.0
    retries: int = 3
    backoff: float = 1.0
    max_backoff: float = 300.0
    verify_tls: bool = True
    ca_bundle: Path | None = None
    proxy: "Proxy | None" = None
    dry_run: bool = False
    tests_ttl: float = 3600.0
    max_attempts: int = 5
    concurrency: int = 4
    test_map: Mapping[str, "TestMapping"] = field(default_factory=dict)
    test_map_path: Path | None = None
    # data defaults
    default_gender: str | None = None
    default_birthdate: dt.date | None = None
    physician: Physician | None = None
    # operations
    log_level: str = "INFO"
    log_file: Path | None = PROJECT_DIR / "completo" / "logs" / "monitor.log"
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    health_max_age: float = 300.0
    status_token: str = field(default="", repr=False)  # required for `/` off loopback
    notes: tuple[str, ...] = ()  # warnings to log once logging is set up

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def requests_url(self) -> str:
        return self.base_url.rstrip("/") + self.endpoint

    @property
    def tests_url(self) -> str:
        return self.base_url.rstrip("/") + "/tests"

    def with_overrides(self, **changes) -> "Settings":
        return replace(self, **changes)

    @cached_property
    def secrets(self) -> tuple[str, ...]:
        """Every secret value the settings hold (token, proxy and database credentials),
        longest first, for `redaction.redact`."""
        found = [self.token, self.status_token]
        if self.proxy is not None:
            found += [self.proxy.username, self.proxy.password]
        if self.db_pass:
            found += [self.db_pass, self.db_pass.strip(), self.db_pass.replace("}", "}}")]
        if self.database_url:
            try:
                found.append(unquote(urlsplit(self.database_url).password or ""))
            except ValueError:
                pass
        return tuple(sorted({s for s in found if s and len(s) >= 3}, key=len, reverse=True))


@dataclass(frozen=True)
class Proxy:
    """The HTTP proxy on the way to the API. `url` carries no credentials; `display` masks
    them; `source` is the setting it came from."""
    url: str
    source: str
    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)

    @property
    def basic_auth(self) -> str | None:
        return f"{self.username}:{self.password}" if self.username else None

    @property
    def display(self) -> str:
        scheme, rest = self.url.split("://", 1)
        return f"{scheme}://***@{rest}" if self.username else self.url


class _Reader:
    """Typed access to the raw key/value pairs; every helper raises ConfigError."""

    def __init__(self, values: Mapping[str, str | None], base_dir: Path):
        self.values = values
        self.base_dir = base_dir

    def str(self, key: str, default: str | None = None) -> str | None:
        raw = self.values.get(key)
        if raw is None:
            return default
        raw = raw.strip()
        return raw if raw != "" else default

    def raw(self, key: str) -> str:
        """Like str() but keeps the value as written (passwords may start with spaces)."""
        raw = self.values.get(key)
        return "" if raw is None else raw

    def bool(self, key: str, default: bool) -> bool:
        raw = self.str(key)
        if raw is None:
            return default
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(key, f"deve ser 1 ou 0 (recebido: {raw!r})")

    def number(self, key: str, default: float, *, minimum: float = 0.0,
               maximum: float = 1e6, integer: bool = False) -> float:
        raw = self.str(key)
        if raw is None:
            return default
        kind = "um número inteiro" if integer else "um número"
        expected = f"deve ser {kind} de {minimum:g} a {maximum:g} (recebido: {raw!r})"
        try:
            value = int(raw) if integer else float(raw.replace(",", "."))
        except ValueError:
            raise ConfigError(key, expected) from None
        if not math.isfinite(value) or not minimum <= value <= maximum:
            raise ConfigError(key, expected)
        return value

    def path(self, key: str, default: Path | None) -> Path | None:
        raw = self.str(key)
        if raw is None:
            return default
        path = Path(raw).expanduser()
        return path if path.is_absolute() else (self.base_dir / path)


def load_settings(env_file: str | os.PathLike | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Read `env_file` (default: `.env` beside the scripts), overlay the process environment
    (`environ`, default os.environ) for the keys we know, and validate everything."""
    path = Path(env_file) if env_file else DEFAULT_ENV_FILE
    values: dict[str, str | None] = {}
    if env_file and not path.is_file():
        raise ConfigError("--env-file", f"aponta para um arquivo que não existe: {path}")
    if path.is_file():
        values.update(dotenv_values(stream=io.StringIO(read_env_text(path))))
    env = os.environ if environ is None else environ
    for key in KNOWN_KEYS:
        if key in env:
            values[key] = env[key]
    return parse_settings(values, base_dir=path.resolve().parent if path.is_file() else PROJECT_DIR)


def _env_value(values: Mapping[str, str | None], name: str) -> tuple[str | None, str]:
    """Proxy variables come in both cases; the lower-case one wins, as in curl and urllib."""
    for key in (name.lower(), name.upper()):
        raw = (values.get(key) or "").strip()
        if raw:
            return raw, key
    return None, name.upper()


def parse_proxy(raw: str, key: str) -> Proxy:
    """`http://[user:password@]host:port` -> Proxy. The error names the key, never the value
    (it may hold a password)."""
    expected = "deve ser http://[usuario:senha@]host:porta"
    if "://" not in raw:
        raw = "http://" + raw  # `host:port` is how many admins write it
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError:
        raise ConfigError(key, expected + " (porta inválida)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, expected)
    if parts.path not in ("", "/") or parts.query:
        raise ConfigError(key, expected + " (sem caminho depois da porta)")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    port = port or (443 if parts.scheme == "https" else 80)
    return Proxy(f"{parts.scheme}://{host}:{port}", key, unquote(parts.username or ""),
                 unquote(parts.password or ""))


def select_proxy(values: Mapping[str, str | None], base_url: str) -> Proxy | None:
    """BEMSOFT_PROXY wins (`none` turns proxies off); else HTTPS_PROXY/HTTP_PROXY by the
    API's scheme, unless NO_PROXY lists its host. A loopback API never goes through one."""
    own = (values.get("BEMSOFT_PROXY") or "").strip()
    if own.lower() in ("none", "off", "-", "direto", "direct"):
        return None
    if own:
        return parse_proxy(own, "BEMSOFT_PROXY")
    parts = urlsplit(base_url)
    raw, key = _env_value(values, f"{parts.scheme}_proxy")
    if raw is None or is_loopback(parts.hostname):
        return None
    no_proxy, _ = _env_value(values, "no_proxy")
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    if no_proxy and proxy_bypass_environment(host, {"no": no_proxy}):
        return None
    return parse_proxy(raw, key)


def load_settings_or_report(env_file, stream) -> Settings | None:
    """For the CLIs: the settings, or None after printing the one-line reason to `stream`."""
    try:
        return load_settings(env_file)
    except ConfigError as err:
        print(err, file=stream)
        return None


def read_env_text(path: Path) -> str:
    """UTF-8 (with or without BOM, as Notepad saves it); a file saved as "ANSI"
    (Windows-1252) is accepted too."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError("--env-file", f"não pôde ser lido ({path}): {err}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def parse_settings(values: Mapping[str, str | None], base_dir: Path = PROJECT_DIR) -> Settings:
    r = _Reader(values, base_dir)

    database_url = r.str("DATABASE_URL")
    db_server = r.str("DB_SERVER", "")
    db_name = r.str("DB_NAME", "")
    if not database_url:
        if not db_server:
            raise ConfigError("DB_SERVER", "é obrigatório (ex.: localhost\\SQLEXPRESS) "
                                           "quando DATABASE_URL não está definido")
        if not db_name:
            raise ConfigError("DB_NAME", "é obrigatório (nome da base do sistema legado)")
    elif "://" not in database_url:
        raise ConfigError("DATABASE_URL", "deve ser uma URL do SQLAlchemy "
                                          "(ex.: postgresql+psycopg://usuario@host/base)")
    else:
        check_database_url(database_url)

    terceiros_raw = r.str("TERCEIROS") or r.str("TERCEIRO")
    terceiros = tuple(t.strip() for t in (terceiros_raw or "").split(",") if t.strip())
    if not terceiros:
        raise ConfigError("TERCEIROS", "é obrigatório: nomes dos laboratórios de apoio em "
                                       "ItemSol.NomeTerceirizado, separados por vírgula "
                                       "(ou TERCEIRO, com um só nome)")

    start_from = r.str("START_FROM")
    if start_from is not None:
        start_from = start_from.lower()
        if start_from != "latest" and not start_from.isdigit():
            raise ConfigError("START_FROM", "deve ser 0, latest ou um CodItemSol "
                                            f"(recebido: {start_from!r})")

    timezone = r.str("TIMEZONE", "America/Sao_Paulo")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError("TIMEZONE", f"deve ser um fuso IANA como America/Sao_Paulo "
                                      f"(recebido: {timezone!r})") from None

    base_url = r.str("BEMSOFT_BASE_URL", "https://bemsoft.ws.wiselab.com.br")
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError("BEMSOFT_BASE_URL", "deve ser uma URL http(s), ex.: "
                                              f"https://bemsoft.ws.wiselab.com.br (recebido: {base_url!r})")
    if (parts.scheme == "http" and not is_loopback(parts.hostname)
            and not r.bool("BEMSOFT_ALLOW_HTTP", False)):
        raise ConfigError("BEMSOFT_BASE_URL", "deve usar https:// (com http:// o token e os "
                                              "dados dos pacientes passariam em claro); para "
                                              "aceitar http:// mesmo assim, BEMSOFT_ALLOW_HTTP=1")
    proxy = select_proxy(values, base_url)
    ca_bundle = r.path("BEMSOFT_CA_BUNDLE", None)
    if ca_bundle is not None:
        check_ca_bundle(ca_bundle)
    endpoint = r.str("BEMSOFT_ENDPOINT", "/requests")
    if not endpoint.startswith("/"):
        raise ConfigError("BEMSOFT_ENDPOINT", f"deve começar com / (recebido: {endpoint!r})")

    dry_run = r.bool("BEMSOFT_DRY_RUN", False)
    token = r.str("BEMSOFT_TOKEN", "") or ""
    if not dry_run and not token:
        raise ConfigError("BEMSOFT_TOKEN", "é obrigatório quando BEMSOFT_DRY_RUN=0 "
                                           "(token Bearer fornecido pela Bemsoft)")
    if token and not re.fullmatch(r"[\x21-\x7e]+", token):
        raise ConfigError("BEMSOFT_TOKEN", "deve ter só caracteres ASCII visíveis, sem espaços, "
                                           "quebras de linha ou acentos (confira aspas e \\n "
                                           "no .env); o valor não é mostrado")

    default_gender = r.str("DEFAULT_GENDER")
    if default_gender is not None:
        default_gender = default_gender.upper()
        if default_gender not in ("M", "F"):
            raise ConfigError("DEFAULT_GENDER", f"deve ser M ou F (recebido: {default_gender!r})")

    default_birthdate = None
    raw_birth = r.str("DEFAULT_BIRTHDATE")
    if raw_birth is not None:
        try:
            default_birthdate = dt.date.fromisoformat(raw_birth)
        except ValueError:
            raise ConfigError("DEFAULT_BIRTHDATE", "deve ser uma data AAAA-MM-DD "
                                                   f"(recebido: {raw_birth!r})") from None

    physician_values = [r.str(k) for k in ("PHYSICIAN_NAME", "PHYSICIAN_COUNCIL",
                                           "PHYSICIAN_NUMBER", "PHYSICIAN_UF")]
    physician = Physician(*physician_values) if all(physician_values) else None
    notes = []
    if any(physician_values) and physician is None:
        notes.append("Médico não será enviado: preencha PHYSICIAN_NAME, PHYSICIAN_COUNCIL, "
                     "PHYSICIAN_NUMBER e PHYSICIAN_UF (todos) para incluí-lo no pedido.")

    verify_tls = r.bool("BEMSOFT_VERIFY", True)
    if not verify_tls:
        notes.append("BEMSOFT_VERIFY=0: o certificado TLS da API NÃO é verificado; qualquer um "
                     "no caminho pode ler o token e os dados dos pacientes. Use "
                     "BEMSOFT_CA_BUNDLE com a CA da rede e volte para BEMSOFT_VERIFY=1.")

    test_map_path = r.path("BEMSOFT_TEST_MAP_PATH", None)
    test_map = load_test_map(test_map_path) if test_map_path else {}

    log_level = (r.str("LOG_LEVEL", "INFO") or "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError("LOG_LEVEL", "deve ser DEBUG, INFO, WARNING ou ERROR "
                                       f"(recebido: {log_level!r})")

    log_file_raw = r.str("LOG_FILE")
    if log_file_raw is not None and log_file_raw.lower() in ("-", "none", "off", "0"):
        log_file = None
    else:
        log_file = r.path("LOG_FILE", PROJECT_DIR / "completo" / "logs" / "monitor.log")

    metrics_port = r.str("METRICS_PORT")
    if metrics_port is not None:
        metrics_port = int(r.number("METRICS_PORT", 0, minimum=1, maximum=65535, integer=True))

    metrics_host = r.str("METRICS_HOST", "127.0.0.1")
    if not _HOSTNAME.match(metrics_host) and not _is_ip(metrics_host):
        raise ConfigError("METRICS_HOST", "deve ser um endereço IP (ex.: 127.0.0.1, 0.0.0.0) ou "
                                          f"um nome de máquina (recebido: {metrics_host!r})")
    status_token = r.str("STATUS_TOKEN", "") or ""
    if status_token and not _TOKEN.match(status_token):
        raise ConfigError("STATUS_TOKEN", "deve ter ao menos 16 caracteres, sem espaços "
                                          "(gere um valor aleatório, ex.: python -c \"import "
                                          "secrets; print(secrets.token_urlsafe(24))\")")
    if metrics_port is not None and not is_loopback(metrics_host) and not status_token:
        raise ConfigError("STATUS_TOKEN", f"é obrigatório com METRICS_HOST={metrics_host} (fora de "
                                          "127.0.0.1): o painel em / mostra a situação do envio a "
                                          "quem alcançar a porta; gere um valor aleatório")

    batch_size = int(r.number("BATCH_SIZE", 500, minimum=1, maximum=2000, integer=True))
    # at most 2000: SQL Server takes at most 2100 parameters in one statement

    monitor_name = r.str("MONITOR_NAME", "bemsoft")
    if len(monitor_name) > 90:
        raise ConfigError("MONITOR_NAME", "deve ter no máximo 90 caracteres")

    return Settings(
        database_url=database_url,
        db_server=db_server,
        db_name=db_name,
        db_user=r.str("DB_USER", "") or "",
        db_pass=r.raw("DB_PASS"),
        odbc_driver=r.str("ODBC_DRIVER", "ODBC Driver 18 for SQL Server"),
        db_encrypt=r.bool("DB_ENCRYPT", True),
        db_trust_cert=r.bool("DB_TRUST_CERT", False),
        db_login_timeout=int(r.number("DB_LOGIN_TIMEOUT", 15, minimum=1, maximum=300, integer=True)),
        db_query_timeout=int(r.number("DB_QUERY_TIMEOUT", 60, minimum=1, maximum=3600, integer=True)),
        terceiros=terceiros,
        poll_seconds=r.number("POLL_SECONDS", 5.0, minimum=0.1, maximum=3600),
        debounce_seconds=r.number("DEBOUNCE_SECONDS", 0.0, maximum=86400),
        start_from=start_from,
        lookback_items=int(r.number("LOOKBACK_ITEMS", 1000, integer=True)),
        batch_size=batch_size,
        monitor_name=monitor_name,
        timezone=timezone,
        failed_dir=r.path("FAILED_DIR", PROJECT_DIR / "completo" / "failed_events"),
        base_url=base_url,
        endpoint=endpoint,
        token=token,
        timeout=r.number("BEMSOFT_TIMEOUT", 30.0, minimum=0.1, maximum=600),
        retries=int(r.number("BEMSOFT_RETRIES", 3, maximum=20, integer=True)),
        backoff=r.number("BEMSOFT_BACKOFF", 1.0, maximum=3600),
        max_backoff=r.number("BEMSOFT_MAX_BACKOFF", 300.0, minimum=1.0, maximum=86400),
        verify_tls=verify_tls,
        ca_bundle=ca_bundle,
        proxy=proxy,
        dry_run=dry_run,
        tests_ttl=r.number("BEMSOFT_TESTS_TTL", 3600.0, minimum=1.0, maximum=7 * 86400),
        max_attempts=int(r.number("BEMSOFT_MAX_ATTEMPTS", 5, minimum=1, maximum=1000, integer=True)),
        concurrency=int(r.number("BEMSOFT_CONCURRENCY", 4, minimum=1, maximum=64, integer=True)),
        test_map=test_map,
        test_map_path=test_map_path,
        default_gender=default_gender,
        default_birthdate=default_birthdate,
        physician=physician,
        log_level=log_level,
        log_file=log_file,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        health_max_age=r.number("HEALTH_MAX_AGE", 300.0, minimum=1.0, maximum=7 * 86400),
        status_token=status_token,
        notes=tuple(notes),
    )


_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_TOKEN = re.compile(r"^[\x21-\x7e]{16,}$")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_database_url(url: str) -> None:
    """A malformed URL (a port that is not a number...) is a configuration error, not a
    traceback when the engine is created. The message never repeats the URL (password)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError
    try:
        make_url(url)
    except (ArgumentError, ValueError) as err:
        what = "porta inválida (deve ser um número)" if "int()" in str(err) else "formato inválido"
        raise ConfigError("DATABASE_URL", f"não é uma URL válida do SQLAlchemy: {what} "
                                          "(ex.: postgresql+psycopg://usuario@host:5432/base)") from None


def check_ca_bundle(path: Path) -> None:
    """BEMSOFT_CA_BUNDLE must be a PEM file with at least one certificate."""
    import ssl
    try:
        ssl.create_default_context(cafile=str(path))
    except FileNotFoundError:
        raise ConfigError("BEMSOFT_CA_BUNDLE", f"aponta para um arquivo que não existe: {path}") from None
    except (OSError, ssl.SSLError, ValueError) as err:
        raise ConfigError("BEMSOFT_CA_BUNDLE", f"não é um arquivo PEM de certificados ({path}): "
                                               f"{err}") from None


def load_test_map(path: Path) -> dict[str, TestMapping]:
    """Local exam code -> TestMapping, keys normalised (trimmed, upper case).

    A value is either the supportTestId (`"GLICOSE": "GLU"`) or an object that also pins the
    specimen among the catalog's variants
    (`"FERRO": {"supportTestId": "FE", "supportSpecimenId": "SORO"}`)."""
    key = "BEMSOFT_TEST_MAP_PATH"
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(key, f"aponta para um arquivo que não existe: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(key, f"não é um JSON válido ({path}): {err}") from None
    expected = ('deve conter um objeto JSON {"<codigo_local>": "<supportTestId>"} ou '
                '{"<codigo_local>": {"supportTestId": "...", "supportSpecimenId": "..."}} '
                f"({path})")
    if not isinstance(data, dict):
        raise ConfigError(key, expected)
    result = {}
    for code, value in data.items():
        if isinstance(value, dict):
            test_id = str(value.get("supportTestId") or "").strip()
            specimen = str(value.get("supportSpecimenId") or "").strip() or None
        elif isinstance(value, (str, int)) and not isinstance(value, bool):
            test_id, specimen = str(value).strip(), None
        else:
            test_id, specimen = "", None
        if not test_id or not str(code).strip():
            raise ConfigError(key, expected + f"; entrada inválida: {code!r}")
        result[normalize_code(code)] = TestMapping(test_id, specimen)
    return result


def normalize_code(code: object) -> str:
    return str(code).strip().upper()


@dataclass(frozen=True)
class ServiceSettings:
    """The background launcher's own settings (`python -m bemsoft_monitor.service`, the
    scripts in scripts/). They come from the process environment only: they say where the
    launcher keeps pid and log files, not how the monitor works, so they are not in `.env`."""
    run_dir: Path
    log_dir: Path
    stop_timeout: float
    start_check: float
    retry_interval: float


def load_service_settings(environ: Mapping[str, str] | None = None) -> ServiceSettings:
    r = _Reader(os.environ if environ is None else environ, PROJECT_DIR)
    return ServiceSettings(
        run_dir=r.path("MONITOR_RUN_DIR", PROJECT_DIR / "completo" / "run"),
        log_dir=r.path("MONITOR_LOG_DIR", PROJECT_DIR / "completo" / "logs"),
        stop_timeout=r.number("STOP_TIMEOUT", 120.0, minimum=1, maximum=86400),
        start_check=r.number("START_CHECK_SECONDS", 2.0, minimum=0, maximum=60),
        retry_interval=r.number("RETRY_INTERVAL", 300.0, minimum=0.1, maximum=86400),
    )
