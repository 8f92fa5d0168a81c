"""Outcomes: what a finished job comes to (delivered, duplicate, failed for good, or sent
again later), the failure files and their retries when the disk refuses them, the give-up
policy for a solicitation that keeps failing while others go through, and the stats."""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import sqlalchemy as sa

from .client import Verdict
from .db import first_line as short_error
from .failures import FailureRecord, FailureStore, FailureWriteError
from .history import History
from .planner import Job
from .schema import HistoryEvent, ItemStatus
from .source import LegacySource
from .status import StatusBoard, count_items

log = logging.getLogger(__name__)


@dataclass
class CycleResult:
    ready: int = 0
    held: int = 0
    sent: int = 0
    transient: int = 0
    token_refused: int | None = None   # the HTTP status (401/403) when the API refused the token
    more: bool = False
    settled: list = field(default_factory=list)


@dataclass
class Stats:
    delivered: int = 0
    delivered_items: int = 0
    duplicates: int = 0
    failed: int = 0
    failed_items: int = 0
    transient: int = 0
    last_delivery: float | None = None  # time.time()
    reasons: collections.Counter = field(default_factory=collections.Counter)


class Outcomes:
    def __init__(self, settings, source: LegacySource, failures: FailureStore,
                 status: StatusBoard, latency, clock: Callable[[], float],
                 history: History | None = None):
        self.settings = settings
        self.history = history or History(settings)
        self.source = source
        self.failures = failures
        self.status = status
        self.latency = latency
        self.clock = clock
        self.dry_run = settings.dry_run
        self.stats = Stats()
        self._attempts: dict[str, int] = {}
        self._first_failure: dict[str, float] = {}
        self._unwritten: dict[str, FailureRecord] = {}   # failed; the file is still to be written
        self._unwritten_logged: dict[str, float] = {}
        self._last_success: float | None = None

    def retried(self, key: str) -> bool:
        return self._attempts.get(key, 0) > 0

    def settled(self, job: Job, result: CycleResult) -> None:
        """A job came back from the senders (sent or not)."""
        if job.delivery is not None:
            result.sent += 1
            self._settle(job, result)
        result.settled.append(job)
        self.status.settled(job.cod, len(job.item_ids), job.key, job.outcome, job.delivery,
                            job.failure.reason if job.failure is not None else None)

    def _settle(self, job: Job, result: CycleResult) -> None:
        delivery = job.delivery
        now = self.clock()
        self.latency.observe(delivery.duration)
        if delivery.ok:
            job.outcome = ItemStatus.DELIVERED
            self._last_success = now
            self._forget(job.key)
            self.stats.delivered += 1
            self.stats.delivered_items += len(job.item_ids)
            self.stats.last_delivery = time.time()
            duplicate = delivery.outcome == Verdict.DUPLICATE
            self.stats.duplicates += duplicate
            log.info("Solicitação %s entregue: %s, HTTP %s, chave %s, %.0f ms%s.",
                     job.cod, count_items(len(job.item_ids)), delivery.status, job.key,
                     delivery.duration * 1000, " (já recebida antes: 409)" if duplicate else "")
            if delivery.uncertain:
                log.warning("Solicitação %s: a API respondeu 409 depois de uma tentativa sem "
                            "resposta (chave %s). Quase sempre a primeira tentativa foi salva; se "
                            "ela tiver falhado no corpo, nada foi salvo. Confira no portal da "
                            "Bemsoft os exames %s do lote sol-%s.", job.cod, job.key,
                            ", ".join(f"item-{i}" for i in job.item_ids), job.cod)
            return
        if delivery.outcome == Verdict.PERMANENT:
            self.record_failure(job)
            return
        if delivery.outcome == Verdict.TOKEN_REFUSED:
            # one problem of the installation, not of this order: it stays "sending" under
            # its key, counts no attempt towards giving up, and the monitor pauses every sender
            result.token_refused = delivery.status
            return
        # transient: keep the "sending" record (same key next time), unless it keeps failing
        # while other solicitations go through
        result.transient += 1
        self.stats.transient += 1
        attempts = self._attempts[job.key] = self._attempts.get(job.key, 0) + 1
        first = self._first_failure.setdefault(job.key, now)
        api_works = self._last_success is not None and self._last_success > first
        if attempts >= self.settings.max_attempts and api_works:
            job.failure = self.failure_of(
                job, f"falhou {attempts} vezes seguidas enquanto outras solicitações eram "
                     f"entregues; último erro: {delivery.reason}")
            self.record_failure(job)
            return
        # an answer that is not the API's (portal) is logged once per outage by the client
        log.log(logging.DEBUG if delivery.unexpected else logging.WARNING,
                "Solicitação %s não entregue (%s, HTTP %s, chave %s, tentativa %d); "
                "será reenviada com a mesma chave.", job.cod, delivery.reason,
                delivery.status, job.key, attempts)

    def failure_of(self, job: Job, reason: str) -> FailureRecord:
        """The failure record of a job the API answered."""
        return FailureRecord(reason=reason, key=job.key, cod=job.cod, item_ids=job.item_ids,
                             event=job.event, http_status=job.delivery.status,
                             attempts=self._attempts.get(job.key, 0) + job.delivery.attempts,
                             response=job.delivery.body,
                             refused=job.delivery.outcome == Verdict.PERMANENT)

    def record_known(self, jobs: list[Job]) -> None:
        """Failures known before any POST are recorded first (and files left unwritten)."""
        for job in jobs:
            if job.outcome is None and job.payload is None:
                self.record_failure(job)
            elif job.outcome is None and job.key in self._unwritten:
                job.failure = self._unwritten[job.key]  # failed before; only its file is missing
                self.record_failure(job)

    def record_failure(self, job: Job) -> None:
        record = job.failure
        if self.dry_run:
            log.warning("[DRY_RUN] Solicitação %s falharia: %s", job.cod, record.reason)
            job.outcome = ItemStatus.FAILED
            return
        try:
            path = job.failure_path or self.failures.write(record)
        except FailureWriteError as err:
            self._unwritten_file(job, err)
            return
        if self._unwritten.pop(job.key, None) is not None:
            self._unwritten_logged.pop(job.key, None)
            log.info("Falha da solicitação %s finalmente gravada.", job.cod)
            if not self._unwritten:
                self.status.disk_error("FAILED_DIR", None)
        self._forget(job.key)
        job.outcome = ItemStatus.FAILED
        job.failure_path = path
        self.stats.failed += 1
        self.stats.failed_items += len(job.item_ids)
        self.stats.reasons[record.reason.split(":")[0][:80]] += 1
        took = f", {job.delivery.duration * 1000:.0f} ms" if job.delivery else ""
        log.error("Solicitação %s falhou: %s, HTTP %s, chave %s%s: %s. Arquivo: %s",
                  job.cod or "(sem CodSolicitacao)", count_items(len(job.item_ids)),
                  record.http_status, job.key, took, record.reason, path)

    def _unwritten_file(self, job: Job, err: FailureWriteError) -> None:
        record = job.failure
        # logged once, then every few minutes: a disk full for hours must not flood the log
        now = self.clock()
        self.status.disk_error("FAILED_DIR", str(err))
        if job.key not in self._unwritten or now - self._unwritten_logged.get(job.key, 0) >= 300:
            self._unwritten_logged[job.key] = now
            log.error("Solicitação %s falhou (%s), mas %s. O checkpoint fica parado até "
                      "conseguir gravar; nova tentativa a cada ciclo.", job.cod, record.reason, err)
        if record.refused and job.key not in self._unwritten:
            # refused for good: after a restart the file is written instead of POSTing the key
            # again (a 409 would count it delivered). A give-up after transient answers is
            # not marked: re-sending it under the same key is what it needs.
            delivery = job.delivery
            history = self.history.job_rows(
                job, HistoryEvent.NOFILE, http_status=record.http_status, reason=record.reason,
                latency_ms=round(delivery.duration * 1000) if delivery is not None else None)
            try:
                self.source.mark_unwritten(job.item_ids, record.reason, record.http_status, history)
            except sa.exc.DBAPIError as db_err:
                log.warning("Não foi possível registrar a falha no banco (%s).", short_error(db_err))
        self._unwritten[job.key] = record

    def _forget(self, key: str) -> None:
        self._attempts.pop(key, None)
        self._first_failure.pop(key, None)
