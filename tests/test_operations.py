"""Operations, driven as an operator would: retry_failed.py, the stop file, the
single-instance lock, /metrics and /healthz, and the systemd unit (the start/stop launcher
and the Windows files: test_service.py)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import sqlalchemy as sa

from bemsoft_monitor.lock import InstanceLock, advisory_key
from bemsoft_monitor.testing.harness import monitor_command, subprocess_env, wait_until
from conftest import ROOT, TOKEN, run


def failure_files(tmp_path):
    return sorted((tmp_path / "failed").glob("*.json"))


def make_failures(legacy, env_file):
    """Order 1 fails (no gender), order 2 has one unknown exam."""
    legacy.order(1, ["GLI"], patient={"sexo": None})
    legacy.order(2, ["TSH", "NOVO1"])
    result = run("monitor_bemsoft.py", "--env-file", str(env_file), "--once")
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------ retry_failed.py
def test_a_stop_asked_during_a_round_leaves_the_other_files_for_the_next(env_file, legacy, api,
                                                                         tmp_path):
    import io
    import threading
    from bemsoft_monitor.client import BemsoftClient
    from bemsoft_monitor.config import load_settings
    from bemsoft_monitor.replay_cli import build_parser, replay_once
    make_failures(legacy, env_file)
    before = failure_files(tmp_path)
    settings = load_settings(env_file)
    args = build_parser().parse_args(["--env-file", str(env_file), "--send"])
    shutdown, out = threading.Event(), io.StringIO()
    shutdown.set()                      # Ctrl+C / SIGTERM / stop file before the first file
    client = BemsoftClient(settings)
    posts = len(api.requests)
    try:
        code = replay_once(args, settings, client, None, tmp_path / "failed", tmp_path / "sent",
                           out, shutdown)
    finally:
        client.close()
    assert code == 0 and len(api.requests) == posts
    assert "Parada pedida: 2 arquivo(s) ficam para a próxima rodada." in out.getvalue()
    assert "Resumo: 0 arquivo(s)" in out.getvalue()
    assert failure_files(tmp_path) == before


def test_retry_dry_run_shows_payload_and_changes_nothing(env_file, legacy, api, tmp_path):
    make_failures(legacy, env_file)
    before = failure_files(tmp_path)
    assert len(before) == 2
    with open(env_file, "a", encoding="utf-8") as fh:
        fh.write("DEFAULT_GENDER=F\n")
    posts = len(api.requests)
    result = run("retry_failed.py", "--env-file", str(env_file))
    assert result.returncode == 1            # order 2's exam is still unknown
    assert "[DRY-RUN]" in result.stdout and '"externalId": "sol-1"' in result.stdout
    assert "NOVO1" in result.stdout
    assert "Resumo: 2 arquivo(s); enviados 0, com erro 1, a enviar (dry-run) 1" in result.stdout
    assert failure_files(tmp_path) == before
    assert len(api.requests) == posts


def test_retry_send_uses_current_settings_and_catalog_then_moves_files(env_file, legacy, api, tmp_path):
    make_failures(legacy, env_file)
    with open(env_file, "a", encoding="utf-8") as fh:
        fh.write("DEFAULT_GENDER=F\n")                       # fixes order 1
    api.set_catalog(api.catalog + [{"id": "NOVO1", "name": "NOVO", "specimen": {"id": "SORO", "name": "Soro"}}])
    sent = tmp_path / "enviados"
    result = run("retry_failed.py", "--env-file", str(env_file), "--send", "--move-ok", str(sent), "--verbose")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("[OK]") == 2
    assert "Resumo: 2 arquivo(s); enviados 2" in result.stdout
    assert failure_files(tmp_path) == []
    assert len(list(sent.glob("*.json"))) == 2
    assert TOKEN not in result.stdout + result.stderr
    stored = api.stored_tests()
    assert len(stored) == len(set(stored)) == 3                 # TSH, then GLI and NOVO1
    # a second run finds nothing to send again
    again = run("retry_failed.py", "--env-file", str(env_file), "--send", "--move-ok", str(sent))
    assert "Resumo: 0 arquivo(s)" in again.stdout and len(api.stored_tests()) == 3


def test_retry_after_body_error_uses_a_fresh_key(env_file, legacy, api, tmp_path):
    legacy.order(1, ["GLI"])
    api.fail_next(1, status=201, body={"error": "Não foi possível salvar os dados recebidos no lote sol-1."})
    assert run("monitor_bemsoft.py", "--env-file", str(env_file), "--once").returncode == 0
    record = json.loads(failure_files(tmp_path)[0].read_text(encoding="utf-8"))
    assert record["http_status"] == 201
    result = run("retry_failed.py", "--env-file", str(env_file), "--send")
    assert result.returncode == 0, result.stdout
    keys = [r["key"] for r in api.requests if r.get("body") and "batch" in r["body"]]
    assert keys[-1].startswith(record["idempotency_key"] + "-r") and keys[-1] != record["idempotency_key"]
    assert api.stored_tests() == [f"item-{record['item_ids'][0]}"]
    assert (tmp_path / "sent").is_dir() and len(list((tmp_path / "sent").glob("*.json"))) == 1


def test_retry_after_transient_give_up_keeps_the_key_so_the_server_dedupes(env_file, legacy, api, tmp_path):
    from bemsoft_monitor.failures import FailureRecord, FailureStore
    from bemsoft_monitor.payload import idempotency_key
    ids = legacy.order(1, ["GLI"])
    assert run("monitor_bemsoft.py", "--env-file", str(env_file), "--once").returncode == 0
    key = idempotency_key("1", ids)
    # the same items written as a give-up after timeouts: the server may already have them
    event = {"cod_solicitacao": "1", "solicitacao": {"codsolicitacao": 1, "codpaciente": 101,
             "dtaentrada": "2026-11-27T00:00:00", "Hora": "08:30"},
             "paciente": {"codpaciente": 101, "nome": "Paciente 1", "cpf": None,
                          "datanasc": "1980-01-02", "sexo": "F"},
             "items": [{"CodItemSol": ids[0], "CodSolicitacao": 1, "CodConvExames": "GLI",
                        "DataEntrada": "2026-11-27T08:31:00", "DescExames": "GLI", "Origem": "A"}]}
    FailureStore(tmp_path / "failed").write(FailureRecord(
        reason="timeout", key=key, cod="1", item_ids=ids, event=event, http_status=None, attempts=5))
    result = run("retry_failed.py", "--env-file", str(env_file), "--send")
    assert result.returncode == 0, result.stdout
    assert "409" in result.stdout
    assert api.stored_tests() == [f"item-{ids[0]}"]


def test_retry_reports_unreadable_files_and_leaves_them(env_file, tmp_path):
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "20260101T000000Z_1_x.json").write_text("{ isto não é json", encoding="utf-8")
    (failed / "20260101T000001Z_2_y.json").write_text('{"event": {"items": []}}', encoding="utf-8")
    result = run("retry_failed.py", "--env-file", str(env_file), "--send")
    assert result.returncode == 1
    assert result.stdout.count("arquivo ilegível, deixado no lugar") == 2
    assert len(list(failed.glob("*.json"))) == 2
    assert "Traceback" not in result.stderr


def test_retry_limit_and_single_file(env_file, legacy, tmp_path):
    make_failures(legacy, env_file)
    result = run("retry_failed.py", "--env-file", str(env_file), "--limit", "1")
    assert "Resumo: 1 arquivo(s)" in result.stdout
    one = failure_files(tmp_path)[1]
    result = run("retry_failed.py", "--env-file", str(env_file), "--file", str(one))
    assert result.stdout.count(one.name) == 1 and "Resumo: 1 arquivo(s)" in result.stdout


def test_a_claimed_file_is_not_sent_by_another_replay(env_file, legacy, api, tmp_path):
    from bemsoft_monitor.failures import CLAIM_MARK, claim, release_stale_claims
    make_failures(legacy, env_file)
    with open(env_file, "a", encoding="utf-8") as fh:
        fh.write("DEFAULT_GENDER=F\n")
    target = failure_files(tmp_path)[0]
    # another live process holds the claim (our own pid stands for it)
    claimed = claim(target)
    result = run("retry_failed.py", "--env-file", str(env_file), "--send", "--file", str(target))
    assert "arquivo não encontrado" in result.stdout
    # a claim whose process died is given back
    pid, stamp = claimed.name.rsplit(CLAIM_MARK, 1)[1].split("-")
    assert int(pid) == os.getpid() and abs(int(stamp) - time.time()) < 60
    dead = claimed.with_name(f"{target.name}{CLAIM_MARK}999999-{stamp}")   # a recent claim
    claimed.rename(dead)
    assert release_stale_claims(tmp_path / "failed") == [target]
    assert target.exists()


def test_concurrent_replays_send_each_file_once(env_file, legacy, api, tmp_path):
    for cod in range(1, 9):
        legacy.order(cod, ["GLI"], patient={"sexo": None})
    assert run("monitor_bemsoft.py", "--env-file", str(env_file), "--once").returncode == 0
    assert len(failure_files(tmp_path)) == 8
    with open(env_file, "a", encoding="utf-8") as fh:
        fh.write("DEFAULT_GENDER=M\n")
    api.set_latency(0.05)
    procs = [subprocess.Popen([sys.executable, "retry_failed.py", "--env-file", str(env_file), "--send"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert sum(o.count("[OK]") for o in outs) == 8
    stored = api.stored_tests()
    assert len(stored) == len(set(stored)) == 8


# ------------------------------------------------------------------ stop file
# (the launcher and its wrappers in scripts/ are tested in test_service.py)
def test_stop_file_stops_the_monitor_gracefully(env_file, legacy, tmp_path):
    stop = tmp_path / "monitor.stop"
    proc = subprocess.Popen(monitor_command(env_file, "--stop-file", str(stop)), cwd=ROOT,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env())
    log_file = tmp_path / "logs" / "monitor.log"
    # wait until it has started, however loaded the machine
    assert wait_until(lambda: log_file.exists() and "Primeira execução" in log_file.read_text(
        encoding="utf-8"), 60), "o monitor não iniciou"
    stop.write_text("stop")
    _, err = proc.communicate(timeout=30)
    log = log_file.read_text(encoding="utf-8")
    assert proc.returncode == 0 and "Arquivo de parada" in log and "Monitor encerrado" in log
    assert "Monitor encerrado" not in err      # LOG_FILE set, stderr not a terminal: warnings only
    assert not stop.exists()


# ------------------------------------------------------------------ single instance
def test_second_monitor_on_the_same_sqlite_database_does_not_send(env_file, legacy, api, tmp_path):
    legacy.order(1, ["GLI"])
    first = subprocess.Popen(monitor_command(env_file), cwd=ROOT, stderr=subprocess.PIPE, text=True,
                             env=subprocess_env())
    try:
        wait_until(api.stored_tests, 20)
        result = run("monitor_bemsoft.py", "--env-file", str(env_file), "--once")
        assert result.returncode == 4
        assert "Outro monitor 'bemsoft' já está ativo" in result.stderr
    finally:
        first.terminate()
        first.communicate(timeout=30)
    # once the first one stopped, a new one may run
    assert run("monitor_bemsoft.py", "--env-file", str(env_file), "--once").returncode == 0


def test_standby_monitor_takes_over_when_the_first_stops(env_file, legacy, api, tmp_path):
    from bemsoft_monitor.cli import wait_for_lock
    from bemsoft_monitor.db import create_db_engine
    engine = create_db_engine(legacy.settings_factory(legacy.url))
    holder = InstanceLock(engine, "bemsoft")
    assert holder.acquire()
    standby = InstanceLock(engine, "bemsoft")
    shutdown = threading.Event()
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault(
        "got", wait_for_lock(standby, "loop", shutdown, retry_every=0.1)))
    thread.start()
    time.sleep(0.3)
    assert "got" not in outcome
    holder.release()
    thread.join(5)
    assert outcome["got"] is True
    standby.release()
    engine.dispose()


@pytest.mark.postgres
def test_postgres_advisory_lock_is_exclusive_and_survives_a_killed_connection(pg_url):
    one, two = sa.create_engine(pg_url), sa.create_engine(pg_url)
    first, second = InstanceLock(one, "bemsoft"), InstanceLock(two, "bemsoft")
    assert first.acquire() and not second.acquire()
    assert InstanceLock(two, "outro-nome").acquire()        # other MONITOR_NAME: independent
    # the lock's connection is killed (database restart, DBA): verify() takes it back
    with two.connect() as conn:
        conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_locks "
                             "WHERE locktype = 'advisory' AND objid = :lo"),
                     {"lo": advisory_key("bemsoft") & 0xFFFFFFFF})
    assert first.verify() is True
    assert not second.acquire()
    first.release()
    assert second.acquire()
    second.release()
    one.dispose()
    two.dispose()


def test_sql_server_lock_uses_sp_getapplock():
    from bemsoft_monitor.lock import MSSQL_GETAPPLOCK
    text = str(MSSQL_GETAPPLOCK)
    assert "sp_getapplock @Resource = :resource, @LockMode = 'Exclusive'" in text
    assert "@LockOwner = 'Session', @LockTimeout = 0" in text


# ------------------------------------------------------------------ visibility
def test_metrics_and_healthz(harness):
    from bemsoft_monitor.metrics import start_metrics_server
    harness.order(1, ["GLI", "TSH"])
    monitor = harness.monitor()
    server = start_metrics_server(monitor, 0, max_age=60)
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + "/healthz", timeout=5)
        assert err.value.code == 503                    # no cycle completed yet
        monitor.step()
        with urllib.request.urlopen(base + "/healthz", timeout=5) as resp:
            assert resp.status == 200 and json.load(resp)["status"] == "ok"
        with urllib.request.urlopen(base + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
        assert "bemsoft_delivered_total 1.0" in text
        assert "bemsoft_delivered_items_total 2.0" in text
        assert "bemsoft_backlog_items 0.0" in text
        assert "bemsoft_api_latency_seconds_count 1.0" in text
        assert "bemsoft_last_success_timestamp_seconds" in text
        monitor.last_cycle_at -= 120                    # the loop is stuck
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + "/healthz", timeout=5)
        assert err.value.code == 503
    finally:
        server.shutdown()


def test_token_never_in_logs_even_when_rejected(harness, caplog, tmp_path):
    harness.order(1, ["GLI"])
    monitor = harness.monitor(BEMSOFT_TOKEN="segredo-muito-secreto-42")
    with caplog.at_level("DEBUG"):
        monitor.step()
    assert "segredo-muito-secreto-42" not in caplog.text
    assert "BEMSOFT_TOKEN" in caplog.text          # the 401 says what to fix
    for path in failure_files(tmp_path):
        assert "segredo-muito-secreto-42" not in path.read_text(encoding="utf-8")


# ------------------------------------------------------------------ services
def test_systemd_unit_is_hardened_and_restarts_on_failure():
    unit = (ROOT / "deploy" / "bemsoft-monitor.service").read_text(encoding="utf-8")
    for line in ("Restart=on-failure", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "ReadWritePaths=/opt/bemsoft-monitor/completo", "KillSignal=SIGTERM",
                 "RestartPreventExitStatus=2", "UMask=0077",
                 "ExecStart=/opt/bemsoft-monitor/.venv/bin/python /opt/bemsoft-monitor/monitor_bemsoft.py"):
        assert line in unit.splitlines()
    if shutil.which("systemd-analyze"):
        result = subprocess.run(["systemd-analyze", "verify", str(ROOT / "deploy" / "bemsoft-monitor.service")],
                                capture_output=True, text=True)
        assert "Unknown key" not in result.stderr and "Unknown section" not in result.stderr


def test_replay_keeps_its_fresh_key_when_the_send_does_not_finish(env_file, legacy, api, tmp_path):
    """Review finding: a fresh key is written into the file before the POST, so a replay that
    dies (or gets no answer) is repeated with the same key and the API dedupes."""
    legacy.order(1, ["GLI"])
    api.fail_next(1, status=201, body={"error": "Não foi possível salvar os dados recebidos no lote sol-1."})
    assert run("monitor_bemsoft.py", "--env-file", str(env_file), "--once").returncode == 0
    with open(env_file, "a", encoding="utf-8") as fh:
        fh.write("BEMSOFT_RETRIES=0\n")
    api.drop_next(1)                                  # the replay's POST gets no answer
    first = run("retry_failed.py", "--env-file", str(env_file), "--send")
    assert first.returncode == 1
    [path] = failure_files(tmp_path)
    record = json.loads(path.read_text(encoding="utf-8"))
    assert "-r" in record["idempotency_key"] and record["http_status"] is None
    second = run("retry_failed.py", "--env-file", str(env_file), "--send")
    assert second.returncode == 0, second.stdout
    keys = [r["key"] for r in api.requests if r.get("body") and "batch" in r["body"]]
    assert keys[-1] == record["idempotency_key"]
    assert len(api.stored_tests()) == 1


# ------------------------------------------------------------------ one bad file costs itself
def failure_event(cod, item_id, nome="Paciente"):
    return {"cod_solicitacao": str(cod),
            "solicitacao": {"codsolicitacao": cod, "codpaciente": 100 + cod,
                            "dtaentrada": "2026-11-27T00:00:00", "Hora": "08:30"},
            "paciente": {"codpaciente": 100 + cod, "nome": nome, "cpf": None,
                         "datanasc": "1980-01-02", "sexo": "F"},
            "items": [{"CodItemSol": item_id, "CodSolicitacao": cod, "CodConvExames": "GLI",
                       "DataEntrada": "2026-11-27T08:31:00", "DescExames": "GLI", "Origem": "A"}]}


def write_failure(directory, name, cod, item_id, *, nome="Paciente", key="", raw=None):
    directory.mkdir(exist_ok=True)
    data = {"version": 1, "reason": "teste", "http_status": None, "attempts": 1,
            "idempotency_key": key, "cod_solicitacao": cod, "item_ids": [item_id],
            "event": failure_event(1, item_id, nome)}
    data["event"]["cod_solicitacao"] = cod
    text = json.dumps(data, ensure_ascii=True) if raw is None else raw(json.dumps(data))
    (directory / name).write_text(text, encoding="utf-8")


def test_retry_reports_each_bad_file_and_sends_the_good_ones(env_file, api, tmp_path):
    failed = tmp_path / "failed"
    write_failure(failed, "20260101T000001Z_1_a.json", "1", 11,
                  raw=lambda text: text.replace('"Paciente"', '"Pac\\ud800iente"'))
    write_failure(failed, "20260101T000002Z_2_b.json", "2\n3", 12)
    write_failure(failed, "20260101T000003Z_3_c.json", "3é", 13)
    write_failure(failed, "20260101T000004Z_4_d.json", "4", 14, key="sol-4-abc\r\nX-Injetado: 1")
    write_failure(failed, "20260101T000005Z_5_e.json", "5", 15)   # the API refuses it (400)
    write_failure(failed, "20260101T000006Z_6_f.json", "6", 16)   # fine
    api.fail_next(1, status=400, body={"errors": ["batch.order: recusado"]})
    result = run("retry_failed.py", "--env-file", str(env_file), "--send", "--verbose")
    out = result.stdout
    assert result.returncode == 1 and "Traceback" not in result.stderr + out, result.stderr
    assert "Resumo: 6 arquivo(s); enviados 1, com erro 5" in out
    assert "[OK] 20260101T000006Z_6_f.json" in out
    assert "[ERRO] 20260101T000001Z_1_a.json: o arquivo tem texto inválido" in out
    assert "[ERRO] 20260101T000002Z_2_b.json: o código da solicitação '2\\n3'" in out
    assert "[ERRO] 20260101T000003Z_3_c.json: o código da solicitação '3é'" in out
    assert "[ERRO] 20260101T000004Z_4_d.json: a chave" in out
    assert "[ERRO] 20260101T000005Z_5_e.json: API rejeitou o pedido (HTTP 400" in out
    assert api.stored_tests() == ["item-16"]
    assert len(list(failed.glob("*.json"))) == 5            # the bad ones stay in place
    assert not any("X-Injetado" in str(r["headers"]) for r in api.requests)


def test_retry_watch_goes_on_past_bad_files(env_file, api, tmp_path):
    failed = tmp_path / "failed"
    write_failure(failed, "20260101T000001Z_1_a.json", "1\n", 11)
    write_failure(failed, "20260101T000002Z_2_b.json", "2", 12)
    stop = tmp_path / "retry.stop"
    proc = subprocess.Popen([sys.executable, "retry_failed.py", "--env-file", str(env_file),
                             "--send", "--watch", "0.2", "--stop-file", str(stop)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if not k.startswith("BEMSOFT_")})
    try:
        deadline = time.monotonic() + 30
        while "item-12" not in api.stored_tests() and time.monotonic() < deadline:
            time.sleep(0.05)
        write_failure(failed, "20260101T000003Z_3_c.json", "3", 13)   # appears later
        while "item-13" not in api.stored_tests() and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.write_text("stop")
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sorted(api.stored_tests()) == ["item-12", "item-13"]
    assert out.count("[ERRO] 20260101T000001Z_1_a.json") >= 2     # reported every round
    assert "Traceback" not in err


def test_stale_claims_are_judged_by_the_claim_time_not_the_file_age(tmp_path):
    from bemsoft_monitor.failures import STALE_CLAIM_SECONDS, claim, release_stale_claims
    path = tmp_path / "20240101T000000Z_1_x.json"
    path.write_text("{}", encoding="utf-8")
    two_days_ago = time.time() - 2 * 86400
    os.utime(path, (two_days_ago, two_days_ago))             # an old failure, claimed just now
    claimed = claim(path)
    assert claimed is not None and claimed.stat().st_mtime == pytest.approx(two_days_ago)
    assert release_stale_claims(tmp_path) == []             # a live replay holds it
    later = time.time() + STALE_CLAIM_SECONDS + 60
    assert release_stale_claims(tmp_path, now=later) == [path]   # a claim that old is stale


def test_metrics_server_drops_idle_connections_and_bounds_them(harness):
    from bemsoft_monitor.metrics import start_metrics_server
    monitor = harness.monitor()
    server = start_metrics_server(monitor, 0, max_age=60, request_timeout=0.5,
                                  max_connections=2, reserved_for_loopback=0)
    address = ("127.0.0.1", server.server_port)
    idle = [socket.create_connection(address, timeout=10) for _ in range(2)]
    try:
        with socket.create_connection(address, timeout=10) as extra:
            extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert extra.recv(1024) == b""   # one connection too many: closed, no thread
        for sock in idle:                    # idle connections are dropped by the server
            assert sock.recv(1024) == b""
        monitor.step()
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/healthz",
                                    timeout=5) as resp:
            assert resp.status == 200       # the slots came back
    finally:
        for sock in idle:
            sock.close()
        server.shutdown()
