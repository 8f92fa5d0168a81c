#!/usr/bin/env python3
"""Summarise a `py-spy record --format raw` profile (collapsed stacks) of the monitor:
inclusive and self share of samples per function, and per pipeline stage.

    py-spy record -o /tmp/p.txt --format raw --rate 250 -- python monitor_bemsoft.py ...
    # or: python -m bench.run_bench ... --wrap "py-spy record -o /tmp/p.txt --format raw --"
    python -m bench.pyspy_summary /tmp/p.txt --top 25
"""
from __future__ import annotations

import argparse
import collections
import re
import sys

# First matching frame (searched from the leaf up) decides a sample's stage.
STAGES = [
    ("logging (uma linha INFO por solicitação)", re.compile(r"^(Logger\.|StreamHandler\.|Handler\.|Formatter\.|LogRecord\.|logging)|logging/__init__")),
    ("HTTP POST (urllib3/http.client)", re.compile(r"urllib3/|http/client\.py|socket\.py|ssl\.py")),
    ("JSON (dumps/loads)", re.compile(r"json/")),
    ("transformação (payload.py)", re.compile(r"bemsoft_monitor/payload\.py")),
    ("leitura (source._row/jsonable)", re.compile(r"LegacySource\._row|jsonable")),
    ("SQLAlchemy/psycopg (SQL)", re.compile(r"sqlalchemy/|psycopg/|sqlite3/")),
    ("pool de threads / sincronização", re.compile(r"concurrent/futures|threading\.py|queue\.py")),
]


def frame_name(frame: str) -> str:
    """'func (path/file.py:123)' -> 'func (path/file.py)'."""
    return re.sub(r":\d+\)$", ")", frame.strip())


def load(path: str, thread_filter: str | None):
    stacks = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            try:
                n = int(count)
            except ValueError:
                continue
            frames = stack.split(";")
            if frames and frames[0].startswith(("thread ", "process ")):
                head = frames[0]
                frames = frames[1:]
                if frames and frames[0].startswith("thread "):
                    head, frames = frames[0], frames[1:]
                if thread_filter and thread_filter not in head and not any(
                        thread_filter in f for f in frames[:1]):
                    continue
            stacks.append(([frame_name(f) for f in frames], n))
    return stacks


def stage_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, pattern in STAGES:
            if pattern.search(frame):
                return name
    return "outros (Python do monitor, interpretador)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--thread", help="só amostras de threads cujo nome contém este texto")
    args = parser.parse_args(argv)
    stacks = load(args.profile, args.thread)
    total = sum(n for _, n in stacks)
    if not total:
        print("nenhuma amostra")
        return 1
    inclusive = collections.Counter()
    self_ = collections.Counter()
    stages = collections.Counter()
    for frames, n in stacks:
        for name in set(frames):
            inclusive[name] += n
        if frames:
            self_[frames[-1]] += n
        stages[stage_of(frames)] += n
    print(f"{total} amostras\n\nPor etapa (pela primeira etapa reconhecida a partir da folha):")
    for name, n in stages.most_common():
        print(f"  {100 * n / total:5.1f}%  {name}")
    print(f"\nInclusivo (top {args.top}):")
    for name, n in inclusive.most_common(args.top):
        print(f"  {100 * n / total:5.1f}%  {name}")
    print(f"\nPróprio (self, top {args.top}):")
    for name, n in self_.most_common(args.top):
        print(f"  {100 * n / total:5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
