"""Control characters made visible (`\\x1b`, `\\u202e`, `\\n`): a code from the LIS, an answer
from the network or a value from `.env` cannot drive the operator's terminal or forge a log
line. Part of the one redaction (`redaction.redact`); on its own here so that the settings'
error messages, built before any redaction exists, use it too."""
from __future__ import annotations

import re

# Control characters: C0 but tab and newline, DEL, C1, and the bidirectional overrides and
# line separators that reorder or break what a terminal or an editor shows.
_CONTROLS = "\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_UNSAFE = re.compile(f"[{_CONTROLS}]")
_UNSAFE_IN_LINE = re.compile(f"[\n{_CONTROLS}]")
_NAMED = {"\n": "\\n", "\r": "\\r"}


def visible(text: str, *, one_line: bool = False) -> str:
    """`text` with control characters shown as escapes (`\\x1b`, `\\u202e`); with `one_line`,
    newlines too (`\\n`)."""
    if text.isprintable():  # every character escaped below is unprintable: the usual case
        return text
    return (_UNSAFE_IN_LINE if one_line else _UNSAFE).sub(_visible, text)


def _visible(match: re.Match) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")
