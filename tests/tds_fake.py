"""A tiny fake SQL Server for tests: just enough TDS 7.4 for a real ODBC driver to log in
and be refused.

Flow per connection (MS-TDS):
  client PRELOGIN (0x12)  -> server PRELOGIN response (packet type 0x04) with
                             ENCRYPTION = ENCRYPT_NOT_SUP, so with `Encrypt=no` the driver
                             sends everything in clear text (no TLS at all);
  client LOGIN7 (0x10)    -> the fake decodes the client's strings (host, user, password,
                             app, server, library, language, database) and records them,
                             then answers a TABULAR RESULT (0x04) with an ERROR token
                             (default: 18456 "Login failed for user '<user>'.") and a DONE
                             token carrying the error bit.

Nothing here is secure or complete; it exists so tests can prove that the connection
string we build is accepted by the real driver and reaches the server byte-exact.
"""
from __future__ import annotations

import socket
import socketserver
import ssl
import struct
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

# Packet types
PRELOGIN = 0x12
LOGIN7 = 0x10
TABULAR_RESULT = 0x04
# PRELOGIN option tokens
PL_VERSION, PL_ENCRYPTION, PL_INSTOPT, PL_THREADID, PL_MARS = 0x00, 0x01, 0x02, 0x03, 0x04
PL_TERMINATOR = 0xFF
ENCRYPT_OFF, ENCRYPT_ON, ENCRYPT_NOT_SUP, ENCRYPT_REQ = 0x00, 0x01, 0x02, 0x03
# Tokens
TOKEN_ERROR = 0xAA
TOKEN_DONE = 0xFD
DONE_ERROR = 0x0002

STATUS_EOM = 0x01
HEADER = struct.Struct(">BBHHBB")  # type, status, length, spid, packet id, window

# LOGIN7 variable-length fields, in the order of their (offset, length) pairs starting at
# byte 36 of the LOGIN7 record. ClientID (6 bytes) sits between Database and SSPI.
_LOGIN7_FIELDS = ("hostname", "username", "password", "appname", "servername",
                  "extension", "library", "language", "database")


def decode_password(raw: bytes) -> str:
    """LOGIN7 obfuscation: each byte had its nibbles swapped and was XOR-ed with 0xA5."""
    out = bytearray()
    for b in raw:
        b ^= 0xA5
        out.append(((b & 0x0F) << 4) | (b >> 4))
    return out.decode("utf-16-le")


@dataclass
class Login:
    """What the client sent in LOGIN7 (strings decoded)."""
    tds_version: int
    packet_size: int
    hostname: str = ""
    username: str = ""
    password: str = ""
    appname: str = ""
    servername: str = ""
    library: str = ""
    language: str = ""
    database: str = ""


def parse_login7(data: bytes) -> Login:
    length, tds_version, packet_size = struct.unpack_from("<III", data, 0)
    login = Login(tds_version=tds_version, packet_size=packet_size)
    for index, name in enumerate(_LOGIN7_FIELDS):
        offset, count = struct.unpack_from("<HH", data, 36 + 4 * index)
        if name == "extension":
            continue
        raw = data[offset:offset + 2 * count]
        value = decode_password(raw) if name == "password" else raw.decode("utf-16-le")
        setattr(login, name, value)
    return login


def _b_varchar(text: str) -> bytes:
    raw = text.encode("utf-16-le")
    return bytes([len(text)]) + raw


def _us_varchar(text: str) -> bytes:
    raw = text.encode("utf-16-le")
    return struct.pack("<H", len(text)) + raw


def error_token(number: int, state: int, severity: int, message: str,
                server: str = "FAKESQL", proc: str = "", line: int = 1) -> bytes:
    body = (struct.pack("<IBB", number, state, severity) + _us_varchar(message)
            + _b_varchar(server) + _b_varchar(proc) + struct.pack("<I", line))
    return bytes([TOKEN_ERROR]) + struct.pack("<H", len(body)) + body


def done_token(status: int = DONE_ERROR) -> bytes:
    # Status (USHORT), CurCmd (USHORT), DoneRowCount (ULONGLONG since TDS 7.2)
    return bytes([TOKEN_DONE]) + struct.pack("<HHQ", status, 0, 0)


def prelogin_response(encryption: int = ENCRYPT_NOT_SUP) -> bytes:
    options = [
        (PL_VERSION, struct.pack(">BBHH", 16, 0, 1000, 0)),  # "SQL Server 16.0.1000"
        (PL_ENCRYPTION, bytes([encryption])),
        (PL_INSTOPT, b"\x00"),
        (PL_THREADID, b""),
        (PL_MARS, b"\x00"),
    ]
    offset = 5 * len(options) + 1
    head, body = b"", b""
    for token, value in options:
        head += struct.pack(">BHH", token, offset + len(body), len(value))
        body += value
    return head + bytes([PL_TERMINATOR]) + body


def packet(kind: int, payload: bytes, packet_id: int = 1) -> bytes:
    return HEADER.pack(kind, STATUS_EOM, HEADER.size + len(payload), 0, packet_id, 0) + payload



class _Plain:
    """Clear-text transport over the socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def recv(self, size: int) -> bytes:
        return self.sock.recv(size)

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)


class _Tls:
    """TLS over the socket through memory BIOs, after a handshake carried in PRELOGIN
    packets (TDS 7.x wraps the handshake records in TDS packets; later records go raw)."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext):
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)

    def handshake(self) -> None:
        plain = _Plain(self.sock)
        while True:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                self._flush_wrapped()
                _kind, payload = read_message(plain)
                self.incoming.write(payload)
                continue
            self._flush_wrapped()
            return

    def _flush_wrapped(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(packet(PRELOGIN, data))

    def recv(self, size: int) -> bytes:
        while True:
            try:
                return self.obj.read(size)
            except ssl.SSLWantReadError:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return b""
                self.incoming.write(chunk)

    def sendall(self, data: bytes) -> None:
        self.obj.write(data)
        self.sock.sendall(self.outgoing.read())


def _recv_exact(channel, size: int) -> bytes:
    buf = b""
    while len(buf) < size:
        chunk = channel.recv(size - len(buf))
        if not chunk:
            raise ConnectionError("client closed the connection")
        buf += chunk
    return buf


def read_message(channel) -> tuple[int, bytes]:
    """One TDS message: packets until the one with the EOM status bit."""
    payload, kind = b"", None
    while True:
        kind_, status, length, _spid, _pid, _win = HEADER.unpack(_recv_exact(channel, HEADER.size))
        kind = kind_ if kind is None else kind
        payload += _recv_exact(channel, length - HEADER.size)
        if status & STATUS_EOM:
            return kind, payload


def make_self_signed_cert(folder: Path, common_name: str = "localhost") -> tuple[Path, Path]:
    """(cert, key) PEM files for a throw-away self-signed certificate (openssl CLI)."""
    cert, key = folder / "fake-tds-cert.pem", folder / "fake-tds-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={common_name}",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60)
    return cert, key


@dataclass
class FakeTdsServer:
    """Threaded fake on 127.0.0.1:<free port>. Use as a context manager.

    `error` is (number, state, class, message template); `{user}` in the template is
    replaced with the login's user name.

    Without `certificate` (a (cert, key) pair) the PRELOGIN answer is ENCRYPT_NOT_SUP: the
    driver must be told `Encrypt=no` and then talks in clear text. With a certificate the
    answer is ENCRYPT_ON and the fake performs the TLS handshake (TLS 1.2, wrapped in
    PRELOGIN packets as TDS 7.x does), so the driver's certificate validation is real."""
    error: tuple[int, int, int, str] = (18456, 1, 14, "Login failed for user '{user}'.")
    certificate: tuple[Path, Path] | None = None
    logins: list[Login] = field(default_factory=list)
    prelogins: int = 0
    tls_handshakes: int = 0
    problems: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._tls_context = None
        if self.certificate:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.maximum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(*map(str, self.certificate))
            self._tls_context = context
        fake = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                fake._serve(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="fake-tds", daemon=True)

    @property
    def address(self) -> str:
        """DB_SERVER value for this fake (`host,port`)."""
        return f"127.0.0.1,{self.port}"

    def __enter__(self) -> "FakeTdsServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(10)
        channel = _Plain(sock)
        try:
            kind, _payload = read_message(channel)
            if kind != PRELOGIN:
                self._problem(f"expected PRELOGIN (0x12), got 0x{kind:02x}")
                return
            with self._lock:
                self.prelogins += 1
            encryption = ENCRYPT_ON if self._tls_context else ENCRYPT_NOT_SUP
            sock.sendall(packet(TABULAR_RESULT, prelogin_response(encryption)))
            if self._tls_context:
                tls = _Tls(sock, self._tls_context)
                tls.handshake()
                with self._lock:
                    self.tls_handshakes += 1
                channel = tls  # ENCRYPT_ON: everything after the handshake is encrypted
            kind, payload = read_message(channel)
            if kind != LOGIN7:
                self._problem(f"expected LOGIN7 (0x10), got 0x{kind:02x}")
                return
            login = parse_login7(payload)
            with self._lock:
                self.logins.append(login)
            number, state, severity, template = self.error
            message = template.replace("{user}", login.username)
            channel.sendall(packet(TABULAR_RESULT,
                                   error_token(number, state, severity, message) + done_token()))
            # Let the client read the answer and hang up first.
            try:
                channel.recv(1)
            except (OSError, ssl.SSLError):
                pass
        except (ConnectionError, socket.timeout, OSError, ssl.SSLError, struct.error) as err:
            self._problem(f"{type(err).__name__}: {err}")

    def _problem(self, text: str) -> None:
        with self._lock:
            self.problems.append(text)
