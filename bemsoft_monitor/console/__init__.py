"""The operator console (`/` on the metrics server) and the words `--status` shares with it.

`Console` is what the HTTP server calls. A page load builds a `Context` (a StatusBoard
snapshot, the settings, a FAILED_DIR summary, the request's query), lets each panel of
`panels.PANELS` build its view from it (`page`) and writes them as one self-contained HTML
page (`markup`: inline CSS, an inline SVG chart, no JavaScript, refreshes itself). `words`
holds what `--status` says the same way, `scan` reads FAILED_DIR, `access` checks
STATUS_TOKEN. Only the search queries the database (through the `trace` it is given: an
order's story, see `bemsoft_monitor.trace`), and nothing here may show patient data: failure
files are read only for their reason (generalised, see `scan.reason_group`), time,
solicitation code, items and status. The console imports neither the loop nor the CLI.
"""
from __future__ import annotations

import threading
from typing import Mapping
from urllib.parse import parse_qs

from ..config import Settings
from ..redaction import redact
from ..status import StatusBoard
from ..trace import QueryError
from .access import authorized
from .markup import render_page
from .page import Page, build_page
from .panels import PANELS, Panel
from .scan import FailureScan


class Console:
    """What the HTTP server calls: `render(query)` and `authorized(headers, query)`."""

    def __init__(self, board: StatusBoard, settings: Settings, *, env_file: str | None = None,
                 scan: FailureScan | None = None, panels: tuple[Panel, ...] = PANELS,
                 alerts=None, trace=None):
        """`alerts`: the running Alerter (its `view()` feeds the Alertas panel), if any;
        `trace`: what answers the search (a `trace.Tracer` on the monitor's database)."""
        self.board, self.settings = board, settings
        self.alerts = alerts
        self.trace = one_search_at_a_time(trace)
        self.env_file = env_file
        self.scan = scan or FailureScan(settings.failed_dir)
        self.panels = panels

    def page(self, query: str = "") -> Page:
        params = parse_qs(query, keep_blank_values=True)   # `?busca=`: the search, typed
        params.pop("token", None)   # the credential is checked by `authorized`, never shown
        return build_page(self.board.snapshot(), self.settings, self.scan.summary(),
                          env_file=self.env_file, query=params, panels=self.panels,
                          alerts=self.alerts.view() if self.alerts is not None else None,
                          trace=self.trace)

    def render(self, query: str = "") -> str:
        """The page, through the one redaction every output passes: no secret, and control
        characters from LIS codes shown escaped (HTML escaping leaves them raw)."""
        return redact(render_page(self.page(query)), self.settings)

    def authorized(self, headers: Mapping[str, str], query: str) -> bool:
        return authorized(self.settings.status_token, headers, query)


BUSY = ("outra busca está em andamento no painel; tente de novo em alguns segundos "
        "(ou use python monitor_bemsoft.py --trace)")


def one_search_at_a_time(trace):
    """The search on the monitor's own database connections: one at a time, so that many
    searches (or a slow database) never take the connections the deliveries need."""
    if trace is None:
        return None
    lock = threading.Lock()

    def search(text: str):
        if not lock.acquire(blocking=False):
            raise QueryError(BUSY)
        try:
            return trace(text)
        finally:
            lock.release()
    return search


__all__ = ["Console"]
