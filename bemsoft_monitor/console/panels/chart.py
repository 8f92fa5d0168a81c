"""Deliveries, failures and retries per minute over the last hour, as an inline SVG."""
from __future__ import annotations

import datetime as dt
from html import escape

from .base import Context, Panel

COLORS = {"delivered": "#16a34a", "failed": "#dc2626", "retried": "#f59e0b"}
LEGEND = (("delivered", "entregas"), ("failed", "falhas (FAILED_DIR)"),
          ("retried", "falhas transitórias (repetidas)"))

Minute = tuple[str, int, int, int]   # HH:MM, delivered, failed, retried


def chart_svg(chart: list[Minute]) -> str:
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


class ChartPanel(Panel):
    anchor = "grafico"
    title = "Entregas e falhas por minuto (última hora)"

    def build(self, ctx: Context) -> list[Minute]:
        return [(f"{dt.datetime.fromtimestamp(m.start, ctx.tz):%H:%M}", m.delivered, m.failed, m.retried)
                for m in ctx.snap.minutes]

    def render(self, view: list[Minute]) -> str:
        legend = "".join(f'<span><i style="background:{COLORS[k]}"></i>{escape(t)}</span>' for k, t in LEGEND)
        return f'{chart_svg(view)}<div class="legend">{legend}</div>'
