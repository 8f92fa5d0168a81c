"""The schema version of the monitor's own tables and the forward steps that bring older
tables up to it. Run once at start-up (Records.load), never in DRY_RUN; every step is
idempotent and all of them go in one transaction where the engine allows DDL in one
(PostgreSQL, SQL Server; SQLite's driver commits DDL as it goes, so there a step that ran
before a crash simply finds its work done).

The version is the row `Name='#schema'` of `_MonitorState` (LastItemId = version). The
release before the history had no such row: tables without it are version 1."""
from __future__ import annotations

import logging

import sqlalchemy as sa

from .schema import monitor_history, monitor_items, monitor_state
from .source import (checkpoint_read_statement, has_monitor_tables, is_outage, save_state_row,
                     utcnow)

log = logging.getLogger(__name__)

VERSION_ROW = "#schema"
BASE_VERSION = 1       # _MonitorState and _MonitorItems as the first releases left them
HISTORY_VERSION = 2    # _MonitorHistory
NO_HISTORY = ("as tabelas do monitor ainda não têm o histórico (_MonitorHistory): inicie o "
              "monitor desta versão uma vez")


def _add_history(conn) -> None:
    """2: _MonitorHistory (and its indexes), the order history."""
    monitor_history.create(conn, checkfirst=True)


# version -> the step that brings the version before it there (in order)
STEPS = {HISTORY_VERSION: _add_history}
CURRENT = max(STEPS)


class SchemaTooNew(Exception):
    """The tables were left by a newer release; str() is pt-BR."""


def too_new_message(found: int) -> str:
    return (f"As tabelas do monitor (_MonitorState, linha '{VERSION_ROW}') estão na versão "
            f"{found}, mais nova que a deste programa ({CURRENT}): foram atualizadas por uma "
            "versão mais recente do monitor. Nada foi gravado. Instale a versão mais recente "
            "(ou a mesma das outras instalações que usam este banco) e inicie de novo.")


def read_version(conn) -> int | None:
    """The recorded version; None when _MonitorState has no version row (version 1, or
    no tables yet)."""
    value = conn.execute(checkpoint_read_statement(VERSION_ROW)).scalar()
    return None if value is None else int(value)


def check(conn) -> int | None:
    """The version found (None: no tables yet); raises SchemaTooNew. Reads only (DRY_RUN)."""
    if not has_monitor_tables(conn, monitor_state):
        return None
    found = read_version(conn)
    if found is not None and found > CURRENT:
        raise SchemaTooNew(too_new_message(found))
    return BASE_VERSION if found is None else found


def has_history(conn) -> bool:
    """The tables hold the history (_MonitorHistory); raises SchemaTooNew. Reads only."""
    version = check(conn)
    return version is not None and version >= HISTORY_VERSION


def upgrade(engine: sa.Engine) -> tuple[int | None, int]:
    """Create what is missing and run the steps the recorded version lacks, in one
    transaction; record the version. Returns (version found or None, version now).
    Raises SchemaTooNew (nothing written) when the tables are newer than this code.
    Two monitors (two MONITOR_NAMEs) starting together on one database: the one that
    loses the race finds the work done on its second pass."""
    try:
        return _upgrade(engine)
    except sa.exc.DBAPIError as err:
        if is_outage(err):
            raise
        log.debug("Atualização das tabelas concorrente (%s); conferindo de novo.", err)
        return _upgrade(engine)


def _upgrade(engine: sa.Engine) -> tuple[int | None, int]:
    with engine.begin() as conn:
        found = check(conn)
        fresh = found is None
        # the tables of version 1 (a fresh database gets every table straight away)
        monitor_state.create(conn, checkfirst=True)
        monitor_items.create(conn, checkfirst=True)
        version = BASE_VERSION if fresh else found
        for target in sorted(STEPS):
            if target > version:
                STEPS[target](conn)
                if not fresh:
                    log.info("Tabelas do monitor atualizadas para a versão %d (%s).", target,
                             (STEPS[target].__doc__ or "").split(":", 1)[-1].strip())
        if found != CURRENT:
            save_state_row(conn, VERSION_ROW, CURRENT, utcnow())
    return found, CURRENT
