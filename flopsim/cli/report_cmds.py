"""`flopsim report`: a markdown + figures report comparing specs on a device
(flopsim.report; matplotlib is imported only when the command runs)."""

from __future__ import annotations

from typing import List, Optional

import typer

from flopsim.cli.app import app
from flopsim.cli.layout_opts import CpOpt, DpOpt, EpOpt, PpOpt, RecomputeOpt, TpOpt, ZeroOpt
from flopsim.cli.output import Format, console, print_csv, print_json, rich_table


@app.command()
def report(
    specs: List[str] = typer.Argument(..., help="Model specs (presets or paths). Each conditional spec is compared with its dense baseline (see --group)."),
    hardware: str = typer.Option(..., "--hardware", "-H", help="Device: a preset (`flopsim hardware list`) or a YAML path."),
    phase: Optional[List[str]] = typer.Option(None, "--phase", "-p", help="Repeat for several (default train, prefill, decode; encoders run forward instead of prefill/decode)."),
    batch: int = typer.Option(8, "--batch", "-b", help="Sequences per step in every phase (B)."),
    seq: int = typer.Option(2048, "--seq", "-s", help="Tokens per sequence (S); capped at max_seq for learned positions."),
    context: Optional[int] = typer.Option(None, "--context", "-t", help="Decode's KV-cache length (and prefill's keys); default --seq."),
    calibration: str = typer.Option("auto", "--calibration", help="auto (specs/calibration/<device>.yaml: measured or published-seeded) | ideal (only when asked) | a YAML path."),
    optimizer: str = typer.Option("adam", "--optimizer", help="Train phase: adam | adamw | sgd | none."),
    budget: Optional[List[float]] = typer.Option(None, "--budget", "-c", help="isoFLOP training budgets in FLOPs (repeat; default 6e18, 2e19, 1e20)."),
    group: str = typer.Option("auto", "--group", help="auto: one comparison group per dense trunk (derived baselines where none is given) | first: every spec against the first."),
    figures: str = typer.Option("png", "--figures", help="png | svg | both."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output folder (default reports/<specs>-<hardware>/); replaced atomically."),
    fmt: Format = typer.Option(Format.table, "--format", "-f", help="What to print once written: table (headline) | json | csv."),
    tp: int = TpOpt, pp: int = PpOpt, dp: int = DpOpt, ep: int = EpOpt, cp: int = CpOpt, zero: int = ZeroOpt,
    recompute: str = RecomputeOpt,
):
    """Write a report (markdown + figures) comparing specs on a device: roofline, speedup vs knob, memory, isoFLOP."""
    import sys

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from flopsim.report import headline_cells, make_report
    from flopsim.errors import InputError

    if figures not in ("png", "svg", "both"):
        raise InputError(f"figures: {figures!r}: expected png, svg or both")
    if out is not None:  # the name as given ('' is not the current folder)
        from flopsim.outputs import check_output_folder

        check_output_folder(out, "out")
    err = console()
    err.file = sys.stderr
    progress = Progress(TextColumn("[bold]report[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.description}"), console=err, transient=True,
                        disable=not err.is_terminal)
    state: dict = {}

    def advance(done: int, total: int, description: str) -> None:
        if "task" not in state:
            state["task"] = progress.add_task(description, total=total)
        progress.update(state["task"], completed=done, description=description)

    with progress:
        rep = make_report(specs, hardware, phases=phase or None, batch=batch, seq=seq, context=context,
                            calibration=calibration, optimizer=optimizer, budgets=budget or None, group=group,
                            figures=figures, out_dir=out, progress=advance,
                            parallel=dict(tp=tp, pp=pp, dp=dp, ep=ep, cp=cp, zero=zero, recompute=recompute))
    path = rep.path
    folder = path.parent
    files = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    size = sum((folder / f).stat().st_size for f in files)
    rows = rep.rows()
    if fmt == Format.json:
        return print_json({"report": str(path), "files": files, "bytes": size, "rows": rows})
    if fmt == Format.csv:
        return print_csv(rows)
    out_console = console()
    columns = ["spec", "params", "phase", "FLOPs/token", "time", "speedup", "FLOP speedup", "bound", "MFU"]
    for gi, g in enumerate(rep.groups):
        cells = [headline_cells(r) for r in rows if r["group"] == gi + 1]
        table = rich_table(f"{gi + 1}. {g.title}", columns, [c[:5] + c[6:] for c in cells])  # without tokens/s
        for column in table.columns:
            column.no_wrap = True
        out_console.print(table)
    out_console.print(f"wrote {path} ({len(files)} files, {size / 1e3:.0f} kB)")
