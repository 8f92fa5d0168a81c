"""The hospital network (SPEC §8): the API reachable only through a forward proxy, TLS
signed by a private CA, a captive portal answering 200 HTML, a server trickling its answer,
a huge body, and what `--check` says about each broken route.

The fake API serves TLS under `api.bemsoft.test`, a name only the test proxy resolves: an
order that arrives went through the proxy (CONNECT) and was verified against the test CA."""
from __future__ import annotations

import base64
import collections
import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from bemsoft_monitor.client import BODY_CAP, BemsoftClient, Verdict
from bemsoft_monitor.config import parse_settings
from bemsoft_monitor.testing.fakeapi import FakeBemsoft
from bemsoft_monitor.payload import idempotency_key
from conftest import LAB, ROOT, TOKEN, run
from bemsoft_monitor.testing.harness import wait_until
from bemsoft_monitor.testing.network import (API_HOST, CannedServer, ForwardProxy, HospitalCA,
                                              _Listener, read_request)
from test_api_behaviour import FAST, fast_clocks

PORTAL = "<html><head><title>Hospital - acesso</title></head><body>Faça login</body></html>"
PROXY_USER, PROXY_PASSWORD = "lab.ti", "S3nha-do-Proxy!"


@pytest.fixture
def ca(tmp_path):
    return HospitalCA(tmp_path)


@pytest.fixture
def api(ca):
    """The fake API over TLS, named api.bemsoft.test (overrides conftest's plain one)."""
    with FakeBemsoft(token=TOKEN, tls=ca.server_context(), host_name=API_HOST) as server:
        yield server


@pytest.fixture
def db_url(tmp_path):
    """SQLite only: the network is what these tests are about."""
    import sqlalchemy as sa
    from bemsoft_monitor.testing.sampledata import create_legacy_schema
    url = f"sqlite:///{tmp_path / 'legado.db'}"
    create_legacy_schema(sa.create_engine(url))
    return url


@pytest.fixture
def proxy():
    with ForwardProxy() as server:
        yield server


@pytest.fixture
def auth_proxy():
    with ForwardProxy(credentials=(PROXY_USER, PROXY_PASSWORD)) as server:
        yield server


def stored_once(api, item_ids):
    counts = collections.Counter(api.stored_tests())
    return dict(counts) == {f"item-{i}": 1 for i in item_ids}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------ through the proxy
@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "https_proxy"])
def test_orders_and_catalog_go_through_the_proxy_with_the_private_ca(harness, proxy, ca, variable):
    ids = harness.order(1, ["GLI", "HEMO"]) + harness.order(2, ["TSH"])
    monitor = harness.monitor(**{variable: proxy.url, "BEMSOFT_CA_BUNDLE": ca.ca_pem})
    monitor.step()
    assert stored_once(harness.api, ids)
    assert harness.api.tests_calls == 1
    assert harness.checkpoint() == max(ids)
    # GET /tests and both POSTs went through one CONNECT tunnel (keep-alive)
    assert proxy.tunnels == [f"{API_HOST}:{harness.api.port}"]


def test_bemsoft_proxy_wins_over_the_environment(harness, proxy, ca):
    ids = harness.order(1, ["GLI"])
    monitor = harness.monitor(HTTPS_PROXY=f"http://127.0.0.1:{closed_port()}",
                              BEMSOFT_PROXY=proxy.url, BEMSOFT_CA_BUNDLE=ca.ca_pem)
    monitor.step()
    assert stored_once(harness.api, ids)
    assert proxy.tunnels


def test_process_environment_proxy_is_used_by_the_cli(env_file, legacy, proxy, ca, api):
    ids = legacy.order(1, ["GLI"])
    with open(env_file, "a", encoding="utf-8") as fh:
        fh.write(f"BEMSOFT_CA_BUNDLE={ca.ca_pem}\n")
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(HTTPS_PROXY=proxy.url, PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, "monitor_bemsoft.py", "--env-file", str(env_file),
                             "--once"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert stored_once(api, ids)
    assert proxy.tunnels


def test_no_proxy_bypasses_the_proxy(harness, proxy, ca, caplog):
    """NO_PROXY lists the API's domain: the monitor goes direct, where the name does not
    resolve (only the proxy knows it) — nothing is sent, nothing lost, the log says DNS."""
    ids = harness.order(1, ["GLI"])
    monitor = harness.monitor(HTTPS_PROXY=proxy.url, NO_PROXY=".bemsoft.test",
                              BEMSOFT_CA_BUNDLE=ca.ca_pem)
    with caplog.at_level(logging.WARNING):
        monitor.step()
    assert proxy.tunnels == []
    assert harness.api.stored_tests() == [] and harness.checkpoint() == 0
    assert "falha de DNS" in caplog.text and API_HOST in caplog.text
    # nothing lost: once the route works, the same items go, once
    harness.monitor(HTTPS_PROXY=proxy.url, BEMSOFT_CA_BUNDLE=ca.ca_pem).step()
    assert stored_once(harness.api, ids) and harness.checkpoint() == max(ids)


def test_proxy_credentials_are_sent_and_never_shown(harness, auth_proxy, ca, caplog, tmp_path):
    ids = harness.order(1, ["GLI"])
    url = f"http://{PROXY_USER}:{PROXY_PASSWORD.replace('!', '%21')}@127.0.0.1:{auth_proxy.port}"
    monitor = harness.monitor(BEMSOFT_PROXY=url, BEMSOFT_CA_BUNDLE=ca.ca_pem)
    with caplog.at_level(logging.DEBUG):
        monitor.step()
    assert stored_once(harness.api, ids) and auth_proxy.refused == 0
    assert PROXY_PASSWORD not in caplog.text and "S3nha-do-Proxy%21" not in caplog.text


def test_a_407_sends_nothing_loses_nothing_and_masks_the_credentials(harness, auth_proxy, ca,
                                                                     caplog, tmp_path):
    ids = harness.order(1, ["GLI"])
    wrong = "senha-ERRADA-123"
    monitor = fast_clocks(harness, harness.monitor(
        BEMSOFT_PROXY=f"http://{PROXY_USER}:{wrong}@127.0.0.1:{auth_proxy.port}",
        BEMSOFT_CA_BUNDLE=ca.ca_pem, **FAST))
    with caplog.at_level(logging.DEBUG):
        monitor.step()
    assert auth_proxy.refused >= 1 and harness.api.stored_tests() == []
    assert harness.checkpoint() == 0 and not list((tmp_path / "failed").glob("*.json"))
    assert "407" in caplog.text and "BEMSOFT_PROXY" in caplog.text
    secret_b64 = base64.b64encode(f"{PROXY_USER}:{wrong}".encode()).decode()
    for secret in (wrong, secret_b64, PROXY_USER):
        assert secret not in caplog.text
    fixed = harness.monitor(BEMSOFT_PROXY=f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:"
                                          f"{auth_proxy.port}", BEMSOFT_CA_BUNDLE=ca.ca_pem)
    fixed.step()
    assert stored_once(harness.api, ids)


# ------------------------------------------------------------------ a captive portal
def test_portal_answering_200_html_then_going_away_loses_nothing(harness, proxy, ca, caplog,
                                                                tmp_path):
    orders = {cod: harness.order(cod, ["GLI", "TSH"]) for cod in (1, 2, 3)}
    monitor = fast_clocks(harness, harness.monitor(HTTPS_PROXY=proxy.url,
                                                   BEMSOFT_CA_BUNDLE=ca.ca_pem, **FAST))
    harness.api.fail_next(5, status=200, body=PORTAL)      # the portal answers, not the API
    with caplog.at_level(logging.INFO):
        monitor.step()
        for _ in range(5):
            if harness.checkpoint() == max(orders[3]):
                break
            monitor.skip_pause()
            monitor.step()
    everything = [i for ids in orders.values() for i in ids]
    assert stored_once(harness.api, everything)             # every order arrived, once
    assert harness.checkpoint() == max(everything)
    assert not list((tmp_path / "failed").glob("*.json"))
    sent = [r for r in harness.api.requests if isinstance(r.get("body"), dict)]
    assert [r["status"] for r in sent].count(200) == 5      # five answers from the portal
    keys = {cod: idempotency_key(str(cod), ids) for cod, ids in orders.items()}
    assert {r["key"] for r in sent} == set(keys.values())   # retried with the same keys
    assert caplog.text.count("resposta inesperada: não parece ser a API (proxy/portal?)") == 1
    assert "A API voltou a responder" in caplog.text


# ------------------------------------------------------------------ bounded answers
def make_client(tmp_path, base_url, **overrides) -> BemsoftClient:
    values = {"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}", "TERCEIROS": LAB,
              "BEMSOFT_BASE_URL": base_url, "BEMSOFT_TOKEN": TOKEN, "BEMSOFT_TIMEOUT": "5",
              "BEMSOFT_RETRIES": "0", "LOG_FILE": "-"}
    values.update({k: str(v) for k, v in overrides.items()})
    return BemsoftClient(parse_settings(values, base_dir=tmp_path))


@pytest.mark.parametrize("trickle_head", [False, True], ids=["body", "headers"])
def test_a_trickling_server_cannot_hold_a_sender_beyond_the_timeout(tmp_path, trickle_head):
    body = b'{"id": "' + b"x" * 400 + b'"}'
    with CannedServer(201, body, "application/json", trickle=0.05,
                      trickle_head=trickle_head) as server:
        client = make_client(tmp_path, server.url, BEMSOFT_TIMEOUT="0.5")
        try:
            delivery = client.deliver({"batch": {}}, "sol-1-abc")
        finally:
            client.close()
        sent = server.bytes_sent
    assert delivery.outcome == Verdict.TRANSIENT and delivery.status is None
    assert "tempo esgotado" in delivery.reason and "BEMSOFT_TIMEOUT" in delivery.reason
    # each byte came within the socket timeout; only the whole-call deadline stopped it
    assert 0 < sent < len(body)
    if trickle_head:   # cut while the headers were still arriving
        assert sent < len(b"HTTP/1.1 201 Canned\r\nContent-Type: application/json\r\n")


def test_a_proxy_trickling_its_connect_answer_cannot_hold_a_sender_beyond_the_timeout(
        tmp_path, api, ca):
    """Issue 17 §9: the deadline starts before the connection, so the CONNECT through the
    proxy counts (a proxy sending its "200 Connection established" one byte every 0.1 s
    would otherwise hold the call ~4 s, each byte within the socket timeout, and deliver)."""
    with ForwardProxy(trickle=0.1) as slow:
        client = make_client(tmp_path, f"https://{API_HOST}:{api.port}", BEMSOFT_TIMEOUT="0.5",
                             BEMSOFT_PROXY=slow.url, BEMSOFT_CA_BUNDLE=ca.ca_pem)
        try:
            delivery = client.deliver({"batch": {}}, "sol-1-abc")
        finally:
            client.close()
        sent = slow.reply_bytes_sent
    assert delivery.outcome == Verdict.TRANSIENT and delivery.status is None, delivery
    assert "tempo esgotado" in delivery.reason and "BEMSOFT_TIMEOUT=0.5" in delivery.reason
    assert slow.tunnels == [f"{API_HOST}:{api.port}"]          # it got as far as CONNECT
    assert 0 < sent < len(ForwardProxy.ESTABLISHED)            # and was cut mid-answer
    assert api.stored_tests() == []


def test_the_connection_through_the_proxy_sends_without_delay(tmp_path, api, ca, proxy):
    """Each request is one write: the socket urllib3 opened to the proxy has TCP_NODELAY, or
    every POST would wait for the proxy's delayed ACK."""
    client = make_client(tmp_path, f"https://{API_HOST}:{api.port}", BEMSOFT_PROXY=proxy.url,
                         BEMSOFT_CA_BUNDLE=ca.ca_pem)
    try:
        assert client.deliver({"batch": {}}, "sol-1-abc").status == 400   # answered, kept
        (kept,) = client.transport.route._idle
        assert kept.raw.getpeername()[1] == proxy.port
        assert kept.raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        client.close()
    assert proxy.tunnels == [f"{API_HOST}:{api.port}"]


def test_an_https_proxy_is_verified_with_the_ca_bundle(harness, ca):
    """Issue 17 §10: an https:// proxy's certificate (signed by the hospital's CA) is checked
    against the same store as the API's: system CAs plus BEMSOFT_CA_BUNDLE."""
    ids = harness.order(1, ["GLI"])
    with ForwardProxy(tls=ca.server_context("127.0.0.1")) as tls_proxy:
        assert tls_proxy.url.startswith("https://")
        harness.monitor(BEMSOFT_PROXY=tls_proxy.url, BEMSOFT_CA_BUNDLE=ca.ca_pem).step()
        assert tls_proxy.tunnels and tls_proxy.handshake_failures == 0
    assert stored_once(harness.api, ids) and harness.checkpoint() == max(ids)


def test_an_untrusted_https_proxy_is_named_in_the_error_not_the_api(tmp_path, api, ca):
    """Issue 17 §10: when the proxy's own certificate is not trusted, the error names the
    proxy (the API host was never reached), so no one is sent to BEMSOFT_VERIFY=0."""
    other = HospitalCA(tmp_path, names=("127.0.0.1",), filename="other-ca.pem")
    with ForwardProxy(tls=other.server_context()) as tls_proxy:
        client = make_client(tmp_path, f"https://{API_HOST}:{api.port}",
                             BEMSOFT_PROXY=tls_proxy.url, BEMSOFT_CA_BUNDLE=ca.ca_pem)
        try:
            delivery = client.deliver({"batch": {}}, "sol-1-abc")
        finally:
            client.close()
        assert wait_until(lambda: tls_proxy.handshake_failures == 1) and tls_proxy.tunnels == []
    assert delivery.outcome == Verdict.TRANSIENT and delivery.status is None
    assert f"falha na verificação TLS do proxy {tls_proxy.url} (BEMSOFT_PROXY)" in delivery.reason
    assert "BEMSOFT_CA_BUNDLE" in delivery.reason
    assert f"verificação TLS de {API_HOST}" not in delivery.reason


class ScriptedServer(_Listener):
    """Answers the n-th request of each connection with `answers[n]` (raw bytes), counting
    connections; after the last answer it closes."""

    def __init__(self, *answers: bytes):
        self.answers, self.connections, self.requests = answers, 0, []
        super().__init__()

    def handle(self, conn):
        self.connections += 1
        for answer in self.answers:
            self.requests.append(read_request(conn))
            conn.sendall(answer)


def test_interim_chunked_and_read_to_close_answers_are_read_whole(tmp_path):
    chunked = (b"HTTP/1.1 100 Continue\r\n\r\n"
               b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n"
               b"Content-Type: application/json\r\n\r\n"
               b"7;ext=1\r\n{\"id\": \r\n5\r\n\"a1\"}\r\n0\r\nX-Trailer: t\r\n\r\n")
    retry = b"HTTP/1.1 429 Busy\r\nRetry-After: 7\r\nContent-Length: 4\r\n\r\nbusy"
    to_close = b"HTTP/1.0 503 Down\r\n\r\nwhole body until the end"
    with ScriptedServer(chunked, retry, to_close) as server:
        client = make_client(tmp_path, f"http://127.0.0.1:{server.port}")
        try:
            assert client.post_once(b'{"a": 1}', "k1") == (201, b'{"id": "a1"}', None)
            assert client.post_once(b"{}", "k2") == (429, b"busy", 7.0)
            assert client.post_once(b"{}", "k3") == (503, b"whole body until the end", None)
            assert client.transport.route._idle == []     # read to the close: not kept
        finally:
            client.close()
    assert server.connections == 1                        # the first two kept it alive
    line, headers, body = server.requests[0]
    assert line == "POST /requests HTTP/1.1" and body == b'{"a": 1}'
    assert headers["host"] == f"127.0.0.1:{server.port}" and headers["idempotency-key"] == "k1"
    assert headers["authorization"] == f"Bearer {TOKEN}"


def test_a_huge_body_is_capped_and_its_connection_dropped(tmp_path):
    with FakeBemsoft(token=TOKEN) as fake:
        client = make_client(tmp_path, fake.url)
        try:
            fake.fail_next(1, status=503, body="x" * (5 * BODY_CAP))
            status, data, _ = client.post_once(b"{}", "sol-1-abc")
            assert status == 503 and len(data) == BODY_CAP
            fake.fail_next(1, status=503, body="pequeno")
            status, data, _ = client.post_once(b"{}", "sol-1-abc")
            assert (status, data) == (503, b"pequeno")
            status, data, _ = client.post_once(b"{}", "sol-1-abc")
            assert status == 400
        finally:
            client.close()
        # the connection of the huge answer was dropped; the small answers kept theirs
        assert fake.connections == 2


def deliver_to_script(tmp_path, answer: bytes):
    """One delivery to a server that answers `answer` (raw bytes) to every request."""
    with ScriptedServer(answer) as server:
        client = make_client(tmp_path, f"http://127.0.0.1:{server.port}")
        try:
            return client.deliver({"batch": {}}, "sol-1-abc")
        finally:
            client.close()


@pytest.mark.parametrize("size", [b"-10000", b"+10000", b"0x10000", b"1_0000"])
def test_a_chunk_size_that_is_not_plain_hex_is_refused(tmp_path, size):
    """A negative chunk size moved the byte count back, so the body grew past BODY_CAP
    (2.5 MiB read with a 1 MiB cap); sizes are hex digits only."""
    piece = b"A" * 65536
    body = b"".join(b"%x\r\n" % len(piece) + piece + b"\r\n" + size + b"\r\n\r\n"
                    for _ in range(40)) + b"0\r\n\r\n"
    answer = b"HTTP/1.1 503 X\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    delivery = deliver_to_script(tmp_path, answer)
    assert delivery.outcome == Verdict.TRANSIENT and delivery.status is None
    assert "tamanho de bloco (chunked) inválido" in delivery.reason


@pytest.mark.parametrize("status", ["\u00b2\u00b9\u00b9", "000", "099", "2011", "600"])
def test_a_status_that_is_not_three_digits_in_range_is_a_bad_answer(tmp_path, status):
    """A status in superscript digits passed isdigit() and int() raised ValueError: the order
    became a permanent failure ("erro inesperado"), as did HTTP 000. Something answered, not
    in HTTP: transient, sent again under the same key."""
    answer = f"HTTP/1.1 {status} OK\r\nContent-Length: 2\r\n\r\n{{}}".encode("latin-1")
    delivery = deliver_to_script(tmp_path, answer)
    assert delivery.outcome == Verdict.TRANSIENT and delivery.status is None, delivery
    assert "linha de status inválida" in delivery.reason


def test_huge_2xx_body_is_not_taken_for_a_delivery(tmp_path):
    huge = json.dumps({"id": "x" * (2 * BODY_CAP)})
    with FakeBemsoft(token=TOKEN) as fake:
        client = make_client(tmp_path, fake.url)
        fake.fail_next(1, status=201, body=huge)
        try:
            delivery = client.deliver({"batch": {}}, "sol-1-abc")
        finally:
            client.close()
    assert delivery.outcome == Verdict.TRANSIENT and delivery.unexpected
    assert len(delivery.body) <= 1000


def test_a_catalog_larger_than_the_answer_cap_is_loaded_whole(tmp_path):
    # a support lab's catalog can pass the 1 MiB kept for order answers: it is not a portal
    catalog = [{"id": f"EX{n:05d}", "name": "EXAME " + "X" * 200,
                "specimen": {"id": f"SP{n % 7}", "name": "Soro"}} for n in range(6000)]
    assert len(json.dumps({"tests": catalog})) > 1.2 * BODY_CAP
    with FakeBemsoft(token=TOKEN, catalog=catalog) as fake:
        client = make_client(tmp_path, fake.url)
        try:
            data = client.fetch_tests()
        finally:
            client.close()
    assert len(data["tests"]) == 6000 and data["tests"][-1]["id"] == "EX05999"


# ------------------------------------------------------------------ --check
def check(env_file, *lines):
    with open(env_file, "a", encoding="utf-8") as fh:
        fh.write("".join(line + "\n" for line in lines))
    result = run("monitor_bemsoft.py", "--env-file", str(env_file), "--check")
    return result.returncode, result.stdout + result.stderr


def test_check_reports_the_route_when_everything_works(env_file, legacy, proxy, ca):
    code, out = check(env_file, f"BEMSOFT_PROXY={proxy.url}", f"BEMSOFT_CA_BUNDLE={ca.ca_pem}")
    assert code == 0, out
    assert f"[OK]   Rota até a API: via proxy {proxy.url} (de BEMSOFT_PROXY)" in out
    assert f"Certificados: os do sistema + BEMSOFT_CA_BUNDLE={ca.ca_pem}" in out
    assert "Catálogo /tests carregado" in out


def test_check_says_the_proxy_refused_the_credentials(env_file, legacy, auth_proxy, ca):
    code, out = check(env_file, f"BEMSOFT_CA_BUNDLE={ca.ca_pem}",
                      f"HTTPS_PROXY=http://{PROXY_USER}:nao-e-essa@127.0.0.1:{auth_proxy.port}")
    assert code == 1
    assert f"via proxy http://***@127.0.0.1:{auth_proxy.port} (de HTTPS_PROXY)" in out
    assert "recusou a autenticação (HTTP 407)" in out
    assert "nao-e-essa" not in out and PROXY_USER not in out


def test_check_says_the_proxy_is_unreachable(env_file, legacy, ca):
    port = closed_port()
    code, out = check(env_file, f"BEMSOFT_CA_BUNDLE={ca.ca_pem}",
                      f"BEMSOFT_PROXY=http://127.0.0.1:{port}")
    assert code == 1 and f"proxy inacessível: http://127.0.0.1:{port} (BEMSOFT_PROXY)" in out


def test_check_says_dns_failed(env_file, legacy, ca):
    code, out = check(env_file, f"BEMSOFT_CA_BUNDLE={ca.ca_pem}")
    assert code == 1
    assert "Rota até a API: direta, sem proxy" in out
    assert f"falha de DNS: o nome {API_HOST} não foi encontrado" in out


def test_check_says_tls_verification_failed_and_suggests_the_ca_bundle(env_file, legacy, proxy):
    code, out = check(env_file, f"HTTPS_PROXY={proxy.url}")
    assert code == 1
    assert "Certificados: os do sistema (sem BEMSOFT_CA_BUNDLE)" in out
    assert f"falha na verificação TLS de {API_HOST}" in out and "BEMSOFT_CA_BUNDLE" in out


def test_check_says_something_else_answered(env_file, legacy):
    with CannedServer(200, PORTAL.encode()) as portal:
        code, out = check(env_file, f"BEMSOFT_BASE_URL={portal.url}")
    assert code == 1
    assert "resposta inesperada: não parece ser a API (proxy/portal?)" in out


# ------------------------------------------------------------------ one redaction
def test_one_redaction_hides_token_proxy_and_database_credentials(tmp_path):
    from bemsoft_monitor.redaction import redact
    token = "tok/" + TOKEN        # an API escaping "/" echoes it as tok\/...
    settings = parse_settings({
        "DATABASE_URL": "postgresql+psycopg://lis:Db-S3nha@db.hospital:5432/lis",
        "TERCEIROS": LAB, "BEMSOFT_TOKEN": token, "LOG_FILE": "-",
        "STATUS_TOKEN": "painel-token-0123456789",
        "BEMSOFT_PROXY": f"http://{PROXY_USER}:{PROXY_PASSWORD}@proxy.hospital:3128"},
        base_dir=tmp_path)
    text = redact(f"token {token}; proxy http://{PROXY_USER}:{PROXY_PASSWORD}@proxy.hospital:3128 "
                  f"recusou {PROXY_PASSWORD}; banco Db-S3nha; "
                  "ODBC DRIVER=x;PWD={a;b};UID=u; outro http://joao:xyz@host/; "
                  "Proxy-Authorization: Basic bGFiLnRpOlMzbmhh; "
                  # shapes the first patterns let through: a JSON-escaped echo, a percent-
                  # encoded password, credentials under JSON keys, the console's token
                  + json.dumps({"echo": token}).replace("/", "\\/")
                  + f" senha%3A{PROXY_PASSWORD.replace('!', '%21')} "
                  '{"authorization": "Bearer outro-token-123", "password": 424242} '
                  "?token=painel-token-0123456789", settings)
    for secret in (token, token.replace("/", "\\/"), PROXY_USER, PROXY_PASSWORD, "Db-S3nha",
                   "{a;b}", "joao:xyz", "bGFiLnRpOlMzbmhh", "S3nha-do-Proxy", "outro-token-123",
                   "424242", "painel-token-0123456789"):
        assert secret not in text, secret
    assert "proxy.hospital:3128" in text and "***" in text


# ------------------------------------------------------------------ patient data stays private
@pytest.mark.skipif(os.name == "nt", reason="POSIX modes")
def test_log_and_failure_files_are_private(env_file, legacy, tmp_path):
    legacy.order(1, ["GLI"], patient={"sexo": None})        # fails: a failure file is written
    result = run("monitor_bemsoft.py", "--env-file", str(env_file), "--once")
    assert result.returncode == 0, result.stderr
    [failure] = (tmp_path / "failed").glob("*.json")
    log_file = tmp_path / "logs" / "monitor.log"
    modes = {path: path.stat().st_mode & 0o777
             for path in (tmp_path / "failed", failure, tmp_path / "logs", log_file)}
    assert modes == {tmp_path / "failed": 0o700, failure: 0o600,
                     tmp_path / "logs": 0o700, log_file: 0o600}
    log_file.chmod(0o644)                                    # left open by an older version
    assert run("monitor_bemsoft.py", "--env-file", str(env_file), "--once").returncode == 0
    assert log_file.stat().st_mode & 0o777 == 0o600


def test_log_lines_and_tracebacks_pass_through_the_redaction(tmp_path):
    import io
    from bemsoft_monitor.app import setup_logging
    settings = parse_settings({"DATABASE_URL": "postgresql+psycopg://lis:Db-S3nha@db/lis",
                               "TERCEIROS": LAB, "BEMSOFT_TOKEN": TOKEN, "LOG_FILE": "-"},
                              base_dir=tmp_path)
    stream = io.StringIO()
    setup_logging(settings, stream=stream, to_file=False)
    try:
        raise RuntimeError(f"driver: password=Db-S3nha; Authorization: Bearer {TOKEN}")
    except RuntimeError:
        logging.getLogger("bemsoft_monitor.test").exception("falhou com %s", TOKEN)
    text = stream.getvalue()
    assert "falhou com ***" in text and "RuntimeError" in text
    assert TOKEN not in text and "Db-S3nha" not in text
