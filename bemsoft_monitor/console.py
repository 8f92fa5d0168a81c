"""The operator console (`/` on the metrics server) and the words `--status` shares with it.

`build_page` turns a StatusBoard snapshot, the settings and a FAILED_DIR summary into a view
model; `render_page` writes it as one self-contained HTML page (standard library only,
inline CSS, an inline SVG chart, no JavaScript, refreshes itself). Nothing here queries the
database, and nothing here may show patient data: failure files are read only for their
reason (generalised, see `reason_group`), time, solicitation code, item count and status.
"""
from __future__ import annotations

import datetime as dt
import hmac
import os
import re
import shlex
import subprocess
import threading
import time
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Callable, Mapping
from urllib.parse import parse_qs, urlsplit

from .config import Settings
from .failures import FailureFileError, FailureStore
from .status import (API_DOWN, DB_DOWN, DELIVERED, DRY_RUN, DUPLICATE, FAILED, RETRY, SENDING,
                     SIMULATED, STANDBY, STARTING, UP_TO_DATE, Snapshot, StatusBoard, count_items)

REFRESH_SECONDS = 5
SCAN_TTL = 5.0          # seconds a FAILED_DIR listing is reused
SCAN_MAX_FILES = 5000   # failure files read per listing (oldest first); the rest are counted

STATES = {  # state -> (banner text, css class)
    STARTING: ("Iniciando", "info"),
    SENDING: ("Enviando", "ok"),
    UP_TO_DATE: ("Em dia", "ok"),
    API_DOWN: ("API indisponível — envio pausado", "bad"),
    DB_DOWN: ("Banco indisponível", "bad"),
    STANDBY: ("Em espera", "info"),
    DRY_RUN: ("DRY_RUN", "warn"),
}
STATE_NOTES = {
    STARTING: "o monitor está conectando e lendo o checkpoint",
    SENDING: "há pedidos sendo enviados",
    UP_TO_DATE: "nada esperando envio",
    API_DOWN: "nada é descartado: o envio retoma sozinho",
    DB_DOWN: "reconectando sozinho; nada é enviado nem perdido enquanto isso",
    STANDBY: "outro monitor com o mesmo MONITOR_NAME está ativo; este assume quando ele parar",
    DRY_RUN: "BEMSOFT_DRY_RUN=1: nada é enviado nem gravado",
}
OUTCOMES = {  # outcome -> (text, css class)
    DELIVERED: ("entregue", "ok"),
    DUPLICATE: ("já recebida (409)", "ok"),
    SIMULATED: ("simulado (DRY_RUN)", "warn"),
    FAILED: ("falhou (FAILED_DIR)", "bad"),
    RETRY: ("será repetido", "warn"),
}


# ---------------------------------------------------------------- words shared with --status
def checkpoint_text(checkpoint: int | None) -> str:
    return "—" if checkpoint is None else str(checkpoint)


def backlog_detail(more: bool = False) -> str:
    return "além do checkpoint" + (" (e mais nas próximas páginas)" if more else "")


def backlog_text(backlog: int | None, more: bool = False) -> str:
    return "—" if backlog is None else f"{count_items(backlog)} {backlog_detail(more)}"


def ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"há {seconds} s"
    if seconds < 3600:
        return f"há {seconds // 60} min"
    if seconds < 86400:
        return f"há {seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"há {seconds // 86400} dia(s)"


def moment(ts: float, tz, now: float | None = None) -> str:
    """HH:MM:SS today, otherwise with the date; local time (TIMEZONE)."""
    when = dt.datetime.fromtimestamp(ts, tz)
    if now is not None and when.date() == dt.datetime.fromtimestamp(now, tz).date():
        return f"{when:%H:%M:%S}"
    return f"{when:%Y-%m-%d %H:%M:%S}"


def last_delivery_text(ts: float | None, now: float, tz) -> str:
    if ts is None:
        return "nenhuma registrada"
    return f"{moment(ts, tz)} ({ago(now - ts)})"


def replay_command(failed_dir: Path, env_file: str | None = None, *, windows: bool | None = None) -> str:
    """The exact command that replays FAILED_DIR, quoted for this platform's shell."""
    args = ["python", "retry_failed.py"]
    if env_file:
        args += ["--env-file", str(env_file)]
    args += ["--dir", str(failed_dir), "--send"]
    if windows if windows is not None else os.name == "nt":
        return subprocess.list2cmdline(args)
    return shlex.join(args)


# ---------------------------------------------------------------- failure files
_ITEM_PREFIX = re.compile(r"^item [^:]{1,40}: ")
_PATIENT_ID = re.compile(r"\bpaciente\s+(?:(?:pat|cpf)-)?[0-9][0-9.\-]*\s*")
_LONG_NUMBER = re.compile(r"\d[\d.\-/]{3,}\d")


def reason_group(reason: str) -> str:
    """A failure reason reduced to what groups it and shows no patient data: the first item's
    reason, up to the first ': ' (what follows may echo the API's answer), without the patient
    identifier (it can be a CPF) and with long numbers (CPF, dates) masked."""
    text = " ".join(str(reason).split())
    text = _ITEM_PREFIX.sub("", text).split("; item ", 1)[0]
    text = text.split(": ", 1)[0]
    text = _PATIENT_ID.sub("paciente ", text)
    text = _LONG_NUMBER.sub("…", text)
    return (text[:117] + "…") if len(text) > 120 else (text or "sem motivo registrado")


@dataclass(frozen=True)
class FailureFile:
    name: str
    created_at: str     # ISO time, UTC, from the file
    reason: str         # reason_group(...)
    cod: str
    items: int
    http_status: int | None


@dataclass(frozen=True)
class FailureGroup:
    reason: str
    count: int
    oldest: str
    cods: tuple[str, ...]   # a few solicitation codes, oldest first


@dataclass(frozen=True)
class FailureSummary:
    directory: Path
    count: int
    groups: tuple[FailureGroup, ...]
    unreadable: tuple[str, ...]
    oldest: str | None
    unread: int = 0     # beyond SCAN_MAX_FILES: counted, not read


def read_failure(path: Path) -> FailureFile:
    """Only the fields the console may show; raises FailureFileError."""
    record = FailureStore.load(path)
    return FailureFile(Path(path).name, record.created_at, reason_group(record.reason),
                       record.cod, len(record.item_ids), record.http_status)


def summarize(directory: Path, files: list[FailureFile], unreadable: list[str],
              unread: int = 0) -> FailureSummary:
    groups: dict[str, list[FailureFile]] = {}
    for f in sorted(files, key=lambda f: (f.created_at or "~", f.name)):
        groups.setdefault(f.reason, []).append(f)
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    dated = [f.created_at for f in files if f.created_at]
    return FailureSummary(
        Path(directory), len(files) + len(unreadable) + unread,
        tuple(FailureGroup(reason, len(group), group[0].created_at,
                           tuple(dict.fromkeys(f.cod for f in group))[:5])
              for reason, group in ordered),
        tuple(unreadable), min(dated) if dated else None, unread)


class FailureScan:
    """FAILED_DIR, listed at most every `ttl` seconds; each file is read once (they are
    written atomically and never change) and only its first `max_files` (oldest) are read."""

    def __init__(self, directory: Path, *, ttl: float = SCAN_TTL, max_files: int = SCAN_MAX_FILES,
                 clock: Callable[[], float] = time.monotonic):
        self.directory = Path(directory)
        self.ttl, self.max_files, self.clock = ttl, max_files, clock
        self._lock = threading.Lock()
        self._files: dict[tuple, FailureFile | None] = {}
        self._summary: FailureSummary | None = None
        self._at = 0.0

    def warm(self) -> None:
        """Read the folder once in the background (at start-up): the first page load then
        finds the files already read instead of reading a thousand of them itself."""
        threading.Thread(target=self.summary, name="failure-scan", daemon=True).start()

    def summary(self) -> FailureSummary:
        with self._lock:
            if self._summary is None or self.clock() - self._at >= self.ttl:
                self._summary, self._at = self._scan(), self.clock()
            return self._summary

    def _scan(self) -> FailureSummary:
        try:
            entries = FailureStore(self.directory).files()   # the store's own idea of a file
        except OSError:
            entries = []
        files, unreadable, seen = [], [], {}
        for entry in entries[:self.max_files]:
            try:
                st = entry.stat()
            except OSError:
                continue  # replayed (moved away) meanwhile
            key = (entry.name, st.st_size, st.st_mtime_ns)
            if key not in self._files:
                try:
                    self._files[key] = read_failure(entry)
                except FailureFileError:
                    self._files[key] = None
            seen[key] = self._files[key]
            if seen[key] is None:
                unreadable.append(entry.name)
            else:
                files.append(seen[key])
        self._files = seen  # forget files that are gone
        return summarize(self.directory, files, unreadable, max(0, len(entries) - self.max_files))


def failure_lines(summary: FailureSummary, tz, replay: str) -> list[str]:
    """The FAILED_DIR part of `--status`, in the page's words."""
    lines = [f"Falhas em {summary.directory}: {summary.count} arquivo(s)"
             + (f", a mais antiga de {local_iso(summary.oldest, tz)}" if summary.oldest else "")]
    for group in summary.groups:
        lines.append(f"  {group.count:5d}  {group.reason} (mais antiga: {local_iso(group.oldest, tz)})")
    lines += [f"  ilegível: {name}" for name in summary.unreadable]
    if summary.unread:
        lines.append(f"  mais {summary.unread} arquivo(s) não lidos (a pasta tem mais de {SCAN_MAX_FILES})")
    if summary.count:
        lines.append(f"Para reenviar depois de corrigir a causa: {replay}")
    return lines


def local_iso(iso: str | None, tz) -> str:
    if not iso:
        return "—"
    try:
        when = dt.datetime.fromisoformat(iso)
    except ValueError:
        return iso[:25]
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return f"{when.astimezone(tz):%Y-%m-%d %H:%M:%S}"


# ---------------------------------------------------------------- settings shown
def mask_url(url: str | None) -> str | None:
    """scheme://host:port of a URL, credentials replaced by ***."""
    if not url:
        return None
    parts = urlsplit(url if "://" in url else f"http://{url}")
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = ("***@" if parts.username or parts.password else "") + host + (f":{port}" if port else "")
    return f"{parts.scheme}://{netloc}"


def database_text(settings: Settings) -> str:
    if settings.database_url:
        from sqlalchemy.engine import make_url
        try:
            url = make_url(settings.database_url)
        except Exception:  # validated at start-up; never show the raw URL (it has the password)
            return "DATABASE_URL"
        where = url.host or ""
        if url.port:
            where += f":{url.port}"
        return f"{url.get_backend_name()}: {where + ' / ' if where else ''}{url.database or ''}"
    return f"{settings.db_server} / {settings.db_name}"


def proxy_text(settings: Settings) -> str:
    proxy = settings.proxy
    if proxy is None:
        return "nenhum (conexão direta)"
    return f"{mask_url(proxy.display)} (de {proxy.source})"


def settings_rows(settings: Settings) -> list[tuple[str, str]]:
    return [
        ("API", mask_url(settings.base_url) or ""),
        ("Proxy", proxy_text(settings)),
        ("Banco de dados", database_text(settings)),
        ("Laboratórios (TERCEIROS)", ", ".join(settings.terceiros)),
        ("Envios em paralelo (BEMSOFT_CONCURRENCY)", str(settings.concurrency)),
        ("DRY_RUN", "sim: nada é enviado nem gravado" if settings.dry_run else "não"),
        ("Nome do monitor (MONITOR_NAME)", settings.monitor_name),
        ("Pasta de falhas (FAILED_DIR)", str(settings.failed_dir)),
    ]


# ---------------------------------------------------------------- the view model
@dataclass(frozen=True)
class Banner:
    text: str
    css: str
    since: str
    note: str


@dataclass(frozen=True)
class Page:
    title: str
    generated: str
    banner: Banner
    tiles: list[tuple[str, str, str]]          # label, value, detail
    chart: list[tuple[str, int, int, int]]     # minute HH:MM, delivered, failed, retried
    outcomes: list[tuple[str, ...]]
    failures: FailureSummary
    failure_rows: list[tuple[str, str, str, str]]
    replay: str
    settings: list[tuple[str, str]] = field(default_factory=list)


def banner(snap: Snapshot, tz) -> Banner:
    text, css = STATES.get(snap.state, (snap.state, "info"))
    if snap.state == API_DOWN and snap.paused_until:
        text += f" até {dt.datetime.fromtimestamp(snap.paused_until, tz):%H:%M:%S}"
    return Banner(text, css, f"desde {moment(snap.since, tz, snap.now)} ({ago(snap.now - snap.since)})",
                  STATE_NOTES.get(snap.state, ""))


def millis(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.0f} ms"


def build_page(snap: Snapshot, settings: Settings, failures: FailureSummary, *,
               env_file: str | None = None) -> Page:
    tz = settings.tz
    tiles = [
        ("Checkpoint", checkpoint_text(snap.checkpoint), "último CodItemSol com resultado registrado"),
        ("Backlog", "—" if snap.backlog is None else count_items(snap.backlog),
         backlog_detail(snap.backlog_more) + ", ainda sem resultado"),
        ("Última entrega", "nenhuma" if snap.last_delivery is None else moment(snap.last_delivery, tz, snap.now),
         "" if snap.last_delivery is None else ago(snap.now - snap.last_delivery)),
        ("Entregas", f"{snap.delivered_today} hoje", f"{snap.delivered_hour} na última hora"),
        ("Falhas", f"{snap.failed_today} hoje", f"{snap.failed_hour} na última hora"),
        ("Latência da API", millis(snap.latency_median), f"mediana; p95 {millis(snap.latency_p95)}"),
    ]
    chart = [(f"{dt.datetime.fromtimestamp(m.start, tz):%H:%M}", m.delivered, m.failed, m.retried)
             for m in snap.minutes]
    outcomes = [(moment(o.at, tz, snap.now), o.cod, str(o.items),
                 "—" if o.http_status is None else str(o.http_status), millis(o.duration),
                 o.outcome, o.key) for o in snap.outcomes]
    failure_rows = [(g.reason, str(g.count), local_iso(g.oldest, tz), ", ".join(g.cods))
                    for g in failures.groups]
    return Page(title=f"Monitor SQL → Bemsoft — {settings.monitor_name}",
                generated=moment(snap.now, tz), banner=banner(snap, tz), tiles=tiles, chart=chart,
                outcomes=outcomes, failures=failures, failure_rows=failure_rows,
                replay=replay_command(settings.failed_dir, env_file),
                settings=settings_rows(settings))


# ---------------------------------------------------------------- HTML
CSS = """
body{font:15px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f3f4f6;color:#111827}
main{max-width:1100px;margin:0 auto;padding:16px}
h1{font-size:18px;margin:0 0 12px;color:#374151}h2{font-size:16px;margin:24px 0 8px}
.banner{border-radius:8px;padding:14px 18px;color:#fff;margin-bottom:14px}
.banner strong{font-size:24px;display:block}.banner span{opacity:.95}
.ok{background:#15803d}.bad{background:#b91c1c}.warn{background:#b45309}.info{background:#1d4ed8}
.tiles{display:grid;grid-template-columns:repeat(auto-fit,minmax(165px,1fr));gap:10px}
.tile{background:#fff;border-radius:8px;padding:10px 12px;box-shadow:0 1px 2px #0001}
.tile b{display:block;font-size:12px;color:#6b7280;text-transform:uppercase;letter-spacing:.03em}
.tile big{display:block;font-size:19px;font-weight:600;margin:2px 0}.tile small{color:#6b7280}
.card{background:#fff;border-radius:8px;padding:10px 12px;box-shadow:0 1px 2px #0001;overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:13px}th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #e5e7eb;white-space:nowrap}
th{color:#6b7280;font-weight:600}td.wrap{white-space:normal}
.tag{display:inline-block;border-radius:4px;padding:0 6px;color:#fff;font-size:12px}
pre{background:#111827;color:#f9fafb;padding:8px 10px;border-radius:6px;margin:8px 0 0;white-space:pre-wrap;word-break:break-all}
.legend span{display:inline-block;margin-right:14px;font-size:13px}.legend i{display:inline-block;width:10px;height:10px;margin-right:4px;vertical-align:middle}
footer{color:#6b7280;font-size:12px;margin-top:18px}
"""
COLORS = {"delivered": "#16a34a", "failed": "#dc2626", "retried": "#f59e0b"}


def chart_svg(chart: list[tuple[str, int, int, int]]) -> str:
    width, height, left, bottom, top = 720, 170, 34, 22, 8
    slot = (width - left - 4) / max(1, len(chart))
    peak = max([d + f + r for _, d, f, r in chart] + [1])
    scale = (height - bottom - top) / peak
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="100%" role="img" '
             f'aria-label="Entregas e falhas por minuto na última hora" xmlns="http://www.w3.org/2000/svg">',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width}" y2="{height - bottom}" stroke="#9ca3af"/>',
             f'<text x="{left - 4}" y="{top + 10}" text-anchor="end" font-size="11" fill="#6b7280">{peak}</text>',
             f'<text x="{left - 4}" y="{height - bottom}" text-anchor="end" font-size="11" fill="#6b7280">0</text>']
    for index, (label, delivered, failed, retried) in enumerate(chart):
        x = left + index * slot + 1
        y = height - bottom
        parts.append(f'<g class="minute" data-minute="{label}" data-delivered="{delivered}" '
                     f'data-failed="{failed}" data-retried="{retried}"><title>{label}: {delivered} '
                     f'entregue(s), {failed} falha(s), {retried} repetição(ões)</title>')
        for value, color in ((delivered, COLORS["delivered"]), (failed, COLORS["failed"]),
                             (retried, COLORS["retried"])):
            if value:
                h = value * scale
                y -= h
                parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{slot - 2:.1f}" height="{h:.1f}" fill="{color}"/>')
        parts.append("</g>")
        if index % 10 == 0 or index == len(chart) - 1:
            anchor = "end" if index == len(chart) - 1 else "middle"
            parts.append(f'<text x="{min(x + slot / 2, width - 2):.1f}" y="{height - 6}" text-anchor="{anchor}" '
                         f'font-size="11" fill="#6b7280">{label}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _table(headers: tuple[str, ...], rows, wrap: int | None = None) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(
        f'<td{" class=wrap" if i == wrap else ""}>{cell}</td>' for i, cell in enumerate(row)) + "</tr>"
        for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_page(page: Page) -> str:
    e = escape
    b = page.banner
    tiles = "".join(f'<div class="tile"><b>{e(label)}</b><big>{e(value)}</big><small>{e(detail)}</small></div>'
                    for label, value, detail in page.tiles)
    outcome_rows = []
    for when, cod, items, status, took, outcome, key in page.outcomes:
        text, css = OUTCOMES.get(outcome, (outcome, "info"))
        outcome_rows.append((e(when), e(cod), e(items), e(status), e(took),
                             f'<span class="tag {css}">{e(text)}</span>', f"<code>{e(key)}</code>"))
    outcomes = (_table(("Hora", "Solicitação", "Itens", "HTTP", "Duração", "Resultado", "Idempotency-Key"),
                       outcome_rows) if outcome_rows else "<p>Nenhum envio desde a partida do monitor.</p>")
    f = page.failures
    if f.count:
        failures = (_table(("Motivo", "Arquivos", "Mais antiga", "Solicitações"),
                           [tuple(e(c) for c in row) for row in page.failure_rows], wrap=0)
                    + "".join(f"<p>Arquivo ilegível (deixado no lugar): <code>{e(n)}</code></p>"
                              for n in f.unreadable[:20])
                    + (f"<p>Mais {f.unread} arquivo(s) não lidos.</p>" if f.unread else "")
                    + "<p>Depois de corrigir a causa, reenvie na pasta do projeto com:</p>"
                    + f'<pre class="replay">{e(page.replay)}</pre>')
    else:
        failures = "<p>Nenhuma falha aguardando.</p>"
    legend = "".join(f'<span><i style="background:{COLORS[k]}"></i>{e(t)}</span>' for k, t in
                     (("delivered", "entregas"), ("failed", "falhas (FAILED_DIR)"),
                      ("retried", "falhas transitórias (repetidas)")))
    settings = _table(("Configuração", "Valor"), [(e(k), e(v)) for k, v in page.settings], wrap=1)
    return (
        '<!DOCTYPE html><html lang="pt-BR"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{e(b.text)} · {e(page.title)}</title><style>{CSS}</style></head><body><main>"
        f"<h1>{e(page.title)}</h1>"
        f'<section class="banner {b.css}" id="estado"><strong>{e(b.text)}</strong>'
        f"<span>{e(b.since)} — {e(b.note)}</span></section>"
        f'<section class="tiles">{tiles}</section>'
        '<h2>Entregas e falhas por minuto (última hora)</h2>'
        f'<div class="card">{chart_svg(page.chart)}<div class="legend">{legend}</div></div>'
        f'<h2 id="falhas">Falhas aguardando em FAILED_DIR: {f.count} arquivo(s)</h2>'
        f'<div class="card">{failures}</div>'
        f'<h2>Últimos {len(page.outcomes)} resultados</h2><div class="card">{outcomes}</div>'
        f'<h2>Configuração em uso</h2><div class="card">{settings}</div>'
        f"<footer>Atualizado às {e(page.generated)}; a página se atualiza a cada {REFRESH_SECONDS} s. "
        "Dados do próprio monitor, em memória: esta página não consulta o banco.</footer>"
        "</main></body></html>")


# ---------------------------------------------------------------- access
def authorized(expected: str, headers: Mapping[str, str], query: str) -> bool:
    """STATUS_TOKEN given as `X-Status-Token`, `Authorization: Bearer` or `?token=`;
    no token configured means open (the server then listens on loopback only)."""
    if not expected:
        return True
    offered = [headers.get("X-Status-Token") or ""]
    auth = headers.get("Authorization") or ""
    if auth[:7].lower() == "bearer ":
        offered.append(auth[7:].strip())
    offered += parse_qs(query).get("token", [])
    want = expected.encode()
    return any(hmac.compare_digest(candidate.encode(), want) for candidate in offered if candidate)


class Console:
    """What the HTTP server calls: `render()` and `authorized()`."""

    def __init__(self, board: StatusBoard, settings: Settings, *, env_file: str | None = None,
                 scan: FailureScan | None = None):
        self.board, self.settings = board, settings
        self.env_file = env_file
        self.scan = scan or FailureScan(settings.failed_dir)

    def page(self) -> Page:
        return build_page(self.board.snapshot(), self.settings, self.scan.summary(),
                          env_file=self.env_file)

    def render(self) -> str:
        return render_page(self.page())

    def authorized(self, headers: Mapping[str, str], query: str) -> bool:
        return authorized(self.settings.status_token, headers, query)
