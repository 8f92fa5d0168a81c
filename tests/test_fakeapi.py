"""The fake Bemsoft API, exercised over real HTTP on 127.0.0.1 (no mocks)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import urllib3
from urllib3.exceptions import ProtocolError

from bemsoft_monitor.testing.fakeapi import FakeBemsoft, validate_payload

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
PROJECT_DIR = Path(__file__).resolve().parent.parent


def make_payload(cod: int = 1001, items: list[tuple] | None = None, date: str = "2024-05-10",
                 batch_id: str | None = None, physician: bool = True) -> dict:
    """A valid SPEC §3 payload. ``items``: (CodItemSol, supportTestId, specimen[, date])."""
    items = items or [(1, "GLI", "SORO"), (2, "FE", "PLASMA")]
    tests = []
    for it in items:
        item_id, test_id, specimen = it[:3]
        tests.append({
            "externalId": f"item-{item_id}",
            "collectionDate": it[3] if len(it) > 3 else date,
            "collectionTime": "08:30:00",
            "supportTestId": test_id,
            "supportSpecimenId": specimen,
            "additionalInformations": [{"key": "origem", "value": "LAB"},
                                       {"key": "descricao", "value": "Ferro sérico"}],
            "condition": "", "preservative": "", "diuresisVolume": 0, "diuresisTime": 0,
        })
    order = {
        "externalId": f"order-{cod}", "date": date, "time": "08:30:00",
        "patientHeight": 0, "patientWeight": 0,
        "patient": {"externalId": "pat-77", "name": "JOÃO DA SILVA", "birthDate": "1980-01-31",
                    "gender": "M", "weight": 0, "height": 0},
        "tests": tests,
    }
    if physician:
        order["physician"] = {"externalId": "12345", "name": "DRA. MARIA", "councilAbbreviation": "CRM",
                              "councilNumber": "12345", "councilUf": "SP"}
    return {"batch": {"externalId": batch_id or f"sol-{cod}", "date": date, "time": "08:30:00",
                      "order": order}}


@pytest.fixture
def fake():
    with FakeBemsoft(token=TOKEN) as f:
        yield f


@pytest.fixture
def http(fake):
    pool = urllib3.HTTPConnectionPool("127.0.0.1", fake.port, maxsize=1, retries=False,
                                      timeout=urllib3.Timeout(connect=2, read=5))
    yield pool
    pool.close()


def post(http, payload, key, headers=None, path="/requests"):
    hdrs = dict(AUTH if headers is None else headers)
    if key is not None:
        hdrs["Idempotency-Key"] = key
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return http.request("POST", path, body=body, headers=hdrs)


def js(resp):
    return json.loads(resp.data)


# ----------------------------------------------------------------------------- catalog

def test_catalog_requires_token_and_lists_variants(fake, http):
    r = http.request("GET", "/tests")
    assert r.status == 401 and "error" in js(r)
    r = http.request("GET", "/tests", headers={"Authorization": "Bearer wrong"})
    assert r.status == 401

    r = http.request("GET", "/tests", headers=AUTH)
    assert r.status == 200
    tests = js(r)["tests"]
    pairs = {(t["id"], t["specimen"]["id"]) for t in tests}
    assert {("GLI", "SORO"), ("HEMO", "SANGUE"), ("FE", "SORO"), ("FE", "PLASMA"),
            ("TSH", "SORO"), ("URINA1", "URINA")} <= pairs
    fe = [t for t in tests if t["id"] == "FE"]
    assert len(fe) == 2 and fe[0]["name"] == "FERRO SERICO"
    assert all(set(t) == {"id", "name", "specimen"} for t in tests)
    assert fake.tests_calls == 3


def test_set_catalog_registers_new_code(fake, http):
    fake.set_catalog(fake.catalog + [("VITD", "VITAMINA D", "SORO", "Soro")])
    tests = js(http.request("GET", "/tests", headers=AUTH))["tests"]
    assert {"id": "VITD", "name": "VITAMINA D", "specimen": {"id": "SORO", "name": "Soro"}} in tests
    fake.reset()
    tests = js(http.request("GET", "/tests", headers=AUTH))["tests"]
    assert "VITD" not in {t["id"] for t in tests}


def test_fail_tests_next(fake, http):
    fake.fail_tests_next(1, status=502)
    assert http.request("GET", "/tests", headers=AUTH).status == 502
    assert http.request("GET", "/tests", headers=AUTH).status == 200


# ----------------------------------------------------------------------------- POST /requests

def test_valid_post_is_stored(fake, http):
    r = post(http, make_payload(), "sol-1001-abc")
    assert r.status == 201
    body = js(r)
    assert body["status"] == "received" and body["id"]
    assert fake.stored_tests() == ["item-1", "item-2"]
    recs = fake.stored_test_records()
    assert recs[1]["supportTestId"] == "FE" and recs[1]["supportSpecimenId"] == "PLASMA"
    assert recs[0]["key"] == "sol-1001-abc" and recs[0]["batchDate"] == "2024-05-10"
    batches = fake.stored_batches()
    assert batches["sol-1001"]["tests"] == ["item-1", "item-2"]
    assert batches["sol-1001"]["order"] == "order-1001"
    assert fake.keys == ["sol-1001-abc"]
    req = fake.requests[-1]
    assert req["status"] == 201 and req["key"] == "sol-1001-abc"
    assert req["body"]["batch"]["externalId"] == "sol-1001"
    assert req["headers"]["Authorization"] == "Bearer ***"
    assert TOKEN not in json.dumps(fake.requests)


def test_payload_without_physician_is_valid(fake, http):
    assert post(http, make_payload(physician=False), "k1").status == 201


def test_repeated_key_gets_409_and_stores_nothing(fake, http):
    assert post(http, make_payload(), "k1").status == 201
    r = post(http, make_payload(cod=2002, items=[(9, "TSH", "SORO")]), "k1")
    assert r.status == 409
    assert js(r) == {"error": "Idempotency-Key já utilizada"}
    assert fake.stored_tests() == ["item-1", "item-2"]
    assert "sol-2002" not in fake.stored_batches()


def test_key_remembered_after_body_error(fake, http):
    long_id = "sol-43335-cd27cc0df481"
    r = post(http, make_payload(batch_id=long_id), "k-long")
    assert r.status == 201
    assert js(r) == {"error": f"Não foi possível salvar os dados recebidos no lote {long_id}."}
    assert fake.stored_tests() == [] and fake.stored_batches() == {}
    # Same key with a now-valid body: 409, nothing saved (SPEC §5.2).
    assert post(http, make_payload(), "k-long").status == 409
    assert fake.stored_tests() == []
    # After a validation error (400) too.
    bad = make_payload()
    bad["batch"]["date"] = "10/05/2024"
    assert post(http, bad, "k-bad").status == 400
    assert post(http, make_payload(), "k-bad").status == 409
    assert fake.stored_tests() == []
    assert post(http, make_payload(), "k-new").status == 201
    assert fake.stored_tests() == ["item-1", "item-2"]


@pytest.mark.parametrize("where", ["order", "patient", "test"])
def test_long_external_ids_anywhere(fake, http, where):
    p = make_payload()
    long_id = "x" * 21
    if where == "order":
        p["batch"]["order"]["externalId"] = long_id
    elif where == "patient":
        p["batch"]["order"]["patient"]["externalId"] = long_id
    else:
        p["batch"]["order"]["tests"][1]["externalId"] = long_id
    r = post(http, p, "k")
    assert r.status == 201 and "sol-1001" in js(r)["error"]
    assert fake.stored_tests() == []
    ok = make_payload()  # exactly the limit is fine
    ok["batch"]["order"]["tests"][0]["externalId"] = "x" * 20
    assert post(http, ok, "k2").status == 201


def test_test_dated_after_batch_is_silently_dropped(fake, http):
    p = make_payload(items=[(1, "GLI", "SORO"), (2, "HEMO", "SANGUE", "2024-05-11")])
    r = post(http, p, "k1")
    assert r.status == 201 and js(r)["status"] == "received"
    assert fake.stored_tests() == ["item-1"]


def test_same_batch_new_key_accumulates(fake, http):
    assert post(http, make_payload(items=[(1, "GLI", "SORO")]), "sol-1001-a").status == 201
    assert post(http, make_payload(items=[(3, "TSH", "SORO")]), "sol-1001-b").status == 201
    assert fake.stored_tests() == ["item-1", "item-3"]
    b = fake.stored_batches()["sol-1001"]
    assert b["tests"] == ["item-1", "item-3"] and b["keys"] == ["sol-1001-a", "sol-1001-b"]
    # a duplicate delivery under a new key is visible as a duplicate
    assert post(http, make_payload(items=[(1, "GLI", "SORO")]), "sol-1001-c").status == 201
    assert fake.stored_tests().count("item-1") == 2


def _mutations():
    def set_(path, value):
        def f(p):
            obj = p
            for k in path[:-1]:
                obj = obj[k]
            obj[path[-1]] = value
        return f

    def del_(path):
        def f(p):
            obj = p
            for k in path[:-1]:
                obj = obj[k]
            del obj[path[-1]]
        return f

    b, o = ("batch",), ("batch", "order")
    t0 = o + ("tests", 0)
    return {
        "batch-missing": lambda p: p.clear(),
        "batch-date": set_(b + ("date",), "2024-13-01"),
        "batch-time": set_(b + ("time",), "8:30"),
        "order-date": set_(o + ("date",), "2024-02-30"),
        "order-missing": del_(b + ("order",)),
        "patient-name-empty": set_(o + ("patient", "name"), "  "),
        "patient-gender": set_(o + ("patient", "gender"), "Masculino"),
        "patient-birth": set_(o + ("patient", "birthDate"), None),
        "patient-missing-weight": del_(o + ("patient", "weight")),
        "height-string": set_(o + ("patientHeight",), "0"),
        "tests-empty": set_(o + ("tests",), []),
        "test-date": set_(t0 + ("collectionDate",), "2024-05-10T08:30:00"),
        "test-time": set_(t0 + ("collectionTime",), "25:00:00"),
        "test-no-specimen": del_(t0 + ("supportSpecimenId",)),
        "test-specimen-null": set_(t0 + ("supportSpecimenId",), None),
        "test-infos-not-list": set_(t0 + ("additionalInformations",), {"origem": "x"}),
        "test-info-no-key": set_(t0 + ("additionalInformations", 0), {"value": "x"}),
        "test-diuresis": set_(t0 + ("diuresisVolume",), None),
        "physician-incomplete": del_(o + ("physician", "councilUf")),
    }


@pytest.mark.parametrize("name", sorted(_mutations()))
def test_invalid_payload_400(fake, http, name):
    p = make_payload()
    _mutations()[name](p)
    r = post(http, p, f"k-{name}")
    assert r.status == 400
    errors = js(r)["errors"]
    assert isinstance(errors, list) and errors
    assert fake.stored_tests() == []
    assert f"k-{name}" in fake.keys


def test_validate_payload_accepts_the_spec_shape():
    assert validate_payload(make_payload()) == []
    assert validate_payload([]) != []


def test_non_json_body_400(fake, http):
    r = post(http, b"{not json", "k1")
    assert r.status == 400 and js(r)["errors"]


def test_missing_key_400_and_bad_token_401(fake, http):
    r = post(http, make_payload(), None)
    assert r.status == 400 and "Idempotency-Key" in js(r)["error"]

    r = post(http, make_payload(), "k1", headers={"Authorization": "Bearer nope",
                                                  "Content-Type": "application/json"})
    assert r.status == 401 and js(r) == {"error": "token inválido"}
    r = post(http, make_payload(), "k1", headers={"Content-Type": "application/json"})
    assert r.status == 401
    assert fake.keys == [] and fake.stored_tests() == []
    # the key was not burnt by the 401s
    assert post(http, make_payload(), "k1").status == 201


# ----------------------------------------------------------------------------- faults

def test_fail_next_with_retry_after(fake, http):
    fake.fail_next(2, status=503, retry_after=7)
    for _ in range(2):
        r = post(http, make_payload(), "k1")
        assert r.status == 503
        assert r.headers["Retry-After"] == "7"
        assert "error" in js(r)
    assert fake.keys == []
    r = post(http, make_payload(), "k1")  # same key: the failed attempts were not remembered
    assert r.status == 201 and "Retry-After" not in r.headers
    assert fake.stored_tests() == ["item-1", "item-2"]
    assert [q["status"] for q in fake.requests] == [503, 503, 201]


def test_fail_next_custom_body(fake, http):
    fake.fail_next(1, status=502, body="<html>Bad Gateway</html>")
    r = post(http, make_payload(), "k1")
    assert r.status == 502 and r.data == b"<html>Bad Gateway</html>"
    fake.fail_next(1, status=429, body={"erro": "devagar"})
    r = post(http, make_payload(), "k1")
    assert r.status == 429 and js(r) == {"erro": "devagar"}


def test_drop_next_gives_connection_error(fake, http):
    fake.drop_next(1)
    with pytest.raises(ProtocolError):
        post(http, make_payload(), "k1")
    assert fake.keys == [] and fake.stored_tests() == []
    r = post(http, make_payload(), "k1")
    assert r.status == 201
    assert fake.status_counts() == {"dropped": 1, "201": 1}


def test_timeout_next_processes_but_answers_late(fake):
    fake.timeout_next(1, 1.0)
    pool = urllib3.HTTPConnectionPool("127.0.0.1", fake.port, retries=False,
                                      timeout=urllib3.Timeout(connect=1, read=0.2))
    with pytest.raises(urllib3.exceptions.ReadTimeoutError):
        post(pool, make_payload(), "k1")
    pool.close()
    # The request was stored: a retry with the same key is deduplicated.
    deadline = time.monotonic() + 2
    while not fake.stored_tests() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake.stored_tests() == ["item-1", "item-2"]
    with urllib3.HTTPConnectionPool("127.0.0.1", fake.port, retries=False) as p2:
        assert post(p2, make_payload(), "k1").status == 409


def test_fault_rate_is_seeded_and_transient(fake, http):
    fake.fault_rate(0.5, statuses=(502, 503), seed=42)
    statuses = [post(http, make_payload(items=[(i, "GLI", "SORO")]), f"k{i}").status
                for i in range(40)]
    assert set(statuses) <= {201, 502, 503}
    assert 0 < statuses.count(201) < 40
    assert len(fake.stored_tests()) == statuses.count(201)
    fake.fault_rate(0)
    assert post(http, make_payload(), "k-final").status == 201


def test_latency_is_applied(fake, http):
    fake.set_latency(0.1)
    t0 = time.perf_counter()
    assert post(http, make_payload(), "k1").status == 201
    assert time.perf_counter() - t0 >= 0.1
    fake.set_latency(0)


# ----------------------------------------------------------------------------- control endpoints

def test_control_endpoints(fake, http):
    r = http.request("POST", "/_fake/faults",
                     body=json.dumps({"fail_next": {"n": 1, "status": 502, "retry_after": 3}}))
    assert r.status == 200 and js(r)["faults"]["fail_next"] == 1
    r = post(http, make_payload(), "k1")
    assert r.status == 502 and r.headers["Retry-After"] == "3"
    assert post(http, make_payload(), "k1").status == 201
    assert post(http, make_payload(), "k1").status == 409
    assert post(http, make_payload(items=[(1, "GLI", "SORO")]), "k2").status == 201

    state = js(http.request("GET", "/_fake/state"))
    assert state["tests"] == {"item-1": 2, "item-2": 1}
    assert state["duplicates"] == ["item-1"]
    assert state["stored_tests_total"] == 3
    assert state["posts_by_status"] == {"502": 1, "201": 2, "409": 1}
    assert state["posts"] == 4 and state["keys"] == 2 and state["batches"] == 1

    r = http.request("POST", "/_fake/faults", body=json.dumps({"drop_next": 1, "latency": 0}))
    assert r.status == 200 and js(r)["faults"]["drop_next"] == 1
    r = http.request("POST", "/_fake/faults", body=json.dumps({"bogus": 1}))
    assert r.status == 400

    r = http.request("POST", "/_fake/reset")
    assert r.status == 200
    state = js(http.request("GET", "/_fake/state"))
    assert state["tests"] == {} and state["keys"] == 0 and state["posts"] == 0
    assert state["faults"]["drop_next"] == 0
    assert fake.stored_tests() == [] and fake.requests == []


def test_control_catalog_and_fault_rate(fake, http):
    body = {"catalog": [{"id": "X1", "name": "X", "specimen": {"id": "SORO", "name": "Soro"}}],
            "fault_rate": {"rate": 1.0, "statuses": [504], "seed": 1}}
    assert http.request("POST", "/_fake/faults", body=json.dumps(body)).status == 200
    assert js(http.request("GET", "/tests", headers=AUTH))["tests"][0]["id"] == "X1"
    assert post(http, make_payload(), "k1").status == 504
    http.request("POST", "/_fake/faults", body=json.dumps({"clear": True}))
    assert post(http, make_payload(), "k1").status == 201


def test_unknown_route_404(fake, http):
    assert http.request("GET", "/nope").status == 404
    assert http.request("POST", "/nope", body=b"{}").status == 404


# ----------------------------------------------------------------------------- transport

def test_keep_alive_two_requests_one_connection(fake, http):
    assert http.request("GET", "/tests", headers=AUTH).status == 200
    assert post(http, make_payload(), "k1").status == 201
    assert post(http, make_payload(), "k1").status == 409
    assert http.num_connections == 1
    assert fake.connections == 1


class CountingSocket(socket.socket):
    """A server-side socket that counts the send calls the handler makes."""
    sends = 0

    def send(self, data, *args):
        type(self).sends += 1
        return super().send(data, *args)

    def sendall(self, data, *args):
        type(self).sends += 1
        return super().sendall(data, *args)


def test_each_answer_leaves_in_one_send(fake):
    """wbufsize: status line, headers and body in one segment, so no delayed-ACK stall
    (~40 ms per request, measured by bench/). Counted, not timed: one send per answer."""
    from bemsoft_monitor.testing.fakeapi import _Handler
    body = json.dumps(make_payload()).encode()
    request = (f"POST /requests HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
               f"Content-Type: application/json\r\nIdempotency-Key: one-send\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    request += b"GET /tests HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n\r\n"
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        accepted, address = listener.accept()
        server_side = CountingSocket(fileno=accepted.detach())
        client.sendall(request)
        client.shutdown(socket.SHUT_WR)           # two requests, then end of the connection
        CountingSocket.sends = 0
        _Handler(server_side, address, fake._server)
        server_side.close()
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
        client.close()
    assert answer.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 201" in answer
    assert CountingSocket.sends == 2


def test_concurrent_keep_alive_clients(fake):
    """8 clients in parallel: every item stored exactly once, one connection each."""
    def client(c):
        with urllib3.HTTPConnectionPool("127.0.0.1", fake.port, maxsize=1, retries=False) as pool:
            return [post(pool, make_payload(cod=c, items=[(c * 1000 + i, "GLI", "SORO")]),
                         f"sol-{c}-{i}").status for i in range(40)]

    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(client, range(8)))
    assert all(s == 201 for r in results for s in r)
    stored = fake.stored_tests()
    assert len(stored) == 320 and len(set(stored)) == 320
    assert fake.connections == 8 and len(fake.stored_batches()) == 8


def test_stop_with_open_keep_alive_connection():
    f = FakeBemsoft().start()
    pool = urllib3.HTTPConnectionPool("127.0.0.1", f.port, retries=False)
    assert pool.request("GET", "/tests", headers=AUTH).status == 200
    t0 = time.perf_counter()
    f.stop()
    assert time.perf_counter() - t0 < 2
    pool.close()


def test_cli_serves_until_sigterm():
    env = dict(os.environ, PYTHONPATH=str(PROJECT_DIR) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "bemsoft_monitor.testing.fakeapi",
                             "--port", "0", "--token", "T", "--latency", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                            cwd=PROJECT_DIR)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        with urllib3.PoolManager(retries=False) as pm:
            r = pm.request("GET", url + "/tests", headers={"Authorization": "Bearer T"})
            assert r.status == 200 and js(r)["tests"]
            r = pm.request("POST", url + "/requests", body=json.dumps(make_payload()).encode(),
                           headers={"Authorization": "Bearer T", "Idempotency-Key": "k"})
            assert r.status == 201
            assert js(pm.request("GET", url + "/_fake/state"))["tests"] == {"item-1": 1, "item-2": 1}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
