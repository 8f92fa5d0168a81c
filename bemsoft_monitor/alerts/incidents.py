"""Incidents: each condition that needs a person (token refused, API or database down, a
stalled loop, a standby, a folder that cannot be written) is an incident with one message
when it opens, a reminder every ALERT_REPEAT_SECONDS while it stays open and one when it
clears; new failure files make a digest at most every ALERT_FAILURES_SECONDS; a daily summary
at ALERT_DAILY_AT. Never a storm: messages follow transitions, not probes.

Pure: fed `status.Conditions` and the board's filed failures, with the time passed in, so
tests step time instead of sleeping. The channels and their thread are in `dispatch`."""
from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field

from ..reasons import CATEGORIES, OTHER
from ..status import API_DOWN, DB_DOWN, STANDBY, STARTING, TOKEN_REFUSED, Conditions
from .notices import (DAILY, DIGEST, OPENED, REMINDER, RESOLVED, Notice, duration, items, when)

CATEGORY_BY_KEY = {c.key: c for _, c in CATEGORIES} | {OTHER.key: OTHER}
LABELS = {"token": "Token recusado pela API", "api": "API Bemsoft indisponível",
          "banco": "Banco de dados indisponível", "parado": "Envio parado",
          "espera": "Monitor em espera (outro monitor ativo)", "disco": "Disco: não foi possível gravar"}
MAX_CODES = 10       # solicitation codes named per category in a digest


@dataclass
class Incident:
    event: str
    after: float                   # how long the condition holds before the message
    since: float | None = None     # holds since
    opened_at: float | None = None
    reminded_at: float | None = None
    detail: str = ""

    @property
    def open(self) -> bool:
        return self.opened_at is not None


@dataclass
class Incidents:
    settings: object
    replay: str = "python retry_failed.py --send"   # the exact replay command for digests
    incidents: dict[str, Incident] = field(default_factory=dict)
    digest_marker: int = 0                 # failures filed up to this number were reported
    digest_at: float | None = None         # when the last digest went out
    daily_done: dt.date | None = None

    def __post_init__(self):
        s = self.settings
        self.incidents = {
            "token": Incident("token", 0.0),
            "api": Incident("api", s.alert_after),
            "banco": Incident("banco", s.alert_after),
            "parado": Incident("parado", s.alert_after + s.debounce_seconds),
            "espera": Incident("espera", s.alert_after),
            "disco": Incident("disco", 0.0),
        }

    # ------------------------------------------------------------------ incidents
    def evaluate(self, cond: Conditions) -> list[Notice]:
        """The messages due now, given what holds now."""
        notices = []
        for event, (since, detail) in self.holding(cond).items():
            notices += self._step(self.incidents[event], cond, since, detail)
        return notices

    def holding(self, c: Conditions) -> dict[str, tuple[float | None, str]]:
        """For each incident, since when its condition holds (None: it does not) and a detail."""
        token = c.token[0] if c.token else None
        db = c.db_failing[0] if c.db_failing else None
        api = c.api_failing_since if token is None else None
        stalled = None
        busy_elsewhere = c.state in (API_DOWN, DB_DOWN, TOKEN_REFUSED, STANDBY, STARTING)
        if (c.backlog and c.waiting_since is not None and not busy_elsewhere
                and token is None and api is None and db is None and c.standby_since is None):
            stalled = max(c.waiting_since, c.last_progress or 0.0)
        return {
            "token": (token, f"HTTP {c.token[1]}" if c.token and c.token[1] else ""),
            "api": (api, ""),
            "banco": (db, c.db_failing[1] if c.db_failing else ""),
            "parado": (stalled, items(c.backlog)),
            "espera": (c.standby_since, ""),
            "disco": (c.disk_error[0] if c.disk_error else None,
                      c.disk_error[1] if c.disk_error else ""),
        }

    def open_incidents(self) -> list[Incident]:
        return [i for i in self.incidents.values() if i.open]

    def _step(self, inc: Incident, c: Conditions, since: float | None, detail: str) -> list[Notice]:
        now, repeat = c.now, self.settings.alert_repeat
        if since is None:
            if not inc.open:
                inc.since = None
                return []
            notice = self._resolved(inc, now)
            inc.since = inc.opened_at = inc.reminded_at = None
            return [notice]
        inc.since, inc.detail = since, detail or inc.detail
        if not inc.open:
            if now - since < inc.after:
                return []
            inc.opened_at = inc.reminded_at = now
            return [self._opened(inc, c, OPENED)]
        if now - inc.reminded_at >= repeat:
            inc.reminded_at = now
            return [self._opened(inc, c, REMINDER)]
        return []

    # ------------------------------------------------------------------ the words
    def _opened(self, inc: Incident, c: Conditions, state: str) -> Notice:
        s, tz, since = self.settings, self.settings.tz, inc.since
        held = duration(c.now - since)
        waiting = f"Aguardando envio: {items(c.backlog)}." if c.backlog else "Nada aguardando envio agora."
        title, lines = {
            "token": (f"Token recusado pela API ({inc.detail or 'HTTP 401'})", (
                f"A API da Bemsoft recusa o token desde {when(since, tz)}.",
                "O envio está pausado: nada vai para FAILED_DIR e nada se perde; os pedidos "
                "esperam com a mesma Idempotency-Key.",
                "O que fazer: confira BEMSOFT_TOKEN no .env (ou peça um token novo à Bemsoft) e "
                "reinicie o monitor. Ele também retoma sozinho quando o token voltar a ser aceito.",
                waiting)),
            "api": (f"API Bemsoft indisponível há {held}", (
                f"Desde {when(since, tz)} a API não responde, responde 429/5xx ou quem responde "
                "é outra coisa (portal, proxy).",
                "Nada é descartado: o envio retoma sozinho quando a API voltar.",
                "Se persistir, rode python monitor_bemsoft.py --check (rota, proxy, certificados) "
                "e confira com a Bemsoft.", waiting)),
            "banco": (f"Banco de dados indisponível há {held}", (
                f"Desde {when(since, tz)}: {inc.detail}.",
                "O monitor reconecta sozinho; nada é enviado nem perdido enquanto isso.",
                "Se persistir, confira o SQL Server, a rede e as credenciais (python "
                "monitor_bemsoft.py --check); leituras canceladas apontam uma transação longa "
                "no LIS (sp_who2, coluna BlkBy).")),
            "parado": (f"Envio parado: {inc.detail} esperando há {held}", (
                f"A API e o banco respondem, mas nada foi entregue desde {when(since, tz)}.",
                "Veja o log (LOG_FILE) e o painel do monitor; reiniciar o monitor é seguro "
                "(nada se perde nem é enviado em dobro).")),
            "espera": (f"Monitor em espera há {held}: outro monitor '{s.monitor_name}' está ativo", (
                f"Desde {when(since, tz)} outro processo com o mesmo MONITOR_NAME segura o "
                "bloqueio no banco; este só assume quando ele parar.",
                "Se não deveria haver outro monitor (serviço duplicado, atalho esquecido), "
                "pare-o; para dois monitores independentes, use nomes diferentes.")),
            "disco": ("Não foi possível gravar no disco do monitor", (
                f"Desde {when(since, tz)}: {inc.detail}.",
                "Libere espaço ou corrija a permissão da pasta. Enquanto uma falha não é gravada "
                "em FAILED_DIR, o checkpoint fica parado nela; nada se perde.")),
        }[inc.event]
        if state == REMINDER:
            title = f"Lembrete: {title}"
        return Notice(inc.event, state, title, lines, since, {"aguardando": c.backlog or 0})

    def _resolved(self, inc: Incident, now: float) -> Notice:
        tz, lasted = self.settings.tz, duration(now - (inc.since or now))
        title = {
            "token": "Resolvido: token aceito de novo pela API",
            "api": "Resolvido: a API Bemsoft voltou a responder",
            "banco": "Resolvido: banco de dados acessível de novo",
            "parado": "Resolvido: o envio voltou a andar",
            "espera": "Resolvido: este monitor assumiu o envio",
            "disco": "Resolvido: o monitor voltou a gravar no disco",
        }[inc.event]
        return Notice(inc.event, RESOLVED, title,
                      (f"Durou {lasted} (de {when(inc.since or now, tz)} a {when(now, tz)}).",
                       "Os pedidos que esperavam seguem normalmente."), inc.since)

    # ------------------------------------------------------------------ failures digest
    def digest(self, now: float, filed) -> Notice | None:
        """New failure files since the last digest, grouped by category, with what to fix and
        the replay command; at most every ALERT_FAILURES_SECONDS. `filed`: the board's
        `filed_after(marker)` (FiledFailure, oldest first)."""
        if not filed:
            return None
        if self.digest_at is not None and now - self.digest_at < self.settings.alert_failures_every:
            return None
        self.digest_at, self.digest_marker = now, filed[-1].seq
        by_category: dict[str, list] = {}
        for f in filed:
            by_category.setdefault(f.category, []).append(f)
        total = sum(f.items for f in filed)
        lines = [f"{len(filed)} pedido(s) com {items(total)} foram para FAILED_DIR desde "
                 f"{when(filed[0].at, self.settings.tz)}:"]
        for key, group in sorted(by_category.items(), key=lambda kv: -len(kv[1])):
            category = CATEGORY_BY_KEY.get(key, OTHER)
            codes = list(dict.fromkeys(f.cod for f in group if f.cod))
            shown = ", ".join(codes[:MAX_CODES]) + (f" e mais {len(codes) - MAX_CODES}"
                                                    if len(codes) > MAX_CODES else "")
            lines.append(f"- {len(group)} × {category.label}: {category.fix}"
                         + (f" (solicitações {shown})" if shown else ""))
        lines += ["", "Depois de corrigir, reenvie na pasta do projeto com:", self.replay]
        counts = Counter(f.category for f in filed)
        return Notice("falhas", DIGEST, f"{len(filed)} falha(s) nova(s) em FAILED_DIR", tuple(lines),
                      filed[0].at, {"falhas": len(filed), "itens": total, **counts})

    # ------------------------------------------------------------------ daily summary
    def daily(self, now: float, board, started: float, backlog: int | None) -> Notice | None:
        at = self.settings.alert_daily_at
        if at is None:
            return None
        tz = self.settings.tz
        local = dt.datetime.fromtimestamp(now, tz)
        if self.daily_done is None:  # never for a day the monitor did not see start
            self.daily_done = local.date() if local.time() >= at else local.date() - dt.timedelta(days=1)
            return None
        if local.time() < at or self.daily_done >= local.date():
            return None
        self.daily_done = local.date()
        day = local.date() - dt.timedelta(days=1)
        counts = board.day(day)
        lines = [f"Entregues: {counts.delivered} pedido(s), {items(counts.delivered_items)}.",
                 f"Falhas (FAILED_DIR): {counts.failed} pedido(s), {items(counts.failed_items)}.",
                 f"Aguardando envio agora: {items(backlog or 0)}."]
        start_day = dt.datetime.fromtimestamp(started, tz)
        if start_day.date() >= day:
            lines.append(f"(Contado desde a partida do monitor, {start_day:%d/%m %H:%M}.)")
        return Notice("resumo", DAILY, f"Resumo de {day:%d/%m/%Y}: {counts.delivered} entregue(s), "
                      f"{counts.failed} falha(s)", tuple(lines), None,
                      {"entregues": counts.delivered, "itens_entregues": counts.delivered_items,
                       "falhas": counts.failed, "itens_com_falha": counts.failed_items,
                       "aguardando": backlog or 0})
