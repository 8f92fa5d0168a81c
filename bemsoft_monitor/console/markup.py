"""The console's HTML: one self-contained page (inline CSS, inline SVG, no JavaScript, refreshes
itself) made of the panels' sections, and the small helpers panels write with. Every text
that reaches the page passes through `escape`."""
from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from .page import Page
    from .panels.base import Panel

REFRESH_SECONDS = 5

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


def table(headers: Iterable[str], rows: Iterable[Iterable[str]], wrap: int | None = None) -> str:
    """A table; `headers` are text (escaped here), `rows` are HTML (escape their text first).
    Column `wrap` may break lines."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(
        f'<td{" class=wrap" if i == wrap else ""}>{cell}</td>' for i, cell in enumerate(row)) + "</tr>"
        for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def tag(text: str, css: str) -> str:
    """A coloured label; `css` is one of ok, bad, warn, info."""
    return f'<span class="tag {css}">{escape(text)}</span>'


def section(panel: Panel, view: Any) -> str:
    body = panel.render(view)
    heading = panel.heading(view)
    if not heading:
        return body
    anchor = f' id="{escape(panel.anchor)}"' if panel.anchor else ""
    return f'<h2{anchor}>{escape(heading)}</h2><div class="card">{body}</div>'


def render_page(page: Page) -> str:
    e = escape
    css = CSS + "".join(dict.fromkeys(panel.css for panel, _ in page.sections))
    return (
        '<!DOCTYPE html><html lang="pt-BR"><head><meta charset="utf-8">'
        + (f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' if page.refresh else "")
        + '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{e(page.state)} · {e(page.title)}</title><style>{css}</style></head><body><main>"
        f"<h1>{e(page.title)}</h1>"
        + "".join(section(panel, view) for panel, view in page.sections)
        + f"<footer>Atualizado às {e(page.generated)}; "
        + (f"a página se atualiza a cada {REFRESH_SECONDS} s. " if page.refresh else
           "a página com uma busca não se atualiza sozinha. ")
        + "Dados do próprio monitor, em memória; só a busca consulta o banco.</footer>"
        "</main></body></html>")
