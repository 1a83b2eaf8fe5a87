"""The calibration options the timing commands share: `--calibration` and
`--attention-kernel` (a calibration's other fused attention kernel, e.g. FlashAttention-2
on an H100 whose own points are cuDNN's)."""

from __future__ import annotations

from typing import Optional

import typer

CalibrationOpt = typer.Option("auto", "--calibration", help="auto (specs/calibration/<device>.yaml: measured or published-seeded) | ideal (only when asked) | a YAML path.")
AttentionKernelOpt = typer.Option(None, "--attention-kernel", help="Price fused attention with another kernel's figures from the calibration's attention_kernels (e.g. fa2: FlashAttention-2, torch <= 2.10's SDPA on an H100; triton); default the calibration's own points.")


def calibration_choice(calibration: str, hardware: str, attention_kernel: Optional[str]):
    """What the API takes as `calibration`: the option as given, or with --attention-kernel
    the loaded calibration with that kernel's points (a one-line error when it has none)."""
    if not attention_kernel:
        return calibration
    from flopsim.calibration import load_calibration
    from flopsim.hardware import load_hardware

    return load_calibration(calibration, load_hardware(hardware), attention_kernel=attention_kernel)
