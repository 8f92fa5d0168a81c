"""Headless Chromium for the console tests and bemsoft_monitor.testing.painel_png: Debian's `chromium`
and `chromium-driver` (installed by .ci/run), driven by selenium with both paths given, so
nothing ever downloads a browser or a driver (selenium-manager does not run)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage")


def missing() -> str | None:
    """Why the browser cannot run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():
            return f"{path} ausente (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium ausente (pip install -r requirements-dev.txt)"
    return None


class Browser:
    """A fresh profile per browser; `close()` quits it and removes the profile."""

    def __init__(self, width: int = 1200, height: int = 1700):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        os.environ["SE_OFFLINE"] = "true"  # belt and braces: selenium-manager may not download
        self.profile = tempfile.mkdtemp(prefix="painel-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--window-size={width},{height}")
        options.add_argument(f"--user-data-dir={self.profile}")
        self.driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)),
                                       options=options)

    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)
