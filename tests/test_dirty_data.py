"""Real LIS databases are dirty (SPEC §7): tables without primary keys, duplicated rows,
orphan items, NULL keys and dates, odd codes. Each costs at most its own solicitation (or
item) a failure file; every clean order on the same page is delivered exactly once and the
checkpoint reaches the end. Real SQLite and PostgreSQL, the fake API over loopback."""
from __future__ import annotations

import collections
import datetime as dt
import json
import logging
import re

import pytest
import sqlalchemy as sa

from bemsoft_monitor.payload import NO_COD_REASON
from bemsoft_monitor.testing.sampledata import add_items, add_order, add_patient, create_legacy_schema
from bemsoft_monitor.schema import legacy_metadata
from conftest import LAB, Harness

DAY = dt.datetime(2026, 11, 27)
SAFE = re.compile(r"[0-9A-Za-z._-]+")


@pytest.fixture
def dirty(db_url, api, settings_factory):
    """The legacy tables without primary keys on `solicitacao` and `paciente`, and with
    text codes (a LIS may keep codsolicitacao/codpaciente as VARCHAR)."""
    engine = sa.create_engine(db_url)
    legacy_metadata.drop_all(engine)
    create_legacy_schema(engine, primary_keys=False, text_codes=True)
    engine.dispose()
    h = Harness(db_url, api, settings_factory)
    yield h
    h.close()


def patient(conn, codpac, nome="Paciente", **extra):
    values = {"datanasc": dt.datetime(1980, 1, 2), "sexo": "F", "cpf": "123.456.789-09"}
    values.update(extra)
    add_patient(conn, codpac, nome, **values)


def order(conn, cod, codpac, hora="08:30"):
    add_order(conn, cod, codpac, dtaentrada=DAY, hora=hora)


def items(conn, cod, codes=("GLI",), entered_at=DAY.replace(hour=8, minute=31)):
    return add_items(conn, cod, [{"CodConvExames": c, "DescExames": f"EXAME {c}", "Origem": "AMB"}
                                 for c in codes], terceirizado=LAB, entered_at=entered_at)


def clean_order(h, cod):
    with h.engine.begin() as conn:
        patient(conn, 1000 + cod, f"Paciente {cod}")
        order(conn, cod, 1000 + cod)
        return items(conn, cod, ("GLI", "TSH"))


def stored_counts(api):
    return collections.Counter(api.stored_tests())


def failure_files(tmp_path):
    return [json.loads(p.read_text(encoding="utf-8"))
            for p in sorted((tmp_path / "failed").glob("*.json"))]


# Each case inserts one dirty solicitation (between clean ones, on the same page) and returns
# (its item ids, expected: "delivered" or the words its failure reason must contain).
def identical_patient_twice(conn):
    patient(conn, 500, "Maria Duplicada")
    patient(conn, 500, "Maria Duplicada")
    order(conn, 50, 500)
    return items(conn, 50, ("GLI", "HEMO")), "delivered"


def identical_order_twice(conn):
    patient(conn, 500, "Maria")
    order(conn, 50, 500)
    order(conn, 50, 500)
    return items(conn, 50), "delivered"


def patient_twice_with_different_names(conn):
    patient(conn, 500, "Maria da Silva")
    patient(conn, 500, "Mario da Silva")
    order(conn, 50, 500)
    return items(conn, 50, ("GLI", "HEMO")), ["paciente 500 aparece mais de uma vez",
                                              "tabela paciente", "nome", "apague a linha duplicada"]


def order_twice_with_different_times(conn):
    patient(conn, 500, "Maria")
    order(conn, 50, 500, hora="08:30")
    order(conn, 50, 500, hora="09:45")
    return items(conn, 50), ["solicitação 50 aparece mais de uma vez", "tabela solicitacao", "Hora"]


def orphan_item(conn):
    return items(conn, 50), ["solicitação 50 não encontrada na tabela solicitacao"]


def null_codsolicitacao(conn):
    return items(conn, None, ("GLI", "HEMO")), [NO_COD_REASON]


def null_data_entrada(conn):
    patient(conn, 500, "Maria")
    order(conn, 50, 500)
    return items(conn, 50, entered_at=None), "delivered"


ODD_CODE = "SOL 43335/Ç\nç" + "9" * 120


def odd_long_code(conn):
    patient(conn, "PAC/ç 77 " + "7" * 100, "Maria")
    order(conn, ODD_CODE, "PAC/ç 77 " + "7" * 100)
    return items(conn, ODD_CODE), "delivered"


CASES = [identical_patient_twice, identical_order_twice, patient_twice_with_different_names,
         order_twice_with_different_times, orphan_item, null_codsolicitacao, null_data_entrada,
         odd_long_code]


@pytest.mark.parametrize("batch_size", [50, 1])   # one page, or a page edge at every item
@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_one_dirty_solicitation_costs_only_itself(dirty, tmp_path, case, batch_size):
    before = clean_order(dirty, 1)
    with dirty.engine.begin() as conn:
        bad, expected = case(conn)
    after = clean_order(dirty, 2)
    dirty.monitor(BATCH_SIZE=batch_size).run("drain")
    counts = stored_counts(dirty.api)
    clean = before + after + (bad if expected == "delivered" else [])
    assert {k: v for k, v in counts.items()} == {f"item-{i}": 1 for i in clean}
    files = failure_files(tmp_path)
    if expected == "delivered":
        assert files == []
    else:
        # an item without CodSolicitacao is never grouped: one file per item
        per_item = case is null_codsolicitacao
        assert sorted(i for f in files for i in f["item_ids"]) == sorted(bad)
        assert len(files) == (len(bad) if per_item else 1)
        for record in files:
            for words in expected:
                assert words in record["reason"]
    assert dirty.checkpoint() == max(after)
    for request in dirty.api.requests:
        if request.get("key"):
            assert SAFE.fullmatch(request["key"]) and len(request["key"]) <= 40


def test_null_data_entrada_takes_the_batch_moment(dirty):
    """Documented default (README "Dados do LIS"): a test without DataEntrada is dated at its
    batch, never after it (SPEC §5.5)."""
    with dirty.engine.begin() as conn:
        null_data_entrada(conn)
    dirty.monitor().step()
    [request] = [r for r in dirty.api.requests if r.get("body") and "batch" in r["body"]]
    batch = request["body"]["batch"]
    [test] = batch["order"]["tests"]
    assert (batch["date"], batch["time"]) == ("2026-11-27", "08:30:00")
    assert (test["collectionDate"], test["collectionTime"]) == ("2026-11-27", "08:30:00")


def test_odd_codes_go_out_under_short_ascii_ids(dirty):
    with dirty.engine.begin() as conn:
        odd_long_code(conn)
    dirty.monitor().step()
    [request] = [r for r in dirty.api.requests if r.get("body") and "batch" in r["body"]]
    batch = request["body"]["batch"]
    # pinned: the safe form of the code (slug + 8 hex of its SHA-256), not recomputed here
    assert batch["externalId"] == "sol-SOL-4.7f454c55"
    assert batch["order"]["externalId"] == "order-SOL-4.7f454c55"
    assert batch["order"]["patient"]["externalId"] == "pat-PAC-c.3fee9a59"
    assert re.fullmatch(r"sol-SOL-4\.7f454c55-[0-9a-f]{12}", request["key"])
    with dirty.engine.connect() as conn:
        stored = conn.execute(sa.text('SELECT "CodSolicitacao", "IdemKey" FROM "_MonitorItems"')).one()
    assert stored == ("SOL-4.7f454c55", request["key"])


def test_duplicate_warning_is_logged_once_across_cycles(dirty, caplog):
    with dirty.engine.begin() as conn:
        identical_patient_twice(conn)
    monitor = dirty.monitor(DEBOUNCE_SECONDS=30)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert monitor.step().held == 1     # read again every cycle while held
            dirty.clock_value += 5
        dirty.clock_value += 30
        assert monitor.step().sent == 1
    warnings = [r.getMessage() for r in caplog.records if "Linhas duplicadas" in r.getMessage()]
    assert len(warnings) == 1
    assert "paciente.codpaciente=500 (2 linhas)" in warnings[0]
    assert "solicitacao" not in warnings[0].split("paciente.codpaciente")[0]


def test_the_row_kept_among_duplicates_does_not_depend_on_read_order(dirty, tmp_path):
    """Different copies fail the solicitation; its failure file holds the same copy
    whichever was inserted first."""
    with dirty.engine.begin() as conn:
        patient(conn, 500, "Mario da Silva")
        patient(conn, 500, "Maria da Silva")
        order(conn, 50, 500)
        items(conn, 50)
        patient(conn, 600, "Maria da Silva")
        patient(conn, 600, "Mario da Silva")
        order(conn, 60, 600)
        items(conn, 60)
    dirty.monitor().step()
    names = {f["cod_solicitacao"]: f["event"]["paciente"]["nome"] for f in failure_files(tmp_path)}
    assert names == {"50": "Maria da Silva", "60": "Maria da Silva"}


def test_a_filed_duplicate_is_not_replayed_until_the_operator_fixes_the_file(dirty, tmp_path):
    """The copy kept in the file was picked, not known to be right: retry_failed.py refuses
    it while the file still carries the problem."""
    from bemsoft_monitor.failures import FailureStore
    from bemsoft_monitor.payload import TransformError, build_payload
    with dirty.engine.begin() as conn:
        patient_twice_with_different_names(conn)
    dirty.monitor().step()
    [path] = (tmp_path / "failed").glob("*.json")
    record = FailureStore.load(path)
    settings = dirty.settings_factory(dirty.url)
    with pytest.raises(TransformError, match="apague o campo 'problema'"):
        build_payload(record.event, settings, dirty.monitors[0].planner.catalog)
    fixed = {k: v for k, v in record.event.items() if k != "problema"}
    assert build_payload(fixed, settings, dirty.monitors[0].planner.catalog).payload is not None


def test_duplicates_cut_by_the_page_limit_are_read_whole(dirty, tmp_path):
    """The page limit may fall between two copies of an item: the item is read again whole,
    so the conflict is seen (not one copy by chance)."""
    with dirty.engine.begin() as conn:
        patient(conn, 500, "Maria da Silva")
        patient(conn, 500, "Mario da Silva")
        order(conn, 50, 500)
        bad = items(conn, 50)
    ok = clean_order(dirty, 2)
    dirty.monitor(BATCH_SIZE=1).run("drain")
    [record] = failure_files(tmp_path)
    assert record["item_ids"] == bad and "nome" in record["reason"]
    assert stored_counts(dirty.api) == {f"item-{i}": 1 for i in ok}
    assert dirty.checkpoint() == max(ok)


# ------------------------------------------------------------------ the monitor's own writes
def refuse(engine, item_id, *, when="insert", kind="integrity"):
    """Make the database itself refuse the monitor's write for one item, as a constraint
    or a trigger added by a DBA would: a real IntegrityError/DataError, no mock."""
    status = "" if when == "insert" else " AND NEW.\"Status\" = 'delivered'"
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            assert kind == "integrity"  # RAISE() in a trigger is SQLite's constraint error
            conn.execute(sa.text(
                f'CREATE TRIGGER refuse_item BEFORE {when.upper()} ON "_MonitorItems" '
                f'WHEN NEW."CodItemSol" = {item_id}{status} '
                "BEGIN SELECT RAISE(ABORT, 'recusado pelo banco'); END"))
        elif kind == "integrity":
            conn.execute(sa.text(
                'ALTER TABLE "_MonitorItems" ADD CONSTRAINT refuse_item CHECK '
                f'(NOT ("CodItemSol" = {item_id}{status.replace("NEW.", "")}))'))
        else:  # value too long, as PostgreSQL says it (SQLSTATE 22001: DataError)
            conn.execute(sa.text(
                "CREATE FUNCTION refuse_item() RETURNS trigger AS $$ BEGIN "
                f'IF NEW."CodItemSol" = {item_id}{status} THEN RAISE EXCEPTION '
                "'value too long for type character varying(64)' USING ERRCODE = '22001'; "
                "END IF; RETURN NEW; END $$ LANGUAGE plpgsql"))
            conn.execute(sa.text(
                f'CREATE TRIGGER refuse_item BEFORE {when.upper()} ON "_MonitorItems" '
                "FOR EACH ROW EXECUTE FUNCTION refuse_item()"))


def three_orders(h):
    return h.order(1, ["GLI"]), h.order(2, ["GLI", "TSH"]), h.order(3, ["TSH"])


def check_refused_sending(h, tmp_path, caplog, kind):
    first, bad, last = three_orders(h)
    monitor = h.monitor()
    monitor.start()
    refuse(h.engine, bad[1], kind=kind)
    with caplog.at_level(logging.WARNING):
        monitor.step()
        monitor.step()
        h.monitor().step()                 # a restart takes it up again: no second file
    assert stored_counts(h.api) == {f"item-{i}": 1 for i in first + last}
    [record] = failure_files(tmp_path)
    assert record["item_ids"] == bad and record["http_status"] is None
    assert "o banco recusou o registro do monitor em _MonitorItems" in record["reason"]
    assert "Banco de dados indisponível" not in caplog.text
    assert h.checkpoint() == max(last)
    return record


def test_a_refused_sending_record_costs_only_its_solicitation(harness, tmp_path, caplog):
    record = check_refused_sending(harness, tmp_path, caplog, "integrity")
    assert "recusado pelo banco" in record["reason"] or "refuse_item" in record["reason"]


@pytest.mark.postgres
def test_a_data_error_in_the_sending_record_is_narrowed_too(pg_url, api, settings_factory,
                                                           tmp_path, caplog):
    h = Harness(pg_url, api, settings_factory)
    try:
        record = check_refused_sending(h, tmp_path, caplog, "data")
        assert "value too long" in record["reason"]
    finally:
        h.close()


def test_a_refused_outcome_update_does_not_stop_the_others(harness, tmp_path, caplog):
    first, bad, last = three_orders(harness)
    monitor = harness.monitor()
    monitor.start()
    refuse(harness.engine, bad[0], when="update")
    with caplog.at_level(logging.WARNING):
        monitor.step()
        monitor.step()
    assert stored_counts(harness.api) == {f"item-{i}": 1 for i in first + bad + last}
    assert harness.checkpoint() == max(last)
    assert "o banco recusou gravar o resultado 'delivered'" in caplog.text
    assert "Banco de dados indisponível" not in caplog.text
    with harness.engine.connect() as conn:
        statuses = dict(conn.execute(sa.text('SELECT "CodItemSol", "Status" FROM "_MonitorItems"')).all())
    assert statuses == {**{i: "delivered" for i in first + last}, **{i: "sending" for i in bad}}
    assert failure_files(tmp_path) == []   # delivered: not a failure


def test_only_connection_errors_are_outages(db_url, tmp_path):
    from bemsoft_monitor.source import is_outage
    engine = sa.create_engine(db_url)
    with pytest.raises(sa.exc.DBAPIError) as refused:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE t_once (k INTEGER PRIMARY KEY)"))
            conn.execute(sa.text("INSERT INTO t_once VALUES (1), (1)"))
    assert isinstance(refused.value, sa.exc.IntegrityError) and not is_outage(refused.value)
    if engine.dialect.name == "postgresql":
        with pytest.raises(sa.exc.DBAPIError) as missing, engine.connect() as conn:
            conn.execute(sa.text("SELECT * FROM no_such_table"))
        assert not is_outage(missing.value)
        unreachable = sa.create_engine("postgresql+psycopg://postgres@127.0.0.1:1/x",
                                       connect_args={"connect_timeout": 2})
    else:
        unreachable = sa.create_engine(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}")
    with pytest.raises(sa.exc.DBAPIError) as down:
        unreachable.connect()
    assert is_outage(down.value)
    engine.dispose()


def test_the_readme_lists_every_data_failure_reason():
    """README "Dados do LIS" is the lab's guide: each reason the monitor writes is there."""
    from bemsoft_monitor.monitor import DB_REFUSED_REASON
    from conftest import ROOT
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Dados do LIS", 1)[1].split("\n## ", 1)[0]
    for text in (NO_COD_REASON, DB_REFUSED_REASON.split(":")[0],
                 "não encontrada na tabela solicitacao (itens sem pedido): confira o cadastro",
                 "aparece mais de uma vez na tabela paciente com dados diferentes",
                 "apague a linha duplicada errada no LIS",
                 "paciente sem codpaciente e sem CPF: não há como identificá-lo",
                 "sem nome (tabela paciente, coluna nome;",
                 "sem data de nascimento válida: preencha paciente.datanasc",
                 "sem sexo M/F: preencha paciente.sexo",
                 "item sem código de exame (ItemSol.CodConvExames vazio)",
                 "não existe no catálogo /tests da Bemsoft",
                 "erro inesperado ao preparar o pedido", "erro inesperado ao montar o pedido",
                 "erro inesperado ao enviar", "event.problema",
                 "Linhas duplicadas no banco do LIS (tabela sem chave"):
        assert text in " ".join(section.split()), text
