"""METRICS_PORT: a Prometheus endpoint (`/metrics`) and `/healthz` for the running monitor.

Values are read from the monitor at scrape time (a custom collector), so the loop does no
extra work for them; the backlog is one count query, cached for a while."""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BACKLOG_CACHE_SECONDS = 30.0


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


def health(monitor, max_age: float) -> tuple[int, dict]:
    last = monitor.last_cycle_at
    age = None if last is None else time.time() - last
    ok = age is not None and age <= max_age
    return (200 if ok else 503), {"status": "ok" if ok else "parado",
                                  "ultimo_ciclo_ha_segundos": None if age is None else round(age, 1),
                                  "limite_segundos": max_age, "checkpoint": monitor.checkpoint}


class BoundedHTTPServer(ThreadingHTTPServer):
    """At most `max_connections` connections served at once; one more is closed at once
    instead of getting a thread (a scanner or a stuck client cannot pile threads up)."""
    daemon_threads = True

    def __init__(self, address, handler, max_connections: int):
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            log.debug("metrics: conexões demais; %s recusado.", client_address)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def start_metrics_server(monitor, port: int, max_age: float, host: str = "127.0.0.1", *,
                         console=None, connection_timeout: float = 10.0, max_connections: int = 8):
    """Serve /metrics and /healthz (and, given a `console`, the operator page at /) in a
    daemon thread; returns the server (call shutdown()). Each connection is dropped after
    `connection_timeout` seconds without a request."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    registry = CollectorRegistry(auto_describe=False)
    registry.register(MonitorCollector(monitor))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        wbufsize = 64 * 1024
        timeout = connection_timeout

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
                    status, body = 401, ("Acesso negado: informe o STATUS_TOKEN (cabeçalho "
                                         "X-Status-Token ou ?token=).\n").encode("utf-8")
                    headers["WWW-Authenticate"] = 'Bearer realm="bemsoft-monitor"'
                ctype = "text/html; charset=utf-8" if status == 200 else "text/plain; charset=utf-8"
            elif path == "/metrics":
                status, body, ctype = 200, generate_latest(registry), CONTENT_TYPE_LATEST
            elif path == "/healthz":
                status, data = health(monitor, max_age)
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

        def log_request(self, code="-", size="-"):
            # the path only: a ?token= must not reach the log
            log.debug("metrics: %s %s %s", self.command, self.path.partition("?")[0], code)

        def log_message(self, fmt, *args):
            log.debug("metrics: " + fmt, *args)

    class Server(BoundedHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET  # METRICS_HOST=::1

    server = Server((host, port), Handler, max_connections)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("Métricas em http://%s:%d/metrics e saúde em /healthz%s.", host, server.server_port,
             "; painel em /" if console is not None else "")
    return server
