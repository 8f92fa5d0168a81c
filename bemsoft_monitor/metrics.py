"""METRICS_PORT: a Prometheus endpoint (`/metrics`) and `/healthz` for the running monitor,
and the operator console at `/`.

Values are read from the monitor at scrape time (a custom collector), so the loop does no
extra work for them; the backlog is one count query, cached for a while. The server is
exposed to whoever reaches the port: every request has a total deadline, connections are
admitted per client address with slots kept for this machine, and off loopback nothing but
up/down is said without STATUS_TOKEN."""
from __future__ import annotations

import collections
import io
import ipaddress
import json
import logging
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .config import is_loopback

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BACKLOG_CACHE_SECONDS = 30.0
DENIED = ("Acesso negado: informe o STATUS_TOKEN no cabeçalho X-Status-Token ou Authorization: "
          "Bearer (um ?token= no endereço também vale, mas fica no histórico do navegador e nos "
          "logs de proxies).\n").encode("utf-8")


class LatencyHistogram:
    """API latency observations, shared between sender threads and the collector."""

    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.total = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            index = next((i for i, b in enumerate(self.buckets) if seconds <= b), len(self.buckets))
            self.counts[index] += 1
            self.total += seconds

    def snapshot(self):
        with self._lock:
            cumulative, running = [], 0
            for bound, count in zip(self.buckets + (float("inf"),), self.counts):
                running += count
                cumulative.append((str(bound) if bound != float("inf") else "+Inf", running))
            return cumulative, self.total


class MonitorCollector:
    def __init__(self, monitor):
        self.monitor = monitor
        self._backlog = (0.0, None)

    def backlog(self):
        at, value = self._backlog
        if value is None or time.monotonic() - at > BACKLOG_CACHE_SECONDS:
            try:
                value = self.monitor.source.count_backlog(self.monitor.checkpoint or 0)
            except Exception as err:  # the database may be down: report NaN, not a crash
                log.debug("backlog indisponível: %s", err)
                value = float("nan")
            self._backlog = (time.monotonic(), value)
        return value

    def collect(self):
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)
        stats = self.monitor.stats
        yield CounterMetricFamily("bemsoft_delivered", "Solicitações entregues à Bemsoft",
                                  value=stats.delivered)
        yield CounterMetricFamily("bemsoft_delivered_items", "Itens (exames) entregues",
                                  value=stats.delivered_items)
        yield CounterMetricFamily("bemsoft_failed", "Solicitações gravadas em FAILED_DIR",
                                  value=stats.failed)
        yield CounterMetricFamily("bemsoft_transient_failures",
                                  "Envios com falha transitória (serão repetidos)",
                                  value=stats.transient)
        yield GaugeMetricFamily("bemsoft_backlog_items", "Itens além do checkpoint",
                                value=self.backlog())
        yield GaugeMetricFamily("bemsoft_checkpoint", "Último CodItemSol com resultado registrado",
                                value=self.monitor.checkpoint or 0)
        yield GaugeMetricFamily("bemsoft_last_success_timestamp_seconds",
                                "Hora (Unix) da última entrega", value=stats.last_delivery or 0)
        yield GaugeMetricFamily("bemsoft_last_cycle_timestamp_seconds",
                                "Hora (Unix) do último ciclo concluído",
                                value=self.monitor.last_cycle_at or 0)
        buckets, total = self.monitor.latency.snapshot()
        yield HistogramMetricFamily("bemsoft_api_latency_seconds", "Latência de POST /requests",
                                    buckets=buckets, sum_value=total)


def health(monitor, max_age: float, detailed: bool = True) -> tuple[int, dict]:
    """200 or 503 and, for a caller allowed to see more, the age of the last cycle and the
    checkpoint; anyone else learns only up or down."""
    last = monitor.last_cycle_at
    age = None if last is None else time.time() - last
    ok = age is not None and age <= max_age
    data = {"status": "ok" if ok else "parado"}
    if detailed:
        data.update(ultimo_ciclo_ha_segundos=None if age is None else round(age, 1),
                    limite_segundos=max_age, checkpoint=monitor.checkpoint)
    return (200 if ok else 503), data


def client_host(address) -> str:
    """The client's IP as text; an IPv4 client of a dual-stack socket (`::ffff:10.0.0.5`)
    as its IPv4 address."""
    try:
        ip = ipaddress.ip_address(str(address[0]).split("%", 1)[0])
    except ValueError:
        return str(address[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


class Admission:
    """Who may hold one of the server's connections: `total` at most, `per_client` at most
    from one address, and clients from elsewhere never more than `total - reserved`, so that
    neither one busy client nor many can shut out a Prometheus or an operator on this
    machine (loopback)."""

    def __init__(self, total: int, per_client: int, reserved: int):
        self.total, self.per_client, self.reserved = total, per_client, reserved
        self._held: collections.Counter[str] = collections.Counter()
        self._remote = 0
        self._lock = threading.Lock()

    def admit(self, host: str) -> bool:
        local = is_loopback(host)
        with self._lock:
            if (sum(self._held.values()) >= self.total or self._held[host] >= self.per_client
                    or (not local and self._remote >= self.total - self.reserved)):
                return False
            self._held[host] += 1
            self._remote += not local
            return True

    def release(self, host: str) -> None:
        with self._lock:
            self._held[host] -= 1
            if self._held[host] <= 0:
                del self._held[host]
            self._remote -= not is_loopback(host)


class BoundedHTTPServer(ThreadingHTTPServer):
    """Connections admitted by `admission` get a thread; any other is closed at once (a
    scanner, a stuck client or a slow-loris cannot pile threads up or take every slot)."""
    daemon_threads = True

    def __init__(self, address, handler, admission: Admission):
        self.admission = admission
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        host = client_host(client_address)
        if not self.admission.admit(host):
            log.debug("metrics: conexões demais; %s recusado.", host)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.admission.release(host)
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.admission.release(client_host(client_address))

    def handle_error(self, request, client_address):
        """Through the log (redacted), never as a raw traceback on stderr."""
        err = sys.exc_info()[1]
        if isinstance(err, OSError):  # the client vanished or ran out of time
            log.debug("metrics: conexão com %s encerrada: %s", client_host(client_address), err)
        else:
            log.warning("metrics: erro ao atender %s", client_host(client_address), exc_info=True)


class _DeadlineSocket(io.RawIOBase):
    """The connection's reads and writes, each with the time left to the request's deadline
    as its timeout: a client sending (or reading) one byte at a time still runs out of time
    at the deadline, not after one timeout per byte."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.deadline = float("inf")

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self._arm()
        return self.sock.recv_into(buffer)

    def write(self, data) -> int:
        self._arm()
        self.sock.sendall(data)
        return len(data)

    def _arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("prazo do pedido esgotado")
        self.sock.settimeout(left)


def start_metrics_server(monitor, port: int, max_age: float, host: str = "127.0.0.1", *,
                         console=None, request_timeout: float = 10.0, max_connections: int = 16,
                         per_client: int = 8, reserved_for_loopback: int = 2,
                         require_token: bool | None = None):
    """Serve /metrics and /healthz (and, given a `console`, the operator page at /) in a
    daemon thread; returns the server (call shutdown()).

    Each request, from waiting for its first byte to the last byte of its answer, has
    `request_timeout` seconds in all; connections are admitted per `Admission`. Off loopback
    (`require_token`, by default whether `host` is), /metrics asks for STATUS_TOKEN like the
    page, and /healthz says only up or down to a caller without it. The query string (where
    `?token=` goes) is never logged."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    from .console import authorized

    registry = CollectorRegistry(auto_describe=False)
    registry.register(MonitorCollector(monitor))
    token = monitor.settings.status_token
    protected = not is_loopback(host) if require_token is None else require_token

    def allowed(headers, query: str) -> bool:
        return not protected or (bool(token) and authorized(token, headers, query))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        default_request_version = "HTTP/1.0"  # a malformed request gets a status line too

        def setup(self):
            self.connection = self.request
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
            self.io = _DeadlineSocket(self.connection)
            self.rfile = io.BufferedReader(self.io)
            self.wfile = io.BufferedWriter(self.io, 64 * 1024)

        def handle_one_request(self):
            self.io.deadline = time.monotonic() + request_timeout
            super().handle_one_request()

        def do_GET(self):
            path, _, query = self.path.partition("?")
            headers = {}
            if path == "/" and console is not None:
                if console.authorized(self.headers, query):
                    try:
                        status, body = 200, console.render(query).encode("utf-8")
                    except Exception:  # a bug costs this page load, never the monitor
                        log.exception("Erro ao montar o painel")
                        status, body = 500, "Erro ao montar o painel; veja o log.\n".encode("utf-8")
                    headers["Cache-Control"] = "no-store"
                else:
                    status, body = 401, DENIED
                    headers["WWW-Authenticate"] = 'Bearer realm="bemsoft-monitor"'
                ctype = "text/html; charset=utf-8" if status == 200 else "text/plain; charset=utf-8"
            elif path == "/metrics":
                if allowed(self.headers, query):
                    status, body, ctype = 200, generate_latest(registry), CONTENT_TYPE_LATEST
                else:
                    status, body, ctype = 401, DENIED, "text/plain; charset=utf-8"
                    headers["WWW-Authenticate"] = 'Bearer realm="bemsoft-monitor"'
            elif path == "/healthz":
                status, data = health(monitor, max_age, detailed=allowed(self.headers, query))
                body, ctype = json.dumps(data, ensure_ascii=False).encode(), "application/json"
            else:
                status, body, ctype = 404, b"not found\n", "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def send_error(self, code, message=None, explain=None):
            # the standard text repeats the request line (and its ?token=) back and into the
            # log: the status alone says enough
            super().send_error(code)

        def log_request(self, code="-", size="-"):
            # the path only: a ?token= must not reach the log; a malformed request has none
            path = getattr(self, "path", None)
            path = "(pedido malformado)" if path is None else path.partition("?")[0]
            log.debug("metrics: %s %s %s", self.command or "-", path, code)

        def log_message(self, fmt, *args):
            log.debug("metrics: " + fmt, *args)

    class Server(BoundedHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET  # METRICS_HOST=::1

    server = Server((host, port), Handler,
                    Admission(max_connections, per_client, reserved_for_loopback))
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("Métricas em http://%s:%d/metrics e saúde em /healthz%s.", host, server.server_port,
             "; painel em /" if console is not None else "")
    return server

