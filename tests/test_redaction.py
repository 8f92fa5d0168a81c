"""The one redaction (bemsoft_monitor/redaction.py) on the real output paths.

Secrets: API answers carrying the token, the proxy password, the database password or the
STATUS_TOKEN — as they are, JSON-escaped, percent-encoded, as HTML entities, under a
credential key, at every position around the 1000-character cut, repeated — go through the
real delivery path (client through an authenticating proxy, sender, outcomes, failure
store, a log handler with the monitor's formatter) and nothing of them comes out.

Control characters from LIS codes: shown escaped (`\\x1b`), never raw, in the log, in
`--status` and in `retry_failed` output; a newline never starts a forged line."""
from __future__ import annotations

import html
import io
import json
import logging
import re
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bemsoft_monitor.client import BODY_LIMIT, BemsoftClient, Verdict, classify
from bemsoft_monitor.config import parse_settings
from bemsoft_monitor.failures import FailureRecord, FailureStore
from bemsoft_monitor.metrics import LatencyHistogram
from bemsoft_monitor.outcomes import CycleResult, Outcomes
from bemsoft_monitor.planner import Job
from bemsoft_monitor.redaction import RedactingFormatter, redact
from bemsoft_monitor.sender import Sender
from bemsoft_monitor.status import StatusBoard
from bemsoft_monitor.testing.fakeapi import FakeBemsoft
from bemsoft_monitor.testing.network import API_HOST, ForwardProxy, HospitalCA
from conftest import LAB, run

TOKEN = "Tq7/Zx+Kw9=Lp3mN8vR2"
PROXY_USER, PROXY_PASSWORD = "lab.ti", 'Px!9"q/&Qz%4k~Wm'
DB_PASSWORD = 'Dé"b\\S3n/ha+Ü%7'
STATUS_TOKEN = "Zq8-Wf3_Vy6Hk1Jx4Rp9"
SECRETS = (TOKEN, PROXY_PASSWORD, DB_PASSWORD, STATUS_TOKEN)
FILLER = " .-_~;é"            # nothing here is part of a secret
FOREIGN = "qxzjkvwyQXZJKVWY"  # a credential the settings do not know (under a key)


def fragments(secret: str, size: int) -> set[str]:
    return {secret[i:i + size] for i in range(len(secret) - size + 1)}


def decoded(text: str) -> str:
    """`text` with every escape the test uses undone, so that an escaped fragment of a
    secret shows as itself."""
    text = re.sub(r"\\+u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text)
    text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    text = re.sub(r"\\+([\"/'\\])", r"\1", text)
    return unquote(html.unescape(text))


def _utf16(s: str):
    data = s.encode("utf-16-be")
    return [int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2)]


# ------------------------------------------------------------------ how an answer may echo
ENCODINGS = {
    "raw": lambda s: s,
    "json": lambda s: json.dumps(s)[1:-1].replace("/", "\\/"),
    "\\u": lambda s: "".join(f"\\u{unit:04X}" for unit in _utf16(s)),
    "percent": lambda s: quote(s, safe=""),
    "html": lambda s: "".join(f"&#{ord(c)};" for c in s),
}
WHOLE = {**ENCODINGS, "json twice": lambda s: json.dumps(json.dumps(s))[1:-1],
         "percent lower": lambda s: re.sub("%..", lambda m: m.group().lower(), quote(s, safe="")), "html named": html.escape}
KEYED = [  # (head, tail) around a value under a credential key
    ('"authorization": "Bearer ', '"'), ('"Authorization":"Bearer ', '"'), ('"token": "', '"'),
    ('"password": ', ","), ("'password': '", "'"), ('\\"senha\\": \\"', '\\"'),
    ("Authorization: Bearer ", "\r\n"), ("?access_token=", "&x=1"), ("PWD=", ";UID=sa"),
]


@st.composite
def answers(draw):
    """(status, body, echoed values): an answer echoing a secret at a chosen place."""
    if draw(st.booleans()):
        value = draw(st.sampled_from(SECRETS))
        if draw(st.booleans()):
            echoed = WHOLE[draw(st.sampled_from(sorted(WHOLE)))](value)
        else:                    # each character escaped its own way
            echoed = "".join(ENCODINGS[draw(st.sampled_from(sorted(ENCODINGS)))](c) for c in value)
        head, tail = draw(st.sampled_from([("", "")] + KEYED))
    else:
        value = draw(st.text(FOREIGN, min_size=12, max_size=30))
        echoed = value
        head, tail = draw(st.sampled_from(KEYED))
    piece = head + echoed + tail
    # where the echo starts: around a cut (the 1000 characters kept, the 120 of a portal
    # snippet, the window read of a long answer) or anywhere
    start = draw(st.one_of(st.sampled_from([BODY_LIMIT, 117, 4 * BODY_LIMIT + 256]).flatmap(
        lambda cut: st.integers(cut - len(piece) - 3, cut + 3)), st.integers(0, 1200)))
    repeats = draw(st.sampled_from([0, 0, 0, 1, 40, 200]))  # earlier copies shrink when masked
    fill = draw(st.sampled_from(FILLER))
    shape, status = draw(st.sampled_from([
        ("text", 400), ("text", 401), ("text", 500), ("text", 503), ("text", 200),
        ("text", 409), ("error", 201), ("error", 400), ("ok", 201), ("ok", 200)]))
    before = (piece + " ") * repeats
    padding = fill * max(0, start - len(before))
    text = before + padding + piece + fill * draw(st.integers(0, 50))
    if shape != "text":  # the API's own serializer writes the echo into its JSON
        field = {"error": "error", "ok": "echo"}[shape]
        text = json.dumps({field: text, "id": 7}, ensure_ascii=draw(st.booleans()))
    return status, text, value


# ------------------------------------------------------------------ the real delivery path
@pytest.fixture(scope="module")
def route(tmp_path_factory):
    """The client reaching the fake API (TLS, private CA) through an authenticating proxy,
    a sender and outcomes writing real failure files, and the log of the monitor's formatter."""
    tmp = tmp_path_factory.mktemp("redaction")
    ca = HospitalCA(tmp)
    with FakeBemsoft(token=TOKEN, tls=ca.server_context(), host_name=API_HOST) as api, \
            ForwardProxy(credentials=(PROXY_USER, PROXY_PASSWORD)) as proxy:
        conf = parse_settings({
            "DATABASE_URL": f"postgresql+psycopg://lis:{quote(DB_PASSWORD, safe='')}@db.lab/lis",
            "TERCEIROS": LAB, "BEMSOFT_BASE_URL": api.url, "BEMSOFT_TOKEN": TOKEN,
            "BEMSOFT_CA_BUNDLE": str(ca.ca_pem), "STATUS_TOKEN": STATUS_TOKEN,
            "BEMSOFT_PROXY": f"http://{PROXY_USER}:{quote(PROXY_PASSWORD, safe='')}@127.0.0.1:{proxy.port}",
            "BEMSOFT_RETRIES": "1", "BEMSOFT_BACKOFF": "0",
            "FAILED_DIR": str(tmp / "failed"), "LOG_FILE": "-"}, base_dir=tmp)
        assert set(SECRETS) <= set(conf.secrets)
        client = BemsoftClient(conf)
        store = FailureStore(conf.failed_dir)
        outcomes = Outcomes(conf, None, store, StatusBoard(), LatencyHistogram(), time.monotonic)
        sender = Sender(client, store, 1, shutdown=threading.Event(), dry_run=False,
                        on_dry_run=None, failure_of=outcomes.failure_of)
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(RedactingFormatter("%(levelname)s %(name)s: %(message)s", conf))
        logger = logging.getLogger("bemsoft_monitor")
        old_level = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        try:
            yield api, conf, sender, outcomes, stream
        finally:
            logger.removeHandler(handler)
            logger.setLevel(old_level)
            sender.close()
            client.close()


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(answer=answers())
def test_no_secret_leaves_through_reason_failure_file_or_log(route, answer):
    api, conf, sender, outcomes, stream = route
    status, body, value = answer
    api.fail_next(2, status=status, body=body)    # both attempts of a transient answer
    stream.seek(0)
    stream.truncate()
    for old in Path(conf.failed_dir).glob("*.json"):
        old.unlink()
    job = Job("1", "sol-1-abc", [11], {"cod_solicitacao": "1", "items": [{"CodItemSol": 11}]},
              payload={"batch": {}})
    sender.halt.clear()
    sender.dispatch([job])
    for settled in sender.harvest("all"):
        outcomes.settled(settled, CycleResult())
    delivery = job.delivery
    assert delivery is not None and delivery.status == status
    shown = [delivery.reason, delivery.body, delivery.shown_body(conf), stream.getvalue()]
    for path in Path(conf.failed_dir).glob("*.json"):
        text = path.read_text(encoding="utf-8")
        record = json.loads(text)
        shown += [text, record["reason"], record["response"]]
    if delivery.outcome == Verdict.PERMANENT:
        assert shown[4:], "a refused answer leaves its failure file"
    size = 4 if value in SECRETS else 5
    for text in shown:
        for piece in fragments(value, size):
            assert piece not in text and piece not in decoded(text), (piece, text[:300])


def test_the_redaction_handles_more_than_the_shapes_it_started_with(tmp_path):
    """The one redaction, fed the shapes a review found passing untouched."""
    conf = parse_settings({
        "DATABASE_URL": f"postgresql+psycopg://lis:{quote(DB_PASSWORD, safe='')}@db.lab/lis",
        "TERCEIROS": LAB, "BEMSOFT_TOKEN": TOKEN, "STATUS_TOKEN": STATUS_TOKEN, "LOG_FILE": "-",
        "BEMSOFT_PROXY": f"http://{PROXY_USER}:{quote(PROXY_PASSWORD, safe='')}@proxy.lab:3128"},
        base_dir=tmp_path)
    cases = {
        json.dumps({"echo": TOKEN}): TOKEN,                       # tok\/...
        json.dumps({"echo": DB_PASSWORD}): DB_PASSWORD,           # \" \\ \u00e9
        quote(PROXY_PASSWORD, safe=""): PROXY_PASSWORD,
        f"?token={quote(STATUS_TOKEN)}": STATUS_TOKEN,
        '{"authorization": "Bearer abcdefghijk123"}': "abcdefghijk123",
        '{"Authorization":"Bearer abcdefghijk123"}': "abcdefghijk123",
        '{"password": 98765432, "user": "x"}': "98765432",
        '{"token": "zzzyyyxxx"}': "zzzyyyxxx",
        'x\\"token\\": \\"JJJwwwvvv\\"': "JJJwwwvvv",      # a quoted key right after a letter
        'a"secret":"kkkjjjhhh"': "kkkjjjhhh",
    }
    for text, secret in cases.items():
        assert secret not in redact(text, conf), text
    assert redact("com o token: 12 exames", conf) == "com o token: 12 exames"   # prose stays
    # a token cut by the 1000 characters kept of an answer leaves nothing of itself
    for start in range(BODY_LIMIT - len(TOKEN), BODY_LIMIT + 1):
        _, reason = classify(400, (" " * start + TOKEN).encode(), conf)
        assert not any(piece in reason for piece in fragments(TOKEN, 3)), start


# ------------------------------------------------------------------ control characters
ESC_CODE = "GLI\x1b]0;pwned\x07\u202e"
FORGED = "1\n2026-01-01 00:00:00,000 ERROR forjado"


def test_log_lines_show_control_characters_and_newlines_escaped(tmp_path):
    conf = parse_settings({"DATABASE_URL": "sqlite://", "TERCEIROS": LAB, "BEMSOFT_DRY_RUN": "1",
                           "LOG_FILE": "-"}, base_dir=tmp_path)
    formatter = RedactingFormatter("%(levelname)s %(message)s", conf)
    record = logging.LogRecord("bemsoft_monitor.x", logging.ERROR, __file__, 1,
                               "Solicitação %s falhou: exame %s", (FORGED, ESC_CODE), None)
    try:
        raise ValueError(f"código {ESC_CODE}")
    except ValueError:
        record.exc_info = sys.exc_info()
    text = formatter.format(record)
    first, *traceback = text.split("\n")
    assert first == ("ERROR Solicitação 1\\n2026-01-01 00:00:00,000 ERROR forjado falhou: exame "
                     "GLI\\x1b]0;pwned\\x07\\u202e")
    assert traceback[0] == "Traceback (most recent call last):"      # real lines
    assert traceback[-1] == "ValueError: código GLI\\x1b]0;pwned\\x07\\u202e"
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text


def failure_with_codes(directory: Path) -> Path:
    event = {"cod_solicitacao": FORGED, "solicitacao": {"codsolicitacao": FORGED, "codpaciente": 7},
             "paciente": {"codpaciente": 7, "nome": "Ana", "sexo": "F", "datanasc": "1990-01-01"},
             "items": [{"CodItemSol": 5, "CodConvExames": ESC_CODE, "DescExames": ESC_CODE,
                        "DataEntrada": "2026-01-01T08:00:00", "Origem": "AMB"}]}
    return FailureStore(directory).write(FailureRecord(
        reason=f"exame {ESC_CODE} não existe no catálogo", key="sol-1-abc", cod=FORGED,
        item_ids=[5], event=event))


def test_status_and_retry_failed_show_control_characters_escaped(env_file, legacy, tmp_path):
    failure_with_codes(tmp_path / "failed")
    status = run("monitor_bemsoft.py", "--env-file", str(env_file), "--status")
    replay = run("retry_failed.py", "--env-file", str(env_file), "--dir", str(tmp_path / "failed"))
    for result in (status, replay):
        out = result.stdout + result.stderr
        assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out, out
        assert "forjado" not in out or "\\n2026-01-01" in out
        assert not any(line.startswith("2026-01-01 00:00:00,000 ERROR") for line in out.splitlines())
    assert "\\x1b]0;pwned\\x07" in status.stdout + replay.stdout
