"""The API client stage: one urllib3 pool sized to the concurrency, response
classification (SPEC §5) and per-request retries that honour `Retry-After`."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import urllib3

from .config import Settings
from .retry import PauseGate, RetryPolicy, parse_retry_after

log = logging.getLogger(__name__)

DELIVERED = "delivered"    # 2xx without an error in the body
DUPLICATE = "duplicate"    # 409: the server already has this Idempotency-Key
PERMANENT = "permanent"    # retrying the same bytes will not help (400/401/403, error body...)
TRANSIENT = "transient"    # 429/5xx/timeouts/connection errors: try again later

ERROR_KEYS = ("error", "errors", "erro", "erros")
TRANSIENT_4XX = {408, 425, 429}
BODY_LIMIT = 1000


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

    @property
    def ok(self) -> bool:
        return self.outcome in (DELIVERED, DUPLICATE)


def body_error(data) -> str | None:
    """The error message of a 2xx body such as `{"error": "Não foi possível salvar..."}`."""
    if not isinstance(data, dict):
        return None
    for key in ERROR_KEYS:
        value = data.get(key)
        if value not in (None, "", [], {}, False):
            return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return None


def classify(status: int, body: bytes) -> tuple[str, str]:
    """HTTP status + body -> (outcome, pt-BR reason). Pure: tests call it directly."""
    text = body.decode("utf-8", "replace")[:BODY_LIMIT]
    if 200 <= status < 300:
        try:
            data = json.loads(body) if body.strip() else None
        except ValueError:
            data = None
        error = body_error(data)
        if error:
            return PERMANENT, f"API respondeu {status} com erro no corpo (nada foi salvo): {error}"
        return DELIVERED, f"entregue (HTTP {status})"
    if status == 409:
        return DUPLICATE, "Idempotency-Key já recebida pela API (HTTP 409): pedido já entregue antes"
    if status in (401, 403):
        return PERMANENT, (f"API recusou o token (HTTP {status}): confira BEMSOFT_TOKEN; "
                           f"resposta: {text}")
    if status in TRANSIENT_4XX or status >= 500:
        return TRANSIENT, f"API indisponível (HTTP {status}): {text}"
    if status == 400:
        return PERMANENT, f"API rejeitou o pedido (HTTP 400, validação): {text}"
    return PERMANENT, f"API respondeu HTTP {status}: {text}"


class BemsoftClient:
    def __init__(self, settings: Settings, gate: PauseGate | None = None):
        self.settings = settings
        self.gate = gate or PauseGate()
        self.policy = RetryPolicy(settings.retries, settings.backoff, settings.max_backoff)
        pool_kwargs = {"maxsize": max(1, settings.concurrency), "block": True,
                       "timeout": urllib3.Timeout(connect=min(10.0, settings.timeout),
                                                  read=settings.timeout),
                       "retries": False}
        if settings.base_url.startswith("https") and not settings.verify_tls:
            pool_kwargs["cert_reqs"] = "CERT_NONE"
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        self.pool = urllib3.PoolManager(num_pools=2, **pool_kwargs)
        self._auth = f"Bearer {settings.token}"
        # the POST pool, resolved once: no URL parsing per request
        self._post_pool = self.pool.connection_from_url(settings.requests_url)
        self._post_path = urllib3.util.parse_url(settings.requests_url).request_uri

    def close(self) -> None:
        self.pool.clear()

    def redact(self, text: str) -> str:
        token = self.settings.token
        return text.replace(token, "***") if token and len(token) >= 4 else text

    # ------------------------------------------------------------- catalog
    def fetch_tests(self) -> dict:
        """`GET /tests` once; raises ApiError."""
        try:
            resp = self.pool.request("GET", self.settings.tests_url,
                                     headers={"Authorization": self._auth,
                                              "Accept": "application/json"})
        except urllib3.exceptions.HTTPError as err:
            raise ApiError(self.redact(f"sem conexão com {self.settings.tests_url}: {err}"),
                           permanent=False) from err
        if resp.status != 200:
            outcome, reason = classify(resp.status, resp.data)
            raise ApiError(self.redact(f"GET /tests: {reason}"),
                           permanent=outcome == PERMANENT, status=resp.status)
        try:
            return json.loads(resp.data)
        except ValueError as err:
            raise ApiError("GET /tests devolveu um corpo que não é JSON", permanent=False) from err

    # ------------------------------------------------------------- delivery
    def post_once(self, body: bytes, key: str) -> tuple[int, bytes, float | None]:
        resp = self._post_pool.urlopen(
            "POST", self._post_path, body=body, retries=False, redirect=False,
            headers={"Authorization": self._auth, "Content-Type": "application/json",
                     "Accept": "application/json", "Idempotency-Key": key})
        return resp.status, resp.data, parse_retry_after(resp.headers.get("Retry-After"))

    def deliver(self, payload: dict, key: str) -> Delivery:
        """POST one payload, retrying transient failures per the policy. Never raises for
        HTTP/transport problems: the Delivery says what happened."""
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        started = time.monotonic()
        attempt, status, text = 0, None, ""
        while True:
            if not self.gate.wait():
                return Delivery(TRANSIENT, status, attempt, "envio interrompido (desligando)",
                                text, time.monotonic() - started)
            attempt += 1
            retry_after = None
            try:
                status, data, retry_after = self.post_once(body, key)
            except urllib3.exceptions.HTTPError as err:
                status, text = None, ""
                outcome, reason = TRANSIENT, f"falha de conexão com a API: {err}"
            else:
                text = data.decode("utf-8", "replace")[:BODY_LIMIT]
                outcome, reason = classify(status, data)
            reason, text = self.redact(reason), self.redact(text)
            if outcome != TRANSIENT or attempt > self.policy.retries:
                return Delivery(outcome, status, attempt, reason, text, time.monotonic() - started,
                                retry_after)
            delay = self.policy.delay(attempt, retry_after)
            log.warning("Solicitação %s: tentativa %d falhou (%s); nova tentativa em %.1f s.",
                        key, attempt, reason, delay)
            if retry_after is not None:
                self.gate.pause(delay)  # every sender waits, not just this one
            elif not self.gate.sleep(delay):
                return Delivery(TRANSIENT, status, attempt, "envio interrompido (desligando)",
                                text, time.monotonic() - started)
