"""Settings (SPEC §7: a wrong .env value stops the start with one pt-BR line naming the key),
through parse_settings, load_settings and the real command line."""
from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from bemsoft_monitor import config
from bemsoft_monitor.config import ConfigError, load_settings, parse_settings
from bemsoft_monitor.testing.harness import LAB, TOKEN, subprocess_env

PROJECT = Path(__file__).resolve().parent.parent
DB_PASS = "senha-SECRETA-123"
BASE = {"DATABASE_URL": "sqlite://", "TERCEIROS": "X", "BEMSOFT_DRY_RUN": "1"}
PT_WORDS = ("deve", "obrigatório", "não", "aponta")


def parse(**env):
    return parse_settings({**BASE, **env})


def without(*keys, **env):
    values = {**BASE, **env}
    for key in keys:
        values.pop(key, None)
    return values


def assert_one_line_naming(err: ConfigError, key: str) -> None:
    text = str(err)
    assert err.key == key
    assert key in text
    assert "\n" not in text and "\r" not in text
    assert text.strip() == text and len(text) > len(key) + 10
    assert any(word in text for word in PT_WORDS), text  # pt-BR, says what is expected
    assert TOKEN not in text and DB_PASS not in text


# ------------------------------------------------------------------ validation errors
@pytest.mark.parametrize("key, value", [
    ("POLL_SECONDS", "abc"), ("POLL_SECONDS", "0"), ("POLL_SECONDS", "-1"), ("POLL_SECONDS", "nan"),
    ("BEMSOFT_DRY_RUN", "talvez"), ("BEMSOFT_VERIFY", "talvez"), ("DB_ENCRYPT", "sim?"),
    ("DEFAULT_GENDER", "X"), ("DEFAULT_GENDER", "Masculino"),
    ("DEFAULT_BIRTHDATE", "31/12/1990"), ("DEFAULT_BIRTHDATE", "1990-02-30"),
    ("START_FROM", "ontem"), ("START_FROM", "-5"), ("START_FROM", "12a"),
    ("TIMEZONE", "Marte/Base"), ("TIMEZONE", "America"), ("TIMEZONE", "/etc/passwd"),
    ("TIMEZONE", "-03:00"),
    ("BEMSOFT_BASE_URL", "ftp://x"), ("BEMSOFT_BASE_URL", "bemsoft.ws.wiselab.com.br"),
    ("BEMSOFT_BASE_URL", "http://"),
    ("BEMSOFT_ENDPOINT", "requests"),
    ("BATCH_SIZE", "5000"), ("BATCH_SIZE", "0"), ("BATCH_SIZE", "abc"), ("BATCH_SIZE", "1.5"),
    ("LOOKBACK_ITEMS", "-1"), ("DEBOUNCE_SECONDS", "-1"), ("BEMSOFT_TIMEOUT", "0"),
    ("BEMSOFT_MAX_ATTEMPTS", "0"), ("BEMSOFT_CONCURRENCY", "0"), ("BEMSOFT_RETRIES", "três"),
    ("DB_LOGIN_TIMEOUT", "0"), ("DB_QUERY_TIMEOUT", "0"), ("DB_QUERY_TIMEOUT", "1m"),
    ("DB_QUERY_TIMEOUT", "4000"), ("HEALTH_MAX_AGE", "0"), ("BEMSOFT_TESTS_TTL", "0"),
    ("METRICS_PORT", "70000"), ("METRICS_PORT", "porta"), ("METRICS_PORT", "0"),
    ("LOG_LEVEL", "VERBOSE"), ("MONITOR_NAME", "m" * 91),
    ("MONITOR_NAME", "#schema"), ("MONITOR_NAME", "bemsoft#inicio"),   # rows of their own
    ("DATABASE_URL", "banco_legado"),
])
def test_bad_value_is_one_line_naming_the_key(key, value):
    with pytest.raises(ConfigError) as err:
        parse(**{key: value}, BEMSOFT_TOKEN=TOKEN, DB_PASS=DB_PASS)
    assert_one_line_naming(err.value, key)


@pytest.mark.parametrize("values, key", [
    (without("TERCEIROS"), "TERCEIROS"),
    (without(TERCEIROS=""), "TERCEIROS"),
    (without(TERCEIROS=" , ,, "), "TERCEIROS"),
    (without(BEMSOFT_DRY_RUN="0"), "BEMSOFT_TOKEN"),
    (without("BEMSOFT_DRY_RUN"), "BEMSOFT_TOKEN"),             # DRY_RUN defaults to 0
    (without(BEMSOFT_DRY_RUN="0", BEMSOFT_TOKEN="   "), "BEMSOFT_TOKEN"),
    (without("DATABASE_URL"), "DB_SERVER"),
    (without("DATABASE_URL", DB_SERVER=r"localhost\SQLEXPRESS"), "DB_NAME"),
], ids=["no-terceiros", "empty-terceiros", "commas-only", "no-token", "no-token-default-dry-run",
        "blank-token", "no-db-server", "no-db-name"])
def test_missing_required_setting_is_one_line_naming_the_key(values, key):
    with pytest.raises(ConfigError) as err:
        parse_settings(values)
    assert_one_line_naming(err.value, key)


@pytest.mark.parametrize("content", [
    "{not json", '["GLI"]', '{"GLICOSE": null}', '{"GLICOSE": {"supportSpecimenId": "SORO"}}',
    '{"GLICOSE": ""}', '{"  ": "GLI"}', '{"GLICOSE": true}', "",
], ids=["syntax", "list", "null", "no-test-id", "empty-id", "blank-key", "bool", "empty-file"])
def test_bad_test_map_is_one_line_naming_the_key(tmp_path, content):
    path = tmp_path / "map.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        parse(BEMSOFT_TEST_MAP_PATH=str(path))
    assert_one_line_naming(err.value, "BEMSOFT_TEST_MAP_PATH")


def test_test_map_missing_file_is_one_line_naming_the_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        parse(BEMSOFT_TEST_MAP_PATH=str(tmp_path / "nao_existe.json"))
    assert_one_line_naming(err.value, "BEMSOFT_TEST_MAP_PATH")
    assert "nao_existe.json" in str(err.value)


def test_test_map_with_bom_and_both_forms(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({" Glicose ": "GLI", "ferro": {"supportTestId": "FE",
                                                             "supportSpecimenId": "SORO"},
                                "12345": 678}), encoding="utf-8-sig")
    settings = parse(BEMSOFT_TEST_MAP_PATH=str(path))
    assert settings.test_map == {"GLICOSE": config.TestMapping("GLI"),
                                 "FERRO": config.TestMapping("FE", "SORO"),
                                 "12345": config.TestMapping("678")}


@pytest.mark.parametrize("key, value", [("POLL_SECONDS", "inf"), ("BEMSOFT_TIMEOUT", "inf"),
                                        ("BEMSOFT_TIMEOUT", "1e300"), ("DEBOUNCE_SECONDS", "inf")])
def test_infinite_numbers_are_refused(key, value):
    with pytest.raises(ConfigError) as err:
        parse(**{key: value})
    assert_one_line_naming(err.value, key)


# ------------------------------------------------------------------ accepted values
def test_minimal_settings_and_defaults():
    settings = parse()
    assert settings.terceiros == ("X",)
    assert settings.dry_run is True
    assert settings.database_url == "sqlite://"
    assert settings.timezone == "America/Sao_Paulo"
    assert settings.default_gender is None and settings.default_birthdate is None
    assert settings.physician is None
    assert settings.test_map == {}
    assert settings.requests_url == "https://bemsoft.ws.wiselab.com.br/requests"
    assert settings.db_query_timeout == 60
    assert parse(DB_QUERY_TIMEOUT="5").db_query_timeout == 5


def test_terceiro_single_name_still_works():
    settings = parse_settings(without("TERCEIROS", TERCEIRO=f"  {LAB}  "))
    assert settings.terceiros == (LAB,)


def test_terceiros_wins_over_the_older_terceiro():
    assert parse(TERCEIROS="A", TERCEIRO="B").terceiros == ("A",)


def test_terceiros_comma_list_is_trimmed():
    settings = parse(TERCEIROS=f" {LAB} , Hermes Pardini,,  Álvaro  ,")
    assert settings.terceiros == (LAB, "Hermes Pardini", "Álvaro")


def test_database_url_makes_db_keys_optional():
    settings = parse_settings({"DATABASE_URL": "postgresql+psycopg://u@h/base", "TERCEIROS": "X",
                               "BEMSOFT_DRY_RUN": "1"})
    assert settings.database_url == "postgresql+psycopg://u@h/base"
    assert (settings.db_server, settings.db_name, settings.db_user) == ("", "", "")


def test_db_keys_without_database_url():
    settings = parse_settings(without("DATABASE_URL", DB_SERVER=r"10.0.0.5\SQLEXPRESS",
                                      DB_NAME="MinhaBase", DB_USER="usuario",
                                      DB_PASS="  com espaço "))
    assert settings.database_url is None
    assert (settings.db_server, settings.db_name, settings.db_user) == (
        r"10.0.0.5\SQLEXPRESS", "MinhaBase", "usuario")
    assert settings.db_pass == "  com espaço "   # passwords are kept as written


@pytest.mark.parametrize("raw, expected", [
    ("1", True), ("sim", True), ("TRUE", True), (" s ", True), ("on", True),
    ("0", False), ("não", False), ("nao", False), ("False", False), ("off", False),
])
def test_dry_run_spellings(raw, expected):
    assert parse(BEMSOFT_DRY_RUN=raw, BEMSOFT_TOKEN=TOKEN).dry_run is expected


@pytest.mark.parametrize("raw, expected", [("0", "0"), ("latest", "latest"), ("LATEST", "latest"),
                                           (" 12345 ", "12345"), ("", None)])
def test_start_from(raw, expected):
    assert parse(START_FROM=raw).start_from == expected


def test_data_defaults_and_physician():
    settings = parse(DEFAULT_GENDER=" f ", DEFAULT_BIRTHDATE="1970-01-01",
                     PHYSICIAN_NAME="Dra. Márcia", PHYSICIAN_COUNCIL="CRM",
                     PHYSICIAN_NUMBER="123456", PHYSICIAN_UF="SP")
    assert settings.default_gender == "F"
    assert settings.default_birthdate == dt.date(1970, 1, 1)
    assert settings.physician == config.Physician("Dra. Márcia", "CRM", "123456", "SP")


def test_number_settings():
    settings = parse(POLL_SECONDS="2,5", BATCH_SIZE="2000", LOOKBACK_ITEMS="0", METRICS_PORT="9100")
    assert settings.poll_seconds == 2.5
    assert settings.batch_size == 2000
    assert settings.lookback_items == 0
    assert settings.metrics_port == 9100


def test_secrets_are_not_in_repr():
    settings = parse(BEMSOFT_DRY_RUN="0", BEMSOFT_TOKEN=TOKEN, DB_PASS=DB_PASS)
    assert settings.token == TOKEN and settings.db_pass == DB_PASS
    for text in (repr(settings), str(settings)):
        assert TOKEN not in text
        assert DB_PASS not in text
    changed = settings.with_overrides(dry_run=True)
    assert TOKEN not in repr(changed) and DB_PASS not in repr(changed)


# ------------------------------------------------------------------ load_settings (.env)
def write_env(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(text, encoding=encoding)
    return path


ENV_TEXT = f"""# configuração do monitor
DATABASE_URL=sqlite:///legado.db

TERCEIROS="{LAB}, Hermes Pardini"
BEMSOFT_DRY_RUN=0
BEMSOFT_TOKEN={TOKEN}
DB_PASS='{DB_PASS}'
POLL_SECONDS=7   # segundos
export DEBOUNCE_SECONDS=3
BEMSOFT_TEST_MAP_PATH=tests_map.json
FAILED_DIR=falhas
LOG_FILE=-
"""


def test_env_file_is_parsed(tmp_path):
    (tmp_path / "tests_map.json").write_text('{"GLICOSE": "GLI"}', encoding="utf-8")
    env = write_env(tmp_path / "monitor.env", ENV_TEXT)
    settings = load_settings(env_file=env, environ={})
    assert settings.database_url == "sqlite:///legado.db"
    assert settings.terceiros == (LAB, "Hermes Pardini")
    assert settings.dry_run is False and settings.token == TOKEN
    assert settings.db_pass == DB_PASS
    assert settings.poll_seconds == 7.0 and settings.debounce_seconds == 3.0
    # relative paths are relative to the .env file, not to the current directory
    assert settings.test_map_path == tmp_path / "tests_map.json"
    assert settings.test_map == {"GLICOSE": config.TestMapping("GLI")}
    assert settings.failed_dir == tmp_path / "falhas"
    assert settings.log_file is None
    assert TOKEN not in repr(settings) and DB_PASS not in repr(settings)


def test_env_file_with_windows_line_endings(tmp_path):
    env = write_env(tmp_path / ".env", ENV_TEXT.replace("\n", "\r\n").replace(
        "BEMSOFT_TEST_MAP_PATH=tests_map.json\r\n", ""))
    settings = load_settings(env_file=env, environ={})
    assert settings.terceiros == (LAB, "Hermes Pardini") and settings.token == TOKEN


def test_process_environment_overrides_the_file(tmp_path):
    (tmp_path / "tests_map.json").write_text("{}", encoding="utf-8")
    env = write_env(tmp_path / ".env", ENV_TEXT)
    settings = load_settings(env_file=env, environ={"POLL_SECONDS": "9", "TERCEIROS": "Outro Lab",
                                                     "BEMSOFT_DRY_RUN": "1", "PATH": "/x",
                                                     "UNRELATED": "abc"})
    assert settings.poll_seconds == 9.0
    assert settings.terceiros == ("Outro Lab",)
    assert settings.dry_run is True
    assert settings.debounce_seconds == 3.0   # untouched keys still come from the file


def test_process_environment_error_names_the_key(tmp_path):
    (tmp_path / "tests_map.json").write_text("{}", encoding="utf-8")
    env = write_env(tmp_path / ".env", ENV_TEXT)
    with pytest.raises(ConfigError) as err:
        load_settings(env_file=env, environ={"BATCH_SIZE": "5000"})
    assert_one_line_naming(err.value, "BATCH_SIZE")


@pytest.mark.skipif(config.DEFAULT_ENV_FILE.exists(),
                    reason="a real .env exists beside the scripts")
def test_environment_only_without_a_file():
    """No .env at all (e.g. a systemd unit with Environment=): the process environment alone."""
    settings = load_settings(env_file=None, environ={**BASE, "TERCEIROS": LAB})
    assert settings.terceiros == (LAB,)


def test_missing_env_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_settings(env_file=tmp_path / "nao_existe.env", environ={})
    text = str(err.value)
    assert "--env-file" in text and "nao_existe.env" in text and "\n" not in text


def test_bad_value_in_env_file_names_the_key(tmp_path):
    env = write_env(tmp_path / ".env", "DATABASE_URL=sqlite://\nTERCEIROS=X\n"
                                        "BEMSOFT_DRY_RUN=1\nTIMEZONE=Marte/Base\n")
    with pytest.raises(ConfigError) as err:
        load_settings(env_file=env, environ={})
    assert_one_line_naming(err.value, "TIMEZONE")


def test_env_file_with_utf8_bom(tmp_path):
    env = write_env(tmp_path / ".env", f"TERCEIROS={LAB}\nDATABASE_URL=sqlite://\n"
                                       "BEMSOFT_DRY_RUN=1\n", encoding="utf-8-sig")
    assert load_settings(env_file=env, environ={}).terceiros == (LAB,)


def test_env_file_not_in_utf8_is_a_config_error(tmp_path):
    env = write_env(tmp_path / ".env", f"DATABASE_URL=sqlite://\nTERCEIROS={LAB}\n"
                                       "BEMSOFT_DRY_RUN=1\n", encoding="cp1252")
    try:
        settings = load_settings(env_file=env, environ={})
    except ConfigError as err:
        assert "\n" not in str(err)
    else:
        assert settings.terceiros == (LAB,)


# ------------------------------------------------------------------ property: never a crash
FUZZ_KEYS = [k for k in config.KNOWN_KEYS if k != "BEMSOFT_TEST_MAP_PATH"]
# a bad value may be reported under a related key
RELATED = {"DATABASE_URL": {"DATABASE_URL", "DB_SERVER"},
           "TERCEIRO": {"TERCEIROS"},
           "BEMSOFT_DRY_RUN": {"BEMSOFT_DRY_RUN", "BEMSOFT_TOKEN"},
           # settings that only work in pairs name the missing one
           "SMTP_USER": {"SMTP_USER", "SMTP_PASSWORD"},
           "SMTP_PASSWORD": {"SMTP_PASSWORD", "SMTP_USER"},
           "ALERT_EMAIL_TO": {"ALERT_EMAIL_TO", "SMTP_HOST"}}


@hsettings(max_examples=200, deadline=None, database=None,
           suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(FUZZ_KEYS),
       value=st.one_of(st.text(max_size=30),
                       st.sampled_from(["inf", "-inf", "nan", "1e309", "0", "-0", "1_000", "1,5",
                                        " ", "0x10", "９", "²", "Ⅻ", "1" * 5000, "0\r0",
                                        "a\x1b]0;x\x07"]),
                       st.text(alphabet="0123456789.,-+eE ", max_size=12)))
def test_any_single_value_gives_settings_or_a_config_error_naming_it(key, value):
    values = {**BASE, "TERCEIROS": "X", "BEMSOFT_TOKEN": TOKEN, key: value}
    try:
        parse_settings(values)
    except ConfigError as err:
        assert err.key in RELATED.get(key, {key}), (key, str(err))
        assert "\n" not in str(err) and "\r" not in str(err) and "\x1b" not in str(err)
        assert TOKEN not in str(err) or key == "BEMSOFT_TOKEN"


@pytest.mark.parametrize("key", ["BEMSOFT_CA_BUNDLE", "TIMEZONE", "ALERT_EMAIL_TO"])
def test_a_config_error_quoting_the_value_shows_its_control_characters_escaped(key):
    values = {**BASE, "TERCEIROS": "X", "BEMSOFT_TOKEN": TOKEN, key: "0\r0\x1b]0;x\x07"}
    with pytest.raises(ConfigError) as caught:
        parse_settings(values)
    message = str(caught.value)
    assert "\r" not in message and "\x1b" not in message and "\x07" not in message


# ------------------------------------------------------------------ the real CLI
def cli_env() -> dict:
    """The caller's environment minus the monitor's keys (they would override the file)."""
    return subprocess_env()


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "monitor_bemsoft.py", *args], cwd=PROJECT,
                          capture_output=True, text=True, encoding="utf-8", env=cli_env(),
                          check=False, timeout=timeout)


def good_env(tmp_path) -> dict:
    return {"DATABASE_URL": f"sqlite:///{tmp_path / 'nao_usado.db'}", "TERCEIROS": LAB,
            "BEMSOFT_DRY_RUN": "1", "LOG_FILE": "-", "FAILED_DIR": str(tmp_path / "falhas")}


CLI_CASES = [
    ("--once", {"POLL_SECONDS": "abc"}, "POLL_SECONDS"),
    ("--once", {"BEMSOFT_DRY_RUN": "talvez"}, "BEMSOFT_DRY_RUN"),
    ("--once", {"TIMEZONE": "Marte/Base"}, "TIMEZONE"),
    ("--once", {"TERCEIROS": None}, "TERCEIROS"),
    ("--once", {"BEMSOFT_DRY_RUN": "0"}, "BEMSOFT_TOKEN"),
    ("--once", {"DEFAULT_BIRTHDATE": "31/12/1990"}, "DEFAULT_BIRTHDATE"),
    ("--once", {"BATCH_SIZE": "5000"}, "BATCH_SIZE"),
    ("--drain", {"START_FROM": "ontem"}, "START_FROM"),
    ("--check", {"BEMSOFT_BASE_URL": "ftp://x"}, "BEMSOFT_BASE_URL"),
    ("--status", {"DEFAULT_GENDER": "X"}, "DEFAULT_GENDER"),
    ("--once", {"BEMSOFT_TEST_MAP_PATH": "nao_existe.json"}, "BEMSOFT_TEST_MAP_PATH"),
    ("--once", {"BEMSOFT_TOKEN": '"tok-SEGREDO\\nresto"'}, "BEMSOFT_TOKEN"),
    ("--check", {"BEMSOFT_TOKEN": "tok com espaço"}, "BEMSOFT_TOKEN"),
    ("--once", {"DATABASE_URL": "postgresql+psycopg://u:S3GR3D0@db:porta/base"}, "DATABASE_URL"),
    ("--once", {"BEMSOFT_BASE_URL": "http://bemsoft.ws.wiselab.com.br"}, "BEMSOFT_BASE_URL"),
    ("--once", {"BEMSOFT_PROXY": "http://u:S3GR3D0@proxy:abc"}, "BEMSOFT_PROXY"),
    ("--once", {"BEMSOFT_CA_BUNDLE": "nao_existe.pem"}, "BEMSOFT_CA_BUNDLE"),
]


@pytest.mark.parametrize("mode, change, key", CLI_CASES,
                         ids=[f"{mode}-{key}" for mode, _, key in CLI_CASES])
def test_cli_bad_env_exits_2_with_one_line(tmp_path, mode, change, key):
    values = {**good_env(tmp_path), **change}
    bad_env = write_env(tmp_path / "ruim.env",
                        "".join(f"{k}={v}\n" for k, v in values.items() if v is not None))
    result = run_cli("--env-file", str(bad_env), mode)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert key in lines[0]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert result.stdout == ""
    assert not (tmp_path / "nao_usado.db").exists()   # stopped before touching the database
    assert not (tmp_path / "falhas").exists()
    for secret in ("SEGREDO", "S3GR3D0"):                 # values are never echoed
        assert secret not in result.stderr


def test_cli_missing_env_file_exits_2_with_one_line(tmp_path):
    result = run_cli("--env-file", str(tmp_path / "nao_existe.env"), "--once")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "--env-file" in lines[0]
    assert "Traceback" not in result.stderr


def test_cli_env_not_in_utf8_exits_2_without_traceback(tmp_path):
    values = {**good_env(tmp_path), "BEMSOFT_DRY_RUN": "talvez"}
    bad_env = write_env(tmp_path / "ansi.env", "".join(f"{k}={v}\n" for k, v in values.items()),
                        encoding="cp1252")
    result = run_cli("--env-file", str(bad_env), "--once")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_cli_help():
    result = run_cli("--help")
    assert result.returncode == 0
    for option in ("--once", "--drain", "--check", "--status", "--demo", "--env-file"):
        assert option in result.stdout
    assert "Bemsoft" in result.stdout
    assert result.stderr == ""


# ------------------------------------------------------------------ hospital networks (SPEC §8)
@pytest.mark.parametrize("token", ["tok\nen-123", "tok en-123", "tokén-123", "tok\ten-123",
                                   "tok\x7fen", "tok\u200ben"])
def test_token_must_be_visible_ascii_without_spaces(token):
    with pytest.raises(ConfigError) as err:
        parse(BEMSOFT_TOKEN=token)
    assert_one_line_naming(err.value, "BEMSOFT_TOKEN")
    assert token not in str(err.value) and "en-123" not in str(err.value)


def test_token_with_a_line_break_from_dotenv_quotes_is_refused(tmp_path):
    path = write_env(tmp_path / "t.env", 'DATABASE_URL=sqlite://\nTERCEIROS=X\n'
                                         'BEMSOFT_TOKEN="abc-SEGREDO\\ndef"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(path, environ={})
    assert err.value.key == "BEMSOFT_TOKEN" and "SEGREDO" not in str(err.value)


def test_plain_http_is_refused_unless_loopback_or_allowed():
    with pytest.raises(ConfigError) as err:
        parse(BEMSOFT_BASE_URL="http://bemsoft.ws.wiselab.com.br")
    assert_one_line_naming(err.value, "BEMSOFT_BASE_URL")
    for url in ("http://127.0.0.1:8099", "http://localhost:8099", "http://[::1]:8099",
                "https://bemsoft.ws.wiselab.com.br"):
        assert parse(BEMSOFT_BASE_URL=url).base_url == url
    assert parse(BEMSOFT_BASE_URL="http://api.interna", BEMSOFT_ALLOW_HTTP="1").base_url


HTTPS_API = {"BEMSOFT_BASE_URL": "https://api.bemsoft.test"}


@pytest.mark.parametrize("env, expected, source", [
    ({}, None, None),
    ({"HTTPS_PROXY": "http://proxy:3128"}, "http://proxy:3128", "HTTPS_PROXY"),
    ({"https_proxy": "proxy.hospital:8080"}, "http://proxy.hospital:8080", "https_proxy"),
    ({"HTTPS_PROXY": "http://a:1", "https_proxy": "http://b:2"}, "http://b:2", "https_proxy"),
    ({"HTTP_PROXY": "http://only-http:1"}, None, None),     # the API is https
    ({"HTTPS_PROXY": "http://p:1", "BEMSOFT_PROXY": "http://mine:2"}, "http://mine:2", "BEMSOFT_PROXY"),
    ({"HTTPS_PROXY": "http://p:1", "BEMSOFT_PROXY": "none"}, None, None),
    ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "api.bemsoft.test"}, None, None),
    ({"HTTPS_PROXY": "http://p:1", "no_proxy": ".bemsoft.test"}, None, None),
    ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "*"}, None, None),
    ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "outro.com,bemsoft.test"}, None, None),
    ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "outro.com"}, "http://p:1", "HTTPS_PROXY"),
    ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "api.bemsoft.test", "BEMSOFT_PROXY": "http://m:2"},
     "http://m:2", "BEMSOFT_PROXY"),
])
def test_proxy_selection(env, expected, source):
    proxy = parse(**HTTPS_API, **env).proxy
    assert (proxy.url if proxy else None) == expected
    assert (proxy.source if proxy else None) == source


def test_environment_proxy_is_never_used_for_a_loopback_api():
    assert parse(BEMSOFT_BASE_URL="http://127.0.0.1:8099", HTTP_PROXY="http://p:1").proxy is None
    assert parse(BEMSOFT_BASE_URL="http://127.0.0.1:8099", BEMSOFT_PROXY="http://p:1").proxy


def test_proxy_credentials_are_decoded_masked_and_kept_out_of_repr():
    settings = parse(**HTTPS_API, BEMSOFT_PROXY="http://lab%40ti:s%3Acreta@proxy:3128")
    proxy = settings.proxy
    assert (proxy.username, proxy.password) == ("lab@ti", "s:creta")
    assert proxy.url == "http://proxy:3128" and proxy.display == "http://***@proxy:3128"
    assert "creta" not in repr(settings) and "creta" not in repr(proxy)
    assert {"lab@ti", "s:creta"} <= set(settings.secrets)


def test_process_environment_proxy_reaches_the_settings(tmp_path):
    path = write_env(tmp_path / "p.env", "DATABASE_URL=sqlite://\nTERCEIROS=X\nBEMSOFT_DRY_RUN=1\n")
    settings = load_settings(path, environ={"https_proxy": "http://proxy.hospital:3128",
                                            "NO_PROXY": "localhost"})
    assert settings.proxy.url == "http://proxy.hospital:3128"


@pytest.mark.parametrize("raw", ["ftp://proxy:21", "http://u:S3GR3D0@proxy:porta",
                                 "http://proxy:3128/caminho", "http://:3128"])
def test_bad_proxy_is_one_line_naming_the_key_without_the_value(raw):
    with pytest.raises(ConfigError) as err:
        parse(**HTTPS_API, HTTPS_PROXY=raw)
    assert_one_line_naming(err.value, "HTTPS_PROXY")
    assert "S3GR3D0" not in str(err.value)


def test_ca_bundle_must_be_a_pem_file(tmp_path):
    bad = tmp_path / "ca.pem"
    bad.write_text("isto não é um certificado", encoding="utf-8")
    for path in (bad, tmp_path / "nao_existe.pem"):
        with pytest.raises(ConfigError) as err:
            parse(BEMSOFT_CA_BUNDLE=str(path))
        assert_one_line_naming(err.value, "BEMSOFT_CA_BUNDLE")


def test_verify_off_is_a_warning_at_every_start():
    notes = parse(BEMSOFT_VERIFY="0").notes
    assert any("BEMSOFT_VERIFY=0" in note and "BEMSOFT_CA_BUNDLE" in note for note in notes)
    assert not any("BEMSOFT_VERIFY" in note for note in parse().notes)


@pytest.mark.parametrize("url", ["postgresql+psycopg://u:S3GR3D0@db:porta/base",
                                 "mssql+pyodbc://u:S3GR3D0@host:1433x/base"])
def test_database_url_with_a_bad_port_is_a_config_error(url):
    with pytest.raises(ConfigError) as err:
        parse(DATABASE_URL=url)
    assert_one_line_naming(err.value, "DATABASE_URL")
    assert "S3GR3D0" not in str(err.value)
