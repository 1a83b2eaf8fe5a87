"""Report figures (flopsim.report): roofline, speedup vs knob, memory bars.

matplotlib is imported inside the functions, with the Agg backend, so that
neither the core nor `flopsim --help` loads it. The functions take plain
data (lists and dicts of numbers) and return a Figure; `save` writes it as
PNG and/or SVG, each file atomically (flopsim.cli.output.write_atomic).
Conventions: log-log roofline in FLOP/byte and TFLOP/s; ratios on log axes
(2x and 0.5x equally far from 1); memory in GB (1e9 bytes, as datasheets).

The roofline draws the op points of flopsim.figure_data (op_points), the
same the interactive roofline (flopsim.iplots) draws, and does no cost
arithmetic of its own (unit changes for the axes only). One column per
phase; every point is drawn exactly once, colour by kind, marker by spec,
area by its share of the step's time:
- upper row: the points with an intensity, at (intensity, TFLOP/s), under
  the matrix, vector and (when given) calibrated roofs;
- lower row ("no-FLOP" row): the points without one (no FLOPs, no bytes or
  no time: copies, gathers, the KV-cache append), at one op's bytes and one
  op's time in microseconds, over the line time = bytes / bandwidth. A log
  axis cannot show zero: ops moving no bytes sit at a floor a decade below
  the smallest positive bytes, on a shaded band ticked "0 B", and ops taking
  no time likewise on a band ticked "0"; the axis labels say so. When no
  point lacks an intensity the row is left out and the titles say so.
- each panel's title gives the share of each spec's step time that the
  no-FLOP ops take;
- each spec's largest points (figure_data.largest) are named with
  figure_data.point_label, by a label joined to the point by a thin leader
  line, in the nearest slot (by a fixed search order) clear of the other
  labels, texts and markers.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Optional, Sequence

BASELINE_COLOR = "#222222"
SPEC_COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
SPEC_MARKERS = ["s", "^", "D", "v", "P", "X"]
KIND_COLORS = {
    "matmul": "#1f77b4", "attention": "#ff7f0e", "router": "#d62728", "conv": "#8c564b",
    "norm": "#2ca02c", "elementwise": "#9467bd", "softmax": "#e377c2", "topk": "#bcbd22",
    "gather": "#17becf", "scatter": "#7f7f7f", "embedding": "#c49c94", "kv_cache": "#ffbb78",
    "loss": "#98df8a", "optimizer": "#aec7e8",
}
MEMORY_COMPONENTS = ("weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes", "kv_cache_bytes")
MEMORY_COLORS = {"weights_bytes": "#4e79a7", "gradients_bytes": "#f28e2b", "optimizer_bytes": "#e15759",
                 "activations_bytes": "#76b7b2", "kv_cache_bytes": "#59a14f"}
MEMORY_LABELS = {"weights_bytes": "weights", "gradients_bytes": "gradients", "optimizer_bytes": "optimizer state",
                 "activations_bytes": "activations", "kv_cache_bytes": "KV cache"}
DPI = 100


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
                         "svg.fonttype": "none", "svg.hashsalt": "flopsim", "path.simplify": True})
    return plt


def _si(value: float) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:.3g} "


def _ratio_ticks(ax, lo: float, hi: float) -> None:
    """Log y axis for ratios, ticked as 0.5x, 1x, 2x ..."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    span = math.log10(hi / lo)
    if span > 1.2:
        candidates = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100]
    elif span > 0.5:
        candidates = [0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5, 7, 10, 20]
    else:
        candidates = [0.5, 0.6, 0.7, 0.8, 0.9, 1, 1.1, 1.25, 1.5, 1.75, 2, 2.5, 3]
    ticks = [t for t in candidates if lo <= t <= hi]
    ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))


# -- 1. roofline -------------------------------------------------------------------------
ROOFLINE_WIDTH_PER_PANEL = 5.6    # inches per phase column
ROOFLINE_UPPER_HEIGHT = 6.2       # inches: the roofline row with its titles
ROOFLINE_LOWER_HEIGHT = 3.4       # inches: the no-FLOP row
LABELS_PER_SPEC = 4               # the largest points of each spec that are named ...
LABELS_PER_AXES = 10              # ... up to this many per axes (rank by rank across the specs)
LABEL_FONT_SIZE = 7.5
LABEL_LINE_PT = 10.5              # vertical room of one label, in points
LABEL_OFFSET = 0.045              # horizontal gap between a point and its label, in axes fractions
ZERO_BAND_COLOR = "#ececec"
ZERO_BAND_WIDTH = 2.5             # the floor band ends this factor above the floor (a decade below the data)
BANDWIDTH_LINE = {"color": "#555555", "lw": 1.3, "ls": (0, (5, 2))}


def _marker_area(share: float) -> float:
    """Marker area (points^2) of a point with this share of the step's time."""
    return 14 + 900 * share


def roofline_figure(panels: Sequence[dict], *, peak_flops_per_s: float, vector_flops_per_s: float,
                    bytes_per_s: float, dtype: str, calibrated: Optional[tuple] = None, title: str = ""):
    """panels: [{"title", "specs": [{"name", "style": {"color", "marker", "hollow"?},
    "points": flopsim.figure_data.op_points(result.ops)}]}]: one column per panel (phase); other
    keys are ignored. The legend's specs are those of the first panel.

    Upper row: the points with an intensity on the log-log roofline; lower row
    (omitted, and said so in the titles, when no point lacks one): the others,
    one op's bytes against its time, with the line time = bytes / bytes_per_s.
    Every point is drawn exactly once; each spec's LABELS_PER_SPEC largest are named
    (LABELS_PER_AXES at most per axes)."""
    plt = _plt()
    placed = [p for panel in panels for s in panel["specs"] for p in s["points"] if p["intensity"] is not None]
    unplaced = [p for panel in panels for s in panel["specs"] for p in s["points"] if p["intensity"] is None]
    fig, upper, lower = _roofline_grid(plt, len(panels), bool(unplaced))
    kinds_seen: list = []
    wrap = int(ROOFLINE_WIDTH_PER_PANEL * 72 / 6.5)  # title characters per line at 11 pt
    for col, panel in enumerate(panels):
        _draw_points(upper[col], panel, kinds_seen, lambda p: (p["intensity"], p["tflops"]), on_roofline=True)
        upper[col].set_title(_roofline_panel_title(panel, bool(unplaced), wrap))
    _draw_roofs(upper, placed, peak_flops_per_s, vector_flops_per_s, bytes_per_s, dtype, calibrated)
    floors = _no_flop_floors(unplaced)
    for col, panel in enumerate(panels if lower else ()):
        _draw_points(lower[col], panel, kinds_seen, lambda p: _no_flop_xy(p, floors), on_roofline=False)
        lower[col].set_title("ops with no FLOPs or no bytes: one op's bytes and time", fontsize=10)
    if lower:
        _no_flop_axes(lower, floors, bytes_per_s)
    legend_h = _roofline_legends(fig, panels, kinds_seen, dtype, calibrated, bytes_per_s if lower else None)
    height = fig.get_size_inches()[1]
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, legend_h / height, 1, 1 - 0.1 / height))
    for col, panel in enumerate(panels):  # after the layout, which fixes the axes' sizes
        _label_largest(upper[col], panel, True, lambda p: (p["intensity"], p["tflops"]))
        if lower:
            _label_largest(lower[col], panel, False, lambda p: _no_flop_xy(p, floors))
    return fig


def _roofline_grid(plt, n: int, with_lower: bool):
    """The figure and its axes: the roofline row and, when wanted, the no-FLOP row; each row shares
    its axes across the columns. Axes carry labels 'roofline <i>' and 'no-flop <i>'."""
    width = max(ROOFLINE_WIDTH_PER_PANEL * n + 0.6, 9.0)
    rows = 2 if with_lower else 1
    height = ROOFLINE_UPPER_HEIGHT + (ROOFLINE_LOWER_HEIGHT if with_lower else 0.0)
    fig, axes = plt.subplots(rows, n, figsize=(width, height), dpi=DPI, sharex="row", sharey="row", squeeze=False,
                             gridspec_kw={"height_ratios": [ROOFLINE_UPPER_HEIGHT, ROOFLINE_LOWER_HEIGHT]}
                             if with_lower else None)
    for col in range(n):
        axes[0][col].set_label(f"roofline {col}")
        if with_lower:
            axes[1][col].set_label(f"no-flop {col}")
    return fig, list(axes[0]), (list(axes[1]) if with_lower else [])


def _roofline_panel_title(panel: dict, with_lower: bool, wrap: int) -> str:
    """The phase's title and the share of each spec's step time that ops with no FLOPs take."""
    import textwrap

    specs = panel["specs"]
    shares = [sum(p["share"] for p in s["points"] if p["intensity"] is None) for s in specs]
    if not with_lower:
        note = "every op has FLOPs and bytes: all are on the roofline (no lower row)"
    elif len(specs) == 1:
        note = f"ops with no FLOPs (lower row): {100 * shares[0]:.1f}% of the step time"
    else:  # one line of header, then the specs, each kept whole (non-breaking spaces) when wrapped
        entries = ", ".join(f"{s['name']}\u00a0{100 * share:.1f}%" for s, share in zip(specs, shares))
        note = "ops with no FLOPs (lower row), share of the step time:\n" + entries
    return panel["title"] + "\n" + "\n".join(line for part in note.split("\n") for line in textwrap.wrap(part, wrap))


def _draw_points(ax, panel: dict, kinds_seen: list, xy, on_roofline: bool) -> None:
    """One scatter per spec and kind (label 'spec | kind') of the points of one row: colour by kind,
    marker by spec (open for a hollow style), area by share of the step's time."""
    for spec in panel["specs"]:
        by_kind: dict = {}
        for p in spec["points"]:
            if (p["intensity"] is not None) == on_roofline:
                by_kind.setdefault(p["kind"], []).append(p)
        hollow = spec["style"].get("hollow", False)
        for kind, pts in sorted(by_kind.items()):
            if kind not in kinds_seen:
                kinds_seen.append(kind)
            xs, ys = zip(*(xy(p) for p in pts))
            color = KIND_COLORS.get(kind, "#555555")
            sizes = [_marker_area(p["share"]) for p in pts]
            label = f"{spec['name']} | {kind}"
            if hollow:  # the baseline: open markers, so that the conditional spec's show through
                ax.scatter(xs, ys, s=sizes, marker=spec["style"]["marker"], facecolors="none", edgecolors=color,
                           linewidths=1.8, zorder=4, label=label)
            else:
                ax.scatter(xs, ys, s=sizes, marker=spec["style"]["marker"], c=color, edgecolors="black",
                           linewidths=0.5, zorder=3, label=label)


def _draw_roofs(axes, placed: list, peak: float, vector: float, bw: float, dtype: str,
                calibrated: Optional[tuple]) -> None:
    """The roofline row's limits, roofs (matrix, vector, calibrated), ridge and their labels."""
    import numpy as np

    ridge = peak / bw
    xs = [p["intensity"] for p in placed]
    ys = [p["tflops"] for p in placed]
    xmin = min(xs + [ridge]) / 4
    xmax = max(xs + [ridge]) * 4
    ymin = min(ys) / 4 if ys else 1e-3
    ymax = peak / 1e12 * 12
    grid = np.logspace(math.log10(xmin), math.log10(xmax), 200)
    for ax in axes:
        ax.plot(grid, np.minimum(peak, bw * grid) / 1e12, color="black", lw=1.8, zorder=2)
        ax.plot(grid, np.minimum(vector, bw * grid) / 1e12, color="black", lw=1.2, ls="--", zorder=2)
        if calibrated is not None:
            ce, me = calibrated
            ax.plot(grid, np.minimum(peak * ce, bw * me * grid) / 1e12, color="grey", lw=1.2, ls=":", zorder=2)
        ax.axvline(ridge, color="grey", lw=0.8, ls="-.", zorder=1)
        ax.text(ridge * 1.1, ymin * 1.6, f"ridge\n{ridge:.0f} FLOP/B", fontsize=8, color="dimgrey", va="bottom")
        # labels where no op can sit: well above the matrix roof, under the vector roof's right end
        ax.text(xmax / 1.2, peak / 1e12 * 2.6, f"{dtype} peak {_si(peak)}FLOP/s", fontsize=8, ha="right",
                va="bottom")
        ax.text(xmax / 1.2, vector / 1e12 / 1.2, f"fp32 vector {_si(vector)}FLOP/s", fontsize=8, ha="right",
                va="top")
        # above the bandwidth slope, where no op can be
        x_bw = math.sqrt(max(xmin, ymin * 1e12 / bw) * ridge) / 3
        ax.text(x_bw, bw * x_bw / 1e12 * 2.2, f"HBM {_si(bw)}B/s", fontsize=8, ha="right", va="bottom")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(xmin, xmax)
        ax.set_ylim(ymin, ymax)
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    axes[0].set_ylabel("achieved throughput (TFLOP/s)")


def _no_flop_floors(unplaced: list) -> dict:
    """Where the no-FLOP row draws what a log axis cannot: an op moving no bytes at x = floors["bytes"],
    one taking no time at y = floors["time_us"], one decade below the smallest positive value (1 B or
    1 us when none is positive); None when no op needs it. Also each axis' limits, whole decades
    around the values (and the floor) with a margin."""
    floors: dict = {}
    for key, values in (("bytes", [p["bytes"] for p in unplaced]),
                        ("time_us", [p["op_time_s"] * 1e6 for p in unplaced])):
        positive = [v for v in values if v > 0]
        lo = 10.0 ** math.floor(math.log10(min(positive))) if positive else 10.0
        hi = 10.0 ** math.ceil(math.log10(max(positive))) if positive else 100.0
        floors[key] = lo / 10 if len(positive) < len(values) else None
        floors[key + "_lim"] = ((floors[key] or lo) / 1.6, hi * 1.6)
    return floors


def _no_flop_xy(point: dict, floors: dict) -> tuple:
    """A no-FLOP point's place: one op's bytes and its time in us, or the floors for zeros."""
    x = point["bytes"] if point["bytes"] > 0 else floors["bytes"]
    y = point["op_time_s"] * 1e6 if point["op_time_s"] > 0 else floors["time_us"]
    return x, y


def _decade_ticks(lo: float, hi: float, floor: Optional[float], most: int = 8) -> list:
    """Powers of ten within [lo, hi], thinned to at most `most`, always keeping the floor."""
    first, last = math.ceil(math.log10(lo) - 1e-9), math.floor(math.log10(hi) + 1e-9)
    exponents = list(range(first, last + 1))
    stride = max(1, math.ceil(len(exponents) / most))
    ticks = [10.0 ** e for e in exponents[::-1][::stride]][::-1]  # thinned from the top decade down
    if floor is not None and not any(math.isclose(t, floor) for t in ticks):
        ticks = [floor] + [t for t in ticks if t > floor * 10 ** (stride - 0.5)]
    return ticks


def _no_flop_axes(axes, floors: dict, bw: float) -> None:
    """The no-FLOP row's log axes, shaded bands for the floors (ticked '0 B' and '0'), and the line
    time = bytes / bandwidth (no op is faster), labelled in its empty lower right corner."""
    import numpy as np
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    (xlo, xhi), (ylo, yhi) = floors["bytes_lim"], floors["time_us_lim"]
    xfloor, yfloor = floors["bytes"], floors["time_us"]
    grid = np.logspace(math.log10(xlo), math.log10(xhi), 100)
    for ax in axes:
        ax.plot(grid, grid / bw * 1e6, zorder=2, **BANDWIDTH_LINE)
        ax.text(0.98, 0.035, f"time = bytes / HBM {_si(bw)}B/s", transform=ax.transAxes, ha="right", va="bottom",
                fontsize=8, color=BANDWIDTH_LINE["color"])
        if xfloor is not None:
            ax.axvspan(xlo, xfloor * ZERO_BAND_WIDTH, color=ZERO_BAND_COLOR, zorder=0, lw=0)
        if yfloor is not None:
            ax.axhspan(ylo, yfloor * ZERO_BAND_WIDTH, color=ZERO_BAND_COLOR, zorder=0, lw=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(xlo, xhi)
        ax.set_ylim(ylo, yhi)
        ax.xaxis.set_major_locator(FixedLocator(_decade_ticks(xlo, xhi, xfloor)))
        ax.yaxis.set_major_locator(FixedLocator(_decade_ticks(ylo, yhi, yfloor, most=6)))
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(
            lambda v, _: "0 B" if xfloor is not None and math.isclose(v, xfloor) else f"{_si(v)}B"))
        ax.yaxis.set_major_formatter(FuncFormatter(
            lambda v, _: "0" if yfloor is not None and math.isclose(v, yfloor) else f"{v:g}"))
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xlabel("bytes one op moves (log)" + ("\nshaded, ticked 0 B: ops that move no bytes"
                                                      if xfloor is not None else ""))
    axes[0].set_ylabel("one op's time (µs, log)" + ("\nshaded, ticked 0: ops that take no time"
                                                    if yfloor is not None else ""))


def _roofline_legends(fig, panels: Sequence[dict], kinds_seen: list, dtype: str, calibrated: Optional[tuple],
                      bw_line: Optional[float]) -> float:
    """The kind (colour) legend above the spec (marker) and lines legend, under the panels; grows the
    figure by their height and returns it (inches)."""
    from matplotlib.lines import Line2D

    kind_handles = [Line2D([], [], ls="", marker="o", ms=8, mfc=KIND_COLORS.get(k, "#555555"), mec="black", label=k)
                    for k in kinds_seen]
    spec_handles = [Line2D([], [], ls="", marker=s["style"]["marker"], ms=8,
                           mfc="none" if s["style"].get("hollow") else "grey", mec="black",
                           mew=1.8 if s["style"].get("hollow") else 0.5,
                           label=s["name"] + (" (open markers)" if s["style"].get("hollow") else ""))
                    for s in panels[0]["specs"]]
    line_handles = [Line2D([], [], color="black", lw=1.8, label=f"roof ({dtype} matrix units)"),
                    Line2D([], [], color="black", lw=1.2, ls="--", label="roof (fp32 vector units)")]
    if calibrated is not None:
        line_handles.append(Line2D([], [], color="grey", lw=1.2, ls=":", label="calibrated roof"))
    if bw_line is not None:
        line_handles.append(Line2D([], [], label=f"time = bytes / {_si(bw_line)}B/s (lower row)", **BANDWIDTH_LINE))
    width, height = fig.get_size_inches()
    kcol = max(1, min(len(kind_handles), int(width / 1.45)))
    krows = math.ceil(len(kind_handles) / kcol)
    kcol = math.ceil(len(kind_handles) / krows)  # balanced rows
    lower = spec_handles + line_handles
    scol = max(1, min(len(lower), int(width / 3.2)))
    srows = math.ceil(len(lower) / scol)
    spec_h, kind_h = 0.3 + 0.25 * srows, 0.3 + 0.25 * krows
    height += spec_h + kind_h
    fig.set_size_inches(width, height)
    fig.legend(handles=lower, title="spec (marker; area = share of the step's time) and lines", loc="lower center",
               ncol=scol, bbox_to_anchor=(0.5, 0.0), frameon=False)
    fig.legend(handles=kind_handles, title="op kind (colour)", loc="lower center", ncol=kcol,
               bbox_to_anchor=(0.5, spec_h / height), frameon=False)
    return spec_h + kind_h


def _label_largest(ax, panel: dict, on_roofline: bool, xy) -> None:
    """Name the largest points this row draws (see _largest_spots) with point_label's text, each
    joined to its point by a thin leader line and placed by _place_label where it hides no other
    label, text or marker. Run after the layout: placement measures the drawn texts."""
    spots = _largest_spots(ax, panel, on_roofline, xy)
    if not spots:
        return
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    marks = [t.get_window_extent(renderer) for t in ax.texts] + _marker_boxes(ax)
    labels: list = []
    gap = LABEL_LINE_PT / (frame.height * 72 / ax.figure.dpi)  # one label's height, in axes fractions
    for x, y, fx, fy, text in spots:
        note = ax.annotate(text, xy=(x, y), xytext=(fx, fy), textcoords="axes fraction", va="center",
                           fontsize=LABEL_FONT_SIZE, zorder=6, annotation_clip=False,
                           bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "#bbbbbb", "lw": 0.4,
                                 "alpha": 0.9},
                           arrowprops={"arrowstyle": "-", "lw": 0.6, "color": "#444444", "shrinkA": 0,
                                       "shrinkB": 2})
        labels.append(_place_label(note, fx, fy, gap, frame, labels, marks, renderer))


def _largest_spots(ax, panel: dict, on_roofline: bool, xy) -> list:
    """(x, y, x and y in axes fractions, text) of each spec's LABELS_PER_SPEC largest points (by
    share of its step's time, flopsim.figure_data.largest) that this row draws, taken rank by rank
    across the specs, LABELS_PER_AXES at most; a point of the same op name and pass as one already taken within
    LABEL_OFFSET of it (the same op of another spec, drawn on top) is named once."""
    from flopsim.figure_data import largest, point_label

    to_axes = ax.transAxes.inverted()
    ranked = [largest(spec["points"], LABELS_PER_SPEC) for spec in panel["specs"]]
    spots, taken = [], []
    for rank in range(LABELS_PER_SPEC):
        for points in ranked:
            if rank >= len(points) or (points[rank]["intensity"] is not None) != on_roofline:
                continue
            p = points[rank]
            x, y = xy(p)
            fx, fy = to_axes.transform(ax.transData.transform((x, y)))
            if any(key == (p["name"], p["pass"]) and abs(fx - gx) <= LABEL_OFFSET and abs(fy - gy) <= LABEL_OFFSET
                   for key, gx, gy in taken):
                continue
            taken.append(((p["name"], p["pass"]), fx, fy))
            spots.append((x, y, fx, fy, point_label(p)))
    return spots[:LABELS_PER_AXES]


def _marker_boxes(ax) -> list:
    """Display-space boxes of every scatter marker drawn in the axes."""
    from matplotlib.transforms import Bbox

    boxes = []
    for coll in ax.collections:
        sizes = coll.get_sizes()
        for i, (px, py) in enumerate(ax.transData.transform(coll.get_offsets())):
            r = math.sqrt(sizes[i % len(sizes)]) / 2 * ax.figure.dpi / 72
            boxes.append(Bbox.from_bounds(px - r, py - r, 2 * r, 2 * r))
    return boxes


def _place_label(note, fx: float, fy: float, gap: float, frame, labels: list, marks: list, renderer):
    """Move the label to the first free slot: beside its point (to the right, or to the left in the
    right 40% of the axes), at the point's height or one label height above or below, then two ...,
    then the same on the other side; free means inside the axes and clear of the labels placed
    (and, on a first pass, of the other texts and the markers). The box it ends in."""
    from matplotlib.text import Text

    note.update_positions(renderer)  # sets the text's transform (axes fractions), which measuring needs
    right_first = fx <= 0.6
    slots = sorted(((abs(k) + 4 * side, -k, k, right_first != bool(side))
                    for k in range(-int(1 / gap), int(1 / gap) + 1) for side in (0, 1)))
    for obstacles in (labels + marks, labels):
        for *_, k, right in slots:
            ty = fy + k * gap
            if not 0 <= ty <= 1:
                continue
            note.set_position((fx + LABEL_OFFSET if right else fx - LABEL_OFFSET, ty))
            note.set_horizontalalignment("left" if right else "right")
            box = Text.get_window_extent(note, renderer).padded(1.5)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(other) for other in obstacles):
                return box
    note.set_position((fx + LABEL_OFFSET if right_first else fx - LABEL_OFFSET, fy))  # no free slot: beside it
    note.set_horizontalalignment("left" if right_first else "right")
    return Text.get_window_extent(note, renderer)


# -- 2. speedup vs knob ---------------------------------------------------------------------
def knob_figure(rows: Sequence[dict], phase_titles: Sequence[str], *, baseline: str, title: str = ""):
    """rows: [{"spec", "label", "x", "preset_x", "log_x", "style", "phases": [{"time_speedup",
    "flop_speedup"}, ...]}]; one row per knob, one column per phase."""
    import numpy as np
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    plt = _plt()
    nr, nc = len(rows), len(phase_titles)
    fig, axes = plt.subplots(nr, nc, figsize=(4.9 * nc + 0.8, 3.3 * nr + 1.2), dpi=DPI, squeeze=False)
    for i, row in enumerate(rows):
        x = np.asarray(row["x"], dtype=float)
        order = np.argsort(x)
        x = x[order]
        color = row["style"]["color"]
        values = [v for ph in row["phases"] for key in ("time_speedup", "flop_speedup") for v in ph[key]
                  if v and math.isfinite(v)]
        lo = min(values + [1.0]) / 1.25
        hi = max(values + [1.0]) * 1.25
        for j, ph in enumerate(row["phases"]):
            ax = axes[i][j]
            t = np.asarray(ph["time_speedup"], dtype=float)[order]
            f = np.asarray(ph["flop_speedup"], dtype=float)[order]
            ax.fill_between(x, t, f, where=f > t, color=color, alpha=0.13, lw=0, interpolate=True)
            ax.plot(x, f, ls="--", color=color, lw=1.6, marker=row["style"]["marker"], ms=3.5, mfc="white")
            ax.plot(x, t, ls="-", color=color, lw=2.2, marker=row["style"]["marker"], ms=4.5)
            ax.axhline(1.0, color="grey", lw=0.9)
            ax.axvline(row["preset_x"], color="black", lw=1.0, ls=":")
            if row["log_x"]:
                ax.set_xscale("log", base=2)
                from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

                ax.xaxis.set_major_locator(FixedLocator(list(x)))
                ax.xaxis.set_minor_locator(NullLocator())
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            _ratio_ticks(ax, lo, hi)
            ax.grid(True, which="major", alpha=0.3)
            ax.set_xlabel(row["label"], fontsize=9)
            if i == 0:
                ax.set_title(phase_titles[j])
            if j == 0:
                ax.set_ylabel(f"{row['spec']}\nspeedup over {baseline}", fontsize=9)
    handles = [Line2D([], [], color="black", lw=2.2, label="predicted time speedup"),
               Line2D([], [], color="black", lw=1.6, ls="--", label="FLOP speedup (baseline FLOPs / FLOPs)"),
               Patch(color="grey", alpha=0.3, label="gap: time speedup below FLOP speedup"),
               Line2D([], [], color="black", lw=1.0, ls=":", label="the spec's own setting"),
               Line2D([], [], color="grey", lw=0.9, label=f"1x = as fast as {baseline}")]
    ncol = 5 if nc >= 3 else 3
    legend_h = 0.3 * math.ceil(len(handles) / ncol) + 0.1
    height = 3.3 * nr + 0.8 + legend_h
    fig.set_size_inches(4.9 * nc + 0.8, height)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, frameon=False, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, legend_h / height, 1, 1 - 0.35 / height))
    return fig


# -- 3. memory ---------------------------------------------------------------------------
def memory_figure(settings: Sequence[dict], *, capacity_bytes: float, device: str, title: str = ""):
    """settings: [{"title", "bars": [{"name", "style", "components": {component: bytes},
    "max_batch"}]}]; one panel of stacked bars per setting."""
    import numpy as np
    from matplotlib.patches import Patch

    plt = _plt()
    n = len(settings)
    nbars = max(len(s["bars"]) for s in settings)
    fig, axes = plt.subplots(1, n, figsize=(max(4.8, 1.7 * nbars + 2.2) * n, 5.6), dpi=DPI, squeeze=False)
    axes = axes[0]
    cap = capacity_bytes / 1e9
    for ax, setting in zip(axes, settings):
        bars = setting["bars"]
        totals = [sum(b["components"].values()) / 1e9 for b in bars]
        top = max(totals) if totals else 0.0
        on_scale = top >= 0.2 * cap
        ylim = max(cap, top) * 1.18 if on_scale else top * 1.45
        x = np.arange(len(bars))
        bottom = np.zeros(len(bars))
        for comp in MEMORY_COMPONENTS:
            h = np.array([b["components"].get(comp, 0.0) / 1e9 for b in bars])
            if not h.any():
                continue
            ax.bar(x, h, bottom=bottom, width=0.6, color=MEMORY_COLORS[comp], edgecolor="white", lw=0.5)
            bottom += h
        for xi, b, tot in zip(x, bars, totals):
            fits = tot <= cap
            mb = b.get("max_batch")
            share = tot / cap
            used = f"{share:.3g}x the device" if not fits else f"{100 * share:.2g}% of the device"
            extra = "does not fit" if not fits else (f"max batch {mb:,}" if mb else "")
            ax.text(xi, tot + ylim * 0.012, f"{tot:.3g} GB\n{used}\n{extra}",
                    ha="center", va="bottom", fontsize=8, color="darkred" if not fits else "black")
        if on_scale:
            ax.axhline(cap, color="red", ls="--", lw=1.4)
            ax.annotate(f"{cap:.3g} GB", xy=(1.0, cap), xycoords=("axes fraction", "data"), xytext=(3, 0),
                        textcoords="offset points", color="red", ha="left", va="center", fontsize=8.5)
        else:
            ax.text(0.99, 0.985, f"{device} capacity {cap:.3g} GB: above this axis\n"
                                 f"({cap / top:.0f}x the largest bar)", transform=ax.transAxes, color="red",
                    ha="right", va="top", fontsize=8.5)
        ax.set_ylim(0, ylim)
        ax.set_xticks(x)
        ax.set_xticklabels([b["name"] for b in bars], rotation=0 if nbars <= 3 else 15,
                           ha="center" if nbars <= 3 else "right")
        for lab, b in zip(ax.get_xticklabels(), bars):
            lab.set_color(b["style"]["color"])
        ax.set_xlim(-0.6, len(bars) - 0.4)
        ax.set_ylabel("device memory (GB = 1e9 bytes)")
        ax.set_title(setting["title"], fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    present = [c for c in MEMORY_COMPONENTS
               if any(b["components"].get(c, 0) > 0 for s in settings for b in s["bars"])]
    from matplotlib.lines import Line2D

    handles = [Patch(color=MEMORY_COLORS[c], label=MEMORY_LABELS[c]) for c in present]
    handles.append(Line2D([], [], color="red", ls="--", lw=1.4, label=f"{device} capacity ({cap:.3g} GB)"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    return fig


# -- saving ---------------------------------------------------------------------------------
def save(fig, stem: Path, formats: Sequence[str] = ("png",)) -> list[str]:
    """Write `fig` as stem.png / stem.svg (atomically) and close it; the file names written.
    PNGs are reduced to a 256-colour palette (a third of the size, no visible change)."""
    from flopsim.outputs import write_atomic

    plt = _plt()
    stem = Path(stem)
    names = []
    try:
        for fmt in formats:
            buf = io.BytesIO()
            if fmt == "png":
                fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
                data = _palette_png(buf.getvalue())
            else:
                fig.savefig(buf, format="svg", facecolor="white", metadata={"Date": None})
                data = buf.getvalue()
            path = stem.with_suffix(f".{fmt}")
            write_atomic(path, data)
            names.append(path.name)
    finally:
        plt.close(fig)
    return names


def _palette_png(data: bytes) -> bytes:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with matplotlib
        return data
    img = Image.open(io.BytesIO(data)).convert("RGB")
    out = io.BytesIO()
    # maximum coverage keeps every flat colour within a few levels of the original (median cut can
    # merge a rare marker colour into a common one)
    img.quantize(colors=256, method=Image.Quantize.MAXCOVERAGE, dither=Image.Dither.NONE).save(
        out, format="PNG", optimize=True)
    return out.getvalue() if len(out.getvalue()) < len(data) else data


def shrink_png(path: Path) -> None:
    """Reduce a PNG written elsewhere (e.g. flopsim.scaling.plot) to a palette, in place, atomically."""
    from flopsim.outputs import write_atomic

    path = Path(path)
    data = path.read_bytes()
    smaller = _palette_png(data)
    if len(smaller) < len(data):
        write_atomic(path, smaller)
