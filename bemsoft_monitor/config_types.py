"""The kinds of value a setting can hold: each parses the text written in `.env` into a typed
value (raising ConfigError with one pt-BR line that names the key and what is expected),
writes a value back as it would be written in `.env` (for `.env.example` and the README),
and shows it to an operator (the console), masking what is secret.

Pure: no environment, no files (but for the path kind's base folder, passed in)."""
from __future__ import annotations

import datetime as dt
import ipaddress
import math
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .visible import visible

TRUE = {"1", "true", "yes", "sim", "s", "y", "on"}
FALSE = {"0", "false", "no", "nao", "não", "n", "off"}
MASKED = "*** (definido, oculto)"


class ConfigError(Exception):
    """A setting is missing or malformed. `str()` is the pt-BR line shown to the operator."""

    def __init__(self, key: str, expected: str):
        self.key = key
        # one line: a value quoted in `expected` may hold a CR or an escape sequence
        super().__init__(visible(f"Configuração inválida: {key} {expected}", one_line=True))


class Kind:
    """How one setting's text becomes a value. `parse` gets the text stripped and non-empty
    (`raw=True` kinds get it as written); `text` is the inverse, used for documented
    defaults; `show` is what the console prints (secrets never)."""
    raw = False        # keep leading/trailing spaces (passwords)
    secret = False     # the whole value is a secret
    hides = False      # the value is or may hold a secret: kept out of repr()

    def parse(self, key: str, text: str, base_dir: Path):
        return text

    def text(self, value) -> str:
        return "" if value is None else str(value)

    def show(self, value) -> str:
        if value in (None, "", ()):
            return "—"
        return MASKED if self.secret else self.text(value)

    def secrets_in(self, value) -> list[str]:
        """The secret parts of a value (a password inside a URL, say)."""
        return [value] if self.secret and value else []


class Text(Kind):
    """`forbidden`: characters the value may not hold, and why (pt-BR)."""

    def __init__(self, max_length: int | None = None, forbidden: str = "", why: str = ""):
        self.max_length = max_length
        self.forbidden, self.why = forbidden, why

    def parse(self, key, text, base_dir):
        if self.max_length is not None and len(text) > self.max_length:
            raise ConfigError(key, f"deve ter no máximo {self.max_length} caracteres")
        bad = sorted({c for c in text if c in self.forbidden})
        if bad:
            raise ConfigError(key, f"não pode conter {' '.join(repr(c) for c in bad)}"
                              + (f" ({self.why})" if self.why else ""))
        return text


class Secret(Kind):
    """A password or token. `raw`: kept exactly as written (a password may start with a
    space); otherwise stripped. `pattern`: what a valid value looks like (the error never
    repeats the value)."""
    secret = hides = True

    def __init__(self, *, raw: bool = False, pattern: str | None = None, expected: str = ""):
        self.raw = raw
        self.pattern = re.compile(pattern) if pattern else None
        self.expected = expected

    def parse(self, key, text, base_dir):
        if self.pattern is not None and not self.pattern.fullmatch(text):
            raise ConfigError(key, self.expected + "; o valor não é mostrado")
        return text


class Flag(Kind):
    def parse(self, key, text, base_dir):
        low = text.lower()
        if low in TRUE:
            return True
        if low in FALSE:
            return False
        raise ConfigError(key, f"deve ser 1 ou 0 (recebido: {text!r})")

    def text(self, value):
        return "1" if value else "0"

    def show(self, value):
        return "sim" if value else "não"


class Number(Kind):
    def __init__(self, minimum: float = 0.0, maximum: float = 1e6, *, integer: bool = False,
                 unit: str = ""):
        self.minimum, self.maximum, self.integer, self.unit = minimum, maximum, integer, unit

    def parse(self, key, text, base_dir):
        kind = "um número inteiro" if self.integer else "um número"
        expected = f"deve ser {kind} de {self.minimum:g} a {self.maximum:g} (recebido: {text!r})"
        try:
            value = int(text) if self.integer else float(text.replace(",", "."))
        except ValueError:
            raise ConfigError(key, expected) from None
        if not math.isfinite(value) or not self.minimum <= value <= self.maximum:
            raise ConfigError(key, expected)
        return value

    def text(self, value):
        return "" if value is None else f"{value:g}"

    def show(self, value):
        return "—" if value is None else self.text(value) + (f" {self.unit}" if self.unit else "")


class Choice(Kind):
    """One of a few words, compared without case; stored in `case` ("upper"/"lower")."""

    def __init__(self, *options: str, case: str = "upper", expected: str = ""):
        self.options = options
        self.case = case
        self.expected = expected or "deve ser " + _one_of(options)

    def parse(self, key, text, base_dir):
        value = text.upper() if self.case == "upper" else text.lower()
        if value not in self.options:
            raise ConfigError(key, f"{self.expected} (recebido: {value!r})")
        return value


class Pattern(Kind):
    def __init__(self, pattern: str, expected: str, *, case: str | None = None):
        self.pattern = re.compile(pattern)
        self.expected = expected
        self.case = case

    def parse(self, key, text, base_dir):
        value = text.lower() if self.case == "lower" else text
        if not self.pattern.fullmatch(value):
            raise ConfigError(key, f"{self.expected} (recebido: {value!r})")
        return value


class NameList(Kind):
    """A comma-separated list of names, each trimmed; empty entries dropped."""

    def parse(self, key, text, base_dir):
        return tuple(t.strip() for t in text.split(",") if t.strip())

    def text(self, value):
        return ",".join(value or ())

    def show(self, value):
        return ", ".join(value) if value else "—"


class EmailList(NameList):
    _ADDRESS = re.compile(r"[^@\s<>,;]+@[^@\s<>,;]+\.[^@\s<>,;]+")

    def parse(self, key, text, base_dir):
        addresses = super().parse(key, text, base_dir)
        for address in addresses:
            if not self._ADDRESS.fullmatch(address):
                raise ConfigError(key, f"deve ser uma lista de e-mails separados por vírgula "
                                       f"(inválido: {address!r})")
        return addresses


class Email(Kind):
    def parse(self, key, text, base_dir):
        if not EmailList._ADDRESS.fullmatch(text):
            raise ConfigError(key, f"deve ser um endereço de e-mail (recebido: {text!r})")
        return text


class Date(Kind):
    def parse(self, key, text, base_dir):
        try:
            return dt.date.fromisoformat(text)
        except ValueError:
            raise ConfigError(key, f"deve ser uma data AAAA-MM-DD (recebido: {text!r})") from None

    def text(self, value):
        return "" if value is None else value.isoformat()


class ClockTime(Kind):
    """HH:MM, a time of day."""

    def parse(self, key, text, base_dir):
        match = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)", text)
        if not match:
            raise ConfigError(key, f"deve ser uma hora HH:MM, ex.: 07:30 (recebido: {text!r})")
        return dt.time(int(match.group(1)), int(match.group(2)))

    def text(self, value):
        return "" if value is None else f"{value:%H:%M}"


class Zone(Kind):
    def parse(self, key, text, base_dir):
        try:
            ZoneInfo(text)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(key, f"deve ser um fuso IANA como America/Sao_Paulo "
                                   f"(recebido: {text!r})") from None
        return text


class Port(Kind):
    def parse(self, key, text, base_dir):
        return int(Number(1, 65535, integer=True).parse(key, text, base_dir))


_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class Host(Kind):
    def parse(self, key, text, base_dir):
        if not _HOSTNAME.match(text) and not is_ip(text):
            raise ConfigError(key, "deve ser um endereço IP (ex.: 127.0.0.1, 0.0.0.0) ou "
                                   f"um nome de máquina (recebido: {text!r})")
        return text


class FilePath(Kind):
    """A path; relative ones are taken from the folder of the `.env` file. `off`: words that
    turn the setting off (None)."""

    def __init__(self, *, off: tuple[str, ...] = ()):
        self.off = off

    def parse(self, key, text, base_dir):
        if text.lower() in self.off:
            return None
        path = Path(text).expanduser()
        return path if path.is_absolute() else (base_dir / path)

    def show(self, value):
        return "desligado" if value is None and self.off else super().show(value)


def mask_userinfo(url: str) -> str:
    """`scheme://user:password@host/...` -> `scheme://***@host/...`."""
    return re.sub(r"(?i)^([a-z][a-z0-9+.-]*://)[^/@]*@", r"\1***@", url)


class Url(Kind):
    """An http(s) URL. `secret_path`: the path and query are the secret (a webhook's or a
    heartbeat's address is its password: whoever has it can post or fake a ping), so only
    scheme and host are ever shown. Credentials in the URL are always secret."""
    hides = True


    def __init__(self, *, secret_path: bool = False, example: str = "https://..."):
        self.secret_path = secret_path
        self.example = example

    def parse(self, key, text, base_dir):
        parts = urlsplit(text)
        try:
            parts.port
        except ValueError:
            raise ConfigError(key, f"tem uma porta inválida (ex.: {self.example})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            shown = "" if self.secret_path else f" (recebido: {text!r})"
            raise ConfigError(key, f"deve ser uma URL http(s), ex.: {self.example}{shown}")
        return text

    def show(self, value):
        if not value:
            return "—"
        if self.secret_path:
            parts = urlsplit(value)
            return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}/***"
        return mask_userinfo(value)

    def secrets_in(self, value):
        if not value:
            return []
        parts = urlsplit(value)
        found = [unquote(parts.password or ""), parts.password or ""]
        if self.secret_path and parts.netloc:
            rest = value.split(parts.netloc, 1)[-1]
            found += [rest, rest.lstrip("/"), unquote(rest.lstrip("/"))]
            found += [p for p in re.split(r"[/?&=#]", rest) if len(p) >= 8]
        return [s for s in found if s]


class ProxyUrl(Kind):
    """A proxy address as the operator wrote it (validated and decoded by the proxy rule);
    its user and password are secrets."""
    hides = True


    def show(self, value):
        return mask_userinfo(value) if value else "—"

    def secrets_in(self, value):
        if not value or "@" not in value:
            return []
        raw = value if "://" in value else "http://" + value
        try:
            parts = urlsplit(raw)
            return [s for s in (parts.username, parts.password, unquote(parts.username or ""),
                                unquote(parts.password or "")) if s]
        except ValueError:
            return []


class DatabaseUrl(Kind):
    """Any SQLAlchemy URL. Its password is a secret; a password with an unencoded `@` is
    refused (SQLAlchemy would cut the password at the first `@` and take the rest for the
    host, which would then be shown and logged)."""
    hides = True


    def parse(self, key, text, base_dir):
        if "://" not in text:
            raise ConfigError(key, "deve ser uma URL do SQLAlchemy "
                                   "(ex.: postgresql+psycopg://usuario@host/base)")
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError
        try:
            url = make_url(text)
        except (ArgumentError, ValueError) as err:
            what = "porta inválida (deve ser um número)" if "int()" in str(err) else "formato inválido"
            raise ConfigError(key, f"não é uma URL válida do SQLAlchemy: {what} "
                                   "(ex.: postgresql+psycopg://usuario@host:5432/base)") from None
        try:
            split_password = urlsplit(text).password
        except ValueError:
            split_password = None
        split_password = None if split_password is None else unquote(split_password)
        if "@" in (url.host or "") or (split_password is not None and split_password != url.password):
            raise ConfigError(key, "tem um caractere especial sem codificar na senha (ou no "
                                   "usuário): escreva @ como %40, : como %3A, / como %2F e # como "
                                   "%23 (ex.: a senha x@y vira x%40y); o valor não é mostrado")
        return text

    def show(self, value):
        if not value:
            return "—"
        from sqlalchemy.engine import make_url
        try:
            return make_url(value).render_as_string(hide_password=True)
        except Exception:  # validated at start-up; never show the raw URL
            return MASKED

    def secrets_in(self, value):
        if not value:
            return []
        found = []
        try:
            from sqlalchemy.engine import make_url
            found.append(make_url(value).password or "")
        except Exception:  # noqa: BLE001 - validated at start-up
            pass
        try:
            raw = urlsplit(value).password or ""
            found += [raw, unquote(raw)]
        except ValueError:
            pass
        return [s for s in found if s]


def _one_of(options) -> str:
    options = list(options)
    return ", ".join(options[:-1]) + f" ou {options[-1]}" if len(options) > 1 else options[0]
