"""Stand-ins for Windows programs the project calls (icacls, whoami, nssm): real executables
put first on PATH, which record how they were called. No Windows here; what our code does
with the programs' answers is the part under test."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def fake_program(bin_dir: Path, name: str, *, out: str = "", code: int = 0) -> Path:
    """An executable `name` in `bin_dir` that appends its arguments (one JSON list per call,
    the program's name first) to `bin_dir`/calls.jsonl, prints `out` and exits with `code`."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!{sys.executable}\n"
                    "import json, os, sys\n"
                    f"with open({str(bin_dir / 'calls.jsonl')!r}, 'a', encoding='utf-8') as log:\n"
                    "    log.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + '\\n')\n"
                    f"sys.stdout.write({out!r})\n"
                    f"sys.exit({code})\n", encoding="utf-8")
    path.chmod(0o755)
    return path


def calls(bin_dir: Path) -> list[list[str]]:
    log = bin_dir / "calls.jsonl"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
