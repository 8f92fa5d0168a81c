"""Database connection stage: ODBC connection string, engine creation, and the pt-BR
diagnosis of connection failures, checked against Microsoft's real ODBC Driver 18
(from the PyPI package mssql-python-odbc) and a fake TDS server (tests/tds_fake.py)."""
from __future__ import annotations

import logging
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import BigInteger, Column, MetaData, String, Table, insert, select, text
from sqlalchemy.dialects import mssql
from sqlalchemy.pool import StaticPool

import odbc_support
from odbc_support import DRIVER_NAME, odbc_driver  # noqa: F401  (pytest fixture)
from tds_fake import FakeTdsServer, make_self_signed_cert

from bemsoft_monitor.config import ConfigError, Settings
from bemsoft_monitor.db import (
    MONITOR_SCHEMA,
    DatabaseUnavailable,
    connect_check,
    create_db_engine,
    describe_connect_error,
    monitor_schema_map,
    odbc_connection_string,
)

# unixODBC reads ODBCSYSINI once per process: register the driver before any ODBC call.
odbc_support.prepare()

ROOT = Path(__file__).resolve().parent.parent

# Special characters that an ODBC connection string must escape.
TRICKY_USER = "lab;{user}=1"
TRICKY_PASS = " p@ss;{w}}=rd "
TRICKY_DB = "LIS;{db}"


def mssql_settings(**changes) -> Settings:
    base = dict(db_server="LABSERVER\\SQLEXPRESS", db_name="LIS", db_user="monitor",
                db_pass="S3cr3t!", odbc_driver=DRIVER_NAME, db_encrypt=True,
                db_trust_cert=False, db_login_timeout=15)
    base.update(changes)
    return Settings(**base)


def assert_one_clean_line(message: str, *secrets: str) -> None:
    assert message and "\n" not in message and "\r" not in message
    assert "Traceback" not in message
    for secret in secrets:
        assert secret.strip() not in message


def free_closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- ODBC string

def test_connection_string_named_instance_sql_login():
    assert odbc_connection_string(mssql_settings()) == (
        "DRIVER={ODBC Driver 18 for SQL Server};SERVER=LABSERVER\\SQLEXPRESS;DATABASE=LIS;"
        "UID=monitor;PWD=S3cr3t!;Encrypt=yes;TrustServerCertificate=no;APP=bemsoft-monitor")


@pytest.mark.parametrize("server", ["10.0.0.5,1433", "tcp:10.0.0.5,1433", "sql01",
                                    "sql01.lab.local\\LIS2019"])
def test_connection_string_server_forms_pass_unquoted(server):
    assert f";SERVER={server};" in odbc_connection_string(mssql_settings(db_server=server))


def test_connection_string_escapes_special_characters():
    conn = odbc_connection_string(mssql_settings(db_user=TRICKY_USER, db_pass=TRICKY_PASS,
                                                 db_name=TRICKY_DB))
    assert ";UID={lab;{user}}=1};" in conn
    assert ";PWD={ p@ss;{w}}}}=rd };" in conn
    assert ";DATABASE={LIS;{db}}};" in conn


@pytest.mark.parametrize("value, expected", [
    ("plain", "plain"), ("a=b", "{a=b}"), (" lead", "{ lead}"), ("trail ", "{trail }"),
    ("}", "{}}}"), ("{x", "{{x}"), ("a;b", "{a;b}"),
])
def test_connection_string_password_escaping(value, expected):
    assert f";PWD={expected};" in odbc_connection_string(mssql_settings(db_pass=value))


def test_connection_string_windows_authentication():
    conn = odbc_connection_string(mssql_settings(db_user="", db_pass=""))
    assert "Trusted_Connection=yes" in conn
    assert "UID=" not in conn and "PWD=" not in conn


@pytest.mark.parametrize("encrypt, trust, expected", [
    (True, False, "Encrypt=yes;TrustServerCertificate=no"),
    (True, True, "Encrypt=yes;TrustServerCertificate=yes"),
    (False, False, "Encrypt=no;TrustServerCertificate=no"),
])
def test_connection_string_encryption_flags(encrypt, trust, expected):
    conn = odbc_connection_string(mssql_settings(db_encrypt=encrypt, db_trust_cert=trust))
    assert expected in conn


def test_connection_string_without_password_and_no_timeout_keyword():
    conn = odbc_connection_string(mssql_settings(), include_password=False)
    assert "PWD" not in conn and "S3cr3t" not in conn and "UID=monitor" in conn
    # Driver 18 < 18.7 silently ignores any timeout keyword; the engine sets the ODBC
    # attribute SQL_ATTR_LOGIN_TIMEOUT instead (proved by the closed-port test below).
    assert "Timeout" not in conn


# --------------------------------------------------------------------------- engines

def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_sqlite_and_postgres_engines_do_not_import_pyodbc(tmp_path):
    result = run_python(f"""
        import sys
        from bemsoft_monitor.config import Settings
        from bemsoft_monitor.db import create_db_engine, connect_check
        assert "pyodbc" not in sys.modules, "import of db.py loaded pyodbc"
        s = Settings(database_url="sqlite:///{(tmp_path / 'x.db').as_posix()}")
        connect_check(create_db_engine(s), s)
        create_db_engine(Settings(database_url="sqlite://"))
        create_db_engine(Settings(database_url="postgresql+psycopg://u:p@127.0.0.1:1/db"))
        assert "pyodbc" not in sys.modules, "a non-SQL Server engine loaded pyodbc"
        print("OK")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OK"


def test_sqlite_memory_engine_is_shared_and_thread_safe():
    engine = create_db_engine(Settings(database_url="sqlite://"))
    assert isinstance(engine.pool, StaticPool)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
        conn.execute(text("INSERT INTO t VALUES (1)"))
    seen = []
    worker = threading.Thread(target=lambda: seen.append(
        engine.connect().execute(text("SELECT x FROM t")).scalar()))
    worker.start()
    worker.join(10)
    assert seen == [1]


def test_sqlite_file_engine_usable_from_other_threads(tmp_path):
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'lis.db'}")
    engine = create_db_engine(settings)
    connect_check(engine, settings)
    errors = []

    def work():
        try:
            with engine.begin() as conn:
                conn.execute(text("CREATE TABLE IF NOT EXISTS t (x INTEGER)"))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == []


def test_monitor_table_uses_default_schema_outside_sql_server():
    metadata = MetaData()
    state = Table("_MonitorState", metadata, Column("Name", String(100), primary_key=True),
                  Column("LastItemId", BigInteger), schema=MONITOR_SCHEMA)
    engine = create_db_engine(Settings(database_url="sqlite://"))
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(state).values(Name="bemsoft", LastItemId=7))
    with engine.connect() as conn:
        assert conn.execute(select(state.c.LastItemId)).scalar() == 7


def test_mssql_schema_translation_renders_dbo():
    metadata = MetaData()
    state = Table("_MonitorState", metadata, Column("Name", String(100), primary_key=True),
                  Column("LastItemId", BigInteger), schema=MONITOR_SCHEMA)
    assert monitor_schema_map("mssql") == {MONITOR_SCHEMA: "dbo"}
    assert monitor_schema_map("sqlite") == {MONITOR_SCHEMA: None}
    sql = str(select(state).compile(dialect=mssql.dialect(),
                                    schema_translate_map=monitor_schema_map("mssql"),
                                    render_schema_translate=True))
    assert "FROM dbo.[_MonitorState]" in sql


def test_bad_database_url_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        create_db_engine(Settings(database_url="postgres-ish://u:secretpw@h/db"))
    assert "DATABASE_URL" in str(info.value) and "secretpw" not in str(info.value)


def test_mssql_engine_options_and_no_password_in_url(odbc_driver):
    engine = create_db_engine(mssql_settings(db_pass="Sup3rS3cret"))
    assert engine.dialect.name == "mssql" and engine.dialect.driver == "pyodbc"
    assert engine.dialect.fast_executemany is True
    assert engine.pool._pre_ping is True
    assert engine.get_execution_options()["schema_translate_map"] == {MONITOR_SCHEMA: "dbo"}
    for shown in (repr(engine), str(engine.url),
                  engine.url.render_as_string(hide_password=False)):
        assert "Sup3rS3cret" not in shown
    assert "odbc_connect" in str(engine.url)


# --------------------------------------------------------------------------- diagnosis

class FakePyodbcError(Exception):
    """Shape of a pyodbc.Error: args = (sqlstate, message)."""


def test_describe_windows_driver_manager_not_found(monkeypatch):
    import bemsoft_monitor.db as db
    monkeypatch.setattr(db, "installed_odbc_drivers", lambda: ["SQL Server"])
    err = FakePyodbcError("IM002", "[IM002] [Microsoft][ODBC Driver Manager] Data source name "
                                   "not found and no default driver specified (0) (SQLDriverConnect)")
    message = describe_connect_error(err, mssql_settings())
    assert "'SQL Server'" in message and "ODBC Driver 18 for SQL Server" in message
    assert "ODBC_DRIVER" in message and "LABSERVER\\SQLEXPRESS" in message
    assert_one_clean_line(message, "S3cr3t!")


def test_describe_postgres_password_failure_names_host_not_password():
    err = Exception('connection failed: connection to server at "10.1.1.9", port 5432 failed: '
                    'FATAL:  password authentication failed for user "lab"\n')
    settings = Settings(database_url="postgresql+psycopg://lab:pg-secret@10.1.1.9:5432/lis")
    message = describe_connect_error(err, settings)
    assert "login recusado" in message and "10.1.1.9:5432" in message and "'lab'" in message
    assert_one_clean_line(message, "pg-secret")


def test_describe_scrubs_password_echoed_by_a_driver():
    err = FakePyodbcError("HY000", "[HY000] weird failure with PWD={ p@ss;{w}}}}=rd }; and "
                                   " p@ss;{w}}=rd  raw")
    message = describe_connect_error(err, mssql_settings(db_pass=TRICKY_PASS))
    assert_one_clean_line(message, TRICKY_PASS)
    assert "p@ss" not in message


def test_describe_sqlite_file_cannot_be_opened(tmp_path):
    settings = Settings(database_url=f"sqlite:///{tmp_path}/missing/dir/lis.db")
    with pytest.raises(DatabaseUnavailable) as info:
        connect_check(create_db_engine(settings), settings)
    message = str(info.value)
    assert "SQLite" in message and "lis.db" in message
    assert_one_clean_line(message)


# --------------------------------------------------------------------------- real driver

def check_fails(settings: Settings) -> tuple[str, float]:
    engine = create_db_engine(settings)
    started = time.monotonic()
    try:
        with pytest.raises(DatabaseUnavailable) as info:
            connect_check(engine, settings)
    finally:
        engine.dispose()
    assert info.value.__cause__ is not None  # raised from the driver's error
    return str(info.value), time.monotonic() - started


def test_real_driver_not_installed_lists_installed_drivers(odbc_driver):
    settings = mssql_settings(odbc_driver="ODBC Driver 99 for SQL Server")
    message, _ = check_fails(settings)
    assert "'ODBC Driver 99 for SQL Server' (ODBC_DRIVER)" in message
    assert f"Drivers ODBC instalados: '{DRIVER_NAME}'" in message
    assert "Instale o 'ODBC Driver 18 for SQL Server'" in message
    assert "LABSERVER\\SQLEXPRESS" in message
    assert_one_clean_line(message, "S3cr3t!")


def test_real_driver_unreachable_server_respects_login_timeout(odbc_driver, caplog):
    port = free_closed_port()
    settings = mssql_settings(db_server=f"127.0.0.1,{port}", db_login_timeout=2)
    with caplog.at_level(logging.DEBUG):
        message, elapsed = check_fails(settings)
    assert elapsed < settings.db_login_timeout + 5, elapsed
    assert f"'127.0.0.1,{port}' (DB_SERVER)" in message
    assert "não respondeu em 2 s (DB_LOGIN_TIMEOUT)" in message
    assert "1433" in message and "firewall" in message
    assert_one_clean_line(message, "S3cr3t!")
    assert "S3cr3t!" not in caplog.text


def test_real_driver_reaches_fake_server_with_exact_credentials(odbc_driver, caplog):
    with FakeTdsServer() as fake:
        settings = mssql_settings(db_server=fake.address, db_user=TRICKY_USER,
                                  db_pass=TRICKY_PASS, db_name=TRICKY_DB,
                                  db_encrypt=False, db_login_timeout=5)
        with caplog.at_level(logging.DEBUG):
            message, elapsed = check_fails(settings)
    assert fake.problems == []
    assert len(fake.logins) == 1, "the driver should try exactly once"
    login = fake.logins[0]
    assert login.tds_version == 0x74000004  # TDS 7.4
    assert login.username == TRICKY_USER
    assert login.password == TRICKY_PASS
    assert login.database == TRICKY_DB
    assert login.appname == "bemsoft-monitor"
    assert login.servername == fake.address
    assert "login recusado" in message and f"'{TRICKY_USER}'" in message
    assert "DB_USER e DB_PASS" in message and fake.address in message
    assert_one_clean_line(message, TRICKY_PASS)
    assert TRICKY_PASS.strip() not in caplog.text
    assert elapsed < 5


def test_real_driver_missing_database_message(odbc_driver):
    error = (4060, 1, 11, 'Cannot open database "LIS" requested by the login. The login failed.')
    with FakeTdsServer(error=error) as fake:
        message, _ = check_fails(mssql_settings(db_server=fake.address, db_encrypt=False))
    assert "a base 'LIS' (DB_NAME) não existe" in message
    assert_one_clean_line(message, "S3cr3t!")


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory):
    try:
        return make_self_signed_cert(tmp_path_factory.mktemp("tls"))
    except (OSError, subprocess.CalledProcessError) as err:
        odbc_support.unavailable(f"openssl não gerou o certificado de teste: {err}")


def test_real_driver_rejects_untrusted_certificate(odbc_driver, self_signed):
    with FakeTdsServer(certificate=self_signed) as fake:
        message, _ = check_fails(mssql_settings(db_server=fake.address, db_encrypt=True,
                                                db_trust_cert=False))
    assert fake.logins == [] and fake.tls_handshakes == 0
    assert "TLS/certificado" in message and "DB_TRUST_CERT=1" in message
    assert_one_clean_line(message, "S3cr3t!")


def test_real_driver_trust_cert_goes_through_tls_to_login(odbc_driver, self_signed):
    with FakeTdsServer(certificate=self_signed) as fake:
        message, _ = check_fails(mssql_settings(db_server=fake.address, db_encrypt=True,
                                                db_trust_cert=True))
    assert fake.tls_handshakes == 1
    assert [login.password for login in fake.logins] == ["S3cr3t!"]
    assert "login recusado" in message


def test_real_driver_encrypt_against_server_without_tls(odbc_driver):
    with FakeTdsServer() as fake:  # answers ENCRYPT_NOT_SUP
        message, _ = check_fails(mssql_settings(db_server=fake.address, db_encrypt=True))
    assert fake.logins == []
    assert "DB_ENCRYPT=0" in message
    assert_one_clean_line(message, "S3cr3t!")


def test_real_driver_windows_authentication_is_explained(odbc_driver):
    with FakeTdsServer() as fake:
        message, _ = check_fails(mssql_settings(db_server=fake.address, db_encrypt=False,
                                                db_user="", db_pass=""))
    assert fake.prelogins == 1  # the driver did talk to the server first
    assert "autenticação integrada do Windows (DB_USER vazio)" in message
    assert "DB_USER e DB_PASS" in message
    assert_one_clean_line(message)


# --------------------------------------------------------------------------- DB_QUERY_TIMEOUT

def test_query_timeout_is_set_on_every_sql_server_connection(odbc_driver):
    """pyodbc's Connection.timeout (SQL_ATTR_QUERY_TIMEOUT of its cursors) is set when each
    connection opens, for DB_* settings and for an mssql+pyodbc DATABASE_URL alike."""
    class DbapiConnection:  # stands in for the pyodbc connection handed to the listener
        timeout = 0
    for settings in (mssql_settings(db_query_timeout=7),
                     Settings(database_url="mssql+pyodbc://u:p@h/lis?driver=ODBC+Driver+18+for+SQL+Server",
                              db_query_timeout=7)):
        engine = create_db_engine(settings)
        raw = DbapiConnection()
        ours = [f for f in engine.pool.dispatch.connect if f.__name__ == "_set_query_timeout"]
        assert len(ours) == 1
        ours[0](raw, None)
        assert raw.timeout == 7


@pytest.mark.postgres
def test_postgres_statement_timeout_comes_from_db_query_timeout(pg_url):
    engine = create_db_engine(Settings(database_url=pg_url + "?options=-capplication_name%3Dbm",
                                       db_query_timeout=5))
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar() == "5s"
            assert conn.execute(text("SHOW application_name")).scalar() == "bm"  # URL options kept
    finally:
        engine.dispose()
