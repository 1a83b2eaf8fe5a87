"""Hypothesis properties of the cost model: non-negative, monotone in B and
S, linear in B, additive over layers (dense); and, over every family and
phase (about 10,000 examples), non-negative, never cheaper for more tokens,
prefill with a cached prefix growing with the prompt and the context, decode
growing with the context."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny
from flopsim.count import count
from flopsim.ops.op import COST_FIELDS

specs = st.builds(
    lambda kv, ffn, bias, causal, positions, impl: tiny(
        "gpt2-small", heads=4, kv_heads=kv, ffn=ffn, bias=bias, causal=causal, positions=positions,
        attention_impl=impl, max_seq=4096,
    ),
    st.sampled_from([1, 2, 4]), st.sampled_from(["mlp", "gated"]), st.booleans(), st.booleans(),
    st.sampled_from(["learned", "rope", "none"]), st.sampled_from(["fused", "explicit"]),
)
phases = st.sampled_from(["forward", "train"])
sizes = st.integers(min_value=1, max_value=512)


@settings(max_examples=60, deadline=None)
@given(specs, phases, sizes, sizes)
def test_costs_are_non_negative(spec, phase, b, s):
    r = count(spec, batch=b, seq=s, phase=phase)
    for op in r.ops:
        for f in COST_FIELDS:
            assert getattr(op, f) >= 0, (op.key, f)
    assert r.causal_flops <= r.flops


@settings(max_examples=60, deadline=None)
@given(specs, phases, sizes, sizes, st.integers(1, 64), st.integers(1, 64))
def test_monotone_in_batch_and_seq(spec, phase, b, s, db, ds):
    base = count(spec, batch=b, seq=s, phase=phase)
    more_b = count(spec, batch=b + db, seq=s, phase=phase)
    more_s = count(spec, batch=b, seq=s + ds, phase=phase)
    for bigger in (more_b, more_s):
        assert bigger.flops > base.flops
        assert bigger.bytes > base.bytes
        assert bigger.params == base.params


@settings(max_examples=40, deadline=None)
@given(specs, phases, sizes, sizes)
def test_flops_are_linear_in_batch(spec, phase, b, s):
    one = count(spec, batch=1, seq=s, phase=phase).flops
    assert count(spec, batch=b, seq=s, phase=phase).flops == b * one


@settings(max_examples=40, deadline=None)
@given(specs, phases, st.integers(1, 5), sizes)
def test_additive_over_layers(spec, phase, layers, s):
    """Adding a block adds the same cost each time: f(L+1) - f(L) = f(2) - f(1)."""
    def total(n):
        r = count(spec.with_changes(layers=n), batch=2, seq=s, phase=phase)
        return r.flops, r.params

    f1, p1 = total(1)
    f2, p2 = total(2)
    fl, pl = total(layers)
    fl1, pl1 = total(layers + 1)
    assert fl1 - fl == f2 - f1
    assert pl1 - pl == p2 - p1


@settings(max_examples=30, deadline=None)
@given(specs, st.integers(1, 16), st.integers(2, 2048))
def test_decode_grows_with_context(spec, b, t):
    if not spec.causal:
        return
    short = count(spec.with_changes(positions="rope"), batch=b, seq=1, context=t - 1, phase="decode")
    long = count(spec.with_changes(positions="rope"), batch=b, seq=1, context=t, phase="decode")
    assert long.flops > short.flops
    assert sum(o.kv_read_bytes for o in long.ops) > sum(o.kv_read_bytes for o in short.ops)


# -- every family and phase ---------------------------------------------------------------
# (about 10,000 examples in all; each count of these tiny specs takes a few milliseconds)

BASE = {"name": "p", "d_model": 16, "heads": 2, "d_ff": 32, "vocab": 50, "max_seq": 4096, "positions": "rope"}


def _family_spec(family, layers, capacity, every, experts, top_k, capacity_factor, variant, block, keep):
    from flopsim.spec import load_model

    spec = {**BASE, "layers": layers}
    if family == "mod":
        spec.update(family="mod", mod={"capacity": capacity, "every": every})
    elif family == "moe":
        spec.update(family="moe", moe={"experts": experts, "top_k": min(top_k, experts),
                                       "capacity_factor": capacity_factor})
    elif family == "mode":
        cf = capacity_factor if variant == "staged" else (capacity_factor or 1.25)
        spec.update(family="mode", mod={"capacity": capacity, "every": every}, mode={"variant": variant},
                    moe={"experts": experts, "top_k": min(top_k, experts), "capacity_factor": cf})
    elif family == "sparse_ff":
        spec.update(family="sparse_ff", sparse_ff={"block_size": block, "d_lowrank": 4})
    elif family == "length_reduction":
        fractions = sorted(keep, reverse=True)[:layers] + [keep[-1]] * max(0, layers - len(keep))
        spec.update(family="length_reduction", causal=False, head="cls", positions="learned", token_types=2,
                    attention_impl="explicit",
                    length_reduction={"method": "power_bert", "keep": [1.0] + sorted(fractions, reverse=True)[1:]})
    return load_model(spec)


family_specs = st.builds(
    _family_spec,
    st.sampled_from(["dense", "mod", "moe", "mode", "sparse_ff", "length_reduction"]),
    st.integers(1, 4), st.sampled_from([0.125, 0.25, 0.5, 1.0]), st.integers(1, 3), st.sampled_from([2, 4, 8]),
    st.integers(1, 2), st.sampled_from([None, 1.0, 1.25, 2.0]), st.sampled_from(["staged", "integrated"]),
    st.sampled_from([2, 4, 8]), st.lists(st.sampled_from([1.0, 0.75, 0.5, 0.25]), min_size=4, max_size=4),
)
small = st.integers(1, 64)


def _phases(spec):
    return ["forward", "train", "prefill", "decode"] if spec.causal else ["forward", "train"]


@settings(max_examples=2500, deadline=None)
@given(family_specs, st.data(), small, small)
def test_every_family_costs_are_non_negative_and_params_do_not_depend_on_shape(spec, data, b, s):
    phase = data.draw(st.sampled_from(_phases(spec)))
    r = count(spec, batch=b, seq=s, phase=phase)
    for op in r.ops:
        for f in COST_FIELDS:
            assert getattr(op, f) >= 0, (spec.family, phase, op.key, f)
    assert r.causal_flops <= r.flops
    assert r.params == count(spec, batch=1, seq=1, phase="forward").params


@settings(max_examples=2500, deadline=None)
@given(family_specs, st.data(), small, small, st.integers(1, 16), st.integers(1, 16))
def test_every_family_never_costs_less_for_more_tokens(spec, data, b, s, db, ds):
    """FLOPs and bytes are non-decreasing in B and S (rounding -- top-k, capacities, kept
    tokens -- can leave them flat, never lower them)."""
    phase = data.draw(st.sampled_from([p for p in _phases(spec) if p != "decode"]))
    base = count(spec, batch=b, seq=s, phase=phase)
    for bigger in (count(spec, batch=b + db, seq=s, phase=phase), count(spec, batch=b, seq=s + ds, phase=phase)):
        assert bigger.flops >= base.flops and bigger.bytes >= base.bytes, (spec.family, phase)


@settings(max_examples=2500, deadline=None)
@given(family_specs.filter(lambda spec: spec.causal), small, small, st.integers(1, 32), st.integers(1, 32))
def test_prefill_with_a_cached_prefix_grows_with_the_prompt_and_the_context(spec, b, s, prefix, ds):
    """At a fixed context T, a longer prompt S costs no less; at a fixed S, a longer T costs no less."""
    t = s + prefix
    base = count(spec, batch=b, seq=s, context=t, phase="prefill")
    longer_prompt = count(spec, batch=b, seq=min(s + ds, t), context=t, phase="prefill")
    longer_context = count(spec, batch=b, seq=s, context=t + ds, phase="prefill")
    assert longer_prompt.flops >= base.flops, (spec.family, s, t)
    assert longer_context.flops >= base.flops and longer_context.bytes >= base.bytes, (spec.family, s, t)


@settings(max_examples=2500, deadline=None)
@given(family_specs.filter(lambda spec: spec.causal), small, st.integers(2, 2048), st.integers(1, 256))
def test_every_decoder_decode_grows_with_context(spec, b, t, dt):
    short = count(spec, batch=b, seq=1, context=t, phase="decode")
    long = count(spec, batch=b, seq=1, context=t + dt, phase="decode")
    assert long.flops >= short.flops and long.bytes >= short.bytes, spec.family
    assert sum(o.kv_read_bytes for o in long.ops) >= sum(o.kv_read_bytes for o in short.ops)
