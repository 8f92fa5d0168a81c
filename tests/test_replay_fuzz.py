"""Malformed failure files given to `retry_failed.py` (SPEC §7: "A failure file that cannot be
parsed is reported by retry_failed.py and left in place"), property-based with hypothesis.

Each example is a fresh FAILED_DIR with one generated file and one good file. The CLI is
called in-process (`bemsoft_monitor.replay_cli.main([...], out=StringIO)`), in dry-run and
with --send against the project's fake API; a few subprocess runs check the real script.

Expected for every example: main() returns (never raises); every file gets exactly one
report line; a file reported with an error ("[ERRO] ...": "arquivo ilegível" or the reason)
stays in FAILED_DIR byte for byte under its own name; the good file is still processed; the
exit code is 1 exactly when some file failed; no traceback in the report."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import signal
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bemsoft_monitor import replay_cli
from bemsoft_monitor.config import KNOWN_KEYS
from bemsoft_monitor.testing.fakeapi import FakeBemsoft
from conftest import LAB, TOKEN, run

GOOD_NAME = "zz_boa.json"
BAD_NAME = "aa_ruim.json"   # sorted first: a crash on it would also stop the good file
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def good_record(cod: int = 7, item: int = 70) -> dict:
    return {
        "version": 1, "created_at": "2026-11-28T11:00:00+00:00", "reason": "sem sexo",
        "http_status": None, "attempts": 0, "idempotency_key": f"sol-{cod}-abc",
        "cod_solicitacao": str(cod), "item_ids": [item], "response": "",
        "event": {
            "cod_solicitacao": str(cod),
            "solicitacao": {"codsolicitacao": cod, "codpaciente": cod,
                            "dtaentrada": "2026-11-28T00:00:00", "Hora": "08:00"},
            "paciente": {"codpaciente": cod, "nome": "José da Conceição", "cpf": "123.456.789-09",
                         "datanasc": "1980-01-02T00:00:00", "sexo": "M"},
            "items": [{"CodItemSol": item, "CodSolicitacao": cod,
                       "DataEntrada": "2026-11-28T08:00:00", "DescExames": "GLICOSE",
                       "CodConvExames": "GLI", "NomeTerceirizado": LAB, "Origem": "AMB",
                       "SituacaoResultado": "PENDENTE"}],
        },
    }


def good_bytes(cod: int = 7, item: int = 70) -> bytes:
    return json.dumps(good_record(cod, item), ensure_ascii=False, indent=2).encode("utf-8")


# ------------------------------------------------------------------ running the CLI
@pytest.fixture(scope="module")
def fake_api():
    with FakeBemsoft(token=TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def env_files(tmp_path_factory, fake_api):
    base = tmp_path_factory.mktemp("replay_fuzz")
    common = [f"TERCEIROS={LAB}", f"DATABASE_URL=sqlite:///{base / 'legado.db'}",
              "START_FROM=0", f"FAILED_DIR={base / 'failed'}", f"LOG_FILE={base / 'replay.log'}"]
    dry = base / "dry.env"
    dry.write_text("\n".join(common + ["BEMSOFT_DRY_RUN=1"]) + "\n", encoding="utf-8")
    send = base / "send.env"
    send.write_text("\n".join(common + [f"BEMSOFT_BASE_URL={fake_api.url}", f"BEMSOFT_TOKEN={TOKEN}",
                                        "BEMSOFT_RETRIES=0", "BEMSOFT_TIMEOUT=5"]) + "\n",
                    encoding="utf-8")
    return {"dry": dry, "send": send}


@pytest.fixture(scope="module", autouse=True)
def clean_environment():
    """load_settings overlays the process environment: keep it out of these runs."""
    with pytest.MonkeyPatch.context() as mp:
        for key in KNOWN_KEYS:
            mp.delenv(key, raising=False)
        yield


def replay(env_file: Path, directory: Path, *extra: str) -> tuple[int, str, str]:
    """replay_cli.main in-process; returns (exit code, report, stderr/log). Restores the
    signal handlers and logging handlers it installs."""
    out, err = io.StringIO(), io.StringIO()
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    root = logging.getLogger()
    level = root.level
    try:
        with contextlib.redirect_stderr(err):
            code = replay_cli.main(["--env-file", str(env_file), "--dir", str(directory), *extra],
                                   out=out)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        for handler in list(root.handlers):
            if getattr(handler, "_bemsoft", False):
                root.removeHandler(handler)
                handler.close()
        root.setLevel(level)
    return code, out.getvalue(), err.getvalue()


def check_folder(env_files, bad: bytes, *, send: bool = False, must_fail: bool = True) -> dict:
    """One bad file + one good file in a fresh folder; asserts the common properties."""
    with tempfile.TemporaryDirectory(prefix="replay_fuzz_") as tmp:
        folder = Path(tmp) / "failed"
        folder.mkdir()
        (folder / BAD_NAME).write_bytes(bad)
        (folder / GOOD_NAME).write_bytes(good_bytes())
        args = ["--send", "--move-ok", str(Path(tmp) / "sent")] if send else []
        code, out, err = replay(env_files["send" if send else "dry"], folder, *args)
        lines = out.splitlines()
        bad_lines = [line for line in lines if f" {BAD_NAME}:" in line]
        good_lines = [line for line in lines if f" {GOOD_NAME}:" in line]
        assert len(bad_lines) == 1, out
        assert len(good_lines) == 1 and good_lines[0].startswith("[OK]" if send else "[DRY-RUN]"), out
        failed = bad_lines[0].startswith("[ERRO]")
        assert failed or not must_fail, out
        if failed:
            assert (folder / BAD_NAME).read_bytes() == bad, "o arquivo ruim foi alterado ou movido"
        assert not list(folder.glob("*.claimed-*")), "arquivo preso com a marca de reenvio"
        assert code == (1 if failed else 0), out
        assert "Traceback" not in out, out
        assert any(line.startswith("Resumo:") for line in lines), out
        if send:
            assert (Path(tmp) / "sent" / GOOD_NAME).exists()
            assert (folder / GOOD_NAME).exists() is False
        return {"failed": failed, "out": out, "err": err, "line": bad_lines[0]}


# ------------------------------------------------------------------ strategies
def truncated(data: bytes):
    return st.integers(0, len(data) - 1).map(lambda n: data[:n])


def non_utf8():
    text = good_bytes().decode("utf-8")
    encoded = st.sampled_from(["latin-1", "cp1252", "utf-16", "utf-32"]).map(text.encode)
    raw = good_bytes()
    spliced = st.tuples(st.integers(0, len(raw)), st.sampled_from([b"\xff", b"\xc3", b"\x80\x80",
                                                                   b"\xed\xa0\x80"]))
    return st.one_of(encoded, spliced.map(lambda p: raw[:p[0]] + p[1] + raw[p[0]:]))


def structure_broken():
    """Valid JSON that is not a usable failure record: not an object, no event, event not an
    object, no items, empty items, items not a list, item without a valid CodItemSol."""
    def mutate(choice):
        record = good_record()
        if choice == "no-event":
            del record["event"]
        elif choice == "event-list":
            record["event"] = [record["event"]]
        elif choice == "event-null":
            record["event"] = None
        elif choice == "no-items":
            del record["event"]["items"]
        elif choice == "items-empty":
            record["event"]["items"] = []
        elif choice == "items-dict":
            record["event"]["items"] = record["event"]["items"][0]
        elif choice == "item-no-id":
            del record["event"]["items"][0]["CodItemSol"]
        elif choice == "item-bad-id":
            record["event"]["items"][0]["CodItemSol"] = "setenta"
        elif choice == "item-null":
            record["event"]["items"] = [None]
        return json.dumps(record).encode()
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20),
                        st.lists(st.integers(), max_size=3)).map(lambda v: json.dumps(v).encode())
    return st.one_of(scalars, st.sampled_from(
        ["no-event", "event-list", "event-null", "no-items", "items-empty", "items-dict",
         "item-no-id", "item-bad-id", "item-null"]).map(mutate))


TOP_FIELDS = [("version",), ("created_at",), ("reason",), ("http_status",), ("attempts",),
              ("idempotency_key",), ("cod_solicitacao",), ("item_ids",), ("response",)]
EVENT_FIELDS = ([("event", "cod_solicitacao"), ("event", "solicitacao"), ("event", "paciente"),
                 ("event", "items")]
                + [("event", "solicitacao", k) for k in good_record()["event"]["solicitacao"]]
                + [("event", "paciente", k) for k in good_record()["event"]["paciente"]]
                + [("event", "items", 0, k) for k in good_record()["event"]["items"][0]])
DELETE = object()


def wrong_values(infinite: bool):
    huge_text = st.integers(10_000, 300_000).map(lambda n: "é" * n)
    return st.one_of(
        st.just(DELETE), st.none(), st.booleans(),
        st.integers(), st.integers(min_value=2 ** 63, max_value=10 ** 300),
        st.integers(max_value=-(2 ** 63), min_value=-(10 ** 300)),
        st.floats(allow_nan=infinite, allow_infinity=infinite),
        st.text(max_size=30), huge_text,
        st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
        st.sampled_from(["", " ", "abc", "12abc", "2026-13-45", "25:61", "1e400", "NaN", "-1",
                         "\u0000", "🧪"]),
    )


def with_value(path: tuple, value) -> bytes:
    record = good_record()
    target = record
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        target.pop(path[-1], None)
    else:
        target[path[-1]] = value
    return json.dumps(record, ensure_ascii=False).encode("utf-8")   # NaN/Infinity as Python writes


# ------------------------------------------------------------------ properties
@FUZZ
@given(bad=st.one_of(st.binary(max_size=3000), truncated(good_bytes()), non_utf8(),
                     structure_broken()),
       send=st.booleans())
def test_unreadable_or_unusable_files_are_reported_and_left_in_place(env_files, bad, send):
    result = check_folder(env_files, bad, send=send)
    assert "[ERRO]" in result["line"]


@FUZZ
@given(path=st.sampled_from(EVENT_FIELDS), value=wrong_values(infinite=False))
def test_wrong_types_and_huge_values_in_the_event_never_stop_the_replay(env_files, path, value):
    """Fields of the stored event (solicitation, patient, items): each either rebuilds into
    a payload (a default applies) or is reported; never stops the other files. (Infinite
    numbers: see the next test.)"""
    check_folder(env_files, with_value(path, value), must_fail=False)


@FUZZ
@example(path=("attempts",), value=[1])
@example(path=("attempts",), value="x")
@example(path=("event", "items", 0, "CodItemSol"), value=math.inf)
@given(path=st.sampled_from(TOP_FIELDS + EVENT_FIELDS), value=wrong_values(infinite=True))
def test_wrong_types_and_huge_values_in_any_field_never_stop_the_replay(env_files, path, value):
    check_folder(env_files, with_value(path, value), must_fail=False)


def test_deeply_nested_json_is_reported_as_unreadable(env_files):
    check_folder(env_files, b"[" * 100_000 + b"]" * 100_000)


@pytest.mark.parametrize("path,value,must_fail", [(("event", "paciente"), [1], True),
                                                  (("http_status",), "abc", False),  # ignored
                                                  (("event", "solicitacao"), "texto", True)])
def test_odd_stored_values_are_reported_without_a_traceback(env_files, path, value, must_fail):
    result = check_folder(env_files, with_value(path, value), must_fail=must_fail)
    assert "Traceback" not in result["err"], result["err"][-2000:]


# ------------------------------------------------------------------ the real script
def test_retry_failed_script_reports_bad_files_and_processes_the_good_one(tmp_path, env_files):
    folder = tmp_path / "failed"
    folder.mkdir()
    bad = {"a_lixo.json": os.urandom(512) + b"\xff\xfe",
           "b_truncado.json": good_bytes()[:150],
           "c_latin1.json": good_bytes().decode("utf-8").encode("latin-1"),
           "d_sem_evento.json": json.dumps({"reason": "x"}).encode()}
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    (folder / GOOD_NAME).write_bytes(good_bytes())
    done = run("retry_failed.py", "--env-file", str(env_files["dry"]), "--dir", str(folder))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    for name, data in bad.items():
        line = next(line for line in done.stdout.splitlines() if f" {name}:" in line)
        assert line.startswith("[ERRO]"), line
        assert (folder / name).read_bytes() == data
    assert done.stdout.count("ilegível") >= 3, done.stdout
    assert f"[DRY-RUN] {GOOD_NAME}" in done.stdout
    assert "com erro 4" in done.stdout


def test_retry_failed_script_send_leaves_bad_files_and_delivers_the_good_one(tmp_path, env_files,
                                                                            fake_api):
    folder = tmp_path / "failed"
    folder.mkdir()
    junk = b"{\"event\": {\"items\": [{\"CodItemSol\": "   # cut in the middle of a write
    (folder / "a_cortado.json").write_bytes(junk)
    (folder / GOOD_NAME).write_bytes(good_bytes(cod=9, item=90))
    done = run("retry_failed.py", "--env-file", str(env_files["send"]), "--dir", str(folder),
               "--send", "--move-ok", str(tmp_path / "sent"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert "[ERRO] a_cortado.json: arquivo ilegível" in done.stdout
    assert (folder / "a_cortado.json").read_bytes() == junk
    assert sorted(p.name for p in folder.iterdir()) == ["a_cortado.json"]
    assert (tmp_path / "sent" / GOOD_NAME).exists()
    assert "item-90" in fake_api.stored_tests()


def test_the_fuzzers_good_record_replays(env_files):
    """Sanity: without mutation the fuzzer's record rebuilds into a payload (otherwise the
    properties above could pass for the wrong reason)."""
    assert check_folder(env_files, good_bytes(cod=8, item=80), must_fail=False)["failed"] is False
