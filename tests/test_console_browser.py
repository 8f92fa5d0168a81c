"""End to end: the real monitor (`python monitor_bemsoft.py`, a subprocess) against a SQLite
legacy database and the fake API, with refused solicitations (400) and an API outage (503
with Retry-After); the operator console loaded in headless Chromium."""
from __future__ import annotations

import socket
import subprocess
import time
import urllib.request

import pytest

from bemsoft_monitor.testing import browser
from bemsoft_monitor.testing.harness import monitor_command, subprocess_env
from conftest import IN_CI, ROOT, TOKEN, run

STATUS_TOKEN = "painel-e2e-token-4f9a1c2b"
SECRET_NAME = "Benedita Sigilosa Prates"


def require_chromium():
    why = browser.missing()
    if why:
        if IN_CI:
            pytest.fail(f"Chromium obrigatório no CI: {why}", pytrace=False)
        pytest.skip(f"Chromium indisponível: {why}")


@pytest.fixture
def chromium():
    require_chromium()
    b = browser.Browser()
    yield b
    b.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout=60.0, what="condição"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"esperou {timeout:.0f} s por: {what}")


def fetch(url):
    try:
        request = urllib.request.Request(url, headers={"X-Status-Token": STATUS_TOKEN})
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.read().decode("utf-8")
    except OSError:
        return ""


def test_console_in_chromium_shows_outage_failures_and_no_patient_data(
        chromium, env_file, legacy, api, tmp_path):
    port = free_port()
    with open(env_file, "a", encoding="utf-8") as fh:
        fh.write(f"METRICS_PORT={port}\nMETRICS_HOST=127.0.0.1\nSTATUS_TOKEN={STATUS_TOKEN}\n"
                 "BEMSOFT_MAX_BACKOFF=2\nBEMSOFT_BACKOFF=0.5\nBEMSOFT_CONCURRENCY=2\n")
    legacy.order(1, ["GLI", "TSH"], patient={"nome": SECRET_NAME})
    legacy.order(2, ["GLI"], patient={"nome": SECRET_NAME})
    legacy.order(3, ["HEMO"], patient={"sexo": None, "nome": SECRET_NAME})  # fails before any POST
    legacy.order(4, ["CREA"])
    api.fail_next(2, status=400)                     # the first two POSTs are refused
    proc = subprocess.Popen(monitor_command(env_file), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env())
    base = f"http://127.0.0.1:{port}/"
    driver = chromium.driver
    try:
        wait_for(lambda: len(list((tmp_path / "failed").glob("*.json"))) >= 3, what="3 falhas gravadas")
        wait_for(lambda: api.stored_tests(), what="uma entrega")

        # the outage: every POST answers 503 with Retry-After until the faults are cleared
        api.fail_next(10_000, status=503, retry_after=1)
        last = legacy.order(5, ["GLI"]) + legacy.order(6, ["UREIA"])
        wait_for(lambda: "API indisponível" in fetch(base), what="o painel mostrar a queda")
        # FAILED_DIR is read at start-up and then at most every few seconds (cached)
        wait_for(lambda: "API rejeitou o pedido" in fetch(base), what="o painel listar as falhas")
        driver.get(base + f"?token={STATUS_TOKEN}")
        banner = driver.find_element("css selector", "#estado strong").text
        assert banner.startswith("API indisponível — envio pausado até ")
        checkpoint = driver.find_element("xpath", "//div[@class='tile'][b='Checkpoint']/big").text
        assert checkpoint == str(legacy.checkpoint())
        reasons = [td.text for td in driver.find_elements("css selector", "#falhas + .card td:first-child")]
        assert "API rejeitou o pedido (HTTP 400, validação)" in reasons
        assert "paciente sem sexo M/F" in reasons
        replay = driver.find_element("css selector", "pre.replay").text
        assert replay == f"python retry_failed.py --env-file {env_file} --dir {tmp_path / 'failed'} --send"
        retried = sum(int(g.get_attribute("data-retried"))
                      for g in driver.find_elements("css selector", "svg.chart g.minute"))
        assert retried >= 1                           # the outage is in the chart

        api.clear_faults()                            # the API is back: catch-up
        wait_for(lambda: legacy.checkpoint() == max(last), what="checkpoint no último item")
        wait_for(lambda: "Em dia" in fetch(base), what="o painel voltar a 'Em dia'")
        driver.get(base + f"?token={STATUS_TOKEN}")
        assert driver.find_element("css selector", "#estado strong").text == "Em dia"
        assert driver.find_element("xpath", "//div[@class='tile'][b='Checkpoint']/big").text == str(max(last))
        rows = driver.find_elements("css selector", "table tbody tr")
        assert rows and "sol-" in driver.page_source
        dom = driver.page_source
        for secret in (SECRET_NAME, "Benedita", "123.456.789-09", "12345678909", "1980-01-02",
                       TOKEN, STATUS_TOKEN):
            assert secret not in dom, secret
        png = tmp_path / "painel.png"
        driver.save_screenshot(str(png))
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        driver.get(base)                              # without the token: refused
        assert "Acesso negado" in driver.page_source and "Checkpoint" not in driver.page_source
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_docs_screenshot_script_draws_the_panel(tmp_path):
    require_chromium()
    out = tmp_path / "painel.png"
    result = run("-m", "bemsoft_monitor.testing.painel_png", str(out), timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000



def test_markup_in_the_data_stays_inert_in_chromium(chromium, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException

    from test_console import injected_page
    html, injected = injected_page(tmp_path)
    page = tmp_path / "painel.html"
    page.write_text(html, encoding="utf-8")
    driver = chromium.driver
    driver.get(page.as_uri())
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert
    assert driver.execute_script(
        "return document.querySelectorAll('script, img, textarea, a, [onerror], [onmouseover]').length") == 0
    shown = driver.title + "\n" + driver.find_element("tag name", "body").text
    for text in injected:
        assert text in shown, text
