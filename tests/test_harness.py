"""The shared test harness (bemsoft_monitor.testing.harness) that the tests, the reliability
scenarios, the benchmarks and the demo use, and the documented way to run those scripts
(`python -m reliability.<cenário>`, `python -m bench.<script>` from the project root)."""
from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys

import pytest
import sqlalchemy as sa

from bemsoft_monitor.config import load_settings
from bemsoft_monitor.schema import monitor_metadata
from bemsoft_monitor.testing.harness import (LAB, TOKEN, FakeApiProcess, PgDatabase,
                                             PostgresUnavailable, delivery_report, read_checkpoint,
                                             write_env)
from conftest import ROOT, run

STATE = {"tests": {"item-1": 1, "item-2": 1, "item-3": 1}, "posts_by_status": {"201": 2}}


def test_delivery_report_all_delivered_once():
    report = delivery_report(STATE, [1, 2, 3], [], 3)
    assert report["ok"] and report["problems"] == []
    assert (report["items"], report["stored"], report["last_id"]) == (3, 3, 3)


@pytest.mark.parametrize("state_tests, failed, checkpoint, expect_failures, problem", [
    ({"item-1": 1, "item-3": 1}, [], 3, False, "1 itens perdidos: [2]"),
    ({"item-1": 1, "item-2": 2, "item-3": 1}, [], 3, False, "1 itens guardados em dobro: [2]"),
    ({"item-1": 1, "item-2": 1, "item-3": 1}, [2], 3, True,
     "1 itens entregues E em arquivo de falha: [2]"),
    ({"item-1": 1, "item-2": 1, "item-3": 1, "item-9": 1}, [], 3, False,
     "1 itens guardados que não foram semeados: [9]"),
    ({"item-1": 1, "item-3": 1}, [2], 3, False, "1 itens em arquivos de falha (esperado nenhum)"),
    ({"item-1": 1, "item-2": 1, "item-3": 1}, [], 2, False, "checkpoint 2 != último item 3"),
    ({"item-1": 1, "item-2": 1, "item-3": 1}, [], None, False, "checkpoint None != último item 3"),
])
def test_delivery_report_names_each_violation(state_tests, failed, checkpoint, expect_failures,
                                              problem):
    report = delivery_report({"tests": state_tests}, [1, 2, 3], failed, checkpoint,
                             expect_failures=expect_failures)
    assert not report["ok"]
    assert report["problems"] == [problem]


def test_delivery_report_failure_files_count_when_expected():
    report = delivery_report({"tests": {"item-1": 1, "item-3": 1}}, [1, 2, 3], [2], 3,
                             expect_failures=True)
    assert report["ok"], report["problems"]
    assert report["failure_files_items"] == 1 and report["missing"] == []


def test_delivery_report_nothing_to_deliver_needs_no_checkpoint():
    assert delivery_report({"tests": {}}, [], [], None)["ok"]
    assert delivery_report({"tests": {}}, [], [], 0)["ok"]
    assert not delivery_report({"tests": {}}, [], [], 5)["ok"]


def test_read_checkpoint_before_and_after_the_monitor_tables_exist(tmp_path):
    url = f"sqlite:///{tmp_path / 'cp.db'}"
    assert read_checkpoint(url) is None                      # no table yet
    engine = sa.create_engine(url).execution_options(schema_translate_map={"monitor_schema": None})
    monitor_metadata.create_all(engine)
    assert read_checkpoint(engine) is None                   # table, no row
    state = monitor_metadata.tables["monitor_schema._MonitorState"]
    with engine.begin() as conn:
        now = dt.datetime(2026, 11, 29, 12, 0)
        conn.execute(state.insert(), [{"Name": "bemsoft", "LastItemId": 42, "UpdatedAt": now},
                                      {"Name": "outro", "LastItemId": 7, "UpdatedAt": now}])
    assert read_checkpoint(engine) == 42
    assert read_checkpoint(url, "outro") == 7
    engine.dispose()


def test_write_env_is_a_valid_monitor_configuration_with_overrides(tmp_path):
    path = write_env(tmp_path, "sqlite:///x.db", "http://127.0.0.1:1", BEMSOFT_CONCURRENCY=3,
                     LOG_FILE="-")
    settings = load_settings(path, environ={})
    assert settings.terceiros == (LAB,) and settings.token == TOKEN
    assert settings.failed_dir == tmp_path / "failed"
    assert settings.concurrency == 3 and not settings.dry_run
    assert settings.log_file is None


def test_fake_api_process_answers_takes_faults_and_stops():
    with FakeApiProcess(latency=0) as api:
        assert api.url.startswith("http://127.0.0.1:")
        assert api.state()["posts"] == 0
        assert api.faults(fail_next={"n": 2, "status": 503}) is not None
        assert api.state()["faults"]["fail_next"] == 2
    assert api.proc.returncode == 0 and api.cpu_s is not None and api.cpu_s > 0


def test_pg_database_unreachable_server_is_reported_not_raised_raw():
    database = PgDatabase(admin_url="postgresql+psycopg://postgres@127.0.0.1:1/postgres")
    with pytest.raises(PostgresUnavailable):
        database.create()
    database.drop()  # nothing was created: nothing to drop


@pytest.mark.postgres
def test_pg_database_is_created_with_the_legacy_schema_and_dropped(postgres_server):
    database = PgDatabase("bm_harness")
    url = database.create()
    try:
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            assert {"ItemSol", "solicitacao", "paciente"} <= set(sa.inspect(conn).get_table_names())
        engine.dispose()
    finally:
        database.drop()
    admin = sa.create_engine(database.admin_url)
    with admin.connect() as conn:
        left = conn.execute(sa.text("SELECT count(*) FROM pg_database WHERE datname = :n"),
                            {"n": database.name}).scalar()
    admin.dispose()
    assert left == 0


# ------------------------------------------------------------------ documented commands

DOCS = ("README.md", "bench/README.md", "docs/RELIABILITY.md")
COMMAND = re.compile(r"python -m ((?:reliability|bench)\.\w+)([^`\n]*(?:\\\n[^`\n]*)*)")


def documented_commands() -> dict[str, set[str]]:
    """module -> the options the docs pass to it."""
    found: dict[str, set[str]] = {}
    for doc in DOCS:
        text = (ROOT / doc).read_text(encoding="utf-8")
        for module, rest in COMMAND.findall(text):
            rest = rest.split("#")[0].split("--wrap")[0]
            found.setdefault(module, set()).update(re.findall(r"(?<![\w-])--[a-z][\w-]*", rest))
    return found


def test_docs_run_every_script_as_a_module():
    commands = documented_commands()
    scripts = {f"{p.parent.name}.{p.stem}" for folder in ("reliability", "bench")
               for p in (ROOT / folder).glob("[!_]*.py") if p.stem != "common"}
    assert scripts and scripts <= set(commands), scripts - set(commands)
    for doc in DOCS:
        text = (ROOT / doc).read_text(encoding="utf-8")
        assert not re.search(r"python (?:reliability|bench)/\w+\.py", text), doc


@pytest.mark.parametrize("module", sorted(documented_commands()))
def test_documented_command_runs_from_the_project_root(module):
    """`python -m <module> --help` works (no sys.path edits needed) and knows every option
    the docs pass to it."""
    done = run("-m", module, "--help", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    missing = [opt for opt in documented_commands()[module] if opt not in done.stdout]
    assert missing == [], done.stdout


def test_no_script_edits_sys_path():
    for folder in ("reliability", "bench"):
        for path in (ROOT / folder).glob("*.py"):
            assert "sys.path" not in path.read_text(encoding="utf-8"), path


def test_the_monitor_never_imports_the_testing_package():
    package = ROOT / "bemsoft_monitor"
    product = sorted(".".join(p.relative_to(package).with_suffix("").parts)
                     for p in package.rglob("*.py")
                     if p.stem not in ("__init__", "demo") and "testing" not in p.relative_to(package).parts)
    code = ("import importlib, sys\n"
            f"for name in {product!r}:\n"
            "    importlib.import_module('bemsoft_monitor.' + name)\n"
            "import monitor_bemsoft, retry_failed\n"
            "print(sorted(m for m in sys.modules if m.startswith('bemsoft_monitor.testing')))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_bench_compare_runs_a_checkout_of_the_ref_beside_this_tree_and_removes_it():
    """`python -m bench.run_bench --compare REF`: both codes run on the same seeded database
    and fake API, both verified, both reported with the ratio; the temporary worktree goes."""
    done = run("-m", "bench.run_bench", "--db", "sqlite", "--solicitations", "20", "--items", "1",
               "--latency", "0", "--concurrency", "2", "--repeat", "1", "--no-baseline",
               "--poll-seconds", "0", "--compare", "HEAD", timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    checkout = re.search(r"compare=HEAD \(\w+\) em (\S+)", out)[1]
    assert "repetição 1, HEAD, concorrência 2" in out
    assert "repetição 1, esta árvore, concorrência 2" in out
    assert out.count("verificado: 20 testes, 20 POSTs, checkpoint 20") == 2
    assert re.search(r"^CPU ms/sol +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+", out, re.M), out
    listed = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    assert checkout not in listed


def test_bench_compare_with_an_unknown_ref_says_so():
    done = run("-m", "bench.run_bench", "--db", "sqlite", "--solicitations", "1",
               "--compare", "nao-existe-esse-ref", timeout=120)
    assert done.returncode == 1
    assert "não foi possível fazer checkout de 'nao-existe-esse-ref'" in done.stderr
