"""The report's interactive page (index.html, flopsim.webpage): the
report's document blocks (flopsim.report.document) with every figure as a
plotly figure (flopsim.iplots) instead of a static image, and summary.csv
in full at the end.

Conventions: the figures read the data the static figures read
(flopsim.report.roofline_panels, knob_rows, memory_settings, the batch
sweep and the isoFLOP results); nothing is computed here but unit changes
and the layout of series. Knob and batch panels are one per phase; the
isoFLOP colours go from the smallest budget (dark) to the largest.
"""

from __future__ import annotations

from flopsim import iplots
from flopsim.units import human, human_time

BUDGET_COLORS = ["#440154", "#31688e", "#35b779", "#90d743", "#fde725"]
BATCH_TICKS = (1, 4, 16, 64, 256, 1024)
FAMILY_DASH = {"dense": "solid", "mod": "dash", "moe": "dot", "mode": "dashdot"}


def group_figures(rep, g, panels, roofs, rows, settings, memory_title) -> dict:
    """The group's interactive figures, keyed as the static ones (and knob_throughput, batch)."""
    out = {"roofline": iplots.roofline(panels, **roofs),
           "memory": iplots.memory(settings, capacity_bytes=rep.hw.memory_capacity_bytes, device=rep.hw.name,
                                   title=memory_title),
           "batch": batch_figure(rep, g)}
    if rows:
        out["knobs"] = knob_figure(rep, g, rows)
        out["knob_throughput"] = knob_throughput_figure(rep, g, rows)
    return out


def _knob_panels(g, row: dict) -> list:
    return [{"title": f"{phase}: {g.shape(phase)}", "x_title": row["label"], "log_x": row["log_x"],
             "series": [], "phase": phase, "data": ph} for phase, ph in zip(g.phases, row["phases"])]


def knob_figure(rep, g, rows: list):
    """Time and FLOP speedup over the baseline against each knob (one figure row per knob, stacked)."""
    from plotly.subplots import make_subplots

    figs = []
    for row in rows:
        panels = _knob_panels(g, row)
        own = row["x"].index(row["preset_x"]) if row["preset_x"] in row["x"] else None
        for p in panels:
            p["series"] = [
                {"name": f"{row['spec']} ({row['knob']}): time speedup", "x": row["x"], "y": p["data"]["time_speedup"],
                 "style": row["style"], "mark": own, "hover": f"{row['knob']} %{{x:.4g}}: %{{y:.3f}}x faster"},
                {"name": f"{row['spec']} ({row['knob']}): FLOP speedup", "x": row["x"], "y": p["data"]["flop_speedup"],
                 "style": row["style"], "dash": "dash", "hover": f"{row['knob']} %{{x:.4g}}: %{{y:.3f}}x fewer FLOPs"}]
            p["hline"] = (1.0, f"as fast as {g.baseline.name}")
        figs.append(iplots.lines(panels, y_title=f"{row['spec']}: speedup over {g.baseline.name}", log_y=True,
                                 title=f"{row['spec']}: {row['knob']}"))
    return _stack(figs, make_subplots) if len(figs) > 1 else figs[0]


def knob_throughput_figure(rep, g, rows: list):
    """Tokens/s of one step against each knob, the baseline's as a dotted line."""
    from plotly.subplots import make_subplots

    figs = []
    for row in rows:
        panels = _knob_panels(g, row)
        for p in panels:
            p["series"] = [{"name": f"{row['spec']} ({row['knob']}): tokens/s", "x": row["x"], "y": p["data"]["tokens_per_s"],
                            "style": row["style"],
                            "mark": row["x"].index(row["preset_x"]) if row["preset_x"] in row["x"] else None,
                            "hover": f"{row['knob']} %{{x:.4g}}: %{{y:.4s}} tokens/s"}]
            p["hline"] = (p["data"]["baseline_tokens_per_s"], f"{g.baseline.name}")
        figs.append(iplots.lines(panels, y_title=f"tokens/s on one {rep.hw.name}", log_y=True,
                                 title=f"{row['spec']}: tokens/s against {row['knob']}"))
    return _stack(figs, make_subplots) if len(figs) > 1 else figs[0]


def _stack(figs: list, make_subplots):
    """One figure holding several one-row figures, one above the other (axes, titles and lines kept)."""
    import plotly.graph_objects as go

    cols = max(len([k for k in f.layout if k.startswith("xaxis")]) for f in figs)
    fig = make_subplots(rows=len(figs), cols=cols, vertical_spacing=0.12 / len(figs) * 2,
                        subplot_titles=[a.text for f in figs for a in f.layout.annotations if a.yref == "paper"
                                        and a.text and a.y > 0.9])
    for r, f in enumerate(figs, start=1):
        axis_of = {}
        for c in range(1, cols + 1):
            suffix = "" if c == 1 else str(c)
            axis_of[f"x{suffix}"] = c
        for trace in f.data:
            fig.add_trace(go.Scatter(trace), row=r, col=axis_of.get(trace.xaxis or "x", 1))
        for c in range(1, cols + 1):
            suffix = "" if c == 1 else str(c)
            xa, ya = f.layout[f"xaxis{suffix}"], f.layout[f"yaxis{suffix}"]
            fig.update_xaxes(type=xa.type, title_text=xa.title.text, row=r, col=c)
            fig.update_yaxes(type=ya.type, title_text=ya.title.text, row=r, col=c)
        for shape in f.layout.shapes:
            c = int((shape.xref or "x").replace(" domain", "").lstrip("x") or 1)
            fig.add_hline(y=shape.y0, line=shape.line, row=r, col=c)
    fig.update_layout(template=iplots.template(), height=380 * len(figs) + 80)
    return fig


def batch_figure(rep, g):
    """Tokens/s and time per step of the serving phase against the batch, one line per spec."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=["tokens/s", "time per step"], horizontal_spacing=0.09)
    for name, sw in g.batch_sweep.items():
        style = rep.styles[name]
        hover = [f"batch {b}: {human(t, 'tokens/s')}, {human_time(s)} per step"
                 + ("" if fits else f" (does not fit: largest batch {sw['max_batch']})")
                 for b, t, s, fits in zip(sw["batch"], sw["tokens_per_s"], sw["time_s"], sw["fits"])]
        symbols = [iplots._symbol({**style, "hollow": not fits}) for fits in sw["fits"]]
        for col, ys in ((1, sw["tokens_per_s"]), (2, [t * 1e3 for t in sw["time_s"]])):
            fig.add_trace(go.Scatter(x=sw["batch"], y=ys, mode="lines+markers", name=name, legendgroup=name,
                                     showlegend=col == 1, text=hover, hovertemplate="%{text}<extra>" + name + "</extra>",
                                     line={"color": style["color"], "width": 2},
                                     marker={"symbol": symbols, "size": 9, "color": style["color"]}),
                          row=1, col=col)
    phase = next(iter(g.batch_sweep.values()))["phase"]
    fig.update_xaxes(type="log", title_text="batch (sequences)", tickvals=list(BATCH_TICKS),
                     ticktext=[str(b) for b in BATCH_TICKS])
    fig.update_yaxes(type="log")
    fig.update_yaxes(title_text=f"{phase} tokens/s on one {rep.hw.name}", row=1, col=1)
    fig.update_yaxes(title_text="ms per step", row=1, col=2)
    fig.update_layout(template=iplots.template(), height=440,
                      title={"text": f"Serving ({phase}) against the batch, {g.title}", "x": 0.01})
    return fig


def _isoflop_traces(fig, curves: dict, optima: dict, budgets: list, x_key: str, x_scale: float, x_name: str):
    import plotly.graph_objects as go

    order = {b: i for i, b in enumerate(sorted(budgets))}
    for (fam, b), rows in sorted(curves.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        color = BUDGET_COLORS[min(order[b], len(BUDGET_COLORS) - 1)]
        name = f"{fam}, {b:.3g} FLOPs"
        text = [f"{r['shape']}: {human(r['params'])} parameters, {human(r['tokens'])} tokens"
                + (f", {human_time(r['train_time_s'])} on one device" if "train_time_s" in r else "")
                for r in rows]
        fig.add_trace(go.Scatter(x=[r[x_key] * x_scale for r in rows], y=[r["loss"] for r in rows],
                                 mode="lines+markers", name=name, legendgroup=name, text=text,
                                 hovertemplate="%{text}<br>" + x_name + " %{x:.4g}, loss %{y:.4f}<extra></extra>",
                                 line={"color": color, "dash": FAMILY_DASH.get(fam, "solid"), "width": 2},
                                 marker={"size": 5, "color": color}))
        opt = optima.get((fam, b))
        if opt is not None:
            fig.add_trace(go.Scatter(x=[opt[0] * x_scale], y=[opt[1]], mode="markers", legendgroup=name,
                                     showlegend=False, text=[opt[2]],
                                     hovertemplate="%{text}<extra>" + name + "</extra>",
                                     marker={"size": 13, "color": color, "symbol": "star",
                                             "line": {"color": "black", "width": 1}}))


def isoflop_figure(rep, law: str, result):
    """Loss against model size per family and budget, each optimum starred."""
    import plotly.graph_objects as go

    fig = go.Figure()
    curves = {}
    for (fam, b), rows in result.curves.items():
        opt = result.optima[(fam, b)]
        curves[(fam, b)] = [r for r in rows if opt.params / 20 <= r["law_params"] <= opt.params * 20] or rows
    optima = {k: (o.params, o.loss, f"optimum: {human(o.params)} parameters, {human(o.tokens)} tokens, loss "
                                    f"{o.loss:.4f}") for k, o in result.optima.items() if o.loss is not None}
    _isoflop_traces(fig, curves, optima, result.budgets, "law_params", 1.0, "N")
    fig.update_xaxes(type="log", title_text="model size N (parameters, as the law counts them)")
    fig.update_yaxes(title_text=f"predicted final loss ({result.law.name})")
    fig.update_layout(template=iplots.template(), height=520,
                      title={"text": f"isoFLOP curves: {result.law.name}, seq {result.seq}", "x": 0.01})
    return fig


def isoflop_time_figure(rep, law: str):
    """The isoFLOP curves' timed shapes: loss against GPU-hours on one device."""
    import plotly.graph_objects as go

    fig = go.Figure()
    times = rep.isoflop_times[law]
    budgets = sorted({b for (_, b) in times})
    best = {k: (min(rows, key=lambda r: r["loss"])["train_time_s"], min(r["loss"] for r in rows),
                "lowest loss of the timed shapes") for k, rows in times.items()}
    _isoflop_traces(fig, times, best, budgets, "train_time_s", 1 / 3600, "GPU-hours")
    fig.update_xaxes(type="log", title_text=f"training time on one {rep.hw.name} (GPU-hours)")
    fig.update_yaxes(title_text="predicted final loss")
    fig.update_layout(template=iplots.template(), height=520,
                      title={"text": f"isoFLOP curves against time on {rep.hw.name} ({law})", "x": 0.01})
    return fig


def page(rep, blocks: list):
    """The page: every block, figures interactive; then summary.csv in full."""
    from flopsim import __version__
    from flopsim.report import SUMMARY_FILE, Figure
    from flopsim.webpage import PLOTLY_JS_VERSION, Page, csv_table

    import plotly

    pg = Page(title=f"flopsim report: {', '.join(rep.given)} on {rep.hw.name}",
              generator=f"flopsim {__version__}; plotly {plotly.__version__}; plotly.js basic {PLOTLY_JS_VERSION}")
    for b in blocks:
        if isinstance(b, Figure):
            pg.figure(b.interactive, b.name, caption=b.caption)
        else:
            pg.markdown(b)
    pg.markdown(f"## Every number ({SUMMARY_FILE})\n\nThe rows of [{SUMMARY_FILE}]({SUMMARY_FILE}); hover a number "
                f"for its exact value as the CSV writes it.")
    csv_table(pg, rep.rows(), name="summary")
    return pg
