"""The console's panels, in the order the page shows them. A new panel is one module here
(a `Panel` subclass, see `base`) and one line below."""
from __future__ import annotations

from .alerts import AlertsPanel
from .base import Context, Panel
from .chart import ChartPanel
from .configuration import ConfigurationPanel
from .failed_dir import FailedDirPanel
from .recent import RecentPanel
from .search import SearchPanel
from .state import StatePanel

PANELS: tuple[Panel, ...] = (
    StatePanel(),
    SearchPanel(),
    ChartPanel(),
    FailedDirPanel(),
    AlertsPanel(),
    RecentPanel(),
    ConfigurationPanel(),
)

__all__ = ["PANELS", "Context", "Panel"]
