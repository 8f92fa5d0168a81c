"""The folders that receive patient data are closed to other users (bemsoft_monitor/privacy.py):
the POSIX modes for real, the Windows icacls calls through a recording `icacls` on PATH."""
from __future__ import annotations

import os
import stat
import sys

import pytest

from bemsoft_monitor.config import parse_settings
from bemsoft_monitor.failures import FailureRecord, FailureStore, claim
from bemsoft_monitor.privacy import (BROAD_SIDS, Private, icacls_commands, lock_down,
                                     parse_whoami_sid, project_file, protect_private_data)
from conftest import LAB, run
from fake_tools import calls, fake_program

pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX modes; the icacls calls are faked")

ACCOUNT = "*S-1-5-21-1004336348-1177238915-682003330-1001"
FOLDER_GRANTS = ["*S-1-5-18:(OI)(CI)F", "*S-1-5-32-544:(OI)(CI)F", f"{ACCOUNT}:(OI)(CI)F"]
FILE_GRANTS = ["*S-1-5-18:F", "*S-1-5-32-544:F", f"{ACCOUNT}:F"]


@pytest.fixture
def windows_tools(tmp_path, monkeypatch):
    """`whoami` answering for ACCOUNT and an `icacls` that succeeds, both recording their calls."""
    bin_dir = tmp_path / "bin"
    fake_program(bin_dir, "whoami", out=f'"hospital\\lab-ti","{ACCOUNT[1:]}"\r\n')
    fake_program(bin_dir, "icacls", out="1 arquivo processado com êxito\r\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def icacls_calls(bin_dir):
    return [call for call in calls(bin_dir) if call[0] == "icacls"]


def closes_folder(path):
    return [["icacls", str(path), "/inheritance:d"], ["icacls", str(path), "/grant", *FOLDER_GRANTS],
            ["icacls", str(path), "/remove:g", *BROAD_SIDS]]


def closes_file(path):
    return [["icacls", str(path), "/inheritance:d"], ["icacls", str(path), "/grant", *FILE_GRANTS],
            ["icacls", str(path), "/remove:g", *BROAD_SIDS]]


def settings_for(tmp_path, *, dry_run: bool, log_file):
    return parse_settings({"DATABASE_URL": "sqlite://", "TERCEIROS": LAB,
                           "BEMSOFT_DRY_RUN": "1" if dry_run else "0", "BEMSOFT_TOKEN": "t0k3n",
                           "FAILED_DIR": str(tmp_path / "falhas"), "LOG_FILE": str(log_file)},
                          base_dir=tmp_path)


# ------------------------------------------------------------------ which runs close what
def test_a_dry_run_on_windows_closes_the_log_folder_and_never_creates_failed_dir(tmp_path, windows_tools):
    """DRY_RUN writes patient data to its log ("falharia" lines): the log folder is closed.
    It writes no failure file: FAILED_DIR is neither created nor touched (SPEC §6)."""
    settings = settings_for(tmp_path, dry_run=True, log_file=tmp_path / "logs" / "monitor.log")
    assert protect_private_data(settings, platform="nt") == []
    assert icacls_calls(windows_tools) == closes_folder(tmp_path / "logs")
    assert not (tmp_path / "falhas").exists()


def test_a_sending_run_on_windows_closes_failed_dir_and_the_log_folder(tmp_path, windows_tools):
    settings = settings_for(tmp_path, dry_run=False, log_file=tmp_path / "logs" / "monitor.log")
    assert protect_private_data(settings, platform="nt") == []
    assert icacls_calls(windows_tools) == closes_folder(tmp_path / "falhas") + closes_folder(tmp_path / "logs")
    assert (tmp_path / "falhas").is_dir()                    # created before the first failure


def test_a_log_file_in_a_shared_folder_is_closed_alone_and_the_folder_is_left_as_it_is(tmp_path, windows_tools):
    """LOG_FILE=C:\\ProgramData\\x.log: ProgramData is not the monitor's; closing it would
    take Users away from every other program's data there."""
    shared = tmp_path / "ProgramData"
    (shared / "OutroPrograma").mkdir(parents=True)
    (shared / "x.log.1").write_text("linha antiga\n", encoding="utf-8")   # a rotation: ours
    settings = settings_for(tmp_path, dry_run=True, log_file=shared / "x.log")
    [note] = protect_private_data(settings, platform="nt")
    assert icacls_calls(windows_tools) == closes_file(shared / "x.log") + closes_file(shared / "x.log.1")
    assert (shared / "x.log").exists()                        # created, so closed before its first line
    assert f"LOG_FILE: a pasta {shared} não é só do monitor (tem também 'OutroPrograma')" in note
    assert "só os arquivos do monitor nela foram fechados" in note


def test_a_folder_holding_only_the_projects_files_is_closed_whole(tmp_path, windows_tools):
    logs = tmp_path / "logs"
    logs.mkdir()
    for name in ("monitor.log", "monitor.log.10", "monitor.out.log", "retry.out.log.1",
                 "service.err.log", "service.out-20240131T120000.123.log"):
        (logs / name).write_text("", encoding="utf-8")
    settings = settings_for(tmp_path, dry_run=True, log_file=logs / "monitor.log")
    assert protect_private_data(settings, platform="nt") == []
    assert icacls_calls(windows_tools) == closes_folder(logs)


def test_a_folder_in_the_projects_work_area_is_its_own_whatever_it_holds(tmp_path, windows_tools):
    """completo\\ is the project's (the installer closes it): a LOG_FILE renamed to lab.log
    next to the launcher's monitor.out.log does not make the launcher see a shared folder."""
    logs = tmp_path / "completo" / "logs"
    logs.mkdir(parents=True)
    (logs / "lab.log").write_text("", encoding="utf-8")
    place = Private(logs, "MONITOR_LOG_DIR", logs / "monitor.out.log")
    assert lock_down([place], platform="nt", work_area=tmp_path / "completo") == []
    assert icacls_calls(windows_tools) == closes_folder(logs)
    [note] = lock_down([place], platform="posix", work_area=tmp_path / "outra")
    assert "(tem também 'lab.log')" in note


def test_failed_dir_and_the_log_sharing_one_folder_is_still_the_projects_folder(tmp_path, windows_tools):
    both = tmp_path / "falhas"
    store = FailureStore(both)
    store.write(FailureRecord(reason="x", key="sol-1-abc", cod="1", item_ids=[1], event={"items": []}))
    settings = settings_for(tmp_path, dry_run=False, log_file=both / "monitor.log")
    assert protect_private_data(settings, platform="nt") == []
    assert icacls_calls(windows_tools) == closes_folder(both)


def test_an_icacls_failure_stops_that_path_and_says_so(tmp_path, windows_tools):
    """Never remove the broad groups from a folder the grants did not reach: the account
    running the monitor could lose its own access."""
    fake_program(windows_tools, "icacls", out="Acesso negado.\r\n", code=5)
    settings = settings_for(tmp_path, dry_run=False, log_file=tmp_path / "logs" / "monitor.log")
    notes = protect_private_data(settings, platform="nt")
    assert icacls_calls(windows_tools) == [closes_folder(tmp_path / "falhas")[0],
                                           closes_folder(tmp_path / "logs")[0]]
    assert notes == [f"Não foi possível restringir o acesso a {tmp_path / 'falhas'} com icacls "
                     "(Acesso negado.); guarda dados de pacientes: restrinja manualmente.",
                     f"Não foi possível restringir o acesso a {tmp_path / 'logs'} com icacls "
                     "(Acesso negado.); guarda dados de pacientes: restrinja manualmente."]


def test_icacls_commands_copy_inherited_entries_and_add_grants(tmp_path):
    """Inherited entries are copied, never dropped (/inheritance:r would cut the service
    account off when an administrator runs retry_failed from an elevated prompt), and grants
    are added, never replaced (/grant:r)."""
    assert icacls_commands(tmp_path, ACCOUNT, inherit=True) == closes_folder(tmp_path)
    assert icacls_commands(tmp_path / "x.log", ACCOUNT, inherit=False) == closes_file(tmp_path / "x.log")
    # the service running as LocalSystem: SYSTEM is granted once
    assert icacls_commands(tmp_path, "*S-1-5-18", inherit=True)[1][3:] == FOLDER_GRANTS[:2]
    assert set(BROAD_SIDS) == {"*S-1-1-0", "*S-1-5-11", "*S-1-5-32-545"}  # Everyone, Auth. Users, Users


def test_whoami_output_gives_the_account_sid():
    assert parse_whoami_sid('"hospital\\lab-ti","S-1-5-21-111-222-333-1001"\r\n') == \
        "*S-1-5-21-111-222-333-1001"
    assert parse_whoami_sid('"nt authority\\system","S-1-5-18"\r\n') == "*S-1-5-18"
    assert parse_whoami_sid("Acesso negado.\r\n") is None


# ------------------------------------------------------------------ the project's files
def test_project_files_are_the_ones_the_project_writes(tmp_path):
    written = FailureStore(tmp_path).write(
        FailureRecord(reason="x", key="sol-42-9f8e7d6c5b4a", cod="42", item_ids=[7], event={"items": []}))
    held = claim(written)
    assert project_file(written.name) and project_file(held.name) and project_file(written.name + ".sent")
    assert project_file(".tmp-k2j3h4g5.json")
    for name in ("monitor.log", "MONITOR.LOG", "monitor.log.1", "monitor.log.10", "lab.log.3",
                 "monitor.out.log", "retry.out.log.1", "service.out.log", "service.err.log",
                 "service.err-20240131T120000.123.log"):
        assert project_file(name, log_name="lab.log"), name
    for name in ("monitor.log.11", "monitor.log.0", "monitor.log.old", "x.log", "desktop.ini",
                 "20240131.json", "notas.json", "service.out.log.1", "other.out.log"):
        assert not project_file(name, log_name="lab.log"), name


def test_the_launchers_and_nssms_output_are_project_files():
    """The names the launcher and the installer give their output are recognised."""
    from bemsoft_monitor.config import load_service_settings
    from bemsoft_monitor.service import SCRIPTS, Job
    from test_service import bat_lines, nssm_settings
    settings = load_service_settings()
    for name in SCRIPTS:
        out = Job(name, settings).log_file.name
        assert project_file(out) and project_file(out + ".1")
    nssm = nssm_settings(bat_lines("install_service_nssm"))
    for key in ("AppStdout", "AppStderr"):
        [value] = nssm[key]
        assert project_file(value.strip('"').split("\\")[-1]), value


# ------------------------------------------------------------------ POSIX
def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_posix_closes_a_folder_of_its_own_and_every_file_in_it(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o755)
    logs.chmod(0o755)
    for name in ("monitor.log", "monitor.log.1"):               # left readable by an older version
        (logs / name).write_text("", encoding="utf-8")
        (logs / name).chmod(0o644)
    assert lock_down([Private(logs, "LOG_FILE", logs / "monitor.log")], platform="posix") == []
    assert [mode(logs), mode(logs / "monitor.log"), mode(logs / "monitor.log.1")] == [0o700, 0o600, 0o600]


def test_posix_leaves_a_shared_folder_alone_and_closes_only_the_projects_files(tmp_path):
    """FAILED_DIR=/srv/laboratorio, run as root: chmod 0700 there would lock everyone else out."""
    shared = tmp_path / "laboratorio"
    shared.mkdir()
    shared.chmod(0o755)
    (shared / "planilha.csv").write_text("", encoding="utf-8")
    (shared / "planilha.csv").chmod(0o644)
    failure = FailureStore(shared).write(
        FailureRecord(reason="x", key="sol-1-a", cod="1", item_ids=[1], event={"items": []}))
    failure.chmod(0o644)
    [note] = lock_down([Private(shared, "FAILED_DIR")], platform="posix")
    assert [mode(shared), mode(shared / "planilha.csv"), mode(failure)] == [0o755, 0o644, 0o600]
    assert note.startswith(f"FAILED_DIR: a pasta {shared} não é só do monitor (tem também 'planilha.csv')")


def test_a_dry_run_with_a_shared_log_folder_end_to_end(env_file, tmp_path):
    """The monitor's own start: the shared folder keeps its mode, the log is 0600, the warning
    is in the log, and a dry run creates no FAILED_DIR."""
    shared = tmp_path / "compartilhada"
    shared.mkdir()
    shared.chmod(0o755)
    (shared / "leia-me.txt").write_text("", encoding="utf-8")
    with open(env_file, "a", encoding="utf-8") as env:
        env.write(f"LOG_FILE={shared / 'monitor.log'}\nBEMSOFT_DRY_RUN=1\n")
    result = run("monitor_bemsoft.py", "--env-file", str(env_file), "--once")
    assert result.returncode == 0, result.stderr
    assert mode(shared) == 0o755 and mode(shared / "monitor.log") == 0o600
    log = (shared / "monitor.log").read_text(encoding="utf-8")
    assert f"LOG_FILE: a pasta {shared} não é só do monitor (tem também 'leia-me.txt')" in log
    assert not (tmp_path / "failed").exists()
