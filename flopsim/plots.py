"""Report figures (flopsim.report): roofline, speedup vs knob, memory bars.

matplotlib is imported inside the functions, with the Agg backend, so that
neither the core nor `flopsim --help` loads it. The functions take plain
data (lists and dicts of numbers) and return a Figure; `save` writes it as
PNG and/or SVG, each file atomically (flopsim.cli.output.write_atomic).
Conventions: log-log roofline in FLOP/byte and TFLOP/s; ratios on log axes
(2x and 0.5x equally far from 1); memory in GB (1e9 bytes, as datasheets).
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
def roofline_figure(panels: Sequence[dict], *, peak_flops_per_s: float, vector_flops_per_s: float,
                    bytes_per_s: float, dtype: str, calibrated: Optional[tuple] = None, title: str = ""):
    """panels: [{"title", "specs": [{"name", "style": {"color", "marker"}, "ops": [{"kind",
    "all_flops", "bytes", "time_s"}]}]}]; one log-log panel per entry, shared axes."""
    import numpy as np
    from matplotlib.lines import Line2D

    plt = _plt()
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(max(5.6 * n + 0.6, 9.0), 6.2), dpi=DPI, sharex=True, sharey=True,
                             squeeze=False)
    axes = axes[0]
    xs_all, ys_all, kinds_seen = [], [], []
    for ax, panel in zip(axes, panels):
        hidden_s, total_s = 0.0, 0.0
        for spec in panel["specs"]:
            step = sum(op["time_s"] for op in spec["ops"])
            total_s += step
            points: dict = {}
            for op in spec["ops"]:
                if op["time_s"] <= 0:
                    continue
                if op["all_flops"] <= 0 or op["bytes"] <= 0:
                    hidden_s += op["time_s"]
                    continue
                x = op["all_flops"] / op["bytes"]
                y = op["all_flops"] / op["time_s"] / 1e12
                key = (op["kind"], round(math.log10(x), 2), round(math.log10(y), 2))
                if key in points:
                    points[key][2] += op["time_s"]
                else:
                    points[key] = [x, y, op["time_s"]]
            by_kind: dict = {}
            for (kind, _, _), (x, y, t) in points.items():
                by_kind.setdefault(kind, []).append((x, y, t / step if step else 0.0))
            hollow = spec["style"].get("hollow", False)
            for kind, pts in sorted(by_kind.items()):
                if kind not in kinds_seen:
                    kinds_seen.append(kind)
                arr = np.array(pts)
                color = KIND_COLORS.get(kind, "#555555")
                if hollow:  # the baseline: open markers, so that the conditional spec's show through
                    ax.scatter(arr[:, 0], arr[:, 1], s=14 + 900 * arr[:, 2], marker=spec["style"]["marker"],
                               facecolors="none", edgecolors=color, linewidths=1.8, zorder=4)
                else:
                    ax.scatter(arr[:, 0], arr[:, 1], s=14 + 900 * arr[:, 2], marker=spec["style"]["marker"],
                               c=color, edgecolors="black", linewidths=0.5, zorder=3)
                xs_all += list(arr[:, 0])
                ys_all += list(arr[:, 1])
        share = hidden_s / total_s if total_s else 0.0
        ax.set_title(f"{panel['title']}\n(ops with no FLOPs, not shown: {100 * share:.1f}% of the time)")
    ridge = peak_flops_per_s / bytes_per_s
    xmin = min(xs_all + [ridge]) / 4 if xs_all else 0.1
    xmax = max(xs_all + [ridge]) * 4 if xs_all else 1e4
    ymin = min(ys_all) / 4 if ys_all else 1e-3
    ymax = peak_flops_per_s / 1e12 * 12
    grid = np.logspace(math.log10(xmin), math.log10(xmax), 200)
    for ax in axes:
        ax.plot(grid, np.minimum(peak_flops_per_s, bytes_per_s * grid) / 1e12, color="black", lw=1.8, zorder=2)
        ax.plot(grid, np.minimum(vector_flops_per_s, bytes_per_s * grid) / 1e12, color="black", lw=1.2, ls="--",
                zorder=2)
        if calibrated is not None:
            ce, me = calibrated
            ax.plot(grid, np.minimum(peak_flops_per_s * ce, bytes_per_s * me * grid) / 1e12, color="grey", lw=1.2,
                    ls=":", zorder=2)
        ax.axvline(ridge, color="grey", lw=0.8, ls="-.", zorder=1)
        ax.text(ridge * 1.1, ymin * 1.6, f"ridge\n{ridge:.0f} FLOP/B", fontsize=8, color="dimgrey", va="bottom")
        # labels where no op can sit: well above the matrix roof, under the vector roof's right end
        ax.text(xmax / 1.2, peak_flops_per_s / 1e12 * 2.6, f"{dtype} peak {_si(peak_flops_per_s)}FLOP/s",
                fontsize=8, ha="right", va="bottom")
        ax.text(xmax / 1.2, vector_flops_per_s / 1e12 / 1.2, f"fp32 vector {_si(vector_flops_per_s)}FLOP/s",
                fontsize=8, ha="right", va="top")
        # above the bandwidth slope, where no op can be
        x_bw = math.sqrt(max(xmin, ymin * 1e12 / bytes_per_s) * ridge) / 3
        ax.text(x_bw, bytes_per_s * x_bw / 1e12 * 2.2, f"HBM {_si(bytes_per_s)}B/s", fontsize=8,
                ha="right", va="bottom", color="black")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(xmin, xmax)
        ax.set_ylim(ymin, ymax)
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    axes[0].set_ylabel("achieved throughput (TFLOP/s)")
    kind_handles = [Line2D([], [], ls="", marker="o", ms=8, mfc=KIND_COLORS.get(k, "#555555"), mec="black", label=k)
                    for k in kinds_seen]
    spec_handles = [Line2D([], [], ls="", marker=s["style"]["marker"], ms=8,
                           mfc="none" if s["style"].get("hollow") else "grey", mec="black",
                           mew=1.8 if s["style"].get("hollow") else 0.5,
                           label=s["name"] + (" (open markers)" if s["style"].get("hollow") else ""))
                    for s in panels[0]["specs"]]
    roof_handles = [Line2D([], [], color="black", lw=1.8, label=f"roof ({dtype} matrix units)"),
                    Line2D([], [], color="black", lw=1.2, ls="--", label="roof (fp32 vector units)")]
    if calibrated is not None:
        roof_handles.append(Line2D([], [], color="grey", lw=1.2, ls=":", label="calibrated roof"))
    width = fig.get_size_inches()[0]
    kcol = max(1, min(len(kind_handles), int(width / 1.45)))
    krows = math.ceil(len(kind_handles) / kcol)
    kcol = math.ceil(len(kind_handles) / krows)  # balanced rows
    lower = spec_handles + roof_handles
    scol = max(1, min(len(lower), int(width / 3.0)))
    srows = math.ceil(len(lower) / scol)
    spec_h, kind_h = 0.3 + 0.25 * srows, 0.3 + 0.25 * krows
    height = 6.2 + spec_h + kind_h
    fig.set_size_inches(width, height)
    fig.legend(handles=lower, title="spec (marker; area = share of the step's time) and roofs", loc="lower center",
               ncol=scol, bbox_to_anchor=(0.5, 0.0), frameon=False)
    fig.legend(handles=kind_handles, title="op kind (colour)", loc="lower center", ncol=kcol,
               bbox_to_anchor=(0.5, spec_h / height), frameon=False)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, (spec_h + kind_h) / height, 1, 1 - 0.1 / height))
    return fig


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
