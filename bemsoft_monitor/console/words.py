"""The console's words that `--status` shares: checkpoint, backlog, times, the replay command
and the FAILED_DIR summary as text lines, so the page and the command say the same things."""
from __future__ import annotations

import datetime as dt
import os
import shlex
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from ..status import count_items
from .scan import SCAN_MAX_FILES, FailureSummary


def checkpoint_text(checkpoint: int | None) -> str:
    return "—" if checkpoint is None else str(checkpoint)


def backlog_detail(more: bool = False) -> str:
    return "além do checkpoint" + (" (e mais nas próximas páginas)" if more else "")


def backlog_text(backlog: int | None, more: bool = False) -> str:
    return "—" if backlog is None else f"{count_items(backlog)} {backlog_detail(more)}"


def ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"há {seconds} s"
    if seconds < 3600:
        return f"há {seconds // 60} min"
    if seconds < 86400:
        return f"há {seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"há {seconds // 86400} dia(s)"


def moment(ts: float, tz, now: float | None = None) -> str:
    """HH:MM:SS today, otherwise with the date; local time (TIMEZONE)."""
    when = dt.datetime.fromtimestamp(ts, tz)
    if now is not None and when.date() == dt.datetime.fromtimestamp(now, tz).date():
        return f"{when:%H:%M:%S}"
    return f"{when:%Y-%m-%d %H:%M:%S}"


def local_iso(iso: str | None, tz) -> str:
    if not iso:
        return "—"
    try:
        when = dt.datetime.fromisoformat(iso)
    except ValueError:
        return iso[:25]
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return f"{when.astimezone(tz):%Y-%m-%d %H:%M:%S}"


def millis(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.0f} ms"


def last_delivery_text(ts: float | None, now: float, tz) -> str:
    if ts is None:
        return "nenhuma registrada"
    return f"{moment(ts, tz)} ({ago(now - ts)})"


def replay_command(failed_dir: Path, env_file: str | None = None, *, windows: bool | None = None) -> str:
    """The exact command that replays FAILED_DIR, quoted for this platform's shell."""
    args = ["python", "retry_failed.py"]
    if env_file:
        args += ["--env-file", str(env_file)]
    args += ["--dir", str(failed_dir), "--send"]
    if windows if windows is not None else os.name == "nt":
        return subprocess.list2cmdline(args)
    return shlex.join(args)


def mask_url(url: str | None) -> str | None:
    """scheme://host:port of a URL, credentials replaced by ***."""
    if not url:
        return None
    parts = urlsplit(url if "://" in url else f"http://{url}")
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = ("***@" if parts.username or parts.password else "") + host + (f":{port}" if port else "")
    return f"{parts.scheme}://{netloc}"


def failure_lines(summary: FailureSummary, tz, replay: str) -> list[str]:
    """The FAILED_DIR part of `--status`, in the page's words."""
    lines = [f"Falhas em {summary.directory}: {summary.count} arquivo(s)"
             + (f", a mais antiga de {local_iso(summary.oldest, tz)}" if summary.oldest else "")]
    for group in summary.groups:
        lines.append(f"  {group.count:5d}  {group.reason} (mais antiga: {local_iso(group.oldest, tz)})")
    lines += [f"  ilegível: {name}" for name in summary.unreadable]
    if summary.unread:
        lines.append(f"  mais {summary.unread} arquivo(s) não lidos (a pasta tem mais de {SCAN_MAX_FILES})")
    if summary.count:
        lines.append(f"Para reenviar depois de corrigir a causa: {replay}")
    return lines
