"""Gradient accumulation across micro-batches and the data-parallel reduction's dtype
(flopsim.ops.grad_accum): the op's bytes, who pays it, the plan's part, the message size."""

from __future__ import annotations

import json

import pytest

from conftest import one_error_line, run_cli, tiny
from flopsim.errors import InputError
from flopsim.ops import grad_accum


def test_bytes_per_param_derivations():
    g = 2  # bf16 gradients
    assert grad_accum.bytes_per_param("autograd", g) == 2 * g + g  # .grad += new: read 2, write 1
    assert grad_accum.bytes_per_param("main_grad", g, buffer_bytes=4) == 4 + g + 4  # fp32 main_grad += grad
    assert grad_accum.bytes_per_param("main_grad", g) == 3 * g  # a bf16/fp16 buffer
    assert grad_accum.bytes_per_param("none", g) == 0
    assert [grad_accum.paying_microbatches(f, 8) for f in grad_accum.FORMS] == [0, 8 - 1, 8]


def test_op_and_phase_ops():
    from flopsim.predict import phase_ops

    op, = grad_accum.grad_accumulation(1000, "autograd", grad_bytes=2, layer=0)
    assert (op.kind, op.pass_, int(op.weight_bytes), int(op.other_flops)) == ("elementwise", "bwd", 1000 * 3 * 2, 1000)
    spec = tiny(dtype="bf16")
    params = sum(o.params for o in phase_ops(spec, "train") if o.pass_ == "fwd")
    acc = lambda ops: [o for o in ops if "grad_accumulation" in o.tags]  # noqa: E731
    assert acc(phase_ops(spec, "train")) == []  # autograd pays nothing on a step of one micro-batch
    mg, = acc(phase_ops(spec, "train", grad_accumulation="main_grad", grad_reduce_dtype="fp32"))
    assert mg.weight_bytes == params * (4 + 2 + 4)
    four, = acc(phase_ops(spec, "train", microbatches=4))
    assert four.weight_bytes == params * 3 * 2 * (4 - 1)


@pytest.mark.parametrize("zero", [0, 2])
def test_shard_gives_the_gpus_share(zero):
    from flopsim.parallel.layout import make_layout
    from flopsim.parallel.shard import shard
    from flopsim.predict import phase_ops

    spec = tiny(dtype="bf16")
    layout = make_layout(spec, "train", tp=2, dp=2, zero=zero)
    ops = shard(phase_ops(spec, "train", grad_accumulation="main_grad"), spec, "train", layout)
    on_gpu = sum(o.params for o in ops if o.pass_ == "fwd" and o.kind != "collective")
    acc, = [o for o in ops if "grad_accumulation" in o.tags]
    assert acc.weight_bytes == on_gpu * 3 * 2 / (2 if zero >= 2 else 1)


def _plan(**kw):
    from flopsim.planning import plan_training

    return plan_training("gpt2-small", "h100-sxm", gpus=2, tp=1, zero=0, seq=512, micro_batch=2, global_batch=16,
                         tokens=1e8, **kw)


def test_plan_part_and_step():
    none, auto = _plan(grad_accumulation="none"), _plan()
    m = auto.config["microbatches"]
    assert m == 16 // (2 * 2)
    k = auto.compute
    assert k["grad_accumulation_s_per_step"] == pytest.approx((m - 1) * k["grad_accumulation_s_per_microbatch"])
    assert auto.step_time_s - none.step_time_s == pytest.approx(k["grad_accumulation_s_per_step"])
    parts = {p["part"]: p for p in auto.time_parts()}
    assert parts["gradient accumulation"]["per_step_s"] == k["grad_accumulation_s_per_step"]
    assert sum(p["per_step_s"] for p in auto.time_parts()) == pytest.approx(auto.step_time_s)
    assert "gradient accumulation" not in {p["part"] for p in none.time_parts()}
    main = _plan(grad_accumulation="main_grad", grad_reduce_dtype="fp32")
    assert main.compute["grad_accumulation_s_per_step"] == pytest.approx(
        m * main.compute["grad_accumulation_s_per_microbatch"])


def test_fp32_reduction_doubles_the_bf16_message():
    bf16, fp32 = _plan(), _plan(grad_reduce_dtype="fp32")
    assert bf16.config["grad_reduce_bytes_per_param"] == 2
    assert fp32.communication["dp_bytes_per_step"] == pytest.approx(2 * bf16.communication["dp_bytes_per_step"])


def test_bad_values():
    with pytest.raises(InputError, match="grad_accumulation: 'sum'"):
        _plan(grad_accumulation="sum")
    with pytest.raises(InputError, match="grad_reduce_dtype: 'fp8'"):
        _plan(grad_reduce_dtype="fp8")


def test_cli_options():
    base = ("plan", "train", "gpt2-small", "--hardware", "h100-sxm", "--gpus", 2, "--tokens", "100M", "--seq", 512,
            "--global-batch", 16, "--micro-batch", 2)
    r = run_cli(*base, "--grad-accumulation", "main_grad", "--grad-reduce-dtype", "fp32", "--format", "json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert (out["config"]["grad_accumulation"], out["config"]["grad_reduce_dtype"]) == ("main_grad", "fp32")
    assert out["compute"]["grad_accumulation_s_per_step"] > 0
    assert "grad_accumulation" in one_error_line(run_cli(*base, "--grad-accumulation", "sum"))
    assert "grad_reduce_dtype" in one_error_line(run_cli(*base, "--grad-reduce-dtype", "int8"))


def test_published_engine_schema():
    from pydantic import ValidationError

    from flopsim.published import Engine, load_published

    assert Engine().grad_accumulation == "autograd" and Engine().grad_reduce_dtype is None
    with pytest.raises(ValidationError):
        Engine(grad_reduce_dtype="fp8")
    rows = {r.id: r for r in load_published().rows}
    assert rows["megatron-core-r080-h100-weak-1p7b"].engine.grad_reduce_dtype == "fp32"
    assert rows["megatron-2022-175b-a100-64gpu-full"].engine.grad_accumulation == "main_grad"
