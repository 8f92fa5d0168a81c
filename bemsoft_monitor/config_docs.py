"""What the settings declarations (`config.Settings`) write for people: `.env.example`, the
README's settings tables and the console's configuration rows. The files are generated
from the declarations, and a test fails when the committed ones differ:

    python -m bemsoft_monitor.config_docs --write     # rewrite .env.example and the README tables
    python -m bemsoft_monitor.config_docs --check     # exit 1 if they disagree
"""
from __future__ import annotations

import argparse
import re
import sys
import textwrap
from pathlib import Path

from .config import GROUPS, PROJECT_DIR, Declared, Settings, declared_fields

ENV_EXAMPLE = PROJECT_DIR / ".env.example"
README = PROJECT_DIR / "README.md"

ENV_HEADER = """\
# Configuração do monitor SQL -> Bemsoft.
# Copie para .env (cp .env.example .env) e ajuste. Linhas começando com # são comentários.
# Variáveis de ambiente do processo com o mesmo nome têm precedência sobre este arquivo.
# Cada chave está explicada nas tabelas de "Configuração (.env)" do README.
# (Gerado de bemsoft_monitor/config.py: python -m bemsoft_monitor.config_docs --write)
"""


def plain(text: str) -> str:
    """Markdown emphasis and code marks off, for a comment line."""
    return re.sub(r"\*\*|`", "", text)


def env_example() -> str:
    out = [ENV_HEADER]
    for group, title in GROUPS.items():
        out.append(f"\n# {'-' * 64} {title}\n")
        for _, declared in _in_group(group):
            for line in textwrap.wrap(plain(declared.help), 92):
                out.append(f"# {line}\n")
            value = declared.default_text if declared.example is None else declared.example
            out.append(f"{'# ' if declared.commented else ''}{declared.key}={value}\n")
            out += [f"# {other}={value}\n" for other in declared.names[1:]]
    return "".join(out)


def readme_table(group: str) -> str:
    rows = ["| chave | padrão | o que é |", "|---|---|---|"]
    for _, declared in _in_group(group):
        names = ", ".join(f"`{name}`" for name in declared.names)
        default = f"`{declared.default_text}`" if declared.default_text else "—"
        rows.append(f"| {names} | {default} | {declared.help} |")
    return "\n".join(rows)


def _marker(group: str) -> tuple[str, str]:
    return f"<!-- config:{group} (gerado: python -m bemsoft_monitor.config_docs --write) -->", \
           f"<!-- /config:{group} -->"


def readme_with_tables(text: str) -> str:
    """`text` (the README) with every generated table replaced by the current one."""
    for group in GROUPS:
        begin, end = _marker(group)
        pattern = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end), re.S)
        if not pattern.search(text):
            raise ValueError(f"README sem o bloco {begin}")
        text = pattern.sub(lambda _: f"{begin}\n{readme_table(group)}\n{end}", text)
    return text


def config_rows(settings: Settings) -> list[tuple[str, str]]:
    """The console's "Configuração em uso": every setting the operator set (or that always
    matters), shown by its kind — secrets never, credentials in URLs masked — and the proxy
    actually chosen."""
    rows = []
    for f, declared in declared_fields():
        if f.name not in settings.sources and declared.key not in ALWAYS_SHOWN:
            continue
        value = declared.kind.show(getattr(settings, f.name))
        if f.name not in settings.sources:
            value += " (padrão)"
        rows.append((declared.key, value))
    proxy = settings.proxy
    rows.append(("Proxy em uso", "nenhum (conexão direta)" if proxy is None
                 else f"{proxy.display} (de {proxy.source})"))
    return rows


ALWAYS_SHOWN = ("BEMSOFT_BASE_URL", "BEMSOFT_DRY_RUN", "BEMSOFT_CONCURRENCY", "MONITOR_NAME",
                "FAILED_DIR", "TERCEIROS")


def _in_group(group: str) -> list[tuple[object, Declared]]:
    return [(f, d) for f, d in declared_fields() if d.group == group]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bemsoft_monitor.config_docs",
                                     description="Gera .env.example e as tabelas de configuração "
                                                 "do README a partir das declarações.")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="reescreve os arquivos")
    mode.add_argument("--check", action="store_true", help="sai com 1 se estiverem diferentes")
    args = parser.parse_args(argv)
    wanted = {ENV_EXAMPLE: env_example(),
              README: readme_with_tables(README.read_text(encoding="utf-8"))}
    stale = [path for path, text in wanted.items() if path.read_text(encoding="utf-8") != text]
    if args.write:
        for path in stale:
            path.write_text(wanted[path], encoding="utf-8", newline="\n")
            print(f"reescrito: {path.relative_to(PROJECT_DIR)}")
        return 0
    for path in stale:
        print(f"desatualizado: {path.relative_to(PROJECT_DIR)} "
              "(rode python -m bemsoft_monitor.config_docs --write)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
