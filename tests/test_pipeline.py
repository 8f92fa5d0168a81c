"""The delivery guarantees of SPEC §6, end to end: a real database (SQLite and PostgreSQL),
the real monitor, and the fake Bemsoft API over loopback."""
from __future__ import annotations

import collections
import datetime as dt
import json
import os
import stat

import pytest
import sqlalchemy as sa

from bemsoft_monitor.db import is_query_timeout
from bemsoft_monitor.monitor import StartError
from bemsoft_monitor.payload import idempotency_key
from conftest import TOKEN


@pytest.fixture(params=[1, 4], ids=["conc1", "conc4"])
def settings_factory(settings_factory, request):
    """Every test here runs at BEMSOFT_CONCURRENCY=1 and at the production default 4."""
    def make(db_url, **overrides):
        overrides.setdefault("BEMSOFT_CONCURRENCY", request.param)
        return settings_factory(db_url, **overrides)
    return make


def posts(api):
    return [r for r in api.requests if r.get("body") is not None and "batch" in (r["body"] or {})]


def assert_each_once(api, item_ids):
    counts = collections.Counter(api.stored_tests())
    assert {f"item-{i}": 1 for i in item_ids} == {k: counts[k] for k in counts}


def test_delivers_one_request_per_solicitation_and_moves_checkpoint(harness):
    a = harness.order(1, ["GLI", "HEMO"])
    b = harness.order(2, ["TSH"])
    monitor = harness.monitor()
    result = monitor.step()
    assert result.sent == 2
    # at concurrency 4 the two POSTs race: order them by solicitation
    sent = sorted(posts(harness.api), key=lambda r: r["body"]["batch"]["externalId"])
    assert [r["body"]["batch"]["externalId"] for r in sent] == ["sol-1", "sol-2"]
    assert [r["key"] for r in sent] == [idempotency_key("1", a), idempotency_key("2", b)]
    assert [r["key"] for r in sent] == ["sol-1-17f8af97ad4a", "sol-2-4e07408562be"]  # pinned
    assert_each_once(harness.api, a + b)
    assert harness.checkpoint() == max(a + b)
    # an idle cycle sends nothing more
    assert monitor.step().sent == 0
    assert len(posts(harness.api)) == 2


def test_solicitation_is_never_split_by_the_page_limit(harness):
    first = harness.order(1, ["GLI", "HEMO", "TSH"])   # 3 items, page of 2
    second = harness.order(2, ["GLI", "TSH"])
    monitor = harness.monitor(BATCH_SIZE=2)
    monitor.run("drain")
    # the next page is read while the first is sent: at concurrency 4 the two POSTs may race
    sent = sorted(posts(harness.api), key=lambda r: r["body"]["batch"]["externalId"])
    assert [len(r["body"]["batch"]["order"]["tests"]) for r in sent] == [3, 2]
    assert [r["key"] for r in sent] == [idempotency_key("1", first), idempotency_key("2", second)]
    assert_each_once(harness.api, first + second)
    assert harness.checkpoint() == max(second)


def test_interleaved_solicitations_across_a_page_edge(harness):
    harness.order(1, ["GLI"])
    harness.order(2, ["GLI"])
    late1 = harness.items(1, ["HEMO"])      # ids: 1:a, 2:b, 1:c -> page of 2 cuts order 1
    monitor = harness.monitor(BATCH_SIZE=2)
    monitor.run("drain")
    bodies = {r["body"]["batch"]["externalId"]: r for r in posts(harness.api)}
    assert len(posts(harness.api)) == 2
    assert len(bodies["sol-1"]["body"]["batch"]["order"]["tests"]) == 2
    assert late1[0] in [int(t["externalId"][5:]) for t in bodies["sol-1"]["body"]["batch"]["order"]["tests"]]


def test_debounce_holds_then_sends_everything_together(harness):
    first = harness.order(1, ["GLI"])
    monitor = harness.monitor(DEBOUNCE_SECONDS=30)
    assert monitor.step().held == 1
    assert posts(harness.api) == []
    assert harness.checkpoint() == 0            # held items block the checkpoint
    harness.clock_value += 20
    more = harness.items(1, ["HEMO"])           # still being edited: the clock restarts
    monitor.step()
    harness.clock_value += 20
    assert monitor.step().held == 1 and posts(harness.api) == []
    harness.clock_value += 11
    result = monitor.step()
    assert result.sent == 1
    assert posts(harness.api)[0]["key"] == idempotency_key("1", first + more)
    assert harness.checkpoint() == max(more)


def test_debounce_held_item_blocks_checkpoint_but_later_orders_go(harness):
    held = harness.order(1, ["GLI"])
    monitor = harness.monitor(DEBOUNCE_SECONDS=30)
    monitor.step()                     # order 1 first seen
    harness.clock_value += 31
    other = harness.order(2, ["TSH"])  # new, not quiet yet
    monitor.step()                     # order 1 goes, order 2 held
    assert harness.checkpoint() == max(held)
    assert harness.checkpoint() < min(other)
    harness.clock_value += 31
    monitor.step()
    assert harness.checkpoint() == max(other)
    assert_each_once(harness.api, held + other)


def test_exams_added_after_sending_go_as_a_second_request(harness):
    first = harness.order(1, ["GLI", "HEMO"])
    monitor = harness.monitor()
    monitor.step()
    added = harness.items(1, ["TSH"], entered_at=dt.datetime(2026, 11, 28, 7, 0))  # next day
    monitor.step()
    sent = posts(harness.api)
    assert len(sent) == 2
    assert sent[1]["key"] == idempotency_key("1", added) != sent[0]["key"]
    second = sent[1]["body"]["batch"]
    assert second["externalId"] == "sol-1"
    assert [t["externalId"] for t in second["order"]["tests"]] == [f"item-{added[0]}"]
    # never a test dated after its batch (the API would drop it silently, SPEC §5.5)
    assert second["date"] == "2026-11-28"
    assert second["order"]["tests"][0]["collectionDate"] <= second["date"]
    assert_each_once(harness.api, first + added)
    batch = harness.api.stored_batches()["sol-1"]
    assert sorted(batch["tests"]) == sorted(f"item-{i}" for i in first + added)
    assert batch["keys"] == [idempotency_key("1", first), idempotency_key("1", added)]


def crash_after_post(monitor):
    """Run one step that dies right after its POSTs, before any outcome is recorded (the
    database refuses the outcome UPDATE, as a killed process would never send it)."""
    engine = monitor.source.engine

    def crash(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith("UPDATE") and "_MonitorItems" in statement:
            raise RuntimeError("simulated crash after the POST")

    sa.event.listen(engine, "before_cursor_execute", crash)
    try:
        with pytest.raises(RuntimeError):
            monitor.step()
    finally:
        sa.event.remove(engine, "before_cursor_execute", crash)


def test_crash_between_post_and_checkpoint_resends_with_the_same_key(harness):
    ids = harness.order(1, ["GLI", "HEMO"])
    crash_after_post(harness.monitor())
    assert harness.checkpoint() == 0
    assert len(posts(harness.api)) == 1

    restarted = harness.monitor()     # a new process: nothing in memory
    restarted.step()
    sent = posts(harness.api)
    assert len(sent) == 2
    assert sent[0]["key"] == sent[1]["key"] == idempotency_key("1", ids) == "sol-1-17f8af97ad4a"
    assert harness.api.status_counts() == {"201": 1, "409": 1}
    assert_each_once(harness.api, ids)
    assert harness.checkpoint() == max(ids)
    assert restarted.stats.duplicates == 1


def test_recovery_keeps_the_original_group_when_items_were_added_meanwhile(harness):
    ids = harness.order(1, ["GLI"])
    crash_after_post(harness.monitor())
    added = harness.items(1, ["HEMO"])
    harness.monitor().step()
    keys = [r["key"] for r in posts(harness.api)]
    assert keys[0] == idempotency_key("1", ids)                     # before the crash
    # after it, both groups go in one step (they race at concurrency 4)
    assert sorted(keys[1:]) == sorted([idempotency_key("1", ids), idempotency_key("1", added)])
    assert_each_once(harness.api, ids + added)


def test_dry_run_writes_nothing(harness, tmp_path, capsys):
    ids = harness.order(1, ["GLI"])
    monitor = harness.monitor(BEMSOFT_DRY_RUN=1, BEMSOFT_TOKEN="", START_FROM=0,
                              BEMSOFT_TEST_MAP_PATH="")
    harness.order(2, [{"CodConvExames": "GLI", "DescExames": "x", "Origem": "y"}],
                  patient={"sexo": None})  # would fail (no gender default)
    monitor.run("drain")
    assert harness.api.requests == []
    assert harness.api.tests_calls == 0
    assert not (tmp_path / "failed").exists()
    assert not sa.inspect(harness.engine).has_table("_MonitorState")
    assert not sa.inspect(harness.engine).has_table("_MonitorItems")
    key, payload = monitor.printed[0]
    assert key == idempotency_key("1", ids)
    assert payload["batch"]["order"]["tests"][0]["supportSpecimenId"] == "SPECIMEN-TEST"
    # a second cycle does not print the same payload again
    monitor.step()
    assert len(monitor.printed) == 1


def test_dry_run_with_token_uses_the_real_catalog(harness):
    harness.order(1, ["GLI"])
    monitor = harness.monitor(BEMSOFT_DRY_RUN=1)
    monitor.step()
    assert monitor.printed[0][1]["batch"]["order"]["tests"][0]["supportSpecimenId"] == "SORO"
    assert harness.api.tests_calls == 1
    assert posts(harness.api) == []


def test_first_start_needs_start_from_and_says_how_many_are_waiting(harness):
    harness.order(1, ["GLI", "HEMO"])
    monitor = harness.monitor(START_FROM="")
    with pytest.raises(StartError, match="START_FROM.*há 2 itens de apoio"):
        monitor.start()


def test_start_from_latest_skips_the_history(harness, caplog):
    old = harness.order(1, ["GLI"])
    monitor = harness.monitor(START_FROM="latest")
    with caplog.at_level("INFO"):
        monitor.start()
    assert "1 anteriores ignorados" in caplog.text
    new = harness.order(2, ["TSH"])
    monitor.step()
    assert_each_once(harness.api, new)
    assert harness.checkpoint() == max(new) > max(old)


def test_start_from_an_id(harness):
    old = harness.order(1, ["GLI"])
    new = harness.order(2, ["TSH"])
    monitor = harness.monitor(START_FROM=str(max(old)))
    monitor.step()
    assert_each_once(harness.api, new)


def test_other_support_labs_are_ignored_and_terceiro_still_works(harness):
    mine = harness.order(1, ["GLI"])
    harness.order(2, ["TSH"], terceirizado="OUTRO LAB")
    monitor = harness.monitor(TERCEIROS="", TERCEIRO=harness_lab())
    monitor.step()
    assert_each_once(harness.api, mine)


def harness_lab():
    from conftest import LAB
    return LAB


def test_failures_are_recorded_with_reason_and_owner_only(harness, tmp_path):
    ok = harness.order(1, ["GLI", "XYZ999"])                         # one unknown exam
    bad = harness.order(2, ["GLI"], patient={"sexo": "X", "datanasc": None})
    monitor = harness.monitor()
    monitor.step()
    files = sorted((tmp_path / "failed").glob("*.json"))
    assert len(files) == 2
    records = [json.loads(p.read_text(encoding="utf-8")) for p in files]
    by_cod = {r["cod_solicitacao"]: r for r in records}
    assert "XYZ999" in by_cod["1"]["reason"] and "BEMSOFT_TEST_MAP_PATH" in by_cod["1"]["reason"]
    assert by_cod["1"]["item_ids"] == [ok[1]]
    assert "DEFAULT_BIRTHDATE" in by_cod["2"]["reason"]
    assert by_cod["2"]["item_ids"] == bad
    for path in files:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert TOKEN not in path.read_text(encoding="utf-8")
        assert {"reason", "http_status", "attempts", "idempotency_key", "event"} <= set(
            json.loads(path.read_text(encoding="utf-8")))
    assert_each_once(harness.api, [ok[0]])
    assert harness.checkpoint() == max(bad)


def test_unwritable_failure_dir_blocks_the_checkpoint(harness, tmp_path):
    blocker = tmp_path / "failed"
    blocker.write_text("not a directory")           # FAILED_DIR cannot be created
    ok = harness.order(1, ["GLI"])
    bad = harness.order(2, ["GLI"], patient={"sexo": None})
    monitor = harness.monitor()
    monitor.step()
    assert harness.checkpoint() == max(ok)          # stops before the unrecorded failure
    later = harness.order(3, ["TSH"])
    monitor.step()
    assert harness.checkpoint() == max(ok)
    blocker.unlink()
    monitor.step()
    assert len(list(blocker.glob("*.json"))) == 1
    assert harness.checkpoint() == max(later)
    assert_each_once(harness.api, ok + later)
    assert bad  # never sent: it failed before the POST


def test_late_commit_below_the_checkpoint_is_sent(server_url, api, settings_factory):
    from conftest import Harness
    from bemsoft_monitor.testing.sampledata import add_items, add_order, add_patient
    h = Harness(server_url, api, settings_factory, DB_QUERY_TIMEOUT=2)
    writer = sa.create_engine(server_url)
    try:
        h.order(1, ["GLI"])
        slow = writer.connect()
        tx = slow.begin()
        add_patient(slow, 900, "Paciente Lento", datanasc=dt.datetime(1990, 1, 1), sexo="M")
        add_order(slow, 9, 900, dtaentrada=dt.datetime(2026, 11, 27), hora="09:00")
        late = add_items(slow, 9, [{"CodConvExames": "TSH", "DescExames": "TSH", "Origem": "A"}],
                         terceirizado=harness_lab(), entered_at=dt.datetime(2026, 11, 27, 9, 0))
        fast = h.order(2, ["HEMO"])                  # higher id, committed first
        assert late[0] < fast[0]
        monitor = h.monitor()
        try:
            monitor.step()
            assert h.checkpoint() == fast[0]          # the uncommitted row is invisible
        except sa.exc.DBAPIError as err:
            # SQL Server's READ COMMITTED (without row versioning) makes the read wait for
            # the writer; DB_QUERY_TIMEOUT cancels it and nothing is recorded or skipped
            assert h.engine.dialect.name == "mssql" and is_query_timeout(err), err
            assert api.stored_tests() == []
        tx.commit()
        slow.close()
        monitor.step()
        counts = collections.Counter(api.stored_tests())
        assert counts[f"item-{late[0]}"] == 1 and set(counts.values()) == {1}
        assert len(counts) == 3
        assert h.checkpoint() == fast[0]
    finally:
        writer.dispose()
        h.close()


def item(item_id, code="GLI"):
    return {"CodItemSol": item_id, "CodConvExames": code, "DescExames": code, "Origem": "A"}


def test_late_commit_held_by_debounce_moves_the_checkpoint_back(harness):
    first = harness.order(1, [item(10)])
    second = harness.order(2, [item(12)])
    monitor = harness.monitor(DEBOUNCE_SECONDS=10)
    monitor.step()
    harness.clock_value += 11
    monitor.step()
    assert harness.checkpoint() == 12
    late = harness.order(3, [item(11, "TSH")])       # a lower id shows up after 12 was sent
    monitor.step()                                   # found by the look-back, held by the debounce
    assert harness.checkpoint() == 10                # never stays past an unrecorded item
    restarted = harness.monitor(DEBOUNCE_SECONDS=10)  # found again after a restart
    restarted.step()
    harness.clock_value += 11
    restarted.step()
    assert_each_once(harness.api, first + late + second)
    assert harness.checkpoint() == 12


def test_refused_send_whose_file_could_not_be_written_is_not_posted_again_after_restart(harness, tmp_path):
    """Review finding: the API refused it for good (201 with an error: key remembered), the
    failure file could not be written, then the monitor restarted. Re-POSTing the key would
    get a 409 and count as delivered what was never saved."""
    blocker = tmp_path / "failed"
    blocker.write_text("not a directory")
    ids = harness.order(1, ["GLI"])
    harness.api.fail_next(1, status=201, body={"error": "Não foi possível salvar os dados recebidos no lote sol-1."})
    harness.monitor().step()
    assert harness.checkpoint() == 0
    blocker.unlink()
    harness.monitor().step()                     # a new process: nothing in memory
    posts_sent = [r for r in harness.api.requests if r.get("body") and "batch" in r["body"]]
    assert len(posts_sent) == 1                  # not POSTed again
    [path] = blocker.glob("*.json")
    record = json.loads(path.read_text(encoding="utf-8"))
    assert record["item_ids"] == ids and record["http_status"] == 201
    assert record["refused"] is True             # a replay takes a new key: this one is burnt
    assert "Não foi possível salvar" in record["reason"]
    assert harness.checkpoint() == max(ids)
