"""The planner's pure parts: the one Idempotency-Key rule (pinned values, not recomputed by
the function under test), grouping and the debounce on an injected clock."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from bemsoft_monitor.planner import Planner, choose_key, group_rows
from bemsoft_monitor.source import ItemRow

NOW = 1_700_000_000.0


def test_choose_key_content_key_pending_key_and_the_replay_rule():
    assert choose_key("123", [7, 5]) == "sol-123-b23dac1693d3"          # sha256("5,7")[:12]
    assert choose_key("123", [5, 7], pending="sol-123-x") == "sol-123-x"  # recorded: kept
    # refused (a 4xx or a 2xx with an error body): nothing was saved and the key is burnt
    assert choose_key("123", [5, 7], pending="k", refused=True, now=NOW) == "sol-123-b23dac1693d3-ragf47zliaa"
    # otherwise (a 5xx, a timeout, a portal's page) the first attempt may be saved: same key
    assert choose_key("123", [5, 7], pending="k", refused=False, now=NOW) == "k"
    assert choose_key("123", [5, 7]) == "sol-123-b23dac1693d3"


@pytest.mark.parametrize("status, response, refused, fresh", [
    (400, '{"errors": ["x"]}', None, True),        # older files: judged by the stored answer
    (403, "", None, True),
    (201, '{"error": "Não foi possível salvar"}', None, True),
    (200, "<html>login</html>", None, False),      # a portal's page: transient
    (429, "", None, False),
    (503, "", None, False),
    (None, "", None, False),                       # never sent
    (429, "", True, True),                         # recorded: the record decides
    (400, '{"errors": ["x"]}', False, False),      # e.g. a give-up after transient answers
])
def test_the_replay_takes_a_new_key_only_after_a_refusal(status, response, refused, fresh):
    from bemsoft_monitor.failures import FailureRecord
    from bemsoft_monitor.replay import key_was_refused
    record = FailureRecord(reason="r", key="sol-1-abc", cod="1", item_ids=[1], event={},
                           http_status=status, response=response, refused=refused)
    assert key_was_refused(record) is fresh


def row(item_id, cod, pending=None):
    return ItemRow(item_id, cod, {"CodItemSol": item_id}, None, None, pending_key=pending)


def test_items_without_cod_are_groups_of_their_own_and_a_pending_key_splits_a_solicitation():
    groups = group_rows([row(4, "9"), row(1, ""), row(2, ""), row(3, "9", "old"), row(5, "9")])
    assert [(g.ident, g.item_ids, g.pending_key) for g in groups] == [
        ("#item-1", [1], None), ("#item-2", [2], None), ("9", [3], "old"), ("9", [4, 5], None)]


def test_the_debounce_holds_a_group_until_it_is_quiet_and_a_new_item_restarts_it():
    planner = Planner(SimpleNamespace(debounce_seconds=10), None, None)
    ready, held = planner.split([row(1, "A")], 100.0, complete=True)
    assert (ready, [g.ident for g in held]) == ([], ["A"])
    ready, held = planner.split([row(1, "A"), row(2, "A")], 105.0, complete=True)  # grew
    assert not ready
    ready, held = planner.split([row(1, "A"), row(2, "A")], 114.9, complete=True)
    assert not ready
    ready, held = planner.split([row(1, "A"), row(2, "A"), row(3, "B", "k")], 115.0, complete=True)
    assert [(g.ident, g.item_ids) for g in ready] == [("A", [1, 2]), ("B", [3])]  # pending: at once
