"""FAILED_DIR as the console sees it: each failure file reduced to the fields the page may
show (its reason generalised by `reason_group`, time, solicitation code, item count, HTTP
status; never patient data), grouped by reason, and a cached, bounded listing of the folder."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..failures import FailureFileError, FailureStore
from ..reasons import reason_group

SCAN_TTL = 5.0          # seconds a FAILED_DIR listing is reused
SCAN_MAX_FILES = 5000   # failure files read per listing (oldest first); the rest are counted


@dataclass(frozen=True)
class FailureFile:
    name: str
    created_at: str     # ISO time, UTC, from the file
    reason: str         # reason_group(...)
    cod: str
    items: int
    http_status: int | None


@dataclass(frozen=True)
class FailureGroup:
    reason: str
    count: int
    oldest: str
    cods: tuple[str, ...]   # a few solicitation codes, oldest first


@dataclass(frozen=True)
class FailureSummary:
    directory: Path
    count: int
    groups: tuple[FailureGroup, ...]
    unreadable: tuple[str, ...]
    oldest: str | None
    unread: int = 0     # beyond SCAN_MAX_FILES: counted, not read


def read_failure(path: Path) -> FailureFile:
    """Only the fields the console may show; raises FailureFileError."""
    record = FailureStore.load(path)
    return FailureFile(Path(path).name, record.created_at, reason_group(record.reason),
                       record.cod, len(record.item_ids), record.http_status)


def summarize(directory: Path, files: list[FailureFile], unreadable: list[str],
              unread: int = 0) -> FailureSummary:
    groups: dict[str, list[FailureFile]] = {}
    for f in sorted(files, key=lambda f: (f.created_at or "~", f.name)):
        groups.setdefault(f.reason, []).append(f)
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    dated = [f.created_at for f in files if f.created_at]
    return FailureSummary(
        Path(directory), len(files) + len(unreadable) + unread,
        tuple(FailureGroup(reason, len(group), group[0].created_at,
                           tuple(dict.fromkeys(f.cod for f in group))[:5])
              for reason, group in ordered),
        tuple(unreadable), min(dated) if dated else None, unread)


class FailureScan:
    """FAILED_DIR, listed at most every `ttl` seconds; each file is read once (they are
    written atomically and never change) and only its first `max_files` (oldest) are read."""

    def __init__(self, directory: Path, *, ttl: float = SCAN_TTL, max_files: int = SCAN_MAX_FILES,
                 clock: Callable[[], float] = time.monotonic):
        self.directory = Path(directory)
        self.ttl, self.max_files, self.clock = ttl, max_files, clock
        self._lock = threading.Lock()
        self._files: dict[tuple, FailureFile | None] = {}
        self._summary: FailureSummary | None = None
        self._at = 0.0

    def warm(self) -> None:
        """Read the folder once in the background (at start-up): the first page load then
        finds the files already read instead of reading a thousand of them itself."""
        threading.Thread(target=self.summary, name="failure-scan", daemon=True).start()

    def summary(self) -> FailureSummary:
        with self._lock:
            if self._summary is None or self.clock() - self._at >= self.ttl:
                self._summary, self._at = self._scan(), self.clock()
            return self._summary

    def _scan(self) -> FailureSummary:
        try:
            entries = FailureStore(self.directory).files()   # the store's own idea of a file
        except OSError:
            entries = []
        files, unreadable, seen = [], [], {}
        for entry in entries[:self.max_files]:
            try:
                st = entry.stat()
            except OSError:
                continue  # replayed (moved away) meanwhile
            key = (entry.name, st.st_size, st.st_mtime_ns)
            if key not in self._files:
                try:
                    self._files[key] = read_failure(entry)
                except FailureFileError:
                    self._files[key] = None
            seen[key] = self._files[key]
            if seen[key] is None:
                unreadable.append(entry.name)
            else:
                files.append(seen[key])
        self._files = seen  # forget files that are gone
        return summarize(self.directory, files, unreadable, max(0, len(entries) - self.max_files))
