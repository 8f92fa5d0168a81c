"""The catalog stage: `GET /tests` cached, refreshed after a TTL, refreshed once (rate
limited) when a code is missing, never thrown away because a refresh failed."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from .payload import ItemRejected
from .retry import CATALOG_UNLOADED, RetryPolicy, catalog_refresh

log = logging.getLogger(__name__)

PLACEHOLDER_SPECIMEN = "SPECIMEN-TEST"


class CatalogUnavailable(Exception):
    """No usable catalog (never loaded and the API does not answer): try again later.
    `status`: the HTTP status of the last failed fetch, when the API answered (401/403: the
    token was refused)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status

    @property
    def token_refused(self) -> bool:
        return self.status in (401, 403)


class Catalog:
    def __init__(self, fetch: Callable[[], list], ttl: float, *,
                 miss_refresh_interval: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self._fetch = fetch
        self.ttl = ttl
        self.miss_refresh_interval = miss_refresh_interval
        self._stale_cadence = catalog_refresh(ttl)
        self._miss_cadence = RetryPolicy(backoff=miss_refresh_interval, factor=1.0,
                                         max_backoff=miss_refresh_interval)
        self._clock = clock
        self._lock = threading.Lock()
        self._by_id: dict[str, list[str]] | None = None
        self._loaded_at: float | None = None
        self._last_attempt: float | None = None
        self._warned_variants: set[str] = set()
        self._failed_status: int | None = None  # HTTP status of the last failed fetch

    @property
    def loaded(self) -> bool:
        return self._by_id is not None

    def size(self) -> int:
        return len(self._by_id or {})

    def refresh(self) -> bool:
        """Fetch the catalog now. Keeps the old cache when the fetch fails."""
        self._last_attempt = self._clock()
        try:
            tests = self._fetch()
            by_id = index_catalog(tests)
        except Exception as err:  # any failure of the fetch keeps the good cache
            self._failed_status = getattr(err, "status", None)
            if self._by_id is None:
                raise CatalogUnavailable(f"catálogo /tests indisponível: {err}",
                                         self._failed_status) from err
            log.warning("Falha ao atualizar o catálogo /tests (%s); mantendo o cache com %d exames.",
                        err, len(self._by_id))
            return False
        if not by_id and self._by_id:
            log.warning("GET /tests devolveu um catálogo vazio; mantendo o cache com %d exames.",
                        len(self._by_id))
            return False
        self._by_id, self._loaded_at = by_id, self._clock()
        self._failed_status = None
        log.info("Catálogo /tests carregado: %d exames.", len(by_id))
        return True

    def _ensure_fresh(self) -> None:
        now = self._clock()
        if self._by_id is None:
            if not CATALOG_UNLOADED.due(self._last_attempt, now):
                raise CatalogUnavailable("catálogo /tests indisponível (nova tentativa em instantes)",
                                         self._failed_status)
            self.refresh()
        elif now - self._loaded_at >= self.ttl and self._stale_cadence.due(self._last_attempt, now):
            self.refresh()

    def specimen_for(self, test_id: str, pinned: str | None = None) -> str:
        with self._lock:
            self._ensure_fresh()
            specimens = self._by_id.get(test_id)
            now = self._clock()
            if specimens is None and self._miss_cadence.due(self._loaded_at, now):
                # rejected only against a catalog loaded after the miss (it may have just been
                # registered); a refresh that failed defers the item instead
                if not self._miss_cadence.due(self._last_attempt, now):
                    raise CatalogUnavailable(f"catálogo /tests desatualizado e a última "
                                             f"atualização falhou; {test_id} será procurado de novo",
                                             self._failed_status)
                log.info("Exame %s fora do catálogo em cache; atualizando /tests uma vez.", test_id)
                if not self.refresh():
                    raise CatalogUnavailable(f"não foi possível atualizar /tests para procurar {test_id}",
                                             self._failed_status)
                specimens = self._by_id.get(test_id)
            if not specimens:
                raise ItemRejected(
                    f"exame {test_id!r} não existe no catálogo /tests da Bemsoft: cadastre-o na "
                    "Bemsoft ou mapeie o código em BEMSOFT_TEST_MAP_PATH")
            if pinned:
                if pinned in specimens:
                    return pinned
                raise ItemRejected(
                    f"material {pinned!r} definido em BEMSOFT_TEST_MAP_PATH não existe para o exame "
                    f"{test_id!r} no catálogo (disponíveis: {', '.join(specimens)})")
            if len(specimens) > 1 and test_id not in self._warned_variants:
                self._warned_variants.add(test_id)
                log.warning("Exame %s tem %d materiais no catálogo (%s); usando %s. Para escolher, "
                            "use {\"supportTestId\": ..., \"supportSpecimenId\": ...} no "
                            "BEMSOFT_TEST_MAP_PATH.", test_id, len(specimens),
                            ", ".join(specimens), specimens[0])
            return specimens[0]


class PlaceholderCatalog:
    """DRY_RUN without a token: every test gets the placeholder specimen."""
    loaded = True

    def size(self) -> int:
        return 0

    def refresh(self) -> bool:
        return True

    def specimen_for(self, test_id: str, pinned: str | None = None) -> str:
        return pinned or PLACEHOLDER_SPECIMEN


def index_catalog(data) -> dict[str, list[str]]:
    """`{"tests": [{"id", "specimen": {"id"}}]}` (or the bare list) -> id -> sorted specimen ids."""
    tests = data.get("tests") if isinstance(data, dict) else data
    if not isinstance(tests, list):
        raise ValueError("resposta de /tests sem a lista 'tests'")
    by_id: dict[str, set[str]] = {}
    for entry in tests:
        if not isinstance(entry, dict) or entry.get("id") in (None, ""):
            continue
        specimen = entry.get("specimen")
        specimen_id = specimen.get("id") if isinstance(specimen, dict) else specimen
        bucket = by_id.setdefault(str(entry["id"]), set())
        if specimen_id not in (None, ""):
            bucket.add(str(specimen_id))
    return {test_id: sorted(specs) for test_id, specs in by_id.items()}
