"""Precision per tensor class (the spec's `precision` block): quantized weights with group
scales, a KV cache in its own dtype, the dtype the matrix products run in.

- decode of Llama-2-7B reads the bytes its dtypes imply, derived term by term (bf16,
  int8 per channel, int4 in groups of 32 with a scale and a zero point, fp8);
- the KV cache in fp8: half the cache bytes read and written, half the cache memory
  (and MLA's latent cache likewise);
- memory holds the weights as stored;
- W8A8: the products run at the int8 / fp8 peak; weight-only: at the bf16 peak;
- a precision block equal to the dtype everywhere changes nothing;
- bad input and train with quantized weights: one line, exit 2.
"""

from __future__ import annotations

import pytest

from conftest import one_error_line, run_cli
from flopsim.count import count
from flopsim.errors import InputError, SpecError
from flopsim.spec import load_model

LLAMA2_7B = dict(layers=32, d=4096, d_ff=11008, vocab=32000)


def llama2_decode_weight_bytes(*, value_bytes, scale_bytes=0, group=None, dtype_bytes=2):
    """Weight bytes one Llama-2-7B decode step reads: every Linear's matrix at `value_bytes`
    a weight plus its scales (one per `group` weights of a row, or one per row), the one
    embedding row and the norms' weights in bf16. Linear layers per block: q, k, v, o
    (4096 x 4096 each, fused qkv as one product of 3 x 4096 rows), gate and up (fused,
    2 x 11008 rows of 4096), down (4096 rows of 11008); the untied head (32000 rows of 4096)."""
    L, d, ff, V = (LLAMA2_7B[k] for k in ("layers", "d", "d_ff", "vocab"))
    matrices = [(3 * d, d), (d, d), (2 * ff, d), (d, ff)] * L + [(V, d)]  # (rows, row length)
    total = 0
    for rows, length in matrices:
        scales = rows * -(-length // group) if group else rows
        total += rows * length * value_bytes + (scales * scale_bytes if scale_bytes else 0)
    norms = (2 * L + 1) * d * dtype_bytes
    embedding_row = d * dtype_bytes  # one token's row of the table
    return total + norms + embedding_row


@pytest.mark.parametrize("precision, expected", [
    (None, llama2_decode_weight_bytes(value_bytes=2)),
    (dict(weights="int8"), llama2_decode_weight_bytes(value_bytes=1, scale_bytes=2)),
    (dict(weights="int4", group_size=32, scale_bytes=4), llama2_decode_weight_bytes(value_bytes=0.5, scale_bytes=4,
                                                                                     group=32)),
    (dict(weights="int4", group_size=128), llama2_decode_weight_bytes(value_bytes=0.5, scale_bytes=2, group=128)),
    (dict(weights="fp8", group_size=16384, scale_bytes=4, compute="fp8"),
     llama2_decode_weight_bytes(value_bytes=1, scale_bytes=4, group=16384)),
])
def test_quantized_decode_reads_the_bytes_its_dtypes_imply(precision, expected):
    spec = load_model("llama-2-7b")
    if precision is not None:
        spec = spec.with_changes(precision=precision)
    r = count(spec, phase="decode", batch=1, context=2048)
    assert r.total("weight_bytes") == expected
    # int4 g32 with a scale and a zero point: 0.625 bytes a weight; the parameters do not change
    assert r.params == 6_738_415_616


def test_quantized_weights_in_memory_are_the_stored_bytes():
    """Memory: every Linear's matrix and scales as stored, the tables and norms in bf16."""
    from flopsim.memory import MemoryModel

    base = load_model("llama-2-7b")
    int4 = base.with_changes(precision=dict(weights="int4", group_size=32, scale_bytes=4))
    bf16_bytes = MemoryModel(base, "decode").evaluate(1, 1, 16)["weights_bytes"]
    int4_bytes = MemoryModel(int4, "decode").evaluate(1, 1, 16)["weights_bytes"]
    assert bf16_bytes == 6_738_415_616 * 2
    table = 32000 * 4096 * 2  # the embedding table stays bf16 (decode reads one row of it)
    per_step = llama2_decode_weight_bytes(value_bytes=0.5, scale_bytes=4, group=32)
    assert int4_bytes == per_step - 4096 * 2 + table


def test_kv_cache_in_fp8():
    """Llama-2-7B, KV fp8: the cache holds 2 * 32 * 4096 values a token at 1 byte; decode reads
    T tokens' of them and writes one token's (from bf16 activations)."""
    from flopsim.memory import MemoryModel

    spec = load_model("llama-2-7b").with_changes(precision=dict(kv_cache="fp8"))
    per_token = 2 * 32 * 4096  # K and V, layers, kv_heads * d_head
    b, t = 4, 4096
    r = count(spec, phase="decode", batch=b, context=t)
    assert r.total("kv_read_bytes") == b * t * per_token * 1
    assert r.total("kv_write_bytes") == b * per_token * 1
    assert MemoryModel(spec, "decode").evaluate(b, 1, t)["kv_cache_bytes"] == b * t * per_token
    bf16 = count(load_model("llama-2-7b"), phase="decode", batch=b, context=t)
    assert bf16.total("kv_read_bytes") == 2 * r.total("kv_read_bytes")
    assert bf16.total("weight_bytes") == r.total("weight_bytes")


def test_latent_cache_in_fp8():
    spec = load_model("deepseek-v3")
    fp8 = spec.with_changes(precision=dict(kv_cache="fp8"))
    a = count(spec, phase="decode", batch=2, context=1024)
    b = count(fp8, phase="decode", batch=2, context=1024)
    assert b.total("kv_read_bytes") * 2 == a.total("kv_read_bytes") == 2 * 1024 * 61 * 576 * 2


def test_precision_equal_to_dtype_changes_nothing():
    base = load_model("mixtral-8x7b").with_changes(layers=2)
    same = base.with_changes(precision=dict(weights="bf16", kv_cache="bf16", compute="bf16"))
    assert not same.quantized_weights and same.precision_label == "bf16"
    for phase in ("train", "prefill", "decode"):
        a = count(base, phase=phase, batch=2, seq=8, context=16 if phase == "decode" else None)
        b = count(same, phase=phase, batch=2, seq=8, context=16 if phase == "decode" else None)
        assert [o.to_dict() for o in a.ops] == [o.to_dict() for o in b.ops]


def test_compute_dtype_sets_the_peak():
    """W8A8 in fp8 runs the products at the fp8 peak (H100: 1978.9 TFLOP/s dense, twice
    bf16's 989.4); weight-only int4 keeps the bf16 peak."""
    from flopsim.predict import predict

    base = load_model("llama-3-8b")
    w8a8 = base.with_changes(precision=dict(weights="fp8", compute="fp8"))
    w4 = base.with_changes(precision=dict(weights="int4", group_size=128))
    runs = {name: predict(s, "h100-sxm", phase="prefill", batch=8, seq=4096, calibration="ideal")
            for name, s in (("bf16", base), ("w8a8", w8a8), ("w4", w4))}
    assert runs["w8a8"].summary()["peak_flops_per_s"] == 1978.9e12
    assert runs["w4"].summary()["peak_flops_per_s"] == 989.4e12

    def product(run):
        return next(op for op in run.ops if op.name == "block.0.mlp.gate_up")

    # a large compute-bound product: its compute time scales with the peak
    assert product(runs["bf16"]).bound == "compute"
    assert product(runs["w8a8"]).compute_s == pytest.approx(product(runs["bf16"]).compute_s * 989.4 / 1978.9,
                                                            rel=1e-12)
    assert product(runs["w4"]).compute_s == pytest.approx(product(runs["bf16"]).compute_s, rel=1e-12)
    # and its weights: a byte (fp8) and 0.5 + 2/128 bytes (int4 g128) a weight against bf16's 2
    assert product(runs["w4"]).bytes < product(runs["w8a8"]).bytes < product(runs["bf16"]).bytes


def test_fp4_products_run_at_the_fp4_peak_where_there_is_one():
    """W4A4 (MXFP4 weights, fp4 products): B200's dense fp4 peak, 9 PFLOP/s (twice its fp8
    4.5); a device publishing no fp4 peak (H100) runs them at its fp8 one."""
    from flopsim.predict import predict

    w4a4 = load_model("llama-3-8b").with_changes(precision=dict(weights="fp4", group_size=32, scale_bytes=1,
                                                                compute="fp4"))
    peak = {hw: predict(w4a4, hw, phase="prefill", batch=1, seq=512, calibration="ideal").summary()["peak_flops_per_s"]
            for hw in ("b200", "h100-sxm")}
    assert peak == {"b200": 9000.0e12, "h100-sxm": 1978.9e12}


def test_predict_names_the_precision(tmp_path):
    import json

    import yaml

    path = tmp_path / "int4.yaml"
    spec = load_model("llama-2-7b").with_changes(precision=dict(weights="int4", group_size=32, kv_cache="fp8"))
    path.write_text(yaml.safe_dump(spec.model_dump(exclude_none=True)))
    r = run_cli("predict", path, "-H", "a100-80gb", "--phase", "decode", "--context", "512")
    assert r.exit_code == 0, r.output
    assert "bf16, weights int4 g32, KV fp8" in r.output
    js = run_cli("predict", path, "-H", "a100-80gb", "--phase", "decode", "--context", "512", "--format", "json")
    assert json.loads(js.output)["precision"] == "bf16, weights int4 g32, KV fp8"


def test_train_with_quantized_weights_is_refused(tmp_path):
    import yaml

    spec = load_model("llama-2-7b").with_changes(precision=dict(weights="int8"))
    with pytest.raises(InputError, match="precision.weights"):
        count(spec, phase="train", seq=16)
    path = tmp_path / "int8.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(exclude_none=True)))
    assert "precision.weights" in one_error_line(run_cli("count", path, "--phase", "train", "--seq", "16"))
    # fp8 compute with bf16 weights trains (Transformer Engine's fp8 training)
    fp8 = load_model("llama-2-7b").with_changes(layers=1, precision=dict(compute="fp8"))
    assert count(fp8, phase="train", seq=16).flops > 0


@pytest.mark.parametrize("changes, expect", [
    (dict(precision=dict(weights="int3")), "precision.weights"),
    (dict(precision=dict(weights="int4", group_size=0)), "precision.group_size"),
    (dict(precision=dict(weights="int4", scale_bytes=3)), "precision.scale_bytes"),
    (dict(precision=dict(kv_cache="int4")), "precision.kv_cache"),
    (dict(precision=dict(compute="int4")), "precision.compute"),
    (dict(precision=dict(weights="int8", bits=8)), "precision.bits"),
])
def test_bad_precision_is_one_line(changes, expect):
    with pytest.raises(SpecError) as err:
        load_model("llama-2-7b").with_changes(**changes)
    assert expect in str(err.value) and "\n" not in str(err.value)


def test_quantized_weights_not_modelled_for_sparse_ff():
    with pytest.raises(SpecError, match="quantized weights are modelled for Linear layers"):
        load_model("st-800m-decoder-sparse-ff").with_changes(precision=dict(weights="int8"))


def test_a_tied_head_reads_the_embedding_table_in_its_dtype():
    """GPT-2 (the bf16 preset) int8: the blocks' products read a byte a weight plus a bf16
    scale per row and their bf16 bias; the tied LM head reads the bf16 table, as the
    embedding lookup does."""
    spec = load_model("gpt2-small").with_changes(precision=dict(weights="int8"))
    ops = {op.name: op for op in count(spec, phase="decode", batch=1, context=64).ops}
    assert ops["head.lm"].weight_bytes == 50257 * 768 * 2
    assert ops["block.0.mlp.up"].weight_bytes == 768 * 3072 * 1 + 3072 * 2 + 3072 * 2  # int8, scales, bias


def test_memory_reports_the_stored_bytes_per_parameter():
    """The breakdown's bytes per parameter is the weights' stored bytes over the parameters:
    int4 g32 with a scale and a zero point stores 0.625 bytes a Linear weight and the bf16
    tables and norms 2, so the average lies between; bf16 alone is 2."""
    from flopsim.memory import MemoryModel

    int4 = MemoryModel(load_model("llama-2-7b-int4"), "decode")
    assert int4.bytes_per_param["weights"] == int4.weight_bytes / 6_738_415_616
    assert 0.625 < int4.bytes_per_param["weights"] < 2
    assert MemoryModel(load_model("llama-2-7b"), "decode").bytes_per_param["weights"] == 2


def test_weight_only_products_name_their_kernel():
    """A weight-only quantized product runs its own kernel (dequantized inside it): variant
    '<weights>_weights', priced from that kernel's calibration points when measured; W8A8 and
    a tied head (the embedding table's dtype) stay plain products."""
    from flopsim.count import count

    base = load_model("llama-2-7b")
    int4 = base.with_changes(precision={"weights": "int4", "group_size": 32, "scale_bytes": 4})
    ops = {op.name: op for op in count(int4, batch=1, seq=1, phase="decode").ops}
    assert ops["block.0.attn.qkv"].variant == "int4_weights"
    assert ops["head.lm"].variant == "int4_weights"  # untied head: a quantized Linear
    w8a8 = base.with_changes(precision={"weights": "int8", "compute": "int8"})
    assert {op.variant for op in count(w8a8, batch=1, seq=1, phase="decode").ops if op.kind == "matmul"} == {None}
    plain = {op.variant for op in count(base, batch=1, seq=1, phase="decode").ops if op.kind == "matmul"}
    assert plain == {None}


def test_int4_points_price_int4_products_and_only_them():
    from flopsim.calibration import GemmPoint, load_calibration
    from flopsim.hardware import load_hardware

    shipped = load_calibration("auto", load_hardware("a100-80gb"))
    cal = shipped.model_copy(update={"gemm": [g for g in shipped.gemm if g.variant != "int4_weights"]})
    shape = (1, 1, 4096, 4096)
    plain = cal.efficiency("matmul", shape, variant=None)
    assert cal.efficiency("matmul", shape, variant="int4_weights") == plain  # none measured: the plain points
    int4 = cal.model_copy(update={"gemm": cal.gemm + [
        GemmPoint(kind="matmul", variant="int4_weights", m=1, n=4096, k=4096, memory=0.41)]})
    assert int4.efficiency("matmul", shape, variant="int4_weights")[1] == pytest.approx(0.41)
    assert int4.efficiency("matmul", shape, variant=None) == plain


@pytest.mark.parametrize("device, kernels", [("a100-80gb", ("int4_weights", "int8_weights")),
                                             ("a100-40gb", ("int4_weights", "int8_weights")),
                                             ("h100-sxm", ("int4_weights",))])
def test_published_seeded_gpus_price_weight_only_products_below_the_plain_gemv(device, kernels):
    """A weight-only product dequantizes inside the kernel and streams its bytes slower than
    a plain GEMV (tinygemm on the H200: 0.37-0.40 of the bandwidth against 0.77). The
    published-seeded A100 and H100 calibrations carry weight-only points of their own, each
    citing its source key, so an int4 / int8 decode is not priced at the bf16 GEMV's rate."""
    from flopsim.calibration import load_calibration
    from flopsim.hardware import load_hardware

    cal = load_calibration("auto", load_hardware(device))
    shape = (1, 1, 8192, 8192)
    plain = cal.efficiency("matmul", shape, variant=None)[1]
    for kernel in kernels:
        points = [g for g in cal.gemm if g.variant == kernel]
        assert points and all(f"gemm.{kernel}" in g.source and f"gemm.{kernel}" in cal.sources for g in points)
        # the sources: tinygemm 0.39-0.40 against the H200's bf16 GEMV 0.77 (0.5x), mlx's int8 GEMV 0.51
        # against cuBLAS's 0.73 on the same A100 (0.70x): each below 0.75x of the plain GEMV
        assert cal.efficiency("matmul", shape, variant=kernel)[1] < 0.75 * plain


def test_calibrate_measures_tinygemm_in_bf16_runs():
    from flopsim.calibrate import calibrate

    cal, _ = calibrate("cpu", threads=1, min_time_s=0.001, repeats=2, smoke=True, dtype="bf16")
    int4 = [g for g in cal.gemm if g.variant == "int4_weights"]
    assert len(int4) == 2 and all(g.memory and g.compute is None for g in int4)  # groups 32 and 128
    assert {(g.m, g.n, g.k) for g in int4} == {(1, 256, 256)}


def test_routers_take_the_matrix_products_points_and_convolutions_do_not():
    """A measured calibration holds GEMM points of kind matmul only. A router is an
    nn.Linear: with no points of its own it is looked up on the matmul points at its shape
    (calibration.PRICED_AS_MATMUL), not the kind-less default; a convolution, another
    kernel, keeps the default. With router points of its own, a router uses those."""
    from flopsim.calibration import Calibration, GemmPoint

    points = [GemmPoint(kind="matmul", m=m, n=n, k=k, memory=0.2 + m * n * k / 1e12)
              for m in (1, 4) for n in (64, 4096) for k in (64, 1024)]
    cal = Calibration(device="cpu", source="test", gemm=points, default={"compute": 0.9, "memory": 0.18},
                      gemm_kinds=("matmul", "router", "conv", "attention"))
    shape = (1, 1, 4096, 64)  # the sparse FF controller's second product at decode
    assert cal.efficiency("router", shape) == cal.efficiency("matmul", shape)
    assert cal.efficiency("router", shape)[1] != pytest.approx(0.18)
    assert cal.efficiency("conv", shape) == (0.9, 0.18)
    own = cal.model_copy(update={"gemm": points + [GemmPoint(kind="router", m=1, n=4096, k=64, memory=0.05)]})
    assert own.efficiency("router", shape)[1] == pytest.approx(0.05)


def test_the_shipped_cpu_calibration_measured_the_large_product_corner():
    """specs/calibration/cpu.yaml holds the products of large m and n at mid to large k
    (flopsim.calibrate.MAX_GEMM_FLOPS): without them a training step's LM head, 512 x 8000 x
    512, was interpolated from the k = 24 and 96 edge of that corner at 0.63 of peak, where
    the corner's measured neighbours run near 1 (fp32, 2 threads)."""
    from flopsim.calibrate import GEMM_GRID, MAX_GEMM_FLOPS
    from flopsim.calibration import load_calibration
    from flopsim.hardware import load_hardware

    rows, outputs, inputs = GEMM_GRID["cpu"]
    corner = {(2400, 5000, 352), (2400, 5000, 1400), (700, 5000, 5000)}
    assert all(2 * m * n * k <= MAX_GEMM_FLOPS["cpu"] for m, n, k in corner)
    assert all(m in rows and n in outputs and k in inputs for m, n, k in corner)
    cal = load_calibration("auto", load_hardware("cpu"))
    measured = {(p.m, p.n, p.k) for p in cal.gemm if p.kind == "matmul" and p.compute and not p.backward}
    assert corner <= measured
    head = cal.efficiency("matmul", (1, 512, 8000, 512))[0]
    neighbours = [p.compute for p in cal.gemm if p.kind == "matmul" and p.compute and not p.backward
                  and (p.m, p.n, p.k) in {(700, 5000, 352), (200, 5000, 352), (700, 1400, 352)}]
    assert head > 0.8 * min(neighbours)
