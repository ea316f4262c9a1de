"""Fixtures and paths of the browser test: the built site on a localhost server and headless Chromium.

The site is ``_build/html`` (``make book-html``); Chromium and ChromeDriver are Debian's
(``/usr/bin/chromium``, ``/usr/bin/chromedriver``; ``make test-browser`` installs them). The
tests are skipped when either is missing, and carry the ``browser`` marker, which the default
run (``addopts`` in ``pyproject.toml``) leaves out.

This is not a ``conftest.py``: other tests import ``tests/conftest.py`` as ``conftest``.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

from umlip_latents import paths

#: The built site, its screenshots (both under the git-ignored ``_build``) and the browser.
SITE = Path(os.environ.get("UMLIP_LATENTS_SITE", paths.project_root() / "_build" / "html"))
SCREENSHOTS = Path(os.environ.get("UMLIP_LATENTS_SCREENSHOTS", paths.project_root() / "_build" / "screenshots"))
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
#: Flags for a root, offline machine: no sandbox, no GPU, no background connections to Google.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--enable-unsafe-swiftshader", "--window-size=1400,900")


def site_pages() -> list[str]:
    """Every HTML page of the built site, as paths relative to :data:`SITE` (``_static`` excluded)."""
    if not (SITE / "index.html").is_file():
        return []
    return sorted(p.relative_to(SITE).as_posix() for p in SITE.rglob("*.html")
                  if not p.relative_to(SITE).parts[0].startswith("_"))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


@pytest.fixture(scope="session")
def site_url():
    """Base URL of :data:`SITE` served by a threaded ``http.server`` on a free localhost port."""
    if not (SITE / "index.html").is_file():
        pytest.skip(f"no built site at {SITE} (run `make book-html`)")
    handler = functools.partial(_QuietHandler, directory=str(SITE))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="session")
def browser():
    """A headless Chromium (Selenium WebDriver) with its console log recorded; quit at the end."""
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian packages chromium, chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    profile = tempfile.mkdtemp(prefix="umlip-latents-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="session")
def screenshot_dir() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
