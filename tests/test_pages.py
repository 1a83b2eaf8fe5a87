"""The interactive pages (flopsim.webpage, flopsim.iplots, flopsim.report_page,
flopsim.result_pages): self-contained, deterministic, every op on the
roofline, tables with the CSV's exact values, plan and validate pages from
the CLI, and bad --html paths refused before any work."""

from __future__ import annotations

import html
import json
import re
from html.parser import HTMLParser

import pytest
from conftest import one_error_line
from conftest import run_cli as run

import flopsim

pytest.importorskip("plotly")


class PageParser(HTMLParser):
    """Element ids, links, external references, scripts and table cells of a page."""

    def __init__(self):
        super().__init__()
        self.ids, self.hrefs, self.srcs, self.cells, self.scripts = set(), [], [], [], 0
        self.figures = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "a" and "href" in a:
            self.hrefs.append(a["href"])
        for key in ("src", "href"):
            if key in a and tag in ("script", "img", "link", "iframe"):
                self.srcs.append(a[key])
        if tag == "script":
            self.scripts += 1
        if tag == "td" and "data-value" in a:
            self.cells.append(a["data-value"])
        if tag == "div" and "plotly-graph-div" in a.get("class", ""):
            self.figures.append(a["id"])


def parse(text: str) -> PageParser:
    p = PageParser()
    p.feed(text)
    return p


def figure_json(text: str, div_id: str) -> dict:
    """The data and layout a page passes to Plotly.newPlot for one figure."""
    m = re.search(r'Plotly\.newPlot\(\s*"' + re.escape(div_id) + r'",\s*(\[.*?\]),\s*(\{.*?\}),\s*\{"displaylogo"',
                  text, re.S)
    assert m, div_id
    return {"data": json.loads(m.group(1)), "layout": json.loads(m.group(2))}


# -- figure_data ---------------------------------------------------------------------------------------------
def test_op_points_stand_for_every_op_once():
    from flopsim.figure_data import generic_name, layer_ranges, op_points

    assert generic_name("block.11.attn.qkv") == ("block.*.attn.qkv", "11")
    assert generic_name("head.lm") == ("head.lm", "")
    assert layer_ranges(["0", "1", "2", "3", "7", "9", "10"]) == "0-3, 7, 9-10"
    for spec, phase in (("decoder-220m-mod", "train"), ("st-800m-sparse-ff", "prefill"), ("mixtral-8x7b", "decode")):
        r = flopsim.predict(spec, "h100-sxm", phase=phase, batch=2, seq=256)
        points = op_points(r.ops)
        assert sum(p["count"] for p in points) == len(r.ops)
        assert sum(p["time_s"] for p in points) == pytest.approx(sum(op.time_s for op in r.ops), rel=1e-12)
        assert sum(p["share"] for p in points) == pytest.approx(1.0, rel=1e-12)
        for p in points:  # a point's ops are the same kernel: its time is count x one op's
            assert p["time_s"] == pytest.approx(p["count"] * p["op_time_s"], rel=1e-9)
            if p["intensity"] is not None:
                assert p["intensity"] == pytest.approx(p["all_flops"] / p["bytes"])
        assert len(points) < len(r.ops)  # repeated layers merge


def test_mod_layers_with_and_without_routing_stay_apart():
    """MoD's routed blocks run fewer tokens: their qkv is not the same point as the unrouted blocks'."""
    from flopsim.figure_data import op_points

    r = flopsim.predict("decoder-220m-mod", "h100-sxm", phase="prefill", batch=2, seq=256)
    qkv = [p for p in op_points(r.ops) if p["name"] == "block.*.attn.qkv"]
    spec = flopsim.spec.load_model("decoder-220m-mod")
    every = spec.mod.every
    assert len(qkv) == 2 and sorted(p["count"] for p in qkv) == sorted(
        [spec.layers // every, spec.layers - spec.layers // every])


# -- the roofline ---------------------------------------------------------------------------------------------
def test_interactive_roofline_draws_every_point_with_its_name():
    from flopsim import iplots
    from flopsim.figure_data import op_points, point_label
    from flopsim.hardware import load_hardware

    hw = load_hardware("h100-sxm")
    specs = []
    for i, name in enumerate(("st-800m", "st-800m-sparse-ff")):
        r = flopsim.predict(name, hw, phase="prefill", batch=2, seq=256)
        specs.append({"name": name, "style": {"color": "#000", "marker": "o", "hollow": i == 0},
                      "points": op_points(r.ops)})
    fig = iplots.roofline([{"title": "prefill", "specs": specs}], peak_flops_per_s=hw.peak_flops_per_s_for("bf16")[0],
                          vector_flops_per_s=hw.vector_flops_per_s, bytes_per_s=hw.memory_bandwidth_bytes_per_s,
                          dtype="bf16")
    markers = [t for t in fig.data if t.mode == "markers"]
    drawn = [cd[0] for t in markers for cd in t.customdata]
    expected = [point_label(p) for s in specs for p in s["points"]]
    assert sorted(drawn) == sorted(expected)  # every op, once
    no_flops = [p for s in specs for p in s["points"] if p["intensity"] is None]
    assert any(p["kind"] == "gather" for p in no_flops), "the sparse-FF weight gather has no FLOPs"
    lower = [cd[0] for t in markers if t.yaxis == "y2" for cd in t.customdata]
    assert sorted(lower) == sorted(point_label(p) for p in no_flops)  # on the lower panel
    for t in markers:  # the lower panel: one op's time in us, at its bytes
        if t.yaxis == "y2":
            pts = [p for s in specs for p in s["points"] if p["intensity"] is None]
            for x, y, cd in zip(t.x, t.y, t.customdata):
                p = next(q for q in pts if point_label(q) == cd[0] and max(q["bytes"], 1.0) == x)
                assert y == pytest.approx(p["op_time_s"] * 1e6)


# -- the page -------------------------------------------------------------------------------------------------
def test_page_is_self_contained_and_deterministic(tmp_path):
    import plotly.graph_objects as go

    from flopsim.webpage import Page, csv_table

    def build():
        page = Page("t <&>", generator="test")
        page.markdown("# A title\n\n## 1. Part one\n\n[to part one](#1-part-one) <script>alert(1)</script>")
        page.figure(go.Figure(go.Scatter(x=[1, 2], y=[3, 4])), "f1", caption="*caption*")
        csv_table(page, [{"a": 0.1 + 0.2, "b": "x", "n": 12345}], name="t")
        return page

    text = build().render()
    assert text == build().render()
    p = parse(text)
    outside_plotly = re.sub(r'<script id="plotly-js".*?</script>', "", text, flags=re.S)
    assert p.srcs == [] and not re.search(r"https?://", outside_plotly)  # nothing fetched
    assert "<script>alert(1)</script>" not in text and "&lt;script&gt;" in text  # markdown's HTML escaped
    assert "1-part-one" in p.ids and "#1-part-one" in p.hrefs
    assert p.figures == ["fig-f1"]
    assert p.cells == [repr(0.1 + 0.2), "12345"]
    assert text.count('<script id="plotly-js"') == 1
    with pytest.raises(ValueError):
        build().figure(go.Figure(), "f1").figure(go.Figure(), "f1")
    path = build().write(tmp_path / "page.html")
    assert path.read_text() == text and [x.name for x in tmp_path.iterdir()] == ["page.html"]


# -- plan and validate pages -------------------------------------------------------------------------------------
def test_plan_train_html(tmp_path):
    out = tmp_path / "plan.html"
    args = ["plan", "train", "llama-2-7b", "-H", "a100-80gb", "--gpus", "64", "--tokens", "2T", "--tp", "2",
            "--pp", "2"]
    r = run(*args, "--html", out, "--format", "json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    text = out.read_text()
    p = parse(text)
    assert p.figures == ["fig-time-split", "fig-memory"]
    split = figure_json(text, "fig-time-split")["data"]
    from flopsim.planning import plan_training

    plan = plan_training("llama-2-7b", "a100-80gb", gpus=64, tokens=2e12, tp=2, pp=2)
    parts = plan.time_parts()
    assert [t["name"] for t in split] == [x["part"] for x in parts]
    assert sum(t["x"][0] for t in split) == pytest.approx(d["totals"]["step_time_s"], rel=1e-9)
    for key, value in d["totals"].items():  # every figure of --format json, exactly
        if isinstance(value, float):
            assert repr(value) in p.cells, key


def test_plan_serve_html_and_bad_paths(tmp_path):
    out = tmp_path / "serve.html"
    r = run("plan", "serve", "llama-2-7b", "-H", "a100-80gb", "--prompt", 512, "--gen", 256, "--tpot", "50ms",
            "--html", out)
    assert r.exit_code == 0, r.output
    p = parse(out.read_text())
    assert p.figures == ["fig-candidates"]
    for bad in (tmp_path, tmp_path / "file.txt" / "x.html", ""):
        (tmp_path / "file.txt").write_text("x")
        line = one_error_line(run("plan", "serve", "llama-2-7b", "-H", "a100-80gb", "--prompt", 512, "--gen", 256,
                                  "--html", bad))
        assert "html" in line
    assert sorted(x.name for x in tmp_path.iterdir()) == ["file.txt", "serve.html"]


def test_validate_published_html(tmp_path):
    rows = "gptfast-llama2-7b-a100-bs1-bf16,foundry-mpt7b-h100-8gpu-seq2048,llama2-7b-gpu-hours"
    r = run("validate", "--published", "--rows", rows, "--out", tmp_path / "pub", "--html")
    assert r.exit_code == 0, r.output
    text = (tmp_path / "pub" / "index.html").read_text()
    fig = figure_json(text, "fig-ratios")
    drawn = {y: x for t in fig["data"] if t.get("mode") == "markers" for x, y in zip(t["x"], t["y"])}
    table = {r["id"]: float(r["ratio"]) for r in
             __import__("csv").DictReader((tmp_path / "pub" / "rows.csv").open())}
    assert set(drawn) == set(rows.split(",")) == set(table)
    for row_id, ratio in table.items():
        assert drawn[row_id] == pytest.approx(ratio, rel=1e-12)


def test_validate_measurements_html(tmp_path):
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "reports" / "validation" / "cpu"
    r = run("validate", "--measurements", folder, "--out", tmp_path / "v", "--html")
    assert r.exit_code == 0, r.output
    text = (tmp_path / "v" / "index.html").read_text()
    p = parse(text)
    assert p.figures == ["fig-per-model", "fig-per-op", "fig-speedups"]
    assert "scatter.png" not in text  # the page draws its own figures
    per_model = list(__import__("csv").DictReader((tmp_path / "v" / "per_model.csv").open()))
    drawn = [x for t in figure_json(text, "fig-per-model")["data"] if t.get("mode") == "markers" for x in t["x"]]
    assert sorted(drawn) == pytest.approx(sorted(1e3 * float(r["measured_s"]) for r in per_model))
    summary = json.loads((tmp_path / "v" / "summary.json").read_text())  # the summary's title, rendered
    title = html.escape(f"flopsim validation: {summary['device']} ({summary.get('device_name', '')})")
    assert re.search(r"<h1 id=\"[^\"]+\">" + re.escape(title) + "</h1>", text), title


def test_the_vendored_plotly_js_is_the_basic_bundle_of_plotlys_own_major_version():
    from plotly.offline import get_plotlyjs_version

    from flopsim.webpage import PLOTLY_JS, PLOTLY_JS_VERSION

    head = PLOTLY_JS.read_text(encoding="utf-8")[:200]
    assert f"plotly.js (basic - minified) v{PLOTLY_JS_VERSION}" in head
    assert PLOTLY_JS_VERSION.split(".")[0] == get_plotlyjs_version().split(".")[0]  # figures' schema: plotly.js 4
    assert (PLOTLY_JS.parent / "plotly-LICENSE").read_text().startswith("MIT License")
    assert PLOTLY_JS.stat().st_size < 1.5e6
