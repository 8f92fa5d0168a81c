"""The payload stage: legacy rows of one solicitation -> the JSON of SPEC §3.

Pure functions over JSON-safe events (the same form the failure files keep), so that the
monitor and the replay CLI build payloads the same way. Bad legacy values map to the
documented defaults or raise TransformError with a pt-BR reason; nothing else escapes.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Iterable, Protocol

from .config import Settings, normalize_code

log = logging.getLogger(__name__)

TEXT_LIMIT = 255  # additionalInformations values are cut here; the API stores short text
NO_COD_REASON = ("item sem CodSolicitacao (ItemSol.CodSolicitacao vazio): vincule o item à "
                 "sua solicitação no LIS")


class TransformError(Exception):
    """The whole solicitation cannot be turned into a payload; str() is the pt-BR reason."""


class ItemRejected(Exception):
    """One item cannot be sent (e.g. its specimen is unknown); the rest still goes."""


class SpecimenSource(Protocol):
    def specimen_for(self, test_id: str, pinned: str | None = None) -> str: ...


@dataclass
class BuiltPayload:
    payload: dict | None               # None when every item was rejected
    item_ids: list[int]                 # items inside `payload`
    rejected: list[tuple[dict, str]] = field(default_factory=list)  # (item, reason)


# ------------------------------------------------------------------ events
def make_event(cod: str, solicitacao: dict | None, paciente: dict | None,
               items: Iterable[dict]) -> dict:
    """The JSON-safe record of a solicitation, as kept in failure files."""
    return {"cod_solicitacao": cod, "solicitacao": solicitacao, "paciente": paciente,
            "items": sorted(items, key=lambda i: int(i["CodItemSol"]))}


def idempotency_key(cod, item_ids: Iterable[int], suffix: str = "") -> str:
    """`sol-<cod>-<hash of the sorted item ids>`: a re-send of the same items gets the same
    key (the server dedupes); items added later get a new one (SPEC §5.2, §5.6). `<cod>` is
    the code's safe token (see `external_token`), so the header is ASCII whatever the LIS
    holds."""
    ids = ",".join(str(i) for i in sorted(int(x) for x in item_ids))
    digest = hashlib.sha256(ids.encode()).hexdigest()[:12]
    return f"sol-{external_token(cod)}-{digest}{suffix}"


_PLAIN_TOKEN = re.compile(r"[0-9A-Za-z_-]{1,14}")
_NOT_ALNUM = re.compile(r"[^0-9A-Za-z]+")


def external_token(value) -> str:
    """A legacy code as it goes into external ids, Idempotency-Keys and the monitor's own
    tables. A short plain code (`[0-9A-Za-z_-]`, at most 14 characters: every INT code) is
    kept as it is, byte for byte. Anything else (accents, spaces, slashes, line breaks, a
    long text) becomes `<its first ASCII letters/digits, up to 5>.<8 hex of its SHA-256>`;
    the `.` marks that form, so it never equals a plain code. At most 14 characters, so
    `order-<token>` stays within the 20 the API accepts (SPEC §5.4)."""
    text = _external_num(value) or ""
    if _PLAIN_TOKEN.fullmatch(text):
        return text
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = _NOT_ALNUM.sub("-", ascii_text).strip("-")[:5].strip("-") or "x"
    return f"{slug}.{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


# ------------------------------------------------------------------ value parsing
_DATE_FORMATS = ("%Y-%m-%d", "%d/%m/%Y", "%Y%m%d", "%d-%m-%Y", "%Y/%m/%d")
_NON_DIGITS = re.compile(r"\D")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACES = re.compile(r"\s+")
_FLOAT_INT = re.compile(r"-?\d+\.0+")
_TIME_RE = re.compile(r"^\s*(\d{1,2})[:h](\d{2})(?::(\d{2})(?:[.,]\d+)?)?\s*$")


def parse_datetime(value) -> dt.datetime | None:
    """A legacy date/datetime (native or text) -> naive datetime, or None if unusable."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return _sane(value.replace(tzinfo=None))
    if isinstance(value, dt.date):
        return _sane(dt.datetime.combine(value, dt.time()))
    text = str(value).strip()
    if not text:
        return None
    try:
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        return _sane(parsed.replace(tzinfo=None))
    except ValueError:
        pass
    head, _, rest = text.partition(" ")
    for fmt in _DATE_FORMATS:
        try:
            day = dt.datetime.strptime(head, fmt)
        except ValueError:
            continue
        clock = _clock(rest) if rest else dt.time()
        return _sane(dt.datetime.combine(day.date(), clock or dt.time()))
    return None


def parse_date(value) -> dt.date | None:
    parsed = parse_datetime(value)
    return parsed.date() if parsed else None


def parse_time(value) -> dt.time | None:
    """`Hora` as text `HH:MM`/`HH:MM:SS`, a time, or a datetime (SQL Server keeps times in
    1900-01-01 datetimes) -> time, or None if unusable."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.time().replace(microsecond=0, tzinfo=None)
    if isinstance(value, dt.time):
        return value.replace(microsecond=0, tzinfo=None)
    text = str(value).strip()
    clock = _clock(text)
    if clock is None and ("T" in text or " " in text):  # datetime text (SQL Server 1900-01-01)
        parsed = parse_datetime(text)
        return parsed.time().replace(microsecond=0) if parsed else None
    return clock


def _clock(text: str) -> dt.time | None:
    """`HH:MM` / `HH:MM:SS[.fff]` text only (no recursion into dates)."""
    match = _TIME_RE.match(text)
    if not match:
        return None
    hour, minute, second = int(match[1]), int(match[2]), int(match[3] or 0)
    if hour > 23 or minute > 59 or second > 59:
        return None
    return dt.time(hour, minute, second)


def _sane(value: dt.datetime) -> dt.datetime | None:
    return value if 1900 <= value.year <= 2200 else None


def normalize_gender(value) -> str | None:
    if value is None:
        return None
    text = str(value).strip().upper()
    if text in ("M", "MASCULINO", "MASC"):
        return "M"
    if text in ("F", "FEMININO", "FEM"):
        return "F"
    return None


def digits(value) -> str:
    return _NON_DIGITS.sub("", "" if value is None else str(value))


def clean_text(value, limit: int | None = None) -> str:
    if value is None:
        return ""
    text = _SPACES.sub(" ", _CONTROL.sub("", str(value))).strip()
    return text[:limit] if limit else text


def _external_num(value) -> str | None:
    """An id column as it goes into an externalId: integers without `.0`, trimmed text."""
    if value is None:
        return None
    text = str(value).strip()
    if _FLOAT_INT.fullmatch(text):
        text = text.split(".")[0]
    return text or None


# ------------------------------------------------------------------ the payload
def batch_moment(event: dict, tz, item_moments: list | None = None) -> dt.datetime:
    """Batch date/time: solicitacao.dtaentrada + Hora; else the first item's DataEntrada;
    else now in TIMEZONE. Raised to the latest item's DataEntrada when an item is later,
    because the API silently drops a test dated after its batch (SPEC §5.5)."""
    sol = event.get("solicitacao") or {}
    items = event.get("items") or []
    moment = None
    day = parse_datetime(sol.get("dtaentrada"))
    if day is not None:
        clock = parse_time(sol.get("Hora"))
        if clock is not None:
            moment = dt.datetime.combine(day.date(), clock)
        elif day.time() != dt.time():
            moment = day
    if item_moments is None:
        item_moments = [parse_datetime(i.get("DataEntrada")) for i in items]
    item_moments = [m for m in item_moments if m]
    if moment is None and item_moments:
        moment = item_moments[0]
    if moment is None:
        moment = dt.datetime.now(tz).replace(tzinfo=None)
    latest = max(item_moments, default=None)
    if latest is not None and latest > moment:
        moment = latest
    return moment.replace(microsecond=0)


def build_patient(event: dict, settings: Settings) -> dict:
    sol = event.get("solicitacao") or {}
    pac = event.get("paciente") or {}
    if not event.get("solicitacao"):
        raise TransformError(f"solicitação {event.get('cod_solicitacao')} não encontrada na tabela "
                             "solicitacao (itens sem pedido): confira o cadastro no sistema legado")
    cod_pac = _external_num(pac.get("codpaciente")) or _external_num(sol.get("codpaciente"))
    cpf = digits(pac.get("cpf"))
    if cod_pac:
        external_id = f"pat-{external_token(cod_pac)}"
    elif cpf:
        external_id = f"cpf-{external_token(cpf)}"
    else:
        raise TransformError("paciente sem codpaciente e sem CPF: não há como identificá-lo")
    name = clean_text(pac.get("nome"))
    if not name:
        raise TransformError(f"paciente {cod_pac or cpf} sem nome (tabela paciente, coluna nome; "
                             "o cadastro do paciente pode estar ausente)")
    birth = parse_date(pac.get("datanasc"))
    if birth is not None and birth > dt.date.today():
        birth = None
    birth = birth or settings.default_birthdate
    if birth is None:
        raise TransformError(f"paciente {external_id} sem data de nascimento válida: preencha "
                             "paciente.datanasc ou defina DEFAULT_BIRTHDATE=AAAA-MM-DD no .env")
    gender = normalize_gender(pac.get("sexo")) or settings.default_gender
    if gender is None:
        raise TransformError(f"paciente {external_id} sem sexo M/F: preencha paciente.sexo ou "
                             "defina DEFAULT_GENDER=M ou F no .env")
    return {"externalId": external_id, "name": name, "birthDate": birth.isoformat(),
            "gender": gender, "weight": 0, "height": 0}


def build_test(item: dict, batch_at: dt.datetime, settings: Settings,
               specimens: SpecimenSource, collected: dt.datetime | None = None) -> dict:
    code = clean_text(item.get("CodConvExames"))
    if not code:
        raise ItemRejected("item sem código de exame (ItemSol.CodConvExames vazio)")
    mapping = settings.test_map.get(normalize_code(code))
    test_id = mapping.test_id if mapping else code
    specimen = specimens.specimen_for(test_id, mapping.specimen_id if mapping else None)
    collected = collected or parse_datetime(item.get("DataEntrada")) or batch_at
    collected = min(collected.replace(microsecond=0), batch_at)
    return {
        "externalId": f"item-{_external_num(item.get('CodItemSol'))}",  # an int: the cursor
        "collectionDate": collected.date().isoformat(),
        "collectionTime": collected.time().isoformat(),
        "supportTestId": test_id,
        "supportSpecimenId": specimen,
        "additionalInformations": [
            {"key": "origem", "value": clean_text(item.get("Origem"), TEXT_LIMIT)},
            {"key": "descricao", "value": clean_text(item.get("DescExames"), TEXT_LIMIT)},
        ],
        "condition": "",
        "preservative": "",
        "diuresisVolume": 0,
        "diuresisTime": 0,
    }


def build_payload(event: dict, settings: Settings, specimens: SpecimenSource) -> BuiltPayload:
    """Event -> payload. Raises TransformError (whole solicitation) or lets the catalog's
    CatalogUnavailable through (transient: try again later)."""
    if event.get("problema"):  # duplicated LIS rows that differ (see source.unique_rows)
        raise TransformError(f"{event['problema']} (no arquivo de falha: deixe em 'event' os "
                             "dados certos e apague o campo 'problema' antes de reenviar)")
    if not _external_num(event.get("cod_solicitacao")):
        raise TransformError(NO_COD_REASON)
    cod = external_token(event.get("cod_solicitacao"))
    patient = build_patient(event, settings)
    items = event.get("items") or []
    moments = [parse_datetime(i.get("DataEntrada")) for i in items]  # parsed once
    batch_at = batch_moment(event, settings.tz, moments)
    tests, item_ids, rejected = [], [], []
    for item, collected in zip(items, moments):
        try:
            tests.append(build_test(item, batch_at, settings, specimens, collected))
        except ItemRejected as err:
            rejected.append((item, str(err)))
            continue
        item_ids.append(int(item["CodItemSol"]))
    if not tests:
        return BuiltPayload(None, [], rejected)
    date, time = batch_at.date().isoformat(), batch_at.time().isoformat()
    order = {
        "externalId": f"order-{cod}",
        "date": date,
        "time": time,
        "patientHeight": 0,
        "patientWeight": 0,
        "patient": patient,
    }
    doctor = settings.physician
    if doctor is not None:
        order["physician"] = {"externalId": doctor.number, "name": doctor.name,
                              "councilAbbreviation": doctor.council,
                              "councilNumber": doctor.number, "councilUf": doctor.uf}
    order["tests"] = tests
    payload = {"batch": {"externalId": f"sol-{cod}", "date": date, "time": time, "order": order}}
    return BuiltPayload(payload, item_ids, rejected)
