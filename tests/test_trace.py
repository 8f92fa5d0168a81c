"""`--trace`: an order's story, told from what the real pipeline left behind (the monitor's
records, its history, FAILED_DIR and the replay's `sent` folder) and from the LIS for what it
never took up. Real databases, the fake API, the real CLIs."""
from __future__ import annotations

import datetime as dt
import io

import pytest

from bemsoft_monitor.cli import run_trace
from bemsoft_monitor.payload import idempotency_key
from bemsoft_monitor.replay_cli import main as retry_main
from bemsoft_monitor.testing.harness import write_env
from bemsoft_monitor.trace import Event, QueryError, State, Tracer, parse_query
from conftest import POSTGRESQL, run
from test_api_behaviour import fast_clocks

SECRET_NAME = "Benedita Sigilosa Prates"
PATIENT_DATA = (SECRET_NAME, "Benedita", "123.456.789-09", "12345678909", "1980-01-02")


def trace(settings, text):  # noqa
    out = io.StringIO()
    code = run_trace(settings, text, out=out)
    return code, out.getvalue()


def no_patient_data(text):
    for secret in PATIENT_DATA:
        assert secret not in text, secret


def now_local(settings):
    return dt.datetime.now(settings.tz).replace(tzinfo=None, microsecond=0)


@pytest.fixture
def pipeline(harness, tmp_path):
    """The real pipeline, with DEBOUNCE_SECONDS=600 (stepped on the monitor's clock), has
    left: 43335 delivered in two parts (an exam added the next day), 43336 refused with a
    400 and then replayed by retry_failed.py, 43337 of another lab, 43338 just entered and
    held by the debounce."""
    api = harness.api
    monitor = harness.monitor(DEBOUNCE_SECONDS=600)
    settings = monitor.settings

    def settle():
        monitor.step()                      # first seen: the debounce starts
        harness.clock_value += 601
        monitor.step()                      # quiet long enough: sent

    first = harness.order(43335, ["GLI", "HEMO"], patient={"nome": SECRET_NAME})
    settle()
    added = harness.items(43335, ["TSH"], entered_at=dt.datetime(2026, 11, 28, 7, 0))
    settle()
    refused = harness.order(43336, ["FE"], patient={"nome": SECRET_NAME})
    api.fail_next(1, status=400, body={"error": f"paciente {SECRET_NAME} 123.456.789-09 inválido"})
    settle()
    assert len(list(settings.failed_dir.glob("*.json"))) == 1
    env = write_env(tmp_path, harness.url, api.url, BEMSOFT_RETRIES=0, LOG_FILE="-")
    assert retry_main(["--env-file", str(env), "--send"], out=io.StringIO()) == 0
    assert not list(settings.failed_dir.glob("*.json"))
    other = harness.order(43337, ["GLI"], terceirizado="OUTRO LABORATORIO")
    held = harness.order(43338, ["UREIA"], entered_at=now_local(settings))
    assert monitor.step().held == 1
    return dict(settings=settings, first=first, added=added, refused=refused, other=other,
                held=held, harness=harness)


def test_story_of_each_order(pipeline):
    settings, api = pipeline["settings"], pipeline["harness"].api
    first, added = pipeline["first"], pipeline["added"]

    code, text = trace(settings, "43335")
    assert code == 0, text
    no_patient_data(text)
    story = Tracer(settings, pipeline["harness"].engine).story(parse_query("43335"))
    assert [i.item_id for i in story.items] == first + added
    assert {i.state for i in story.items} == {State.DELIVERED}
    keys = [idempotency_key("43335", first), idempotency_key("43335", added)]
    assert [(s.event, s.item_ids, s.key, s.http_status) for s in story.steps] == [
        (Event.SENDING, tuple(first), keys[0], None), (Event.DELIVERED, tuple(first), keys[0], 201),
        (Event.SENDING, tuple(added), keys[1], None), (Event.DELIVERED, tuple(added), keys[1], 201)]
    sent_keys = {r["key"] for r in api.requests if r["status"] == 201}
    assert set(keys) <= sent_keys
    for key in keys:
        assert key in text
    assert "Nada pendente: todos os itens foram entregues." in text
    assert text.index(keys[0]) < text.index(keys[1])            # oldest first
    assert "exame GLI" in text and "exame TSH" in text

    code, text = trace(settings, f"item:{added[0]}")
    assert code == 0 and f"Item {added[0]}" in text and keys[1] in text and keys[0] not in text

    code, text = trace(settings, "43336")
    assert code == 0, text
    no_patient_data(text)
    assert "API rejeitou o pedido (HTTP 400, validação)" in text
    assert "reenviado (fora de FAILED_DIR)" in text
    story = Tracer(settings, pipeline["harness"].engine).story(parse_query("43336"))
    [item] = story.items
    assert item.state == State.REPLAYED and item.item_id == pipeline["refused"][0]
    [file] = story.files
    assert [(s.event, s.http_status, s.file) for s in story.steps] == [
        (Event.SENDING, None, None), (Event.FAILED, 400, file.name), (Event.REPLAYED, 201, file.name)]
    replayed = [r for r in api.requests if r["status"] == 201 and r["body"]["batch"]["externalId"] == "sol-43336"]
    assert story.steps[-1].key == replayed[0]["key"] == file.key != story.steps[0].key

    code, text = trace(settings, "43337")
    assert code == 1, text
    assert "de outro laboratório: ItemSol.NomeTerceirizado = 'OUTRO LABORATORIO'" in text
    assert "O monitor nunca registrou esta solicitação." in text

    code, text = trace(settings, "sol-43338")
    assert code == 1, text
    assert "aguardando o intervalo de agrupamento" in text and "DEBOUNCE_SECONDS=600" in text
    no_patient_data(text)

    code, text = trace(settings, "99999")
    assert code == 1, text
    assert "A solicitação 99999 não existe na tabela solicitacao do LIS." in text
    assert "O LIS não tem itens (ItemSol) com CodSolicitacao = 99999." in text


def item(item_id, code="GLI"):
    return {"CodItemSol": item_id, "CodConvExames": code, "DescExames": code, "Origem": "A"}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_never_seen_items_say_why(harness):
    """Items the monitor has no record of: the monitor never ran, before its start point
    (START_FROM, the floor), committed late inside and below the look-back window, not read
    yet."""
    settings = harness.settings_factory(harness.url, START_FROM="latest", LOOKBACK_ITEMS="3")
    tracer = Tracer(settings, harness.engine)

    def state(text):
        story = tracer.story(parse_query(text))
        assert not story.found
        [view] = story.items
        return view.state, view.text

    harness.order(1, [item(10)])
    assert state("item:10")[0] == State.NO_MONITOR
    monitor = harness.monitor(START_FROM="latest", LOOKBACK_ITEMS="3")
    monitor.step()                                  # starts after 10
    assert state("1")[0] == State.BEFORE_START
    harness.order(2, [item(i) for i in (20, 22, 24, 26, 28, 30)])
    monitor.step()                                  # checkpoint 30; floor 24 (30 - 2 x 3)
    assert harness.checkpoint() == 30
    harness.order(3, [item(29)])                    # late commits, not read yet
    harness.order(4, [item(25)])
    harness.order(5, [item(21)])
    harness.order(6, [item(40)])
    assert state("item:29") == (State.LATE, "commit tardio: abaixo do checkpoint 30, dentro da "
                                "janela de releitura (LOOKBACK_ITEMS=3); será lido no próximo ciclo")
    missed = state("4")
    assert missed[0] == State.MISSED and "aumente LOOKBACK_ITEMS para pelo menos 6" in missed[1]
    assert state("5")[0] == State.BEFORE_START and "bemsoft#inicio = 24" in state("5")[1]
    assert state("6") == (State.UNREAD, "ainda não lido: acima do checkpoint 30; o monitor lê em "
                          "ordem de CodItemSol e o envia num dos próximos ciclos")
    monitor.step()                                  # the window finds 29; 25 and 21 stay unread
    assert {"item-29", "item-40"} <= set(harness.api.stored_tests())
    # 29's record in _MonitorItems is already pruned (below the new floor): the history keeps it
    assert harness.checkpoint() == 40
    story = tracer.story(parse_query("item:29"))
    assert story.found and story.items[0].state == State.DELIVERED
    assert [s.event for s in story.steps] == [Event.SENDING, Event.DELIVERED]
    assert tracer.story(parse_query("6")).items[0].state == State.DELIVERED
    assert state("4")[0] == State.BEFORE_START        # the floor followed: 34 now


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_send_without_an_answer_is_waiting_for_the_api(harness):
    ids = harness.order(43339, ["GLI"])
    harness.api.fail_next(10, status=503)
    monitor = fast_clocks(harness, harness.monitor())
    monitor.step()
    code, text = trace(monitor.settings, "43339")
    assert code == 0, text
    story = Tracer(monitor.settings, harness.engine).story(parse_query("43339"))
    [view] = story.items
    key = idempotency_key("43339", ids)
    assert view.state == State.SENDING and f"enviado sob a chave {key}" in view.text
    assert f"item {ids[0]}: aguardando a resposta da API" in text.split("Pendente:")[1]
    harness.api.clear_faults()
    monitor.skip_pause()                 # the pause after the failed cycle is over
    monitor.step()
    story = Tracer(monitor.settings, harness.engine).story(parse_query("43339"))
    assert story.items[0].state == State.DELIVERED
    steps = [(s.event, s.key, s.http_status) for s in story.steps]
    assert steps[0] == (Event.SENDING, key, None) and steps[-1] == (Event.DELIVERED, key, 201)
    assert (Event.ATTEMPT, key, 503) in steps   # the attempt without an answer, same key
    code, text = trace(monitor.settings, "43339")
    assert "tentativa sem resposta definitiva (HTTP 503" in text and "Nada pendente" in text


@pytest.mark.parametrize("db_url", ["sqlite", POSTGRESQL], indirect=True)
def test_a_lis_with_text_codes(db_url, api, settings_factory):
    """codsolicitacao as VARCHAR: the number typed is compared as text when the column will
    not take a number (PostgreSQL refuses `varchar = bigint`), and a code with letters works."""
    import sqlalchemy as sa
    from bemsoft_monitor.schema import legacy_metadata
    from bemsoft_monitor.testing.sampledata import create_legacy_schema
    from conftest import Harness

    engine = sa.create_engine(db_url)
    legacy_metadata.drop_all(engine)
    create_legacy_schema(engine, text_codes=True)
    engine.dispose()
    h = Harness(db_url, api, settings_factory)
    try:
        numeric = h.order("43335", ["GLI"], patient={"codpaciente": "P0"})
        lettered = h.order("AB-7/2", ["TSH"], patient={"codpaciente": "P1"})
        h.monitor().step()
        settings = settings_factory(db_url)
        for text, ids in (("43335", numeric), ("AB-7/2", lettered)):
            code, out = trace(settings, text)
            assert code == 0, out
            story = Tracer(settings, h.engine).story(parse_query(text))
            assert [(i.item_id, i.state) for i in story.items] == [(ids[0], State.DELIVERED)]
        code, out = trace(settings, "99")
        assert code == 1 and "O LIS não tem itens (ItemSol) com CodSolicitacao = 99." in out
    finally:
        h.close()


@pytest.mark.parametrize("text", ["", "item:", "item:abc", "item:12x", "x" * 65, "43\x1b335"])
def test_a_search_that_names_nothing_is_refused(text):
    with pytest.raises(QueryError):
        parse_query(text)


def test_query_forms():
    assert parse_query(" 43335 ") == parse_query("sol-43335") == parse_query("sol:43335")
    assert parse_query("item:52009") == parse_query("item-52009") == parse_query("ITEM 52009")
    assert parse_query("item:052009").value == "52009"
    assert parse_query("AB/12").value == "AB/12"


def test_trace_command_exit_codes(env_file, legacy, tmp_path):
    """As a user runs it: 1 with the reason for an unknown number, 2 for a search that names
    nothing or a configuration error, 0 once the monitor has delivered it."""
    legacy.order(7, ["GLI"])
    result = run("monitor_bemsoft.py", "--env-file", str(env_file), "--trace", "424242")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "A solicitação 424242 não existe na tabela solicitacao do LIS." in result.stdout
    result = run("monitor_bemsoft.py", "--env-file", str(env_file), "--trace", "item:abc")
    assert result.returncode == 2 and "só com algarismos" in result.stdout
    assert run("monitor_bemsoft.py", "--env-file", str(env_file), "--once").returncode == 0
    result = run("monitor_bemsoft.py", "--env-file", str(env_file), "--trace", "7")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Nada pendente" in result.stdout
    bad = tmp_path / "bad.env"
    bad.write_text(env_file.read_text(encoding="utf-8") + "BATCH_SIZE=zero\n", encoding="utf-8")
    result = run("monitor_bemsoft.py", "--env-file", str(bad), "--trace", "7")
    assert result.returncode == 2 and "BATCH_SIZE" in result.stdout + result.stderr


def test_readme_trace_commands_parse():
    from bemsoft_monitor.cli import build_parser
    from conftest import ROOT

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = [line.split()[2:] for line in readme.splitlines()
                if line.startswith("python monitor_bemsoft.py") and "--trace" in line]
    assert len(commands) >= 3
    for argv in commands:
        args = build_parser().parse_args(argv)
        assert parse_query(args.trace).kind in ("sol", "item")


def test_trace_statements_in_t_sql(tmp_path):
    """The story's statements as SQL Server receives them: TOP instead of LIMIT, the
    monitor's tables in dbo, the history sought by (Name, CodSolicitacao) / (Name,
    CodItemSol) without an ORDER BY that could make a planner walk the (Name, At) index."""
    import sqlalchemy as sa
    from bemsoft_monitor.config import parse_settings
    from test_sqlserver_sql import tsql

    settings = parse_settings({"DATABASE_URL": "sqlite://", "TERCEIROS": "LAB", "START_FROM": "0",
                               "FAILED_DIR": str(tmp_path / "f"), "BEMSOFT_DRY_RUN": "1"}, base_dir=tmp_path)
    sql = {name: tsql(s) for name, s in Tracer(settings, sa.create_engine("sqlite://")).statements().items()}
    assert sql["lis_items"].startswith("SELECT TOP 500 [ItemSol].[CodItemSol]")
    assert "WHERE [ItemSol].[CodSolicitacao] = :cod ORDER BY [ItemSol].[CodItemSol]" in sql["lis_items"]
    assert "paciente" not in " ".join(sql.values()) and "LIMIT" not in " ".join(sql.values())
    assert sql["solicitation"] == ("SELECT TOP 1 solicitacao.codsolicitacao FROM solicitacao "
                                   "WHERE solicitacao.codsolicitacao = :cod")
    assert "FROM dbo.[_MonitorState]" in sql["state"]
    assert ("WHERE dbo.[_MonitorItems].[Name] = :Name_1 AND (dbo.[_MonitorItems].[CodSolicitacao] "
            "IN (:CodSolicitacao_1_1) OR dbo.[_MonitorItems].[CodItemSol] IN (:CodItemSol_1_1, "
            ":CodItemSol_1_2))") in sql["records"]
    assert sql["history"].endswith("FROM dbo.[_MonitorHistory] WHERE dbo.[_MonitorHistory].[Name] = "
                                   ":Name_1 AND dbo.[_MonitorHistory].[CodSolicitacao] IN (:CodSolicitacao_1_1)")
    assert sql["history_item"].endswith("dbo.[_MonitorHistory].[CodItemSol] = :CodItemSol_1")
