"""The Windows scripts, run on Linux: the .bat files executed by a model of cmd.exe
(tests/cmd_model.py) down every path, and the password helper the installer calls
(bemsoft_monitor.service_account) run for real against a recording `nssm` on PATH, through a
terminal and through a pipe."""
from __future__ import annotations

import io
import os
import select
import subprocess
import sys
import time

import pytest

from bemsoft_monitor.service_account import main as set_account, needs_password
from cmd_model import BatchSyntaxError, UndefinedEdit, every_path, expand, run_batch
from conftest import ROOT
from fake_tools import calls, fake_program
from test_service import BAT_WRAPPERS, bat_lines

pytestmark = pytest.mark.skipif(os.name == "nt", reason="drives a POSIX pseudo-terminal; nssm is faked")

PASSWORD = 'S3nh@ com espaço & "aspas" %PATH% !x'   # everything cmd would have mangled
PROMPT = "Senha da conta LAB\\svc-bemsoft (não aparece ao digitar): "


@pytest.fixture
def nssm(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    fake_program(bin_dir, "nssm", out='Set parameter "ObjectName" for service "BemsoftMonitor".\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


class Terminal:
    """A child process on a pseudo-terminal, driven as a person at the keyboard would: what
    the terminal shows accumulates in `screen`."""

    def __init__(self, argv):
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT,
                                     start_new_session=True)
        os.close(slave)
        self.screen = ""

    def read(self, wait: float) -> bool:
        if not select.select([self.master], [], [], wait)[0]:
            return True
        try:
            chunk = os.read(self.master, 4096)
        except OSError:                     # the child closed the terminal
            return False
        self.screen += chunk.decode("utf-8", errors="replace")
        return bool(chunk)

    def wait_for(self, text: str, count: int = 1, timeout: float = 60) -> None:
        """Until `text` has appeared `count` times (typing before the prompt would echo:
        getpass turns echo off just before it prints the prompt)."""
        deadline = time.monotonic() + timeout
        while self.screen.count(text) < count and time.monotonic() < deadline:
            if not self.read(0.1):
                break
        assert self.screen.count(text) >= count, self.screen

    def type(self, line: str) -> None:
        os.write(self.master, (line + "\r").encode("utf-8"))

    def finish(self) -> int:
        code = self.proc.wait(timeout=60)
        while self.read(0):
            pass
        os.close(self.master)
        return code


def test_the_password_is_typed_without_echo_confirmed_and_handed_to_nssm_as_one_argument(nssm):
    terminal = Terminal([sys.executable, "-m", "bemsoft_monitor.service_account", "BemsoftMonitor",
                         "LAB\\svc-bemsoft"])
    terminal.wait_for(PROMPT)
    terminal.type(PASSWORD)
    terminal.wait_for("Confirme a senha: ")
    terminal.type(PASSWORD + "x")                                   # a typo: both asked again
    terminal.wait_for(PROMPT, count=2)
    assert "As senhas não conferem; digite de novo." in terminal.screen
    terminal.type(PASSWORD)
    terminal.wait_for("Confirme a senha: ", count=2)
    terminal.type(PASSWORD)
    assert terminal.finish() == 0, terminal.screen
    assert calls(nssm) == [["nssm", "set", "BemsoftMonitor", "ObjectName", "LAB\\svc-bemsoft", PASSWORD]]
    assert "S3nh@" not in terminal.screen                          # never echoed
    assert 'Set parameter "ObjectName"' in terminal.screen          # nssm's own answer is shown


def test_an_unattended_install_reads_the_password_from_standard_input(nssm):
    err = io.StringIO()
    assert set_account(["BemsoftMonitor", ".\\lab-ti"], stdin=io.StringIO(PASSWORD + "\r\n"), err=err) == 0
    assert calls(nssm) == [["nssm", "set", "BemsoftMonitor", "ObjectName", ".\\lab-ti", PASSWORD]]
    assert PASSWORD not in err.getvalue()


def test_accounts_without_a_password_are_set_without_asking(nssm):
    for account in ("LAB\\gmsa-bemsoft$", "NT SERVICE\\BemsoftMonitor", "nt authority\\NetworkService",
                    "LocalSystem"):
        assert not needs_password(account), account
    assert needs_password("LAB\\svc-bemsoft") and needs_password(".\\lab-ti")
    assert set_account(["BemsoftMonitor", "LAB\\gmsa-bemsoft$"], stdin=io.StringIO("nao deve ser lido\n")) == 0
    assert calls(nssm) == [["nssm", "set", "BemsoftMonitor", "ObjectName", "LAB\\gmsa-bemsoft$", ""]]


def test_no_password_or_an_nssm_refusal_fails_the_install(nssm):
    err = io.StringIO()
    assert set_account(["BemsoftMonitor", "LAB\\svc-bemsoft"], stdin=io.StringIO(""), err=err) == 1
    assert "A conta LAB\\svc-bemsoft não foi configurada: nenhuma senha informada." in err.getvalue()
    assert calls(nssm) == []
    fake_program(nssm, "nssm", code=1)
    assert set_account(["BemsoftMonitor", "LAB\\svc-bemsoft"], stdin=io.StringIO("x\n")) == 1


# ------------------------------------------------------------------ the .bat files, run by a model of cmd
PROJECT = r"C:\Lab & Co (matriz)\bemsoft-monitor"        # spaces, parentheses and an ampersand
INSTALLER = PROJECT + r"\scripts\install_service_nssm.bat"
PY = PROJECT + r"\.venv\Scripts\python.exe"
WINDOWS_ENV = {"COMPUTERNAME": "LABSRV01", "SystemRoot": r"C:\Windows",
               "PATH": r"C:\Windows\system32;C:\Windows;C:\nssm"}
OLD_LINE = r'if "%ACCOUNT:~0,2%"==".\" set "ACL_ACCOUNT=%COMPUTERNAME%\%ACCOUNT:~2%"'


def test_the_model_expands_as_cmd_does():
    env = {"ACCOUNT": r".\lab-ti", "COMPUTERNAME": "LABSRV01"}
    assert expand(OLD_LINE, env, [INSTALLER]) == r'if ".\"==".\" set "ACL_ACCOUNT=LABSRV01\lab-ti"'
    assert expand('"%ACCOUNT:~-1%" %ACCOUNT:LAB=x% 100%% %NADA%fim %~dp0 %~2', env,
                  [INSTALLER, "a", '"b c"']) == rf'"i" .\x-ti 100% fim {PROJECT}\scripts\ b c'
    assert expand("50% de desconto", env, [INSTALLER]) == "50 de desconto"   # a lone % is dropped


def test_an_edit_of_an_undefined_variable_breaks_the_line_as_issue_17_found():
    """The installer's old line with no account: cmd drops `%ACCOUNT:`, reads the rest as other
    variables, and the `if` no longer parses — the script stopped before `nssm install`."""
    assert expand(OLD_LINE, WINDOWS_ENV, [INSTALLER], strict=False) == 'if "~0,2COMPUTERNAMEACCOUNT:~2"'
    script = ['set "ACCOUNT=%~2"', OLD_LINE, "exit /b 0"]
    with pytest.raises(BatchSyntaxError, match="if que não se lê"):
        run_batch(script, [INSTALLER], WINDOWS_ENV, strict=False)
    with pytest.raises(UndefinedEdit):              # and the strict model names the cause
        run_batch(script, [INSTALLER], WINDOWS_ENV)
    guarded = ['set "ACCOUNT=%~2"', 'if defined ACCOUNT set "X=%ACCOUNT:~2%"', "exit /b 0"]
    with pytest.raises(UndefinedEdit):              # a guard on the same line comes too late
        run_batch(guarded, [INSTALLER], WINDOWS_ENV)


INSTALL_ARGUMENTS = {
    "sem argumentos": [],
    "só o serviço": ["BemsoftMonitor"],
    "argumentos vazios": ['""', '""'],
    "conta local": ["BemsoftMonitor", r".\lab-ti"],
    "conta de domínio": ["BemsoftMonitor", r"LAB\svc-bemsoft"],
    "gMSA": ["BemsoftMonitor", "LAB\\gmsa-bemsoft$"],
    "conta virtual": ["BemsoftMonitor", r'"NT SERVICE\BemsoftMonitor"'],
    "senha como argumento": ["BemsoftMonitor", r"LAB\svc-bemsoft", '"S3nh@ & x"'],
}


@pytest.mark.parametrize("name", sorted(INSTALL_ARGUMENTS))
def test_every_path_of_the_installer_parses_and_ends_in_an_exit(name):
    """Every branch (nssm, icacls, the helper failing at each step; files there or not), for
    every shape of arguments: no line cmd cannot parse, no edit of an undefined variable, no
    unquoted & | < > after expansion, and every path ends in `exit /b`."""
    runs = every_path(bat_lines("install_service_nssm"), [INSTALLER, *INSTALL_ARGUMENTS[name]], WINDOWS_ENV)
    assert all(run.exited for run in runs)
    assert len(runs) >= (1 if name == "senha como argumento" else 20)


def installed(*args):
    """What every successful path of the installer ran (nssm, icacls, the helper, cd) and printed."""
    runs = [run for run in every_path(bat_lines("install_service_nssm"), [INSTALLER, *args], WINDOWS_ENV)
            if run.code == 0]
    done = {tuple(tuple(c) for c in run.commands if c[0] in ("nssm", "icacls", "cd", PY)) for run in runs}
    assert len(done) == 1, done
    return [list(c) for c in done.pop()], runs[0].output


SYSTEM_ADMINS = ["*S-1-5-18:(OI)(CI)F", "*S-1-5-32-544:(OI)(CI)F", "/C", "/Q"]


def test_without_an_account_the_service_is_installed_as_localsystem():
    commands, output = installed()
    assert commands[0] == ["cd", "/d", PROJECT]
    assert commands[1] == ["nssm", "install", "BemsoftMonitor", PY, "monitor_bemsoft.py"]
    assert not [c for c in commands if c[0] == PY or "ObjectName" in c]
    assert [c for c in commands if c[0] == "icacls"] == [
        ["icacls", PROJECT, "/reset", "/T", "/C", "/Q"],
        ["icacls", PROJECT, "/inheritance:r", "/grant:r", *SYSTEM_ADMINS],
        ["icacls", PROJECT + r"\completo", "/inheritance:r", "/grant:r", *SYSTEM_ADMINS]]
    assert any("roda como LocalSystem" in line for line in output)


@pytest.mark.parametrize("account, acl_account", [(r".\lab-ti", r"LABSRV01\lab-ti"),
                                                  (r"LAB\svc-bemsoft", r"LAB\svc-bemsoft"),
                                                  ("LAB\\gmsa-bemsoft$", "LAB\\gmsa-bemsoft$"),
                                                  (r"NT SERVICE\BemsoftMonitor", r"NT SERVICE\BemsoftMonitor")])
def test_an_account_is_set_by_the_helper_and_granted_on_the_folders(account, acl_account):
    commands, _ = installed("BemsoftMonitor", f'"{account}"')
    helper = [PY, "-m", "bemsoft_monitor.service_account", "BemsoftMonitor", account]
    assert helper in commands and commands.index(["cd", "/d", PROJECT]) < commands.index(helper)
    assert not [c for c in commands if "ObjectName" in c]          # no password on this line
    assert commands[-2:] == [["icacls", PROJECT, "/grant:r", f"{acl_account}:(OI)(CI)RX", "/C", "/Q"],
                             ["icacls", PROJECT + r"\completo", "/grant:r", f"{acl_account}:(OI)(CI)M",
                              "/C", "/Q"]]


def test_a_password_on_the_command_line_is_refused_before_anything_is_installed():
    [run] = every_path(bat_lines("install_service_nssm"),
                       [INSTALLER, "BemsoftMonitor", r"LAB\svc-bemsoft", "S3nh@"], WINDOWS_ENV)
    assert run.code == 2 and run.commands == []
    assert "A senha nao e aceita na linha de comando" in run.output[0]
    assert run.output[-1].endswith(r'install_service_nssm.bat "BemsoftMonitor" "LAB\svc-bemsoft" < senha.txt')


@pytest.mark.parametrize("name", sorted(BAT_WRAPPERS))
def test_the_wrappers_hand_the_arguments_to_the_launcher_down_every_path(name):
    action, job, passes_args = BAT_WRAPPERS[name]
    typed = ["--env-file", r'"C:\Configs (lab)\monitor & cia.env"', "--once"] if passes_args else []
    script = PROJECT + rf"\scripts\{name}.bat"
    runs = every_path(bat_lines(name), [script, *typed], WINDOWS_ENV)
    launched = [run.commands[-1] for run in runs if run.code == 0]
    expected = [action, job] + (["--env-file", r"C:\Configs (lab)\monitor & cia.env", "--once"]
                                if passes_args else [])
    assert sorted(launched) == sorted([[".venv\\Scripts\\python.exe", "-m", "bemsoft_monitor.service",
                                        *expected],
                                       ["py", "-3", "-m", "bemsoft_monitor.service", *expected]])
    assert all(run.commands[0] == ["cd", "/d", PROJECT + r"\scripts\.."] for run in runs)
