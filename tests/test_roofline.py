"""The roofline: the per-op formula, bounds, launch overhead, calibration,
and the two acceptance checks of the issue on h100-sxm (a GEMM-heavy
prefill and a batch-1 decode)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny
from flopsim.calibration import Calibration, load_calibration
from flopsim.count import count
from flopsim.errors import SpecError
from flopsim.hardware import load_hardware
from flopsim.predict import predict
from flopsim.roofline import (MATRIX_KINDS, bound_of, executed_flops, op_peak_flops_per_s, ridge_intensity,
                              roofline_time)

H100 = load_hardware("h100-sxm")
PEAK = 989.4e12  # bf16 dense
BW = 3.35e12
IDEAL_NO_LAUNCH = Calibration(device="h100-sxm", source="test: efficiency 1, no launch overhead",
                              launch_overhead_s=0.0)


# -- the formula --------------------------------------------------------------
def test_compute_bound_op():
    # 2*4096^3 FLOPs over 3 * 4096^2 * 2 bytes: intensity 1365 > ridge 295
    flops, nbytes = 2 * 4096 ** 3, 3 * 4096 ** 2 * 2
    c, m, t = roofline_time(flops, nbytes, PEAK, BW, overhead_s=5e-6)
    assert c == pytest.approx(flops / PEAK) and m == pytest.approx(nbytes / BW)
    assert t == pytest.approx(flops / PEAK + 5e-6)
    assert bound_of(c, m) == "compute"


def test_memory_bound_op():
    # a GEMV: 2*4096^2 FLOPs over 4096^2 * 2 bytes of weights: intensity 1
    flops, nbytes = 2 * 4096 ** 2, 4096 ** 2 * 2
    c, m, t = roofline_time(flops, nbytes, PEAK, BW, overhead_s=2e-6)
    assert t == pytest.approx(nbytes / BW + 2e-6)
    assert bound_of(c, m) == "memory"


def test_efficiencies_divide_the_peaks():
    c, m, t = roofline_time(1e12, 1e9, PEAK, BW, compute_eff=0.5, memory_eff=0.8)
    assert c == pytest.approx(1e12 / (0.5 * PEAK)) and m == pytest.approx(1e9 / (0.8 * BW))
    assert t == pytest.approx(max(c, m))


def test_empty_op_costs_nothing_and_ties_are_compute_bound():
    assert roofline_time(0, 0, PEAK, BW, overhead_s=1e-5)[2] == 0
    assert bound_of(1.0, 1.0) == "compute"


def test_arrays_broadcast_like_numbers():
    flops = np.array([[1e9], [1e12]])
    nbytes = np.array([[1e6, 1e10]])
    c, m, t = roofline_time(flops, nbytes, PEAK, BW, overhead_s=1e-6)
    assert t.shape == (2, 2)
    for i in range(2):
        for j in range(2):
            assert t[i, j] == pytest.approx(float(roofline_time(flops[i, 0], nbytes[0, j], PEAK, BW, overhead_s=1e-6)[2]))


def test_matrix_kinds_use_the_dtype_peak_and_others_the_vector_rate():
    assert op_peak_flops_per_s("matmul", H100, "bf16") == PEAK
    assert op_peak_flops_per_s("attention", H100, "fp8") == 1978.9e12
    assert op_peak_flops_per_s("elementwise", H100, "bf16") == 66.9e12
    assert set(MATRIX_KINDS) == {"matmul", "attention", "router", "conv"}
    assert ridge_intensity(H100, "bf16") == pytest.approx(PEAK / BW)


# -- calibration ----------------------------------------------------------------
def test_calibration_lookup_order():
    cal = Calibration(default={"compute": 0.8, "memory": 0.9}, kinds={"attention": {"compute": 0.5, "memory": 0.7}},
                      gemm=[{"m": 64, "n": 64, "k": 64, "compute": 0.3}, {"m": 4096, "n": 4096, "k": 4096, "compute": 0.95}],
                      launch_overhead_s=1e-6)
    assert cal.efficiency("elementwise") == (0.8, 0.9)
    assert cal.efficiency("attention", (32, 128, 128, 64)) == (0.5, 0.7)  # attention is not a gemm kind
    assert cal.efficiency("matmul", (1, 64, 64, 64)) == (0.3, 0.9)  # exact at a measured shape
    assert cal.efficiency("matmul", (1, 4096, 4096, 4096)) == (0.95, 0.9)

    def idw(m, n, k):
        """Weights 1/d^4 over log-space distance, geometric mean of the efficiencies."""
        d64 = (np.log(m / 64) ** 2 + np.log(n / 64) ** 2 + np.log(k / 64) ** 2) ** 0.5
        d4k = (np.log(m / 4096) ** 2 + np.log(n / 4096) ** 2 + np.log(k / 4096) ** 2) ** 0.5
        w64, w4k = d64 ** -4, d4k ** -4
        return float(np.exp((w64 * np.log(0.3) + w4k * np.log(0.95)) / (w64 + w4k)))

    assert cal.efficiency("matmul", (1, 100, 60, 80))[0] == pytest.approx(idw(100, 60, 80), rel=1e-12)
    assert cal.efficiency("matmul", (1, 100, 60, 80))[0] == pytest.approx(0.3, abs=0.01)  # near the small point
    assert cal.efficiency("matmul", (1, 2048, 8192, 4096))[0] == pytest.approx(idw(2048, 8192, 4096), rel=1e-12)
    assert cal.efficiency("matmul") == (0.8, 0.9)  # no shape: the default
    arr = cal.efficiency("matmul", (1, np.array([50, 5000]), np.array([60, 4000]), np.array([70, 4096])))[0]
    assert list(arr) == pytest.approx([idw(50, 60, 70), idw(5000, 4000, 4096)], rel=1e-12)
    assert cal.overhead_s(H100) == 1e-6 and Calibration.ideal().overhead_s(H100) == H100.launch_overhead_s
    assert not cal.is_ideal and Calibration.ideal().is_ideal


def test_calibration_points_per_kind_with_memory():
    cal = Calibration(kinds={"attention": {"compute": 0.5, "memory": 0.7}},
                      gemm=[{"m": 64, "n": 64, "k": 64, "compute": 0.3, "memory": 0.4, "kind": "matmul"},
                            {"m": 512, "n": 512, "k": 64, "batch": 32, "compute": 0.6, "kind": "attention"}],
                      gemm_kinds=("matmul", "attention"), measured={"device": "test"})
    assert cal.efficiency("matmul", (1, 4096, 4096, 4096)) == (0.3, 0.4)  # only matmul points for matmul
    assert cal.efficiency("attention", (1, 64, 64, 64)) == (0.6, 0.7)  # memory from the kind: the point has none
    assert cal.efficiency("router", (1, 64, 1, 64)) == (1.0, 1.0)  # not a gemm kind here
    compute, memory = cal.efficiency("matmul", (1, np.array([1, 2]), 64, 64))
    assert list(compute) == [0.3, 0.3] and list(memory) == [0.4, 0.4]
    with pytest.raises(Exception):
        Calibration(gemm=[{"m": 1, "n": 1, "k": 1, "compute": 1, "kind": "blas"}])


def test_calibration_files():
    # the H100 default keeps the project's own measurement: 798 of 989.4 TFLOP/s at 8192^3
    assert load_calibration(None, H100).default.compute == pytest.approx(798 / 989.4, abs=1e-3)
    assert load_calibration("ideal", H100).is_ideal
    assert load_calibration("auto", load_hardware("l4")).kind == "published"
    cpu = load_calibration(None, load_hardware("cpu"))  # measured by `flopsim calibrate --device cpu`
    assert cpu.measured["device"] == "cpu" and cpu.measured["dtype"] == "fp32"
    point = next(p for p in cpu.gemm if (p.kind, p.batch, p.m, p.n, p.k) == ("matmul", 1, 64, 96, 96))
    # a measured shape: its ceiling (compute when it was measured compute-bound), to rounding
    # (the lookup interpolates in log space: exp(log(x)) may differ from x in the last bit)
    assert cpu.efficiency("matmul", (1, 64, 96, 96))[0] == pytest.approx(point.compute, rel=1e-12)
    between = cpu.efficiency("matmul", (1, 60, 100, 90))[0]  # interpolated among the measured shapes near it
    near = sorted((abs(np.log(p.m / 60)) + abs(np.log(p.n / 100)) + abs(np.log(p.k / 90)), p.compute)
                  for p in cpu.gemm if p.kind == "matmul" and p.compute is not None)[:8]
    assert min(c for _, c in near) <= between <= max(c for _, c in near)


def test_bad_calibration_is_one_line(tmp_path):
    path = tmp_path / "cal.yaml"
    path.write_text("kinds:\n  blas: {compute: 0.5}\n")
    with pytest.raises(SpecError) as err:
        load_calibration(str(path), H100)
    assert "blas" in str(err.value) and "\n" not in str(err.value)
    path.write_text("default: {compute: 0}\n")
    with pytest.raises(SpecError, match="default.compute"):
        load_calibration(str(path), H100)


# -- the acceptance checks on h100-sxm ------------------------------------------------
def test_gemm_heavy_prefill_is_flops_over_peak_plus_memory_term():
    """llama-3-8b prefill of 2048 tokens, efficiencies 1: the matrix products
    are compute-bound (intensity > 1000 FLOP/B against a ridge of 295), so the
    time is flops / 989.4e12, plus the memory term of the ops that are not
    large matrix products (elementwise, norms, KV-cache writes, embeddings,
    and the head on the last position: bytes / 3.35e12), plus one launch
    overhead per kernel."""
    spec, batch, seq = "llama-3-8b", 1, 2048
    c = count(spec, batch=batch, seq=seq, phase="prefill")
    memory_ops = [op for op in c.ops if op.kind not in ("matmul", "attention") or op.name == "head.lm"]
    kernels = sum(1 for op in c.ops if op.all_flops or op.bytes)
    # the fused causal attention kernel runs the triangle of its scores (executed_flops)
    executed = c.flops - sum(op.flops - op.causal_flops for op in c.ops if op.kind == "attention")
    expected = (executed / PEAK + sum(op.bytes for op in memory_ops) / BW + kernels * H100.launch_overhead_s)
    r = predict(spec, "h100-sxm", phase="prefill", batch=batch, seq=seq, calibration="ideal")
    assert r.time_s == pytest.approx(expected, rel=0.02)
    assert r.bound == "compute"
    assert r.flops == c.flops and r.bytes == c.bytes
    # without launches the matrix products alone are flops / peak
    r0 = predict(spec, "h100-sxm", phase="prefill", batch=batch, seq=seq, calibration=IDEAL_NO_LAUNCH)
    gemm_time = sum(op.time_s for op in r0.ops if op.bound == "compute")
    gemm_flops = sum(executed_flops(op) for op in c.ops if (op.name, op.pass_) in
                     {(o.name, o.pass_) for o in r0.ops if o.bound == "compute"})
    assert gemm_time == pytest.approx(gemm_flops / PEAK, rel=1e-9)
    assert r.mfu == pytest.approx(c.flops / (r.time_s * PEAK))


def test_batch1_decode_is_weight_reads_over_bandwidth():
    """llama-3-8b decode at batch 1, context 2048: every op is memory-bound and
    the time is the weight bytes (plus a 1.8% KV-cache read) over 3.35 TB/s."""
    r = predict("llama-3-8b", "h100-sxm", phase="decode", batch=1, context=2048, calibration=IDEAL_NO_LAUNCH)
    weight_bytes = sum(op.weight_bytes for op in count("llama-3-8b", batch=1, seq=2048, phase="decode").ops)
    assert r.bound == "memory"
    assert all(op.bound == "memory" for op in r.ops if op.time_s > 0)
    assert r.time_s == pytest.approx(weight_bytes / BW, rel=0.025)
    assert r.time_s == pytest.approx(r.bytes / BW, rel=1e-9)
    assert r.tokens_per_s == pytest.approx(1 / r.time_s)
    # the shipped (published-seeded) calibration: the weight-reading products run at the
    # GEMV memory efficiency its memory-bound points give (0.687 and 0.691 at m = 1 and 4,
    # n = k = 8192: weighted means lie between), every kernel pays its launch cost
    cal = load_calibration("auto", H100)
    gemv = sorted(p.memory for p in cal.gemm if p.kind == "matmul" and p.memory)
    d = predict("llama-3-8b", "h100-sxm", phase="decode", batch=1, context=2048)
    for op in d.ops:
        if op.kind == "matmul":
            assert gemv[0] - 1e-9 <= op.memory_eff <= gemv[-1] + 1e-9
            assert op.overhead_s == pytest.approx(cal.fixed_cost_s("matmul", "", H100))
    matmul_bytes = sum(op.bytes for op in d.ops if op.kind == "matmul")
    matmul_time = sum(op.time_s - op.overhead_s for op in d.ops if op.kind == "matmul")
    assert matmul_bytes / (BW * gemv[-1]) <= matmul_time <= matmul_bytes / (BW * gemv[0])


# -- properties -------------------------------------------------------------------------
specs = st.builds(lambda kv, ffn, positions: tiny("gpt2-small", heads=4, kv_heads=kv, ffn=ffn, positions=positions,
                                                  max_seq=4096),
                  st.sampled_from([1, 4]), st.sampled_from(["mlp", "gated"]), st.sampled_from(["learned", "rope"]))


@settings(max_examples=25, deadline=None)
@given(specs, st.sampled_from(["train", "forward", "prefill", "decode"]), st.integers(1, 64), st.integers(1, 64),
       st.integers(1, 64), st.sampled_from(["h100-sxm", "cpu", "tpu-v5e"]))
def test_time_is_non_negative_and_monotone_in_batch(spec, phase, b, s, db, hw):
    """With fixed efficiencies (a shape-aware calibration may make a larger
    product faster than a smaller one, so the property is checked on the ideal one)."""
    base = predict(spec, hw, phase=phase, batch=b, seq=s, calibration="ideal")
    more = predict(spec, hw, phase=phase, batch=b + db, seq=s, calibration="ideal")
    assert all(op.time_s >= 0 and op.compute_s >= 0 and op.memory_s >= 0 for op in base.ops)
    assert base.time_s > 0
    assert more.time_s >= base.time_s
    assert 0 <= base.mfu <= 1.5


def test_op_times_memoized_lookup_equals_op_time():
    """`op_times` looks each distinct shape's efficiency up once; every OpTime is op_time's."""
    from flopsim.roofline import op_time, op_times

    hw, cal = load_hardware("h100-sxm"), load_calibration("h100-sxm")
    ops = count("llama-3-8b", phase="decode", batch=2, context=512).ops
    assert op_times(ops, hw, "bf16", cal) == [op_time(op, hw, "bf16", cal) for op in ops]


def test_plain_numbers_give_numpys_results_bit_for_bit():
    """On plain Python numbers the roofline runs in Python floats (no numpy import on a
    cached predict); every result equals numpy's exactly, on random operands."""
    import random

    from flopsim.roofline import overlap_times, products_per_kernel

    rng = random.Random(7)
    for _ in range(3000):
        args = [rng.choice([0, rng.randrange(1, 2 ** 50), rng.uniform(0, 1e18)]),  # flops
                rng.choice([0, rng.randrange(1, 2 ** 40), rng.uniform(1, 1e12)]),  # bytes
                rng.uniform(1e9, 2e15), rng.uniform(1e9, 8e12),  # peak, bandwidth
                rng.uniform(1e-6, 10.0), rng.uniform(1e-6, 10.0),  # efficiencies
                rng.choice([0.0, rng.uniform(0, 1e-4)]), rng.choice([1, 0.25, rng.uniform(0, 64)])]
        plain = roofline_time(*args)
        ref = roofline_time(*(np.float64(a) for a in args))  # numpy scalars: numpy's arithmetic
        assert all(type(v) is float for v in plain) and list(plain) == [float(v) for v in ref], args
        batch, kernels = rng.choice([1, 8, rng.uniform(0.5, 300)]), rng.choice([1, 0.0, rng.uniform(0, 9)])
        per = products_per_kernel((batch, 64, 64, 64), kernels)
        assert per == float(products_per_kernel((np.float64(batch),), np.float64(kernels)))
    host = [rng.uniform(0, 1e-4) for _ in range(50)]
    device = [rng.choice([0.0, rng.uniform(0, 1e-3)]) for _ in range(50)]
    syncs = [rng.random() < 0.1 for _ in range(50)]
    shares = overlap_times(host, device, syncs)
    assert shares == [float(v) for v in overlap_times([np.float64(h) for h in host], device, syncs)]
    with pytest.warns(RuntimeWarning):  # a zero rate still gives numpy's inf (and its warning)
        assert roofline_time(1.0, 1.0, 0.0, BW)[0] == float("inf")
