"""Shared fixtures: real databases (SQLite file, PostgreSQL) with the legacy schema, the
project's fake Bemsoft API on 127.0.0.1, and settings/monitor factories."""
from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from bemsoft_monitor.app import build_monitor
from bemsoft_monitor.config import parse_settings
from bemsoft_monitor.db import create_db_engine
from bemsoft_monitor.fakeapi import FakeBemsoft
from bemsoft_monitor.sampledata import add_items, add_order, add_patient, create_legacy_schema
from bemsoft_monitor.schema import legacy_metadata, monitor_metadata

LAB = "DIAGNÓSTICO DO BRASIL - DB"
TOKEN = "test-token-SECRET-123"
PG_ADMIN_URL = os.environ.get("TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
IN_CI = os.environ.get("CI", "").lower() == "true"


def pg_unavailable(reason: str):
    """Under CI=true a missing PostgreSQL is a failure, never a silent skip."""
    if IN_CI:
        pytest.fail(f"PostgreSQL obrigatório no CI e inacessível: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL inacessível ({reason}); defina TEST_PG_URL")


@pytest.fixture(scope="session")
def pg_database_url():
    """A throw-away PostgreSQL database for this test session."""
    try:
        admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT",
                                 connect_args={"connect_timeout": 5})
        name = f"bm_test_{uuid.uuid4().hex[:10]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except Exception as err:  # driver missing or server down: same treatment
        pg_unavailable(str(err).splitlines()[0])
    url = sa.engine.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _fresh_schema(engine: sa.Engine) -> None:
    monitor_metadata.drop_all(engine.execution_options(
        schema_translate_map={"monitor_schema": None}))
    legacy_metadata.drop_all(engine)
    create_legacy_schema(engine)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'legado.db'}"
    else:
        url = request.getfixturevalue("pg_database_url")
    engine = sa.create_engine(url)
    _fresh_schema(engine)
    engine.dispose()
    return url


@pytest.fixture
def pg_url(pg_database_url):
    engine = sa.create_engine(pg_database_url)
    _fresh_schema(engine)
    engine.dispose()
    return pg_database_url


@pytest.fixture
def api():
    with FakeBemsoft(token=TOKEN) as server:
        yield server


@pytest.fixture
def settings_factory(tmp_path, api):
    def make(db_url: str, **overrides):
        values = {
            "DATABASE_URL": db_url,
            "TERCEIROS": LAB,
            "BEMSOFT_BASE_URL": api.url,
            "BEMSOFT_TOKEN": TOKEN,
            "BEMSOFT_DRY_RUN": "0",
            "START_FROM": "0",
            "FAILED_DIR": str(tmp_path / "failed"),
            "BEMSOFT_RETRIES": "1",
            "BEMSOFT_BACKOFF": "0.01",
            "BEMSOFT_TIMEOUT": "5",
            "POLL_SECONDS": "0.1",
            "LOG_FILE": "-",
            "BEMSOFT_CONCURRENCY": "1",
        }
        values.update({k: str(v) for k, v in overrides.items()})
        return parse_settings(values, base_dir=tmp_path)
    return make


class Harness:
    """A real database + the fake API + monitors built exactly as the CLI builds them."""

    def __init__(self, url, api, settings_factory):
        self.url = url
        self.api = api
        self.settings_factory = settings_factory
        self.engine = create_db_engine(settings_factory(url))
        self.monitors = []
        self.clock_value = 1000.0

    def clock(self):
        return self.clock_value

    def monitor(self, **overrides):
        settings = self.settings_factory(self.url, **overrides)
        printed = []
        monitor = build_monitor(settings, engine=self.engine, shutdown=threading.Event(),
                                on_dry_run=lambda payload, key: printed.append((key, payload)))
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
        with self.engine.connect() as conn:
            return conn.execute(sa.text('SELECT "LastItemId" FROM "_MonitorState" WHERE "Name" = :n'),
                                {"n": name}).scalar()

    def close(self):
        for monitor in self.monitors:
            monitor.close()
        self.engine.dispose()


@pytest.fixture
def harness(db_url, api, settings_factory):
    h = Harness(db_url, api, settings_factory)
    yield h
    h.close()


def wait_until(condition, timeout=30.0) -> bool:
    """Poll until condition() holds; the timeout only bounds a hang, it asserts no speed."""
    import time
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        threading.Event().wait(0.01)
    return True


# ------------------------------------------------------------------ driving the CLIs
ROOT = Path(__file__).resolve().parent.parent


def run(*args, timeout=60, **kwargs):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BEMSOFT_", "DB_", "DATABASE_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


@pytest.fixture
def env_file(tmp_path, api):
    db = tmp_path / "legado.db"
    create_legacy_schema(sa.create_engine(f"sqlite:///{db}"))
    path = tmp_path / "monitor.env"
    path.write_text("\n".join([
        f"DATABASE_URL=sqlite:///{db}",
        f"TERCEIROS={LAB}",
        f"BEMSOFT_BASE_URL={api.url}",
        f"BEMSOFT_TOKEN={TOKEN}",
        "BEMSOFT_DRY_RUN=0",
        "BEMSOFT_RETRIES=0",
        "START_FROM=0",
        "POLL_SECONDS=0.2",
        f"FAILED_DIR={tmp_path / 'failed'}",
        f"LOG_FILE={tmp_path / 'logs' / 'monitor.log'}",
    ]) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def legacy(env_file, api, settings_factory, tmp_path):
    h = Harness(f"sqlite:///{tmp_path / 'legado.db'}", api, settings_factory)
    yield h
    h.close()
