"""`flopsim validate`: predictions against measured torch.profiler runs.

For each case of a suite (specs/validation/<suite>.yaml: one model per
family and variant, each with the dense baseline it saves compute over), on
`--device cpu|cuda`:
1. the calibration for the device is the measured one in
   specs/calibration/<hardware>.yaml, or is measured first
   (flopsim.calibrate) when that file holds no measurement or with
   `recalibrate`; one measured here is written into the report folder
   only, never over the device's file in specs/;
2. the reference model runs each phase (flopsim.profiling): per-module
   times under torch.profiler, then end-to-end times of unprofiled runs,
   measured round-robin over all cases (`rounds` passes, each back-to-back
   warm-up runs for `flopsim.profiling.WARMUP_S` and two timed runs) so
   that each case samples the whole measurement period of a host whose speed
   drifts, in the steady state of a step run back to back; the median is the
   measured time. On a CPU each case runs in a process of its own
   (flopsim.case_process: a step's time depends on its process's heap), and
   each timed run's minor page faults are kept (`faulted_mb`);
3. flopsim.predict costs the same phase and shape on the device's hardware
   spec with that calibration, and the two are joined on module paths
   (flopsim.profiling's docstring says how torch ops map to flopsim ops).

Errors are (predicted - measured) / measured. Written to
reports/validation/<device>/: per_op.csv (module rows: leaf matrix products
are the per-GEMM join), per_model.csv (end to end), speedups.csv (each
conditional model over its dense baseline, predicted and measured),
summary.json, summary.md, plots and calibration.yaml (the calibration the
predictions used). This host's speed drifts by several percent over
minutes, so `--recalibrate` (calibrate in the same run) gives the fairest
figures. Calibration shapes and validation shapes
are kept disjoint (checked; see `overlapping_shapes`).
"""

from __future__ import annotations

import datetime as _dt
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from flopsim.errors import InputError
from flopsim.spec.paths import exists

GEMM_KINDS = ("matmul", "router")
ROUNDS = 5  # round-robin passes over the cases when timing them (flopsim.profiling.time_rounds)
PHASES = ("forward", "prefill", "decode", "train")
SUMMARY_KEYS = ("device", "torch", "date", "median_abs_error_e2e", "p90_abs_error_e2e", "median_abs_error_gemm",
                "median_abs_error_speedup")


@dataclass
class Case:
    name: str
    spec: object
    phases: list
    batch: int
    seq: int
    context: int
    baseline: Optional[str] = None


def suite_path(suite: str) -> Path:
    from flopsim.spec.paths import specs_dir

    path = Path(suite)
    if path.suffix in (".yaml", ".yml"):
        return path
    return specs_dir() / "validation" / f"{suite}.yaml"


def load_suite(suite: str, device: str) -> list[Case]:
    """The cases of a suite for a device (its size and dtype changes applied)."""
    from flopsim.spec import load_model

    path = suite_path(suite)
    if not exists(path):
        raise InputError(f"suite: {suite!r}: no such suite ({path} does not exist; suites: quick, full)")
    from flopsim.spec.reading import parse_yaml, read_input_text

    data = parse_yaml(read_input_text(path, "validation suite"), str(path))
    device_changes = dict(data.get("devices", {}).get(device, {}))
    device_shape = device_changes.pop("shape", {})  # a device's own shape (a GPU's work must outweigh its host's)
    cases = []
    for raw in data["cases"]:
        base = data["bases"][raw["base"]]
        spec = load_model(base["preset"]).with_changes(
            name=f"{raw['name']}", **{**base.get("changes", {}), **device_changes, **raw.get("changes", {})})
        shape = {**data.get("shape", {}), **device_shape, **raw.get("shape", {})}
        cases.append(Case(raw["name"], spec, list(raw["phases"]), shape["batch"], shape["seq"],
                          shape["context"], raw.get("baseline")))
    return cases


def _context(phase: str, case: Case) -> Optional[int]:
    return case.context if phase == "decode" else None


def predicted_modules(spec, phase, batch, seq, context, hw, calibration):
    """(PredictResult, {module: predicted seconds}, {module: [op rows]}) -- ops joined to modules."""
    from flopsim.count import count
    from flopsim.predict import predict

    result = predict(spec, hw, phase=phase, batch=batch, seq=seq, context=context, calibration=calibration)
    costs = count(spec, batch=batch, seq=seq, phase=phase, context=context).ops
    per_module: dict[str, float] = {}
    members: dict[str, list] = {}
    for cost, timed in zip(costs, result.ops):
        if (cost.name, cost.pass_) != (timed.name, timed.pass_):
            raise RuntimeError(f"op lists of count and predict disagree at {cost.key} / {timed.key}")
        per_module[cost.module] = per_module.get(cost.module, 0.0) + timed.device_s  # the profiler's device time
        members.setdefault(cost.module, []).append((cost, timed))
    return result, per_module, members


def overlapping_shapes(calibration, gemm_shapes) -> list:
    """Validation GEMM shapes (batch, m, n, k) that are also calibration points."""
    measured = {(p.batch, p.m, p.n, p.k) for p in calibration.gemm}
    return sorted(set(gemm_shapes) & measured)


def _signed_median(values):
    return float(__import__("numpy").median(values)) if values else float("nan")


def _abs_quantile(values, q):
    values = sorted(abs(v) for v in values)
    if not values:
        return float("nan")
    return float(__import__("numpy").quantile(values, q))


@dataclass
class Validation:
    device: str
    hardware: str
    suite: str
    per_op: list = field(default_factory=list)
    per_model: list = field(default_factory=list)
    speedups: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    calibration: object = None  # the Calibration the predictions used

    def summary(self) -> dict:
        e2e = [r["error"] for r in self.per_model]
        forward = [r["error"] for r in self.per_model if r["phase"] == "forward"]
        gemm = [r["error"] for r in self.per_op if r["gemm"]]
        speed = [r["error"] for r in self.speedups]
        queued = [r for r in self.per_model if r.get("device_error", "") != ""]
        free = [r for r in queued if not r["host_waits"]]  # steps that queue ahead freely
        host = [r["host_error"] for r in free if r["host_error"] != ""]
        kinds = sorted({r["kind"] for r in self.per_op})
        by_kind = {k: {"median_abs_error": _abs_quantile([r["error"] for r in self.per_op if r["kind"] == k], 0.5),
                       "p90_abs_error": _abs_quantile([r["error"] for r in self.per_op if r["kind"] == k], 0.9),
                       "modules": sum(1 for r in self.per_op if r["kind"] == k)} for k in kinds}
        by_phase = {p: {"median_abs_error": _abs_quantile([r["error"] for r in self.per_model if r["phase"] == p], 0.5),
                        "median_abs_error_probe": _abs_quantile(
                            [r.get("error_probe", r["error"]) for r in self.per_model if r["phase"] == p], 0.5),
                        "median_signed_error": _signed_median([r["error"] for r in self.per_model if r["phase"] == p]),
                        "max_abs_error": _abs_quantile([r["error"] for r in self.per_model if r["phase"] == p], 1.0),
                        "cases": sum(1 for r in self.per_model if r["phase"] == p)}
                    for p in sorted({r["phase"] for r in self.per_model})}
        by_family = {}
        for r in self.per_model:
            by_family.setdefault(r["family"], {}).setdefault(r["phase"], []).append(r["error"])
        by_family = {f: {p: {"median_abs_error": _abs_quantile(v, 0.5), "cases": len(v)} for p, v in phases.items()}
                     for f, phases in sorted(by_family.items())}
        return {
            **self.meta,
            "device": self.device, "hardware": self.hardware, "suite": self.suite,
            "median_abs_error_e2e": _abs_quantile(e2e, 0.5),
            "median_abs_error_e2e_probe": _abs_quantile([r.get("error_probe", r["error"]) for r in self.per_model],
                                                        0.5),
            "p90_abs_error_e2e": _abs_quantile(e2e, 0.9),
            "median_abs_error_e2e_forward": _abs_quantile(forward, 0.5),
            "median_abs_error_gemm": _abs_quantile(gemm, 0.5),
            "p90_abs_error_gemm": _abs_quantile(gemm, 0.9),
            "median_abs_error_speedup": _abs_quantile(speed, 0.5),
            "median_abs_error_device": _abs_quantile([r["device_error"] for r in free], 0.5),
            "median_signed_error_device": _signed_median([r["device_error"] for r in free]),
            "median_abs_error_host": _abs_quantile(host, 0.5),
            "median_signed_error_host": _signed_median(host),
            "queued_cases": len(free), "queued_cases_host_waits": len(queued) - len(free),
            "p90_abs_error_speedup": _abs_quantile(speed, 0.9),
            "cases": len(self.per_model), "gemm_ops": len(gemm), "speedups": len(speed),
            "by_kind": by_kind, "by_phase": by_phase, "by_family": by_family,
        }


@dataclass
class Measured:
    """What was measured of one (case, phase): its context, the profiled modules
    (({module: seconds}, {module: aten op names})), the timed runs and the drift
    probe's median reading beside them (None without a probe)."""

    context: Optional[int]
    modules: tuple
    runs: list
    reading: object = None
    device_runs: list = field(default_factory=list)  # a GPU: device seconds per step, queued (profiling.time_queued)
    host_runs: list = field(default_factory=list)  # a GPU: host seconds per step spent queueing it
    host_waits: bool = False  # the step synchronises inside (its queued times are upper bounds)
    faults: list = field(default_factory=list)  # minor page faults of each timed run (its process's)


def join_measurements(out: "Validation", cases: list, jobs: list, measured: list, hw, cal) -> list:
    """Predict each job (case, phase) with `cal` and join it with its Measured into `out`'s
    rows (per model, per module, speedups); returns the validation's GEMM shapes."""
    results, gemm_shapes = {}, []
    for (case, phase), seen in zip(jobs, measured):
        result, predicted, members = predicted_modules(case.spec, phase, case.batch, case.seq, seen.context, hw, cal)
        at_speed = (predicted_modules(case.spec, phase, case.batch, case.seq, seen.context, hw,
                                      cal.at_speed(seen.reading))[0] if seen.reading else None)  # beside the runs
        results[(case.name, phase)] = (result.time_s, statistics.median(seen.runs))
        out.per_model.append({**_model_row(case, phase, result, seen.runs, at_speed, seen.reading, seen.faults),
                              **_queued_columns(result, seen)})
        out.per_op += _op_rows(case, phase, seen.modules, predicted, members, gemm_shapes)
    out.speedups = _speedup_rows(cases, results)
    return gemm_shapes


def check_inputs(device: str, suite: str) -> None:
    """Bad device or suite: one-line errors before any work starts."""
    if device not in ("cpu", "cuda"):
        raise InputError(f"device: {device!r}: expected cpu or cuda")
    if not exists(suite_path(suite)):
        raise InputError(f"suite: {suite!r}: no such suite ({suite_path(suite)} does not exist; suites: quick, full)")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InputError("device: 'cuda': torch sees no CUDA device here")


def run_validation(device: str = "cpu", suite: str = "quick", *, hardware: Optional[str] = None,
                   calibration=None, threads: Optional[int] = None, recalibrate: bool = False,
                   rounds: int = ROUNDS, progress: Optional[Callable[[str, int, int], None]] = None) -> Validation:
    """Calibrate if needed, profile every case, time them round-robin (on a CPU each case
    in a process of its own), predict, and join."""
    from flopsim.calibrate import measurement_environment

    environment = measurement_environment()
    import torch

    from flopsim.calibrate import device_name, guess_hardware
    from flopsim.hardware import load_hardware
    from flopsim.probe import median_reading, smoothed_round_robin
    from flopsim.case_process import close_all
    from flopsim.profiling import WARMUP_S, time_rounds

    check_inputs(device, suite)
    hw = load_hardware(hardware or guess_hardware(device))
    if threads is not None:
        torch.set_num_threads(threads)
    cases = load_suite(suite, device)
    tick = progress or (lambda message, done, total: None)
    cal, calibrated_here = _calibration(device, hw, calibration, recalibrate, threads, tick)
    out = Validation(device=device, hardware=hw.name, suite=suite, calibration=cal)
    jobs = [(case, phase) for case in cases for phase in case.phases]
    workers, runners = _runners(device, cases, jobs, tick)
    try:
        probe = _probe(device, cal, hw)
        walls, readings = time_rounds(runners, rounds=rounds, progress=tick, probe=probe)
    finally:
        close_all(workers)
    readings = smoothed_round_robin(readings)  # the drift, not the previous model's aftermath
    measured = [Measured(runner.context, runner.modules, runs, median_reading(seen) if seen else None,
                         faults=list(runner.faults))
                for runner, runs, seen in zip(runners, walls, readings)]
    if device == "cuda":
        _time_queued(runners, measured, tick)
    gemm_shapes = join_measurements(out, cases, jobs, measured, hw, cal)
    tick("done", len(jobs), len(jobs))
    overlap = overlapping_shapes(cal, gemm_shapes)
    if overlap:
        raise RuntimeError(f"validation GEMM shapes {overlap[:3]} are calibration points: pick other shapes")
    out.meta = {
        "torch": torch.__version__, "date": _dt.date.today().isoformat(), "threads": torch.get_num_threads(),
        "device_name": device_name(device), "calibration": cal.source, "calibration_kind": cal.kind,
        "calibration_gemm_points": len(cal.gemm), "validation_gemm_shapes": len(set(gemm_shapes)),
        "calibrated_in_run": calibrated_here, "environment": environment, "timing_rounds": rounds,
        "timing_warmup_s": WARMUP_S, "process_per_case": device == "cpu",
    }
    return out


def _runners(device: str, cases: list, jobs: list, tick) -> tuple[list, list]:
    """(worker processes, runners) of every (case, phase), built and profiled. A CPU's
    cases run each in a process of its own (flopsim.case_process: a CPU step's time
    depends on its process's heap); a GPU's in this one."""
    import torch

    from flopsim.profiling import make_runner, profile_modules

    if device == "cpu":
        from flopsim.case_process import start_cases

        return start_cases(cases, _context, device, torch.get_num_threads(), tick)
    runners = []
    for done, (case, phase) in enumerate(jobs):
        tick(f"profiling {case.name} {phase}", done, len(jobs))
        runner = make_runner(case.spec, phase, case.batch, case.seq, _context(phase, case), device=device)
        runner.modules = profile_modules(runner)
        runners.append(runner)
    return [], runners


def _time_queued(runners: list, measured: list, tick) -> None:
    """Each GPU step's device and host seconds, apart (flopsim.profiling.time_queued),
    into its Measured; nothing where the spin kernel is unavailable."""
    import torch

    from flopsim.gpu_timing import DeviceClock
    from flopsim.profiling import time_queued

    clock = DeviceClock.create(torch)
    if clock is None:
        return
    for i, (runner, seen) in enumerate(zip(runners, measured)):
        tick(f"queued timing: {runner.spec.name} {runner.phase}", i, len(runners))
        seen.device_runs, seen.host_runs, seen.host_waits = time_queued(runner, clock)


def _queued_columns(result, seen: Measured) -> dict:
    """A model row's device and host sides, predicted and measured apart (a GPU's queued
    timing; empty values where none was taken)."""
    if not seen.device_runs:
        return dict.fromkeys(("measured_device_s", "device_error", "measured_host_s", "host_error", "host_waits",
                              "measured_device_runs_s", "measured_host_runs_s"), "")
    device_s, host_s = statistics.median(seen.device_runs), statistics.median(seen.host_runs)
    predicted_device, predicted_host = result.total("device_s"), result.total("host_s")
    return {"measured_device_s": device_s, "device_error": predicted_device / device_s - 1,
            "measured_host_s": host_s, "host_error": (predicted_host / host_s - 1) if predicted_host else "",
            "host_waits": seen.host_waits,
            "measured_device_runs_s": ";".join(f"{t:.17g}" for t in seen.device_runs),
            "measured_host_runs_s": ";".join(f"{t:.17g}" for t in seen.host_runs)}


def _calibration(device, hw, calibration, recalibrate: bool, threads, tick):
    """(the calibration to predict with, whether it was measured in this run). One
    measured here goes into the report folder (calibration.yaml) only: a validation never
    replaces the device's calibration in specs/ (`flopsim calibrate` writes that one)."""
    from flopsim.calibrate import calibrate
    from flopsim.calibration import load_calibration

    if calibration is not None:
        return load_calibration(calibration, hw), False
    cal = load_calibration("auto", hw)
    if recalibrate or cal.measured is None:
        tick("calibrating", 0, 1)
        cal, _ = calibrate(device, hardware=hw.name, threads=threads)
        return cal, True
    return cal, False


def _probe(device: str, cal, hw):
    """A drift probe (flopsim.probe) when the calibration holds a reference reading, else None."""
    if not (cal.measured or {}).get("probe"):
        return None
    import torch

    from flopsim.calibrate import POOL_BYTES, last_level_cache_bytes
    from flopsim.probe import Probe
    from flopsim.torchref.model import torch_dtype

    dtype = torch_dtype(cal.measured.get("dtype", "fp32"))
    cache = last_level_cache_bytes(hw) if device == "cpu" else float(hw.last_level_cache_bytes or 64e6)
    low, high = POOL_BYTES[device]
    pool_bytes = min(max(2 * cache, low), high)
    gen = torch.Generator(device="cpu").manual_seed(1)
    pool = torch.randn(int(pool_bytes / torch.finfo(dtype).bits * 8), generator=gen).to(device=device, dtype=dtype)
    clock = None
    if device == "cuda" and str(cal.measured.get("timing", "")).startswith("device"):  # read as calibrate read it
        from flopsim.gpu_timing import DeviceClock

        clock = DeviceClock.create(torch)
    return Probe(torch, device, dtype, pool, gen, clock=clock)


def _model_row(case, phase, result, runs, at_speed=None, reading=None, faults=()) -> dict:
    """One end-to-end row: `result` predicted with the calibration as measured (at the
    median host speed of its measurement), `at_speed` at the speed the drift probe read
    beside these runs (`reading`; flopsim.probe), for comparison; `faults`: the minor
    page faults of each timed run (`faulted_mb`: their median in MB, what the process
    mapped in afresh during a step; "" when not counted)."""
    import mmap

    measured = statistics.median(runs)
    at_speed = at_speed or result
    return {
        "model": case.name, "family": case.spec.family, "phase": phase, "batch": case.batch,
        "seq": case.seq, "context": result.context, "predicted_s": result.time_s,
        "measured_s": measured, "error": result.time_s / measured - 1,
        "predicted_probe_s": at_speed.time_s, "error_probe": at_speed.time_s / measured - 1,
        "flops": result.flops, "bytes": result.bytes, "bound": result.bound,
        "predicted_host_s": result.total("host_s"), "predicted_device_s": result.total("device_s"),
        "measured_runs_s": ";".join(f"{t:.17g}" for t in runs),
        "probe": "" if reading is None else f"{reading.compute_s:.4g};{reading.memory_s:.4g};{reading.fixed_s:.4g}",
        "faulted_mb": statistics.median(faults) * mmap.PAGESIZE / 1e6 if faults else "",
        "measured_faults": ";".join(str(int(f)) for f in faults),
    }


def _op_rows(case, phase, profiled, predicted, members, gemm_shapes: list) -> list:
    """Per-module rows joining the profiled times with the predicted ops of each module."""
    modules, aten = profiled
    rows_out = []
    for module, seconds in sorted(modules.items()):
        if module not in predicted or seconds <= 0:
            continue
        rows = members[module]
        kinds = {cost.kind for cost, _ in rows}
        main = max(rows, key=lambda pair: pair[1].time_s)[0]
        is_gemm = len(rows) == 1 and main.kind in GEMM_KINDS
        if is_gemm and main.gemm is not None:
            gemm_shapes.append(tuple(int(v) for v in main.gemm))
        rows_out.append({
            "model": case.name, "phase": phase, "module": module, "kind": main.kind,
            "ops": " ".join(cost.name.rsplit(".", 1)[-1] for cost, _ in rows), "kinds": " ".join(sorted(kinds)),
            "gemm": is_gemm, "gemm_shape": "x".join(str(int(v)) for v in main.gemm) if main.gemm else "",
            "predicted_s": predicted[module], "measured_s": seconds,
            "error": predicted[module] / seconds - 1, "aten_ops": " ".join(aten.get(module, [])),
        })
    return rows_out


def _speedup_rows(cases, results: dict) -> list:
    """Each conditional model over its dense baseline, predicted and measured, per phase."""
    out = []
    by_name = {case.name: case for case in cases}
    for case in cases:
        for phase in case.phases if case.baseline else []:
            if (case.baseline, phase) not in results:
                continue
            base_pred, base_meas = results[(case.baseline, phase)]
            pred, meas = results[(case.name, phase)]
            out.append({
                "model": case.name, "baseline": case.baseline, "family": by_name[case.name].spec.family,
                "phase": phase, "predicted_speedup": base_pred / pred, "measured_speedup": base_meas / meas,
                "error": (base_pred / pred) / (base_meas / meas) - 1,
            })
    return out


def write_calibration(cal, path: Path) -> None:
    import yaml

    from flopsim.outputs import write_atomic

    header = ("# Measured by `flopsim calibrate` (flopsim.calibrate); regenerate with\n"
              f"# `flopsim calibrate --device {cal.measured.get('device', 'cpu') if cal.measured else 'cpu'}`.\n")
    write_atomic(Path(path), header + yaml.safe_dump(json.loads(cal.model_dump_json()), sort_keys=False))


def write_report(validation: Validation, out_dir: Path) -> dict:
    """CSVs, summary.json, summary.md and plots into out_dir (each file atomically)."""
    import pandas as pd

    from flopsim.outputs import write_atomic

    out_dir = Path(out_dir)
    summary = validation.summary()
    for name, rows in (("per_op", validation.per_op), ("per_model", validation.per_model),
                       ("speedups", validation.speedups)):
        write_atomic(out_dir / f"{name}.csv", pd.DataFrame(rows).to_csv(index=False))
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2, default=float) + "\n")
    if validation.calibration is not None:  # the calibration these predictions used, kept with them
        write_calibration(validation.calibration, out_dir / "calibration.yaml")
    write_atomic(out_dir / "summary.md", summary_markdown(validation, summary))
    plot_validation(validation, out_dir)
    return summary


def percent(x) -> str:
    """A fraction as a percentage with one decimal; "-" where it is NaN (nothing to score)."""
    return "-" if x != x else f"{100 * x:.1f}%"


def _queued_lines(summary: dict) -> list:
    """The summary table's rows for a GPU's two sides, timed apart (none elsewhere)."""
    if not summary.get("queued_cases") and not summary.get("queued_cases_host_waits"):
        return []
    waits = summary.get("queued_cases_host_waits", 0)
    note = f" ({waits} more synchronise inside: left out)" if waits else ""
    return [f"| device time per step, queued (host left out){note} | {percent(summary['median_abs_error_device'])} "
            f"(signed {percent(summary['median_signed_error_device'])}) | | {summary['queued_cases']} |",
            f"| host time per step (dispatch alone){note} | {percent(summary['median_abs_error_host'])} "
            f"(signed {percent(summary['median_signed_error_host'])}) | | {summary['queued_cases']} |"]


def summary_markdown(validation: Validation, summary: dict, images: bool = True) -> str:
    """summary.md; `images`: embed the static figures (the page draws its own instead)."""
    lines = [
        f"# flopsim validation: {summary['device']} ({summary.get('device_name', '')})",
        "",
        f"Suite `{summary['suite']}`, hardware spec `{summary['hardware']}`, torch {summary['torch']}, "
        f"{summary.get('threads')} threads, {summary['date']}. Calibration: {summary.get('calibration')}.",
        "",
        (f"Predicted again for the measurements in `{summary['repredicted_from']}`: "
         f"`flopsim validate --measurements {summary['repredicted_from']} --calibration FILE --out DIR`."
         if summary.get("repredicted_from") else
         f"Reproduce: `flopsim validate --device {summary['device']} --suite {summary['suite']}"
         f"{' --recalibrate' if summary.get('calibrated_in_run') else ''}`."),
        "",
        "| figure | median abs error | p90 abs error | n |",
        "|---|---|---|---|",
        f"| end-to-end time, all phases | {percent(summary['median_abs_error_e2e'])} | {percent(summary['p90_abs_error_e2e'])} | {summary['cases']} |",
        f"| end-to-end time, forward | {percent(summary['median_abs_error_e2e_forward'])} | | {summary['by_phase'].get('forward', {}).get('cases', 0)} |",
        f"| per GEMM op | {percent(summary['median_abs_error_gemm'])} | {percent(summary['p90_abs_error_gemm'])} | {summary['gemm_ops']} |",
        f"| speedup over dense | {percent(summary['median_abs_error_speedup'])} | {percent(summary['p90_abs_error_speedup'])} | {summary['speedups']} |",
        *_queued_lines(summary),
        "",
        "## By phase (end to end)",
        "",
        "Predicted with the calibration as measured (its points scaled to the median host speed "
        "of its measurement, flopsim.probe); the last column predicts each model at the speed the "
        "drift probe read beside its own runs instead.",
        "",
        "| phase | median abs error | median signed error | worst abs error | cases | median abs error, at the probed speed |",
        "|---|---|---|---|---|---|",
        *[f"| {p} | {percent(v['median_abs_error'])} | {percent(v['median_signed_error'])} | {percent(v['max_abs_error'])} | "
          f"{v['cases']} | {percent(v['median_abs_error_probe'])} |"
          for p, v in summary["by_phase"].items()],
        "",
        "## By family and phase (median abs error, end to end)",
        "",
        "| family | " + " | ".join(PHASES) + " |",
        "|---|" + "---|" * len(PHASES),
        *[f"| {f} | " + " | ".join(percent(v[p]["median_abs_error"]) if p in v else "-" for p in PHASES) + " |"
          for f, v in summary["by_family"].items()],
        "",
        "## By op kind (module rows)",
        "",
        "| kind | median abs error | p90 abs error | modules |",
        "|---|---|---|---|",
    ]
    for kind, row in summary["by_kind"].items():
        lines.append(f"| {kind} | {percent(row['median_abs_error'])} | {percent(row['p90_abs_error'])} | {row['modules']} |")
    lines += ["", "## End to end", "", "Faulted: the median timed run's minor page faults (pages its process mapped "
              "in afresh), in MB.", "", "| model | phase | predicted | measured | error | faulted |",
              "|---|---|---|---|---|---|"]
    for r in validation.per_model:
        faulted = r.get("faulted_mb", "")
        lines.append(f"| {r['model']} | {r['phase']} | {r['predicted_s'] * 1e3:.3f} ms | {r['measured_s'] * 1e3:.3f} ms | "
                     f"{percent(r['error'])} | {'-' if faulted == '' else f'{faulted:.1f} MB'} |")
    lines += ["", "## Speedup over the dense baseline", "",
              "| model | baseline | phase | predicted | measured | error |", "|---|---|---|---|---|---|"]
    for r in validation.speedups:
        lines.append(f"| {r['model']} | {r['baseline']} | {r['phase']} | {r['predicted_speedup']:.3f} | "
                     f"{r['measured_speedup']:.3f} | {percent(r['error'])} |")
    if images:
        lines += ["", "![predicted vs measured](scatter.png)", "", "![error by op kind](error_by_kind.png)", ""]
    return "\n".join(lines)


def plot_validation(validation: Validation, out_dir: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flopsim.outputs import write_atomic

    def save(fig, name):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
        plt.close(fig)
        write_atomic(Path(out_dir) / name, buf.getvalue())

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    kinds = sorted({r["kind"] for r in validation.per_op})
    colours = plt.cm.tab10.colors
    ax = axes[0]
    for i, kind in enumerate(kinds):
        rows = [r for r in validation.per_op if r["kind"] == kind]
        ax.scatter([r["measured_s"] * 1e3 for r in rows], [r["predicted_s"] * 1e3 for r in rows], s=14,
                   alpha=0.7, color=colours[i % 10], label=f"{kind} ({len(rows)})")
    _diagonal(ax, [r["measured_s"] * 1e3 for r in validation.per_op] + [r["predicted_s"] * 1e3 for r in validation.per_op])
    ax.set(xscale="log", yscale="log", xlabel="measured time per module (ms)", ylabel="predicted time (ms)",
           title=f"Per module, {validation.device} ({validation.hardware})")
    ax.legend(fontsize=8, loc="upper left")
    ax = axes[1]
    phases = sorted({r["phase"] for r in validation.per_model})
    for i, phase in enumerate(phases):
        rows = [r for r in validation.per_model if r["phase"] == phase]
        ax.scatter([r["measured_s"] * 1e3 for r in rows], [r["predicted_s"] * 1e3 for r in rows], s=30,
                   color=colours[i % 10], label=phase)
        for r in rows:
            ax.annotate(r["model"], (r["measured_s"] * 1e3, r["predicted_s"] * 1e3), fontsize=6, alpha=0.7,
                        xytext=(3, 2), textcoords="offset points")
    _diagonal(ax, [r["measured_s"] * 1e3 for r in validation.per_model] + [r["predicted_s"] * 1e3 for r in validation.per_model])
    ax.set(xscale="log", yscale="log", xlabel="measured step time (ms)", ylabel="predicted step time (ms)",
           title="End to end (dashed: +-10%)")
    ax.legend(fontsize=8, loc="upper left")
    save(fig, "scatter.png")

    fig, ax = plt.subplots(figsize=(10, 4.5))
    data = [[100 * r["error"] for r in validation.per_op if r["kind"] == kind] for kind in kinds]
    ax.boxplot(data, showfliers=True)
    ax.set_xticks(range(1, len(kinds) + 1), [f"{k}\n(n={len(d)})" for k, d in zip(kinds, data)], fontsize=8)
    ax.axhline(0, color="black", linewidth=0.8)
    for y in (-15, 15):
        ax.axhline(y, color="grey", linestyle=":", linewidth=0.8)
    ax.set(ylabel="(predicted - measured) / measured (%)",
           title=f"Per-module error by op kind, {validation.device} ({validation.hardware}); dotted: +-15%")
    save(fig, "error_by_kind.png")


def _diagonal(ax, values):
    values = [v for v in values if v > 0]
    if not values:
        return
    lo, hi = min(values) / 1.5, max(values) * 1.5
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8)
    ax.plot([lo, hi], [lo * 1.1, hi * 1.1], color="grey", linestyle="--", linewidth=0.6)
    ax.plot([lo, hi], [lo / 1.1, hi / 1.1], color="grey", linestyle="--", linewidth=0.6)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
