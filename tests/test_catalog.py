"""The catalog stage (SPEC §4): Catalog with an injected clock and a stand-in for the remote
`GET /tests`, plus the real client against the fake API on 127.0.0.1."""
from __future__ import annotations

import logging

import pytest

from bemsoft_monitor.catalog import Catalog, CatalogUnavailable, index_catalog
from bemsoft_monitor.client import ApiError, BemsoftClient
from bemsoft_monitor.config import parse_settings
from bemsoft_monitor.payload import ItemRejected
from conftest import TOKEN


def entry(test_id, specimen, name=None):
    return {"id": test_id, "name": name or test_id, "specimen": {"id": specimen, "name": specimen}}


BASE = [entry("GLI", "SORO"), entry("HEMO", "SANGUE"), entry("FE", "SORO"), entry("FE", "PLASMA")]


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class RemoteTests:
    """Stands in for the remote `GET /tests`: answers `tests`, or raises `error`."""

    def __init__(self, tests=None):
        self.tests = list(BASE if tests is None else tests)
        self.error: Exception | None = None
        self.calls = 0

    def __call__(self):
        self.calls += 1
        if self.error is not None:
            raise self.error
        return {"tests": list(self.tests) if isinstance(self.tests, list) else self.tests}


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def remote():
    return RemoteTests()


def make(remote, clock, ttl=3600.0, miss=60.0):
    return Catalog(remote, ttl, miss_refresh_interval=miss, clock=clock)


# ---------------------------------------------------------------- cache and TTL

def test_loads_once_and_serves_from_the_cache(remote, clock):
    catalog = make(remote, clock)
    assert not catalog.loaded
    assert catalog.specimen_for("GLI") == "SORO"
    assert catalog.specimen_for("HEMO") == "SANGUE"
    clock.now += 3599
    assert catalog.specimen_for("GLI") == "SORO"
    assert remote.calls == 1
    assert catalog.loaded and catalog.size() == 3


def test_refreshes_after_the_ttl(remote, clock):
    catalog = make(remote, clock, ttl=600)
    assert catalog.specimen_for("GLI") == "SORO"
    remote.tests = [entry("GLI", "PLASMA")]          # changed on the Bemsoft side
    clock.now += 599
    assert catalog.specimen_for("GLI") == "SORO"
    assert remote.calls == 1
    clock.now += 1
    assert catalog.specimen_for("GLI") == "PLASMA"
    assert remote.calls == 2
    clock.now += 300
    catalog.specimen_for("GLI")
    assert remote.calls == 2                           # the TTL counts from the refresh


# ---------------------------------------------------------------- unknown codes

def test_unknown_code_refreshes_once_then_is_found(remote, clock):
    catalog = make(remote, clock, miss=60)
    catalog.specimen_for("GLI")
    clock.now += 61
    remote.tests.append(entry("NOVO", "URINA"))       # just registered at Bemsoft
    assert catalog.specimen_for("NOVO") == "URINA"
    assert remote.calls == 2


def test_unknown_code_refresh_is_rate_limited(remote, clock):
    catalog = make(remote, clock, miss=60)
    catalog.specimen_for("GLI")
    clock.now += 61
    with pytest.raises(ItemRejected, match="XYZ"):
        catalog.specimen_for("XYZ")                     # refreshes once, still missing
    assert remote.calls == 2
    clock.now += 10
    with pytest.raises(ItemRejected, match="ABC"):
        catalog.specimen_for("ABC")                     # within the interval: no refetch
    with pytest.raises(ItemRejected):
        catalog.specimen_for("XYZ")
    assert remote.calls == 2
    clock.now += 51
    remote.tests.append(entry("ABC", "SORO"))
    assert catalog.specimen_for("ABC") == "SORO"        # interval over: one more refresh
    assert remote.calls == 3


def test_no_miss_refresh_right_after_loading(remote, clock):
    catalog = make(remote, clock, miss=60)
    with pytest.raises(ItemRejected):
        catalog.specimen_for("XYZ")                     # the catalog was fetched just now
    assert remote.calls == 1


def test_unknown_code_reason_says_what_to_fix(remote, clock):
    catalog = make(remote, clock)
    with pytest.raises(ItemRejected) as info:
        catalog.specimen_for("XYZ999")
    assert "XYZ999" in str(info.value) and "BEMSOFT_TEST_MAP_PATH" in str(info.value)


# ---------------------------------------------------------------- failures

def test_never_loaded_is_catalog_unavailable(remote, clock):
    remote.error = ConnectionError("recusada")
    catalog = make(remote, clock)
    with pytest.raises(CatalogUnavailable, match="recusada"):
        catalog.specimen_for("GLI")
    assert not catalog.loaded
    # tried again only after a short pause, then works
    clock.now += 1
    with pytest.raises(CatalogUnavailable):
        catalog.specimen_for("GLI")
    assert remote.calls == 1
    remote.error = None
    clock.now += 5
    assert catalog.specimen_for("GLI") == "SORO"
    assert remote.calls == 2


def test_a_junk_answer_on_first_load_is_catalog_unavailable(clock):
    catalog = Catalog(lambda: {"data": []}, 3600, clock=clock)
    with pytest.raises(CatalogUnavailable):
        catalog.specimen_for("GLI")
    with pytest.raises(CatalogUnavailable):
        catalog.refresh()


def test_a_failed_refresh_keeps_the_good_cache(remote, clock, caplog):
    catalog = make(remote, clock, ttl=600)
    assert catalog.specimen_for("FE", "SORO") == "SORO"
    remote.error = TimeoutError("tempo esgotado")
    clock.now += 601
    with caplog.at_level(logging.WARNING, logger="bemsoft_monitor.catalog"):
        assert catalog.specimen_for("GLI") == "SORO"
    assert remote.calls == 2
    assert "mantendo o cache" in caplog.text
    assert catalog.refresh() is False
    assert catalog.specimen_for("HEMO") == "SANGUE" and catalog.size() == 3
    # a junk answer is a failure too: the cache stays
    remote.error = None
    remote.tests = "not a list"
    assert catalog.refresh() is False
    assert catalog.specimen_for("GLI") == "SORO"


def test_failed_refresh_is_not_retried_on_every_call(remote, clock):
    catalog = make(remote, clock, ttl=600)
    catalog.specimen_for("GLI")
    remote.error = OSError("down")
    clock.now += 601
    catalog.specimen_for("GLI")
    calls = remote.calls
    for _ in range(5):
        clock.now += 1
        catalog.specimen_for("GLI")
    assert remote.calls == calls
    remote.error = None
    remote.tests = [entry("GLI", "PLASMA")]
    clock.now += 60
    assert catalog.specimen_for("GLI") == "PLASMA"


# ---------------------------------------------------------------- variants and pinning

def test_variants_are_picked_deterministically_with_one_warning_per_code(clock, caplog):
    orders = [[entry("FE", "SORO"), entry("FE", "PLASMA"), entry("FE", "URINA")],
              [entry("FE", "URINA"), entry("FE", "PLASMA"), entry("FE", "SORO")]]
    picks = []
    for tests in orders:
        caplog.clear()
        catalog = make(RemoteTests(tests + [entry("B12", "SORO"), entry("B12", "CAPILAR")]),
                       clock)
        with caplog.at_level(logging.WARNING, logger="bemsoft_monitor.catalog"):
            picks.append([catalog.specimen_for("FE") for _ in range(3)])
            picks[-1].append(catalog.specimen_for("B12"))
            catalog.specimen_for("B12")
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2
        assert "FE" in warnings[0].getMessage() and "PLASMA" in warnings[0].getMessage()
        assert "B12" in warnings[1].getMessage()
        assert "BEMSOFT_TEST_MAP_PATH" in warnings[0].getMessage()
    assert picks[0] == picks[1] == ["PLASMA", "PLASMA", "PLASMA", "CAPILAR"]


def test_a_single_specimen_gives_no_warning(remote, clock, caplog):
    catalog = make(remote, clock)
    with caplog.at_level(logging.WARNING, logger="bemsoft_monitor.catalog"):
        catalog.specimen_for("GLI")
    assert caplog.records == []


def test_pinned_specimen_from_the_test_map(remote, clock, caplog):
    catalog = make(remote, clock)
    with caplog.at_level(logging.WARNING, logger="bemsoft_monitor.catalog"):
        assert catalog.specimen_for("FE", "SORO") == "SORO"
        assert catalog.specimen_for("FE", "PLASMA") == "PLASMA"
    assert caplog.records == []        # the operator chose: no variant warning


def test_unknown_pinned_specimen_is_rejected_with_the_available_list(remote, clock):
    catalog = make(remote, clock)
    with pytest.raises(ItemRejected) as info:
        catalog.specimen_for("FE", "URINA")
    message = str(info.value)
    assert "URINA" in message and "FE" in message
    assert "PLASMA, SORO" in message and "BEMSOFT_TEST_MAP_PATH" in message


# ---------------------------------------------------------------- index_catalog

def test_index_catalog_tolerates_junk_entries():
    data = {"tests": [
        entry("GLI", "SORO"),
        entry("GLI", "SORO"),                          # exact duplicate
        entry("FE", "SORO"), entry("FE", "PLASMA"),
        "junk", None, 42, [],
        {"name": "sem id", "specimen": {"id": "SORO"}},
        {"id": "", "specimen": {"id": "SORO"}},
        {"id": None, "specimen": {"id": "SORO"}},
        {"id": 123, "specimen": {"id": 7}},            # numbers become text
        {"id": "TXT", "specimen": "URINA"},            # specimen as plain text
        {"id": "NOSPEC"},                              # no specimen at all
        {"id": "EMPTY", "specimen": {"id": ""}},
        {"id": "NULLSPEC", "specimen": None},
        {"id": "ODD", "specimen": {"name": "sem id"}},
    ]}
    assert index_catalog(data) == {
        "GLI": ["SORO"], "FE": ["PLASMA", "SORO"], "123": ["7"], "TXT": ["URINA"],
        "NOSPEC": [], "EMPTY": [], "NULLSPEC": [], "ODD": [],
    }


def test_index_catalog_accepts_a_bare_list_and_refuses_other_shapes():
    assert index_catalog([entry("GLI", "SORO")]) == {"GLI": ["SORO"]}
    assert index_catalog({"tests": []}) == {}
    for junk in ({"data": []}, {"tests": None}, {"tests": "x"}, "x", None, 3):
        with pytest.raises(ValueError):
            index_catalog(junk)


def test_a_code_without_any_specimen_is_rejected(clock):
    catalog = make(RemoteTests([{"id": "NOSPEC", "name": "x"}]), clock)
    with pytest.raises(ItemRejected, match="NOSPEC"):
        catalog.specimen_for("NOSPEC")


# ---------------------------------------------------------------- against the fake API

@pytest.fixture
def client(tmp_path, api):
    def make_client(token=TOKEN):
        settings = parse_settings({"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}",
                                   "TERCEIROS": "LAB", "BEMSOFT_BASE_URL": api.url,
                                   "BEMSOFT_TOKEN": token, "BEMSOFT_TIMEOUT": "5",
                                   "LOG_FILE": "-"}, base_dir=tmp_path)
        made.append(BemsoftClient(settings))
        return made[-1]
    made = []
    yield make_client
    for c in made:
        c.close()


def test_real_catalog_through_the_client(api, client, clock):
    catalog = Catalog(client().fetch_tests, 600, miss_refresh_interval=60, clock=clock)
    assert catalog.specimen_for("GLI") == "SORO"
    assert catalog.specimen_for("FE") == "PLASMA"         # SORO/PLASMA variants: sorted
    assert api.tests_calls == 1
    # a refresh that fails (HTTP 503, then a dropped connection) keeps the cache
    api.fail_tests_next(2, status=503)
    clock.now += 601
    assert catalog.specimen_for("HEMO") == "SANGUE"
    assert api.tests_calls == 2
    # a code registered later is found by the refresh on a miss
    api.set_catalog(api.catalog + [entry("NOVO", "SALIVA")])
    clock.now += 61
    with pytest.raises(CatalogUnavailable):               # second 503: not checked, deferred
        catalog.specimen_for("NOVO")
    clock.now += 61
    assert catalog.specimen_for("NOVO") == "SALIVA"
    assert api.tests_calls == 4


def test_real_catalog_unavailable_at_start_and_wrong_token(api, client, clock):
    api.fail_tests_next(1, status=0)                      # connection dropped
    catalog = Catalog(client().fetch_tests, 600, clock=clock)
    with pytest.raises(CatalogUnavailable):
        catalog.specimen_for("GLI")
    clock.now += 5
    assert catalog.specimen_for("GLI") == "SORO"

    wrong = "wrong-token-SECRET-999"
    with pytest.raises(ApiError) as info:
        client(wrong).fetch_tests()
    assert info.value.permanent and info.value.status == 401
    assert "BEMSOFT_TOKEN" in str(info.value) and wrong not in str(info.value)


def test_a_miss_is_rejected_only_against_a_catalog_loaded_after_it(clock):
    """Review finding: after a failed refresh, a retry within the rate limit must not reject
    the item without having checked a fresh catalog."""
    calls = {"n": 0}

    def fetch():
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("API fora do ar")
        return {"tests": [entry("GLI", "SORO")] + ([entry("NOVO", "SALIVA")] if calls["n"] > 2 else [])}

    catalog = Catalog(fetch, 3600, miss_refresh_interval=60, clock=clock)
    assert catalog.specimen_for("GLI") == "SORO"
    clock.now += 61
    with pytest.raises(CatalogUnavailable):
        catalog.specimen_for("NOVO")          # the refresh for the miss failed: deferred
    clock.now += 1
    with pytest.raises(CatalogUnavailable):
        catalog.specimen_for("NOVO")          # still not checked: deferred, not rejected
    clock.now += 60
    assert catalog.specimen_for("NOVO") == "SALIVA"
    assert calls["n"] == 3
