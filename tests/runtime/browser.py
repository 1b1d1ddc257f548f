"""Browser-test helpers around ``benchmarks.browser`` (Debian's Chromium through selenium)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks import browser


def require_browser() -> None:
    """Skip (with the reason) where Debian's chromium/chromium-driver are missing: `make test` installs them."""
    if browser.missing():
        pytest.skip(f"{', '.join(browser.missing())} missing: install Debian's chromium and chromium-driver "
                    "(make sysdeps)")
    pytest.importorskip("selenium", reason="selenium is in the dev extra (make venv)")


def chrome(profile: Path) -> Any:
    require_browser()
    return browser.chrome(profile)


def by_testid(driver: Any, name: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f'[data-testid="{name}"]')


def wait_until(fn: Any, timeout_s: float, what: str, poll_s: float = 0.05) -> Any:
    """``fn()`` until it is truthy (its value is returned) or ``timeout_s`` passes (AssertionError)."""
    end, last = time.monotonic() + timeout_s, None
    while time.monotonic() < end:
        try:
            value = fn()
        except Exception as exc:  # an element not there yet, a stale element
            value, last = None, exc
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what} (last error: {last!r})")


def js_errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"
            and "favicon" not in e.get("message", "")]
