"""Alerts (issue 15): incidents open once, remind, resolve once; the digest and the daily
summary; the channels against real servers on 127.0.0.1 (aiosmtpd with STARTTLS and AUTH,
the fake API's webhook and heartbeat receivers, a CONNECT proxy); `--test-alert`,
`--check` and the console's Alertas panel; and no secret or patient data in any message."""
from __future__ import annotations

import datetime as dt
import json
import logging
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from bemsoft_monitor.alerts import Alerter, describe_channels, send_test_alerts
from bemsoft_monitor.alerts.channels import EmailChannel, HeartbeatChannel, WebhookChannel
from bemsoft_monitor.alerts.dispatch import QUEUE_LIMIT
from bemsoft_monitor.alerts.incidents import Incidents
from bemsoft_monitor.alerts.notices import Notice, render
from bemsoft_monitor.checks import describe_alerts
from bemsoft_monitor.cli import run_test_alert
from bemsoft_monitor.client import Delivery, Verdict
from bemsoft_monitor.config import parse_settings
from bemsoft_monitor.console import Console
from bemsoft_monitor.status import StatusBoard
from bemsoft_monitor.testing.fakeapi import FakeBemsoft
from bemsoft_monitor.testing.mail import MailServer, free_port, mail_ca as make_mail_ca
from bemsoft_monitor.testing.network import API_HOST, ForwardProxy, HospitalCA
from conftest import LAB, ROOT, TOKEN, run

SP = ZoneInfo("America/Sao_Paulo")
T0 = dt.datetime(2026, 12, 3, 10, 0, tzinfo=SP).timestamp()
SMTP_USER, SMTP_PASSWORD = "monitor@lab.test", "Senha-SMTP-secreta-77"
HOOK = "/webhook/segredo-da-url-0123456789"
PATIENT = ("Maria Aparecida Sigilosa", "987.654.321-00", "98765432100", "1957-03-14", "14/03/1957")


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_settings(tmp_path, **values):
    base = {"DATABASE_URL": "sqlite://", "TERCEIROS": LAB, "BEMSOFT_TOKEN": TOKEN,
            "BEMSOFT_DRY_RUN": "0", "FAILED_DIR": str(tmp_path / "failed"), "LOG_FILE": "-",
            "ALERT_AFTER_SECONDS": "900", "ALERT_REPEAT_SECONDS": "14400"}
    return parse_settings({**base, **values}, base_dir=tmp_path)


def delivered(board, cod="1", items=1):
    board.settled(cod, items, f"sol-{cod}-k", "delivered", Delivery(Verdict.DELIVERED, 201, 1, "ok"))


def transient(board, cod="1"):
    board.settled(cod, 1, f"sol-{cod}-k", None, Delivery(Verdict.TRANSIENT, 503, 1, "503"))


def filed(board, cod, reason, items=1):
    board.settled(cod, items, f"sol-{cod}-k", "failed", Delivery(Verdict.PERMANENT, 400, 1, reason), reason)


def run_incidents(incidents, board, clock, seconds, step=1.0):
    """Evaluate every `step` seconds for `seconds`: all the notices that came out."""
    out = []
    end = clock.now + seconds
    while clock.now < end:
        clock.now += step
        out += incidents.evaluate(board.conditions())
    return out


# ---------------------------------------------------------------- incidents, pure
def test_a_refused_token_opens_at_once_reminds_and_resolves_once(tmp_path):
    clock = Clock()
    board = StatusBoard(clock=clock, tz=SP)
    incidents = Incidents(make_settings(tmp_path, ALERT_REPEAT_SECONDS="3600"))
    board.token_refused(401)
    first = incidents.evaluate(board.conditions())
    assert [(n.event, n.state) for n in first] == [("token", "aberto")]
    assert "Token recusado pela API (HTTP 401)" in first[0].title
    later = run_incidents(incidents, board, clock, 3 * 3600 + 5, step=10)
    assert [n.state for n in later] == ["lembrete"] * 3            # every ALERT_REPEAT_SECONDS
    board.token_accepted()
    delivered(board)
    board.cycle_done(False)
    done = run_incidents(incidents, board, clock, 600, step=5)
    assert [(n.event, n.state) for n in done] == [("token", "resolvido")]


def test_an_api_outage_is_told_only_after_the_threshold_and_flapping_is_not_a_storm(tmp_path):
    clock = Clock()
    board = StatusBoard(clock=clock, tz=SP)
    incidents = Incidents(make_settings(tmp_path, ALERT_AFTER_SECONDS="900"))
    for _ in range(20):                     # down 10 min, back for a moment: twenty times
        transient(board)
        assert run_incidents(incidents, board, clock, 600, step=30) == []
        delivered(board)
    transient(board)                        # then down for good
    notices = run_incidents(incidents, board, clock, 3600, step=15)
    assert [(n.event, n.state) for n in notices] == [("api", "aberto")]
    assert notices[0].title == "API Bemsoft indisponível há 15 min"
    delivered(board)
    assert [(n.event, n.state) for n in run_incidents(incidents, board, clock, 60)] == [("api", "resolvido")]


def test_database_stalled_standby_and_disk_incidents(tmp_path):
    clock = Clock()
    board = StatusBoard(clock=clock, tz=SP)
    incidents = Incidents(make_settings(tmp_path, ALERT_AFTER_SECONDS="600", DEBOUNCE_SECONDS="60"))
    board.db_down("leituras do banco canceladas por DB_QUERY_TIMEOUT")
    notices = run_incidents(incidents, board, clock, 700, step=10)
    assert [(n.event, n.state) for n in notices] == [("banco", "aberto")]
    assert "DB_QUERY_TIMEOUT" in notices[0].lines[0]
    board.cycle_done(True)                              # the database answers again
    board.progress(100, 5)                              # 5 items waiting, nothing delivered
    notices = run_incidents(incidents, board, clock, 700, step=10)
    assert [(n.event, n.state) for n in notices] == [("banco", "resolvido"), ("parado", "aberto")]
    assert "5 itens" in notices[1].title                # after ALERT_AFTER + DEBOUNCE, not before
    delivered(board)
    board.progress(105, 0)
    board.standby()
    board.disk_error("FAILED_DIR", "[Errno 28] No space left on device")
    notices = run_incidents(incidents, board, clock, 700, step=10)
    assert [(n.event, n.state) for n in notices] == [("parado", "resolvido"), ("disco", "aberto"),
                                                      ("espera", "aberto")]
    assert "No space left" in notices[1].lines[0]


def test_the_failure_digest_groups_says_what_to_fix_and_waits_between_digests(tmp_path):
    clock = Clock()
    board = StatusBoard(clock=clock, tz=SP)
    settings = make_settings(tmp_path, ALERT_FAILURES_SECONDS="3600")
    incidents = Incidents(settings, replay="python retry_failed.py --dir completo/failed_events --send")
    filed(board, "1001", f"paciente pat-503 sem sexo M/F: {PATIENT[0]} preencha paciente.sexo")
    filed(board, "1002", "paciente pat-504 sem sexo M/F: preencha paciente.sexo")
    filed(board, "1003", f"API rejeitou o pedido (HTTP 400, validação): {PATIENT[1]} inválido", items=2)
    clock.now += 1
    digest = incidents.digest(clock.now, board.filed_after(0))
    assert digest.title == "3 falha(s) nova(s) em FAILED_DIR"
    text = render(digest, settings, "lab-pc").text
    assert "- 2 × paciente sem sexo M/F: corrija paciente.sexo ou defina DEFAULT_GENDER no .env " \
           "(solicitações 1001, 1002)" in text
    assert "- 1 × a API rejeitou o pedido (HTTP 400, validação)" in text
    assert text.rstrip().endswith("python retry_failed.py --dir completo/failed_events --send")
    assert digest.counts["falhas"] == 3 and digest.counts["itens"] == 4
    for value in PATIENT:
        assert value not in text
    filed(board, "1004", "item 9: exame 'XYZ' não existe no catálogo /tests da Bemsoft")
    clock.now += 600
    assert incidents.digest(clock.now, board.filed_after(incidents.digest_marker)) is None
    clock.now += 3000
    second = incidents.digest(clock.now, board.filed_after(incidents.digest_marker))
    assert second.counts["falhas"] == 1 and "exame fora do catálogo" in render(second, settings, "h").text


def test_the_daily_summary_at_its_hour_with_yesterdays_counts(tmp_path):
    clock = Clock(dt.datetime(2026, 12, 2, 9, 0, tzinfo=SP).timestamp())
    board = StatusBoard(clock=clock, tz=SP)
    incidents = Incidents(make_settings(tmp_path, ALERT_DAILY_AT="07:30"))
    assert incidents.daily(clock.now, board, board.conditions().started, 0) is None  # started after 07:30
    delivered(board, "1", items=3)
    delivered(board, "2", items=1)
    filed(board, "3", "paciente sem sexo M/F")
    clock.now = dt.datetime(2026, 12, 3, 7, 29, tzinfo=SP).timestamp()
    assert incidents.daily(clock.now, board, T0 - 86400, 7) is None
    clock.now += 60
    summary = incidents.daily(clock.now, board, dt.datetime(2026, 12, 2, 9, 0, tzinfo=SP).timestamp(), 7)
    assert summary.title == "Resumo de 02/12/2026: 2 entregue(s), 1 falha(s)"
    assert summary.counts == {"entregues": 2, "itens_entregues": 4, "falhas": 1, "itens_com_falha": 1,
                              "aguardando": 7}
    assert any("desde a partida do monitor" in line for line in summary.lines)
    clock.now += 3600
    assert incidents.daily(clock.now, board, T0, 7) is None       # once a day


# ---------------------------------------------------------------- no secret, no patient data
NAMES = st.sampled_from(["Maria Aparecida Sigilosa", "José da Silva Ñandú", "Zoë O'Connor"])
CPFS = st.from_regex(r"\d{3}\.\d{3}\.\d{3}-\d{2}", fullmatch=True)
DATES = st.dates(dt.date(1920, 1, 1), dt.date(2020, 12, 31))
OURS = st.sampled_from(["paciente pat-5 sem sexo M/F: ", "API rejeitou o pedido (HTTP 400, validação): ",
                        "item 4: exame 'X' não existe no catálogo /tests da Bemsoft: ", "",
                        "erro inesperado ao montar o pedido: ", "solicitação 7 não encontrada: "])


@hsettings(max_examples=60, deadline=None, database=None)
@given(prefix=OURS, name=NAMES, cpf=CPFS, birth=DATES, noise=st.text(max_size=20),
       order=st.permutations(range(4)))
def test_reasons_holding_names_cpfs_dates_and_tokens_never_reach_a_message(tmp_path_factory, prefix,
                                                                          name, cpf, birth, noise, order):
    tmp_path = tmp_path_factory.mktemp("p")
    settings = make_settings(tmp_path, SMTP_HOST="smtp.lab.test", ALERT_EMAIL_TO="ti@lab.test",
                             SMTP_USER=SMTP_USER, SMTP_PASSWORD=SMTP_PASSWORD,
                             ALERT_WEBHOOK_URL=f"https://hooks.lab.test{HOOK}")
    pieces = [name, cpf, birth.isoformat(), f"Bearer {TOKEN}"]
    reason = prefix + noise.join(pieces[i] for i in order) + f" {birth:%d/%m/%Y} {SMTP_PASSWORD}"
    clock = Clock()
    board = StatusBoard(clock=clock, tz=SP)
    filed(board, "77", reason)
    board.db_down(f"banco de dados indisponível (senha {SMTP_PASSWORD} token {TOKEN})")
    clock.now += 5000
    incidents = Incidents(settings)
    notices = incidents.evaluate(board.conditions()) + [incidents.digest(clock.now, board.filed_after(0))]
    assert {n.event for n in notices} == {"banco", "falhas"}
    for notice in notices:
        message = render(notice, settings, "lab-pc")
        shown = message.subject + message.text + json.dumps(message.payload, ensure_ascii=False)
        for secret in (name, cpf, cpf.replace(".", "").replace("-", ""), birth.isoformat(),
                       f"{birth:%d/%m/%Y}", TOKEN, SMTP_PASSWORD, HOOK.rsplit("/", 1)[1]):
            assert secret not in shown


# ---------------------------------------------------------------- channels, real servers
@pytest.fixture
def mail_ca(tmp_path):
    return make_mail_ca(tmp_path)


def mail_settings(tmp_path, server, ca=None, **extra):
    values = {"ALERT_EMAIL_TO": "ti@lab.test, gerente@lab.test", "SMTP_HOST": "127.0.0.1",
              "SMTP_PORT": str(server.port if server else free_port()), "SMTP_USER": SMTP_USER,
              "SMTP_PASSWORD": SMTP_PASSWORD, "MONITOR_NAME": "lab-central"}
    if ca is not None:
        values["BEMSOFT_CA_BUNDLE"] = str(ca.ca_pem)
    return make_settings(tmp_path, **{**values, **extra})


@pytest.mark.parametrize("mode, security, login_only", [
    ("starttls", "starttls", True),     # Microsoft 365: 587, STARTTLS, AUTH LOGIN only
    ("starttls", "starttls", False),    # Gmail: 587, STARTTLS, AUTH PLAIN or LOGIN
    ("ssl", "ssl", False)])             # 465, TLS from the first byte
def test_email_goes_through_tls_and_auth_with_the_prefix_and_no_secret(tmp_path, mail_ca, mode, security,
                                                                      login_only):
    with MailServer(mode, ca=mail_ca, users={SMTP_USER: SMTP_PASSWORD}, login_only=login_only) as server:
        settings = mail_settings(tmp_path, server, mail_ca, SMTP_SECURITY=security)
        notice = Notice("token", "aberto", "Token recusado pela API (HTTP 401)", ("linha",))
        EmailChannel(settings).send(render(notice, settings, "lab-pc"))
    [message] = server.messages
    assert message["Subject"] == "[bemsoft-monitor lab-central@lab-pc] Token recusado pela API (HTTP 401)"
    assert message["From"] == SMTP_USER and "gerente@lab.test" in message["To"]
    assert server.logins == [(SMTP_USER, True)]
    body = message.get_content()
    assert body.startswith("[bemsoft-monitor lab-central@lab-pc]") and SMTP_PASSWORD not in body


def test_an_internal_relay_without_auth_on_a_plain_port(tmp_path):
    with MailServer("plain") as server:
        settings = make_settings(tmp_path, ALERT_EMAIL_TO="ti@lab.test", SMTP_HOST="127.0.0.1",
                                 SMTP_PORT=str(server.port), SMTP_SECURITY="none",
                                 ALERT_EMAIL_FROM="monitor@lab.test")
        assert send_test_alerts(settings, host="lab-pc") == [
            ("e-mail", f"para ti@lab.test via 127.0.0.1:{server.port} (sem TLS, sem autenticação)", None)]
    assert server.messages[0]["Subject"] == "[bemsoft-monitor bemsoft@lab-pc] Mensagem de teste"


@pytest.mark.parametrize("case, expected", [
    ("wrong-password", "autenticação recusada"),
    ("no-starttls", "não oferece STARTTLS"),
    ("unknown-ca", "certificado TLS de 127.0.0.1 não confiável"),
    ("down", "recusou a conexão"),
])
def test_test_alert_says_why_a_channel_failed(tmp_path, mail_ca, capsys, case, expected):
    mode = "plain" if case == "no-starttls" else "starttls"
    with MailServer(mode, ca=mail_ca, users={SMTP_USER: SMTP_PASSWORD}) as server:
        settings = mail_settings(tmp_path, None if case == "down" else server,
                                 None if case == "unknown-ca" else mail_ca,
                                 **({"SMTP_PASSWORD": "senha-errada-123"} if case == "wrong-password" else {}))
        assert run_test_alert(settings) == 1
    out = capsys.readouterr().out
    [line] = out.splitlines()
    assert line.startswith("[ERRO] e-mail para ti@lab.test, gerente@lab.test via 127.0.0.1:")
    assert expected in line
    assert SMTP_PASSWORD not in out and "senha-errada-123" not in out
    assert server.messages == []


def test_test_alert_command_sends_on_every_channel_and_exits_0_or_2(tmp_path, mail_ca, api):
    with MailServer("starttls", ca=mail_ca, users={SMTP_USER: SMTP_PASSWORD}) as server:
        env = tmp_path / "alertas.env"
        env.write_text("\n".join([
            "DATABASE_URL=sqlite://", f"TERCEIROS={LAB}", f"BEMSOFT_TOKEN={TOKEN}",
            f"FAILED_DIR={tmp_path / 'failed'}", "LOG_FILE=-", "ALERT_EMAIL_TO=ti@lab.test",
            "SMTP_HOST=127.0.0.1", f"SMTP_PORT={server.port}", f"SMTP_USER={SMTP_USER}",
            f"SMTP_PASSWORD={SMTP_PASSWORD}", f"BEMSOFT_CA_BUNDLE={mail_ca.ca_pem}",
            f"ALERT_WEBHOOK_URL={api.url}{HOOK}", f"HEARTBEAT_URL={api.url}/ping/uuid-secreto-abcdef",
            ""]), encoding="utf-8")
        done = run("monitor_bemsoft.py", "--env-file", str(env), "--test-alert")
        assert done.returncode == 0, done.stdout + done.stderr
        lines = done.stdout.splitlines()
        assert [line.split()[1] for line in lines] == ["e-mail", "webhook", "heartbeat"]
        assert all(line.startswith("[OK]") for line in lines)
        assert f"webhook http://127.0.0.1:{api.port}/***: mensagem de teste enviada" in done.stdout
        for secret in (SMTP_PASSWORD, "segredo-da-url", "uuid-secreto", TOKEN):
            assert secret not in done.stdout + done.stderr
        assert len(server.messages) == 1 and len(api.webhooks) == 1 and len(api.heartbeats) == 1
        assert api.webhooks[0]["body"]["event"] == "teste"
        env.write_text(env.read_text(encoding="utf-8") + "SMTP_SECURITY=talvez\n", encoding="utf-8")
        bad = run("monitor_bemsoft.py", "--env-file", str(env), "--test-alert")
        assert bad.returncode == 2 and "SMTP_SECURITY" in bad.stdout + bad.stderr


def test_webhook_through_the_hospital_proxy_and_ca_with_text_and_fields(tmp_path):
    ca = HospitalCA(tmp_path)
    with FakeBemsoft(token=TOKEN, tls=ca.server_context(), host_name=API_HOST) as hooks, \
            ForwardProxy() as proxy:
        settings = make_settings(tmp_path, ALERT_WEBHOOK_URL=f"{hooks.url}{HOOK}",
                                 HTTPS_PROXY=proxy.url, BEMSOFT_CA_BUNDLE=str(ca.ca_pem),
                                 MONITOR_NAME="lab-central")
        channel = WebhookChannel(settings)
        assert channel.describe() == f"https://{API_HOST}:{hooks.port}/*** via proxy {proxy.url}"
        channel.send(render(Notice("api", "aberto", "API Bemsoft indisponível há 15 min", ("a", "b"),
                                   since=T0, counts={"aguardando": 3}), settings, "lab-pc"))
        [hook] = hooks.webhooks
        assert proxy.tunnels and hook["path"] == HOOK
        body = hook["body"]
        assert body["text"].startswith("[bemsoft-monitor lab-central@lab-pc] API Bemsoft indisponível")
        assert {k: body[k] for k in ("event", "state", "monitor", "host", "counts")} == {
            "event": "api", "state": "aberto", "monitor": "lab-central", "host": "lab-pc",
            "counts": {"aguardando": 3}}
        assert body["since"] == "2026-12-03T13:00:00+00:00"
        no_ca = make_settings(tmp_path, ALERT_WEBHOOK_URL=f"{hooks.url}{HOOK}", HTTPS_PROXY=proxy.url)
        [(name, _, error)] = send_test_alerts(no_ca)
        assert name == "webhook" and "não confiável" in error and "BEMSOFT_CA_BUNDLE" in error
        assert "segredo-da-url" not in error


def test_check_lists_the_channels_without_secrets(tmp_path, api):
    settings = make_settings(tmp_path, ALERT_EMAIL_TO="ti@lab.test", SMTP_HOST="smtp.office365.com",
                             SMTP_USER=SMTP_USER, SMTP_PASSWORD=SMTP_PASSWORD,
                             ALERT_WEBHOOK_URL=f"https://prod-00.westus.logic.azure.com{HOOK}?sig=abcdef123456",
                             HEARTBEAT_URL="https://hc-ping.com/uuid-secreto-abcdef")
    lines = [text for _, text in describe_alerts(settings)]
    assert lines[:3] == [
        f"Alertas por e-mail: para ti@lab.test via smtp.office365.com:587 (STARTTLS, autenticado como {SMTP_USER})",
        "Alertas por webhook: https://prod-00.westus.logic.azure.com/***",
        "Alertas por heartbeat: https://hc-ping.com/***"]
    assert "--test-alert" in lines[3]
    assert not any(s in "".join(lines) for s in (SMTP_PASSWORD, "segredo", "abcdef123456", "uuid-secreto"))
    for secret in ("segredo-da-url-0123456789", "abcdef123456", "uuid-secreto-abcdef", SMTP_PASSWORD):
        assert secret in "|".join(settings.secrets)  # and redacted wherever an error quotes them
    assert describe_alerts(make_settings(tmp_path))[0][0] is None   # none: a warning


# ---------------------------------------------------------------- the dispatcher
def test_a_channel_down_is_retried_later_logged_once_and_its_queue_stays_bounded(tmp_path, caplog):
    clock = Clock()
    board = StatusBoard(clock=clock, tz=SP)
    settings = make_settings(tmp_path, ALERT_EMAIL_TO="ti@lab.test", SMTP_HOST="127.0.0.1",
                             SMTP_PORT=str(free_port()), ALERT_EMAIL_FROM="m@lab.test",
                             SMTP_SECURITY="none", ALERT_TIMEOUT="2")
    alerter = Alerter(settings, board, [EmailChannel(settings)], replay="r", clock=clock, host="h")
    with caplog.at_level(logging.INFO):
        for n in range(100):
            alerter.post(Notice("teste", "teste", f"mensagem {n}"))
            alerter.send_due()
            clock.now += 1
    assert alerter.queued() == QUEUE_LIMIT and alerter.lanes[0].dropped == 100 - QUEUE_LIMIT
    assert caplog.text.count("Alerta não enviado por e-mail") == 1
    view = alerter.view()
    assert view.channels == (("e-mail", f"para ti@lab.test via 127.0.0.1:{settings.smtp_port} "
                                        "(sem TLS, sem autenticação)", "com falha"),)
    assert "recusou a conexão" in view.last_error[2] and view.dropped == 80
    attempts = alerter.lanes[0].failures
    assert 2 <= attempts <= 5                 # 30 s, 60 s... not once a second


def test_the_heartbeat_follows_healthy_cycles_at_most_once_a_minute(tmp_path, api):
    clock = Clock()
    board = StatusBoard(clock=clock, tz=SP)
    settings = make_settings(tmp_path, HEARTBEAT_URL=f"{api.url}/ping/uuid-secreto-abcdef")
    alerter = Alerter(settings, board, [HeartbeatChannel(settings)], replay="r", clock=clock, host="h")
    alerter.tick()
    assert api.heartbeats == []               # no healthy cycle yet
    for _ in range(10):                       # a cycle every 5 s for 50 s
        board.cycle_done(False)
        clock.now += 5
        alerter.tick()
    assert len(api.heartbeats) == 1
    clock.now += 60
    alerter.tick()
    assert len(api.heartbeats) == 2           # for the cycles since the first ping
    clock.now += 300
    alerter.tick()
    assert len(api.heartbeats) == 2           # the loop did not turn: no ping (the monitor is stuck)
    board.cycle_done(False)
    alerter.tick()
    assert len(api.heartbeats) == 3


def test_a_folder_that_cannot_be_written_opens_and_clears_the_disk_incident(tmp_path, api):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x", encoding="utf-8")
    clock = Clock()
    board = StatusBoard(clock=clock, tz=SP)
    settings = make_settings(tmp_path, FAILED_DIR=str(blocker / "failed"), ALERT_WEBHOOK_URL=f"{api.url}{HOOK}")
    alerter = Alerter(settings, board, [WebhookChannel(settings)], replay="r", clock=clock, host="h")
    alerter.tick()
    [opened] = api.webhooks
    assert opened["body"]["event"] == "disco" and "FAILED_DIR" in opened["body"]["text"]
    blocker.unlink()
    clock.now += 61
    alerter.tick()
    assert [h["body"]["state"] for h in api.webhooks] == ["aberto", "resolvido"]
    assert not list((blocker / "failed").glob(".tmp-probe-*"))


def test_the_console_panel_shows_channels_last_message_errors_and_open_incidents(tmp_path, api):
    clock = Clock()
    board = StatusBoard(clock=clock, tz=SP)
    settings = make_settings(tmp_path, ALERT_WEBHOOK_URL=f"{api.url}{HOOK}", SMTP_HOST="127.0.0.1",
                             ALERT_EMAIL_TO="ti@lab.test", SMTP_PORT=str(free_port()),
                             SMTP_USER=SMTP_USER, SMTP_PASSWORD=SMTP_PASSWORD)
    alerter = Alerter(settings, board, [WebhookChannel(settings), EmailChannel(settings)],
                      replay="r", clock=clock, host="h")
    board.token_refused(401)
    alerter.tick()
    page = Console(board, settings, alerts=alerter).page()
    view = page["alertas"]
    assert [c[0] for c in view.channels] == ["webhook", "e-mail"]
    assert view.channels[0][2] == "ok" and view.channels[1][2] == "com falha"
    facts = dict(view.facts)
    assert "por webhook: [bemsoft-monitor bemsoft@h] Token recusado pela API (HTTP 401)" in facts[
        "Última mensagem enviada"]
    assert "em e-mail:" in facts["Último erro de um canal"]
    assert view.incidents[0][0] == "Token recusado pela API"
    html = Console(board, settings, alerts=alerter).render()
    for secret in ("segredo-da-url", SMTP_PASSWORD, TOKEN):
        assert secret not in html
    assert page["estado"].banner.text.startswith("Token recusado pela API")
    assert Console(board, make_settings(tmp_path)).page()["alertas"].note.startswith("Nenhum canal")


def test_the_readme_env_lines_for_each_relay_and_service_are_valid_settings(tmp_path):
    import re
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("\n## Alertas\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```env\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 5             # Microsoft 365, Gmail, internal relay, Teams, healthchecks.io
    channels = []
    for block in blocks:
        values = dict(line.split("=", 1) for line in block.strip().splitlines())
        channels += [name for name, _ in describe_channels(make_settings(tmp_path, **values))]
    assert channels == ["e-mail", "e-mail", "e-mail", "webhook", "heartbeat"]
