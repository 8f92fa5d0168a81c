"""The payload of SPEC §3 (and the §5/§7 rules that shape it), pinned by hand-written golden
files under tests/golden/, plus property-based tests over arbitrary legacy values.

The golden files were written from the specification, field by field; they were not produced
by the code under test. The parametrised cases start from a golden file and state, by hand,
the one thing that changes, then compare the whole payload.
"""
from __future__ import annotations

import copy
import datetime as dt
import decimal
import json
import logging
import re
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from bemsoft_monitor import config
from bemsoft_monitor.catalog import PLACEHOLDER_SPECIMEN, Catalog, PlaceholderCatalog
from bemsoft_monitor.config import parse_settings
from bemsoft_monitor.payload import (
    TEXT_LIMIT,
    BuiltPayload,
    TransformError,
    build_payload,
    external_token,
    idempotency_key,
    make_event,
)
from bemsoft_monitor.source import jsonable
from bemsoft_monitor.testing.harness import LAB

GOLDEN = Path(__file__).parent / "golden"

BASE_ENV = {"DATABASE_URL": "sqlite://", "TERCEIROS": "X", "BEMSOFT_DRY_RUN": "1",
            "LOG_FILE": "-"}
PHYSICIAN_ENV = {"PHYSICIAN_NAME": "Dra. Márcia Gonçalves", "PHYSICIAN_COUNCIL": "CRM",
                 "PHYSICIAN_NUMBER": "123456", "PHYSICIAN_UF": "SP"}
MAP_ENV = {"BEMSOFT_TEST_MAP_PATH": "tests_map.json"}  # relative: resolved against GOLDEN
DEFAULTS_ENV = {"DEFAULT_GENDER": "F", "DEFAULT_BIRTHDATE": "1970-01-01"}


# ------------------------------------------------------------------ helpers
def make_settings(**env):
    return parse_settings({**BASE_ENV, **env}, base_dir=GOLDEN)


def golden(name: str) -> dict:
    return json.loads((GOLDEN / name).read_text(encoding="utf-8"))


CATALOG_DATA = golden("catalog.json")


def make_catalog(data=None) -> Catalog:
    data = CATALOG_DATA if data is None else data
    return Catalog(lambda: copy.deepcopy(data), ttl=3600)


def happy_settings(**extra):
    return make_settings(**PHYSICIAN_ENV, **MAP_ENV, **extra)


def sol_row(**changes):
    row = {"codsolicitacao": 43335, "codpaciente": 7781, "dtaentrada": "2026-11-27T00:00:00",
           "Hora": "08:30"}
    row.update(changes)
    return row


def pac_row(**changes):
    row = {"codpaciente": 7781, "nome": "JOSÉ DA CONCEIÇÃO ÁVILA", "cpf": "123.456.789-09",
           "datanasc": "1980-01-02T00:00:00", "sexo": "Masculino"}
    row.update(changes)
    return row


def item_row(item_id, code, entered, desc, origem, **changes):
    row = {"CodItemSol": item_id, "CodSolicitacao": 43335, "DataEntrada": entered,
           "DescExames": desc, "CodConvExames": code, "NomeTerceirizado": LAB, "Origem": origem,
           "SituacaoResultado": "PENDENTE"}
    row.update(changes)
    return row


def happy_items(per_id=None):
    """The three items of the happy path, deliberately out of id order; per_id={90003: {...}}
    overrides columns of one item."""
    items = [
        item_row(90002, "FERRO", "2026-11-27T08:22:30", "FERRO SÉRICO", "AMBULATÓRIO"),
        item_row(90001, " glicose ", "2026-11-27T08:21:00", "GLICOSE EM JEJUM",
                 "Coleta domiciliar — São João"),
        item_row(90003, "TSH", "2026-11-27T08:25:00.123000", "TSH ULTRASSENSÍVEL", None),
    ]
    for item in items:
        item.update((per_id or {}).get(item["CodItemSol"], {}))
    return items


def happy_event(sol=None, pac=None, items=None, cod="43335"):
    return make_event(cod, sol_row() if sol is None else sol, pac_row() if pac is None else pac,
                      happy_items() if items is None else items)


def build(event, settings=None, specimens=None) -> BuiltPayload:
    return build_payload(event, settings or happy_settings(),
                         specimens if specimens is not None else make_catalog())


def payload_of(event, settings=None, specimens=None) -> dict:
    built = build(event, settings, specimens)
    assert built.rejected == []
    assert built.payload is not None
    # the payload is plain JSON: a round trip changes nothing
    assert json.loads(json.dumps(built.payload, ensure_ascii=False)) == built.payload
    return built.payload


def set_batch_moment(expected: dict, date: str, time: str) -> dict:
    expected["batch"]["date"] = expected["batch"]["order"]["date"] = date
    expected["batch"]["time"] = expected["batch"]["order"]["time"] = time
    return expected


def order_tests(payload: dict) -> list[dict]:
    return payload["batch"]["order"]["tests"]


# ------------------------------------------------------------------ golden: whole payloads
def test_happy_path_with_physician_matches_golden():
    built = build(happy_event())
    assert built.payload == golden("happy_path.json")
    assert built.item_ids == [90001, 90002, 90003]
    assert built.rejected == []


def test_item_order_in_the_input_does_not_matter():
    forward = build(happy_event(items=sorted(happy_items(), key=lambda i: i["CodItemSol"])))
    backward = build(happy_event(items=sorted(happy_items(), key=lambda i: -i["CodItemSol"])))
    assert forward.payload == backward.payload == golden("happy_path.json")


def test_native_legacy_values_give_the_same_payload_as_their_json_form():
    """The monitor keeps events JSON-safe (source.jsonable); the payload stage also accepts
    the native driver values (datetime, date, time, Decimal)."""
    sol = sol_row(codsolicitacao=decimal.Decimal(43335), codpaciente=decimal.Decimal(7781),
                  dtaentrada=dt.datetime(2026, 11, 27), Hora=dt.time(8, 30))
    pac = pac_row(codpaciente=decimal.Decimal(7781), datanasc=dt.datetime(1980, 1, 2))
    items = happy_items({90001: {"DataEntrada": dt.datetime(2026, 11, 27, 8, 21)},
                           90002: {"DataEntrada": dt.datetime(2026, 11, 27, 8, 22, 30)},
                           90003: {"DataEntrada": dt.datetime(2026, 11, 27, 8, 25, 0, 123000)}})
    assert payload_of(happy_event(sol, pac, items)) == golden("happy_path.json")
    as_json = make_event("43335", {k: jsonable(v) for k, v in sol.items()},
                         {k: jsonable(v) for k, v in pac.items()},
                         [{k: jsonable(v) for k, v in i.items()} for i in items])
    assert payload_of(as_json) == golden("happy_path.json")


def test_patient_by_cpf_with_defaults_matches_golden():
    event = make_event(
        "43336",
        {"codsolicitacao": 43336, "codpaciente": None, "dtaentrada": "2026-11-27T00:00:00",
         "Hora": "1900-01-01T14:05:00"},
        {"codpaciente": None, "nome": "Ana Lúcia Müller", "cpf": "987.654.321-00",
         "datanasc": None, "sexo": "Indefinido"},
        [item_row(91001, "hemograma", "2026-11-27T13:50:00", "HEMOGRAMA COMPLETO", "URGÊNCIA",
                  CodSolicitacao=43336)])
    settings = make_settings(**MAP_ENV, **DEFAULTS_ENV)
    assert payload_of(event, settings) == golden("cpf_defaults.json")


def test_item_entered_the_next_day_raises_the_batch_date_matches_golden():
    """SPEC §5.5: a test dated after its batch is silently dropped by the API."""
    items = happy_items({90003: {"DataEntrada": "2026-11-28T07:10:00"}})
    payload = payload_of(happy_event(items=items))
    assert payload == golden("late_item.json")


def test_item_later_the_same_day_raises_the_batch_time():
    items = happy_items({90003: {"DataEntrada": "2026-11-27T08:45:10"}})
    expected = set_batch_moment(golden("happy_path.json"), "2026-11-27", "08:45:10")
    order_tests(expected)[2]["collectionTime"] = "08:45:10"
    assert payload_of(happy_event(items=items)) == expected


@pytest.mark.parametrize("missing", ["PHYSICIAN_NAME", "PHYSICIAN_COUNCIL", "PHYSICIAN_NUMBER",
                                     "PHYSICIAN_UF"])
@pytest.mark.parametrize("how", ["absent", "empty", "blank"])
def test_physician_key_absent_when_any_setting_is_missing(missing, how):
    env = dict(PHYSICIAN_ENV)
    if how == "absent":
        del env[missing]
    else:
        env[missing] = "" if how == "empty" else "   "
    settings = make_settings(**env, **MAP_ENV)
    assert settings.physician is None
    expected = golden("happy_path.json")
    del expected["batch"]["order"]["physician"]
    payload = payload_of(happy_event(), settings)
    assert "physician" not in payload["batch"]["order"]
    assert payload == expected


# ------------------------------------------------------------------ gender
@pytest.mark.parametrize("sexo, gender", [
    ("M", "M"), ("F", "F"), ("m", "M"), ("f", "F"), ("Masculino", "M"), (" feminino ", "F"),
    ("FEMININO", "F"), ("MASCULINO", "M"), ("\tMasculino\n", "M"),
])
def test_gender_from_sexo(sexo, gender):
    expected = golden("happy_path.json")
    expected["batch"]["order"]["patient"]["gender"] = gender
    assert payload_of(happy_event(pac=pac_row(sexo=sexo))) == expected


@pytest.mark.parametrize("sexo", [None, "", "  ", "X", "Indefinido", "I", 1, "Masculino/Feminino"])
@pytest.mark.parametrize("default", ["M", "F"])
def test_gender_other_or_null_uses_default_gender(sexo, default):
    settings = happy_settings(DEFAULT_GENDER=default)
    expected = golden("happy_path.json")
    expected["batch"]["order"]["patient"]["gender"] = default
    assert payload_of(happy_event(pac=pac_row(sexo=sexo)), settings) == expected


@pytest.mark.parametrize("sexo", [None, "", "X", "Indefinido"])
def test_gender_without_default_fails_naming_default_gender(sexo):
    with pytest.raises(TransformError) as err:
        build(happy_event(pac=pac_row(sexo=sexo)))
    assert "DEFAULT_GENDER" in str(err.value)


# ------------------------------------------------------------------ birth date
@pytest.mark.parametrize("datanasc", [
    dt.datetime(1980, 1, 2), dt.datetime(1980, 1, 2, 15, 45, 10), dt.date(1980, 1, 2),
    "1980-01-02", "1980-01-02T00:00:00", "1980-01-02 00:00:00", "1980-01-02 00:00:00.000",
    " 1980-01-02 ", "02/01/1980",
], ids=repr)
def test_birth_date_forms(datanasc):
    assert payload_of(happy_event(pac=pac_row(datanasc=datanasc))) == golden("happy_path.json")


@pytest.mark.parametrize("datanasc", [None, "", "   ", "abc", "31/02/1980", "00/00/0000",
                                      "1980-13-45", "ontem", 0, 3.5], ids=repr)
def test_birth_date_garbage_or_null_uses_default_birthdate(datanasc):
    settings = happy_settings(DEFAULT_BIRTHDATE="1970-01-01")
    expected = golden("happy_path.json")
    expected["batch"]["order"]["patient"]["birthDate"] = "1970-01-01"
    assert payload_of(happy_event(pac=pac_row(datanasc=datanasc)), settings) == expected


@pytest.mark.parametrize("datanasc", [None, "", "abc", "31/02/1980"], ids=repr)
def test_birth_date_without_default_fails_naming_default_birthdate(datanasc):
    with pytest.raises(TransformError) as err:
        build(happy_event(pac=pac_row(datanasc=datanasc)))
    assert "DEFAULT_BIRTHDATE" in str(err.value)


# ------------------------------------------------------------------ patient id and name
@pytest.mark.parametrize("pac_cod, sol_cod, expected_id", [
    (7781, 7781, "pat-7781"),
    ("7781", 7781, "pat-7781"),
    (" 7781 ", 7781, "pat-7781"),
    (7781.0, 7781, "pat-7781"),                  # a driver that hands numbers as floats
    (None, 7781, "pat-7781"),                    # solicitacao.codpaciente is the same key
    (None, None, "cpf-12345678909"),              # CPF formatted 000.000.000-00
])
def test_patient_external_id(pac_cod, sol_cod, expected_id):
    expected = golden("happy_path.json")
    expected["batch"]["order"]["patient"]["externalId"] = expected_id
    event = happy_event(sol=sol_row(codpaciente=sol_cod), pac=pac_row(codpaciente=pac_cod))
    assert payload_of(event) == expected


@pytest.mark.parametrize("cpf, expected_id", [
    ("123.456.789-09", "cpf-12345678909"), ("12345678909", "cpf-12345678909"),
    (" 123 456 789 09 ", "cpf-12345678909"), (12345678909, "cpf-12345678909"),
])
def test_patient_external_id_from_cpf_digits_only(cpf, expected_id):
    event = happy_event(sol=sol_row(codpaciente=None), pac=pac_row(codpaciente=None, cpf=cpf))
    assert payload_of(event)["batch"]["order"]["patient"]["externalId"] == expected_id


def test_patient_without_id_and_cpf_fails_with_a_reason():
    event = happy_event(sol=sol_row(codpaciente=None), pac=pac_row(codpaciente=None, cpf=None))
    with pytest.raises(TransformError) as err:
        build(event)
    assert str(err.value).strip()


def test_missing_patient_row_fails_the_solicitation_with_a_reason():
    """LEFT join: the patient row may be missing; the solicitation becomes a failure."""
    with pytest.raises(TransformError) as err:
        build(make_event("43335", sol_row(), None, happy_items()))
    assert str(err.value).strip()


def test_missing_solicitacao_row_fails_with_a_reason():
    with pytest.raises(TransformError) as err:
        build(make_event("43335", None, pac_row(), happy_items()))
    assert str(err.value).strip()


@pytest.mark.parametrize("name", ["Maria José d'Ávila Conceição", "JOÃO ÇÉSAR ÜLLER Ñ",
                                  "Iara Tupinambá Guaraní"])
def test_names_with_accents_are_kept(name):
    expected = golden("happy_path.json")
    expected["batch"]["order"]["patient"]["name"] = name
    assert payload_of(happy_event(pac=pac_row(nome=name))) == expected


# ------------------------------------------------------------------ batch date / Hora
@pytest.mark.parametrize("hora, time", [
    ("08:30", "08:30:00"),
    ("08:30:45", "08:30:45"),
    (" 8:30 ", "08:30:00"),
    (dt.time(8, 30, 45), "08:30:45"),
    (dt.time(8, 30, 45, 999999), "08:30:45"),
    ("08:30:45.1234567", "08:30:45"),            # time(7) as text
    (dt.datetime(1900, 1, 1, 8, 30), "08:30:00"),  # SQL Server keeps times in 1900 datetimes
    ("1900-01-01 08:30:00", "08:30:00"),
    ("1900-01-01T08:30:00", "08:30:00"),
    ("1900-01-01 08:30:00.000", "08:30:00"),
], ids=repr)
def test_hora_forms(hora, time):
    expected = set_batch_moment(golden("happy_path.json"), "2026-11-27", time)
    assert payload_of(happy_event(sol=sol_row(Hora=hora))) == expected


@pytest.mark.parametrize("dtaentrada", [
    "2026-11-27", "2026-11-27T00:00:00", "27/11/2026", dt.date(2026, 11, 27),
    dt.datetime(2026, 11, 27), "2026-11-27 00:00:00.000",
], ids=repr)
def test_dtaentrada_forms(dtaentrada):
    assert payload_of(happy_event(sol=sol_row(dtaentrada=dtaentrada))) == golden("happy_path.json")


@pytest.mark.parametrize("hora", [None, "", "manhã", "25:99", "8", "99:99:99", "xx:yy", 830],
                         ids=repr)
def test_hora_garbage_falls_back_to_the_items_data_entrada(hora):
    """No usable Hora: the first item's DataEntrada (08:21), raised to the latest item
    (08:25) so that no test is dated after its batch."""
    expected = set_batch_moment(golden("happy_path.json"), "2026-11-27", "08:25:00")
    assert payload_of(happy_event(sol=sol_row(Hora=hora))) == expected


def test_first_item_data_entrada_when_it_is_the_latest():
    items = happy_items({90001: {"DataEntrada": "2026-11-27T09:00:00"}})
    expected = set_batch_moment(golden("happy_path.json"), "2026-11-27", "09:00:00")
    order_tests(expected)[0]["collectionTime"] = "09:00:00"
    assert payload_of(happy_event(sol=sol_row(Hora="garbage"), items=items)) == expected


@pytest.mark.parametrize("dtaentrada", [None, "", "garbage", "31/02/2026"], ids=repr)
def test_missing_dtaentrada_falls_back_to_the_items_data_entrada(dtaentrada):
    expected = set_batch_moment(golden("happy_path.json"), "2026-11-27", "08:25:00")
    assert payload_of(happy_event(sol=sol_row(dtaentrada=dtaentrada))) == expected


@pytest.mark.parametrize("tz", ["America/Sao_Paulo", "Pacific/Kiritimati", "Pacific/Pago_Pago"])
def test_no_date_anywhere_uses_now_in_timezone(tz):
    """Kiritimati (+14) and Pago Pago (-11) are always on different dates: the batch date
    must follow TIMEZONE, not the machine's zone or UTC."""
    items = happy_items({i: {"DataEntrada": None} for i in (90001, 90002, 90003)})
    settings = happy_settings(TIMEZONE=tz)
    before = dt.datetime.now(ZoneInfo(tz)).replace(tzinfo=None, microsecond=0)
    payload = payload_of(happy_event(sol=sol_row(dtaentrada=None, Hora=None), items=items),
                         settings)
    after = dt.datetime.now(ZoneInfo(tz)).replace(tzinfo=None)
    batch = payload["batch"]
    moment = dt.datetime.fromisoformat(f"{batch['date']}T{batch['time']}")
    assert before <= moment <= after
    assert (batch["order"]["date"], batch["order"]["time"]) == (batch["date"], batch["time"])
    for test in order_tests(payload):  # no DataEntrada: never after the batch
        assert (test["collectionDate"], test["collectionTime"]) <= (batch["date"], batch["time"])


# ------------------------------------------------------------------ test map and catalog
def test_test_map_keys_are_trimmed_and_case_insensitive():
    settings = happy_settings()
    assert settings.test_map == {"GLICOSE": config.TestMapping("GLI"),
                                 "FERRO": config.TestMapping("FE", "SORO"),
                                 "HEMOGRAMA": config.TestMapping("HEMO")}


@pytest.mark.parametrize("code", ["GLICOSE", "glicose", " glicose ", "Glicose", "\tgLiCoSe "])
def test_test_map_matches_item_codes_trimmed_and_case_insensitive(code):
    items = happy_items({90001: {"CodConvExames": code}})
    assert payload_of(happy_event(items=items)) == golden("happy_path.json")


def test_test_map_with_integer_codes(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"12345": "TSH", " 777 ": {"supportTestId": "FE",
                                                          "supportSpecimenId": "PLASMA"}}),
                    encoding="utf-8")
    settings = make_settings(**PHYSICIAN_ENV, BEMSOFT_TEST_MAP_PATH=str(path))
    items = [item_row(1, 12345, "2026-11-27T08:00:00", "A", "B"),
             item_row(2, "777", "2026-11-27T08:00:00", "A", "B")]
    tests = order_tests(payload_of(happy_event(items=items), settings))
    assert [(t["supportTestId"], t["supportSpecimenId"]) for t in tests] == [("TSH", "SORO"),
                                                                            ("FE", "PLASMA")]


@pytest.mark.parametrize("pinned", ["SORO", "PLASMA"])
def test_object_form_pins_the_specimen(tmp_path, pinned):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"FERRO": {"supportTestId": "FE", "supportSpecimenId": pinned}}),
                    encoding="utf-8")
    settings = make_settings(**PHYSICIAN_ENV, BEMSOFT_TEST_MAP_PATH=str(path))
    items = [item_row(1, "ferro", "2026-11-27T08:00:00", "FERRO SÉRICO", "AMB")]
    test = order_tests(payload_of(happy_event(items=items), settings))[0]
    assert (test["supportTestId"], test["supportSpecimenId"]) == ("FE", pinned)


def test_pinned_specimen_missing_from_catalog_rejects_that_item(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"FERRO": {"supportTestId": "FE", "supportSpecimenId": "URINA"}}),
                    encoding="utf-8")
    settings = make_settings(**PHYSICIAN_ENV, BEMSOFT_TEST_MAP_PATH=str(path))
    built = build(happy_event(items=happy_items({90001: {"CodConvExames": "GLI"}})), settings)
    assert built.item_ids == [90001, 90003]
    [(item, reason)] = built.rejected
    assert item["CodItemSol"] == 90002
    assert "URINA" in reason and "BEMSOFT_TEST_MAP_PATH" in reason


def test_variants_are_chosen_deterministically_and_logged(caplog):
    """Code FE has two specimens; without a pin the choice must not depend on the order the
    catalog lists them in, nor on the instance, and a warning says so."""
    settings = make_settings()
    items = [item_row(1, "FE", "2026-11-27T08:00:00", "FERRO", "AMB")]
    reversed_catalog = {"tests": list(reversed(CATALOG_DATA["tests"]))}
    chosen = set()
    with caplog.at_level(logging.WARNING):
        for data in (CATALOG_DATA, reversed_catalog, CATALOG_DATA, reversed_catalog):
            catalog = make_catalog(data)
            for _ in range(3):
                chosen.add(order_tests(payload_of(happy_event(items=items), settings,
                                               catalog))[0]["supportSpecimenId"])
    assert len(chosen) == 1
    assert chosen <= {"SORO", "PLASMA"}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and any("FE" in r.getMessage() for r in warnings)


def test_placeholder_catalog_in_dry_run_without_token():
    built = build(happy_event(), happy_settings(), PlaceholderCatalog())
    expected = golden("happy_path.json")
    # the object form keeps its pinned specimen; the others get the placeholder
    for test, specimen in zip(order_tests(expected), [PLACEHOLDER_SPECIMEN, "SORO",
                                                   PLACEHOLDER_SPECIMEN]):
        test["supportSpecimenId"] = specimen
    assert built.payload == expected


@pytest.mark.parametrize("code", ["XPTO", "tsh", ""])
def test_unknown_code_rejects_only_that_item(code):
    items = happy_items({90003: {"CodConvExames": code}})
    built = build(happy_event(items=items))
    expected = golden("happy_path.json")
    del order_tests(expected)[2]
    assert built.payload == expected
    assert built.item_ids == [90001, 90002]
    [(item, reason)] = built.rejected
    assert item["CodItemSol"] == 90003
    assert isinstance(reason, str) and reason.strip()
    if code.strip():
        assert code in reason


def test_every_item_unknown_gives_no_payload_and_every_item_rejected():
    items = happy_items({i: {"CodConvExames": f"NOPE{i}"} for i in (90001, 90002, 90003)})
    built = build(happy_event(items=items))
    assert built.payload is None
    assert built.item_ids == []
    assert sorted(item["CodItemSol"] for item, _ in built.rejected) == [90001, 90002, 90003]


# ------------------------------------------------------------------ text
def test_additional_informations_keep_accents_and_are_cut_at_255():
    origem = "Coleta ÁÉÍÓÚ ç ã õ — " + "ção" * 200
    descricao = "É" * 254 + "Ü" + "X" * 50
    items = happy_items({90001: {"Origem": origem, "DescExames": descricao}})
    expected = golden("happy_path.json")
    order_tests(expected)[0]["additionalInformations"] = [
        {"key": "origem", "value": origem[:255]},
        {"key": "descricao", "value": "É" * 254 + "Ü"},
    ]
    assert TEXT_LIMIT == 255
    payload = payload_of(happy_event(items=items))
    assert payload == expected
    for info in order_tests(payload)[0]["additionalInformations"]:
        assert len(info["value"]) == 255


def test_exactly_255_characters_are_kept():
    text = "ã" * 255
    items = happy_items({90001: {"DescExames": text}})
    assert order_tests(payload_of(happy_event(items=items)))[0]["additionalInformations"][1] == \
        {"key": "descricao", "value": text}


# ------------------------------------------------------------------ ids and keys
def test_idempotency_key_is_stable_for_the_same_ids_in_any_order():
    key = idempotency_key("43335", [90001, 90002, 90003])
    assert idempotency_key("43335", [90003, 90001, 90002]) == key
    assert idempotency_key("43335", ["90002", "90003", "90001"]) == key
    assert idempotency_key("43335", (i for i in (90002, 90001, 90003))) == key
    assert re.fullmatch(r"sol-43335-[0-9a-f]{6,16}", key)


def test_idempotency_key_of_a_numeric_code_is_unchanged_byte_for_byte():
    """Installations have these keys recorded: a crash re-send must reuse them. Literals
    computed once by hand (sha256 of "90001,90002,90003" and of "7"), not by the code."""
    assert idempotency_key("43335", [90003, 90001, 90002]) == "sol-43335-0b6099a16460"
    assert idempotency_key(43335, [90001, 90002, 90003]) == "sol-43335-0b6099a16460"
    assert idempotency_key("7", [7]) == "sol-7-7902699be42c"
    assert idempotency_key("7", [7], "-r1") == "sol-7-7902699be42c-r1"


@pytest.mark.parametrize("code, token", [
    ("43335", "43335"),
    (43335, "43335"),
    ("43335.0", "43335"),           # a numeric driver value
    (" 43335 ", "43335"),           # CHAR padding
    ("12345678901234", "12345678901234"),
    ("AB_12-x", "AB_12-x"),
    ("123456789012345", "12345.e27a7686"),   # 15 characters: too long for `order-<cod>`
    ("SOL 1/2", "SOL-1.70ae4589"),
    ("Ação 12", "Acao.612f5a4d"),
    ("12\n34", "12-34.96b2919f"),
    ("abc def ghi jkl mno", "abc-d.fb4e3f6c"),
    ("中文", "x.72726d88"),
])
def test_external_token_keeps_plain_codes_and_hashes_the_rest(code, token):
    """Pinned literals (the hash part is sha256 of the trimmed code, computed by hand)."""
    assert external_token(code) == token


@given(st.one_of(st.text(), st.integers(), st.floats(allow_nan=False)))
def test_keys_and_ids_are_ascii_safe_and_short_for_any_code(code):
    token = external_token(code)
    assert re.fullmatch(r"[0-9A-Za-z._-]{1,14}", token)
    key = idempotency_key(code, [1, 2])
    assert re.fullmatch(r"[0-9A-Za-z._-]+", key) and len(key) <= 4 + 14 + 13


def test_idempotency_key_changes_when_ids_or_solicitation_change():
    key = idempotency_key("43335", [90001, 90002, 90003])
    assert idempotency_key("43335", [90001, 90002]) != key
    assert idempotency_key("43335", [90001, 90002, 90004]) != key
    assert idempotency_key("43335", [90004]) != idempotency_key("43335", [90005])
    assert idempotency_key("43336", [90001, 90002, 90003]) != key


def test_external_ids_are_short_even_for_numeric_driver_values():
    """SPEC §5.4: long external ids were refused; variation goes in the key only."""
    items = [dict(i, CodItemSol=float(i["CodItemSol"])) for i in happy_items()]
    event = make_event("43335.0", sol_row(codpaciente=7781.0),
                       pac_row(codpaciente=jsonable(decimal.Decimal(7781))), items)
    payload = payload_of(event)
    batch = payload["batch"]
    assert batch["externalId"] == "sol-43335"
    assert batch["order"]["externalId"] == "order-43335"
    assert batch["order"]["patient"]["externalId"] == "pat-7781"
    assert [t["externalId"] for t in order_tests(payload)] == ["item-90001", "item-90002",
                                                           "item-90003"]


# ------------------------------------------------------------------ deep date texts
DEEP_DATE_TEXT = "2026-11-27 " * 600  # ~6.6 kB of repeated dates in a legacy text column


class EscapedRecursion(Exception):
    """RecursionError re-raised without its (huge, slow to render) traceback."""


@pytest.mark.parametrize("where", ["datanasc", "dtaentrada", "Hora", "DataEntrada"])
def test_long_repeated_date_text_does_not_escape_as_recursion_error(where):
    settings = happy_settings(**DEFAULTS_ENV)
    if where == "datanasc":
        event = happy_event(pac=pac_row(datanasc=DEEP_DATE_TEXT))
    elif where == "DataEntrada":
        event = happy_event(items=happy_items({90001: {"DataEntrada": DEEP_DATE_TEXT}}))
    else:
        event = happy_event(sol=sol_row(**{where: DEEP_DATE_TEXT}))
    try:
        built = build(event, settings)
    except TransformError as err:
        assert str(err).strip()
    except RecursionError:
        raise EscapedRecursion(f"RecursionError from a long {where}") from None
    else:
        assert built.payload is not None


# ------------------------------------------------------------------ property-based
CONTROL_ALPHABET = "\x00\x01\x07\x08\t\n\x0b\x0c\r\x1b\x1f\x7f\x85\xa0\u200b\u2028\u202e\ufeff" \
                   "aZ09:/-. áçõÉÜñ😀"
PLAUSIBLE = ["M", "F", "Masculino", " feminino ", "FEMININO", "X", "08:30", "08:30:45",
             "1900-01-01 08:30:00", "1900-01-01T08:30:00", "1980-01-02", "02/01/1980",
             "27/11/2026", "2026-11-27T08:21:00", "2026-11-28T07:10:00", "2026-11-27",
             "123.456.789-09", "", "  ", "25:99", "31/02/1980", "9999-12-31T23:59:59",
             "0001-01-01", "2026-11-27T24:00:00", "1e308", "NaN", "-1", "00:00",
             "2026-11-27 garbage", "2026-11-27 08:30 2026-11-28 09:00"]

texts = st.one_of(
    st.builds(lambda n: "2026-11-27 " * n, st.integers(1, 800)),   # once a recursion bug
    st.text(max_size=40),
    st.text(alphabet=CONTROL_ALPHABET, max_size=60),
    st.text(min_size=256, max_size=1200),
    st.builds(lambda chunk, n: chunk * n,
              st.sampled_from(["á", "x", " ", "\x00", "9", "ção ", "\n"]),
              st.integers(256, 5000)),
)
natives = st.one_of(
    st.integers(min_value=-2**63, max_value=2**63 - 1),
    st.floats(),
    st.dates(), st.datetimes(), st.times(),
    st.datetimes(timezones=st.just(dt.timezone(dt.timedelta(hours=-3)))),
    st.decimals(allow_nan=False, places=2, min_value=-10**12, max_value=10**12),
)
legacy_value = st.one_of(
    st.none(), st.sampled_from(PLAUSIBLE), texts, natives, natives.map(jsonable),
)
codes = st.one_of(st.sampled_from(["GLI", "FE", "TSH", "HEMO"]),        # in the catalog
                  st.sampled_from([" glicose ", "FERRO", "ferro", "hemograma",  # in the map
                                   "XPTO", "", "  "]),
                  legacy_value)

# a plausible value per column; each column is replaced by an arbitrary value half the time,
# so that both the defaults/fallbacks and the happy shape are exercised
GOOD_ITEM = {"DataEntrada": "2026-11-27T08:21:00", "DescExames": "GLICOSE", "Origem": "AMB",
             "NomeTerceirizado": LAB, "SituacaoResultado": "PENDENTE", "CodSolicitacao": 43335}
GOOD_SOL = {"codsolicitacao": 43335, "codpaciente": 7781, "dtaentrada": "2026-11-27",
            "Hora": "08:30"}
GOOD_PAC = {"codpaciente": 7781, "nome": "Maria da Conceição", "cpf": "123.456.789-09",
            "datanasc": "1980-01-02", "sexo": "F"}


@st.composite
def events(draw):
    def column(good):
        choice = draw(st.integers(0, 5))  # hypothesis favours 0: the plausible value
        if choice == 5:
            return "absent"
        return good if choice <= 2 else draw(legacy_value)

    def row(good_row):
        if draw(st.integers(0, 19)) == 19:
            return None
        values = {name: column(good) for name, good in good_row.items()}
        return {name: value for name, value in values.items() if value != "absent"}

    ids = draw(st.lists(st.integers(1, 2**53), unique=True, min_size=1, max_size=5))
    items = []
    for item_id in ids:
        item = dict(row(GOOD_ITEM) or {}, CodItemSol=item_id)
        item["CodConvExames"] = draw(codes)
        items.append(item)
    cod = draw(st.one_of(st.sampled_from(["43335", "43335.0", " 43335 "]),
                         st.integers(0, 10**12).map(str), st.text(max_size=20)))
    return make_event(cod, row(GOOD_SOL), row(GOOD_PAC), items)


SETTINGS_CHOICES = [
    make_settings(),
    make_settings(**PHYSICIAN_ENV, **MAP_ENV),
    make_settings(**DEFAULTS_ENV),
    make_settings(**PHYSICIAN_ENV, **MAP_ENV, DEFAULT_GENDER="M", DEFAULT_BIRTHDATE="1900-01-01",
                  TIMEZONE="Pacific/Kiritimati"),
]
SPECIMEN_SOURCES = [make_catalog, PlaceholderCatalog]

DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
TIME_RE = re.compile(r"[0-9]{2}:[0-9]{2}:[0-9]{2}")
PROPERTY_SETTINGS = hsettings(
    max_examples=200, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.large_base_example])


def check_date(text):
    assert isinstance(text, str) and DATE_RE.fullmatch(text), text
    dt.date.fromisoformat(text)


def check_time(text):
    assert isinstance(text, str) and TIME_RE.fullmatch(text), text
    dt.time.fromisoformat(text)


def check_shape(built: BuiltPayload, event: dict) -> None:
    assert isinstance(built, BuiltPayload)
    all_ids = sorted(int(i["CodItemSol"]) for i in event["items"])
    rejected_ids = [int(item["CodItemSol"]) for item, _ in built.rejected]
    for _, reason in built.rejected:
        assert isinstance(reason, str) and reason.strip()
    # nothing lost: every item is either in the payload or rejected with a reason
    assert sorted(built.item_ids + rejected_ids) == all_ids
    if built.payload is None:
        assert built.item_ids == []
        return
    text = json.dumps(built.payload, ensure_ascii=False, allow_nan=False)
    text.encode("utf-8")
    assert json.loads(text) == built.payload
    batch = built.payload["batch"]
    order = batch["order"]
    check_date(batch["date"])
    check_time(batch["time"])
    assert (order["date"], order["time"]) == (batch["date"], batch["time"])
    assert batch["externalId"].startswith("sol-") and order["externalId"].startswith("order-")
    assert order["patientHeight"] == 0 and order["patientWeight"] == 0
    patient = order["patient"]
    assert patient["gender"] in ("M", "F")
    check_date(patient["birthDate"])
    # ASCII-safe and short whatever the legacy code holds (SPEC §5.4)
    assert re.fullmatch(r"(pat|cpf)-[0-9A-Za-z._-]{1,14}", patient["externalId"])
    assert re.fullmatch(r"sol-[0-9A-Za-z._-]{1,14}", batch["externalId"])
    assert isinstance(patient["name"], str) and patient["name"]
    assert patient["weight"] == 0 and patient["height"] == 0
    assert [t["externalId"] for t in order["tests"]] == [f"item-{i}" for i in built.item_ids]
    for test in order["tests"]:
        check_date(test["collectionDate"])
        check_time(test["collectionTime"])
        # SPEC §5.5: never a test dated after its batch
        assert test["collectionDate"] <= batch["date"]
        assert (test["collectionDate"], test["collectionTime"]) <= (batch["date"], batch["time"])
        assert isinstance(test["supportTestId"], str) and test["supportTestId"]
        assert isinstance(test["supportSpecimenId"], str) and test["supportSpecimenId"]
        infos = test["additionalInformations"]
        assert [i["key"] for i in infos] == ["origem", "descricao"]
        assert all(isinstance(i["value"], str) and len(i["value"]) <= 255 for i in infos)
        assert (test["condition"], test["preservative"]) == ("", "")
        assert (test["diuresisVolume"], test["diuresisTime"]) == (0, 0)


@PROPERTY_SETTINGS
@given(event=events(), settings_index=st.integers(0, len(SETTINGS_CHOICES) - 1),
       source_index=st.integers(0, len(SPECIMEN_SOURCES) - 1))
def test_arbitrary_legacy_values_give_a_valid_payload_or_a_transform_error(
        event, settings_index, source_index):
    settings = SETTINGS_CHOICES[settings_index]
    try:
        built = build_payload(event, settings, SPECIMEN_SOURCES[source_index]())
    except TransformError as err:
        assert str(err).strip()
        return
    check_shape(built, event)


AROUND_SETTINGS = (happy_settings(), happy_settings(**DEFAULTS_ENV))


@PROPERTY_SETTINGS
@given(sexo=legacy_value, datanasc=legacy_value, hora=legacy_value, dtaentrada=legacy_value,
       entered=legacy_value, nome=legacy_value)
def test_arbitrary_values_around_a_valid_event(sexo, datanasc, hora, dtaentrada, entered, nome):
    """One odd column at a time would be too gentle: all the risky columns vary together
    around an otherwise valid solicitation, with and without defaults."""
    event = happy_event(sol=sol_row(Hora=hora, dtaentrada=dtaentrada),
                        pac=pac_row(sexo=sexo, datanasc=datanasc, nome=nome),
                        items=happy_items({90002: {"DataEntrada": entered}}))
    for settings in AROUND_SETTINGS:
        try:
            built = build_payload(event, settings, make_catalog())
        except TransformError as err:
            assert str(err).strip()
            continue
        check_shape(built, event)
        if settings.default_gender and settings.default_birthdate:
            assert built.payload is not None
