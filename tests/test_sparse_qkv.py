"""Sparse QKV on any model (the spec's `sparse_qkv` block, flopsim.families.dense):
exact against FlopCounterMode on every family's torch reference in every
phase, its parameters derived by hand, and a degenerate case checked."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from flopsim import count  # noqa: E402
from flopsim.errors import SpecError  # noqa: E402
from flopsim.spec import load_model  # noqa: E402
from flopsim.torchref.check import compare_with_torch  # noqa: E402

BASE = dict(name="sqkv", layers=2, d_model=32, heads=4, d_ff=64, vocab=61, max_seq=64,
            sparse_qkv=dict(modules=4, conv_kernel=3))
FAMILIES = {
    "dense": {},
    "dense-llama-gqa": dict(ffn="gated", activation="silu", bias=False, positions="rope", norm="rmsnorm",
                            kv_heads=2, sparse_qkv=dict(modules=2, conv_kernel=5)),
    "moe": dict(family="moe", moe=dict(experts=4, top_k=2)),
    "moe-capacity": dict(family="moe", moe=dict(experts=4, top_k=1, capacity_factor=1.25)),
    "mod": dict(family="mod", mod=dict(capacity=0.5, every=2)),
    "mode": dict(family="mode", mod=dict(capacity=0.5, every=2), moe=dict(experts=4, top_k=2),
                 mode=dict(variant="staged")),
    "sparse-ff": dict(family="sparse_ff", sparse_ff=dict(block_size=8, d_lowrank=4)),
    "encoder": dict(causal=False, head="cls", norm_position="post", token_types=2, classes=3,
                    sparse_qkv=dict(modules=8, conv_kernel=1)),
}


def make(name):
    return load_model({**BASE, **FAMILIES[name]})


def phases(spec):
    return ("forward", "train", "prefill", "decode") if spec.causal and spec.head != "cls" else ("forward", "train")


CASES = [pytest.param(name, phase, id=f"{name}-{phase}") for name in FAMILIES for phase in phases(make(name))]


@pytest.mark.parametrize("name, phase", CASES)
def test_exact_against_flop_counter(name, phase):
    spec = make(name)
    batch, seq = 2, 6
    result = compare_with_torch(spec, phase, batch, seq, seq + 3 if phase == "decode" else None)
    assert result.exact, result.describe()


def test_parameters_and_flops_derived():
    spec = make("dense")
    dense = load_model({k: v for k, v in BASE.items() if k != "sparse_qkv"})
    d, s, k, h, dh = 32, 4, 3, 4, 8
    m = d // s
    qkv_linear = d * 3 * h * dh + 3 * h * dh  # the Linear it replaces, with its bias
    sparse = (s * d + d * m + s * m  # multiplicative layer: gate, weight, bias
              + 2 * (m * (h * dh // s) * k * k + h * dh // s)  # Q and K convolutions (K x K)
              + m * (h * dh // s) * k + h * dh // s)  # V (K x 1)
    assert count(spec, batch=1, seq=4).params == count(dense, batch=1, seq=4).params - 2 * (qkv_linear - sparse)
    ops = {op.name: op for op in count(spec, batch=2, seq=5, phase="forward").ops}
    tokens = 10
    assert ops["block.1.attn.qkv.mult"].flops == 2 * tokens * s * d * m
    assert ops["block.1.attn.qkv.q"].flops == 2 * tokens * s * m * (h * dh // s) * k * k
    assert "block.1.attn.qkv" not in ops


def test_on_mod_only_the_selected_tokens_run_it():
    spec = make("mod")
    ops = {op.name: op for op in count(spec, batch=2, seq=6, phase="forward").ops}
    d, s = 32, 4
    assert ops["block.0.attn.qkv.mult"].flops == 2 * (2 * 6) * s * d * (d // s)  # unrouted block: every token
    assert ops["block.1.attn.qkv.mult"].flops == 2 * (2 * 3) * s * d * (d // s)  # routed: capacity 0.5 of 6


def test_report_compares_it_with_its_dense_trunk():
    from flopsim.report import group_specs

    groups = group_specs([load_model("st-800m-decoder-sparse-qkv")])
    assert groups[0].baseline.name == "st-800m-decoder" and groups[0].baseline.sparse_qkv is None


@pytest.mark.parametrize("changes, message", [
    (dict(sparse_qkv=dict(modules=3)), "sparse_qkv.modules 3 does not divide d_model 32"),
    (dict(kv_heads=1, sparse_qkv=dict(modules=16)), "key/value width"),
    (dict(sparse_qkv=dict(modules=4, conv_kernel=2)), "conv_kernel"),
    (dict(sparse_qkv=dict(conv_kernel=3)), "modules"),
    (dict(family="sparse_ff", sparse_ff=dict(block_size=8, sparse_qkv=4)), "has moved"),
])
def test_bad_input_is_one_line(changes, message):
    with pytest.raises(SpecError) as err:
        load_model({**BASE, **changes})
    assert message in str(err.value) and "\n" not in str(err.value)
