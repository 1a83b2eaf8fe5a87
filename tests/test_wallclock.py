"""The wall-clock mechanisms: fixed cost per kernel launch (per kind, variant
and pass), expected launches of branches not always taken (MoD at decode), compute
and memory ceilings of GEMM points, collectives by message size, CUDA-graph launches,
and provenance (no silent ideal roofline). Each test derives its expected
value by hand; none asserts a measured time."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny
from flopsim.calibration import Calibration, FreshPages, load_calibration
from flopsim.collectives import collective_s, factor
from flopsim.count import count, evaluate_ops
from flopsim.errors import InputError
from flopsim.families import build_ops
from flopsim.hardware import hardware_names, load_hardware
from flopsim.predict import predict
from flopsim.roofline import op_time

H100 = load_hardware("h100-sxm")


def _cal(**fields) -> Calibration:
    return Calibration(device="h100-sxm", source="test", **fields)


# -- fixed cost per launch ------------------------------------------------------------

def test_fixed_cost_lookup_order():
    cal = _cal(launch_overhead_s=1e-6, fixed_s={"norm": 5e-6, "norm:rmsnorm": 7e-6, "norm@bwd": 9e-6,
                                               "norm:rmsnorm@bwd": 11e-6})
    assert cal.fixed_cost_s("norm", "rmsnorm", H100) == 7e-6  # kind:variant first
    assert cal.fixed_cost_s("norm", "layernorm", H100) == 5e-6  # else the kind
    assert cal.fixed_cost_s("norm", "rmsnorm", H100, backward=True) == 11e-6  # backward keys first
    assert cal.fixed_cost_s("norm", "layernorm", H100, backward=True) == 9e-6
    assert cal.fixed_cost_s("matmul", "", H100) == 1e-6  # else the calibration's launch overhead
    assert Calibration.ideal().fixed_cost_s("matmul", "", H100) == H100.launch_overhead_s  # else the hardware's
    with pytest.raises(Exception, match="fixed_s"):
        _cal(fixed_s={"blas": 1e-6})
    with pytest.raises(Exception, match="fixed_s.norm"):
        _cal(fixed_s={"norm": float("inf")})


def test_op_time_adds_fixed_cost_times_expected_launches():
    """time = max(compute, memory) + kernels * fixed: an op launched half the time pays half a launch."""
    spec = tiny("llama-3-8b", kv_heads=2)
    op = next(c for c in evaluate_ops(build_ops(spec, "decode"), {**_bst(2, 1, 9)}) if c.name == "block.0.norm1")
    cal = _cal(launch_overhead_s=0.0, fixed_s={"norm:rmsnorm": 4e-6})
    full = op_time(op, H100, "bf16", cal)
    half = op_time(type(op)(**{**op.__dict__, "kernels": 0.5}), H100, "bf16", cal)
    assert full.time_s - max(full.compute_s, full.memory_s) == pytest.approx(4e-6)
    assert half.time_s - max(half.compute_s, half.memory_s) == pytest.approx(2e-6)
    assert full.kernels == 1 and half.kernels == 0.5


def _bst(b, s, t):
    from flopsim.ops.symbols import B, S, T

    return {B: b, S: s, T: t}


@pytest.mark.parametrize("batch", [1, 4])
def test_skipped_mod_blocks_launch_nothing(batch):
    """MoD at decode: a routed block runs when any of the B tokens chose it, with
    probability p = 1 - (1 - c)^B, so each of its kernels (the running tokens' gathers and
    scatter among them) launches p times per step in expectation; the decision (router,
    the pick among the B scores and its sort) and every dense block launch every step.
    The launch overhead of the step is fixed * (ops outside routed blocks + p * ops in them)."""
    c = 0.125
    spec = tiny("decoder-220m-mod", layers=4, mod={"capacity": c, "every": 2})
    ops = count(spec, batch=batch, seq=1, phase="decode", context=16).ops
    p = 1 - (1 - c) ** batch
    decision = ("router", "select", "order")
    routed = [op for op in ops if op.layer in (1, 3) and not op.name.endswith(decision) and ".predictor" not in op.name]
    assert {op.name.rsplit(".", 1)[1] for op in routed} >= {"cache_k", "cache_v", "gather", "gather_r", "scatter"}
    assert routed and all(op.kernels == pytest.approx(p) for op in routed)
    assert all(op.kernels == 1 for op in ops if op not in routed)
    fixed = 3e-6
    cal = _cal(launch_overhead_s=fixed)
    r = predict(spec, H100, phase="decode", batch=batch, seq=1, context=16, calibration=cal)
    launched = [op for op in ops if (op.all_flops or op.bytes)]
    expected = fixed * sum(op.kernels for op in launched)
    assert r.overhead_s == pytest.approx(expected, rel=1e-9)
    dense = predict(spec.with_changes(family="dense", mod=None), H100, phase="decode", batch=batch, seq=1, context=16,
                    calibration=cal)
    assert r.overhead_s < dense.overhead_s  # skipped blocks cost no launches
    assert r.summary()["ops"] == len(launched)
    assert r.summary()["kernels"] == pytest.approx(sum(op.kernels for op in launched), rel=1e-12)


# -- GEMM ceilings ------------------------------------------------------------------------

def test_gemm_points_give_compute_and_memory_ceilings_separately():
    """A point measured compute-bound carries the compute ceiling, one measured
    memory-bound (cold weights) the memory ceiling; each interpolates over its own."""
    cal = _cal(gemm=[{"kind": "matmul", "m": 4096, "n": 4096, "k": 4096, "compute": 0.8},
                     {"kind": "matmul", "m": 1, "n": 4096, "k": 4096, "memory": 0.7}])
    assert cal.efficiency("matmul", (1, 4096, 4096, 4096)) == (0.8, 0.7)
    assert cal.efficiency("matmul", (1, 1, 4096, 4096)) == (0.8, 0.7)
    with pytest.raises(Exception, match="compute or a memory"):
        _cal(gemm=[{"m": 1, "n": 1, "k": 1}])


# -- collectives by message size ----------------------------------------------------------

def test_collectives_are_latency_plus_bandwidth():
    b, a = 100e9, 20e-6
    assert factor("all_reduce", 8) == 2 * 7 / 8 and factor("all_gather", 4) == 3 / 4 and factor("send_recv", 2) == 1
    assert collective_s("all_reduce", 1e9, 8, b, a) == pytest.approx(a + 2 * 7 / 8 * 1e9 / b)
    assert collective_s("all_reduce", 1e9, 1, b, a) == 0.0  # one rank: nothing
    small = collective_s("all_reduce", 2 * 8192 * 1, 8, b, a)  # a decode all-reduce: batch 1, d_model 8192, bf16
    assert small == pytest.approx(a, rel=0.02)  # latency-bound: the bandwidth term is 0.3 us of 20
    # a collective op on a calibration's link level: the same formula (flopsim.roofline.collective_time)
    from types import SimpleNamespace

    from flopsim.hardware import load_hardware
    from flopsim.roofline import collective_time

    cal = _cal(links={"scale_up": {"latency_s": a, "bus_bytes_per_s": b, "source": "test"}})
    op = SimpleNamespace(name="ar", kind="collective", layer=0, pass_="fwd", variant="all_reduce", comm_bytes=1e9,
                         kernels=1, tags={"ranks": 8, "level": "scale_up"})
    assert collective_time(op, load_hardware("h100-sxm"), cal).time_s == pytest.approx(collective_s("all_reduce", 1e9, 8, b, a))


def test_decode_tensor_parallel_all_reduces_are_latency_bound():
    """Two all-reduces per block (and the vocabulary-parallel embedding's one) of batch x
    d_model values, and the logits' all-gather of batch x vocab: on 8 GPUs at batch 1 each
    costs about the link's latency."""
    from flopsim.planning.links import resolve_links
    from flopsim.planning.serve import tp_decode_s

    spec = load_spec("llama-2-7b")
    cal = _cal(links={"scale_up": {"latency_s": 25e-6, "bus_bytes_per_s": 200e9, "source": "test"}},
               launch_overhead_s=0.0)
    links = resolve_links(H100, cal, None, None, None, None, needed=True)
    one, _ = tp_decode_s(spec, H100, cal, links, tp=1, batch=1, context=512)
    eight, r = tp_decode_s(spec, H100, cal, links, tp=8, batch=1, context=512)
    comm = (2 * spec.layers + 1) * (25e-6 + 2 * 7 / 8 * spec.d_model * 2 / 200e9)
    comm += 25e-6 + 7 / 8 * spec.vocab * 2 / 200e9  # the logits' all-gather
    assert sum(op.time_s for op in r.ops if op.kind == "collective") == pytest.approx(comm, rel=1e-9)
    work = sum(op.time_s for op in r.ops if op.kind != "collective")
    assert eight == pytest.approx(work + comm, rel=1e-9)
    assert one / 8 <= work < one  # one GPU's share: the sharded ops (norms replicated, GEMVs 1/8 as wide)
    assert comm > 0.3 * eight  # at batch 1 the all-reduces are a large share of a TP-8 step


def load_spec(name):
    from flopsim.spec import load_model

    return load_model(name)


# -- CUDA graphs ----------------------------------------------------------------------------

def test_graph_launch_replaces_every_fixed_cost():
    cal = _cal(launch_overhead_s=3e-6, fixed_s={"norm": 8e-6}, graph_launch_s=1e-6)
    graphs = cal.with_graphs()
    assert graphs.fixed_cost_s("norm", "rmsnorm", H100) == 1e-6
    assert graphs.fixed_cost_s("matmul", "", H100) == 1e-6
    assert _cal(launch_overhead_s=3e-6).with_graphs().fixed_cost_s("matmul", "", H100) == 3e-6  # none measured


# -- provenance: no silent ideal -------------------------------------------------------------

def test_every_shipped_device_has_a_calibration_that_is_not_ideal():
    for name in hardware_names():
        cal = load_calibration("auto", load_hardware(name))
        assert cal.kind in ("measured", "published"), name
        assert cal.cited_sources() or cal.measured, name
        assert name in cal.provenance_label


def test_a_device_without_calibration_is_an_error_unless_ideal_is_asked(tmp_path):
    hw = load_hardware("h100-sxm").model_copy(update={"name": "my-gpu"})
    with pytest.raises(InputError, match="no calibration"):
        load_calibration("auto", hw)
    assert load_calibration("ideal", hw).kind == "ideal"
    r = predict("gpt2-small", hw, phase="forward", batch=1, seq=64, calibration="ideal")
    assert r.summary()["calibration_kind"] == "ideal"
    assert "ideal" in r.summary()["calibration_label"]


def test_predict_names_its_calibration():
    r = predict("gpt2-small", "a100-80gb", phase="decode", batch=1, seq=1, context=64)
    s = r.summary()
    assert s["calibration_kind"] == "published" and s["calibration_label"].startswith("a100-80gb: published")
    cpu = predict(tiny("gpt2-small", dtype="fp32"), "cpu", phase="forward", batch=1, seq=8).summary()
    assert cpu["calibration_kind"] == "measured"


def test_compare_sweep_and_published_rows_name_their_calibration_in_every_format():
    """A compare row, a sweep point and a published row each carry the device and the
    calibration they were priced on, so that their JSON and CSV say it as the tables do."""
    import json

    from conftest import run_cli
    from flopsim.published import load_published, predict_row

    for args in (("compare", "gpt2-small", "gpt2-medium", "-H", "a100-80gb"),
                 ("sweep", "gpt2-small", "-H", "a100-80gb", "-v", "batch=1,2")):
        rows = json.loads(run_cli(*args, "--format", "json").output)
        assert rows and all(r["hardware"] == "a100-80gb" and r["calibration_kind"] == "published"
                            and r["calibration"] == load_calibration("auto", load_hardware("a100-80gb")).source
                            for r in rows), args
        table = run_cli(*args, "--calibration", "ideal").output
        assert "calibration a100-80gb: ideal roofline" in " ".join(table.split())
    by_id = {r.id: r for r in load_published().rows}
    result = predict_row(by_id["gptfast-llama2-7b-a100-bs1-bf16"], by_id)
    assert result.to_dict()["calibration"].startswith("a100-80gb: published")


def test_published_and_measured_provenance_need_their_evidence():
    with pytest.raises(Exception, match="needs 'sources'"):
        _cal(provenance="published")
    with pytest.raises(Exception, match="needs a 'measured' block"):
        _cal(provenance="measured")
    assert math.isclose(_cal(provenance="published", sources={"default.compute": "x"}).default.compute, 1.0)


def test_at_speed_scales_every_ceiling_by_the_matrix_rate():
    """A calibration measured at reference probe times (c, m, f) predicts at a host now
    reading (c', m', f'): every efficiency x c / c' (as calibrate scales its points: the
    cold reads m are disturbed by what ran just before, flopsim.probe), fixed costs x f' / f."""
    from flopsim.probe import ProbeReading

    ref = {"compute_s": 1e-3, "memory_s": 2e-4, "fixed_s": 5e-5}
    cal = _cal(measured={"device": "cpu", "probe": ref}, default={"compute": 0.5, "memory": 0.4},
               gemm=[{"kind": "matmul", "m": 64, "n": 64, "k": 64, "compute": 0.6},
                     {"kind": "matmul", "m": 1, "n": 64, "k": 64, "memory": 0.3}],
               sizes=[{"kind": "norm", "bytes": 1e6, "compute": 0.1, "memory": 0.2}],
               fixed_s={"norm": 1e-5}, launch_overhead_s=2e-6)
    slow = cal.at_speed(ProbeReading(compute_s=2e-3, memory_s=4e-4, fixed_s=1e-4))  # everything half as fast
    assert slow.default.compute == pytest.approx(0.25) and slow.default.memory == pytest.approx(0.2)
    assert slow.gemm[0].compute == pytest.approx(0.3) and slow.gemm[0].memory is None
    assert slow.gemm[1].memory == pytest.approx(0.15) and slow.gemm[1].compute is None
    assert slow.sizes[0].memory == pytest.approx(0.1) and slow.sizes[0].compute == pytest.approx(0.05)
    assert slow.fixed_s["norm"] == pytest.approx(2e-5) and slow.launch_overhead_s == pytest.approx(4e-6)
    assert _cal().at_speed(ProbeReading(1.0, 1.0, 1.0)) == _cal()  # no reference reading: unchanged
    paged = cal.model_copy(update={"fresh_pages": FreshPages(s_per_byte=2e-10)})  # zeroing pages: memory work
    assert paged.at_speed(ProbeReading(compute_s=2e-3, memory_s=4e-4, fixed_s=1e-4)).fresh_pages.s_per_byte == \
        pytest.approx(4e-10)
    streamed = cal.at_speed(ProbeReading(compute_s=1e-3, memory_s=8e-4, fixed_s=5e-5))  # cold reads alone slow
    assert streamed.gemm == cal.gemm and streamed.sizes == cal.sizes and streamed.default == cal.default


# -- host dispatch overlapping the device (a GPU run eagerly) ------------------------------

def _pipeline_by_enumeration(host, device):
    """A step's time as the two-stage flow shop's makespan: the largest over j of the
    host's time to queue ops 1..j plus the device's time for ops j..n."""
    return max(sum(host[:j + 1]) + sum(device[j:]) for j in range(len(host)))


def _pipeline_by_simulation(host, device):
    """Event by event: the host queues each op; the device starts it when both it and the op are ready."""
    clock_host = clock_device = 0.0
    for h, d in zip(host, device):
        clock_host += h
        start = max(clock_host, clock_device)
        clock_device = start + d
    return clock_device


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1e-3), st.floats(0, 1e-3)), min_size=1, max_size=40))
def test_overlap_is_the_host_device_pipeline(pairs):
    from flopsim.roofline import overlap_times

    host, device = [h for h, _ in pairs], [d for _, d in pairs]
    total = sum(overlap_times(host, device))
    assert total == pytest.approx(_pipeline_by_enumeration(host, device), rel=1e-9, abs=1e-15)
    assert total == pytest.approx(_pipeline_by_simulation(host, device), rel=1e-9, abs=1e-15)
    assert max(sum(host), sum(device)) - 1e-15 <= total <= sum(host) + sum(device) + 1e-15
    assert sum(overlap_times([0.0] * len(device), device)) == pytest.approx(sum(device))  # no dispatch: the sum


def test_host_dispatch_hides_behind_long_kernels_and_shows_between_short_ones():
    """Two long kernels (100 us) with 20 us of dispatch each: the second's dispatch hides
    behind the first, 20 + 100 + 100 us. Ten 5-us kernels with 20 us of dispatch each:
    host-bound, 10 x 20 + 5 us."""
    from flopsim.roofline import overlap_times

    assert sum(overlap_times([20e-6] * 2, [100e-6] * 2)) == pytest.approx(20e-6 + 2 * 100e-6)
    assert sum(overlap_times([20e-6] * 10, [5e-6] * 10)) == pytest.approx(10 * 20e-6 + 5e-6)


QUEUED = dict(host_s={"launch": 2e-5, "matmul": 3e-5}, launch_overhead_s=2e-6)


@pytest.mark.parametrize("phase, batch, seq", [("decode", 1, 256), ("forward", 8, 512), ("train", 2, 256)])
def test_predict_overlaps_host_dispatch_and_sweep_agrees(phase, batch, seq):
    """predict's op times are their shares of the pipeline over the ops in order; sweep's
    grouped evaluation gives the same step time."""
    from flopsim.roofline import overlap_times
    from flopsim.sweep import sweep

    spec = tiny("llama-3-8b", layers=3, kv_heads=2)
    cal = _cal(**QUEUED)
    r = predict(spec, H100, phase=phase, batch=batch, seq=seq, calibration=cal)
    assert r.time_s == pytest.approx(sum(overlap_times([o.host_s for o in r.ops], [o.device_s for o in r.ops])))
    for o in r.ops:
        if o.device_s > 0:
            assert o.host_s == pytest.approx(o.kernels * (3e-5 if o.kind == "matmul" else 2e-5))
            assert o.device_s == pytest.approx(max(o.compute_s, o.memory_s) + o.kernels * 2e-6)
    without = predict(spec, H100, phase=phase, batch=batch, seq=seq, calibration=_cal(launch_overhead_s=2e-6))
    assert r.summary()["device_s"] == pytest.approx(without.time_s)  # the device's side is unchanged
    assert max(r.summary()["host_s"], without.time_s) <= r.time_s + 1e-12
    assert r.time_s <= r.summary()["host_s"] + without.time_s + 1e-12
    grid = sweep(spec, H100, phase=phase, vary={"batch": [batch, 2 * batch]}, seq=seq, calibration=cal).table()
    assert grid.time_s.iloc[0] == pytest.approx(r.time_s, rel=1e-9)


def test_graphs_and_probe_speed_treat_host_dispatch_apart():
    """Under CUDA graphs there is no per-kernel dispatch; a slower host (probe) slows the
    dispatch of a queued device, not its device-side fixed costs."""
    from flopsim.probe import ProbeReading

    cal = _cal(**QUEUED, fixed_s={"norm": 4e-6}, measured={"device": "cuda", "probe":
                                                           {"compute_s": 1e-3, "memory_s": 2e-4, "fixed_s": 5e-5}})
    assert cal.with_graphs().host_s == {} and cal.with_graphs().fixed_s == {"norm": 4e-6}
    assert cal.model_copy(update={"graph_launch_s": 1e-6}).with_graphs().launch_overhead_s == 1e-6
    slow = cal.at_speed(ProbeReading(compute_s=1e-3, memory_s=2e-4, fixed_s=1e-4))
    assert slow.host_s == {"launch": pytest.approx(4e-5), "matmul": pytest.approx(6e-5)}
    assert slow.fixed_s == {"norm": 4e-6} and slow.launch_overhead_s == 2e-6
    assert cal.host_cost_s("norm", "rmsnorm") == 2e-5 and cal.host_cost_s("matmul", "", backward=True) == 3e-5
    assert _cal().host_cost_s("matmul", "") == 0.0
    with pytest.raises(Exception, match="host_s"):
        _cal(host_s={"blas": 1e-6})


def _pipeline_with_syncs(host, device, syncs):
    """Event by event, with sync points: after a syncing op the host waits until the device is done."""
    clock_host = clock_device = 0.0
    for h, d, s in zip(host, device, syncs):
        clock_host += h
        clock_device = max(clock_host, clock_device) + d
        if s:
            clock_host = clock_device
    return clock_device


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1e-3), st.floats(0, 1e-3), st.booleans()), min_size=1, max_size=40))
def test_a_sync_point_drains_the_pipeline(triples):
    """With sync points the step is the simulation's; a step that syncs after every op is
    host + device op by op (no overlap at all), one with no sync the plain pipeline."""
    from flopsim.roofline import overlap_times

    host, device, syncs = ([t[i] for t in triples] for i in range(3))
    total = sum(overlap_times(host, device, syncs))
    assert total == pytest.approx(_pipeline_with_syncs(host, device, syncs), rel=1e-9, abs=1e-15)
    assert total >= sum(overlap_times(host, device)) - 1e-15
    assert sum(overlap_times(host, device, [True] * len(host))) == pytest.approx(sum(host) + sum(device))


def test_a_sync_point_by_hand():
    """Host 1, 1, 1 and device 5, 5, 5 (us), the host waiting after the first op:
    F1 = 1 + 5 = 6, the host resumes at 6 and queues op 2 at 7, F2 = 7 + 5 = 12, op 3 is
    queued at 8, F3 = 12 + 5 = 17; with no sync F3 = 16."""
    from flopsim.roofline import overlap_times

    assert sum(overlap_times([1, 1, 1], [5, 5, 5], [True, False, False])) == pytest.approx(17)
    assert sum(overlap_times([1, 1, 1], [5, 5, 5])) == pytest.approx(16)


@pytest.mark.parametrize("family", ["moe", "mod"])
def test_eager_moe_and_mod_decode_sync_and_sweep_agrees(family):
    """A dropless MoE reads its token counts back (`counts`), a MoD block at decode which
    tokens run (its router): those ops sync the host; predict and sweep agree on the step."""
    from flopsim.sweep import sweep

    preset, phase = ("mixtral-8x7b", "forward") if family == "moe" else ("decoder-220m-mod", "decode")
    spec = tiny(preset, layers=2, kv_heads=2)
    cal = _cal(**QUEUED)
    r = predict(spec, H100, phase=phase, batch=2, seq=64, calibration=cal)
    syncing = [o.name for o in r.ops if o.host_sync]
    assert syncing and all(n.endswith(".counts") if family == "moe" else ".router" in n for n in syncing)
    grid = sweep(spec, H100, phase=phase, vary={"batch": [2, 4]}, seq=64, calibration=cal).table()
    assert grid.time_s.iloc[0] == pytest.approx(r.time_s, rel=1e-9)


def test_the_steps_that_sync_are_the_ones_the_gpu_measured_waiting():
    """On the H200 (reports/validation/cuda-h200/), the steps whose host could not queue
    ahead (`host_waits`) are exactly those whose op list has a sync point, but MoD's decode:
    flopsim models the paper's per-token decision (which tokens run is read back to gather
    them), while the reference runs the round(c * B) best-scored tokens, a topk on the
    device (flopsim.torchref.mod.decode_runs) that reads nothing back, and did not wait."""
    import pandas as pd

    from flopsim.count import count
    from flopsim.validate import load_suite

    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    measured = pd.read_csv(root / "reports" / "validation" / "cuda-h200" / "per_model.csv")
    cases = {c.name: c for c in load_suite("quick", "cuda")}
    for row in measured.itertuples():
        case = cases[row.model]
        ops = count(case.spec, batch=case.batch, seq=case.seq, phase=row.phase,
                    context=case.context if row.phase == "decode" else None).ops
        fixed_count = case.spec.family == "mod" and row.phase == "decode"
        assert any(op.host_sync for op in ops) == (bool(row.host_waits) or fixed_count), (row.model, row.phase)
        assert not (fixed_count and row.host_waits)


def test_a_reading_right_after_a_large_kernel_does_not_scale_its_point():
    """A calibration point is scaled to the median host speed from the smoothed readings
    around it (flopsim.probe.smoothed), not from the one right after its own timing: that
    one reads the kernel's aftermath (beside 256 MB kernels 2-11x the median on the 2-core
    VM). A drift that lasts is still corrected, by the matrix-rate reading; cold reads
    slowed by the calibration's own memory-bound kernels (1.43-1.66x the median beside
    them, the matrix rate 0.99-1.03x) scale nothing."""
    from flopsim.calibrate import Point, _at_reference_all
    from flopsim.probe import ProbeReading, smoothed, smoothed_round_robin

    quiet, slow = ProbeReading(1e-3, 2e-4, 5e-5), ProbeReading(2e-3, 2e-4, 5e-5)  # slow: the host at half speed
    spike, streamed = ProbeReading(1e-2, 2e-3, 5e-5), ProbeReading(1e-3, 3.2e-4, 5e-5)
    readings = [quiet] * 30 + [spike] + [quiet] * 30 + [slow] * 40 + [streamed] * 40
    assert smoothed(readings)[30] == quiet  # one aftermath spike: the drift around it
    assert smoothed(readings)[80] == slow  # a drift of many readings: followed
    assert smoothed(readings)[130] == streamed
    assert smoothed(readings, half_window=0) == readings

    def point(name, reading):
        return Point(name, "elementwise", None, 1e-3, 1e6, 1e6, 0.5, 0.5, size=256e6, probe=reading)

    bench = SimpleNamespace(readings=readings, fixed_readings=[],
                            points=[point("spiked", readings[30]), point("drifted", readings[80]),
                                    point("streamed", readings[130])])
    ref, (spiked, drifted, streamed_point) = _at_reference_all(bench)
    assert ref == quiet  # the median of all readings
    assert (spiked.compute_eff, spiked.memory_eff) == pytest.approx((0.5, 0.5))  # its own reading was 10x the median
    assert (drifted.compute_eff, drifted.memory_eff) == pytest.approx((1.0, 1.0))  # measured at half speed
    assert (streamed_point.compute_eff, streamed_point.memory_eff) == pytest.approx((0.5, 0.5))  # cold reads only

    # validation's readings, taken runner after runner in each round, smoothed in the order taken
    per_runner = [[quiet, quiet], [ProbeReading(1e-3, 2e-3, 5e-5), quiet], [quiet, quiet]]
    assert smoothed_round_robin(per_runner) == [[quiet, quiet]] * 3


def test_fixed_costs_are_restored_at_the_reading_beside_their_own_timing():
    """The probe's fixed cost reads the phase it follows as well as the host (on the 2-core VM:
    72 us beside the fixed costs' timing, 133 us beside the matrix products, which took 717 of
    the 1,238 readings). The fixed costs, kept in probe units, are restored at the median of
    the readings beside their own timing; the matrix rate and the cold reads stay the median
    of all (the points' scale, and validation's `at_speed` reads the same reference)."""
    from flopsim.calibrate import _at_reference_all, _fixed_part, reference_reading
    from flopsim.probe import ProbeReading, median_reading

    beside_fixed = [ProbeReading(1e-3, 2e-4, 72e-6)] * 87
    beside_products = [ProbeReading(1.1e-3, 3e-4, 133e-6)] * 717
    others = [ProbeReading(1e-3, 2.5e-4, 95e-6)] * 434
    readings = beside_fixed + beside_products + others
    ref = reference_reading(readings, beside_fixed)
    everything = median_reading(readings)
    assert everything.fixed_s == 133e-6  # what the median of all would restore them at
    assert ref.fixed_s == 72e-6
    assert (ref.compute_s, ref.memory_s) == (everything.compute_s, everything.memory_s)
    assert reference_reading(readings) == everything  # no fixed-cost readings: the median of all

    # a kernel whose cold fixed cost was 144 us when the probe read 72 us is kept as 2 probe units
    bench = SimpleNamespace(readings=readings, fixed_readings=beside_fixed, points=[], queued=False,
                            fixed_cold={"elementwise": 2.0, "launch": 0.25}, host={},
                            fixed_units=lambda reading: reading.fixed_s)
    got, _ = _at_reference_all(bench)
    assert got == ref
    fixed, launch, _ = _fixed_part(bench, got)
    assert fixed["elementwise"] == pytest.approx(144e-6)  # as timed, not 2 x 133 us
    assert launch == pytest.approx(18e-6)


# -- fresh pages (a CPU's allocator maps large outputs afresh) ---------------------------

MIB = 2 ** 20


def test_fresh_pages_are_paid_by_allocations_above_the_threshold():
    """Each launch allocates write_bytes / kernels; from glibc's 32 MiB on (a block of
    exactly 32 MiB, with the allocator's header, is over the threshold) the bytes cost
    s_per_byte each, below it nothing (the heap serves them), in place nothing."""
    import numpy as np

    from flopsim.roofline import fresh_pages_s

    fresh = FreshPages(s_per_byte=2e-10)
    assert fresh.above_bytes == 32 * MIB  # glibc malloc.c DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
    assert fresh_pages_s(64 * MIB, 1, False, fresh) == pytest.approx(2e-10 * 64 * MIB)
    assert fresh_pages_s(32 * MIB, 1, False, fresh) == pytest.approx(2e-10 * 32 * MIB)
    assert fresh_pages_s(32 * MIB - 4096, 1, False, fresh) == 0.0
    assert fresh_pages_s(128 * MIB, 2, False, fresh) == pytest.approx(2e-10 * 128 * MIB)  # two of 64 MiB
    assert fresh_pages_s(64 * MIB, 4, False, fresh) == 0.0  # four of 16 MiB
    assert fresh_pages_s(64 * MIB, 1, True, fresh) == 0.0  # written in place
    assert fresh_pages_s(64 * MIB, 1, False, None) == 0.0  # no figure (a GPU)
    assert fresh_pages_s(64 * MIB, 0, False, fresh) == 0.0  # never launched
    grid = fresh_pages_s(np.array([16.0, 64.0, 64.0, 32.0]) * MIB, np.array([1.0, 1.0, 0.5, 1.0]), False, fresh)
    assert grid.tolist() == pytest.approx([0.0, 2e-10 * 64 * MIB, 2e-10 * 64 * MIB, 2e-10 * 32 * MIB])  # half a launch of 128 MiB


def _sparse_ff():
    """The full CPU suite's sparse FF decoder (specs/validation/full.yaml), fp32."""
    from flopsim.spec import load_model

    return load_model("decoder-220m").with_changes(
        layers=4, d_model=512, heads=8, d_ff=2048, vocab=8000, max_seq=4096, dtype="fp32", family="sparse_ff",
        sparse_ff={"block_size": 16, "d_lowrank": 32})


def test_sparse_ff_forward_pays_fresh_pages_for_its_weight_copies_and_sweep_agrees():
    """At B = 2, S = 256 each token's weight copy is n * (d_ff / N) * d_model * 4 bytes =
    512 * 128 * 512 * 4 = 128 MiB, one allocation per gather: the up and down gathers of
    the 4 blocks pay for it, nothing else does; at decode (n = 2) nothing does."""
    from flopsim.sweep import sweep

    cpu = load_hardware("cpu")
    base = load_calibration("auto", cpu).model_copy(update={"fresh_pages": None})
    paged = base.model_copy(update={"fresh_pages": FreshPages(s_per_byte=1.5e-10)})
    spec = _sparse_ff()
    r = predict(spec, cpu, phase="forward", batch=2, seq=256, calibration=paged)
    plain = predict(spec, cpu, phase="forward", batch=2, seq=256, calibration=base)
    copy = 2 * 256 * (2048 // 16) * 512 * 4
    assert copy == 128 * MIB
    paying = {o.name: o.fresh_s for o in r.ops if o.fresh_s > 0}
    assert sorted(paying) == sorted(f"block.{i}.mlp.{w}.gather" for i in range(4) for w in ("up", "down"))
    assert all(v == pytest.approx(1.5e-10 * copy) for v in paying.values())
    assert r.time_s - plain.time_s == pytest.approx(8 * 1.5e-10 * copy)
    decode = predict(spec, cpu, phase="decode", batch=2, context=1024, calibration=paged)
    assert not any(o.fresh_s for o in decode.ops)
    grid = sweep(spec, cpu, phase="forward", vary={"batch": [2, 1]}, seq=256, calibration=paged).table()
    assert grid.time_s.iloc[0] == pytest.approx(r.time_s, rel=1e-9)


def test_calibrate_records_points_net_of_their_fresh_pages():
    """A memory-bound kernel timed at t seconds whose output (64 MiB) is mapped afresh is
    recorded at t - fixed - fresh, as predict adds the fresh pages back."""
    import torch

    from flopsim.calibrate import Bench, _ctx
    from flopsim.ops import primitives as P

    cpu = load_hardware("cpu")
    bench = Bench(torch=torch, device="cpu", dtype="fp32", hw=cpu, timed=None, pool=None, say=print, smoke=True,
                  gen=None, fixed_hot={"launch": 1e-5}, fresh_pages=FreshPages(s_per_byte=1e-10))
    n = 16 * MIB  # fp32 elements: 64 MiB written
    op = P.elementwise(_ctx("fp32"), "x", layer=0, elements=n, op="copy", module="x")[0]
    bench.record("copy", "elementwise", None, 0.05, op, matrix=False)
    point = bench.points[-1]
    assert point.fresh_s == pytest.approx(1e-10 * 4 * n)
    busy = 0.05 - 1e-5 - 1e-10 * 4 * n
    assert point.memory_eff == pytest.approx(point.bytes / cpu.memory_bandwidth_bytes_per_s / busy)


def test_size_points_give_the_compute_efficiency_at_the_ops_flops():
    """An embedding's backward moves its table's bytes and does its rows' adds: two points
    of about one table's bytes, measured with 7 and 488 rows (7 k and 500 k adds), carry
    compute efficiencies 100x apart. An op of 512 rows on the same table takes the compute
    efficiency of the point that did as much arithmetic (exact at its FLOPs), and its
    memory efficiency by bytes; without FLOPs (an older file's points, or no `flops`
    given) both come by bytes."""
    points = [{"kind": "embedding", "backward": True, "bytes": 16.8e6, "flops": 7e3, "compute": 5e-5, "memory": 1.6},
              {"kind": "embedding", "backward": True, "bytes": 18.8e6, "flops": 5e5, "compute": 6e-3, "memory": 1.2}]
    cal = _cal(sizes=points)
    compute, memory = cal.efficiency("embedding", None, 16.8e6, None, True, 1, 5e5)
    assert compute == pytest.approx(6e-3) and memory == pytest.approx(1.6)
    assert cal.efficiency("embedding", None, 16.8e6, None, True)[0] == pytest.approx(5e-5)  # no flops: by bytes
    older = _cal(sizes=[{k: v for k, v in p.items() if k != "flops"} for p in points])
    assert older.efficiency("embedding", None, 16.8e6, None, True, 1, 5e5)[0] == pytest.approx(5e-5)
