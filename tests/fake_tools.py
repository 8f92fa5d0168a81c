"""Stand-ins for Windows programs the project calls (icacls, whoami, nssm): real executables
put first on PATH, which record how they were called. No Windows here; what our code does
with the programs' answers is the part under test."""
from __future__ import annotations

import shlex
from pathlib import Path

FIELD, RECORD = "\x1f", "\x1e"   # ASCII unit and record separators: never in an argument here


def fake_program(bin_dir: Path, name: str, *, out: str = "", code: int = 0) -> Path:
    """An executable `name` in `bin_dir` (a POSIX shell script: it starts in a millisecond)
    that appends its name and arguments to `bin_dir`/calls, prints `out` and exits with `code`."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / f"{name}.out").write_text(out, encoding="utf-8")
    path = bin_dir / name
    calls_file, out_file = shlex.quote(str(bin_dir / "calls")), shlex.quote(str(bin_dir / f"{name}.out"))
    path.write_text("#!/bin/sh\n"
                    f"{{ printf '%s\\037' \"${{0##*/}}\" \"$@\"; printf '\\036'; }} >> {calls_file}\n"
                    f"cat {out_file}\n"
                    f"exit {int(code)}\n", encoding="utf-8")
    path.chmod(0o755)
    return path


def calls(bin_dir: Path) -> list[list[str]]:
    """Each call, oldest first: the program's name, then its arguments."""
    log = bin_dir / "calls"
    if not log.exists():
        return []
    text = log.read_text(encoding="utf-8")
    return [record.split(FIELD)[:-1] for record in text.split(RECORD)[:-1]]
