"""An order's story: "where is order 43335?" answered from what the monitor keeps — its
records in `_MonitorItems` and `_MonitorHistory`, the failure files in FAILED_DIR (and the
`sent` folder the replay moves them to) — and, for what it never took up, from the LIS
itself (is the item there, which lab, above or below the checkpoint, held by the debounce).

`build_story` reads (short read-only queries, no lock, nothing written) and returns a
`Story`, a plain value; `story_lines` says it in pt-BR for `--trace`, and the console's
search panel draws the same value as HTML. A story carries codes, keys, statuses and
reasons reduced to their group (`reasons.reason_group`): never a patient's name, CPF
or birth date, and never the text the API echoed back.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

import sqlalchemy as sa

from .config import Settings
from .db import monitor_schema_map
from .failures import CLAIM_MARK, FailureFileError, FailureStore
from .payload import external_token
from .reasons import reason_group
from .schema import (HistoryEvent, ItemStatus, item_sol, monitor_history, monitor_items,
                     monitor_state, solicitacao)
from .source import floor_name, has_monitor_tables, is_outage, jsonable, token_note_name

log = logging.getLogger(__name__)

MAX_ITEMS = 500          # items of one solicitation shown (a solicitation has a handful)
MAX_CODE = 64            # characters of a solicitation code accepted in a search
MAX_FILES = 20000        # files looked at in FAILED_DIR and `sent` (by name; few are read)
_ITEM_QUERY = re.compile(r"(?i)item\s*[:\-\s]\s*(\S*)")
_SOL_QUERY = re.compile(r"(?i)sol(?:icita[cç][aã]o)?\s*[:\-\s]\s*(\S+)")


class QueryError(ValueError):
    """A search that names neither a solicitation nor an item; str() is pt-BR."""


# ------------------------------------------------------------------ what was asked
@dataclass(frozen=True)
class TraceQuery:
    kind: str      # "sol" or "item"
    value: str     # the solicitation code as typed (trimmed), or the item id in digits

    @property
    def item_id(self) -> int:
        return int(self.value)

    @property
    def label(self) -> str:
        return f"Item {self.value}" if self.kind == "item" else f"Solicitação {self.value}"


def parse_query(text: str) -> TraceQuery:
    """`43335` (a solicitation), `item:52009` (one ItemSol); `sol-43335` and `item-52009`,
    the external ids the API shows, work too."""
    raw = str(text or "").strip()
    if not raw:
        raise QueryError("informe o número da solicitação (ex.: 43335) ou item:<CodItemSol> "
                         "(ex.: item:52009)")
    match = _ITEM_QUERY.fullmatch(raw)
    if match:
        digits = match.group(1)
        if not digits.isascii() or not digits.isdigit() or len(digits) > 18:
            raise QueryError("depois de item: vem o CodItemSol, só com algarismos (ex.: item:52009)")
        return TraceQuery("item", str(int(digits)))
    match = _SOL_QUERY.fullmatch(raw)
    if match:
        raw = match.group(1)
    if len(raw) > MAX_CODE or not raw.isprintable():
        raise QueryError(f"código de solicitação inválido (até {MAX_CODE} caracteres visíveis)")
    return TraceQuery("sol", raw)


# ------------------------------------------------------------------ the story as data
class Event(HistoryEvent):
    """What a step of the story says: the history's events (`schema.HistoryEvent`), and a
    failure file seen in the folders without a history row naming it."""
    FILE = "file"


@dataclass(frozen=True)
class Step:
    """One line of the story: what happened to some items at one moment."""
    at: dt.datetime | None        # UTC, aware
    event: str
    item_ids: tuple[int, ...]
    key: str | None = None
    http_status: int | None = None
    latency_ms: int | None = None
    reason: str | None = None     # reason_group(...): no patient data, no echoed answer
    file: str | None = None       # failure file name (no folder)
    where: str | None = None      # Event.FILE: where the file is now (Where)


@dataclass(frozen=True)
class FailureFileInfo:
    name: str
    where: str                    # WAITING, CLAIMED, REPLAYED
    created_at: dt.datetime | None
    cod: str
    item_ids: tuple[int, ...]
    key: str
    http_status: int | None
    reason: str                   # reason_group(...)


class Where:
    WAITING = "waiting"           # in FAILED_DIR, to be replayed
    CLAIMED = "claimed"           # being replayed now (retry_failed.py holds it)
    REPLAYED = "replayed"         # delivered by the replay: in the `sent` folder or `*.sent`


class State:
    """Where an item stands now."""
    DELIVERED = "delivered"
    REPLAYED = "replayed"
    FAILED_DIR = "failed_dir"
    REPLAYING = "replaying"
    FAILED_GONE = "failed_gone"    # failed; its file is no longer in FAILED_DIR
    SENDING = "sending"            # waiting for the API
    NOFILE = "nofile"              # refused; the failure file still to be written
    HELD = "held"                  # by the debounce
    UNREAD = "unread"              # above the checkpoint
    LATE = "late"                  # committed late, inside the look-back window: next cycle
    MISSED = "missed"              # committed late, below the look-back window
    BEFORE_START = "before_start"  # at or below the floor
    OTHER_LAB = "other_lab"        # NomeTerceirizado not in TERCEIROS
    NO_MONITOR = "no_monitor"      # the monitor never ran on this database
    NOT_IN_LIS = "not_in_lis"

    SETTLED = (DELIVERED, REPLAYED)


@dataclass(frozen=True)
class ItemView:
    item_id: int
    exam: str                     # CodConvExames (from the LIS, or the history)
    entered: str                  # DataEntrada as the LIS has it (local time), "" if unknown
    lab: str                      # NomeTerceirizado, "" if unknown
    state: str
    text: str                     # pt-BR: where it stands and why


@dataclass(frozen=True)
class Story:
    query: TraceQuery
    monitor: str
    found: bool                   # the monitor has a record of it (exit 0), else exit 1
    items: tuple[ItemView, ...]
    steps: tuple[Step, ...]
    files: tuple[FailureFileInfo, ...]
    lis: tuple[str, ...]          # what the LIS says (pt-BR lines)
    notes: tuple[str, ...] = ()   # about the monitor as a whole (checkpoint, token refused)
    tz: str = "UTC"

    @property
    def pending(self) -> tuple[ItemView, ...]:
        return tuple(i for i in self.items if i.state not in State.SETTLED)


# ------------------------------------------------------------------ reading
@dataclass
class _LisItem:
    item_id: int
    cod: str
    entered: object               # as the driver returns it
    exam: str
    lab: str | None


@dataclass
class _Records:
    tables: bool = False          # the monitor's tables exist
    history: bool = False         # _MonitorHistory exists
    checkpoint: int | None = None
    floor: int | None = None
    token_refused: tuple[int, dt.datetime] | None = None
    items: dict[int, dict] = field(default_factory=dict)    # _MonitorItems rows by item
    history_rows: list[dict] = field(default_factory=list)


class Tracer:
    """Builds stories from one engine (the monitor's, in the console; the CLI's own)."""

    def __init__(self, settings: Settings, engine: sa.Engine, *, failed_dir: Path | None = None,
                 sent_dir: Path | None = None):
        self.settings = settings
        self.engine = engine.execution_options(
            schema_translate_map=monitor_schema_map(engine.dialect.name))
        self.failed_dir = Path(failed_dir or settings.failed_dir)
        # retry_failed.py moves a delivered file to --move-ok, by default `sent` beside it
        self.sent_dir = Path(sent_dir) if sent_dir else self.failed_dir.parent / "sent"

    def __call__(self, text: str) -> Story:
        return self.story(parse_query(text))

    def story(self, query: TraceQuery, now: float | None = None) -> Story:
        now = time.time() if now is None else now
        lis, lis_notes = self._read_lis(query)
        cods = {i.cod for i in lis if i.cod} | ({query.value} if query.kind == "sol" else set())
        records = self._read_records(query, [i.item_id for i in lis], cods)
        for row in list(records.items.values()) + records.history_rows:
            if row.get("CodSolicitacao"):
                cods.add(row["CodSolicitacao"])
        ids = ({i.item_id for i in lis} | set(records.items)
               | {r["CodItemSol"] for r in records.history_rows})
        if query.kind == "item":
            ids = {query.item_id}
        files = self._failure_files(cods, ids, query)
        return _compose(self.settings, query, lis, lis_notes, records, files, now)

    # ---------------------------------------------------------------- statements
    def lis_items_statement(self, query: TraceQuery, code=None):
        """ItemSol rows of an item, or of a solicitation (`code`: one of `_code_forms`), of
        any lab; no patient column."""
        cols = (item_sol.c.CodItemSol, item_sol.c.CodSolicitacao, item_sol.c.DataEntrada,
                item_sol.c.CodConvExames, item_sol.c.NomeTerceirizado)
        if query.kind == "item":
            return sa.select(*cols).where(item_sol.c.CodItemSol == query.item_id)
        return (sa.select(*cols).where(item_sol.c.CodSolicitacao == code)
                .order_by(item_sol.c.CodItemSol).limit(MAX_ITEMS))

    @staticmethod
    def solicitation_statement(code):
        return (sa.select(solicitacao.c.codsolicitacao)
                .where(solicitacao.c.codsolicitacao == code).limit(1))

    def state_statement(self):
        name = self.settings.monitor_name
        st = monitor_state.c
        return (sa.select(st.Name, st.LastItemId, st.UpdatedAt)
                .where(st.Name.in_([name, floor_name(name), token_note_name(name)])))

    def records_statement(self, query: TraceQuery, tokens: Sequence[str], lis_ids: Sequence[int]):
        m = monitor_items.c
        if query.kind == "item":
            which = m.CodItemSol == query.item_id
        else:
            which = sa.or_(m.CodSolicitacao.in_(list(tokens)), m.CodItemSol.in_(list(lis_ids)[:MAX_ITEMS]))
        return (sa.select(m.CodItemSol, m.CodSolicitacao, m.Status, m.IdemKey, m.UpdatedAt,
                          m.Reason, m.HttpStatus)
                .where(m.Name == self.settings.monitor_name, which).order_by(m.CodItemSol))

    def history_statement(self, query: TraceQuery, tokens: Sequence[str]):
        """Unordered on purpose: with ORDER BY At a planner may walk the (Name, At) index over
        the whole history instead of seeking (Name, CodSolicitacao); the few rows of one
        solicitation are ordered in Python."""
        h = monitor_history.c
        which = h.CodItemSol == query.item_id if query.kind == "item" else h.CodSolicitacao.in_(list(tokens))
        return sa.select(monitor_history).where(h.Name == self.settings.monitor_name, which)

    def statements(self) -> dict:
        """Every statement a story runs, for checking the SQL each dialect compiles."""
        sol, item = TraceQuery("sol", "43335"), TraceQuery("item", "52009")
        return {"lis_items": self.lis_items_statement(sol, _code_forms("43335")[0]),
                "lis_item": self.lis_items_statement(item),
                "solicitation": self.solicitation_statement(_code_forms("43335")[0]),
                "state": self.state_statement(),
                "records": self.records_statement(sol, ["43335"], [52009, 52010]),
                "record": self.records_statement(item, [], []),
                "history": self.history_statement(sol, ["43335"]),
                "history_item": self.history_statement(item, [])}

    # ---------------------------------------------------------------- the LIS
    def _read_lis(self, query: TraceQuery) -> tuple[list[_LisItem], list[str]]:
        """The ItemSol rows asked for, whatever their lab (no patient column is read), and
        whether the solicitation row exists."""
        if query.kind == "item":
            items = [_lis_item(r) for r in self._lis_rows(self.lis_items_statement(query)) or []]
            notes = []
            if items and items[0].cod:
                notes.append(f"O item pertence à solicitação {items[0].cod}.")
            elif items:
                notes.append("O item não tem CodSolicitacao no LIS.")
            return items, notes
        rows = None
        for code in _code_forms(query.value):
            rows = self._lis_rows(self.lis_items_statement(query, code))
            if rows:
                break
        items = [_lis_item(r) for r in rows or []]
        exists = None
        for code in _code_forms(query.value):
            found = self._lis_rows(self.solicitation_statement(code))
            if found:
                exists = True
                break
            if found is not None:
                exists = False
        notes = []
        if exists is False:
            notes.append(f"A solicitação {query.value} não existe na tabela solicitacao do LIS.")
        if not items:
            notes.append(f"O LIS não tem itens (ItemSol) com CodSolicitacao = {query.value}.")
        return items, notes

    def _lis_rows(self, statement) -> list | None:
        """Rows, or None when the LIS refused the comparison (a code of the wrong type for
        the column: an INT column asked for text, a text column on an engine that will not
        compare it with a number). An outage propagates."""
        try:
            with self.engine.connect() as conn:
                return list(conn.execute(statement))
        except sa.exc.DBAPIError as err:
            if is_outage(err):
                raise
            log.debug("Consulta ao LIS recusada (tipo do código?)", exc_info=True)
            return None

    # ---------------------------------------------------------------- the monitor's records
    def _read_records(self, query: TraceQuery, lis_ids: Sequence[int], cods: set[str]) -> _Records:
        name = self.settings.monitor_name
        records = _Records()
        records.tables = has_monitor_tables(self.engine, monitor_state, monitor_items)
        records.history = has_monitor_tables(self.engine, monitor_history)
        if not records.tables:
            return records
        tokens = sorted({external_token(c) for c in cods})
        with self.engine.connect() as conn:
            state = {row[0]: (int(row[1]), row[2]) for row in conn.execute(self.state_statement())}
            records.checkpoint = state[name][0] if name in state else None
            records.floor = state[floor_name(name)][0] if floor_name(name) in state else None
            records.token_refused = state.get(token_note_name(name))
            for row in conn.execute(self.records_statement(query, tokens, lis_ids)):
                records.items[int(row.CodItemSol)] = dict(row._mapping)
            if records.history:
                rows = [dict(r._mapping) for r in conn.execute(self.history_statement(query, tokens))]
                records.history_rows = sorted(rows, key=lambda r: (r["At"], r["Id"]))
        return records

    # ---------------------------------------------------------------- the folders
    def _failure_files(self, cods: set[str], item_ids: set[int], query: TraceQuery) -> list[FailureFileInfo]:
        """Failure files of these solicitations (by the code in their names, then by their
        content; for an item, those that hold it) in FAILED_DIR, being replayed, or replayed
        (the `sent` folder, `*.sent`)."""
        # only files named after these codes are read (a search never reads the whole folder);
        # an item without a solicitation is filed as `sem_cod`
        names = {FailureStore.cod_part(c) for c in cods} | {FailureStore.cod_part("")}
        wanted = re.compile(r"(?:\d{8}T\d{6}Z_)?(?:" + "|".join(map(re.escape, sorted(names))) + ")_")
        tokens = {external_token(c) for c in cods}
        found = []
        for path, plain, where in self._candidates():
            if not wanted.match(plain):
                continue
            try:
                record = FailureStore.load(path)
            except FailureFileError:
                continue
            if query.kind == "item":
                if query.item_id not in record.item_ids:
                    continue
            elif external_token(record.cod) not in tokens and not set(record.item_ids) & item_ids:
                continue
            found.append(FailureFileInfo(plain, where, _parse_iso(record.created_at), record.cod,
                                         tuple(record.item_ids), record.key, record.http_status,
                                         reason_group(record.reason)))
        never = dt.datetime.max.replace(tzinfo=dt.timezone.utc)
        return sorted(found, key=lambda f: (f.created_at or never, f.name))

    def _candidates(self) -> Iterable[tuple[str, str, str]]:
        """(path, name as first written, Where) of every failure file in the folders, by
        name only (nothing read here)."""
        seen = 0
        for directory, sent in ((self.failed_dir, False), (self.sent_dir, True)):
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            for entry in entries:
                name = entry.name
                if name.startswith(".tmp-"):
                    continue
                if sent:
                    where, plain = Where.REPLAYED, name
                elif CLAIM_MARK in name:
                    where, plain = Where.CLAIMED, name.split(CLAIM_MARK)[0]
                elif name.endswith(".json.sent"):
                    where, plain = Where.REPLAYED, name[:-5]
                else:
                    where, plain = Where.WAITING, name
                if not plain.endswith(".json"):
                    continue
                seen += 1
                if seen > MAX_FILES:
                    return
                yield entry.path, plain, where


def _code_forms(value: str) -> list:
    """The solicitation code as the LIS column may hold it: a number first (an INT column,
    the usual), then as text (a VARCHAR column)."""
    forms: list = []
    if value.isascii() and value.isdigit() and len(value) <= 18:
        forms.append(sa.bindparam("cod", int(value), type_=sa.BigInteger))
    forms.append(sa.bindparam("cod", value, type_=sa.Unicode))
    return forms


def _lis_item(row) -> _LisItem:
    cod = row.CodSolicitacao
    return _LisItem(int(row.CodItemSol), "" if cod is None else str(jsonable(cod)).strip(),
                    row.DataEntrada, "" if row.CodConvExames is None else str(row.CodConvExames),
                    None if row.NomeTerceirizado is None else str(row.NomeTerceirizado))


def _parse_iso(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        when = dt.datetime.fromisoformat(str(text))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def _utc(value) -> dt.datetime | None:
    """A UTC time as the monitor's tables keep it (naive) -> aware."""
    if isinstance(value, str):
        return _parse_iso(value)
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
    return None


def _local_naive(value) -> dt.datetime | None:
    """DataEntrada as the LIS keeps it (local time, no zone)."""
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=None)
    if isinstance(value, str):
        try:
            return dt.datetime.fromisoformat(value.strip()).replace(tzinfo=None)
        except ValueError:
            return None
    return None


# ------------------------------------------------------------------ composing
def _compose(settings: Settings, query: TraceQuery, lis: list[_LisItem], lis_notes: list[str],
             records: _Records, files: list[FailureFileInfo], now: float) -> Story:
    steps = _history_steps(records.history_rows)
    in_history = {i for s in steps for i in s.item_ids}
    named_files = {s.file for s in steps if s.file}
    in_files = {i for f in files for i in f.item_ids}
    # without history rows, the record in _MonitorItems says the last thing that happened
    # (a failure: its file, below, says more)
    for item_id, row in sorted(records.items.items()):
        if item_id not in in_history and not (row.get("Status") == ItemStatus.FAILED
                                              and item_id in in_files):
            steps.append(_record_step(item_id, row))
    for f in files:
        if f.name not in named_files:
            steps.append(Step(f.created_at, Event.FILE, f.item_ids, f.key, f.http_status,
                              reason=f.reason, file=f.name, where=f.where))
    steps = _merge_steps(steps)

    by_id = {i.item_id: i for i in lis}
    exams = {int(r["CodItemSol"]): r.get("ExamCode") for r in records.history_rows}
    ids = sorted(set(by_id) | set(records.items) | in_history | {i for f in files for i in f.item_ids})
    if query.kind == "item":
        ids = [query.item_id]
    found = bool(records.items or in_history or files)
    last = _last_events(records.history_rows)
    items = []
    for item_id in ids[:MAX_ITEMS]:
        lis_item = by_id.get(item_id)
        state, text = _item_state(settings, item_id, lis_item, lis, records.items.get(item_id),
                                  last.get(item_id), [f for f in files if item_id in f.item_ids],
                                  records, now)
        exam = lis_item.exam if lis_item else (exams.get(item_id) or "")
        entered = _local_naive(lis_item.entered) if lis_item else None
        items.append(ItemView(item_id, exam, "" if entered is None else f"{entered:%Y-%m-%d %H:%M:%S}",
                              (lis_item.lab or "") if lis_item else "", state, text))

    lis_lines = list(lis_notes)
    if lis:
        ours = [i for i in lis if _ours(settings, i.lab)]
        lis_lines.insert(0, f"No LIS: {len(lis)} item(ns) em ItemSol"
                         + (f", {len(ours)} de {', '.join(settings.terceiros)}" if query.kind == "sol" else "")
                         + ".")
    elif query.kind == "item":
        lis_lines.append(f"O LIS não tem o item {query.value} (ItemSol.CodItemSol).")
    notes = []
    if not records.tables:
        notes.append(f"O monitor '{settings.monitor_name}' ainda não criou as suas tabelas neste "
                     "banco (nunca rodou com gravação).")
    else:
        if records.checkpoint is not None:
            notes.append(f"Checkpoint do monitor '{settings.monitor_name}': {records.checkpoint}"
                         + (f"; piso da janela ({settings.monitor_name}#inicio): {records.floor}"
                            if records.floor is not None else "") + ".")
        if not records.history:
            notes.append("Sem histórico (_MonitorHistory) neste banco: a história vem dos registros "
                         "recentes (_MonitorItems) e dos arquivos de falha.")
        elif settings.history_days <= 0:
            notes.append("HISTORY_DAYS=0: o monitor não guarda histórico; a história vem dos "
                         "registros recentes (_MonitorItems) e dos arquivos de falha.")
        if records.token_refused is not None and any(i.state == State.SENDING for i in items):
            status, since = records.token_refused
            notes.append(f"A API recusa o token (HTTP {status}) desde {_when(_utc(since), settings.tz)}: "
                         "o envio está pausado; confira BEMSOFT_TOKEN no .env.")
    return Story(query, settings.monitor_name, found, tuple(items), tuple(steps), tuple(files),
                 tuple(lis_lines), tuple(notes), settings.timezone)


def _history_steps(rows: list[dict]) -> list[Step]:
    steps = []
    for r in rows:
        reason = r.get("Reason")
        steps.append(Step(_utc(r.get("At")), str(r.get("Event")), (int(r["CodItemSol"]),),
                          r.get("IdemKey"), r.get("HttpStatus"), r.get("LatencyMs"),
                          None if not reason else reason_group(reason), r.get("FileName")))
    return steps


def _record_step(item_id: int, row: dict) -> Step:
    status = row.get("Status")
    event = {ItemStatus.SENDING: Event.SENDING, ItemStatus.DELIVERED: Event.DELIVERED,
             ItemStatus.FAILED: Event.FAILED, ItemStatus.NOFILE: Event.NOFILE}.get(status, str(status))
    reason = row.get("Reason")
    return Step(_utc(row.get("UpdatedAt")), event, (item_id,), row.get("IdemKey"),
                row.get("HttpStatus"), reason=None if not reason else reason_group(reason))


def _merge_steps(steps: list[Step]) -> list[Step]:
    """One step per moment and event: the rows of one send (one per item) become one line."""
    merged: dict[tuple, Step] = {}
    for s in steps:
        key = (s.at, s.event, s.key, s.http_status, s.reason, s.file)
        if key in merged:
            prev = merged[key]
            merged[key] = replace(prev, item_ids=prev.item_ids + tuple(i for i in s.item_ids
                                                                       if i not in prev.item_ids),
                                  latency_ms=prev.latency_ms if prev.latency_ms is not None else s.latency_ms)
        else:
            merged[key] = s
    never = dt.datetime.max.replace(tzinfo=dt.timezone.utc)
    return sorted(merged.values(), key=lambda s: (s.at or never, min(s.item_ids or (0,))))


def _last_events(rows: list[dict]) -> dict[int, dict]:
    last: dict[int, dict] = {}
    for r in rows:   # ordered by At, Id
        last[int(r["CodItemSol"])] = r
    return last


def _ours(settings: Settings, lab: str | None) -> bool:
    return lab is not None and lab in settings.terceiros


def _item_state(settings: Settings, item_id: int, lis_item: _LisItem | None, lis: list[_LisItem],
                record: dict | None, last: dict | None, files: list[FailureFileInfo],
                records: _Records, now: float) -> tuple[str, str]:
    tz = settings.tz
    waiting = [f for f in files if f.where == Where.WAITING]
    claimed = [f for f in files if f.where == Where.CLAIMED]
    replayed = [f for f in files if f.where == Where.REPLAYED]
    status = record.get("Status") if record else None
    event = str(last.get("Event")) if last else None
    if status == ItemStatus.SENDING:
        return State.SENDING, (f"aguardando a resposta da API: enviado sob a chave {record.get('IdemKey')} "
                               f"desde {_when(_utc(record.get('UpdatedAt')), tz)}; o monitor repete "
                               "com a mesma chave até ter resposta")
    if status == ItemStatus.NOFILE:
        return State.NOFILE, ("recusado pela API"
                              + (f" (HTTP {record.get('HttpStatus')})" if record.get("HttpStatus") else "")
                              + "; o arquivo de falha ainda não pôde ser gravado em FAILED_DIR: o "
                              "monitor tenta de novo a cada ciclo")
    if event in (Event.REPLAYED,) and not waiting and not claimed:
        return State.REPLAYED, (f"entregue pelo reenvio (retry_failed.py) em "
                                f"{_when(_utc(last.get('At')), tz)} sob a chave {last.get('IdemKey')}")
    if waiting:
        f = waiting[-1]
        return State.FAILED_DIR, (f"em FAILED_DIR ({f.name}): {f.reason}; corrija a causa e "
                                  "reenvie com retry_failed.py")
    if claimed:
        return State.REPLAYING, f"sendo reenviado agora por retry_failed.py ({claimed[-1].name})"
    if status == ItemStatus.DELIVERED or event in (Event.DELIVERED, Event.DUPLICATE):
        return State.DELIVERED, "entregue"
    if replayed:
        return State.REPLAYED, f"entregue pelo reenvio (retry_failed.py): {replayed[-1].name} saiu de FAILED_DIR"
    if status == ItemStatus.FAILED or event in (Event.FAILED, Event.GAVE_UP, Event.DB_REFUSED,
                                                Event.REPLAY_FAILED):
        return State.FAILED_GONE, ("falhou; o arquivo de falha não está mais em FAILED_DIR "
                                   "(reenviado para outra pasta com --move-ok, ou removido)")
    if event == Event.SENDING or event == Event.ATTEMPT:
        return State.SENDING, "aguardando a resposta da API (a última tentativa não teve resposta definitiva)"
    return _unrecorded(settings, item_id, lis_item, lis, records, now)


def _unrecorded(settings: Settings, item_id: int, lis_item: _LisItem | None, lis: list[_LisItem],
                records: _Records, now: float) -> tuple[str, str]:
    """Why the monitor has no record of an item."""
    if lis_item is None:
        return State.NOT_IN_LIS, "não está no LIS (ItemSol)"
    if not _ours(settings, lis_item.lab):
        lab = "vazio" if not lis_item.lab else f"'{lis_item.lab}'"
        return State.OTHER_LAB, (f"de outro laboratório: ItemSol.NomeTerceirizado = {lab}, fora de "
                                 f"TERCEIROS ({', '.join(settings.terceiros)}); o monitor não o envia")
    checkpoint, floor = records.checkpoint, records.floor
    if checkpoint is None:
        start = settings.start_from
        return State.NO_MONITOR, (f"o monitor '{settings.monitor_name}' ainda não rodou neste banco "
                                  "(sem checkpoint em _MonitorState); "
                                  + (f"START_FROM={start} decide onde ele começa" if start is not None
                                     else "defina START_FROM antes da primeira execução"))
    if item_id > checkpoint:
        held = _held(settings, lis_item, lis, now)
        if held:
            return State.HELD, held
        return State.UNREAD, (f"ainda não lido: acima do checkpoint {checkpoint}; o monitor lê em "
                              "ordem de CodItemSol e o envia num dos próximos ciclos"
                              + (f" (depois de DEBOUNCE_SECONDS={settings.debounce_seconds:g} s sem "
                                 "itens novos na solicitação)" if settings.debounce_seconds > 0 else ""))
    floor = checkpoint if floor is None else floor
    if item_id <= floor:
        return State.BEFORE_START, (f"abaixo do piso da janela ({settings.monitor_name}#inicio = {floor}): "
                                    "o monitor não lê tão atrás; o item é anterior ao ponto de partida "
                                    "(START_FROM na primeira execução) ou chegou (commit tardio) depois "
                                    "de a janela de releitura passar por ele")
    low = max(floor, checkpoint - settings.lookback_items)
    if item_id > low:
        return State.LATE, (f"commit tardio: abaixo do checkpoint {checkpoint}, dentro da janela de "
                            f"releitura (LOOKBACK_ITEMS={settings.lookback_items}); será lido no próximo ciclo")
    return State.MISSED, (f"commit tardio fora da janela de releitura: abaixo de {low} (checkpoint "
                          f"{checkpoint} menos LOOKBACK_ITEMS={settings.lookback_items}); para que "
                          f"seja lido, aumente LOOKBACK_ITEMS para pelo menos {checkpoint - item_id + 1} "
                          "e reinicie o monitor")


def _held(settings: Settings, lis_item: _LisItem, lis: list[_LisItem], now: float) -> str | None:
    """The debounce's rule (planner.Planner.split) seen from outside: a solicitation goes
    only after DEBOUNCE_SECONDS without new items, counted by the running monitor from when
    it saw them. Its memory is not visible here, so the LIS's DataEntrada of the latest item
    (local time, TIMEZONE) stands for it, compared with the local time now."""
    debounce = settings.debounce_seconds
    if debounce <= 0:
        return None
    same = [i for i in lis if i.cod == lis_item.cod and _ours(settings, i.lab)] if lis_item.cod else []
    times = [t for t in (_local_naive(i.entered) for i in same or [lis_item]) if t is not None]
    if not times:
        return None
    latest = max(times)
    local_now = dt.datetime.fromtimestamp(now, settings.tz).replace(tzinfo=None)
    quiet_at = latest + dt.timedelta(seconds=debounce)
    if local_now >= quiet_at + dt.timedelta(seconds=settings.poll_seconds):
        return None
    return (f"aguardando o intervalo de agrupamento: com DEBOUNCE_SECONDS={debounce:g} s a solicitação "
            f"só é enviada depois desse tempo sem itens novos (último item entrou às "
            f"{latest:%Y-%m-%d %H:%M:%S}; envio previsto a partir de {quiet_at:%H:%M:%S})")


def _when(at: dt.datetime | None, tz) -> str:
    return "—" if at is None else f"{at.astimezone(tz):%Y-%m-%d %H:%M:%S}"


# ------------------------------------------------------------------ saying it
EVENT_TEXT = {
    Event.SENDING: "lido e enviado sob a chave {key}",
    Event.ATTEMPT: "tentativa sem resposta definitiva{answer}: repetida depois com a mesma chave {key}",
    Event.DELIVERED: "entregue sob a chave {key}{answer}",
    Event.DUPLICATE: "a API já tinha a chave {key} (HTTP 409): contado como entregue",
    Event.FAILED: "recusado{answer}: arquivo de falha {file}",
    Event.GAVE_UP: "falhas repetidas só neste pedido{answer}: arquivo de falha {file}",
    Event.NOFILE: "recusado{answer}; o arquivo de falha ainda não pôde ser gravado",
    Event.DB_REFUSED: "o banco recusou o registro do monitor: arquivo de falha {file}",
    Event.REPLAYED: "reenviado por retry_failed.py sob a chave {key}: entregue{answer}",
    Event.REPLAY_FAILED: "reenviado por retry_failed.py sob a chave {key}: recusado de novo{answer}",
    Event.FILE: "arquivo de falha gravado: {file}{answer}",
}
FILE_NOW = {  # Event.FILE: what became of the file
    Where.WAITING: "; continua em FAILED_DIR (chave {key})",
    Where.CLAIMED: "; sendo reenviado agora por retry_failed.py (chave {key})",
    Where.REPLAYED: "; depois reenviado por retry_failed.py (chave {key}) e entregue",
}
WHERE_TEXT = {Where.WAITING: "em FAILED_DIR", Where.CLAIMED: "sendo reenviado agora",
              Where.REPLAYED: "reenviado (fora de FAILED_DIR)"}


def step_text(step: Step) -> str:
    parts = []
    if step.http_status is not None:
        parts.append(f"HTTP {step.http_status}")
    if step.latency_ms is not None:
        parts.append(f"{step.latency_ms} ms")
    answer = ", ".join(parts)
    if step.reason:
        answer = f"{answer}: {step.reason}" if answer else step.reason
    template = EVENT_TEXT.get(step.event, step.event + "{answer}")
    if step.event == Event.FILE:
        template += FILE_NOW.get(step.where, "")
    return template.format(key=step.key or "—", file=step.file or "—",
                           answer=f" ({answer})" if answer else "")


def items_text(ids: Sequence[int], limit: int = 8) -> str:
    ids = list(ids)
    if len(ids) == 1:
        return f"item {ids[0]}"
    shown = ", ".join(str(i) for i in ids[:limit])
    return f"itens {shown}" + (f" e mais {len(ids) - limit}" if len(ids) > limit else "")


def step_time(step: Step, tz) -> str:
    return _when(step.at, tz)


def story_lines(story: Story, tz) -> list[str]:
    """The story in pt-BR, oldest first, one line per write (for a RedactedStream)."""
    lines = [f"{story.query.label} — monitor '{story.monitor}' "
             f"({'encontrada' if story.found and story.query.kind == 'sol' else 'encontrado' if story.found else 'sem registro do monitor'})"]
    lines += [f"  {text}" for text in story.lis + story.notes]
    if story.items:
        lines.append("Itens:")
        for i in story.items:
            extra = "  ".join(x for x in (i.exam and f"exame {i.exam}", i.entered and f"entrada {i.entered}") if x)
            lines.append(f"  {i.item_id}  {extra}" if extra else f"  {i.item_id}")
            lines.append(f"      {i.text}")
    if story.steps:
        lines.append(f"História (hora local, {story.tz}; mais antigo primeiro):")
        for s in story.steps:
            lines.append(f"  {step_time(s, tz)}  {items_text(s.item_ids)}: {step_text(s)}")
    if story.files:
        lines.append("Arquivos de falha:")
        for f in story.files:
            lines.append(f"  {f.name}  {WHERE_TEXT.get(f.where, f.where)}; {items_text(f.item_ids)}; "
                         f"chave {f.key or '—'}"
                         + (f"; HTTP {f.http_status}" if f.http_status else "") + f"; {f.reason}")
    pending = story.pending
    if story.found:
        if pending:
            lines.append("Pendente:")
            lines += [f"  item {i.item_id}: {i.text}" for i in pending]
        else:
            lines.append("Nada pendente: todos os itens foram entregues.")
    else:
        lines.append("O monitor nunca registrou " + ("esta solicitação." if story.query.kind == "sol"
                                                     else "este item."))
    return lines
