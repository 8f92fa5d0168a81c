"""The monitor's own records in the database: its state at start-up (checkpoint, floor,
high water) -> a Ledger, "sending" before a POST, outcomes and checkpoint after. A refusal
for the data (not an outage) costs only the jobs it concerns."""
from __future__ import annotations

import logging

import sqlalchemy as sa

from . import migrations
from .failures import FailureRecord, FailureStore
from .history import History
from .ledger import Ledger, Write
from .outcomes import count_items, short_error
from .planner import Job
from .schema import ItemStatus
from .source import LegacySource, is_outage

log = logging.getLogger(__name__)

DB_REFUSED_REASON = ("o banco recusou o registro do monitor em _MonitorItems para estes itens "
                     "(não é falta de conexão): confira no LIS os códigos desta solicitação e "
                     "as restrições ou gatilhos criados em _MonitorItems; depois reenvie com "
                     "retry_failed.py")


class StartError(Exception):
    """The monitor cannot start (e.g. first start without START_FROM); str() is pt-BR."""


class Records:
    def __init__(self, settings, source: LegacySource, failures: FailureStore,
                 history: History | None = None):
        self.settings = settings
        self.source = source
        self.failures = failures
        self.dry_run = settings.dry_run
        self.history = history or History(settings)

    def load(self) -> Ledger:
        """Create the monitor's tables (not in DRY_RUN) and load or initialise the checkpoint."""
        source = self.source
        try:
            if not self.dry_run:
                migrations.upgrade(source.engine)
            else:  # DRY_RUN writes nothing, but never reads tables newer than it knows either
                with source.engine.connect() as conn:
                    migrations.check(conn)
        except migrations.SchemaTooNew as err:
            raise StartError(str(err)) from None
        has_state = not self.dry_run or source.state_tables_exist()
        checkpoint = source.read_checkpoint() if has_state else None
        if checkpoint is None:
            checkpoint = self._first_checkpoint()
        else:
            log.info("Checkpoint %s: último CodItemSol processado = %d; %s aguardando.",
                     self.settings.monitor_name, checkpoint, count_items(source.count_backlog(checkpoint)))
        # items recorded above the checkpoint (it was held back by an unresolved one)
        high_water = max(checkpoint, source.max_recorded_id() if has_state else 0)
        floor = source.read_checkpoint(source.floor_name) if has_state else None
        if floor is None:  # first start, or state left by an older monitor without a floor
            floor = checkpoint
            if not self.dry_run:
                source.save_checkpoint(floor, source.floor_name)
        if not self.dry_run:  # a new process: whether the token is refused is not known yet
            self.note_token_refused(None)
        return Ledger(checkpoint, floor, high_water, lookback=self.settings.lookback_items,
                      dry_run=self.dry_run)

    def note_token_refused(self, status: int | None) -> None:
        """Kept in _MonitorState while the API refuses the token, for `--status` (another
        process). Informational: a database error here is logged, never raised."""
        if self.dry_run:
            return
        try:
            self.source.note(self.source.token_note_name, status)
        except sa.exc.DBAPIError as err:
            log.debug("Não foi possível registrar o estado do token (%s).", short_error(err))

    def _first_checkpoint(self) -> int:
        start_from, total = self.settings.start_from, self.source.count_backlog(0)
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

    def mark_sending(self, jobs: list[Job], ledger: Ledger) -> None:
        """Record "sending" for the page's new jobs in one statement. When the database
        refuses it for its data (not an outage), the jobs are written one by one and only
        those it still refuses become failures; the others go on."""
        history = self.history
        queued = history.take()
        try:
            self.source.mark_sending([(j.item_ids, j.cod, j.key) for j in jobs],
                                     queued + history.sending(jobs))
            return
        except sa.exc.DBAPIError as err:
            history.give_back(queued)
            if is_outage(err):
                raise
            items = count_items(sum(len(j.item_ids) for j in jobs))
            log.warning("O banco recusou o registro \"enviando\" de %s (%s); registrando "
                        "solicitação por solicitação.", items, short_error(err))
        for job in jobs:
            try:
                self._with_history(self.source.mark_sending, [(job.item_ids, job.cod, job.key)],
                                   history=history.sending([job]))
            except sa.exc.DBAPIError as err:
                if is_outage(err):
                    raise
                job.db_refused = True
                self._refused_by_db(job, err, ledger)

    def _with_history(self, write, *args, history: list[dict], **kwargs) -> None:
        """One write with its history rows; if the database refuses it for its data, once
        more without them (the history must never cost a record): said in the log."""
        if not history:
            write(*args, **kwargs)
            return
        try:
            write(*args, history=history, **kwargs)
        except sa.exc.DBAPIError as err:
            if is_outage(err):
                raise
            write(*args, **kwargs)
            log.warning("O banco recusou %d linha(s) do histórico em _MonitorHistory (%s); o "
                        "registro em _MonitorItems foi gravado sem elas.", len(history),
                        short_error(err))

    def _refused_by_db(self, job: Job, err: Exception, ledger: Ledger) -> None:
        """The database refused the monitor's own record of this job: it is not sent, it
        goes to FAILED_DIR, and this process does not take its items up again."""
        ledger.off_db.update(job.item_ids)
        filed = self.failures.key_file(job.key)
        if filed is not None:  # the same refusal, already filed (e.g. before a restart)
            job.outcome = ItemStatus.FAILED
            job.failure_path = filed
            return
        if job.failure is None:
            job.payload = None
            job.failure = FailureRecord(
                reason=f"{DB_REFUSED_REASON} ({short_error(err)})", key=job.key, cod=job.cod,
                item_ids=list(job.item_ids), event=job.event)

    def flush_history(self) -> None:
        """At exit: the ATTEMPT rows still queued (no write came after them), best effort."""
        queued = self.history.take()
        if not queued:
            return
        try:
            self.source.record([], None, history=queued)
        except sa.exc.DBAPIError as err:
            log.debug("Tentativas não gravadas no histórico (%s).", short_error(err))

    def write(self, write: Write, ledger: Ledger) -> None:
        """Outcomes and checkpoint in one transaction. When the database refuses it for its
        data (not an outage), the outcomes are written one by one (writing one twice is
        harmless) and those it still refuses are logged and kept in memory, so that the
        others and the checkpoint go on."""
        history = self.history
        queued = history.take()
        try:
            self.source.record(write.outcomes, write.checkpoint, prune_below=write.floor,
                               floor=write.floor, history=queued + history.outcome_rows(write.outcomes))
            return
        except sa.exc.DBAPIError as err:
            history.give_back(queued)
            if is_outage(err) or not (write.outcomes or queued):
                raise
            log.warning("O banco recusou a gravação dos resultados (%s); gravando solicitação "
                        "por solicitação.", short_error(err))
        for outcome in write.outcomes:
            try:
                self._with_history(self.source.record, [outcome], None,
                                   history=history.outcome_rows([outcome]))
            except sa.exc.DBAPIError as err:
                if is_outage(err):
                    raise
                ledger.off_db.update(outcome.item_ids)
                log.error("Solicitação %s: o banco recusou gravar o resultado '%s' em _MonitorItems "
                          "(%s; não é falta de conexão). Confira restrições ou gatilhos criados "
                          "nessa tabela. Este processo não a reenvia; após reiniciar, um reenvio "
                          "usa a mesma chave %s e não duplica nada.",
                          outcome.cod, outcome.status, short_error(err), outcome.key)
        queued = history.take()
        try:
            self._with_history(self.source.record, [], write.checkpoint, prune_below=write.floor,
                               floor=write.floor, history=queued)
        except sa.exc.DBAPIError:
            history.give_back(queued)
            raise
