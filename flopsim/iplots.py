"""Interactive figures (plotly) for the pages of flopsim.webpage: the
report's roofline, speedup and tokens/s against each knob, memory, decode
batch sweep and isoFLOP curves; the plan's time split; validation's
predicted-against-measured scatter.

Conventions: the functions take the same plain data as flopsim.plots (op
points from flopsim.figure_data, lists of numbers) and do no cost
arithmetic of their own, only unit changes for the axes; every marker's
hover names the op or row and gives its numbers; a legend entry toggles its
series in every panel (one legend group per series); figures carry
TEMPLATE, so their JSON does not depend on plotly's default theme. Units:
intensity in FLOP/byte, throughput in TFLOP/s, one op's time in
microseconds, memory in GB (1e9 bytes). plotly is imported inside the
functions.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from flopsim.units import human, human_time
from flopsim.figure_data import layer_ranges, point_label
from flopsim.plots import KIND_COLORS, MEMORY_COLORS, MEMORY_COMPONENTS, MEMORY_LABELS

SYMBOLS = {"o": "circle", "s": "square", "^": "triangle-up", "D": "diamond", "v": "triangle-down",
           "P": "cross", "X": "x"}
FONT = {"family": "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", "size": 12, "color": "#222"}
AXIS = {"showgrid": True, "gridcolor": "#e6e6e6", "zeroline": False, "linecolor": "#888", "mirror": True,
        "automargin": True, "ticks": "outside"}
POINT_HOVER = ("<b>%{customdata[0]}</b><br>%{customdata[1]}<br>FLOPs %{customdata[2]} · bytes %{customdata[3]}"
               "<br>time %{customdata[4]}<br>bound: %{customdata[5]}<extra>%{fullData.name}</extra>")


def template():
    import plotly.graph_objects as go

    return go.layout.Template(layout={"font": FONT, "paper_bgcolor": "white", "plot_bgcolor": "white",
                                      "xaxis": AXIS, "yaxis": AXIS, "hovermode": "closest",
                                      "legend": {"bgcolor": "rgba(255,255,255,0.8)"},
                                      "margin": {"l": 70, "r": 30, "t": 80, "b": 60}})


def _symbol(style: dict) -> str:
    base = SYMBOLS.get(style.get("marker", "o"), "circle")
    return base + "-open" if style.get("hollow") else base


def _point_custom(p: dict) -> list:
    per_op = human_time(p["op_time_s"]) + (f" per op x {p['count']}" if p["count"] > 1 else "")
    layers = f" (layers {layer_ranges(p['layers'])})" if p["layers"] else ""
    return [point_label(p), f"{p['kind']}, {p['pass']} pass{layers}", human(p["all_flops"]),
            human(p["bytes"], "B"), f"{per_op} = {100 * p['share']:.1f}% of the step", p["bound"]]


# -- roofline -------------------------------------------------------------------------------------
def roofline(panels: Sequence[dict], *, peak_flops_per_s: float, vector_flops_per_s: float,
             bytes_per_s: float, dtype: str, calibrated: Optional[tuple] = None, title: str = ""):
    """panels: [{"title", "specs": [{"name", "style", "points": figure_data.op_points(...)}]}].
    Upper row: ops with FLOPs on the log-log roofline; lower row: ops with no
    FLOPs (or no bytes), one op's bytes against its time, with the bandwidth line."""
    from plotly.subplots import make_subplots

    n = len(panels)
    fig = make_subplots(rows=2, cols=n, row_heights=[0.66, 0.34], vertical_spacing=0.14,
                        horizontal_spacing=0.06, subplot_titles=[p["title"] for p in panels]
                        + ["ops with no FLOPs" for _ in panels])
    seen: set = set()
    placed = [p for panel in panels for s in panel["specs"] for p in s["points"] if p["intensity"] is not None]
    unplaced = [p for panel in panels for s in panel["specs"] for p in s["points"] if p["intensity"] is None]
    for col, panel in enumerate(panels, start=1):
        for spec in panel["specs"]:
            _roofline_points(fig, spec, col, seen)
    _roofs(fig, n, placed, peak_flops_per_s, vector_flops_per_s, bytes_per_s, dtype, calibrated)
    _bandwidth_line(fig, n, unplaced, bytes_per_s)
    for col in range(1, n + 1):
        fig.update_xaxes(type="log", title_text="arithmetic intensity (FLOP/byte)", row=1, col=col)
        fig.update_yaxes(type="log", row=1, col=col, matches="y")
        fig.update_xaxes(type="log", title_text="bytes one op moves (no bytes: at 1 B)", row=2, col=col)
        fig.update_yaxes(type="log", row=2, col=col, matches="y" + str(n + 1))
    fig.update_yaxes(title_text="achieved TFLOP/s", row=1, col=1)
    fig.update_yaxes(title_text="one op's time (us)", row=2, col=1)
    fig.update_layout(template=template(), title={"text": title, "x": 0.01}, height=980,
                      legend={"groupclick": "togglegroup", "font": {"size": 11}, "orientation": "h",
                              "yanchor": "top", "y": -0.09, "x": 0},
                      margin={"b": 230})
    return fig


def _roofline_points(fig, spec: dict, col: int, seen: set) -> None:
    import plotly.graph_objects as go

    by_kind: dict = {}
    for p in spec["points"]:
        by_kind.setdefault(p["kind"], []).append(p)
    for kind, pts in sorted(by_kind.items()):
        group = f"{spec['name']}: {kind}"
        for row, chosen in ((1, [p for p in pts if p["intensity"] is not None]),
                            (2, [p for p in pts if p["intensity"] is None])):
            if not chosen:
                continue
            x = [p["intensity"] if row == 1 else max(p["bytes"], 1.0) for p in chosen]
            y = [p["tflops"] if row == 1 else p["op_time_s"] * 1e6 for p in chosen]
            hollow = spec["style"].get("hollow", False)
            color = KIND_COLORS.get(kind, "#555555")
            fig.add_trace(go.Scatter(
                x=x, y=y, mode="markers", name=group, legendgroup=group, showlegend=group not in seen,
                customdata=[_point_custom(p) for p in chosen], hovertemplate=POINT_HOVER,
                marker={"symbol": _symbol(spec["style"]), "color": color,
                        "size": [7 + 46 * math.sqrt(p["share"]) for p in chosen],
                        "line": {"color": color if hollow else "black", "width": 2 if hollow else 0.5},
                        "opacity": 0.85}), row=row, col=col)
            seen.add(group)


def _roofs(fig, n: int, placed: list, peak: float, vector: float, bw: float, dtype: str,
           calibrated: Optional[tuple]) -> None:
    import plotly.graph_objects as go

    ridge = peak / bw
    xs = [p["intensity"] for p in placed] + [ridge]
    lo, hi = min(xs) / 4, max(xs) * 4
    roofs = [(f"roof: {dtype} matrix peak {human(peak, 'FLOP/s')}, HBM {human(bw, 'B/s')}", peak, 1.0,
              {"color": "black", "width": 2}),
             (f"roof: fp32 vector {human(vector, 'FLOP/s')}", vector, 1.0, {"color": "black", "width": 1.3,
                                                                              "dash": "dash"})]
    if calibrated is not None:
        roofs.append((f"calibrated roof (matmul x{calibrated[0]:.2f}, memory x{calibrated[1]:.2f})",
                      peak * calibrated[0], calibrated[1], {"color": "grey", "width": 1.3, "dash": "dot"}))
    for name, top, mem_eff, line in roofs:
        knee = top / (bw * mem_eff)  # min(top, bandwidth x intensity) is straight on log axes either side of it
        grid = [lo, min(max(knee, lo), hi), hi]
        for col in range(1, n + 1):
            fig.add_trace(go.Scatter(x=grid, y=[min(top, bw * mem_eff * x) / 1e12 for x in grid], mode="lines",
                                     name=name, legendgroup=name, showlegend=col == 1, line=line,
                                     hovertemplate="%{x:.3g} FLOP/B: %{y:.4g} TFLOP/s<extra>" + name + "</extra>"),
                          row=1, col=col)


def _bandwidth_line(fig, n: int, unplaced: list, bw: float) -> None:
    import plotly.graph_objects as go

    if not unplaced:
        return
    xs = [max(p["bytes"], 1.0) for p in unplaced]
    grid = [min(xs) / 2, max(xs) * 2]  # time = bytes / bandwidth: a straight line on log axes
    name = f"bytes / HBM bandwidth ({human(bw, 'B/s')})"
    for col in range(1, n + 1):
        fig.add_trace(go.Scatter(x=grid, y=[x / bw * 1e6 for x in grid], mode="lines", name=name, legendgroup=name,
                                 showlegend=col == 1, line={"color": "black", "width": 1.2, "dash": "dash"},
                                 hovertemplate="%{x:.3s}B: %{y:.3g} us<extra>" + name + "</extra>"), row=2, col=col)


# -- lines against a knob or the batch -------------------------------------------------------------
def lines(panels: Sequence[dict], *, y_title: str, x_title: str = "", title: str = "", log_x: bool = False,
          log_y: bool = False, height: int = 420):
    """panels: [{"title", "x_title"?, "log_x"?, "series": [{"name", "x", "y", "style", "dash"?, "hover"?,
    "text"?, "mark"?: index of a point to ring (a spec's own setting)}], "hline"?: (y, label)}]:
    one panel per entry, one line per series; a series' legend entry toggles it in every panel."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p["title"] for p in panels],
                        horizontal_spacing=0.07)
    seen: set = set()
    for col, panel in enumerate(panels, start=1):
        for s in panel["series"]:
            style = s["style"]
            hover = s.get("hover", "%{x:.4g}: %{y:.4g}")
            fig.add_trace(go.Scatter(
                x=list(s["x"]), y=list(s["y"]), mode="lines+markers", name=s["name"], legendgroup=s["name"],
                showlegend=s["name"] not in seen, text=s.get("text"), hovertemplate=hover + f"<extra>{s['name']}</extra>",
                line={"color": style["color"], "width": 2, "dash": s.get("dash", "solid")},
                marker={"symbol": _symbol(style), "color": style["color"], "size": 7}), row=1, col=col)
            seen.add(s["name"])
            if s.get("mark") is not None:
                i = s["mark"]
                fig.add_trace(go.Scatter(x=[s["x"][i]], y=[s["y"][i]], mode="markers", legendgroup=s["name"],
                                         showlegend=False, hoverinfo="skip",
                                         marker={"symbol": "circle-open", "size": 16, "color": style["color"],
                                                 "line": {"width": 2}}), row=1, col=col)
        if panel.get("hline") is not None:
            fig.add_hline(y=panel["hline"][0], line={"color": "grey", "width": 1, "dash": "dot"},
                          annotation_text=panel["hline"][1], annotation_position="top left", row=1, col=col)
        ticks = panel.get("x_ticks")
        fig.update_xaxes(type="log" if panel.get("log_x", log_x) else "linear",
                         title_text=_wrap(panel.get("x_title", x_title)), title_font_size=11, row=1, col=col,
                         tickvals=list(ticks) if ticks else None, ticktext=[f"{t:g}" for t in ticks] if ticks else None)
        fig.update_yaxes(type="log" if log_y else "linear", range=_log_range(panel) if log_y else None,
                         row=1, col=col)
    fig.update_yaxes(title_text=y_title, row=1, col=1)
    fig.update_layout(template=template(), title={"text": title, "x": 0.01}, height=height)
    return fig


def _wrap(text: str, width: int = 38) -> str:
    """An axis title on two lines when long: broken before its first parenthesis, else at a space."""
    if len(text) <= width:
        return text
    cut = text.find(" (")
    if cut < 8:
        cut = text.rfind(" ", 0, width)
    return text if cut < 0 else text[:cut] + "<br>" + text[cut + 1:]


def _log_range(panel: dict) -> list:
    """A log axis' range holding every finite positive value of the panel and its line, with a margin."""
    values = [v for s in panel["series"] for v in s["y"] if v is not None and math.isfinite(v) and v > 0]
    if panel.get("hline") is not None:
        values.append(panel["hline"][0])
    lo, hi = min(values), max(values)
    return [math.log10(lo) - 0.06, math.log10(hi) + 0.06]


# -- memory ---------------------------------------------------------------------------------------
def memory(settings: Sequence[dict], *, capacity_bytes: float, device: str, title: str = ""):
    """settings: as flopsim.plots.memory_figure's; stacked bars per setting, the device's capacity dashed."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(settings), subplot_titles=[s["title"] for s in settings])
    shown: set = set()
    for col, setting in enumerate(settings, start=1):
        names = [b["name"] for b in setting["bars"]]
        for comp in MEMORY_COMPONENTS:
            gb = [b["components"].get(comp, 0.0) / 1e9 for b in setting["bars"]]
            if not any(gb):
                continue
            label = MEMORY_LABELS[comp]
            fig.add_trace(go.Bar(x=names, y=gb, name=label, legendgroup=label, showlegend=label not in shown,
                                 marker_color=MEMORY_COLORS[comp],
                                 hovertemplate="%{x}: %{y:.4g} GB<extra>" + label + "</extra>"), row=1, col=col)
            shown.add(label)
        top = max(sum(b["components"].values()) for b in setting["bars"]) / 1e9
        cap = capacity_bytes / 1e9
        if top >= 0.2 * cap:  # as the static figure: the capacity line where it does not flatten the bars
            fig.add_hline(y=cap, line={"color": "red", "dash": "dash", "width": 1.5},
                          annotation_text=f"{device} {cap:.3g} GB", row=1, col=col)
        else:
            fig.add_annotation(text=f"{device} capacity {cap:.3g} GB: above this axis ({cap / top:.0f}x the "
                                    f"largest bar)", x=1, y=1, xref="x domain" if col == 1 else f"x{col} domain",
                               yref="y domain" if col == 1 else f"y{col} domain", xanchor="right",
                               yanchor="top", showarrow=False, font={"color": "red", "size": 11})
    fig.update_layout(template=template(), barmode="stack", title={"text": title, "x": 0.01}, height=460)
    fig.update_yaxes(title_text="device memory (GB)", row=1, col=1)
    return fig


# -- bars and scatter for plans and validation ---------------------------------------------------------
def stacked_bars(categories: Sequence[str], parts: dict, *, y_title: str, title: str = "", horizontal=False,
                 height: int = 420, colors: Optional[dict] = None):
    """parts: {part name: [value per category]}: one stacked bar per category."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, (name, values) in enumerate(parts.items()):
        color = (colors or {}).get(name)
        kw = {"y": list(categories), "x": list(values), "orientation": "h"} if horizontal else \
            {"x": list(categories), "y": list(values)}
        fig.add_trace(go.Bar(name=name, marker_color=color, **kw,
                             hovertemplate=("%{y}: %{x:.4g}" if horizontal else "%{x}: %{y:.4g}")
                             + f"<extra>{name}</extra>"))
    fig.update_layout(template=template(), barmode="stack", title={"text": title, "x": 0.01}, height=height,
                      legend={"orientation": "h", "yanchor": "top", "y": -0.35, "x": 0, "traceorder": "normal"})
    if horizontal:
        fig.update_xaxes(title_text=y_title)
    else:
        fig.update_yaxes(title_text=y_title)
    return fig


def measured_vs_predicted(groups: Sequence[dict], *, unit: str, title: str = "", log: bool = True):
    """groups: [{"name", "color", "measured": [...], "predicted": [...], "labels": [...]}]; the
    diagonal is a perfect prediction, the band +-10%."""
    import plotly.graph_objects as go

    fig = go.Figure()
    values = [v for g in groups for v in list(g["measured"]) + list(g["predicted"]) if v and v > 0]
    if values:
        lo, hi = min(values) / 1.5, max(values) * 1.5
        for factor, dash, name in ((1.0, "solid", "predicted = measured"), (1.1, "dot", "+-10%"),
                                   (1 / 1.1, "dot", "+-10%")):
            fig.add_trace(go.Scatter(x=[lo, hi], y=[lo * factor, hi * factor], mode="lines", name=name,
                                     legendgroup=name, showlegend=factor <= 1.0 or name != "+-10%",
                                     line={"color": "grey", "dash": dash, "width": 1}, hoverinfo="skip"))
    for g in groups:
        ratio = [p / m if m else float("nan") for m, p in zip(g["measured"], g["predicted"])]
        fig.add_trace(go.Scatter(x=list(g["measured"]), y=list(g["predicted"]), mode="markers", name=g["name"],
                                 text=list(g["labels"]), customdata=ratio, marker={"color": g["color"], "size": 9},
                                 hovertemplate="<b>%{text}</b><br>measured %{x:.4g} " + unit + "<br>predicted %{y:.4g} "
                                 + unit + "<br>predicted / measured %{customdata:.3f}<extra>" + g["name"] + "</extra>"))
    axis = {"type": "log" if log else "linear"}
    fig.update_layout(template=template(), title={"text": title, "x": 0.01}, height=560)
    fig.update_xaxes(title_text=f"measured ({unit})", **axis)
    fig.update_yaxes(title_text=f"predicted ({unit})", **axis)
    return fig
