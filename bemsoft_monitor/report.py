"""`--report 2026-11-28` / `--report 2026-11`: what was delivered and what failed that day
(or month), from the order history, as CSV for reconciliation with what the support lab
bills: UTF-8 with BOM and `;` separators (Excel in pt-BR opens it as is), one line per item
and outcome, a last line with the counts. Dates in TIMEZONE. No patient data."""
from __future__ import annotations

import csv
import datetime as dt
import decimal
import io
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from .schema import HistoryEvent as E, monitor_history
from .visible import visible

log = logging.getLogger(__name__)

DELIVERED = {E.DELIVERED: "entregue", E.DUPLICATE: "entregue (já recebido, 409)",
             E.REPLAYED: "entregue no reenvio"}
FAILED = {E.FAILED: "falhou", E.GAVE_UP: "falhou (desistiu após falhas seguidas)",
          E.DB_REFUSED: "falhou (banco recusou o registro)", E.REPLAY_FAILED: "reenvio falhou"}
OUTCOMES = {**DELIVERED, **FAILED}
HEADER = ["Data e hora", "Solicitação", "Item", "Código do exame", "Chave", "HTTP", "Resultado"]
MONEY = ("Valor", "VlTerceirizado")   # ItemSol columns a lab reconciles with, when it has them
MIN_YEAR, MAX_YEAR = 1900, 9998      # a period's years (its UTC bounds stay in datetime's range)
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
CHUNK = 1000                          # ids per lookup (SQL Server: at most 2100 parameters)


class PeriodError(ValueError):
    """str() is pt-BR."""


@dataclass
class Period:
    label: str
    start: dt.datetime   # local (TIMEZONE), inclusive
    end: dt.datetime     # local, exclusive

    def utc(self, tz) -> tuple[dt.datetime, dt.datetime]:
        def convert(value):
            return value.replace(tzinfo=tz).astimezone(dt.timezone.utc).replace(tzinfo=None)
        return convert(self.start), convert(self.end)


def parse_period(text: str) -> Period:
    """`AAAA-MM-DD` (a day) or `AAAA-MM` (a month)."""
    text = (text or "").strip()
    try:
        # ASCII digits only (\d takes "２０２６"); years that leave room for any TIMEZONE
        # (9999-12-31 overflowed datetime: a traceback instead of this message)
        if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", text) and MIN_YEAR <= int(text[:4]) <= MAX_YEAR:
            day = dt.date.fromisoformat(text)
            start = dt.datetime.combine(day, dt.time())
            return Period(text, start, start + dt.timedelta(days=1))
        if re.fullmatch(r"[0-9]{4}-[0-9]{2}", text) and MIN_YEAR <= int(text[:4]) <= MAX_YEAR:
            year, month = int(text[:4]), int(text[5:])
            start = dt.datetime(year, month, 1)
            end = dt.datetime(year + month // 12, month % 12 + 1, 1)
            return Period(text, start, end)
    except (ValueError, OverflowError):
        pass
    raise PeriodError(f"período inválido {text!r}: use AAAA-MM-DD (um dia, ex.: 2026-11-28) "
                      "ou AAAA-MM (um mês, ex.: 2026-11)")


@dataclass
class Counts:
    delivered: int = 0
    failed: int = 0
    solicitations: set = field(default_factory=set)

    def line(self) -> list[str]:
        sols, lines = len(self.solicitations), self.delivered + self.failed
        return ["Totais", f"{sols} solicitaç{'ão' if sols == 1 else 'ões'}",
                f"{lines} linha{'' if lines == 1 else 's'}", f"entregues: {self.delivered}",
                f"falhas: {self.failed}"]


def money_columns(engine: sa.Engine) -> list[str]:
    """The names, as the LIS spells them, of ItemSol's Valor/VlTerceirizado (those it has)."""
    try:
        columns = {c["name"].lower(): c["name"] for c in sa.inspect(engine).get_columns("ItemSol")}
    except sa.exc.NoSuchTableError:
        return []
    return [columns[name.lower()] for name in MONEY if name.lower() in columns]


def history_statement(name: str, start: dt.datetime, end: dt.datetime):
    h = monitor_history
    return (sa.select(h.c.At, h.c.CodSolicitacao, h.c.CodItemSol, h.c.ExamCode, h.c.IdemKey,
                      h.c.HttpStatus, h.c.Event)
            .where(h.c.Name == name, h.c.At >= start, h.c.At < end, h.c.Event.in_(list(OUTCOMES)))
            .order_by(h.c.At, h.c.Id))


def money_statement(columns: list[str], item_ids):
    table = sa.table("ItemSol", sa.column("CodItemSol"), *(sa.column(c) for c in columns))
    return sa.select(table.c.CodItemSol, *(table.c[c] for c in columns)).where(
        table.c.CodItemSol.in_(list(item_ids)))


def cell(value) -> str:
    """Text for Excel: a code that starts like a formula is not run as one (OWASP's list:
    a tab or a carriage return before the `=` counts too; the history keeps a code's tab)."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in FORMULA_START else text


def money(value) -> str:
    if value is None:
        return ""
    try:
        amount = decimal.Decimal(str(value)).quantize(decimal.Decimal("0.01"))
    except decimal.InvalidOperation:   # a text column in some LIS: shown, never run
        return cell(visible(str(value), one_line=True))
    return f"{amount}".replace(".", ",")   # pt-BR decimal comma


def write_report(settings, engine: sa.Engine, period: Period, out) -> Counts:
    """The CSV of `period` into the text stream `out` (the BOM is the caller's)."""
    from .db import monitor_schema_map

    tz = settings.tz
    start, end = period.utc(tz)
    monitors = engine.execution_options(schema_translate_map=monitor_schema_map(engine.dialect.name))
    columns = money_columns(engine)
    writer = csv.writer(out, delimiter=";", lineterminator="\r\n")
    writer.writerow(HEADER + columns)
    counts = Counts()
    # two connections: the history is streamed while the LIS values are looked up
    with monitors.connect() as conn, engine.connect() as lis:
        result = conn.execution_options(stream_results=True).execute(
            history_statement(settings.monitor_name, start, end))
        while True:
            rows = result.fetchmany(CHUNK)
            if not rows:
                break
            values = {}
            if columns:
                for row in lis.execute(money_statement(columns, {int(r.CodItemSol) for r in rows})):
                    values[int(row[0])] = row[1:]
            for r in rows:
                at = r.At.replace(tzinfo=dt.timezone.utc).astimezone(tz)
                delivered = r.Event in DELIVERED
                counts.delivered += delivered
                counts.failed += not delivered
                counts.solicitations.add(r.CodSolicitacao)
                extra = [money(v) for v in values.get(int(r.CodItemSol), (None,) * len(columns))]
                writer.writerow([at.strftime("%d/%m/%Y %H:%M:%S"), cell(r.CodSolicitacao),
                                 r.CodItemSol, cell(r.ExamCode), cell(r.IdemKey),
                                 "" if r.HttpStatus is None else r.HttpStatus,
                                 OUTCOMES[r.Event], *extra])
    writer.writerow(counts.line())
    return counts


def run_report(settings, text: str, output: str | None, err=None) -> int:
    """`--report`: exit 0 (written, even when the period is empty), 2 for a bad period or
    tables without history, 3 when the database cannot be reached."""
    from . import migrations
    from .app import setup_output
    from .db import (DatabaseUnavailable, connect_check, create_db_engine, describe_connect_error,
                     monitor_schema_map)

    err = err or sys.stderr
    setup_output(settings, writes_files=False)
    try:
        period = parse_period(text)
    except PeriodError as problem:
        print(f"Erro: {problem}", file=err)
        return 2
    engine = None
    try:
        engine = create_db_engine(settings)
        connect_check(engine, settings)
        translated = engine.execution_options(schema_translate_map=monitor_schema_map(engine.dialect.name))
        with translated.connect() as conn:
            if not migrations.has_history(conn):
                print(f"Erro: {migrations.NO_HISTORY}.", file=err)
                return 2
        buffer = io.StringIO()
        counts = write_report(settings, engine, period, buffer)
    except migrations.SchemaTooNew as problem:
        print(f"Erro: {problem}", file=err)
        return 2
    except DatabaseUnavailable as problem:
        print(f"Erro: {problem}", file=err)
        return 3
    except sa.exc.DBAPIError as problem:
        print(f"Erro: banco de dados: {describe_connect_error(problem, settings)}", file=err)
        return 3
    finally:
        if engine is not None:
            engine.dispose()
    data = ("\ufeff" + buffer.getvalue()).encode("utf-8")
    if output:
        Path(output).write_bytes(data)
        print(f"Relatório {period.label}: {counts.delivered} entregues, {counts.failed} falhas "
              f"({len(counts.solicitations)} solicitações) -> {output}", file=err)
    else:
        stream = getattr(sys.stdout, "buffer", None)
        if stream is None:
            sys.stdout.write(data.decode("utf-8"))
        else:
            sys.stdout.flush()
            stream.write(data)
            stream.flush()
    return 0
