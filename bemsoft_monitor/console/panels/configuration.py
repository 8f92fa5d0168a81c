"""The settings in use, without secrets. The rows come from the settings declarations
(`config_docs.config_rows`): every setting the operator set, the few that always matter,
each shown by its kind (secrets never, credentials in URLs masked), and the proxy in use."""
from __future__ import annotations

from html import escape

from ...config_docs import config_rows
from ..markup import table
from .base import Context, Panel


class ConfigurationPanel(Panel):
    anchor = "configuracao"
    title = "Configuração em uso"

    def build(self, ctx: Context) -> list[tuple[str, str]]:
        return config_rows(ctx.settings)

    def render(self, view: list[tuple[str, str]]) -> str:
        return table(("Configuração", "Valor"), [(escape(k), escape(v)) for k, v in view], wrap=1)
