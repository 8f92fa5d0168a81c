"""`python monitor_bemsoft.py --demo`: the real pipeline end to end with no SQL Server, no
token and no network: a SQLite legacy database under completo/demo/ and the project's fake
Bemsoft API on 127.0.0.1."""
from __future__ import annotations

import datetime as dt
import logging
import shutil
import sys
import threading
from pathlib import Path

import sqlalchemy as sa

from .config import PROJECT_DIR, parse_settings
from .failures import FailureFileError, FailureStore
from .testing.fakeapi import FakeBemsoft
from .testing.harness import LAB, TOKEN, env_values
from .testing.sampledata import add_items, add_order, add_patient, create_legacy_schema

log = logging.getLogger(__name__)


def seed_first_orders(engine: sa.Engine, day: dt.date) -> None:
    at = lambda h, m: dt.datetime.combine(day, dt.time(h, m))  # noqa: E731
    with engine.begin() as conn:
        add_patient(conn, 501, "João da Conceição Araújo", cpf="123.456.789-09",
                    datanasc=dt.datetime(1980, 5, 10), sexo="Masculino")
        add_patient(conn, 502, "Maria Antônia de Sá", cpf="987.654.321-00",
                    datanasc=None, sexo="Feminino")          # birth date -> DEFAULT_BIRTHDATE
        add_patient(conn, 503, "Conceição Ñúñez Gonçalves", cpf=None,
                    datanasc=None, sexo=None)                # no gender, no default: failure
        add_patient(conn, 504, "Luís Otávio Brandão", cpf="111.222.333-44",
                    datanasc=dt.datetime(1975, 1, 30), sexo=" feminino ")
        add_order(conn, 1001, 501, dtaentrada=at(0, 0), hora="08:15")
        add_items(conn, 1001, [{"CodConvExames": "GLICOSE", "DescExames": "GLICOSE EM JEJUM",
                                "Origem": "AMBULATÓRIO"},
                               {"CodConvExames": "HEMO", "DescExames": "HEMOGRAMA COMPLETO",
                                "Origem": "AMBULATÓRIO"}],
                  terceirizado=LAB, entered_at=at(8, 16))
        add_order(conn, 1002, 502, dtaentrada=at(0, 0), hora="09:00:00")
        add_items(conn, 1002, [{"CodConvExames": "TSH", "DescExames": "TSH ULTRASSENSÍVEL",
                                "Origem": "DOMICILIAR"}], terceirizado=LAB, entered_at=at(9, 1))
        add_order(conn, 1003, 503, dtaentrada=at(0, 0), hora="09:30")
        add_items(conn, 1003, [{"CodConvExames": "GLI", "DescExames": "GLICOSE",
                                "Origem": "AMBULATÓRIO"}], terceirizado=LAB, entered_at=at(9, 31))
        add_order(conn, 1004, 504, dtaentrada=at(0, 0), hora="10:05")
        add_items(conn, 1004, [{"CodConvExames": "FE", "DescExames": "FERRO SÉRICO",
                                "Origem": "AMBULATÓRIO"},
                               {"CodConvExames": "XYZ999", "DescExames": "EXAME NÃO CADASTRADO",
                                "Origem": "AMBULATÓRIO"}],
                  terceirizado=LAB, entered_at=at(10, 6))
        # an exam for another support lab: not the monitor's business
        add_items(conn, 1004, [{"CodConvExames": "VITD", "DescExames": "VITAMINA D",
                                "Origem": "AMBULATÓRIO"}],
                  terceirizado="OUTRO LABORATÓRIO", entered_at=at(10, 6))


def seed_added_exam(engine: sa.Engine, day: dt.date) -> None:
    """An exam added the next day to order 1001, after it was delivered."""
    with engine.begin() as conn:
        add_items(conn, 1001, [{"CodConvExames": "URINA1", "DescExames": "URINA TIPO 1",
                                "Origem": "AMBULATÓRIO"}], terceirizado=LAB,
                  entered_at=dt.datetime.combine(day + dt.timedelta(days=1), dt.time(7, 40)))


def run_demo(base_dir: Path | None = None, out=None) -> int:
    from .app import build_monitor, setup_logging

    out = out or sys.stdout
    workdir = Path(base_dir or PROJECT_DIR / "completo" / "demo")
    if workdir.exists():
        shutil.rmtree(workdir)  # every run starts from scratch
    workdir.mkdir(parents=True)
    (workdir / "tests_map.json").write_text('{"glicose": "GLI"}', encoding="utf-8")
    db_path = workdir / "legado.db"
    day = dt.date.today() - dt.timedelta(days=1)

    with FakeBemsoft(token=TOKEN) as api:
        settings = parse_settings(env_values(
            f"sqlite:///{db_path}", api.url, workdir,
            DEFAULT_BIRTHDATE="1970-01-01",
            FAILED_DIR=workdir / "failed_events",
            BEMSOFT_TEST_MAP_PATH=workdir / "tests_map.json",
            BEMSOFT_RETRIES=1,
            BEMSOFT_BACKOFF=0.1,
            POLL_SECONDS=0.2,
            LOG_FILE=workdir / "demo.log",
        ), base_dir=workdir)
        setup_logging(settings)
        engine = sa.create_engine(settings.database_url)
        create_legacy_schema(engine)
        seed_first_orders(engine, day)

        print("== Demonstração bemsoft-monitor ==", file=out)
        print(f"Banco legado (SQLite): {db_path}", file=out)
        print(f"API Bemsoft falsa: {api.url}", file=out, flush=True)
        monitor = build_monitor(settings, engine=engine, shutdown=threading.Event())
        try:
            monitor.run("drain")
            print("\n-- Exame acrescentado no dia seguinte à solicitação 1001 já enviada --",
                  file=out, flush=True)
            seed_added_exam(engine, day)
            monitor.run("drain")
        finally:
            monitor.close()
        _summary(monitor, api, settings, out)
        engine.dispose()
    return 0


def _summary(monitor, api: FakeBemsoft, settings, out) -> None:
    stored = api.stored_tests()
    print("\n== Resumo ==", file=out)
    print(f"Entregues: {monitor.stats.delivered} pedidos ({monitor.stats.delivered_items} exames); "
          f"a API guardou {len(stored)} exames, {len(set(stored))} distintos.", file=out)
    for batch_id, batch in sorted(api.stored_batches().items()):
        tests = ", ".join(t["externalId"] if isinstance(t, dict) else str(t) for t in batch["tests"])
        print(f"  {batch_id}: {batch.get('patientName', '')} -> {tests}", file=out)
    store = FailureStore(settings.failed_dir)
    files = store.files()
    print(f"Falhas: {len(files)} arquivo(s) em {settings.failed_dir}", file=out)
    for path in files:
        try:
            record = store.load(path)
        except FailureFileError as err:
            print(f"  {path.name}: {err}", file=out)
            continue
        print(f"  solicitação {record.cod} (itens {', '.join(map(str, record.item_ids))}): "
              f"{record.reason}", file=out)
    print(f"Checkpoint: {monitor.checkpoint} (último CodItemSol processado)", file=out)
    print("Reenvie falhas corrigidas com: python retry_failed.py --dir "
          f"{settings.failed_dir} --send", file=out, flush=True)
