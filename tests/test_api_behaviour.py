"""How the monitor copes with each behaviour of the Bemsoft API (SPEC §5) and with outages,
end to end: a real database (SQLite and PostgreSQL), the real monitor, and the fake API
over 127.0.0.1 with injected faults."""
from __future__ import annotations

import collections
import json
import logging
import threading
import time

import pytest

from bemsoft_monitor.catalog import Catalog
from bemsoft_monitor.payload import idempotency_key
from bemsoft_monitor.retry import PauseGate
from conftest import TOKEN, wait_until

FAST = {"BEMSOFT_BACKOFF": "0.01", "BEMSOFT_MAX_BACKOFF": "1"}


def posts(api):
    """POSTs of solicitations (dropped ones included)."""
    return [r for r in api.requests if isinstance(r.get("body"), dict) and "batch" in r["body"]]


def stored_once(api, item_ids):
    counts = collections.Counter(api.stored_tests())
    return {k: counts[k] for k in counts} == {f"item-{i}": 1 for i in item_ids}


def failure_files(tmp_path):
    directory = tmp_path / "failed"
    return sorted(directory.glob("*.json")) if directory.is_dir() else []


def failure_records(tmp_path):
    return [json.loads(p.read_text(encoding="utf-8")) for p in failure_files(tmp_path)]


class SkewClock:
    """Real monotonic time plus an offset the test can jump forward."""

    def __init__(self):
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


def fast_clocks(harness, monitor):
    """Give the monitor a pause gate whose clock the test can jump (instead of waiting out
    the >= 1 s pause after a failed cycle) and a catalog on the harness clock. Same parts
    as build_monitor wires, only with injected clocks."""
    clock = SkewClock()
    gate = PauseGate(monitor.shutdown, clock=clock)
    monitor.gate = monitor.sender.client.gate = gate
    monitor.planner.catalog = Catalog(monitor.sender.client.fetch_tests, monitor.settings.tests_ttl,
                                      clock=harness.clock)

    def skip_pause():
        assert gate.remaining() > 0, "the monitor should be pausing"
        clock.offset += gate.remaining() + 0.001
        harness.clock_value += 10

    monitor.skip_pause = skip_pause
    return monitor


# ---------------------------------------------------------------- §5.1: 201 with an error

def test_201_with_an_error_body_from_a_too_long_external_id_is_a_failure(harness, tmp_path):
    harness.api.max_external_id = 11          # the fake's length limit, lowered: "order-12345" ok
    ok = harness.order(12345, ["GLI"])
    bad = harness.order(1234567, ["HEMO"])    # "order-1234567" too long: 201 + error, not saved
    monitor = harness.monitor()
    monitor.step()
    [record] = failure_records(tmp_path)
    assert record["cod_solicitacao"] == "1234567" and record["item_ids"] == bad
    assert record["http_status"] == 201
    assert "Não foi possível salvar" in record["reason"] and "sol-1234567" in record["reason"]
    assert record["idempotency_key"] == idempotency_key("1234567", bad)
    assert stored_once(harness.api, ok)           # the bad one stored nothing
    assert harness.checkpoint() == max(bad)       # it has its recorded outcome
    assert monitor.stats.failed == 1 and monitor.stats.delivered == 1
    monitor.step()
    assert len(posts(harness.api)) == 2           # not re-sent (its key would get a 409)


def test_201_with_an_error_body_is_a_failure_and_saves_nothing(harness, tmp_path):
    first = harness.order(1, ["GLI", "HEMO"])
    second = harness.order(2, ["TSH"])
    harness.api.fail_next(1, status=201,
                          body={"error": "Não foi possível salvar os dados recebidos no lote sol-1."})
    monitor = harness.monitor()
    monitor.step()
    [record] = failure_records(tmp_path)
    assert record["item_ids"] == first and record["http_status"] == 201
    assert "Não foi possível salvar os dados recebidos no lote sol-1." in record["reason"]
    assert "Não foi possível salvar" in record["response"]
    assert record["attempts"] == 1
    assert [r["key"] for r in posts(harness.api)] == [idempotency_key("1", first),
                                                      idempotency_key("2", second)]
    assert stored_once(harness.api, second)
    assert harness.checkpoint() == max(second)


# ---------------------------------------------------------------- §5.2: 409

def test_409_on_the_first_send_counts_as_delivered(harness, tmp_path):
    ids = harness.order(1, ["GLI"])
    harness.api.fail_next(1, status=409, body={"error": "Idempotency-Key já utilizada"})
    monitor = harness.monitor()
    result = monitor.step()
    assert result.sent == 1 and result.transient == 0
    assert monitor.stats.duplicates == 1 and monitor.stats.delivered == 1
    assert monitor.stats.failed == 0
    assert failure_files(tmp_path) == []
    assert harness.checkpoint() == max(ids)
    assert len(posts(harness.api)) == 1           # not retried
    monitor.step()
    assert len(posts(harness.api)) == 1


# ---------------------------------------------------------------- §5.3: permanent answers

def test_400_is_a_failure_and_is_not_retried(harness, tmp_path):
    bad = harness.order(1, ["GLI"])
    ok = harness.order(2, ["TSH"])
    harness.api.fail_next(1, status=400,
                          body={"errors": ["batch.order.patient.birthDate: data inválida"]})
    monitor = harness.monitor(BEMSOFT_RETRIES=3)
    monitor.step()
    monitor.step()
    [record] = failure_records(tmp_path)
    assert record["item_ids"] == bad and record["http_status"] == 400
    assert record["refused"] is True        # refused: a replay needs a new key
    assert "400" in record["reason"] and "birthDate" in record["reason"]
    keys = [r["key"] for r in posts(harness.api)]
    assert keys.count(idempotency_key("1", bad)) == 1        # exactly one POST
    assert stored_once(harness.api, ok)
    assert harness.checkpoint() == max(ok)


def test_wrong_token_sends_nothing_loses_nothing_and_says_so(harness, tmp_path, caplog):
    """A wrong BEMSOFT_TOKEN is refused already by GET /tests: the catalog cannot load, so
    nothing is POSTed and nothing is written to FAILED_DIR (the items wait); the log names
    the setting and never shows the token."""
    wrong = "wrong-token-SECRET-999"
    ids = harness.order(1, ["GLI"])
    monitor = fast_clocks(harness, harness.monitor(BEMSOFT_TOKEN=wrong, **FAST))
    with caplog.at_level(logging.INFO):
        monitor.step()
        monitor.skip_pause()
        monitor.step()
    assert posts(harness.api) == []
    assert failure_files(tmp_path) == []
    assert harness.checkpoint() == 0
    assert "BEMSOFT_TOKEN" in caplog.text and "401" in caplog.text
    assert wrong not in caplog.text and TOKEN not in caplog.text
    fixed = harness.monitor()                      # the operator fixes the .env
    fixed.step()
    assert stored_once(harness.api, ids)
    assert harness.checkpoint() == max(ids)


@pytest.mark.parametrize("refusal", [401, 403])
def test_a_revoked_token_pauses_sending_and_all_goes_once_when_accepted_again(harness, tmp_path,
                                                                             caplog, refusal):
    """Issue 15 §1: a refused token is one problem of the installation. No failure file,
    the items wait under their keys, the checkpoint holds; the monitor probes with the same
    request and key, and resumes by itself when the token is accepted again. A 403 counts
    as the token's when GET /tests refuses the token too."""
    first = harness.order(1, ["GLI"])
    monitor = fast_clocks(harness, harness.monitor(BEMSOFT_RETRIES=3, **FAST))
    monitor.step()                                 # catalog loaded, order 1 delivered
    harness.api.token = "rotated-on-the-bemsoft-side"   # our BEMSOFT_TOKEN is now refused
    harness.api.refusal_status = refusal
    second, third = harness.order(2, ["TSH"]), harness.order(3, ["GLI", "HEMO"])
    with caplog.at_level(logging.INFO):
        monitor.step()
        monitor.skip_pause()
        monitor.step()                             # the probe: refused again
        assert failure_files(tmp_path) == []
        assert harness.checkpoint() == max(first)
        assert monitor.status.snapshot().state == "token_refused"
        refused = [r for r in posts(harness.api) if r["status"] == refusal]
        assert len(refused) >= 2                   # the first send and the probe, never retried at once
        assert {r["key"] for r in refused} <= {idempotency_key("2", second), idempotency_key("3", third)}
        harness.api.token = TOKEN                  # accepted again on the Bemsoft side
        monitor.skip_pause()
        monitor.step()
    assert stored_once(harness.api, first + second + third)
    assert harness.checkpoint() == max(third)
    assert failure_files(tmp_path) == []
    for cod, ids in (("2", second), ("3", third)):   # every send of an order under one key
        assert {r["key"] for r in posts(harness.api) if r["body"]["batch"]["externalId"] == f"sol-{cod}"} \
            == {idempotency_key(cod, ids)}
    assert caplog.text.count("Token recusado pela API (HTTP") == 1      # said once, not per order
    assert "Token aceito de novo pela API" in caplog.text
    assert monitor.status.snapshot().state != "token_refused"
    assert TOKEN not in caplog.text


def test_a_403_for_the_order_while_the_token_works_is_filed_and_the_echo_redacted(harness, tmp_path,
                                                                                   caplog):
    """A 403 while GET /tests accepts the token is this order's refusal: a failure file,
    as before, with the token the API echoed masked."""
    ids = harness.order(1, ["GLI"])
    harness.api.fail_next(1, status=403,
                          body={"error": f"sem permissão: Bearer {TOKEN}", "token": TOKEN})
    monitor = harness.monitor()
    with caplog.at_level(logging.DEBUG):
        monitor.step()
    [path] = failure_files(tmp_path)
    text = path.read_text(encoding="utf-8")
    record = json.loads(text)
    assert record["http_status"] == 403 and record["item_ids"] == ids
    assert "HTTP 403" in record["reason"] and record["refused"] is True
    assert harness.api.tests_calls >= 2            # the catalog, then the check of the token
    assert TOKEN not in text
    assert TOKEN not in caplog.text


def test_a_401_echoing_the_token_pauses_without_a_file_and_never_shows_it(harness, tmp_path, caplog):
    ids = harness.order(1, ["GLI"])
    harness.api.fail_next(1, status=401, body={"error": f"token inválido: Bearer {TOKEN}",
                                               "token": TOKEN})
    monitor = fast_clocks(harness, harness.monitor(**FAST))
    with caplog.at_level(logging.DEBUG):
        monitor.step()
        assert failure_files(tmp_path) == []
        monitor.skip_pause()
        monitor.step()
    assert stored_once(harness.api, ids)
    assert "BEMSOFT_TOKEN" in caplog.text
    assert TOKEN not in caplog.text


# ---------------------------------------------------------------- §5.3: transient answers

def test_429_with_retry_after_is_retried_with_the_same_key(harness, tmp_path):
    ids = harness.order(1, ["GLI", "HEMO"])
    harness.api.fail_next(1, status=429, retry_after="0.2")
    monitor = harness.monitor(**FAST)
    monitor.step()
    sent = posts(harness.api)
    assert [r["status"] for r in sent] == [429, 201]
    assert sent[0]["key"] == sent[1]["key"] == idempotency_key("1", ids)
    assert sent[1]["time"] - sent[0]["time"] >= 0.18      # Retry-After, not BEMSOFT_BACKOFF
    assert failure_files(tmp_path) == []
    assert stored_once(harness.api, ids)
    assert harness.checkpoint() == max(ids)
    assert monitor.stats.delivered == 1 and monitor.stats.transient == 0


def test_429_retry_after_pauses_every_sender(harness, tmp_path):
    """Synchronised on the gate, not on wall time: the server asks for 30 s; while the
    pause lasts (until the test moves the gate's clock), only the requests already on the
    wire when it began (at most the 3 other senders) may reach the API."""
    ids = []
    for cod in range(1, 13):
        ids += harness.order(cod, ["GLI"])
    harness.api.fail_next(1, status=429, retry_after="30")
    monitor = fast_clocks(harness, harness.monitor(BEMSOFT_CONCURRENCY=4, BEMSOFT_BACKOFF="0.01",
                                                   BEMSOFT_MAX_BACKOFF="60"))
    stepper = threading.Thread(target=monitor.step)
    stepper.start()
    try:
        assert wait_until(lambda: monitor.gate.remaining() > 0), "no pause after the 429"
        at_pause = len(posts(harness.api))
        assert wait_until(lambda: settled(harness.api, 0.3))   # stragglers answered
        during = len(posts(harness.api)) - at_pause
        assert during <= 3, f"{during} POSTs began during the pause"
        assert monitor.gate.remaining() > 0
        limited_key = posts(harness.api)[0]["key"]
        assert [r["key"] for r in posts(harness.api)].count(limited_key) == 1  # not retried yet
    finally:
        if monitor.gate.remaining() > 0:
            monitor.skip_pause()
        stepper.join(60)
    assert not stepper.is_alive()
    sent = posts(harness.api)
    [limited] = [r for r in sent if r["status"] == 429]
    assert limited is sent[0]
    retried = [r for r in sent if r["key"] == limited["key"]]
    assert [r["status"] for r in retried] == [429, 201]
    assert failure_files(tmp_path) == []
    assert stored_once(harness.api, ids)
    assert harness.checkpoint() == max(ids)


def settled(api, quiet: float) -> bool:
    """No new request reached the fake during `quiet` seconds (an absence check: load can
    only make it wait longer, never fail)."""
    before = len(api.requests)
    threading.Event().wait(quiet)
    return len(api.requests) == before


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_of_the_last_attempt_is_honoured_by_the_next_cycle(harness, tmp_path, status):
    ids = harness.order(1, ["GLI"])
    harness.api.fail_next(1, status=status, retry_after="30")
    monitor = harness.monitor(BEMSOFT_RETRIES=0, BEMSOFT_BACKOFF="0.01")
    result = monitor.step()
    assert result.transient == 1 and failure_files(tmp_path) == []
    assert harness.checkpoint() == 0
    # the server asked for 30 s: no sender may POST again before that
    assert monitor.gate.remaining() >= 25


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_then_success_is_retried_with_the_same_key(harness, tmp_path, status):
    ids = harness.order(1, ["GLI"])
    harness.api.fail_next(1, status=status, body="<html>Bad Gateway</html>")
    monitor = harness.monitor(**FAST)
    monitor.step()
    sent = posts(harness.api)
    assert [r["status"] for r in sent] == [status, 201]
    assert {r["key"] for r in sent} == {idempotency_key("1", ids)}
    assert failure_files(tmp_path) == []
    assert stored_once(harness.api, ids)
    assert harness.checkpoint() == max(ids)


def test_5xx_beyond_the_client_retries_is_retried_next_cycle_with_the_same_key(harness, tmp_path):
    ids = harness.order(1, ["GLI"])
    harness.api.fail_next(2, status=503)               # both attempts of the first cycle
    monitor = fast_clocks(harness, harness.monitor(**FAST))
    result = monitor.step()
    assert result.transient == 1
    assert harness.checkpoint() == 0 and failure_files(tmp_path) == []
    monitor.skip_pause()
    monitor.step()
    sent = posts(harness.api)
    assert [r["status"] for r in sent] == [503, 503, 201]
    assert {r["key"] for r in sent} == {idempotency_key("1", ids)}
    assert stored_once(harness.api, ids)
    assert harness.checkpoint() == max(ids)


def test_client_timeout_retries_with_the_same_key_and_the_server_dedupes(harness, tmp_path):
    ids = harness.order(1, ["GLI", "HEMO"])
    # processed and stored, but answered only after 60 s: had the client waited for it
    # instead of timing out at 0.5 s, there would be one POST (201), not two
    harness.api.timeout_next(1, 60)
    monitor = harness.monitor(BEMSOFT_TIMEOUT="0.5", **FAST)
    monitor.step()
    sent = posts(harness.api)
    assert [r["key"] for r in sent] == [idempotency_key("1", ids)] * 2
    assert harness.api.status_counts() == {"201": 1, "409": 1}
    assert stored_once(harness.api, ids)
    assert monitor.stats.delivered == 1 and monitor.stats.duplicates == 1
    assert failure_files(tmp_path) == []
    assert harness.checkpoint() == max(ids)


def test_dropped_connection_is_retried(harness, tmp_path):
    ids = harness.order(1, ["GLI"])
    harness.api.drop_next(1)
    monitor = harness.monitor(**FAST)
    monitor.step()
    sent = posts(harness.api)
    assert [r["status"] for r in sent] == [None, 201]
    assert {r["key"] for r in sent} == {idempotency_key("1", ids)}
    assert stored_once(harness.api, ids)
    assert failure_files(tmp_path) == []
    assert harness.checkpoint() == max(ids)


# ---------------------------------------------------------------- outages

def test_api_outage_fails_nothing_and_delivers_everything_once_it_is_back(harness, tmp_path):
    orders = {cod: harness.order(cod, ["GLI", "TSH"]) for cod in (1, 2, 3)}
    harness.api.fail_next(1000, status=503)
    monitor = fast_clocks(harness, harness.monitor(BEMSOFT_MAX_ATTEMPTS=2, **FAST))
    for cycle in range(5):                 # well beyond BEMSOFT_MAX_ATTEMPTS
        result = monitor.step()
        assert result.transient == 1
        assert failure_files(tmp_path) == []
        assert harness.checkpoint() == 0
        # the monitor pauses: a cycle during the pause sends nothing
        before = len(harness.api.requests)
        assert monitor.step().sent == 0
        assert len(harness.api.requests) == before
        monitor.skip_pause()
    failed_posts = posts(harness.api)
    assert len(failed_posts) >= 10 and {r["status"] for r in failed_posts} == {503}
    assert harness.api.stored_tests() == []

    harness.api.clear_faults()             # the API is back
    monitor.run("drain")
    everything = [i for ids in orders.values() for i in ids]
    assert stored_once(harness.api, everything)
    assert failure_files(tmp_path) == []
    assert harness.checkpoint() == max(everything)
    # every attempt of a solicitation used its one key
    keys = {cod: idempotency_key(str(cod), ids) for cod, ids in orders.items()}
    assert {r["key"] for r in posts(harness.api)} == set(keys.values())
    assert [r["status"] for r in posts(harness.api)].count(201) == 3


def test_one_solicitation_failing_while_others_go_ends_in_failed_dir(harness, tmp_path):
    """The fake cannot fail one payload on purpose (its faults hit the next N POSTs,
    whoever sends them), so the failing one is isolated with the page order: BATCH_SIZE=1
    and a lower-numbered order that commits late."""
    stuck = harness.order(1, [{"CodItemSol": 50, "CodConvExames": "GLI", "DescExames": "GLI",
                               "Origem": "A"}])
    monitor = fast_clocks(harness, harness.monitor(BEMSOFT_MAX_ATTEMPTS=2, BATCH_SIZE=1,
                                                   **FAST))
    harness.api.fail_next(2, status=500)
    monitor.step()                          # cycle 1: order 1 fails (attempt 1 of 2)
    assert failure_files(tmp_path) == []

    other = harness.order(2, [{"CodItemSol": 10, "CodConvExames": "TSH", "DescExames": "TSH",
                               "Origem": "A"}])
    monitor.skip_pause()
    monitor.step()                          # cycle 2: order 2 (lower id) is delivered
    assert stored_once(harness.api, other)
    assert failure_files(tmp_path) == []

    harness.api.fail_next(2, status=500)
    monitor.step()                          # cycle 3: order 1 fails again -> FAILED_DIR
    [record] = failure_records(tmp_path)
    assert record["item_ids"] == stuck and record["http_status"] == 500
    assert "falhou 2 vezes" in record["reason"] and "500" in record["reason"]
    assert record["attempts"] >= 2
    assert record["refused"] is False       # transient answers: a replay keeps the key
    keys = [r["key"] for r in posts(harness.api)]
    assert keys.count(idempotency_key("1", stuck)) == 4      # same key on every attempt

    monitor.skip_pause()
    monitor.run("drain")
    assert harness.checkpoint() == 50
    assert stored_once(harness.api, other)
    assert len(posts(harness.api)) == 5                      # never sent again


def test_catalog_unavailable_at_start_sends_nothing_and_delivers_later(harness, tmp_path):
    ids = harness.order(1, ["GLI", "HEMO"])
    harness.api.fail_tests_next(3, status=503)
    monitor = fast_clocks(harness, harness.monitor(**FAST))
    for _ in range(3):
        result = monitor.step()
        assert result.sent == 0
        assert posts(harness.api) == []
        assert failure_files(tmp_path) == []
        assert harness.checkpoint() == 0
        monitor.skip_pause()                 # also moves the catalog's clock past its retry pause
    assert harness.api.tests_calls == 3
    monitor.step()
    assert harness.api.tests_calls == 4
    assert stored_once(harness.api, ids)
    assert failure_files(tmp_path) == []
    assert harness.checkpoint() == max(ids)


def test_409_after_an_unanswered_attempt_is_delivered_with_a_warning(harness, caplog):
    """SPEC §5.2: after a timeout the API may have saved the first attempt, or failed it in
    its body; it cannot be asked. Counted delivered, and the log names the exams to check."""
    ids = harness.order(1, ["GLI", "TSH"])
    harness.api.timeout_next(1, 1.0)
    monitor = harness.monitor(BEMSOFT_TIMEOUT="0.3", BEMSOFT_RETRIES="2")
    with caplog.at_level("WARNING"):
        monitor.step()
    assert monitor.stats.duplicates == 1
    assert "409 depois de uma tentativa sem resposta" in caplog.text
    assert all(f"item-{i}" in caplog.text for i in ids)
    assert sorted(harness.api.stored_tests()) == sorted(f"item-{i}" for i in ids)
