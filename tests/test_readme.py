"""The README is the contract: its commands, options, settings and files exist and match
what the CLIs and CI really do."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import sqlalchemy as sa

from bemsoft_monitor.cli import build_parser as monitor_parser
from bemsoft_monitor.config import KNOWN_KEYS
from bemsoft_monitor.replay_cli import build_parser as retry_parser
from conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
DEMO_COMMAND = "pip install -r requirements.txt && python monitor_bemsoft.py --demo"
TEST_COMMAND = "pip install -r requirements-dev.txt && python -m pytest -q"


def code_blocks(text):
    return re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)


def test_quick_start_is_two_commands_and_ci_runs_the_test_one():
    quick = README.split("## Início rápido", 1)[1].split("\n## ", 1)[0]
    blocks = [b.strip() for b in code_blocks(quick)]
    assert blocks == [DEMO_COMMAND, TEST_COMMAND]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert TEST_COMMAND in ci.splitlines()


def test_every_cli_option_is_documented():
    for parser in (monitor_parser(), retry_parser()):
        for action in parser._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    assert f"`{option}" in README or f" {option}" in README, option


def test_every_setting_is_documented():
    missing = [key for key in KNOWN_KEYS if f"`{key}`" not in README and f"{key}," not in README]
    assert missing == []


def test_every_file_the_readme_names_exists():
    names = set(re.findall(r"(?:scripts|deploy)[/\\][\w.]+\.(?:sh|bat|service)", README))
    assert names, "README should name the scripts"
    for name in names:
        assert (ROOT / name.replace("\\", "/")).exists(), name
    for name in ("monitor_bemsoft.py", "retry_failed.py", ".env.example", "requirements.txt",
                 "requirements-dev.txt", "bench/README.md"):
        assert (ROOT / name).exists(), name


def test_seed_retry_examples_parse():
    parser = retry_parser()
    for line in README.splitlines():
        if line.startswith("python retry_failed.py"):
            parser.parse_args(line.split()[2:])


def test_sql_server_test_command_selects_the_mssql_tests_and_says_how_to_enable_them():
    """The README's SQL Server command: an mssql+pyodbc URL with ODBC Driver 18 and pytest
    with the `mssql` marker. Run here without TEST_MSSQL_URL (no SQL Server in CI), the
    selected tests are skipped with a reason that says how to enable them."""
    line = next(l for block in code_blocks(README) for l in block.splitlines()
                if l.startswith("TEST_MSSQL_URL="))
    assignment, *command = shlex.split(line)
    url = sa.engine.make_url(assignment.split("=", 1)[1])
    assert url.drivername == "mssql+pyodbc"
    assert url.query["driver"] == "ODBC Driver 18 for SQL Server"
    assert command[:3] == ["python", "-m", "pytest"] and command[-2:] == ["-m", "mssql"]
    env = {k: v for k, v in os.environ.items() if k != "TEST_MSSQL_URL"}
    result = subprocess.run([sys.executable, *command[1:], "-p", "no:cacheprovider", "-rs",
                             "tests/test_instance_lock.py"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
    assert re.search(r"\b[1-9]\d* skipped\b", result.stdout) and " passed" not in result.stdout
    assert "defina TEST_MSSQL_URL=mssql+pyodbc://" in result.stdout
