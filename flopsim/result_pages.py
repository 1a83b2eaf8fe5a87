"""Pages (flopsim.webpage) for `flopsim plan train|serve --html FILE` and
`flopsim validate --html`: the same kind of self-contained interactive
page as the report's.

Conventions: each page shows what the command prints, from the same
result objects (TrainingPlan.time_parts / memory_parts, ServingPlan's
candidates, a validation's per-model, per-op and speedup rows, the
published suite's rows), as interactive figures plus tables with exact
values; the validation pages start with the summary markdown the command
writes beside them. Nothing is computed here but ratios for hover text and
unit changes.
"""

from __future__ import annotations

from flopsim import iplots
from flopsim.planning.train import recompute_name
from flopsim.units import human, human_time
from flopsim.webpage import Cell, Page, csv_table

PHASE_COLORS = {"forward": "#1f77b4", "prefill": "#2ca02c", "decode": "#d62728", "train": "#9467bd",
                "generate": "#ff7f0e", "train_run": "#8c564b", "speedup": "#e377c2"}
PART_COLORS = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f"]


def _generator() -> str:
    import plotly

    from flopsim import __version__

    from flopsim.webpage import PLOTLY_JS_VERSION

    return f"flopsim {__version__}; plotly {plotly.__version__}; plotly.js basic {PLOTLY_JS_VERSION}"


def training_plan_page(plan, command: str = "") -> Page:
    """The training plan: its layout, the step's time by part, memory per GPU and every figure."""
    c, t = plan.config, plan.totals
    page = Page(title=f"flopsim plan: {plan.spec.name} training on {c['gpus']} x {plan.hw.name}",
                generator=_generator())
    page.markdown(f"# Training plan: {plan.spec.name} on {c['gpus']} x {plan.hw.name}\n\n"
                  + (f"```sh\n{command}\n```\n\n" if command else "")
                  + f"Layout dp {c['dp']} x tp {c['tp']} x pp {c['pp']}" + (f" x ep {c['ep']}" if c["ep"] > 1 else "")
                  + f", {c['microbatches']} micro-batches of {c['micro_batch']} per replica, ZeRO-{c['zero']}, "
                  f"recompute {recompute_name(c['recompute'])}. Calibration: {plan.calibration.label}.\n\n"
                  f"**{t['steps']:,} steps x {human_time(t['step_time_s'])} = {t['days']:.3g} days, "
                  f"{t['gpu_hours']:,.0f} GPU-hours**; {human(t['tokens_per_s_per_gpu'])} tokens/s per GPU, MFU "
                  f"{100 * t['mfu']:.1f}%. {plan.message}.")
    parts = plan.time_parts()
    page.markdown("## Time per step, per GPU")
    page.figure(iplots.stacked_bars(["step"], {x["part"]: [x["per_step_s"]] for x in parts}, horizontal=True,
                                    y_title="seconds per step", height=330,
                                    colors={x["part"]: PART_COLORS[i % len(PART_COLORS)]
                                            for i, x in enumerate(parts)},
                                    title=f"{human_time(t['step_time_s'])} per step by part"), "time-split")
    page.table(["part", "per micro-batch", "per step", "share", "how"],
               [[Cell(x["part"]), _seconds(x["per_microbatch_s"]), _seconds(x["per_step_s"]),
                 Cell(f"{100 * x['per_step_s'] / t['step_time_s']:.1f}%"), Cell(x["how"])] for x in parts],
               name="time")
    mem = plan.memory_parts()
    page.markdown("## Memory per GPU")
    page.figure(iplots.stacked_bars(["this GPU"], {x["component"]: [x["bytes"] / 1e9] for x in mem[:-1]},
                                    y_title="GB", height=330, horizontal=True,
                                    title=f"{mem[-1]['bytes'] / 1e9:.3g} GB of "
                                          f"{plan.memory['capacity_bytes'] / 1e9:.3g} GB"), "memory")
    page.table(["component", "bytes", "how"], [[Cell(x["component"]), Cell(human(x["bytes"], "B"), repr(x["bytes"])),
                                               Cell(x["how"])] for x in mem], name="memory")
    return _with_figures(page, plan.to_dict(), ("config", "compute", "communication", "memory", "totals"),
                         plan.notes)


def _length(value) -> str:
    """A fixed length (an int, with thousands separators) or a distribution's form."""
    return f"{value:,}" if isinstance(value, int) else str(value)


def serving_plan_page(plan, command: str = "") -> Page:
    """The serving plan: the chosen configuration, each replica (tp x pp x ep) tried, memory."""
    c = plan.config
    page = Page(title=f"flopsim plan: {plan.spec.name} serving on {plan.hw.name}", generator=_generator())
    page.markdown(f"# Serving plan: {plan.spec.name} on {plan.hw.name}\n\n"
                  + (f"```sh\n{command}\n```\n\n" if command else "")
                  + f"Prompt {_length(c['prompt'])} + {_length(c['gen'])} generated tokens per request (means "
                  f"{c['prompt_mean']:,.0f} + {c['gen_mean']:,.0f}). Calibration: "
                  f"{plan.calibration.label}.\n\n**{plan.message}**")
    rows = sorted((r for r in plan.candidates if r.get("batch") is not None),
                  key=lambda r: (r["gpus"], r["tp"], r["pp"], r["ep"]))
    if rows:
        x = [f"tp {r['tp']} x pp {r['pp']} x ep {r['ep']}" for r in rows]
        labels = [f"{name}, batch {r['batch']:,}" for name, r in zip(x, rows)]
        page.markdown("## Replicas tried")
        axis = "replica (tp x pp x ep GPUs)"
        fig = iplots.lines([{"title": "latency", "x_title": axis, "series": [
            {"name": "TTFT (ms)", "x": x, "y": [1e3 * (r.get("ttft_s") or 0) for r in rows],
             "style": {"color": "#1f77b4", "marker": "o"}, "text": labels, "hover": "%{text}: TTFT %{y:.4g} ms"},
            {"name": "TPOT (ms)", "x": x, "y": [1e3 * (r.get("tpot_s") or 0) for r in rows],
             "style": {"color": "#d62728", "marker": "s"}, "text": labels, "hover": "%{text}: TPOT %{y:.4g} ms"}]},
            {"title": "throughput", "x_title": axis, "series": [
                {"name": "output tokens/s per GPU", "x": x, "y": [r.get("output_tokens_per_s_per_gpu") or 0 for r in rows],
                 "style": {"color": "#2ca02c", "marker": "D"}, "text": labels,
                 "hover": "%{text}: %{y:.4s} output tokens/s per GPU"}]}],
            y_title="ms", title="Each replica at its largest batch")
        page.figure(fig, "candidates")
    csv_table(page, [{k: v for k, v in r.items()} for r in plan.candidates], name="candidates")
    return _with_figures(page, plan.to_dict(), ("config", "latency", "throughput", "memory", "cost"), plan.notes)


def _seconds(value) -> Cell:
    return Cell("-") if value is None else Cell(human_time(value), repr(float(value)))


def _with_figures(page: Page, d: dict, sections, notes) -> Page:
    """Every figure of the plan's JSON (`--format json`), section by section, then its notes."""
    page.markdown("## Every figure\n\nAs `--format json` gives them; hover a number for its exact value.")
    rows = [{"section": s, "quantity": k, "value": v} for s in sections for k, v in d[s].items()
            if not isinstance(v, (dict, list))]
    csv_table(page, rows, name="figures")
    if notes:
        page.markdown("## Notes\n\n" + "\n".join(f"- {n}" for n in notes))
    return page


def validation_page(validation, summary_md: str) -> Page:
    """A measurement suite's validation: the summary, then measured against predicted per step,
    per module and per speedup, each point named on hover."""
    page = Page(title=f"flopsim validation: {validation.device} ({validation.hardware})", generator=_generator())
    page.markdown(summary_md)
    page.markdown("## Interactive figures")
    by_phase: dict = {}
    for r in validation.per_model:
        by_phase.setdefault(r["phase"], []).append(r)
    page.figure(iplots.measured_vs_predicted(
        [{"name": phase, "color": PHASE_COLORS.get(phase, "#555555"), "measured": [1e3 * r["measured_s"] for r in rows],
          "predicted": [1e3 * r["predicted_s"] for r in rows],
          "labels": [f"{r['model']} {phase} B={r['batch']} S={r['seq']} T={r['context']}" for r in rows]}
         for phase, rows in sorted(by_phase.items())], unit="ms", title="End to end: one step per model and phase"),
        "per-model")
    kinds: dict = {}
    for r in validation.per_op:
        kinds.setdefault(r["kind"], []).append(r)
    palette = iplots.KIND_COLORS
    page.figure(iplots.measured_vs_predicted(
        [{"name": f"{kind} ({len(rows)})", "color": palette.get(kind, "#555555"),
          "measured": [1e3 * r["measured_s"] for r in rows], "predicted": [1e3 * r["predicted_s"] for r in rows],
          "labels": [f"{r['model']} {r['phase']}: {r['module']}" for r in rows]}
         for kind, rows in sorted(kinds.items())], unit="ms", title="Per module (colour: op kind)"), "per-op")
    if validation.speedups:
        page.figure(iplots.measured_vs_predicted(
            [{"name": "speedup over dense", "color": "#e377c2",
              "measured": [r["measured_speedup"] for r in validation.speedups],
              "predicted": [r["predicted_speedup"] for r in validation.speedups],
              "labels": [f"{r['model']} vs {r['baseline']}, {r['phase']}" for r in validation.speedups]}],
            unit="x", title="Speedup over the dense baseline"), "speedups")
    page.markdown("## Per model and phase (per_model.csv)")
    columns = [c for c in ("model", "family", "phase", "batch", "seq", "context", "measured_s", "predicted_s", "error",
                           "measured_device_s", "device_error", "measured_host_s", "host_error", "bound")
               if any(c in r for r in validation.per_model)]
    csv_table(page, validation.per_model, columns=columns, name="per-model")
    return page


def published_page(result, summary_md: str) -> Page:
    """The published-measurements suite: the summary, then each row's predicted / published ratio."""
    page = Page(title="flopsim: predictions against published measurements", generator=_generator())
    page.markdown(summary_md)
    page.markdown("## Every row, predicted / published")
    page.figure(ratio_figure(result), "ratios")
    csv_table(page, [r.to_dict() for r in result.results], name="rows",
              columns=["id", "source", "task", "metric", "hardware", "model", "gpus", "published", "predicted",
                       "ratio", "scored"])
    return page


def ratio_figure(result):
    """One marker per row at its predicted / published ratio (log axis), grouped by task."""
    import plotly.graph_objects as go

    fig = go.Figure()
    ordered = sorted(result.results, key=lambda r: (r.row.task, r.row.id))
    for task in dict.fromkeys(r.row.task for r in ordered):
        rows = [r for r in ordered if r.row.task == task]
        fig.add_trace(go.Scatter(
            x=[r.ratio for r in rows], y=[r.row.id for r in rows], mode="markers", name=task,
            marker={"size": 10, "color": PHASE_COLORS.get(task, "#555555"),
                    "symbol": ["circle" if r.row.scored else "circle-open" for r in rows]},
            customdata=[[r.row.source, r.row.metric, f"{r.row.value:.4g}", f"{r.predicted:.4g}",
                         f"{r.row.hardware} x{r.row.parallel.gpus}"] for r in rows],
            hovertemplate="<b>%{y}</b><br>%{customdata[0]}, %{customdata[4]}<br>%{customdata[1]}: published "
                          "%{customdata[2]}, predicted %{customdata[3]}<br>ratio %{x:.3f}<extra>%{fullData.name}"
                          "</extra>"))
    for x, dash in ((1.0, "solid"), (1.15, "dot"), (1 / 1.15, "dot"), (1.5, "dash"), (1 / 1.5, "dash")):
        fig.add_vline(x=x, line={"color": "grey", "dash": dash, "width": 1})
    fig.update_xaxes(type="log", title_text="predicted / published (dotted: +-15%, dashed: 1.5x)")
    fig.update_yaxes(autorange="reversed", tickfont={"size": 9}, automargin=True)
    fig.update_layout(template=iplots.template(), height=max(420, 18 * len(ordered) + 160),
                      title={"text": "Predicted / published, every row (hollow: not scored)", "x": 0.01})
    return fig
