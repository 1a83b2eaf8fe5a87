"""The bytes oracle catches wrong bytes and other_flops: each mutation below passes
the FLOP-exactness suite (it changes no `flops`) and must make the bytes comparison
fail, in the module it breaks.

(a) a Linear backward that forgets to read its saved input;
(b) an attention backward reading two thirds of what it should;
(c) layernorm at 5 FLOPs per element instead of 8;
(d) backward elementwise work halved (BACKWARD_ELEMENTWISE = 1);
(e) a bias add costing nothing;
(f) the explicit attention's stored scores halved;
(g) a KV append reading nothing.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from conftest import tiny
from flopsim.families import _build_cached, dense
from flopsim.ops import primitives
from flopsim.torchref.bytes_check import compare_bytes

# small configurations, one per mutation's kernel: B = 2, S = 5
GPT2 = dict(layers=1)
EXPLICIT = dict(layers=1, attention_impl="explicit")


@pytest.fixture(autouse=True)
def fresh_op_lists():
    """Op lists are cached per spec: rebuild them under (and after) each mutation."""
    _build_cached.cache_clear()
    yield
    _build_cached.cache_clear()


def broken(spec_changes, phase, module):
    """The comparison fails, and in `module` (or below it)."""
    spec = tiny("gpt2-small", **spec_changes)
    cmp = compare_bytes(spec, phase, 2, 5, 8 if phase == "decode" else None)
    assert not cmp.exact
    assert any(path == module or path.startswith(module + ".") for path, *_ in cmp.mismatches), cmp.describe()
    return cmp


def test_unmutated_configurations_are_exact():
    for changes, phase in ((GPT2, "train"), (EXPLICIT, "forward"), (GPT2, "decode")):
        cmp = compare_bytes(tiny("gpt2-small", **changes), phase, 2, 5, 8 if phase == "decode" else None)
        assert cmp.exact, cmp.describe()


def _wrap(monkeypatch, name, change):
    """Replace dense.<name> (the primitive the dense family composes) by one whose ops
    pass through `change(op, kwargs, ctx)`."""
    original = getattr(dense, name)

    def mutated(ctx, *args, **kwargs):
        return [change(op, kwargs, ctx) for op in original(ctx, *args, **kwargs)]

    monkeypatch.setattr(dense, name, mutated)


def test_a_linear_backward_forgetting_its_saved_input(monkeypatch):
    def forget(op, kw, ctx):
        saved_input = kw.get("batch", 1) * kw["tokens"] * kw["d_in"] * ctx.w
        return replace(op, act_read_bytes=op.act_read_bytes - saved_input) if op.pass_ == "bwd" else op

    _wrap(monkeypatch, "linear", forget)
    cmp = broken(GPT2, "train", "block.0.mlp.up")
    assert ("block.0.mlp.up", "bwd", "bytes") in {m[:3] for m in cmp.mismatches}


def test_b_attention_backward_reading_two_thirds(monkeypatch):
    _wrap(monkeypatch, "attention",
          lambda op, kw, ctx: replace(op, act_read_bytes=op.act_read_bytes * 2 / 3) if op.pass_ == "bwd" else op)
    cmp = broken(GPT2, "train", "block.0.attn")
    assert ("block.0.attn", "bwd", "bytes") in {m[:3] for m in cmp.mismatches}


def test_c_layernorm_at_five_flops(monkeypatch):
    monkeypatch.setitem(primitives.ELEMENTWISE_FLOPS, "layernorm", 5)
    cmp = broken(GPT2, "forward", "block.0.norm1")
    assert ("block.0.norm1", "fwd", "other_flops") in {m[:3] for m in cmp.mismatches}


def test_d_backward_elementwise_halved(monkeypatch):
    monkeypatch.setattr(primitives, "BACKWARD_ELEMENTWISE", 1)
    cmp = broken(GPT2, "train", "block.0.mlp")
    assert {("block.0.mlp", "bwd", "other_flops"), ("block.0.norm1", "bwd", "other_flops")} <= \
        {m[:3] for m in cmp.mismatches}


def test_e_bias_add_costing_nothing(monkeypatch):
    _wrap(monkeypatch, "linear", lambda op, kw, ctx: replace(op, other_flops=0) if op.pass_ == "fwd" else op)
    cmp = broken(GPT2, "forward", "block.0.attn.qkv")
    assert ("block.0.attn.qkv", "fwd", "other_flops") in {m[:3] for m in cmp.mismatches}


def test_f_explicit_attention_scores_halved(monkeypatch):
    def halve(op, kw, ctx):
        if op.pass_ != "fwd":
            return op
        stored = kw["batch"] * kw["heads"] * kw["queries"] * kw["keys"] * ctx.w  # one score tensor
        return replace(op, act_read_bytes=op.act_read_bytes - stored, act_write_bytes=op.act_write_bytes - stored)

    _wrap(monkeypatch, "attention", halve)
    cmp = broken(EXPLICIT, "forward", "block.0.attn")
    assert ("block.0.attn", "fwd", "bytes") in {m[:3] for m in cmp.mismatches}


def test_g_kv_append_reading_nothing(monkeypatch):
    _wrap(monkeypatch, "kv_cache_append", lambda op, kw, ctx: replace(op, act_read_bytes=0))
    cmp = broken(GPT2, "decode", "block.0.attn")
    assert ("block.0.attn", "fwd", "bytes") in {m[:3] for m in cmp.mismatches}
