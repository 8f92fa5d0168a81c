"""Generated dirty LIS data (duplicated rows, NULL keys and dates, odd types, long values)
on a real SQLite database without primary keys, drained by the real monitor against the
fake API: every item ends delivered exactly once or in exactly one failure file, every
clean order is delivered, and the checkpoint reaches the last item."""
from __future__ import annotations

import collections
import datetime as dt
import json
import tempfile
import threading
from pathlib import Path

import sqlalchemy as sa
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bemsoft_monitor.app import build_monitor
from bemsoft_monitor.config import parse_settings
from bemsoft_monitor.testing.fakeapi import FakeBemsoft
from bemsoft_monitor.testing.sampledata import create_legacy_schema
from conftest import LAB, TOKEN

TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
               min_size=1, max_size=120)
DAY = dt.datetime(2026, 11, 27, 8, 0)

# (value, clean?) pairs: the clean choices are the ones a tidy LIS would hold
# an odd text code is not dirty: it goes out under its safe form (only a blank one fails)
codes = st.one_of(st.integers(1, 10**9).map(lambda n: (n, True)),
                  TEXT.map(lambda t: (t, bool(t.strip()))))
horas = st.sampled_from([("08:30", True), (None, True), ("25:99", True), ("x" * 300, True)])
dates = st.one_of(st.just((DAY, True)), st.just((None, True)), TEXT.map(lambda t: (t, True)),
                  st.integers(-10**6, 10**6).map(lambda n: (n, True)))
# weighted towards clean values, so that most examples hold clean orders next to dirty ones
names = st.one_of(*[st.just(("Maria da Silva", True))] * 4, st.just((None, False)),
                  TEXT.map(lambda t: (t, any(c.isprintable() and not c.isspace() for c in t))))
sexes = st.sampled_from([("F", True)] * 6 + [("Masculino", True), (None, False), ("X", False)])
births = st.sampled_from([(dt.datetime(1980, 1, 2), True)] * 8 + [(None, False), ("31/02/1980", False)])
EXAMS = [("GLI", True)] * 5 + [("TSH", True)] * 3 + [(None, False), ("XYZ999", False)]
exams = st.one_of(*[st.sampled_from(EXAMS)] * 4, TEXT.map(lambda t: (t, False)))
# "same twice": identical copies are harmless (delivered); "different twice": filed
copies = st.sampled_from(["one"] * 7 + ["same twice", "different twice", "none"])

orders = st.lists(st.fixed_dictionaries({
    "cod": codes, "sol": copies, "pac": copies, "hora": horas, "dtaentrada": dates,
    "nome": names, "sexo": sexes, "datanasc": births,
    "items": st.lists(st.fixed_dictionaries({
        "exam": exams, "entrada": dates, "null_cod": st.just(False)}), min_size=1, max_size=3),
}), min_size=2, max_size=5, unique_by=lambda o: str(o["cod"][0]).strip())


def table(name, *columns):
    return sa.table(name, *[sa.column(c) for c in columns])


ITEM = table("ItemSol", "CodItemSol", "CodSolicitacao", "DataEntrada", "DescExames",
             "CodConvExames", "NomeTerceirizado", "Origem", "SituacaoResultado")
SOL = table("solicitacao", "codsolicitacao", "codpaciente", "dtaentrada", "Hora")
PAC = table("paciente", "codpaciente", "nome", "cpf", "datanasc", "sexo")


def insert(engine, generated) -> tuple[list[int], dict[int, bool]]:
    """Insert the generated orders (typeless inserts: odd values go in as they are);
    returns every item id and, per item, whether its order is clean."""
    item_id, clean_of = 0, {}
    with engine.begin() as conn:
        for n, o in enumerate(generated):
            cod, cod_ok = o["cod"]
            codpac = 1000 + n
            pac = {"codpaciente": codpac, "nome": o["nome"][0], "cpf": "123.456.789-09",
                   "datanasc": o["datanasc"][0], "sexo": o["sexo"][0]}
            sol = {"codsolicitacao": cod, "codpaciente": codpac, "dtaentrada": o["dtaentrada"][0],
                   "Hora": o["hora"][0]}
            for values, how, differ in ((pac, o["pac"], {"nome": "Outro Nome"}),
                                        (sol, o["sol"], {"Hora": "23:59"})):
                rows = {"one": [values], "same twice": [values, values], "none": [],
                        "different twice": [values, {**values, **differ}]}[how]
                for row in rows:
                    conn.execute((PAC if "nome" in values else SOL).insert().values(**row))
            clean = (cod_ok and {o["sol"], o["pac"]} <= {"one", "same twice"} and o["nome"][1]
                     and o["sexo"][1] and o["datanasc"][1])
            for item in o["items"]:
                item_id += 1
                conn.execute(ITEM.insert().values(
                    CodItemSol=item_id, CodSolicitacao=None if item["null_cod"] else cod,
                    DataEntrada=item["entrada"][0], DescExames="EXAME", CodConvExames=item["exam"][0],
                    NomeTerceirizado=LAB, Origem="AMB", SituacaoResultado="PENDENTE"))
                clean_of[item_id] = clean and item["exam"][1] and not item["null_cod"]
    return list(range(1, item_id + 1)), clean_of


# A drain of at most 15 items takes a few steps per page (pages of one item at least); a
# drain that loops without end takes them all. Counted work, not wall-clock time: a loaded
# machine makes the test slower, never failing.
MAX_STEPS = 200


def step_budget(monitor, limit: int) -> list:
    """Count the monitor's steps; past `limit`, ask it to stop (as a shutdown would)."""
    steps, step = [], monitor.step

    def counted():
        steps.append(None)
        if len(steps) > limit:
            monitor.shutdown.set()
        return step()
    monitor.step = counted
    return steps


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(generated=orders, batch_size=st.integers(1, 6), null_cods=st.lists(st.integers(0, 14), max_size=3))
def test_generated_dirty_rows_are_delivered_once_or_filed(generated, batch_size, null_cods):
    for index in null_cods:  # a few items lose their CodSolicitacao
        items = [i for o in generated for i in o["items"]]
        if index < len(items):
            items[index]["null_cod"] = True
    with tempfile.TemporaryDirectory() as tmp, FakeBemsoft(token=TOKEN) as api:
        url = f"sqlite:///{Path(tmp) / 'legado.db'}"
        engine = sa.create_engine(url)
        create_legacy_schema(engine, primary_keys=False)
        ids, clean_of = insert(engine, generated)
        conf = parse_settings({
            "DATABASE_URL": url, "TERCEIROS": LAB, "BEMSOFT_BASE_URL": api.url,
            "BEMSOFT_TOKEN": TOKEN, "BEMSOFT_DRY_RUN": "0", "START_FROM": "0",
            "FAILED_DIR": str(Path(tmp) / "failed"), "BEMSOFT_RETRIES": "0",
            "BATCH_SIZE": str(batch_size), "LOG_FILE": "-", "BEMSOFT_CONCURRENCY": "1",
            "POLL_SECONDS": "0.1"}, base_dir=Path(tmp))
        monitor = build_monitor(conf, engine=engine, shutdown=threading.Event())
        steps = step_budget(monitor, MAX_STEPS)
        try:
            assert monitor.run("drain") == 0
            assert not monitor.shutdown.is_set(), f"the drain did not finish in {MAX_STEPS} steps"
        finally:
            monitor.close()
        event("steps: %d" % len(steps))
        delivered = collections.Counter(api.stored_tests())
        filed = collections.Counter(i for p in (Path(tmp) / "failed").glob("*.json")
                                    for i in json.loads(p.read_text(encoding="utf-8"))["item_ids"])
        for item_id in ids:
            outcomes = (delivered[f"item-{item_id}"], filed[item_id])
            assert outcomes in ((1, 0), (0, 1)), (item_id, outcomes)
            if clean_of[item_id]:
                assert outcomes == (1, 0), item_id
        assert sum(delivered.values()) + sum(filed.values()) == len(ids)
        event("clean items: %d" % min(sum(clean_of.values()), 3))
        with engine.connect() as conn:
            checkpoint = conn.execute(sa.text('SELECT "LastItemId" FROM "_MonitorState" '
                                              "WHERE \"Name\" = 'bemsoft'")).scalar()
        assert checkpoint == len(ids)
        engine.dispose()
