"""The route to the API: keep-alive connections made by urllib3 (direct, through a plain or
TLS proxy with CONNECT, TLS with the CAs we trust) and, on each, a small HTTP/1.1
request/response exchange of our own.

Why our own exchange: urllib3's pool and http.client's header parsing (the `email` package)
cost more CPU per POST than the rest of the monitor's work on an order (issue 17, profiled at
zero latency). What urllib3 does well and we keep: name resolution, proxies, the CONNECT
tunnel, TLS and TLS-in-TLS, and their errors.

Every call is bounded by BEMSOFT_TIMEOUT from before the connection is made: the reads and
writes of the exchange wait at most the time left, and while a connection is being made
(TCP, proxy TLS, CONNECT, TLS) a timer shuts its socket down at the deadline, so a proxy
trickling its CONNECT answer cannot hold a sender either (issue 17 §9)."""
from __future__ import annotations

import logging
import re
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ProxyError

try:  # the type of HTTPConnection's `proxy_config` argument (urllib3 >= 2.0)
    from urllib3.connection import ProxyConfig
except ImportError:  # pragma: no cover - guarded by requirements.txt (urllib3>=2.3,<3)
    from urllib3._base_connection import ProxyConfig

log = logging.getLogger(__name__)

BODY_CAP = 1024 * 1024       # bytes of an answer read at most; the rest is discarded
HEAD_CAP = 64 * 1024         # status line and headers of one answer
READ_CHUNK = 64 * 1024
# a chunk size is hex digits only: int(x, 16) also takes "-10", "+10", "0x10" and "1_0", and a
# negative size moved the byte count back past the cap
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_STATUS = re.compile(r"[1-5][0-9]{2}")
USER_AGENT = "bemsoft-monitor"


class TransportError(Exception):
    """No HTTP answer (connection refused/reset/dropped, timeout, proxy, TLS): transient.
    The message is a redacted pt-BR line that says what failed on the route."""


class DeadlineExpired(Exception):
    """BEMSOFT_TIMEOUT passed before the answer was whole."""


class BadAnswer(Exception):
    """Something answered, but not in HTTP/1.x."""


class TunnelFailed(Exception):
    """The TLS handshake with the proxy itself failed (an https:// proxy): the proxy's
    certificate, not the API's (`__cause__` is the TLS error)."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    retry_after: str | None
    truncated: bool = False   # longer than the cap: `body` is its beginning only


class _Conn:
    """One open connection: urllib3's connection object (it owns the socket), the socket we
    read and write, the raw TCP socket under any TLS, and bytes read past the last answer."""
    __slots__ = ("http", "sock", "raw", "buf")

    def __init__(self, http):
        self.http = http
        self.sock = http.sock
        self.raw = _raw_socket(http.sock)
        self.buf = b""

    def dropped(self) -> bool:
        """An idle connection the server closed (or wrote to unasked) is not reused."""
        try:
            readable, _, _ = select.select([self.raw], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def close(self) -> None:
        try:
            self.http.close()
        except OSError:
            pass


def _raw_socket(sock):
    """The TCP socket under TLS-in-TLS (urllib3's SSLTransport wraps the proxy's SSLSocket)."""
    while not isinstance(sock, socket.socket) and hasattr(sock, "socket"):
        sock = sock.socket
    return sock


def _cut(http) -> None:
    """The deadline came while `http` was connecting: wake whatever waits on its socket."""
    sock = getattr(http, "sock", None)
    if sock is None:
        return
    try:
        _raw_socket(sock).shutdown(socket.SHUT_RDWR)
    except (OSError, ValueError):
        pass


class Route:
    """How connections to one base URL are made (direct or through the proxy) and kept:
    a LIFO of idle keep-alive connections, at most `keep` of them."""

    def __init__(self, base_url: str, proxy, ssl_context: ssl.SSLContext | None,
                 verify: bool, keep: int):
        parts = urlsplit(base_url)
        self.scheme = parts.scheme
        self.host = parts.hostname or ""
        default = 443 if self.scheme == "https" else 80
        self.port = parts.port or default
        self.host_header = self.host if self.port == default else f"{self.host}:{self.port}"
        if ":" in self.host and not self.host.startswith("["):  # IPv6 literal
            self.host_header = f"[{self.host}]" + ("" if self.port == default else f":{self.port}")
        self.proxy = proxy
        self.ssl_context = ssl_context
        self.verify = verify
        self.keep = keep
        self._idle: list[_Conn] = []
        self._lock = threading.Lock()
        self.proxy_headers: dict[str, str] = {}
        self.absolute = False   # plain-http API through a proxy: absolute URL, no tunnel
        if proxy is not None:
            self._proxy_url = urllib3.util.parse_url(proxy.url)
            if proxy.basic_auth:
                self.proxy_headers = dict(urllib3.make_headers(proxy_basic_auth=proxy.basic_auth))
            self.absolute = self.scheme == "http"

    # ------------------------------------------------------------ connections
    def get(self, deadline: float) -> _Conn:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect(deadline)
            if not conn.dropped():
                return conn
            conn.close()

    def put(self, conn: _Conn) -> None:
        with self._lock:
            if len(self._idle) < self.keep:
                self._idle.append(conn)
                return
        conn.close()

    def clear(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _tls_kw(self) -> dict:
        kw = {"ssl_context": self.ssl_context}
        if not self.verify:
            kw.update(cert_reqs="CERT_NONE", assert_hostname=False)
        return kw

    def _new_http(self, timeout: float):
        proxy = self.proxy
        if proxy is None:
            if self.scheme == "https":
                return HTTPSConnection(self.host, self.port, timeout=timeout, **self._tls_kw())
            return HTTPConnection(self.host, self.port, timeout=timeout)
        purl = self._proxy_url
        pport = purl.port or (443 if purl.scheme == "https" else 80)
        proxy_config = ProxyConfig(self.ssl_context if purl.scheme == "https" else None,
                                   False, None, None)
        if self.absolute:   # talk HTTP to the proxy itself (over TLS for an https:// proxy)
            if purl.scheme == "https":
                return HTTPSConnection(purl.host, pport, timeout=timeout, **self._tls_kw())
            return HTTPConnection(purl.host, pport, timeout=timeout)
        http = HTTPSConnection(purl.host, pport, timeout=timeout, proxy=purl,
                               proxy_config=proxy_config, **self._tls_kw())
        http.set_tunnel(self.host, self.port, headers=self.proxy_headers or None,
                        scheme=purl.scheme)
        return http

    def _connect(self, deadline: float) -> _Conn:
        """A new connection, made within the call's deadline: the timeouts of the socket are
        the time left, and a timer shuts the socket down at the deadline (a proxy answering
        CONNECT one byte at a time resets each read's timeout, not the timer)."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExpired()
        http = self._new_http(min(10.0, left))
        timer = threading.Timer(left, _cut, (http,))
        timer.daemon = True
        timer.start()
        try:
            http.connect()
        except BaseException as err:
            timer.cancel()
            # before close(), which forgets it: did the TLS handshake with the proxy succeed?
            proxy_tls_done = getattr(http, "proxy_is_verified", None) is not None
            http.close()
            if time.monotonic() >= deadline:
                raise DeadlineExpired() from err
            if self.proxy is None or not isinstance(err, Exception):
                raise
            if isinstance(err, (ssl.SSLError, urllib3.exceptions.SSLError)):
                if self._proxy_url.scheme == "https" and (self.absolute or not proxy_tls_done):
                    raise TunnelFailed() from err
                raise   # the API's certificate, checked through the tunnel
            raise ProxyError("proxy", err) from err
        timer.cancel()
        if time.monotonic() >= deadline:
            http.close()
            raise DeadlineExpired()
        conn = _Conn(http)
        # every write is one whole request: no Nagle delay waiting for an ACK (through a
        # proxy too: the socket urllib3 opened to it)
        try:
            conn.raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        return conn

    # ------------------------------------------------------------ one exchange
    def target(self, url: str) -> str:
        if self.absolute:
            return url
        parts = urlsplit(url)
        return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    def head(self, method: str, target: str, headers: dict, length: int | None) -> bytes:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host_header}",
                 f"User-Agent: {USER_AGENT}", "Accept-Encoding: identity"]
        for name, value in (({**self.proxy_headers, **headers} if self.absolute else headers)
                            .items()):
            value = str(value)
            if "\r" in value or "\n" in value:
                raise ValueError(f"cabeçalho {name} com quebra de linha")
            lines.append(f"{name}: {value}")
        if length is not None:
            lines.append(f"Content-Length: {length}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def exchange(self, method: str, target: str, body: bytes | None, headers: dict,
                 cap: int, deadline: float) -> Answer:
        """One request and its answer on a kept or new connection. Raises DeadlineExpired,
        BadAnswer, TunnelFailed, or what urllib3/the socket raised (OSError and urllib3's
        HTTPError family)."""
        data = self.head(method, target, headers, None if body is None and method == "GET"
                         else len(body or b""))
        if body:
            data += body
        conn = self.get(deadline)
        keep = False
        try:
            _send(conn, data, deadline)
            answer, keep = _receive(conn, method, cap, deadline)
        finally:
            if keep and not conn.buf:   # bytes nobody asked for: not reused
                self.put(conn)
            else:
                conn.close()
        return answer


def _wait(sock, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExpired()
    sock.settimeout(left)


def _send(conn: _Conn, data: bytes, deadline: float) -> None:
    _wait(conn.sock, deadline)
    try:
        conn.sock.sendall(data)
    except socket.timeout as err:
        raise DeadlineExpired() from err


def _recv(conn: _Conn, deadline: float) -> bytes:
    _wait(conn.sock, deadline)
    try:
        return conn.sock.recv(READ_CHUNK)
    except socket.timeout as err:
        raise DeadlineExpired() from err


def _receive(conn: _Conn, method: str, cap: int, deadline: float) -> tuple[Answer, bool]:
    """(the answer, whether the connection can carry another request)."""
    while True:
        status, version, headers = _read_head(conn, deadline)
        if 100 <= status < 200 and status != 101:
            continue   # 100 Continue and other interim answers: the real one follows
        break
    retry_after = headers.get("retry-after")
    token = headers.get("connection", "").lower()
    keep = ("close" not in token) if version == "HTTP/1.1" else ("keep-alive" in token)
    if method == "HEAD" or status in (204, 304):
        return Answer(status, b"", retry_after), keep
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body, truncated = _read_chunked(conn, cap, deadline)
        return Answer(status, body, retry_after, truncated), keep and not truncated
    length = headers.get("content-length")
    if length is not None:
        first = length.split(",")[0].strip()
        if not (first.isascii() and first.isdigit()):   # int() takes "+5", "1_0", " 5"
            raise BadAnswer(f"Content-Length inválido: {length[:40]!r}")
        size = int(first)
        body, truncated = _read_exactly(conn, size, cap, deadline)
        return Answer(status, body, retry_after, truncated), keep and not truncated
    body, truncated = _read_to_close(conn, cap, deadline)
    return Answer(status, body, retry_after, truncated), False


def _read_until(conn: _Conn, sep: bytes, deadline: float, too_long: str, closed: str,
                closed_before: str | None = None) -> bytes:
    """The bytes before `sep` (`sep` consumed), at most HEAD_CAP of them. A connection
    closed first raises ConnectionResetError(`closed`, or `closed_before` when nothing came)."""
    while True:
        end = conn.buf.find(sep)
        if end >= 0:
            data, conn.buf = conn.buf[:end], conn.buf[end + len(sep):]
            return data
        if len(conn.buf) > HEAD_CAP:
            raise BadAnswer(too_long)
        chunk = _recv(conn, deadline)
        if not chunk:
            raise ConnectionResetError(closed if conn.buf or closed_before is None else closed_before)
        conn.buf += chunk


def _read_head(conn: _Conn, deadline: float) -> tuple[int, str, dict]:
    head = _read_until(conn, b"\r\n\r\n", deadline, "cabeçalho da resposta maior que 64 KiB",
                       "conexão encerrada no meio do cabeçalho",
                       "conexão encerrada antes da resposta").decode("latin-1")
    lines = head.split("\r\n")
    parts = lines[0].split(" ", 2)
    # three ASCII digits, 100-599: isdigit() takes "²⁰¹" (int() then raised ValueError, an
    # "unexpected error" made the order a permanent failure) and "000" was judged permanent
    if (len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not _STATUS.fullmatch(parts[1])):
        raise BadAnswer(f"linha de status inválida: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), parts[0], headers


def _read_exactly(conn: _Conn, size: int, cap: int, deadline: float) -> tuple[bytes, bool]:
    """A Content-Length body: at most `cap` bytes of it; (body, cut)."""
    want = min(size, cap)
    chunks, have = [conn.buf], len(conn.buf)
    conn.buf = b""
    while have < want:
        chunk = _recv(conn, deadline)
        if not chunk:
            raise ConnectionResetError("conexão encerrada no meio da resposta")
        chunks.append(chunk)
        have += len(chunk)
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if size > cap:   # the rest is not read: the connection goes
        log.debug("Resposta maior que %d bytes: cortada e conexão descartada.", cap)
        return data[:cap], True
    conn.buf = data[size:]
    return data[:size], False


def _read_to_close(conn: _Conn, cap: int, deadline: float) -> tuple[bytes, bool]:
    chunks, size = [conn.buf], len(conn.buf)
    conn.buf = b""
    while size <= cap:
        chunk = _recv(conn, deadline)
        if not chunk:
            return b"".join(chunks), False
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)[:cap], True


def _read_line(conn: _Conn, deadline: float) -> bytes:
    return _read_until(conn, b"\r\n", deadline, "linha de bloco (chunked) longa demais",
                       "conexão encerrada no meio da resposta")


def _read_chunked(conn: _Conn, cap: int, deadline: float) -> tuple[bytes, bool]:
    chunks, size = [], 0
    while True:
        line = _read_line(conn, deadline)
        digits = line.split(b";", 1)[0].strip()
        if not _CHUNK_SIZE.fullmatch(digits):
            raise BadAnswer("tamanho de bloco (chunked) inválido")
        length = int(digits, 16)
        if length == 0:
            while _read_line(conn, deadline):   # trailers, up to the empty line
                pass
            return b"".join(chunks), False
        if size + length > cap:
            data, _ = _read_exactly(conn, cap - size, cap - size, deadline)
            chunks.append(data)
            log.debug("Resposta maior que %d bytes: cortada e conexão descartada.", cap)
            return b"".join(chunks), True
        data, _ = _read_exactly(conn, length, length, deadline)
        chunks.append(data)
        size += length
        if _read_line(conn, deadline):
            raise BadAnswer("bloco (chunked) sem CRLF no fim")
