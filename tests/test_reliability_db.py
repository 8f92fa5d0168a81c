"""Reliability proof in CI, short versions of reliability/db_faults.py, late_commits.py and
disk_faults.py: the real monitor (its own process, loop mode), a real PostgreSQL database
and the project's fake API (its own process). Never restarts PostgreSQL (that would hit every
database on the server): outages here are pg_terminate_backend of the test database's
sessions only, and kills of the monitor's own session from a trigger.

Each scenario prints its pt-BR report; pytest shows it when a test fails."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import conftest
from reliability import common, db_faults, disk_faults, late_commits

pytestmark = [pytest.mark.postgres, pytest.mark.usefixtures("postgres_server")]


def test_terminated_sessions_during_a_drain_reconnect_log_once_and_lose_nothing(capsys):
    """~300 solicitations drained while the test database's sessions are terminated three
    times (0.5 s bursts), once exactly inside the checkpoint UPDATE, and the database is
    closed for 3 s (ALLOW_CONNECTIONS false: several failed reconnections), with new orders
    arriving: one 'indisponível' line per outage at most (exactly one for the two certain
    ones), one 'restabelecida' per 'indisponível', every item stored once, no failure
    file, checkpoint == last id, clean exit on SIGTERM."""
    args = db_faults.parse_args([
        "--solicitations", "300", "--items", "2", "--kills", "3", "--kill-burst", "0.5",
        "--kill-in-record", "1", "--outages", "1", "--outage-seconds", "3", "--restarts", "0",
        "--interval", "1", "--batch-size", "50",
        "--concurrency", "2", "--latency", "0.02", "--writer-rate", "5", "--timeout", "60",
        "--stall", "20"])
    result = db_faults.run(args)
    out = capsys.readouterr().out
    assert result.code != 2, out
    assert result.violations == [], out
    assert 2 <= result.outages_logged <= result.faults, out
    # the checkpoint never passed an item without a recorded outcome
    assert not result.checkpoint_skips, out


def test_connection_lost_while_recording_sending_does_not_skip_the_page(tmp_path):
    """Minimal repro: 400 solicitations x 1 item, BATCH_SIZE=100, LOOKBACK_ITEMS=100; the
    monitor's session dies in its first INSERT INTO _MonitorItems (page 1 of the catch-up).
    Expected: items 1..100 delivered after the reconnection. Found: never sent, checkpoint 400."""
    with common.PgDatabase() as url, common.FakeApiProcess(latency=0.005) as api:
        ids = common.seed(url, 400, 1)
        common.install_session_killer(url, "_MonitorItems", "INSERT", "rel_kill_sending")
        common.arm_session_killer(url, 0, "rel_kill_sending")
        env = common.write_env(tmp_path, url, api.url, BATCH_SIZE=100, LOOKBACK_ITEMS=100)
        watcher = common.CheckpointWatcher(url, lookback=100, interval=0.1)
        watcher.start()
        monitor = common.MonitorProcess(env)
        try:
            assert common.wait_until(lambda: common.session_killer_fired(url, "rel_kill_sending"), 30)
            common.wait_drained(api, url, 40, tmp_path / "failed", stall=8)
        finally:
            code = monitor.stop(30)
            watcher.stop()
        report = common.verify(api, url, ids, tmp_path / "failed")
    log = common.read_text(tmp_path / "monitor.log")
    assert log.count(common.DOWN_LINE) == 1, log[-3000:]
    assert code == 0
    assert report["ok"], {k: report[k] for k in ("missing", "checkpoint", "last_id")}
    assert not watcher.violations(0.0), (
        f"checkpoint passou de {len(watcher.violations(0.0))} itens sem resultado registrado")


def test_late_commits_from_concurrent_writers_lose_nothing(capsys):
    """4 writers hold their transactions 0-1.5 s before committing (rows commit out of
    CodItemSol order) for ~15 s while the monitor runs: everything stored exactly once,
    checkpoint == last id, no late commit left below the checkpoint for more than 8 s."""
    code = late_commits.main(["--minutes", "0.25", "--writers", "4", "--hold-max", "1.5",
                              "--grace", "8", "--timeout", "40", "--stall", "15"])
    out = capsys.readouterr().out
    assert code == 0, out


def test_failed_dir_unwritable_holds_the_checkpoint_until_fixed(capsys):
    """FAILED_DIR below a regular file (root ignores permission bits): the failure of the
    patient without gender cannot be written; the error is logged repeatedly, good
    solicitations keep going, the checkpoint stays before the unrecorded one; once the file
    is removed, the failure files appear (0600) and the checkpoint reaches the last id."""
    code = disk_faults.main(["--modes", "unwritable", "--good", "20", "--bad", "2",
                             "--fault-seconds", "1.5", "--timeout", "30", "--stall", "10"])
    out = capsys.readouterr().out
    assert code == 0, out


def test_failed_dir_full_holds_the_checkpoint_until_enlarged(capsys):
    """FAILED_DIR on a full 16 KiB tmpfs: same expectations; fixed by enlarging the tmpfs.
    Needs permission to mount (root with CAP_SYS_ADMIN)."""
    allowed, why = common.mount_permitted()
    if not allowed:
        if conftest.IN_CI:  # a warning nobody reads would let the full-disk path go untested
            pytest.fail(f"disco cheio não pode ser testado neste CI: {why}", pytrace=False)
        pytest.skip(f"disco cheio precisa de mount de tmpfs: {why}")
    code = disk_faults.main(["--modes", "full", "--good", "20", "--bad", "2",
                             "--fault-seconds", "1.5", "--timeout", "30", "--stall", "10"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "tmpfs aumentado" in out, out


def test_every_mount_was_undone():
    """disk_faults unmounts what it mounted, whatever happened."""
    mounts = Path("/proc/mounts").read_text() if os.path.exists("/proc/mounts") else ""
    assert "bm_disk_" not in mounts, mounts
