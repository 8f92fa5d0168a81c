"""The shape every panel of the console has.

A panel is one section of the page. `build(ctx)` reads what it needs from the request's
`Context` and returns its view (a small frozen value, easy to assert on in a test);
`render(view)` writes that view as HTML, every text escaped. The page puts the panels in
the order `PANELS` lists them, each under an `<h2 id="{anchor}">` with `heading(view)` and
inside a card; a panel whose `heading` is empty draws its own frame (the state banner).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ...config import Settings
from ...status import Snapshot
from ..scan import FailureSummary


@dataclass(frozen=True)
class Context:
    """What one page load knows: the monitor's state, the settings, FAILED_DIR and the
    request's query (parsed, without `token`: no panel ever sees the credential)."""
    snap: Snapshot
    settings: Settings
    failures: FailureSummary
    query: Mapping[str, list[str]] = field(default_factory=dict)
    env_file: str | None = None
    alerts: Any = None        # alerts.AlertsView, None when no channel is configured
    # the search's story (trace.Tracer: text -> Story, reads the database); None when the
    # console runs without a database (the page then says so)
    trace: Callable[[str], Any] | None = None

    @property
    def tz(self):
        return self.settings.tz

    def param(self, name: str) -> str:
        """The first value of `?name=` in the request, stripped; "" when absent."""
        return (self.query.get(name) or [""])[0].strip()


class Panel:
    """One section of the page; subclass it and register an instance in `panels.PANELS`."""
    anchor: str = ""    # the section's id, for links like /#falhas
    title: str = ""     # the heading; override `heading` when it depends on the view
    css: str = ""       # extra style rules the panel needs, added to the page once

    def build(self, ctx: Context) -> Any:
        raise NotImplementedError

    def heading(self, view: Any) -> str:
        return self.title

    def render(self, view: Any) -> str:
        raise NotImplementedError
