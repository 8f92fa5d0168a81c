"""The one redaction every text from outside passes through before it reaches a person: log
lines, `--check`, `--status`, `retry_failed` output, reasons and answers in failure files.

It does two things. Secrets go: the settings' own (token, proxy and database credentials,
STATUS_TOKEN) in any form an answer or an error may echo them (as they are, JSON-escaped,
percent-encoded, as HTML entities), and any credential written as a key and its value
(`Authorization: Bearer …`, `"token": "…"`, `password=…`, a URL's `user:password@`). And
control characters become visible (`\\x1b`): a code from the LIS or an answer from the network
cannot drive the operator's terminal or forge a log line."""
from __future__ import annotations

import functools
import logging
import re

from .config import Settings
from .visible import visible

MASK = "***"

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s:]*:[^/@\s]*@")
_ODBC_PASSWORD = re.compile(r"(?i)\b(PWD|password)\s*=\s*(\{(?:[^}]|\}\})*\}|[^;\s]*)")

# A key naming a credential, and its value. The key may be quoted (JSON, a Python repr, a JSON
# string inside JSON: `\"token\"`) and then `:` separates; unquoted, only `=` does (`token=`,
# `PWD=`), except for the headers (`Authorization: Bearer x`): prose such as "com o token: 12
# exames" is left alone.
_WORDS = (r"(?:[a-z0-9]+[_-])*(?:token|password|passwd|pass|pwd|senha|secret|api[_-]?key"
          r"|authorization)")
_HEADERS = r"(?:proxy-)?authorization|x-status-token|x-api-key"
_KEY_VALUE = re.compile(
    r"(?i)(?:"
    r"(?P<q>\\*[\"'])" + _WORDS + r"(?P=q)\s*[:=]\s*"       # quoted: the quote delimits it
    r"|(?<![a-z0-9])(?:" + _HEADERS + r")\s*[:=]\s*"
    r"|(?<![a-z0-9])" + _WORDS + r"\s*=\s*"
    r")(?:(?:bearer|basic|digest|token)\s+)?"
    r"(?P<value>\\+\"(?:[^\"\\\n]|\\+[^\"\\\n])*(?:\\+\")?"   # a JSON string inside JSON
    r"|\"(?:[^\"\\\n]|\\.)*\"?"                              # a JSON string
    r"|'(?:[^'\\\n]|\\.)*'?"                                 # a Python repr
    r"|[^\s,;&})\]\"'<>]+)")                                 # anything else, to a delimiter
_KEY_HINT = re.compile("token|pass|pwd|senha|secret|key|auth|bearer")  # on the lowered text
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/-]{8,}=*")


def redact(text: str, settings: Settings | None, *, one_line: bool = False) -> str:
    """`text` with its control characters made visible and without secrets. Newlines stay
    (tracebacks, indented JSON) unless `one_line`: then a newline from a LIS code or an
    answer is shown as `\\n` instead of starting what would look like a new line."""
    text = visible(str(text), one_line=one_line)
    # cheap tests first: this runs on every log line. The settings' secrets go first, whole:
    # a pattern below could mask the start of one and leave the rest unrecognisable.
    secrets = settings.secrets if settings is not None else ()
    if secrets:
        if "\\" in text or "%" in text or "&" in text or "+" in text:  # maybe escaped
            text = _secret_forms(secrets).sub(MASK, text)
        else:
            for secret in secrets:
                if secret in text:
                    text = text.replace(secret, MASK)
    if "://" in text and "@" in text:
        text = _USERINFO.sub(r"\1" + MASK + "@", text)
    lower = text.lower()
    if _KEY_HINT.search(lower):
        if "=" in text:
            text = _ODBC_PASSWORD.sub(r"\1=" + MASK, text)
        text = _KEY_VALUE.sub(_mask_value, text)
        if "bearer" in lower:
            text = _BEARER.sub(r"\1" + MASK, text)
    return text


def redact_head(data: bytes | str, limit: int, settings: Settings | None) -> str:
    """The first `limit` characters of `data` (UTF-8, errors replaced), redacted before the
    cut, so that a secret straddling the limit leaves nothing of itself. Only a window of a
    large `data` is read; its last characters, where a secret cut by the window could end,
    are dropped, and the window grows when redaction left too little before them."""
    tail = _tail(settings)
    window = limit * 4 + tail
    while True:
        whole = len(data) <= window
        part = data[:window]
        text = redact(part.decode("utf-8", "replace") if isinstance(part, bytes) else part,
                      settings)
        if not whole:
            text = text[:max(0, len(text) - tail)]
        if whole or len(text) >= limit:
            return text[:limit]
        window *= 8


def _mask_value(match: re.Match) -> str:
    value = match.group("value")
    lead = re.match(r"\\*[\"']?", value).group()
    trail = lead if lead and len(value) >= 2 * len(lead) and value.endswith(lead) else ""
    return match.group()[:match.start("value") - match.start()] + lead + MASK + trail


def _tail(settings: Settings | None) -> int:
    """Characters at the end of a cut text that may hold the first part of a secret."""
    longest = max((len(s) for s in settings.secrets), default=0) if settings is not None else 0
    return max(256, 12 * longest)


@functools.lru_cache(maxsize=16)
def _secret_forms(secrets: tuple[str, ...]) -> re.Pattern:
    """One pattern for every secret, each character as itself or escaped in any way JSON,
    a URL or HTML writes it (mixed freely: `\\u0074ok\\/A%42C`), longest secret first."""
    firsts = "".join(re.escape(c) for c in sorted({s[0] for s in secrets} | set("\\%&+")))
    either = "|".join("".join(_char_forms(c) for c in secret) for secret in secrets)
    return re.compile(f"(?=[{firsts}])(?:{either})")  # the look-ahead skips most positions fast


def _char_forms(char: str) -> str:
    code = ord(char)
    units = [code] if code < 0x10000 else [0xD800 + ((code - 0x10000) >> 10),
                                           0xDC00 + ((code - 0x10000) & 0x3FF)]
    forms = [re.escape(char),
             "".join(r"\\+u" + _hex(unit, 4) for unit in units),             # JSON \u00xx
             "".join("%" + _hex(byte, 2) for byte in char.encode("utf-8")),  # percent-encoding
             f"&#0*{code};", "&#[xX]0*" + _hex(code, 1) + ";"]               # HTML entities
    short = {'"': '"', "\\": "\\", "/": "/", "'": "'"}.get(char)
    if short:
        forms.append(r"\\+" + re.escape(short))                              # JSON \/ and \"
    named = {"&": "amp", "<": "lt", ">": "gt", '"': "quot", "'": "apos"}.get(char)
    if named:
        forms.append(f"&{named};")
    if char == " ":
        forms.append(r"\+")
    return "(?:" + "|".join(forms) + ")"


def _hex(number: int, width: int) -> str:
    """`number` in hex as a pattern that accepts either case (`%2f` and `%2F`)."""
    return "".join(f"[{d}{d.upper()}]" if d.isalpha() else d for d in f"{number:0{width}x}")


class RedactingFormatter(logging.Formatter):
    """Every log line, traceback included, through `redact`. The message itself is one line
    (a newline inside it is shown as `\\n`); a traceback keeps its lines."""

    def __init__(self, fmt: str, settings: Settings):
        super().__init__(fmt)
        self.settings = settings

    def formatMessage(self, record: logging.LogRecord) -> str:
        return visible(super().formatMessage(record), one_line=True)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), self.settings)


class RedactedStream:
    """A text stream whose every write goes through `redact` (the output of --check and
    --status, where error texts are printed, not logged), one line per write: a newline is
    kept only where the write ends."""

    def __init__(self, stream, settings: Settings):
        self.stream, self.settings = stream, settings
        self.encoding = getattr(stream, "encoding", None)

    def write(self, text: str) -> int:
        body, end = (text[:-1], "\n") if text.endswith("\n") else (text, "")
        return self.stream.write(redact(body, self.settings, one_line=True) + end)

    def flush(self) -> None:
        self.stream.flush()
