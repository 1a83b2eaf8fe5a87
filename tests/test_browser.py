"""Pages in a real browser: headless Chromium draws them, with no script errors.

The first three tests check the checker (`tests/browser.py`) on small plotly
pages made here: one that is fine, one whose script throws, one that cannot
draw. `test_page_renders` is where flopsim's own pages are checked: add a
`pytest.param` to PAGES for each. Every test skips without a browser (the
message says what to install) and fails instead under
FLOPSIM_REQUIRE_BROWSER=1, as in `.ci/run`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from browser import assert_page_ok, check_page, open_page, require_browser


def plotly_page(path: Path, *, plotlyjs: bool = True, extra_script: str = "") -> Path:
    """A self-contained page with two plotly figures (plotly.js inlined unless not `plotlyjs`)."""
    import plotly.graph_objects as go

    line = go.Figure(go.Scatter(x=[1, 2, 3, 4], y=[3, 1, 4, 1], name="line"))
    line.update_layout(title="line", width=600, height=350)
    bars = go.Figure(go.Bar(x=["dense", "MoD", "MoE"], y=[1.0, 0.6, 0.4], name="bars"))
    bars.update_layout(title="bars", width=600, height=350)
    line.write_html(path, include_plotlyjs=plotlyjs, full_html=True)
    html = path.read_text()
    # The second figure in the same page, after the first (plotly.js once).
    second = bars.to_html(include_plotlyjs=False, full_html=False)
    html = html.replace("</body>", f"{second}{extra_script}</body>", 1)
    html = html.replace("<head>", "<head><title>flopsim browser check</title>", 1)
    path.write_text(html)
    return path


def test_checker_sees_a_good_page(tmp_path):
    page = check_page(plotly_page(tmp_path / "good.html"), tmp_path / "good.png", min_figures=2)
    assert (page.figures, page.rendered) == (2, 2), page.describe()
    assert page.title == "flopsim browser check"
    assert page.screenshot.stat().st_size > 1000
    assert page.screenshot_size[0] >= 600 and page.screenshot_size[1] >= 700, page.describe()
    assert page.screenshot_colours > 10, page.describe()  # not one flat colour


def test_checker_sees_a_script_error(tmp_path):
    bad = plotly_page(tmp_path / "throws.html", extra_script='<script>throw new Error("boom")</script>')
    page = open_page(bad, tmp_path / "throws.png")
    assert page.rendered == page.figures == 2, page.describe()  # the figures drew...
    assert any("boom" in e for e in page.page_errors), page.describe()  # ...but the error is seen
    assert not page.ok
    with pytest.raises(AssertionError, match="boom"):
        assert_page_ok(page)


def test_checker_sees_figures_not_drawn(tmp_path):
    page = open_page(plotly_page(tmp_path / "noplotly.html", plotlyjs=False), tmp_path / "noplotly.png")
    assert page.figures == 2 and page.rendered == 0, page.describe()
    assert any("ReferenceError" in e and "Plotly" in e for e in page.page_errors), page.describe()
    assert page.screenshot_colours == 1, page.describe()  # nothing on screen
    assert not page.ok
    with pytest.raises(AssertionError, match="0/2 figures rendered"):
        assert_page_ok(page)


# ---------------------------------------------------------------------------
# flopsim's own pages in the browser. Add one pytest.param per page: a
# function of tmp_path that writes the page and returns its path, e.g.
#   pytest.param(lambda tmp: write_report(tmp) / "index.html", id="report"),
# Each must draw every figure (at least one) with no error in the console.
# ---------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent


def _cli(*args) -> None:
    from conftest import run_cli

    r = run_cli(*args)
    assert r.exit_code == 0, r.output


def report_page(tmp: Path) -> Path:
    """A fresh, small report (the committed example has every kind of group)."""
    _cli("report", "decoder-220m-mod", "--hardware", "h100-sxm", "--phase", "prefill", "--phase", "decode",
         "--batch", 2, "--seq", 128, "--budget", 1e19, "--out", tmp / "report")
    return tmp / "report" / "index.html"


def plan_train_page(tmp: Path) -> Path:
    _cli("plan", "train", "mixtral-8x7b", "-H", "h100-sxm", "--gpus", 64, "--tokens", "1T", "--tp", 2, "--pp", 2,
         "--ep", 4, "--html", tmp / "train.html")
    return tmp / "train.html"


def plan_serve_page(tmp: Path) -> Path:
    _cli("plan", "serve", "llama-2-7b", "-H", "a100-80gb", "--prompt", 512, "--gen", 256, "--tpot", "50ms",
         "--html", tmp / "serve.html")
    return tmp / "serve.html"


def published_page(tmp: Path) -> Path:
    _cli("validate", "--published", "--rows", "gptfast-llama2-7b-a100-bs1-bf16,llama2-7b-gpu-hours",
         "--out", tmp / "published", "--html")
    return tmp / "published" / "index.html"


def validation_page(tmp: Path) -> Path:
    _cli("validate", "--measurements", ROOT / "reports" / "validation" / "cpu", "--out", tmp / "validation", "--html")
    return tmp / "validation" / "index.html"


PAGES: list = [
    pytest.param(lambda tmp: ROOT / "reports" / "conditional-vs-dense-h100-sxm" / "index.html", id="committed-report"),
    pytest.param(report_page, id="fresh-report"),
    pytest.param(plan_train_page, id="plan-train"),
    pytest.param(plan_serve_page, id="plan-serve"),
    pytest.param(published_page, id="validate-published"),
    pytest.param(validation_page, id="validate-measurements"),
]


@pytest.mark.parametrize("make_page", PAGES)
def test_page_renders(make_page, tmp_path):
    require_browser()  # before the page is made: a skip costs nothing
    check_page(make_page(tmp_path), tmp_path / "screenshot.png")
