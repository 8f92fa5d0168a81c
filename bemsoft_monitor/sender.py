"""The sender: the thread pool that POSTs the jobs of a page, the halt that stops further
sends after a transient failure, and the harvest of finished pages, oldest first."""
from __future__ import annotations

import collections
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .client import Delivery, Verdict
from .failures import FailureRecord, FailureStore, FailureWriteError
from .planner import Job
from .schema import ItemStatus

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """The jobs of one page handed to the senders."""
    jobs: list[Job]
    futures: list = field(default_factory=list)

    def done(self) -> bool:
        return all(f.done() for f in self.futures)


class Sender:
    def __init__(self, client, failures: FailureStore, concurrency: int, *,
                 shutdown: threading.Event, dry_run: bool,
                 on_dry_run: Callable[[dict, str], None],
                 failure_of: Callable[[Job, str], FailureRecord]):
        self.client = client
        self.failures = failures
        self.shutdown = shutdown
        self.dry_run = dry_run
        self.on_dry_run = on_dry_run
        self.failure_of = failure_of
        self.halt = threading.Event()     # a transient failure: send nothing more now
        self.inflight: collections.deque[Batch] = collections.deque()
        workers = max(1, concurrency)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="sender") if workers > 1 else None

    @property
    def pages(self) -> int:
        return len(self.inflight)

    def dispatch(self, jobs: list[Job]) -> None:
        """Send the page's jobs that still need a POST; all of them count as in flight."""
        batch = Batch(jobs)
        to_send = [j for j in jobs if j.outcome is None and j.failure is None]
        self.inflight.append(batch)
        if self._pool is None or self.dry_run or len(to_send) < 2:
            for job in to_send:
                self.send(job)
        else:
            batch.futures = [self._pool.submit(self.send, job) for job in to_send]

    def send(self, job: Job) -> None:
        """Runs in a sender thread: no shared state is touched but the job itself."""
        if self.halt.is_set() or self.shutdown.is_set():
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
        if job.delivery.outcome in (Verdict.TRANSIENT, Verdict.TOKEN_REFUSED):
            self.halt.set()  # the others wait: a refused token is refused for all of them
        elif job.delivery.outcome == Verdict.PERMANENT:
            # written at once, not when the page is settled: after a crash, the re-send of a
            # key the API remembers would get a 409 (SPEC §5.2); the file makes it a failure
            job.failure = self.failure_of(job, job.delivery.reason)
            try:
                job.failure_path = self.failures.write(job.failure)
            except FailureWriteError:
                pass  # the main thread retries and reports it

    def harvest(self, wait: str) -> Iterator[Job]:
        """The jobs of finished pages, oldest page first. wait: "none", "oldest" or "all"."""
        first = True
        while self.inflight:
            batch = self.inflight[0]
            if wait == "all" or (wait == "oldest" and first):
                for future in batch.futures:
                    future.result()
            elif not batch.done():
                break
            first = False
            self.inflight.popleft()
            yield from batch.jobs

    def close(self) -> None:
        if self._pool:
            self._pool.shutdown(wait=True)
