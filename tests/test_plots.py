"""The static roofline (flopsim.plots.roofline_figure) draws every op point of
flopsim.figure_data.op_points once, on the roofline row or on the no-FLOP row
(bytes against time), and names the largest contributors. Checked on the
returned Figure's artists (collections, texts, ticks), not on pixels."""

from __future__ import annotations

import math
from collections import Counter

import pytest

import flopsim
from flopsim.figure_data import largest, op_points, point_label

HW = "h100-sxm"
DENSE, SPARSE_FF, MOD = "st-800m", "st-800m-sparse-ff", "decoder-220m-mod"


@pytest.fixture(scope="module")
def hw():
    from flopsim.hardware import load_hardware

    return load_hardware(HW)


@pytest.fixture(scope="module")
def points(hw):
    """op_points of the steps the tests draw, by (model, phase)."""
    runs = {(DENSE, "prefill"): dict(batch=8, seq=2048), (SPARSE_FF, "prefill"): dict(batch=8, seq=2048),
            (MOD, "train"): dict(batch=8, seq=2048), ("bert-base", "forward"): dict(batch=2, seq=128)}
    return {key: op_points(flopsim.predict(key[0], hw, phase=key[1], **kw).ops) for key, kw in runs.items()}


@pytest.fixture(scope="module")
def prefill(hw, points):
    """The dense baseline against the sparse-FF model in prefill: (specs, figure), drawn once."""
    specs = [_spec(DENSE, points[(DENSE, "prefill")], hollow=True), _spec(SPARSE_FF, points[(SPARSE_FF, "prefill")])]
    return specs, _figure(hw, [{"title": "prefill", "specs": specs}])


def _spec(name: str, pts: list, hollow: bool = False) -> dict:
    """A spec as flopsim.report builds it: {"name", "style", "points": op_points(r.ops)}."""
    from flopsim.plots import BASELINE_COLOR, SPEC_COLORS

    style = {"color": BASELINE_COLOR, "marker": "o", "hollow": True} if hollow else {"color": SPEC_COLORS[0],
                                                                                      "marker": "s"}
    return {"name": name, "style": style, "points": pts}


def _figure(hw, panels: list):
    from flopsim import plots

    return plots.roofline_figure(panels, peak_flops_per_s=hw.peak_flops_per_s_for("bf16")[0],
                                 vector_flops_per_s=hw.vector_flops_per_s,
                                 bytes_per_s=hw.memory_bandwidth_bytes_per_s, dtype="bf16", title="test")


def _rows(fig) -> dict:
    """{"roofline": [axes per column], "no-flop": [...]}, from the labels roofline_figure gives its axes."""
    rows: dict = {"roofline": [], "no-flop": []}
    for ax in fig.axes:
        row, _, col = ax.get_label().rpartition(" ")
        if row in rows:
            rows[row].append((int(col), ax))
    return {row: [ax for _, ax in sorted(axes)] for row, axes in rows.items()}


def _scatters(ax) -> dict:
    """{(spec, kind): offsets} of the point scatters of one axes (labelled 'spec | kind')."""
    out: dict = {}
    for coll in ax.collections:
        if " | " in str(coll.get_label()):
            spec, kind = coll.get_label().split(" | ")
            out.setdefault((spec, kind), []).extend(tuple(map(float, xy)) for xy in coll.get_offsets())
    return out


def _tick_labels(axis) -> dict:
    """{tick position: its text} of an axis' major ticks."""
    fmt = axis.get_major_formatter()
    return {float(v): fmt(v, i) for i, v in enumerate(axis.get_major_locator()())}


def _no_flop_xy(p: dict, ax) -> tuple:
    """Where the no-FLOP row should draw a point: its bytes and one op's time in us, or, for zeros,
    the tick labelled '0 B' / '0' (the floor)."""
    x_zero = [v for v, t in _tick_labels(ax.xaxis).items() if t == "0 B"]
    y_zero = [v for v, t in _tick_labels(ax.yaxis).items() if t == "0"]
    return (p["bytes"] if p["bytes"] > 0 else x_zero[0], p["op_time_s"] * 1e6 if p["op_time_s"] > 0 else y_zero[0])


def _close(a: tuple, b: tuple) -> bool:
    return all(math.isclose(u, v, rel_tol=1e-9) for u, v in zip(a, b))


# -- every point once ------------------------------------------------------------------------------------
def _check_every_point_drawn_once(specs: list, fig) -> None:
    rows = _rows(fig)
    upper, lower = _scatters(rows["roofline"][0]), _scatters(rows["no-flop"][0])
    expected = Counter((s["name"], p["kind"], p["intensity"] is None) for s in specs for p in s["points"])
    drawn = Counter({(spec, kind, False): len(xy) for (spec, kind), xy in upper.items()})
    drawn.update({(spec, kind, True): len(xy) for (spec, kind), xy in lower.items()})
    assert drawn == expected
    for s in specs:  # at the point's own coordinates: (intensity, TFLOP/s) above, (bytes, us) below
        for p in s["points"]:
            if p["intensity"] is not None:
                spot, offsets = (p["intensity"], p["tflops"]), upper[(s["name"], p["kind"])]
            else:
                spot, offsets = _no_flop_xy(p, rows["no-flop"][0]), lower[(s["name"], p["kind"])]
            assert any(_close(spot, xy) for xy in offsets), point_label(p)


def test_every_point_is_drawn_once_on_one_of_the_two_rows(prefill):
    _check_every_point_drawn_once(*prefill)


def test_every_point_of_a_mod_train_step_is_drawn_once(hw, points):
    specs = [_spec(MOD, points[(MOD, "train")])]
    _check_every_point_drawn_once(specs, _figure(hw, [{"title": "train", "specs": specs}]))


def test_the_sparse_ff_weight_gathers_are_on_the_no_flop_row(hw, points, prefill):
    pts = points[(SPARSE_FF, "prefill")]
    gathers = [p for p in pts if p["kind"] == "gather" and ".mlp." in p["name"]]
    assert {p["name"] for p in gathers} == {"block.*.mlp.up.gather", "block.*.mlp.down.gather"}
    assert all(p["intensity"] is None for p in gathers)  # no FLOPs: not on the log-log roofline
    rows = _rows(prefill[1])
    lower = _scatters(rows["no-flop"][0])[(SPARSE_FF, "gather")]
    for p in gathers:
        assert any(_close((p["bytes"], p["op_time_s"] * 1e6), xy) for xy in lower)
    assert (SPARSE_FF, "gather") not in _scatters(rows["roofline"][0])
    # the title gives the share of each step's time the no-FLOP ops take
    title = rows["roofline"][0].get_title()
    for model in (DENSE, SPARSE_FF):
        share = sum(p["share"] for p in points[(model, "prefill")] if p["intensity"] is None)
        assert f"{model}\u00a0{100 * share:.1f}%" in title
    # the line time = bytes / bandwidth, drawn through its own points and labelled
    bw = hw.memory_bandwidth_bytes_per_s
    line = [ln for ln in rows["no-flop"][0].get_lines() if len(ln.get_xdata()) > 2][0]
    assert all(math.isclose(y, x / bw * 1e6) for x, y in zip(line.get_xdata(), line.get_ydata()))
    assert any("time = bytes /" in t.get_text() for t in rows["no-flop"][0].texts)


# -- names ----------------------------------------------------------------------------------------------
def test_the_largest_contributors_are_named_without_overlapping(prefill):
    specs, fig = prefill
    rows = _rows(fig)
    texts = {row: [t.get_text() for t in axes[0].texts] for row, axes in rows.items()}
    for s in specs:
        top = largest(s["points"], 1)[0]
        assert point_label(top) in texts["no-flop" if top["intensity"] is None else "roofline"]
    sparse_top_gather = largest([p for p in specs[1]["points"] if p["intensity"] is None], 1)[0]
    assert point_label(sparse_top_gather) in texts["no-flop"]
    fig.canvas.draw()  # places the labels' boxes
    renderer = fig.canvas.get_renderer()
    for axes in rows.values():
        notes = [t for t in axes[0].texts if hasattr(t, "xyann")]  # the labels (annotations)
        assert notes
        boxes = [n.get_bbox_patch().get_window_extent(renderer) for n in notes]
        frame = axes[0].get_window_extent(renderer)
        for i, box in enumerate(boxes):
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            assert not any(box.overlaps(other) for other in boxes[i + 1:]), notes[i].get_text()


# -- zeros on a log axis ----------------------------------------------------------------------------------
def test_points_with_no_bytes_or_no_time_are_drawn_on_the_floors(hw, points):
    bert = points[("bert-base", "forward")]
    no_time = [p for p in bert if p["bytes"] == 0 and p["op_time_s"] == 0]  # a view: no kernel at all
    assert no_time, "bert-base forward selects the [CLS] position without a kernel"
    pts = points[(SPARSE_FF, "prefill")]
    smallest = min((p for p in pts if p["intensity"] is None), key=lambda p: p["op_time_s"])
    launch = dict(smallest, name="block.*.mlp.launch_only", bytes=0.0, all_flops=0.0, layers=list(smallest["layers"]))
    fig = _figure(hw, [{"title": "forward", "specs": [_spec("bert-base", bert, hollow=True)]},
                       {"title": "prefill", "specs": [_spec(SPARSE_FF, pts + [launch])]}])
    rows = _rows(fig)
    ax = rows["no-flop"][0]
    x_ticks, y_ticks = _tick_labels(ax.xaxis), _tick_labels(ax.yaxis)
    (x_zero,) = [v for v, t in x_ticks.items() if t == "0 B"]
    (y_zero,) = [v for v, t in y_ticks.items() if t == "0"]
    positive_bytes = [p["bytes"] for s in (bert, pts) for p in s if p["intensity"] is None and p["bytes"] > 0]
    positive_us = [p["op_time_s"] * 1e6 for s in (bert, pts) for p in s if p["intensity"] is None
                   and p["op_time_s"] > 0]
    assert x_zero < min(positive_bytes) / 5 and y_zero < min(positive_us) / 5  # apart from every real value
    assert ax.get_xlim()[0] < x_zero and ax.get_ylim()[0] < y_zero  # inside the axes
    assert "0 B" in ax.get_xlabel() and "0" in rows["no-flop"][0].get_ylabel()  # and said
    bert_drawn = [xy for xys in _scatters(rows["no-flop"][0]).values() for xy in xys]
    for p in no_time:
        assert (x_zero, y_zero) in bert_drawn, point_label(p)
    launch_drawn = _scatters(rows["no-flop"][1])[(SPARSE_FF, launch["kind"])]
    assert any(_close((x_zero, launch["op_time_s"] * 1e6), xy) for xy in launch_drawn)


def test_a_figure_without_no_flop_points_says_it_has_no_lower_row(hw, points):
    placed = [p for p in points[(DENSE, "prefill")] if p["intensity"] is not None]
    fig = _figure(hw, [{"title": "prefill", "specs": [_spec(DENSE, placed, hollow=True)]}])
    rows = _rows(fig)
    assert not rows["no-flop"] and len(rows["roofline"]) == 1
    assert "no lower row" in " ".join(rows["roofline"][0].get_title().split())
    assert sum(len(xy) for xy in _scatters(rows["roofline"][0]).values()) == len(placed)


def test_the_svg_is_deterministic_and_matplotlib_stays_lazy(hw, points, tmp_path):
    import subprocess
    import sys

    from flopsim import plots

    specs = [_spec(SPARSE_FF, points[(SPARSE_FF, "prefill")])]
    written = []
    for name in ("a", "b"):
        fig = _figure(hw, [{"title": "prefill", "specs": specs}])
        assert plots.save(fig, tmp_path / name, ("svg",)) == [f"{name}.svg"]
        written.append((tmp_path / f"{name}.svg").read_bytes())
    assert written[0] == written[1]
    code = "import sys, flopsim.plots; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
