"""The console's view model: one page load, each panel's view built from the same `Context`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..config import Settings
from ..status import Snapshot
from .panels import PANELS, Context, Panel
from .panels.search import SEARCH_PARAM
from .panels.state import banner
from .scan import FailureSummary
from .words import moment


@dataclass(frozen=True)
class Page:
    title: str
    generated: str
    state: str                                  # the banner's words, for the window title
    sections: tuple[tuple[Panel, Any], ...]     # each panel with its view, in page order
    refresh: bool = True                        # reloads itself (not with ?busca=, even empty)

    def __getitem__(self, anchor: str) -> Any:
        """The view of the panel with this anchor: page["falhas"].rows."""
        for panel, view in self.sections:
            if panel.anchor == anchor:
                return view
        raise KeyError(anchor)


def build_page(snap: Snapshot, settings: Settings, failures: FailureSummary, *,
               env_file: str | None = None, query: Mapping[str, list[str]] | None = None,
               panels: tuple[Panel, ...] = PANELS, alerts=None, trace=None) -> Page:
    ctx = Context(snap, settings, failures, dict(query or {}), env_file, alerts, trace)
    return Page(title=f"Monitor SQL → Bemsoft — {settings.monitor_name}",
                generated=moment(snap.now, settings.tz), state=banner(snap, settings.tz).text,
                sections=tuple((panel, panel.build(ctx)) for panel in panels),
                refresh=SEARCH_PARAM not in ctx.query)   # typing or reading a search
