"""Tiny helper process that starts the monitor and reaps it with os.wait4().

Why: on Linux a child's ru_maxrss is at least the RSS its parent had when it forked (exec
records the high-water mark of the pre-exec address space, which is the parent's copy).
The benchmark process grows while it seeds hundreds of thousands of rows and reads the fake
API's state, so a monitor forked from it would report the benchmark's memory, not its own.
This helper imports only the standard library and stays small (~10 MB), so the ru_maxrss
it reports is the monitor's own peak.

Protocol: one JSON object per line on stdin ({"cmd", "cwd", "env", "log"}), one JSON
object per line on stdout with the exit code, wall time, rusage and machine CPU.
"""
import json
import os
import subprocess
import sys
import time


def machine_busy_s():
    try:
        with open("/proc/stat") as handle:
            fields = handle.readline().split()
    except OSError:
        return None
    values = [int(v) for v in fields[1:9]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def main():
    for line in sys.stdin:
        request = json.loads(line)
        with open(request["log"], "wb") as log:
            busy_before = machine_busy_s()
            spawned_at = time.time()
            started = time.perf_counter()
            proc = subprocess.Popen(request["cmd"], cwd=request["cwd"], env=request["env"],
                                    stdout=log, stderr=log)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - started
            busy_after = machine_busy_s()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait
        busy = None if busy_before is None or busy_after is None else busy_after - busy_before
        reply = {"exit_code": proc.returncode, "wall_s": wall, "spawned_at": spawned_at,
                 "utime": usage.ru_utime, "stime": usage.ru_stime, "maxrss_kib": usage.ru_maxrss,
                 "machine_busy_s": busy, "spawner_rss_kib": _own_rss_kib()}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


def _own_rss_kib():
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


if __name__ == "__main__":
    main()
