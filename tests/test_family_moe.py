"""The Mixture-of-Experts family (`family: moe`).

- exactness: on a grid of small configs (dropless / capacity token choice,
  expert choice, fine-grained experts, shared experts, every-k, mlp / gated,
  MHA / GQA, bias, several B and S) flopsim equals FlopCounterMode on the
  torch reference, in total, per module and in parameters, for forward,
  train and prefill (and decode FLOPs, which are exact too);
- symbolic reduction: one expert, top-1, dropless is the dense model plus
  the router;
- decode weight bytes: expected distinct experts x bytes per expert;
- bad input: one-line errors;
- presets: Mixtral 8x7B's parameter count, derived by hand; the CLI table.
"""

from __future__ import annotations

import json

import pytest
import sympy as sp
from typer.testing import CliRunner

from conftest import assert_exact, tiny
from flopsim.count import count, formula
from flopsim.errors import InputError, SpecError
from flopsim.families import build_ops
from flopsim.ops.expectations import expected_distinct
from flopsim.ops.symbols import B, S, T, symbol
from flopsim.spec import load_model
from flopsim.spec.model import DTYPE_BYTES


def moe_spec(name, *, base="gpt2-small", moe=None, **changes):
    changes.setdefault("layers", 2)
    return tiny(base, name=name, family="moe", moe=moe or {}, **changes)


# (name, base preset, spec changes, moe block, (B, S))
CONFIGS = [
    ("dropless-top2", "gpt2-small", {}, dict(experts=4, top_k=2), (2, 5)),
    ("dropless-top1-gated-gqa", "llama-3-8b", dict(kv_heads=2), dict(experts=4, top_k=1), (1, 7)),
    ("dropless-top3-fine", "llama-3-8b", dict(kv_heads=1), dict(experts=8, top_k=3, d_expert=16), (3, 4)),
    ("dropless-every2", "gpt2-small", dict(layers=3), dict(experts=3, top_k=2, every=2), (2, 6)),
    ("dropless-shared", "llama-3-8b", dict(kv_heads=2), dict(experts=4, top_k=2, d_expert=16, shared_experts=2),
     (2, 3)),
    ("dropless-shared-bias", "gpt2-small", {}, dict(experts=4, top_k=2, shared_experts=1), (1, 9)),
    ("dropless-shared-gate", "llama-3-8b", dict(kv_heads=2),  # Qwen2-MoE's gated shared expert
     dict(experts=4, top_k=2, d_expert=16, shared_experts=2, shared_expert_gate=True), (2, 4)),
    ("dropless-one-expert", "gpt2-small", {}, dict(experts=1, top_k=1), (2, 4)),
    ("dropless-all-experts", "llama-3-8b", dict(kv_heads=4), dict(experts=3, top_k=3), (1, 5)),
    ("capacity-switch", "gpt2-small", {}, dict(experts=4, top_k=1, capacity_factor=1.25), (2, 8)),
    ("capacity-top2-gated", "llama-3-8b", dict(kv_heads=2), dict(experts=4, top_k=2, capacity_factor=1.0), (3, 5)),
    ("capacity-drops", "gpt2-small", dict(bias=False), dict(experts=4, top_k=2, capacity_factor=0.5), (2, 7)),
    ("capacity-rational", "llama-3-8b", dict(kv_heads=2), dict(experts=3, top_k=2, capacity_factor=1.1), (1, 11)),
    ("capacity-over-tokens", "gpt2-small", {}, dict(experts=2, top_k=2, capacity_factor=2.0), (1, 3)),
    ("capacity-fine-shared", "llama-3-8b", dict(kv_heads=1),
     dict(experts=8, top_k=4, d_expert=8, shared_experts=1, capacity_factor=1.5), (2, 6)),
    ("capacity-every2", "gpt2-small", dict(layers=4), dict(experts=4, top_k=1, capacity_factor=1.25, every=2),
     (4, 3)),
    ("expert-choice", "gpt2-small", {}, dict(experts=4, capacity_factor=1.0, routing="expert_choice"), (2, 5)),
    ("expert-choice-gated", "llama-3-8b", dict(kv_heads=2),
     dict(experts=4, capacity_factor=2.0, routing="expert_choice"), (1, 8)),
    ("expert-choice-rational", "llama-3-8b", dict(kv_heads=4),
     dict(experts=3, capacity_factor=1.3, routing="expert_choice", d_expert=32), (3, 3)),
    ("expert-choice-all", "gpt2-small", {}, dict(experts=2, capacity_factor=2.0, routing="expert_choice"), (2, 2)),
    ("expert-choice-shared", "gpt2-small", dict(layers=3),
     dict(experts=4, capacity_factor=1.0, routing="expert_choice", shared_experts=1, every=3), (1, 6)),
    ("dropless-explicit-attn", "llama-3-8b", dict(kv_heads=2, attention_impl="explicit"),
     dict(experts=4, top_k=2), (2, 5)),
    ("dropless-single-token", "gpt2-small", {}, dict(experts=4, top_k=2), (1, 1)),
    ("capacity-single-token", "llama-3-8b", dict(kv_heads=2), dict(experts=4, top_k=2, capacity_factor=1.25),
     (1, 1)),
    ("dropless-wide-batch", "gpt2-small", {}, dict(experts=6, top_k=2, d_expert=24), (5, 4)),
    ("dropless-loop-bias", "gpt2-small", {}, dict(experts=4, top_k=2, kernel="loop"), (2, 5)),
    ("dropless-loop-gated", "llama-3-8b", dict(kv_heads=2), dict(experts=3, top_k=2, d_expert=16, kernel="loop"),
     (1, 6)),
]
GRID = [(moe_spec(f"moe-{name}", base=base, moe=moe, **changes), shape)
        for name, base, changes, moe, shape in CONFIGS]


def test_grid_covers_every_variant():
    assert len(GRID) >= 20
    specs = [s for s, _ in GRID]
    variants = {("dropless" if s.moe.capacity_factor is None else s.moe.routing) for s in specs}
    assert variants == {"dropless", "token_choice", "expert_choice"}
    assert any((s.moe.d_expert or s.d_ff) < s.d_ff for s in specs)  # fine-grained
    assert any(s.moe.shared_experts for s in specs) and any(s.moe.shared_expert_gate for s in specs)
    assert any(s.moe.every > 1 for s in specs)
    assert {s.ffn for s in specs} == {"mlp", "gated"}
    assert any(s.kv_heads < s.heads for s in specs)
    assert len({shape for _, shape in GRID}) >= 8


CASES = [pytest.param(spec, phase, b, s, id=f"{spec.name}-{phase}-B{b}-S{s}")
         for spec, (b, s) in GRID for phase in ("forward", "train", "prefill", "decode")]


@pytest.mark.parametrize("spec,phase,batch,seq", CASES)
def test_moe_matches_flop_counter(spec, phase, batch, seq):
    cmp = assert_exact(spec, phase, batch, seq, seq + 2 if phase == "decode" else None)
    assert cmp.torch_flops > 0


def test_moe_modules_are_checked_per_module():
    from flopsim.torchref.check import compare_with_torch

    spec, (b, s) = GRID[4]  # shared experts
    cmp = compare_with_torch(spec, "train", b, s)
    # the reference's MoE modules are among those joined by path
    assert cmp.exact and cmp.modules_checked >= 20
    names = {op.module for op in build_ops(spec, "train")}
    assert {"block.0.moe.router", "block.0.moe.experts.gate_up", "block.0.moe.experts.down",
            "block.0.moe.shared.gate_up"} <= names


# -- symbolic reduction ---------------------------------------------------------------

@pytest.mark.parametrize("phase", ["forward", "train"])
def test_one_expert_top1_is_dense_plus_router_symbolic(phase):
    """E = 1, k = 1, dropless: every token runs the one expert (d_expert = d_ff),
    so the MoE model is the dense model plus the router Linear(d_model, 1):
    2 * B*S * d_model per layer forward, 3x that in train (forward, grad-input,
    grad-weight)."""
    moe = moe_spec("moe-one", base="llama-3-8b", kv_heads=2, layers=3, moe=dict(experts=1, top_k=1))
    dense = tiny("llama-3-8b", name="dense-one", kv_heads=2, layers=3)
    passes = 3 if phase == "train" else 1
    E, k, d_model = symbol("experts"), symbol("top_k"), symbol("d_model")

    a = formula(moe, phase=phase, symbolic=True).subs({E: 1, k: 1, symbol("d_expert"): symbol("d_ff")})
    b = formula(dense, phase=phase, symbolic=True) + 3 * passes * 2 * B * S * d_model
    assert sp.simplify(a - b) == 0

    # and with the numbers in
    a = formula(moe, phase=phase)
    b = formula(dense, phase=phase) + 3 * passes * 2 * B * S * moe.d_model
    assert sp.simplify(a - b) == 0

    # the symbolic ops themselves, summed (T = S in these phases)
    ops = build_ops(moe, phase, symbolic=True)
    total = sum((op.flops for op in ops), sp.Integer(0))
    total = total.subs({E: 1, k: 1, symbol("d_expert"): symbol("d_ff"), T: S})
    dense_ops = build_ops(dense, phase, symbolic=True)
    dense_total = sum((op.flops for op in dense_ops), sp.Integer(0)).subs(T, S)
    assert sp.simplify(total - dense_total - 3 * passes * 2 * B * S * d_model) == 0


def test_symbolic_moe_flops_scale_with_top_k():
    """Dropless: expert FLOPs are exactly tokens * k expert passes, independent of E."""
    spec = moe_spec("moe-sym", base="llama-3-8b", kv_heads=2, layers=1, moe=dict(experts=8, top_k=2, d_expert=16))
    ops = build_ops(spec, "forward", symbolic=True)
    experts = sum((op.flops for op in ops if op.module.startswith("block.0.moe.experts")), sp.Integer(0))
    k, d_model, d_expert = symbol("top_k"), symbol("d_model"), symbol("d_expert")
    assert sp.simplify(experts - 2 * B * S * k * 3 * d_model * d_expert) == 0
    assert symbol("experts") not in experts.free_symbols


def test_capacity_slots_use_exact_ceiling():
    spec = moe_spec("moe-cap", moe=dict(experts=3, top_k=2, capacity_factor=1.1))
    res = count(spec, batch=1, seq=11, phase="forward")
    # C = ceil(1.1 * 2 * 11 / 3) = ceil(8.0666...) = 9; float rounding must not change it
    up = next(op for op in res.ops if op.name == "block.0.moe.experts.up")
    assert up.gemm == (3, 9, spec.d_ff, spec.d_model)
    assert up.flops == 2 * 3 * 9 * spec.d_model * spec.d_ff
    assert up.tags["slots"] == 9
    ec = moe_spec("moe-ec", moe=dict(experts=4, capacity_factor=1.5, routing="expert_choice"))
    up = next(op for op in count(ec, batch=2, seq=5).ops if op.name == "block.0.moe.experts.up")
    assert up.gemm[:2] == (4, 4)  # ceil(1.5 * 10 / 4) = 4


# -- decode ---------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 3, 16])
def test_decode_expert_weight_bytes_are_expected_distinct_experts(batch):
    """Decode reads the experts the batch's n = B tokens activate. A token picks k
    of E experts, so a given expert is missed by one token with probability
    1 - k/E and by all n independent tokens with (1 - k/E)^n: the expected
    number of distinct experts read is E * (1 - (1 - k/E)^n) =
    expected_distinct(E, k, n). One expert's bytes (gated, no bias, bf16):
    (d_model * 2 d_expert + d_expert * d_model) * 2."""
    spec = moe_spec("moe-dec", base="llama-3-8b", kv_heads=2, moe=dict(experts=8, top_k=2, d_expert=16))
    res = count(spec, batch=batch, seq=10, phase="decode")
    E, k, d, de, w = 8, 2, spec.d_model, 16, 2
    per_expert = (d * 2 * de + de * d) * w
    active = float(expected_distinct(sp.Integer(E), sp.Integer(k), sp.Integer(batch)))
    got = sum(op.weight_bytes for op in res.ops if op.module.startswith("block.0.moe.experts"))
    assert got == pytest.approx(active * per_expert, rel=1e-12)
    assert active == pytest.approx(E * (1 - (1 - k / E) ** batch))
    if batch == 1:
        assert got == k * per_expert  # one token reads exactly its k experts
    layer = res.per_layer().set_index("part").loc["block.0"]
    assert layer["active_experts"] == pytest.approx(active)
    assert (layer["experts"], layer["top_k"]) == (E, k)
    # FLOPs stay exact: B * k expert passes
    flops = sum(op.flops for op in res.ops if op.module.startswith("block.0.moe.experts"))
    assert flops == 2 * batch * k * 3 * d * de


def test_decode_padded_variants_read_every_expert():
    spec = moe_spec("moe-dec-cap", moe=dict(experts=4, top_k=1, capacity_factor=1.25, d_expert=16))
    res = count(spec, batch=3, seq=10, phase="decode")
    d, de, w = spec.d_model, 16, 2
    per_expert = (d * de + de + de * d + d) * w  # mlp with biases
    got = sum(op.weight_bytes for op in res.ops if op.module.startswith("block.0.moe.experts"))
    assert got == 4 * per_expert


# -- the gather kernel (moe.kernel: gather) -------------------------------------------

GATHER = [("gather-top2", "gpt2-small", {}, dict(experts=4, top_k=2, kernel="gather"), (2, 5)),
          ("gather-gated-gqa", "llama-3-8b", dict(kv_heads=2), dict(experts=4, top_k=2, kernel="gather"), (1, 7)),
          ("gather-fine-shared", "llama-3-8b", dict(kv_heads=1),
           dict(experts=8, top_k=3, d_expert=16, shared_experts=1, kernel="gather"), (3, 4)),
          ("gather-bias-every2", "gpt2-small", dict(layers=3), dict(experts=3, top_k=1, every=2, kernel="gather"),
           (2, 6))]


@pytest.mark.parametrize("name,base,changes,moe,shape", GATHER, ids=[g[0] for g in GATHER])
@pytest.mark.parametrize("phase", ["forward", "prefill", "decode"])
def test_gather_kernel_matches_flop_counter(name, base, changes, moe, shape, phase):
    spec = moe_spec(f"moe-{name}", base=base, moe=moe, **changes)
    b, s = shape
    assert_exact(spec, phase, b, s, s + 2 if phase == "decode" else None)


@pytest.mark.parametrize("batch", [1, 4])
def test_gather_kernel_copies_each_pairs_expert(batch):
    """gpt-fast's MoE: each of the B * k (token, expert) pairs copies its expert's
    weights (read from memory, written as a copy) and a batched matrix-vector
    product reads the copy: per projection of an expert matrix M bytes,
    weight reads B * k * M, copy written B * k * M, copy read B * k * M -- where
    the grouped kernel reads E * (1 - (1 - k/E)^B) * M of weights."""
    moe = dict(experts=8, top_k=2, d_expert=16)
    base = moe_spec("moe-g", base="llama-3-8b", kv_heads=2, moe=moe)
    gathered = moe_spec("moe-g", base="llama-3-8b", kv_heads=2, moe={**moe, "kernel": "gather"})
    g = count(gathered, batch=batch, seq=10, phase="decode")
    d, de, w, k = base.d_model, 16, 2, 2
    matrices = (d * 2 * de + de * d) * w  # gate_up and down of one expert
    experts = [op for op in g.ops if op.module.startswith("block.0.moe.experts") and op.kind != "elementwise"]
    assert sum(op.weight_bytes for op in experts) == batch * k * matrices
    copies = [op for op in experts if op.name.endswith(".gather")]
    assert sum(op.act_write_bytes for op in copies) == batch * k * matrices
    grouped = count(base, batch=batch, seq=10, phase="decode")
    assert g.flops == grouped.flops and g.params == grouped.params
    read = sum(op.weight_bytes for op in grouped.ops if op.module.startswith("block.0.moe.experts"))
    assert read == pytest.approx(float(expected_distinct(sp.Integer(8), sp.Integer(k), sp.Integer(batch))) * matrices)


def test_fused_gather_kernel_reads_each_pairs_expert_once_without_a_copy():
    """gather_fused (compiled): one kernel per projection reads each pair's expert
    weights by index: weight reads B * k * M, no copy written; FLOPs and params equal."""
    moe = dict(experts=8, top_k=2, d_expert=16)
    spec = moe_spec("moe-gf", base="llama-3-8b", kv_heads=2, moe={**moe, "kernel": "gather_fused"})
    eager = moe_spec("moe-gf", base="llama-3-8b", kv_heads=2, moe={**moe, "kernel": "gather"})
    f, e = count(spec, batch=3, seq=10, phase="decode"), count(eager, batch=3, seq=10, phase="decode")
    d, de, w, k = spec.d_model, 16, 2, 2
    matrices = (d * 2 * de + de * d) * w
    experts = [op for op in f.ops if op.module.startswith("block.0.moe.experts") and op.kind == "matmul"]
    assert sum(op.weight_bytes for op in experts) == 3 * k * matrices
    assert not any(op.name.endswith(".gather") for op in f.ops)
    assert f.flops == e.flops and f.params == e.params
    assert f.bytes < e.bytes
    assert_exact(spec, "decode", 3, 10, 12)  # the reference runs it eagerly: FLOPs are the same


def test_loop_kernel_is_grouped_work_launched_once_per_expert_plus_its_copies():
    """kernel loop: the products of the grouped kernel (the same FLOPs and parameters),
    each launched `experts` times, plus the copies the loop makes around each projection:
    forward, its outputs joined; backward, its input gradients joined and its weight
    gradients stacked. The torch reference runs exactly this loop (FlopCounterMode and the
    bytes oracle agree: the grid's dropless-loop cases)."""
    moe = dict(experts=4, top_k=2, d_expert=16)
    loop = moe_spec("moe-loop", base="llama-3-8b", kv_heads=2, moe={**moe, "kernel": "loop"})
    grouped = moe_spec("moe-loop", base="llama-3-8b", kv_heads=2, moe=moe)
    batch, seq, E, d, f = 2, 6, 4, loop.d_model, 16  # gated: gate_up d -> 2f, down f -> d
    w = DTYPE_BYTES[loop.dtype]
    for phase, tokens in (("forward", batch * seq), ("decode", batch), ("train", batch * seq)):
        a, b = (count(s, batch=batch, seq=seq, phase=phase, context=seq + 2 if phase == "decode" else None)
                for s in (loop, grouped))
        rows = tokens * 2  # (token, expert) pairs, top-2
        joined = 2 * rows * 2 * f * w + 2 * rows * d * w  # outputs of gate_up and down, read and written
        if phase == "train":
            joined += 2 * rows * d * w + 2 * rows * f * w  # input gradients of gate_up and down
            joined += 2 * (E * d * 2 * f + E * f * d) * w  # the weights' gradients stacked: read, write
        assert (a.flops, a.params) == (b.flops, b.params)
        assert a.bytes - b.bytes == loop.layers * joined
        experts = [op for op in a.ops if ".moe.experts." in op.name and op.kind == "matmul"]
        assert experts and all(op.kernels == 4 for op in experts)
        joins = [op for op in a.ops if op.name.endswith(".join")]
        assert len(joins) == loop.layers * 2 * (2 if phase == "train" else 1)
        assert all(op.kernels == (2 if op.pass_ == "bwd" else 1) for op in joins)
        assert all(op.kernels == 1 for op in a.ops if op not in experts and op not in joins)
    capacity = moe_spec("moe-loop-cap", moe={**moe, "kernel": "loop", "capacity_factor": 1.25})
    assert all(op.kernels == 1 for op in count(capacity, batch=2, seq=6).ops)  # one bmm: no loop
    assert not any(op.name.endswith(".join") for op in count(capacity, batch=2, seq=6, phase="train").ops)


def test_gather_kernel_is_inference_only():
    spec = moe_spec("moe-g", moe=dict(experts=4, top_k=2, kernel="gather"))
    with pytest.raises(InputError, match="inference kernel"):
        count(spec, batch=1, seq=4, phase="train")
    with pytest.raises(SpecError, match="kernel gather runs dropless token choice"):
        moe_spec("moe-g", moe=dict(experts=4, top_k=2, kernel="gather", capacity_factor=1.25))


# -- bad input ------------------------------------------------------------------------

@pytest.mark.parametrize("changes,expect", [
    (dict(family="moe", moe=dict(experts=4, top_k=5)), "top_k 5 exceeds experts 4"),
    (dict(moe=dict(experts=4, top_k=2)), "block 'moe' is not allowed in a spec of family 'dense'"),
    (dict(family="moe", moe=dict(experts=4, capacity_factor=0)), "moe.capacity_factor"),
    (dict(family="moe", moe=dict(experts=4, capacity_factor=-1.25)), "moe.capacity_factor"),
    (dict(family="moe", moe=dict(experts=4, routing="expert_choice")), "needs a capacity_factor"),
    (dict(family="moe", moe=dict(experts=4, routing="expert_choice", capacity_factor=5.0)), "exceeds experts 4"),
    (dict(family="moe"), "needs a 'moe' block"),
])
def test_bad_input_is_one_line(changes, expect):
    with pytest.raises(SpecError) as err:
        tiny("gpt2-small", **changes)
    message = str(err.value)
    assert expect in message and "\n" not in message


def test_bad_spec_on_the_command_line(tmp_path):
    import yaml

    from flopsim.cli import app

    data = {**load_model("mixtral-8x7b").model_dump(exclude_none=True), "moe": {"experts": 2, "top_k": 3}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    r = CliRunner().invoke(app, ["count", str(path)])
    assert r.exit_code == 2
    assert "top_k 3 exceeds experts 2" in r.output and len(r.output.strip().splitlines()) == 1


# -- presets --------------------------------------------------------------------------

def test_mixtral_parameter_count():
    """Mixtral 8x7B: 46,702,792,704 parameters, derived:
    embeddings and untied head 2 * 32000 * 4096; per layer: qkv
    4096 * (32 + 2 * 8) * 128, out 4096^2, two RMSNorms 2 * 4096, router
    4096 * 8, 8 gated experts 8 * 3 * 4096 * 14336; final norm 4096."""
    spec = load_model("mixtral-8x7b")
    d, ff, L, V, E = 4096, 14336, 32, 32000, 8
    layer = d * (32 + 2 * 8) * 128 + d * d + 2 * d + d * E + E * 3 * d * ff
    expected = 2 * V * d + L * layer + d
    assert expected == 46_702_792_704
    assert count(spec, seq=16).params == expected
    # active per token: 2 of 8 experts
    active = expected - L * (E - 2) * 3 * d * ff
    assert round(active / 1e9, 1) == 12.9


def test_count_mixtral_cli_shows_experts_and_top_k():
    from flopsim.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["count", "mixtral-8x7b", "--seq", "4096"])
    assert r.exit_code == 0, r.output
    assert "experts" in r.output and "top_k" in r.output
    header = next(line for line in r.output.splitlines() if "experts" in line)
    assert "active_experts" in header
    row = next(line for line in r.output.splitlines() if "block.0 " in line)
    cells = [c.strip() for c in row.split("│") if c.strip()]
    assert cells[-3:] == ["8", "2", "8"]
    r = runner.invoke(app, ["count", "mixtral-8x7b", "--seq", "4096", "--format", "json"])
    data = json.loads(r.stdout)
    assert data["params"] == 46_702_792_704
    # 4096 tokens x 2 experts of 3 products each, per layer
    experts = sum(o["flops"] for o in data["ops"] if ".moe.experts." in o["name"])
    assert experts == 32 * 2 * 4096 * 2 * 3 * 4096 * 14336


@pytest.mark.parametrize("name,experts,top_k", [("switch-style-moe", 128, 1), ("fine-grained-moe", 64, 8)])
def test_other_presets_load_and_count(name, experts, top_k):
    spec = load_model(name)
    assert (spec.family, spec.moe.experts, spec.moe.top_k) == ("moe", experts, top_k)
    res = count(spec, batch=2, seq=256, phase="train")
    assert res.flops > 0
    if name == "fine-grained-moe":
        assert spec.d_ff // spec.moe.d_expert == 8 == spec.moe.top_k  # G = 8, top-k scaled by G
    else:
        up = next(op for op in res.ops if op.name == "block.1.moe.experts.up" and op.pass_ == "fwd")
        assert up.tags["slots"] == -(-5 * 2 * 256 // (4 * 128))  # ceil(1.25 * 512 / 128) = 5


# -- the pieces MoDE reuses -----------------------------------------------------------

@pytest.mark.parametrize("phase", ["forward", "train"])
@pytest.mark.parametrize("noop,capacity", [(1, None), (2, None), (0, 3), (1, 2)])
def test_moe_ffn_noop_experts_and_capacity_override_match_torch(phase, noop, capacity):
    """`moe_ffn(..., noop_experts=, capacity=)` and `MoEFFN(..., noop_experts=, capacity=)`
    agree module for module (MoDE "integrated": a no-op expert in the router)."""
    import math
    from functools import partial

    import torch

    from flopsim.count import evaluate_ops, token_values
    from flopsim.families import dense, order_passes
    from flopsim.families.moe import moe_ffn
    from flopsim.ops.primitives import Ctx
    from flopsim.ops.symbols import Dims
    from flopsim.torchref.check import module_flops
    from flopsim.torchref.counting import count_with_torch
    from flopsim.torchref.model import Block, Reference, run_phase
    from flopsim.torchref.moe import MoEFFN

    spec = moe_spec("moe-noop", base="llama-3-8b", kv_heads=2,
                    moe=dict(experts=4, top_k=2, capacity_factor=1.25, shared_experts=1, d_expert=16))
    sym_capacity = (lambda n: sp.Integer(capacity)) if capacity else None
    ffn = partial(moe_ffn, noop_experts=noop, capacity=sym_capacity)
    ctx = Ctx(spec=spec, phase=phase, dims=Dims.of(spec))
    ops = order_passes(dense.build(ctx, block_fn=lambda c, i, **kw: dense.block(c, i, ffn=ffn, **kw)))
    costs = evaluate_ops(ops, token_values(spec, phase, 2, 5))

    torch.manual_seed(0)
    model = Reference(spec, block_factory=lambda s, i: Block(s, i, mlp=MoEFFN(s, i, noop_experts=noop,
                                                                              capacity=capacity))).eval()
    measured = count_with_torch(lambda: run_phase(model, spec, phase, 2, 5))
    assert measured[""] == sum(op.flops for op in costs)
    assert {p: f for p, f in measured.items() if module_flops(costs, p) != f} == {}
    assert sum(p.numel() for p in model.parameters()) == sum(op.params for op in costs if op.pass_ == "fwd")
    router = next(op for op in costs if op.name == "block.0.moe.router")
    assert router.gemm[2] == 4 + noop
    slots = capacity or math.ceil(1.25 * 2 * 10 / (4 + noop))
    assert router.tags["slots"] == slots


def test_moe_ffn_noop_needs_slots():
    from flopsim.errors import InputError
    from flopsim.families.moe import moe_ffn
    from flopsim.ops.primitives import Ctx
    from flopsim.ops.symbols import Dims

    spec = moe_spec("moe-noop-dropless", moe=dict(experts=4, top_k=2))
    with pytest.raises(InputError, match="noop_experts 1 needs a capacity_factor"):
        moe_ffn(Ctx(spec=spec, phase="forward", dims=Dims.of(spec)), 0, tokens=B * S, prefix="block.0",
                noop_experts=1)
