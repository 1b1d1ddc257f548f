"""Debian's Chromium driven by selenium through Debian's chromedriver: nothing is downloaded.

Shared by ``benchmarks.web`` and the browser tests. The flags are the ones a closed network
needs (no background fetches, no component updates, no sync) plus a fresh profile per browser,
so one run's cookie never leaks into another's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,900")


def missing() -> list[str]:
    """What this machine lacks to run the browser (`make sysdeps` installs both)."""
    return [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]


def chrome(profile: Path) -> Any:
    """A headless Chromium with its own profile directory and the browser console log kept."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    return driver
