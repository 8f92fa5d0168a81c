"""The one redaction every text from outside passes through before it reaches a log line,
`--check`, `--verbose` or a failure file: exception messages, API answers, driver errors."""
from __future__ import annotations

import re

from .config import Settings

MASK = "***"
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s:]*:[^/@\s]*@")
_ODBC_PASSWORD = re.compile(r"(?i)\b(PWD|password)\s*=\s*(\{(?:[^}]|\}\})*\}|[^;\s]*)")
_AUTH_HEADER = re.compile(r"(?i)\b((?:proxy-)?authorization\s*[:=]\s*\S+\s+)\S+")


def redact(text: str, settings: Settings | None) -> str:
    """`text` without the token, proxy credentials or database password, whether they appear
    as themselves, inside a URL (`scheme://user:password@`), as `PWD=` in an ODBC string or
    after an Authorization header."""
    text = str(text)
    text = _USERINFO.sub(r"\1" + MASK + "@", text)
    text = _ODBC_PASSWORD.sub(r"\1=" + MASK, text)
    text = _AUTH_HEADER.sub(r"\1" + MASK, text)
    if settings is not None:
        for secret in settings.secrets():
            text = text.replace(secret, MASK)
    return text
