"""The failure store: one JSON file per failed solicitation (or part of one) in FAILED_DIR,
written atomically (temp file, fsync, rename) and readable by the owner only, since it holds
patient data. It owns every touch of those files: the monitor writes them, the replay claims,
rewrites and releases them here."""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CLAIM_MARK = ".claimed-"
STALE_CLAIM_SECONDS = 3600


class FailureWriteError(Exception):
    """The failure file could not be written (disk full, permissions): nothing is recorded."""


class FailureFileError(Exception):
    """A failure file cannot be read or parsed."""


@dataclass
class FailureRecord:
    reason: str
    key: str
    cod: str
    item_ids: list[int]
    event: dict
    http_status: int | None = None
    attempts: int = 0
    response: str = ""
    created_at: str = ""
    # True: the API answered and refused this key's send (nothing saved; the key is burnt, a
    # replay needs a new one). False: never sent, or the last answers were transient (the
    # first attempt may have been saved: a replay keeps the key). None: a file written before
    # this was recorded (the replay judges its stored answer).
    refused: bool | None = None

    def to_json(self) -> dict:
        return {"version": FORMAT_VERSION, "created_at": self.created_at, "reason": self.reason,
                "http_status": self.http_status, "attempts": self.attempts,
                "idempotency_key": self.key, "cod_solicitacao": self.cod,
                "item_ids": self.item_ids, "response": self.response, "refused": self.refused,
                "event": self.event}

    @classmethod
    def from_json(cls, data) -> "FailureRecord":
        """Validate a parsed failure file; anything odd is a FailureFileError (reported, the
        file stays where it is), never another exception."""
        if not isinstance(data, dict) or not isinstance(data.get("event"), dict):
            raise FailureFileError("o arquivo não tem o campo 'event' com a solicitação")
        event = data["event"]
        if not isinstance(event.get("items"), list) or not event["items"]:
            raise FailureFileError("o evento não tem itens ('event.items')")
        if not all(isinstance(i, dict) for i in event["items"]):
            raise FailureFileError("'event.items' deve ser uma lista de objetos")
        for part in ("solicitacao", "paciente"):
            if event.get(part) is not None and not isinstance(event[part], dict):
                raise FailureFileError(f"'event.{part}' deve ser um objeto")
        try:
            item_ids = [int(i["CodItemSol"]) for i in event["items"]]
        except (KeyError, TypeError, ValueError, OverflowError):
            raise FailureFileError("há item sem CodItemSol válido em 'event.items'") from None
        status = data.get("http_status")
        return cls(reason=str(data.get("reason", "")), key=str(data.get("idempotency_key") or ""),
                   cod=str(data.get("cod_solicitacao") or event.get("cod_solicitacao") or ""),
                   item_ids=item_ids, event=event,
                   http_status=status if isinstance(status, int) and not isinstance(status, bool)
                   and 100 <= status <= 599 else None,
                   attempts=_count(data.get("attempts")), response=str(data.get("response") or ""),
                   created_at=str(data.get("created_at") or ""),
                   refused=data["refused"] if isinstance(data.get("refused"), bool) else None)


def _count(value) -> int:
    try:
        return max(0, int(value))
    except (TypeError, ValueError, OverflowError):
        return 0


class FailureStore:
    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def _ensure_dir(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    @staticmethod
    def cod_part(cod: str) -> str:
        """How a solicitation code appears in its failure files' names."""
        return re.sub(r"[^0-9A-Za-z_-]", "_", cod)[:40] or "sem_cod"

    @staticmethod
    def key_part(key: str) -> str:
        """How an Idempotency-Key ends its failure file's name."""
        return re.sub(r"[^0-9A-Za-z_-]", "_", key)[-24:]

    @classmethod
    def filename(cls, record: FailureRecord, now: dt.datetime) -> str:
        return f"{now:%Y%m%dT%H%M%S}Z_{cls.cod_part(record.cod)}_{cls.key_part(record.key)}.json"

    def write(self, record: FailureRecord) -> Path:
        """Atomic write (temp file + fsync + rename), mode 0600. Raises FailureWriteError."""
        now = dt.datetime.now(dt.timezone.utc)
        record.created_at = record.created_at or now.isoformat(timespec="seconds")
        try:
            self._ensure_dir()
            target = self.directory / self.filename(record, now)
            write_atomic(target, record.to_json())
            return target
        except OSError as err:
            raise FailureWriteError(f"não foi possível gravar a falha em {self.directory}: {err}") from err

    def writable(self) -> str | None:
        """None when a file can be written in FAILED_DIR now (a small probe file, removed at
        once); else why not (disk full, permissions), for the alerts."""
        try:
            self._ensure_dir()
            fd, name = tempfile.mkstemp(prefix=".tmp-probe-", dir=self.directory)
            try:
                _write_all(fd, b"ok")
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(name)
        except OSError as err:
            return str(err)
        return None

    def files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.glob("*.json") if not p.name.startswith(".tmp-"))

    def key_file(self, key: str) -> Path | None:
        """The failure file written under `key`, if any (the newest)."""
        ending = f"_{self.key_part(key)}.json"
        found = [p for p in self.files() if p.name.endswith(ending)]
        return found[-1] if found else None

    def has_key(self, key: str) -> bool:
        """A failure file for this Idempotency-Key already exists (written before a crash)."""
        return self.key_file(key) is not None

    @staticmethod
    def load(path: Path) -> FailureRecord:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
            raise FailureFileError(f"não foi possível ler {path}: {str(err)[:200]}") from None
        return FailureRecord.from_json(data)


def write_atomic(target: Path, data: dict) -> None:
    """`data` as JSON in `target`: temp file in the same folder (0600), fsync, rename. The
    old content stays whole if anything fails; raises OSError."""
    raw = json.dumps(data, ensure_ascii=False, indent=2).encode("utf-8")
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=Path(target).parent)
    try:
        try:
            if hasattr(os, "fchmod"):  # mkstemp already creates 0600 on POSIX
                os.fchmod(fd, 0o600)
            _write_all(fd, raw)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_name, target)
        tmp_name = None
    finally:
        if tmp_name:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass


def rewrite(path: Path, data: dict) -> None:
    """Update a (claimed) failure file in place; a failure is logged, the old content kept."""
    try:
        write_atomic(path, data)
    except OSError as err:
        log.warning("Não foi possível atualizar %s: %s", path, err)


# ---------------------------------------------------------------- claims (replay)
def claim(path: Path, now: float | None = None) -> Path | None:
    """Atomically take a file for this process; None if someone else took it first. The
    claim's name carries the pid and the time it was taken (`.claimed-<pid>-<unix time>`):
    a rename keeps the file's old mtime, so only the name can say how old the claim is."""
    stamp = int(time.time() if now is None else now)
    claimed = path.with_name(f"{path.name}{CLAIM_MARK}{os.getpid()}-{stamp}")
    try:
        os.rename(path, claimed)
    except FileNotFoundError:
        return None
    return claimed


def release(claimed: Path) -> Path:
    original = claimed.with_name(claimed.name.split(CLAIM_MARK)[0])
    os.rename(claimed, original)
    return original


def release_stale_claims(directory: Path, now: float | None = None) -> list[Path]:
    """Give back files claimed by a replay that died (its pid is gone, or the claim is older
    than STALE_CLAIM_SECONDS by the time in its name). A claim without a time (older
    versions) is given back."""
    released = []
    now = time.time() if now is None else now
    for claimed in Path(directory).glob(f"*.json{CLAIM_MARK}*"):
        match = re.search(re.escape(CLAIM_MARK) + r"(\d+)(?:-(\d+))?$", claimed.name)
        pid = int(match[1]) if match else 0
        age = now - int(match[2]) if match and match[2] else float("inf")
        if not _pid_alive(pid) or age > STALE_CLAIM_SECONDS:
            try:
                released.append(release(claimed))
            except OSError:
                continue
    return released


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid() or os.name == "nt":
        return True  # on Windows os.kill(pid, 0) is not a probe: claims expire by age only
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
