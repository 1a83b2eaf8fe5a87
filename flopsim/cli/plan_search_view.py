"""`flopsim plan train --search`: run flopsim.planning.search and print its tables."""

from __future__ import annotations

from typing import Optional

from flopsim.cli.output import Format, console, human_time, print_csv, print_json, rich_table
from flopsim.cli.spec_opts import IMPL_FLAGS


def _money(value: Optional[float]) -> str:
    return "-" if value is None else (f"${value:,.0f}" if value >= 100 else f"${value:,.4g}")


def _row(r: dict) -> list:
    return [f"{r['gpus']:,}", str(r["tp"]), str(r["pp"]), str(r["virtual_stages"]), str(r["dp"]), str(r["ep"]),
            str(r["micro_batch"]),
            _zero(r), r["recompute"], f"{r['memory_gb']:.1f}", human_time(r["step_time_s"]),
            f"{r['days']:.3g}", f"{r['gpu_hours']:,.0f}", _money(r["cost"]), f"{100 * r['mfu']:.1f}%"]


def _zero(r: dict) -> str:
    """'3', or '3 / 8' for ZeRO-3 sharded over 8 ranks and replicated (hybrid sharding)."""
    return str(r["zero"]) if not r.get("zero_shard") else f"{r['zero']} / {r['zero_shard']}"


COLUMNS = ["GPUs", "tp", "pp", "v", "dp", "ep", "mb", "ZeRO / shard", "recompute", "GB/GPU", "step", "days", "GPU-hours", "cost",
           "MFU"]


def run_search(spec, hardware, counts: list, *, tokens, seq, global_batch, global_batch_tokens, micro_batches,
               zero, recompute, optimizer, dp_overlap, price, calibration, fmt: Format, top: int, links: dict,
               encoder_seq=None, grad_accumulation: str = "autograd", grad_reduce_dtype=None):
    """Search, then print the fastest `top` layouts and the Pareto front (or JSON / CSV of every layout)."""
    from flopsim.errors import bad_value
    from flopsim.planning.search import RECOMPUTE, ZERO_STAGES, search_training

    if top < 1:
        raise bad_value("top", top, "must be a positive integer")
    result = search_training(spec, hardware, gpus=counts, tokens=tokens, seq=seq, global_batch=global_batch,
                             global_batch_tokens=global_batch_tokens, micro_batches=micro_batches,
                             zero=ZERO_STAGES if zero is None else [zero],
                             recompute=RECOMPUTE if recompute is None else [recompute], optimizer=optimizer,
                             dp_overlap=dp_overlap, price_per_gpu_hour=price, calibration=calibration,
                             progress=fmt == Format.table, encoder_seq=encoder_seq,
                             grad_accumulation=grad_accumulation, grad_reduce_dtype=grad_reduce_dtype, **links)
    if fmt == Format.json:
        return print_json(result.to_dict())
    if fmt == Format.csv:
        return print_csv(result.rows)
    out = console()
    out.print(f"[bold]{result.spec.name}[/] training on {', '.join(f'{g:,}' for g in counts)} x [bold]{result.hw.name}[/]: "
              f"{len(result.rows):,} layouts searched in {result.elapsed_s:.2f} s, {len(result.fastest):,} fit; "
              f"calibration {result.calibration.provenance_label}")
    if result.fastest:
        out.print(rich_table(f"fastest {min(top, len(result.fastest))} (each costed as `plan train` costs it)",
                             COLUMNS, [_row(r) for r in result.fastest[:top]]))
        out.print(rich_table("Pareto front: no other layout has fewer GPUs, fewer days and a lower cost",
                             COLUMNS, [_row(r) for r in result.pareto]))
        b = result.best
        out.print(f"  best: flopsim plan train {result.spec.name} -H {result.hw.name} --gpus {b['gpus']} --tp {b['tp']} "
                  f"--pp {b['pp']} --virtual-stages {b['virtual_stages']} --ep {b['ep']} --micro-batch {b['micro_batch']} "
                  f"--zero {b['zero']} " + (f"--zero-shard {b['zero_shard']} " if b.get("zero_shard") else "")
                  + f"--recompute {b['recompute']} --global-batch {b['global_batch']}"
                  + (f" --encoder-seq {encoder_seq}" if encoder_seq is not None else "")
                  + "".join(f" {flag} {getattr(result.spec, field)}" for field, flag in IMPL_FLAGS.items()
                            if getattr(result.spec, field) != "fused")
                  + (f" --attention-kernel {result.calibration.attention_kernel}"
                     if result.calibration.attention_kernel else "") + " ...")
    for note in result.notes:
        out.print(f"  note: {note}")
