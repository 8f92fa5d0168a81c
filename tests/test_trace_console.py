"""The console's search: the real monitor (`python monitor_bemsoft.py`, a subprocess) with its
console, a SQLite LIS and the fake API; the search typed in headless Chromium's form (a plain
GET, no JavaScript), STATUS_TOKEN as for the rest of the page, markup typed into the field
shown as text, and no patient data on the page."""
from __future__ import annotations

import subprocess
import urllib.error
import urllib.request
from urllib.parse import quote

import pytest

from bemsoft_monitor.console import Console
from bemsoft_monitor.payload import idempotency_key
from bemsoft_monitor.status import StatusBoard
from bemsoft_monitor.testing.harness import monitor_command, subprocess_env
from bemsoft_monitor.trace import Tracer
from conftest import ROOT, TOKEN
from test_console_browser import chromium, free_port, wait_for  # noqa: F401  (fixture)

STATUS_TOKEN = "busca-e2e-token-7c1d93aa"
SECRET_NAME = "Benedita Sigilosa Prates"
ATTACK = '"><script>alert(1)</script><img src=x onerror=alert(2)>'


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def search(driver, text: str, token: str | None):
    from selenium.webdriver.support.expected_conditions import staleness_of
    from selenium.webdriver.support.ui import WebDriverWait

    field = driver.find_element("css selector", "form.search input[name=busca]")
    field.clear()
    field.send_keys(text)
    if token is not None:
        driver.find_element("css selector", "form.search input[name=token]").send_keys(token)
    button = driver.find_element("css selector", "form.search button")
    button.click()
    WebDriverWait(driver, 20).until(staleness_of(button))   # the answer's page replaced this one


def test_console_search_in_chromium(chromium, env_file, legacy, api, tmp_path):  # noqa: F811
    from selenium.common.exceptions import NoAlertPresentException

    port = free_port()
    with open(env_file, "a", encoding="utf-8") as fh:
        fh.write(f"METRICS_PORT={port}\nMETRICS_HOST=127.0.0.1\nSTATUS_TOKEN={STATUS_TOKEN}\n"
                 "BEMSOFT_CONCURRENCY=1\n")
    refused = legacy.order(43336, ["FE"], patient={"nome": SECRET_NAME})
    sent = legacy.order(43335, ["GLI", "TSH"], patient={"nome": SECRET_NAME})
    api.fail_next(1, status=400, body={"error": f"paciente {SECRET_NAME} 123.456.789-09 inválido"})
    proc = subprocess.Popen(monitor_command(env_file), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env())
    base = f"http://127.0.0.1:{port}/"
    driver = chromium.driver
    try:
        wait_for(lambda: {f"item-{i}" for i in sent} <= set(api.stored_tests()), what="43335 entregue")
        wait_for(lambda: list((tmp_path / "failed").glob("*.json")), what="a falha de 43336")
        driver.get(base + f"?token={STATUS_TOKEN}")
        assert driver.find_elements("css selector", "meta[http-equiv=refresh]")   # the plain page reloads

        search(driver, "43335", STATUS_TOKEN)
        assert "busca=43335" in driver.current_url
        card = driver.find_element("css selector", "#busca + .card")
        assert "Solicitação 43335" in card.find_element("css selector", ".story-head").text
        items = [row.find_elements("tag name", "td")
                 for row in card.find_elements("css selector", "table:first-of-type tbody tr")]
        assert [(cells[0].text, cells[1].text, cells[3].text) for cells in items] == [
            (str(sent[0]), "GLI", "entregue"), (str(sent[1]), "TSH", "entregue")]
        key = idempotency_key("43335", sent)
        history = [row.text for row in card.find_elements("xpath", ".//h3[starts-with(., 'História')]"
                                                                   "/following-sibling::table[1]//tbody/tr")]
        assert len(history) == 2 and f"lido e enviado sob a chave {key}" in history[0]
        assert f"entregue sob a chave {key} (HTTP 201" in history[1]
        assert "Nada pendente" in card.text
        # a search is read, not watched: the page does not reload under the reader
        assert not driver.find_elements("css selector", "meta[http-equiv=refresh]")
        assert driver.find_element("css selector", "form.search input[name=busca]").get_attribute("value") == "43335"

        search(driver, f"item:{refused[0]}", STATUS_TOKEN)
        card = driver.find_element("css selector", "#busca + .card")
        assert "API rejeitou o pedido (HTTP 400, validação)" in card.text
        assert "em FAILED_DIR" in card.text and "retry_failed.py" in card.text
        dom = driver.page_source
        for secret in (SECRET_NAME, "Benedita", "123.456.789-09", "12345678909", "1980-01-02",
                       TOKEN, STATUS_TOKEN):
            assert secret not in dom, secret

        search(driver, ATTACK, STATUS_TOKEN)                   # markup typed into the field
        with pytest.raises(NoAlertPresentException):
            driver.switch_to.alert
        assert driver.execute_script(
            "return document.querySelectorAll('script, img, [onerror], [onmouseover]').length") == 0
        assert driver.find_element("css selector", "form.search input[name=busca]").get_attribute("value") == ATTACK
        assert f"O LIS não tem itens (ItemSol) com CodSolicitacao = {ATTACK}." in \
            driver.find_element("css selector", "#busca + .card").text

        search(driver, "43335", None)                          # the token is asked for, as for /
        assert "Acesso negado" in driver.page_source and "Solicitação 43335" not in driver.page_source
        assert status_of(base + "?busca=43335") == 401
        assert status_of(base + "?busca=43335&token=errado") == 401
        assert status_of(base + f"?busca=43335&token={STATUS_TOKEN}") == 200
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_search_without_a_database_or_with_a_bad_search_says_so(tmp_path, harness):
    from test_console import settings_for

    settings = settings_for(tmp_path)
    board = StatusBoard(tz=settings.tz)
    page = Console(board, settings).page("busca=43335")
    assert "a busca consulta o banco" in page["busca"].error and not page.refresh
    console = Console(board, settings, trace=Tracer(settings, harness.engine))
    view = console.page("busca=" + quote("item:x<b>")).__getitem__("busca")
    assert view.error.startswith("depois de item: vem o CodItemSol")
    html = console.render("busca=" + quote("item:x<b>"))
    form = html.split('<h2 id="busca">')[1].split("</form>")[0]
    assert 'value="item:x&lt;b&gt;"' in form and "<b>" not in form


def test_a_search_while_the_database_is_unreachable_costs_the_search_only(tmp_path):
    import sqlalchemy as sa
    from test_console import settings_for

    settings = settings_for(tmp_path)
    gone = sa.create_engine(f"sqlite:///{tmp_path / 'nao-existe' / 'legado.db'}")
    console = Console(StatusBoard(tz=settings.tz), settings, trace=Tracer(settings, gone))
    page = console.page("busca=43335")
    assert page["busca"].error.startswith("não foi possível consultar o banco agora (")
    assert page["estado"].banner.text and "não foi possível consultar o banco agora" in console.render("busca=43335")


def test_one_console_search_at_a_time_on_the_monitors_connections(tmp_path):
    """A slow search holds one of the monitor's connections; a second one at the same time
    is told to try again instead of taking another."""
    import threading
    from test_console import settings_for
    from bemsoft_monitor.console import BUSY

    settings = settings_for(tmp_path)
    started, release = threading.Event(), threading.Event()
    searched = []

    def slow_search(text):          # what the console is given: any callable text -> story
        searched.append(text)
        started.set()
        release.wait(10)
        raise RuntimeError("banco lento")

    console = Console(StatusBoard(tz=settings.tz), settings, trace=slow_search)
    first = threading.Thread(target=console.page, args=("busca=43335",))
    first.start()
    assert started.wait(10)
    assert console.page("busca=43336")["busca"].error == BUSY
    release.set()
    first.join(10)
    assert searched == ["43335"]
    assert "banco lento" in console.page("busca=1")["busca"].error    # free again
