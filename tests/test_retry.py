"""Retry policy, Retry-After parsing, the shared pause gate and response classification
(SPEC §5). Pure units use fake clocks; the client-level checks talk to the fake API over
127.0.0.1."""
from __future__ import annotations

import datetime as dt
import email.utils
import json
import threading
import time

import pytest

from bemsoft_monitor.client import BemsoftClient, Verdict, classify
from bemsoft_monitor.config import parse_settings
from bemsoft_monitor.retry import PauseGate, RetryPolicy, parse_retry_after
from conftest import TOKEN


class FakeClock:
    def __init__(self, start: float = 100.0):
        self.now = start

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- RetryPolicy

def test_backoff_doubles_from_the_first_delay():
    assert RetryPolicy(retries=3, backoff=1.0, max_backoff=300).delays() == [1, 2, 4]
    assert RetryPolicy(retries=5, backoff=0.5, max_backoff=300).delays() == [0.5, 1, 2, 4, 8]
    assert RetryPolicy(retries=0, backoff=1.0).delays() == []


def test_backoff_is_capped_by_max_backoff():
    assert RetryPolicy(retries=6, backoff=1.0, max_backoff=5).delays() == [1, 2, 4, 5, 5, 5]
    assert RetryPolicy(retries=3, backoff=1.0, max_backoff=300).delay(20) == 300


def test_retry_after_wins_over_the_computed_backoff():
    policy = RetryPolicy(retries=3, backoff=1.0, max_backoff=300)
    assert policy.delay(1, retry_after=10) == 10     # longer than the backoff (1)
    assert policy.delay(3, retry_after=0.5) == 0.5   # shorter than the backoff (4)
    assert policy.delay(2, retry_after=0) == 0
    assert policy.delay(2, retry_after=None) == 2


def test_retry_after_is_capped_and_a_negative_one_is_ignored():
    policy = RetryPolicy(retries=3, backoff=1.0, max_backoff=30)
    assert policy.delay(1, retry_after=120) == 30
    assert policy.delay(1, retry_after=float("inf")) == 30
    assert policy.delay(3, retry_after=-5) == 4


# ---------------------------------------------------------------- parse_retry_after

@pytest.mark.parametrize("value, expected", [
    ("5", 5.0), (" 2.5 ", 2.5), ("0", 0.0), ("120", 120.0), ("-3", 0.0),
])
def test_retry_after_in_seconds(value, expected):
    assert parse_retry_after(value) == expected


def test_retry_after_as_an_http_date():
    now = 1_800_000_000.0
    future = email.utils.formatdate(now + 30, usegmt=True)   # "Fri, 15 Jan 2027 ... GMT"
    assert parse_retry_after(future, now=now) == pytest.approx(30.0)
    past = email.utils.formatdate(now - 3600, usegmt=True)
    assert parse_retry_after(past, now=now) == 0.0
    # without `now` it is measured against the real clock
    soon = email.utils.format_datetime(
        dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=90), usegmt=True)
    assert 80 <= parse_retry_after(soon) <= 91


@pytest.mark.parametrize("value", [None, "", "   ", "soon", "Wed, 99 Foo 2024 99:99:99 GMT",
                                   "1,5", "5 seconds"])
def test_retry_after_junk_is_none(value):
    assert parse_retry_after(value) is None


# ---------------------------------------------------------------- PauseGate

def test_pause_gate_remaining_follows_the_clock():
    clock = FakeClock()
    gate = PauseGate(clock=clock)
    assert gate.remaining() == 0
    gate.pause(5)
    assert gate.remaining() == 5
    clock.now += 2
    assert gate.remaining() == 3
    gate.pause(1)                     # a shorter pause never shortens the current one
    assert gate.remaining() == 3
    gate.pause(10)                    # a longer one extends it
    assert gate.remaining() == 10
    clock.now += 10.5
    assert gate.remaining() == 0


class SteppingShutdown(threading.Event):
    """The gate's shutdown flag, whose wait(t) does not sleep: it moves the fake clock by t
    and records t. Waits are then exact and independent of the machine's load.
    `stop_after`: the flag is set during that many-th wait (a shutdown mid-pause)."""

    def __init__(self, clock: FakeClock, stop_after: int | None = None):
        super().__init__()
        self.clock, self.stop_after, self.waits = clock, stop_after, []
        self.gate, self.shared_pause = None, []   # what the shared gate said at each wait

    def wait(self, timeout=None):
        self.waits.append(timeout)
        if self.gate is not None:
            self.shared_pause.append(self.gate.remaining())
        self.clock.now += timeout
        if self.stop_after is not None and len(self.waits) >= self.stop_after:
            self.set()
        return self.is_set()


def stepping_gate(stop_after=None):
    clock = FakeClock()
    shutdown = SteppingShutdown(clock, stop_after)
    shutdown.gate = PauseGate(shutdown, clock=clock)
    return shutdown.gate, shutdown


def test_pause_gate_wait_returns_at_once_when_not_paused():
    gate, shutdown = stepping_gate()
    gate.pause(3)
    shutdown.clock.now += 3
    assert gate.wait() is True
    assert shutdown.waits == []


def test_pause_gate_wait_blocks_until_the_pause_is_over():
    gate, shutdown = stepping_gate()
    gate.pause(1.2)
    assert gate.wait() is True
    assert shutdown.waits == pytest.approx([0.5, 0.5, 0.2])    # short slices, then done
    assert gate.remaining() == 0


def test_pause_gate_wait_honours_shutdown():
    gate, shutdown = stepping_gate()
    gate.pause(3600)
    shutdown.set()
    assert gate.wait() is False                      # already shutting down
    assert gate.sleep(3600) is False
    assert shutdown.waits == []


def test_pause_gate_wait_wakes_up_on_shutdown_during_a_long_pause():
    gate, shutdown = stepping_gate(stop_after=3)
    gate.pause(3600)
    assert gate.wait() is False
    assert shutdown.waits == [0.5, 0.5, 0.5]         # checked at every slice


def test_pause_gate_wait_with_the_real_clock_blocks_at_least_the_pause():
    gate = PauseGate()
    gate.pause(0.15)
    started = time.monotonic()
    assert gate.wait() is True
    assert time.monotonic() - started >= 0.14       # a lower bound: load cannot break it


def test_pause_gate_sleep():
    gate, shutdown = stepping_gate()
    assert gate.sleep(0.05) is True
    assert shutdown.waits == pytest.approx([0.05])
    gate, shutdown = stepping_gate(stop_after=2)
    assert gate.sleep(3600) is False
    assert shutdown.waits == [0.5, 0.5]


# ---------------------------------------------------------------- classify

@pytest.mark.parametrize("status", [200, 201, 202, 204])
@pytest.mark.parametrize("body", [b'{"id": "x", "status": "received"}', b"[]",
                                  b'{"error": null}', b'"ok"', b"{}"])
def test_2xx_json_without_an_error_is_delivered(status, body):
    outcome, reason = classify(status, body)
    assert outcome == Verdict.DELIVERED
    assert str(status) in reason


@pytest.mark.parametrize("status", [201, 204])
@pytest.mark.parametrize("body", [b"", b"   "])
def test_an_empty_body_is_delivered_only_with_201_or_204(status, body):
    assert classify(status, body)[0] == Verdict.DELIVERED
    assert classify(200, body)[0] == Verdict.TRANSIENT
    assert classify(202, body)[0] == Verdict.TRANSIENT


@pytest.mark.parametrize("status", [200, 201, 202])
@pytest.mark.parametrize("body", [b"<html><body>Login do portal Wi-Fi</body></html>",
                                  b"not json", b"OK", "Acesso negado pelo proxy \u00e9".encode()])
def test_2xx_that_is_not_json_is_not_the_api_and_is_retried(status, body):
    """SPEC §8: a captive portal or a proxy page answering 200 is not a delivery."""
    outcome, reason = classify(status, body)
    assert outcome == Verdict.TRANSIENT
    assert "resposta inesperada: não parece ser a API (proxy/portal?)" in reason


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_not_the_api_and_is_retried(status):
    assert classify(status, b"<html>moved</html>")[0] == Verdict.TRANSIENT


def test_a_407_from_a_plain_http_proxy_is_transient_and_names_the_settings():
    outcome, reason = classify(407, b"<html>Proxy Authentication Required</html>")
    assert outcome == Verdict.TRANSIENT and "BEMSOFT_PROXY" in reason and "407" in reason


@pytest.mark.parametrize("key", ["error", "errors", "erro", "erros"])
@pytest.mark.parametrize("empty", [None, "", [], {}, False])
def test_2xx_with_an_empty_error_field_is_delivered(key, empty):
    assert classify(201, json.dumps({key: empty, "id": 1}).encode())[0] == Verdict.DELIVERED


@pytest.mark.parametrize("key", ["error", "errors", "erro", "erros"])
def test_2xx_with_an_error_message_in_the_body_is_permanent(key):
    message = "Não foi possível salvar os dados recebidos no lote sol-43335."
    outcome, reason = classify(201, json.dumps({key: message}, ensure_ascii=False).encode())
    assert outcome == Verdict.PERMANENT
    assert message in reason and "201" in reason


@pytest.mark.parametrize("key", ["errors", "erros"])
def test_2xx_with_an_error_list_is_permanent(key):
    outcome, reason = classify(200, json.dumps({key: ["batch.date: inválida"]}).encode())
    assert outcome == Verdict.PERMANENT
    assert "batch.date: inválida" in reason


def test_2xx_error_is_found_in_a_later_key():
    body = json.dumps({"error": "", "erros": ["lote recusado"]}).encode()
    assert classify(201, body)[0] == Verdict.PERMANENT


def test_409_is_a_duplicate_whatever_the_body():
    for body in (b"", b'{"error": "Idempotency-Key j\xc3\xa1 utilizada"}', b"<html>"):
        outcome, _ = classify(409, body)
        assert outcome == Verdict.DUPLICATE


def test_a_401_is_the_token_refused_and_names_the_setting():
    outcome, reason = classify(401, b'{"error": "token inv\xc3\xa1lido"}')
    assert outcome == Verdict.TOKEN_REFUSED
    assert "BEMSOFT_TOKEN" in reason and "401" in reason


def test_a_403_alone_is_the_orders_refusal_until_get_tests_says_otherwise():
    outcome, reason = classify(403, b'{"error": "sem permiss\xc3\xa3o"}')
    assert outcome == Verdict.PERMANENT and "403" in reason


def test_400_is_permanent_and_carries_the_body():
    outcome, reason = classify(400, b'{"errors": ["batch.order.patient.gender: deve ser M ou F"]}')
    assert outcome == Verdict.PERMANENT
    assert "400" in reason and "gender" in reason


@pytest.mark.parametrize("status", [404, 405, 413, 415, 422])
def test_other_4xx_are_permanent(status):
    outcome, reason = classify(status, b"nope")
    assert outcome == Verdict.PERMANENT
    assert str(status) in reason


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504, 599])
def test_429_5xx_and_timeouts_are_transient(status):
    outcome, reason = classify(status, b"<html>Bad Gateway</html>")
    assert outcome == Verdict.TRANSIENT
    assert str(status) in reason


def test_classify_cuts_a_huge_body():
    _, reason = classify(500, b"x" * 100_000)
    assert len(reason) < 2000


# ---------------------------------------------------------------- the client's retries

def make_client(tmp_path, api, gate=None, **overrides) -> BemsoftClient:
    values = {"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}", "TERCEIROS": "LAB",
              "BEMSOFT_BASE_URL": api.url, "BEMSOFT_TOKEN": TOKEN, "BEMSOFT_TIMEOUT": "5",
              "LOG_FILE": "-"}
    values.update({k: str(v) for k, v in overrides.items()})
    return BemsoftClient(parse_settings(values, base_dir=tmp_path), gate=gate)


MINIMAL = {"batch": {"externalId": "sol-1"}}   # the fake answers faults before validating


def test_client_waits_the_backoff_sequence_between_attempts(tmp_path, api):
    gate, shutdown = stepping_gate()
    client = make_client(tmp_path, api, gate, BEMSOFT_RETRIES=3, BEMSOFT_BACKOFF=0.05)
    api.fail_next(10, status=503)
    try:
        delivery = client.deliver(MINIMAL, "sol-1-abc")
    finally:
        client.close()
    assert delivery.outcome == Verdict.TRANSIENT and delivery.attempts == 4 and delivery.status == 503
    assert [r["key"] for r in api.requests] == ["sol-1-abc"] * 4
    assert shutdown.waits == pytest.approx([0.05, 0.1, 0.2])   # doubling, exactly
    assert shutdown.shared_pause == [0, 0, 0]        # a plain backoff holds only this sender


def test_client_does_not_retry_a_permanent_answer(tmp_path, api):
    client = make_client(tmp_path, api, BEMSOFT_RETRIES=3, BEMSOFT_BACKOFF=0.01)
    api.fail_next(1, status=400, body={"errors": ["x"]})
    try:
        delivery = client.deliver(MINIMAL, "sol-1-abc")
    finally:
        client.close()
    assert (delivery.outcome, delivery.status, delivery.attempts) == (Verdict.PERMANENT, 400, 1)
    assert len(api.requests) == 1


def test_client_retry_after_pauses_the_shared_gate(tmp_path, api):
    gate, shutdown = stepping_gate()
    client = make_client(tmp_path, api, gate, BEMSOFT_RETRIES=2, BEMSOFT_BACKOFF=0.01)
    api.fail_next(3, status=503, retry_after="0.15")
    try:
        delivery = client.deliver(MINIMAL, "sol-1-abc")
    finally:
        client.close()
    assert delivery.outcome == Verdict.TRANSIENT and delivery.attempts == 3
    assert len(api.requests) == 3
    # the server's 0.15 s, not the 0.01 s backoff, held the shared gate before each retry
    assert shutdown.waits == pytest.approx([0.15, 0.15])
    assert shutdown.shared_pause == pytest.approx([0.15, 0.15])  # every sender was held


def test_client_stops_at_shutdown_without_posting(tmp_path, api):
    client = make_client(tmp_path, api)
    client.gate.shutdown.set()
    try:
        delivery = client.deliver(MINIMAL, "sol-1-abc")
    finally:
        client.close()
    assert delivery.outcome == Verdict.TRANSIENT and delivery.attempts == 0
    assert api.requests == []


# ---------------------------------------------------------------- one policy, four ladders
def test_the_cycle_pause_sequence_floor_doubling_cap_and_retry_after_as_a_minimum():
    from bemsoft_monitor.retry import cycle_pause
    pause = cycle_pause(backoff=0.2, max_backoff=20)   # at least 1 s
    assert [pause.delay(n, 0.0) for n in range(1, 8)] == [1, 2, 4, 8, 16, 20, 20]
    assert pause.delay(1, retry_after=7) == 7           # Retry-After raises the pause...
    assert pause.delay(4, retry_after=3) == 8           # ...but never shortens it
    assert pause.delay(1, retry_after=99) == 20         # and stays capped
    assert [cycle_pause(3, 300).delay(n) for n in (1, 2, 3)] == [3, 6, 12]


def test_the_database_ladders_reconnect_at_10_s_and_errors_at_60_s():
    from bemsoft_monitor.retry import DB_ERROR, DB_RECONNECT
    assert [DB_RECONNECT.delay(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert [DB_ERROR.delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]


def test_the_catalog_cadence_is_a_constant_ladder():
    from bemsoft_monitor.retry import CATALOG_UNLOADED, catalog_refresh
    assert [CATALOG_UNLOADED.delay(n) for n in (1, 2, 9)] == [5, 5, 5]
    assert CATALOG_UNLOADED.due(None, 0.0)
    assert not CATALOG_UNLOADED.due(100.0, 104.9) and CATALOG_UNLOADED.due(100.0, 105.0)
    assert catalog_refresh(600).delay(1) == 60 and catalog_refresh(30).delay(3) == 30
    assert catalog_refresh(0).due(10.0, 10.0)
