"""Real ODBC driver for tests: Microsoft's "ODBC Driver 18 for SQL Server" as shipped in
the PyPI package `mssql-python-odbc`, registered with unixODBC through a private
`odbcinst.ini` (env ODBCSYSINI), so no system-wide installation is needed.

unixODBC reads ODBCSYSINI once per process and caches it, so `prepare()` must run before
the first ODBC call (pyodbc.connect / pyodbc.drivers) in the process: the test module
calls it at import time, and the `odbc_driver` fixture checks that it took effect.

When the package or unixODBC is missing the tests that need them are skipped with the
reason, except under CI=true, where they fail: CI must exercise the real driver.
"""
from __future__ import annotations

import atexit
import importlib.util
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

DRIVER_NAME = "ODBC Driver 18 for SQL Server"
PACKAGE = "mssql-python-odbc"


@dataclass(frozen=True)
class OdbcSetup:
    ok: bool
    reason: str = ""
    folder: Path | None = None
    library: Path | None = None
    drivers: tuple[str, ...] = ()


def driver_library() -> Path | None:
    """The driver's shared library inside the installed `mssql_python_odbc` package."""
    spec = importlib.util.find_spec("mssql_python_odbc")
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(list(spec.submodule_search_locations)[0]) / "libs" / "linux"
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(),
                                                       platform.machine().lower())
    for distro in ("debian_ubuntu", "rhel", "suse"):
        found = sorted((base / distro / arch / "lib").glob("libmsodbcsql-18*.so*"))
        if found:
            return found[-1]
    return None


_SETUP: OdbcSetup | None = None


def prepare() -> OdbcSetup:
    """Write a private odbcinst.ini that registers the driver and point ODBCSYSINI at it.
    Idempotent; cheap (no ODBC call). Returns what was found."""
    global _SETUP
    if _SETUP is not None:
        return _SETUP
    library = driver_library()
    if library is None:
        _SETUP = OdbcSetup(False, f"o pacote PyPI {PACKAGE} (driver ODBC 18 da Microsoft "
                                  f"para Linux/{platform.machine()}) não está instalado")
        return _SETUP
    try:
        import pyodbc  # noqa: F401  (fails when unixODBC's libodbc.so.2 is missing)
    except ImportError as err:
        _SETUP = OdbcSetup(False, f"pyodbc/unixODBC não carregou ({err}); instale o pacote "
                                  "Debian 'unixodbc' e o pacote PyPI 'pyodbc'")
        return _SETUP
    folder = Path(tempfile.mkdtemp(prefix="bemsoft-odbc-"))
    atexit.register(shutil.rmtree, folder, True)
    (folder / "odbcinst.ini").write_text(
        f"[{DRIVER_NAME}]\nDescription=Microsoft ODBC Driver 18 for SQL Server "
        f"(from {PACKAGE})\nDriver={library}\nUsageCount=1\n", encoding="utf-8")
    (folder / "odbc.ini").write_text("", encoding="utf-8")
    os.environ["ODBCSYSINI"] = str(folder)
    os.environ.pop("ODBCINSTINI", None)
    _SETUP = OdbcSetup(True, folder=folder, library=library)
    return _SETUP


def require_driver() -> OdbcSetup:
    """For tests that need the real driver: skip (or fail under CI=true) when it is not
    usable, with the reason."""
    setup = prepare()
    if setup.ok:
        import pyodbc
        drivers = tuple(pyodbc.drivers())
        if DRIVER_NAME in drivers:
            return OdbcSetup(True, folder=setup.folder, library=setup.library, drivers=drivers)
        reason = (f"unixODBC não lista '{DRIVER_NAME}' (drivers: {list(drivers)}); ODBCSYSINI "
                  "precisa ser definido antes da primeira chamada ODBC do processo")
    else:
        reason = setup.reason
    unavailable(f"driver ODBC real indisponível: {reason}")


def unavailable(reason: str):
    """Skip the test, or fail it under CI=true (CI must run the real-driver tests)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: estes testes são obrigatórios)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def odbc_driver() -> OdbcSetup:
    return require_driver()
