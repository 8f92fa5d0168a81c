"""Wiring: settings -> engine, source, client, catalog, failure store, monitor.

The CLIs, the demo and the tests build their objects here, so every path runs the same
pipeline with the same parts."""
from __future__ import annotations

import logging
import logging.handlers
import signal
import sys
import threading
from pathlib import Path

import sqlalchemy as sa

from .catalog import Catalog, PlaceholderCatalog
from .client import BemsoftClient
from .config import Settings
from .db import create_db_engine
from .failures import FailureStore
from .monitor import Monitor
from .privacy import LOG_BACKUPS, protect_private_data
from .redaction import RedactingFormatter
from .retry import PauseGate
from .source import LegacySource
from .status import StatusBoard

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_output(settings: Settings, *, writes_files: bool) -> None:
    """Logging for a command-line run. A run that writes files (the log, failure files) first
    closes the folders that receive patient data to other users (privacy.py); what that had
    to say is logged once the log is open."""
    notes = protect_private_data(settings) if writes_files else []
    setup_logging(settings, to_file=writes_files)
    for note in notes:
        logging.getLogger(__name__).warning("%s", note)


def setup_logging(settings: Settings, *, stream=None, to_file: bool = True) -> None:
    """Console always; a rotating file at LOG_FILE when set (issue: operations). With the
    file open and the console not a terminal (NSSM's service.err.log, the launcher's
    *.out.log), the console keeps only warnings and errors: the file has every line."""
    root = logging.getLogger()
    root.setLevel(settings.log_level)
    # LOG_FORMAT shows no file, line or function: logging need not walk the stack for them
    # on every record (~5 µs each; the "Optimization" section of Python's logging HOWTO)
    logging._srcfile = None
    for handler in list(root.handlers):
        if getattr(handler, "_bemsoft", False):
            root.removeHandler(handler)
            handler.close()
    console = logging.StreamHandler(stream or sys.stderr)
    console.setFormatter(RedactingFormatter(LOG_FORMAT, settings))
    console._bemsoft = True
    root.addHandler(console)
    if to_file and settings.log_file:
        path = Path(settings.log_file)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            file_handler = LogFileHandler(path, maxBytes=10 * 1024 * 1024, backupCount=LOG_BACKUPS,
                                          encoding="utf-8")
        except OSError as err:
            global _log_open_problem
            _log_open_problem = f"não foi possível abrir {path} ({err})"
            logging.getLogger(__name__).warning("Não foi possível abrir LOG_FILE=%s (%s); "
                                                "registrando só no console.", path, err)
        else:
            file_handler.setFormatter(RedactingFormatter(LOG_FORMAT, settings))
            file_handler._bemsoft = True
            root.addHandler(file_handler)
            if not _is_terminal(console.stream):
                console.setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(max(logging.WARNING, root.level))
    for note in settings.notes:
        logging.getLogger("bemsoft_monitor.config").warning("%s", note)


class LogFileHandler(logging.handlers.RotatingFileHandler):
    """LOG_FILE. A write that fails (disk full, permissions) is reported once to
    `on_problem` (the alerts), and so is the first write that works again; the traceback
    goes to stderr once per problem, not once per line."""
    on_problem = None
    _failing = False

    def emit(self, record):
        self._failed_now = False
        super().emit(record)
        if self._failing and not self._failed_now:
            self._failing = False
            if self.on_problem:
                self.on_problem(None)

    def handleError(self, record):
        self._failed_now = True
        if not self._failing:
            self._failing = True
            if self.on_problem:
                self.on_problem(str(sys.exc_info()[1]) or "erro de gravação")
            super().handleError(record)


def watch_log_file(on_problem) -> None:
    """Report LOG_FILE's write problems (and its recovery) to `on_problem(text | None)`; if
    LOG_FILE could not even be opened, that is said at once."""
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, LogFileHandler)]
    for handler in handlers:
        handler.on_problem = on_problem
    if not handlers and _log_open_problem:
        on_problem(_log_open_problem)


_log_open_problem: str | None = None


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or already closed
        return False


def make_client(settings: Settings, shutdown: threading.Event | None = None) -> BemsoftClient | None:
    """No client in DRY_RUN without a token (nothing to call)."""
    if settings.dry_run and not settings.token:
        return None
    return BemsoftClient(settings, PauseGate(shutdown))


def make_catalog(settings: Settings, client: BemsoftClient | None):
    if client is None:
        return PlaceholderCatalog()
    return Catalog(client.fetch_tests, settings.tests_ttl)


def build_monitor(settings: Settings, *, engine: sa.Engine | None = None,
                  shutdown: threading.Event | None = None, on_dry_run=None,
                  status: StatusBoard | None = None, lock=None) -> Monitor:
    engine = engine if engine is not None else create_db_engine(settings)
    shutdown = shutdown or threading.Event()
    client = make_client(settings, shutdown)
    return Monitor(settings, LegacySource(engine, settings.monitor_name, settings.terceiros),
                   client, make_catalog(settings, client), FailureStore(settings.failed_dir),
                   shutdown=shutdown, on_dry_run=on_dry_run, status=status, lock=lock)


SHUTDOWN_SIGNALS = ("SIGINT", "SIGTERM", "SIGBREAK")
CTRL_LOGOFF_EVENT = 5


def shutdown_handler(shutdown: threading.Event):
    """The handler for SIGINT/SIGTERM/SIGBREAK: it only sets the shutdown flag, so the work
    in flight finishes and then the loop exits. On Windows Ctrl+C (NSSM's stop) arrives as
    SIGINT and Ctrl+Break as SIGBREAK."""
    log = logging.getLogger(__name__)

    def handler(signum, frame):
        if not shutdown.is_set():
            log.info("Sinal %s recebido: terminando o trabalho em andamento e saindo.", signum)
        shutdown.set()

    return handler


def install_signal_handlers(shutdown: threading.Event) -> None:
    handler = shutdown_handler(shutdown)
    for name in SHUTDOWN_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            try:
                signal.signal(sig, handler)
            except ValueError:  # not in the main thread (embedded use)
                return
    if sys.platform == "win32":
        _survive_logoff()


def console_event_swallowed(event: int) -> bool:
    """The C runtime turns every console event but Ctrl+C into SIGBREAK, including a user's
    logoff, which Windows sends to the console processes of services: NSSM's monitor would
    stop at every logoff. That one event is answered here, before the runtime sees it."""
    return event == CTRL_LOGOFF_EVENT


_console_routines: list = []  # ctypes callbacks must stay alive while registered


def _survive_logoff() -> None:
    import ctypes
    from ctypes import wintypes

    routine = ctypes.WINFUNCTYPE(wintypes.BOOL, wintypes.DWORD)(console_event_swallowed)
    if ctypes.windll.kernel32.SetConsoleCtrlHandler(routine, True):
        _console_routines.append(routine)


def watch_stop_file(path, shutdown: threading.Event, interval: float = 0.5) -> threading.Thread:
    """The launcher (python -m bemsoft_monitor.service, scripts/) asks for a graceful stop
    by creating this file: the same way on Windows, which has no SIGTERM, and on Linux."""
    stop_path = Path(path)

    def watch():
        while not shutdown.wait(interval):
            if stop_path.exists():
                logging.getLogger(__name__).info("Arquivo de parada %s encontrado: saindo.", stop_path)
                try:
                    stop_path.unlink()
                except OSError:
                    pass
                shutdown.set()

    thread = threading.Thread(target=watch, name="stop-file", daemon=True)
    thread.start()
    return thread
