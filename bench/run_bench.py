#!/usr/bin/env python3
"""End-to-end benchmark of the monitor: seed -> fake API -> `monitor_bemsoft.py --drain`.

For every run:

* a fresh legacy database (SQLite file in a temp dir, or a throw-away PostgreSQL database
  created and dropped by this script) seeded with N solicitations x M items through
  `bemsoft_monitor.testing.sampledata` (create_legacy_schema + bulk_orders);
* the fake Bemsoft API as its own process (`python -m bemsoft_monitor.testing.fakeapi`) with
  the chosen latency;
* an env file in the temp dir and the real monitor as a separate process
  (`python monitor_bemsoft.py --env-file ... --drain`), started with Popen and reaped with
  os.wait4() so that CPU time (ru_utime + ru_stime) and peak RSS (ru_maxrss) are the
  monitor's own. The Popen/wait4 happen in bench/_spawner.py, a small helper process:
  on Linux a child's ru_maxrss includes the RSS its parent had when it forked, and this
  script grows while seeding;
* verification: the fake stored exactly N x M tests, each item once (no duplicates), one
  POST per solicitation, no failure file, and the checkpoint in _MonitorState equals the
  highest CodItemSol. Any mismatch aborts the benchmark (exit code 1).

The chosen concurrency and concurrency 1 (unless --no-baseline) run alternately in the same
invocation, --repeat times; the report shows every run and the medians.

    python -m bench.run_bench --db postgresql --solicitations 5000 --items 3 \
        --latency 0.02 --concurrency 8 --repeat 3 --json bench/results/latency.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import sqlalchemy as sa

from bemsoft_monitor.config import PROJECT_DIR as ROOT
from bemsoft_monitor.testing.harness import (LAB, MONITOR_SCRIPT, PG_ADMIN_URL, FakeApiProcess,
                                             PgDatabase, delivery_report, failure_item_ids,
                                             monitor_command, read_checkpoint, subprocess_env,
                                             write_env)
from bemsoft_monitor.testing.sampledata import bulk_orders, create_legacy_schema

DEFAULT_PG_URL = PG_ADMIN_URL

# Targets of the "Performance" issue (2-core machine).
TARGET_SPEEDUP = 6.0          # concurrency C at least 6x faster than concurrency 1
TARGET_FLOOR_RATIO = 1.25     # wall within 1.25x of N x latency / C
TARGET_CPU_MS = 1.0           # zero latency: <= 1.0 ms of monitor CPU per solicitation
TARGET_RATE = 800.0           # zero latency: >= 800 solicitations/s

POST_MS = re.compile(r", (\d+) ms[.( ]")  # "... chave sol-1-..., 21 ms."
LOG_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3}) ")


class BenchError(Exception):
    """A run did not deliver what it should have (the benchmark is not valid)."""


@dataclass
class RunResult:
    db: str
    solicitations: int
    items: int
    latency: float
    concurrency: int
    batch_size: int
    repeat: int
    wall_s: float
    cpu_s: float
    user_s: float
    sys_s: float
    maxrss_kib: int
    exit_code: int
    drain_s: float | None = None      # "Monitor iniciado" -> "Monitor encerrado" in its log
    startup_s: float | None = None    # spawn -> "Monitor iniciado"
    last_delivery_s: float | None = None  # spawn -> last "entregue" log line
    tail_s: float | None = None       # last delivery -> "Monitor encerrado"
    post_ms_mean: float | None = None  # mean POST duration logged by the monitor (ms, whole)
    seed_s: float = 0.0
    fake_cpu_s: float | None = None   # the fake API process (not part of the monitor's figures)
    posts: int = 0
    stored_tests: int = 0
    checkpoint: int = 0
    max_item: int = 0
    machine_busy_s: float | None = None  # whole machine, all cores, while the monitor ran
    db_cpu_s: float | None = None     # PostgreSQL backends that exited during the run
    code: str = ""                    # git commit (+dirty) and hash of the product code run
    wrapped: bool = False             # run under a profiler: CPU/RSS are not representative
    tree: str = ""                    # --compare: the git ref measured, "" for this checkout
    extra: dict = field(default_factory=dict)

    @property
    def sol_per_s(self) -> float | None:
        return self.solicitations / self.wall_s if self.solicitations else None

    @property
    def cpu_ms_per_sol(self) -> float | None:
        return self.cpu_s * 1000.0 / self.solicitations if self.solicitations else None

    @property
    def rss_mb(self) -> float:
        return self.maxrss_kib / 1024.0  # ru_maxrss is KiB on Linux

    @property
    def floor_s(self) -> float:
        return self.solicitations * self.latency / self.concurrency

    @property
    def wall_over_floor(self) -> float | None:
        return self.wall_s / self.floor_s if self.floor_s > 0 else None

    def to_json(self) -> dict:
        data = asdict(self)
        data.update(sol_per_s=self.sol_per_s, cpu_ms_per_sol=self.cpu_ms_per_sol,
                    rss_mb=self.rss_mb, floor_s=self.floor_s,
                    wall_over_floor=self.wall_over_floor)
        return data


# --------------------------------------------------------------------------- databases

class BenchDatabase:
    """A fresh legacy database for one run; `close()` removes it."""

    def __init__(self, kind: str, workdir: Path, pg_url: str = DEFAULT_PG_URL):
        self.kind = kind
        self._pg = None
        if kind == "sqlite":
            self.url = f"sqlite:///{workdir / 'legacy.db'}"
        elif kind == "postgresql":
            self._pg = PgDatabase("bench", admin_url=pg_url, legacy_schema=False)
            self.url = self._pg.create()
        else:
            raise ValueError(kind)

    def seed(self, solicitations: int, items: int) -> int:
        engine = sa.create_engine(self.url, poolclass=sa.pool.NullPool)
        try:
            create_legacy_schema(engine)
            count = bulk_orders(engine, solicitations, items, terceirizado=LAB)
            if self.kind == "postgresql":  # planner statistics, as a live LIS database has
                with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                    conn.execute(sa.text("VACUUM ANALYZE"))
        finally:
            engine.dispose()
        return count

    def postmaster_pid(self) -> int | None:
        """PostgreSQL: the postmaster (parent of every backend), whose cutime/cstime
        accumulate the CPU of the backends that exited."""
        if self.kind != "postgresql":
            return None
        engine = sa.create_engine(self.url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                backend = int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar())
            for line in Path(f"/proc/{backend}/status").read_text().splitlines():
                if line.startswith("PPid:"):
                    return int(line.split()[1])
        except (OSError, ValueError, sa.exc.SQLAlchemyError):
            return None
        finally:
            engine.dispose()
        return None

    def checkpoint_and_max(self) -> tuple[int | None, int]:
        engine = sa.create_engine(self.url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                max_item = conn.execute(sa.text('SELECT MAX("CodItemSol") FROM "ItemSol"')).scalar()
            return read_checkpoint(engine), int(max_item or 0)
        finally:
            engine.dispose()

    def close(self) -> None:
        if self._pg is not None:
            self._pg.drop()
            self._pg = None


def postgres_version(pg_url: str = DEFAULT_PG_URL) -> str | None:
    try:
        engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
        with engine.connect() as conn:
            version = conn.execute(sa.text("SHOW server_version")).scalar()
        engine.dispose()
        return str(version)
    except Exception as err:  # noqa: BLE001 - only informative
        return f"indisponível ({type(err).__name__})"


# --------------------------------------------------------------------------- processes

def clean_env() -> dict:
    """The process environment without any key the monitor reads (the env file decides)."""
    env = subprocess_env()
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _log_time(line: str) -> float | None:
    match = LOG_TIME.match(line)
    if not match:
        return None
    return dt.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def parse_monitor_log(path: Path, spawned_at: float) -> dict:
    """Times taken from the monitor's own log lines (None when a line is missing):
    drain_s: "Monitor iniciado" -> "Monitor encerrado"; startup_s: spawn -> "Monitor
    iniciado"; last_delivery_s: spawn -> the last "Solicitação ... entregue" (INFO) line;
    tail_s: that last delivery -> "Monitor encerrado" (how long --drain takes to notice
    that nothing is left)."""
    started = ended = last = None
    post_ms = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if " entregue: " in line:
                last = line
                match = POST_MS.search(line)
                if match:
                    post_ms.append(int(match[1]))
            elif "Monitor iniciado" in line:
                started = _log_time(line)
            elif "Monitor encerrado" in line:
                ended = _log_time(line)
    last_at = _log_time(last) if last else None
    return {
        "drain_s": ended - started if started is not None and ended is not None else None,
        "startup_s": started - spawned_at if started is not None else None,
        "last_delivery_s": last_at - spawned_at if last_at is not None else None,
        "tail_s": ended - last_at if ended is not None and last_at is not None else None,
        "post_ms_mean": statistics.fmean(post_ms) if post_ms else None,
    }


def children_cpu_s(pid: int | None) -> float | None:
    """CPU seconds of the exited (reaped) children of `pid` (cutime + cstime)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # after the ")": state is field 3, so cutime (16) and cstime (17) are at 13 and 14
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def code_fingerprint(tree: Path = ROOT) -> str:
    """Short hash of the product code the monitor will import (it changes under concurrent
    edits; every run records the code it measured), with the git commit of `tree`."""
    import hashlib
    digest = hashlib.sha256()
    for path in sorted((tree / "bemsoft_monitor").glob("*.py")) + [tree / MONITOR_SCRIPT.name]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, text=True,
                                capture_output=True, timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "bemsoft_monitor",
                                "monitor_bemsoft.py"], cwd=tree, text=True, capture_output=True,
                               timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "?", ""
    return f"{commit}{'+dirty' if dirty else ''}:{digest.hexdigest()[:10]}"


class Spawner:
    """bench/_spawner.py: a small process that starts the monitor and reaps it with
    os.wait4(). A child's ru_maxrss on Linux includes the RSS of the process that forked it,
    and this benchmark grows while seeding, so the monitor is never forked from here."""

    _instance: Spawner | None = None

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("_spawner.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=clean_env(), text=True)

    @classmethod
    def get(cls) -> Spawner:
        if cls._instance is None or cls._instance.proc.poll() is not None:
            cls._instance = cls()
        return cls._instance

    def run(self, command: list[str], log_path: Path, cwd: Path = ROOT) -> dict:
        request = {"cmd": command, "cwd": str(cwd), "env": clean_env(), "log": str(log_path)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise BenchError("o processo auxiliar bench/_spawner.py terminou inesperadamente")
        return json.loads(line)


def run_monitor(env_file: Path, log_path: Path, wrap: list[str] | None, cprofile: str | None,
                tree: Path = ROOT) -> dict:
    """The monitor of `tree` (this checkout, or the one --compare made), run from its folder:
    it imports its own `bemsoft_monitor`."""
    command = monitor_command(env_file, "--drain")
    command[1] = str(tree / MONITOR_SCRIPT.name)
    if cprofile:
        command[1:1] = ["-m", "cProfile", "-o", cprofile]
    if wrap:
        command = wrap + command
    return Spawner.get().run(command, log_path, cwd=tree)


class PageRefresher:
    """--page-refresh: loads the operator console (`/`) every `interval` seconds while the
    monitor drains, as an operator's open browser tab would (its port is METRICS_PORT)."""

    def __init__(self, interval: float):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.interval, self.pages, self.render_ms = interval, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=5) as resp:
                    resp.read()
            except OSError:
                continue  # not listening yet, or already gone
            self.pages += 1
            self.render_ms.append((time.perf_counter() - started) * 1000)

    def __enter__(self) -> "PageRefresher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- one run

def one_run(args, concurrency: int, repeat: int, *, solicitations: int | None = None,
            items: int | None = None, latency: float | None = None,
            tree: Path = ROOT, env: dict | None = None,
            database: type["BenchDatabase"] | None = None) -> RunResult:
    """One measured run; `env` adds settings to the monitor's .env and `database` may be a
    BenchDatabase subclass (e.g. one that counts rows before the database is dropped)."""
    n = solicitations if solicitations is not None else args.solicitations
    m = items if items is not None else args.items
    lat = latency if latency is not None else args.latency
    workdir = Path(tempfile.mkdtemp(prefix="bemsoft-bench-"))
    db = fake = None
    keep = False
    try:
        db = (database or BenchDatabase)(args.db, workdir, args.pg_url)
        seed_started = time.perf_counter()
        expected_items = db.seed(n, m)
        seed_s = time.perf_counter() - seed_started
        try:
            fake = FakeApiProcess(latency=lat, keep_requests=1000, log=workdir / "fakeapi.log")
        except RuntimeError as err:
            raise BenchError(str(err)) from err
        refresher = PageRefresher(args.page_refresh) if args.page_refresh else None
        env_file = write_env(workdir, db.url, fake.url, BATCH_SIZE=args.batch_size,
                             BEMSOFT_CONCURRENCY=concurrency, LOG_LEVEL=args.log_level,
                             LOG_FILE="-", **({"POLL_SECONDS": repr(args.poll_seconds)}
                                              if args.poll_seconds else {}),
                             **({"METRICS_PORT": refresher.port} if refresher else {}),
                             **(env or {}))
        log_path = workdir / "monitor.log"
        wrap = shlex.split(args.wrap) if args.wrap else None
        cprofile = None
        if args.cprofile:
            cprofile = f"{args.cprofile}.c{concurrency}.r{repeat}.prof"
        code = code_fingerprint(tree)
        postmaster = db.postmaster_pid()
        pg_before = children_cpu_s(postmaster)
        if refresher is not None:
            with refresher:
                spawned = run_monitor(env_file, log_path, wrap, cprofile, tree)
        else:
            spawned = run_monitor(env_file, log_path, wrap, cprofile, tree)
        time.sleep(0.3)  # the monitor's backends exit once its connections close
        pg_after = children_cpu_s(postmaster)
        times = parse_monitor_log(log_path, spawned["spawned_at"])
        state = fake.state()
        fake.stop()
        checkpoint, max_item = db.checkpoint_and_max()
        result = RunResult(
            db=args.db, solicitations=n, items=m, latency=lat, concurrency=concurrency,
            batch_size=args.batch_size, repeat=repeat, wall_s=spawned["wall_s"],
            cpu_s=spawned["utime"] + spawned["stime"], user_s=spawned["utime"],
            sys_s=spawned["stime"], maxrss_kib=spawned["maxrss_kib"],
            exit_code=spawned["exit_code"], **times,
            seed_s=seed_s, fake_cpu_s=fake.cpu_s, posts=int(state.get("posts", 0)),
            stored_tests=int(state.get("stored_tests_total", 0)), checkpoint=checkpoint or 0,
            max_item=max_item, wrapped=bool(wrap or cprofile),
            tree="" if tree == ROOT else args.compare,
            machine_busy_s=spawned["machine_busy_s"],
            code=code, db_cpu_s=(pg_after - pg_before if pg_before is not None
                                 and pg_after is not None else None),
            extra={"spawner_rss_kib": spawned.get("spawner_rss_kib"),
                   "pages": refresher.pages if refresher else None,
                   "page_ms_median": statistics.median(refresher.render_ms)
                   if refresher and refresher.render_ms else None})
        try:
            verify(result, state, expected_items, workdir, checkpoint)
        except BenchError:
            keep = True
            raise
        return result
    finally:
        if fake is not None and fake.proc.returncode is None:
            fake.stop()
        if db is not None:
            db.close()
        if keep or args.keep:
            print(f"  (arquivos da execução mantidos em {workdir})", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def verify(result: RunResult, state: dict, expected_items: int, workdir: Path,
           checkpoint: int | None) -> None:
    """Each of the N x M items stored exactly once (harness.delivery_report, no failure
    file), one POST per solicitation, a clean exit; BenchError otherwise."""
    n, m = result.solicitations, result.items
    problems = []
    if result.exit_code != 0:
        problems.append(f"o monitor saiu com código {result.exit_code}")
    if expected_items != n * m:
        problems.append(f"semeados {expected_items} itens, esperados {n * m}")
    report = delivery_report(state, range(1, n * m + 1), failure_item_ids(workdir / "failed"),
                             checkpoint)
    problems += report["problems"]
    if result.posts != n:
        problems.append(f"{result.posts} POSTs para {n} solicitações "
                        f"(por status: {state.get('posts_by_status')})")
    if problems:
        raise BenchError(f"execução inválida (concorrência {result.concurrency}, repetição "
                         f"{result.repeat}): " + "; ".join(problems)
                         + f". Log do monitor: {workdir / 'monitor.log'}")


# --------------------------------------------------------------------------- --compare

THIS_TREE = "esta árvore"


class RefCheckout:
    """--compare REF: a temporary `git worktree` of REF (detached) beside this checkout, so
    its monitor runs with its own code and this benchmark's seeding, fake API and checks;
    `close()` removes it."""

    def __init__(self, ref: str):
        self.ref = ref
        self.path = Path(tempfile.mkdtemp(prefix="bemsoft-bench-ref-")) / "tree"
        result = subprocess.run(["git", "worktree", "add", "--detach", str(self.path), ref],
                                cwd=ROOT, text=True, capture_output=True, timeout=120, check=False)
        if result.returncode != 0:
            shutil.rmtree(self.path.parent, ignore_errors=True)
            raise BenchError(f"não foi possível fazer checkout de {ref!r}: "
                             f"{(result.stderr or result.stdout).strip()}")
        self.commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=self.path,
                                     text=True, capture_output=True, timeout=10,
                                     check=False).stdout.strip()

    def close(self) -> None:
        subprocess.run(["git", "worktree", "remove", "--force", str(self.path)], cwd=ROOT,
                       capture_output=True, timeout=120, check=False)
        shutil.rmtree(self.path.parent, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, capture_output=True, timeout=60,
                       check=False)


COMPARED = (  # (key of summarize(), label, format, higher is better)
    ("wall_s", "parede s", ".2f", False),
    ("drain_s", "dreno s", ".2f", False),
    ("sol_per_s", "sol/s", ".1f", True),
    ("cpu_ms_per_sol", "CPU ms/sol", ".3f", False),
    ("rss_mb", "RSS MB", ".1f", False),
    ("post_ms_mean", "POST médio ms", ".1f", False),
    ("wall_over_floor", "parede/piso", ".3f", False),
)


def compare_summaries(runs: list[RunResult]) -> dict:
    """Medians of each tree and, per concurrency, this tree / REF for each figure (and the
    median of the per-repetition ratios, the pairs having run one after the other)."""
    ref = summarize([r for r in runs if r.tree])["by_concurrency"]
    this = summarize([r for r in runs if not r.tree])["by_concurrency"]
    pairs: dict[tuple[int, int], dict[bool, RunResult]] = {}
    for run in runs:
        pairs.setdefault((run.concurrency, run.repeat), {})[bool(run.tree)] = run
    result = {}
    for c in this:
        ratios = {}
        for key, _, _, _ in COMPARED:
            a, b = this[c].get(key), ref.get(c, {}).get(key)
            per_pair = [getattr(p[False], key) / getattr(p[True], key)
                        for (pc, _), p in sorted(pairs.items()) if pc == c and len(p) == 2
                        and getattr(p[False], key) and getattr(p[True], key)]
            ratios[key] = {"of_medians": a / b if a and b else None,
                           "median_of_pairs": median(per_pair), "pairs": per_pair}
        result[c] = {"this": this[c], "ref": ref.get(c), "ratio": ratios}
    return result


def report_comparison(args, runs: list[RunResult], info: dict) -> int:
    comparison = compare_summaries(runs)
    ref = args.compare
    print(f"\nMedianas, {ref} contra esta árvore (razão = esta árvore / {ref}; "
          "na mesma invocação, intercaladas repetição a repetição):")
    for c, data in comparison.items():
        floor = data["this"]["floor_s"]
        print(f"\nconcorrência {c}, {args.solicitations} x {args.items}, latência "
              f"{args.latency * 1000:.0f} ms" + (f", piso {floor:.2f} s" if floor else "") + ":")
        print(f"{'':<16} {ref[:14]:>14} {THIS_TREE:>14} {'razão':>8} {'razão/rep. (mediana)':>22}")
        for key, label, spec, higher in COMPARED:
            a, b = data["this"].get(key), (data["ref"] or {}).get(key)
            if a is None and b is None:
                continue
            r = data["ratio"][key]
            better = ""
            if r["of_medians"] is not None:
                better = " (melhor)" if (r["of_medians"] > 1) == higher and r["of_medians"] != 1 else ""
            print(f"{label:<16} {fmt(b, spec):>14} {fmt(a, spec):>14} "
                  f"{fmt(r['of_medians'], '.3f'):>8} {fmt(r['median_of_pairs'], '.3f'):>22}{better}")
    if args.json:
        save_json(args.json, {"argv": sys.argv, "args": vars(args), "machine": info,
                              "runs": [r.to_json() for r in runs],
                              "comparison": {str(c): v for c, v in comparison.items()}})
    return 0


# --------------------------------------------------------------------------- reporting

def machine_info(db: str, pg_url: str = DEFAULT_PG_URL) -> dict:
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                capture_output=True, timeout=10, check=False).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    import sqlite3

    import urllib3
    info = {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": model,
        "ram_gib": round(mem_kib / 1024 / 1024, 1) if mem_kib else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlalchemy": sa.__version__,
        "urllib3": urllib3.__version__,
        "sqlite": sqlite3.sqlite_version,
        "git_commit": commit,
    }
    if db == "postgresql":
        info["postgresql"] = postgres_version(pg_url)
        try:
            import psycopg
            info["psycopg"] = psycopg.__version__
        except ImportError:
            pass
    return info


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[RunResult]) -> dict:
    """Medians per concurrency, plus speed-up of the largest concurrency over 1."""
    by_c: dict[int, list[RunResult]] = {}
    for run in runs:
        by_c.setdefault(run.concurrency, []).append(run)
    summary = {}
    for c, group in sorted(by_c.items()):
        summary[c] = {
            "runs": len(group),
            "wall_s": median(r.wall_s for r in group),
            "drain_s": median(r.drain_s for r in group),
            "startup_s": median(r.startup_s for r in group),
            "last_delivery_s": median(r.last_delivery_s for r in group),
            "tail_s": median(r.tail_s for r in group),
            "post_ms_mean": median(r.post_ms_mean for r in group),
            "db_cpu_ms_per_sol": median(None if r.db_cpu_s is None or not r.solicitations
                                        else r.db_cpu_s * 1000 / r.solicitations for r in group),
            "machine_busy_pct": median(None if r.machine_busy_s is None
                                       else 100 * r.machine_busy_s / r.wall_s for r in group),
            "other_cpu_ms_per_sol": median(
                None if r.machine_busy_s is None or r.fake_cpu_s is None or not r.solicitations
                else (r.machine_busy_s - r.cpu_s - r.fake_cpu_s) * 1000 / r.solicitations
                for r in group),
            "sol_per_s": median(r.sol_per_s for r in group),
            "cpu_ms_per_sol": median(r.cpu_ms_per_sol for r in group),
            "rss_mb": median(r.rss_mb for r in group),
            "rss_mb_max": max(r.rss_mb for r in group),
            "floor_s": group[0].floor_s,
            "wall_over_floor": median(r.wall_over_floor for r in group),
            "fake_cpu_ms_per_sol": median(None if r.fake_cpu_s is None
                                          else r.fake_cpu_s * 1000 / r.solicitations for r in group),
        }
    result = {"by_concurrency": summary}
    chosen = max(by_c)
    if 1 in by_c and chosen != 1:
        pairs = {}
        for run in runs:
            pairs.setdefault(run.repeat, {})[run.concurrency] = run
        ratios = [p[1].wall_s / p[chosen].wall_s for p in pairs.values() if 1 in p and chosen in p]
        result["speedup_of_medians"] = summary[1]["wall_s"] / summary[chosen]["wall_s"]
        result["speedup_median_of_pairs"] = median(ratios)
        result["speedup_pairs"] = ratios
        result["chosen_concurrency"] = chosen
    return result


def fmt(value, spec=".2f", none="-"):
    return none if value is None else format(value, spec)


def tree_label(run: RunResult, compare: str | None) -> str:
    return "" if not compare else f"{run.tree or THIS_TREE}, "


def print_runs(runs: list[RunResult]) -> None:
    if any(r.tree for r in runs):
        width = max(len(r.tree) for r in runs)
        print(f"{'código':<{max(width, 12)}} ", end="")
        for r in runs:
            r.extra["compared"] = True
    print(f"{'conc':>4} {'rep':>3} {'parede s':>9} {'partida s':>9} {'dreno s':>8} {'últ.entrega s':>13} "
          f"{'cauda s':>7} {'sol/s':>8} {'CPU ms/sol':>10} {'RSS MB':>7} {'piso s':>7} "
          f"{'parede/piso':>11} {'API CPU ms/sol':>14}")
    for r in runs:
        fake = None if r.fake_cpu_s is None else r.fake_cpu_s * 1000 / r.solicitations
        if r.extra.get("compared"):
            width = max(max(len(x.tree) for x in runs), 12)
            print(f"{r.tree or THIS_TREE:<{width}} ", end="")
        print(f"{r.concurrency:>4} {r.repeat:>3} {r.wall_s:>9.2f} {fmt(r.startup_s):>9} "
              f"{fmt(r.drain_s):>8} {fmt(r.last_delivery_s):>13} {fmt(r.tail_s):>7} "
              f"{r.sol_per_s:>8.1f} {r.cpu_ms_per_sol:>10.3f} {r.rss_mb:>7.1f} "
              f"{fmt(r.floor_s if r.floor_s else None):>7} {fmt(r.wall_over_floor, '.3f'):>11} "
              f"{fmt(fake, '.3f'):>14}" + ("  (com profiler)" if r.wrapped else ""))


def print_summary(summary: dict, latency: float) -> list[tuple[str, bool, str]]:
    print("\nMedianas:")
    print(f"{'conc':>4} {'exec':>4} {'parede s':>9} {'dreno s':>8} {'sol/s':>8} {'CPU ms/sol':>10} "
          f"{'RSS MB':>7} {'piso s':>7} {'parede/piso':>11}")
    for c, s in summary["by_concurrency"].items():
        print(f"{c:>4} {s['runs']:>4} {s['wall_s']:>9.2f} {fmt(s['drain_s']):>8} "
              f"{s['sol_per_s']:>8.1f} {s['cpu_ms_per_sol']:>10.3f} {s['rss_mb']:>7.1f} "
              f"{fmt(s['floor_s'] or None):>7} {fmt(s['wall_over_floor'], '.3f'):>11}")
    ncpu = os.cpu_count() or 1
    for c, s in summary["by_concurrency"].items():
        parts = [(f"concorrência {c}: partida {fmt(s['startup_s'])} s, cauda do --drain "
                  f"{fmt(s['tail_s'])} s, POST médio {fmt(s['post_ms_mean'], '.1f')} ms")]
        if s["machine_busy_pct"] is not None:
            parts.append(f"máquina ocupada {s['machine_busy_pct']:.0f}% de {100 * ncpu}%")
        if s["other_cpu_ms_per_sol"] is not None:
            parts.append(f"CPU ms/sol: monitor {s['cpu_ms_per_sol']:.3f}, API falsa "
                         f"{fmt(s['fake_cpu_ms_per_sol'], '.3f')}, resto da máquina (banco de dados, "
                         f"outros processos) {s['other_cpu_ms_per_sol']:.3f}"
                         + (f", dos quais backends do PostgreSQL {s['db_cpu_ms_per_sol']:.3f}"
                            if s["db_cpu_ms_per_sol"] is not None else ""))
        print("  " + "; ".join(parts))
    if "empty_run" in summary:
        e = summary["empty_run"]
        print(f"\nExecução vazia: {e['wall_s']:.2f} s de parede, {e['cpu_s'] * 1000:.0f} ms de CPU, "
              f"{e['rss_mb']:.1f} MB. CPU por solicitação descontando esse custo fixo: "
              + ", ".join(f"concorrência {c}: {s['cpu_ms_per_sol_net']:.3f} ms"
                          for c, s in summary["by_concurrency"].items()))
    checks = []
    chosen = summary.get("chosen_concurrency") or max(summary["by_concurrency"])
    main = summary["by_concurrency"][chosen]
    if "speedup_of_medians" in summary:
        ratio = summary["speedup_of_medians"]
        print(f"\nRazão (parede concorrência 1 / parede concorrência {chosen}): "
              f"{ratio:.2f}x nas medianas; mediana das razões por repetição "
              f"{summary['speedup_median_of_pairs']:.2f}x "
              f"({', '.join(f'{x:.2f}' for x in summary['speedup_pairs'])})")
        if latency > 0:
            checks.append((f"concorrência {chosen} >= {TARGET_SPEEDUP:.0f}x mais rápida que 1",
                           ratio >= TARGET_SPEEDUP, f"{ratio:.2f}x"))
    if latency > 0:
        checks.append((f"parede <= {TARGET_FLOOR_RATIO}x o piso N x latência / C",
                       main["wall_over_floor"] <= TARGET_FLOOR_RATIO,
                       (f"{main['wall_over_floor']:.3f}x (piso {main['floor_s']:.2f} s, "
                        f"parede {main['wall_s']:.2f} s)")))
    else:
        checks.append((f"CPU do monitor <= {TARGET_CPU_MS} ms por solicitação",
                       main["cpu_ms_per_sol"] <= TARGET_CPU_MS, f"{main['cpu_ms_per_sol']:.3f} ms"))
        checks.append((f">= {TARGET_RATE:.0f} solicitações/s", main["sol_per_s"] >= TARGET_RATE,
                       f"{main['sol_per_s']:.1f}/s"))
    print("\nMetas:")
    for name, ok, value in checks:
        print(f"  [{'OK' if ok else 'NÃO ATINGIDA'}] {name}: {value}")
    return checks


# --------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark ponta a ponta do monitor (banco legado -> monitor --drain -> "
                    "API falsa), com verificação de entrega exatamente uma vez.")
    add_common_options(parser)
    parser.add_argument("--solicitations", type=int, default=5000, help="solicitações (N)")
    parser.add_argument("--items", type=int, default=3, help="itens por solicitação (M)")
    parser.add_argument("--latency", type=float, default=0.02,
                        help="latência da API falsa por POST, em segundos")
    parser.add_argument("--concurrency", type=int, default=8, help="BEMSOFT_CONCURRENCY (C)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="não roda também a concorrência 1")
    parser.add_argument("--no-empty-run", action="store_true",
                        help="não mede a execução vazia (custo fixo de partida do monitor)")
    parser.add_argument("--compare", metavar="REF_GIT",
                        help="roda o mesmo benchmark também numa cópia (git worktree temporária) "
                             "do commit/ramo REF_GIT, intercalado com esta árvore, e mostra as "
                             "duas com as razões; implica --no-empty-run")
    return parser


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="postgresql")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL,
                        help="servidor PostgreSQL (um banco descartável é criado por execução)")
    parser.add_argument("--batch-size", type=int, default=500, help="BATCH_SIZE")
    parser.add_argument("--repeat", type=int, default=3, help="repetições (medianas)")
    parser.add_argument("--log-level", default="INFO", help="LOG_LEVEL do monitor (padrão INFO)")
    parser.add_argument("--poll-seconds", type=float, default=0.1,
                        help="POLL_SECONDS do monitor (padrão 0,1 = o mínimo aceito; o padrão do "
                             "produto é 5). O --drain espera um POLL_SECONDS depois de uma página "
                             "incompleta antes de perceber que acabou; 0 = não define (usa 5 s)")
    parser.add_argument("--json", metavar="ARQUIVO", help="grava os resultados brutos em JSON")
    parser.add_argument("--keep", action="store_true", help="mantém os diretórios temporários")
    parser.add_argument("--wrap", metavar="COMANDO",
                        help="prefixo do comando do monitor, ex.: 'py-spy record -o x.json "
                             "--format speedscope --' (CPU/RSS passam a não valer)")
    parser.add_argument("--page-refresh", type=float, metavar="SEGUNDOS",
                        help="carrega o painel (/) a cada N segundos durante o dreno, como uma aba "
                             "de navegador aberta (liga METRICS_PORT)")
    parser.add_argument("--cprofile", metavar="PREFIXO",
                        help="roda o monitor sob cProfile, gravando PREFIXO.c<C>.r<R>.prof")


def save_json(path: str, payload: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    print(f"\nResultados brutos: {out}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.concurrency < 1 or args.solicitations < 1 or args.items < 1 or args.repeat < 1:
        print("N, M, C e --repeat devem ser >= 1", file=sys.stderr)
        return 2
    concurrencies = [args.concurrency]
    if not args.no_baseline and args.concurrency != 1:
        concurrencies.append(1)
    info = machine_info(args.db, args.pg_url)
    checkout, trees = None, [ROOT]
    if args.compare:
        try:
            checkout = RefCheckout(args.compare)
        except BenchError as err:
            print(f"FALHA: {err}", file=sys.stderr)
            return 1
        trees = [checkout.path, ROOT]
        info["compare"] = f"{args.compare} ({checkout.commit}) em {checkout.path}"
    print(f"Benchmark: {args.db}, {args.solicitations} solicitações x {args.items} itens, "
          f"latência {args.latency * 1000:.0f} ms, concorrência {' e '.join(map(str, concurrencies))}, "
          f"BATCH_SIZE {args.batch_size}, {args.repeat} repetições, LOG_LEVEL {args.log_level}")
    print("Máquina: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    runs: list[RunResult] = []
    started = time.perf_counter()
    empty = None
    try:
        if not args.no_empty_run and not args.compare:
            empty = one_run(args, args.concurrency, 0, solicitations=0)
            print(f"  execução vazia (0 solicitações, custo fixo de partida/saída): "
                  f"{empty.wall_s:.2f} s, {empty.cpu_s * 1000:.0f} ms CPU, {empty.rss_mb:.1f} MB",
                  flush=True)
        for repeat in range(1, args.repeat + 1):
            for tree, c in [(t, c) for t in trees for c in concurrencies]:
                result = one_run(args, c, repeat, tree=tree)
                runs.append(result)
                print(f"  repetição {repeat}, {tree_label(result, args.compare)}concorrência {c}: "
                      f"{result.wall_s:.2f} s, "
                      f"{result.sol_per_s:.1f} sol/s, {result.cpu_ms_per_sol:.3f} ms CPU/sol, "
                      f"{result.rss_mb:.1f} MB (verificado: {result.stored_tests} testes, "
                      f"{result.posts} POSTs, checkpoint {result.checkpoint}; código {result.code})"
                      + (f"; painel carregado {result.extra['pages']} vez(es), mediana "
                         f"{result.extra['page_ms_median'] or 0:.1f} ms" if args.page_refresh else ""),
                      flush=True)
    except BenchError as err:
        print(f"\nFALHA: {err}", file=sys.stderr)
        return 1
    finally:
        if checkout is not None:
            checkout.close()
    print(f"\nExecuções ({time.perf_counter() - started:.0f} s no total):")
    print_runs(runs)
    if args.compare:
        return report_comparison(args, runs, info)
    summary = summarize(runs)
    if empty is not None:
        summary["empty_run"] = {"wall_s": empty.wall_s, "cpu_s": empty.cpu_s, "rss_mb": empty.rss_mb}
        for c, s in summary["by_concurrency"].items():
            s["cpu_ms_per_sol_net"] = ((s["cpu_ms_per_sol"] * args.solicitations - empty.cpu_s * 1000)
                                       / args.solicitations)
    checks = print_summary(summary, args.latency)
    if args.json:
        save_json(args.json, {"argv": sys.argv, "args": vars(args), "machine": info,
                              "runs": [r.to_json() for r in runs], "summary": summary,
                              "empty_run": empty.to_json() if empty else None,
                              "targets": [{"target": n, "met": ok, "value": v}
                                          for n, ok, v in checks]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
