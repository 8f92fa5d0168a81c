"""Alertas: who is told when something needs a person — the channels, the last message
sent, the last error of a channel and the incidents open now."""
from __future__ import annotations

from dataclasses import dataclass
from html import escape

from ..markup import table
from ..words import ago, moment
from .base import Context, Panel


@dataclass(frozen=True)
class AlertsPanelView:
    note: str                                  # when there is nothing else to show
    channels: tuple[tuple[str, str, str], ...]  # channel, target (masked), state
    facts: tuple[tuple[str, str], ...]          # label, text
    incidents: tuple[tuple[str, str], ...]      # what, since


class AlertsPanel(Panel):
    anchor = "alertas"
    title = "Alertas"

    def build(self, ctx: Context) -> AlertsPanelView:
        view, tz, now = ctx.alerts, ctx.tz, ctx.snap.now
        if ctx.settings.dry_run:
            return AlertsPanelView("DRY_RUN: nenhum alerta é enviado.", (), (), ())
        if view is None:
            return AlertsPanelView("Nenhum canal de alerta configurado: ninguém é avisado quando algo "
                                   "precisa de uma pessoa. Defina ALERT_EMAIL_TO, ALERT_WEBHOOK_URL "
                                   "ou HEARTBEAT_URL (veja Alertas no README).", (), (), ())

        def at(ts: float) -> str:
            return f"{moment(ts, tz, now)} ({ago(now - ts)})"

        facts = [("Última mensagem enviada", "nenhuma desde a partida" if view.last_sent is None
                  else f"{at(view.last_sent[0])} por {view.last_sent[1]}: {view.last_sent[2]}")]
        if view.last_error is not None:
            facts.append(("Último erro de um canal", f"{at(view.last_error[0])} em "
                                                     f"{view.last_error[1]}: {view.last_error[2]}"))
        if view.queued or view.dropped:
            facts.append(("Na fila", f"{view.queued} mensagem(ns)"
                          + (f"; {view.dropped} descartada(s) por fila cheia" if view.dropped else "")))
        incidents = tuple((what, f"desde {at(since)}") for what, since in view.open_incidents)
        return AlertsPanelView("", view.channels, tuple(facts), incidents)

    def render(self, view: AlertsPanelView) -> str:
        if view.note:
            return f"<p>{escape(view.note)}</p>"
        parts = [table(("Canal", "Destino", "Situação"),
                       [tuple(escape(c) for c in row) for row in view.channels], wrap=1)]
        parts += [f"<p><b>{escape(label)}:</b> {escape(text)}</p>" for label, text in view.facts]
        if view.incidents:
            parts.append(table(("Problema aberto", "Desde"),
                               [tuple(escape(c) for c in row) for row in view.incidents]))
        else:
            parts.append("<p>Nenhum problema aberto.</p>")
        return "".join(parts)
