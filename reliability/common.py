"""Shared pieces of the reliability scenarios. What every driver of the monitor needs (the
throw-away PostgreSQL database, the fake Bemsoft API in its own process, the `.env` recipe,
the checkpoint read, the exactly-once check) comes from bemsoft_monitor.testing.harness;
here: the real monitor in its own process, seeding, and the faults the scenarios inject.

Run the scenarios as modules from the project root: `python -m reliability.<cenário>`.
Only loopback addresses are used. Every loop here is bounded in count and time."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from bemsoft_monitor.config import PROJECT_DIR
from bemsoft_monitor.testing import harness
from bemsoft_monitor.testing.harness import (LAB, PG_ADMIN_URL, TOKEN, FakeApiProcess,  # noqa: F401
                                             PgDatabase, failure_item_ids, pg_problem, verify,
                                             wait_until)
from bemsoft_monitor.testing.harness import read_checkpoint as checkpoint  # noqa: F401
from bemsoft_monitor.testing.sampledata import add_items, add_order, add_patient, bulk_orders

# the monitor's settings in every scenario (each adds its own on top)
SCENARIO_SETTINGS = {"POLL_SECONDS": "0.2", "BEMSOFT_RETRIES": "2", "BEMSOFT_BACKOFF": "0.05",
                     "BEMSOFT_MAX_BACKOFF": "2", "BEMSOFT_TIMEOUT": "5", "LOG_LEVEL": "INFO"}


def seed(url: str, solicitations: int, items: int, first_cod: int = 1) -> list[int]:
    """N solicitations x M items; returns the item ids."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        before = conn.execute(sa.text('SELECT coalesce(max("CodItemSol"), 0) FROM "ItemSol"')).scalar()
    bulk_orders(engine, solicitations, items, terceirizado=LAB, first_cod=first_cod)
    engine.dispose()
    return list(range(before + 1, before + solicitations * items + 1))


def write_env(directory: Path, db_url: str, api_url: str, **overrides) -> Path:
    """harness.write_env with SCENARIO_SETTINGS under `overrides`."""
    return harness.write_env(directory, db_url, api_url, **{**SCENARIO_SETTINGS, **overrides})


@dataclass
class MonitorProcess:
    """The real monitor (`python monitor_bemsoft.py --env-file ... [args]`)."""
    env_file: Path
    args: tuple = ()
    output: Path | None = None
    proc: subprocess.Popen = field(init=False)

    def __post_init__(self):
        self.output = self.output or self.env_file.parent / "monitor.out"
        self._out = open(self.output, "a", encoding="utf-8")
        self.proc = subprocess.Popen(harness.monitor_command(self.env_file, *self.args),
                                     cwd=PROJECT_DIR, env=harness.subprocess_env(),
                                     stdout=self._out, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log_file(self) -> Path:
        """LOG_FILE as write_env sets it: every line. With LOG_FILE set and no terminal, the
        console (`output`) keeps only warnings, errors and tracebacks."""
        return self.env_file.parent / "monitor.log"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._out.close()

    def stop(self, timeout: float = 60) -> int:
        if self.alive():
            self.proc.terminate()
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._out.close()
        return code

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._out.close()
        return code

    def rss_mb(self) -> float:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0


def temp_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


# ---------------------------------------------------------------------------------------
# Helpers added for the scenario scripts (fault_matrix, crash_trials, two_instances, soak)
# and tests/test_reliability_api.py. Appended only; nothing above was changed.

def pg_unreachable() -> bool:
    """For the scripts: True (after saying why, on stderr) when PostgreSQL does not answer;
    they then exit with code 2."""
    problem = pg_problem()
    if problem:
        print(f"PostgreSQL inacessível: {problem}", file=sys.stderr)
    return problem is not None


def failure_files(failed_dir: Path) -> list[dict]:
    """The failure files written by the monitor: path, http_status, reason, item_ids, key."""
    out = []
    for path in sorted(Path(failed_dir).glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        out.append({"path": str(path), "http_status": data.get("http_status"),
                    "reason": data.get("reason") or "", "item_ids": list(data.get("item_ids") or []),
                    "key": data.get("idempotency_key"), "mode": path.stat().st_mode & 0o777})
    return out


def read_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def finish_within(monitor: "MonitorProcess", timeout: float) -> int | None:
    """Exit code of the monitor, or None when it had to be killed after `timeout` s."""
    try:
        return monitor.wait(timeout)
    except subprocess.TimeoutExpired:
        monitor.kill9()
        return None


def sql(db_url: str, statement: str, **params):
    """Run one statement in its own transaction; returns the first column of the first row
    for a SELECT, None otherwise."""
    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as conn:
            result = conn.execute(sa.text(statement), params)
            return result.scalar() if result.returns_rows else None
    finally:
        engine.dispose()


def format_table(headers: list[str], rows: list[list]) -> str:
    """A plain-text table (left-aligned first column, right-aligned numbers)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "  ".join(c.ljust(w) if i == 0 or not c.replace(".", "").replace("-", "").isdigit()
                         else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


# ====================================================================== fault scenarios
# Helpers for db_faults.py, late_commits.py, disk_faults.py and tests/test_reliability_db.py.
import datetime as _dt  # noqa: E402
import itertools as _itertools  # noqa: E402
import random as _random  # noqa: E402
import re as _re  # noqa: E402
import shutil as _shutil  # noqa: E402
import threading as _threading  # noqa: E402

from bemsoft_monitor.schema import monitor_metadata  # noqa: E402

ORDER_TIME = _dt.datetime(2026, 11, 28, 8, 0, 0)
DOWN_LINE = "Banco de dados indisponível"
BACK_LINE = "Conexão com o banco de dados restabelecida"
LOG_TIME = _re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}),(\d{3}) ")


def database_name(db_url: str) -> str:
    return sa.engine.make_url(db_url).database


def pg_ready(timeout: float = 2.0) -> bool:
    """`pg_isready` against the admin URL's host and port."""
    url = sa.engine.make_url(PG_ADMIN_URL)
    if not _shutil.which("pg_isready"):  # no client tools: a real connection answers too
        return pg_problem() is None
    try:
        done = subprocess.run(["pg_isready", "-q", "-h", url.host or "127.0.0.1",
                               "-p", str(url.port or 5432), "-t", str(max(1, int(timeout)))],
                              timeout=timeout + 5)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def terminate_backends(db_url: str, admin_url: str = PG_ADMIN_URL) -> int:
    """pg_terminate_backend for every session of the test database (the monitor's pool, its
    lock connection, writers); returns how many were terminated. Never touches other databases."""
    engine = harness.admin_engine(admin_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = :db AND pid <> pg_backend_pid()"),
                {"db": database_name(db_url)}).scalar() or 0)
    finally:
        engine.dispose()


def terminate_burst(db_url: str, seconds: float, every: float = 0.05) -> int:
    """Terminate the database's sessions again and again for `seconds` (reconnections made
    meanwhile die too): a short outage that a pre-ping alone cannot hide."""
    total, deadline = 0, time.monotonic() + max(0.0, seconds)
    for _ in range(10_000):
        total += terminate_backends(db_url)
        if time.monotonic() >= deadline:
            break
        time.sleep(every)
    return total


def restart_postgres(timeout: float = 120.0) -> float:
    """Restart the local cluster (affects EVERY database on this server) and wait for
    pg_isready; returns the seconds until it answered again."""
    versions = sorted(os.listdir("/etc/postgresql"))
    started = time.monotonic()
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "restart"],
                   check=True, timeout=timeout, capture_output=True)
    if not wait_until(pg_ready, timeout, interval=0.2):
        raise RuntimeError("PostgreSQL não voltou depois do restart")
    return time.monotonic() - started


def sync_item_sequence(db_url: str) -> None:
    """seed() writes explicit CodItemSol values; move the identity past them so that rows
    inserted afterwards get their ids from the database."""
    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(
                "SELECT setval(pg_get_serial_sequence('\"ItemSol\"', 'CodItemSol'), "
                "m, true) FROM (SELECT max(\"CodItemSol\") AS m FROM \"ItemSol\") s "
                "WHERE m IS NOT NULL"))
    finally:
        engine.dispose()


def max_order_cod(db_url: str) -> int:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(
                'SELECT coalesce(max(codsolicitacao), 0) FROM solicitacao')).scalar())
    finally:
        engine.dispose()


def lab_item_ids(db_url: str) -> list[int]:
    """Every committed ItemSol row of the test lab (the ground truth for verify())."""
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return [int(r[0]) for r in conn.execute(sa.text(
                'SELECT "CodItemSol" FROM "ItemSol" WHERE "NomeTerceirizado" = :lab '
                'ORDER BY "CodItemSol"'), {"lab": LAB})]
    finally:
        engine.dispose()


def create_monitor_tables(db_url: str) -> None:
    """The monitor's own tables, created ahead of it (it creates them with checkfirst)."""
    engine = sa.create_engine(db_url).execution_options(schema_translate_map={"monitor_schema": None})
    try:
        monitor_metadata.create_all(engine, checkfirst=True)
    finally:
        engine.dispose()


class CodAllocator:
    """Thread-safe CodSolicitacao (and codpaciente) numbers for writers."""

    def __init__(self, first: int):
        self._next = _itertools.count(first)
        self._lock = _threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            return next(self._next)


def add_solicitation(conn, cod: int, n_items: int, *, sexo: str | None = "F",
                     codes=("GLI", "HEMO", "TSH", "URINA1"), new_patient: bool = True) -> list[int]:
    """One solicitation with its patient and `n_items` items (ids from the identity)."""
    if new_patient:
        add_patient(conn, cod, f"Paciente Confiabilidade {cod}", cpf=f"{cod:011d}",
                    datanasc=_dt.datetime(1980, 1, 1), sexo=sexo)
        add_order(conn, cod, cod, dtaentrada=ORDER_TIME, hora="08:00:00")
    return add_items(conn, cod, [{"CodConvExames": codes[i % len(codes)],
                                  "DescExames": f"EXAME {codes[i % len(codes)]}",
                                  "Origem": "REL"} for i in range(n_items)],
                     terceirizado=LAB, entered_at=ORDER_TIME)


class OrderWriter(_threading.Thread):
    """New orders while the monitor runs. Each transaction inserts one solicitation (or,
    with `append_fraction`, more items of a solicitation it wrote before), sleeps
    `hold` = (min, max) seconds with the transaction open, then commits: with several
    writers, rows commit out of CodItemSol order. Database errors (terminated sessions, a
    restart) are counted and the writer carries on with a new number. Bounded by
    `max_orders` and by stop()."""

    def __init__(self, db_url: str, cods: CodAllocator, *, rate: float = 0.0,
                 hold: tuple[float, float] = (0.0, 0.0), items: tuple[int, int] = (1, 3),
                 append_fraction: float = 0.0, max_orders: int = 100_000, seed: int | None = None,
                 name: str = "writer", commit_log: list | None = None):
        super().__init__(name=name, daemon=True)
        self.engine = sa.create_engine(db_url, pool_pre_ping=True, pool_size=1,
                                       connect_args={"connect_timeout": 5,
                                                     "application_name": f"reliability-{name}"})
        self.cods, self.rate, self.hold, self.items = cods, rate, hold, items
        self.append_fraction = append_fraction
        self.max_orders = max_orders
        self.rng = _random.Random(seed)
        self._halt = _threading.Event()
        self.committed = 0
        self.appended = 0
        self.errors = 0
        self.item_ids: list[int] = []
        self.mine: list[int] = []
        self.last_error = ""
        self.commit_log = commit_log if commit_log is not None else []  # (monotonic, ids)

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        for _ in range(self.max_orders):
            if self._halt.is_set():
                break
            append = bool(self.mine) and self.rng.random() < self.append_fraction
            cod = self.rng.choice(self.mine[-20:]) if append else self.cods()
            n = self.rng.randint(*self.items)
            try:
                with self.engine.begin() as conn:
                    ids = add_solicitation(conn, cod, n, new_patient=not append)
                    pause = self.rng.uniform(*self.hold)
                    if pause > 0:
                        self._halt.wait(pause)
            except Exception as err:  # noqa: BLE001 - the writer survives outages
                self.errors += 1
                self.last_error = str(err).splitlines()[0][:200]
                self._halt.wait(0.2)
                continue
            self.item_ids += ids
            self.commit_log.append((time.monotonic(), ids))
            if append:
                self.appended += 1
            else:
                self.committed += 1
                self.mine.append(cod)
            if self.rate > 0:
                self._halt.wait(1.0 / self.rate)
        self.engine.dispose()


class CheckpointWatcher(_threading.Thread):
    """Samples, in one snapshot, the checkpoint and the items of the lab at or below it that
    have no recorded outcome (no `_MonitorItems` row, or still "sending"). The spec says
    this set must stay empty, except for a late commit that the look-back window has not
    picked up yet. Only the unpruned range (checkpoint - 2*lookback, checkpoint] is
    checked. Errors (outages) skip a sample; `violations()` refuses to answer if no sample
    ever read the checkpoint (a watcher that only failed proved nothing)."""

    def __init__(self, db_url: str, lookback: int = 1000, interval: float = 0.2,
                 name: str = "bemsoft"):
        super().__init__(name="checkpoint-watcher", daemon=True)
        self.engine = sa.create_engine(db_url, pool_pre_ping=True, pool_size=1,
                                       connect_args={"connect_timeout": 3,
                                                     "application_name": "reliability-watcher"})
        self.lookback, self.interval, self.monitor_name = lookback, interval, name
        self._halt = _threading.Event()
        self.samples = 0
        self.failed_samples = 0
        self.good_samples = 0       # samples that read a checkpoint
        self.last_error: str | None = None
        self.checkpoints: list[tuple[float, int]] = []   # (monotonic, value) on change
        self.seen: dict[int, list[float]] = {}          # item -> [first, last] monotonic

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
        self.engine.dispose()

    def sample(self) -> None:
        with self.engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
            with conn.begin():
                state = dict(conn.execute(sa.text(
                    'SELECT "Name", "LastItemId" FROM "_MonitorState" WHERE "Name" IN (:a, :b)'),
                    {"a": self.monitor_name, "b": f"{self.monitor_name}#inicio"}).all())
                cp = state.get(self.monitor_name)
                if cp is None:
                    return
                low = max(int(state.get(f"{self.monitor_name}#inicio") or 0),
                          int(cp) - 2 * self.lookback)
                rows = conn.execute(sa.text(
                    'SELECT i."CodItemSol" FROM "ItemSol" i LEFT JOIN "_MonitorItems" m '
                    'ON m."Name" = :n AND m."CodItemSol" = i."CodItemSol" '
                    'WHERE i."NomeTerceirizado" = :lab AND i."CodItemSol" > :low '
                    'AND i."CodItemSol" <= :cp AND (m."Status" IS NULL OR m."Status" = :s)'),
                    {"n": self.monitor_name, "lab": LAB, "low": low, "cp": int(cp),
                     "s": "sending"}).all()
        now = time.monotonic()
        if not self.checkpoints or self.checkpoints[-1][1] != int(cp):
            self.checkpoints.append((now, int(cp)))
        for (item,) in rows:
            self.seen.setdefault(int(item), [now, now])[1] = now
        self.good_samples += 1

    def run(self) -> None:
        for _ in range(10_000_000):
            if self._halt.is_set():
                break
            self.samples += 1
            try:
                self.sample()
            except Exception as err:  # noqa: BLE001 - outage, or the tables do not exist yet
                self.failed_samples += 1
                self.last_error = f"{err.__class__.__name__}: {str(err).splitlines()[0][:200]}"
            self._halt.wait(self.interval)

    def checkpoint_values(self) -> list[int]:
        return [v for _, v in self.checkpoints]

    def violations(self, grace: float = 0.0) -> dict[int, float]:
        """Items seen at or below the checkpoint without an outcome for longer than
        `grace` seconds (a single sample counts as 0 s): {item: seconds}."""
        if not self.good_samples:
            raise RuntimeError(f"vigia do checkpoint não leu nenhuma amostra em {self.samples} "
                               f"tentativas; último erro: {self.last_error}")
        return {i: last - first for i, (first, last) in sorted(self.seen.items())
                if last - first >= grace}


def log_events(path: Path, text: str) -> list[_dt.datetime]:
    """Timestamps of the log lines that contain `text` (LOG_FILE format)."""
    found = []
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return found
    for line in lines:
        if text in line:
            match = LOG_TIME.match(line)
            if match:
                found.append(_dt.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S")
                             + _dt.timedelta(milliseconds=int(match[2])))
    return found


def count_in_log(path: Path, text: str) -> int:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace").count(text)
    except OSError:
        return 0


def lines_per_fault(events: list[_dt.datetime], faults: list[_dt.datetime]) -> tuple[list[int], int]:
    """Assign each log event to the latest fault that started before it: (count per fault,
    events before any fault)."""
    counts, before = [0] * len(faults), 0
    for when in events:
        index = max((i for i, start in enumerate(faults) if start <= when), default=None)
        if index is None:
            before += 1
        else:
            counts[index] += 1
    return counts, before


def wait_drained(api: FakeApiProcess, db_url: str, timeout: float,
                 failed_dir: Path | None = None, interval: float = 0.5,
                 stall: float | None = None) -> bool:
    """Until every lab item is stored by the API (or in a failure file) and the checkpoint
    equals the last item id. Bounded by `timeout`; with `stall`, gives up earlier when
    neither the checkpoint nor what the API stored changed for `stall` seconds."""
    progress = {"mark": None, "since": time.monotonic()}

    def done() -> bool:
        try:
            ids = lab_item_ids(db_url)
            cp = checkpoint(db_url)
            stored = {int(k[5:]) for k in api.state()["tests"]}
            failed = set(failure_item_ids(failed_dir)) if failed_dir else set()
        except Exception:  # noqa: BLE001 - an outage: not drained yet
            return False
        if ids and cp == max(ids) and set(ids) <= stored | failed:
            return True
        mark = (cp, len(stored), len(failed), len(ids))
        if mark != progress["mark"]:
            progress["mark"], progress["since"] = mark, time.monotonic()
        return False

    def finished_or_stalled() -> bool:
        if done():
            return True
        return stall is not None and time.monotonic() - progress["since"] > stall

    return wait_until(finished_or_stalled, timeout, interval) and done()


def mount_permitted(probe_dir: Path | None = None) -> tuple[bool, str]:
    """Can this process mount a tmpfs (root with CAP_SYS_ADMIN)? (answer, reason)."""
    if os.name != "posix" or not _shutil.which("mount"):
        return False, "comando mount indisponível"
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return False, "mount de tmpfs exige root (uid atual %d)" % os.geteuid()
    probe = Path(probe_dir or tempfile.mkdtemp(prefix="bm_mount_probe_"))
    probe.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(probe)],
                              capture_output=True, text=True, timeout=20)
        if done.returncode != 0:
            return False, f"mount negado: {(done.stderr or done.stdout).strip()[:200]}"
        subprocess.run(["umount", str(probe)], capture_output=True, timeout=20)
        return True, "mount de tmpfs permitido"
    except (OSError, subprocess.TimeoutExpired) as err:
        return False, f"mount falhou: {err}"
    finally:
        try:
            probe.rmdir()
        except OSError:
            pass


def mount_tmpfs(path: Path, size: str = "16k", read_only: bool = False) -> None:
    Path(path).mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True,
                   capture_output=True, timeout=20)


def remount_tmpfs(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True,
                   capture_output=True, timeout=20)


def umount(path: Path) -> bool:
    """Unmount if mounted (lazy unmount as a last resort); True when nothing is left mounted."""
    path = Path(path)
    for args in (["umount", str(path)], ["umount", "-l", str(path)]):
        if not os.path.ismount(path):
            return True
        subprocess.run(args, capture_output=True, timeout=20)
    return not os.path.ismount(path)


def fill_disk(directory: Path) -> int:
    """Fill the filesystem holding `directory` with one file; returns the bytes written."""
    written = 0
    with open(Path(directory) / "enchimento.bin", "wb", buffering=0) as fh:
        block = b"\0" * 4096
        for _ in range(1_000_000):
            try:
                written += fh.write(block)
            except OSError:
                break
    for size in (512, 64, 1):  # the last partial block
        try:
            with open(Path(directory) / "enchimento.bin", "ab", buffering=0) as fh:
                for _ in range(10_000):
                    written += fh.write(b"\0" * size)
        except OSError:
            continue
    return written


def install_session_killer(db_url: str, table: str = "_MonitorItems", event: str = "INSERT",
                           name: str = "rel_kill") -> None:
    """A statement trigger (BEFORE `event` ON `table`) that terminates its OWN session — the
    monitor's connection — on the statement chosen by arm_session_killer(): a connection
    lost exactly while the monitor records "sending" (INSERT INTO _MonitorItems) or moves
    the checkpoint (UPDATE _MonitorState). Creates the monitor's tables first."""
    create_monitor_tables(db_url)
    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f"CREATE SEQUENCE IF NOT EXISTS {name}_arm "
                                 "MINVALUE -1000000000 START 1000000"))
            conn.execute(sa.text(
                f"CREATE OR REPLACE FUNCTION {name}_fn() RETURNS trigger "
                "LANGUAGE plpgsql AS $$ BEGIN "
                f"IF nextval('{name}_arm') = 1 THEN "
                "PERFORM pg_terminate_backend(pg_backend_pid()); PERFORM pg_sleep(5); END IF; "
                "RETURN NULL; END $$"))
            conn.execute(sa.text(f'DROP TRIGGER IF EXISTS {name} ON "{table}"'))
            conn.execute(sa.text(f'CREATE TRIGGER {name} BEFORE {event} ON "{table}" '
                                 f'FOR EACH STATEMENT EXECUTE FUNCTION {name}_fn()'))
    finally:
        engine.dispose()


def arm_session_killer(db_url: str, skip: int = 0, name: str = "rel_kill") -> None:
    """The (skip+1)-th matching statement from now on kills its session."""
    sql(db_url, f"SELECT setval('{name}_arm', :v, true)", v=-int(skip))


def session_killer_fired(db_url: str, name: str = "rel_kill") -> bool:
    return int(sql(db_url, f"SELECT last_value FROM {name}_arm")) >= 1


# ---------------------------------------------------------------------------------------
# (fault_matrix / crash trials) a fake API started with extra command-line options

def fake_api_with(*extra_args: str, latency: float = 0.0) -> FakeApiProcess:
    """Like FakeApiProcess(latency=...), with more options for the fake, e.g.
    ("--max-external-id", "12"): a longer order id then gets the real API's "201 with an
    error body" — nothing stored and the Idempotency-Key remembered (SPEC §5.1, §5.2, §5.4)."""
    return FakeApiProcess(latency=latency, extra_args=extra_args)


def block_database(db_url: str, seconds: float, admin_url: str = PG_ADMIN_URL) -> int:
    """A long outage of ONE database: ALTER DATABASE ... ALLOW_CONNECTIONS false, terminate
    its sessions, keep it closed for `seconds`, open it again (always). Returns the sessions
    terminated. Other databases on the server are not touched."""
    name = database_name(db_url)
    engine = harness.admin_engine(admin_url)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            try:
                killed = terminate_backends(db_url, admin_url)
                time.sleep(max(0.0, seconds))
            finally:
                conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        return killed
    finally:
        engine.dispose()


def send_truncated_post(api: FakeApiProcess, key: str = "sol-1-truncado") -> None:
    """Headers with Content-Length, a piece of the body, then the connection closes: what the
    API sees when the monitor is killed in the middle of a POST."""
    import socket
    host, port = api.url.split("//", 1)[1].rsplit(":", 1)
    body = json.dumps({"batch": {"externalId": "sol-1"}}).encode()
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall((f"POST /requests HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                      f"Content-Type: application/json\r\nIdempotency-Key: {key}\r\n"
                      f"Content-Length: {len(body) + 500}\r\n\r\n").encode() + body[:10])
