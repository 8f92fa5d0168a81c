"""A real SMTP server on 127.0.0.1 for the alert tests (aiosmtpd in its own thread): the
shapes the labs' relays have — Microsoft 365 / Gmail (STARTTLS on submission, AUTH LOGIN
and PLAIN over TLS only), implicit TLS (465), a plain internal relay without AUTH (25), and
a server that does not offer STARTTLS. Certificates come from a throw-away CA (trustme)."""
from __future__ import annotations

import email
import email.policy
import socket
import threading
import warnings

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from .network import HospitalCA

HOST = "127.0.0.1"
# the implicit-TLS server requires AUTH over TLS it made itself; aiosmtpd only knows STARTTLS
warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")


def mail_ca(directory) -> HospitalCA:
    """A private CA and a certificate for 127.0.0.1/localhost signed by it."""
    return HospitalCA(directory, ("127.0.0.1", "localhost"), "mail-ca.pem")


class _Inbox:
    def __init__(self):
        self.messages: list[email.message.EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's name)
        message = email.message_from_bytes(envelope.original_content or envelope.content,
                                           policy=email.policy.default)
        with self.lock:
            self.messages.append(message)
            self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 Message accepted"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class MailServer:
    """`mode`: "starttls" (STARTTLS required before AUTH and MAIL), "ssl" (TLS from the first
    byte), "plain" (no TLS offered: an internal relay, or a server without STARTTLS).
    `users`: {user: password} makes AUTH required; None: a relay that takes anyone's mail.
    `login_only`: AUTH LOGIN is the only mechanism offered, as Microsoft 365 does."""

    def __init__(self, mode: str = "starttls", *, ca: HospitalCA | None = None,
                 users: dict[str, str] | None = None, login_only: bool = False):
        self.mode, self.users = mode, users
        self.inbox = _Inbox()
        self.logins: list[tuple[str, bool]] = []   # (user, accepted)
        self.port = free_port()
        kwargs = {}
        if mode == "starttls":
            kwargs.update(tls_context=ca.server_context(), require_starttls=True)
        elif mode == "ssl":
            kwargs.update(ssl_context=ca.server_context())
        if users is not None:
            # implicit TLS is TLS already; aiosmtpd only counts STARTTLS as TLS for AUTH
            kwargs.update(auth_required=True, auth_require_tls=mode == "starttls",
                          authenticator=self._authenticate,
                          auth_exclude_mechanism=["PLAIN"] if login_only else [])
        self._controller = Controller(self.inbox, hostname=HOST, port=self.port, **kwargs)

    def _authenticate(self, server, session, envelope, mechanism, auth_data):
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user = auth_data.login.decode("utf-8", "replace")
        ok = self.users.get(user) == auth_data.password.decode("utf-8", "replace")
        self.logins.append((user, ok))
        return AuthResult(success=ok, handled=False)

    @property
    def messages(self) -> list[email.message.EmailMessage]:
        with self.inbox.lock:
            return list(self.inbox.messages)

    def start(self) -> "MailServer":
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def __enter__(self) -> "MailServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
