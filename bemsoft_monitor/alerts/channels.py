"""The alert channels: e-mail (SMTP), a webhook and a heartbeat. Each is a small class with
one `send` that raises ChannelError with one pt-BR line saying what failed (authentication
refused, no STARTTLS, TLS certificate, DNS, proxy...) and a `describe` that never shows a
secret. TLS is verified with the API's trust (system + certifi + BEMSOFT_CA_BUNDLE); the
webhook and the heartbeat go through the same proxy rules as the API."""
from __future__ import annotations

import email.policy
import smtplib
import socket
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from urllib.parse import urlsplit

import urllib3
from urllib3.exceptions import (ConnectTimeoutError, HTTPError, NameResolutionError,
                                NewConnectionError, ProxyError, ReadTimeoutError, SSLError)

from ..client import build_ssl_context
from ..config import Settings, select_proxy
from ..config_types import Url
from ..redaction import redact
from .notices import Rendered

ANSWER_CAP = 64 * 1024
# headers folded only past SMTP's own limit: some clients keep the space a folded subject
# starts with ("Subject:\r\n [bemsoft-monitor ...")
MAIL_POLICY = email.policy.SMTP.clone(max_line_length=998)


class ChannelError(Exception):
    """A message could not be sent; str() is one redacted pt-BR line."""


class Channel:
    name = ""

    def describe(self) -> str:
        raise NotImplementedError

    def send(self, message: Rendered) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------- e-mail
class EmailChannel(Channel):
    name = "e-mail"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.host, self.port, self.security = settings.smtp_host, settings.smtp_port, settings.smtp_security

    def describe(self) -> str:
        how = {"starttls": "STARTTLS", "ssl": "TLS", "none": "sem TLS"}[self.security]
        auth = f", autenticado como {self.settings.smtp_user}" if self.settings.smtp_user else ", sem autenticação"
        return (f"para {', '.join(self.settings.alert_email_to)} via {self.host}:{self.port} "
                f"({how}{auth})")

    def send(self, message: Rendered) -> None:
        s = self.settings
        mail = EmailMessage(policy=MAIL_POLICY)
        mail["Subject"] = message.subject
        mail["From"] = s.alert_email_from
        mail["To"] = ", ".join(s.alert_email_to)
        mail["Date"] = formatdate(localtime=True)
        mail["Message-ID"] = make_msgid(domain=s.alert_email_from.rpartition("@")[2] or None)
        mail.set_content(message.text)
        try:
            with self._connect() as smtp:
                if s.smtp_user:
                    smtp.login(s.smtp_user, s.smtp_password)
                smtp.send_message(mail)
        except (smtplib.SMTPException, OSError) as err:
            raise ChannelError(self.explain(err)) from err

    def _connect(self) -> smtplib.SMTP:
        context = build_ssl_context(self.settings)
        timeout = self.settings.alert_timeout
        if self.security == "ssl":
            return smtplib.SMTP_SSL(self.host, self.port, timeout=timeout, context=context)
        smtp = smtplib.SMTP(self.host, self.port, timeout=timeout)
        try:
            smtp.ehlo()
            if self.security == "starttls":
                smtp.starttls(context=context)
                smtp.ehlo()
        except BaseException:
            smtp.close()
            raise
        return smtp

    def explain(self, err: BaseException) -> str:
        where = f"{self.host}:{self.port}"
        if isinstance(err, smtplib.SMTPAuthenticationError):
            text = (f"autenticação recusada por {where} (SMTP {err.smtp_code}): confira SMTP_USER e "
                    "SMTP_PASSWORD (no Gmail, uma senha de app; no Microsoft 365, o SMTP AUTH "
                    "habilitado para a caixa)")
        elif isinstance(err, smtplib.SMTPNotSupportedError) or "STARTTLS" in str(err):
            text = (f"o servidor {where} não oferece STARTTLS: use SMTP_SECURITY=ssl (porta 465) ou, "
                    "num relay interno sem senha, SMTP_SECURITY=none (porta 25)")
        elif isinstance(err, smtplib.SMTPSenderRefused):
            text = f"o servidor {where} recusou o remetente {self.settings.alert_email_from} (ALERT_EMAIL_FROM)"
        elif isinstance(err, smtplib.SMTPRecipientsRefused):
            text = f"o servidor {where} recusou os destinatários (ALERT_EMAIL_TO)"
        elif isinstance(err, ssl.SSLCertVerificationError):
            text = (f"certificado TLS de {self.host} não confiável ({err.verify_message}): se a rede "
                    "usa uma CA própria, aponte BEMSOFT_CA_BUNDLE para o PEM dela")
        elif isinstance(err, ssl.SSLError):
            text = (f"falha TLS com {where} ({_short(err)}): confira SMTP_SECURITY e SMTP_PORT "
                    "(starttls na 587, ssl na 465)")
        elif isinstance(err, socket.gaierror):
            text = f"falha de DNS: o nome {self.host} (SMTP_HOST) não foi encontrado"
        elif isinstance(err, ConnectionRefusedError):
            text = f"o servidor {where} recusou a conexão (confira SMTP_HOST, SMTP_PORT e o firewall)"
        elif isinstance(err, (TimeoutError, socket.timeout)):
            text = f"tempo esgotado falando com {where} (ALERT_TIMEOUT={self.settings.alert_timeout:g} s)"
        elif isinstance(err, smtplib.SMTPServerDisconnected):
            text = f"o servidor {where} fechou a conexão ({_short(err)})"
        else:
            text = f"falha no envio por {where}: {_short(err)}"
        return redact(text, self.settings)


# ---------------------------------------------------------------- HTTP: webhook, heartbeat
class HttpChannel(Channel):
    """A request to a URL that is itself a secret (its path): only scheme and host shown."""
    method = "POST"

    def __init__(self, settings: Settings, url: str):
        self.settings, self.url = settings, url
        self.proxy = select_proxy(settings, url)
        timeout = urllib3.Timeout(connect=min(10.0, settings.alert_timeout),
                                  read=settings.alert_timeout, total=settings.alert_timeout)
        kw = {"timeout": timeout, "retries": False, "maxsize": 1}
        if urlsplit(url).scheme == "https":
            kw["ssl_context"] = build_ssl_context(settings)
            if not settings.verify_tls:
                kw["cert_reqs"] = "CERT_NONE"
        if self.proxy is not None:
            auth = self.proxy.basic_auth
            headers = urllib3.make_headers(proxy_basic_auth=auth) if auth else None
            if urlsplit(self.proxy.url).scheme == "https":
                kw["proxy_ssl_context"] = build_ssl_context(settings)
            self.pool = urllib3.ProxyManager(self.proxy.url, proxy_headers=headers, num_pools=1, **kw)
        else:
            self.pool = urllib3.PoolManager(num_pools=1, **kw)

    def describe(self) -> str:
        target = Url(secret_path=True).show(self.url)
        return target + (f" via proxy {self.proxy.display}" if self.proxy else "")

    def request(self, body: bytes | None, headers: dict) -> int:
        try:
            resp = self.pool.urlopen(self.method, self.url, body=body, headers=headers,
                                     redirect=False, preload_content=False, retries=False)
            try:
                resp.read(ANSWER_CAP)
            finally:
                resp.release_conn()
        except (HTTPError, OSError) as err:
            raise ChannelError(self.explain(err)) from err
        if not 200 <= resp.status < 300:
            raise ChannelError(redact(f"{Url(secret_path=True).show(self.url)} respondeu HTTP "
                                      f"{resp.status}", self.settings))
        return resp.status

    def explain(self, err: BaseException) -> str:
        host = urlsplit(self.url).hostname
        inner = getattr(err, "reason", None) or err
        if isinstance(err, ProxyError) or isinstance(inner, ProxyError):
            where = self.proxy.display if self.proxy else "o proxy"
            text = (f"o proxy {where} recusou a autenticação (HTTP 407)" if "407" in str(err)
                    else f"falha no proxy {where}: {_short(inner)}")
        elif isinstance(err, NameResolutionError) or isinstance(inner, NameResolutionError):
            text = f"falha de DNS: o nome {host} não foi encontrado"
        elif isinstance(err, SSLError) or isinstance(inner, (SSLError, ssl.SSLError)):
            detail = _short(inner)
            text = (f"certificado TLS de {host} não confiável: se a rede usa uma CA própria, aponte "
                    "BEMSOFT_CA_BUNDLE para o PEM dela" if "CERTIFICATE_VERIFY_FAILED" in detail
                    else f"falha TLS com {host}: {detail}")
        elif isinstance(err, (ConnectTimeoutError, ReadTimeoutError, TimeoutError)):
            text = f"tempo esgotado falando com {host} (ALERT_TIMEOUT={self.settings.alert_timeout:g} s)"
        elif isinstance(err, NewConnectionError) or isinstance(inner, NewConnectionError):
            text = f"sem conexão com {host}"
        else:
            text = f"falha falando com {host}: {_short(err)}"
        return redact(text, self.settings)

    def close(self) -> None:
        self.pool.clear()


class WebhookChannel(HttpChannel):
    """POST JSON with a `text` field (Teams workflows, Slack, Google Chat, Mattermost) and
    the structured fields."""
    name = "webhook"

    def __init__(self, settings: Settings):
        super().__init__(settings, settings.alert_webhook_url)

    def send(self, message: Rendered) -> None:
        import json
        body = json.dumps(message.payload, ensure_ascii=False).encode("utf-8")
        self.request(body, {"Content-Type": "application/json; charset=utf-8"})


class HeartbeatChannel(HttpChannel):
    """A GET after a healthy cycle (healthchecks.io, Uptime Kuma push, Better Stack)."""
    name = "heartbeat"
    method = "GET"

    def __init__(self, settings: Settings):
        super().__init__(settings, settings.heartbeat_url)

    def send(self, message: Rendered | None = None) -> None:
        self.request(None, {})


def configured_channels(settings: Settings) -> list[Channel]:
    """The message channels (e-mail, webhook) and the heartbeat, as configured."""
    channels: list[Channel] = []
    if settings.alert_email_to:
        channels.append(EmailChannel(settings))
    if settings.alert_webhook_url:
        channels.append(WebhookChannel(settings))
    if settings.heartbeat_url:
        channels.append(HeartbeatChannel(settings))
    return channels


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."
