"""`flopsim predict`, `flopsim compare`, `flopsim memory` and `flopsim sweep`."""

from __future__ import annotations

from typing import List, Optional

import typer

from flopsim.cli.app import app
from flopsim.cli.calibration_opts import AttentionKernelOpt, CalibrationOpt, calibration_choice
from flopsim.cli.layout_opts import (CpOpt, DpOpt, EpOpt, GpusPerNodeOpt, PpOpt, RecomputeOpt, SequenceParallelOpt,
                                     StageOpt, TpOpt, VocabParallelOpt, ZeroOpt, ZeroShardOpt,
                                     layout_from_options)
from flopsim.cli.output import Format, console, human, human_time, print_csv, print_json, progress_bar, rich_table
from flopsim.cli.spec_opts import ActImplOpt, LossOpt, NormImplOpt, RopeImplOpt, impl_label, with_impls

SpecArg = typer.Argument(..., help="Model spec: a YAML path, an HF config.json or a preset name.")
HardwareOpt = typer.Option(..., "--hardware", "-H", help="Device: a preset (`flopsim hardware list`) or a YAML path.")
BatchOpt = typer.Option(1, "--batch", "-b", help="Sequences per batch (B).")
SeqOpt = typer.Option(1024, "--seq", "-s", help="Tokens per sequence (S); decode: the context if --context is omitted.")
ContextOpt = typer.Option(None, "--context", "-t", help="Keys each query attends to (T): decode's KV-cache length, or prefill with a cached prefix.")
PhaseOpt = typer.Option("forward", "--phase", "-p", help="forward | train | prefill | decode")
EncoderSeqOpt = typer.Option(None, "--encoder-seq", help="An encoder-decoder's encoder tokens per sequence (S_enc; default: --seq). Decode: the cross-attention cache's length.")
OptimizerOpt = typer.Option("adam", "--optimizer", help="Train phase: adam | adamw | sgd | none.")
FormatOpt = typer.Option(Format.table, "--format", "-f", help="table | json | csv")


def _count(n: float) -> str:
    """A kernel count: whole as 1,234; an expected count (MoD's launches) to a tenth."""
    return f"{n:,.0f}" if float(n).is_integer() else f"{n:,.1f}"


def _summary_lines(r) -> list[str]:
    s = r.summary()
    seq = "1" if r.phase == "decode" else str(r.seq)
    return [
        f"[bold]{r.spec.name}[/] ({r.spec.family}) {r.phase} on [bold]{r.hw.name}[/]: "
        f"B={r.batch} S={seq} T={r.context}" + (f" S_enc={r.encoder_seq}" if r.encoder_seq else "")
        + f", {r.spec.precision_label}{impl_label(r.spec)}",
        f"  time          {human_time(s['time_s'])}  ({s['bound']}-bound: compute-bound ops "
        f"{human_time(s['compute_bound_s'])}, memory-bound ops {human_time(s['memory_bound_s'])}, "
        f"launch {human_time(s['overhead_s'] - s['fresh_s'])} over {_count(s['kernels'])} kernels "
        f"({s['ops']} ops)"
        + (f", fresh pages {human_time(s['fresh_s'])}" if s["fresh_s"] else "") + ")",
        f"  FLOPs         {s['flops']:,}  ({human(s['flops'], 'FLOP')}; with elementwise {human(s['all_flops'], 'FLOP')})",
        f"  bytes         {human(s['bytes'], 'B')}",
        f"  tokens/s      {human(s['tokens_per_s'])}",
        f"  MFU           {100 * s['mfu']:.1f}%  (of {human(s['peak_flops_per_s'], 'FLOP/s')} {r.spec.compute_dtype} peak)",
        f"  calibration   {r.calibration.label}: {s['calibration']}",
        *([f"  layout        one GPU of {s['layout']}, stage {r.layout.last_stage}: collectives "
           f"{human_time(s['comm_s'])} of the step, in sequence (none hidden)"] if r.layout is not None else []),
    ]


@app.command()
def predict(
    spec: str = SpecArg,
    hardware: str = HardwareOpt,
    phase: str = PhaseOpt,
    batch: int = BatchOpt,
    seq: int = SeqOpt,
    context: Optional[int] = ContextOpt,
    calibration: str = CalibrationOpt,
    attention_kernel: Optional[str] = AttentionKernelOpt,
    optimizer: str = OptimizerOpt,
    encoder_seq: Optional[int] = EncoderSeqOpt,
    ops: bool = typer.Option(False, "--ops", help="Table format: every op instead of the slowest 15."),
    norm_impl: Optional[str] = NormImplOpt, rope_impl: Optional[str] = RopeImplOpt,
    act_impl: Optional[str] = ActImplOpt, loss: Optional[str] = LossOpt,
    tp: int = TpOpt, pp: int = PpOpt, dp: int = DpOpt, ep: int = EpOpt, cp: int = CpOpt, zero: int = ZeroOpt,
    zero_shard: Optional[int] = ZeroShardOpt,
    vocab_parallel: bool = VocabParallelOpt,
    recompute: str = RecomputeOpt, sequence_parallel: Optional[bool] = SequenceParallelOpt,
    stage: Optional[int] = StageOpt, gpus_per_node: Optional[int] = GpusPerNodeOpt,
    fmt: Format = FormatOpt,
):
    """Predicted wall-clock time of one step on a device (roofline per op); with a layout
    (--tp, --pp, ...) one GPU's step, its collectives priced on the link levels."""
    from flopsim import opcache

    opcache.use()  # a repeated (spec, phase) skips sympy (flopsim.opcache)
    from flopsim.predict import predict as predict_api

    spec = with_impls(spec, loss_impl=loss, norm_impl=norm_impl, rope_impl=rope_impl, act_impl=act_impl)
    layout = layout_from_options(spec, phase, tp=tp, pp=pp, dp=dp, ep=ep, cp=cp, zero=zero, recompute=recompute,
                                 sequence_parallel=sequence_parallel, stage=stage, gpus_per_node=gpus_per_node,
                                 zero_shard=zero_shard, vocab_parallel=vocab_parallel, hardware=hardware)
    r = predict_api(spec, hardware, phase=phase, batch=batch, seq=seq, context=context,
                    calibration=calibration_choice(calibration, hardware, attention_kernel), optimizer=optimizer,
                    encoder_seq=encoder_seq, layout=layout)
    if fmt == Format.json:
        return print_json(r.to_dict())
    if fmt == Format.csv:
        return print_csv(op.to_dict() for op in r.ops)
    out = console()
    for line in _summary_lines(r):
        out.print(line)
    rows = sorted(r.ops, key=lambda op: op.time_s, reverse=True) if not ops else r.ops
    shown = rows if ops else rows[:15]
    total = r.time_s or 1.0
    table = [[op.key, op.kind, human_time(op.time_s), f"{100 * op.time_s / total:.1f}", op.bound,
              f"{op.intensity:.3g}", human(op.all_flops, "FLOP"), human(op.bytes, "B")] for op in shown]
    title = None if ops else f"slowest {len(shown)} of {len(r.ops)} ops (--ops for all)"
    out.print(rich_table(title, ["op", "kind", "time", "%", "bound", "FLOP/B", "FLOPs", "bytes"], table))


@app.command()
def compare(
    specs: List[str] = typer.Argument(..., help="Two or more model specs; the first is the baseline (speedup 1.0)."),
    hardware: str = HardwareOpt,
    phase: List[str] = typer.Option(["forward"], "--phase", "-p", help="Repeat for several phases: --phase train --phase prefill --phase decode."),
    batch: int = BatchOpt,
    seq: int = SeqOpt,
    context: Optional[int] = ContextOpt,
    calibration: str = CalibrationOpt,
    attention_kernel: Optional[str] = AttentionKernelOpt,
    optimizer: str = OptimizerOpt,
    encoder_seq: Optional[int] = EncoderSeqOpt,
    fmt: Format = FormatOpt,
):
    """Predicted time of several models on one device, with speedups over the first."""
    from flopsim import opcache

    opcache.use()  # a repeated (spec, phase) skips sympy (flopsim.opcache)
    from flopsim.predict import compare as compare_api

    r = compare_api(specs, hardware, phase=phase, batch=batch, seq=seq, context=context,
                    calibration=calibration_choice(calibration, hardware, attention_kernel), optimizer=optimizer,
                    encoder_seq=encoder_seq)
    rows = r.rows
    if fmt == Format.json:
        return print_json(rows)
    if fmt == Format.csv:
        return print_csv(rows)
    first = r.results[0]
    console().print(rich_table(
        f"on {first.hw.name}, B={batch} S={seq}" + (f" T={context}" if context else "")
        + f"; calibration {first.calibration.label}",
        ["phase", "name", "time", "speedup", "FLOPs", "FLOPs ratio", "bytes", "bound", "tokens/s", "MFU"],
        [[x["phase"], x["name"], human_time(x["time_s"]), f"{x['speedup']:.3f}", human(x["flops"], "FLOP"),
          f"{x['flops_ratio']:.3f}", human(x["bytes"], "B"), x["bound"], human(x["tokens_per_s"]),
          f"{100 * x['mfu']:.1f}%"] for x in rows]))


@app.command()
def memory(
    spec: str = SpecArg,
    phase: str = typer.Option("train", "--phase", "-p", help="train | forward | prefill | decode"),
    batch: int = BatchOpt,
    seq: int = SeqOpt,
    context: Optional[int] = ContextOpt,
    hardware: Optional[str] = typer.Option(None, "--hardware", "-H", help="Device: report whether it fits, and the largest batch and context that do."),
    recompute: str = RecomputeOpt,
    optimizer: str = OptimizerOpt,
    grad_bytes: Optional[int] = typer.Option(None, "--grad-bytes", help="Bytes per gradient value (default: the model dtype's)."),
    master_weights: Optional[bool] = typer.Option(None, "--master-weights/--no-master-weights", help="Keep an fp32 master copy (default: when the dtype is below fp32)."),
    encoder_seq: Optional[int] = EncoderSeqOpt,
    fmt: Format = FormatOpt,
):
    """Weights, gradients, optimizer state, activations and KV cache of one step."""
    from flopsim.memory import memory as memory_api

    r = memory_api(spec, phase=phase, batch=batch, seq=seq, context=context, hw=hardware, recompute=recompute,
                   optimizer=optimizer, grad_bytes=grad_bytes, master_weights=master_weights,
                   encoder_seq=encoder_seq)
    if fmt == Format.json:
        return print_json(r.to_dict())
    if fmt == Format.csv:
        return print_csv(r.table().to_dict("records"))
    out = console()
    d = r.to_dict()
    out.print(f"[bold]{r.spec.name}[/] ({r.spec.family}) {r.phase}: B={r.batch} S={1 if r.phase == 'decode' else r.seq} "
              f"T={r.context}" + (f" S_enc={r.encoder_seq}" if r.encoder_seq else "")
              + f", {r.spec.precision_label}" + ("" if r.recompute == "none" else f", {r.recompute} recomputation")
              + (f", optimizer {r.optimizer}" if r.phase == "train" else ""))
    bpp = r.bytes_per_param
    out.print(f"  parameters {r.params:,}; bytes per parameter: weights {bpp['weights']}, gradients {bpp['gradients']}, "
              f"optimizer state {bpp['optimizer']}")
    total = d["total_bytes"] or 1
    out.print(rich_table(None, ["component", "bytes", "%"],
                         [[row["component"], human(row["bytes"], "B"), f"{100 * row['bytes'] / total:.1f}"]
                          for row in r.table().to_dict("records")]))
    if r.hw is not None:
        verdict = "fits" if r.fits else "does NOT fit"
        out.print(f"  {r.hw.name}: {human(r.hw.memory_capacity_bytes, 'B')} -> {verdict}; "
                  f"largest batch at this length {d['max_batch']:,}; "
                  f"largest {'context' if r.phase == 'decode' else 'sequence'} at this batch {d['max_context']:,}")
    for note in r.notes:
        out.print(f"  note: {note}")


@app.command()
def sweep(
    spec: str = SpecArg,
    vary: List[str] = typer.Option(..., "--vary", "-v", help="NAME=START:STOP:STEP, NAME=START:STOP:*FACTOR or NAME=V1,V2,... (repeat); NAME: batch, seq, context or a spec dimension (capacity, experts, top_k, d_ff, ...)."),
    hardware: str = HardwareOpt,
    phase: str = PhaseOpt,
    batch: int = typer.Option(1, "--batch", "-b", help="Batch when not varied."),
    seq: int = typer.Option(1024, "--seq", "-s", help="Sequence when not varied."),
    context: Optional[int] = ContextOpt,
    calibration: str = CalibrationOpt,
    attention_kernel: Optional[str] = AttentionKernelOpt,
    optimizer: str = OptimizerOpt,
    limit: int = typer.Option(40, "--limit", help="Table format: rows shown (the whole grid goes to --output or csv/json)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Write the whole grid to this file (csv, or json with --format json)."),
    fmt: Format = FormatOpt,
):
    """FLOPs, bytes and predicted time over a grid, evaluated at once (numpy)."""
    from flopsim.outputs import check_output_file
    from flopsim.sweep import parse_varies, sweep as sweep_api

    if output is not None:
        check_output_file(output, "output")  # before the grid is computed
    grid = parse_varies(vary)
    with progress_bar("sweep: variants") as tick:
        r = sweep_api(spec, hardware, phase=phase, vary=grid, batch=batch, seq=seq, context=context,
                      calibration=calibration_choice(calibration, hardware, attention_kernel), optimizer=optimizer,
                      progress=tick)
    table = r.table()
    if output is not None:
        import io
        import json

        from flopsim.cli.output import _jsonable
        from flopsim.outputs import write_atomic

        if fmt == Format.json:
            write_atomic(output, json.dumps(_jsonable(table.to_dict("records"))))
        else:
            buffer = io.StringIO()
            table.to_csv(buffer, index=False)
            write_atomic(output, buffer.getvalue())
        typer.echo(f"wrote {len(table)} grid points to {output}", err=True)
        if fmt != Format.table:
            return
    if fmt == Format.json:
        return print_json(table.to_dict("records"))
    if fmt == Format.csv:
        import sys

        return table.to_csv(sys.stdout, index=False)
    out = console()
    out.print(f"[bold]{r.spec.name}[/] {phase} on [bold]{r.hw.name}[/]: {r.points:,} grid points "
              f"({' x '.join(f'{k}[{len(v)}]' for k, v in r.axes.items())}); "
              f"calibration {r.fixed['calibration_label']}")
    axes = list(r.axes)
    shown = table.head(limit)
    rows = [[*[f"{row[a]:g}" for a in axes], human(row["flops"], "FLOP"), human(row["bytes"], "B"),
             human_time(row["time_s"]), row["bound"], human(row["tokens_per_s"]), f"{100 * row['mfu']:.1f}%"]
            for row in shown.to_dict("records")]
    title = None if len(table) <= limit else f"first {limit} of {len(table):,} points (--format csv or --output for all)"
    out.print(rich_table(title, [*axes, "FLOPs", "bytes", "time", "bound", "tokens/s", "MFU"], rows))
