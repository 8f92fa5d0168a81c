"""Upgrades are safe (issue 16 §5): the tables and FAILED_DIR exactly as the previous release
(schema version 1, no history) leaves them mid-send; this release finishes the work once,
records its schema version and starts the history there. A newer schema stops the start."""
from __future__ import annotations

import collections
import datetime as dt
import json
import os

import pytest
import sqlalchemy as sa

from bemsoft_monitor.db import monitor_schema_map
from bemsoft_monitor.migrations import CURRENT, VERSION_ROW
from bemsoft_monitor.payload import idempotency_key
from bemsoft_monitor.schema import MONITOR_SCHEMA, HistoryEvent as E, monitor_history
from bemsoft_monitor.testing.sampledata import create_legacy_schema
from conftest import LAB, Harness

# --- the previous release's own tables, as its schema.py defines them (version 1)
previous = sa.MetaData(schema=MONITOR_SCHEMA)
old_state = sa.Table(
    "_MonitorState", previous,
    sa.Column("Name", sa.String(100), primary_key=True),
    sa.Column("LastItemId", sa.BigInteger, nullable=False),
    sa.Column("UpdatedAt", sa.DateTime, nullable=False),
)
old_items = sa.Table(
    "_MonitorItems", previous,
    sa.Column("Name", sa.String(100), primary_key=True),
    sa.Column("CodItemSol", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("CodSolicitacao", sa.String(64), nullable=False),
    sa.Column("Status", sa.String(16), nullable=False),
    sa.Column("IdemKey", sa.String(100), nullable=False),
    sa.Column("UpdatedAt", sa.DateTime, nullable=False),
    sa.Column("Reason", sa.Unicode(1000), nullable=True),
    sa.Column("HttpStatus", sa.Integer, nullable=True),
)


def item(item_id, code):
    return {"CodItemSol": item_id, "CodConvExames": code, "DescExames": code, "Origem": "AMB"}


def old_failure_file(folder, cod, key, item_ids, *, reason, http_status, refused):
    """A failure file in the previous release's format (FailureRecord.to_json, version 1)."""
    event = {"cod_solicitacao": cod,
             "solicitacao": {"codsolicitacao": int(cod), "codpaciente": 100 + int(cod),
                             "dtaentrada": "2026-11-27T00:00:00", "Hora": "08:30"},
             "paciente": {"codpaciente": 100 + int(cod), "nome": f"Paciente {cod}",
                          "cpf": "123.456.789-09", "datanasc": "1980-01-02T00:00:00", "sexo": "F"},
             "items": [{"CodItemSol": i, "CodSolicitacao": int(cod), "DataEntrada": "2026-11-27T08:31:00",
                        "DescExames": "GLI", "CodConvExames": "GLI", "NomeTerceirizado": LAB,
                        "Origem": "AMB", "SituacaoResultado": "PENDENTE"} for i in item_ids]}
    data = {"version": 1, "created_at": "2026-11-27T11:31:05+00:00", "reason": reason,
            "http_status": http_status, "attempts": 1, "idempotency_key": key,
            "cod_solicitacao": cod, "item_ids": item_ids, "response": "", "refused": refused,
            "event": event}
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / f"20261127T113105Z_{cod}_{key[-24:]}.json"
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    os.chmod(path, 0o600)
    return path


@pytest.fixture(params=[1, 4], ids=["conc1", "conc4"])
def concurrency(request):
    return request.param


def test_upgrade_from_the_previous_release_mid_send(db_url, api, settings_factory, tmp_path,
                                                    concurrency):
    from conftest import run
    from bemsoft_monitor.testing.harness import write_env
    lab = Harness(db_url, api, settings_factory)
    failed = tmp_path / "failed"
    # B was POSTed by the previous release (the API has its key) before it crashed
    before = Harness(f"sqlite:///{tmp_path / 'antes.db'}", api, settings_factory)
    create_legacy_schema(before.engine)
    before.order(2, [item(21, "GLI"), item(22, "TSH")])
    before.monitor().run("drain")
    before.close()
    (tmp_path / "antes.db").unlink()
    assert api.stored_tests() == ["item-21", "item-22"]

    orders = {
        1: [item(11, "GLI"), item(12, "HEMO")],   # "sending": crashed before its POST
        2: [item(21, "GLI"), item(22, "TSH")],    # "sending": POSTed, answer lost
        3: [item(31, "GLI")],                     # "nofile": refused (400), file not written
        4: [item(41, "GLI")],                     # "sending": refused, file written, not recorded
        5: [item(51, "GLI")],                     # delivered (the checkpoint waits for 11)
        6: [item(61, "GLI")],                     # new: the previous release never read it
    }
    ids = {cod: lab.order(cod, items) for cod, items in orders.items()}
    keys = {cod: idempotency_key(str(cod), ids[cod]) for cod in ids}
    file_d = old_failure_file(failed, "4", keys[4], ids[4], reason="API rejeitou o pedido "
                              "(HTTP 400, validação)", http_status=400, refused=True)
    file_g = old_failure_file(failed, "7", "sol-7-0a1b2c3d4e5f", [71], reason="exame sem "
                              "mapeamento", http_status=None, refused=False)
    engine = lab.engine.execution_options(schema_translate_map=monitor_schema_map(lab.engine.dialect.name))
    previous.create_all(engine)
    now = dt.datetime(2026, 11, 27, 11, 31, 5)
    rows = [{"Name": "bemsoft", "CodItemSol": i, "CodSolicitacao": str(cod), "Status": status,
             "IdemKey": keys[cod], "UpdatedAt": now, "Reason": reason, "HttpStatus": http}
            for cod, status, reason, http in (
                (1, "sending", None, None), (2, "sending", None, None),
                (3, "nofile", "API rejeitou o pedido (HTTP 400, validação)", 400),
                (4, "sending", None, None), (5, "delivered", None, None))
            for i in ids[cod]]
    with engine.begin() as conn:
        conn.execute(old_items.insert(), rows)
        conn.execute(old_state.insert(), [
            {"Name": "bemsoft", "LastItemId": 10, "UpdatedAt": now},
            {"Name": "bemsoft#inicio", "LastItemId": 0, "UpdatedAt": now}])

    monitor = lab.monitor(BEMSOFT_CONCURRENCY=concurrency)
    monitor.run("drain")

    # finished exactly once: what the API had is not stored twice, refusals are not re-POSTed
    stored = collections.Counter(api.stored_tests())
    assert stored == {f"item-{i}": 1 for cod in (1, 2, 6) for i in ids[cod]}
    posted = collections.Counter(r["key"] for r in api.requests if r.get("body") and "batch" in r["body"])
    assert posted == {keys[1]: 1, keys[2]: 2, keys[6]: 1}      # B: its first POST and the 409
    with engine.connect() as conn:
        status = dict(conn.execute(sa.select(old_items.c.CodItemSol, old_items.c.Status)).all())
        version = conn.execute(sa.select(old_state.c.LastItemId)
                               .where(old_state.c.Name == VERSION_ROW)).scalar()
    assert version == CURRENT == 2
    assert {i: s for i, s in status.items()} == {
        11: "delivered", 12: "delivered", 21: "delivered", 22: "delivered", 31: "failed",
        41: "failed", 51: "delivered", 61: "delivered"}
    assert lab.checkpoint() == 61
    files = sorted(p.name for p in failed.glob("*.json"))
    assert len(files) == 3 and file_d.name in files and file_g.name in files
    [file_c] = [f for f in files if f.endswith(f"_3_{keys[3][-24:]}.json")]

    # the history starts here: no row for what was settled before, one per item since
    h = monitor_history
    with engine.connect() as conn:
        story = [tuple(r) for r in conn.execute(
            sa.select(h.c.CodItemSol, h.c.Event, h.c.IdemKey, h.c.FileName).order_by(h.c.CodItemSol, h.c.Id))]
    assert story == [
        (11, E.DELIVERED, keys[1], None), (12, E.DELIVERED, keys[1], None),
        (21, E.DUPLICATE, keys[2], None), (22, E.DUPLICATE, keys[2], None),
        (31, E.FAILED, keys[3], file_c), (41, E.FAILED, keys[4], file_d.name),
        (61, E.SENDING, keys[6], None), (61, E.DELIVERED, keys[6], None)]

    # a second start changes nothing: no migration, no send, no row
    requests = len(api.requests)
    lab.monitor(BEMSOFT_CONCURRENCY=concurrency).run("drain")
    assert [r for r in api.requests[requests:] if r.get("body")] == []
    assert collections.Counter(api.stored_tests()) == stored
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(h)).scalar() == len(story)

    # the previous release's failure files replay under this one, into the history
    env = write_env(tmp_path, db_url, api.url, BEMSOFT_CONCURRENCY=concurrency)
    done = run("retry_failed.py", "--env-file", str(env), "--send")
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(failed.glob("*.json")) == []
    with engine.connect() as conn:
        replayed = sorted(conn.execute(sa.select(h.c.CodItemSol, h.c.FileName)
                                       .where(h.c.Event == E.REPLAYED)).all())
    assert [tuple(r) for r in replayed] == [(31, file_c), (41, file_d.name), (71, file_g.name)]
    lab.close()


def test_a_newer_schema_stops_the_start(harness, tmp_path):
    harness.order(1, ["GLI"])
    harness.monitor().start()
    engine = harness.monitor().source.engine
    with engine.begin() as conn:
        conn.execute(old_state.update().where(old_state.c.Name == VERSION_ROW)
                     .values(LastItemId=CURRENT + 1))
    from conftest import run
    from bemsoft_monitor.testing.harness import write_env
    env = write_env(tmp_path, harness.url, harness.api.url)
    for args in (["--once"], ["--once", "--dry-run"]):
        done = run("monitor_bemsoft.py", "--env-file", str(env), *args)
        assert done.returncode == 2, done.stderr
        assert f"estão na versão {CURRENT + 1}, mais nova que a deste programa ({CURRENT})" in done.stderr
    assert harness.api.requests == []
    with engine.connect() as conn:
        assert conn.execute(sa.select(old_state.c.LastItemId)
                            .where(old_state.c.Name == VERSION_ROW)).scalar() == CURRENT + 1
