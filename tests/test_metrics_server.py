"""The console/metrics HTTP server facing whoever reaches METRICS_PORT: slow clients cannot
take its connections, a request has a deadline for the whole of it, and off loopback
/metrics is for the holder of STATUS_TOKEN (/healthz tells anyone else only up or down).
Real sockets on loopback addresses only."""
from __future__ import annotations

import json
import select
import socket
import threading
import urllib.error
import urllib.request

import pytest

from bemsoft_monitor.console import Console
from bemsoft_monitor.metrics import Admission, client_host, start_metrics_server
from test_network import db_url  # noqa: F401  (SQLite only: the server is what is tested)

STATUS_TOKEN = "painel-token-0123456789"


def get(url: str, **headers):
    """(status, body) of a GET; an HTTP error status is an answer too."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed `sock` (without waiting)."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


class Trickler:
    """Clients from one address each sending a request head one byte at a time (a
    slow-loris), until stopped."""

    def __init__(self, address, count: int, source: str, every: float = 0.5):
        self.sockets = []
        for _ in range(count):
            sock = socket.socket()
            sock.bind((source, 0))
            sock.connect(address)
            sock.sendall(b"GET / HTTP/1.1\r\n")
            self.sockets.append(sock)
        self.every = every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.wait(self.every):
            for sock in self.sockets:
                try:
                    sock.send(b"X")
                except OSError:
                    pass

    def close(self):
        self.stop.set()
        self.thread.join()
        for sock in self.sockets:
            sock.close()


def test_slow_clients_from_one_address_cannot_shut_out_the_others(harness):
    monitor = harness.monitor(STATUS_TOKEN=STATUS_TOKEN)
    monitor.step()
    server = start_metrics_server(monitor, 0, max_age=60, request_timeout=120,
                                  console=Console(monitor.status, monitor.settings))
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        try:
            attack = Trickler(("127.0.0.1", server.server_port), 12, source="127.0.0.2")
        except OSError as err:  # a system without the 127.0.0.0/8 loopback range
            pytest.skip(f"127.0.0.2 indisponível: {err}")
        try:
            assert get(base + "/healthz")[0] == 200
            assert get(base + "/", **{"X-Status-Token": STATUS_TOKEN})[0] == 200
            status, body = get(base + "/metrics")
            assert status == 200 and b"bemsoft_checkpoint" in body
            # answered while the attack goes on: 8 of its connections held, the rest refused
            assert attack.thread.is_alive()
            assert sorted(closed_by_server(s) for s in attack.sockets) == [False] * 8 + [True] * 4
        finally:
            attack.close()
    finally:
        server.shutdown()
        server.server_close()


def test_a_request_has_one_deadline_for_all_of_it(harness):
    """Each byte arrives well within the deadline; the request as a whole does not."""
    server = start_metrics_server(harness.monitor(), 0, max_age=60, request_timeout=0.5)
    try:
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Lento: ")
            sent = 0
            while sent < 400 and not closed_by_server(sock):
                sock.sendall(b"a")
                sent += 1
                select.select([sock], [], [], 0.05)   # a byte every 50 ms, or sooner if closed
            assert sent < 400, "the server waited for the whole trickled head"
        assert get(f"http://127.0.0.1:{server.server_port}/healthz")[0] == 503   # still serving
    finally:
        server.shutdown()
        server.server_close()


def test_a_browser_and_a_local_scrape_fit_in_one_address_slots(harness):
    """A browser keeps up to 6 connections to one host open between page loads (Chromium's
    pool): with 4 per address, the seventh request from this machine was closed unanswered."""
    monitor = harness.monitor()
    monitor.step()
    server = start_metrics_server(monitor, 0, max_age=60,
                                  console=Console(monitor.status, monitor.settings))
    idle = []
    try:
        for _ in range(6):                     # idle keep-alive connections, as a browser leaves them
            sock = socket.create_connection(("127.0.0.1", server.server_port), timeout=5)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(12).startswith(b"HTTP/1.1")
            idle.append(sock)
        status, body = get(f"http://127.0.0.1:{server.server_port}/metrics")
        assert status == 200 and b"bemsoft_checkpoint" in body
    finally:
        for sock in idle:
            sock.close()
        server.shutdown()
        server.server_close()


def test_admission_keeps_slots_for_this_machine():
    admission = Admission(total=6, per_client=2, reserved=2)
    remote = [f"203.0.113.{n}" for n in range(10)]
    admitted = [host for host in remote for _ in range(2) if admission.admit(host)]
    assert admitted == [remote[0]] * 2 + [remote[1]] * 2   # 2 per address, 4 from elsewhere
    assert not admission.admit("198.51.100.7")
    assert admission.admit("127.0.0.1") and admission.admit("::1")   # the 2 kept slots
    assert not admission.admit("127.0.0.2")                          # all 6 taken
    admission.release(remote[0])
    assert admission.admit("198.51.100.7")           # a freed remote slot goes to anyone
    admission.release("::1")
    assert not admission.admit("198.51.100.8")       # a freed kept slot only to loopback
    assert admission.admit("127.0.0.1")
    one = Admission(total=10, per_client=3, reserved=0)
    assert [one.admit("10.0.0.5") for _ in range(4)] == [True, True, True, False]
    assert one.admit("10.0.0.6")


def test_client_host_reads_ipv4_behind_a_dual_stack_socket():
    assert client_host(("::ffff:10.0.0.5", 5000, 0, 0)) == "10.0.0.5"
    assert client_host(("::ffff:127.0.0.1", 5000, 0, 0)) == "127.0.0.1"
    assert client_host(("::1", 5000, 0, 0)) == "::1"
    assert client_host(("127.0.0.1", 5000)) == "127.0.0.1"


def test_metrics_and_health_details_need_the_token_off_loopback(harness):
    """`require_token` is what METRICS_HOST off loopback means (every 127.0.0.0/8 address is
    loopback, and the tests bind nothing else)."""
    monitor = harness.monitor(STATUS_TOKEN=STATUS_TOKEN)
    monitor.step()
    server = start_metrics_server(monitor, 0, max_age=60, require_token=True)
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        status, body = get(base + "/metrics")
        assert status == 401 and b"X-Status-Token" in body and b"bemsoft_" not in body
        assert get(base + "/metrics?token=errado")[0] == 401
        for headers in ({"X-Status-Token": STATUS_TOKEN},
                        {"Authorization": f"Bearer {STATUS_TOKEN}"}):
            status, body = get(base + "/metrics", **headers)
            assert status == 200 and b"bemsoft_checkpoint" in body
        assert get(base + f"/metrics?token={STATUS_TOKEN}")[0] == 200
        status, body = get(base + "/healthz")
        assert (status, json.loads(body)) == (200, {"status": "ok"})   # up or down, no more
        status, body = get(base + "/healthz", **{"X-Status-Token": STATUS_TOKEN})
        assert status == 200 and "checkpoint" in json.loads(body)
    finally:
        server.shutdown()
        server.server_close()
    local = start_metrics_server(monitor, 0, max_age=60)          # loopback: open, as before
    try:
        base = f"http://127.0.0.1:{local.server_port}"
        assert get(base + "/metrics")[0] == 200
        assert "checkpoint" in json.loads(get(base + "/healthz")[1])
    finally:
        local.shutdown()
        local.server_close()
