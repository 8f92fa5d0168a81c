"""Settings: read once at start-up from `.env` (and the process environment), validated
into one immutable object that every stage receives.

Each setting is declared once, as a field of `Settings`: its key (and older spellings), its
kind (`config_types`: how the text is parsed, shown and masked), its default, whether it is
secret, and one pt-BR line of help. That declaration drives the parsing and its error
messages, `.env.example`, the README's settings tables and the console's configuration
panel (`config_docs`), and the list of secrets every output is redacted against. What
involves several settings at once (a key required only when another is off, the proxy
chosen among five variables) is a short rule after the parse.

Only this module reads the environment. A bad value raises ConfigError with one pt-BR line
that names the key and what is expected.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import io
import ipaddress
import json
import logging
import os
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Iterator, Mapping
from urllib.parse import unquote, urlsplit
from urllib.request import proxy_bypass_environment
from zoneinfo import ZoneInfo

from dotenv import dotenv_values

from .config_types import (Choice, ClockTime, ConfigError, DatabaseUrl, Date, Email, EmailList,
                           FilePath, Flag, Host, Kind, NameList, Number, Pattern, Port, ProxyUrl,
                           Secret, Text, Url, Zone)

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULT_ENV_FILE = PROJECT_DIR / ".env"

# Sections of .env.example and of the README's settings tables, in order.
GROUPS = {
    "db": "Banco de dados",
    "reading": "Leitura e execução",
    "bemsoft": "Bemsoft",
    "data": "Dados e médico",
    "operation": "Operação",
    "alerts": "Alertas",
}


@dataclass(frozen=True)
class Declared:
    """What one setting is, as the operator sees it."""
    names: tuple[str, ...]   # the key; then older or lower-case spellings (the first set wins)
    kind: Kind
    group: str
    help: str                # pt-BR, one line: README table, .env.example, console
    example: str | None      # the line .env.example writes (None: the default)
    commented: bool          # .env.example writes it as a comment (optional settings)
    default_text: str        # the default as written in .env ("" when there is none)
    also_wins: bool = False  # the other spelling wins over the key (`https_proxy`, as in curl)

    @property
    def key(self) -> str:
        return self.names[0]

    @property
    def secret(self) -> bool:
        return self.kind.secret

    def lookup(self, values: Mapping[str, str | None]) -> tuple[str | None, str]:
        """(text, key): the text of the first spelling that is set (stripped, unless the kind
        keeps it as written), or (None, key) when none is."""
        for name in (self.names[::-1] if self.also_wins else self.names):
            raw = values.get(name)
            if raw is None:
                continue
            text = raw if self.kind.raw else raw.strip()
            if text != "":
                return text, name
        return None, self.key


def setting(key: str, default, kind: Kind, help: str, *, group: str, also: tuple[str, ...] = (),
            also_wins: bool = False, example: str | None = None, commented: bool = False,
            default_text: str | None = None):
    """A `Settings` field declared as a setting (see `Declared`)."""
    if default_text is None:
        default_text = kind.text(default)
    declared = Declared((key, *also), kind, group, help, example, commented, default_text,
                        also_wins)
    return field(default=default, repr=not kind.hides, metadata={"setting": declared})


def _path_default(relative: str) -> Path:
    return PROJECT_DIR / relative


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


POSITIVE_SECONDS = Number(0.1, 3600, unit="s")
_OFF = ("-", "none", "off", "0")


@dataclass(frozen=True)
class Settings:
    # ------------------------------------------------------------ database
    db_server: str = setting(
        "DB_SERVER", "", Text(), "servidor: `host`, `host\\INSTANCIA`, `host,porta` ou "
        "`tcp:host,porta` (obrigatório sem `DATABASE_URL`)", group="db",
        example="localhost\\SQLEXPRESS")
    db_name: str = setting("DB_NAME", "", Text(), "nome da base do sistema legado", group="db",
                           example="MinhaBase")
    db_user: str = setting(
        "DB_USER", "", Text(), "usuário do SQL Server; vazio = autenticação do Windows (a conta "
        "que roda o monitor)", group="db", example="usuario")
    db_pass: str = setting(
        "DB_PASS", "", Secret(raw=True), "senha do SQL Server, com qualquer caractere (inclusive "
        "`;{}`), sem aspas", group="db", example="senha")
    odbc_driver: str = setting("ODBC_DRIVER", "ODBC Driver 18 for SQL Server", Text(),
                               "nome do driver ODBC instalado", group="db")
    db_encrypt: bool = setting("DB_ENCRYPT", True, Flag(), "conexão criptografada (o driver 18 "
                               "exige certificado válido; veja `DB_TRUST_CERT`)", group="db")
    db_trust_cert: bool = setting("DB_TRUST_CERT", False, Flag(), "aceita certificado "
                                  "autoassinado do servidor (comum no SQLEXPRESS)", group="db")
    db_login_timeout: int = setting("DB_LOGIN_TIMEOUT", 15, Number(1, 300, integer=True, unit="s"),
                                    "segundos para desistir de conectar", group="db")
    db_query_timeout: int = setting(
        "DB_QUERY_TIMEOUT", 60, Number(1, 3600, integer=True, unit="s"),
        "tempo máximo de cada comando no banco (s), espera por bloqueios de uma transação "
        "aberta no LIS incluída; uma leitura cancelada é repetida no ciclo seguinte", group="db")
    database_url: str | None = setting(
        "DATABASE_URL", None, DatabaseUrl(), "qualquer URL do SQLAlchemy; quando definida, as "
        "chaves `DB_*` são ignoradas. Caracteres especiais da senha vão codificados (`@` = "
        "`%40`, `:` = `%3A`, `/` = `%2F`, `#` = `%23`)", group="db",
        example="postgresql+psycopg://usuario:senha@127.0.0.1:5432/base", commented=True)
    # ------------------------------------------------------------ reading
    terceiros: tuple[str, ...] = setting(
        "TERCEIROS", (), NameList(), "nomes em `ItemSol.NomeTerceirizado` a enviar, separados "
        "por vírgula (obrigatório); `TERCEIRO`, com um só nome, é a grafia antiga",
        group="reading", also=("TERCEIRO",), example="DIAGNÓSTICO DO BRASIL - DB")
    poll_seconds: float = setting("POLL_SECONDS", 5.0, POSITIVE_SECONDS, "intervalo entre "
                                  "ciclos quando não há nada a enviar (s)", group="reading")
    debounce_seconds: float = setting(
        "DEBOUNCE_SECONDS", 0.0, Number(0, 86400, unit="s"), "espera a solicitação ficar sem "
        "itens novos por N s antes de enviar (0 desliga)", group="reading")
    start_from: str | None = setting(
        "START_FROM", None, Pattern(r"latest|\d+", "deve ser 0, latest ou um CodItemSol",
                                    case="lower"),
        "ponto de partida na primeira execução (sem checkpoint): `latest` (só o que entrar "
        "daqui em diante), `0` (todo o histórico) ou um `CodItemSol`", group="reading",
        example="latest")
    lookback_items: int = setting("LOOKBACK_ITEMS", 1000, Number(0, 1e6, integer=True),
                                  "janela abaixo do checkpoint relida a cada ciclo para achar "
                                  "commits tardios", group="reading")
    batch_size: int = setting("BATCH_SIZE", 500, Number(1, 2000, integer=True),
                              # at most 2000: SQL Server takes 2100 parameters per statement
                              "itens lidos por página (1 a 2000); uma solicitação nunca é "
                              "dividida entre páginas", group="reading")
    # '#' is reserved: "#schema" (migrations) and "<name>#inicio" are _MonitorState rows too;
    # MONITOR_NAME=#schema read the schema version as its checkpoint and skipped items
    monitor_name: str = setting("MONITOR_NAME", "bemsoft", Text(
                                    max_length=90, forbidden="#",
                                    why="reservado às linhas internas de _MonitorState, como "
                                        "'#schema' e '<nome>#inicio'"),
                                "nome da linha de checkpoint em `_MonitorState` (um por monitor; "
                                "sem `#`)",
                                group="reading")
    timezone: str = setting("TIMEZONE", "America/Sao_Paulo", Zone(), "fuso das datas do "
                            "sistema legado", group="reading")
    failed_dir: Path = setting(
        "FAILED_DIR", _path_default("completo/failed_events"), FilePath(),
        "pasta onde cada falha vira um arquivo JSON (legível só pelo dono: tem dados de "
        "pacientes)", group="reading", default_text="completo/failed_events")
    history_days: int = setting(
        "HISTORY_DAYS", 400, Number(0, 36500, integer=True, unit="dias"),
        "por quantos dias o histórico de cada pedido fica em `_MonitorHistory` (para "
        "`--trace`, `--report` e a busca do painel); `0` = não guarda histórico",
        group="reading")
    # ------------------------------------------------------------ Bemsoft API
    base_url: str = setting(
        "BEMSOFT_BASE_URL", "https://bemsoft.ws.wiselab.com.br",
        Url(example="https://bemsoft.ws.wiselab.com.br"), "endereço da API; `http://` só para "
        "`127.0.0.1`/`localhost` (ou com `BEMSOFT_ALLOW_HTTP=1`)", group="bemsoft")
    endpoint: str = setting("BEMSOFT_ENDPOINT", "/requests",
                            Pattern(r"/.*", "deve começar com /"), "caminho do envio",
                            group="bemsoft")
    token: str = setting(
        "BEMSOFT_TOKEN", "", Secret(pattern=r"[\x21-\x7e]+", expected=(
            "deve ter só caracteres ASCII visíveis, sem espaços, quebras de linha ou acentos "
            "(confira aspas e \\n no .env)")),
        "token Bearer (obrigatório com `BEMSOFT_DRY_RUN=0`); nunca aparece em log nem em arquivo",
        group="bemsoft", example="coloque_seu_token_aqui")
    dry_run: bool = setting("BEMSOFT_DRY_RUN", False, Flag(), "`1` = não envia nada nem grava no "
                            "banco ou em `FAILED_DIR`, só imprime os pedidos (o log continua)",
                            group="bemsoft", example="1")
    timeout: float = setting("BEMSOFT_TIMEOUT", 30.0, Number(0.1, 600, unit="s"),
                             "tempo máximo de cada chamada HTTP inteira, do conectar ao último "
                             "byte da resposta (s)", group="bemsoft")
    retries: int = setting("BEMSOFT_RETRIES", 3, Number(0, 20, integer=True),
                           "retentativas imediatas de um envio com falha transitória (429, 5xx, "
                           "timeout, conexão)", group="bemsoft")
    backoff: float = setting("BEMSOFT_BACKOFF", 1.0, Number(0, 3600, unit="s"),
                             "primeira espera entre retentativas (s), dobra a cada vez",
                             group="bemsoft")
    max_backoff: float = setting("BEMSOFT_MAX_BACKOFF", 300.0, Number(1, 86400, unit="s"),
                                 "espera máxima (retentativas e pausa durante queda da API ou "
                                 "token recusado)", group="bemsoft")
    verify_tls: bool = setting("BEMSOFT_VERIFY", True, Flag(), "verificação TLS; `0` só em "
                               "teste (vira um aviso no log a cada partida)", group="bemsoft")
    ca_bundle: Path | None = setting(
        "BEMSOFT_CA_BUNDLE", None, FilePath(), "arquivo PEM com CAs **a mais** em que confiar "
        "(proxy que inspeciona TLS, CA privada), somadas às do sistema", group="bemsoft",
        example="C:\\bemsoft\\ca-hospital.pem", commented=True)
    bemsoft_proxy: str = setting(
        "BEMSOFT_PROXY", "", ProxyUrl(), "proxy até a API, `http://[usuario:senha@]host:porta` "
        "(`@` na senha = `%40`); vale mais que `HTTPS_PROXY`; `none` = sem proxy",
        group="bemsoft", example="http://usuario:senha@proxy.hospital:3128", commented=True)
    https_proxy: str = setting(
        "HTTPS_PROXY", "", ProxyUrl(), "proxy do ambiente para uma API `https://`, como em curl "
        "e pip (a forma minúscula `https_proxy` vale mais)", group="bemsoft",
        also=("https_proxy",), also_wins=True, example="http://proxy.hospital:3128", commented=True)
    http_proxy: str = setting(
        "HTTP_PROXY", "", ProxyUrl(), "proxy do ambiente para uma API `http://` (`http_proxy` "
        "vale mais)", group="bemsoft", also=("http_proxy",), also_wins=True,
        example="http://proxy.hospital:3128", commented=True)
    no_proxy: str = setting(
        "NO_PROXY", "", Text(), "hosts que vão direto, sem proxy, separados por vírgula "
        "(`no_proxy` vale mais)", group="bemsoft", also=("no_proxy",), also_wins=True,
        example="localhost,127.0.0.1,.hospital.local", commented=True)
    allow_http: bool = setting(
        "BEMSOFT_ALLOW_HTTP", False, Flag(), "`1` aceita `BEMSOFT_BASE_URL` com `http://` fora "
        "da própria máquina (o token passaria em claro)", group="bemsoft", commented=True)
    tests_ttl: float = setting("BEMSOFT_TESTS_TTL", 3600.0, Number(1, 7 * 86400, unit="s"),
                               "validade do cache do catálogo `/tests` (s)", group="bemsoft")
    max_attempts: int = setting(
        "BEMSOFT_MAX_ATTEMPTS", 5, Number(1, 1000, integer=True),
        "ciclos com falha transitória antes de uma solicitação ir para `FAILED_DIR` (só "
        "enquanto outras estão passando; numa queda geral o envio pausa)", group="bemsoft")
    concurrency: int = setting("BEMSOFT_CONCURRENCY", 4, Number(1, 64, integer=True),
                               "solicitações enviadas em paralelo", group="bemsoft")
    test_map_path: Path | None = setting(
        "BEMSOFT_TEST_MAP_PATH", None, FilePath(), "JSON de mapeamento de códigos locais para "
        "`supportTestId` (veja Mapeamento de exames)", group="bemsoft",
        example="./tests_map.json", commented=True)
    # ------------------------------------------------------------ data defaults, physician
    default_gender: str | None = setting(
        "DEFAULT_GENDER", None, Choice("M", "F"), "`M` ou `F`, quando o cadastro não traz sexo "
        "válido (sem ele, a solicitação vai para `FAILED_DIR`)", group="data", example="")
    default_birthdate: dt.date | None = setting(
        "DEFAULT_BIRTHDATE", None, Date(), "`AAAA-MM-DD`, quando o cadastro não traz data de "
        "nascimento válida", group="data", example="")
    physician_name: str = setting("PHYSICIAN_NAME", "", Text(), "médico solicitante: nome "
                                  "(enviado só com os quatro `PHYSICIAN_*` preenchidos)",
                                  group="data", example="")
    physician_council: str = setting("PHYSICIAN_COUNCIL", "", Text(), "médico: sigla do "
                                     "conselho (ex.: CRM)", group="data", example="")
    physician_number: str = setting("PHYSICIAN_NUMBER", "", Text(), "médico: número no "
                                    "conselho", group="data", example="")
    physician_uf: str = setting("PHYSICIAN_UF", "", Text(), "médico: UF do conselho",
                                group="data", example="")
    # ------------------------------------------------------------ operation
    log_level: str = setting("LOG_LEVEL", "INFO", Choice("DEBUG", "INFO", "WARNING", "ERROR",
                                                         "CRITICAL", expected=(
                                 "deve ser DEBUG, INFO, WARNING ou ERROR")),
                             "`DEBUG`, `INFO`, `WARNING` ou `ERROR`", group="operation")
    log_file: Path | None = setting(
        "LOG_FILE", _path_default("completo/logs/monitor.log"), FilePath(off=_OFF),
        "log com rotação (10 MB × 10); `-` = só console. Fica numa pasta só dele",
        group="operation", default_text="completo/logs/monitor.log")
    metrics_port: int | None = setting(
        "METRICS_PORT", None, Port(), "porta do endpoint Prometheus `/metrics`, de `/healthz` e "
        "do painel em `/`; vazio desliga", group="operation", example="")
    metrics_host: str = setting(
        "METRICS_HOST", "127.0.0.1", Host(), "endereço onde a porta escuta (`0.0.0.0` para "
        "acesso de outra máquina; exige `STATUS_TOKEN`)", group="operation")
    status_token: str = setting(
        "STATUS_TOKEN", "", Secret(pattern=r"[\x21-\x7e]{16,}", expected=(
            "deve ter ao menos 16 caracteres, sem espaços (gere um valor aleatório, ex.: python "
            "-c \"import secrets; print(secrets.token_urlsafe(24))\")")),
        "senha do painel em `/` e, fora de `127.0.0.1`, de `/metrics` (valor aleatório, 16+ "
        "caracteres); obrigatória com `METRICS_HOST` fora de `127.0.0.1`", group="operation",
        example="")
    health_max_age: float = setting("HEALTH_MAX_AGE", 300.0, Number(1, 7 * 86400, unit="s"),
                                    "`/healthz` responde 503 se nenhum ciclo terminou há mais "
                                    "de N s", group="operation")
    # ------------------------------------------------------------ alerts
    alert_email_to: tuple[str, ...] = setting(
        "ALERT_EMAIL_TO", (), EmailList(), "destinatários dos alertas por e-mail, separados por "
        "vírgula (vazio: sem e-mail)", group="alerts", example="ti@laboratorio.com.br",
        commented=True)
    alert_email_from: str = setting(
        "ALERT_EMAIL_FROM", "", Email(), "remetente dos alertas (no Microsoft 365 e no Gmail, a "
        "própria conta de `SMTP_USER`); sem ele, `SMTP_USER` quando for um e-mail",
        group="alerts", example="monitor@laboratorio.com.br", commented=True)
    smtp_host: str = setting(
        "SMTP_HOST", "", Host(), "servidor SMTP: `smtp.office365.com`, `smtp.gmail.com` ou o "
        "relay interno", group="alerts", example="smtp.office365.com", commented=True)
    smtp_port: int = setting(
        "SMTP_PORT", 587, Port(), "porta do SMTP (com `SMTP_SECURITY=ssl`, o padrão é 465)",
        group="alerts", commented=True)
    smtp_user: str = setting(
        "SMTP_USER", "", Text(), "usuário do SMTP (vazio: relay sem autenticação)",
        group="alerts", example="monitor@laboratorio.com.br", commented=True)
    smtp_password: str = setting(
        "SMTP_PASSWORD", "", Secret(raw=True), "senha do SMTP (no Gmail, uma senha de app); "
        "nunca aparece em log nem em alerta", group="alerts", example="senha", commented=True)
    smtp_security: str = setting(
        "SMTP_SECURITY", "starttls", Choice("starttls", "ssl", "none", case="lower"),
        "`starttls` (587), `ssl` (465) ou `none` (relay interno na porta 25, sem senha); o "
        "certificado é verificado com as mesmas CAs da API", group="alerts", commented=True)
    alert_webhook_url: str = setting(
        "ALERT_WEBHOOK_URL", "", Url(secret_path=True), "webhook que recebe os alertas em JSON "
        "com o campo `text` (Teams workflow, Slack, Google Chat, Mattermost); o endereço é "
        "segredo e nunca aparece inteiro", group="alerts",
        example="https://prod-00.westus.logic.azure.com/workflows/...", commented=True)
    heartbeat_url: str = setting(
        "HEARTBEAT_URL", "", Url(secret_path=True), "endereço chamado depois de um ciclo "
        "saudável, no máximo uma vez por minuto (healthchecks.io, Uptime Kuma, Better Stack): "
        "avisa quando o próprio monitor parou", group="alerts",
        example="https://hc-ping.com/<uuid>", commented=True)
    alert_after: float = setting(
        "ALERT_AFTER_SECONDS", 900.0, Number(1, 7 * 86400, unit="s"), "quanto tempo API ou "
        "banco indisponível, envio parado ou monitor em espera duram antes do alerta (s)",
        group="alerts")
    alert_repeat: float = setting(
        "ALERT_REPEAT_SECONDS", 14400.0, Number(60, 30 * 86400, unit="s"), "lembrete enquanto "
        "um problema continua aberto (s)", group="alerts")
    alert_failures_every: float = setting(
        "ALERT_FAILURES_SECONDS", 3600.0, Number(60, 7 * 86400, unit="s"), "intervalo mínimo "
        "entre dois resumos de falhas novas em `FAILED_DIR` (s)", group="alerts")
    alert_daily_at: dt.time | None = setting(
        "ALERT_DAILY_AT", None, ClockTime(), "hora (HH:MM, no `TIMEZONE`) do resumo diário: "
        "entregues, falhas e aguardando no dia anterior (vazio: sem resumo)", group="alerts",
        example="07:30", commented=True)
    alert_timeout: float = setting(
        "ALERT_TIMEOUT", 15.0, Number(1, 120, unit="s"), "tempo máximo de cada envio de alerta "
        "(s); um canal fora do ar é tentado de novo depois, sem atrasar entregas",
        group="alerts")
    # ------------------------------------------------------------ derived by the rules below
    proxy: Proxy | None = None
    test_map: Mapping[str, TestMapping] = field(default_factory=dict)
    physician: Physician | None = None
    notes: tuple[str, ...] = ()  # warnings to log once logging is set up
    # the spelling each setting was read under (`https_proxy` or `HTTPS_PROXY`), for messages
    sources: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

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
        """Every secret value the settings hold — the secret settings, the credentials inside
        URL settings, the proxy's decoded ones — longest first, for `redaction.redact`."""
        found = []
        for f, declared in declared_fields():
            found += declared.kind.secrets_in(getattr(self, f.name))
        if self.proxy is not None:
            found += [self.proxy.username, self.proxy.password]
        if self.db_pass:  # as the ODBC string holds it, too
            found += [self.db_pass.strip(), self.db_pass.replace("}", "}}")]
        return tuple(sorted({s for s in found if s and len(s) >= 3}, key=len, reverse=True))


def declared_fields() -> Iterator[tuple[dataclasses.Field, Declared]]:
    """Every declared setting, in declaration order, with its Settings field."""
    return ((f, f.metadata["setting"]) for f in _FIELDS)


_FIELDS = tuple(f for f in dataclasses.fields(Settings) if "setting" in f.metadata)

# Every key the monitor understands; anything else in the process environment is ignored.
KNOWN_KEYS = tuple(name for _, declared in declared_fields() for name in declared.names)


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


def parse_settings(values: Mapping[str, str | None], base_dir: Path = PROJECT_DIR) -> Settings:
    """Each declared setting parsed by its kind (absent or empty: its default), then the
    rules that involve several settings."""
    parsed, sources = {}, {}
    for f, declared in declared_fields():
        text, key = declared.lookup(values)
        if text is not None:
            parsed[f.name] = declared.kind.parse(key, text, base_dir)
            sources[f.name] = key
    settings = Settings(**parsed, sources=sources)
    for rule in RULES:
        settings = rule(settings) or settings
    return settings


# ---------------------------------------------------------------- rules across settings
def require_database(s: Settings) -> None:
    if s.database_url:
        return
    if not s.db_server:
        raise ConfigError("DB_SERVER", "é obrigatório (ex.: localhost\\SQLEXPRESS) "
                                       "quando DATABASE_URL não está definido")
    if not s.db_name:
        raise ConfigError("DB_NAME", "é obrigatório (nome da base do sistema legado)")


def require_terceiros(s: Settings) -> None:
    if not s.terceiros:
        raise ConfigError("TERCEIROS", "é obrigatório: nomes dos laboratórios de apoio em "
                                       "ItemSol.NomeTerceirizado, separados por vírgula "
                                       "(ou TERCEIRO, com um só nome)")


def require_https(s: Settings) -> None:
    parts = urlsplit(s.base_url)
    if parts.scheme == "http" and not is_loopback(parts.hostname) and not s.allow_http:
        raise ConfigError("BEMSOFT_BASE_URL", "deve usar https:// (com http:// o token e os "
                                              "dados dos pacientes passariam em claro); para "
                                              "aceitar http:// mesmo assim, BEMSOFT_ALLOW_HTTP=1")


def choose_proxy(s: Settings) -> Settings:
    return replace(s, proxy=select_proxy(s))


def check_ca(s: Settings) -> None:
    if s.ca_bundle is not None:
        check_ca_bundle(s.ca_bundle)


def require_token(s: Settings) -> None:
    if not s.dry_run and not s.token:
        raise ConfigError("BEMSOFT_TOKEN", "é obrigatório quando BEMSOFT_DRY_RUN=0 "
                                           "(token Bearer fornecido pela Bemsoft)")


def load_mapping(s: Settings) -> Settings | None:
    if s.test_map_path is not None:
        return replace(s, test_map=load_test_map(s.test_map_path))
    return None


def gather_physician(s: Settings) -> Settings:
    parts = (s.physician_name, s.physician_council, s.physician_number, s.physician_uf)
    if all(parts):
        return replace(s, physician=Physician(*parts))
    if any(parts):
        return _note(s, "Médico não será enviado: preencha PHYSICIAN_NAME, PHYSICIAN_COUNCIL, "
                        "PHYSICIAN_NUMBER e PHYSICIAN_UF (todos) para incluí-lo no pedido.")
    return s


def warn_unverified(s: Settings) -> Settings | None:
    if s.verify_tls:
        return None
    return _note(s, "BEMSOFT_VERIFY=0: o certificado TLS da API NÃO é verificado; qualquer um "
                    "no caminho pode ler o token e os dados dos pacientes. Use "
                    "BEMSOFT_CA_BUNDLE com a CA da rede e volte para BEMSOFT_VERIFY=1.")


def require_status_token(s: Settings) -> None:
    if s.metrics_port is not None and not is_loopback(s.metrics_host) and not s.status_token:
        raise ConfigError("STATUS_TOKEN", f"é obrigatório com METRICS_HOST={s.metrics_host} (fora "
                                          "de 127.0.0.1): o painel em / mostra a situação do "
                                          "envio a quem alcançar a porta; gere um valor aleatório")


def _note(s: Settings, text: str) -> Settings:
    return replace(s, notes=(*s.notes, text))


def check_email_alerts(s: Settings) -> Settings | None:
    """E-mail alerts need a server and a sender; a password goes with a user, and never over
    a connection without TLS to another machine."""
    changes = {}
    if s.smtp_security == "ssl" and "smtp_port" not in s.sources:
        changes["smtp_port"] = 465
    if s.smtp_user and not s.smtp_password:
        raise ConfigError("SMTP_PASSWORD", "é obrigatório com SMTP_USER (no Gmail, uma senha de app)")
    if s.smtp_password and not s.smtp_user:
        raise ConfigError("SMTP_USER", "é obrigatório com SMTP_PASSWORD")
    if s.smtp_user and s.smtp_security == "none" and s.smtp_host and not is_loopback(s.smtp_host):
        raise ConfigError("SMTP_SECURITY", "não pode ser none com SMTP_USER: a senha iria em claro "
                                           "pela rede; use starttls (587) ou ssl (465)")
    if s.alert_email_to:
        if not s.smtp_host:
            raise ConfigError("SMTP_HOST", "é obrigatório com ALERT_EMAIL_TO (ex.: "
                                           "smtp.office365.com, smtp.gmail.com ou o relay interno)")
        if not s.alert_email_from:
            if "@" not in s.smtp_user:
                raise ConfigError("ALERT_EMAIL_FROM", "é obrigatório com ALERT_EMAIL_TO (o "
                                                      "remetente, ex.: monitor@laboratorio.com.br)")
            changes["alert_email_from"] = s.smtp_user
    return replace(s, **changes) if changes else None


RULES = (require_database, require_terceiros, require_https, choose_proxy, check_ca,
         require_token, gather_physician, warn_unverified, load_mapping, require_status_token,
         check_email_alerts)


# ---------------------------------------------------------------- helpers of the rules
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


def select_proxy(s: Settings, url: str | None = None) -> Proxy | None:
    """The proxy on the way to `url` (default: the API). BEMSOFT_PROXY wins (`none` turns
    proxies off); else HTTPS_PROXY/HTTP_PROXY by the URL's scheme, unless NO_PROXY lists its
    host. A loopback address never goes through the environment's proxy.""" 
    parts = urlsplit(url or s.base_url)
    own = s.bemsoft_proxy
    if own.lower() in ("none", "off", "-", "direto", "direct"):
        return None
    if own:
        return parse_proxy(own, "BEMSOFT_PROXY")
    raw = s.https_proxy if parts.scheme == "https" else s.http_proxy
    if not raw or is_loopback(parts.hostname):
        return None
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    if s.no_proxy and proxy_bypass_environment(host, {"no": s.no_proxy}):
        return None
    name = f"{parts.scheme}_proxy"
    return parse_proxy(raw, s.sources.get(name, name.upper()))


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


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    env = os.environ if environ is None else environ

    def read(key, kind, default):
        text = (env.get(key) or "").strip()
        return kind.parse(key, text, PROJECT_DIR) if text else default

    return ServiceSettings(
        run_dir=read("MONITOR_RUN_DIR", FilePath(), PROJECT_DIR / "completo" / "run"),
        log_dir=read("MONITOR_LOG_DIR", FilePath(), PROJECT_DIR / "completo" / "logs"),
        stop_timeout=read("STOP_TIMEOUT", Number(1, 86400), 120.0),
        start_check=read("START_CHECK_SECONDS", Number(0, 60), 2.0),
        retry_interval=read("RETRY_INTERVAL", Number(0.1, 86400), 300.0),
    )
