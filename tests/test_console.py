"""The operator console's view model and page: exact figures, the chart's bars, failure
groups and their replay command, privacy (no patient data, no secret), STATUS_TOKEN rules,
and `--status` saying the same things as the page."""
from __future__ import annotations

import datetime as dt
import json
import re
import urllib.error
import urllib.request
from html import escape
from html.parser import HTMLParser
from zoneinfo import ZoneInfo

import pytest

from bemsoft_monitor.client import Delivery, Verdict
from bemsoft_monitor.config import ConfigError, Proxy, is_loopback, parse_settings
from bemsoft_monitor.console import Console
from bemsoft_monitor.console.access import authorized
from bemsoft_monitor.console.markup import render_page
from bemsoft_monitor.console.page import build_page
from bemsoft_monitor.console.panels import PANELS, Panel
from bemsoft_monitor.console.scan import FailureScan, reason_group
from bemsoft_monitor.console.words import mask_url, replay_command
from bemsoft_monitor.failures import FailureRecord, FailureStore
from bemsoft_monitor.status import DELIVERED, FAILED, StatusBoard
from conftest import LAB, TOKEN, run

SP = ZoneInfo("America/Sao_Paulo")
T0 = dt.datetime(2026, 11, 29, 10, 0, tzinfo=SP).timestamp()
PATIENT = {"codpaciente": 503, "nome": "Maria Aparecida Sigilosa", "cpf": "987.654.321-00",
           "datanasc": "1957-03-14", "sexo": None}


class Clock:
    def __init__(self, now=T0):
        self.now = now

    def __call__(self):
        return self.now


def settings_for(tmp_path, **extra):
    values = {"DATABASE_URL": "postgresql+psycopg://lis_user:SENHA-DO-BANCO@db.lab.local:5433/LIS",
              "TERCEIROS": LAB, "BEMSOFT_TOKEN": TOKEN, "BEMSOFT_DRY_RUN": "0",
              "BEMSOFT_BASE_URL": "https://bemsoft.example.test", "BEMSOFT_CONCURRENCY": "6",
              "FAILED_DIR": str(tmp_path / "failed"), "STATUS_TOKEN": "painel-token-0123456789"}
    values.update(extra)
    return parse_settings(values, base_dir=tmp_path)


def failure(store, cod, reason, *, status=None, patient=PATIENT, response=""):
    event = {"cod_solicitacao": cod, "solicitacao": {"codsolicitacao": cod, "codpaciente": 503},
             "paciente": dict(patient),
             "items": [{"CodItemSol": 10 * int(cod) + n, "CodConvExames": "GLI"} for n in (1, 2)]}
    return store.write(FailureRecord(reason=reason, key=f"sol-{cod}-abc", cod=str(cod),
                                     item_ids=[10 * int(cod) + 1, 10 * int(cod) + 2], event=event,
                                     http_status=status, response=response))


def ok(status=201, duration=0.08):
    return Delivery("delivered", status, 1, "", duration=duration)


def bars(html):
    return [tuple(int(v) for v in m.groups()[1:]) + (m.group(1),) for m in re.finditer(
        r'data-minute="([^"]+)" data-delivered="(\d+)" data-failed="(\d+)" data-retried="(\d+)"', html)]


# ---------------------------------------------------------------- view model
def test_page_figures_banner_and_chart(tmp_path):
    clock = Clock()
    board = StatusBoard(clock=clock, tz=SP)
    for n in range(3):                                  # 10:00: three deliveries
        board.settled(str(n), 2, f"sol-{n}-k", DELIVERED, ok(duration=0.05 * (n + 1)))
    clock.now += 120                                    # 10:02: an outage, two retries
    board.settled("7", 1, "sol-7-k", None, Delivery("transient", 503, 2, "x", duration=1.0))
    board.settled("8", 1, "sol-8-k", None, Delivery("transient", 503, 2, "x", duration=1.0))
    board.api_paused(90)
    clock.now += 60                                     # 10:03: one failure into FAILED_DIR
    board.settled("9", 4, "sol-9-k", FAILED, Delivery("permanent", 400, 1, "x", duration=0.02))
    board.progress(4321, 12, more=True)
    settings = settings_for(tmp_path)
    page = build_page(board.snapshot(), settings, FailureScan(settings.failed_dir).summary())
    assert page["estado"].banner.text == "API indisponível — envio pausado até 10:03:30"
    assert page["estado"].banner.since == "desde 10:02:00 (há 1 min)"
    tiles = {label: (value, detail) for label, value, detail in page["estado"].tiles}
    assert tiles["Checkpoint"][0] == "4321"
    assert tiles["Backlog"] == ("12 itens", "além do checkpoint (e mais nas próximas páginas), "
                                            "ainda sem resultado")
    assert tiles["Última entrega"] == ("10:00:00", "há 3 min")
    assert tiles["Entregas"] == ("3 hoje", "3 na última hora")
    assert tiles["Falhas"] == ("1 hoje", "1 na última hora")
    assert tiles["Latência da API"] == ("100 ms", "mediana; p95 1000 ms")
    assert [o[1] for o in page["resultados"]] == ["9", "8", "7", "2", "1", "0"]
    assert page["resultados"][0] == ("10:03:00", "9", "4", "400", "20 ms", FAILED, "sol-9-k")

    html = render_page(page)
    chart = bars(html)
    assert len(chart) == 60
    assert chart[-4:] == [(3, 0, 0, "10:00"), (0, 0, 0, "10:01"), (0, 0, 2, "10:02"), (0, 1, 0, "10:03")]
    assert sum(b[0] for b in chart[:-4]) == 0
    assert html.count("<rect ") == 3                   # one bar per non-zero series and minute
    assert '<meta http-equiv="refresh" content="5">' in html
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")


@pytest.mark.parametrize("feed, text", [
    (lambda b: None, "Iniciando"),
    (lambda b: b.cycle_done(True), "Enviando"),
    (lambda b: b.cycle_done(False), "Em dia"),
    (lambda b: b.db_down(), "Banco indisponível"),
    (lambda b: b.standby(), "Em espera"),
])
def test_banner_words(tmp_path, feed, text):
    board = StatusBoard(clock=Clock(), tz=SP)
    feed(board)
    settings = settings_for(tmp_path)
    page = build_page(board.snapshot(), settings, FailureScan(settings.failed_dir).summary())
    assert page["estado"].banner.text == text


def test_dry_run_banner(tmp_path):
    board = StatusBoard(clock=Clock(), tz=SP, dry_run=True)
    board.cycle_done(True)
    settings = settings_for(tmp_path, BEMSOFT_DRY_RUN="1")
    console = Console(board, settings)
    assert ">DRY_RUN</strong>" in console.render()
    assert dict(console.page()["configuracao"])["BEMSOFT_DRY_RUN"] == "sim"
    assert console.page()["alertas"].note == "DRY_RUN: nenhum alerta é enviado."


# ---------------------------------------------------------------- failures and privacy
def test_failures_grouped_by_reason_with_replay_command_and_no_patient_data(tmp_path):
    settings = settings_for(tmp_path)
    store = FailureStore(settings.failed_dir)
    failure(store, 101, "paciente cpf-98765432100 sem sexo M/F: preencha paciente.sexo ou "
                        "defina DEFAULT_GENDER=M ou F no .env")
    failure(store, 102, "paciente pat-503 sem sexo M/F: preencha paciente.sexo ou defina DEFAULT_GENDER")
    failure(store, 103, "API rejeitou o pedido (HTTP 400, validação): {\"errors\": [\"patient Maria "
                        "Aparecida Sigilosa 1957-03-14 987.654.321-00\"]}", status=400,
            response='{"errors": ["Maria Aparecida Sigilosa"]}')
    failure(store, 104, "item 1041: exame 'XYZ999' não existe no catálogo /tests da Bemsoft: "
                        "cadastre-o; item 1042: exame 'XYZ999' não existe")
    (settings.failed_dir / "quebrado.json").write_text("{não é json", encoding="utf-8")
    board = StatusBoard(clock=Clock(), tz=SP)
    settings = settings.with_overrides(proxy=Proxy("http://proxy.lab:3128", "BEMSOFT_PROXY",
                                                   "proxyuser", "PROXY-SENHA"))
    console = Console(board, settings)
    page = console.page()
    assert [(row[0], row[1]) for row in page["falhas"].rows] == [
        ("paciente sem sexo M/F", "2"),
        ("API rejeitou o pedido (HTTP 400, validação)", "1"),
        ("exame 'XYZ999' não existe no catálogo /tests da Bemsoft", "1")]
    assert page["falhas"].rows[0][3] == "101, 102"
    assert page["falhas"].summary.count == 5 and page["falhas"].summary.unreadable == ("quebrado.json",)
    html = render_page(page)
    assert f"python retry_failed.py --dir {settings.failed_dir} --send" in html
    for secret in ("Maria", "Sigilosa", "98765432100", "987.654.321-00", "1957-03-14", "14/03/1957",
                   TOKEN, "SENHA-DO-BANCO", "PROXY-SENHA", "proxyuser", "painel-token-0123456789"):
        assert secret not in html, secret
    settings_shown = dict(page["configuracao"])      # rows from the settings declarations
    assert settings_shown["Proxy em uso"] == "http://***@proxy.lab:3128 (de BEMSOFT_PROXY)"
    assert settings_shown["DATABASE_URL"] == "postgresql+psycopg://lis_user:***@db.lab.local:5433/LIS"
    assert settings_shown["BEMSOFT_BASE_URL"] == "https://bemsoft.example.test"
    assert settings_shown["TERCEIROS"] == LAB
    assert settings_shown["BEMSOFT_CONCURRENCY"] == "6"
    assert settings_shown["BEMSOFT_TOKEN"] == settings_shown["STATUS_TOKEN"] == "*** (definido, oculto)"


@pytest.mark.parametrize("reason, group", [
    ("paciente 98765432100 sem nome (tabela paciente, coluna nome; o cadastro...)",
     "paciente sem nome (tabela paciente, coluna nome; o cadastro...)"),
    ("paciente pat-77 sem data de nascimento válida: preencha", "paciente sem data de nascimento válida"),
    ("API respondeu 201 com erro no corpo (nada foi salvo): Não foi possível salvar",
     "API respondeu 201 com erro no corpo (nada foi salvo)"),
    ("erro inesperado 1957-03-14", "erro inesperado …"),
    ("", "sem motivo registrado"),
])
def test_reason_groups(reason, group):
    assert reason_group(reason) == group


def test_replay_command_is_quoted_for_the_platform(tmp_path):
    folder = tmp_path / "falhas do lab"
    assert replay_command(folder, windows=False) == f"python retry_failed.py --dir '{folder}' --send"
    assert replay_command(r"C:\Bemsoft\falhas do lab", "C:\\b\\.env", windows=True) == (
        'python retry_failed.py --env-file C:\\b\\.env --dir "C:\\Bemsoft\\falhas do lab" --send')


def test_scan_is_cached_bounded_and_forgets_replayed_files(tmp_path):
    clock = Clock(0.0)
    store = FailureStore(tmp_path / "failed")
    paths = [failure(store, cod, "paciente pat-1 sem sexo M/F: x") for cod in (1, 2, 3)]
    scan = FailureScan(store.directory, ttl=5.0, max_files=2, clock=clock)
    assert (scan.summary().count, scan.summary().unread) == (3, 1)
    assert scan.summary().groups[0].count == 2
    paths[0].unlink()
    assert scan.summary().count == 3                # cached
    clock.now += 5
    assert (scan.summary().count, scan.summary().unread) == (2, 0)
    assert len(scan._files) == 2


def test_warm_reads_the_folder_in_the_background(tmp_path):
    store = FailureStore(tmp_path / "failed")
    for cod in range(1, 21):
        failure(store, cod, "paciente pat-1 sem sexo M/F: x")
    scan = FailureScan(store.directory, ttl=3600.0)
    scan.warm()
    from bemsoft_monitor.testing.harness import wait_until
    assert wait_until(lambda: len(scan._files) == 20, 30)   # read before any page asked
    assert scan.summary().count == 20


def test_mask_url():
    assert mask_url("http://u:p@proxy:8080") == "http://***@proxy:8080"
    assert mask_url("proxy.lab:3128") == "http://proxy.lab:3128"
    assert mask_url(None) is None


# ---------------------------------------------------------------- markup in the data stays text
ATTACKS = {
    "img": '"><img src=x onerror=alert({n})>',
    "script": "<script>alert({n})</script>",
    "textarea": "</textarea><b onmouseover=alert({n})>",
    "link": '<a href="javascript:alert({n})">abrir</a>',
    "js": "javascript:alert({n})",
}


def injected_page(tmp_path, harmless=False):
    """The page rendered with markup in every field that carries text from outside the
    monitor: a failure reason, an exam code, solicitation codes, an Idempotency-Key, settings
    values, FAILED_DIR and failure file names (`harmless`: plain words in the same places).
    Returns the HTML and the injected texts, each numbered so that each field is told apart."""
    injected = []

    def word(kind):
        n = len(injected)
        injected.append(f"inofensivo-{n}" if harmless else ATTACKS[kind].format(n=n))
        return injected[-1]

    settings = settings_for(tmp_path, FAILED_DIR=str(tmp_path / word("img")), MONITOR_NAME=word("script"),
                            TERCEIROS=f"{word('textarea')},{word('link')}")
    store = FailureStore(settings.failed_dir)
    event = {"cod_solicitacao": 1, "items": [{"CodItemSol": 11, "CodConvExames": "X"}]}
    store.write(FailureRecord(reason=f"API rejeitou o pedido {word('img')}: detalhe", key="sol-1-k",
                              cod=word("textarea"), item_ids=[11], event=event))
    store.write(FailureRecord(reason=f"item 12: exame '{word('script')}' não existe no catálogo /tests da "
                                     "Bemsoft: cadastre-o", key="sol-2-k", cod=word("link"), item_ids=[12],
                              event=event))
    for name in (word("img"), word("js")):
        (settings.failed_dir / f"{name}.json").write_text("{", encoding="utf-8")
    board = StatusBoard(clock=Clock(), tz=SP)
    board.settled(word("script"), 1, word("img"), FAILED, Delivery("permanent", 400, 1, "x", duration=0.02))
    board.settled(word("js"), 1, word("textarea"), DELIVERED, ok())
    return Console(board, settings).render(), injected


class Parsed(HTMLParser):
    """Every element with its attribute names, and every text node, as a browser reads them."""

    def __init__(self, html):
        super().__init__(convert_charrefs=True)
        self.elements, self.texts = [], []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, tuple(sorted(name for name, _ in attrs))))

    handle_startendtag = handle_starttag

    def handle_data(self, data):
        self.texts.append(data)


def test_markup_in_the_data_renders_as_text(tmp_path):
    html, injected = injected_page(tmp_path / "atacado")
    page = Parsed(html)
    assert page.elements == Parsed(injected_page(tmp_path / "inofensivo", harmless=True)[0]).elements
    tags = {tag for tag, _ in page.elements}
    attributes = {name for _, names in page.elements for name in names}
    assert not tags & {"script", "img", "textarea", "a", "iframe"}
    # the one form is the search's (a plain GET to /), with its own field only
    assert [e for e in page.elements if e[0] in ("form", "input", "button")] == [
        ("form", ("action", "class", "method")),
        ("input", ("maxlength", "name", "placeholder", "type", "value")),
        ("input", ("autocomplete", "name", "type")),        # STATUS_TOKEN, typed by the user
        ("button", ("type",))]
    assert not [name for name in attributes if name.startswith("on") or name in ("src", "href")]
    for text in injected:                        # each one reached the page, as text
        assert any(text in node for node in page.texts), text


# ---------------------------------------------------------------- panels
class QueryEcho(Panel):
    """A panel that shows what it was asked (the search panel reads `?q=` the same way)."""
    anchor, title = "eco", "Eco <da busca>"

    def build(self, ctx):
        return ctx.param("q"), sorted(ctx.query)

    def render(self, view):
        return f"<p>q={escape(view[0])}; parâmetros={escape(','.join(view[1]))}</p>"


def test_a_panel_is_built_from_the_query_and_framed_by_the_page(tmp_path):
    settings = settings_for(tmp_path)
    console = Console(StatusBoard(clock=Clock(), tz=SP), settings, panels=(*PANELS, QueryEcho()))
    page = console.page("q=%2043335%20&x=1&token=painel-token-0123456789")
    assert page["eco"] == ("43335", ["q", "x"])               # no panel sees the token
    assert page["falhas"].summary.count == 0
    html = render_page(page)
    assert ('<h2 id="eco">Eco &lt;da busca&gt;</h2><div class="card"><p>q=43335; parâmetros=q,x</p></div>'
            '<footer>') in html
    assert [m for m in re.findall(r'id="(\w+)"', html)] == [p.anchor for p in PANELS] + ["eco"]
    assert page["busca"].asked == "" and page.refresh       # no search: the page reloads itself
    assert "/?busca=" not in html       # a link would lose the token: the first search stops reloading
    open_console = Console(StatusBoard(clock=Clock(), tz=SP), settings_for(tmp_path, STATUS_TOKEN=""))
    assert '<a href="/?busca=#busca">' in open_console.render()   # without a token: a link to
    typing = open_console.page("busca=")                           # the page that keeps still
    assert typing.refresh is False and 'http-equiv="refresh"' not in render_page(typing)
    assert "/?busca=#busca" not in render_page(typing)
    with pytest.raises(KeyError):
        page["nada"]


def test_the_console_imports_neither_the_loop_nor_the_cli():
    code = ("import importlib, pkgutil, sys\n"
            "import bemsoft_monitor.console as console\n"
            "for module in pkgutil.walk_packages(console.__path__, 'bemsoft_monitor.console.'):\n"
            "    importlib.import_module(module.name)\n"
            "print(sorted(m for m in sys.modules if m.startswith('bemsoft_monitor.')))\n")
    loaded = run("-c", code).stdout
    assert "bemsoft_monitor.console.panels.state" in loaded
    for module in ("monitor", "planner", "sender", "ledger", "outcomes", "app", "cli", "checks",
                   "metrics", "replay_cli"):
        assert f"'bemsoft_monitor.{module}'" not in loaded, module


# ---------------------------------------------------------------- access
def test_token_may_come_as_header_bearer_or_query():
    token = "painel-token-0123456789"
    assert authorized(token, {"X-Status-Token": token}, "")
    assert authorized(token, {"Authorization": f"Bearer {token}"}, "")
    assert authorized(token, {}, f"token={token}")
    assert not authorized(token, {}, "")
    assert not authorized(token, {"X-Status-Token": token[:-1]}, "token=errado")
    assert authorized("", {}, "")                    # loopback without a token: open


@pytest.mark.parametrize("values, key", [
    ({"METRICS_PORT": "9100", "METRICS_HOST": "0.0.0.0"}, "STATUS_TOKEN"),
    ({"METRICS_PORT": "9100", "METRICS_HOST": "10.0.0.5", "STATUS_TOKEN": ""}, "STATUS_TOKEN"),
    ({"STATUS_TOKEN": "curto"}, "STATUS_TOKEN"),
    ({"STATUS_TOKEN": "tem espaço no meio 123"}, "STATUS_TOKEN"),
    ({"METRICS_HOST": "não é host"}, "METRICS_HOST"),
])
def test_status_token_rules(tmp_path, values, key):
    base = {"DATABASE_URL": "sqlite://", "TERCEIROS": LAB, "BEMSOFT_DRY_RUN": "1"}
    with pytest.raises(ConfigError) as err:
        parse_settings({**base, **values}, base_dir=tmp_path)
    assert err.value.key == key
    ok_values = {**base, "METRICS_PORT": "9100", "METRICS_HOST": "::1"}
    assert parse_settings(ok_values, base_dir=tmp_path).status_token == ""
    assert is_loopback("127.0.0.2") and is_loopback("localhost") and not is_loopback("0.0.0.0")


def test_status_token_recipe_makes_a_valid_token(tmp_path):
    result = run("-c", "import secrets; print(secrets.token_urlsafe(24))")
    token = result.stdout.strip()
    settings = parse_settings({"DATABASE_URL": "sqlite://", "TERCEIROS": "X", "BEMSOFT_DRY_RUN": "1",
                               "METRICS_PORT": "9100", "METRICS_HOST": "0.0.0.0", "STATUS_TOKEN": token},
                              base_dir=tmp_path)
    assert settings.status_token == token


def test_start_is_refused_off_loopback_without_status_token(env_file):
    with open(env_file, "a", encoding="utf-8") as fh:
        fh.write("METRICS_PORT=9187\nMETRICS_HOST=0.0.0.0\n")
    result = run("monitor_bemsoft.py", "--env-file", str(env_file), "--once")
    assert result.returncode == 2
    assert "STATUS_TOKEN" in result.stderr and "Traceback" not in result.stderr


def test_page_served_with_token_and_metrics_left_open(harness, tmp_path):
    from bemsoft_monitor.metrics import start_metrics_server
    harness.order(1, ["GLI", "TSH"], patient={"nome": "Joana Reservada"})
    board = StatusBoard(tz=SP)
    monitor = harness.monitor(STATUS_TOKEN="painel-token-0123456789", status=board)
    monitor.step()
    server = start_metrics_server(monitor, 0, max_age=60,
                                  console=Console(board, monitor.settings))
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + "/", timeout=5)
        assert err.value.code == 401
        request = urllib.request.Request(base + "/", headers={"X-Status-Token": "painel-token-0123456789"})
        with urllib.request.urlopen(request, timeout=5) as resp:
            html = resp.read().decode("utf-8")
            assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
        assert ">Em dia</strong>" in html or ">Enviando</strong>" in html
        assert re.search(r"<b>Checkpoint</b><big>\d+</big>", html)
        assert "Joana" not in html and "painel-token-0123456789" not in html
        with urllib.request.urlopen(base + "/metrics", timeout=5) as resp:
            assert b"bemsoft_delivered_total 1.0" in resp.read()
    finally:
        server.shutdown()


# ---------------------------------------------------------------- one source for --status
def test_status_command_says_what_the_page_says(env_file, legacy, tmp_path):
    legacy.order(1, ["GLI"])
    legacy.order(2, ["GLI"], patient={"sexo": None, "nome": "Paciente Sigiloso"})
    assert run("monitor_bemsoft.py", "--env-file", str(env_file), "--once").returncode == 0
    result = run("monitor_bemsoft.py", "--env-file", str(env_file), "--status")
    assert result.returncode == 0, result.stderr
    settings = parse_settings(dict(line.split("=", 1) for line in
                                   env_file.read_text(encoding="utf-8").splitlines() if "=" in line),
                              base_dir=tmp_path)
    failures = Console(StatusBoard(tz=SP), settings, env_file=str(env_file)).page()["falhas"]
    assert failures.rows[0][0] == "paciente sem sexo M/F"
    assert f"      1  {failures.rows[0][0]} (mais antiga: {failures.rows[0][2]})" in result.stdout
    assert f"Para reenviar depois de corrigir a causa: {failures.replay}" in result.stdout
    assert f"--env-file {env_file}" in failures.replay
    assert "Sigiloso" not in result.stdout
    data = json.loads(next((tmp_path / "failed").glob("*.json")).read_text(encoding="utf-8"))
    assert data["event"]["paciente"]["nome"] == "Paciente Sigiloso"   # the file has it; we do not


# ---------------------------------------------------------------- the loop feeds the board
def test_monitor_feeds_outcomes_outage_and_checkpoint(harness):
    board = StatusBoard(tz=SP)
    harness.order(1, ["GLI", "TSH"])
    harness.order(2, ["GLI"], patient={"sexo": None})
    monitor = harness.monitor(BEMSOFT_RETRIES="0", BEMSOFT_BACKOFF="5", BEMSOFT_MAX_BACKOFF="5",
                              status=board)
    monitor.step()
    snap = board.snapshot()
    assert sorted((o.cod, o.outcome, o.items, o.http_status) for o in snap.outcomes) == [
        ("1", DELIVERED, 2, 201), ("2", FAILED, 1, None)]
    assert (snap.state, snap.checkpoint, snap.backlog) == ("sending", harness.checkpoint(), 0)
    assert (snap.delivered_today, snap.failed_today) == (1, 1)
    monitor.step()
    assert board.snapshot().state == "up_to_date"
    harness.api.fail_next(1, status=503)
    harness.order(3, ["GLI"])
    monitor.step()
    snap = board.snapshot()
    assert snap.state == "api_down" and snap.paused_until >= snap.now + 4
    assert snap.outcomes[0].outcome == "retry" and snap.outcomes[0].http_status == 503
    assert snap.backlog == 1 and snap.checkpoint == harness.checkpoint()


def test_standby_instance_shows_it_then_takes_over(env_file, legacy, tmp_path):
    import os
    import socket
    import subprocess
    import sys
    import time

    from bemsoft_monitor.db import create_db_engine
    from bemsoft_monitor.lock import InstanceLock
    from conftest import ROOT

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with open(env_file, "a", encoding="utf-8") as fh:
        fh.write(f"METRICS_PORT={port}\n")
    engine = create_db_engine(legacy.settings_factory(legacy.url))
    holder = InstanceLock(engine, "bemsoft")
    assert holder.acquire()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BEMSOFT_", "DB_", "DATABASE_"))}
    proc = subprocess.Popen([sys.executable, "monitor_bemsoft.py", "--env-file", str(env_file)],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env)

    def banner():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                return re.search(r'id="estado"><strong>([^<]+)</strong>', resp.read().decode()).group(1)
        except OSError:
            return None

    def wait(text):
        deadline = time.monotonic() + 60
        while banner() != text:
            assert time.monotonic() < deadline, f"o painel não mostrou {text!r}"
            time.sleep(0.1)

    try:
        wait("Em espera")
        holder.release()
        wait("Em dia")
    finally:
        holder.release()
        proc.terminate()
        _, err = proc.communicate(timeout=60)
        engine.dispose()
    assert proc.returncode == 0, err


def test_page_served_on_ipv6_loopback(harness):
    import socket

    from bemsoft_monitor.metrics import start_metrics_server
    if not socket.has_ipv6:
        pytest.skip("sem IPv6 nesta máquina")
    monitor = harness.monitor(METRICS_HOST="::1")
    try:
        server = start_metrics_server(monitor, 0, max_age=60, host="::1",
                                      console=Console(monitor.status, monitor.settings))
    except OSError as err:  # IPv6 disabled in the kernel
        pytest.skip(f"::1 indisponível: {err}")
    try:
        with urllib.request.urlopen(f"http://[::1]:{server.server_port}/", timeout=5) as resp:
            assert ">Iniciando</strong>" in resp.read().decode("utf-8")
    finally:
        server.shutdown()


def test_token_in_the_query_never_reaches_the_log(harness, caplog, capfd):
    import socket

    from bemsoft_monitor.metrics import start_metrics_server
    token = "painel-token-0123456789"
    monitor = harness.monitor(STATUS_TOKEN=token)
    server = start_metrics_server(monitor, 0, max_age=60, console=Console(
        monitor.status, monitor.settings, panels=(*PANELS, QueryEcho())))
    malformed = {  # request line -> the status that answers it
        f"GET /?token={token} HTTP/1.1 sobra": 400, f"GET /?token={token} HTTP/x.y": 400,
        f"GET /?token={token} HTTP/2.0": 505, f"\x16\x03\x01 /?token={token} \xfc": 400,
        f"DELETE /metrics?token={token} HTTP/1.1": 501}
    answers = {}
    try:
        with caplog.at_level("DEBUG", logger="bemsoft_monitor.metrics"):
            url = f"http://127.0.0.1:{server.server_port}/?token={token}&q=43335"
            with urllib.request.urlopen(url, timeout=5) as resp:
                assert resp.status == 200
                html = resp.read().decode("utf-8")
            for line in malformed:
                with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as sock:
                    sock.sendall(line.encode("latin-1") + b"\r\nHost: x\r\n\r\n")
                    answers[line] = sock.makefile("rb").readline()
            server.shutdown()
    finally:
        server.server_close()
    assert "<p>q=43335; parâmetros=q</p>" in html     # the query reached the panels, the token did not
    assert token not in html
    for line, status in malformed.items():     # answered, not dropped by an exception
        assert answers[line].split()[1:2] == [str(status).encode()], (line, answers[line])
    assert "metrics: GET / 200" in caplog.text
    assert "metrics: - (pedido malformado) 400" in caplog.text
    assert token not in caplog.text and "?token" not in caplog.text
    assert "Traceback" not in capfd.readouterr().err


def test_the_page_passes_through_the_one_redaction(tmp_path):
    """Control characters and bidi overrides in LIS codes reach the page escaped, as in the
    log: HTML escaping alone leaves them raw."""
    settings = settings_for(tmp_path)
    failure(FailureStore(settings.failed_dir), 101, "item sem código de exame")
    board = StatusBoard(clock=Clock(), tz=SP)
    board.settled("77\x1b]0;título\x07\u202e", 1, "sol-77-abc", "delivered",
                  Delivery(Verdict.DELIVERED, 201, 1, "ok", duration=0.01))
    html = Console(board, settings).render()
    assert "\x1b" not in html and "\u202e" not in html and "\x07" not in html
    assert "77\\x1b]0;título\\x07\\u202e" in html
