"""The monitor's command line driven as an operator would: real processes, a real SQLite
database, the fake API on 127.0.0.1."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import sqlalchemy as sa

from bemsoft_monitor.testing.harness import monitor_command, subprocess_env, wait_until
from conftest import ROOT, TOKEN, run


def test_help_lists_every_mode():
    result = run("monitor_bemsoft.py", "--help")
    assert result.returncode == 0
    for option in ("--env-file", "--once", "--drain", "--check", "--status", "--demo", "--dry-run"):
        assert option in result.stdout


def test_demo_runs_twice_without_sql_server_token_or_network():
    for _ in range(2):
        result = run("monitor_bemsoft.py", "--demo", timeout=120)
        assert result.returncode == 0, result.stderr
        out = result.stdout
        assert "Entregues: 4 pedidos (5 exames); a API guardou 5 exames, 5 distintos." in out
        assert "Falhas: 2 arquivo(s)" in out
        assert "DEFAULT_GENDER" in out and "XYZ999" in out
        assert "sol-1001: João da Conceição Araújo -> item-1, item-2, item-8" in out
        assert "Checkpoint: 8" in out
        assert "Traceback" not in result.stderr


def test_once_delivers_and_exits(env_file, legacy, api, tmp_path):
    ids = legacy.order(1, ["GLI", "HEMO"])
    result = run("monitor_bemsoft.py", "--env-file", str(env_file), "--once")
    assert result.returncode == 0, result.stderr
    assert sorted(api.stored_tests()) == sorted(f"item-{i}" for i in ids)
    log_text = (tmp_path / "logs" / "monitor.log").read_text(encoding="utf-8")
    assert "Solicitação 1 entregue: 2 itens, HTTP 201" in log_text and TOKEN not in log_text
    assert "Solicitação 1 entregue" not in result.stderr   # LOG_FILE has it; stderr: warnings only


def test_drain_pages_through_the_backlog(env_file, legacy, api):
    ids = []
    for cod in range(1, 8):
        ids += legacy.order(cod, ["GLI", "TSH"])
    with open(env_file, "a", encoding="utf-8") as fh:
        fh.write("BATCH_SIZE=3\n")
    result = run("monitor_bemsoft.py", "--env-file", str(env_file), "--drain")
    assert result.returncode == 0, result.stderr
    assert sorted(api.stored_tests()) == sorted(f"item-{i}" for i in ids)
    assert legacy.checkpoint() == max(ids)


def test_dry_run_flag_prints_payloads_and_writes_nothing(env_file, legacy, api, tmp_path):
    legacy.order(1, ["GLI"])
    result = run("monitor_bemsoft.py", "--env-file", str(env_file), "--once", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert '"externalId": "sol-1"' in result.stdout
    assert [r for r in api.requests if r.get("body") and "batch" in r["body"]] == []
    assert not sa.inspect(legacy.engine).has_table("_MonitorState")


def test_loop_stops_gracefully_on_sigterm(env_file, legacy, api, tmp_path):
    legacy.order(1, ["GLI"])
    proc = subprocess.Popen(monitor_command(env_file), cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env())
    wait_until(api.stored_tests, 30, 0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    log_text = (tmp_path / "logs" / "monitor.log").read_text(encoding="utf-8")
    assert "Monitor encerrado: 1 solicitações entregues" in log_text


def test_check_reports_each_check(env_file, legacy):
    legacy.order(1, ["GLI"])
    result = run("monitor_bemsoft.py", "--env-file", str(env_file), "--check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[OK]   Banco de dados acessível (sqlite)" in result.stdout
    assert "1 item de apoio no banco; START_FROM=0" in result.stdout
    assert "[OK]   Catálogo /tests carregado com o token" in result.stdout


def test_check_fails_on_wrong_token_and_unreachable_database(env_file, tmp_path):
    text = env_file.read_text(encoding="utf-8")
    text = text.replace(f"BEMSOFT_TOKEN={TOKEN}", "BEMSOFT_TOKEN=errado-XYZ")
    text = text.replace("DATABASE_URL=sqlite:///", "DATABASE_URL=sqlite:////nao/existe/")
    env_file.write_text(text, encoding="utf-8")
    result = run("monitor_bemsoft.py", "--env-file", str(env_file), "--check")
    assert result.returncode == 1
    assert "[ERRO]" in result.stdout and "BEMSOFT_TOKEN" in result.stdout
    assert "errado-XYZ" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_status_shows_checkpoint_backlog_and_failures(env_file, legacy):
    legacy.order(1, ["GLI"])
    legacy.order(2, ["GLI"], patient={"sexo": None})
    assert run("monitor_bemsoft.py", "--env-file", str(env_file), "--once").returncode == 0
    legacy.order(3, ["TSH"])
    result = run("monitor_bemsoft.py", "--env-file", str(env_file), "--status")
    assert result.returncode == 0, result.stderr
    assert "Checkpoint: 2" in result.stdout
    assert "Backlog: 1 item além do checkpoint" in result.stdout
    assert "Última entrega: 20" in result.stdout
    assert "Falhas em" in result.stdout and ": 1 arquivo(s)" in result.stdout


def test_first_start_without_start_from_stops_with_a_clear_message(env_file, legacy):
    legacy.order(1, ["GLI"])
    env_file.write_text(env_file.read_text(encoding="utf-8").replace("START_FROM=0\n", ""),
                        encoding="utf-8")
    result = run("monitor_bemsoft.py", "--env-file", str(env_file), "--once")
    assert result.returncode == 2
    assert "START_FROM" in result.stderr and "há 1 item" in result.stderr
    assert "Traceback" not in result.stderr


def test_send_to_bemsoft_as_in_the_seed_repl(env_file, legacy, api, tmp_path):
    legacy.order(1, ["GLI"], patient={"sexo": None})
    run("monitor_bemsoft.py", "--env-file", str(env_file), "--once")
    failure = next((tmp_path / "failed").glob("*.json"))
    event = json.loads(failure.read_text(encoding="utf-8"))["event"]
    event["paciente"]["sexo"] = "F"             # the operator fixed the data
    code = (
        "import json, sys\n"
        "from monitor_bemsoft import send_to_bemsoft\n"
        "event = json.loads(sys.argv[1])\n"
        "result = send_to_bemsoft(event, env_file=sys.argv[2])\n"
        "print(result.outcome, result.status)\n"
    )
    result = run("-c", code, json.dumps(event), str(env_file))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "delivered 201"
    assert len(api.stored_tests()) == 1


def test_env_example_documents_every_setting_and_loads():
    from bemsoft_monitor.config import KNOWN_KEYS, load_settings
    text = (ROOT / ".env.example").read_text(encoding="utf-8")
    missing = [k for k in KNOWN_KEYS if f"{k}=" not in text]
    assert missing == []
    settings = load_settings(ROOT / ".env.example", environ={})
    assert settings.dry_run and settings.start_from == "latest"


def test_unusable_database_url_is_one_line_not_a_traceback(env_file):
    text = env_file.read_text(encoding="utf-8")
    text = "\n".join("DATABASE_URL=foo://x/y" if line.startswith("DATABASE_URL=") else line
                     for line in text.splitlines()) + "\n"
    env_file.write_text(text, encoding="utf-8")
    result = run("monitor_bemsoft.py", "--env-file", str(env_file), "--once")
    assert result.returncode == 2, result.stderr
    assert "DATABASE_URL" in result.stderr and "Traceback" not in result.stderr
