"""`flopsim hardware list` and `flopsim hardware show H`."""

from __future__ import annotations

import typer

from flopsim.cli.app import app
from flopsim.cli.output import Format, console, human, print_csv, print_json, rich_table

hardware_app = typer.Typer(help="Device specs (specs/hardware): peaks, bandwidth, memory, sources.",
                           no_args_is_help=True)
app.add_typer(hardware_app, name="hardware")

FormatOpt = typer.Option(Format.table, "--format", "-f", help="table | json | csv")
PEAK_COLUMNS = ("fp32", "tf32", "bf16", "fp16", "fp8", "int8", "fp4")


def _flat(hw) -> dict:
    row = {"name": hw.name, "kind": hw.kind, "description": hw.description}
    for dtype in PEAK_COLUMNS:
        row[f"peak_flops_per_s_{dtype}"] = hw.peak_flops_per_s.get(dtype)
    for figure in ("memory_bandwidth_bytes_per_s", "memory_capacity_bytes", "last_level_cache_bytes",
                   "interconnect_bytes_per_s", "launch_overhead_s"):
        row[figure] = getattr(hw, figure)
    row["unverified"] = " ".join(hw.unverified)
    return row


def _tera(value) -> str:
    return "-" if value is None else f"{value / 1e12:.4g}"


@hardware_app.command("list")
def list_hardware(fmt: Format = FormatOpt):
    """Every device preset with its headline figures."""
    from flopsim import opcache

    opcache.use()  # a repeated (spec, phase) skips sympy (flopsim.opcache)
    from flopsim.hardware import hardware_names, load_hardware

    devices = [load_hardware(name) for name in hardware_names()]
    if fmt == Format.json:
        return print_json([hw.to_dict() for hw in devices])
    if fmt == Format.csv:
        return print_csv(_flat(hw) for hw in devices)
    rows = []
    for hw in devices:
        p = hw.peak_flops_per_s
        rows.append([hw.name, hw.kind, _tera(p.get("bf16")), _tera(p.get("fp8")), _tera(p.get("fp32")),
                     f"{hw.memory_bandwidth_bytes_per_s / 1e12:.3g}", f"{hw.memory_capacity_bytes / 1e9:.4g}",
                     "-" if hw.last_level_cache_bytes is None else f"{hw.last_level_cache_bytes / 1e6:.4g}",
                     "-" if hw.interconnect_bytes_per_s is None else f"{hw.interconnect_bytes_per_s / 1e9:.4g}",
                     f"{hw.launch_overhead_s * 1e6:.3g}"])
    console().print(rich_table(
        "dense peaks; '-': not published (falls back, see `hardware show`)",
        ["name", "kind", "bf16 TFLOP/s", "fp8 TFLOP/s", "fp32 TFLOP/s", "HBM TB/s", "memory GB", "LLC MB",
         "link GB/s", "launch us"], rows))


@hardware_app.command("show")
def show_hardware(
    name: str = typer.Argument(..., help="A hardware preset name or a YAML path."),
    fmt: Format = FormatOpt,
):
    """Every figure of one device, with its source."""
    from flopsim.hardware import FIGURES, load_hardware

    hw = load_hardware(name)
    if fmt == Format.json:
        return print_json(hw.to_dict())
    rows = []
    for figure in FIGURES:
        value = getattr(hw, figure)
        if figure == "peak_flops_per_s":
            for dtype, v in value.items():
                rows.append({"figure": f"peak_flops_per_s.{dtype}", "value": v, "source": hw.sources[figure],
                             "verified": figure in hw.verified})
        else:
            rows.append({"figure": figure, "value": value, "source": hw.sources.get(figure, ""),
                         "verified": figure in hw.verified})
    if fmt == Format.csv:
        return print_csv(rows)
    from rich.markup import escape

    out = console()
    out.print(f"[bold]{hw.name}[/] ({hw.kind}): {escape(hw.description)}")
    units = {"peak_flops_per_s": "FLOP/s", "memory_bandwidth_bytes_per_s": "B/s", "memory_capacity_bytes": "B",
             "last_level_cache_bytes": "B", "interconnect_bytes_per_s": "B/s", "scale_out_bytes_per_s": "B/s"}
    table_rows = []
    for r in rows:
        base = r["figure"].split(".")[0]
        if r["value"] is None:
            shown = "-"
        elif base == "launch_overhead_s":
            shown = f"{r['value'] * 1e6:.3g} us"
        else:
            shown = human(r["value"], units.get(base, ""))
        table_rows.append([r["figure"], shown, "yes" if r["verified"] else "no"])
    out.print(rich_table(None, ["figure", "value", "verified"], table_rows))
    for figure in FIGURES:
        if figure in hw.sources:
            out.print(f"[bold]{figure}[/]: {escape(hw.sources[figure])}")  # sources carry [sibling] tags
