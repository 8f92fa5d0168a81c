"""Single instance: two monitors with the same MONITOR_NAME never send at the same time.

An application lock held by a dedicated connection for the life of the process:
`sp_getapplock` (session owner) on SQL Server, a session advisory lock on PostgreSQL, and
an exclusive file lock for SQLite (beside the database file) or any other database.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import sqlalchemy as sa

from .config import PROJECT_DIR
from .db import first_line

log = logging.getLogger(__name__)


def lock_resource(name: str) -> str:
    return f"bemsoft-monitor:{name}"


def advisory_key(name: str) -> int:
    """A stable signed 64-bit key for pg_try_advisory_lock."""
    digest = hashlib.sha256(lock_resource(name).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


# sp_getapplock returns 0 (granted) or 1 (granted after waiting); any negative value
# (-1 timeout, -2 cancelled, -3 deadlock victim, -999 parameter or other error) means "not
# granted". Valid T-SQL from SQL Server 2005 on.
MSSQL_GETAPPLOCK = sa.text(
    "SET NOCOUNT ON; DECLARE @r int; "
    "EXEC @r = sp_getapplock @Resource = :resource, @LockMode = 'Exclusive', "
    "@LockOwner = 'Session', @LockTimeout = 0; SELECT @r")
MSSQL_RELEASE = sa.text(
    "SET NOCOUNT ON; DECLARE @r int; "
    "EXEC @r = sp_releaseapplock @Resource = :resource, @LockOwner = 'Session'; SELECT @r")
PG_TRY_LOCK = sa.text("SELECT pg_try_advisory_lock(:key)")
PG_UNLOCK = sa.text("SELECT pg_advisory_unlock(:key)")
PING = sa.text("SELECT 1")


def first_value(conn: sa.Connection, statement, params: dict | None = None):
    """The first column of the first row of the first result that has columns, or None.

    A T-SQL batch may yield results without columns before its SELECT (a row count, a
    message): reading those is pyodbc's "No results. Previous SQL was not a query". They
    are stepped over with the DBAPI cursor's nextset(), which SQLAlchemy's result does not
    offer."""
    compiled = statement.compile(dialect=conn.dialect)
    values = compiled.construct_params(params or {})
    args = [values[name] for name in compiled.positiontup] if compiled.positional else values
    driver_error = conn.dialect.loaded_dbapi.Error
    cursor = conn.connection.cursor()
    try:
        if args:
            cursor.execute(compiled.string, args)
        else:  # no parameters: some drivers run a multi-statement batch only this way
            cursor.execute(compiled.string)
        while cursor.description is None:
            if not cursor.nextset():
                return None
        row = cursor.fetchone()
        return None if row is None else row[0]
    except driver_error as err:  # wrapped as SQLAlchemy does: callers catch sa.exc.DBAPIError
        raise sa.exc.DBAPIError.instance(compiled.string, args, err, driver_error,
                                         dialect=conn.dialect) from err
    finally:
        try:
            cursor.close()
        except driver_error:  # cleanup only: never hides the outcome above
            pass


def discard(conn: sa.Connection) -> None:
    """Close a lock connection for good: its database session ends, which frees whatever
    lock it still holds. It is invalidated rather than returned to the pool, so SQLAlchemy
    never resets its isolation level on check-in (that reset fails when SQLAlchemy could
    not learn the server's default level). A failure here is logged, never raised: it must
    not hide the error that led to the cleanup."""
    try:
        conn.invalidate()
        conn.close()
    except Exception as err:  # cleanup only: the caller's own outcome or error prevails
        log.warning("Não foi possível fechar a conexão do bloqueio de instância (%s); ignorado.",
                    first_line(err))


def try_lock_file(handle) -> bool:
    """An exclusive, non-blocking lock on an open file (flock on POSIX, msvcrt on Windows);
    closing the file releases it, also when the process dies."""
    try:
        if os.name == "nt":
            import msvcrt
            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


class InstanceLock:
    def __init__(self, engine: sa.Engine, name: str):
        self.engine = engine
        self.name = name
        self.dialect = engine.dialect.name
        self._conn: sa.Connection | None = None
        self._file = None
        self.held = False

    def describe(self) -> str:
        if self.dialect == "mssql":
            return f"sp_getapplock '{lock_resource(self.name)}'"
        if self.dialect == "postgresql":
            return f"pg_advisory_lock({advisory_key(self.name)})"
        return f"arquivo {self.file_path()}"

    def file_path(self) -> Path:
        database = self.engine.url.database if self.dialect == "sqlite" else None
        if database and database != ":memory:":
            return Path(f"{database}.{self.name}.lock")
        return PROJECT_DIR / "completo" / "run" / f"{self.name}.lock"

    # ------------------------------------------------------------------ acquire / release
    def acquire(self) -> bool:
        """Try once, without waiting. True when this process holds the lock."""
        if self.held:
            return True
        if self.dialect in ("mssql", "postgresql"):
            self.held = self._acquire_db()
        else:
            self.held = self._acquire_file()
        return self.held

    def _acquire_db(self) -> bool:
        self._close_conn()
        conn = self.engine.connect()
        try:
            # explicit isolation level: every statement of the lock connection commits on
            # its own, so no transaction stays open for the life of the process
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            if self.dialect == "mssql":
                status = first_value(conn, MSSQL_GETAPPLOCK, {"resource": lock_resource(self.name)})
                ok = status is not None and int(status) >= 0
            else:
                ok = bool(conn.execute(PG_TRY_LOCK, {"key": advisory_key(self.name)}).scalar())
        except BaseException:
            discard(conn)  # never raises: the original error is the one that propagates
            raise
        if ok:
            self._conn = conn
        else:
            discard(conn)
        return ok

    def _acquire_file(self) -> bool:
        path = self.file_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+b")
        if not try_lock_file(handle):
            handle.close()
            return False
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n".encode())
        handle.flush()
        self._file = handle
        return True

    def verify(self) -> bool:
        """Still ours? Called before each page is dispatched: one trivial query on the lock's
        own connection (the lock lives as long as its session). A lock connection that died
        (database restart, a DBA's KILL) is re-acquired if nobody else took it meanwhile.
        False: another monitor holds it. An error while re-acquiring (the database is still
        down) propagates, so the loop reports the outage and tries again."""
        if not self.held:
            return self.acquire()
        if self._conn is None:
            return True  # file lock: held while its descriptor is open
        try:
            self._conn.execute(PING).scalar()
            return True
        except Exception as err:  # the session is gone; so is its lock
            log.warning("Conexão do bloqueio de instância perdida (%s); tentando retomá-lo.",
                        first_line(err))
        self.held = False
        self._close_conn()
        return self.acquire()

    def release(self) -> None:
        if self._conn is not None and self.held:
            try:
                if self.dialect == "mssql":
                    first_value(self._conn, MSSQL_RELEASE, {"resource": lock_resource(self.name)})
                else:
                    self._conn.execute(PG_UNLOCK, {"key": advisory_key(self.name)})
            except Exception as err:  # the session ends below, which frees the lock anyway
                log.debug("Liberação explícita do bloqueio falhou (%s).", first_line(err))
        self._close_conn()
        if self._file is not None:
            self._file.close()  # closing the descriptor releases flock / msvcrt locks
            self._file = None
        self.held = False

    def _close_conn(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            discard(conn)


class LockWatch:
    """`watch()` before each page: is the lock still ours? Its loss and its return are
    logged once each. Without a lock (DRY_RUN, tests) always True."""

    def __init__(self, lock: InstanceLock | None, name: str):
        self.lock = lock
        self.name = name
        self.lost = False

    def __call__(self) -> bool:
        if self.lock is None:
            return True
        if self.lock.verify():
            if self.lost:
                log.info("Bloqueio de instância retomado; envio continua.")
            self.lost = False
            return True
        if not self.lost:
            log.error("Bloqueio de instância perdido para outro monitor '%s': envio suspenso "
                      "até retomá-lo.", self.name)
        self.lost = True
        return False
