"""`rope_impl` and `act_impl`: RoPE and the gated activation as eager code runs them, each aten
op a kernel (flopsim.ops.primitives.rope_eager, gated_activation_unfused). Each form is checked
aten op by aten op against the bytes oracle's dispatch counter (independent of
flopsim.ops.primitives) running the upstream code (transformers' own functions and modules; Meta's and fms's
transcribed), in bf16 and in fp32
(where the casts vanish): bytes, arithmetic and kernels, forward and backward. Tables made once
a model (transformers' cos / sin, Meta's complex frequencies, fms's cached matrices) are inputs
here, as they are there; fms's per-layer gather of its matrices is inside."""

from __future__ import annotations

import re

import pytest

import flopsim
from flopsim.count import count
from flopsim.errors import SpecError

B, S, H, HKV, D = 2, 8, 4, 2, 16  # batch, tokens a sequence, query heads, key heads, head dim
SPEC = flopsim.load_model("llama-3-8b").with_changes(heads=H, kv_heads=HKV, d_model=H * D, d_ff=48, layers=2)


def _rotate_half(q, k, cos, sin):  # transformers' own apply_rotary_pos_emb (q, k [B, H, S, D]; cos, sin [B, S, D])
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)


def _complex(q, k, freqs):  # Meta's apply_rotary_emb (q, k [B, S, H, D]; freqs [S, D / 2] complex64)
    import torch

    f = freqs.view(1, S, 1, D // 2)
    out = []
    for x in (q, k):
        z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        out.append(torch.view_as_real(z * f).flatten(3).type_as(x))
    return tuple(out)


def _pairs(q, k, cached, position_ids):  # fms RotaryEmbedding.adjusted_qk @0317045a (q, k [B, H, S, D])
    freqs = cached[position_ids].unsqueeze(1).float()  # [B, 1, S, D / 2, 2, 2]
    out = []
    for x in (q, k):
        x2 = x.float().reshape(*x.shape[:-1], -1, 2)
        out.append(freqs[:, :, -S:].mul(x2.unsqueeze(-2)).sum(5).flatten(3).type_as(x).contiguous())
    return tuple(out)


def _rope_inputs(impl: str, dt):
    import torch

    grad = dict(dtype=dt, requires_grad=True)
    if impl == "complex_fp32":
        shape = lambda h: (B, S, h, D)  # noqa: E731
        tables = (torch.polar(torch.ones(S, D // 2), torch.randn(S, D // 2)),)
    else:
        shape = lambda h: (B, h, S, D)  # noqa: E731
        tables = ((torch.randn(B, S, D, dtype=dt), torch.randn(B, S, D, dtype=dt)) if impl == "rotate_half"
                  else (torch.randn(64, D // 2, 2, 2), torch.arange(S).repeat(B, 1)))
    return (torch.randn(*shape(H), **grad), torch.randn(*shape(HKV), **grad), *tables)


def _counted(fn, args) -> dict:
    """pass -> (bytes, arithmetic, kernels) the counter sees running fn forward and backward
    (the backward's seed gradients made beforehand)."""
    import torch

    from flopsim.torchref.bytes_counter import count_bytes

    seeds = [torch.ones_like(t) for t in fn(*args)]

    def run():
        outs = fn(*args)
        torch.autograd.backward(outs, seeds)
        return outs

    events = count_bytes(run).events
    out = {}
    for p in ("fwd", "bwd"):
        moved = [sum(a.nbytes for a in e.reads + e.writes) for e in events if e.pass_ == p]
        out[p] = (sum(moved), sum(e.flops for e in events if e.pass_ == p), sum(map(bool, moved)))
    return out


RULES = {"rotate_half": _rotate_half, "complex_fp32": _complex, "pairs_fp32": _pairs}
KERNELS = {"rotate_half": ({"fwd": 10, "bwd": 14}, {"fwd": 10, "bwd": 14}),  # (bf16, fp32): q's and k's
           "complex_fp32": ({"fwd": 6, "bwd": 8}, {"fwd": 2, "bwd": 4}),
           "pairs_fp32": ({"fwd": 9, "bwd": 8}, {"fwd": 5, "bwd": 4})}  # + the layer's gather


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("impl", sorted(RULES))
def test_eager_rope_moves_what_the_counter_counts(impl, dtype):
    import torch

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    spec = SPEC.with_changes(rope_impl=impl, dtype=dtype)
    ops = [o for o in count(spec, batch=B, seq=S, phase="train").ops if o.name == "block.0.attn.rope"]
    counted = _counted(RULES[impl], _rope_inputs(impl, dt))
    for op in ops:
        assert (op.bytes, op.other_flops, op.kernels) == counted[op.pass_], (impl, dtype, op.pass_)
    assert {o.pass_: int(o.kernels) for o in ops} == KERNELS[impl][dtype == "fp32"]


def test_eager_rope_bytes_at_bf16():
    """rotate_half, bf16, per value of q and k (n = tokens x (H + H_kv) x D) in elements read +
    written: forward mul 1 + 1, neg 0.5 + 0.5, cat 1 + 1, mul 1 + 1, add 2 + 1 = 5.5 + 4.5, at 2
    bytes = 20; backward mul, neg, mul, two slice_backward (0.5 + 1 each), two adds (2 + 1 each)
    = 7.5 + 6.5 -> 28. Each tensor's two products read cos and sin ([tokens, D] at 2 bytes) in
    each pass. The fused kernel: 2 + 2 a value and the int64 position ids, each pass."""
    t, n = B * S, B * S * (H + HKV) * D
    got = {impl: sum(o.bytes for o in count(SPEC.with_changes(rope_impl=impl), batch=B, seq=S, phase="train").ops
                     if o.name == "block.0.attn.rope") for impl in ("fused", "rotate_half")}
    assert got["rotate_half"] == (20 + 28) * n + 2 * (2 * 2) * t * D * 2
    assert got["fused"] == 2 * (4 * n + 8 * t)


@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_unfused_gated_activation_moves_what_the_counter_counts(activation, dtype):
    """act(gate) * up over a gate_up product's chunks: the counter's kernels but the join of the two
    gradients (SplitBackward's cat), free by the SPLIT convention (docs/bytes.md)."""
    import torch
    import torch.nn.functional as F

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    act = {"silu": F.silu, "gelu": F.gelu}[activation]
    spec = SPEC.with_changes(act_impl="unfused", activation=activation, dtype=dtype)
    ops = [o for o in count(spec, batch=B, seq=S, phase="train").ops if o.name == "block.0.mlp.act"]
    gate_up = torch.randn(B * S, 2 * spec.d_ff, dtype=dt, requires_grad=True)

    def run(x):
        g, u = x.chunk(2, dim=-1)
        return (act(g) * u,)

    counted = _counted(run, (gate_up,))
    join = 2 * (2 * B * S * spec.d_ff * gate_up.element_size())  # the cat reads both halves, writes them
    assert counted["bwd"][2] == 4
    counted["bwd"] = (counted["bwd"][0] - join, counted["bwd"][1], 3)
    for op in ops:
        assert (op.bytes, op.other_flops, op.kernels) == counted[op.pass_], (activation, dtype, op.pass_)


def test_unfused_gated_activation_forward_exact_in_the_reference():
    """The torch reference runs act_impl unfused (no fused region), and the bytes oracle matches
    flopsim's forward ops per module at fp32. The backward is checked above at the aten level:
    the oracle's NODE rule counts MulBackward's two products as one kernel."""
    from flopsim.torchref.bytes_check import compare_bytes

    cmp = compare_bytes(SPEC.with_changes(act_impl="unfused"), "forward", 2, 5)
    assert cmp.exact, cmp.describe()
    assert cmp.torch[("block.0.mlp", "fwd")][0] > 0


def test_eager_forms_keep_what_autograd_saves():
    """A train step keeps one more d_ff-wide tensor a block with the unfused activation (act(gate),
    which the product saves), and, with fms's RoPE, each layer's gathered matrices (8 bytes a
    token and value of d_head); rotate_half's and the complex form's intermediates are freed. An
    inference step's working set is the widest kernel's: no larger than the fused op's here."""
    def acts(**changes):
        return flopsim.memory(SPEC.with_changes(**changes), phase="train", batch=B, seq=S).activations_bytes

    base, blocks = acts(), SPEC.layers
    assert acts(act_impl="unfused") - base == blocks * B * S * SPEC.d_ff * 2
    assert acts(rope_impl="pairs_fp32") - base == blocks * B * S * D * 8
    assert acts(rope_impl="rotate_half") == acts(rope_impl="complex_fp32") == base
    infer = {impl: flopsim.memory(SPEC.with_changes(rope_impl=impl), phase="forward", batch=B,
                                  seq=S).activations_bytes for impl in ("fused", "rotate_half")}
    assert infer["rotate_half"] == infer["fused"]


def test_eager_forms_are_refused_where_they_do_not_apply():
    with pytest.raises(SpecError, match="rope_impl: rotate_half"):
        flopsim.load_model("gpt2-small").with_changes(rope_impl="rotate_half")
    with pytest.raises(SpecError, match="act_impl: unfused"):
        flopsim.load_model("gpt2-small").with_changes(act_impl="unfused")
    from flopsim.torchref.model import build_reference

    with pytest.raises(ValueError, match="rope_impl pairs_fp32: the torch reference runs RoPE fused"):
        build_reference(SPEC.with_changes(rope_impl="pairs_fp32"))


def test_plan_train_rope_and_act_impl_options():
    """--rope-impl and --act-impl plan the spec with those fields, slower than the fused forms;
    the options line names them; a bad value is one line, exit 2."""
    import json

    from conftest import one_error_line
    from conftest import run_cli as run

    args = ("plan", "train", "llama-2-7b", "-H", "h100-sxm", "--gpus", 8, "--tokens", "1B", "--seq", 4096,
            "--global-batch", 8, "--format", "json")
    fused = json.loads(run(*args).output)
    eager = json.loads(run(*args, "--rope-impl", "pairs_fp32", "--act-impl", "unfused").output)
    direct = flopsim.plan_training(flopsim.load_model("llama-2-7b").with_changes(rope_impl="pairs_fp32",
                                                                                 act_impl="unfused"),
                                   "h100-sxm", gpus=8, tokens=1e9, seq=4096, global_batch=8)
    assert eager["totals"]["step_time_s"] == pytest.approx(direct.totals["step_time_s"], rel=1e-12)
    assert eager["totals"]["step_time_s"] > 1.03 * fused["totals"]["step_time_s"]
    table = run(*args[:-2], "--rope-impl", "rotate_half")
    assert table.exit_code == 0 and "rope rotate_half, activation fused" in " ".join(table.output.split())
    assert one_error_line(run(*args, "--rope-impl", "complex")).startswith("flopsim: error: rope_impl: 'complex'")


def test_predict_counts_kernel_launches_not_ops():
    """`predict`'s kernel count is the step's launches: rotate_half adds 10 + 14 kernels a
    layer where the fused RoPE's two ops launch 2, and the op count is unchanged; the CLI line
    names both."""
    from conftest import run_cli as run

    fused, eager = (flopsim.predict(SPEC.with_changes(rope_impl=impl), "h100-sxm", phase="train", batch=B,
                                    seq=S).summary() for impl in ("fused", "rotate_half"))
    assert eager["ops"] == fused["ops"]
    assert eager["kernels"] - fused["kernels"] == SPEC.layers * ((10 + 14) - 2)
    out = " ".join(run("predict", "llama-2-7b", "-H", "h100-sxm", "--phase", "train", "--seq", 64).output.split())
    kernels, ops = re.search(r"over ([\d,]+) kernels \((\d+) ops\)", out).groups()
    assert kernels.replace(",", "") == ops  # every op of the fused preset is one kernel


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_transformers_llama_modules_move_what_the_eager_forms_count(dtype):
    """transformers' own LlamaRMSNorm and LlamaMLP under the counter: the norm is flopsim's
    fp32_unfused norm kernel for kernel; the MLP's non-product kernels are the unfused
    activation's plus one: x's two gradients (gate_proj's and up_proj's) summed, where
    flopsim's fused gate_up product has one (the SPLIT convention, docs/bytes.md)."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    from flopsim.torchref.bytes_counter import count_bytes

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    spec = SPEC.with_changes(norm_impl="fp32_unfused", act_impl="unfused", dtype=dtype)
    config = LlamaConfig(hidden_size=spec.d_model, intermediate_size=spec.d_ff, hidden_act="silu",
                         rms_norm_eps=1e-6)
    ops = {(o.name, o.pass_): o for o in count(spec, batch=B, seq=S, phase="train").ops}
    products = ("mm", "addmm", "t")  # the projections' matrix products (FlopCounterMode's) and views
    modules = ((LlamaRMSNorm(spec.d_model, eps=1e-6), "block.0.norm1"), (LlamaMLP(config), "block.0.mlp.act"))
    for module, name in modules:
        module = module.to(dt)
        x = torch.randn(B, S, spec.d_model, dtype=dt, requires_grad=True)
        seed = torch.ones(B, S, spec.d_model, dtype=dt)

        def run():
            y = module(x)
            y.backward(seed)
            return y

        events = [e for e in count_bytes(run).events if e.op not in products and not e.op.startswith("_unsafe")]
        for p in ("fwd", "bwd"):
            mine = [e for e in events if e.pass_ == p and (e.reads or e.writes)]
            moved = [sum(a.nbytes for a in e.reads + e.writes) for e in mine]
            if name == "block.0.mlp.act" and p == "bwd":  # the weights' gradient sums and x's gradient sum
                extra = [e for e in mine if e.accumulate or e.op in ("sum", "add")]
                assert sum(e.accumulate for e in extra) == 1
                moved = [m for m, e in zip(moved, mine) if e not in extra]
                mine = [e for e in mine if e not in extra]
            op = ops[(name, p)]
            assert (op.bytes, op.other_flops, op.kernels) == (sum(moved), sum(e.flops for e in mine),
                                                              sum(map(bool, moved))), (name, p)


def test_predict_and_count_take_the_kernel_options():
    """`predict` and `count` take --norm-impl, --rope-impl, --act-impl and --loss as `plan train`
    does: the spec with those fields, named on the first line; a bad value is one line, exit 2."""
    import json

    from conftest import one_error_line
    from conftest import run_cli as run

    eager = dict(norm_impl="fp32_unfused", rope_impl="complex_fp32", act_impl="unfused")
    flags = ("--norm-impl", "fp32_unfused", "--rope-impl", "complex_fp32", "--act-impl", "unfused")
    spec = flopsim.load_model("llama-2-7b").with_changes(**eager)
    got = json.loads(run("predict", "llama-2-7b", "-H", "a100-80gb", "--phase", "train", "--seq", 256, *flags,
                         "-f", "json").output)
    assert got["time_s"] == pytest.approx(flopsim.predict(spec, "a100-80gb", phase="train", seq=256).time_s,
                                          rel=1e-12)
    counted = json.loads(run("count", "llama-2-7b", "--phase", "train", "--seq", 256, *flags, "-f", "json").output)
    assert counted["bytes"] == flopsim.count(spec, batch=1, seq=256, phase="train").bytes
    named = {"loss": "fused", "norm": "fp32_unfused", "rope": "complex_fp32", "activation": "unfused"}
    assert got["kernel_impls"] == counted["kernel_impls"] == named  # JSON names them too
    head = run("count", "llama-2-7b", "--seq", 64, *flags).output.splitlines()[0]
    assert head.endswith("; norm fp32_unfused, rope complex_fp32, activation unfused")
    assert one_error_line(run("count", "llama-2-7b", "--act-impl", "eager")).startswith(
        "flopsim: error: act_impl: 'eager'")
