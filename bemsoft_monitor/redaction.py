"""The one redaction every text from outside passes through before it reaches a log line,
`--check`, `--verbose` or a failure file: exception messages, API answers, driver errors."""
from __future__ import annotations

import logging
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
    # cheap tests first: this runs on every log line
    if "://" in text and "@" in text:
        text = _USERINFO.sub(r"\1" + MASK + "@", text)
    if "=" in text or "authorization" in text.lower():
        text = _ODBC_PASSWORD.sub(r"\1=" + MASK, text)
        text = _AUTH_HEADER.sub(r"\1" + MASK, text)
    if settings is not None:
        for secret in settings.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
    return text


class RedactingFormatter(logging.Formatter):
    """Every log line, traceback included, through `redact` (logging is where exception
    texts most often end up)."""

    def __init__(self, fmt: str, settings: Settings):
        super().__init__(fmt)
        self.settings = settings

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), self.settings)


class RedactedStream:
    """A text stream whose every write goes through `redact` (the output of --check and
    --status, where error texts are printed, not logged)."""

    def __init__(self, stream, settings: Settings):
        self.stream, self.settings = stream, settings
        self.encoding = getattr(stream, "encoding", None)

    def write(self, text: str) -> int:
        return self.stream.write(redact(text, self.settings))

    def flush(self) -> None:
        self.stream.flush()
