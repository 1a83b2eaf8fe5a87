"""`norm_impl: fp32_unfused`: the RMSNorm as eager code writes it (transformers' LlamaRMSNorm,
Meta's reference, IBM fms's LayerNormParameterized with use_high_precision_pow), each line a
kernel. Its bytes, arithmetic and kernels are checked against the bytes oracle's dispatch
counter running that code (independent of flopsim.ops.primitives) in bf16 and in fp32, where
the two casts vanish; its memory keeps what autograd saves."""

from __future__ import annotations

import pytest

import flopsim
from flopsim.count import count
from flopsim.errors import SpecError

B, S = 2, 32
LLAMA = flopsim.load_model("llama-2-7b")


def _llama_rmsnorm(x, weight, eps=1e-6):  # transformers' LlamaRMSNorm.forward
    import torch

    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _counted(dtype: str, tokens: int, d: int) -> dict:
    """pass -> (bytes, arithmetic, kernels) the counter sees (the backward's seed left out)."""
    import torch

    from flopsim.torchref.bytes_counter import count_bytes

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    x = torch.randn(tokens, d, dtype=dt, requires_grad=True)
    weight = torch.ones(d, dtype=dt, requires_grad=True)

    def run():
        y = _llama_rmsnorm(x, weight)
        y.backward(torch.ones_like(y))
        return y

    events = [e for e in count_bytes(run).events if e.op != "ones_like"]
    out = {}
    for p in ("fwd", "bwd"):
        moved = [sum(a.nbytes for a in e.reads + e.writes) for e in events if e.pass_ == p]
        out[p] = (sum(moved), sum(e.flops for e in events if e.pass_ == p), sum(map(bool, moved)))
    return out


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_eager_rmsnorm_moves_what_the_counter_counts(dtype):
    spec = LLAMA.with_changes(norm_impl="fp32_unfused", dtype=dtype)
    ops = [o for o in count(spec, batch=B, seq=S, phase="train").ops if o.name == "block.0.norm1"]
    counted = _counted(dtype, B * S, spec.d_model)
    for op in ops:
        assert (op.bytes, op.other_flops, op.kernels) == counted[op.pass_], (dtype, op.pass_)
    assert {o.pass_: int(o.kernels) for o in ops} == ({"fwd": 8, "bwd": 16} if dtype == "bf16"
                                                      else {"fwd": 6, "bwd": 14})


def test_eager_rmsnorm_bytes_per_element_at_bf16():
    """Per element of x (n = tokens x d), bf16: forward x.to(fp32) 2 + 4, pow 4 + 4, mean 4,
    h * r 4 + 4, .to(bf16) 4 + 2, weight * 2 + 2 = 36; backward 92 (the module docstring's sum);
    per row 24 + 40 (the statistics), the weight and its gradient 2 + 4. The fused norm: 4 + 6."""
    d = LLAMA.d_model
    n, rows = B * S * d, B * S
    by_impl = {}
    for impl in ("fused", "fp32_unfused"):
        ops = [o for o in count(LLAMA.with_changes(norm_impl=impl), batch=B, seq=S, phase="train").ops
               if o.name == "block.0.norm1"]
        by_impl[impl] = sum(o.bytes for o in ops)
    assert by_impl["fp32_unfused"] == (36 + 92) * n + (24 + 40) * rows + (2 + 2 * 2) * d
    assert by_impl["fused"] == (4 + 6) * n + (2 + 2 * 2) * d


def test_eager_rmsnorm_keeps_what_autograd_saves():
    """A train step keeps, per norm, y and n in bf16, h in fp32 and r per row: 8 bytes an
    element and 4 a row where the fused norm keeps its output's 2. An inference step's working
    set and full recomputation's block inputs are the fused norm's."""
    fused, eager = (flopsim.memory(LLAMA.with_changes(norm_impl=impl), phase="train", batch=B, seq=S)
                    for impl in ("fused", "fp32_unfused"))
    norms = 2 * LLAMA.layers + 1
    extra = (8 - 2) * B * S * LLAMA.d_model + 4 * B * S
    assert eager.activations_bytes - fused.activations_bytes == norms * extra
    infer = [flopsim.memory(LLAMA.with_changes(norm_impl=impl), phase="forward", batch=B,
                            seq=S).activations_bytes for impl in ("fused", "fp32_unfused")]
    assert infer[0] == infer[1]
    full = [flopsim.memory(LLAMA.with_changes(norm_impl=impl), phase="train", batch=B, seq=S,
                           recompute="full").activations_bytes for impl in ("fused", "fp32_unfused")]
    # the kept block inputs are equal; the one block rebuilt at a time keeps its two norms' extra,
    # and the final norm (before the head, not a block: kept whole) its own
    assert full[1] - full[0] == (2 + 1) * extra


def test_norm_impl_is_an_rmsnorm_option():
    with pytest.raises(SpecError, match="norm_impl: fp32_unfused"):
        flopsim.load_model("gpt2-small").with_changes(norm_impl="fp32_unfused")


def test_eager_rmsnorm_forward_bytes_exact_in_the_reference():
    """The torch reference runs the eager norm (flopsim.torchref.model.EagerRMSNorm, no fused
    region), and the bytes oracle matches flopsim's forward ops to the byte and FLOP, per module,
    at fp32 (where the casts vanish; the bf16 kernels are checked above against the counter).
    The backward is checked above at the aten level only: the oracle's NODE rule counts an
    autograd node's kernels as one (a fused backward's convention), where eager autograd runs
    MulBackward's two products as two kernels that each read the gradient."""
    from conftest import tiny

    from flopsim.torchref.bytes_check import compare_bytes

    spec = tiny("llama-3-8b", kv_heads=2, layers=2).with_changes(norm_impl="fp32_unfused")
    cmp = compare_bytes(spec, "forward", 2, 5)
    assert cmp.exact, cmp.describe()
    assert cmp.torch[("block.0.norm1", "fwd")][0] > 0


def test_plan_train_norm_impl_option():
    """--norm-impl fp32_unfused plans the eager norm: the plan of the spec with norm_impl
    fp32_unfused, slower than the fused norm's; the options line and a search's best command
    name it; a bad value is one line, exit 2."""
    import json

    from conftest import one_error_line
    from conftest import run_cli as run

    args = ("plan", "train", "llama-2-7b", "-H", "a100-80gb", "--gpus", 8, "--tokens", "1B", "--seq", 4096,
            "--global-batch", 8, "--format", "json")
    fused, eager = (json.loads(run(*args, "--norm-impl", impl).output) for impl in ("fused", "fp32_unfused"))
    direct = flopsim.plan_training(LLAMA.with_changes(norm_impl="fp32_unfused"), "a100-80gb", gpus=8, tokens=1e9,
                                   seq=4096, global_batch=8)
    assert eager["totals"]["step_time_s"] == pytest.approx(direct.totals["step_time_s"], rel=1e-12)
    assert eager["totals"]["step_time_s"] > 1.03 * fused["totals"]["step_time_s"]
    table = run(*args[:-2], "--norm-impl", "fp32_unfused")
    assert table.exit_code == 0 and "norm fp32_unfused" in table.output
    assert one_error_line(run(*args, "--norm-impl", "fp16")).startswith("flopsim: error: norm_impl: 'fp16'")
    search = run(*args[:-2], "--search", "--micro-batches", 1, "--top", 1, "--norm-impl", "fp32_unfused")
    assert search.exit_code == 0 and "--norm-impl fp32_unfused ..." in " ".join(search.output.split())
