"""The ledger on its own: no database, no API. Unit cases with pinned numbers, then a
hypothesis state machine that interleaves reads (pages, late commits below the checkpoint,
held items), dispatches, settlements with and without an outcome, writes that succeed or
fail, and crashes (a new Ledger from what was persisted): the checkpoint target never passes
an item read without an outcome, and never goes beyond what was read."""
from __future__ import annotations

from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from bemsoft_monitor.ledger import Ledger
from bemsoft_monitor.schema import ItemStatus


def read(ledger: Ledger, page_ids, *, held=(), full=False):
    from_window, _ = ledger.read_from()
    new = [i for i in page_ids if ledger.new(i)]
    ledger.page_read(new, list(held), from_window=from_window, full=full,
                     upper=max(page_ids) if full else None, page_ids=list(page_ids))
    sent = [i for i in new if i not in held]
    ledger.dispatched(sent)
    return sent


def test_the_checkpoint_moves_over_the_recorded_prefix_only():
    ledger = Ledger(10, 10, 10, lookback=100)
    read(ledger, [11, 12, 13])
    assert ledger.target() == 10                       # all three in flight
    ledger.settled([11], "A", "k1", ItemStatus.DELIVERED)
    ledger.settled([13], "C", "k3", ItemStatus.FAILED)
    assert ledger.target() == 11                       # 12 still in flight holds it
    write = ledger.plan()
    assert (write.target, write.checkpoint, [o.item_ids for o in write.outcomes]) == (11, 11, [[11], [13]])
    ledger.written(write)
    ledger.settled([12], "B", "k2", ItemStatus.DELIVERED)
    write = ledger.plan()
    assert (write.target, write.checkpoint) == (13, 13)
    ledger.written(write)
    assert (ledger.checkpoint, ledger.open_items, ledger.plan().empty) == (13, 0, True)


def test_a_late_commit_below_the_checkpoint_moves_it_back_until_recorded():
    ledger = Ledger(50, 0, 50, lookback=20)
    assert ledger.read_from() == (True, 30)            # the look-back window
    read(ledger, [42])                                 # committed late, below the checkpoint
    write = ledger.plan()
    assert (write.target, write.checkpoint) == (41, 41)
    ledger.written(write)
    ledger.settled([42], "L", "k", ItemStatus.DELIVERED)
    write = ledger.plan()
    assert (write.target, write.checkpoint, write.floor) == (50, 50, 10)  # 50 - 2 * 20
    ledger.written(write)
    assert (ledger.checkpoint, ledger.floor, ledger.window_low()) == (50, 10, 30)


def test_a_held_or_unsent_item_waits_and_sends_the_next_read_to_the_window():
    ledger = Ledger(0, 0, 0, lookback=5)
    read(ledger, [1, 2, 3, 4], held=[3, 4], full=True)
    assert (ledger.cursor, ledger.bound, sorted(ledger.waiting)) == (4, 4, [3, 4])
    ledger.settled([1], "A", "k1", None)               # halted before its POST
    assert ledger.cursor is None and ledger.target() == 0
    ledger.settled([2], "B", "k2", ItemStatus.DELIVERED)
    assert ledger.plan().target == 0


def test_a_failed_write_keeps_its_outcomes_first():
    ledger = Ledger(0, 0, 0, lookback=5)
    read(ledger, [1, 2])
    ledger.settled([1], "A", "k1", ItemStatus.DELIVERED)
    write = ledger.plan()
    ledger.not_written(write)
    ledger.settled([2], "B", "k2", ItemStatus.DELIVERED)
    assert [o.item_ids for o in ledger.unrecorded] == [[1], [2]]
    assert ledger.checkpoint == 0 and ledger.plan().checkpoint == 2


def test_dry_run_moves_only_in_memory_and_reads_from_the_checkpoint():
    ledger = Ledger(20, 0, 20, lookback=100, dry_run=True)
    assert ledger.read_from() == (True, 20)
    read(ledger, [21, 22])
    ledger.settled([21, 22], "A", "k", ItemStatus.DELIVERED)
    assert not ledger.new(21)                          # printed once, not again
    assert ledger.plan() is None and ledger.checkpoint == 22 and not ledger.unrecorded
    assert ledger.dry_done == set()                    # behind the checkpoint now


LIMIT = 4
LOOKBACK = 6


class LedgerMachine(RuleBasedStateMachine):
    """A fake LIS (committed ids), the monitor's persisted state, and one Ledger at a time."""

    def __init__(self):
        super().__init__()
        self.committed: set[int] = set()
        self.recorded: set[int] = set()       # outcome written in _MonitorItems
        self.saved = (0, 0)                   # persisted (checkpoint, floor)
        self.next_id = 1
        self.new_life()

    def new_life(self):
        checkpoint, floor = self.saved
        self.ledger = Ledger(checkpoint, floor, max([checkpoint, *self.recorded]), lookback=LOOKBACK)
        self.start = checkpoint
        self.read_ids: set[int] = set()       # read by this ledger
        self.jobs: list[list[int]] = []       # in flight

    @rule(n=st.integers(1, 3))
    def commit(self, n):
        for _ in range(n):
            self.committed.add(self.next_id)
            self.next_id += 1

    @rule(back=st.integers(1, LOOKBACK))
    def late_commit(self, back):
        """A transaction that took its id earlier commits now, below newer items."""
        self.next_id += 1
        late = max(1, self.ledger.checkpoint - back + 1)
        if late not in self.committed and late < self.next_id:
            self.committed.add(late)

    @rule(data=st.data())
    def read_page(self, data):
        from_window, after = self.ledger.read_from()
        visible = sorted(i for i in self.committed if i > after and i not in self.recorded)
        page = visible[:LIMIT]
        full = len(visible) >= LIMIT
        new = [i for i in page if self.ledger.new(i)]
        held = data.draw(st.sets(st.sampled_from(new)) if new else st.just(set()))
        self.ledger.page_read(new, sorted(held), from_window=from_window, full=full,
                              upper=page[-1] if full else None, page_ids=page)
        self.read_ids.update(page)
        sent = [i for i in new if i not in held]
        while sent:  # jobs of one or two items
            size = data.draw(st.integers(1, 2))
            self.jobs.append(sent[:size])
            sent = sent[size:]
        self.ledger.dispatched(i for job in self.jobs for i in job)

    @precondition(lambda self: self.jobs)
    @rule(data=st.data(), with_outcome=st.booleans())
    def settle(self, data, with_outcome):
        job = self.jobs.pop(data.draw(st.integers(0, len(self.jobs) - 1)))
        self.ledger.settled(job, "C", f"k{job[0]}", ItemStatus.DELIVERED if with_outcome else None)

    @rule(ok=st.booleans())
    def advance(self, ok):
        write = self.ledger.plan()
        if write.empty:
            self.ledger.written(write)
            return
        if not ok:
            self.ledger.not_written(write)
            return
        self.recorded.update(i for o in write.outcomes for i in o.item_ids)
        checkpoint, floor = self.saved
        self.saved = (checkpoint if write.checkpoint is None else write.checkpoint,
                      floor if write.floor is None else write.floor)
        self.ledger.written(write)

    @rule()
    def crash(self):
        self.new_life()

    @invariant()
    def target_never_passes_an_item_read_without_an_outcome(self):
        target = self.ledger.target()
        in_memory = {i for o in self.ledger.unrecorded for i in o.item_ids}
        open_ids = self.read_ids - self.recorded - in_memory
        assert all(target < i for i in open_ids), (target, sorted(open_ids))

    @invariant()
    def target_never_exceeds_what_was_read(self):
        assert self.ledger.target() <= max([self.start, *self.read_ids, *self.recorded])

    @invariant()
    def the_window_never_reaches_below_the_floor(self):
        assert self.ledger.window_low() >= self.ledger.floor


LedgerMachine.TestCase.settings = hsettings(max_examples=300, stateful_step_count=40, deadline=None)
test_ledger_interleavings = LedgerMachine.TestCase
