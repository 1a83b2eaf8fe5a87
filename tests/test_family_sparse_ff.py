"""Sparse feed-forward and sparse QKV (family: sparse_ff) against torch's
FlopCounterMode, symbolic reductions, decode expectations and bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import sympy as sp

from flopsim.count import count, formula
from flopsim.errors import SpecError
from flopsim.families import build_ops
from flopsim.ops.expectations import expected_distinct
from flopsim.ops.symbols import symbol
from flopsim.spec import load_model
from flopsim.torchref.check import compare_with_torch

BASE = dict(name="sff", family="sparse_ff", layers=2, d_model=32, heads=4, d_ff=64, vocab=61, max_seq=64,
            sparse_ff=dict(block_size=8, d_lowrank=4))
ENCODER = dict(causal=False, head="cls", norm_position="post", token_types=2, classes=3)
LLAMA = dict(ffn="gated", activation="silu", bias=False, positions="rope", norm="rmsnorm", tied_embeddings=False)


def sf(sparse_qkv=None, conv_kernel=3, **kw):
    """Sparse-FF changes; `sparse_qkv` S (and its conv_kernel) adds the spec's sparse_qkv block."""
    out = dict(sparse_ff=dict(BASE["sparse_ff"], **kw))
    if sparse_qkv is not None:
        out["sparse_qkv"] = dict(modules=sparse_qkv, conv_kernel=conv_kernel)
    return out


# (id, spec changes, [(batch, seq)])
CONFIGS = [
    ("n8", {}, [(2, 6)]),
    ("n1", sf(block_size=1), [(1, 5)]),
    ("n2-r1", sf(block_size=2, d_lowrank=1), [(3, 4)]),
    ("n4-r16", sf(block_size=4, d_lowrank=16), [(2, 7)]),
    ("n16", sf(block_size=16), [(1, 9)]),
    ("n64-one-unit", sf(block_size=64), [(2, 3)]),
    ("gated-llama", {**LLAMA}, [(2, 6)]),
    ("gated-gelu-bias", dict(ffn="gated", activation="gelu"), [(1, 8)]),
    ("relu-nobias", dict(activation="relu", bias=False, positions="none"), [(2, 5)]),
    ("gqa-rope", dict(kv_heads=2, positions="rope"), [(2, 6)]),
    ("explicit-attn", dict(attention_impl="explicit"), [(2, 5)]),
    ("3-layers-tanh-gelu", dict(layers=3, activation="gelu_tanh", d_ff=96, **sf(block_size=12, d_lowrank=3)),
     [(1, 4), (3, 10)]),
    ("qkv-s4", sf(sparse_qkv=4), [(2, 6)]),
    ("qkv-s2-k5", sf(sparse_qkv=2, conv_kernel=5, block_size=4), [(1, 7)]),
    ("qkv-s8-k1", sf(sparse_qkv=8, conv_kernel=1), [(2, 5)]),
    ("qkv-s16-k3", dict(d_model=64, heads=4, d_ff=128, **sf(sparse_qkv=16, block_size=32, d_lowrank=8)), [(1, 6)]),
    ("qkv-gqa", dict(kv_heads=2, **sf(sparse_qkv=4, block_size=2)), [(2, 4)]),
    ("qkv-gated-rope", dict(**LLAMA, **sf(sparse_qkv=4)), [(2, 6)]),
    ("qkv-explicit-nobias", dict(attention_impl="explicit", bias=False, **sf(sparse_qkv=2)), [(3, 3)]),
    ("qkv-dhead", dict(d_head=16, **sf(sparse_qkv=4)), [(1, 5)]),
    ("encoder", dict(ENCODER), [(2, 7)]),
    ("encoder-qkv", dict(ENCODER, **sf(sparse_qkv=4, block_size=4)), [(2, 5)]),
    ("encoder-gated-n2", dict(ENCODER, ffn="gated", **sf(block_size=2, d_lowrank=2)), [(1, 9)]),
    ("no-head", dict(head="none"), [(2, 4)]),
    ("untied-fp32", dict(tied_embeddings=False, dtype="fp32", **sf(block_size=32)), [(4, 3)]),
]


def make(changes: dict):
    return load_model({**BASE, **changes})


def phases(spec):
    return ("forward", "train", "prefill", "decode") if spec.causal and spec.head != "cls" else ("forward", "train")


CASES = [pytest.param(changes, batch, seq, phase, id=f"{cid}-{phase}-B{batch}S{seq}")
         for cid, changes, shapes in CONFIGS for batch, seq in shapes for phase in phases(make(changes))]


@pytest.mark.parametrize("changes,batch,seq,phase", CASES)
def test_exact_against_flop_counter(changes, batch, seq, phase):
    spec = make(changes)
    context = seq + 3 if phase == "decode" else None
    result = compare_with_torch(spec, phase, batch, seq, context)
    assert result.exact, result.describe()
    assert result.modules_checked > 3 * spec.layers


def test_enough_configs():
    assert len(CONFIGS) >= 20
    assert any(make(c).sparse_qkv for _, c, _ in CONFIGS)
    assert any(not make(c).causal for _, c, _ in CONFIGS)


def test_inference_gathers_only_active_units():
    spec = make(sf(block_size=8))
    ops = {op.name: op for op in count(spec, batch=2, seq=5, phase="forward").ops}
    tokens, d, d_ff, n = 10, 32, 64, 8
    assert ops["block.0.mlp.up"].flops == 2 * tokens * d * d_ff // n
    assert ops["block.0.mlp.down"].flops == 2 * tokens * d * d_ff // n
    assert ops["block.0.mlp.controller.c1"].flops == 2 * tokens * d * 4
    assert ops["block.0.mlp.controller.c2"].flops == 2 * tokens * 4 * d_ff
    assert ops["block.0.mlp.up"].gemm == (tokens, 1, d_ff // n, d)
    assert ops["block.0.mlp.up"].tags["active_units"] == d_ff // n
    # train runs the masked dense path
    train = {op.key: op for op in count(spec, batch=2, seq=5, phase="train").ops}
    assert train["block.0.mlp.up"].flops == 2 * tokens * d * d_ff
    assert train["block.0.mlp.up:bwd"].flops == 4 * tokens * d * d_ff
    assert "block.0.mlp.mask" in train


@pytest.mark.parametrize("gated", [False, True])
def test_block_size_one_is_dense_plus_controller(gated):
    spec = make(dict(ffn="gated", bias=False) if gated else {})
    dense = spec.with_changes(family="dense", sparse_ff=None)
    n = symbol("block_size")
    for phase in ("forward", "train", "prefill", "decode"):
        sparse = formula(spec, phase=phase, symbolic=True).subs(n, 1)
        ctrl = sum((op.flops for op in build_ops(spec, phase, symbolic=True) if ".controller." in op.name),
                   sp.Integer(0))
        B, S, T = sp.symbols("B S T", positive=True, integer=True)
        d, r, d_ff = symbol("d_model"), symbol("d_lowrank"), symbol("d_ff")
        rows = B if phase == "decode" else B * S
        passes = 3 if phase == "train" else 1  # forward, grad input, grad weight
        assert sp.simplify(ctrl - passes * spec.layers * 2 * rows * r * (d + d_ff)) == 0
        assert sp.simplify(sparse - formula(dense, phase=phase, symbolic=True) - ctrl) == 0, phase


def test_decode_weight_bytes_use_the_union_expectation():
    spec = make(dict(bias=False, dtype="fp32", **sf(block_size=8)))
    n, d, d_ff = 8, 32, 64
    for batch in (1, 3, 50):
        r = count(spec, batch=batch, seq=1, phase="decode", context=12)
        ops = {op.name: op for op in r.ops}
        units = (d_ff / n) * expected_distinct(n, 1, batch)
        assert ops["block.1.mlp.up"].tags["units_read"] == pytest.approx(units)
        # the table is read by the gathers; the products read the per-token copies
        assert ops["block.1.mlp.up.gather"].weight_bytes == pytest.approx(units * d * 4)
        assert ops["block.1.mlp.down.gather"].weight_bytes == pytest.approx(units * d * 4)
        assert ops["block.1.mlp.up"].weight_bytes == 0 and ops["block.1.mlp.down"].weight_bytes == 0
        assert ops["block.1.mlp.up"].flops == 2 * batch * d * d_ff // n
    one = {op.name: op for op in count(spec, batch=1, seq=1, phase="decode").ops}
    assert one["block.0.mlp.up.gather"].weight_bytes == (d_ff // n) * d * 4  # one token reads its own units


@pytest.mark.parametrize("gated,bias", [(False, True), (False, False), (True, True), (True, False)])
@pytest.mark.parametrize("phase,batch,seq", [("forward", 2, 5), ("decode", 3, 1)])
def test_inference_ops_bytes_match_their_derivation(gated, bias, phase, batch, seq):
    """The reference's inference path (torchref.sparse_ff.GatheredLinear) copies
    each token's weights (W[units] -> [n, u, r]) before a bmm over the copy;
    every kernel it runs is an op whose bytes are derived here by hand."""
    changes = dict(dtype="fp32", bias=bias, **sf(block_size=8))
    if gated:
        changes.update(ffn="gated", activation="silu")
    spec = make(changes)
    w, idx = 4, 8  # fp32 values, int64 indices
    n = batch * seq  # tokens the FFN serves
    d, d_ff, N = 32, 64, 8
    b = d_ff // N  # active units per token (one per block)
    width = 2 if gated else 1
    u = width * b  # units of the up (gate_up) product per token
    union = b * expected_distinct(N, 1, n)  # expected distinct units over the n tokens
    ops = {op.name: op for op in count(spec, batch=batch, seq=seq, phase=phase,
                                             context=6 if phase == "decode" else None).ops}
    p = "block.0.mlp"
    up = f"{p}.gate_up" if gated else f"{p}.up"

    def close(actual, expected):
        return float(actual) == pytest.approx(float(expected), rel=1e-12)


    argmax = ops[f"{p}.controller.argmax"]  # reads the logits, writes one int64 per block
    assert (argmax.kind, argmax.module) == ("topk", p)
    assert argmax.act_read_bytes == n * d_ff * w and argmax.act_write_bytes == n * b * idx
    assert ops[f"{p}.units_arange"].act_write_bytes == b * idx  # arange(d_ff / N)
    offset = ops[f"{p}.units_offset"]  # * N
    assert offset.act_read_bytes == b * idx and offset.act_write_bytes == b * idx
    units = ops[f"{p}.units"]  # argmax + offsets (the b offsets broadcast over the n tokens, read once)
    assert units.act_read_bytes == (n * b + b) * idx and units.act_write_bytes == n * b * idx
    if gated:  # cat([units, units + d_ff])
        assert ops[f"{p}.units_up"].act_write_bytes == n * b * idx
        cat = ops[f"{p}.units_cat"]
        assert cat.act_read_bytes == 2 * n * b * idx and cat.act_write_bytes == 2 * n * b * idx
    else:
        assert f"{p}.units_cat" not in ops

    # W1[units]: the union of the table from memory, the index, a [n, u, d] copy written
    gather = ops[f"{up}.gather"]
    assert (gather.kind, gather.module, gather.flops) == ("gather", up, 0)
    assert close(gather.weight_bytes, width * union * d * w)
    assert gather.act_read_bytes == n * u * idx
    assert gather.act_write_bytes == n * u * d * w
    # bmm [n, 1, d] x [n, d, u]: reads x and the copy, not the table
    prod = ops[up]
    assert (prod.kind, prod.module) == ("matmul", up)
    assert prod.flops == 2 * n * d * u and prod.weight_bytes == 0
    assert prod.act_read_bytes == n * d * w + n * u * d * w
    assert prod.act_write_bytes == n * u * w
    assert prod.params == d * width * d_ff + (width * d_ff if bias else 0)  # it owns the whole table
    if bias:  # b1[units] gathered, then added
        bg, add = ops[f"{up}.bias_gather"], ops[f"{up}.bias"]
        assert close(bg.weight_bytes, width * union * w)
        assert bg.act_read_bytes == n * u * idx and bg.act_write_bytes == n * u * w
        assert add.act_read_bytes == 2 * n * u * w and add.act_write_bytes == n * u * w
    else:
        assert f"{up}.bias_gather" not in ops and f"{up}.bias" not in ops

    # W2^T[units]: rows of d values per unit, copy [n, b, d]
    gather = ops[f"{p}.down.gather"]
    assert (gather.kind, gather.module, gather.variant) == ("gather", f"{p}.down", "index_2d")  # unit-major W2: rows
    assert close(gather.weight_bytes, union * d * w)
    assert gather.act_read_bytes == n * b * idx
    assert gather.act_write_bytes == n * b * d * w
    prod = ops[f"{p}.down"]  # bmm [n, 1, b] x [n, b, d]
    assert prod.flops == 2 * n * b * d and prod.weight_bytes == 0
    assert prod.act_read_bytes == n * b * w + n * b * d * w
    assert prod.act_write_bytes == n * d * w
    if bias:  # y + b2: the whole bias
        add = ops[f"{p}.down.bias"]
        assert add.weight_bytes == d * w
        assert add.act_read_bytes == n * d * w and add.act_write_bytes == n * d * w
    # every op of a GatheredLinear runs in its module (the validation join)
    assert {op.module for op in ops.values() if op.name.startswith(f"{p}.down")} == {f"{p}.down"}


def test_union_expectation_matches_random_choices():
    rng = np.random.default_rng(0)
    n, blocks, batch = 8, 16, 5
    choices = rng.integers(0, n, size=(20000, batch, blocks))
    distinct = np.mean([sum(len(set(c[:, b])) for b in range(blocks)) for c in choices[:4000]])
    assert distinct == pytest.approx(blocks * expected_distinct(n, 1, batch), rel=0.01)


def test_sparse_qkv_ops():
    spec = make(sf(sparse_qkv=4, conv_kernel=3))
    ops = {op.key: op for op in count(spec, batch=2, seq=5, phase="train").ops}
    tokens, d, s, m = 10, 32, 4, 8
    assert ops["block.0.attn.qkv.mult"].flops == 2 * tokens * s * d * m
    assert ops["block.0.attn.qkv.mult.gate"].params == s * d
    assert ops["block.0.attn.qkv.q"].flops == 2 * tokens * s * m * m * 9
    assert ops["block.0.attn.qkv.v"].flops == 2 * tokens * s * m * m * 3
    assert ops["block.0.attn.qkv.q:bwd"].flops == 2 * ops["block.0.attn.qkv.q"].flops
    assert "block.0.attn.qkv" not in ops


def test_grouped_conv_backward_matches_torch():
    """The shared conv2d primitive's weight gradient counts groups x the forward, as torch does."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from flopsim.ops.primitives import Ctx, conv2d
    from flopsim.ops.symbols import Dims

    spec = make({})
    ctx = Ctx(spec=spec, phase="train", dims=Dims.of(spec))
    for groups in (1, 2, 4):
        x = torch.randn(2, 8, 5, 6, requires_grad=True)
        w = torch.randn(4, 8 // groups, 3, 3, requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            F.conv2d(x, w, padding=1, groups=groups).sum().backward()
        ops = conv2d(ctx, "c", layer=0, batch=2, c_in=8, c_out=4, out_positions=30, kernel_positions=9,
                     groups=groups, bias=False, module="c")
        assert sum(int(op.flops) for op in ops) == counter.get_total_flops()


def test_preset():
    spec = load_model("st-800m-sparse-ff")
    assert (spec.sparse_ff.block_size, spec.sparse_ff.d_lowrank, spec.d_ff) == (32, 64, 4096)
    sparse = count(spec, batch=1, seq=1, phase="decode", context=512)
    dense = count("st-800m", batch=1, seq=1, phase="decode", context=512)
    assert sparse.flops < dense.flops / 2 and sparse.bytes < dense.bytes / 2
    assert sparse.params == dense.params + 48 * 64 * (1024 + 4096)


@pytest.mark.parametrize("changes,message", [
    (sf(block_size=7), "block_size 7 does not divide d_ff 64"),
    (sf(block_size=128), "block_size 128 does not divide d_ff 64"),
    (sf(sparse_qkv=3), "sparse_qkv.modules 3 does not divide d_model 32"),
    (dict(sparse_ff=dict(block_size=8, sparse_qkv=4)), "has moved"),
    (dict(kv_heads=1, **sf(sparse_qkv=16)), "key/value width"),
    (sf(conv_kernel=4, sparse_qkv=4), "conv_kernel"),
    (sf(block_size=0), "block_size"),
    (dict(sparse_ff=dict(block_size=8, bogus=1)), "bogus"),
    (dict(family="dense"), "sparse_ff"),
])
def test_bad_input_is_one_line(changes, message):
    with pytest.raises(SpecError) as err:
        make(changes)
    text = str(err.value)
    assert message in text and "\n" not in text


def test_cli_decode_and_error():
    ok = subprocess.run([sys.executable, "-m", "flopsim", "count", "st-800m-sparse-ff", "--batch", "4", "--seq", "1",
                         "--context", "64", "--phase", "decode", "--format", "json"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "flopsim", "count", "tests/does-not-matter.yaml"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
