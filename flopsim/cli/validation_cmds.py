"""`flopsim calibrate` and `flopsim validate`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from flopsim.cli.app import app
from flopsim.cli.output import Format, console, human, print_csv, print_json, rich_table
from flopsim.errors import InputError

DeviceOpt = typer.Option("cpu", "--device", "-d", help="cpu | cuda")
HardwareOpt = typer.Option(None, "--hardware", help="Hardware spec to calibrate against (default: cpu, or the GPU's preset).")
ThreadsOpt = typer.Option(None, "--threads", help="torch threads (default: torch's own choice; recorded).")


@app.command()
def calibrate(
    device: str = DeviceOpt,
    hardware: Optional[str] = HardwareOpt,
    threads: Optional[int] = ThreadsOpt,
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Calibration file (default: specs/calibration/<hardware>.yaml, which the roofline picks up)."),
    fmt: Format = typer.Option(Format.table, "--format", "-f"),
    gemms_into: Optional[str] = typer.Option(None, "--gemms-into", help="Measure only the fixed costs and the matrix products and replace them in this measured calibration of the device (written to --output, default: this file)."),
):
    """Measure kernel efficiencies on this device (matmuls incl. decode shapes, attention, copies, elementwise, gather/scatter/top-k)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from flopsim.calibrate import calibrate as run, check_gemms_into, guess_hardware
    from flopsim.calibration import calibration_output_path, load_calibration
    from flopsim.outputs import check_output_file
    from flopsim.validate import write_calibration

    if device not in ("cpu", "cuda"):  # everything checked before any measuring
        raise InputError(f"device: {device!r}: expected cpu or cuda")
    if hardware is not None:
        from flopsim.hardware import load_hardware

        load_hardware(hardware)
    base = None
    if gemms_into is not None:
        base = load_calibration(str(gemms_into))
        check_gemms_into(base, hardware or guess_hardware(device), "fp32" if device == "cpu" else "bf16")
    if output is None:
        output = gemms_into if gemms_into is not None else calibration_output_path(hardware or guess_hardware(device))
    path = check_output_file(output, "output")
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True,
                  console=console(stderr=True)) as bar:
        task = bar.add_task("calibrating", total=None)
        cal, points = run(device, hardware=hardware, threads=threads, gemms_into=base,
                          progress=lambda message: bar.update(task, description=f"calibrating: {message}"))
    write_calibration(cal, path)
    rows = [{"benchmark": p.name, "kind": p.kind, "time_s": p.seconds, "all_flops": p.all_flops, "bytes": p.bytes,
             "compute_eff": p.compute_eff, "memory_eff": p.memory_eff} for p in points]
    if fmt == Format.json:
        return print_json({"file": str(path), **(cal.measured or {}), "points": rows})
    if fmt == Format.csv:
        return print_csv(rows)
    out = console()
    m = cal.measured
    out.print(f"wrote [bold]{path}[/]: {len(points)} benchmarks on {m['device_name']} ({m['threads']} threads, {m['dtype']})")
    out.print(f"  launch overhead {m['launch_overhead_s'] * 1e6:.2f} us, achieved copy bandwidth "
              f"{human(m['achieved_bandwidth_bytes_per_s'], 'B/s')}"
              + (f", fresh pages {cal.fresh_pages.s_per_byte * 1e12:.3g} ms a GB above "
                 f"{cal.fresh_pages.above_bytes / 2 ** 20:.0f} MiB" if cal.fresh_pages is not None else ""))
    out.print(rich_table(None, ["benchmark", "kind", "time", "compute eff", "memory eff"],
                         [[r["benchmark"], r["kind"], f"{r['time_s'] * 1e6:.1f} us", f"{r['compute_eff']:.3f}",
                           f"{r['memory_eff']:.3f}"] for r in rows]))


@app.command()
def validate(
    device: str = DeviceOpt,
    suite: str = typer.Option("quick", "--suite", help="quick | full | a suite YAML path"),
    hardware: Optional[str] = HardwareOpt,
    threads: Optional[int] = ThreadsOpt,
    calibration: Optional[str] = typer.Option(None, "--calibration", help="Calibration file or 'ideal' (default: the device's measured file; measured first if missing)."),
    recalibrate: bool = typer.Option(False, "--recalibrate", help="Measure the calibration again first."),
    rounds: int = typer.Option(5, "--rounds", min=1, max=100, help="Round-robin passes over the cases when timing them."),
    out: Optional[str] = typer.Option(None, "--out", help="Report folder (default: reports/validation/<device>/, or reports/published/ with --published)."),
    published: bool = typer.Option(False, "--published", help="Compare with the published-measurements suite (specs/published/measurements.yaml) instead of profiling here."),
    table: Optional[str] = typer.Option(None, "--table", help="With --published: another measurements YAML."),
    rows: Optional[str] = typer.Option(None, "--rows", help="With --published: only these row ids (comma-separated)."),
    measurements: Optional[str] = typer.Option(None, "--measurements", help="Predict again for the measurements saved in this validation folder (with --calibration, or the folder's own), profiling nothing."),
    fmt: Format = typer.Option(Format.table, "--format", "-f"),
    html: bool = typer.Option(False, "--html", help="Also write index.html into the report folder: one self-contained interactive page."),
):
    """Profile the reference models, compare with predictions, write reports/validation/<device>/
    (or, with --published, compare with public measurements and write reports/published/)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from flopsim.spec.paths import specs_dir
    from flopsim.validate import check_inputs, run_validation

    if out is not None:
        from flopsim.outputs import check_output_folder

        check_output_folder(out, "out")  # before anything is measured
    if published:
        return _published(out, table, rows, fmt, html)
    if measurements is not None:
        from flopsim.repredict import repredict

        if out is None:
            raise InputError("out: give --out with --measurements (the measured folder is kept as it is)")
        result = repredict(measurements, calibration, hardware)
        return _print_validation(result, _write(result, out, html), out, fmt)

    check_inputs(device, suite)
    if hardware is not None:
        from flopsim.hardware import load_hardware

        load_hardware(hardware)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True, console=console(stderr=True)) as bar:
        task = bar.add_task("validating", total=None)

        def tick(message, done, total):
            bar.update(task, description=message, completed=done, total=total)

        result = run_validation(device, suite, hardware=hardware, calibration=calibration, threads=threads,
                                recalibrate=recalibrate, rounds=rounds, progress=tick)
    folder = out or (specs_dir().parent / "reports" / "validation" / device)
    return _print_validation(result, _write(result, folder, html), folder, fmt)


def _write(result, folder, html: bool) -> dict:
    """The validation folder (flopsim.validate.write_report) and, with --html, its page."""
    from flopsim.validate import summary_markdown, write_report

    summary = write_report(result, folder)
    if html:
        from flopsim.result_pages import validation_page

        validation_page(result, summary_markdown(result, summary, images=False)).write(Path(folder) / "index.html")
    return summary


def _print_validation(result, summary: dict, folder: Path, fmt: Format):
    from flopsim.validate import percent

    if fmt == Format.json:
        return print_json({"out": str(folder), **summary})
    if fmt == Format.csv:
        return print_csv(result.per_model)
    con = console()
    con.print(f"wrote [bold]{folder}[/] ({summary['cases']} model runs, {summary['gemm_ops']} GEMM ops, "
              f"{summary['speedups']} speedups) -- {summary['device_name']}, torch {summary['torch']}")
    if summary.get("calibrated_in_run") and "hardware" in summary:
        con.print(f"calibration measured in this run: {Path(folder) / 'calibration.yaml'} (the device's own, "
                  f"specs/calibration/{summary['hardware']}.yaml, is unchanged; copy it there to make it the "
                  f"device's calibration)")
    con.print(rich_table(None, ["figure", "median |error|", "p90 |error|"], [
        ["end to end (all phases)", percent(summary["median_abs_error_e2e"]), percent(summary["p90_abs_error_e2e"])],
        ["end to end (forward)", percent(summary["median_abs_error_e2e_forward"]), ""],
        ["per GEMM op", percent(summary["median_abs_error_gemm"]), percent(summary["p90_abs_error_gemm"])],
        ["speedup over dense", percent(summary["median_abs_error_speedup"]), percent(summary["p90_abs_error_speedup"])],
        *([["device time per step, queued", percent(summary["median_abs_error_device"]), ""],
           ["host time per step", percent(summary["median_abs_error_host"]), ""]]  # "-": no host_s to predict it
          if summary.get("queued_cases") else []),
    ]))


def _published(out: Optional[Path], table: Optional[str], rows: Optional[str], fmt: Format, html: bool = False):
    """`flopsim validate --published`: every row, published next to predicted, and the summary."""
    from flopsim.published import run_published, write_published
    from flopsim.spec.paths import specs_dir

    chosen = [r.strip() for r in rows.split(",") if r.strip()] if rows else None
    result = run_published(table, rows=chosen)
    folder = out or (specs_dir().parent / "reports" / "published")
    summary = write_published(result, folder)
    if html:
        from flopsim.published import summary_markdown
        from flopsim.result_pages import published_page

        published_page(result, summary_markdown(result, summary)).write(Path(folder) / "index.html")
    if fmt == Format.json:
        return print_json({"out": str(folder), **summary, "rows_detail": [r.to_dict() for r in result.results],
                           "failures": result.failures})
    if fmt == Format.csv:
        return print_csv([r.to_dict() for r in result.results])
    con = console()
    con.print(rich_table(None, ["row", "task", "hardware", "published", "predicted", "ratio"], [
        [r.row.id, f"{r.row.task} ({r.row.metric})", f"{r.row.hardware} x{r.row.parallel.gpus}",
         f"{r.row.value:.4g}", f"{r.predicted:.4g}", f"{r.ratio:.3f}"] for r in result.results]))
    for row_id, why in result.failures:
        con.print(f"[red]not predicted[/] {row_id}: {why}")
    con.print(f"wrote [bold]{folder}[/]: {summary['rows']} rows from {summary['sources']} sources; median |error| "
              f"[bold]{100 * summary['median_abs_error']:.1f}%[/], worst {summary['worst_fold']:.2f}x "
              f"({summary['worst_row']}), {summary['within_1_5x']}/{summary['rows']} within 1.5x")
