"""`flopsim isoflop` and `flopsim laws` (issue 6): isoFLOP / iso-time optima of
dense, MoD and MoE models under a scaling law, and the laws themselves.
Heavy modules (numpy, scipy, matplotlib) are imported inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from flopsim.cli.app import app
from flopsim.cli.output import Format, console, human, human_time, print_csv, print_json, progress_bar, rich_table
from flopsim.spec.paths import exists

FormatOpt = typer.Option(Format.table, "--format", "-f", help="table | json | csv")


def _n(x) -> str:
    return "-" if x is None else human(float(x))


@app.command()
def isoflop(
    budget: Optional[List[float]] = typer.Option(None, "--budget", "-c", help="Training budget in FLOPs (repeat for several), e.g. 5.76e23."),
    law: str = typer.Option("chinchilla-3", "--law", "-l", help="chinchilla-1 | chinchilla-2 | chinchilla-3 (alias chinchilla) | chinchilla-3-printed | kaplan | deepseek | besiroglu | krajewski | clark[:s-base|rl-r|hash[:BASE]] | RUNS.csv (params, tokens, loss) to fit; `flopsim laws` lists them."),
    family: Optional[List[str]] = typer.Option(None, "--family", help="dense | mod | moe (repeat or comma-separate); dense is the reference."),
    flops_rule: str = typer.Option("exact", "--flops-rule", help="exact (flopsim's training FLOPs/token) | 6N."),
    hardware: Optional[str] = typer.Option(None, "--hardware", help="Hardware spec for step time and speedup (e.g. h100-sxm)."),
    gpu_hours: Optional[float] = typer.Option(None, "--gpu-hours", help="iso-time: GPU-hours budget on --hardware (time from the roofline)."),
    seq: int = typer.Option(2048, "--seq", "-s", help="Training sequence length."),
    batch: int = typer.Option(8, "--batch", "-b", help="Sequences per step per GPU (step time, iso-time)."),
    base: str = typer.Option("decoder-220m", "--base", help="Dense preset the ladder keeps vocab, FFN, norms, positions from."),
    aspect: float = typer.Option(64.0, "--aspect", help="Ladder rule: d_model / layers."),
    head_size: int = typer.Option(64, "--head-size", help="Ladder rule: d_head (heads = d_model / d_head)."),
    ff_ratio: Optional[float] = typer.Option(None, "--ff-ratio", help="Ladder rule: d_ff / d_model (default: the base preset's)."),
    min_layers: int = typer.Option(2, "--min-layers", help="Shallowest ladder shape."),
    max_layers: int = typer.Option(256, "--max-layers", help="Deepest ladder shape."),
    shapes: Optional[List[str]] = typer.Option(None, "--shapes", help="Explicit specs (presets/paths, repeat or comma-separate) instead of the ladder."),
    mod_capacity: float = typer.Option(0.125, "--mod-capacity", help="MoD variants: fraction of tokens a routed block processes."),
    mod_every: int = typer.Option(2, "--mod-every", help="MoD variants: route every k-th block."),
    mod_effective_params: Optional[float] = typer.Option(None, "--mod-effective-params", help="ASSUMPTION for MoD loss: as a dense model with F x its parameters (1.0: same parameters)."),
    mod_law: Optional[str] = typer.Option(None, "--mod-law", help="A law for MoD variants instead (e.g. a CSV of your MoD runs)."),
    moe_expansion: int = typer.Option(64, "--moe-expansion", help="MoE variants: expansion rate E (MoE-layer / dense-FFN parameters)."),
    moe_granularity: int = typer.Option(1, "--moe-granularity", help="MoE variants: granularity G = d_ff / d_expert (top_k = G)."),
    moe_every: int = typer.Option(1, "--moe-every", help="MoE variants: MoE FFN every k-th block."),
    numeric: bool = typer.Option(False, "--numeric", help="Numeric optimum even where the closed form applies."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write isoFLOP curves as a PNG, at this path."),
    fmt: Format = FormatOpt,
):
    """isoFLOP-optimal model size, tokens and loss under a scaling law; dense vs MoD/MoE."""
    from flopsim.errors import InputError
    from flopsim.scaling import LadderRule, ModOptions, MoeOptions
    from flopsim.scaling import isoflop as isoflop_api

    plot_path = None
    if plot is not None:  # checked before anything is computed
        from flopsim.outputs import check_output_file
        from flopsim.scaling.laws import AllocationLaw, load_law

        plot_path = check_output_file(plot, "plot")
        if plot_path.suffix.lower() != ".png":
            raise InputError(f"plot: {plot!r}: expected a .png path")
        if isinstance(load_law(law), AllocationLaw):
            raise InputError(f"plot: law {law!r} gives the allocation only: no loss curves to plot")
    budgets = list(budget or [])
    # the plot shows several budgets: with one given, add decades around it
    sweep = budgets
    if plot_path is not None and len(budgets) == 1:
        sweep = [budgets[0] * f for f in (1.0, 1e-2, 1e-1, 10.0)]  # the one asked for first
    spec_list = [s.strip() for item in (shapes or []) for s in item.split(",") if s.strip()] or None
    with progress_bar("isoflop: shapes") as tick:
        result = isoflop_api(
            budget=sweep or None, law=law, families=family or ["dense"], flops_rule=flops_rule, seq=seq,
            batch=batch,
            ladder=LadderRule(base=base, aspect=aspect, head_size=head_size, ff_ratio=ff_ratio,
                              min_layers=min_layers, max_layers=max_layers),
            shapes=spec_list, hardware=hardware, gpu_hours=gpu_hours,
            mod=ModOptions(capacity=mod_capacity, every=mod_every),
            moe=MoeOptions(expansion=moe_expansion, granularity=moe_granularity, every=moe_every),
            mod_effective_params=mod_effective_params, mod_law=mod_law,
            method="numeric" if numeric else "auto", progress=tick,
        )
    written = None
    if plot_path is not None:
        from flopsim.scaling.plot import plot_isoflop

        written = plot_isoflop(result, plot_path)
    if fmt == Format.json:
        data = result.to_dict()
        if written:
            data["plot"] = str(written)
        return print_json(data)
    if fmt == Format.csv:
        return print_csv(_csv_rows(result))
    _print_table(result, written, budgets=budgets)


def _csv_rows(result):
    for (fam, b), rows in result.curves.items():
        for r in rows:
            yield {"kind": "isoflop", "family": fam, "budget": b, **r}
    if result.iso_time:
        for fam, rows in result.iso_time["curves"].items():
            for r in rows:
                yield {"kind": "iso_time", "family": fam, "budget": result.iso_time["gpu_hours"], **r}


def _method(m: str) -> str:
    return "closed form" if m.startswith("closed") else m.split(" (")[0]


def _print_table(result, written, budgets=None):
    out = console()
    law = result.law
    out.print(f"[bold]isoFLOP[/] law [bold]{law.name}[/]: {law.source}", soft_wrap=True)
    size = ("M = non-embedding FLOPs per token" if law.params_kind == "flops_per_token"
            else f"N = {law.params_kind.replace('_', '-')} parameters")
    out.print(f"  {size}; FLOPs/token "
              f"{'exact (flopsim train count / seq)' if result.flops_rule == 'exact' else '= 6N'}; seq {result.seq}")
    for a in result.assumptions:
        if a.startswith("ASSUMPTION"):
            out.print(f"[bold yellow]{a}[/]", soft_wrap=True)
    if result.fit is not None:
        _print_fit(out, result.fit)
    for b in (budgets or result.budgets):
        out.print(f"\n[bold]budget {b:.3g} FLOPs[/]")
        for fam in result.families:
            _print_optimum(out, law, fam, result.optima[(fam, b)])
    if result.comparison and (len(result.families) > 1 or result.hardware):
        b = result.budgets[0]
        hw = result.hardware or "no --hardware: no step time"
        cols = ["family", "role", "shape", "params", "active", "FLOPs/step", "tokens", "loss", "step", "speedup"]
        rows = [[r["family"], r["role"], r["shape"], _n(r["params"]), _n(r["active_params"]),
                 f"{r['flops_per_step_vs_ref']:.3f}x", _n(r["tokens"]), f"{r['loss']:.4f}",
                 human_time(r["step_time_s"]) if r["step_time_s"] else "-",
                 f"{r['speedup_per_step']:.2f}x" if r["speedup_per_step"] else "-"] for r in result.comparison]
        out.print(rich_table(f"\nAt {b:.3g} FLOPs ({hw}; step = {result.batch} x {result.seq} tokens; "
                             f"FLOPs/step and speedup relative to the {result.families[0]} optimum)", cols, rows))
    if result.iso_time:
        it = result.iso_time
        out.print(f"\n[bold]iso-time: {it['gpu_hours']:g} GPU-hours on {it['hardware']}[/] "
                  f"(step = {result.batch} x {result.seq} tokens; time from the roofline)")
        for fam, o in it["optima"].items():
            s = o.shape
            out.print(f"  {fam:5s} optimum: params {human(o.params)}, tokens {human(o.tokens)}, "
                      f"{o.tokens_per_param:.1f} tokens/param, loss [bold]{o.loss:.4f}[/], "
                      f"{o.tokens * o.flops_per_token:.3g} FLOPs; nearest shape {s.name}")
    # the curve of the reference family at the first budget (none under a law with no loss)
    curve = result.curve if any(r["loss"] is not None for r in result.curve) else []
    shown = [r for r in curve if 1.0 <= r["tokens_per_param"] <= 1000.0 or r["optimal_shape"]]
    fam0 = result.families[0]
    where = f"{result.budgets[0]:.3g} FLOPs" if result.budgets else f"{result.iso_time['gpu_hours']:g} GPU-hours"
    rows = [[("* " if r["optimal_shape"] else "") + r["shape"], _n(r["law_params"]), _n(r["tokens"]),
             f"{r['tokens_per_param']:.1f}", human(r["flops_per_token"], "FLOP"), _loss(r["loss"])] for r in shown]
    if curve:
        out.print(rich_table(f"\ncurve: {fam0} at {where} ({len(shown)} of {len(curve)} shapes with 1-1000 "
                             f"tokens/param; --format csv for all)",
                             ["shape", "params", "tokens", "tokens/param", "FLOPs/token", "loss"], rows))
    for a in result.assumptions:
        if not a.startswith("ASSUMPTION"):
            out.print(f"[dim]note: {a}[/]", soft_wrap=True)
    for w in result.warnings:
        out.print(f"[bold red]warning: {w}[/]", soft_wrap=True)
    if written:
        extra = [b for b in result.budgets if b not in (budgets or [])]
        also = f" (with budgets {', '.join(f'{b:.3g}' for b in extra)} for comparison)" if extra else ""
        out.print(f"wrote {written}{also}")


def _loss(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _print_optimum(out, law, fam: str, o) -> None:
    """One optimum: where it lies, in the law's own convention, and the nearest concrete shape."""
    s = o.shape
    per_flop = law.params_kind == "flops_per_token"  # DeepSeek's M: FLOPs per token, not parameters
    size = (lambda x: f"M {human(x, 'FLOP')}/token") if per_flop else (lambda x: f"N {human(x)}")
    ratio = "" if per_flop else f"{o.tokens_per_param:.1f} tokens/N, "
    out.print(f"  {fam:5s} optimum ({_method(o.method)}): {size(o.params)}, tokens {human(o.tokens)}, "
              f"{ratio}loss [bold]{_loss(o.loss)}[/]")
    if o.law_optimum is not None and o.law_optimum[0] != o.params:
        n, d = o.law_optimum
        out.print(f"        in the law's convention ({law.flops_convention}): {size(n)}, tokens {human(d)}",
                  soft_wrap=True)
    n = "" if law.params_kind == "total" else f"{size(s.law_params(law.params_kind))}, "
    out.print(f"        nearest shape {s.name}: {n}{human(s.params)} params in all ({human(s.active)} "
              f"active), {human(s.flops_per_token, 'FLOP')}/token exact, {human(o.shape_tokens)} tokens, "
              f"loss {_loss(o.shape_loss)}", highlight=False)
    gap = o.convention_gap
    if gap is not None:
        verb = "understates" if gap < 0 else "overstates"
        rule = "M" if per_flop else f"6N ({law.params_kind.replace('_', '-')} parameters)"
        out.print(f"        {rule} {verb} this shape's training FLOPs "
                  f"by {abs(gap):.0%} ({human(o.convention_flops_per_token, 'FLOP')}/token against "
                  f"{human(s.flops_per_token, 'FLOP')} exact)", highlight=False)


def _print_fit(out, fit):
    c = fit.law.coefficients()
    out.print(f"  fitted law: E={c['E']:.4g} A={c['A']:.4g} B={c['B']:.4g} alpha={c['alpha']:.4f} "
              f"beta={c['beta']:.4f}  (Huber delta 1e-3 on log loss, {fit.starts} L-BFGS starts)")
    out.print(f"  residuals (predicted - observed): RMSE {fit.rmse:.4g}, max |r| {fit.max_abs:.4g}, "
              f"{len(fit.runs)} runs")
    rows = [[_n(r["params"]), _n(r["tokens"]), f"{r['loss']:.4f}", f"{r['predicted']:.4f}",
             f"{r['residual']:+.4f}"] for r in fit.runs.to_dict(orient="records")]
    out.print(rich_table(None, ["params", "tokens", "loss", "predicted", "residual"], rows))
    for n in fit.notes:
        out.print(f"[bold red]warning: {n}[/]")


def _coefficient_lines(coefficients: dict, prefix: str = "") -> list[str]:
    """`name = value` pairs, one line per group (a nested mapping gets its own line)."""
    flat = [f"{k} = {v:g}" if isinstance(v, float) else f"{k} = {v}"
            for k, v in coefficients.items() if not isinstance(v, dict)]
    lines = [prefix + ", ".join(flat)] if flat else []
    for k, v in coefficients.items():
        if isinstance(v, dict):
            lines += _coefficient_lines(v, prefix=f"{k}: ")
    return lines


@app.command()
def laws(
    law: Optional[str] = typer.Argument(None, help="A law name or a CSV of runs to fit; all laws when omitted."),
    fmt: Format = FormatOpt,
):
    """The scaling laws flopsim knows: coefficients and sources (or fit a CSV of runs)."""
    from flopsim.scaling.laws import law_names, load_law

    if law is not None and (law.lower().endswith(".csv") or exists(Path(law))):
        from flopsim.scaling.fit import fit_csv

        fit = fit_csv(law)
        if fmt == Format.json:
            return print_json(fit.to_dict())
        if fmt == Format.csv:
            return print_csv(fit.runs.to_dict(orient="records"))
        out = console()
        out.print(f"[bold]{law}[/]: L = E + A/N^alpha + B/D^beta")
        return _print_fit(out, fit)
    items = [load_law(law)] if law else [load_law(n) for n in law_names()]
    data = [x.describe() for x in items]
    if fmt == Format.json:
        return print_json(data if law is None else data[0])
    if fmt == Format.csv:
        return print_csv({"name": d["name"], "gives": d["gives"], "params_kind": d["params_kind"],
                          "flops_convention": d["flops_convention"],
                          "fitted_flops": "" if not d["fitted_flops"] else "{:.2g} to {:.2g}".format(*d["fitted_flops"]),
                          "source": d["source"], "coefficients": str(d["coefficients"])} for d in data)
    out = console()
    if law is None:
        rows = [[d["name"], d["gives"], ", ".join(d["families"]), d["params_kind"].replace("_", "-"),
                 "-" if not d["fitted_flops"] else "{:.2g} to {:.2g}".format(*d["fitted_flops"]),
                 d["source"].split(",")[0]] for d in data]
        out.print(rich_table("Scaling laws (`flopsim laws NAME` for one in full; alias chinchilla = chinchilla-3)",
                             ["law", "gives", "families", "N counts", "fitted FLOPs", "source"], rows))
    for d in data:
        out.print(f"\n[bold]{d['name']}[/] ({d['gives']}; {', '.join(d['families'])}; N = {d['params_kind']} parameters)")
        out.print(f"  {d['source']}", soft_wrap=True)
        out.print(f"  convention: {d['flops_convention']}", soft_wrap=True)
        fitted = d["fitted_flops"]
        out.print(f"  fitted on: {'{:.2g} to {:.2g} FLOPs'.format(*fitted) if fitted else 'range not known'}"
                  f"{' (' + d['fitted_note'] + ')' if d['fitted_note'] else ''}", soft_wrap=True)
        for line in _coefficient_lines(d["coefficients"]):
            out.print(f"  {line}")
        for n in d["notes"]:
            out.print(f"  [dim]{n}[/]", soft_wrap=True)
