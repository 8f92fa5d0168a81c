"""Patient data stays with its owner. The folders a process writes patient data to (FAILED_DIR,
the log's folder, the launcher's output folder) are closed to other users before it writes:
umask 077 and chmod on POSIX, icacls by SID on Windows.

A folder is closed whole only when it is the project's own: it is created now, it lies in the
project's working area (`completo/`, which the installer already closes), or every entry in it
is a file the project writes (`project_file`). A folder shared with anything else
(`LOG_FILE=C:\\ProgramData\\x.log`) keeps its permissions: only the project's files in it are
closed, one by one, and a warning says so."""
from __future__ import annotations

import csv
import getpass
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .config import PROJECT_DIR
from .failures import CLAIM_MARK

SYSTEM_SID = "*S-1-5-18"              # LocalSystem (the NSSM service's default account)
ADMINISTRATORS_SID = "*S-1-5-32-544"  # BUILTIN\\Administrators (language-independent)
# Everyone, Authenticated Users, BUILTIN\Users (language-independent SIDs)
BROAD_SIDS = ("*S-1-1-0", "*S-1-5-11", "*S-1-5-32-545")

WORK_AREA = PROJECT_DIR / "completo"  # failures, logs, pids: the project's own folders
DEFAULT_LOG_NAME = "monitor.log"      # LOG_FILE's name unless the .env says otherwise
LOG_BACKUPS = 10                      # setup_logging keeps monitor.log.1 ... monitor.log.10

_FAILURE_FILE = re.compile(
    r"\d{8}t\d{6}z_[0-9a-z_-]+\.json"                                # FailureStore.filename
    rf"(?:{re.escape(CLAIM_MARK)}\d+(?:-\d+)?|\.sent)?"              # held by a replay, sent
    r"|\.tmp-[^/\\]+\.json")                                          # write_atomic's temporary
_OUTPUT_FILE = re.compile(
    r"(?:monitor|retry)\.out\.log(?:\.1)?"                            # the launcher's output
    r"|service\.(?:out|err)(?:\.log|-\d{8}t\d{6}\.\d{3}\.log)")       # NSSM's, and its rotations


def project_file(name: str, log_name: str = DEFAULT_LOG_NAME) -> bool:
    """Whether a file of this name is one the project writes (case-insensitive, as on NTFS):
    - a failure file `20240131T120000Z_<cod>_<key>.json`, the same name while a replay holds
      it (`.claimed-<pid>-<time>`) or once it was sent in place (`.sent`), and the temporary
      it is written through (`.tmp-*.json`);
    - the log (LOG_FILE's name, and `monitor.log`, the default) and its rotations `.1`-`.10`;
    - the launcher's output (`monitor.out.log`, `retry.out.log` and their `.1`) and NSSM's
      (`service.out.log`, `service.err.log`, rotated to `service.out-20240131T120000.123.log`)."""
    name = name.casefold()
    if _FAILURE_FILE.fullmatch(name) or _OUTPUT_FILE.fullmatch(name):
        return True
    for log in {log_name.casefold(), DEFAULT_LOG_NAME}:
        number = name[len(log) + 1:] if name.startswith(log + ".") else ""
        if name == log or (number.isdigit() and 1 <= int(number) <= LOG_BACKUPS):
            return True
    return False


@dataclass(frozen=True)
class Private:
    """A folder that receives patient data, the setting that places it there (named in the
    warnings) and the file this process is about to write in it, if it knows which (created
    empty when the folder is shared, so that it is closed before its first line)."""
    folder: Path
    setting: str
    file: Path | None = None


@dataclass
class Lockdown:
    folders: list[Path] = field(default_factory=list)  # the project's own: closed whole
    files: list[Path] = field(default_factory=list)    # its files in shared folders: one by one
    notes: list[str] = field(default_factory=list)     # warnings, in pt-BR


def protect_private_data(settings, *, platform: str = os.name) -> list[str]:
    """Close what this run will write patient data to, before it writes; returns the warnings
    (pt-BR) for the log. POSIX: umask 077 for everything the process creates (files 0600,
    folders 0700). Every run that writes closes the log's folder (DRY_RUN included: its log
    has the "falharia" lines); a run that may write failure files closes FAILED_DIR too,
    creating it. DRY_RUN neither creates nor touches FAILED_DIR."""
    if platform != "nt":
        os.umask(0o077)
    places = []
    if not settings.dry_run:
        places.append(Private(Path(settings.failed_dir), "FAILED_DIR"))
    if settings.log_file:
        log_file = Path(settings.log_file)
        places.append(Private(log_file.parent, "LOG_FILE", log_file))
    log_name = Path(settings.log_file).name if settings.log_file else DEFAULT_LOG_NAME
    return lock_down(places, log_name=log_name, platform=platform)


def lock_down(places: list[Private], *, log_name: str = DEFAULT_LOG_NAME,
              platform: str = os.name, work_area: Path = WORK_AREA) -> list[str]:
    """Create the folders, close them (or, when shared, the project's files in them) and
    return the warnings. Windows: the inherited entries become explicit copies (so the
    service account the installer granted on the project keeps its access, whoever runs
    this), SYSTEM, Administrators and the account running this process get full control,
    then Everyone, Authenticated Users and Users are removed. POSIX: folders 0700 and files
    0600, for what this account owns."""
    lockdown = plan(places, log_name, work_area)
    if not (lockdown.folders or lockdown.files):
        return lockdown.notes
    if platform == "nt":
        lockdown.notes += close_windows(lockdown, current_account())
    else:
        lockdown.notes += close_posix(lockdown)
    return lockdown.notes


def plan(places: list[Private], log_name: str, work_area: Path = WORK_AREA) -> Lockdown:
    """Which folders are closed whole and which files alone (see the module's docstring)."""
    lockdown = Lockdown()
    seen = set()
    for place in places:
        folder = Path(place.folder)
        if folder in seen:
            continue
        seen.add(folder)
        created = not folder.exists()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            foreign = [] if created or _within(folder, work_area) else foreign_entries(folder, log_name)
            if not foreign and not _is_root(folder):
                lockdown.folders.append(folder)
                continue
            for other in places:   # created now, so closed before the first line
                if other.file is not None and Path(other.file).parent == folder:
                    Path(other.file).touch()
            lockdown.files += sorted(folder / name for name in os.listdir(folder)
                                     if project_file(name, log_name) and (folder / name).is_file())
        except OSError as err:
            lockdown.notes.append(f"Não foi possível preparar a pasta {folder} ({place.setting}): "
                                  f"{err}. Ela guarda dados de pacientes: restrinja-a manualmente.")
            continue
        lockdown.notes.append(shared_folder_note(place, folder, foreign))
    return lockdown


def foreign_entries(folder: Path, log_name: str) -> list[str]:
    """The entries that are not files of the project (subfolders included), sorted."""
    return sorted(entry.name for entry in os.scandir(folder)
                  if not (entry.is_file(follow_symlinks=False) and project_file(entry.name, log_name)))


def _within(folder: Path, area: Path) -> bool:
    return folder.resolve().is_relative_to(Path(area).resolve())


def _is_root(folder: Path) -> bool:
    resolved = folder.resolve()
    return resolved == resolved.parent


def shared_folder_note(place: Private, folder: Path, foreign: list[str]) -> str:
    what = (f"tem também '{foreign[0]}'" + (f" e mais {len(foreign) - 1}" if len(foreign) > 1 else "")
            if foreign else "é a raiz do disco")
    return (f"{place.setting}: a pasta {folder} não é só do monitor ({what}); suas permissões "
            "ficam como estão e só os arquivos do monitor nela foram fechados para os outros "
            "usuários. No Windows, um arquivo novo (log girado, nova falha) herda as permissões da "
            f"pasta até a próxima partida: aponte {place.setting} para uma pasta só do monitor.")


# ------------------------------------------------------------------ POSIX
def close_posix(lockdown: Lockdown) -> list[str]:
    """Folders 0700 and files 0600 (every file in a folder of our own is ours); only what
    this account owns: another owner's folder is not ours to change."""
    targets = []
    for folder in lockdown.folders:
        targets.append((folder, 0o700))
        targets += [(folder / name, 0o600) for name in sorted(os.listdir(folder))
                    if (folder / name).is_file()]
    targets += [(path, 0o600) for path in lockdown.files]
    notes = []
    for path, mode in targets:
        try:
            if path.stat().st_uid == os.getuid():
                os.chmod(path, mode)
        except OSError as err:
            notes.append(f"Não foi possível restringir {path} ({err}).")
    return notes


# ------------------------------------------------------------------ Windows
def close_windows(lockdown: Lockdown, account: str) -> list[str]:
    """The icacls calls, path by path; a path whose call fails gets no further calls (never
    remove the broad groups from a path the grants did not reach) and a warning."""
    notes = []
    paths = [(folder, True) for folder in lockdown.folders] + [(f, False) for f in lockdown.files]
    for path, inherit in paths:
        for command in icacls_commands(path, account, inherit=inherit):
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=60)
                failed, detail = done.returncode != 0, (done.stderr or done.stdout).strip()
            except (OSError, subprocess.SubprocessError) as err:
                failed, detail = True, str(err)
            if failed:
                notes.append(f"Não foi possível restringir o acesso a {path} com icacls ({detail}); "
                             "guarda dados de pacientes: restrinja manualmente.")
                break
    return notes


def icacls_commands(path, account: str, *, inherit: bool) -> list[list[str]]:
    """Three icacls calls, in order: inherited entries turned into explicit copies; full
    control for SYSTEM, Administrators and `account` (a `*SID` or a name) added, inherited by
    files and subfolders when `path` is a folder closed whole (`inherit`), for the file alone
    otherwise; then every entry of the broad groups removed."""
    flags = "(OI)(CI)" if inherit else ""
    grants = [f"{sid}:{flags}F" for sid in dict.fromkeys([SYSTEM_SID, ADMINISTRATORS_SID, account])]
    return [["icacls", str(path), "/inheritance:d"],
            ["icacls", str(path), "/grant", *grants],
            ["icacls", str(path), "/remove:g", *BROAD_SIDS]]


def current_account() -> str:
    """The SID of the account running the monitor (`*S-1-5-...`), from `whoami /user`;
    its name when whoami is not available."""
    try:
        out = subprocess.run(["whoami", "/user", "/fo", "csv", "/nh"], capture_output=True,
                             text=True, timeout=30).stdout
        return parse_whoami_sid(out) or getpass.getuser()
    except (OSError, subprocess.SubprocessError):
        return getpass.getuser()


def parse_whoami_sid(output: str) -> str | None:
    """`"host\\user","S-1-5-21-..."` -> `*S-1-5-21-...`."""
    for row in csv.reader(output.splitlines()):
        if len(row) >= 2 and row[1].strip().startswith("S-1-"):
            return "*" + row[1].strip()
    return None
