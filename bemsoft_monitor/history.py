"""The order history (_MonitorHistory): one row per item per event, written in the same
transaction as the record it accompanies, kept by age (HISTORY_DAYS). This module turns jobs
and outcomes into rows (redacted, cut to the column sizes) and prunes old rows; the writes
themselves are the source's (`LegacySource.mark_sending`, `record`, `mark_unwritten`)."""
from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Iterable, Sequence

import sqlalchemy as sa

from .client import Verdict
from .db import first_line
from .payload import external_token
from .reasons import reason_group
from .redaction import redact
from .schema import HistoryEvent, ItemStatus, monitor_history
from .source import utcnow

log = logging.getLogger(__name__)

PRUNE_BATCH = 1000      # rows per DELETE: short, never holds a send
MAX_QUEUED = 50_000     # ATTEMPT rows kept in memory for the next write, at most


def exam_codes(event: dict | None, item_ids: Sequence[int]) -> tuple:
    """The CodConvExames of each item (aligned with `item_ids`), as the event holds them."""
    codes = {}
    for item in (event or {}).get("items") or ():
        try:
            codes[int(item["CodItemSol"])] = item.get("CodConvExames")
        except (KeyError, TypeError, ValueError, AttributeError):  # an odd stored event
            continue
    return tuple(codes.get(int(i)) for i in item_ids)


def outcome_fields(job) -> dict:
    """What the history row of a settled job needs (the extra fields of a source.Outcome)."""
    delivery, failure = job.delivery, job.failure
    reason = None
    if job.outcome == ItemStatus.DELIVERED:
        duplicate = delivery is not None and delivery.outcome == Verdict.DUPLICATE
        event = HistoryEvent.DUPLICATE if duplicate else HistoryEvent.DELIVERED
    else:
        if job.db_refused:
            event = HistoryEvent.DB_REFUSED
        elif delivery is not None and delivery.outcome != Verdict.PERMANENT:
            event = HistoryEvent.GAVE_UP
        else:
            event = HistoryEvent.FAILED
        reason = failure.reason if failure is not None else None
    status = delivery.status if delivery is not None else (
        failure.http_status if failure is not None else None)
    return {"event": event, "http_status": status,
            "latency_ms": round(delivery.duration * 1000) if delivery is not None else None,
            "reason": reason,
            "file_name": Path(job.failure_path).name if job.failure_path else None,
            "exam_codes": exam_codes(job.event, job.item_ids), "at": utcnow()}


class History:
    """Builds the rows; holds the ATTEMPT rows until the next write. `enabled` is False in
    DRY_RUN and with HISTORY_DAYS=0: then every method returns no rows."""

    def __init__(self, settings):
        self.settings = settings
        self.name = settings.monitor_name
        self.days = settings.history_days
        self.enabled = not settings.dry_run and self.days > 0
        self.queued: list[dict] = []
        self._codes: dict = {}    # exam code -> its redacted form (codes repeat a lot)
        # key -> (status, reason) of its last ATTEMPT row: a long outage repeats the same
        # answer every probe; it is written once, not once a probe, until the key settles
        self._last_attempt: dict[str, tuple] = {}
        self._next_prune = 0.0

    # ------------------------------------------------------------------ rows
    def rows(self, item_ids: Sequence[int], cod, key: str | None, event: str, *,
             codes: Sequence = (), http_status: int | None = None, latency_ms: int | None = None,
             reason: str | None = None, file_name: str | None = None,
             at: dt.datetime | None = None) -> list[dict]:
        if not self.enabled or not item_ids:
            return []
        # only the columns that have a value: fewer parameters per row (the rows of one call
        # share their columns, so they go in one executemany; see LegacySource._history)
        common = {"Name": self.name, "At": at or utcnow(), "CodSolicitacao": external_token(cod),
                  "Event": event}
        if key is not None:
            common["IdemKey"] = key[:100]
        if http_status is not None:
            common["HttpStatus"] = http_status
        if latency_ms is not None:
            common["LatencyMs"] = latency_ms
        if reason is not None:
            # the reason's group only: what follows its first ': ' may echo the API's answer
            # or the LIS (a patient's name, CPF or birth date), and this table keeps it for
            # HISTORY_DAYS; the whole answer stays in the failure file
            common["Reason"] = reason_group(redact(reason, self.settings, one_line=True))[:1000]
        if file_name is not None:
            common["FileName"] = file_name[:255]
        codes = tuple(codes) or (None,) * len(item_ids)
        return [dict(common, CodItemSol=int(item_id), ExamCode=self._code(code))
                for item_id, code in zip(item_ids, codes)]

    def _code(self, code):
        if code is None:
            return None
        shown = self._codes.get(code)
        if shown is None:
            shown = redact(str(code), self.settings, one_line=True)[:100]
            if len(self._codes) < 10_000:
                self._codes[code] = shown
        return shown

    def sending(self, jobs: Iterable) -> list[dict]:
        rows = []
        for job in jobs:
            rows += self.job_rows(job, HistoryEvent.SENDING)
        return rows

    def job_rows(self, job, event: str, **fields) -> list[dict]:
        if not self.enabled:
            return []
        return self.rows(job.item_ids, job.cod, job.key, event,
                         codes=exam_codes(job.event, job.item_ids), **fields)

    def outcome_rows(self, outcomes: Iterable) -> list[dict]:
        rows = []
        if not self.enabled:
            return rows
        for o in outcomes:
            self._last_attempt.pop(o.key, None)
            if o.event is not None:
                rows += self.rows(o.item_ids, o.cod, o.key, o.event, codes=o.exam_codes,
                                  http_status=o.http_status, latency_ms=o.latency_ms,
                                  reason=o.reason, file_name=o.file_name, at=o.at)
        return rows

    # ------------------------------------------------------------------ attempts
    def attempt(self, job) -> None:
        """An answer that did not settle the job: queued, written with the next write."""
        if not self.enabled or job.delivery is None:
            return
        delivery = job.delivery
        answer = (delivery.status, delivery.reason)
        if self._last_attempt.get(job.key) == answer:
            return
        self._last_attempt[job.key] = answer
        rows = self.job_rows(job, HistoryEvent.ATTEMPT, http_status=delivery.status,
                             latency_ms=round(delivery.duration * 1000), reason=delivery.reason)
        if len(self.queued) + len(rows) <= MAX_QUEUED:
            self.queued += rows

    def take(self) -> list[dict]:
        """The queued rows, handed to a write; `give_back` them if it failed."""
        rows, self.queued = self.queued, []
        return rows

    def give_back(self, rows: list[dict]) -> None:
        if rows:
            self.queued = (rows + self.queued)[:MAX_QUEUED]

    # ------------------------------------------------------------------ pruning
    def cutoff(self, now: dt.datetime | None = None) -> dt.datetime:
        return (now or utcnow()) - dt.timedelta(days=self.days)

    def prune_statement(self, cutoff: dt.datetime, batch: int = PRUNE_BATCH):
        """Delete one small batch of this monitor's rows older than `cutoff` (oldest first)."""
        h = monitor_history
        oldest = (sa.select(h.c.Id).where(h.c.Name == self.name, h.c.At < cutoff)
                  .order_by(h.c.Id).limit(batch))
        # a derived table around the LIMIT: some engines refuse LIMIT directly inside IN
        return h.delete().where(h.c.Id.in_(sa.select(oldest.subquery().c.Id)))

    def prune(self, engine: sa.Engine, clock: float, *, batch: int = PRUNE_BATCH,
              now: dt.datetime | None = None) -> int:
        """One batch, when due (every minute, or at once while the last batch was full).
        Never in DRY_RUN; with HISTORY_DAYS=0 the table is emptied the same way. Returns the
        rows deleted. Database errors are logged, never raised: pruning can wait."""
        if self.settings.dry_run or clock < self._next_prune:
            return 0
        cutoff = (now or utcnow()) if self.days <= 0 else self.cutoff(now)
        try:
            with engine.begin() as conn:
                deleted = conn.execute(self.prune_statement(cutoff, batch)).rowcount or 0
        except sa.exc.DBAPIError as err:
            log.debug("Limpeza do histórico adiada: %s", err)
            self._next_prune = clock + 300
            return 0
        self._next_prune = clock if deleted >= batch else clock + 60
        if deleted:
            log.debug("Histórico: %d linhas anteriores a %s removidas.", deleted, cutoff)
        return deleted


class ReplayHistory:
    """The rows retry_failed.py adds: REPLAYED / REPLAY_FAILED per item of each file it
    sent, one short transaction per file. When the database is not reachable, or its tables
    have no history yet, the replay goes on and `problem` says why nothing is written."""

    def __init__(self, settings, engine: sa.Engine | None, problem: str | None = None):
        self.history = History(settings)
        self.engine = engine
        self.problem = problem if self.history.enabled else None
        self.written = 0

    @classmethod
    def open(cls, settings) -> "ReplayHistory":
        from . import migrations
        from .db import connect_check, create_db_engine, describe_connect_error, monitor_schema_map

        history = History(settings)
        if not history.enabled:
            return cls(settings, None)
        try:
            engine = create_db_engine(settings)
            engine = engine.execution_options(
                schema_translate_map=monitor_schema_map(engine.dialect.name))
            connect_check(engine, settings)
            with engine.connect() as conn:
                ready = migrations.has_history(conn)
        except migrations.SchemaTooNew as err:
            return cls(settings, None, str(err))
        except Exception as err:  # the replay itself does not need the database
            text = describe_connect_error(err, settings) if isinstance(err, sa.exc.DBAPIError) else str(err)
            return cls(settings, None, f"banco de dados indisponível ({text})")
        if not ready:
            return cls(settings, None, migrations.NO_HISTORY)
        return cls(settings, engine)

    def add(self, record, delivery, key: str, file_name: str) -> None:
        """One file sent: its items' rows (REPLAYED when the API took it, else REPLAY_FAILED)."""
        if self.engine is None or delivery is None or record is None:
            return
        event = HistoryEvent.REPLAYED if delivery.ok else HistoryEvent.REPLAY_FAILED
        rows = self.history.rows(
            record.item_ids, record.cod, key, event, codes=exam_codes(record.event, record.item_ids),
            http_status=delivery.status, latency_ms=round(delivery.duration * 1000),
            reason=None if delivery.ok else delivery.reason, file_name=file_name)
        try:
            with self.engine.begin() as conn:
                conn.execute(monitor_history.insert(), rows)
            self.written += len(rows)
        except sa.exc.DBAPIError as err:
            log.warning("Histórico do reenvio de %s não gravado (%s).", file_name, first_line(err))
            self.problem = self.problem or "o banco recusou ou caiu durante a gravação"

    def close(self) -> None:
        if self.engine is not None:
            self.engine.dispose()
