"""The ledger: pure, database-free bookkeeping of the loop. Which items were read and wait
(held by the debounce, deferred, or sent back), which are in flight, which outcomes are
known but not yet written, where the next read starts (window or cursor) and how far the
checkpoint may move: over the contiguous prefix of items with a recorded outcome, never past
an item read without one (it moves back below a late-committed item still unresolved)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .source import Outcome

log = logging.getLogger(__name__)


@dataclass
class Write:
    """What one advance writes in one transaction; checkpoint/floor None: unchanged."""
    target: int
    outcomes: list[Outcome] = field(default_factory=list)
    checkpoint: int | None = None
    floor: int | None = None

    @property
    def empty(self) -> bool:
        return not self.outcomes and self.checkpoint is None


class Ledger:
    def __init__(self, checkpoint: int, floor: int, high_water: int, *, lookback: int,
                 dry_run: bool = False):
        self.checkpoint = checkpoint
        self.floor = floor            # the look-back window never reaches below it
        self.high_water = high_water  # the highest item id read or recorded
        self.lookback = lookback
        self.dry_run = dry_run
        self.waiting: set[int] = set()      # read, not in flight, no outcome yet
        self.inflight: set[int] = set()     # handed to the senders
        self.unrecorded: list[Outcome] = []  # outcomes not yet written to the database
        self.cursor: int | None = None      # continue paging here; None: from the window
        self.bound: int | None = None       # highest id up to which every unknown was read
        self.dry_done: set[int] = set()     # DRY_RUN: printed, never recorded
        # items whose outcome the database refused to record (a data error in the monitor's
        # own write): kept here so that the look-back window does not take them up again
        self.off_db: set[int] = set()

    # ------------------------------------------------------------------ reading
    def window_low(self) -> int:
        if self.dry_run:  # nothing is recorded, so the look-back window would print again
            return self.checkpoint
        return max(self.floor, self.checkpoint - self.lookback)

    def read_from(self) -> tuple[bool, int]:
        """(from_window, after): where the next page starts."""
        if self.cursor is None:
            return True, self.window_low()
        return False, self.cursor

    def new(self, item_id: int) -> bool:
        """A row of a page still to be taken up (not in flight, not settled in memory)."""
        return item_id not in self.inflight and item_id not in self.dry_done and item_id not in self.off_db

    def page_read(self, read_ids, waiting_ids, *, from_window: bool, full: bool,
                  upper: int | None, page_ids) -> None:
        """A page was taken up (its "sending" records written). `read_ids`: the new rows it
        held; `waiting_ids`: those among them that stay waiting (held, deferred);
        `page_ids`: every row of the page; `upper`: the highest id of a full page."""
        if from_window and not full:
            self.waiting = set()    # every unknown item above the window was in the page
        else:
            self.waiting.difference_update(read_ids)
        self.waiting.update(waiting_ids)
        if full:
            self.bound = upper
            # the rows above `upper` (the rest of the solicitations the limit cut) count too:
            # the next read, from the cursor, covers everything between
            self.high_water = max([self.high_water, upper, *page_ids])
            self.cursor = upper
        else:
            self.high_water = max([self.high_water, self.checkpoint, *page_ids])
            self.bound = self.high_water
            self.cursor = None

    def dispatched(self, item_ids) -> None:
        self.inflight.update(item_ids)

    def settled(self, item_ids, cod: str, key: str, outcome: str | None,
                detail: dict | None = None) -> None:
        """A job came back: with an outcome to record, or without one (not sent: it waits).
        `detail`: the rest of the Outcome (what its history rows say)."""
        self.inflight.difference_update(item_ids)
        if outcome is None:
            self.waiting.update(item_ids)
            self.cursor = None  # re-read from the window, where its group is whole
        elif self.dry_run:
            self.dry_done.update(item_ids)
        else:
            self.unrecorded.append(Outcome(list(item_ids), cod, key, outcome, **(detail or {})))

    @property
    def open_items(self) -> int:
        return len(self.waiting) + len(self.inflight)

    # ------------------------------------------------------------------ the checkpoint
    def target(self) -> int:
        """Where the checkpoint may be: up to what was read, below anything without an outcome."""
        target = self.checkpoint if self.bound is None else self.bound
        pending = [min(s) for s in (self.waiting, self.inflight) if s]
        return min([target] + [p - 1 for p in pending])

    def plan(self) -> Write | None:
        """What to write now (None in DRY_RUN, where the checkpoint only moves in memory).
        Records below the prune line are deleted, so the floor follows it."""
        target = self.target()
        if target < self.checkpoint:
            log.info("Checkpoint recua de %d para %d: item %d (commit tardio ou pendente) ainda "
                     "sem resultado.", self.checkpoint, target, target + 1)
        if self.dry_run:
            self.checkpoint = target
            self.dry_done = {i for i in self.dry_done if i > target}
            return None
        low = self.window_low()
        self.off_db = {i for i in self.off_db if i > low}
        write = Write(target)
        if target != self.checkpoint:
            prune = target - 2 * self.lookback
            write.checkpoint = target
            write.floor = prune if prune > self.floor else None
        write.outcomes, self.unrecorded = self.unrecorded, []
        return write

    def written(self, write: Write) -> None:
        if write.floor is not None:
            self.floor = write.floor
        self.checkpoint = write.target

    def not_written(self, write: Write) -> None:
        """The transaction failed: its outcomes wait for the next advance."""
        self.unrecorded = write.outcomes + self.unrecorded
