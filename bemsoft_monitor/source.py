"""The legacy source and the checkpoint: every statement the monitor runs, in SQLAlchemy Core
so that one code path serves SQL Server, PostgreSQL and SQLite.

Each public method is one short transaction; none is held across HTTP calls.
"""
from __future__ import annotations

import datetime as dt
import decimal
import json
import logging
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import sqlalchemy as sa

from .db import first_line, monitor_schema_map
from .payload import external_token
from .schema import (ItemStatus, item_sol, monitor_history, monitor_items,
                     monitor_state, paciente, solicitacao)

log = logging.getLogger(__name__)

ITEM_FIELDS = ("CodItemSol", "CodSolicitacao", "DataEntrada", "DescExames", "CodConvExames",
               "NomeTerceirizado", "Origem", "SituacaoResultado")
OUTCOME_CHUNK = 1000  # ids per UPDATE: SQL Server takes at most 2100 parameters
SOL_FIELDS = ("codsolicitacao", "codpaciente", "dtaentrada", "Hora")
PAC_FIELDS = ("codpaciente", "nome", "cpf", "datanasc", "sexo")
_SOL_AT = len(ITEM_FIELDS)
_PAC_AT = _SOL_AT + len(SOL_FIELDS)
_STATE_AT = _PAC_AT + len(PAC_FIELDS)
_PLAIN = (str, int, float, bool)


def jsonable(value):
    """Legacy value -> JSON-safe value (dates as ISO text), the form events are kept in."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


@dataclass
class ItemRow:
    """One ItemSol row with its solicitation and patient, as read from the LIS."""
    item_id: int
    cod: str
    item: dict
    solicitacao: dict | None
    paciente: dict | None
    pending_key: str | None = None  # set when a "sending" record exists (crash recovery)
    pending_status: str | None = None   # ItemStatus.SENDING or ItemStatus.NOFILE
    pending_reason: str | None = None
    pending_http: int | None = None
    problem: str | None = None   # a data problem that fails its solicitation (pt-BR reason)
    duplicated: bool = False     # the joins returned this item more than once


@dataclass
class Outcome:
    item_ids: Sequence[int]
    cod: str
    key: str
    status: str  # ItemStatus.DELIVERED or ItemStatus.FAILED
    # what its _MonitorHistory rows say (history.outcome_fields); event None: no row
    event: str | None = None            # a schema.HistoryEvent
    http_status: int | None = None
    latency_ms: int | None = None
    reason: str | None = None
    file_name: str | None = None
    exam_codes: Sequence = ()           # CodConvExames, aligned with item_ids
    at: dt.datetime | None = None       # when it was settled (UTC)


@dataclass
class Page:
    rows: list[ItemRow] = field(default_factory=list)
    full: bool = False          # the range query hit its LIMIT: more rows may be waiting
    upper: int | None = None    # highest id the range query covered


class LegacySource:
    def __init__(self, engine: sa.Engine, name: str, terceiros: Sequence[str]):
        # the monitor's tables live in dbo on SQL Server, the default schema elsewhere
        self.engine = engine.execution_options(
            schema_translate_map=monitor_schema_map(engine.dialect.name))
        self.name = name
        self.terceiros = list(terceiros)
        self.duplicates = DuplicateWarnings()

    # ----------------------------------------------------------------- monitor tables
    def state_tables_exist(self) -> bool:
        return has_monitor_tables(self.engine, monitor_state, monitor_items)

    @property
    def token_note_name(self) -> str:
        return token_note_name(self.name)

    def note(self, name: str, value: int | None) -> None:
        """Set (or, with None, remove) one of the monitor's state rows other than the
        checkpoint, in one short transaction; since when it holds is kept."""
        with self.engine.begin() as conn:
            if value is None:
                conn.execute(state_delete_statement(name))
            elif conn.execute(checkpoint_read_statement(name)).first() is None:
                conn.execute(checkpoint_insert_statement(name, value, utcnow()))

    def read_note(self, name: str) -> tuple[int, dt.datetime] | None:
        with self.engine.connect() as conn:
            row = conn.execute(state_row_statement(name)).first()
        return None if row is None else (int(row[0]), row[1])

    @property
    def floor_name(self) -> str:
        return floor_name(self.name)

    def _scalar(self, statement):
        with self.engine.connect() as conn:
            return conn.execute(statement).scalar()

    def read_checkpoint(self, name: str | None = None) -> int | None:
        value = self._scalar(checkpoint_read_statement(name or self.name))
        return None if value is None else int(value)

    def max_item_statement(self):
        return sa.select(sa.func.max(item_sol.c.CodItemSol)).where(self._matching())

    def max_item_id(self) -> int:
        return int(self._scalar(self.max_item_statement()) or 0)

    def backlog_statement(self, after_id: int):
        return (sa.select(sa.func.count()).select_from(item_sol)
                .where(self._matching(), item_sol.c.CodItemSol > after_id))

    def count_backlog(self, after_id: int) -> int:
        """Matching items beyond `after_id` (what the next cycles will look at)."""
        return int(self._scalar(self.backlog_statement(after_id)) or 0)

    # ----------------------------------------------------------------- reading
    def _matching(self):
        return item_sol.c.NomeTerceirizado.in_(self.terceiros)

    def _select(self, with_state: bool):
        cols = [item_sol.c[f] for f in ITEM_FIELDS]
        cols += [solicitacao.c[f].label(f"s_{f}") for f in SOL_FIELDS]
        cols += [paciente.c[f].label(f"p_{f}") for f in PAC_FIELDS]
        joined = (item_sol
                  .outerjoin(solicitacao, solicitacao.c.codsolicitacao == item_sol.c.CodSolicitacao)
                  .outerjoin(paciente, paciente.c.codpaciente == solicitacao.c.codpaciente))
        conditions = [self._matching()]
        if with_state:
            cols += [monitor_items.c.Status.label("m_status"), monitor_items.c.IdemKey.label("m_key"),
                     monitor_items.c.Reason.label("m_reason"),
                     monitor_items.c.HttpStatus.label("m_http")]
            joined = joined.outerjoin(monitor_items, sa.and_(
                monitor_items.c.Name == self.name,
                monitor_items.c.CodItemSol == item_sol.c.CodItemSol))
            # unknown items, and items whose send was started but has no outcome yet
            conditions.append(sa.or_(monitor_items.c.CodItemSol.is_(None),
                                     monitor_items.c.Status.in_([ItemStatus.SENDING, ItemStatus.NOFILE])))
        return sa.select(*cols).select_from(joined).where(*conditions)

    def page_statement(self, after_id: int, limit: int, with_state: bool = True):
        return (self._select(with_state)
                .where(item_sol.c.CodItemSol > after_id)
                .order_by(item_sol.c.CodItemSol)
                .limit(limit))

    def followup_statement(self, cods: Iterable, after_id: int, with_state: bool = True):
        return (self._select(with_state)
                .where(item_sol.c.CodSolicitacao.in_(list(cods)),
                       item_sol.c.CodItemSol > after_id)
                .order_by(item_sol.c.CodItemSol))

    def read_page(self, after_id: int, limit: int, with_state: bool = True) -> Page:
        """One indexed range query; when it fills the page, one more query fetches the rest
        of the solicitations it cut, so that no solicitation is split by the page limit.
        The rows come back unique by CodItemSol whatever the joins returned (see `unique_rows`)."""
        with self.engine.connect() as conn:
            rows = [row_from(r) for r in conn.execute(self.page_statement(after_id, limit, with_state))]
            page = Page(full=len(rows) >= limit, upper=rows[-1].item_id if rows else None)
            if page.full:
                raw_cods = {r.item["CodSolicitacao"] for r in rows}
                # the last item is read again, whole: the limit may have cut its duplicate rows
                extra = [row_from(r) for r in conn.execute(
                    self.followup_statement(raw_cods, page.upper - 1, with_state))]
                if any(r.item_id == page.upper for r in extra):  # not when its key is NULL
                    rows = [r for r in rows if r.item_id != page.upper]
                rows += extra
            page.rows = unique_rows(rows)
            self.duplicates.check(conn, page.rows)
        return page

    # ----------------------------------------------------------------- recording
    def mark_sending(self, groups: Iterable[tuple[Sequence[int], str, str]],
                     history: Sequence[dict] = ()) -> None:
        """Record "sending" (with its key) for items that have no record yet, before the POST,
        with their `history` rows (_MonitorHistory), in one transaction."""
        now = utcnow()
        rows = [{"Name": self.name, "CodItemSol": item_id, "CodSolicitacao": external_token(cod),
                 "Status": ItemStatus.SENDING, "IdemKey": key, "UpdatedAt": now}
                for item_ids, cod, key in groups for item_id in item_ids]
        if rows or history:
            with self.engine.begin() as conn:
                if rows:
                    conn.execute(monitor_items.insert(), rows)
                self._history(conn, history)

    @staticmethod
    def _history(conn, rows: Sequence[dict]) -> None:
        """The history rows of a transaction: one executemany per set of columns (a row
        holds only the columns it has a value for, and the rows of one transaction nearly
        always share them: one executemany, whatever their number)."""
        groups: dict[tuple, list] = {}
        for row in rows:
            groups.setdefault(tuple(row), []).append(row)
        for group in groups.values():
            conn.execute(monitor_history.insert(), group)

    def mark_unwritten(self, item_ids: Sequence[int], reason: str, http_status: int | None,
                       history: Sequence[dict] = ()) -> None:
        """The API's permanent answer, kept until its failure file can be written."""
        with self.engine.begin() as conn:
            conn.execute(monitor_items.update()
                         .where(monitor_items.c.Name == self.name,
                                monitor_items.c.CodItemSol.in_(list(item_ids)))
                         .values(Status=ItemStatus.NOFILE, Reason=reason[:1000], HttpStatus=http_status,
                                 UpdatedAt=utcnow()))
            self._history(conn, history)

    def record(self, outcomes: Sequence[Outcome], checkpoint: int | None,
               prune_below: int | None = None, floor: int | None = None,
               history: Sequence[dict] = ()) -> None:
        """Record outcomes (with their `history` rows), move the checkpoint (and the
        look-back floor) and prune old records, in one short transaction."""
        now = utcnow()
        with self.engine.begin() as conn:
            self._history(conn, history)
            by_status: dict[str, list[int]] = {}
            for o in outcomes:
                by_status.setdefault(o.status, []).extend(o.item_ids)
            for status, ids in by_status.items():
                for start in range(0, len(ids), OUTCOME_CHUNK):
                    conn.execute(self.outcome_statement(ids[start:start + OUTCOME_CHUNK], status, now))
            if checkpoint is not None:
                self._save_checkpoint(conn, checkpoint, now)
            if floor is not None:
                self._save_checkpoint(conn, floor, now, self.floor_name)
            if prune_below is not None and prune_below > 0:
                conn.execute(self.prune_statement(prune_below))

    def outcome_statement(self, item_ids: Sequence[int], status: str, now):
        """One set-based UPDATE per status (not one statement per item)."""
        return (monitor_items.update()
                .where(monitor_items.c.Name == self.name,
                       monitor_items.c.CodItemSol.in_(list(item_ids)))
                .values(Status=status, UpdatedAt=now))

    def prune_statement(self, below: int):
        return monitor_items.delete().where(monitor_items.c.Name == self.name,
                                            monitor_items.c.CodItemSol <= below,
                                            monitor_items.c.Status.in_([ItemStatus.DELIVERED, ItemStatus.FAILED]))

    def statements(self) -> dict:
        """Every statement the monitor runs, for checking the SQL each dialect compiles."""
        now = utcnow()
        return {
            "page": self.page_statement(0, 500),
            "followup": self.followup_statement([1, 2], 0),
            "duplicates": DuplicateWarnings.statement("paciente", "codpaciente", [1, 2]),
            "page_dry_run": self.page_statement(0, 500, with_state=False),
            "mark_sending": monitor_items.insert(),
            "history": monitor_history.insert(),
            "outcome": self.outcome_statement([1, 2], ItemStatus.DELIVERED, now),
            "prune": self.prune_statement(1),
            "checkpoint_update": checkpoint_update_statement(self.name, 1, now),
            "checkpoint_insert": checkpoint_insert_statement(self.name, 1, now),
            "checkpoint_read": checkpoint_read_statement(self.name),
            "state_row": state_row_statement(self.token_note_name),
            "state_delete": state_delete_statement(self.token_note_name),
            "backlog": self.backlog_statement(0),
            "max_item": self.max_item_statement(),
            "max_recorded": self.max_recorded_statement(),
            "last_delivery": self.last_delivery_statement(),
        }

    def save_checkpoint(self, value: int, name: str | None = None) -> None:
        with self.engine.begin() as conn:
            self._save_checkpoint(conn, value, utcnow(), name)

    def _save_checkpoint(self, conn, value: int, now, name: str | None = None) -> None:
        save_state_row(conn, name or self.name, value, now)

    def last_delivery_statement(self):
        return (sa.select(sa.func.max(monitor_items.c.UpdatedAt))
                .where(monitor_items.c.Name == self.name, monitor_items.c.Status == ItemStatus.DELIVERED))

    def last_delivery(self) -> dt.datetime | None:
        return self._scalar(self.last_delivery_statement())

    def max_recorded_statement(self):
        return (sa.select(sa.func.max(monitor_items.c.CodItemSol))
                .where(monitor_items.c.Name == self.name,
                       monitor_items.c.Status.in_([ItemStatus.DELIVERED, ItemStatus.FAILED])))

    def max_recorded_id(self) -> int:
        """Highest item with a recorded outcome (the checkpoint may lag behind it)."""
        return int(self._scalar(self.max_recorded_statement()) or 0)


class DuplicateWarnings:
    """Names the duplicated LIS keys behind a fan-out (a table without a primary key), once
    per process; the read itself is never held up by it."""

    def __init__(self):
        self._fanned_out: set[int] = set()             # items whose duplicate rows were examined
        self._warned: set[tuple[str, object]] = set()  # duplicated keys already logged

    def check(self, conn, rows: list[ItemRow]) -> None:
        fanned = {r.item_id for r in rows if r.duplicated} - self._fanned_out
        if fanned:
            self._warn(conn, [r for r in rows if r.item_id in fanned])
            self._fanned_out |= fanned

    @staticmethod
    def statement(table_name: str, column: str, keys: Sequence):
        """The keys among `keys` that more than one row of the legacy table holds."""
        table = {"ItemSol": item_sol, "solicitacao": solicitacao, "paciente": paciente}[table_name]
        col = table.c[column]
        return (sa.select(col, sa.func.count()).where(col.in_(list(keys)))
                .group_by(col).having(sa.func.count() > 1))

    def _warn(self, conn, rows: list[ItemRow]) -> None:
        """Name the duplicated LIS keys behind a fan-out, once per process. Runs only when a
        join returned an item more than once (a table without a primary key)."""
        candidates = {
            ("ItemSol", "CodItemSol"): {r.item_id for r in rows},
            ("solicitacao", "codsolicitacao"): {r.item["CodSolicitacao"] for r in rows} - {None},
            ("paciente", "codpaciente"): {(r.solicitacao or {}).get("codpaciente") for r in rows} - {None},
        }
        found = []
        try:
            for (table_name, column), keys in candidates.items():
                keys = [k for k in keys if (table_name, k) not in self._warned]
                for start in range(0, len(keys), OUTCOME_CHUNK):  # SQL Server: <= 2100 parameters
                    chunk = keys[start:start + OUTCOME_CHUNK]
                    for key, count in conn.execute(self.statement(table_name, column, chunk)):
                        self._warned.add((table_name, jsonable(key)))
                        found.append(f"{table_name}.{column}={jsonable(key)} ({count} linhas)")
        except sa.exc.DBAPIError as err:
            if is_outage(err):
                raise
            # only a warning: the page it belongs to is read and sent all the same
            log.warning("Não foi possível listar as linhas duplicadas do LIS (%s).", first_line(err))
        if found:
            shown = ", ".join(found[:20]) + (f" e mais {len(found) - 20}" if len(found) > 20 else "")
            log.warning("Linhas duplicadas no banco do LIS (tabela sem chave primária?): %s. O "
                        "monitor usa uma só linha por item, sempre a mesma; se as cópias "
                        "diferirem, a solicitação vai para FAILED_DIR. Apague as linhas "
                        "duplicadas no LIS.", shown)


def row_from(r) -> ItemRow:
    # positional access, in the column order of _select (cheaper than the mapping)
    v = [x if x is None or type(x) in _PLAIN else jsonable(x) for x in r]
    item = dict(zip(ITEM_FIELDS, v[:_SOL_AT]))
    sol = None if v[_SOL_AT] is None else dict(zip(SOL_FIELDS, v[_SOL_AT:_PAC_AT]))
    pac = None if v[_PAC_AT] is None else dict(zip(PAC_FIELDS, v[_PAC_AT:_STATE_AT]))
    row = ItemRow(item_id=int(v[0]), cod="" if v[1] is None else str(v[1]), item=item,
                  solicitacao=sol, paciente=pac)
    if len(v) > _STATE_AT and v[_STATE_AT] in (ItemStatus.SENDING, ItemStatus.NOFILE):
        row.pending_status, row.pending_key = v[_STATE_AT], v[_STATE_AT + 1]
        row.pending_reason, row.pending_http = v[_STATE_AT + 2], v[_STATE_AT + 3]
    return row


def is_outage(err: BaseException) -> bool:
    """Whether a database error means the database cannot be reached (connection refused or
    lost, login, timeout): waiting and retrying helps. Any other database error is a
    statement the database answered and refused (integrity, data, SQL): retrying the same
    thing will not help, so it is never reported as "banco de dados indisponível"."""
    if isinstance(err, sa.exc.DBAPIError) and err.connection_invalidated:
        return True
    return isinstance(err, (sa.exc.OperationalError, sa.exc.InterfaceError,
                            sa.exc.DisconnectionError))


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def unique_rows(rows: list[ItemRow]) -> list[ItemRow]:
    """One row per CodItemSol, in the order read. When a join returned an item several
    times (a duplicated `paciente`, `solicitacao` or `ItemSol` row), the row kept is the
    smallest by its canonical JSON (item, then solicitation, then patient): the same one
    whatever order the database returned them in. Copies that differ in a column the
    monitor reads cannot be told apart safely: the row gets a `problem` naming them, and
    its solicitation goes to FAILED_DIR."""
    by_id: dict[int, list[ItemRow]] = {}
    for row in rows:
        by_id.setdefault(row.item_id, []).append(row)
    unique = []
    for item_id, copies in by_id.items():
        if len(copies) == 1:
            unique.append(copies[0])
            continue
        keyed = [((_canonical(r.item), _canonical(r.solicitacao), _canonical(r.paciente)), r)
                 for r in copies]
        chosen = min(keyed, key=lambda pair: pair[0])[1]
        chosen.duplicated = True
        problems = []
        for part, table, label, key in (
                ("item", "ItemSol", "item", item_id),
                ("solicitacao", "solicitacao", "solicitação", chosen.cod),
                ("paciente", "paciente", "paciente", (chosen.solicitacao or {}).get("codpaciente"))):
            values = [getattr(r, part) or {} for r in copies]
            differing = sorted({f for v in values for f in v
                                if len({_canonical(x.get(f)) for x in values}) > 1})
            if differing:
                problems.append(f"{label} {key} aparece mais de uma vez na tabela {table} com "
                                f"dados diferentes (colunas {', '.join(differing)}): apague a "
                                "linha duplicada errada no LIS")
        if problems:
            chosen.problem = "; ".join(problems)
        unique.append(chosen)
    return unique


def token_note_name(monitor: str) -> str:
    """State row kept while the API refuses the token: LastItemId is the HTTP status,
    UpdatedAt since when (UTC). `--status`, another process, reads it."""
    return f"{monitor}#token-recusado"


def floor_name(monitor: str) -> str:
    """State row holding the start point: the look-back window never reaches below it
    (items before the first start, or handled by an older monitor, are not ours)."""
    return f"{monitor}#inicio"


def has_monitor_tables(bind, *tables: sa.Table) -> bool:
    """Whether every one of the monitor's `tables` exists (in dbo on SQL Server)."""
    schema = "dbo" if bind.dialect.name == "mssql" else None
    inspector = sa.inspect(bind)
    return all(inspector.has_table(table.name, schema=schema) for table in tables)


def save_state_row(conn, name: str, value: int, now) -> None:
    """Set one _MonitorState row (a checkpoint, the floor, the schema version)."""
    if not conn.execute(checkpoint_update_statement(name, value, now)).rowcount:
        conn.execute(checkpoint_insert_statement(name, value, now))


def checkpoint_read_statement(name: str):
    return sa.select(monitor_state.c.LastItemId).where(monitor_state.c.Name == name)


def state_row_statement(name: str):
    return sa.select(monitor_state.c.LastItemId, monitor_state.c.UpdatedAt).where(
        monitor_state.c.Name == name)


def state_delete_statement(name: str):
    return monitor_state.delete().where(monitor_state.c.Name == name)


def checkpoint_update_statement(name: str, value: int, now):
    return (monitor_state.update().where(monitor_state.c.Name == name)
            .values(LastItemId=value, UpdatedAt=now))


def checkpoint_insert_statement(name: str, value: int, now):
    return monitor_state.insert().values(Name=name, LastItemId=value, UpdatedAt=now)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
