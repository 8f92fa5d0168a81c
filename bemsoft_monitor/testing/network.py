"""Network pieces for the hospital-network tests, all on 127.0.0.1: a CONNECT forward proxy
that resolves a fake host name itself (so only the proxy can reach the API by that name), a
test CA (trustme) and servers that answer what the API never would (a captive portal, a
server trickling its answer, a huge body). Every answer is written in one sendall (no
delayed-ACK stall)."""
from __future__ import annotations

import base64
import select
import socket
import ssl
import threading
import time

import trustme

API_HOST = "api.bemsoft.test"   # resolvable only by ForwardProxy (`.test` is reserved)


class HospitalCA:
    """A private CA (as a hospital's TLS-inspecting proxy has) and a server certificate for
    `names` (API_HOST; 127.0.0.1 for the mail server of the alert tests) signed by it."""

    def __init__(self, directory, names=(API_HOST,), filename="hospital-ca.pem"):
        self.ca = trustme.CA()
        self.cert = self.ca.issue_cert(*names)
        self.ca_pem = directory / filename
        self.ca.cert_pem.write_to_path(str(self.ca_pem))

    def server_context(self, *names: str) -> ssl.SSLContext:
        """A server context with the certificate for `names` (default: this CA's `names`)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        (self.ca.issue_cert(*names) if names else self.cert).configure_cert(context)
        return context


class _Listener:
    """Accept loop in a daemon thread; one thread per connection."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            self.handle(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def handle(self, conn):  # pragma: no cover - overridden
        raise NotImplementedError

    def close(self):
        self._stop.set()
        self.sock.close()
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_head(conn) -> tuple[str, dict, bytes]:
    """Request line, headers (lower-case names) and whatever came after them."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the headers")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers, rest


def read_request(conn) -> tuple[str, dict, bytes]:
    line, headers, body = read_head(conn)
    length = int(headers.get("content-length") or 0)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return line, headers, body


class ForwardProxy(_Listener):
    """An HTTP proxy that only tunnels (CONNECT), as hospital proxies do for https. It
    resolves names from `hosts` itself; with `credentials` it answers 407 without a matching
    Proxy-Authorization. With `tls` (a server context) it is an https:// proxy: the client
    speaks TLS to the proxy itself, and TLS to the API inside the tunnel. With `trickle` it
    sends its "200 Connection established" one byte every `trickle` seconds (and counts
    them in `reply_bytes_sent`), as a slow or hostile proxy could."""

    ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"

    def __init__(self, hosts=None, credentials: tuple[str, str] | None = None,
                 tls: ssl.SSLContext | None = None, trickle: float | None = None):
        self.hosts = dict(hosts or {API_HOST: "127.0.0.1"})
        self.credentials = credentials
        self.tls, self.trickle = tls, trickle
        self.tunnels: list[str] = []
        self.refused = 0
        self.reply_bytes_sent = 0
        self.handshake_failures = 0
        super().__init__()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def handle(self, conn):
        if self.tls is not None:
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except ssl.SSLError:   # the client did not trust our certificate
                self.handshake_failures += 1
                return
        line, headers, _ = read_head(conn)
        method, target, _ = line.split(" ", 2)
        if self.credentials is not None:
            expected = "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()
            if headers.get("proxy-authorization") != expected:
                self.refused += 1
                body = b"<html>Proxy Authentication Required</html>"
                conn.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                             b'Proxy-Authenticate: Basic realm="hospital"\r\n'
                             b"Content-Type: text/html\r\nConnection: close\r\n"
                             b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                return
        host, _, port = target.rpartition(":")
        address = self.hosts.get(host)
        if method != "CONNECT" or address is None:
            conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        upstream = socket.create_connection((address, int(port)), timeout=10)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        upstream.settimeout(None)
        self.tunnels.append(target)
        if self.trickle is None:
            conn.sendall(self.ESTABLISHED)
        else:
            for i in range(len(self.ESTABLISHED)):
                try:
                    conn.sendall(self.ESTABLISHED[i:i + 1])
                except OSError:   # the client gave up
                    upstream.close()
                    return
                self.reply_bytes_sent += 1
                time.sleep(self.trickle)
        try:
            _splice(conn, upstream)
        finally:
            upstream.close()


def _splice(a: socket.socket, b: socket.socket) -> None:
    peers = {a: b, b: a}
    while True:
        # a TLS socket may hold decrypted bytes that select() cannot see
        readable = [s for s in peers if isinstance(s, ssl.SSLSocket) and s.pending()]
        if not readable:
            readable, _, _ = select.select(list(peers), [], [], 30)
        if not readable:
            return
        for sock in readable:
            data = sock.recv(65536)
            if not data:
                return
            peers[sock].sendall(data)


class CannedServer(_Listener):
    """Plain HTTP on 127.0.0.1 answering every request the same way: a captive portal's
    page, a huge body, or (`trickle`) a body sent one byte every `trickle` seconds."""

    def __init__(self, status: int = 200, body: bytes = b"<html>login</html>",
                 content_type: str = "text/html", trickle: float | None = None,
                 trickle_head: bool = False):
        self.status, self.body, self.content_type, self.trickle = status, body, content_type, trickle
        self.trickle_head = trickle_head
        self.requests: list[str] = []
        self.bytes_sent = 0
        self.client_gave_up = threading.Event()
        super().__init__()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def handle(self, conn):
        while True:
            try:
                line, _, _ = read_request(conn)
            except ConnectionError:
                return
            self.requests.append(line)
            head = (f"HTTP/1.1 {self.status} Canned\r\nContent-Type: {self.content_type}\r\n"
                    f"Content-Length: {len(self.body)}\r\n\r\n").encode()
            if self.trickle is None:
                conn.sendall(head + self.body)
                continue
            slow = head + self.body if self.trickle_head else self.body
            if not self.trickle_head:
                conn.sendall(head)
            for i in range(len(slow)):
                try:
                    conn.sendall(slow[i:i + 1])
                except OSError:
                    self.client_gave_up.set()
                    return
                self.bytes_sent += 1
                time.sleep(self.trickle)
            return
