"""Predictions re-made for a saved validation: `flopsim validate --measurements DIR`.

A validation folder (flopsim.validate.write_report) keeps everything that
was measured: each model's timed runs and the drift probe's reading beside
them (per_model.csv), each module's profiled time and aten ops
(per_op.csv), and the suite, device and hardware spec (summary.json). This
module reads them back, predicts every case again with another calibration
(or a changed model of the costs) and writes a new folder of the same form,
so a GPU's measurements can be compared with predictions long after the GPU
is gone. The cases are rebuilt from the suite file; a case whose name or
shape no longer matches the measurements is an error, never a silent join.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from flopsim.errors import InputError

NEEDED = ("summary.json", "per_model.csv", "per_op.csv")


def _read_folder(folder: Path):
    import pandas as pd

    for name in NEEDED:
        if not (folder / name).is_file():
            raise InputError(f"measurements: {str(folder)!r}: no {name} (a folder written by flopsim validate)")
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        per_model = pd.read_csv(folder / "per_model.csv")
        per_op = pd.read_csv(folder / "per_op.csv", keep_default_na=False)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise InputError(f"measurements: {str(folder)!r}: unreadable ({type(err).__name__})") from None
    return summary, per_model, per_op


def _measured(row, case, per_op):
    """The Measured of one per_model row (flopsim.validate.Measured)."""
    from flopsim.probe import ProbeReading
    from flopsim.validate import Measured

    if (int(row.batch), int(row.seq)) != (case.batch, case.seq):
        raise InputError(f"measurements: {row.model} {row.phase}: measured at batch {row.batch}, seq {row.seq}; "
                         f"the suite now says {case.batch}, {case.seq}")
    ops = per_op[(per_op.model == row.model) & (per_op.phase == row.phase)]
    modules = {m: float(t) for m, t in zip(ops.module, ops.measured_s)}
    aten = {m: str(a).split() for m, a in zip(ops.module, ops.aten_ops)}
    runs = [float(t) for t in str(row.measured_runs_s).split(";")]
    probe = str(getattr(row, "probe", "") or "")
    reading = ProbeReading(*(float(v) for v in probe.split(";"))) if probe.count(";") == 2 else None
    context = case.context if row.phase == "decode" else None
    queued = {}
    if str(getattr(row, "measured_device_runs_s", "") or "").strip() not in ("", "nan"):  # a GPU's two sides
        queued = dict(device_runs=[float(t) for t in str(row.measured_device_runs_s).split(";")],
                      host_runs=[float(t) for t in str(row.measured_host_runs_s).split(";")],
                      host_waits=str(row.host_waits).strip().lower() == "true")
    counted = str(getattr(row, "measured_faults", "") or "").strip()
    faults = [int(float(f)) for f in counted.split(";")] if counted not in ("", "nan") else []
    return Measured(context, (modules, aten), runs, reading, faults=faults, **queued)


def repredict(folder, calibration=None, hardware: Optional[str] = None):
    """A flopsim.validate.Validation: the measurements saved in `folder` joined with
    predictions made now with `calibration` (None: the folder's calibration.yaml)."""
    from flopsim.calibration import load_calibration
    from flopsim.hardware import load_hardware
    from flopsim.validate import Validation, join_measurements, load_suite

    folder = Path(folder)
    summary, per_model, per_op = _read_folder(folder)
    device, suite = summary["device"], summary["suite"]
    hw = load_hardware(hardware or summary["hardware"])
    if calibration is None:
        calibration = str(folder / "calibration.yaml")
    cal = load_calibration(calibration, hw)
    cases = {case.name: case for case in load_suite(suite, device)}
    jobs, measured = [], []
    for row in per_model.itertuples():
        if row.model not in cases:
            raise InputError(f"measurements: model {row.model!r} is not in suite {suite!r} any more")
        jobs.append((cases[row.model], row.phase))
        measured.append(_measured(row, cases[row.model], per_op))
    out = Validation(device=device, hardware=hw.name, suite=suite, calibration=cal)
    join_measurements(out, list(cases.values()), jobs, measured, hw, cal)
    kept = ("torch", "date", "threads", "device_name", "environment", "timing_rounds", "timing_warmup_s",
            "calibrated_in_run")
    out.meta = {**{key: summary[key] for key in kept if key in summary},
                "calibration": cal.source, "calibration_kind": cal.kind, "calibration_gemm_points": len(cal.gemm),
                "repredicted_from": str(folder)}
    return out
