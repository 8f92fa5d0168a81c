#!/usr/bin/env python3
"""Draws docs/painel.png: the operator console after a simulated hour (steady deliveries, a
ten-minute API outage, the catch-up after it, a few failures waiting in FAILED_DIR), rendered
by the real console code and photographed by headless Chromium (see `browser.py`).

    python -m bemsoft_monitor.testing.painel_png docs/painel.png

Everything is made up: the StatusBoard runs on an injected clock, the failure files are
written to a temporary folder with invented patients (who do not appear on the page)."""
from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

from bemsoft_monitor.client import Delivery
from bemsoft_monitor.config import PROJECT_DIR as ROOT, parse_settings
from bemsoft_monitor.console import Console
from bemsoft_monitor.failures import FailureRecord, FailureStore
from bemsoft_monitor.status import DELIVERED, FAILED, StatusBoard

FAILURES = [  # (reason, http status, how many)
    ("API rejeitou o pedido (HTTP 400, validação): {{\"errors\": [\"...\"]}}", 400, 3),
    ("paciente pat-{pac} sem sexo M/F: preencha paciente.sexo ou defina DEFAULT_GENDER=M ou F", None, 2),
    ("item {item}: exame 'VITD25' não existe no catálogo /tests da Bemsoft: cadastre-o", None, 1),
]


def simulate(board: StatusBoard, clock: list[float], failures: FailureStore) -> None:
    rng = random.Random(11)
    cod, item = 48200, 731000
    start = clock[0]
    for minute in range(60):
        outage = 34 <= minute < 44
        per_minute = 0 if outage else 95 if minute in (44, 45) else 40 if minute == 46 else rng.randint(8, 16)
        for n in range(per_minute):
            clock[0] = start + minute * 60 + n * 60 / max(per_minute, 1)
            cod, item = cod + 1, item + 2
            board.settled(str(cod), 2, f"sol-{cod}-{rng.getrandbits(48):012x}", DELIVERED,
                          Delivery("delivered", 201, 1, "", duration=rng.uniform(0.12, 0.45)))
        if outage:
            for n in range(4):
                clock[0] = start + minute * 60 + n * 15
                board.settled(str(cod + 1), 1, f"sol-{cod + 1}-5e0b1c2d3a4f", None,
                              Delivery("transient", 503, 1, "API indisponível", duration=30.0 if n else 0.3))
            board.api_paused(60)
    for reason, status, count in FAILURES:
        for _ in range(count):
            cod, item = cod + 1, item + 1
            clock[0] += 20
            record = FailureRecord(
                reason=reason.format(pac=cod - 40000, item=item), key=f"sol-{cod}-{rng.getrandbits(48):012x}",
                cod=str(cod), item_ids=[item], http_status=status,
                event={"cod_solicitacao": cod, "solicitacao": {"codsolicitacao": cod},
                       "paciente": {"codpaciente": cod - 40000, "nome": "Paciente Inventado",
                                    "cpf": "000.000.000-00", "datanasc": "1970-01-01"},
                       "items": [{"CodItemSol": item, "CodConvExames": "VITD25"}]})
            failures.write(record)
            board.settled(str(cod), 1, record.key, FAILED,
                          Delivery("permanent", status, 1, "", duration=0.2) if status else None)
    clock[0] += 4
    board.progress(item, 0)
    board.cycle_done(busy=False)


def main(argv: list[str]) -> int:
    from bemsoft_monitor.testing import browser

    out = Path(argv[1] if len(argv) > 1 else ROOT / "docs" / "painel.png").resolve()
    why = browser.missing()
    if why:
        print(f"Chromium indisponível: {why}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="painel-") as tmp:
        settings = parse_settings({
            "DB_SERVER": r"srv-lis\SQLEXPRESS", "DB_NAME": "LabSystem", "DB_USER": "monitor",
            "DB_PASS": "nao-aparece", "TERCEIROS": "DIAGNÓSTICO DO BRASIL - DB",
            "BEMSOFT_TOKEN": "token-nao-aparece", "BEMSOFT_DRY_RUN": "0",
            "BEMSOFT_PROXY": "http://usuario:senha@proxy.hospital.local:3128",
            "FAILED_DIR": str(Path(tmp) / "failed_events"), "TIMEZONE": "America/Sao_Paulo"})
        clock = [time.time() - 3600]
        board = StatusBoard(clock=lambda: clock[0], tz=settings.tz)
        simulate(board, clock, FailureStore(settings.failed_dir))
        html = Console(board, settings).render()
        page = Path(tmp) / "painel.html"
        page.write_text(html, encoding="utf-8")
        chromium = browser.Browser(width=1200, height=900)
        try:
            chromium.driver.get(page.as_uri())
            height = chromium.driver.execute_script("return document.documentElement.scrollHeight")
            chromium.driver.set_window_size(1200, height + 140)
            out.parent.mkdir(parents=True, exist_ok=True)
            chromium.driver.save_screenshot(str(out))
        finally:
            chromium.close()
    print(f"Painel salvo em {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
