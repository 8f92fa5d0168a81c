"""What an alert says: a `Notice` (one event of one incident, in our own pt-BR words) and its
rendering for each channel — the first line `[bemsoft-monitor <MONITOR_NAME>@<host>] ...`,
the text, and the JSON of a webhook.

Only our own words, counts, times, solicitation codes and categories (reasons.Category) go
into a notice: never a reason's text, which may quote a patient. Everything rendered passes
through the one redaction as well."""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field

from ..redaction import redact

# notice.state
OPENED, REMINDER, RESOLVED, DIGEST, DAILY, TEST = (
    "aberto", "lembrete", "resolvido", "falhas", "resumo", "teste")


@dataclass(frozen=True)
class Notice:
    event: str                     # token, api, banco, parado, espera, disco, falhas, resumo, teste
    state: str                     # one of the states above
    title: str                     # what happened, after the [bemsoft-monitor ...] prefix
    lines: tuple[str, ...] = ()
    since: float | None = None     # time.time() the condition started
    counts: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Rendered:
    subject: str
    text: str
    payload: dict                  # the webhook's JSON


def render(notice: Notice, settings, host: str) -> Rendered:
    prefix = f"[bemsoft-monitor {settings.monitor_name}@{host}]"
    subject = redact(f"{prefix} {notice.title}", settings)
    text = redact("\n".join([subject, "", *notice.lines]), settings)
    since = (None if notice.since is None else
             dt.datetime.fromtimestamp(notice.since, dt.timezone.utc).isoformat(timespec="seconds"))
    payload = {"text": text, "event": notice.event, "state": notice.state, "since": since,
               "monitor": settings.monitor_name, "host": host, "counts": dict(notice.counts)}
    # the JSON too: a counts value or a host name must not smuggle anything past the redaction
    return Rendered(subject, text, json.loads(redact(json.dumps(payload, ensure_ascii=False), settings)))


def when(ts: float, tz) -> str:
    """dd/mm HH:MM in the lab's time zone."""
    return f"{dt.datetime.fromtimestamp(ts, tz):%d/%m %H:%M}"


def duration(seconds: float) -> str:
    minutes = max(0, int(seconds // 60))
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    return f"{hours // 24} dias"


def items(n: int | None) -> str:
    if n is None:
        return "itens"
    return "1 item" if n == 1 else f"{n} itens"
