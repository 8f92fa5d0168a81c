"""A fake Bemsoft / WiseLab API for tests and benchmarks (loopback only).

It reproduces the production behaviour described in SPEC.md §3-§5:

* ``GET /tests`` answers the catalog (Bearer token required);
* ``POST /requests`` checks, in this order: token (401), ``Idempotency-Key`` present (400),
  key already seen (409 — the key is remembered even when the first attempt then failed in
  its body), payload shape (400 with ``{"errors": [...]}``), external ids not longer than
  ``max_external_id`` (201 with an ``error`` body, nothing stored), and finally stores the
  tests under ``batch.externalId`` (201). A test whose ``collectionDate`` is later than its
  batch's ``date`` is silently not stored. A later request with the same batch externalId
  and a new key adds its tests to that batch.

It also receives alerts, as a lab's chat and uptime services would: ``POST /webhook/<any>``
records the JSON body (``webhooks``) and ``GET /ping/<any>`` a heartbeat (``heartbeats``);
``hook_status`` makes both answer another status (a webhook that is down).

Faults can be injected at run time, in-process (``fail_next``, ``drop_next``,
``timeout_next``, ``fault_rate``, ``set_latency``) or over HTTP through the control
endpoints ``GET /_fake/state``, ``POST /_fake/faults`` and ``POST /_fake/reset`` when the
fake runs in another process (``python -m bemsoft_monitor.testing.fakeapi --port 8099``).

Only the standard library is used. The server binds to 127.0.0.1 and nothing else.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import itertools
import json
import logging
import random
import re
import signal
import socket
import ssl
import sys
import threading
import time
from collections import Counter, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterable
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
MAX_BODY = 16 * 1024 * 1024

DEFAULT_CATALOG: list[dict[str, Any]] = [
    {"id": "GLI", "name": "GLICOSE", "specimen": {"id": "SORO", "name": "Soro"}},
    {"id": "HEMO", "name": "HEMOGRAMA", "specimen": {"id": "SANGUE", "name": "Sangue total"}},
    {"id": "FE", "name": "FERRO SERICO", "specimen": {"id": "SORO", "name": "Soro"}},
    {"id": "FE", "name": "FERRO SERICO", "specimen": {"id": "PLASMA", "name": "Plasma"}},
    {"id": "TSH", "name": "TSH - HORMONIO TIREOESTIMULANTE",
     "specimen": {"id": "SORO", "name": "Soro"}},
    {"id": "URINA1", "name": "URINA TIPO 1", "specimen": {"id": "URINA", "name": "Urina"}},
    {"id": "CREA", "name": "CREATININA", "specimen": {"id": "SORO", "name": "Soro"}},
    {"id": "UREIA", "name": "UREIA", "specimen": {"id": "SORO", "name": "Soro"}},
]

DEFAULT_FAULT_STATUSES = (500, 502, 503, 504)

_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_TIME_RE = re.compile(r"^([01]\d|2[0-3]):[0-5]\d:[0-5]\d$")


# --------------------------------------------------------------------------- validation

def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _valid_date(v: Any) -> bool:
    if not isinstance(v, str) or not _DATE_RE.match(v):
        return False
    try:
        dt.date.fromisoformat(v)
    except ValueError:
        return False
    return True


def _valid_time(v: Any) -> bool:
    return isinstance(v, str) and bool(_TIME_RE.match(v))


class _Checker:
    """Collects validation problems as ``"path: message"`` strings."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def obj(self, parent: dict, key: str, path: str, required: bool = True) -> dict | None:
        if key not in parent:
            if required:
                self.errors.append(f"{path}: campo obrigatório ausente")
            return None
        value = parent[key]
        if not isinstance(value, dict):
            self.errors.append(f"{path}: deve ser um objeto")
            return None
        return value

    def field(self, parent: dict, key: str, path: str, kind: str) -> None:
        if key not in parent:
            self.errors.append(f"{path}: campo obrigatório ausente")
            return
        v = parent[key]
        if kind == "str":
            ok, what = isinstance(v, str), "texto"
        elif kind == "nonempty":
            ok, what = isinstance(v, str) and bool(v.strip()), "texto não vazio"
        elif kind == "id":  # external id: text or integer
            ok = (isinstance(v, str) and bool(v.strip())) or (isinstance(v, int) and not isinstance(v, bool))
            what = "texto não vazio ou número"
        elif kind == "number":
            ok, what = _is_number(v), "número"
        elif kind == "date":
            ok, what = _valid_date(v), "data AAAA-MM-DD"
        elif kind == "time":
            ok, what = _valid_time(v), "hora HH:MM:SS"
        elif kind == "gender":
            ok, what = v in ("M", "F"), '"M" ou "F"'
        elif kind == "scalar":
            ok, what = isinstance(v, str) or _is_number(v), "texto ou número"
        else:  # pragma: no cover - programming error
            raise ValueError(kind)
        if not ok:
            self.errors.append(f"{path}: deve ser {what} (recebido: {v!r:.60})")


def validate_payload(payload: Any) -> list[str]:
    """Return the list of problems with a request body (empty when it is valid)."""
    c = _Checker()
    if not isinstance(payload, dict):
        return ["corpo: deve ser um objeto JSON"]
    batch = c.obj(payload, "batch", "batch")
    if batch is None:
        return c.errors
    c.field(batch, "externalId", "batch.externalId", "nonempty")
    c.field(batch, "date", "batch.date", "date")
    c.field(batch, "time", "batch.time", "time")
    order = c.obj(batch, "order", "batch.order")
    if order is None:
        return c.errors
    p = "batch.order"
    c.field(order, "externalId", f"{p}.externalId", "nonempty")
    c.field(order, "date", f"{p}.date", "date")
    c.field(order, "time", f"{p}.time", "time")
    c.field(order, "patientHeight", f"{p}.patientHeight", "number")
    c.field(order, "patientWeight", f"{p}.patientWeight", "number")
    patient = c.obj(order, "patient", f"{p}.patient")
    if patient is not None:
        pp = f"{p}.patient"
        c.field(patient, "externalId", f"{pp}.externalId", "nonempty")
        c.field(patient, "name", f"{pp}.name", "nonempty")
        c.field(patient, "birthDate", f"{pp}.birthDate", "date")
        c.field(patient, "gender", f"{pp}.gender", "gender")
        c.field(patient, "weight", f"{pp}.weight", "number")
        c.field(patient, "height", f"{pp}.height", "number")
    physician = c.obj(order, "physician", f"{p}.physician", required=False)
    if physician is not None:
        ph = f"{p}.physician"
        c.field(physician, "externalId", f"{ph}.externalId", "id")
        c.field(physician, "name", f"{ph}.name", "nonempty")
        c.field(physician, "councilAbbreviation", f"{ph}.councilAbbreviation", "nonempty")
        c.field(physician, "councilNumber", f"{ph}.councilNumber", "id")
        c.field(physician, "councilUf", f"{ph}.councilUf", "nonempty")
    if "tests" not in order:
        c.errors.append(f"{p}.tests: campo obrigatório ausente")
        return c.errors
    tests = order["tests"]
    if not isinstance(tests, list) or not tests:
        c.errors.append(f"{p}.tests: deve ser uma lista não vazia")
        return c.errors
    for i, t in enumerate(tests):
        tp = f"{p}.tests[{i}]"
        if not isinstance(t, dict):
            c.errors.append(f"{tp}: deve ser um objeto")
            continue
        c.field(t, "externalId", f"{tp}.externalId", "nonempty")
        c.field(t, "collectionDate", f"{tp}.collectionDate", "date")
        c.field(t, "collectionTime", f"{tp}.collectionTime", "time")
        c.field(t, "supportTestId", f"{tp}.supportTestId", "nonempty")
        c.field(t, "supportSpecimenId", f"{tp}.supportSpecimenId", "nonempty")
        c.field(t, "condition", f"{tp}.condition", "str")
        c.field(t, "preservative", f"{tp}.preservative", "str")
        c.field(t, "diuresisVolume", f"{tp}.diuresisVolume", "number")
        c.field(t, "diuresisTime", f"{tp}.diuresisTime", "number")
        infos = t.get("additionalInformations", None)
        if "additionalInformations" not in t:
            c.errors.append(f"{tp}.additionalInformations: campo obrigatório ausente")
        elif not isinstance(infos, list):
            c.errors.append(f"{tp}.additionalInformations: deve ser uma lista")
        else:
            for j, info in enumerate(infos):
                ip = f"{tp}.additionalInformations[{j}]"
                if not isinstance(info, dict):
                    c.errors.append(f"{ip}: deve ser um objeto")
                    continue
                c.field(info, "key", f"{ip}.key", "nonempty")
                c.field(info, "value", f"{ip}.value", "scalar")
    ids = [t.get("externalId") for t in tests if isinstance(t, dict)]
    dup = sorted({x for x in ids if isinstance(x, str) and ids.count(x) > 1})
    if dup:
        c.errors.append(f"{p}.tests: externalId repetido no mesmo pedido: {', '.join(dup)}")
    return c.errors


def _too_long_ids(payload: dict, limit: int) -> list[str]:
    batch = payload["batch"]
    order = batch["order"]
    ids = [batch["externalId"], order["externalId"], order["patient"]["externalId"]]
    ids += [t["externalId"] for t in order["tests"]]
    return [x for x in ids if len(x) > limit]


def _normalize_catalog(catalog: Iterable[Any]) -> list[dict[str, Any]]:
    """Accept API-shaped dicts or ``(id, name, specimen_id[, specimen_name])`` tuples."""
    out: list[dict[str, Any]] = []
    for entry in catalog:
        if isinstance(entry, dict):
            out.append(copy.deepcopy(entry))
        else:
            tid, name, sid, *rest = entry
            out.append({"id": tid, "name": name,
                        "specimen": {"id": sid, "name": rest[0] if rest else sid}})
    return out


# --------------------------------------------------------------------------- HTTP layer

class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, fake: "FakeBemsoft", port: int, tls: ssl.SSLContext | None = None):
        self.fake = fake
        self.tls = tls
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__((HOST, port), _Handler)

    def finish_request(self, request, client_address):  # type: ignore[override]
        """With TLS, the handshake happens here, in the connection's own thread (a slow or
        refusing client never blocks accept)."""
        if self.tls is None:
            return super().finish_request(request, client_address)
        try:
            request.settimeout(10)
            secure = self.tls.wrap_socket(request, server_side=True)
            secure.settimeout(None)
        except (OSError, ssl.SSLError) as exc:
            log.debug("handshake TLS com %s falhou: %r", client_address, exc)
            return
        with self._conns_lock:
            self._conns.discard(request)
            self._conns.add(secure)
        try:
            super().finish_request(secure, client_address)
        finally:
            with self._conns_lock:
                self._conns.discard(secure)
            secure.close()

    def process_request(self, request, client_address):  # type: ignore[override]
        with self._conns_lock:
            self._conns.add(request)
        self.fake._count_connection()
        super().process_request(request, client_address)

    def shutdown_request(self, request):  # type: ignore[override]
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_all_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address):  # type: ignore[override]
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.debug("conexão de %s encerrada: %r", client_address, exc)
        else:
            log.exception("erro inesperado no fake Bemsoft atendendo %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    # Buffered writes: status line, headers and body leave in one packet. Unbuffered, the
    # body goes in a second small segment and the client's delayed ACK adds ~40 ms.
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True
    server_version = "FakeBemsoft/1.0"
    sys_version = ""
    server: _Server

    # -- plumbing --------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s - %s", self.address_string(), format % args)

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        if log.isEnabledFor(logging.DEBUG):
            super().log_request(code, size)

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            total = 0
            while True:
                line = self.rfile.readline(1024)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY:
                    raise ValueError("corpo grande demais")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0 or length > MAX_BODY:
            raise ValueError("Content-Length inválido")
        data = self.rfile.read(length) if length else b""
        if len(data) < length:
            # the client died mid-body: a real server never processes such a request
            raise ConnectionResetError("corpo incompleto: o cliente caiu durante o envio")
        return data

    def _send(self, status: int, body: bytes, content_type: str,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if headers:
            for k, v in headers.items():
                self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8", headers)

    def _path(self) -> str:
        path = urlsplit(self.path).path
        return path.rstrip("/") or "/"

    def _drop(self) -> None:
        """Close the connection without answering."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- methods ---------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802
        self._answer("GET", self._route_get)

    def do_POST(self) -> None:  # noqa: N802
        self._answer("POST", self._route_post)

    def _answer(self, method: str, route) -> None:
        """Run one route; a bug in the fake answers 500 instead of killing the connection."""
        path = self._path()
        try:
            route(self.server.fake, path)
        except (ConnectionError, TimeoutError):
            raise
        except Exception:  # noqa: BLE001 - a fake must answer, not die
            log.exception("erro no fake Bemsoft (%s %s)", method, path)
            self.close_connection = True
            self._send_json(500, {"error": "erro interno do fake"})

    def _route_get(self, fake: "FakeBemsoft", path: str) -> None:
        if path == "/_fake/state":
            self._send_json(200, fake.state())
        elif path.startswith("/ping/"):
            self._send_json(fake._hook("heartbeats", path, None), {"ok": True})
        elif path.endswith("/tests"):
            status, obj = fake._handle_tests(self.headers.get("Authorization"))
            if status == 0:
                self._drop()
            else:
                self._send_json(status, obj)
        else:
            self._send_json(404, {"error": f"rota não encontrada: GET {path}"})

    def _route_post(self, fake: "FakeBemsoft", path: str) -> None:
        try:
            raw = self._read_body()
        except ValueError as exc:
            self.close_connection = True
            self._send_json(413 if "grande" in str(exc) else 400, {"error": str(exc)})
            return
        if path.startswith("/_fake/"):
            status, obj = fake._handle_control(path, raw)
            self._send_json(status, obj)
        elif path.startswith("/webhook/"):
            try:
                body = json.loads(raw)
            except ValueError:
                self._send_json(400, {"error": "corpo não é JSON"})
                return
            self._send_json(fake._hook("webhooks", path, body), {"ok": True})
        elif path == fake.endpoint or path.endswith(fake.endpoint):
            self._post_requests(fake, raw)
        else:
            self._send_json(404, {"error": f"rota não encontrada: POST {path}"})

    def _post_requests(self, fake: "FakeBemsoft", raw: bytes) -> None:
        fake._wait_while_held()
        result = fake._handle_post(self.headers, raw)
        if result.drop:
            self._drop()
            return
        if result.delay > 0:
            fake._sleep(result.delay)
        if result.raw_body is not None:
            self._send(result.status, result.raw_body, result.content_type, result.headers)
        else:
            self._send_json(result.status, result.body, result.headers)


class _Result:
    __slots__ = ("status", "body", "raw_body", "content_type", "headers", "drop", "delay")

    def __init__(self, status: int = 0, body: Any = None, headers: dict[str, str] | None = None,
                 drop: bool = False, delay: float = 0.0, raw_body: bytes | None = None,
                 content_type: str = "application/json; charset=utf-8"):
        self.status = status
        self.body = body
        self.headers = headers
        self.drop = drop
        self.delay = delay
        self.raw_body = raw_body
        self.content_type = content_type


def _redact(headers: Any) -> dict[str, str]:
    out = {}
    for k, v in headers.items():
        out[k] = "Bearer ***" if k.lower() == "authorization" else v
    return out


# --------------------------------------------------------------------------- the fake

class FakeBemsoft:
    """The fake API. Use as a context manager or call ``start()`` / ``stop()``."""

    def __init__(self, token: str = "test-token", catalog: list[Any] | None = None,
                 port: int = 0, latency: float = 0.0, max_external_id: int = 20,
                 endpoint: str = "/requests", keep_requests: int | None = None,
                 tls: ssl.SSLContext | None = None, host_name: str = HOST):
        """``tls``: serve HTTPS with this server context; ``host_name``: the name in
        ``url`` (it still listens on 127.0.0.1 only; a test proxy can resolve the name)."""
        self.token = token
        self.refusal_status = 401   # what a wrong token gets (some gateways answer 403)
        self.host_name = host_name
        self.endpoint = "/" + endpoint.strip("/")
        self.max_external_id = max_external_id
        self._initial_catalog = _normalize_catalog(catalog if catalog is not None else DEFAULT_CATALOG)
        self._initial_latency = float(latency)
        self._keep_requests = keep_requests
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._released.set()
        self.post_held = threading.Event()
        self.posts_held = 0          # POSTs waiting right now for release_posts()
        self._stopping = threading.Event()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._reset_locked()
        self._server = _Server(self, port, tls)

    # -- lifecycle -------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        scheme = "https" if self._server.tls is not None else "http"
        return f"{scheme}://{self.host_name}:{self.port}"

    def start(self) -> "FakeBemsoft":
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._server.serve_forever,
                                            kwargs={"poll_interval": 0.02},
                                            name=f"fake-bemsoft-{self.port}", daemon=True)
            self._thread.start()
            log.debug("fake Bemsoft ouvindo em %s", self.url)
        return self

    def stop(self) -> None:
        self._stopping.set()  # wake handlers sleeping on latency/timeout faults
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.close_all_connections()
        self._server.server_close()

    def __enter__(self) -> "FakeBemsoft":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)

    # -- state -----------------------------------------------------------------------
    def _reset_locked(self) -> None:
        self._catalog = copy.deepcopy(self._initial_catalog)
        self.latency = self._initial_latency
        self.tests_calls = 0
        self.connections = 0
        self._keys_seen: set[str] = set()
        self._keys_order: list[str] = []
        self._requests: deque[dict[str, Any]] | list[dict[str, Any]] = (
            deque(maxlen=self._keep_requests) if self._keep_requests else [])
        self._stored: list[dict[str, Any]] = []
        self._batches: dict[str, dict[str, Any]] = {}
        self._status_counts: Counter[str] = Counter()
        self._posts = 0
        # faults
        self._fail_n = 0
        self._fail_status = 503
        self._fail_retry_after: str | None = None
        self._fail_body: Any = None
        self._drop_n = 0
        self._timeout_n = 0
        self._timeout_s = 0.0
        self._fault_rate = 0.0
        self._fault_statuses: tuple[int, ...] = DEFAULT_FAULT_STATUSES
        self._rng = random.Random()
        self._tests_fail_n = 0
        self._tests_fail_status = 503
        self.webhooks: list[dict[str, Any]] = []     # bodies POSTed to /webhook/...
        self.heartbeats: list[dict[str, Any]] = []   # GETs of /ping/...
        self.hook_status = 200

    def reset(self) -> None:
        """Forget everything stored and seen, clear faults, restore the initial catalog and
        latency (the constructor's values)."""
        with self._lock:
            self._reset_locked()

    def set_catalog(self, catalog: list[Any]) -> None:
        """Replace the catalog answered by ``GET /tests``."""
        normalized = _normalize_catalog(catalog)
        with self._lock:
            self._catalog = normalized

    @property
    def catalog(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._catalog)

    # -- faults ----------------------------------------------------------------------
    def hold_posts(self) -> threading.Event:
        """Every ``POST /requests`` waits, before it is handled, until ``release_posts()``;
        the returned event is set once one is waiting (tests look at the world mid-POST)."""
        self._released.clear()
        self.post_held.clear()
        return self.post_held

    def release_posts(self) -> None:
        self._released.set()

    def _wait_while_held(self) -> None:
        if not self._released.is_set():
            with self._lock:
                self.posts_held += 1
            self.post_held.set()
            while not self._released.wait(0.05) and not self._stopping.is_set():
                pass
            with self._lock:
                self.posts_held -= 1

    def set_latency(self, seconds: float) -> None:
        """Sleep this long before handling each ``POST /requests`` (no lock held)."""
        self.latency = max(0.0, float(seconds))

    def fail_next(self, n: int, status: int = 503, retry_after: int | float | str | None = None,
                  body: Any = None) -> None:
        """The next ``n`` POSTs answer ``status`` (with ``Retry-After`` when given) without
        looking at the request; their keys are not remembered. ``body``: dict/list (JSON),
        str/bytes (sent as is, text/plain) or None (a default JSON error)."""
        with self._lock:
            self._fail_n = int(n)
            self._fail_status = int(status)
            self._fail_retry_after = None if retry_after is None else str(retry_after)
            self._fail_body = body

    def drop_next(self, n: int) -> None:
        """The next ``n`` POSTs are read and then the connection is closed without an
        answer; nothing is processed and their keys are not remembered."""
        with self._lock:
            self._drop_n = int(n)

    def timeout_next(self, n: int, seconds: float) -> None:
        """The next ``n`` POSTs are processed normally (stored, key remembered) but the
        answer is delayed by ``seconds`` — as when a response is lost to a client timeout."""
        with self._lock:
            self._timeout_n = int(n)
            self._timeout_s = float(seconds)

    def fault_rate(self, rate: float, statuses: Iterable[int] = DEFAULT_FAULT_STATUSES,
                   seed: int | None = None) -> None:
        """Each POST fails with probability ``rate`` with a status drawn from ``statuses``
        (like ``fail_next``: nothing processed, key not remembered)."""
        with self._lock:
            self._fault_rate = float(rate)
            self._fault_statuses = tuple(int(s) for s in statuses) or DEFAULT_FAULT_STATUSES
            self._rng = random.Random(seed)

    def fail_tests_next(self, n: int, status: int = 503) -> None:
        """The next ``n`` ``GET /tests`` answer ``status`` (``status=0``: drop the
        connection), to test catalog refresh failures."""
        with self._lock:
            self._tests_fail_n = int(n)
            self._tests_fail_status = int(status)

    def clear_faults(self) -> None:
        """Cancel pending fail/drop/timeout faults and the fault rate (latency unchanged)."""
        with self._lock:
            self._fail_n = self._drop_n = self._timeout_n = self._tests_fail_n = 0
            self._fault_rate = 0.0

    # -- inspection ------------------------------------------------------------------
    @property
    def requests(self) -> list[dict[str, Any]]:
        """Every ``POST /requests`` received: key, status (None when dropped), body (parsed
        JSON or None), headers (Authorization redacted), time, fault."""
        with self._lock:
            return list(self._requests)

    @property
    def keys(self) -> list[str]:
        """Idempotency keys remembered, in the order first seen."""
        with self._lock:
            return list(self._keys_order)

    def stored_tests(self) -> list[str]:
        """External ids of the stored tests in arrival order (duplicates visible)."""
        with self._lock:
            return [t["externalId"] for t in self._stored]

    def stored_test_records(self) -> list[dict[str, Any]]:
        """Stored tests: externalId, supportTestId, supportSpecimenId, key, batchExternalId,
        batchDate, collectionDate."""
        with self._lock:
            return [dict(t) for t in self._stored]

    def stored_batches(self) -> dict[str, dict[str, Any]]:
        """batch externalId → {externalId, date, time, order, patient, patientName,
        tests (ids), keys, requests}."""
        with self._lock:
            return {k: {**v, "tests": list(v["tests"]), "keys": list(v["keys"])}
                    for k, v in self._batches.items()}

    def status_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._status_counts)

    def state(self) -> dict[str, Any]:
        """What ``GET /_fake/state`` answers."""
        with self._lock:
            counts = Counter(t["externalId"] for t in self._stored)
            return {
                "tests": dict(counts),
                "stored_tests_total": len(self._stored),
                "duplicates": sorted(k for k, v in counts.items() if v > 1),
                "batches": len(self._batches),
                "posts": self._posts,
                "posts_by_status": dict(self._status_counts),
                "keys": len(self._keys_seen),
                "tests_calls": self.tests_calls,
                "connections": self.connections,
                "latency": self.latency,
                "faults": {
                    "fail_next": self._fail_n, "drop_next": self._drop_n,
                    "timeout_next": self._timeout_n, "fault_rate": self._fault_rate,
                    "fail_tests_next": self._tests_fail_n,
                },
            }

    # -- request handling (called from handler threads) ----------------------------
    def _hook(self, kind: str, path: str, body: Any) -> int:
        with self._lock:
            if self.hook_status < 300:
                getattr(self, kind).append({"path": path, "body": body, "time": time.time()})
            return self.hook_status

    def _count_connection(self) -> None:
        with self._lock:
            self.connections += 1

    def _handle_tests(self, auth: str | None) -> tuple[int, Any]:
        with self._lock:
            self.tests_calls += 1
            if self._tests_fail_n > 0:
                self._tests_fail_n -= 1
                status = self._tests_fail_status
                return status, {"error": f"falha simulada ({status})"}
            if auth != f"Bearer {self.token}":
                return self.refusal_status, {"error": "token inválido"}
            return 200, {"tests": copy.deepcopy(self._catalog)}

    def _record(self, key: str | None, status: int | None, body: Any, headers: Any,
                fault: str | None = None) -> None:
        # caller holds the lock
        self._posts += 1
        self._status_counts["dropped" if status is None else str(status)] += 1
        self._requests.append({"key": key, "status": status, "body": body,
                               "headers": _redact(headers), "time": time.time(),
                               "fault": fault})

    def _take_fault(self) -> tuple[str, Any] | None:
        # caller holds the lock
        if self._drop_n > 0:
            self._drop_n -= 1
            return "drop", None
        if self._fail_n > 0:
            self._fail_n -= 1
            return "fail", (self._fail_status, self._fail_retry_after, self._fail_body)
        if self._fault_rate > 0 and self._rng.random() < self._fault_rate:
            return "fail", (self._rng.choice(self._fault_statuses), None, None)
        if self._timeout_n > 0:
            self._timeout_n -= 1
            return "timeout", self._timeout_s
        return None

    def _handle_post(self, headers: Any, raw: bytes) -> _Result:
        latency = self.latency
        if latency > 0:
            self._sleep(latency)
        key = (headers.get("Idempotency-Key") or "").strip() or None

        # Parse and validate before taking the lock (pure work, runs in parallel).
        try:
            payload = json.loads(raw) if raw else None
            errors = validate_payload(payload) if raw else ["corpo vazio"]
        except (ValueError, UnicodeDecodeError) as exc:
            payload = None
            errors = [f"corpo não é JSON válido: {exc}"]
        token_ok = headers.get("Authorization") == f"Bearer {self.token}"

        with self._lock:
            fault = self._take_fault()
            delay = 0.0
            if fault is not None:
                kind, arg = fault
                if kind == "drop":
                    self._record(key, None, payload, headers, "drop")
                    return _Result(drop=True)
                if kind == "fail":
                    status, retry_after, body = arg
                    self._record(key, status, payload, headers, "fail")
                    hdrs = {"Retry-After": retry_after} if retry_after is not None else None
                    if body is None:
                        return _Result(status, {"error": f"falha simulada ({status})"}, hdrs)
                    if isinstance(body, (bytes, str)):
                        raw_body = body.encode("utf-8") if isinstance(body, str) else body
                        return _Result(status, headers=hdrs, raw_body=raw_body,
                                       content_type="text/plain; charset=utf-8")
                    return _Result(status, body, hdrs)
                delay = arg  # timeout: process normally, answer late

            if not token_ok:
                self._record(key, self.refusal_status, payload, headers)
                return _Result(self.refusal_status, {"error": "token inválido"}, delay=delay)
            if key is None:
                self._record(key, 400, payload, headers)
                return _Result(400, {"error": "cabeçalho Idempotency-Key ausente"}, delay=delay)
            if key in self._keys_seen:
                self._record(key, 409, payload, headers)
                return _Result(409, {"error": "Idempotency-Key já utilizada"}, delay=delay)
            self._keys_seen.add(key)
            self._keys_order.append(key)
            if errors:
                self._record(key, 400, payload, headers)
                return _Result(400, {"errors": errors}, delay=delay)

            batch = payload["batch"]
            batch_id = batch["externalId"]
            if _too_long_ids(payload, self.max_external_id):
                self._record(key, 201, payload, headers)
                return _Result(201, {"error": "Não foi possível salvar os dados recebidos "
                                              f"no lote {batch_id}."}, delay=delay)

            order = batch["order"]
            info = self._batches.get(batch_id)
            if info is None:
                info = {"externalId": batch_id, "date": batch["date"], "time": batch["time"],
                        "order": order["externalId"],
                        "patient": order["patient"]["externalId"],
                        "patientName": order["patient"]["name"],
                        "tests": [], "keys": [], "requests": 0}
                self._batches[batch_id] = info
            info["keys"].append(key)
            info["requests"] += 1
            batch_date = batch["date"]
            for t in order["tests"]:
                # SPEC §5.5: a test dated after its batch is accepted but not stored.
                if t["collectionDate"] > batch_date:
                    log.debug("fake: teste %s descartado (coleta %s > lote %s)",
                              t["externalId"], t["collectionDate"], batch_date)
                    continue
                self._stored.append({
                    "externalId": t["externalId"], "supportTestId": t["supportTestId"],
                    "supportSpecimenId": t["supportSpecimenId"], "key": key,
                    "batchExternalId": batch_id, "batchDate": batch_date,
                    "collectionDate": t["collectionDate"]})
                info["tests"].append(t["externalId"])
            self._record(key, 201, payload, headers)
            return _Result(201, {"id": f"fake-{next(self._ids):08d}", "status": "received"},
                           delay=delay)

    def _handle_control(self, path: str, raw: bytes) -> tuple[int, Any]:
        if path == "/_fake/reset":
            self.reset()
            return 200, {"ok": True}
        if path == "/_fake/faults":
            try:
                opts = json.loads(raw) if raw else {}
                if not isinstance(opts, dict):
                    raise ValueError("o corpo deve ser um objeto JSON")
                self.apply_faults(opts)
            except (ValueError, TypeError, KeyError) as exc:
                return 400, {"error": f"opções de falha inválidas: {exc}"}
            return 200, self.state()
        return 404, {"error": f"rota de controle desconhecida: {path}"}

    def apply_faults(self, opts: dict[str, Any]) -> None:
        """Apply the options of ``POST /_fake/faults``:

        ``{"fail_next": {"n": 2, "status": 503, "retry_after": 1, "body": {...}},``
        `` "drop_next": 1, "timeout_next": {"n": 1, "seconds": 5}, "latency": 0.02,``
        `` "fault_rate": {"rate": 0.01, "statuses": [500, 503], "seed": 7},``
        `` "fail_tests_next": {"n": 1, "status": 503}, "catalog": [...], "clear": true}``

        Integers are accepted for ``fail_next``/``timeout_next``/``fail_tests_next`` (the
        count, defaults for the rest) and a number for ``fault_rate``.
        """
        known = {"fail_next", "drop_next", "timeout_next", "latency", "fault_rate",
                 "fail_tests_next", "catalog", "clear"}
        unknown = set(opts) - known
        if unknown:
            raise ValueError(f"opções desconhecidas: {', '.join(sorted(unknown))}")
        if opts.get("clear"):
            self.clear_faults()
        if "fail_next" in opts:
            v = opts["fail_next"]
            v = {"n": v} if isinstance(v, int) else v
            self.fail_next(v["n"], v.get("status", 503), v.get("retry_after"), v.get("body"))
        if "drop_next" in opts:
            self.drop_next(int(opts["drop_next"]))
        if "timeout_next" in opts:
            v = opts["timeout_next"]
            v = {"n": v} if isinstance(v, int) else v
            self.timeout_next(v["n"], v.get("seconds", 30.0))
        if "latency" in opts:
            self.set_latency(opts["latency"])
        if "fault_rate" in opts:
            v = opts["fault_rate"]
            v = {"rate": v} if isinstance(v, (int, float)) else v
            self.fault_rate(v["rate"], v.get("statuses") or DEFAULT_FAULT_STATUSES, v.get("seed"))
        if "fail_tests_next" in opts:
            v = opts["fail_tests_next"]
            v = {"n": v} if isinstance(v, int) else v
            self.fail_tests_next(v["n"], v.get("status", 503))
        if "catalog" in opts:
            self.set_catalog(opts["catalog"])


# --------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bemsoft_monitor.testing.fakeapi",
        description="API Bemsoft falsa para testes e benchmarks (escuta só em 127.0.0.1).")
    parser.add_argument("--port", type=int, default=0, help="porta (0 = qualquer livre)")
    parser.add_argument("--token", default="test-token", help="token Bearer aceito")
    parser.add_argument("--latency", type=float, default=0.0,
                        help="segundos de espera antes de responder cada POST")
    parser.add_argument("--fault-rate", type=float, default=0.0,
                        help="probabilidade de falha transitória (5xx) por POST")
    parser.add_argument("--seed", type=int, default=None, help="semente das falhas aleatórias")
    parser.add_argument("--max-external-id", type=int, default=20,
                        help="tamanho máximo aceito para externalId")
    parser.add_argument("--endpoint", default="/requests", help="rota do POST (padrão /requests)")
    parser.add_argument("--keep-requests", type=int, default=1000,
                        help="quantas requisições guardar para inspeção (0 = todas)")
    parser.add_argument("--log-level", default="WARNING", help="nível de log (padrão WARNING)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fake = FakeBemsoft(token=args.token, port=args.port, latency=args.latency,
                       max_external_id=args.max_external_id, endpoint=args.endpoint,
                       keep_requests=args.keep_requests or None)
    if args.fault_rate > 0:
        fake.fault_rate(args.fault_rate, seed=args.seed)

    done = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:
        done.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    fake.start()
    print(fake.url, flush=True)
    try:
        while not done.wait(0.5):
            pass
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
