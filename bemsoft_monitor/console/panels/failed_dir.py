"""FAILED_DIR grouped by reason, and the exact command that replays it."""
from __future__ import annotations

from dataclasses import dataclass
from html import escape

from ..markup import table
from ..scan import FailureSummary
from ..words import local_iso, replay_command
from .base import Context, Panel


@dataclass(frozen=True)
class FailuresView:
    summary: FailureSummary
    rows: list[tuple[str, str, str, str]]   # reason, files, oldest, solicitations
    replay: str


class FailedDirPanel(Panel):
    anchor = "falhas"

    def build(self, ctx: Context) -> FailuresView:
        rows = [(g.reason, str(g.count), local_iso(g.oldest, ctx.tz), ", ".join(g.cods))
                for g in ctx.failures.groups]
        return FailuresView(ctx.failures, rows, replay_command(ctx.settings.failed_dir, ctx.env_file))

    def heading(self, view: FailuresView) -> str:
        return f"Falhas aguardando em FAILED_DIR: {view.summary.count} arquivo(s)"

    def render(self, view: FailuresView) -> str:
        e, f = escape, view.summary
        if not f.count:
            return "<p>Nenhuma falha aguardando.</p>"
        return (table(("Motivo", "Arquivos", "Mais antiga", "Solicitações"),
                      [tuple(e(c) for c in row) for row in view.rows], wrap=0)
                + "".join(f"<p>Arquivo ilegível (deixado no lugar): <code>{e(n)}</code></p>"
                          for n in f.unreadable[:20])
                + (f"<p>Mais {f.unread} arquivo(s) não lidos.</p>" if f.unread else "")
                + "<p>Depois de corrigir a causa, reenvie na pasta do projeto com:</p>"
                + f'<pre class="replay">{e(view.replay)}</pre>')
