"""Shared fixtures: real databases (SQLite file, PostgreSQL) with the legacy schema, the
project's fake Bemsoft API on 127.0.0.1, and settings/monitor factories."""
from __future__ import annotations

import datetime as dt
import os
import uuid
import subprocess
import sys
import threading

import pytest
import sqlalchemy as sa

from bemsoft_monitor.app import build_monitor
from bemsoft_monitor.config import PROJECT_DIR, parse_settings
from bemsoft_monitor.db import create_db_engine, monitor_schema_map
from bemsoft_monitor.schema import legacy_metadata, monitor_metadata
from bemsoft_monitor.testing.fakeapi import FakeBemsoft
from bemsoft_monitor.testing.harness import (IN_CI, LAB, PG_ADMIN_URL, TOKEN, PgDatabase,
                                             PostgresUnavailable, env_values, pg_problem,
                                             read_checkpoint, subprocess_env, wait_until,
                                             write_env)
from bemsoft_monitor.testing.sampledata import add_items, add_order, add_patient, create_legacy_schema

# SQL Server: an `mssql+pyodbc` URL of a login allowed to CREATE DATABASE; each test session
# works in a throw-away database of its own, dropped at the end.
MSSQL_ADMIN_URL = os.environ.get("TEST_MSSQL_URL", "").strip()
MSSQL_HOWTO = ("defina TEST_MSSQL_URL=mssql+pyodbc://usuario:senha@host:1433/master"
               "?driver=ODBC+Driver+18+for+SQL+Server&TrustServerCertificate=yes")
if MSSQL_ADMIN_URL:
    import odbc_support
    odbc_support.prepare()  # unixODBC reads ODBCSYSINI once: before the first ODBC call


def pg_unavailable(reason: str):
    """Under CI=true a missing PostgreSQL is a failure, never a silent skip."""
    if IN_CI:
        pytest.fail(f"PostgreSQL obrigatório no CI e inacessível: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL inacessível ({reason}); defina TEST_PG_URL")


@pytest.fixture(scope="module")
def postgres_server():
    """For tests that create their own databases (the reliability scenarios)."""
    problem = pg_problem()
    if problem:
        pg_unavailable(problem)


@pytest.fixture(scope="session")
def pg_database_url():
    """A throw-away PostgreSQL database for this test session."""
    database = PgDatabase("bm_test", legacy_schema=False)
    try:
        url = database.create()
    except PostgresUnavailable as err:
        pg_unavailable(str(err))
    yield url
    database.drop()


@pytest.fixture(scope="session")
def mssql_database_url():
    """A throw-away SQL Server database for this test session (TEST_MSSQL_URL)."""
    if not MSSQL_ADMIN_URL:
        pytest.skip(f"SQL Server não configurado: {MSSQL_HOWTO}")
    name = f"bm_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(MSSQL_ADMIN_URL, isolation_level="AUTOCOMMIT")
    problem = None
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE [{name}]")
    except Exception as err:  # asked for and not usable: a failure, not a skip
        problem = str(err).splitlines()[0]
    if problem:
        pytest.fail(f"TEST_MSSQL_URL definido, mas não foi possível criar a base de teste: "
                    f"{problem}", pytrace=False)
    url = sa.engine.make_url(MSSQL_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as conn:
        try:  # drop the connections a test left open (SQL Server; other T-SQL engines may refuse)
            conn.exec_driver_sql(f"ALTER DATABASE [{name}] SET SINGLE_USER WITH ROLLBACK IMMEDIATE")
        except sa.exc.DBAPIError:
            pass
        conn.exec_driver_sql(f"DROP DATABASE [{name}]")
    admin.dispose()


def _fresh_schema(engine: sa.Engine) -> None:
    monitor_metadata.drop_all(engine.execution_options(
        schema_translate_map=monitor_schema_map(engine.dialect.name)))
    legacy_metadata.drop_all(engine)
    create_legacy_schema(engine)


POSTGRESQL = pytest.param("postgresql", marks=pytest.mark.postgres)
MSSQL = pytest.param("mssql", marks=pytest.mark.mssql)
SESSION_DATABASES = {"postgresql": "pg_database_url", "mssql": "mssql_database_url"}


def fresh_database(request, kind: str) -> str:
    """The URL of an empty legacy schema: a SQLite file, or the session's PostgreSQL / SQL
    Server database with its tables created anew."""
    if kind == "sqlite":
        url = f"sqlite:///{request.getfixturevalue('tmp_path') / 'legado.db'}"
    else:
        url = request.getfixturevalue(SESSION_DATABASES[kind])
    engine = sa.create_engine(url)
    _fresh_schema(engine)
    engine.dispose()
    return url


@pytest.fixture(params=["sqlite", POSTGRESQL, MSSQL])
def db_url(request):
    return fresh_database(request, request.param)


@pytest.fixture(params=[POSTGRESQL, MSSQL])
def server_url(request):
    """A database server (locks, sessions, concurrent transactions): PostgreSQL and, when
    TEST_MSSQL_URL is set, SQL Server."""
    return fresh_database(request, request.param)


@pytest.fixture
def pg_url(request):
    return fresh_database(request, "postgresql")


@pytest.fixture
def api():
    with FakeBemsoft(token=TOKEN) as server:
        yield server


@pytest.fixture
def settings_factory(tmp_path, api):
    def make(db_url: str, **overrides):
        values = env_values(db_url, api.url, tmp_path, **{
            "BEMSOFT_RETRIES": "1",
            "BEMSOFT_BACKOFF": "0.01",
            "BEMSOFT_TIMEOUT": "5",
            "POLL_SECONDS": "0.1",
            "LOG_FILE": "-",
            "BEMSOFT_CONCURRENCY": "1",
            **overrides})
        return parse_settings(values, base_dir=tmp_path)
    return make


class Harness:
    """A real database + the fake API + monitors built exactly as the CLI builds them."""

    def __init__(self, url, api, settings_factory, **engine_settings):
        """engine_settings: settings the shared engine is built with (e.g. DB_QUERY_TIMEOUT)."""
        self.url = url
        self.api = api
        self.settings_factory = settings_factory
        self.engine = create_db_engine(settings_factory(url, **engine_settings))
        self.monitors = []
        self.clock_value = 1000.0

    def clock(self):
        return self.clock_value

    def monitor(self, lock=None, status=None, **overrides):
        settings = self.settings_factory(self.url, **overrides)
        printed = []
        monitor = build_monitor(settings, engine=self.engine, shutdown=threading.Event(),
                                on_dry_run=lambda payload, key: printed.append((key, payload)),
                                lock=lock, status=status)
        monitor.clock = self.clock
        monitor.printed = printed
        self.monitors.append(monitor)
        return monitor

    def order(self, cod, items, *, patient=None, hora="08:30", day=dt.date(2026, 11, 27),
              entered_at=None, terceirizado=LAB, new_patient=True):
        """Insert a solicitation with its items; returns the new item ids."""
        codpac = 100 + cod if patient is None or "codpaciente" not in patient else patient["codpaciente"]
        with self.engine.begin() as conn:
            if new_patient:
                info = {"nome": f"Paciente {cod}", "datanasc": dt.datetime(1980, 1, 2), "sexo": "F",
                        "cpf": "123.456.789-09"}
                info.update({k: v for k, v in (patient or {}).items() if k != "codpaciente"})
                add_patient(conn, codpac, **info)
            add_order(conn, cod, codpac, dtaentrada=dt.datetime.combine(day, dt.time()), hora=hora)
        return self.items(cod, items, entered_at=entered_at or dt.datetime.combine(day, dt.time(8, 31)),
                          terceirizado=terceirizado)

    def items(self, cod, items, *, entered_at=None, terceirizado=LAB):
        with self.engine.begin() as conn:
            return add_items(conn, cod, [i if isinstance(i, dict) else {"CodConvExames": i,
                                                                         "DescExames": f"EXAME {i}",
                                                                         "Origem": "AMB"}
                                         for i in items],
                             terceirizado=terceirizado,
                             entered_at=entered_at or dt.datetime(2026, 11, 27, 8, 31))

    def checkpoint(self, name="bemsoft"):
        return read_checkpoint(self.engine, name)

    def close(self):
        for monitor in self.monitors:
            monitor.close()
        self.engine.dispose()


@pytest.fixture
def harness(db_url, api, settings_factory):
    h = Harness(db_url, api, settings_factory)
    yield h
    h.close()


# ------------------------------------------------------------------ driving the CLIs
ROOT = PROJECT_DIR


def run(*args, timeout=60, **kwargs):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env(), **kwargs)


@pytest.fixture
def env_file(tmp_path, api):
    db = tmp_path / "legado.db"
    create_legacy_schema(sa.create_engine(f"sqlite:///{db}"))
    return write_env(tmp_path, f"sqlite:///{db}", api.url, BEMSOFT_RETRIES=0, POLL_SECONDS=0.2,
                     LOG_FILE=tmp_path / "logs" / "monitor.log")


@pytest.fixture
def legacy(env_file, api, settings_factory, tmp_path):
    h = Harness(f"sqlite:///{tmp_path / 'legado.db'}", api, settings_factory)
    yield h
    h.close()
