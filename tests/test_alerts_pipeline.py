"""Issue 15 end to end: the real monitor (SQLite, the fake API over 127.0.0.1) with the real
alerter ticked in step with it, at concurrency 1 and 4 — a revoked token, an API outage,
a mail server that is down, a failure digest; then `--status` and `retry_failed --send`
while the token is refused."""
from __future__ import annotations

import datetime as dt
import json
import logging

import pytest

from bemsoft_monitor.alerts import Alerter
from bemsoft_monitor.alerts.channels import EmailChannel, WebhookChannel
from bemsoft_monitor.alerts.dispatch import QUEUE_LIMIT
from bemsoft_monitor.alerts.notices import Notice
from bemsoft_monitor.failures import FailureStore
from bemsoft_monitor.payload import idempotency_key
from bemsoft_monitor.status import StatusBoard
from bemsoft_monitor.testing.mail import free_port
from conftest import TOKEN, Harness, fresh_database, run, wait_until
from test_alerts import SP, T0, Clock
from test_api_behaviour import FAST, failure_files, fast_clocks, posts, stored_once

HOOK = "/webhook/segredo-da-url-0123456789"


@pytest.fixture
def lab(request, api, settings_factory):
    """The alerts do not depend on the engine: SQLite keeps these scenarios short."""
    harness = Harness(fresh_database(request, "sqlite"), api, settings_factory)
    yield harness
    harness.close()


def alerting_monitor(lab, concurrency, **settings):
    """A monitor whose board runs on a clock the test moves, and an alerter on that clock
    posting to the fake API's webhook receiver."""
    clock = Clock()
    board = StatusBoard(clock=clock, tz=SP)
    monitor = fast_clocks(lab, lab.monitor(status=board, BEMSOFT_CONCURRENCY=str(concurrency),
                                           ALERT_WEBHOOK_URL=f"{lab.api.url}{HOOK}", **FAST, **settings))
    alerter = Alerter(monitor.settings, board, [WebhookChannel(monitor.settings)], replay="r",
                      clock=clock, host="lab-pc")
    return monitor, alerter, clock


def hooks(api, event=None):
    return [(h["body"]["event"], h["body"]["state"]) for h in api.webhooks
            if event is None or h["body"]["event"] == event]


@pytest.mark.parametrize("concurrency", [1, 4])
def test_token_revoked_then_accepted_one_alert_one_recovery_everything_once(lab, tmp_path, concurrency):
    monitor, alerter, clock = alerting_monitor(lab, concurrency)
    first = lab.order(1, ["GLI"])
    monitor.step()
    alerter.tick()
    lab.api.token = "revogado-na-bemsoft"
    waiting = {cod: lab.order(cod, ["TSH", "GLI"]) for cod in range(2, 8)}
    for _ in range(3):                          # refused, then probed at the backoff, twice
        monitor.step()
        clock.now += 30
        alerter.tick()
        monitor.skip_pause()
    assert hooks(lab.api) == [("token", "aberto")]
    assert failure_files(tmp_path) == [] and lab.checkpoint() == max(first)
    lab.api.token = TOKEN                       # accepted again: no restart, no replay
    while monitor.step().more or lab.checkpoint() < max(waiting[7]):
        pass
    clock.now += 1
    alerter.tick()
    assert hooks(lab.api) == [("token", "aberto"), ("token", "resolvido")]
    assert stored_once(lab.api, first + [i for ids in waiting.values() for i in ids])
    assert failure_files(tmp_path) == []
    for cod, ids in waiting.items():            # every attempt of an order under one key
        assert {p["key"] for p in posts(lab.api) if p["body"]["batch"]["externalId"] == f"sol-{cod}"} \
            == {idempotency_key(str(cod), ids)}
    text = lab.api.webhooks[0]["body"]["text"]
    assert text.startswith("[bemsoft-monitor bemsoft@lab-pc] Token recusado pela API (HTTP 401)")
    assert "BEMSOFT_TOKEN" in text and TOKEN not in text


@pytest.mark.parametrize("concurrency", [1, 4])
def test_an_api_outage_longer_than_the_threshold_one_alert_one_recovery(lab, tmp_path, concurrency):
    monitor, alerter, clock = alerting_monitor(lab, concurrency, ALERT_AFTER_SECONDS="900")
    ids = [i for cod in range(1, 6) for i in lab.order(cod, ["GLI"])]
    lab.api.fail_next(10_000, status=503)
    for _ in range(8):                          # 8 × 5 min of 503s
        monitor.step()
        monitor.skip_pause()
        clock.now += 300
        alerter.tick()
    assert hooks(lab.api) == [("api", "aberto")]
    assert "API Bemsoft indisponível há 15 min" in lab.api.webhooks[0]["body"]["text"]
    lab.api.clear_faults()
    while monitor.step().more or lab.checkpoint() < max(ids):
        pass
    alerter.tick()
    clock.now += 3600
    alerter.tick()
    assert hooks(lab.api) == [("api", "aberto"), ("api", "resolvido")]
    assert stored_once(lab.api, ids) and failure_files(tmp_path) == []


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_mail_server_down_costs_no_delivery_and_the_queue_stays_bounded(lab, tmp_path, caplog,
                                                                          concurrency):
    """The alerter runs in its own thread against an SMTP port nobody listens on, with
    messages arriving faster than they could ever leave, while the monitor drains."""
    board = StatusBoard(tz=SP)
    monitor = lab.monitor(status=board, BEMSOFT_CONCURRENCY=str(concurrency),
                          ALERT_EMAIL_TO="ti@lab.test", SMTP_HOST="127.0.0.1",
                          SMTP_PORT=str(free_port()), ALERT_EMAIL_FROM="monitor@lab.test",
                          SMTP_SECURITY="none", ALERT_TIMEOUT="1")
    alerter = Alerter(monitor.settings, board, [EmailChannel(monitor.settings)], replay="r").start()
    ids = [i for cod in range(1, 41) for i in lab.order(cod, ["GLI", "TSH"])]
    try:
        with caplog.at_level(logging.INFO):
            while True:
                for n in range(3 * QUEUE_LIMIT):
                    alerter.post(Notice("teste", "teste", f"ruído {n}"))
                if not monitor.step().more and lab.checkpoint() >= max(ids):
                    break
            wait_until(lambda: alerter.view().last_error is not None, timeout=10)
    finally:
        alerter.stop()
    assert stored_once(lab.api, ids) and lab.checkpoint() == max(ids)
    assert failure_files(tmp_path) == []
    assert alerter.queued() <= QUEUE_LIMIT and alerter.lanes[0].dropped > 0
    assert caplog.text.count("Alerta não enviado por e-mail") == 1
    assert "recusou a conexão" in alerter.view().last_error[2]


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_failure_digest_names_reasons_counts_and_the_replay_command_never_the_patient(
        lab, tmp_path, concurrency):
    monitor, alerter, clock = alerting_monitor(lab, concurrency)
    alerter.incidents.replay = "python retry_failed.py --dir completo/failed_events --send"
    secret_patient = {"nome": "Maria Aparecida Sigilosa", "cpf": "987.654.321-00",
                      "datanasc": dt.datetime(1957, 3, 14), "sexo": "?"}
    lab.order(1, ["GLI"], patient=secret_patient)                 # no gender, no default: failed
    lab.order(2, ["GLI"], patient={**secret_patient, "codpaciente": 777})
    third = lab.order(3, ["NAO-EXISTE", "GLI"])                   # one item outside the catalog
    ok = lab.order(4, ["TSH"])
    while monitor.step().more:
        pass
    alerter.tick()
    [(event, state)] = hooks(lab.api)
    body = lab.api.webhooks[0]["body"]
    assert (event, state) == ("falhas", "falhas") and body["counts"]["falhas"] == 3
    text = body["text"]
    assert "- 2 × paciente sem sexo M/F: corrija paciente.sexo ou defina DEFAULT_GENDER no .env " \
           "(solicitações 1, 2)" in text
    assert "- 1 × exame fora do catálogo /tests da Bemsoft" in text
    assert text.rstrip().endswith("python retry_failed.py --dir completo/failed_events --send")
    shown = json.dumps(body, ensure_ascii=False)
    for value in ("Maria", "Sigilosa", "987.654.321-00", "98765432100", "1957-03-14", "14/03/1957", TOKEN):
        assert value not in shown
    assert len(failure_files(tmp_path)) == 3 and stored_once(lab.api, [ok[0], third[1]])
    lab.order(5, ["NAO-EXISTE"])
    monitor.step()
    clock.now += 60
    alerter.tick()
    assert len(lab.api.webhooks) == 1            # at most every ALERT_FAILURES_SECONDS
    clock.now += 3600
    alerter.tick()
    assert lab.api.webhooks[1]["body"]["counts"]["falhas"] == 1


def test_status_says_the_token_is_refused_and_retry_stops_leaving_the_files(lab, tmp_path, env_file):
    """`--status` (another process) and `retry_failed --send` while the API refuses the token."""
    monitor = fast_clocks(lab, lab.monitor(**FAST))
    lab.order(1, ["GLI"])
    lab.api.token = "revogado-na-bemsoft"
    monitor.step()
    status = run("monitor_bemsoft.py", "--env-file", str(env_file), "--status")
    assert "Envio: Token recusado pela API (HTTP 401) desde" in status.stdout, status.stdout
    store = FailureStore(tmp_path / "failed")
    event = {"cod_solicitacao": "9", "solicitacao": {"codsolicitacao": 9, "codpaciente": 9,
                                                     "dtaentrada": "2026-11-27T00:00:00", "Hora": "08:30"},
             "paciente": {"codpaciente": 9, "nome": "Fulano", "datanasc": "1980-01-02T00:00:00",
                          "sexo": "F", "cpf": None},
             "items": [{"CodItemSol": 90 + n, "CodSolicitacao": 9, "CodConvExames": "GLI",
                        "DataEntrada": "2026-11-27T08:31:00"} for n in (1, 2)]}
    from bemsoft_monitor.failures import FailureRecord
    for cod in ("9", "10"):
        store.write(FailureRecord(reason="r", key=f"sol-{cod}-abc", cod=cod, item_ids=[91, 92],
                                  event=dict(event, cod_solicitacao=cod)))
    before = {p.name: p.read_bytes() for p in store.files()}
    done = run("retry_failed.py", "--env-file", str(env_file), "--dir", str(store.directory), "--send")
    assert done.returncode == 1
    [stopped] = [line for line in done.stdout.splitlines() if line.startswith("[PARADO]")]
    assert "Token recusado pela API (HTTP 401)" in stopped, done.stdout
    assert "Nenhum arquivo foi alterado; 2 arquivo(s) continuam em FAILED_DIR" in done.stdout
    assert {p.name: p.read_bytes() for p in store.files()} == before
    assert TOKEN not in done.stdout + done.stderr
    lab.api.token = TOKEN
    if monitor.gate.remaining() > 0:      # the pause after the refusal may not be over yet
        monitor.skip_pause()              # (it also lets the catalog be asked again)
    else:
        lab.clock_value += 10
    monitor.step()
    status = run("monitor_bemsoft.py", "--env-file", str(env_file), "--status")
    assert "Token recusado" not in status.stdout


def test_the_command_line_monitor_alerts_before_it_exits(lab, tmp_path, env_file):
    """The wiring of the real command: `--once` with a refused token and a webhook sends the
    alert in its last round, before the process ends; nothing is filed."""
    lab.order(1, ["GLI"])
    with open(env_file, "a", encoding="utf-8") as env:
        env.write(f"BEMSOFT_TOKEN=token-revogado-123\nALERT_WEBHOOK_URL={lab.api.url}{HOOK}\n")
    done = run("monitor_bemsoft.py", "--env-file", str(env_file), "--once")
    assert done.returncode == 0, done.stderr
    assert hooks(lab.api) == [("token", "aberto")]
    assert failure_files(tmp_path) == []
    assert "token-revogado-123" not in json.dumps(lab.api.webhooks) + done.stdout + done.stderr
