"""`python -m bemsoft_monitor.service start|stop|status monitor|retry [args...]`: runs the
monitor or the failure replayer in the background, the same way on Linux and Windows.

The scripts in scripts/ are one-line wrappers around this module. What makes it safe:
- the pid file records the pid *and* the process start time (and the script): a pid reused
  by another program after a reboot is never taken for ours, neither to refuse a start nor
  to be terminated by a stop;
- an exclusive lock file around start: two starts at once cannot both start;
- arguments travel as a list (never joined into a command string), python is
  `sys.executable` (the interpreter the wrapper found);
- stop writes the stop file the monitor watches (`--stop-file`), waits, and terminates the
  process only if it still is ours.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .config import PROJECT_DIR, ConfigError, ServiceSettings, load_service_settings
from .lock import try_lock_file
from .privacy import Private, lock_down

SCRIPTS = {"monitor": "monitor_bemsoft.py", "retry": "retry_failed.py"}
LOG_ROTATE_BYTES = 10 * 1024 * 1024
KILL_WAIT = 10.0
NOT_RUNNING = 3  # `status` exit code when stopped (as in LSB init scripts)

DESCRIPTION = """Inicia, para ou mostra o monitor (monitor_bemsoft.py) ou o reprocessador de
falhas (retry_failed.py) em segundo plano. Os atalhos em scripts/ chamam este comando."""

EPILOG = """Argumentos depois de 'start monitor' vão para o monitor; depois de 'start retry',
para o retry_failed.py (o primeiro, se não começar com '-', é a pasta das falhas; o
reprocessador roda com --send --watch RETRY_INTERVAL). Variáveis de ambiente:
MONITOR_RUN_DIR (pids, padrão completo/run), MONITOR_LOG_DIR (saída, padrão completo/logs),
STOP_TIMEOUT (espera da parada, padrão 120 s), START_CHECK_SECONDS (verificação da partida,
padrão 2 s), RETRY_INTERVAL (padrão 300 s). Códigos de saída: 0 ok; 1 não iniciou/não
parou; 2 uso ou configuração inválidos; 3 (status) não está rodando."""


class LauncherError(Exception):
    """Something the operator must fix; `str()` is the pt-BR line."""


@dataclass(frozen=True)
class Job:
    name: str
    settings: ServiceSettings

    @property
    def script(self) -> Path:
        return PROJECT_DIR / SCRIPTS[self.name]

    @property
    def pid_file(self) -> Path:
        return self.settings.run_dir / f"{self.name}.pid"

    @property
    def stop_file(self) -> Path:
        return self.settings.run_dir / f"{self.name}.stop"

    @property
    def lock_file(self) -> Path:
        return self.settings.run_dir / f"{self.name}.start.lock"

    @property
    def log_file(self) -> Path:
        return self.settings.log_dir / f"{self.name}.out.log"

    def command(self, args: list[str]) -> list[str]:
        """The child's argv: this python, the full script path, the stop file, then the
        operator's arguments untouched (the retry job adds --send --watch before them)."""
        argv = [sys.executable, str(self.script), "--stop-file", str(self.stop_file)]
        if self.name == "retry":
            if args and not args[0].startswith("-"):
                argv += ["--dir", args[0]]
                args = args[1:]
            argv += ["--send", "--watch", f"{self.settings.retry_interval:g}"]
        return argv + list(args)

    def stop_hint(self) -> str:
        if os.name == "nt":
            return f"scripts\\stop_{self.name}.bat"
        return f"bash scripts/stop_{self.name}.sh"


# ------------------------------------------------------------------ process identity
@dataclass(frozen=True)
class PidRecord:
    pid: int
    started: str | None
    script: str

    def to_json(self) -> str:
        return json.dumps({"pid": self.pid, "started": self.started, "script": self.script})


def read_pid_file(path: Path) -> PidRecord | None:
    """The record, or None when there is none or it is unreadable (treated as stale)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return PidRecord(int(data["pid"]), data.get("started"), str(data["script"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_pid_file(path: Path, record: PidRecord) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(record.to_json() + "\n", encoding="utf-8")
    os.replace(tmp, path)


def process_started(pid: int) -> str | None:
    """When the live process `pid` started, as an opaque string; None when there is no such
    live process or it cannot be inspected (a process we started always can be)."""
    if pid <= 0:
        return None
    if os.name == "nt":
        return _windows_process_started(pid)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None  # Linux: no such process
        return _ps_field(pid, "lstart")  # macOS/BSD: no /proc
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the name in (...) may contain spaces
    if len(fields) < 20 or fields[0] in ("Z", "X"):  # a zombie is dead, just not reaped
        return None
    return fields[19]  # field 22 of proc(5): start time in clock ticks since boot


def command_line_names(pid: int, script: str) -> bool | None:
    """Whether process `pid` runs `script` (its full path among the arguments); None when the
    command line cannot be read (Windows: the start time alone identifies the process)."""
    if os.name == "nt":
        return None
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        if Path("/proc/self/cmdline").exists():
            return False
        line = _ps_field(pid, "command")
        return None if line is None else script in line
    except OSError:
        return None
    return script in [os.fsdecode(arg) for arg in raw.split(b"\0")]


def is_running(record: PidRecord) -> bool:
    """The recorded process is alive and is ours: same start time, same script."""
    started = process_started(record.pid)
    if started is None or started != record.started:
        return False
    return command_line_names(record.pid, record.script) is not False


def _ps_field(pid: int, field: str) -> str | None:
    try:
        out = subprocess.run(["ps", "-o", f"{field}=", "-p", str(pid)], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _windows_process_started(pid: int) -> str | None:
    """Creation time (GetProcessTimes) of a process that is still running."""
    import ctypes
    from ctypes import wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.OpenProcess.restype = wintypes.HANDLE
    kernel32.OpenProcess.argtypes = (wintypes.DWORD, wintypes.BOOL, wintypes.DWORD)
    kernel32.GetExitCodeProcess.argtypes = (wintypes.HANDLE, ctypes.POINTER(wintypes.DWORD))
    kernel32.GetProcessTimes.argtypes = (wintypes.HANDLE,) + (ctypes.POINTER(wintypes.FILETIME),) * 4
    kernel32.CloseHandle.argtypes = (wintypes.HANDLE,)
    process_query_limited_information, still_active = 0x1000, 259
    handle = kernel32.OpenProcess(process_query_limited_information, False, pid)
    if not handle:
        return None
    try:
        code = wintypes.DWORD()
        created, exited, kernel, user = (wintypes.FILETIME() for _ in range(4))
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)) or code.value != still_active:
            return None
        if not kernel32.GetProcessTimes(handle, ctypes.byref(created), ctypes.byref(exited),
                                        ctypes.byref(kernel), ctypes.byref(user)):
            return None
        return str((created.dwHighDateTime << 32) | created.dwLowDateTime)
    finally:
        kernel32.CloseHandle(handle)


def terminate(pid: int) -> None:
    """Forced end: SIGKILL on POSIX; on Windows os.kill is TerminateProcess."""
    os.kill(pid, getattr(signal, "SIGKILL", signal.SIGTERM))


def detach_options() -> dict:
    """The child outlives the launcher and the terminal. On Windows no DETACHED_PROCESS: a
    venv's python.exe is a redirector that starts the real python as a console child, and a
    redirector without a console would give that child a new, visible console window;
    CREATE_NO_WINDOW gives both one hidden console instead."""
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
    return {"start_new_session": True}


# ------------------------------------------------------------------ start / stop / status
@contextmanager
def start_lock(path: Path, timeout: float):
    """Held for the whole start (check, spawn, start check): a second start waits, then
    finds the first one running."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        deadline = time.monotonic() + timeout
        while not try_lock_file(handle):
            if time.monotonic() > deadline:
                raise LauncherError(f"Outra partida está em andamento ({path}); tente de novo.")
            time.sleep(0.1)
        yield


def start(job: Job, args: list[str], out, err) -> int:
    job.settings.log_dir.mkdir(parents=True, exist_ok=True)
    with start_lock(job.lock_file, timeout=job.settings.start_check + 60):
        record = read_pid_file(job.pid_file)
        if record is not None and is_running(record):
            print(f"{job.name} já está rodando (pid {record.pid}). Para parar: {job.stop_hint()}",
                  file=err)
            return 1
        if job.pid_file.exists():
            print(f"Arquivo de pid antigo ignorado ({job.pid_file}): o processo terminou ou o "
                  "número agora é de outro programa.", file=out)
        job.stop_file.unlink(missing_ok=True)
        proc = spawn(job, job.command(args), err)
        write_pid_file(job.pid_file, PidRecord(proc.pid, process_started(proc.pid), str(job.script)))
        try:
            code = proc.wait(job.settings.start_check)
        except subprocess.TimeoutExpired:
            code = None
        if code is not None:
            job.pid_file.unlink(missing_ok=True)
            print(f"{job.name} terminou logo ao iniciar (código {code}). "
                  f"Últimas linhas de {job.log_file}:", file=err)
            print(tail(job.log_file), file=err)
            return 1
    print(f"{job.name} iniciado (pid {proc.pid}). Log: {job.log_file}", file=out)
    return 0


def spawn(job: Job, argv: list[str], err) -> subprocess.Popen:
    """The child, its output appended to the job's log. That log gets patient data (warnings,
    DRY_RUN's payloads): its folder is closed to other users first, or the file alone when
    the folder holds more than the project's files (privacy.py)."""
    rotate(job.log_file)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    with open(job.log_file, "ab") as log:
        for note in lock_down([Private(job.settings.log_dir, "MONITOR_LOG_DIR", job.log_file)]):
            print(note, file=err)
        stamp = dt.datetime.now().isoformat(sep=" ", timespec="seconds")
        log.write(f"--- {stamp} iniciando {job.name}\n".encode("utf-8"))
        log.flush()
        return subprocess.Popen(argv, cwd=PROJECT_DIR, env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, **detach_options())


def rotate(path: Path) -> None:
    """One previous file kept (`.1`): the console output is small (warnings, prints)."""
    try:
        if path.stat().st_size > LOG_ROTATE_BYTES:
            os.replace(path, path.with_name(path.name + ".1"))
    except OSError:
        pass


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def stop(job: Job, out, err) -> int:
    record = read_pid_file(job.pid_file)
    if record is None or not is_running(record):
        job.pid_file.unlink(missing_ok=True)
        print(f"{job.name} não está rodando.", file=out)
        return 0
    print(f"Parando {job.name} (pid {record.pid}): termina o trabalho em andamento antes de "
          "sair...", file=out, flush=True)
    job.stop_file.write_text("stop\n", encoding="utf-8")
    if not wait_gone(record, job.settings.stop_timeout):
        if is_running(record):
            terminate(record.pid)
            wait_gone(record, KILL_WAIT)
        print(f"{job.name} não terminou em {job.settings.stop_timeout:g} s e foi encerrado à "
              f"força. Nada se perde: o que não tem resultado registrado é enviado de novo "
              f"(com a mesma chave) na próxima partida. Veja {job.log_file}.", file=err)
    job.pid_file.unlink(missing_ok=True)
    job.stop_file.unlink(missing_ok=True)
    print(f"{job.name} parado.", file=out)
    return 0


def wait_gone(record: PidRecord, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while is_running(record):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def status(job: Job, out) -> int:
    record = read_pid_file(job.pid_file)
    if record is None or not is_running(record):
        print(f"{job.name} não está rodando.", file=out)
        return NOT_RUNNING
    print(f"{job.name} rodando (pid {record.pid}). Log: {job.log_file}", file=out)
    return 0


# ------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bemsoft_monitor.service",
                                     description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("action", choices=("start", "stop", "status"), help="o que fazer")
    parser.add_argument("job", choices=tuple(SCRIPTS), help="monitor ou retry (reprocessador)")
    return parser


def main(argv=None, out=None, err=None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    argv = list(sys.argv[1:] if argv is None else argv)
    # the job's own arguments pass through untouched: argparse sees only the first two
    head, rest = argv[:2], argv[2:]
    parsed = build_parser().parse_args(head)
    if rest and parsed.action != "start":
        print(f"Uso: '{parsed.action}' não recebe argumentos (recebido: {' '.join(rest)})", file=err)
        return 2
    if os.name != "nt":  # the job's output log gets warnings with patient data: owner only
        os.umask(0o077)
    try:
        job = Job(parsed.job, load_service_settings())
        if parsed.action == "start":
            return start(job, rest, out, err)
        if parsed.action == "stop":
            return stop(job, out, err)
        return status(job, out)
    except ConfigError as error:
        print(error, file=err)
        return 2
    except (LauncherError, OSError) as error:
        print(error, file=err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
