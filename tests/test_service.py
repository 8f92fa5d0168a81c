"""The background launcher (python -m bemsoft_monitor.service) and its wrappers, driven as an
operator would: real subprocesses, the .sh wrappers executed, the .bat wrappers and the NSSM
installer read as text (no Windows here), and the Windows-facing pieces of app.py."""
from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bemsoft_monitor.app import (SHUTDOWN_SIGNALS, console_event_swallowed, install_signal_handlers,
                                 setup_logging, shutdown_handler)
from bemsoft_monitor.service import PidRecord, command_line_names, is_running, process_started
from conftest import ROOT, run, subprocess_env, wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the end-to-end launcher tests read /proc")

ODD_DIR = "pasta com espaço (teste) ação"


@pytest.fixture
def launcher_env(tmp_path):
    """Run and log folders with spaces, parentheses and accents."""
    return subprocess_env(MONITOR_RUN_DIR=str(tmp_path / ODD_DIR / "run"),
                          MONITOR_LOG_DIR=str(tmp_path / ODD_DIR / "logs"),
                          PYTHON=sys.executable, START_CHECK_SECONDS="1", STOP_TIMEOUT="30")


def sh(script, *args, env, root=ROOT):
    return subprocess.run(["bash", str(root / "scripts" / script), *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def service(*args, env):
    return subprocess.run([sys.executable, "-m", "bemsoft_monitor.service", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def run_dir(env):
    from pathlib import Path
    return Path(env["MONITOR_RUN_DIR"])


def pid_record(env, name="monitor") -> dict:
    return json.loads((run_dir(env) / f"{name}.pid").read_text(encoding="utf-8"))


def argv_of(pid: int) -> list[str]:
    raw = open(f"/proc/{pid}/cmdline", "rb").read()
    return [os.fsdecode(a) for a in raw.split(b"\0")[:-1]]


def argv_or_nothing(pid: int) -> list[str]:
    try:
        return argv_of(pid)
    except OSError:  # gone meanwhile, or not ours to read
        return []


def alive(pid: int) -> bool:
    return process_started(pid) is not None


# ------------------------------------------------------------------ start / stop end to end
def test_start_refuses_a_second_start_and_stop_is_graceful(env_file, legacy, api, tmp_path, launcher_env):
    legacy.order(1, ["GLI"])
    started = sh("start_monitor.sh", "--env-file", str(env_file), env=launcher_env)
    assert started.returncode == 0, started.stdout + started.stderr
    record = pid_record(launcher_env)
    pid = record["pid"]
    assert record["started"] == process_started(pid)
    assert record["script"] == str(ROOT / "monitor_bemsoft.py")
    second = sh("start_monitor.sh", "--env-file", str(env_file), env=launcher_env)
    assert second.returncode == 1 and f"já está rodando (pid {pid})" in second.stderr
    assert service("status", "monitor", env=launcher_env).returncode == 0
    assert wait_until(lambda: api.stored_tests())
    stopped = sh("stop_monitor.sh", env=launcher_env)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "monitor parado." in stopped.stdout and "à força" not in stopped.stderr and not alive(pid)
    assert not (run_dir(launcher_env) / "monitor.pid").exists()
    log = (tmp_path / "logs" / "monitor.log").read_text(encoding="utf-8")
    assert "Arquivo de parada" in log                                   # the stop file, not a kill
    assert "Monitor encerrado: 1 solicitações entregues" in log
    out_log = Path(launcher_env["MONITOR_LOG_DIR"]) / "monitor.out.log"   # warnings: patient data
    assert out_log.stat().st_mode & 0o777 == 0o600
    assert out_log.parent.stat().st_mode & 0o777 == 0o700
    assert sh("stop_monitor.sh", env=launcher_env).stdout.strip() == "monitor não está rodando."
    status = service("status", "monitor", env=launcher_env)
    assert status.returncode == 3 and "não está rodando" in status.stdout


def test_arguments_and_project_paths_with_spaces_parentheses_and_accents(env_file, legacy, api, tmp_path):
    """The project itself lives in an awkward folder; the extra arguments reach the
    monitor's argv exactly as given, and the monitor uses them."""
    project = tmp_path / "projeto (cópia) São Paulo"
    project.mkdir()
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("bemsoft_monitor", "scripts"):
        shutil.copytree(ROOT / name, project / name, ignore=ignore)
    for name in ("monitor_bemsoft.py", "retry_failed.py"):
        shutil.copy(ROOT / name, project / name)
    odd_env = tmp_path / "configuração (teste) 1" / "monitor do laboratório.env"
    odd_env.parent.mkdir()
    shutil.copy(env_file, odd_env)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BEMSOFT_", "DB_", "DATABASE_",
                                                                      "MONITOR_"))}
    env.update(PYTHON=sys.executable, START_CHECK_SECONDS="1", STOP_TIMEOUT="30")
    legacy.order(1, ["GLI"])
    started = sh("start_monitor.sh", "--env-file", str(odd_env), env=env, root=project)
    assert started.returncode == 0, started.stdout + started.stderr
    runs = project / "completo" / "run"                       # the defaults, inside the copy
    pid = json.loads((runs / "monitor.pid").read_text(encoding="utf-8"))["pid"]
    assert argv_of(pid)[1:] == [str(project / "monitor_bemsoft.py"), "--stop-file",
                                str(runs / "monitor.stop"), "--env-file", str(odd_env)]
    assert wait_until(lambda: api.stored_tests())                # it read that .env
    stopped = sh("stop_monitor.sh", env=env, root=project)
    assert stopped.returncode == 0 and not alive(pid)
    assert (project / "completo" / "logs" / "monitor.out.log").exists()


def test_two_concurrent_starts_start_exactly_one(env_file, legacy, launcher_env):
    starts = [subprocess.Popen([sys.executable, "-m", "bemsoft_monitor.service", "start", "monitor",
                                "--env-file", str(env_file)], cwd=ROOT, env=launcher_env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in starts]
    try:
        assert sorted(code for code, _, _ in results) == [0, 1], results
        refused = next(err for code, _, err in results if code == 1)
        assert "já está rodando" in refused
        stop_file = str(run_dir(launcher_env) / "monitor.stop")
        assert len([pid for pid in os.listdir("/proc") if pid.isdigit()
                    and stop_file in argv_or_nothing(int(pid))]) == 1
    finally:
        assert service("stop", "monitor", env=launcher_env).returncode == 0


def test_stale_pid_file_of_a_dead_process_is_replaced(env_file, legacy, launcher_env):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir(launcher_env).mkdir(parents=True)
    stale = PidRecord(dead.pid, "12345", str(ROOT / "monitor_bemsoft.py"))
    (run_dir(launcher_env) / "monitor.pid").write_text(stale.to_json(), encoding="utf-8")
    assert service("status", "monitor", env=launcher_env).returncode == 3
    started = service("start", "monitor", "--env-file", str(env_file), env=launcher_env)
    assert started.returncode == 0, started.stderr
    assert "Arquivo de pid antigo ignorado" in started.stdout
    assert pid_record(launcher_env)["pid"] != dead.pid
    assert service("stop", "monitor", env=launcher_env).stdout.strip().endswith("monitor parado.")


@pytest.mark.parametrize("same_start_time", [True, False])
def test_pid_file_of_a_foreign_live_process_is_never_ours(env_file, legacy, launcher_env, same_start_time):
    """After a reboot the recorded pid may belong to another program: start is not refused
    and stop never touches it."""
    foreign = subprocess.Popen(["sleep", "120"])
    try:
        run_dir(launcher_env).mkdir(parents=True)
        started_at = process_started(foreign.pid) if same_start_time else "1"
        record = PidRecord(foreign.pid, started_at, str(ROOT / "monitor_bemsoft.py"))
        (run_dir(launcher_env) / "monitor.pid").write_text(record.to_json(), encoding="utf-8")
        assert not is_running(record)
        stopped = service("stop", "monitor", env=launcher_env)
        assert stopped.stdout.strip() == "monitor não está rodando." and foreign.poll() is None
        (run_dir(launcher_env) / "monitor.pid").write_text(record.to_json(), encoding="utf-8")
        started = service("start", "monitor", "--env-file", str(env_file), env=launcher_env)
        assert started.returncode == 0, started.stderr
        assert service("stop", "monitor", env=launcher_env).returncode == 0
        assert foreign.poll() is None                                  # still alive, untouched
    finally:
        foreign.kill()
        foreign.wait()


def sending(legacy) -> bool:
    import sqlalchemy as sa
    try:
        with legacy.engine.connect() as conn:
            return bool(conn.execute(sa.text(
                "SELECT COUNT(*) FROM \"_MonitorItems\" WHERE \"Status\" = 'sending'")).scalar())
    except sa.exc.OperationalError:  # the monitor has not created its tables yet
        return False


def test_stop_terminates_our_process_when_it_does_not_finish_in_time(env_file, legacy, api, launcher_env):
    legacy.order(1, ["GLI"])
    api.set_latency(60)                                # the POST in flight does not finish
    started = service("start", "monitor", "--env-file", str(env_file), env=launcher_env)
    assert started.returncode == 0, started.stderr
    pid = pid_record(launcher_env)["pid"]
    assert wait_until(lambda: sending(legacy))         # written just before the POST
    launcher_env["STOP_TIMEOUT"] = "1"
    stopped = service("stop", "monitor", env=launcher_env)
    api.set_latency(0)
    assert stopped.returncode == 0 and "encerrado à força" in stopped.stderr
    assert not alive(pid) and not (run_dir(launcher_env) / "monitor.pid").exists()


def test_start_reports_an_immediate_failure(tmp_path, launcher_env):
    bad = tmp_path / "bad.env"
    bad.write_text("POLL_SECONDS=abc\n", encoding="utf-8")
    result = sh("start_monitor.sh", "--env-file", str(bad), env=launcher_env)
    assert result.returncode == 1
    assert "terminou logo ao iniciar (código 2)" in result.stderr
    assert "Configuração inválida" in result.stderr            # the monitor's own words
    assert not (run_dir(launcher_env) / "monitor.pid").exists()


def test_a_shared_output_folder_keeps_its_mode_and_only_the_output_log_is_closed(tmp_path, launcher_env):
    """The job's output gets patient data (warnings, DRY_RUN's payloads); MONITOR_LOG_DIR
    pointing at a folder of other programs must not lock them out."""
    shared = tmp_path / "saidas"
    shared.mkdir()
    shared.chmod(0o755)
    (shared / "outro.log").write_text("", encoding="utf-8")
    launcher_env["MONITOR_LOG_DIR"] = str(shared)
    bad = tmp_path / "bad.env"                          # the monitor exits by itself
    bad.write_text("POLL_SECONDS=abc\n", encoding="utf-8")
    result = sh("start_monitor.sh", "--env-file", str(bad), env=launcher_env)
    assert (f"MONITOR_LOG_DIR: a pasta {shared} não é só do monitor (tem também 'outro.log')"
            in result.stderr)
    assert shared.stat().st_mode & 0o777 == 0o755
    assert (shared / "monitor.out.log").stat().st_mode & 0o777 == 0o600


def test_launcher_usage_and_settings_errors(launcher_env):
    extra = service("stop", "monitor", "--once", env=launcher_env)
    assert extra.returncode == 2 and "não recebe argumentos" in extra.stderr
    unknown = service("start", "outro", env=launcher_env)
    assert unknown.returncode == 2
    launcher_env["STOP_TIMEOUT"] = "muito"
    bad = service("stop", "monitor", env=launcher_env)
    assert bad.returncode == 2 and "Configuração inválida: STOP_TIMEOUT" in bad.stderr


def test_retry_wrappers_replay_in_the_background_and_stop(env_file, legacy, api, tmp_path, launcher_env):
    from test_operations import failure_files, make_failures
    make_failures(legacy, env_file)
    with open(env_file, "a", encoding="utf-8") as fh:
        fh.write("DEFAULT_GENDER=F\n")
    launcher_env["RETRY_INTERVAL"] = "0.5"
    started = sh("start_retry.sh", str(tmp_path / "failed"), "--env-file", str(env_file), env=launcher_env)
    assert started.returncode == 0, started.stdout + started.stderr
    pid = pid_record(launcher_env, "retry")["pid"]
    assert argv_of(pid)[1:] == [str(ROOT / "retry_failed.py"), "--stop-file",
                                str(run_dir(launcher_env) / "retry.stop"), "--dir",
                                str(tmp_path / "failed"), "--send", "--watch", "0.5",
                                "--env-file", str(env_file)]
    assert wait_until(lambda: len(failure_files(tmp_path)) == 1)        # the unknown exam stays
    stopped = sh("stop_retry.sh", env=launcher_env)
    assert stopped.returncode == 0 and "retry parado." in stopped.stdout and not alive(pid)
    assert "à força" not in stopped.stderr               # --watch honours the stop file
    out = (tmp_path / ODD_DIR / "logs" / "retry.out.log").read_text(encoding="utf-8")
    assert "[OK]" in out and "Resumo:" in out


def test_process_identity_of_this_process():
    me = process_started(os.getpid())
    assert me is not None and me == process_started(os.getpid())
    mine = argv_of(os.getpid())[-1]
    assert command_line_names(os.getpid(), mine) is True
    assert command_line_names(os.getpid(), "/nao/existe.py") is False
    assert is_running(PidRecord(os.getpid(), me, mine))
    assert not is_running(PidRecord(os.getpid(), str(int(me) + 1), mine))
    assert not is_running(PidRecord(os.getpid(), me, "/nao/existe.py"))
    assert process_started(0) is None and process_started(2 ** 22 + 12345) is None


# ------------------------------------------------------------------ a stray `--`
def test_a_lone_separator_at_either_end_is_ignored(env_file, legacy):
    legacy.order(1, ["GLI"])
    assert run("monitor_bemsoft.py", "--env-file", str(env_file), "--once", "--").returncode == 0
    assert run("monitor_bemsoft.py", "--", "--env-file", str(env_file), "--once").returncode == 0
    replay = run("retry_failed.py", "--", "--env-file", str(env_file), "--")
    assert replay.returncode == 0 and "Resumo: 0 arquivo(s)" in replay.stdout


# ------------------------------------------------------------------ the Windows files, as text
BAT_WRAPPERS = {"start_monitor": ("start", "monitor", True), "stop_monitor": ("stop", "monitor", False),
                "start_retry": ("start", "retry", True), "stop_retry": ("stop", "retry", False)}


def bat_lines(name):
    raw = (ROOT / "scripts" / f"{name}.bat").read_bytes()
    assert raw.count(b"\r\n") == raw.count(b"\n"), "batch files need CRLF (goto/labels)"
    return raw.decode("ascii").splitlines()


def quoted_at(line: str, index: int) -> bool:
    return line[:index].count('"') % 2 == 1


@pytest.mark.parametrize("name", sorted(BAT_WRAPPERS))
def test_bat_wrappers_pass_arguments_to_the_launcher_unchanged(name):
    action, job, passes_args = BAT_WRAPPERS[name]
    lines = bat_lines(name)
    text = "\n".join(lines).lower()
    assert not (ROOT / "scripts" / "bg.ps1").exists()
    assert "powershell" not in text and "-file" not in text and " -- " not in text
    assert "setlocal enableextensions disabledelayedexpansion" in text      # `!` stays literal
    calls = [line for line in lines if "-m bemsoft_monitor.service" in line]
    assert [c.split("-m bemsoft_monitor.service ")[1] for c in calls] == \
        [f"{action} {job}" + (" %*" if passes_args else "")] * 2
    assert calls[0].startswith("py -3 ") and calls[1].startswith('".venv\\Scripts\\python.exe" ')
    assert "windowsapps" not in text and "where python" not in text
    for line in lines:
        for match in re.finditer(r"%~dp0", line):
            assert quoted_at(line, match.start()), line
        for match in re.finditer(r"%\*", line):   # the user's own quoting, passed on as typed
            assert not quoted_at(line, match.start()) and line.endswith("%*"), line
        assert not re.search(r"%~?[1-9]", line), line   # no re-splitting by position
        assert not line.rstrip().endswith("("), line    # no blocks: a ')' in %* cannot break one


VARIABLE = re.compile(r"%[A-Za-z_]\w*(?::[^%]*)?%")     # %NAME%, %NAME:~0,2%, %NAME:a=b%


def nssm_settings(lines):
    settings = {}
    for line in lines:
        if line.startswith('nssm set "%SERVICE%" '):
            key, _, value = line[len('nssm set "%SERVICE%" '):].partition(" ")
            settings.setdefault(key, []).append(value.split(" || ")[0])
    return settings


def test_nssm_installer_sets_what_a_windows_service_needs():
    lines = bat_lines("install_service_nssm")
    settings = nssm_settings(lines)
    assert 'nssm install "%SERVICE%" "%PY%" monitor_bemsoft.py || goto nssm_failed' in lines
    assert settings["AppDirectory"] == ['"%ROOT%"']
    assert settings["AppNoConsole"] == ["0"]
    assert settings["AppEnvironmentExtra"] == ["PYTHONIOENCODING=utf-8 PYTHONUNBUFFERED=1"]
    assert "ObjectName" not in settings       # set by the helper: no password on any line here
    assert ('"%PY%" -m bemsoft_monitor.service_account "%SERVICE%" "%ACCOUNT%" || goto account_failed'
            in lines)
    assert not any(line.lower().startswith("set /p") for line in lines)   # it echoed the password
    assert settings["AppStderr"] == ['"%LOGS%\\service.err.log"']
    assert settings["AppStdout"] == ['"%LOGS%\\service.out.log"']
    assert settings["AppRotateFiles"] == ["1"] and settings["AppRotateOnline"] == ["1"]
    assert settings["AppRotateBytes"] == ["10485760"]
    assert settings["AppStopMethodSkip"] == ["6"] and settings["AppStopMethodConsole"] == ["120000"]
    assert settings["AppExit"] == ["Default Restart", "2 Exit"]
    assert 'set "PY=%ROOT%\\.venv\\Scripts\\python.exe"' in lines
    assert any("WindowsApps" in line and "pyvenv.cfg" in line for line in lines)
    for line in lines:
        assert not line.rstrip().endswith("(") and ") else (" not in line, line   # no blocks
        if line.lstrip().lower().startswith(("rem ", "echo ")):
            continue
        for match in VARIABLE.finditer(line):     # `if` and `set` lines too; edits included
            assert quoted_at(line, match.start()), line


def test_nssm_installer_acls_use_sids_and_close_the_folders():
    lines = [line for line in bat_lines("install_service_nssm") if line.startswith("icacls ")]
    for line in lines:
        assert not re.search(r"administrat|administrador|\bsystem\b|users|usu[aá]rios", line, re.I), line
    system_admins = "*S-1-5-18:(OI)(CI)F *S-1-5-32-544:(OI)(CI)F"
    assert f'icacls "%ROOT%" /inheritance:r /grant:r {system_admins} /C /Q || goto acl_failed' in lines
    assert (f'icacls "%ROOT%\\completo" /inheritance:r /grant:r {system_admins} /C /Q '
            "|| goto acl_failed") in lines
    assert 'icacls "%ROOT%" /grant:r "%ACL_ACCOUNT%:(OI)(CI)RX" /C /Q || goto acl_failed' in lines
    assert 'icacls "%ROOT%\\completo" /grant:r "%ACL_ACCOUNT%:(OI)(CI)M" /C /Q || goto acl_failed' in lines
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "2.24-101" in readme and "AppNoConsole" in readme


def test_nssm_uninstaller_stops_then_removes():
    lines = bat_lines("uninstall_service_nssm")
    assert lines.index('nssm stop "%SERVICE%"') < lines.index('nssm remove "%SERVICE%" confirm || goto failed')


# ------------------------------------------------------------------ logging and signals
@pytest.fixture
def clean_logging():
    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_bemsoft", False):
            root.removeHandler(handler)
            handler.close()


def test_console_keeps_only_warnings_when_log_file_is_set_and_stderr_is_not_a_terminal(
        settings_factory, tmp_path, clean_logging):
    log_file = tmp_path / "logs" / "monitor.log"
    console = io.StringIO()
    setup_logging(settings_factory("sqlite://", LOG_FILE=str(log_file)), stream=console)
    logging.getLogger("bemsoft_monitor.test").info("linha informativa")
    logging.getLogger("bemsoft_monitor.test").warning("linha de aviso")
    assert "linha de aviso" in console.getvalue() and "linha informativa" not in console.getvalue()
    assert "linha informativa" in log_file.read_text(encoding="utf-8")
    # without LOG_FILE the console is the only log: everything goes there
    console = io.StringIO()
    setup_logging(settings_factory("sqlite://", LOG_FILE="-"), stream=console)
    logging.getLogger("bemsoft_monitor.test").info("linha informativa")
    assert "linha informativa" in console.getvalue()


def test_console_on_a_terminal_keeps_every_line(settings_factory, tmp_path, clean_logging):
    master, slave = os.openpty()
    with open(slave, "w", encoding="utf-8") as terminal:
        setup_logging(settings_factory("sqlite://", LOG_FILE=str(tmp_path / "m.log")), stream=terminal)
        logging.getLogger("bemsoft_monitor.test").info("linha no terminal")
        terminal.flush()
        assert b"linha no terminal" in os.read(master, 65536)
    os.close(master)


def test_shutdown_signals_only_set_the_flag():
    assert SHUTDOWN_SIGNALS == ("SIGINT", "SIGTERM", "SIGBREAK")
    shutdown = threading.Event()
    handler = shutdown_handler(shutdown)
    handler(21, None)                      # SIGBREAK's number on Windows (Ctrl+Break)
    assert shutdown.is_set()
    handler(21, None)                      # a second signal changes nothing
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):   # Ctrl+C (NSSM's stop) arrives as SIGINT
            flag = threading.Event()
            install_signal_handlers(flag)
            os.kill(os.getpid(), sig)
            assert flag.wait(5)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def test_a_logoff_does_not_stop_the_service():
    assert console_event_swallowed(5) is True            # CTRL_LOGOFF_EVENT
    for event in (0, 1, 2, 6):                           # Ctrl+C, Ctrl+Break, close, shutdown
        assert console_event_swallowed(event) is False
