"""Single instance: two monitors with the same MONITOR_NAME never send at the same time.

An application lock held by a dedicated connection for the life of the process:
`sp_getapplock` (session owner) on SQL Server, a session advisory lock on PostgreSQL, and
an exclusive file lock for SQLite (beside the database file) or any other database.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import sqlalchemy as sa

from .config import PROJECT_DIR

log = logging.getLogger(__name__)

VERIFY_EVERY = 30.0


def lock_resource(name: str) -> str:
    return f"bemsoft-monitor:{name}"


def advisory_key(name: str) -> int:
    """A stable signed 64-bit key for pg_try_advisory_lock."""
    digest = hashlib.sha256(lock_resource(name).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


MSSQL_GETAPPLOCK = sa.text(
    "SET NOCOUNT ON; DECLARE @r int; "
    "EXEC @r = sp_getapplock @Resource = :resource, @LockMode = 'Exclusive', "
    "@LockOwner = 'Session', @LockTimeout = 0; SELECT @r")
MSSQL_RELEASE = sa.text(
    "SET NOCOUNT ON; DECLARE @r int; "
    "EXEC @r = sp_releaseapplock @Resource = :resource, @LockOwner = 'Session'; SELECT @r")
PG_TRY_LOCK = sa.text("SELECT pg_try_advisory_lock(:key)")
PG_UNLOCK = sa.text("SELECT pg_advisory_unlock(:key)")


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
    def __init__(self, engine: sa.Engine, name: str, *, clock=time.monotonic):
        self.engine = engine
        self.name = name
        self.clock = clock
        self.dialect = engine.dialect.name
        self._conn: sa.Connection | None = None
        self._file = None
        self._checked_at = 0.0
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
        self._checked_at = self.clock()
        return self.held

    def _acquire_db(self) -> bool:
        self._close_conn()
        conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            if self.dialect == "mssql":
                got = conn.execute(MSSQL_GETAPPLOCK, {"resource": lock_resource(self.name)}).scalar()
                ok = got is not None and int(got) >= 0
            else:
                ok = bool(conn.execute(PG_TRY_LOCK, {"key": advisory_key(self.name)}).scalar())
        except Exception:
            conn.close()
            raise
        if ok:
            self._conn = conn
        else:
            conn.close()
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
        """Still ours? Checked at most every VERIFY_EVERY seconds; a lock connection that
        died (database restart) is re-acquired if nobody else took it meanwhile."""
        if not self.held:
            return self.acquire()
        if self._conn is None or self.clock() - self._checked_at < VERIFY_EVERY:
            return True
        self._checked_at = self.clock()
        try:
            self._conn.execute(sa.text("SELECT 1")).scalar()
            return True
        except Exception as err:
            log.warning("Conexão do bloqueio de instância perdida (%s); tentando retomá-lo.",
                        str(err).splitlines()[0][:200])
            self.held = False
            self._close_conn()
            try:
                return self.acquire()
            except Exception:
                return False

    def release(self) -> None:
        if self._conn is not None and self.held:
            try:
                if self.dialect == "mssql":
                    self._conn.execute(MSSQL_RELEASE, {"resource": lock_resource(self.name)})
                else:
                    self._conn.execute(PG_UNLOCK, {"key": advisory_key(self.name)})
            except Exception:  # the session is ending anyway; closing it frees the lock
                pass
        self._close_conn()
        if self._file is not None:
            self._file.close()  # closing the descriptor releases flock / msvcrt locks
            self._file = None
        self.held = False

    def _close_conn(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None
