"""The planner: rows of a page -> groups (one solicitation, or one item without
CodSolicitacao) -> the quiet ones -> jobs, each with its payload or the failure that keeps it
from being sent. Every Idempotency-Key is chosen by `choose_key`, the replay's too."""
from __future__ import annotations

import base64
import logging
import time
from dataclasses import dataclass
from typing import Callable

from .catalog import CatalogUnavailable
from .client import Delivery
from .failures import FailureRecord, FailureStore
from .payload import TransformError, build_payload, idempotency_key, make_event
from .schema import ItemStatus
from .source import ItemRow

log = logging.getLogger(__name__)


def choose_key(cod, item_ids, *, pending: str | None = None, refused: bool = False,
               now: float | None = None) -> str:
    """The Idempotency-Key of a send: a key already recorded ("sending" in _MonitorItems, or
    the one in a failure file) is kept, so the API dedupes a repeat; otherwise the content
    key of the solicitation and its items. `refused`: the API answered and refused the last
    send under `pending` (a 2xx with an error body, a permanent 4xx). It remembers a key even
    when that send saved nothing (SPEC §5.2), so a new key is needed; after a timeout, a 5xx
    or any other transient answer the first attempt may have been saved, and only the same
    key lets the API dedupe it."""
    base = idempotency_key(cod, item_ids)
    if refused:
        millis = int((time.time() if now is None else now) * 1000)
        stamp = base64.b32encode(millis.to_bytes(6, "big")).decode().rstrip("=").lower()
        return f"{base}-r{stamp}"
    return pending or base


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
    recovered: bool = False              # its items already have a "sending" record
    delivery: Delivery | None = None
    outcome: str | None = None           # ItemStatus.DELIVERED / FAILED once settled
    failure_path: object = None          # the failure file, once written
    db_refused: bool = False             # the database refused its "sending" record


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


def failure_job(group: Group, item_ids, event: dict, reason: str, key: str | None = None) -> Job:
    """A job that is not sent: its failure goes to FAILED_DIR."""
    key = key or choose_key(group.cod, item_ids, pending=group.pending_key)
    job = Job(group.cod, key, list(item_ids), event, recovered=group.pending_key is not None)
    job.failure = FailureRecord(reason=reason, key=key, cod=group.cod, item_ids=list(item_ids),
                                event=event)
    return job


class Planner:
    def __init__(self, settings, catalog, failures: FailureStore):
        self.settings = settings
        self.catalog = catalog
        self.failures = failures
        self._first_seen: dict[str, tuple[tuple, float]] = {}
        self.catalog_error: CatalogUnavailable | None = None   # why the last jobs() deferred

    # ------------------------------------------------------------------ debounce
    def split(self, rows: list[ItemRow], now: float, complete: bool) -> tuple[list[Group], list[Group]]:
        """(ready, held): a group is ready when its send is pending or it has been quiet
        (same rows) for DEBOUNCE_SECONDS. `complete`: the page saw every unknown item, so the
        timers of groups no longer there are forgotten."""
        ready, held = [], []
        for group in group_rows(rows):
            (ready if group.pending_key or self._quiet(group, now) else held).append(group)
        if complete:
            live = {g.ident for g in held}
            self._first_seen = {c: v for c, v in self._first_seen.items() if c in live}
        return ready, held

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
    def jobs(self, groups: list[Group], retried: Callable[[str], bool]) -> tuple[list[Job], list[int]]:
        """Jobs for the ready groups, and the item ids deferred because the catalog is down.
        `retried(key)`: it already failed transiently; those go last, so one bad order cannot
        keep the others waiting."""
        jobs: list[Job] = []
        self.catalog_error = None
        for index, group in enumerate(groups):
            try:
                jobs.extend(self.build(group))
            except CatalogUnavailable as err:
                self.catalog_error = err
                log.warning("Catálogo /tests indisponível (%s): envio adiado.", err)
                return jobs, [i for rest in groups[index:] for i in rest.item_ids]
            except Exception as err:  # a bug in one group's handling costs that group only
                log.exception("Erro inesperado ao preparar a solicitação %s", group.ident)
                event = make_event(group.cod, None, None, [r.item for r in group.rows])
                jobs.append(failure_job(group, group.item_ids, event,
                                        f"erro inesperado ao preparar o pedido: {err!r}"))
        jobs.sort(key=lambda j: (retried(j.key), min(j.item_ids)))
        return jobs, []

    def build(self, group: Group) -> list[Job]:
        event = group.event()
        cod, ids = group.cod, group.item_ids
        if group.pending_key and self.failures.has_key(group.pending_key):
            job = Job(cod, group.pending_key, ids, event, recovered=True)
            job.outcome = ItemStatus.FAILED  # its failure file was written before a crash
            job.failure_path = self.failures.key_file(group.pending_key)
            return [job]
        if group.unwritten is not None:  # refused by the API before a restart: never re-POST
            row = group.unwritten
            job = failure_job(group, ids, event, row.pending_reason or "falha permanente "
                              "registrada antes de uma reinicialização")
            job.failure.http_status = row.pending_http
            job.failure.refused = True  # only refusals are kept this way (outcomes)
            return [job]
        if group.problem:  # kept in the event: a replay must not send the copy picked here
            return [failure_job(group, ids, dict(event, problema=group.problem), group.problem)]
        try:
            built = build_payload(event, self.settings, self.catalog)
        except TransformError as err:
            return [failure_job(group, ids, event, str(err))]
        except CatalogUnavailable:
            raise
        except Exception as err:  # an unforeseen legacy value: record it, never stop the loop
            log.exception("Erro inesperado ao montar o pedido da solicitação %s", cod)
            return [failure_job(group, ids, event, f"erro inesperado ao montar o pedido: {err!r}")]
        jobs = []
        if built.payload is not None:
            sent = set(built.item_ids)
            sent_event = dict(event, items=[i for i in event["items"] if int(i["CodItemSol"]) in sent])
            jobs.append(Job(cod, choose_key(cod, built.item_ids, pending=group.pending_key),
                            built.item_ids, sent_event, payload=built.payload,
                            recovered=group.pending_key is not None))
        if built.rejected:
            rejected = [int(item["CodItemSol"]) for item, _ in built.rejected]
            reason = "; ".join(f"item {item['CodItemSol']}: {why}" for item, why in built.rejected)
            # the pending key stays with what is sent; rejected items alone keep it
            key = choose_key(cod, rejected, pending=None if built.payload is not None else group.pending_key)
            jobs.append(failure_job(group, rejected, dict(event, items=[i for i, _ in built.rejected]),
                                    reason, key))
        return jobs
