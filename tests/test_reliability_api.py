"""Short CI versions of the reliability scenarios against the API (issue "Reliability proof",
points 1, 2 and 7): the real monitor process, a real PostgreSQL database and the project's
fake API in its own process, driven by reliability/fault_matrix.py, crash_trials.py and
two_instances.py. The full-size runs are those scripts; these keep the same checks with
small numbers (the whole file runs in about a minute and a half)."""
from __future__ import annotations

import pytest

from reliability import common, crash_trials, fault_matrix, two_instances

pytestmark = [pytest.mark.postgres, pytest.mark.usefixtures("postgres_server")]

N = 30  # solicitations per fault-matrix case (2 items each)


def _explain(row: dict) -> str:
    return (f"{row['fault']} / concorrência {row['concurrency']}: {row['problems']} "
            f"(POSTs {row['posts_by_status']}, arquivos {row['failure_statuses']})")


ALONE = ["400", "401", "401-token-errado", "409", "429", "500", "502", "503", "504", "timeout",
         "conexao-derrubada", "201-com-erro", "201-com-erro-real", "lenta"]


@pytest.mark.parametrize("fault", ALONE)
def test_fault_alone_concurrency_4(fault):
    row = fault_matrix.run_fault(fault, 4, solicitations=N, timeout=60, quick=True)
    assert row["ok"], _explain(row)
    assert row["lost"] == 0 and row["duplicates"] == 0 and row["both"] == 0
    if fault_matrix.kind_of(fault) == fault_matrix.TRANSIENT:
        assert row["failure_files"] == 0
    if fault in ("400", "201-com-erro", "201-com-erro-real"):
        assert row["failure_files"] >= 1 and row["stored"] + row["failed_items"] == row["items"]


@pytest.mark.parametrize("fault", ["503", "201-com-erro"])
def test_fault_alone_concurrency_1(fault):
    row = fault_matrix.run_fault(fault, 1, solicitations=N, timeout=60, quick=True)
    assert row["ok"], _explain(row)


def test_faults_mixed_concurrency_4():
    row = fault_matrix.run_fault("misto", 4, solicitations=N, timeout=90, quick=True)
    assert row["ok"], _explain(row)
    assert sorted(row["failure_statuses"]) == [201, 400]   # a 401 pauses, never files


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "known limitation of the API (SPEC §5.2), kept visible: a client timeout whose late answer "
    "was '201 with an error body' (nothing saved, key remembered) is retried with the same "
    "Idempotency-Key and gets 409; the API cannot be asked which of the two happened, so the "
    "monitor counts it delivered (the usual case: the late answer was a 201) and logs a "
    "warning naming the exams to check. A new key instead would duplicate the usual case"))
def test_known_limitation_timeout_then_409_after_body_error():
    row = fault_matrix.run_fault("timeout+201-com-erro-real", 4, solicitations=10, timeout=60)
    assert row["lost"] == 0, _explain(row)


@pytest.mark.parametrize("concurrency", [1, 4])
def test_crash_trials(concurrency):
    stats = crash_trials.run_trials(concurrency, solicitations=200, items=2, kills=5,
                                    min_delay=0.1, max_delay=1.4, latency_per_worker=0.02,
                                    batch_size=100, seed_value=11, max_seconds=60, log=lambda m: None)
    assert stats["ok"], stats["problems"]
    assert stats["kills"] == 5 and stats["missing"] == 0 and stats["duplicates"] == 0
    assert stats["posts_by_status"].get("201") == 200
    assert stats["checkpoint"] == stats["last_id"] and stats["failure_files"] == 0


def test_crash_after_body_error_is_not_counted_delivered():
    """Regression (fixed in 3787e23): kill -9 right after the API answered '201 with an error
    body' (key remembered). The failure file must already exist, so the restart does not turn
    the re-send's 409 into 'delivered'."""
    result = crash_trials.crash_after_body_error(1, good=10, latency=0.1, timeout=60)
    assert result["ok"], result["problems"]
    assert result["missing"] == [] and result["failure_files"] == 1
    assert not result["counted_delivered_409"]


def test_fake_api_ignores_a_truncated_post():
    import time
    with common.FakeApiProcess() as api:
        common.send_truncated_post(api)
        time.sleep(0.3)
        state = api.state()
    assert state["keys"] == 0 and state["posts"] == 0, state["posts_by_status"]


def test_two_instances_one_sends_then_standby_takes_over():
    row = two_instances.run_round(solicitations=200, items=2, latency=0.05, concurrency=4,
                                  kill_fraction=0.6, takeover_timeout=30, drain_timeout=60,
                                  label="ci")
    assert row["ok"], row["problems"]
    assert row["standby_sent_before_kill"] == 0 and row["third_exit"] == 4
    assert row["takeover_s"] is not None and row["takeover_s"] <= 20
    assert row["missing"] == 0 and row["duplicates"] == 0
