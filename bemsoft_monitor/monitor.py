"""The loop: read a page, group by solicitation, hold what is not quiet yet, build payloads,
record "sending", POST concurrently, record outcomes and move the checkpoint.

The stages are the planner (groups, debounce, jobs, keys), the ledger (what is waiting, in
flight and recorded; the checkpoint target), the sender (pool, halt, harvest) and the
outcomes (settle, failures, stats, the monitor's records). `step()` is one unit of work and
returns whether more may be waiting; `run()` drains, then sleeps in short slices that watch
the shutdown flag. Tests call `step()` directly.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import sqlalchemy as sa

from .client import BemsoftClient, Verdict
from .config import Settings
from .db import describe_query_timeout, is_query_timeout
from .failures import FailureStore
from .history import History, outcome_fields
from .ledger import Ledger
from .lock import LockWatch
from .metrics import LatencyHistogram
from .outcomes import CycleResult, Outcomes, Stats, count_items, short_error
from .planner import Planner
from .records import DB_REFUSED_REASON, Records, StartError
from .retry import DB_ERROR, DB_RECONNECT, PauseGate, cycle_pause
from .sender import Sender
from .source import LegacySource, is_outage
from .status import StatusBoard

__all__ = ["Monitor", "StartError", "CycleResult", "Stats", "DB_REFUSED_REASON", "count_items"]

log = logging.getLogger(__name__)

# answers that prove the API accepted the token (it judged the order itself)
ANSWERED = (Verdict.DELIVERED, Verdict.DUPLICATE, Verdict.PERMANENT)


class Monitor:
    MAX_PAGES_IN_FLIGHT = 2

    def __init__(self, settings: Settings, source: LegacySource, client: BemsoftClient | None,
                 catalog, failures: FailureStore, *, shutdown: threading.Event | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_dry_run: Callable[[dict, str], None] | None = None,
                 status: StatusBoard | None = None, lock=None):
        self.settings, self.source, self.dry_run = settings, source, settings.dry_run
        self.status = status or StatusBoard(tz=settings.tz, dry_run=settings.dry_run)
        self.shutdown = shutdown or threading.Event()
        self.gate = client.gate if client else PauseGate(self.shutdown)
        self.gate.shutdown = self.shutdown
        self.clock = clock
        self.lock = lock  # InstanceLock (single instance), acquired before start(); None: none
        self._lock_held = LockWatch(lock, settings.monitor_name)
        self.latency = LatencyHistogram()
        self.last_cycle_at: float | None = None  # time.time() of the last completed cycle
        self.ledger: Ledger | None = None        # made by start()
        self.planner = Planner(settings, catalog, failures)
        self.history = History(settings)
        self.records = Records(settings, source, failures, self.history)
        self.outcomes = Outcomes(settings, source, failures, self.status, self.latency,
                                 lambda: self.clock(), self.history)
        self.sender = Sender(client, failures, settings.concurrency, shutdown=self.shutdown,
                             dry_run=self.dry_run, on_dry_run=on_dry_run or (lambda payload, key: None),
                             failure_of=self.outcomes.failure_of)
        self._pause = cycle_pause(settings.backoff, settings.max_backoff)
        self._failed_cycles = 0
        self.token_refused_since: float | None = None  # time.time(): the API refuses the token

    @property
    def checkpoint(self) -> int | None:
        return self.ledger.checkpoint if self.ledger else None

    @property
    def stats(self) -> Stats:
        return self.outcomes.stats

    def start(self) -> None:
        """Create the monitor's tables (not in DRY_RUN) and load or initialise the checkpoint."""
        self.ledger = self.records.load()

    def close(self) -> None:
        self.sender.close()

    # ------------------------------------------------------------------ one step
    def step(self) -> CycleResult:
        """One unit of work: collect finished sends, read and dispatch one page, record
        outcomes and move the checkpoint. While catching up (full pages) the next page is
        read while the previous one is still being sent; otherwise the step waits for its
        sends, so one step delivers what was ready. `result.more`: more work now."""
        result = CycleResult()
        if self.ledger is None:
            self.start()
        self._harvest(result, "oldest" if self.sender.pages >= self.MAX_PAGES_IN_FLIGHT else "none")
        if self.ledger.unrecorded:
            self._advance()  # recorded before reading, so the read does not see them as "sending"
        page, catalog_down = None, False
        if (self.sender.pages < self.MAX_PAGES_IN_FLIGHT and not self.shutdown.is_set()
                and not result.transient and self.gate.remaining() <= 0 and self._lock_held()):
            self.sender.halt.clear()
            page, catalog_down = self._read_and_dispatch(result)
        catching_up = page is not None and page.full and result.ready > 0
        if not catching_up or self.sender.halt.is_set() or catalog_down:
            self._harvest(result, "all")
        refused = self._watch_token(result, catalog_down)
        failed = catalog_down or result.transient or refused
        if failed:
            retry_after = max((j.delivery.retry_after or 0.0 for j in result.settled if j.delivery),
                              default=0.0)
            self._pause_after_failure(catalog_down, retry_after, refused)
            self.ledger.cursor = None  # after the pause, start again from the window
        elif result.sent:
            self._failed_cycles = 0
        self._advance()
        result.more = bool(self.sender.pages) or (catching_up and not failed)
        self.last_cycle_at = time.time()
        if self._lock_held.lost:  # another monitor sends meanwhile: this one waits
            self.status.standby()
        else:
            self.status.cycle_done(bool(result.ready or result.held or result.more), self.gate.remaining())
        return result

    def finish(self) -> None:
        """Wait for the sends in flight and record their outcomes (graceful stop)."""
        self._harvest(CycleResult(), "all")
        self._advance()

    def _read_and_dispatch(self, result: CycleResult):
        ledger, batch_size = self.ledger, self.settings.batch_size
        from_window, after = ledger.read_from()
        page = self.source.read_page(after, batch_size, with_state=not self.dry_run)
        if not from_window and any(r.pending_key and r.item_id not in ledger.inflight for r in page.rows):
            # a send left pending must go out whole, under its key: a read from the cursor may
            # see only the part of its group above the cursor; the window read has all of it
            from_window = True
            page = self.source.read_page(ledger.window_low(), batch_size, with_state=True)
        rows = [r for r in page.rows if ledger.new(r.item_id)]
        ready, held = self.planner.split(rows, self.clock(), complete=from_window and not page.full)
        result.ready, result.held = len(ready), len(held)
        jobs, deferred = self.planner.jobs(ready, self.outcomes.retried)
        if not self.dry_run:
            self.records.mark_sending([j for j in jobs if not j.recovered], ledger)
        # Only now, with the "sending" records written, does the page count as read: if the
        # database failed above, nothing here moved and the same page is read again.
        ledger.page_read([r.item_id for r in rows], [i for g in held for i in g.item_ids] + deferred,
                         from_window=from_window, full=page.full, upper=page.upper,
                         page_ids=[r.item_id for r in page.rows])
        self.outcomes.record_known(jobs)
        # tracked before anything is sent: whatever happens below, these items hold the checkpoint
        ledger.dispatched(i for job in jobs for i in job.item_ids)
        self.sender.dispatch(jobs)
        return page, bool(deferred)

    def _harvest(self, result: CycleResult, wait: str) -> None:
        for job in self.sender.harvest(wait):
            self.outcomes.settled(job, result)
            if job.outcome is None:
                self.history.attempt(job)  # answered without settling it: written next time
                self.ledger.settled(job.item_ids, job.cod, job.key, None)
            else:
                self.ledger.settled(job.item_ids, job.cod, job.key, job.outcome,
                                    None if self.dry_run else outcome_fields(job))

    def _advance(self) -> None:
        """Outcomes and checkpoint are written in one short transaction; if it fails, both
        are kept in memory and written by a later step."""
        write = self.ledger.plan()
        if write is None:  # DRY_RUN: nothing is written
            return
        if not write.empty:
            try:
                self.records.write(write, self.ledger)
            except Exception:
                self.ledger.not_written(write)
                raise
        self.ledger.written(write)
        self.status.progress(write.target, self.ledger.open_items, self.ledger.cursor is not None)

    def _watch_token(self, result: CycleResult, catalog_down: bool) -> bool:
        """A refused token (401, or a 403 that GET /tests confirms; GET /tests itself refused)
        is one problem of the installation: said once, shown by the console and --status,
        and sending pauses as in an outage until an answer shows it is accepted again.
        True while it is refused."""
        status = result.token_refused
        error = self.planner.catalog_error
        if status is None and catalog_down and error is not None and error.token_refused:
            status = error.status
        if status is not None:
            if self.token_refused_since is None:
                self.token_refused_since = time.time()
                log.error("Token recusado pela API (HTTP %s): envio pausado para todos os pedidos. "
                          "Nada vai para FAILED_DIR e nada é perdido: os pedidos esperam com a "
                          "mesma chave. Confira BEMSOFT_TOKEN no .env; o monitor tenta de novo "
                          "sozinho (espera crescente até %.0f s) e retoma quando o token for "
                          "aceito, ou reinicie-o com o token novo.", status, self.settings.max_backoff)
                self.status.token_refused(status)
                self.records.note_token_refused(status)
            return True
        answered = any(j.delivery is not None and j.delivery.outcome in ANSWERED for j in result.settled)
        if self.token_refused_since is not None and answered:
            log.info("Token aceito de novo pela API (recusado desde %s): envio retomado.",
                     time.strftime("%H:%M:%S", time.localtime(self.token_refused_since)))
            self.token_refused_since = None
            self.status.token_accepted()
            self.records.note_token_refused(None)
        return False

    def _pause_after_failure(self, catalog_down: bool, retry_after: float = 0.0,
                             refused: bool = False) -> None:
        """Capped exponential pause for every sender (retry.cycle_pause); a server's
        Retry-After lengthens it, never shortens it."""
        self._failed_cycles += 1
        delay = self._pause.delay(self._failed_cycles, retry_after)
        self.gate.pause(delay)
        self.status.api_paused(delay)
        what = ("token recusado pela API" if refused else "catálogo /tests indisponível"
                if catalog_down else "API com falhas transitórias")
        log.warning("%s: envio pausado por %.0f s (ciclo %d com falha); nada foi descartado.",
                    what, delay, self._failed_cycles)

    # ------------------------------------------------------------------ the loop
    def run(self, mode: str = "loop") -> int:
        """mode: "loop" (until shutdown), "once" (what is eligible now), "drain" (until
        nothing is left). Returns the process exit code."""
        failures, db_down = 0, False   # consecutive failed cycles; the database is down
        while not self.shutdown.is_set():
            try:
                result = self.step()
            except sa.exc.DBAPIError as err:
                if mode == "once":
                    raise
                if is_query_timeout(err):  # blocked behind a LIS transaction: not an outage
                    log.warning("%s", describe_query_timeout(self.settings))
                    self.status.db_down("leituras do banco canceladas por DB_QUERY_TIMEOUT "
                                        "(transação longa no LIS?)")
                    self.gate.sleep(self.settings.poll_seconds)
                    continue
                failures += 1
                if not is_outage(err):  # the database answered: a statement it refused
                    log.error("O banco de dados recusou um comando do monitor (%s); não é falta "
                              "de conexão. Nova tentativa em %.0f s.", short_error(err),
                              DB_ERROR.delay(failures))
                    self.gate.sleep(DB_ERROR.delay(failures))
                    continue
                if not db_down:
                    log.error("Banco de dados indisponível (%s). Tentando reconectar; nada é "
                              "enviado nem perdido enquanto isso.", short_error(err))
                db_down = True
                self.status.db_down(f"banco de dados indisponível ({short_error(err)})")
                self.gate.sleep(DB_RECONNECT.delay(failures))
                continue
            except Exception:
                if mode == "once":
                    raise
                # a bug must not stop deliveries for good: what has no recorded outcome stays
                # unknown or "sending" and the next window read takes it up again
                failures += 1
                log.exception("Erro inesperado no ciclo; nova tentativa em %.0f s.", DB_ERROR.delay(failures))
                self.gate.sleep(DB_ERROR.delay(failures))
                continue
            if db_down:
                log.info("Conexão com o banco de dados restabelecida.")
            failures, db_down = 0, False
            if result.more or (result.sent and mode != "once"):
                continue  # drain first: sleep only after a cycle that found nothing to send
            idle = not result.ready and not result.held and self.gate.remaining() <= 0
            if mode == "once" or (mode == "drain" and idle):
                break
            # idle, nothing in flight: a small batch of old history goes now, never during a send
            self.history.prune(self.source.engine, self.clock())
            wait = self.gate.remaining() or self.settings.poll_seconds
            if result.held:
                wait = min(wait, max(0.2, self.settings.debounce_seconds / 4))
            self.gate.sleep(wait)
        if self.sender.pages or (self.ledger and self.ledger.unrecorded):
            try:
                self.finish()  # the sends in flight complete and are recorded before exit
            except Exception as err:
                log.error("Não foi possível registrar os últimos resultados (%s); serão "
                          "reenviados com a mesma chave na próxima execução.", short_error(err))
        self.records.flush_history()
        if mode != "loop" and not db_down:  # a scheduled --once/--drain prunes too (one batch)
            self.history.prune(self.source.engine, self.clock())
        return 0
