"""The API client stage: keep-alive connections (direct or through the proxy, see
transport.py) as many as the senders, bounded answers, response classification (SPEC §5, §8) and per-request retries
that honour `Retry-After`."""
from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import urllib3
from urllib3.exceptions import (ConnectTimeoutError, NameResolutionError, NewConnectionError,
                                ProxyError, ReadTimeoutError, SSLError)

from .config import Settings
from .redaction import redact, redact_head
from .retry import PauseGate, RetryPolicy, parse_retry_after
from .transport import (BODY_CAP, Answer, BadAnswer, DeadlineExpired, Route, TransportError,
                        TunnelFailed)

log = logging.getLogger(__name__)

class Verdict:
    """How the API answered one POST (Delivery.outcome); not the item's stored status
    (schema.ItemStatus) nor a replay's result (replay.ReplayStatus)."""
    DELIVERED = "delivered"    # the API's own answer: a 2xx JSON body without an error
    DUPLICATE = "duplicate"    # 409: the server already has this Idempotency-Key
    PERMANENT = "permanent"    # retrying the same bytes will not help (400/401/403, error body...)
    TRANSIENT = "transient"    # 429/5xx/timeouts/connection errors/not the API: try again later
    # 401, or a 403 that GET /tests confirms: the installation's token was refused, not this
    # order. Nothing is filed; every sender pauses and the same request is tried again later.
    TOKEN_REFUSED = "token-refused"


ERROR_KEYS = ("error", "errors", "erro", "erros")
TRANSIENT_4XX = {408, 425, 429}
BODY_LIMIT = 1000            # characters of an answer kept in reasons and failure files
CATALOG_CAP = 64 * 1024 * 1024  # GET /tests: a support lab's whole catalog is large
UNEXPECTED = "resposta inesperada: não parece ser a API (proxy/portal?)"


def build_ssl_context(settings: Settings) -> ssl.SSLContext:
    """The system's trusted CAs and certifi's, plus BEMSOFT_CA_BUNDLE's (added, never
    instead); verification off only with BEMSOFT_VERIFY=0. The same store is trusted for
    an https:// proxy."""
    context = ssl.create_default_context()
    try:
        import certifi
        context.load_verify_locations(cafile=certifi.where())
    except (ImportError, OSError):
        pass
    if settings.ca_bundle is not None:
        context.load_verify_locations(cafile=str(settings.ca_bundle))
    if not settings.verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class Transport:
    """Keep-alive connections to the API host, through the proxy when there is one (CONNECT
    tunnel for https; an https:// proxy verified against the same CAs as the API), as many
    kept as senders (+1 for the catalog). Every call is bounded: BEMSOFT_TIMEOUT for the
    whole call, connection included, and BODY_CAP bytes (transport.Route)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.timeout = settings.timeout
        https = urlsplit(settings.base_url).scheme == "https"
        proxy = settings.proxy
        tls = https or (proxy is not None and urlsplit(proxy.url).scheme == "https")
        context = build_ssl_context(settings) if tls else None
        if tls and not settings.verify_tls:
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        self.route = Route(settings.base_url, proxy, context, settings.verify_tls,
                           keep=settings.concurrency + 1)

    def target(self, url: str) -> str:
        return self.route.target(url)

    def request(self, method: str, target: str, body: bytes | None, headers: dict,
                cap: int = BODY_CAP) -> Answer:
        deadline = time.monotonic() + self.timeout   # before the connection is made (§9)
        try:
            return self.route.exchange(method, target, body, headers, cap, deadline)
        except DeadlineExpired as err:
            raise TransportError(f"tempo esgotado esperando a API (BEMSOFT_TIMEOUT="
                                 f"{self.timeout:g} s para a chamada inteira)") from err
        except (TunnelFailed, BadAnswer, urllib3.exceptions.HTTPError, OSError) as err:
            raise TransportError(describe_transport_error(err, self.settings)) from err

    def close(self) -> None:
        self.route.clear()


def describe_transport_error(err: BaseException, settings: Settings) -> str:
    """One redacted pt-BR line saying where the route to the API broke."""
    host = urlsplit(settings.base_url).hostname
    proxy = settings.proxy
    if isinstance(err, ProxyError):
        inner = getattr(err, "original_error", None) or (err.args[1] if len(err.args) > 1 else err)
        where = f"{proxy.display} ({proxy.source})" if proxy else "o proxy"
        if "407" in str(inner):
            text = (f"o proxy {where} recusou a autenticação (HTTP 407): confira usuário e "
                    f"senha em {proxy.source if proxy else 'BEMSOFT_PROXY'}")
        elif isinstance(inner, (NewConnectionError, ConnectTimeoutError, ConnectionError,
                                TimeoutError)):
            text = f"proxy inacessível: {where} não aceitou a conexão ({_short(inner)})"
        else:
            text = f"falha no proxy {where}: {_short(inner)}"
    elif isinstance(err, TunnelFailed):   # an https:// proxy's own certificate (§10)
        where = f"{proxy.display} ({proxy.source})" if proxy else "o proxy"
        detail = _short(err.__cause__ or err)
        if "CERTIFICATE_VERIFY_FAILED" in detail or "certificate verify failed" in detail:
            text = (f"falha na verificação TLS do proxy {where}: certificado do proxy não "
                    f"confiável ({detail}). A API não foi contatada. Aponte BEMSOFT_CA_BUNDLE "
                    "para o arquivo PEM da CA que assina o proxy")
        else:
            text = f"falha TLS com o proxy {where}: {detail}"
    elif isinstance(err, BadAnswer):
        text = f"resposta HTTP inválida de {host}: {_short(err)}"
    elif isinstance(err, NameResolutionError):
        text = (f"falha de DNS: o nome {host} não foi encontrado (confira BEMSOFT_BASE_URL e o "
                "DNS da rede; se a saída é por proxy, defina HTTPS_PROXY ou BEMSOFT_PROXY)")
    elif isinstance(err, (SSLError, ssl.SSLError)):
        detail = _short(err)
        if "CERTIFICATE_VERIFY_FAILED" in detail or "certificate verify failed" in detail:
            text = (f"falha na verificação TLS de {host}: certificado não confiável ({detail}). "
                    "Se a rede do hospital inspeciona TLS, aponte BEMSOFT_CA_BUNDLE para o "
                    "arquivo PEM da CA dela")
        else:
            text = f"falha TLS com {host}: {detail}"
    elif isinstance(err, NewConnectionError):
        text = f"sem conexão com {host}: {_short(err)}"
    elif isinstance(err, (ConnectTimeoutError, ReadTimeoutError, TimeoutError)):
        text = f"tempo esgotado falando com {host} (BEMSOFT_TIMEOUT={settings.timeout:g} s)"
    else:
        text = f"conexão com {host} falhou sem resposta: {_short(err)}"
    return redact(text, settings)


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    text = text.replace("<urllib3.connection.HTTPSConnection object>: ", "")
    text = text.replace("<urllib3.connection.HTTPConnection object>: ", "")
    return text if len(text) <= 300 else text[:297] + "..."


class ApiError(Exception):
    """A call to the API failed; `permanent` says whether retrying can help."""

    def __init__(self, message: str, *, permanent: bool, status: int | None = None):
        super().__init__(message)
        self.permanent = permanent
        self.status = status


@dataclass
class Delivery:
    outcome: str
    status: int | None
    attempts: int
    reason: str
    body: str = ""
    duration: float = 0.0
    retry_after: float | None = None   # the server's Retry-After on the last answer
    uncertain: bool = False            # a 409 after an attempt that got no answer
    unexpected: bool = False           # the last answer did not come from the API (portal)
    # A plain success's answer, as it came: not decoded nor redacted on the way (nothing shows
    # it but `retry_failed.py --verbose`, through `shown_body`); `body` is then empty.
    answer: bytes = field(default=b"", repr=False)

    @property
    def ok(self) -> bool:
        return self.outcome in (Verdict.DELIVERED, Verdict.DUPLICATE)

    def shown_body(self, settings: Settings) -> str:
        """The answer as a person may see it: redacted and cut to BODY_LIMIT characters."""
        return self.body or answer_text(self.answer, settings)


def body_error(data) -> str | None:
    """The error message of a 2xx body such as `{"error": "Não foi possível salvar..."}`."""
    if not isinstance(data, dict):
        return None
    for key in ERROR_KEYS:
        value = data.get(key)
        if value not in (None, "", [], {}, False):
            return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return None


def classify(status: int, body: bytes, settings: Settings | None = None) -> tuple[str, str]:
    """HTTP status + body -> (outcome, pt-BR reason). Pure: tests call it directly."""
    outcome, reason, _ = judge(status, body, settings)
    return outcome, reason


def judge(status: int, body: bytes, settings: Settings | None = None) -> tuple[str, str, bool]:
    """(outcome, reason, unexpected): `unexpected` when the answer does not look like the
    API's own (a captive portal's or proxy's page, a redirect): retried with the same key.
    Any part of the answer in the reason is redacted (with `settings`' secrets) before it is
    cut."""
    outcome, reason, unexpected, _ = _judge(status, body, settings)
    return outcome, reason, unexpected


def _judge(status: int, body: bytes, settings: Settings | None):
    """judge() and the answer's text for the Delivery; a plain success (2xx JSON without an
    error) is judged without decoding, redacting or keeping any text of it: its text is None."""
    if 200 <= status < 300:
        if not body.strip():
            if status in (201, 204):
                return Verdict.DELIVERED, f"entregue (HTTP {status})", False, None
            return Verdict.TRANSIENT, f"{UNEXPECTED} (HTTP {status} sem corpo)", True, ""
        try:
            data = json.loads(body)
        except ValueError:
            text = answer_text(body, settings)
            return Verdict.TRANSIENT, f"{UNEXPECTED} (HTTP {status}: {_snippet(text)})", True, text
        error = body_error(data)
        if error:
            return (Verdict.PERMANENT, f"API respondeu {status} com erro no corpo (nada foi salvo): "
                    f"{redact_head(error, BODY_LIMIT, settings)}", False, answer_text(body, settings))
        return Verdict.DELIVERED, f"entregue (HTTP {status})", False, None
    text = answer_text(body, settings)
    if status == 409:
        return Verdict.DUPLICATE, "Idempotency-Key já recebida pela API (HTTP 409): pedido já entregue antes", False, text
    if 300 <= status < 400:
        return Verdict.TRANSIENT, f"{UNEXPECTED} (redirecionamento HTTP {status})", True, text
    if status == 407:
        return Verdict.TRANSIENT, ("o proxy pediu autenticação (HTTP 407): confira usuário e senha em "
                                   "BEMSOFT_PROXY ou HTTPS_PROXY/HTTP_PROXY"), False, text
    if status == 401:
        return Verdict.TOKEN_REFUSED, token_refused_reason(status), False, text
    if status == 403:  # the order's or the token's: BemsoftClient.deliver asks GET /tests
        return Verdict.PERMANENT, f"API recusou o pedido (HTTP 403): {text}", False, text
    if status in TRANSIENT_4XX or status >= 500:
        return Verdict.TRANSIENT, f"API indisponível (HTTP {status}): {text}", False, text
    if status == 400:
        return Verdict.PERMANENT, f"API rejeitou o pedido (HTTP 400, validação): {text}", False, text
    return Verdict.PERMANENT, f"API respondeu HTTP {status}: {text}", False, text


def answer_text(body: bytes, settings: Settings | None) -> str:
    """An answer as reasons, logs and failure files show it: redacted, then cut to BODY_LIMIT
    characters (a secret straddling the cut leaves nothing of itself)."""
    return redact_head(body, BODY_LIMIT, settings)


def token_refused_reason(status: int) -> str:
    return (f"Token recusado pela API (HTTP {status}): confira BEMSOFT_TOKEN no .env; o envio "
            "fica pausado e retoma sozinho quando o token for aceito")


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 120 else text[:117] + "..."


class BemsoftClient:
    def __init__(self, settings: Settings, gate: PauseGate | None = None):
        self.settings = settings
        self.gate = gate or PauseGate()
        self.policy = RetryPolicy(settings.retries, settings.backoff, settings.max_backoff)
        self.transport = Transport(settings)
        self._auth = f"Bearer {settings.token}"
        self._tests_target = self.transport.target(settings.tests_url)
        self._post_target = self.transport.target(settings.requests_url)
        self._tests_headers = {"Authorization": self._auth, "Accept": "application/json"}
        self._post_headers = {"Authorization": self._auth, "Content-Type": "application/json",
                              "Accept": "application/json"}
        self._outage_lock = threading.Lock()
        self._unexpected_since: float | None = None

    def close(self) -> None:
        self.transport.close()

    def redact(self, text: str) -> str:
        return redact(text, self.settings)

    # ------------------------------------------------------------- catalog
    def fetch_tests(self) -> dict:
        """`GET /tests` once; raises ApiError."""
        try:
            answer = self.transport.request("GET", self._tests_target, None, self._tests_headers,
                                            cap=CATALOG_CAP)
        except TransportError as err:
            raise ApiError(f"GET /tests: {err}", permanent=False) from err
        if answer.truncated:  # not a portal: a catalog larger than any the API is known to send
            raise ApiError(f"GET /tests: resposta maior que {CATALOG_CAP // (1024 * 1024)} MiB; "
                           "catálogo descartado", permanent=False, status=answer.status)
        data = None
        if answer.status == 200:   # the catalog is parsed once, here
            try:
                data = json.loads(answer.body)
            except ValueError:
                pass
            if isinstance(data, dict) and not body_error(data):   # the usual answer
                return data
        outcome, reason, unexpected = judge(answer.status, answer.body, self.settings)
        if answer.status == 403:  # GET /tests carries no order: a 403 refuses the token
            outcome, reason = Verdict.TOKEN_REFUSED, token_refused_reason(403)
        if answer.status != 200 or unexpected:   # (a 200 that is not JSON is unexpected)
            raise ApiError(self.redact(f"GET /tests: {reason}"), status=answer.status,
                           permanent=outcome in (Verdict.PERMANENT, Verdict.TOKEN_REFUSED))
        return data

    # ------------------------------------------------------------- delivery
    def post_once(self, body: bytes, key: str) -> tuple[int, bytes, float | None]:
        headers = self._post_headers.copy()
        headers["Idempotency-Key"] = key
        answer = self.transport.request("POST", self._post_target, body, headers)
        return answer.status, answer.body, parse_retry_after(answer.retry_after)

    def token_refused(self) -> bool | None:
        """After a 403: is it the token (GET /tests with it is refused too) or this order (the
        catalog answers)? None when GET /tests gets no answer either (cannot tell)."""
        try:
            answer = self.transport.request("GET", self._tests_target, None, self._tests_headers, cap=0)
        except TransportError:
            return None
        return answer.status in (401, 403)

    def _note_answer(self, unexpected: bool, status: int | None, reason: str) -> None:
        """An answer that is not the API's is logged once per outage, not once per order."""
        with self._outage_lock:
            if unexpected and self._unexpected_since is None:
                self._unexpected_since = time.monotonic()
                log.warning("%s, vinda de %s. Os pedidos ficam aguardando e são reenviados com "
                            "a mesma chave; nada é descartado.", reason, self.settings.base_url)
            elif not unexpected and status is not None and self._unexpected_since is not None:
                self._unexpected_since = None
                log.warning("A API voltou a responder (HTTP %s); envio normal.", status)

    def deliver(self, payload: dict, key: str) -> Delivery:
        """POST one payload, retrying transient failures per the policy. Never raises for
        HTTP/transport problems: the Delivery says what happened."""
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        started = time.monotonic()
        attempt, status, text, answer = 0, None, "", b""
        unanswered = False  # an attempt reached the server (maybe) but got no answer
        while True:
            if not self.gate.wait():
                return Delivery(Verdict.TRANSIENT, status, attempt, "envio interrompido (desligando)",
                                text, time.monotonic() - started)
            attempt += 1
            retry_after = None
            unexpected = False
            try:
                status, data, retry_after = self.post_once(body, key)
            except TransportError as err:
                status, text = None, ""
                unanswered = True
                outcome, reason = Verdict.TRANSIENT, f"falha de conexão com a API: {err}"
            else:
                outcome, reason, unexpected, text = _judge(status, data, self.settings)
                self._note_answer(unexpected, status, reason)
                if status == 403:
                    refused = self.token_refused()
                    if refused or refused is None:
                        outcome = Verdict.TOKEN_REFUSED if refused else Verdict.TRANSIENT
                        reason = token_refused_reason(403) if refused else (
                            "API respondeu 403 e GET /tests não respondeu para dizer se é o "
                            "token: nova tentativa com a mesma chave")
            if text is None:  # a plain success: its reason says nothing of the answer
                text, answer = "", data
            else:             # the text was redacted before its cut; the reason once more whole
                reason = self.redact(reason)
            if outcome != Verdict.TRANSIENT or attempt > self.policy.retries:
                # The API cannot be asked what it did with the unanswered attempt: it either
                # saved it (the usual case) or failed it in its body (SPEC §5.2). Counted as
                # delivered, and flagged so the log says which exams to check.
                uncertain = outcome == Verdict.DUPLICATE and unanswered
                return Delivery(outcome, status, attempt, reason, text, time.monotonic() - started,
                                retry_after, uncertain, unexpected, answer)
            delay = self.policy.delay(attempt, retry_after)
            log.log(logging.DEBUG if unexpected else logging.WARNING,
                    "Solicitação %s: tentativa %d falhou (%s); nova tentativa em %.1f s.",
                    key, attempt, reason, delay)
            if retry_after is not None:
                self.gate.pause(delay)  # every sender waits, not just this one
            elif not self.gate.sleep(delay):
                return Delivery(Verdict.TRANSIENT, status, attempt, "envio interrompido (desligando)",
                                text, time.monotonic() - started)
