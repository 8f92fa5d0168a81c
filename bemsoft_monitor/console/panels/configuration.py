"""The settings in use, without secrets: `settings_rows` is the one list of what is shown."""
from __future__ import annotations

from html import escape

from ...config import Settings
from ..markup import table
from ..words import mask_url
from .base import Context, Panel


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


class ConfigurationPanel(Panel):
    anchor = "configuracao"
    title = "Configuração em uso"

    def build(self, ctx: Context) -> list[tuple[str, str]]:
        return settings_rows(ctx.settings)

    def render(self, view: list[tuple[str, str]]) -> str:
        return table(("Configuração", "Valor"), [(escape(k), escape(v)) for k, v in view], wrap=1)
