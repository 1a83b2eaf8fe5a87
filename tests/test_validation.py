"""The validation machinery: calibration file round trip, profiler
attribution to flopsim modules, the predicted/measured join, report files
and their schema. No assertion on any timing."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from conftest import tiny
from flopsim.calibration import Calibration, GemmPoint, load_calibration
from flopsim.hardware import load_hardware
from flopsim.validate import (
    SUMMARY_KEYS,
    overlapping_shapes,
    predicted_modules,
    run_validation,
    summary_markdown,
    write_calibration,
    write_report,
)


@pytest.fixture(scope="module")
def smoke_calibration():
    from flopsim.calibrate import calibrate

    cal, points = calibrate("cpu", threads=1, min_time_s=0.001, repeats=2, smoke=True)
    return cal, points


def test_cpu_products_write_their_outputs_cold(monkeypatch):
    """On a CPU each calibration product writes its result into views of an output pool apart
    from the weights' pool, cycled so that consecutive calls write different memory (as a
    step's products write blocks not in cache), not into the block the previous call freed."""
    import torch

    import flopsim.calibrate as C

    bench = C.Bench(torch=torch, device="cpu", dtype="fp32", hw=load_hardware("cpu"), timed=None,
                    pool=torch.randn(1 << 20), say=print, smoke=True, gen=torch.Generator().manual_seed(0))
    timed = []
    monkeypatch.setattr(C, "_time_products", lambda b, label, shapes: timed.extend(shapes))
    C.measure_gemms(bench)
    C.measure_batched_products(bench)
    assert timed and bench.out_pool is not None
    weights_before = bench.pool.clone()
    base = bench.out_pool.data_ptr()
    end = base + bench.out_pool.numel() * 4
    for _, fn, _ in timed:
        first, second = fn(), fn()
        for out in (first, second):
            assert base <= out.data_ptr() < end  # written into the output pool
        if first.numel() * 4 * 2 <= bench.out_pool.numel() * 4:
            assert first.data_ptr() != second.data_ptr()  # consecutive calls write different memory
    assert torch.equal(bench.pool, weights_before)  # the weights are only read


def test_calibrate_measures_every_benchmark_kind(smoke_calibration):
    cal, points = smoke_calibration
    kinds = {p.kind for p in points}
    assert {"matmul", "attention", "elementwise", "norm", "embedding", "gather", "scatter", "topk", "softmax",
            "kv_cache"} <= kinds
    assert any(p.gemm and p.gemm[1] == 1 for p in points if p.kind == "matmul")  # decode-shaped m = 1
    assert all(p.seconds > 0 and p.compute_eff > 0 and p.memory_eff > 0 for p in points)
    assert {g.kind for g in cal.gemm} == {"matmul", "attention"}
    assert {p.kind for p in cal.sizes} >= {"elementwise", "norm", "gather", "scatter", "topk", "softmax"}
    kind_level = [p for p in cal.sizes if p.kind == "elementwise" and p.variant is None and not p.backward]
    assert len(kind_level) == 4  # one per smoke size, plain and as a train step's forward runs them
    assert {p.variant for p in cal.sizes if p.kind == "elementwise"} >= {"gelu", "swiglu", "rope", "add", None}
    assert {p.variant for p in cal.sizes if p.kind == "norm"} == {"layernorm", "rmsnorm", None}
    assert {g.variant for g in cal.gemm if g.kind == "attention"} == {"fused", "explicit"}
    assert cal.measured["threads"] == 1 and cal.measured["device"] == "cpu"
    assert cal.launch_overhead_s == cal.measured["launch_overhead_s"] > 0
    assert cal.kind == "measured" and "OMP_NUM_THREADS" in cal.measured["environment"]
    # backward kernels, fixed costs per kernel (forward and backward), the optimizer
    assert {p.kind for p in cal.sizes if p.backward} >= {"elementwise", "norm", "softmax", "embedding", "loss"}
    assert any(g.backward for g in cal.gemm if g.kind == "attention")
    assert {"matmul", "attention:fused", "norm:rmsnorm", "elementwise:gelu", "norm:layernorm@bwd",
            "optimizer"} <= set(cal.fixed_s)
    assert all(v > 0 for v in cal.fixed_s.values())
    assert any(p.kind == "optimizer" for p in cal.sizes)
    assert all(p.flops is not None for p in cal.sizes)  # each size point's compute coordinate
    # a CPU's fresh pages: above glibc's mapping ceiling, a cost a byte (calibration lookup step 7)
    assert cal.fresh_pages.above_bytes == 32 * 2 ** 20 and cal.fresh_pages.s_per_byte >= 0
    assert "DEFAULT_MMAP_THRESHOLD_MAX" in cal.fresh_pages.source
    # decode-shaped products (m = 1) were measured memory-bound, large ones compute-bound
    assert any(g.memory and not g.compute for g in cal.gemm if g.kind == "matmul" and g.m == 1)
    assert any(g.compute and not g.memory for g in cal.gemm if g.kind == "matmul" and g.m == 24)


def test_calibration_points_reproduce_their_measurement(smoke_calibration):
    """At a measured shape, the ceiling the point was measured against equals
    the measured busy time (time - the kernel's hot fixed cost) scaled to the
    calibration's median host speed (flopsim.probe, the matrix-rate reading):
    the compute term for a point measured compute-bound, the memory term for
    one measured memory-bound (decode shapes, cold weights); where that would beat
    MAX_EFFICIENCY times the spec's ceiling, the capped ceiling."""
    from flopsim.calibration import MAX_EFFICIENCY
    from flopsim.roofline import roofline_time

    cal, points = smoke_calibration
    hw = load_hardware("cpu")
    checked = {True: 0, False: 0}
    for p in points:
        if p.gemm is None or p.kind != "matmul":
            continue
        # a bmm point is one kernel of its batch's products, looked up as such (variant bmm)
        ce, me = cal.efficiency(p.kind, p.gemm, p.bytes, variant=p.variant or None, per_kernel=p.gemm[0])
        compute_s, memory_s, _ = roofline_time(p.all_flops, p.bytes, hw.peak_flops_per_s_for("fp32")[0],
                                               hw.memory_bandwidth_bytes_per_s, ce, me)
        busy = max(p.seconds - p.fixed_s - p.fresh_s, 0.1 * p.seconds)
        # scaled from the host speed the drift probe read beside the point to the calibration's median,
        # by the matrix rate (the cold reads are disturbed by the calibration's own kernels)
        ref = cal.measured["probe"]
        speed = ref["compute_s"] / p.probe.compute_s
        bound = memory_s if p.memory_bound else compute_s
        # an efficiency is capped at MAX_EFFICIENCY as measured and again once scaled to the median
        # speed: a point that ran faster than that (a small weight read from a large last-level
        # cache, against the spec's DRAM bandwidth) keeps the cap (flopsim.calibrate: record, _at_reference)
        floor_s = (p.bytes / hw.memory_bandwidth_bytes_per_s if p.memory_bound else
                   p.all_flops / hw.peak_flops_per_s_for("fp32")[0]) / MAX_EFFICIENCY
        assert bound == pytest.approx(max(floor_s, speed * max(busy, floor_s)), rel=1e-6)
        checked[p.memory_bound] += 1
    assert checked[True] and checked[False]
    assert any(p.variant == "bmm" for p in points if p.gemm is not None)  # batched products checked too


def test_calibration_file_round_trip(tmp_path, smoke_calibration):
    cal, _ = smoke_calibration
    path = tmp_path / "cpu.yaml"
    write_calibration(cal, path)
    assert path.read_text().startswith("# Measured by `flopsim calibrate`")
    again = load_calibration(str(path), load_hardware("cpu"))
    assert again == cal
    assert yaml.safe_load(path.read_text())["measured"]["torch"]


def test_recalibrating_leaves_the_devices_calibration_in_specs_alone(tmp_path, monkeypatch, smoke_calibration):
    """`validate --recalibrate` predicts with what it measured and writes it into its report
    folder; the device's file in specs/ (what every other command reads) is not replaced."""
    import shutil

    import flopsim.calibrate
    from flopsim.spec.paths import specs_dir
    from flopsim.validate import _calibration

    specs = tmp_path / "specs"
    shutil.copytree(specs_dir(), specs)
    monkeypatch.setenv("FLOPSIM_SPECS", str(specs))
    shipped = (specs / "calibration" / "cpu.yaml").read_bytes()
    monkeypatch.setattr(flopsim.calibrate, "calibrate", lambda *a, **k: smoke_calibration)
    cal, measured_here = _calibration("cpu", load_hardware("cpu"), None, True, 1, lambda *a: None)
    assert measured_here and cal is smoke_calibration[0]
    assert (specs / "calibration" / "cpu.yaml").read_bytes() == shipped


def test_overlap_check_finds_shared_shapes():
    cal = Calibration(gemm=[GemmPoint(m=8, n=96, k=96, compute=0.5), GemmPoint(kind="matmul", m=64, n=512, k=512, compute=1)])
    assert overlapping_shapes(cal, [(1, 64, 512, 512), (1, 32, 512, 512)]) == [(1, 64, 512, 512)]


@pytest.mark.parametrize("suite", ["quick", "full"])
def test_suites_load_on_every_device_and_avoid_calibration_shapes(suite):
    """Every device a suite names gets valid specs (a GPU's changes are loaded nowhere
    else before a GPU run), and no validation product is a calibration shape."""
    from flopsim.calibrate import ATTENTION_SHAPES, ATTENTION_SHAPES_GPU, GEMM_GRID
    from flopsim.count import count
    from flopsim.validate import load_suite, suite_path

    devices = yaml.safe_load(suite_path(suite).read_text())["devices"]
    assert set(devices) == {"cpu", "cuda"}
    gpu = load_suite(suite, "cuda")[0]
    assert (gpu.spec.dtype, gpu.batch * gpu.seq) == ("bf16", 4096)  # the device's own shape applies
    for device in devices:  # each device's cases against the shapes its own calibration measures
        rows, outputs, inputs = GEMM_GRID[device]
        calibration = {(1, m, n, k) for m in rows for n in outputs for k in inputs}
        calibration |= {(b * h, s, t, d) for b, h, s, t, d in
                        ATTENTION_SHAPES + (ATTENTION_SHAPES_GPU if device == "cuda" else ())}
        for case in load_suite(suite, device):
            for phase in case.phases:
                ctx = case.context if phase == "decode" else None
                for op in count(case.spec, batch=case.batch, seq=case.seq, phase=phase, context=ctx).ops:
                    if op.gemm:
                        assert tuple(op.gemm) not in calibration, (device, case.name, op.name)
                if "decode" in case.phases and device == "cpu":
                    # a decode step's products have m = its batch: measured at that m (other n and
                    # k), since a CPU library's speed at small m is not monotonic (flopsim.calibrate)
                    assert case.batch in rows, (case.name, case.batch)
        assert {1, 2, 3, 4} <= set(rows)  # every small m measured (flopsim.calibrate.GEMM_ROWS)


def test_predicted_modules_join_ops_to_reference_modules():
    spec = tiny("llama-3-8b", layers=2, kv_heads=2, dtype="fp32")
    result, per_module, members = predicted_modules(spec, "forward", 2, 16, None, load_hardware("cpu"), "ideal")
    assert sum(per_module.values()) == pytest.approx(result.time_s)
    assert [c.name for c, _ in members["block.0.attn.qkv"]] == ["block.0.attn.qkv"]
    assert {c.kind for c, _ in members["block.1.attn"]} == {"attention", "elementwise"}  # core, rope


def test_profiler_attributes_aten_ops_to_flopsim_modules():
    from flopsim.families import build_ops
    from flopsim.profiling import profile_model

    spec = tiny("gpt2-small", dtype="fp32")
    prof = profile_model(spec, "forward", 2, 16, threads=1, warmup=1, repeats=2, profiled_repeats=1)
    op_modules = {op.module for op in build_ops(spec, "forward")}
    linear_modules = {op.module for op in build_ops(spec, "forward") if op.kind == "matmul"}
    assert linear_modules <= set(prof.modules)  # every GEMM was seen in its module's scope
    assert set(prof.modules) <= op_modules | {"head"}  # every measured module has flopsim ops
    assert "aten::scaled_dot_product_attention" in prof.aten_ops["block.0.attn"]
    assert prof.wall_s > 0 and len(prof.wall_runs_s) == 2


SUITE = """
bases:
  d: {preset: decoder-220m, changes: {layers: 2, d_model: 48, heads: 4, d_ff: 80, vocab: 200, max_seq: 512}}
devices:
  cpu: {dtype: fp32}
shape: {batch: 2, seq: 24, context: 40}
cases:
  - {name: dense, base: d, phases: [forward, decode]}
  - {name: mod, base: d, baseline: dense, phases: [forward, decode], changes: {family: mod, mod: {capacity: 0.5, every: 2}}}
  - {name: moe, base: d, baseline: dense, phases: [forward], changes: {family: moe, moe: {experts: 4, top_k: 2, d_expert: 40}}}
"""


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory, smoke_calibration):
    """(folder, summary) of a validation of the tiny suite, written once for the module."""
    cal, _ = smoke_calibration
    tmp_path = tmp_path_factory.mktemp("tiny")
    suite = tmp_path / "tiny.yaml"
    suite.write_text(SUITE)
    result = run_validation("cpu", str(suite), calibration=cal, threads=1)
    return tmp_path, write_report(result, tmp_path / "out")


def test_validation_report_schema(tiny_report, smoke_calibration):
    cal, _ = smoke_calibration
    tmp_path, summary = tiny_report
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"per_op.csv", "per_model.csv", "speedups.csv", "summary.json", "summary.md", "scatter.png",
            "error_by_kind.png", "calibration.yaml"} <= files
    assert load_calibration(str(tmp_path / "out" / "calibration.yaml"), load_hardware("cpu")) == cal
    assert not any(name.endswith(".tmp") for name in files)
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= set(saved) and saved["device"] == "cpu"
    for key in ("median_abs_error_e2e", "p90_abs_error_e2e", "median_abs_error_gemm", "median_abs_error_speedup"):
        assert 0 <= saved[key] < float("inf")
    per_model = pd.read_csv(tmp_path / "out" / "per_model.csv")
    assert len(per_model) == 5 and set(per_model["phase"]) == {"forward", "decode"}
    assert (per_model["error"] - (per_model["predicted_s"] / per_model["measured_s"] - 1)).abs().max() < 1e-9
    per_op = pd.read_csv(tmp_path / "out" / "per_op.csv")
    assert {"model", "phase", "module", "kind", "gemm", "predicted_s", "measured_s", "error"} <= set(per_op.columns)
    assert per_op["gemm"].any() and "block.0.moe.router" in set(per_op["module"])
    speed = pd.read_csv(tmp_path / "out" / "speedups.csv")
    assert set(speed["model"]) == {"mod", "moe"} and set(speed["baseline"]) == {"dense"}
    assert summary["speedups"] == 3
    assert "![predicted vs measured](scatter.png)" in (tmp_path / "out" / "summary.md").read_text()


def test_cpu_cases_are_timed_each_in_a_process_of_its_own(tiny_report):
    """A CPU step's time depends on its process's heap, so the CPU validation builds,
    profiles and times each case in a worker process of its own (flopsim.case_process),
    one at a time; each timed run's minor page faults come back with its time."""
    import os
    from types import SimpleNamespace

    from flopsim.case_process import close_all, start_cases
    from flopsim.profiling import time_rounds
    from flopsim.validate import _context, load_suite

    cases = load_suite(str(tiny_report[0] / "tiny.yaml"), "cpu")[:2]
    started = []
    workers, runners = start_cases(cases, _context, "cpu", 1, tick=lambda message, done, total: started.append(done))
    try:
        assert [(r.spec.name, r.phase) for r in runners] == [(c.name, p) for c in cases for p in c.phases]
        pids = {r.worker.process.pid for r in runners}
        assert len(pids) == len(cases) and os.getpid() not in pids  # one process per case, not this one
        assert sorted(_case_processes()) == sorted(str(pid) for pid in pids)
        assert all(r.worker is runners[0].worker for r in runners[:len(cases[0].phases)])  # a case's phases share it
        assert started == [0, len(cases[0].phases)]  # one case at a time
        assert all("block.0.attn" in r.modules[0] for r in runners)  # profiled there
        probe = SimpleNamespace(read=lambda: "reading")
        walls, readings = time_rounds(runners, rounds=2, repeats=2, probe=probe)
        assert all(len(w) == 4 and min(w) > 0 for w in walls) and readings == [["reading"] * 2] * len(runners)
        assert all(len(r.faults) == 4 and min(r.faults) >= 0 for r in runners)
    finally:
        close_all(workers)
    assert not any(w.alive for w in workers)
    saved = pd.read_csv(tiny_report[0] / "out" / "per_model.csv")
    counted = [[int(f) for f in str(row).split(";")] for row in saved["measured_faults"]]
    assert all(len(c) == len(str(r).split(";")) for c, r in zip(counted, saved["measured_runs_s"]))
    import mmap
    import statistics
    assert list(saved["faulted_mb"]) == pytest.approx([statistics.median(c) * mmap.PAGESIZE / 1e6 for c in counted])


def test_a_case_that_fails_in_its_process_is_reported_with_its_traceback(tiny_report):
    """A worker's error reaches the parent as a RuntimeError naming the case, with the
    worker's traceback, and no worker process is left running."""
    from flopsim.case_process import start_cases
    from flopsim.validate import _context, load_suite

    cases = load_suite(str(tiny_report[0] / "tiny.yaml"), "cpu")[:2]
    with pytest.raises(RuntimeError, match=r"validation case dense failed in its process:\n(.|\n)*Traceback"):
        start_cases(cases, _context, "no-such-device", 1)  # torch refuses the device there
    assert not _case_processes()


def _case_processes() -> list:
    """This process's children running flopsim.case_process (from /proc)."""
    import os
    from pathlib import Path

    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
        if parent == os.getpid() and "flopsim.case_process" in command:
            found.append(proc.name)
    return found


def test_saved_measurements_predict_again(tiny_report, tmp_path):
    """`validate --measurements`: with the folder's own calibration the folder's predictions
    come back exactly; with another one the measurements stay and the predictions move."""
    from typer.testing import CliRunner

    from flopsim.cli import app
    from flopsim.repredict import repredict

    folder = tiny_report[0] / "out"
    again = repredict(folder)
    saved = pd.read_csv(folder / "per_model.csv")
    assert [r["predicted_s"] for r in again.per_model] == pytest.approx(list(saved["predicted_s"]), rel=1e-12)
    assert [r["measured_s"] for r in again.per_model] == pytest.approx(list(saved["measured_s"]), rel=1e-12)
    ops = pd.read_csv(folder / "per_op.csv")
    assert [r["predicted_s"] for r in again.per_op] == pytest.approx(list(ops["predicted_s"]), rel=1e-12)
    assert len(again.speedups) == len(pd.read_csv(folder / "speedups.csv"))
    slower = again.calibration.model_copy(update={"fixed_s": {k: 2 * v for k, v in again.calibration.fixed_s.items()}})
    moved = repredict(folder, slower)
    assert all(m["predicted_s"] > r["predicted_s"] for m, r in zip(moved.per_model, again.per_model))
    assert [m["measured_s"] for m in moved.per_model] == [r["measured_s"] for r in again.per_model]
    r = CliRunner().invoke(app, ["validate", "--measurements", str(folder), "--out", str(tmp_path / "again"), "-f", "json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["median_abs_error_e2e"] == pytest.approx(tiny_report[1]["median_abs_error_e2e"])
    assert "Predicted again for the measurements" in (tmp_path / "again" / "summary.md").read_text()
    for args in (["--measurements", str(tmp_path / "none"), "--out", str(tmp_path / "x")],
                 ["--measurements", str(folder)]):
        r = CliRunner().invoke(app, ["validate", *args])
        assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output
    assert not (tmp_path / "x").exists()


def test_validate_cli_bad_input():
    from typer.testing import CliRunner

    from flopsim.cli import app

    r = CliRunner().invoke(app, ["validate", "--device", "tpu"])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    r = CliRunner().invoke(app, ["validate", "--suite", "nope"])
    assert r.exit_code == 2 and "no such suite" in r.stderr


def test_gemms_into_needs_a_measured_calibration_of_this_device():
    from typer.testing import CliRunner

    from flopsim.cli import app

    r = CliRunner().invoke(app, ["calibrate", "--gemms-into", "specs/calibration/h100-sxm.yaml"])
    assert r.exit_code == 2 and "a published calibration of 'h100-sxm'" in r.stderr and r.stderr.count("\n") == 1
    r = CliRunner().invoke(app, ["calibrate", "--device", "cpu", "--gemms-into", "specs/calibration/h200-eager.yaml"])
    assert r.exit_code == 2 and "gemms-into" in r.stderr and r.stderr.count("\n") == 1


def test_gemms_into_replaces_the_products_and_the_fixed_costs(smoke_calibration):
    """`--gemms-into` re-measures the fixed costs and the forward products of a measured
    calibration and keeps everything else (attention, memory-bound sizes, links)."""
    from flopsim.calibrate import calibrate

    base, _ = smoke_calibration
    planted = base.model_copy(update={"fixed_s": {k: 1.0 for k in base.fixed_s}, "launch_overhead_s": 1.0})
    cal, _ = calibrate("cpu", threads=1, min_time_s=0.001, repeats=2, smoke=True, gemms_into=planted)
    fresh = [k for k in cal.fixed_s if "@bwd" not in k and k != "optimizer"]  # nor backward kernels, nor Adam
    assert set(cal.fixed_s) == set(base.fixed_s) and fresh and max(cal.fixed_s[k] for k in fresh) < 1.0
    assert cal.launch_overhead_s < 1.0
    assert cal.sizes == base.sizes and [p for p in cal.gemm if p.kind == "attention"] == [
        p for p in base.gemm if p.kind == "attention"]
    assert "re-measured" in cal.source and cal.measured["gemms_remeasured"]["points"] > 0


def test_the_h200_calibrations_are_measured_and_the_default_is_the_devices_side():
    """The shipped H200 calibrations: eager (measured in one run of the GPU script, products on
    the aligned GPU grid, tinygemm int4 products, host dispatch per kernel apart from the
    device's fixed costs), the default (the same without the host's dispatch) and the
    published seed it replaced."""
    hw = load_hardware("h200")
    eager, default = load_calibration("h200-eager", hw), load_calibration("auto", hw)
    assert eager.kind == default.kind == "measured"
    assert {p.m for p in eager.gemm if p.variant == "int4_weights"} == {1, 16}
    assert {(p.n, p.k) for p in eager.gemm if p.kind == "matmul" and p.m == 8192} <= {
        (n, k) for n in (1, 8, 96, 384, 1408, 5120) for k in (24, 96, 384, 1408, 5120)}
    assert eager.host_s["launch"] > eager.launch_overhead_s > 0 and 0 < eager.graph_launch_s < eager.launch_overhead_s
    assert eager.default.compute == eager.kinds["matmul"].compute
    assert not default.host_s and default.model_copy(update={"host_s": eager.host_s, "source": eager.source}) == eager
    assert load_calibration("h200-published", hw).kind == "published"


def test_a_gpus_two_sides_are_scored_apart(tiny_report, tmp_path):
    """A GPU folder's queued timing (device seconds and host seconds per step, measured
    apart) comes back through `validate --measurements`: each row's device error is the
    predicted device time against the queued one, steps that synchronise inside are left
    out of the median, and the summary names both."""
    import shutil

    from flopsim.repredict import repredict

    folder = tmp_path / "gpu"
    shutil.copytree(tiny_report[0] / "out", folder)
    rows = pd.read_csv(folder / "per_model.csv")
    rows["measured_device_runs_s"] = [f"{2 * t!r};{2 * t!r};{3 * t!r}" for t in rows["predicted_device_s"]]
    rows["measured_host_runs_s"] = "0.001;0.001;0.001"
    rows["host_waits"] = [i == 0 for i in range(len(rows))]
    rows.to_csv(folder / "per_model.csv", index=False)
    again = repredict(folder)
    scored = [r for r in again.per_model if not r["host_waits"]]
    assert [r["device_error"] for r in scored] == pytest.approx([-0.5] * len(scored))  # 1 / median(2, 2, 3) - 1
    summary = again.summary()
    assert summary["median_abs_error_device"] == pytest.approx(0.5)
    assert (summary["queued_cases"], summary["queued_cases_host_waits"]) == (len(rows) - 1, 1)
    assert summary["median_abs_error_host"] != summary["median_abs_error_host"]  # a CPU calibration: no host side
    text = summary_markdown(again, summary)
    assert "device time per step, queued" in text and "1 more synchronise inside" in text
    plain = repredict(tiny_report[0] / "out").summary()
    assert plain["queued_cases"] == 0 and "device time per step" not in summary_markdown(again, plain)


def test_the_weight_gather_is_measured_as_sparse_ff_runs_it(smoke_calibration):
    """The index_2d points: rows of one FF-sized table copied per token, priced with the
    model's op (flopsim.ops.primitives.weight_row_copy, which sparse FF's gather is):
    the distinct rows read once, the copy written, the index read."""
    from flopsim.calibrate import SPARSE_FF_TABLE_ROWS
    from flopsim.families import build_ops
    from flopsim.spec import load_model

    _, points = smoke_calibration
    gathers = sorted((p for p in points if p.kind == "gather" and p.variant == "index_2d" and p.size),
                     key=lambda p: p.size)
    row = 1024 * 4  # fp32 rows of 1024
    # smoke sizes 64 kB and 1 MB of read + write: 7 and 122 rows of 1024 (calibrate._memory_shapes),
    # copied 16 per token: 1 x 16 and 7 x 16 copies
    for p, copies in zip(gathers, (16, 7 * 16)):
        distinct = (p.bytes - copies * (row + 8)) / row  # bytes = copies * (row + index) + distinct * row
        assert distinct == int(distinct) and 1 <= distinct <= min(copies, SPARSE_FF_TABLE_ROWS)
    spec = load_model("decoder-220m").with_changes(family="sparse_ff", sparse_ff={"block_size": 16, "d_lowrank": 32})
    gather = next(op for op in build_ops(spec, "forward") if op.name == "block.0.mlp.up.gather")
    assert (gather.kind, gather.variant, gather.flops) == ("gather", "index_2d", 0)


def test_gather_backward_is_measured_per_kernel(smoke_calibration):
    """The gather kernels' backward per kernel the references run (x[idx]'s index_put_ with
    accumulate runs serially on a CPU, index_select's and torch.gather's in parallel): size
    points and fixed costs of each, and a kind-level fixed cost (their median) for the rest."""
    import statistics

    cal, points = smoke_calibration
    measured = {p.variant for p in points if p.kind == "gather" and p.backward}
    assert measured == {"index", "index_select", "gather"}
    assert {p.variant for p in cal.sizes if p.kind == "gather" and p.backward} == measured | {None}
    per_kernel = [cal.fixed_s[f"gather:{v}@bwd"] for v in sorted(measured)]
    assert cal.fixed_s["gather@bwd"] == statistics.median(per_kernel)


def test_the_gumbel_mask_is_calibrated_as_the_reference_runs_it(smoke_calibration):
    """Sparse FF's straight-through Gumbel mask is one op in flopsim (softmax, variant gumbel)
    but a dozen eager kernels and a random draw in the reference: calibrate times the
    reference's own function, forward and backward, priced with the model's op, and the
    train step's mask is priced by those points, a softmax by its own."""
    from flopsim.calibrate import GUMBEL_BLOCK
    from flopsim.families import build_ops
    from flopsim.spec import load_model

    cal, points = smoke_calibration
    gumbel = [p for p in points if p.kind == "softmax" and p.variant == "gumbel"]
    assert {p.backward for p in gumbel} == {False, True}
    for p in gumbel:  # forward: the logits read, the mask written; backward: two read, one written (fp32)
        elements = p.bytes / ((3 if p.backward else 2) * 4)
        assert elements == int(elements) and elements % GUMBEL_BLOCK == 0
    assert {"softmax:gumbel", "softmax:gumbel@bwd", "softmax"} <= set(cal.fixed_s)
    assert {(p.variant, p.backward) for p in cal.sizes if p.kind == "softmax"} >= {
        ("gumbel", False), ("gumbel", True), ("softmax", False), ("softmax", True)}
    spec = load_model("decoder-220m").with_changes(family="sparse_ff", sparse_ff={"block_size": 16, "d_lowrank": 32})
    masks = [op for op in build_ops(spec, "train") if op.name == "block.0.mlp.controller.mask"]
    assert [(op.kind, op.variant, op.pass_) for op in masks] == [("softmax", "gumbel", "fwd"),
                                                                   ("softmax", "gumbel", "bwd")]
    size = max(p.bytes for p in gumbel if not p.backward)
    own = [p for p in cal.sizes if (p.kind, p.variant, p.backward, p.train) == ("softmax", "gumbel", False, False)]
    softmax = [p for p in cal.sizes if (p.kind, p.variant, p.backward, p.train) == ("softmax", "softmax", False, False)]
    at = max(own, key=lambda p: p.bytes)
    assert at.bytes == size
    assert cal.efficiency("softmax", nbytes=size, variant="gumbel")[1] == pytest.approx(at.memory)
    assert cal.efficiency("softmax", nbytes=size, variant="softmax")[1] == pytest.approx(
        max(softmax, key=lambda p: p.bytes).memory)
    assert cal.fixed_cost_s("softmax", "gumbel", None) == cal.fixed_s["softmax:gumbel"]


def test_rope_backward_is_measured_as_the_reference_runs_it(smoke_calibration):
    """The references' RoPE (rope_qk: rotate-half, a dozen eager kernels) is one op in
    flopsim (elementwise, variant rope): calibrate times its backward as autograd runs it
    (the gradients through cat, neg and the halves' slices) and prices it with the model's
    own backward op (the gradient and the position ids read, the gradient written), so a
    train step's RoPE backward is priced by those points, not by the kind's."""
    from types import SimpleNamespace

    from flopsim.calibrate import _memory_shapes, rope_layout
    from flopsim.families import build_ops
    from flopsim.spec import load_model

    cal, points = smoke_calibration
    rope = [p for p in points if p.kind == "elementwise" and p.variant == "rope" and p.backward]
    assert rope
    for p in rope:  # the gradient (2 heads x positions x 64, fp32) read and written, the int64 positions read
        positions, heads = rope_layout(_memory_shapes(SimpleNamespace(value_bytes=4), p.size)[0])
        assert p.bytes == 2 * (2 * heads * positions * 64) * 4 + positions * 8
    assert "elementwise:rope@bwd" in cal.fixed_s
    own = sorted((p for p in cal.sizes if (p.kind, p.variant, p.backward) == ("elementwise", "rope", True)),
                 key=lambda p: p.bytes)
    assert own
    spec = load_model("decoder-220m")
    ops = [op for op in build_ops(spec, "train") if op.name == "block.0.attn.rope"]
    assert [(op.kind, op.variant, op.pass_) for op in ops] == [("elementwise", "rope", "fwd"),
                                                                 ("elementwise", "rope", "bwd")]
    at = own[-1]
    assert cal.efficiency("elementwise", nbytes=at.bytes, variant="rope", backward=True)[1] == pytest.approx(
        at.memory)
    assert cal.fixed_cost_s("elementwise", "rope", None, backward=True) == cal.fixed_s["elementwise:rope@bwd"]


def test_a_train_steps_kernels_are_priced_by_the_points_measured_as_one_runs(smoke_calibration):
    """A train step keeps each forward op's output (and what autograd saves) for the backward,
    so its forward kernels write memory not in cache, and its backward kernels read what the
    forward saved long before and write gradients that are kept: calibrate measures the
    memory-bound kernels so too on a CPU (forward: inputs needing gradients, outputs held in a
    ring; backward: each call the next of a ring of graphs, its gradient kept), as points of
    their own (`train`), and a train step's ops are priced by them -- every op of a forward
    step by the others (flopsim.calibration lookup step 8)."""
    from flopsim.predict import predict
    from flopsim.spec import load_model

    cal, points = smoke_calibration
    trained = {(p.kind, p.variant, p.backward) for p in points if p.train}
    assert {("elementwise", "gelu", False), ("elementwise", "add", False), ("elementwise", "rope", False),
            ("norm", "rmsnorm", False), ("loss", "", False), ("embedding", "", False)} <= trained
    assert {("elementwise", "gelu", True), ("elementwise", "mul", True), ("elementwise", "rope", True),
            ("norm", "rmsnorm", True), ("loss", "", True), ("embedding", "", True)} <= trained
    for backward in (False, True):
        gelu = [p for p in cal.sizes if (p.kind, p.variant, p.backward) == ("elementwise", "gelu", backward)]
        kept, plain = [p for p in gelu if p.train], [p for p in gelu if not p.train]
        assert kept and plain and {p.bytes for p in kept} == {p.bytes for p in plain}
        at = max(kept, key=lambda p: p.bytes)
        assert cal.efficiency("elementwise", nbytes=at.bytes, variant="gelu", backward=backward,
                              train=True)[1] == pytest.approx(at.memory)
        assert cal.efficiency("elementwise", nbytes=at.bytes, variant="gelu", backward=backward)[1] == \
            pytest.approx(max(plain, key=lambda p: p.bytes).memory)
    spec = load_model("decoder-220m").with_changes(layers=2, d_model=128, heads=2, d_ff=512, vocab=1000)

    def act(phase, pass_, calibration=cal):
        ops = predict(spec, "cpu", phase=phase, batch=1, seq=16, calibration=calibration).ops
        return next(t for t in ops if t.name == "block.0.mlp.act" and t.pass_ == pass_)

    train_fwd, forward, train_bwd = act("train", "fwd"), act("forward", "fwd"), act("train", "bwd")
    assert train_fwd.memory_eff == pytest.approx(
        cal.efficiency("elementwise", nbytes=float(train_fwd.bytes), variant="gelu", train=True)[1])
    assert forward.memory_eff == pytest.approx(
        cal.efficiency("elementwise", nbytes=float(forward.bytes), variant="gelu")[1])
    assert train_fwd.memory_eff != forward.memory_eff
    assert train_bwd.memory_eff == pytest.approx(cal.efficiency(
        "elementwise", nbytes=float(train_bwd.bytes), variant="gelu", backward=True, train=True)[1])
    assert train_bwd.memory_eff != pytest.approx(cal.efficiency(
        "elementwise", nbytes=float(train_bwd.bytes), variant="gelu", backward=True)[1])
    # a calibration without such points (a GPU's, a published one) prices a train step's ops by
    # its plain points of each pass
    plain_cal = cal.model_copy(update={"sizes": [p for p in cal.sizes if not p.train]})
    for backward in (False, True):
        assert plain_cal.efficiency("elementwise", nbytes=at.bytes, variant="gelu", backward=backward,
                                    train=True) == \
            plain_cal.efficiency("elementwise", nbytes=at.bytes, variant="gelu", backward=backward)
    assert act("train", "bwd", plain_cal).memory_eff == pytest.approx(plain_cal.efficiency(
        "elementwise", nbytes=float(train_bwd.bytes), variant="gelu", backward=True)[1])


def test_padded_experts_are_priced_by_the_batched_products_measured(smoke_calibration):
    """Padded MoE experts ([E, C, d] slots: a capacity factor, expert choice) run one torch.bmm
    per projection: their ops are variant bmm, priced by the bmm points calibrate measures
    (weights read cold; a point of batch E sits at (E m, n, k) for compute and (m, E n, k) for
    memory, where an op of E products in one kernel looks); dropless experts are not."""
    from flopsim.families import build_ops
    from flopsim.roofline import products_per_kernel
    from flopsim.spec import load_model

    cal, points = smoke_calibration
    bmm = [p for p in points if p.variant == "bmm"]
    assert bmm and all(p.kind == "matmul" and p.gemm[0] > 1 for p in bmm)
    assert {(g.batch, g.m, g.n, g.k) for g in cal.gemm if g.variant == "bmm"} == {p.gemm for p in bmm}
    base = load_model("decoder-220m").with_changes(family="moe", moe={"experts": 4, "top_k": 2,
                                                                      "capacity_factor": 1.25})
    experts = [op for op in build_ops(base, "train") if ".experts." in op.name and op.gemm is not None]
    assert experts and {op.variant for op in experts} == {"bmm"}
    dropless = base.with_changes(moe={**base.moe.model_dump(), "capacity_factor": None})
    assert {op.variant for op in build_ops(dropless, "forward") if ".experts." in op.name and op.gemm} == {None}
    # at a measured bmm shape, an op of that batch in one kernel takes the point's efficiency, a loop
    # of single products (or any plain op) the F.linear points'
    point = next(g for g in cal.gemm if g.variant == "bmm" and g.compute is not None)
    gemm = (point.batch, point.m, point.n, point.k)
    assert products_per_kernel(gemm, 1) == point.batch
    assert cal.efficiency("matmul", gemm, variant="bmm", per_kernel=point.batch)[0] == pytest.approx(point.compute)
    plain = cal.efficiency("matmul", gemm, per_kernel=point.batch)[0]
    assert plain == cal.efficiency("matmul", (1, point.batch * point.m, point.n, point.k))[0]


def test_aten_profile_script_breaks_a_step_down_per_aten_op(tmp_path):
    """scripts/aten_profile.py (run by scripts/gpu-validate.sh): per aten op of a step, its
    calls and host seconds per step (device seconds on a GPU, none here); the dense
    decoder's forward calls the products it is made of, and its train step's backward
    two products for each (the weight and input gradients, under the autograd nodes).
    Bad input: one line, exit 2."""
    import csv
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "aten_profile.py"
    out = tmp_path / "aten.csv"
    r = subprocess.run([sys.executable, str(script), "--device", "cpu", "--cases", "dense", "--repeats", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(out.open()))
    forward = {row["aten_op"]: row for row in rows if row["phase"] == "forward"}
    train = {row["aten_op"]: row for row in rows if row["phase"] == "train"}
    assert {row["phase"] for row in rows} == {"forward", "prefill", "decode", "train"}
    assert float(forward["aten::linear"]["calls_per_step"]) >= 4 * 4  # 4 layers x (qkv, out, up, down) at least
    assert float(train["aten::mm"]["calls_per_step"]) >= 2 * 4 * 4  # each product's two gradients
    assert all(float(row["host_s_per_step"]) > 0 and float(row["device_s_per_step"]) == 0 for row in rows)
    bad = subprocess.run([sys.executable, str(script), "--cases", "nope", "--out", str(tmp_path / "x.csv")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--cases" in bad.stderr and bad.stderr.count("\n") == 1
    assert not (tmp_path / "x.csv").exists()


def test_sustained_gemm_script_times_windows_of_back_to_back_products(tmp_path):
    """scripts/sustained_gemm.py (run last by scripts/gpu-validate.sh): windows of
    back-to-back products of random operands for --seconds, then of zero operands; each
    window's TF/s is 2 n^3 x its calls / its seconds (here, on a CPU, no clock or power
    column is read), and the summary sets the first window beside the last third.
    Bad input: one line, exit 2, nothing written."""
    import csv
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "sustained_gemm.py"
    out = tmp_path / "sustained.csv"
    r = subprocess.run([sys.executable, str(script), "--device", "cpu", "--size", "128", "--seconds", "0.4",
                        "--zero-seconds", "0.2", "--window", "0.05", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(out.open()))
    randn = [row for row in rows if row["data"] == "randn"]
    zeros = [row for row in rows if row["data"] == "zeros"]
    assert len(randn) >= 3 and zeros and len(rows) == len(randn) + len(zeros)
    assert float(randn[-1]["t_end_s"]) >= 0.4 and float(zeros[-1]["t_end_s"]) > float(randn[-1]["t_end_s"])
    assert all(float(row["tflops"]) > 0 and int(row["calls"]) >= 1 for row in rows)
    assert {row["sm_clock_mhz"] for row in rows} == {""}
    assert int(randn[1]["calls"]) > int(randn[0]["calls"])  # the windows grow from one call to --window
    assert "last / first" in r.stdout and "zero operands" in r.stdout
    bad = subprocess.run([sys.executable, str(script), "--seconds", "0", "--out", str(tmp_path / "x.csv")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--seconds" in bad.stderr and bad.stderr.count("\n") == 1
    assert not (tmp_path / "x.csv").exists()


def test_sustained_gemm_reads_the_clock_and_power_within_each_window(tmp_path, monkeypatch):
    """On a CUDA device the script reads nvidia-smi in a loop; a window gets the median of
    each field over the readings that arrived within it, and a field the driver rejects
    (an older driver's name for the clock event reasons) is left out, not an error. Here a
    stand-in nvidia-smi prints 1,500 MHz / 650 W / 70 C, then 1,400 MHz / 690 W / 75 C."""
    import importlib.util
    import os
    import time
    from pathlib import Path

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\n"
                    'case "$*" in *clocks_event_reasons*) exit 2;; esac\n'
                    'case "$*" in *loop-ms*) ;; *) echo 1500; exit 0;; esac\n'
                    "for i in 1 2 3 4 5 6; do echo '1500, 650.0, 70'; sleep 0.05; done\n"
                    "while true; do echo '1400, 690.0, 75'; sleep 0.05; done\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    path = Path(__file__).resolve().parent.parent / "scripts" / "sustained_gemm.py"
    spec = importlib.util.spec_from_file_location("sustained_gemm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    sampler = module.SmiSampler(0, period_ms=50)
    try:
        deadline = time.monotonic() + 10
        while len(sampler.readings) < 12 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sampler.stop()
    assert sampler.fields == ["clocks.sm", "power.draw", "temperature.gpu"]
    times = [t for t, _ in sampler.readings]
    early = sampler.between(times[0], times[5])
    late = sampler.between(times[6], times[-1])
    assert early == {"clocks.sm": 1500.0, "power.draw": 650.0, "temperature.gpu": 70.0}
    assert late == {"clocks.sm": 1400.0, "power.draw": 690.0, "temperature.gpu": 75.0}
    assert sampler.between(times[-1] + 1, times[-1] + 2) == {"clocks.sm": "", "power.draw": "", "temperature.gpu": ""}


def test_each_round_robin_visit_times_the_step_after_back_to_back_warm_up(monkeypatch):
    """A step that follows another model's runs is slower for its first runs, so every
    visit runs the step back to back for WARMUP_S before its timed runs; the probe reads
    the host first (its cold pool would evict the step's data again)."""
    from types import SimpleNamespace

    import flopsim.profiling as profiling

    log = []  # (runner name or "probe", perf_counter at the call's start)

    def fake(name, step_s):
        def once():
            log.append((name, profiling.time.perf_counter()))
            end = log[-1][1] + step_s
            while profiling.time.perf_counter() < end:
                pass
        return SimpleNamespace(spec=SimpleNamespace(name=name), phase="decode", once=once)

    probe = SimpleNamespace(read=lambda: log.append(("probe", profiling.time.perf_counter())) or "reading")
    monkeypatch.setattr(profiling, "WARMUP_S", 0.02)
    walls, readings = profiling.time_rounds([fake("a", 0.002), fake("b", 0.05)], rounds=2, repeats=2, probe=probe)
    assert [len(w) for w in walls] == [4, 4] and readings == [["reading"] * 2] * 2
    visits, visit = [], None
    for name, at in log:
        if name == "probe":
            visit = []
            visits.append(visit)
        else:
            visit.append((name, at))
    assert [v[0][0] for v in visits] == ["a", "b", "a", "b"]
    for visit in visits:
        warm, timed = visit[:-2], visit[-2:]
        assert warm and all(name == visit[0][0] for name, _ in visit)
        # the timed runs start only after WARMUP_S of back-to-back runs (or one run, if longer)
        assert timed[0][1] - warm[0][1] >= 0.02
        if visit[0][0] == "b":  # a 50 ms step outlasts the warm-up: it runs once before its timed runs
            assert len(warm) == 1
    assert profiling.warm_up(fake("c", 0.0), seconds=10.0, most=7) == 7  # capped


def test_attention_is_calibrated_on_the_references_layout():
    """The calibration's queries, keys and values (flopsim.calibrate.projected_qkv) are laid
    out as the references' attention takes them, views of one projection's output, not
    three contiguous tensors: the same shapes and strides as Attention.project's (a kernel
    reading them strided runs 5-12% slower on the development CPU's flash kernel)."""
    import torch
    from types import SimpleNamespace

    from flopsim.calibrate import projected_qkv
    from flopsim.torchref.model import RunState, build_reference

    b, h, s, dh = 2, 4, 8, 16
    spec = tiny("gpt2-small", layers=1, d_model=h * dh, heads=h, dtype="fp32")
    model = build_reference(spec)
    positions = torch.arange(s).repeat(b, 1)
    reference = model.block[0].attn.project(torch.randn(b, s, h * dh), RunState("forward", positions), 0)
    bench = SimpleNamespace(rand=lambda *shape, grad=False: torch.randn(*shape).requires_grad_(grad))
    calibrated = projected_qkv(bench, b, h, s, dh)
    assert [(t.shape, t.stride()) for t in calibrated] == [(t.shape, t.stride()) for t in reference]
    assert not calibrated[0].is_contiguous()


TRAIN_SUITE = SUITE.split("cases:")[0] + """cases:
  - {name: dense, base: d, phases: [forward, train]}
  - {name: enc, base: d, phases: [forward]}
"""  # the tiny suite's model: one train case, one without a train phase


def test_train_vs_forward_benchmark_prints_both_allocators(tmp_path):
    """benchmarks/train_vs_forward.py times each train case in a process of its own
    under both allocator settings and prints the ratio errors side by side; a bad
    argument is one line and exit code 2."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "train_vs_forward.py"
    suite = tmp_path / "train.yaml"
    suite.write_text(TRAIN_SUITE)
    out = subprocess.run([sys.executable, str(script), "--suite", str(suite), "--rounds", "1"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 5 and lines[1].split()[0] == "dense"  # header, the one train case, two summaries, figures
    assert lines[2].startswith("default:") and lines[3].startswith("no-trim:")
    last = dict(item.split("=") for item in lines[-1].split())
    assert set(last) == {"default_ratio_error", "default_faulted_mb", "no-trim_ratio_error", "no-trim_faulted_mb"}
    assert all(float(v) >= 0 for v in last.values())
    for args, field in ((["--models", "enc"], "--models"), (["--allocators", "jemalloc"], "--allocators"),
                        (["--rounds", "0"], "--rounds")):
        bad = subprocess.run([sys.executable, str(script), "--suite", str(suite), *args],
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and field in bad.stderr, bad.stderr
