"""Who may see the console: STATUS_TOKEN."""
from __future__ import annotations

import hmac
from typing import Mapping
from urllib.parse import parse_qs


def authorized(expected: str, headers: Mapping[str, str], query: str) -> bool:
    """STATUS_TOKEN given as `X-Status-Token`, `Authorization: Bearer` or `?token=`;
    no token configured means open (the server then listens on loopback only)."""
    if not expected:
        return True
    offered = [headers.get("X-Status-Token") or ""]
    auth = headers.get("Authorization") or ""
    if auth[:7].lower() == "bearer ":
        offered.append(auth[7:].strip())
    offered += parse_qs(query).get("token", [])
    want = expected.encode()
    return any(hmac.compare_digest(candidate.encode(), want) for candidate in offered if candidate)
