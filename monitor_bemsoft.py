#!/usr/bin/env python3
"""Monitor SQL -> Bemsoft. Thin entry point: the logic lives in the bemsoft_monitor package.

    python monitor_bemsoft.py [--env-file .env] [--once | --drain | --check | --status | --demo]
"""
from __future__ import annotations

import sys


def send_to_bemsoft(event: dict, env_file: str | None = None):
    """Send one stored event (e.g. `json.load(open(failure_file))['event']`) with the current
    settings and catalog; returns the Delivery (outcome, HTTP status, reason)."""
    from bemsoft_monitor.app import make_catalog, make_client
    from bemsoft_monitor.config import load_settings
    from bemsoft_monitor.replay import send_event

    settings = load_settings(env_file)
    if settings.dry_run:
        raise RuntimeError("BEMSOFT_DRY_RUN=1: defina BEMSOFT_DRY_RUN=0 e BEMSOFT_TOKEN para enviar")
    client = make_client(settings)
    try:
        return send_event(event, settings, client, make_catalog(settings, client))
    finally:
        client.close()


if __name__ == "__main__":
    from bemsoft_monitor.cli import main

    sys.exit(main())
