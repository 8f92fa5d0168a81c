"""The single-instance lock on real databases (SQLite file lock, PostgreSQL advisory lock,
SQL Server sp_getapplock when TEST_MSSQL_URL is set) and the monitor's answer to a read
blocked by a LIS transaction (DB_QUERY_TIMEOUT).

Monitors run as real subprocesses; every wait is bounded and ends on a log line or on an
observable event (an item stored by the fake API), never on a fixed sleep."""
from __future__ import annotations

import collections
import datetime as dt
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from bemsoft_monitor.db import describe_query_timeout, is_query_timeout
from bemsoft_monitor.lock import InstanceLock, advisory_key, first_value
from bemsoft_monitor import status as board_states
from bemsoft_monitor.testing.sampledata import add_items, add_order, add_patient
from conftest import LAB, PG_ADMIN_URL, ROOT, Harness, run, subprocess_env, wait_until, write_env

EXIT_LOCKED = 4
TAKEN = "Outro monitor 'bemsoft' já está ativo neste banco"
STANDBY = "Este fica em espera e assume quando o outro parar"
TOOK_OVER = "Bloqueio obtido: este monitor assume o envio."
STARTED = "Monitor iniciado"
OUTAGE = "Banco de dados indisponível"


class MonitorProcess:
    """`monitor_bemsoft.py` in loop mode, its log (console output) in a file."""

    def __init__(self, env_file: Path, log_path: Path):
        self.log_path = log_path
        self._out = open(log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen([sys.executable, "monitor_bemsoft.py", "--env-file", str(env_file)],
                                     cwd=ROOT, stdout=self._out, stderr=subprocess.STDOUT,
                                     env=subprocess_env())

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_for(self, text: str, count: int = 1, timeout: float = 40.0) -> None:
        wait_until(lambda: self.log().count(text) >= count or self.proc.poll() is not None, timeout)
        assert self.log().count(text) >= count, f"esperado {text!r} x{count}:\n{self.log()[-4000:]}"

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._out.close()


def delivered(api, item_ids) -> bool:
    stored = set(api.stored_tests())
    return all(f"item-{i}" in stored for i in item_ids)


def assert_each_stored_once(api, item_ids):
    counts = collections.Counter(api.stored_tests())
    assert {f"item-{i}": 1 for i in item_ids} == dict(counts)


# ------------------------------------------------------------------ the contended path
def test_second_monitor_exits_4_or_stands_by_and_takes_over(db_url, api, settings_factory, tmp_path):
    """SQLite (file lock), PostgreSQL (advisory lock), SQL Server (sp_getapplock): with the
    lock taken, --once and --drain exit 4 with the pt-BR line (never 'Erro inesperado');
    a second loop monitor waits as standby, sends nothing, and takes over when the first
    stops."""
    h = Harness(db_url, api, settings_factory)
    env = write_env(tmp_path, db_url, api.url, BEMSOFT_RETRIES=0, POLL_SECONDS=0.2, LOG_FILE="-")
    first = MonitorProcess(env, tmp_path / "first.log")
    second = None
    try:
        first.wait_for(STARTED)
        ids = h.order(1, ["GLI"])
        assert wait_until(lambda: delivered(api, ids)), first.log()[-3000:]
        for mode in ("--once", "--drain"):
            result = run("monitor_bemsoft.py", "--env-file", str(env), mode)
            assert result.returncode == EXIT_LOCKED, result.stderr
            assert f"{TAKEN} (" in result.stderr and "nada foi feito" in result.stderr
            assert "Erro inesperado" not in result.stderr and "Traceback" not in result.stderr

        second = MonitorProcess(env, tmp_path / "second.log")
        second.wait_for(STANDBY)
        more = h.order(2, ["TSH"])
        assert wait_until(lambda: delivered(api, more)), first.log()[-3000:]
        assert STARTED not in second.log()              # the standby sent nothing

        assert first.stop() == 0
        second.wait_for(TOOK_OVER)
        second.wait_for(STARTED)
        last = h.order(3, ["HEMO"])
        assert wait_until(lambda: delivered(api, last)), second.log()[-3000:]
        assert second.stop() == 0
        assert "Solicitação 3 entregue" in second.log()
        assert "Solicitação 3 entregue" not in first.log()
    finally:
        first.kill()
        if second is not None:
            second.kill()
        h.close()
    assert_each_stored_once(api, ids + more + last)
    assert "Erro inesperado" not in first.log() + second.log()


@pytest.mark.postgres
def test_standby_keeps_waiting_through_a_database_outage(pg_url, api, settings_factory, tmp_path):
    """While a standby waits, its database refuses connections (ALLOW_CONNECTIONS false,
    its sessions terminated): it logs the error once and keeps waiting (no exit 1); once
    the database is back and the holder lets go, it takes over and delivers."""
    holder_engine = sa.create_engine(pg_url)
    holder = InstanceLock(holder_engine, "bemsoft")
    assert holder.acquire()
    with holder_engine.connect() as conn:
        holder_pid = conn.execute(sa.text(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid = :lo AND granted"),
            {"lo": advisory_key("bemsoft") & 0xFFFFFFFF}).scalar()
    database = sa.engine.make_url(pg_url).database
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    env = write_env(tmp_path, pg_url, api.url, BEMSOFT_RETRIES=0, POLL_SECONDS=0.2, LOG_FILE="-")
    standby = MonitorProcess(env, tmp_path / "standby.log")
    h = None
    try:
        standby.wait_for(STANDBY)
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS false'))
            try:
                conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                     "WHERE datname = :db AND pid <> :keep"),
                             {"db": database, "keep": holder_pid})
                standby.wait_for("Não foi possível verificar o bloqueio de instância")
                assert standby.proc.poll() is None, standby.log()[-3000:]
            finally:
                conn.execute(sa.text(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS true'))
        holder.release()
        standby.wait_for(TOOK_OVER)
        h = Harness(pg_url, api, settings_factory)
        ids = h.order(1, ["GLI"])
        assert wait_until(lambda: delivered(api, ids)), standby.log()[-3000:]
        assert standby.stop() == 0
    finally:
        standby.kill()
        holder.release()
        holder_engine.dispose()
        admin.dispose()
        if h is not None:
            h.close()
    assert standby.log().count("Não foi possível verificar o bloqueio de instância") == 1
    assert "Erro inesperado" not in standby.log()


# ------------------------------------------------------------------ the lock on a server
def kill_lock_session(lock: InstanceLock, url: str) -> None:
    """End the database session holding `lock` (a restart, a DBA's KILL), from another
    connection, as a DBA would."""
    mssql = lock.dialect == "mssql"
    session = lock._conn.execute(sa.text("SELECT @@SPID" if mssql else "SELECT pg_backend_pid()")).scalar()
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")  # KILL runs outside a transaction
    try:
        with engine.connect() as conn:
            if mssql:
                conn.execute(sa.text(f"KILL {int(session)}"))
            else:
                conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": session})
    finally:
        engine.dispose()


def test_a_lost_lock_stops_sending_before_the_next_page(server_url, api, settings_factory, caplog):
    """The lock's session dies and another monitor takes the lock at once: the very next
    page is not sent (the lock is verified before each page, not every 30 s); when the
    other lets go, this one takes it back and delivers."""
    caplog.set_level(logging.INFO, logger="bemsoft_monitor")
    h = Harness(server_url, api, settings_factory)
    rival_engine = sa.create_engine(server_url)
    rival = InstanceLock(rival_engine, "bemsoft")
    mine = InstanceLock(h.engine, "bemsoft")
    try:
        monitor = h.monitor(lock=mine)
        assert monitor.lock.acquire()
        first = h.order(1, ["GLI"])
        monitor.step()
        assert delivered(api, first)

        kill_lock_session(mine, server_url)
        assert wait_until(rival.acquire, 10)        # the other monitor takes the lock
        later = h.order(2, ["TSH"])
        posts = len(api.requests)
        monitor.step()
        assert len(api.requests) == posts and not delivered(api, later)
        assert "Bloqueio de instância perdido para outro monitor" in caplog.text
        assert monitor.status.snapshot().state == board_states.STANDBY   # the console says "Em espera"

        rival.release()
        monitor.step()
        assert delivered(api, later)
        assert monitor.status.snapshot().state != board_states.STANDBY
        assert "Bloqueio de instância retomado" in caplog.text
    finally:
        mine.release()
        rival.release()
        rival_engine.dispose()
        h.close()
    assert_each_stored_once(api, first + later)


def test_lock_works_when_sqlalchemy_cannot_learn_the_default_isolation_level(server_url):
    """Some T-SQL engines do not tell SQLAlchemy their default isolation level; closing a
    connection that was set to AUTOCOMMIT then failed with AssertionError, which replaced
    the real answer (the contended path exited 1 instead of 4)."""
    engine = sa.create_engine(server_url)
    with engine.connect():
        pass                                        # the dialect is initialised here
    engine.dialect.default_isolation_level = None
    first, second = InstanceLock(engine, "bemsoft"), InstanceLock(engine, "bemsoft")
    try:
        assert first.acquire()
        assert second.acquire() is False            # taken: an answer, not an AssertionError
        assert first.verify()
        first.release()
        assert second.acquire()
        with engine.begin() as conn:                # the pool was not left in AUTOCOMMIT
            assert conn.execute(sa.text("SELECT 1")).scalar() == 1
    finally:
        first.release()
        second.release()
        engine.dispose()


@pytest.mark.postgres
def test_a_failing_lock_statement_is_reported_not_masked_by_the_cleanup(pg_url):
    """The monitor's login may not run the lock function: the operator must see that
    error, not one raised while closing the connection."""
    role = f"bm_nolock_{int(time.time() * 1000) % 10**8}"
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE ROLE {role} LOGIN"))
        conn.execute(sa.text("REVOKE EXECUTE ON FUNCTION pg_try_advisory_lock(bigint) FROM PUBLIC"))
    engine = sa.create_engine(sa.engine.make_url(pg_url).set(username=role, password=None))
    try:
        with engine.connect():
            pass
        engine.dialect.default_isolation_level = None   # and the cleanup cannot reset it
        with pytest.raises(sa.exc.ProgrammingError) as info:
            InstanceLock(engine, "bemsoft").acquire()
        assert "permission denied" in str(info.value)
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text("GRANT EXECUTE ON FUNCTION pg_try_advisory_lock(bigint) TO PUBLIC"))
            conn.execute(sa.text(f"DROP ROLE {role}"))
        admin.dispose()


@pytest.mark.postgres
def test_first_value_steps_over_results_without_columns(pg_url):
    """A batch whose first result has no columns (here a SET; on SQL Server a row count or a
    message before `SELECT @r`): the value of the first real result is read."""
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            assert first_value(conn, sa.text("SET application_name = 'bm'; SELECT -7")) == -7
            assert first_value(conn, sa.text("SELECT :x"), {"x": 3}) == 3
            assert first_value(conn, sa.text("SET application_name = 'bm'")) is None
        with engine.connect() as conn:  # a driver error surfaces as SQLAlchemy's, like execute()
            with pytest.raises(sa.exc.ProgrammingError):
                first_value(conn, sa.text("SELECT no_such_function()"))
    finally:
        engine.dispose()


# ------------------------------------------------------------------ DB_QUERY_TIMEOUT
@pytest.mark.postgres
def test_a_read_blocked_by_a_lis_transaction_times_out_and_is_retried(pg_url, api, settings_factory,
                                                                      tmp_path):
    """A LIS transaction holds ItemSol (LOCK TABLE ... ACCESS EXCLUSIVE) while it writes a
    new order: the monitor's read is cancelled after DB_QUERY_TIMEOUT, logged in pt-BR
    naming the likely cause, not as an outage; the loop goes on; once the transaction
    commits, everything is delivered once."""
    h = Harness(pg_url, api, settings_factory)
    env = write_env(tmp_path, pg_url, api.url, BEMSOFT_RETRIES=0, POLL_SECONDS=0.2, LOG_FILE="-", DB_QUERY_TIMEOUT=1)
    monitor = MonitorProcess(env, tmp_path / "monitor.log")
    lis = sa.create_engine(pg_url)
    timed_out = "Consulta ao banco cancelada após 1 s (DB_QUERY_TIMEOUT)"
    try:
        first = h.order(1, ["GLI"])
        assert wait_until(lambda: delivered(api, first)), monitor.log()[-3000:]
        with lis.connect() as conn:
            tx = conn.begin()
            conn.execute(sa.text('LOCK TABLE "ItemSol" IN ACCESS EXCLUSIVE MODE'))
            add_patient(conn, 902, "Paciente Bloqueado", sexo="F", datanasc=dt.datetime(1990, 5, 6))
            add_order(conn, 2, 902)
            later = add_items(conn, 2, [{"CodConvExames": "TSH", "DescExames": "TSH", "Origem": "A"}],
                              terceirizado=LAB)
            monitor.wait_for(timed_out, count=2)    # twice: the loop went on after the first
            assert monitor.proc.poll() is None
            assert not delivered(api, later)
            tx.commit()
        assert wait_until(lambda: delivered(api, later)), monitor.log()[-3000:]
        assert monitor.stop() == 0
    finally:
        monitor.kill()
        lis.dispose()
        h.close()
    log = monitor.log()
    assert "transação longa no sistema do laboratório (LIS)" in log
    assert "Nada foi pulado" in log
    assert OUTAGE not in log and "Erro inesperado" not in log
    assert_each_stored_once(api, first + later)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sqlite_busy_timeout_is_a_query_timeout_not_an_outage(db_url, api, settings_factory):
    """SQLite's busy timeout is DB_QUERY_TIMEOUT: a read behind another connection's
    exclusive transaction gives up after it, and is recognised as a timeout."""
    h = Harness(db_url, api, settings_factory, DB_QUERY_TIMEOUT=1)
    blocker = sa.create_engine(db_url)
    try:
        h.order(1, ["GLI"])
        monitor = h.monitor()
        monitor.step()
        h.order(2, ["TSH"])
        with blocker.connect() as conn:
            conn.exec_driver_sql("BEGIN EXCLUSIVE")
            with pytest.raises(sa.exc.OperationalError) as info:
                monitor.step()
            conn.exec_driver_sql("ROLLBACK")
        assert is_query_timeout(info.value)
        assert "DB_QUERY_TIMEOUT" in describe_query_timeout(monitor.settings)
        monitor.step()
        assert len(api.stored_tests()) == 2
    finally:
        blocker.dispose()
        h.close()


def test_login_timeout_is_not_a_query_timeout():
    """HYT00 is also ODBC's login timeout: that one is a connection problem (an outage)."""
    class OdbcError(Exception):
        pass
    assert not is_query_timeout(OdbcError("HYT00", "[HYT00] [Microsoft][ODBC Driver 18 for SQL "
                                                   "Server]Login timeout expired (0) (SQLDriverConnect)"))
    assert is_query_timeout(OdbcError("HYT00", "[HYT00] [Microsoft][ODBC Driver 18 for SQL "
                                               "Server]Query timeout expired (0) (SQLExecDirectW)"))


def test_once_with_a_blocked_read_exits_3_naming_the_cause(env_file, legacy):
    """--once against a database held by another transaction: after DB_QUERY_TIMEOUT, exit 3
    with the pt-BR reason (a long transaction in the LIS), not 'banco indisponível'."""
    legacy.order(1, ["GLI"])
    with open(env_file, "a", encoding="utf-8") as fh:
        fh.write("DB_QUERY_TIMEOUT=1\n")
    blocker = sa.create_engine(legacy.url)
    try:
        with blocker.connect() as conn:
            conn.exec_driver_sql("BEGIN EXCLUSIVE")
            result = run("monitor_bemsoft.py", "--env-file", str(env_file), "--once")
            conn.exec_driver_sql("ROLLBACK")
    finally:
        blocker.dispose()
    assert result.returncode == 3, result.stderr
    assert "Consulta ao banco cancelada após 1 s (DB_QUERY_TIMEOUT)" in result.stderr
    assert "transação longa no sistema do laboratório (LIS)" in result.stderr
    assert OUTAGE not in result.stderr and "Traceback" not in result.stderr
    assert run("monitor_bemsoft.py", "--env-file", str(env_file), "--once").returncode == 0
    assert legacy.api.stored_tests() == ["item-1"]
