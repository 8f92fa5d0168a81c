"""The state banner (is it working? since when?) and the tiles with the figures."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from html import escape

from ...status import (API_DOWN, DB_DOWN, DRY_RUN, SENDING, STANDBY, STARTING, TOKEN_REFUSED,
                       UP_TO_DATE, Snapshot, count_items)
from ..words import ago, backlog_detail, checkpoint_text, millis, moment
from .base import Context, Panel

STATES = {  # state -> (banner text, css class)
    STARTING: ("Iniciando", "info"),
    SENDING: ("Enviando", "ok"),
    UP_TO_DATE: ("Em dia", "ok"),
    API_DOWN: ("API indisponível — envio pausado", "bad"),
    DB_DOWN: ("Banco indisponível", "bad"),
    STANDBY: ("Em espera", "info"),
    TOKEN_REFUSED: ("Token recusado pela API", "bad"),
    DRY_RUN: ("DRY_RUN", "warn"),
}
STATE_NOTES = {
    STARTING: "o monitor está conectando e lendo o checkpoint",
    SENDING: "há pedidos sendo enviados",
    UP_TO_DATE: "nada esperando envio",
    API_DOWN: "nada é descartado: o envio retoma sozinho",
    DB_DOWN: "reconectando sozinho; nada é enviado nem perdido enquanto isso",
    STANDBY: "outro monitor com o mesmo MONITOR_NAME está ativo; este assume quando ele parar",
    TOKEN_REFUSED: "confira BEMSOFT_TOKEN no .env; nada vai para FAILED_DIR: os pedidos esperam "
                   "com a mesma chave e o envio retoma sozinho quando o token for aceito",
    DRY_RUN: "BEMSOFT_DRY_RUN=1: nada é enviado nem gravado",
}


@dataclass(frozen=True)
class Banner:
    text: str
    css: str
    since: str
    note: str


@dataclass(frozen=True)
class StateView:
    banner: Banner
    tiles: list[tuple[str, str, str]]   # label, value, detail


def banner(snap: Snapshot, tz) -> Banner:
    text, css = STATES.get(snap.state, (snap.state, "info"))
    if snap.state == API_DOWN and snap.paused_until:
        text += f" até {dt.datetime.fromtimestamp(snap.paused_until, tz):%H:%M:%S}"
    elif snap.state == TOKEN_REFUSED and snap.paused_until:
        text += f" — nova tentativa às {dt.datetime.fromtimestamp(snap.paused_until, tz):%H:%M:%S}"
    return Banner(text, css, f"desde {moment(snap.since, tz, snap.now)} ({ago(snap.now - snap.since)})",
                  STATE_NOTES.get(snap.state, ""))


def tiles(snap: Snapshot, tz) -> list[tuple[str, str, str]]:
    return [
        ("Checkpoint", checkpoint_text(snap.checkpoint), "último CodItemSol com resultado registrado"),
        ("Backlog", "—" if snap.backlog is None else count_items(snap.backlog),
         backlog_detail(snap.backlog_more) + ", ainda sem resultado"),
        ("Última entrega", "nenhuma" if snap.last_delivery is None else moment(snap.last_delivery, tz, snap.now),
         "" if snap.last_delivery is None else ago(snap.now - snap.last_delivery)),
        ("Entregas", f"{snap.delivered_today} hoje", f"{snap.delivered_hour} na última hora"),
        ("Falhas", f"{snap.failed_today} hoje", f"{snap.failed_hour} na última hora"),
        ("Latência da API", millis(snap.latency_median), f"mediana; p95 {millis(snap.latency_p95)}"),
    ]


class StatePanel(Panel):
    anchor = "estado"

    def build(self, ctx: Context) -> StateView:
        return StateView(banner(ctx.snap, ctx.tz), tiles(ctx.snap, ctx.tz))

    def render(self, view: StateView) -> str:   # no heading: the banner is the frame
        e, b = escape, view.banner
        cells = "".join(f'<div class="tile"><b>{e(label)}</b><big>{e(value)}</big><small>{e(detail)}</small></div>'
                        for label, value, detail in view.tiles)
        return (f'<section class="banner {b.css}" id="{self.anchor}"><strong>{e(b.text)}</strong>'
                f"<span>{e(b.since)} — {e(b.note)}</span></section>"
                f'<section class="tiles">{cells}</section>')
