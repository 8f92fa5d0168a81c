"""Settings declared once (issue 15 §6): the declarations drive the parsing, `.env.example`,
the README's tables, the console's configuration rows and the secrets list — and the files
in the repository are exactly what the declarations generate."""
from __future__ import annotations

import subprocess
import sys

import pytest

from bemsoft_monitor import config_docs
from bemsoft_monitor.config import (KNOWN_KEYS, PROJECT_DIR, ConfigError, Settings,
                                    declared_fields, load_settings, parse_settings)
from bemsoft_monitor.redaction import redact
from bemsoft_monitor.testing.harness import subprocess_env

BASE = {"DATABASE_URL": "sqlite://", "TERCEIROS": "X", "BEMSOFT_DRY_RUN": "1"}
SECRET_VALUES = {
    "BEMSOFT_TOKEN": "tok-SECRETO-0123456789",
    "DB_PASS": "senha-do-banco-42",
    "STATUS_TOKEN": "painel-SECRETO-abcdef123",
    "BEMSOFT_PROXY": "http://usuario-proxy:senha-proxy-77@proxy.hospital:3128",
}


def test_env_example_is_what_the_declarations_generate():
    assert (PROJECT_DIR / ".env.example").read_text(encoding="utf-8") == config_docs.env_example()


def test_readme_tables_are_what_the_declarations_generate():
    readme = (PROJECT_DIR / "README.md").read_text(encoding="utf-8")
    assert config_docs.readme_with_tables(readme) == readme


def test_a_readme_that_drifted_is_caught_and_rewritten():
    readme = (PROJECT_DIR / "README.md").read_text(encoding="utf-8")
    drifted = readme.replace("| `BATCH_SIZE` | `500` |", "| `BATCH_SIZE` | `800` |")
    assert drifted != readme
    assert config_docs.readme_with_tables(drifted) == readme


def test_the_check_command_agrees_and_says_how_to_fix(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bemsoft_monitor.config_docs", "--check"],
                          cwd=PROJECT_DIR, env=subprocess_env(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("f, declared", list(declared_fields()), ids=lambda v: getattr(v, "name", ""))
def test_each_documented_default_is_the_default_the_code_uses(f, declared):
    """The default written in the README and .env.example parses to the field's default."""
    if not declared.default_text:
        assert f.default in (None, "", (), 0, False) or f.name == "failed_dir"
        return
    assert declared.kind.parse(declared.key, declared.default_text, PROJECT_DIR) == f.default
    assert declared.help and "\n" not in declared.help and "|" not in declared.help


def test_every_key_is_known_once():
    assert len(KNOWN_KEYS) == len(set(KNOWN_KEYS))
    assert {"TERCEIRO", "https_proxy", "no_proxy", "STATUS_TOKEN"} <= set(KNOWN_KEYS)


def test_every_secret_setting_reaches_the_secrets_list_and_never_the_repr_or_console():
    settings = parse_settings({**BASE, **SECRET_VALUES, "BEMSOFT_DRY_RUN": "0"})
    secrets = set(settings.secrets)
    for value in ("tok-SECRETO-0123456789", "senha-do-banco-42", "painel-SECRETO-abcdef123",
                  "usuario-proxy", "senha-proxy-77"):
        assert value in secrets
        assert value not in repr(settings)
        assert value not in str(config_docs.config_rows(settings))
        assert redact(f"erro com {value} no meio", settings) == "erro com *** no meio"
    rows = dict(config_docs.config_rows(settings))
    assert rows["BEMSOFT_TOKEN"].startswith("***") and rows["STATUS_TOKEN"].startswith("***")
    assert rows["BEMSOFT_PROXY"] == "http://***@proxy.hospital:3128"


def test_every_declared_secret_kind_is_covered():
    """A secret setting added later is redacted without touching the secrets list: fill every
    field whose kind says it is secret and find its value in `secrets`."""
    secret_fields = [(f, d) for f, d in declared_fields() if d.secret]
    assert {d.key for _, d in secret_fields} >= {"BEMSOFT_TOKEN", "DB_PASS", "STATUS_TOKEN"}
    values = {d.key: f"valor-secreto-{i:02d}-abcdefghijklmnop" for i, (_, d) in enumerate(secret_fields)}
    settings = parse_settings({**BASE, **values, "SMTP_USER": "alertas"})  # a password needs a user
    assert set(values.values()) <= set(settings.secrets)


def test_console_rows_show_what_was_set_and_mark_defaults():
    settings = parse_settings({**BASE, "BATCH_SIZE": "800", "HTTPS_PROXY": "http://p.lab:3128"})
    rows = dict(config_docs.config_rows(settings))
    assert rows["BATCH_SIZE"] == "800"
    assert rows["MONITOR_NAME"] == "bemsoft (padrão)"
    assert "POLL_SECONDS" not in rows            # neither set nor always shown
    assert rows["DATABASE_URL"] == "sqlite://"


# ---------------------------------------------------------------- DATABASE_URL with '@' (issue 17 §1)
@pytest.mark.parametrize("url", [
    "postgresql+psycopg://lab:Lab@2024!@127.0.0.1:5999/lis",
    "postgresql+psycopg://lab:a@b@c@db.lab/lis",
    "mssql+pyodbc://lab:P@ss#1@sql01/lis?driver=ODBC+Driver+18+for+SQL+Server",
])
def test_database_url_with_an_unencoded_at_is_refused_without_showing_the_password(url):
    with pytest.raises(ConfigError) as err:
        parse_settings({**BASE, "DATABASE_URL": url})
    text = str(err.value)
    assert err.value.key == "DATABASE_URL" and "%40" in text
    for fragment in ("2024!", "Lab@", "b@c", "ss#1", "P@ss"):
        assert fragment not in text


def test_the_encoded_password_works_and_is_redacted_in_every_form():
    settings = parse_settings({**BASE, "DATABASE_URL":
                               "postgresql+psycopg://lab:Lab%402024!@127.0.0.1:5999/lis"})
    assert "Lab@2024!" in settings.secrets and "Lab%402024!" in settings.secrets
    assert "2024!" not in config_docs.config_rows(settings)[0][1]


def test_the_cli_refuses_the_url_at_start_up_with_exit_2(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("DATABASE_URL=postgresql+psycopg://lab:Lab@2024!@127.0.0.1:5999/lis\n"
                        "TERCEIROS=X\nBEMSOFT_DRY_RUN=1\n", encoding="utf-8")
    for mode in ("--check", "--status", "--once"):
        done = subprocess.run([sys.executable, "monitor_bemsoft.py", "--env-file", str(env_file), mode],
                              cwd=PROJECT_DIR, env=subprocess_env(), capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2, (mode, done.stdout, done.stderr)
        out = done.stdout + done.stderr
        assert "DATABASE_URL" in out and "%40" in out and "2024!" not in out
        assert out.count("\n") == 1


def test_settings_can_still_be_built_directly_for_tests():
    assert Settings(database_url="sqlite://").batch_size == 500
    assert load_settings(PROJECT_DIR / ".env.example", environ={}).dry_run is True
