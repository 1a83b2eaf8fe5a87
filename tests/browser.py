"""Test helper: open a page in headless Chromium and check that it rendered.

`open_page` loads a page from `file://` in Debian's Chromium through its
chromedriver (Selenium, with both paths given, so that Selenium Manager
never runs and nothing is downloaded), waits until every plotly figure has
drawn, takes a PNG screenshot and returns what it saw: figures found and
drawn, errors in the console and uncaught script errors, resources fetched
from the network, the title. `check_page` (open, then `assert_page_ok`)
asserts that all went well, and is what other tests call on the pages
flopsim writes.

Without a browser the checks skip, naming what is missing and the command
that installs it; with FLOPSIM_REQUIRE_BROWSER=1 (set by `.ci/run`) they
fail instead. FLOPSIM_CHROMIUM and FLOPSIM_CHROMEDRIVER override the
paths (set one to a missing file to see the skip).
"""

from __future__ import annotations

import base64
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

INSTALL = "apt-get update && apt-get install -y chromium chromium-driver"

# The network is closed here: without the background-networking flags
# Chromium keeps opening connections that are refused many at a time.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
    "--hide-scrollbars",
)

# One evaluation in the page: the figures, those drawn, whether plotly.js loaded.
_STATE_JS = """
const divs = Array.from(document.querySelectorAll('.plotly-graph-div'));
const drawn = divs.filter(d => d.classList.contains('js-plotly-plot')
                            && d.querySelector('.main-svg') !== null);
return {figures: divs.length, rendered: drawn.length,
        ready: document.readyState === 'complete',
        plotly: typeof window.Plotly !== 'undefined'};
"""

# Resources the page fetched from anywhere but the page itself (file:, data:, blob:).
_EXTERNAL_JS = """
return performance.getEntriesByType('resource').map(e => e.name)
    .filter(n => !/^(file|data|blob|about):/.test(n));
"""

# Largest full-page screenshot, in CSS pixels (Chromium's own limit is near 16384).
MAX_SCREENSHOT_HEIGHT = 16384


@dataclass
class PageCheck:
    """What headless Chromium saw on one page."""

    url: str
    title: str
    figures: int  # elements with class plotly-graph-div
    rendered: int  # of those, drawn by plotly (js-plotly-plot with a .main-svg)
    console_errors: list[str] = field(default_factory=list)  # console at level error/severe
    page_errors: list[str] = field(default_factory=list)  # uncaught exceptions
    external_resources: list[str] = field(default_factory=list)  # fetched over the network
    screenshot: Path | None = None
    screenshot_size: tuple[int, int] = (0, 0)  # pixels
    screenshot_colours: int = 0  # distinct colours, 1 for a blank image (capped at 4096)
    load_s: float = 0.0  # from navigation to all figures drawn (or giving up)
    timed_out: bool = False  # still loading or drawing after timeout_s

    @property
    def errors(self) -> list[str]:
        return self.page_errors + self.console_errors

    @property
    def ok(self) -> bool:
        return (
            not self.timed_out
            and self.figures == self.rendered
            and not self.errors
            and not self.external_resources
            and self.screenshot_colours > 1
        )

    def describe(self) -> str:
        lines = [
            f"{self.url}: title {self.title!r}, {self.rendered}/{self.figures} figures rendered "
            f"in {self.load_s:.1f} s{' (timed out)' if self.timed_out else ''}, screenshot {self.screenshot} "
            f"({self.screenshot_size[0]}x{self.screenshot_size[1]}, {self.screenshot_colours} colours)"
        ]
        lines += [f"  uncaught: {e}" for e in self.page_errors]
        lines += [f"  console error: {e}" for e in self.console_errors]
        lines += [f"  fetched over the network: {u}" for u in self.external_resources]
        return "\n".join(lines)


def find_browser() -> tuple[str, str] | str:
    """(chromium, chromedriver) paths, or a message saying what is missing and how to install it."""
    found, missing, install = [], [], []
    for env, name, package in (
        ("FLOPSIM_CHROMIUM", "chromium", "chromium"),
        ("FLOPSIM_CHROMEDRIVER", "chromedriver", "chromium-driver"),
    ):
        path = os.environ.get(env) or shutil.which(name)
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            found.append(path)
        else:
            where = f"{env}={os.environ[env]}" if os.environ.get(env) else f"{name} on PATH"
            missing.append(f"{name} (Debian package {package}; looked for {where})")
            if INSTALL not in install:
                install.append(INSTALL)
    try:
        import selenium.webdriver  # noqa: F401
    except ImportError:
        missing.append("the Python package selenium")
        install.append('python -m pip install -e ".[dev]"')
    if missing:
        return (
            "no headless browser for the page checks: missing "
            + ", ".join(missing)
            + "; install with: "
            + " and ".join(install)
        )
    return found[0], found[1]


def require_browser() -> tuple[str, str]:
    """The browser's paths; skip the test without one (fail with FLOPSIM_REQUIRE_BROWSER=1)."""
    found = find_browser()
    if isinstance(found, str):
        if os.environ.get("FLOPSIM_REQUIRE_BROWSER", "") not in ("", "0"):
            pytest.fail(f"FLOPSIM_REQUIRE_BROWSER is set but there is {found}", pytrace=False)
        pytest.skip(found)
    return found


def _start(chromium: str, chromedriver: str, profile: str, timeout_s: float):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager (which downloads drivers) never runs.
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    driver.set_page_load_timeout(timeout_s)
    driver.set_script_timeout(timeout_s)
    return driver


def _wait_rendered(driver, logs: list[dict], deadline: float, settle_s: float = 2.0) -> dict:
    """Poll until every figure is drawn; give up at `deadline` (time.monotonic()), or
    early where none can be. State gets "timed_out": whether the deadline ended it.

    Browser log entries read on the way are appended to `logs` (reading drains them).
    """
    from selenium.common.exceptions import TimeoutException

    last, last_change = None, time.monotonic()
    while True:
        try:
            state = driver.execute_script(_STATE_JS)
        except TimeoutException:  # the renderer is still busy loading
            if time.monotonic() > deadline:
                raise AssertionError(f"{driver.current_url}: still loading at the timeout") from None
            continue
        now = time.monotonic()
        state["timed_out"] = False
        if state["ready"] and state["rendered"] == state["figures"]:
            return state
        if state["ready"] and state["figures"] and not state["plotly"]:
            return state  # plotly.js never loaded: nothing will draw
        progress = (state["figures"], state["rendered"])
        if progress != last:
            last, last_change = progress, now
        elif state["ready"] and now - last_change > settle_s:
            logs.extend(driver.get_log("browser"))
            if any(e.get("level") == "SEVERE" for e in logs):
                return state  # loaded, stuck, and a script has failed
        if now > deadline:
            state["timed_out"] = True
            return state
        time.sleep(0.1)


def _screenshot(driver, path: Path, full_page: bool) -> None:
    if full_page:
        size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        width = max(1, int(size["width"]))
        height = max(1, min(int(size["height"]), MAX_SCREENSHOT_HEIGHT))
        shot = driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
            },
        )
        path.write_bytes(base64.b64decode(shot["data"]))
    else:
        driver.save_screenshot(str(path))


def _image_facts(path: Path) -> tuple[tuple[int, int], int]:
    from PIL import Image

    with Image.open(path) as img:
        rgb = img.convert("RGB")
        colours = rgb.getcolors(4096)
        return rgb.size, (len(colours) if colours is not None else 4096)


def open_page(
    html_path: str | os.PathLike,
    screenshot_path: str | os.PathLike,
    timeout_s: float = 60,
    *,
    full_page: bool = True,
) -> PageCheck:
    """Load `html_path` from file:// in headless Chromium and report what it saw.

    Waits until every `.plotly-graph-div` has been drawn (or `timeout_s` from
    the start of loading, or sooner where plotly.js never loaded, or where a
    script failed and nothing has moved for 2 s), then writes a PNG
    screenshot, the whole page by default. Skips (or fails, with
    FLOPSIM_REQUIRE_BROWSER=1) without a browser.
    """
    chromium, chromedriver = require_browser()
    from selenium.common.exceptions import TimeoutException

    url = Path(html_path).resolve().as_uri()
    shot = Path(screenshot_path)
    shot.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="flopsim-chromium-") as profile:
        driver = _start(chromium, chromedriver, profile, timeout_s)
        try:
            start = time.monotonic()
            try:
                driver.get(url)
            except TimeoutException:
                pass  # still loading at the deadline: report what there is
            entries: list[dict] = []
            state = _wait_rendered(driver, entries, start + timeout_s)
            load_s = time.monotonic() - start
            title = driver.title
            external = driver.execute_script(_EXTERNAL_JS)
            _screenshot(driver, shot, full_page)
            entries += driver.get_log("browser")
        finally:
            driver.quit()
    severe = [e for e in entries if e.get("level") == "SEVERE"]
    size, colours = _image_facts(shot)
    return PageCheck(
        url=url,
        title=title,
        figures=state["figures"],
        rendered=state["rendered"],
        # Chromium logs uncaught exceptions with source "javascript" ("Uncaught ...").
        page_errors=[e["message"] for e in severe if e.get("source") == "javascript"],
        console_errors=[e["message"] for e in severe if e.get("source") != "javascript"],
        external_resources=list(external),
        screenshot=shot,
        screenshot_size=size,
        screenshot_colours=colours,
        load_s=load_s,
        timed_out=state["timed_out"],
    )


def check_page(
    html_path: str | os.PathLike,
    screenshot_path: str | os.PathLike | None = None,
    *,
    min_figures: int = 1,
    timeout_s: float = 60,
) -> PageCheck:
    """Assert that a page drew all its figures (at least `min_figures`), logged
    no errors, fetched nothing over the network and is not blank on screen.

    The screenshot goes to `screenshot_path`, or else into a fresh temporary
    folder; its path is in the returned PageCheck and in any failure message.
    """
    if screenshot_path is None:
        folder = Path(tempfile.mkdtemp(prefix="flopsim-screenshot-"))
        screenshot_path = folder / (Path(html_path).stem + ".png")
    page = open_page(html_path, screenshot_path, timeout_s=timeout_s)
    assert_page_ok(page, min_figures=min_figures)
    return page


def assert_page_ok(page: PageCheck, *, min_figures: int = 1) -> None:
    """`check_page`'s assertions on a page already opened."""
    assert not page.timed_out, page.describe()
    assert page.figures >= min_figures, page.describe()
    assert page.rendered == page.figures, page.describe()
    assert not page.errors, page.describe()
    assert not page.external_resources, page.describe()
    assert page.screenshot_colours > 1, "blank screenshot\n" + page.describe()
