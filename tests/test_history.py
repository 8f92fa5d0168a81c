"""The order history (_MonitorHistory, issue 16): written with the records it accompanies,
kept by age, none in DRY_RUN; the replay adds its rows. Real SQLite and PostgreSQL (SQL Server
with TEST_MSSQL_URL), the project's fake API on loopback."""
from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from bemsoft_monitor.db import monitor_schema_map
from bemsoft_monitor.history import History, utcnow
from bemsoft_monitor.payload import idempotency_key
from bemsoft_monitor.schema import HistoryEvent as E, monitor_history


def history(engine, **where):
    """(CodItemSol, Event, IdemKey, HttpStatus, ExamCode, FileName) in order."""
    h = monitor_history
    query = sa.select(h.c.CodItemSol, h.c.Event, h.c.IdemKey, h.c.HttpStatus, h.c.ExamCode,
                      h.c.FileName).order_by(h.c.At, h.c.Id)
    for column, value in where.items():
        query = query.where(h.c[column] == value)
    engine = engine.execution_options(schema_translate_map=monitor_schema_map(engine.dialect.name))
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(query)]


def events(engine, **where):
    return [(r[0], r[1]) for r in history(engine, **where)]


def test_an_order_delivered_in_two_parts(harness):
    first = harness.order(43335, ["GLI", "HEMO"])
    monitor = harness.monitor()
    monitor.run("drain")
    later = harness.items(43335, ["TSH"])          # an exam added after the first send
    monitor.run("drain")
    rows = history(harness.engine, CodSolicitacao="43335")
    key1, key2 = idempotency_key("43335", first), idempotency_key("43335", later)
    assert rows == [
        (first[0], E.SENDING, key1, None, "GLI", None),
        (first[1], E.SENDING, key1, None, "HEMO", None),
        (first[0], E.DELIVERED, key1, 201, "GLI", None),
        (first[1], E.DELIVERED, key1, 201, "HEMO", None),
        (later[0], E.SENDING, key2, None, "TSH", None),
        (later[0], E.DELIVERED, key2, 201, "TSH", None),
    ]


def test_transient_answers_are_attempts_then_delivered(harness):
    ids = harness.order(7, ["GLI"])
    harness.api.fail_next(1, status=503)
    monitor = harness.monitor(BEMSOFT_RETRIES="0")
    monitor.step()
    assert events(harness.engine) == [(ids[0], E.SENDING)]     # the attempt waits in memory
    harness.clock_value += 1000
    monitor.gate.pause(0)
    monitor.run("drain")
    assert [(i, e, s) for i, e, _, s, _, _ in history(harness.engine)] == [
        (ids[0], E.SENDING, None), (ids[0], E.ATTEMPT, 503), (ids[0], E.DELIVERED, 201)]


def test_a_long_outage_writes_one_attempt_per_answer_not_one_per_probe(harness):
    from test_api_behaviour import FAST, fast_clocks

    ids = harness.order(9, ["GLI"])
    monitor = fast_clocks(harness, harness.monitor(BEMSOFT_RETRIES="0", **FAST))
    harness.api.fail_next(3, status=503)
    for _ in range(3):                                  # three probes, the same answer
        monitor.step()
        monitor.skip_pause()
    harness.api.fail_next(1, status=502)
    monitor.step()
    monitor.skip_pause()
    monitor.step()
    monitor.finish()
    got = [(i, e, s) for i, e, _, s, _, _ in history(harness.engine)]
    # the same 503 three times is one row; the 502 that follows is a new answer
    assert got == [(ids[0], E.SENDING, None), (ids[0], E.ATTEMPT, 503), (ids[0], E.ATTEMPT, 502),
                   (ids[0], E.DELIVERED, 201)], got


def test_a_scheduled_once_run_prunes_old_history_too(harness):
    harness.order(610, ["GLI"])
    monitor = harness.monitor(HISTORY_DAYS="30")
    monitor.run("once")
    h = monitor_history
    engine = monitor.source.engine
    old = utcnow() - dt.timedelta(days=31)
    with engine.begin() as conn:
        conn.execute(h.insert(), [{"Name": "bemsoft", "At": old, "CodSolicitacao": "1",
                                   "CodItemSol": 1, "Event": E.DELIVERED}])
    harness.monitor(HISTORY_DAYS="30").run("once")      # a new process, as the Task Scheduler runs it
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).where(h.c.At < old + dt.timedelta(days=1))).scalar() == 0


def test_dry_run_writes_no_history(harness):
    harness.order(8, ["GLI"])
    harness.monitor().start()   # the tables exist (a normal start made them)
    harness.monitor(BEMSOFT_DRY_RUN="1").run("drain")
    assert events(harness.engine) == []


def test_history_days_zero_keeps_none(harness):
    harness.order(9, ["GLI"])
    harness.monitor(HISTORY_DAYS="0").run("drain")
    assert events(harness.engine) == []
    assert harness.checkpoint() is not None


def test_a_400_then_a_replay(harness, tmp_path):
    from conftest import run
    from bemsoft_monitor.testing.harness import write_env
    ids = harness.order(500, ["GLI"])
    harness.api.fail_next(1, status=400, body={"error": "campo inválido"})
    harness.monitor().run("drain")
    [failed] = history(harness.engine)[1:]
    assert failed[:4] == (ids[0], E.FAILED, idempotency_key("500", ids), 400)
    file_name = failed[5]
    assert (tmp_path / "failed" / file_name).exists()
    env = write_env(tmp_path, harness.url, harness.api.url)
    done = run("retry_failed.py", "--env-file", str(env), "--send")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Histórico" not in done.stdout          # written: nothing to say
    rows = history(harness.engine)
    assert [(r[1], r[3], r[5]) for r in rows] == [
        (E.SENDING, None, None), (E.FAILED, 400, file_name), (E.REPLAYED, 201, file_name)]
    assert rows[2][2].startswith(idempotency_key("500", ids) + "-r")   # a refused key: a new one


def test_replay_without_the_database_still_replays(legacy, env_file, tmp_path):
    from conftest import run
    ids = legacy.order(501, ["GLI"])
    legacy.api.fail_next(1, status=400)
    legacy.monitor().run("drain")
    text = env_file.read_text().replace("DATABASE_URL=sqlite:///", "DATABASE_URL=sqlite:///nao/existe/")
    env_file.write_text(text)
    done = run("retry_failed.py", "--env-file", str(env_file), "--send")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[OK]" in done.stdout
    assert "Histórico (_MonitorHistory) não gravado: banco de dados indisponível" in done.stdout
    assert [e for _, e in events(legacy.engine)] == [E.SENDING, E.FAILED]
    assert f"item-{ids[0]}" in legacy.api.stored_tests()


def test_pruning_by_age_at_the_boundary(harness):
    harness.order(600, ["GLI"])
    monitor = harness.monitor(HISTORY_DAYS="30")
    monitor.run("drain")                                 # (its exit prunes: nothing old yet)
    pruner = History(monitor.settings)                   # a new process's, not yet due
    now = dt.datetime(2026, 12, 1, 12, 0, 0)
    cutoff = now - dt.timedelta(days=30)
    h = monitor_history
    engine = monitor.source.engine
    ages = [cutoff - dt.timedelta(seconds=1), cutoff, cutoff + dt.timedelta(seconds=1)]
    with engine.begin() as conn:
        conn.execute(h.delete())
        conn.execute(h.insert(), [
            {"Name": "bemsoft", "At": at, "CodSolicitacao": "1", "CodItemSol": n, "Event": E.DELIVERED}
            for n, at in enumerate(ages * 3)]
            + [{"Name": "outro", "At": ages[0], "CodSolicitacao": "1", "CodItemSol": 99,
                "Event": E.DELIVERED}])
    pruned = pruner.prune(engine, clock=0.0, batch=2, now=now)
    assert pruned == 2                                   # a small batch, oldest first
    assert pruner.prune(engine, clock=0.0, batch=2, now=now) == 1
    assert pruner.prune(engine, clock=0.0, batch=2, now=now) == 0
    with engine.connect() as conn:
        left = sorted((r.Name, r.At) for r in conn.execute(sa.select(h.c.Name, h.c.At)))
    # exactly 30 days old stays; another monitor's rows are not this one's to prune
    assert left == sorted([("bemsoft", cutoff)] * 3 + [("bemsoft", ages[2])] * 3
                          + [("outro", ages[0])])
    # once it found nothing, the next prune waits a minute (it runs only when idle anyway)
    assert pruner.prune(engine, clock=30.0, now=now + dt.timedelta(days=1)) == 0


def test_report_csv_for_a_day_and_a_month(harness, tmp_path):
    import csv
    from conftest import run
    from bemsoft_monitor.testing.harness import write_env
    item = lambda code, valor, terc: {"CodConvExames": code, "DescExames": code, "Origem": "AMB",
                                      "Valor": valor, "VlTerceirizado": terc}
    a = harness.order(11, [item("GLI", 12.5, 7), item("=HEMO", 30, 18.25)])  # not in the catalog
    monitor = harness.monitor()
    monitor.run("drain")
    harness.api.fail_next(1, status=400)
    b = harness.order(12, [item("TSH", 40, 22)])
    monitor.run("drain")
    h = monitor_history
    engine = monitor.source.engine
    # the rows, moved to the day of the report (UTC; TIMEZONE is America/Sao_Paulo, UTC-3)
    with engine.begin() as conn:
        for item_id, at in ((a[0], dt.datetime(2026, 11, 28, 3, 0, 0)),      # 00:00:00 local
                            (a[1], dt.datetime(2026, 11, 28, 3, 0, 1)),
                            (b[0], dt.datetime(2026, 11, 29, 2, 59, 59))):   # 23:59:59 local
            conn.execute(h.update().where(h.c.CodItemSol == item_id).values(At=at))
        conn.execute(h.insert(), [  # the day before and the day after, local: not in the day
            {"Name": "bemsoft", "At": dt.datetime(2026, 11, 28, 2, 59, 59), "CodSolicitacao": "10",
             "CodItemSol": 1, "Event": E.DELIVERED, "HttpStatus": 201},
            {"Name": "bemsoft", "At": dt.datetime(2026, 11, 29, 3, 0, 0), "CodSolicitacao": "13",
             "CodItemSol": 2, "Event": E.REPLAYED, "HttpStatus": 201}])
    env = write_env(tmp_path, harness.url, harness.api.url)
    out = tmp_path / "dia.csv"
    done = run("monitor_bemsoft.py", "--env-file", str(env), "--report", "2026-11-28",
               "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert "1 entregues, 2 falhas (2 solicitações)" in done.stderr
    raw = out.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")
    rows = list(csv.reader(io_text(raw), delimiter=";"))
    key_a0, key_a1 = idempotency_key("11", a[:1]), idempotency_key("11", a[1:])
    key_b = idempotency_key("12", b)
    assert rows == [
        ["Data e hora", "Solicitação", "Item", "Código do exame", "Chave", "HTTP", "Resultado",
         "Valor", "VlTerceirizado"],
        ["28/11/2026 00:00:00", "11", str(a[0]), "GLI", key_a0, "201", "entregue", "12,50", "7,00"],
        ["28/11/2026 00:00:01", "11", str(a[1]), "'=HEMO", key_a1, "", "falhou", "30,00", "18,25"],
        ["28/11/2026 23:59:59", "12", str(b[0]), "TSH", key_b, "400", "falhou", "40,00", "22,00"],
        ["Totais", "2 solicitações", "3 linhas", "entregues: 1", "falhas: 2"],
    ]
    # the month, to stdout: the rows of the 27th (local) and the 29th too
    month = run("monitor_bemsoft.py", "--env-file", str(env), "--report", "2026-11")
    assert month.returncode == 0, month.stderr
    rows = list(csv.reader(month.stdout.lstrip("\ufeff").splitlines(), delimiter=";"))
    assert [r[1] for r in rows[1:-1]] == ["10", "11", "11", "12", "13"]
    assert rows[-1] == ["Totais", "4 solicitações", "5 linhas", "entregues: 3", "falhas: 2"]
    bad = run("monitor_bemsoft.py", "--env-file", str(env), "--report", "2026-13")
    assert bad.returncode == 2 and "período inválido '2026-13'" in bad.stderr


def io_text(raw: bytes):
    import io
    return io.StringIO(raw.decode("utf-8-sig"), newline="")


def report_of_one_row(tmp_path, settings_factory, item_sol_ddl: str, item_sol_row: tuple,
                      event: str, status: int) -> str:
    """The CSV of 28/11/2026 from a bare LIS (ItemSol as `item_sol_ddl`, one row) and one
    history row for item 5 of solicitation 9."""
    import io
    from bemsoft_monitor.migrations import upgrade
    from bemsoft_monitor.report import parse_period, write_report
    url = f"sqlite:///{tmp_path / 'lis.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE ItemSol ({item_sol_ddl})")
        conn.exec_driver_sql("INSERT INTO ItemSol VALUES (?, ?)", item_sol_row)
    monitor = engine.execution_options(schema_translate_map=monitor_schema_map("sqlite"))
    upgrade(monitor)
    with monitor.begin() as conn:
        conn.execute(monitor_history.insert(), [{
            "Name": "bemsoft", "At": dt.datetime(2026, 11, 28, 15), "CodSolicitacao": "9",
            "CodItemSol": 5, "Event": event, "HttpStatus": status, "IdemKey": "sol-9-x"}])
    out = io.StringIO()
    write_report(settings_factory(url), engine, parse_period("2026-11-28"), out)
    return out.getvalue()


def test_report_without_valor_columns_in_the_lis(tmp_path, settings_factory):
    import csv
    import io
    text = report_of_one_row(tmp_path, settings_factory,
                             "CodItemSol INTEGER PRIMARY KEY, CodSolicitacao INT", (5, 9),
                             E.DUPLICATE, 409)
    assert list(csv.reader(io.StringIO(text), delimiter=";")) == [
        ["Data e hora", "Solicitação", "Item", "Código do exame", "Chave", "HTTP", "Resultado"],
        ["28/11/2026 12:00:00", "9", "5", "", "sol-9-x", "409", "entregue (já recebido, 409)"],
        ["Totais", "1 solicitação", "1 linha", "entregues: 1", "falhas: 0"]]


def test_readme_report_commands_work(legacy, env_file, tmp_path):
    """The README's --report commands, run as written (with --env-file), write the CSVs."""
    import shlex
    import subprocess
    import sys
    from conftest import ROOT
    from bemsoft_monitor.testing.harness import subprocess_env
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Histórico dos pedidos, relatório e atualização", 1)[1].split("\n## ", 1)[0]
    commands = [line for line in section.splitlines() if line.startswith("python monitor_bemsoft.py --report")]
    assert len(commands) == 2
    legacy.order(1, ["GLI"])
    legacy.monitor().run("drain")
    for command in commands:
        args = shlex.split(command)[1:]
        args[0] = str(ROOT / args[0])
        done = subprocess.run([sys.executable, *args, "--env-file", str(env_file)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60, env=subprocess_env())
        assert done.returncode == 0, done.stderr
        written = tmp_path / args[args.index("--output") + 1]
        assert written.read_bytes().startswith("\ufeffData e hora;".encode())


def test_history_statements_as_sql_server_compiles_them(settings_factory, tmp_path):
    """SQL Server: the prune is a TOP batch in a derived table, the report's queries stay
    within the parameter limit (CHUNK ids), the history lives in dbo."""
    from test_sqlserver_sql import tsql
    from bemsoft_monitor.report import CHUNK, history_statement, money_statement
    history = History(settings_factory(f"sqlite:///{tmp_path / 'x.db'}"))
    prune = tsql(history.prune_statement(dt.datetime(2025, 1, 1), 1000))
    assert prune == (
        "DELETE FROM dbo.[_MonitorHistory] WHERE dbo.[_MonitorHistory].[Id] IN (SELECT anon_1.[Id] "
        "FROM (SELECT TOP 1000 dbo.[_MonitorHistory].[Id] AS [Id] FROM dbo.[_MonitorHistory] WHERE "
        "dbo.[_MonitorHistory].[Name] = :Name_1 AND dbo.[_MonitorHistory].[At] < :At_1 ORDER BY "
        "dbo.[_MonitorHistory].[Id]) AS anon_1)")
    report = tsql(history_statement("bemsoft", dt.datetime(2026, 11, 28), dt.datetime(2026, 11, 29)))
    assert report.startswith("SELECT dbo.[_MonitorHistory].[At], ")
    assert report.endswith("ORDER BY dbo.[_MonitorHistory].[At], dbo.[_MonitorHistory].[Id]")
    money = tsql(money_statement(["Valor", "VlTerceirizado"], range(CHUNK)))
    assert money.startswith('SELECT [ItemSol].[CodItemSol], [ItemSol].[Valor], [ItemSol].[VlTerceirizado] FROM [ItemSol]')
    assert money.count(":CodItemSol_1_") == CHUNK < 2100


def test_a_refused_token_is_an_attempt_written_at_exit(harness):
    ids = harness.order(15, ["GLI"])
    monitor = harness.monitor()
    monitor.step()                       # the catalog is loaded with the right token
    harness.order(16, ["TSH"])
    harness.api.token = "revogado"
    monitor.run("once")
    rows = [(r[0], r[1], r[3]) for r in history(harness.engine)]
    assert rows[:2] == [(ids[0], E.SENDING, None), (ids[0], E.DELIVERED, 201)]
    assert [(e, s) for _, e, s in rows[2:]] == [(E.SENDING, None), (E.ATTEMPT, 401)]


def test_no_patient_data_in_the_history_reasons(harness):
    """A 400 that echoes the patient, and a data problem naming the patient: the history keeps
    the reason's group (what went wrong), never the name, CPF or birth date (kept 400 days)."""
    harness.order(700, ["GLI"], patient={"nome": "Maria Joana Silva", "cpf": "987.654.321-00"})
    harness.api.fail_next(1, status=400, body={
        "error": "paciente Maria Joana Silva CPF 98765432100 nascida em 1980-01-02: invalido"})
    harness.order(701, ["TSH"], patient={"nome": "Jose", "datanasc": None, "cpf": "111.222.333-44"})
    harness.monitor(DEFAULT_BIRTHDATE="").run("drain")
    h = monitor_history
    engine = harness.engine.execution_options(schema_translate_map=monitor_schema_map(harness.engine.dialect.name))
    with engine.connect() as conn:
        reasons = [r for (r,) in conn.execute(sa.select(h.c.Reason).where(h.c.Reason.is_not(None)))]
    assert len(reasons) == 2, reasons
    assert any("HTTP 400" in r for r in reasons) and any("data de nascimento" in r for r in reasons)
    text = " ".join(reasons)
    for private in ("Maria", "Silva", "98765432100", "987.654.321-00", "1980-01-02", "pat-"):
        assert private not in text, reasons


def test_the_report_never_holds_patient_data_or_the_token(harness):
    """The CSV is a new way out: fed an order whose patient has a name, CPF and birth date
    and a 400 that echoes them with the token, it holds codes, keys and outcomes only."""
    import io
    from bemsoft_monitor.report import parse_period, write_report
    from bemsoft_monitor.testing.harness import TOKEN
    harness.order(720, ["GLI"], patient={"nome": "Maria Joana Silva", "cpf": "987.654.321-00"})
    harness.api.fail_next(1, status=400, body={
        "error": f"paciente Maria Joana Silva CPF 98765432100 nascida em 1980-01-02 token {TOKEN}"})
    harness.order(721, ["TSH"], patient={"nome": "Maria Joana Silva", "cpf": "987.654.321-00"})
    monitor = harness.monitor()
    monitor.run("drain")
    out = io.StringIO()
    today = dt.datetime.now(monitor.settings.tz).strftime("%Y-%m")
    counts = write_report(monitor.settings, harness.engine, parse_period(today), out)
    assert (counts.delivered, counts.failed) == (1, 1), out.getvalue()
    for private in ("Maria", "Silva", "98765432100", "987.654.321-00", "1980-01-02", TOKEN):
        assert private not in out.getvalue(), private


@pytest.mark.parametrize("period", ["", "9999-12-31", "\uff12\uff10\uff12\uff16-\uff11\uff11", "0001-01-01"])
def test_report_refuses_an_odd_period_with_exit_2(legacy, env_file, period):
    """`--report ""` (an empty variable in a script) started the monitor itself; 9999-12-31
    overflowed datetime (a traceback); full-width digits were taken for 2026-11."""
    from conftest import run
    done = run("monitor_bemsoft.py", "--env-file", str(env_file), "--report", period, timeout=20)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"período inválido {period!r}: use AAAA-MM-DD" in done.stderr
    assert done.stdout == "" and "Traceback" not in done.stderr


def test_report_cells_starting_like_a_formula_are_text():
    """OWASP's CSV-injection starts: = + - @ and a tab or a carriage return (a code from the
    LIS keeps its tab in the history, so "\\t=HYPERLINK(...)" reached the CSV as is)."""
    from bemsoft_monitor.report import cell
    for start in ("=", "+", "-", "@", "\t", "\r"):
        assert cell(start + "HYPERLINK(\"http://x\")") == "'" + start + "HYPERLINK(\"http://x\")"
    assert cell("GLI") == "GLI" and cell(None) == "" and cell(" =1") == " =1"


def test_report_shows_a_text_valor_with_its_control_characters_escaped(tmp_path, settings_factory):
    """A LIS whose Valor is text: what is not a number goes to the CSV (and to the terminal,
    without --output) with control characters made visible and formulas inert."""
    import csv
    import io
    text = report_of_one_row(tmp_path, settings_factory, "CodItemSol INTEGER PRIMARY KEY, Valor TEXT",
                             (5, "\x1b]0;x\x07=1+1\nz"), E.DELIVERED, 201)
    row = list(csv.reader(io.StringIO(text), delimiter=";"))[1]
    assert row[-2:] == ["entregue", "\\x1b]0;x\\x07=1+1\\nz"] and "\x1b" not in text
