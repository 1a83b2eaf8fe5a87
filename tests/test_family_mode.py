"""The MoDE family (`family: mode`): MoD routing with MoE FFNs.

- exactness: staged and integrated, on a grid of small configs (capacity,
  every, predictor, dropless / padded / expert-choice MoE, shared experts,
  mlp / gated, bias, MHA / GQA, several B and S), flopsim equals
  FlopCounterMode on the torch reference in total, per module and in
  parameters, for forward, train and prefill; decode is exact for the
  integrated variant (static slots) and for staged at capacity 1;
- symbolic reduction at capacity 1: staged = the MoE model + the MoD
  routers; integrated = the MoE model + one more router column (the no-op
  expert) per MoDE block;
- decode expectations of the staged variant (experts read), derived and
  simulated;
- bad input and the preset.
"""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp

from conftest import assert_exact, tiny
from flopsim.count import count, formula
from flopsim.errors import SpecError
from flopsim.families import build_ops
from flopsim.ops.expectations import expected_distinct
from flopsim.ops.symbols import B, S, T, symbol
from flopsim.spec import load_model


def mode_spec(name, *, variant, base="gpt2-small", mod=None, moe=None, **changes):
    return tiny(base, name=name, family="mode", mod=mod or {}, moe=moe or {}, mode={"variant": variant},
                **changes)


# (name, variant, base preset, spec changes, mod block, moe block, (B, S))
CONFIGS = [
    ("dropless", "staged", "gpt2-small", {}, dict(capacity=0.5, every=1), dict(experts=4, top_k=2), (2, 6)),
    ("dropless-every2", "staged", "llama-3-8b", dict(kv_heads=2, layers=3), dict(capacity=0.3, every=2),
     dict(experts=4, top_k=1, d_expert=16), (2, 10)),
    ("padded", "staged", "gpt2-small", {}, dict(capacity=0.25, every=1),
     dict(experts=4, top_k=2, capacity_factor=1.25), (3, 8)),
    ("padded-predictor", "staged", "llama-3-8b", dict(kv_heads=2),
     dict(capacity=0.5, every=1, predictor_hidden=8), dict(experts=4, top_k=2, capacity_factor=1.0), (2, 7)),
    ("expert-choice", "staged", "gpt2-small", dict(bias=False), dict(capacity=0.5, every=1),
     dict(experts=4, capacity_factor=2.0, routing="expert_choice"), (2, 5)),
    ("shared", "staged", "llama-3-8b", dict(kv_heads=1), dict(capacity=0.4, every=1, predictor_hidden=4),
     dict(experts=4, top_k=2, d_expert=16, shared_experts=1), (1, 9)),
    ("moe-every2", "staged", "gpt2-small", dict(layers=4), dict(capacity=0.5, every=2),
     dict(experts=3, top_k=2, every=2), (2, 6)),
    ("moe-every3", "staged", "gpt2-small", dict(layers=3), dict(capacity=0.5, every=2),
     dict(experts=3, top_k=1, every=3), (1, 8)),
    ("single-token", "staged", "llama-3-8b", dict(kv_heads=2), dict(capacity=0.125, every=1),
     dict(experts=4, top_k=2), (2, 1)),
    ("c1", "staged", "gpt2-small", {}, dict(capacity=1.0, every=1, predictor_hidden=4),
     dict(experts=2, top_k=1, capacity_factor=1.5), (2, 4)),
    ("explicit-attn", "staged", "llama-3-8b", dict(kv_heads=2, attention_impl="explicit"),
     dict(capacity=0.5, every=1), dict(experts=4, top_k=2, capacity_factor=0.75), (1, 12)),
    ("wide-batch", "staged", "gpt2-small", dict(d_ff=48), dict(capacity=0.2, every=1),
     dict(experts=6, top_k=2), (5, 5)),
    ("integrated", "integrated", "gpt2-small", {}, dict(capacity=0.5, every=1),
     dict(experts=4, top_k=2, capacity_factor=1.0), (2, 6)),
    ("integrated-top1", "integrated", "llama-3-8b", dict(kv_heads=2), dict(capacity=0.25, every=1),
     dict(experts=4, top_k=1, capacity_factor=1.25), (3, 8)),
    ("integrated-every2", "integrated", "gpt2-small", dict(layers=3), dict(capacity=0.3, every=2),
     dict(experts=3, top_k=2, capacity_factor=1.1), (2, 10)),
    ("integrated-moe-every2", "integrated", "llama-3-8b", dict(kv_heads=1, layers=4),
     dict(capacity=0.5, every=3), dict(experts=4, top_k=2, capacity_factor=1.0, every=2), (1, 9)),
    ("integrated-shared", "integrated", "llama-3-8b", dict(kv_heads=2),
     dict(capacity=0.5, every=1), dict(experts=4, top_k=2, d_expert=16, shared_experts=1, capacity_factor=1.5),
     (2, 5)),
    ("integrated-nobias", "integrated", "gpt2-small", dict(bias=False), dict(capacity=0.125, every=1),
     dict(experts=8, top_k=2, d_expert=8, capacity_factor=2.0), (2, 16)),
    ("integrated-c1", "integrated", "gpt2-small", {}, dict(capacity=1.0, every=1),
     dict(experts=2, top_k=1, capacity_factor=1.0), (1, 7)),
    ("integrated-single-token", "integrated", "llama-3-8b", dict(kv_heads=2), dict(capacity=0.5, every=1),
     dict(experts=4, top_k=2, capacity_factor=1.0), (1, 1)),
    ("integrated-explicit", "integrated", "gpt2-small", dict(attention_impl="explicit"),
     dict(capacity=0.75, every=1), dict(experts=4, top_k=2, capacity_factor=0.5), (3, 5)),
    ("integrated-wide-batch", "integrated", "gpt2-small", {}, dict(capacity=0.4, every=1),
     dict(experts=3, top_k=3, capacity_factor=1.0), (5, 4)),
]
GRID = [(mode_spec(f"mode-{name}", variant=variant, base=base, mod=m, moe=e, **changes), shape)
        for name, variant, base, changes, m, e, shape in CONFIGS]
CASES = [(spec, phase, shape) for spec, shape in GRID for phase in ("forward", "train", "prefill")]


def test_grid_covers_the_variants():
    assert len(GRID) >= 20
    specs = [s for s, _ in GRID]
    assert sum(s.mode.variant == "staged" for s in specs) >= 10
    assert sum(s.mode.variant == "integrated" for s in specs) >= 10
    assert {s.ffn for s in specs} == {"mlp", "gated"} and {s.bias for s in specs} == {True, False}
    assert {s.kv_heads == s.heads for s in specs} == {True, False}
    assert {s.mod.predictor_hidden > 0 for s in specs} == {True, False}
    moe_kinds = {"dropless" if s.moe.capacity_factor is None else s.moe.routing for s in specs}
    assert moe_kinds == {"dropless", "token_choice", "expert_choice"}
    assert len({shape for _, shape in GRID}) >= 10


@pytest.mark.parametrize("spec,phase,shape", CASES, ids=[f"{s.name}-{p}" for s, p, _ in CASES])
def test_exact_against_flop_counter(spec, phase, shape):
    assert_exact(spec, phase, *shape)


@pytest.mark.parametrize("spec,shape", [g for g in GRID if g[0].mode.variant == "integrated"][:4]
                         + [g for g in GRID if g[0].mod.capacity == 1.0 and g[0].mode.variant == "staged"],
                         ids=lambda v: getattr(v, "name", str(v)))
def test_decode_exact_where_static(spec, shape):
    """Integrated MoDE's work is static (padded slots) at decode too; staged at c = 1."""
    assert_exact(spec, "decode", shape[0], shape[1] + 3)


def test_integrated_slots_and_tags():
    """C = ceil(capacity_factor * c * top_k * N / E): 1.1 * 0.3 * 2 * (2 * 10) / 3 = 4.4 -> 5."""
    spec = mode_spec("m", variant="integrated", layers=3, mod=dict(capacity=0.3, every=2),
                     moe=dict(experts=3, top_k=2, capacity_factor=1.1))
    r = count(spec, batch=2, seq=10, phase="forward")
    layers = r.per_layer().set_index("part")
    assert layers.loc["block.1", "slots"] == 5 and bool(layers.loc["block.1", "routed"])
    assert layers.loc["block.0", "slots"] == 15  # a plain MoE layer: ceil(1.1 * 2 * 20 / 3)
    ops = {op.name: op for op in r.ops}
    assert ops["block.1.moe.router"].gemm[2] == 3 + 1  # E experts + the no-op expert
    assert ops["block.0.moe.router"].gemm[2] == 3


def test_staged_keeps_top_k_and_runs_moe_on_kept_tokens():
    spec = mode_spec("m", variant="staged", mod=dict(capacity=0.25, every=1),
                     moe=dict(experts=4, top_k=2, capacity_factor=1.0))
    ops = {op.name: op for op in count(spec, batch=3, seq=8, phase="forward").ops}
    # k = 2 tokens per sequence, N = 6 tokens into the MoE: C = ceil(1 * 2 * 6 / 4) = 3 slots
    assert ops["block.0.attn.qkv"].gemm[1] == 6
    assert ops["block.0.moe.router"].gemm[1] == 6 and ops["block.0.moe.router"].tags["slots"] == 3
    assert ops["block.0.router"].gemm[1] == 24  # the MoD router sees every token


# -- symbolic reduction ---------------------------------------------------------

def _total(spec, phase):
    return sum((op.flops for op in build_ops(spec, phase, symbolic=True)), sp.Integer(0)).xreplace({T: S})


@pytest.mark.parametrize("phase", ["forward", "train"])
@pytest.mark.parametrize("moe", [dict(experts=4, top_k=2), dict(experts=4, top_k=2, capacity_factor=1.25)],
                         ids=["dropless", "padded"])
def test_staged_capacity_one_is_moe_plus_router(phase, moe):
    """Staged at c = 1 keeps every token: each MoDE block is the MoE block plus the
    MoD router (2 B S d forward, 3x that in train: grad-input and grad-weight)."""
    spec = mode_spec("m", variant="staged", layers=4, mod=dict(capacity=0.5, every=2), moe=moe)
    ref = tiny("gpt2-small", name="e", family="moe", layers=4, moe={**moe, "every": 1})
    c, d = symbol("mod_capacity"), symbol("d_model")
    extra = 2 * (2 * B * S * d) * (3 if phase == "train" else 1)  # 2 routed blocks
    assert sp.simplify(_total(spec, phase).xreplace({c: 1}) - _total(ref, phase) - extra) == 0


@pytest.mark.parametrize("phase", ["forward", "train"])
def test_integrated_capacity_one_is_padded_moe_plus_noop_column(phase):
    """Integrated at c = 1: C = ceil(C_f * k * N / E), the MoE's own slots; the only
    extra product is the no-op expert's router column, Linear(d, 1) on B S tokens."""
    moe = dict(experts=4, top_k=2, capacity_factor=1.25)
    spec = mode_spec("m", variant="integrated", layers=4, mod=dict(capacity=0.5, every=2), moe=moe)
    ref = tiny("gpt2-small", name="e", family="moe", layers=4, moe=moe)
    c, d = symbol("mod_capacity"), symbol("d_model")
    extra = 2 * (2 * B * S * d) * (3 if phase == "train" else 1)
    assert sp.simplify(_total(spec, phase).xreplace({c: 1}) - _total(ref, phase) - extra) == 0
    f = formula(spec, phase=phase, symbolic=True)
    assert f.has(sp.ceiling(symbol("capacity_factor") * c * symbol("top_k") * B * S / symbol("experts")))


# -- decode ---------------------------------------------------------------------------

def test_staged_decode_reads_expected_distinct_experts():
    """Staged, dropless, decode with B tokens: a token runs the block with
    probability c and then picks k of E experts, so it touches a given expert
    with probability c k / E; the batch reads expected_distinct(E, c k, B)
    = E (1 - (1 - c k / E)^B) experts. Non-expert weights of the block are read
    with probability 1 - (1 - c)^B; FLOPs are c B k expert passes."""
    c, b, E, k = 0.5, 4, 4, 2
    spec = mode_spec("m", variant="staged", mod=dict(capacity=c, every=1), moe=dict(experts=E, top_k=k,
                                                                                  d_expert=16))
    ops = {op.name: op for op in count(spec, batch=b, seq=9, phase="decode").ops}
    w = spec.dtype_bytes
    per_expert_up = (spec.d_model * 16 + 16) * w
    read = E * (1 - (1 - c * k / E) ** b)
    assert read == pytest.approx(float(expected_distinct(E, c * k, b)))
    up = ops["block.0.moe.experts.up"]
    assert up.weight_bytes == pytest.approx(read * per_expert_up)
    assert up.tags["active_experts"] == pytest.approx(read)
    assert up.flops == 2 * c * b * k * spec.d_model * 16
    qkv = ops["block.0.attn.qkv"]
    assert qkv.weight_bytes == pytest.approx((1 - (1 - c) ** b) * (3 * 32 * 32 + 3 * 32) * w)
    assert ops["block.0.moe.router"].weight_bytes == pytest.approx((1 - (1 - c) ** b) * 32 * E * w)
    # simulation: per token, run with probability c, then k distinct experts of E
    rng = np.random.default_rng(1)
    trials = 100_000
    runs = rng.random((trials, b)) < c
    picks = np.argsort(rng.random((trials, b, E)), axis=-1)[..., :k]
    touched = np.zeros((trials, E), dtype=bool)
    for j in range(b):
        for slot in range(k):
            touched[np.arange(trials), picks[:, j, slot]] |= runs[:, j]
    assert read == pytest.approx(touched.sum(1).mean(), rel=0.01)


# -- bad input, preset ------------------------------------------------------------------

BASE = {"name": "x", "layers": 2, "d_model": 64, "heads": 8, "d_ff": 256, "vocab": 10}


@pytest.mark.parametrize("change,message", [
    ({"family": "mod", "mod": {"capacity": 0.5}, "moe": {"experts": 4}},
     "block 'moe' is not allowed in a spec of family 'mod'"),
    ({"family": "mod", "mod": {"capacity": 0.5}, "mode": {"variant": "staged"}},
     "block 'mode' is not allowed in a spec of family 'mod'"),
    ({"family": "mode", "mod": {"capacity": 0.5}}, "family 'mode' needs a 'moe' block"),
    ({"family": "mode", "moe": {"experts": 4}}, "family 'mode' needs a 'mod' block"),
    ({"family": "mode", "mod": {"capacity": 0}, "moe": {}}, "field 'mod.capacity': value 0"),
    ({"family": "mode", "mod": {}, "moe": {}, "mode": {"variant": "mixed"}}, "field 'mode.variant'"),
])
def test_bad_spec_is_one_line(change, message):
    with pytest.raises(SpecError) as err:
        load_model({**BASE, **change})
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("moe,mod,message", [
    (dict(experts=4), {}, "moe.capacity_factor null"),
    (dict(experts=4, capacity_factor=1.0, routing="expert_choice"), {}, "moe.routing 'expert_choice'"),
    (dict(experts=4, capacity_factor=1.0), dict(predictor_hidden=8), "mod.predictor_hidden 8"),
])
def test_integrated_needs_padded_token_choice_at_load(moe, mod, message):
    with pytest.raises(SpecError) as err:
        load_model({**BASE, "family": "mode", "mod": mod, "moe": moe, "mode": {"variant": "integrated"}})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_preset():
    spec = load_model("decoder-220m-mode")
    mod = load_model("decoder-220m-mod")
    assert spec.mode.variant == "staged" and spec.mod == mod.mod
    r = count(spec, seq=2048)
    layers = r.per_layer().set_index("part")
    # routed blocks: 256 kept tokens, ceil(1.25 * 2 * 256 / 8) = 80 slots per expert
    assert layers.loc["block.1", "tokens"] == 256 and layers.loc["block.1", "slots"] == 80
    assert layers.loc["block.0", "slots"] == 640  # ceil(1.25 * 2 * 2048 / 8)
    # 12 MoE FFNs of 8 experts (2 x 1024 x 2048 weights) and an 8-wide router; 6 MoD routers
    dense = load_model("decoder-220m")
    ffn = 2 * 1024 * 4096
    assert r.params == count(dense, seq=8).params + 12 * (8 * 2 * 1024 * 2048 + 8 * 1024 - ffn) + 6 * 1024
    integrated = spec.with_changes(mode={"variant": "integrated"})
    assert count(integrated, seq=2048).flops > 0
