"""What every driver of the real monitor shares: the tests, the reliability scenarios
(`python -m reliability.<cenário>`), the benchmarks (`python -m bench.run_bench`) and the
demo. A throw-away PostgreSQL database, the fake API in its own process, the `.env`
recipe, the monitor's command line, the checkpoint read, and the check that every item
was delivered exactly once or recorded in a failure file.

Loopback addresses only; every wait here is bounded."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from ..config import KNOWN_KEYS, PROJECT_DIR
from .sampledata import create_legacy_schema

LAB = "DIAGNÓSTICO DO BRASIL - DB"
TOKEN = "test-token-SECRET-123"   # "SECRET": the tests assert it never shows in any output
MONITOR_NAME = "bemsoft"
MONITOR_SCRIPT = PROJECT_DIR / "monitor_bemsoft.py"
PG_ADMIN_URL = os.environ.get("TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
IN_CI = os.environ.get("CI", "").lower() == "true"


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> bool:
    """Polls `predicate` until it is true or `timeout` seconds have passed; its last answer.
    The timeout only bounds a hang: it asserts no speed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


# --------------------------------------------------------------------------- PostgreSQL

def admin_engine(admin_url: str = PG_ADMIN_URL) -> sa.Engine:
    """An engine on the server's maintenance database, for CREATE/DROP/ALTER DATABASE and
    pg_terminate_backend (autocommit, no pool, 5 s to connect)."""
    return sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool,
                            connect_args={"connect_timeout": 5})


def pg_problem(admin_url: str = PG_ADMIN_URL) -> str | None:
    """None when PostgreSQL answers at admin_url; otherwise a one-line reason."""
    engine = None
    try:
        engine = admin_engine(admin_url)
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except (ImportError, sa.exc.SQLAlchemyError) as err:  # no driver, or server down
        return _first_line(err)
    finally:
        if engine is not None:
            engine.dispose()
    return None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else type(err).__name__


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server at the admin URL (TEST_PG_URL) could not create a database."""


class PgDatabase:
    """A throw-away PostgreSQL database with a unique name, so parallel runs never collide:
    `with PgDatabase() as url:` creates it (with the legacy schema unless
    legacy_schema=False) and drops it afterwards, open sessions included. A server that
    does not answer raises PostgresUnavailable: the tests turn it into a failure under
    CI=true, a skip elsewhere (tests/conftest.py); the scripts exit with code 2."""

    def __init__(self, prefix: str = "bm_test", admin_url: str = PG_ADMIN_URL,
                 legacy_schema: bool = True):
        self.name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        self.url = sa.engine.make_url(admin_url).set(database=self.name).render_as_string(
            hide_password=False)
        self.admin_url = admin_url
        self.legacy_schema = legacy_schema
        self.admin: sa.Engine | None = None

    def create(self) -> str:
        try:
            self.admin = admin_engine(self.admin_url)
            with self.admin.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{self.name}"'))
        except (ImportError, sa.exc.SQLAlchemyError) as err:  # no driver, or server down
            self.admin = None  # nothing to drop
            raise PostgresUnavailable(_first_line(err)) from err
        if self.legacy_schema:
            engine = sa.create_engine(self.url, poolclass=NullPool)
            try:
                create_legacy_schema(engine)
            except BaseException:
                self.drop()
                raise
            finally:
                engine.dispose()
        return self.url

    def drop(self) -> None:
        if self.admin is None:
            return
        with self.admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self.admin.dispose()

    def __enter__(self) -> str:
        return self.create()

    def __exit__(self, *exc) -> None:
        self.drop()


# --------------------------------------------------------------------------- processes

def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment without any setting the monitor reads (the env file
    decides), unbuffered output."""
    env = {k: v for k, v in os.environ.items()
           if k not in KNOWN_KEYS and not k.startswith(("BEMSOFT_", "DB_", "DATABASE_"))
           and not k.lower().endswith("_proxy")}   # the tests choose the route themselves
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def monitor_command(env_file: Path, *args: str) -> list[str]:
    """`python monitor_bemsoft.py --env-file ENV [args]`, as an operator runs it."""
    return [sys.executable, str(MONITOR_SCRIPT), "--env-file", str(env_file), *args]


class FakeApiProcess:
    """The fake Bemsoft API (`python -m bemsoft_monitor.testing.fakeapi`) in its own
    process, so that the monitor's CPU is its own: url, state(), faults(), stop() (which
    also records the fake's CPU seconds in cpu_s)."""

    def __init__(self, latency: float = 0.0, fault_rate: float = 0.0, seed: int | None = None,
                 keep_requests: int = 200, extra_args: Iterable[str] = (),
                 log: Path | None = None):
        args = [sys.executable, "-m", "bemsoft_monitor.testing.fakeapi", "--port", "0",
                "--token", TOKEN, "--latency", repr(float(latency)),
                "--keep-requests", str(keep_requests), *extra_args]
        if fault_rate:
            args += ["--fault-rate", str(fault_rate)]
        if seed is not None:
            args += ["--seed", str(seed)]
        self._log = open(log, "wb") if log else None  # noqa: SIM115 - lives with the process
        self.cpu_s: float | None = None
        self.proc = subprocess.Popen(args, cwd=PROJECT_DIR, env=subprocess_env(),
                                     stdout=subprocess.PIPE, stderr=self._log, text=True)
        self.url = self.proc.stdout.readline().strip().rstrip("/")
        if not self.url.startswith("http://127.0.0.1:"):
            self.stop()
            raise RuntimeError(f"a API falsa não iniciou (saída: {self.url!r})"
                               + (f"; veja {log}" if log else ""))

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.load(resp)

    def state(self) -> dict:
        return self._call("GET", "/_fake/state")

    def faults(self, **options) -> dict:
        return self._call("POST", "/_fake/faults", options)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.returncode is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            self._reap(timeout)
        self.proc.stdout.close()
        if self._log:
            self._log.close()

    def _reap(self, timeout: float) -> None:
        """Waits for the exit (SIGKILL after `timeout`), keeping its CPU time (wait4)."""
        if not hasattr(os, "wait4"):
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            return
        deadline = time.monotonic() + timeout
        for _ in range(1_000_000):
            try:
                pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere
                self.proc.poll()
                return
            if pid:
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                self.cpu_s = usage.ru_utime + usage.ru_stime
                return
            if time.monotonic() > deadline:
                self.proc.kill()
                deadline = float("inf")
            time.sleep(0.02)

    def __enter__(self) -> FakeApiProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------- the .env recipe

def env_values(db_url: str, api_url: str, directory: Path, **overrides: Any) -> dict[str, str]:
    """The settings of a monitor that sends every item of LAB from the start to the fake
    API, failures and log under `directory`; `overrides` add or replace keys."""
    values = {
        "DATABASE_URL": db_url,
        "TERCEIROS": LAB,
        "BEMSOFT_BASE_URL": api_url,
        "BEMSOFT_TOKEN": TOKEN,
        "BEMSOFT_DRY_RUN": "0",
        "START_FROM": "0",
        "FAILED_DIR": str(Path(directory) / "failed"),
        "LOG_FILE": str(Path(directory) / "monitor.log"),
    }
    values.update({key: str(value) for key, value in overrides.items()})
    return values


def write_env(directory: Path, db_url: str, api_url: str, **overrides: Any) -> Path:
    """env_values() written to `directory`/monitor.env; returns its path."""
    path = Path(directory) / "monitor.env"
    values = env_values(db_url, api_url, directory, **overrides)
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- outcomes

_STATE = sa.table("_MonitorState", sa.column("Name"), sa.column("LastItemId"))


def read_checkpoint(db: str | sa.Engine, name: str = MONITOR_NAME) -> int | None:
    """The monitor's checkpoint (`_MonitorState.LastItemId`); None while it has none (no
    row, or no table yet). `db`: a URL (a short-lived engine) or an engine."""
    engine = sa.create_engine(db, poolclass=NullPool) if isinstance(db, str) else db
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("_MonitorState"):
                return None
            value = conn.execute(sa.select(_STATE.c.LastItemId)
                                 .where(_STATE.c.Name == name)).scalar()
    finally:
        if engine is not db:
            engine.dispose()
    return None if value is None else int(value)


def failure_item_ids(failed_dir: Path) -> list[int]:
    """The item ids of every failure file in `failed_dir` (none when it does not exist)."""
    ids: list[int] = []
    for path in sorted(Path(failed_dir).glob("*.json")):
        ids += json.loads(path.read_text(encoding="utf-8"))["item_ids"]
    return ids


def delivery_report(state: dict, item_ids: Iterable[int], failed_ids: Iterable[int],
                    checkpoint: int | None, expect_failures: bool = False) -> dict:
    """Each item exactly once: stored by the API once, or (with expect_failures) in a
    failure file — never lost, never twice, never both, nothing unexpected stored — and
    the checkpoint on the last item. `state` is the fake API's state(). The report's
    `problems` say, in pt-BR, what is wrong; `ok` is true when there is nothing."""
    item_ids = sorted(item_ids)
    stored = {int(k.removeprefix("item-")): n for k, n in state["tests"].items()}
    failed = sorted(failed_ids)
    report = {
        "items": len(item_ids), "stored": len(stored),
        "missing": sorted(set(item_ids) - set(stored) - set(failed)),
        "duplicates": sorted(i for i, n in stored.items() if n > 1),
        "stored_and_failed": sorted(set(stored) & set(failed)),
        "unexpected": sorted(set(stored) - set(item_ids)),
        "failure_files_items": len(failed),
        "checkpoint": checkpoint, "last_id": item_ids[-1] if item_ids else 0,
        "posts_by_status": state.get("posts_by_status", {}),
    }
    problems = []
    for key, what in (("missing", "itens perdidos"), ("duplicates", "itens guardados em dobro"),
                      ("stored_and_failed", "itens entregues E em arquivo de falha"),
                      ("unexpected", "itens guardados que não foram semeados")):
        if report[key]:
            problems.append(f"{len(report[key])} {what}: {report[key][:10]}")
    if failed and not expect_failures:
        problems.append(f"{len(failed)} itens em arquivos de falha (esperado nenhum)")
    if (checkpoint or 0) != report["last_id"]:  # no items: no checkpoint, or 0
        problems.append(f"checkpoint {checkpoint} != último item {report['last_id']}")
    report["problems"] = problems
    report["ok"] = not problems
    return report


def verify(api, db_url: str | sa.Engine, item_ids: Iterable[int], failed_dir: Path,
           expect_failures: bool = False) -> dict:
    """delivery_report() from the fake API (in-process or FakeApiProcess), the failure
    files in `failed_dir` and the checkpoint in the database."""
    return delivery_report(api.state(), item_ids, failure_item_ids(failed_dir),
                           read_checkpoint(db_url), expect_failures)
