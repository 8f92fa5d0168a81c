"""The last outcomes, newest first: one row per send, with its Idempotency-Key."""
from __future__ import annotations

from html import escape

from ...status import DELIVERED, DUPLICATE, FAILED, RETRY, SIMULATED
from ..markup import table, tag
from ..words import millis, moment
from .base import Context, Panel

OUTCOMES = {  # outcome -> (text, css class)
    DELIVERED: ("entregue", "ok"),
    DUPLICATE: ("já recebida (409)", "ok"),
    SIMULATED: ("simulado (DRY_RUN)", "warn"),
    FAILED: ("falhou (FAILED_DIR)", "bad"),
    RETRY: ("será repetido", "warn"),
}
HEADERS = ("Hora", "Solicitação", "Itens", "HTTP", "Duração", "Resultado", "Idempotency-Key")

Row = tuple[str, str, str, str, str, str, str]   # time, solicitation, items, HTTP, took, outcome, key


class RecentPanel(Panel):
    anchor = "resultados"

    def build(self, ctx: Context) -> list[Row]:
        snap, tz = ctx.snap, ctx.tz
        return [(moment(o.at, tz, snap.now), o.cod, str(o.items),
                 "—" if o.http_status is None else str(o.http_status), millis(o.duration),
                 o.outcome, o.key) for o in snap.outcomes]

    def heading(self, view: list[Row]) -> str:
        return f"Últimos {len(view)} resultados"

    def render(self, view: list[Row]) -> str:
        if not view:
            return "<p>Nenhum envio desde a partida do monitor.</p>"
        e = escape
        return table(HEADERS, [(e(when), e(cod), e(items), e(status), e(took),
                                tag(*OUTCOMES.get(outcome, (outcome, "info"))), f"<code>{e(key)}</code>")
                               for when, cod, items, status, took, outcome, key in view])
