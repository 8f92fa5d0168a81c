"""Busca: "where is order 43335?" — a plain GET form (no JavaScript) and, for `?busca=`, the
order's story as `--trace` tells it (bemsoft_monitor.trace), drawn as tables. With
STATUS_TOKEN the form asks for the token too: a GET form sends only its own fields, and
the page never carries the token itself."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from html import escape

from ...db import DatabaseUnavailable, first_line
from ...trace import (WHERE_TEXT, QueryError, State, Story, items_text, step_text, step_time)
from ..markup import table, tag
from .base import Context, Panel

log = logging.getLogger(__name__)

SEARCH_PARAM = "busca"
MAX_SEARCH = 80       # characters of the search shown back

STATE_CSS = {State.DELIVERED: "ok", State.REPLAYED: "ok", State.FAILED_DIR: "bad",
             State.FAILED_GONE: "bad", State.NOFILE: "bad", State.MISSED: "bad",
             State.OTHER_LAB: "info", State.BEFORE_START: "info", State.NOT_IN_LIS: "info"}
STATE_LABEL = {
    State.DELIVERED: "entregue", State.REPLAYED: "entregue pelo reenvio",
    State.FAILED_DIR: "em FAILED_DIR", State.REPLAYING: "sendo reenviado",
    State.FAILED_GONE: "falhou", State.SENDING: "aguardando a API", State.NOFILE: "recusado",
    State.HELD: "aguardando agrupamento", State.UNREAD: "ainda não lido", State.LATE: "commit tardio",
    State.MISSED: "fora da janela", State.BEFORE_START: "antes do início",
    State.OTHER_LAB: "outro laboratório", State.NO_MONITOR: "monitor não rodou",
    State.NOT_IN_LIS: "fora do LIS",
}


@dataclass(frozen=True)
class SearchView:
    asked: str                   # the search as typed (cut), "" when none
    token_field: bool            # STATUS_TOKEN is set: the form asks for it
    error: str = ""              # pt-BR: the search names nothing, the database failed
    story: Story | None = None
    steps: tuple[tuple[str, str, str], ...] = ()   # time, items, what happened (pt-BR)
    typing: bool = False         # `?busca=` (even empty): the page does not reload under the field


class SearchPanel(Panel):
    anchor = "busca"
    title = "Buscar uma solicitação"
    css = (".search{display:flex;flex-wrap:wrap;gap:8px;align-items:end;margin:0 0 6px}"
           ".search label{display:flex;flex-direction:column;font-size:12px;color:#6b7280}"
           ".search input{font:inherit;padding:4px 8px;min-width:220px}"
           ".search button{font:inherit;padding:5px 14px}")

    def build(self, ctx: Context) -> SearchView:
        asked = ctx.param(SEARCH_PARAM)[:MAX_SEARCH]
        token_field = bool(ctx.settings.status_token)
        if not asked:
            return SearchView("", token_field, typing=SEARCH_PARAM in ctx.query)
        if ctx.trace is None:
            return SearchView(asked, token_field, "a busca consulta o banco: use-a no painel do "
                              "monitor em execução (METRICS_PORT) ou com python monitor_bemsoft.py "
                              "--trace")
        try:
            story = ctx.trace(asked)
        except QueryError as err:
            return SearchView(asked, token_field, str(err))
        except DatabaseUnavailable as err:
            return SearchView(asked, token_field, str(err))
        except Exception as err:  # the database failed or a bug: this search only, never the page
            log.warning("Busca no painel falhou: %s", first_line(err), exc_info=log.isEnabledFor(logging.DEBUG))
            return SearchView(asked, token_field, f"não foi possível consultar o banco agora "
                                                  f"({first_line(err, 200)})")
        steps = tuple((step_time(s, ctx.tz), items_text(s.item_ids), step_text(s)) for s in story.steps)
        return SearchView(asked, token_field, "", story, steps)

    def render(self, view: SearchView) -> str:
        e = escape
        form = ('<form class="search" method="get" action="/">'
                '<label>Solicitação ou item<input type="search" name="busca" '
                f'value="{e(view.asked)}" placeholder="43335 ou item:52009" maxlength="{MAX_SEARCH}">'
                "</label>"
                + ('<label>STATUS_TOKEN<input type="password" name="token" '
                   'autocomplete="current-password"></label>' if view.token_field else "")
                + '<button type="submit">Buscar</button></form>')
        if view.error:
            return form + f'<p class="search-error">{tag("Busca", "warn")} {e(view.error)}</p>'
        story = view.story
        if story is None:
            # the page reloads every few seconds and would wipe a search half typed: a plain
            # link opens it without reloading (with STATUS_TOKEN the link would lose the
            # token, which the page never carries: the first search stops the reloading)
            pause = ("" if view.typing or view.token_field else
                     ' <a href="/?busca=#busca">Parar a atualização automática para digitar</a>.')
            return form + ("<p>A história de uma solicitação (ou de um item, com item:CodItemSol): "
                           "cada envio com a chave e a resposta, falhas, reenvios e o que está "
                           "pendente. O mesmo que python monitor_bemsoft.py --trace." + pause + "</p>")
        found = (tag(("registrada" if story.query.kind == "sol" else "registrado") + " pelo monitor", "ok")
                 if story.found else tag("sem registro do monitor", "warn"))
        parts = [form, f'<p class="story-head"><b>{e(story.query.label)}</b> {found}</p>']
        parts += [f"<p>{e(line)}</p>" for line in story.lis + story.notes]
        if story.items:
            parts.append(table(("Item", "Exame", "Entrada (LIS)", "Situação", "Por quê"), [
                (e(str(i.item_id)), e(i.exam), e(i.entered),
                 tag(STATE_LABEL.get(i.state, i.state), STATE_CSS.get(i.state, "warn")), e(i.text))
                for i in story.items], wrap=4))
        if view.steps:
            parts.append(f"<h3>História (hora local, {e(story.tz)}; mais antigo primeiro)</h3>")
            parts.append(table(("Hora", "Itens", "O que aconteceu"),
                               [tuple(e(c) for c in row) for row in view.steps], wrap=2))
        if story.files:
            parts.append("<h3>Arquivos de falha</h3>")
            parts.append(table(("Arquivo", "Onde", "Itens", "Chave", "HTTP", "Motivo"), [
                (f"<code>{e(f.name)}</code>", e(WHERE_TEXT.get(f.where, f.where)),
                 e(", ".join(str(i) for i in f.item_ids)), f"<code>{e(f.key)}</code>",
                 e("—" if f.http_status is None else str(f.http_status)), e(f.reason))
                for f in story.files], wrap=5))
        if story.found:
            pending = story.pending
            parts.append("<p>Nada pendente: todos os itens foram entregues.</p>" if not pending else
                         "<p><b>Pendente:</b></p><ul>" + "".join(
                             f"<li>item {e(str(i.item_id))}: {e(i.text)}</li>" for i in pending) + "</ul>")
        else:
            parts.append("<p>O monitor nunca registrou "
                         + ("esta solicitação.</p>" if story.query.kind == "sol" else "este item.</p>"))
        return "".join(parts)
