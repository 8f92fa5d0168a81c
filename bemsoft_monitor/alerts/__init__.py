"""Alerts: when the monitor needs a person, it reaches one — by e-mail, a webhook, and a
heartbeat for when the monitor itself is gone (issue 15).

`incidents` decides what to say and when (pure), `notices` how it reads, `channels` how it
leaves, `dispatch` runs it all in a thread of its own that never holds up a delivery."""
from __future__ import annotations

import logging

from .channels import ChannelError, HeartbeatChannel, configured_channels
from .dispatch import Alerter, AlertsView
from .notices import TEST, Notice, render

__all__ = ["Alerter", "AlertsView", "build_alerter", "describe_channels", "send_test_alerts"]

log = logging.getLogger(__name__)


def build_alerter(settings, board, *, replay: str) -> Alerter | None:
    """The running monitor's alerter, or None when no channel is configured (the log and the
    console still say everything)."""
    channels = configured_channels(settings)
    return Alerter(settings, board, channels, replay=replay) if channels else None


def describe_channels(settings) -> list[tuple[str, str]]:
    """(channel, target) for each configured channel, secrets masked (`--check`, console)."""
    return [(c.name, c.describe()) for c in configured_channels(settings)]


def send_test_alerts(settings, host: str | None = None) -> list[tuple[str, str, str | None]]:
    """One test message on each configured channel, now: (channel, target, error or None)."""
    import socket
    host = host or socket.gethostname()
    notice = Notice("teste", TEST, "Mensagem de teste", (
        "Se você recebeu esta mensagem, este canal de alerta do monitor está funcionando.",
        "Nada precisa ser feito."))
    message = render(notice, settings, host)
    results = []
    for channel in configured_channels(settings):
        try:
            channel.send(message)
        except ChannelError as err:
            results.append((channel.name, channel.describe(), str(err)))
        else:
            results.append((channel.name, channel.describe(), None))
    return results
