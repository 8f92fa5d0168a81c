"""The loop: read a page, group by solicitation, hold what is not quiet yet, build payloads,
record "sending", POST concurrently, record outcomes and move the checkpoint.

`step()` is one unit of work and returns whether more may be waiting; `run()` drains, then
sleeps in short slices that watch the shutdown flag. Tests call `step()` directly.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import sqlalchemy as sa

from .catalog import CatalogUnavailable
from .client import BemsoftClient, Delivery, Verdict
from .config import Settings
from .db import describe_query_timeout, is_query_timeout
from .failures import FailureRecord, FailureStore, FailureWriteError
from .metrics import LatencyHistogram
from .payload import TransformError, build_payload, idempotency_key, make_event
from .retry import PauseGate
from .schema import ItemStatus
from .source import ItemRow, LegacySource, Outcome, is_outage
from .status import StatusBoard

log = logging.getLogger(__name__)


DB_RETRY_MAX = 10.0  # seconds between reconnection attempts during a database outage
DB_REFUSED_REASON = ("o banco recusou o registro do monitor em _MonitorItems para estes itens "
                     "(não é falta de conexão): confira no LIS os códigos desta solicitação e "
                     "as restrições ou gatilhos criados em _MonitorItems; depois reenvie com "
                     "retry_failed.py")


class StartError(Exception):
    """The monitor cannot start (e.g. first start without START_FROM); str() is pt-BR."""


@dataclass
class Group:
    """The rows of one solicitation that go (or went) out under one Idempotency-Key."""
    cod: str
    rows: list[ItemRow]
    pending_key: str | None = None

    @property
    def ident(self) -> str:
        """The solicitation, or the item when it has no CodSolicitacao (never grouped)."""
        return self.cod or f"#item-{self.rows[0].item_id}"

    @property
    def problem(self) -> str | None:
        """The data problems found while reading (duplicated rows that differ)."""
        problems = dict.fromkeys(r.problem for r in self.rows if r.problem)
        return "; ".join(problems) or None

    @property
    def unwritten(self) -> ItemRow | None:
        """The row carrying a permanent failure whose file is still to be written."""
        first = self.rows[0]
        return first if first.pending_status == ItemStatus.NOFILE else None

    @property
    def item_ids(self) -> list[int]:
        return [r.item_id for r in self.rows]

    def event(self) -> dict:
        first = self.rows[0]
        return make_event(first.cod, first.solicitacao, first.paciente, [r.item for r in self.rows])


@dataclass
class Job:
    cod: str
    key: str
    item_ids: list[int]
    event: dict
    payload: dict | None = None          # None: nothing to send, `failure` says why
    failure: FailureRecord | None = None
    recovered: bool = False
    delivery: Delivery | None = None
    outcome: str | None = None           # ItemStatus.DELIVERED / ItemStatus.FAILED once recorded
    failure_path: object = None          # the failure file, once written


@dataclass
class Batch:
    """The jobs of one page handed to the senders."""
    jobs: list[Job]
    futures: list = field(default_factory=list)

    def done(self) -> bool:
        return all(f.done() for f in self.futures)


@dataclass
class CycleResult:
    ready: int = 0
    held: int = 0
    sent: int = 0
    transient: int = 0
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


class Monitor:
    def __init__(self, settings: Settings, source: LegacySource, client: BemsoftClient | None,
                 catalog, failures: FailureStore, *, shutdown: threading.Event | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_dry_run: Callable[[dict, str], None] | None = None,
                 status: StatusBoard | None = None):
        self.settings = settings
        self.status = status or StatusBoard(tz=settings.tz, dry_run=settings.dry_run)
        self.source = source
        self.client = client
        self.catalog = catalog
        self.failures = failures
        self.shutdown = shutdown or threading.Event()
        self.gate = client.gate if client else PauseGate(self.shutdown)
        self.gate.shutdown = self.shutdown
        self.clock = clock
        self.on_dry_run = on_dry_run or (lambda payload, key: None)
        self.dry_run = settings.dry_run
        self.checkpoint: int | None = None
        self.floor = 0       # the look-back window never reaches below the start point
        self.high_water = 0
        self.stats = Stats()
        self.latency = LatencyHistogram()
        self.last_cycle_at: float | None = None  # time.time() of the last completed cycle
        self._first_seen: dict[str, tuple[tuple, float]] = {}
        self._attempts: dict[str, int] = {}
        self._first_failure: dict[str, float] = {}
        self._unwritten: dict[str, FailureRecord] = {}
        self._unwritten_logged: dict[str, float] = {}
        self._last_success: float | None = None
        self._failed_cycles = 0
        self._dry_done: set[int] = set()
        # items whose outcome the database refused to record (a data error in the monitor's
        # own write): kept here so that the look-back window does not take them up again
        self._settled_off_db: set[int] = set()
        # pipeline: pages whose jobs are still being sent, and what the checkpoint must wait for
        self._inflight: collections.deque[Batch] = collections.deque()
        self._inflight_ids: set[int] = set()
        self._waiting: set[int] = set()       # read, not in flight, no outcome yet
        self._unrecorded: list[Outcome] = []  # outcomes not yet written to the database
        self._cursor: int | None = None       # continue paging here; None: from the window
        self._bound: int | None = None        # highest id up to which every unknown was read
        self._halt = threading.Event()        # a transient failure: send nothing more now
        self._db_down = False
        self.lock = None          # InstanceLock, set by the CLI (single instance)
        self._lock_lost = False
        workers = max(1, settings.concurrency)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="sender") if workers > 1 else None

    # ------------------------------------------------------------------ start-up
    def start(self) -> None:
        """Create the monitor's tables (not in DRY_RUN) and load or initialise the checkpoint."""
        if not self.dry_run:
            self.source.ensure_state_tables()
        has_state = not self.dry_run or self.source.state_tables_exist()
        checkpoint = self.source.read_checkpoint() if has_state else None
        if checkpoint is None:
            checkpoint = self._first_checkpoint()
        else:
            log.info("Checkpoint %s: último CodItemSol processado = %d; %s aguardando.",
                     self.settings.monitor_name, checkpoint,
                     count_items(self.source.count_backlog(checkpoint)))
        self.checkpoint = checkpoint
        # items recorded above the checkpoint (it was held back by an unresolved one)
        self.high_water = max(checkpoint, self.source.max_recorded_id() if has_state else 0)
        floor = self.source.read_checkpoint(self.source.floor_name) if has_state else None
        if floor is None:  # first start, or state left by an older monitor without a floor
            floor = checkpoint
            if not self.dry_run:
                self.source.save_checkpoint(floor, self.source.floor_name)
        self.floor = floor

    def _first_checkpoint(self) -> int:
        start_from = self.settings.start_from
        total = self.source.count_backlog(0)
        if start_from is None:
            raise StartError(
                f"Primeira execução (nenhum checkpoint '{self.settings.monitor_name}' em "
                f"_MonitorState) e START_FROM não definido: há {count_items(total)} de apoio no banco. "
                "Defina START_FROM=latest para enviar só o que entrar daqui em diante, "
                "START_FROM=0 para enviar todo o histórico, ou START_FROM=<CodItemSol>.")
        checkpoint = self.source.max_item_id() if start_from == "latest" else int(start_from)
        waiting = self.source.count_backlog(checkpoint)
        log.info("Primeira execução: START_FROM=%s, começando após CodItemSol %d; "
                 "%s aguardando envio (%d anteriores ignorados).",
                 start_from, checkpoint, count_items(waiting), total - waiting)
        if not self.dry_run:
            self.source.save_checkpoint(checkpoint)
        return checkpoint

    def close(self) -> None:
        if self._pool:
            self._pool.shutdown(wait=True)

    # ------------------------------------------------------------------ one step
    def window_low(self) -> int:
        if self.dry_run:  # nothing is recorded, so the look-back window would print again
            return self.checkpoint
        return max(self.floor, self.checkpoint - self.settings.lookback_items)

    MAX_PAGES_IN_FLIGHT = 2

    def step(self) -> CycleResult:
        """One unit of work: collect finished sends, read and dispatch one page, record
        outcomes and move the checkpoint. While catching up (full pages) the next page is
        read while the previous one is still being sent; otherwise the step waits for its
        sends, so one step delivers what was ready. `result.more`: more work now."""
        result = CycleResult()
        if self.checkpoint is None:
            self.start()
        self._harvest(result, wait="oldest" if len(self._inflight) >= self.MAX_PAGES_IN_FLIGHT else "none")
        if self._unrecorded:
            self._advance()  # recorded before reading, so the read does not see them as "sending"
        page, catalog_down = None, False
        can_read = (len(self._inflight) < self.MAX_PAGES_IN_FLIGHT and not self.shutdown.is_set()
                    and not result.transient and self.gate.remaining() <= 0 and self._lock_ok())
        if can_read:
            self._halt.clear()
            page, catalog_down = self._read_and_dispatch(result)
        catching_up = page is not None and page.full and result.ready > 0
        if not catching_up or self._halt.is_set() or catalog_down:
            self._harvest(result, wait="all")
        if catalog_down or result.transient:
            retry_after = max((j.delivery.retry_after or 0.0 for j in result.settled if j.delivery),
                              default=0.0)
            self._pause_after_failure(catalog_down, retry_after)
            self._cursor = None  # after the pause, start again from the window
        elif result.sent:
            self._failed_cycles = 0
        self._advance()
        result.more = bool(self._inflight) or (catching_up and not (catalog_down or result.transient))
        self.last_cycle_at = time.time()
        self.status.cycle_done(bool(result.ready or result.held or result.more), self.gate.remaining())
        return result

    def finish(self) -> None:
        """Wait for the sends in flight and record their outcomes (graceful stop)."""
        result = CycleResult()
        self._harvest(result, wait="all")
        self._advance()

    def _read_and_dispatch(self, result: CycleResult):
        from_window = self._cursor is None
        after = self.window_low() if from_window else self._cursor
        page = self.source.read_page(after, self.settings.batch_size, with_state=not self.dry_run)
        if not from_window and any(r.pending_key and r.item_id not in self._inflight_ids
                                   for r in page.rows):
            # a send left pending must go out whole, under its key: a read from the cursor may
            # see only the part of its group above the cursor; the window read has all of it
            from_window, after = True, self.window_low()
            page = self.source.read_page(after, self.settings.batch_size, with_state=True)
        rows = [r for r in page.rows if r.item_id not in self._inflight_ids
                and r.item_id not in self._dry_done and r.item_id not in self._settled_off_db]
        now = self.clock()
        ready, held = [], []
        for group in group_rows(rows):
            (ready if group.pending_key or self._quiet(group, now) else held).append(group)
        if from_window and not page.full:  # a complete view: forget timers of what is gone
            live = {g.ident for g in held}
            self._first_seen = {c: v for c, v in self._first_seen.items() if c in live}
        result.ready, result.held = len(ready), len(held)
        jobs, deferred = self._build_jobs(ready)
        if not self.dry_run:
            self._mark_sending([j for j in jobs if not j.recovered])

        # Only now, with the "sending" records written, does the page count as read: if the
        # database failed above, nothing here moved and the same page is read again.
        if from_window and not page.full:
            self._waiting = set()    # every unknown item above the window is in `rows`
        else:
            self._waiting.difference_update(r.item_id for r in rows)
        self._waiting.update(i for g in held for i in g.item_ids)
        self._waiting.update(deferred)
        if page.full:
            self._bound = page.upper
            # the rows above `upper` (the rest of the solicitations the limit cut) count too:
            # the next read, from the cursor, covers everything between
            self.high_water = max([self.high_water, page.upper] + [r.item_id for r in page.rows])
            self._cursor = page.upper
        else:
            self.high_water = max([self.high_water, self.checkpoint] + [r.item_id for r in page.rows])
            self._bound = self.high_water
            self._cursor = None
        self._dispatch(jobs, result)
        return page, bool(deferred)

    def _lock_ok(self) -> bool:
        if self.lock is None:
            return True
        if self.lock.verify():
            if self._lock_lost:
                log.info("Bloqueio de instância retomado; envio continua.")
            self._lock_lost = False
            return True
        if not self._lock_lost:
            log.error("Bloqueio de instância perdido para outro monitor '%s': envio suspenso "
                      "até retomá-lo.", self.settings.monitor_name)
        self._lock_lost = True
        return False

    def _quiet(self, group: Group, now: float) -> bool:
        if self.settings.debounce_seconds <= 0:
            return True
        signature = (max(group.item_ids), len(group.rows))
        seen = self._first_seen.get(group.ident)
        if seen is None or seen[0] != signature:
            self._first_seen[group.ident] = (signature, now)
            return False
        return now - seen[1] >= self.settings.debounce_seconds

    # ------------------------------------------------------------------ building
    def _build_jobs(self, groups: list[Group]) -> tuple[list[Job], list[int]]:
        """Jobs for the ready groups, and the item ids deferred because the catalog is down."""
        jobs: list[Job] = []
        for index, group in enumerate(groups):
            try:
                jobs.extend(self._build(group))
            except CatalogUnavailable as err:
                log.warning("Catálogo /tests indisponível (%s): envio adiado.", err)
                return jobs, [i for rest in groups[index:] for i in rest.item_ids]
            except Exception as err:  # a bug in one group's handling costs that group only
                log.exception("Erro inesperado ao preparar a solicitação %s", group.ident)
                event = make_event(group.cod, None, None, [r.item for r in group.rows])
                key = group.pending_key or idempotency_key(group.cod, group.item_ids)
                jobs.append(self._failure_job(group.cod, key, group.item_ids, event,
                                              f"erro inesperado ao preparar o pedido: {err!r}", group))
        # solicitations that already failed transiently go last, so one bad order cannot
        # keep the others waiting
        jobs.sort(key=lambda j: (self._attempts.get(j.key, 0) > 0, min(j.item_ids)))
        return jobs, []

    def _build(self, group: Group) -> list[Job]:
        event = group.event()
        cod = group.cod
        if group.pending_key and self.failures.has_key(group.pending_key):
            job = Job(cod, group.pending_key, group.item_ids, event, recovered=True)
            job.outcome = ItemStatus.FAILED  # its failure file was written before a crash
            return [job]
        if group.unwritten is not None:  # refused by the API before a restart: never re-POST
            row = group.unwritten
            job = self._failure_job(cod, group.pending_key, group.item_ids, event,
                                    row.pending_reason or "falha permanente registrada antes de "
                                    "uma reinicialização", group)
            job.failure.http_status = row.pending_http
            return [job]
        if group.problem:  # kept in the event: a replay must not send the copy picked here
            key = group.pending_key or idempotency_key(cod, group.item_ids)
            return [self._failure_job(cod, key, group.item_ids, dict(event, problema=group.problem),
                                      group.problem, group)]
        try:
            built = build_payload(event, self.settings, self.catalog)
        except TransformError as err:
            key = group.pending_key or idempotency_key(cod, group.item_ids)
            return [self._failure_job(cod, key, group.item_ids, event, str(err), group)]
        except CatalogUnavailable:
            raise
        except Exception as err:  # an unforeseen legacy value: record it, never stop the loop
            log.exception("Erro inesperado ao montar o pedido da solicitação %s", cod)
            key = group.pending_key or idempotency_key(cod, group.item_ids)
            return [self._failure_job(cod, key, group.item_ids, event,
                                      f"erro inesperado ao montar o pedido: {err!r}", group)]
        jobs = []
        if built.payload is not None:
            key = group.pending_key or idempotency_key(cod, built.item_ids)
            sent = set(built.item_ids)
            sent_event = dict(event, items=[i for i in event["items"] if int(i["CodItemSol"]) in sent])
            jobs.append(Job(cod, key, built.item_ids, sent_event, payload=built.payload,
                            recovered=group.pending_key is not None))
        if built.rejected:
            ids = [int(item["CodItemSol"]) for item, _ in built.rejected]
            reason = "; ".join(f"item {item['CodItemSol']}: {why}" for item, why in built.rejected)
            key = (group.pending_key if built.payload is None and group.pending_key
                   else idempotency_key(cod, ids))
            jobs.append(self._failure_job(cod, key, ids, dict(event, items=[i for i, _ in built.rejected]),
                                          reason, group))
        return jobs

    @staticmethod
    def _failure_job(cod, key, item_ids, event, reason, group: Group) -> Job:
        # rows of a recovered group already have their "sending" record
        job = Job(cod, key, list(item_ids), event, recovered=group.pending_key is not None)
        job.failure = FailureRecord(reason=reason, key=key, cod=cod, item_ids=list(item_ids),
                                    event=event)
        return job

    # ------------------------------------------------------------------ recording "sending"
    def _mark_sending(self, jobs: list[Job]) -> None:
        """Record "sending" for the page's new jobs in one statement. When the database
        refuses it for its data (not an outage), the jobs are written one by one and only
        those it still refuses become failures; the others go on."""
        try:
            self.source.mark_sending((j.item_ids, j.cod, j.key) for j in jobs)
            return
        except sa.exc.DBAPIError as err:
            if is_outage(err):
                raise
            items = count_items(sum(len(j.item_ids) for j in jobs))
            log.warning("O banco recusou o registro \"enviando\" de %s (%s); registrando "
                        "solicitação por solicitação.", items, _short(err))
        for job in jobs:
            try:
                self.source.mark_sending([(job.item_ids, job.cod, job.key)])
            except sa.exc.DBAPIError as err:
                if is_outage(err):
                    raise
                self._refused_by_db(job, err)

    def _refused_by_db(self, job: Job, err: Exception) -> None:
        """The database refused the monitor's own record of this job: it is not sent, it
        goes to FAILED_DIR, and this process does not take its items up again."""
        self._settled_off_db.update(job.item_ids)
        if self.failures.has_key(job.key):  # the same refusal, already filed (e.g. before a restart)
            job.outcome = ItemStatus.FAILED
            return
        if job.failure is None:
            job.payload = None
            job.failure = FailureRecord(
                reason=f"{DB_REFUSED_REASON} ({_short(err)})", key=job.key, cod=job.cod,
                item_ids=list(job.item_ids), event=job.event)

    # ------------------------------------------------------------------ sending
    def _dispatch(self, jobs: list[Job], result: CycleResult) -> None:
        batch = Batch(jobs)
        for job in jobs:  # failures known before any POST are recorded first
            if job.outcome is None and job.payload is None:
                self._record_failure(job)
            elif job.outcome is None and job.key in self._unwritten:
                job.failure = self._unwritten[job.key]  # failed before; only its file is missing
                self._record_failure(job)
        to_send = [j for j in jobs if j.outcome is None and j.failure is None]
        # tracked before anything is sent: whatever happens below, these items hold the checkpoint
        self._inflight.append(batch)
        self._inflight_ids.update(i for job in jobs for i in job.item_ids)
        if self._pool is None or self.dry_run or len(to_send) < 2:
            for job in to_send:
                self._send(job)
        else:
            batch.futures = [self._pool.submit(self._send, job) for job in to_send]

    def _send(self, job: Job) -> None:
        """Runs in a sender thread: no shared state is touched but the job itself."""
        if self._halt.is_set() or self.shutdown.is_set():
            return  # stays "sending": the next cycle sends it with the same key
        if self.dry_run:
            self.on_dry_run(job.payload, job.key)
            job.outcome = ItemStatus.DELIVERED
            return
        try:
            job.delivery = self.client.deliver(job.payload, job.key)
        except Exception as err:  # a bug or an odd value: a recorded failure, not a lost item
            log.debug("Erro inesperado ao enviar a solicitação %s", job.cod, exc_info=True)
            job.delivery = Delivery(Verdict.PERMANENT, None, 1, f"erro inesperado ao enviar: {err!r}")
        if job.delivery.outcome == Verdict.TRANSIENT:
            self._halt.set()
        elif job.delivery.outcome == Verdict.PERMANENT:
            # written at once, not when the page is settled: after a crash, the re-send of a
            # key the API remembers would get a 409 (SPEC §5.2); the file makes it a failure
            job.failure = self._delivery_failure(job, job.delivery.reason)
            try:
                job.failure_path = self.failures.write(job.failure)
            except FailureWriteError:
                pass  # the main thread retries and reports it

    def _harvest(self, result: CycleResult, wait: str) -> None:
        """Settle finished pages, oldest first. wait: "none", "oldest" or "all"."""
        first = True
        while self._inflight:
            batch = self._inflight[0]
            if wait == "all" or (wait == "oldest" and first):
                for future in batch.futures:
                    future.result()
            elif not batch.done():
                break
            first = False
            self._inflight.popleft()
            for job in batch.jobs:
                if job.delivery is not None:
                    result.sent += 1
                    self._settle(job, result)
                result.settled.append(job)
                self.status.settled(job.cod, len(job.item_ids), job.key, job.outcome, job.delivery)
                self._inflight_ids.difference_update(job.item_ids)
                if job.outcome is None:
                    self._waiting.update(job.item_ids)
                    self._cursor = None  # re-read from the window, where its group is whole
                elif self.dry_run:
                    self._dry_done.update(job.item_ids)
                else:
                    self._unrecorded.append(Outcome(job.item_ids, job.cod, job.key, job.outcome))

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
            if delivery.outcome == Verdict.DUPLICATE:
                self.stats.duplicates += 1
            log.info("Solicitação %s entregue: %s, HTTP %s, chave %s, %.0f ms%s.",
                     job.cod, count_items(len(job.item_ids)), delivery.status, job.key,
                     delivery.duration * 1000,
                     " (já recebida antes: 409)" if delivery.outcome == Verdict.DUPLICATE else "")
            if delivery.uncertain:
                log.warning("Solicitação %s: a API respondeu 409 depois de uma tentativa sem "
                            "resposta (chave %s). Quase sempre a primeira tentativa foi salva; se "
                            "ela tiver falhado no corpo, nada foi salvo. Confira no portal da "
                            "Bemsoft os exames %s do lote sol-%s.", job.cod, job.key,
                            ", ".join(f"item-{i}" for i in job.item_ids), job.cod)
            return
        if delivery.outcome == Verdict.PERMANENT:
            self._record_failure(job)
            return
        # transient: keep the "sending" record (same key next time), unless it keeps failing
        # while other solicitations go through
        result.transient += 1
        self.stats.transient += 1
        attempts = self._attempts[job.key] = self._attempts.get(job.key, 0) + 1
        first = self._first_failure.setdefault(job.key, now)
        api_works = self._last_success is not None and self._last_success > first
        if attempts >= self.settings.max_attempts and api_works:
            job.failure = self._delivery_failure(
                job, f"falhou {attempts} vezes seguidas enquanto outras solicitações eram "
                     f"entregues; último erro: {delivery.reason}")
            self._record_failure(job)
            return
        # an answer that is not the API's (portal) is logged once per outage by the client
        log.log(logging.DEBUG if delivery.unexpected else logging.WARNING,
                "Solicitação %s não entregue (%s, HTTP %s, chave %s, tentativa %d); "
                    "será reenviada com a mesma chave.", job.cod, delivery.reason,
                    delivery.status, job.key, attempts)

    def _delivery_failure(self, job: Job, reason: str) -> FailureRecord:
        record = FailureRecord(reason=reason, key=job.key, cod=job.cod, item_ids=job.item_ids,
                               event=job.event, http_status=job.delivery.status,
                               attempts=self._attempts.get(job.key, 0) + job.delivery.attempts,
                               response=job.delivery.body)
        return record

    def _record_failure(self, job: Job) -> None:
        record = job.failure
        if self.dry_run:
            log.warning("[DRY_RUN] Solicitação %s falharia: %s", job.cod, record.reason)
            job.outcome = ItemStatus.FAILED
            return
        try:
            path = job.failure_path or self.failures.write(record)
        except FailureWriteError as err:
            # logged once, then every few minutes: a disk full for hours must not flood the log
            now = self.clock()
            if job.key not in self._unwritten or now - self._unwritten_logged.get(job.key, 0) >= 300:
                self._unwritten_logged[job.key] = now
                log.error("Solicitação %s falhou (%s), mas %s. O checkpoint fica parado até "
                          "conseguir gravar; nova tentativa a cada ciclo.", job.cod, record.reason, err)
            if job.delivery is not None and job.key not in self._unwritten and not self.dry_run:
                try:  # after a restart, the file is written instead of POSTing the key again
                    self.source.mark_unwritten(job.item_ids, record.reason, record.http_status)
                except sa.exc.DBAPIError as db_err:
                    log.warning("Não foi possível registrar a falha no banco (%s).", _short(db_err))
            self._unwritten[job.key] = record
            return
        if self._unwritten.pop(job.key, None) is not None:
            self._unwritten_logged.pop(job.key, None)
            log.info("Falha da solicitação %s finalmente gravada.", job.cod)
        self._forget(job.key)
        job.outcome = ItemStatus.FAILED
        self.stats.failed += 1
        self.stats.failed_items += len(job.item_ids)
        self.stats.reasons[record.reason.split(":")[0][:80]] += 1
        took = f", {job.delivery.duration * 1000:.0f} ms" if job.delivery else ""
        log.error("Solicitação %s falhou: %s, HTTP %s, chave %s%s: %s. Arquivo: %s",
                  job.cod or "(sem CodSolicitacao)", count_items(len(job.item_ids)),
                  record.http_status, job.key, took, record.reason, path)

    def _forget(self, key: str) -> None:
        self._attempts.pop(key, None)
        self._first_failure.pop(key, None)

    def _pause_after_failure(self, catalog_down: bool, retry_after: float = 0.0) -> None:
        """Capped exponential pause for every sender; a server's Retry-After wins."""
        self._failed_cycles += 1
        delay = max(self.settings.backoff, 1.0) * 2 ** (self._failed_cycles - 1)
        delay = min(self.settings.max_backoff, max(delay, retry_after))
        self.gate.pause(delay)
        self.status.api_paused(delay)
        what = "catálogo /tests indisponível" if catalog_down else "API com falhas transitórias"
        log.warning("%s: envio pausado por %.0f s (ciclo %d com falha); nada foi descartado.",
                    what, delay, self._failed_cycles)

    # ------------------------------------------------------------------ checkpoint
    def _advance(self) -> None:
        """The checkpoint moves over the contiguous prefix of items with a recorded outcome;
        it moves back below a late-committed item that is still unresolved. Outcomes and
        checkpoint are written in one short transaction; if it fails, both are kept in
        memory and written by a later step (the outcomes written in the same transaction
        as the checkpoint need not hold it back)."""
        target = self.checkpoint if self._bound is None else self._bound
        pending = [min(self._waiting)] if self._waiting else []
        pending += [min(self._inflight_ids)] if self._inflight_ids else []
        if pending:
            target = min(target, min(pending) - 1)
        if target < self.checkpoint:
            log.info("Checkpoint recua de %d para %d: item %d (commit tardio ou pendente) ainda "
                     "sem resultado.", self.checkpoint, target, target + 1)
        changed = target != self.checkpoint
        if self.dry_run:
            self.checkpoint = target
            self._dry_done = {i for i in self._dry_done if i > target}
            return
        low = self.window_low()
        self._settled_off_db = {i for i in self._settled_off_db if i > low}
        if self._unrecorded or changed:
            outcomes, self._unrecorded = self._unrecorded, []
            # records below the prune line are deleted, so the look-back window must never
            # reach below it again: the floor follows it
            prune = target - 2 * self.settings.lookback_items if changed else None
            floor = prune if prune is not None and prune > self.floor else None
            try:
                self._record(outcomes, target if changed else None, floor)
            except Exception:
                self._unrecorded = outcomes + self._unrecorded
                raise
            if floor is not None:
                self.floor = floor
        self.checkpoint = target
        self.status.progress(target, len(self._waiting) + len(self._inflight_ids), self._cursor is not None)

    def _record(self, outcomes: list[Outcome], checkpoint: int | None, floor: int | None) -> None:
        """Outcomes and checkpoint in one transaction. When the database refuses it for its
        data (not an outage), the outcomes are written one by one (writing one twice is
        harmless) and those it still refuses are logged and kept in memory, so that the
        others and the checkpoint go on."""
        try:
            self.source.record(outcomes, checkpoint, prune_below=floor, floor=floor)
            return
        except sa.exc.DBAPIError as err:
            if is_outage(err) or not outcomes:
                raise
            log.warning("O banco recusou a gravação dos resultados (%s); gravando solicitação "
                        "por solicitação.", _short(err))
        for outcome in outcomes:
            try:
                self.source.record([outcome], None)
            except sa.exc.DBAPIError as err:
                if is_outage(err):
                    raise
                self._settled_off_db.update(outcome.item_ids)
                log.error("Solicitação %s: o banco recusou gravar o resultado '%s' em _MonitorItems "
                          "(%s; não é falta de conexão). Confira restrições ou gatilhos criados "
                          "nessa tabela. Este processo não a reenvia; após reiniciar, um reenvio "
                          "usa a mesma chave %s e não duplica nada.",
                          outcome.cod, outcome.status, _short(err), outcome.key)
        self.source.record([], checkpoint, prune_below=floor, floor=floor)

    # ------------------------------------------------------------------ the loop
    def run(self, mode: str = "loop") -> int:
        """mode: "loop" (until shutdown), "once" (what is eligible now), "drain" (until
        nothing is left). Returns the process exit code."""
        backoff = 1.0
        while not self.shutdown.is_set():
            try:
                result = self.step()
            except sa.exc.DBAPIError as err:
                if mode == "once":
                    raise
                if is_query_timeout(err):  # blocked behind a LIS transaction: not an outage
                    log.warning("%s", describe_query_timeout(self.settings))
                    self.gate.sleep(self.settings.poll_seconds)
                    continue
                if not is_outage(err):  # the database answered: a statement it refused
                    log.error("O banco de dados recusou um comando do monitor (%s); não é falta "
                              "de conexão. Nova tentativa em %.0f s.", _short(err), backoff)
                    self.gate.sleep(backoff)
                    backoff = min(backoff * 2, 60.0)
                    continue
                if not self._db_down:
                    log.error("Banco de dados indisponível (%s). Tentando reconectar; nada é "
                              "enviado nem perdido enquanto isso.", _short(err))
                    self._db_down = True
                self.status.db_down()
                self.gate.sleep(backoff)
                backoff = min(backoff * 2, DB_RETRY_MAX)
                continue
            except Exception:
                if mode == "once":
                    raise
                # a bug must not stop deliveries for good: what has no recorded outcome stays
                # unknown or "sending" and the next window read takes it up again
                log.exception("Erro inesperado no ciclo; nova tentativa em %.0f s.", backoff)
                self.gate.sleep(backoff)
                backoff = min(backoff * 2, 60.0)
                continue
            if self._db_down:
                log.info("Conexão com o banco de dados restabelecida.")
                self._db_down = False
            backoff = 1.0
            if result.more or (result.sent and mode != "once"):
                continue  # drain first: sleep only after a cycle that found nothing to send
            idle = not result.ready and not result.held and self.gate.remaining() <= 0
            if mode == "once" or (mode == "drain" and idle):
                break
            wait = self.gate.remaining() or self.settings.poll_seconds
            if result.held:
                wait = min(wait, max(0.2, self.settings.debounce_seconds / 4))
            self.gate.sleep(wait)
        if self._inflight or self._unrecorded:
            try:
                self.finish()  # the sends in flight complete and are recorded before exit
            except Exception as err:
                log.error("Não foi possível registrar os últimos resultados (%s); serão "
                          "reenviados com a mesma chave na próxima execução.", _short(err))
        return 0


def count_items(n: int) -> str:
    return "1 item" if n == 1 else f"{n} itens"


def group_rows(rows: list[ItemRow]) -> list[Group]:
    """Rows -> groups by (solicitation, pending key), ordered by their lowest item id. An
    item without CodSolicitacao is a group of its own: nothing says it belongs with others."""
    groups: dict[tuple, Group] = {}
    for row in rows:
        key = (row.cod, row.pending_key, None if row.cod else row.item_id)
        group = groups.get(key)
        if group is None:
            groups[key] = Group(row.cod, [row], row.pending_key)
        else:
            group.rows.append(row)
    return sorted(groups.values(), key=lambda g: min(g.item_ids))


def _short(err: Exception) -> str:
    text = str(getattr(err, "orig", None) or err).strip().splitlines()
    return text[0][:300] if text else err.__class__.__name__
