"""The Mixture-of-Depths family (`family: mod`).

- exactness: on a grid of small configs (capacity, every, predictor,
  mlp / gated, bias, MHA / GQA / MQA, learned / rope positions, fused /
  explicit attention, encoder, several B and S) flopsim equals
  FlopCounterMode on the torch reference, in total, per module and in
  parameters, for forward, train and prefill;
- symbolic reduction: at capacity 1 MoD is the dense model plus the router
  (and the predictor); top-k, sort, gather and scatter are 0 FLOPs;
- decode: the expectation structure (c x the dense block, 1 + c(T - 1) keys,
  weights read with probability 1 - (1 - c)^B), derived below and checked
  against a random-routing simulation; exact against torch at capacity 1;
- bad input: one-line errors; the preset and the CLI table.
"""

from __future__ import annotations


import numpy as np
import pytest
import sympy as sp
from typer.testing import CliRunner

from conftest import assert_exact, tiny
from flopsim.count import count, formula
from flopsim.errors import SpecError
from flopsim.families import build_ops
from flopsim.ops.symbols import B, S, T, symbol
from flopsim.spec import load_model


def mod_spec(name, *, base="gpt2-small", mod=None, **changes):
    return tiny(base, name=name, family="mod", mod=mod or {}, **changes)


# (name, base preset, spec changes, mod block, (B, S))
CONFIGS = [
    ("c1/8-every2", "gpt2-small", {}, dict(capacity=0.125, every=2), (2, 16)),
    ("c1/2-every1", "gpt2-small", {}, dict(capacity=0.5, every=1), (1, 7)),
    ("c0.3-rational", "llama-3-8b", dict(kv_heads=2), dict(capacity=0.3, every=1), (2, 10)),
    ("c1-every1", "gpt2-small", {}, dict(capacity=1.0, every=1), (2, 5)),
    ("c1-predictor", "llama-3-8b", dict(kv_heads=4), dict(capacity=1.0, every=2, predictor_hidden=8), (1, 6)),
    ("predictor-mlp", "gpt2-small", {}, dict(capacity=0.25, every=1, predictor_hidden=16), (2, 8)),
    ("predictor-gated-gqa", "llama-3-8b", dict(kv_heads=2), dict(capacity=0.5, every=1, predictor_hidden=4),
     (3, 5)),
    ("predictor-nobias", "gpt2-small", dict(bias=False), dict(capacity=0.4, every=2, predictor_hidden=8),
     (2, 9)),
    ("every3", "gpt2-small", dict(layers=3), dict(capacity=0.5, every=3), (2, 6)),
    ("every-beyond-layers", "gpt2-small", {}, dict(capacity=0.5, every=4), (1, 5)),
    ("mqa", "llama-3-8b", dict(kv_heads=1), dict(capacity=0.5, every=1), (2, 7)),
    ("mha-gated", "llama-3-8b", dict(kv_heads=4), dict(capacity=0.2, every=1), (1, 11)),
    ("explicit-attn", "gpt2-small", dict(attention_impl="explicit"), dict(capacity=0.5, every=1), (2, 6)),
    ("explicit-gqa-predictor", "llama-3-8b", dict(kv_heads=2, attention_impl="explicit"),
     dict(capacity=0.375, every=1, predictor_hidden=8), (2, 8)),
    ("single-token", "gpt2-small", {}, dict(capacity=0.125, every=1), (1, 1)),
    ("single-token-predictor", "llama-3-8b", dict(kv_heads=2), dict(capacity=0.5, predictor_hidden=4, every=1),
     (2, 1)),
    ("keep-one", "gpt2-small", {}, dict(capacity=0.01, every=1), (3, 7)),
    ("wide-batch", "gpt2-small", dict(d_ff=48), dict(capacity=0.5, every=1), (5, 4)),
    ("long", "llama-3-8b", dict(kv_heads=2), dict(capacity=0.125, every=2), (1, 33)),
    ("untied-nobias", "gpt2-small", dict(tied_embeddings=False, bias=False), dict(capacity=0.7, every=1), (2, 9)),
    ("no-positions", "gpt2-small", dict(positions="none"), dict(capacity=0.5, every=1), (2, 5)),
    ("d-head", "llama-3-8b", dict(kv_heads=2, d_head=16), dict(capacity=0.5, every=1, predictor_hidden=2),
     (1, 8)),
    ("encoder", "gpt2-small", dict(causal=False), dict(capacity=0.5, every=1), (2, 7)),
    ("encoder-predictor", "gpt2-small", dict(causal=False, norm="rmsnorm"),
     dict(capacity=0.3, every=1, predictor_hidden=8), (1, 10)),
]
GRID = [(mod_spec(f"mod-{name}", base=base, mod=m, **changes), shape) for name, base, changes, m, shape in CONFIGS]
CASES = [(spec, phase, shape) for spec, shape in GRID for phase in ("forward", "train", "prefill")
         if spec.causal or phase != "prefill"]


def test_grid_covers_the_variants():
    assert len(GRID) >= 20
    specs = [s for s, _ in GRID]
    assert {s.mod.every for s in specs} >= {1, 2, 3}
    assert {s.mod.predictor_hidden > 0 for s in specs} == {True, False}
    assert {s.ffn for s in specs} == {"mlp", "gated"}
    assert {s.bias for s in specs} == {True, False}
    assert {s.kv_heads == s.heads for s in specs} == {True, False}
    assert any(s.kv_heads == 1 for s in specs)
    assert {s.attention_impl for s in specs} == {"fused", "explicit"}
    assert len({shape for _, shape in GRID}) >= 10
    assert len({s.mod.capacity for s in specs}) >= 8


@pytest.mark.parametrize("spec,phase,shape", CASES, ids=[f"{s.name}-{p}" for s, p, _ in CASES])
def test_exact_against_flop_counter(spec, phase, shape):
    assert_exact(spec, phase, *shape)


# -- structure ------------------------------------------------------------------

def test_kept_tokens_and_tags():
    spec = mod_spec("m", mod=dict(capacity=0.3, every=2), layers=4)
    r = count(spec, batch=2, seq=10, phase="forward")
    layers = r.per_layer().set_index("part")
    # ceil(0.3 * 10) = 3 exactly (0.3 * 10 is 3.0000000000000004 in floats)
    assert list(layers.loc[["block.0", "block.1", "block.2", "block.3"], "routed"]) == [False, True, False, True]
    assert list(layers.loc[["block.0", "block.1", "block.2", "block.3"], "tokens"]) == [10, 3, 10, 3]
    qkv = next(op for op in r.ops if op.name == "block.1.attn.qkv")
    assert qkv.gemm[1] == 2 * 3  # B * k rows


def test_train_forward_ops_are_the_forward_phase():
    """train's forward pass is the forward phase plus the losses; every op of the
    forward phase appears with the same costs."""
    spec = mod_spec("m", mod=dict(capacity=0.25, every=1, predictor_hidden=8))
    fwd = {op.name: op for op in build_ops(spec, "forward")}
    train = {op.name: op for op in build_ops(spec, "train") if op.pass_ == "fwd"}
    assert set(train) - set(fwd) == {"block.0.predictor.loss", "block.1.predictor.loss", "head.loss"}
    assert all(train[name] == op for name, op in fwd.items())


def test_router_and_predictor_backward_products():
    """The router's backward: grad-input and grad-weight products (2 x its forward).
    The predictor's first Linear reads a detached input: grad-weight only."""
    spec = mod_spec("m", mod=dict(capacity=0.5, every=1, predictor_hidden=8))
    b, s, d, h = 2, 6, 32, 8
    r = {op.key: op.flops for op in count(spec, batch=b, seq=s, phase="train").ops}
    assert r["block.0.router"] == 2 * b * s * d and r["block.0.router:bwd"] == 2 * (2 * b * s * d)
    assert r["block.0.predictor.up:bwd"] == r["block.0.predictor.up"] == 2 * b * s * d * h
    assert r["block.0.predictor.down:bwd"] == 2 * r["block.0.predictor.down"] == 2 * (2 * b * s * h)
    for name in ("select", "order", "gather", "gather_r", "scale", "scatter", "predictor.loss"):
        assert r[f"block.0.{name}"] == 0


# -- symbolic reduction ---------------------------------------------------------

def _total(spec, phase):
    return sum((op.flops for op in build_ops(spec, phase, symbolic=True)), sp.Integer(0)).xreplace({T: S})


@pytest.mark.parametrize("predictor", [0, 16])
@pytest.mark.parametrize("phase", ["forward", "train"])
def test_capacity_one_is_dense_plus_router(phase, predictor):
    """At c = 1 every token is kept (k = ceil(S) = S): the routed block is the dense
    block, and the extra matrix products are, per routed block, on B*S tokens:
      router Linear(d, 1):     forward 2 B S d;  backward grad-input + grad-weight 4 B S d
      predictor up (d -> h):   forward 2 B S d h; backward grad-weight only 2 B S d h
      predictor down (h -> 1): forward 2 B S h;  backward 4 B S h
    top-k, sort, gather, the multiply by r and scatter are 0 FLOPs."""
    spec = mod_spec("m", base="llama-3-8b", kv_heads=2, layers=4, mod=dict(capacity=0.5, every=2,
                                                                          predictor_hidden=predictor))
    dense = tiny("llama-3-8b", name="d", kv_heads=2, layers=4)
    c, d, h = symbol("mod_capacity"), symbol("d_model"), symbol("mod_predictor_hidden")
    routed = 2  # blocks 1 and 3
    factor = 3 if phase == "train" else 1
    extra = 2 * B * S * d * factor
    if predictor:
        extra += 2 * B * S * d * h * (2 if phase == "train" else 1) + 2 * B * S * h * factor
    got = _total(spec, phase).xreplace({c: 1})
    assert sp.simplify(got - _total(dense, phase) - routed * extra) == 0
    # flopsim.count.formula agrees, and at c < 1 the routed blocks depend on ceil(c S)
    via_formula = formula(spec, phase=phase, symbolic=True)
    assert sp.simplify(via_formula - _total(spec, phase)) == 0
    assert via_formula.has(sp.ceiling(c * S))


# -- decode -----------------------------------------------------------------------

def _ops(spec, batch, context):
    return {op.name: op for op in count(spec, batch=batch, seq=context, phase="decode").ops}


def test_decode_expectation_structure():
    """Decode, B = 4 tokens, context T = 9, c = 1/4 in the routed block (block 1).

    A routed block runs for a token with probability c, independently:
    - FLOPs: E[running tokens] = c B, each costs what one token costs in the
      dense block, so every matrix product is c x the dense block's;
    - keys: the block's cache holds the earlier tokens that ran it (each of the
      T - 1 with probability c) and the running token itself: 1 + c (T - 1) = 3;
      attention = c x dense attention at T = 3 keys (FLOPs and KV bytes read);
    - weights are read when at least one of the B tokens runs the block:
      P = 1 - (1 - c)^B = 1 - (3/4)^4 = 175/256 = expected_distinct(1, c, B);
    - the router runs on every token: as the dense model's products would on B rows.
    """
    c, b, t = 0.25, 4, 9
    spec = mod_spec("m", base="llama-3-8b", kv_heads=2, mod=dict(capacity=c, every=2))
    dense = tiny("llama-3-8b", name="d", kv_heads=2)
    mod_ops, dense_ops = _ops(spec, b, t), _ops(dense, b, t)
    dense_short = _ops(dense, b, 3)  # 1 + c (T - 1) keys
    p_any = 1 - (1 - c) ** b
    assert p_any == 175 / 256
    block = [n for n in dense_ops if n.startswith("block.1.")]
    assert block
    for name in block:
        op, ref = mod_ops[name], (dense_short if name == "block.1.attn.core" else dense_ops)[name]
        assert op.flops == c * ref.flops, name
        assert op.weight_bytes == pytest.approx(p_any * ref.weight_bytes), name
        assert op.kv_read_bytes == pytest.approx(c * ref.kv_read_bytes), name
        assert op.kv_write_bytes == pytest.approx(c * ref.kv_write_bytes), name
    assert mod_ops["block.1.attn.core"].flops == c * 4 * b * spec.heads * 3 * spec.d_head
    assert mod_ops["block.1.router"].flops == 2 * b * spec.d_model
    assert mod_ops["block.1.router"].weight_bytes == spec.d_model * spec.dtype_bytes
    # block 0 is dense
    assert all(mod_ops[n] == dense_ops[n] for n in dense_ops if n.startswith("block.0."))
    layers = count(spec, batch=b, seq=t, phase="decode").per_layer().set_index("part")
    assert layers.loc["block.1", "tokens"] == c and bool(layers.loc["block.1", "routed"])
    # whole routed block: c x the dense block's FLOPs plus the router, attention at 1 + c(T-1) keys
    total = sum(op.flops for op in mod_ops.values() if op.layer == 1)
    dense_block = sum(op.flops for n, op in dense_short.items() if n.startswith("block.1."))
    assert total == c * dense_block + 2 * b * spec.d_model


def test_decode_moves_the_running_tokens_and_their_cache():
    """Decode, B = 4, T = 9, c = 1/4, RoPE, GQA (2 of 4 heads, d_head 16), fp32: the pick
    among the B scores runs every step; with probability p_any = 175/256 the running
    tokens' cache (1 + c (T - 1) = 3 slots of keys and of values), positions and hidden
    states are gathered and their scaled branch scattered back; `decode_cache: in_place`
    drops the two cache copies and nothing else."""
    c, b, t = 0.25, 4, 9
    spec = mod_spec("m", base="llama-3-8b", kv_heads=2, mod=dict(capacity=c, every=2))
    ops = _ops(spec, b, t)
    w, index, running, p_any = spec.dtype_bytes, 8, c * b, 175 / 256
    slab = spec.kv_heads * spec.d_head * 3  # one sequence's keys (or values) the block reads
    assert ops["block.1.select"].kernels == ops["block.1.order"].kernels == 1
    assert ops["block.1.select"].bytes == b * w + running * index  # the B scores in, the picks out
    for name in ("cache_k", "cache_v"):
        op = ops[f"block.1.{name}"]
        assert op.bytes == running * (2 * slab * w + index) and op.kernels == pytest.approx(p_any)
    assert ops["block.1.gather"].bytes == running * (2 * spec.d_model * w + index)
    assert ops["block.1.gather_positions"].bytes == running * 3 * index  # index, position read, written
    assert ops["block.1.scatter"].bytes == running * (3 * spec.d_model * w + index)
    in_place = _ops(spec.with_changes(mod={**spec.mod.model_dump(), "decode_cache": "in_place"}), b, t)
    assert set(ops) - set(in_place) == {"block.1.cache_k", "block.1.cache_v"}
    assert all(in_place[n] == ops[n] for n in in_place)


def test_decode_expectations_match_a_simulation():
    """Random per-token decisions (probability c each): the mean number of running
    tokens, of keys a running token attends to, and of blocks whose weights are read."""
    rng = np.random.default_rng(0)
    c, b, t, trials = 0.3, 5, 12, 200_000
    runs = rng.random((trials, b)) < c
    cached = rng.random((trials, t - 1)) < c  # earlier tokens that ran the block
    spec = mod_spec("m", mod=dict(capacity=c, every=1))
    ops = _ops(spec, b, t)
    per_token = 2 * spec.d_model * (3 * spec.d_model)  # qkv product of one token
    assert ops["block.0.attn.qkv"].flops / per_token == pytest.approx(runs.sum(1).mean(), rel=0.01)
    keys = ops["block.0.attn.core"].flops / (4 * c * b * spec.heads * spec.d_head)
    assert keys == pytest.approx(1 + cached.sum(1).mean(), rel=0.01)
    weights = 3 * spec.d_model * spec.d_model + 3 * spec.d_model  # qkv weight and bias
    read = ops["block.0.attn.qkv"].weight_bytes / (weights * spec.dtype_bytes)
    assert read == pytest.approx(runs.any(1).mean(), rel=0.01)


@pytest.mark.parametrize("predictor", [0, 4])
def test_decode_exact_at_capacity_one(predictor):
    """At c = 1 every token runs every block: the expectation is exact."""
    spec = mod_spec("m", base="llama-3-8b", kv_heads=2, mod=dict(capacity=1.0, every=1,
                                                               predictor_hidden=predictor))
    assert_exact(spec, "decode", 3, 9)


@pytest.mark.parametrize("predictor", [0, 4])
def test_decode_exact_where_c_b_and_the_cache_are_whole(predictor):
    """Below c = 1 the reference runs the round(c * B) best-scored tokens of the batch:
    with c * B = 2 and c * (T - 1) = 4 cached keys whole, the expectation is exact."""
    spec = mod_spec("m", base="llama-3-8b", kv_heads=2, mod=dict(capacity=0.5, every=2,
                                                               predictor_hidden=predictor))
    assert_exact(spec, "decode", 4, 9)


def test_decode_reference_runs_below_capacity_one():
    from flopsim.torchref.counting import count_with_torch
    from flopsim.torchref.model import build_reference, run_phase

    spec = mod_spec("m", mod=dict(capacity=0.5, every=1, predictor_hidden=4))
    model = build_reference(spec)
    measured = count_with_torch(lambda: run_phase(model, spec, "decode", 8, 12))
    dense_part = measured[""] - sum(v for k, v in measured.items() if k.endswith(".router") or k.endswith(".predictor"))
    assert 0 < dense_part <= count(tiny("gpt2-small", name="d"), batch=8, seq=12, phase="decode").flops


# -- bad input, presets, CLI ------------------------------------------------------------

BASE = {"name": "x", "layers": 2, "d_model": 64, "heads": 8, "d_ff": 256, "vocab": 10}


@pytest.mark.parametrize("change,message", [
    ({"family": "moe", "moe": {"experts": 4}, "mod": {"capacity": 0.5}},
     "block 'mod' is not allowed in a spec of family 'moe'"),
    ({"family": "mod", "mod": {"capacity": 0}}, "field 'mod.capacity': value 0: must be in (0, 1]"),
    ({"family": "mod", "mod": {"capacity": 1.5}}, "field 'mod.capacity': value 1.5: must be in (0, 1]"),
    ({"family": "mod", "mod": {"capacity": -0.5}}, "field 'mod.capacity': value -0.5"),
    ({"family": "mod", "mod": {"every": 0}}, "field 'mod.every': value 0"),
    ({"family": "mod", "mod": {"predictor_hidden": -1}}, "field 'mod.predictor_hidden': value -1"),
    ({"family": "mod", "mod": {"capacity": 0.5, "k": 3}}, "unknown field 'mod.k'"),
    ({"family": "mod"}, "family 'mod' needs a 'mod' block"),
])
def test_bad_input_is_one_line(change, message):
    with pytest.raises(SpecError) as err:
        load_model({**BASE, **change})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_post_norm_is_rejected_at_load_in_one_line():
    with pytest.raises(SpecError, match="norm_position 'post'") as err:
        load_model({**BASE, "family": "mod", "norm_position": "post", "mod": {"capacity": 0.5}})
    assert "\n" not in str(err.value)


def test_preset():
    spec = load_model("decoder-220m-mod")
    dense = load_model("decoder-220m")
    assert spec.mod.capacity == 0.125 and spec.mod.every == 2
    assert spec.model_dump(exclude={"name", "family", "mod"}) == dense.model_dump(exclude={"name", "family", "mod"})
    r, d = count(spec, seq=2048), count(dense, seq=2048)
    # 6 routers of 1024 weights; 6 of 12 blocks run 256 of 2048 tokens
    assert r.params == d.params + 6 * 1024
    routed = [row for _, row in r.per_layer().iterrows() if row["routed"] is True]
    assert len(routed) == 6 and all(row["tokens"] == 256 for row in routed)
    assert r.flops < 0.7 * d.flops


def test_cli_table_shows_routed_blocks_and_kept_tokens():
    from flopsim.cli import app

    result = CliRunner().invoke(app, ["count", "decoder-220m-mod", "--seq", "2048", "--phase", "forward"],
                                env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "routed" in result.stdout and "tokens" in result.stdout
    rows = {line.split()[1]: line for line in result.stdout.splitlines() if "block." in line}
    assert "True" in rows["block.1"] and "256" in rows["block.1"]
    assert "False" in rows["block.0"] and "2048" in rows["block.0"]
    assert len(rows) == 12
