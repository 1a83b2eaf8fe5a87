"""Each convention of the bytes oracle, pinned: what the counter records for an aten
op (flopsim.torchref.bytes_counter), and each kernel rule of the comparison
(flopsim.torchref.bytes_check), with the eager behaviour that makes the rule
necessary asserted too -- so a test fails if a rule stops holding or stops being
needed. Golden values are derivations (fp32: 4 bytes a value, int64 8).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny
from flopsim.torchref.bytes_check import build_kernels
from flopsim.torchref.bytes_counter import count_bytes, fused, union_bytes
from flopsim.torchref.model import build_reference, prepare_phase

F32, I64 = 4, 8


def events_of(fn):
    return count_bytes(fn, results=False).events


def only(events, op):
    (e,) = [e for e in events if e.op == op]
    return e


def nbytes(accesses):
    return union_bytes(accesses)


def run(preset, phase, batch=2, seq=5, **changes):
    """(spec, capture, kernels) of one phase of a tiny reference."""
    spec = tiny(preset, **changes)
    model = build_reference(spec)
    capture = count_bytes(prepare_phase(model, spec, phase, batch, seq, seq + 3 if phase == "decode" else None))
    return spec, capture, build_kernels(capture)


# -- what one aten op moves (the counter) -------------------------------------------

def test_views_move_nothing_and_a_strided_reshape_copies():
    x = torch.randn(4, 6)
    events = events_of(lambda: (x.view(6, 4), x.t(), x.transpose(0, 1), x[1:], x.unsqueeze(0),
                                x[:, None].expand(4, 3, 6), x.t().reshape(24)))
    views = [e for e in events if e.op != "clone"]
    assert {e.op for e in views} >= {"view", "t", "transpose", "slice", "unsqueeze", "expand"}
    assert all(not e.reads and not e.writes for e in views)
    copy = only(events, "clone")  # reshape of a transposed tensor: a real copy
    assert nbytes(copy.reads) == nbytes(copy.writes) == 24 * F32


def test_broadcast_inputs_are_read_once():
    x, b = torch.randn(4, 8), torch.randn(8)
    add = only(events_of(lambda: x + b), "add")
    assert nbytes(add.reads) == (32 + 8) * F32 and nbytes(add.writes) == 32 * F32
    assert add.flops == 32  # one add per output element


def test_in_place_reads_and_writes_the_target_and_copy_does_not_read_it():
    x, y = torch.randn(16), torch.randn(16)
    add = only(events_of(lambda: x.add_(y)), "add_")
    assert nbytes(add.reads) == 2 * 16 * F32 and nbytes(add.writes) == 16 * F32
    copy = only(events_of(lambda: x.copy_(y)), "copy_")
    assert nbytes(copy.reads) == nbytes(copy.writes) == 16 * F32


def test_index_ops_read_the_index_and_the_selected_rows():
    table, ids = torch.randn(100, 8), torch.tensor([3, 7, 3])
    emb = only(events_of(lambda: F.embedding(ids, table)), "embedding")
    assert nbytes(emb.reads) == 3 * I64 + 3 * 8 * F32  # not the 100-row table
    assert nbytes(emb.writes) == 3 * 8 * F32


def test_scatter_out_of_place_keeps_its_self_copy_apart():
    x, src, idx = torch.randn(10, 4), torch.randn(3, 4), torch.tensor([1, 5, 1])
    e = only(events_of(lambda: x.index_add(0, idx, src)), "index_add")
    assert nbytes(e.reads) == 3 * I64 + 2 * 3 * 4 * F32  # index, source, the touched target rows
    assert nbytes(e.writes) == 3 * 4 * F32 and e.flops == 3 * 4
    read_self, write_copy = e.self_copy  # SCATTER: eager copied all of self
    assert read_self.nbytes == write_copy.nbytes == 10 * 4 * F32


def test_scalars_move_nothing():
    x = torch.randn(8, requires_grad=True)
    events = events_of(lambda: ((x * x).sum() * 2.0).backward())
    scalar = [e for e in events if e.op in ("mul", "ones_like") and not e.reads and not e.writes]
    assert len(scalar) >= 2 and all(e.flops == 0 for e in scalar)


# -- kernel rules (the comparison) ---------------------------------------------------

def _kernel(kernels, path, pass_, kind):
    """The kernels of a kind charged to `path` in a pass that cost something."""
    return [k for k in kernels if k.path == path and k.pass_ == pass_ and k.key[0] == kind
            and not k.free and (k.bytes or k.flops)]


def test_region_and_on_chip_rope_is_one_kernel():
    """RoPE runs as ~30 eager ops (one angle table, cos, sin, cat, neg, products on q and
    k); as one kernel it reads q, k and the int64 positions and writes q and k."""
    spec, _, kernels = run("llama-3-8b", "forward", kv_heads=2, layers=1)
    (rope,) = [k for k in _kernel(kernels, "block.0.attn", "fwd", "region") if k.region.kind == "rope"]
    assert len(rope.events) > 20 and {"cos", "sin", "pow"} <= {e.op for e in rope.events}
    qk = 2 * 5 * (spec.heads + spec.kv_heads) * spec.d_head * F32
    assert rope.read_bytes == qk + 2 * 5 * I64 and rope.write_bytes == qk
    assert rope.flops == 3 * qk // F32


def test_node_kernel_reads_the_gradient_once():
    """A Linear's backward node runs three ops that read grad_out; one kernel reads it once."""
    _, _, kernels = run("gpt2-small", "train", layers=1)
    (up,) = _kernel(kernels, "block.0.mlp.up", "bwd", "node")
    assert [e.op for e in up.events if e.reads].count("mm") == 2 and any(e.op == "sum" for e in up.events)
    grad_reads = sum(len(e.reads) for e in up.events)
    tokens, d, ff = 10, 32, 64
    assert grad_reads > 4  # eager: grad_out read by both products and the bias sum
    assert up.read_bytes == (tokens * ff + tokens * d + d * ff) * F32  # grad_out, x, W: once each


def test_accumulate_gradient_sums_go_to_the_last_user():
    """The engine sums the residual stream's gradients while norm's backward is running
    (ModuleTracker puts it there); the kernel is charged to the block (the residual add)."""
    _, capture, kernels = run("gpt2-small", "train", layers=1)
    sums = [e for e in capture.events if e.accumulate]
    assert sums and any(e.path.endswith(("norm1", "norm2")) for e in sums)
    acc = [k for k in kernels if k.key[0] == "acc"]
    assert {k.path for k in acc} == {"block.0", "head.lm"}  # residual adds; the tied weight's sum


def test_split_backward_concatenation_is_free():
    _, _, kernels = run("gpt2-small", "train", layers=1)
    split = [k for k in kernels if k.events[0].node is not None
             and type(k.events[0].node).__name__ == "SplitWithSizesBackward0"]
    assert split and any(e.op == "cat" for k in split for e in k.events)
    assert all(k.free for k in split)


def test_eager_joins_are_kernels_where_the_reference_marks_them():
    """SPLIT's exception: MoE's per-expert loop (moe.kernel loop) runs its splits and unbinds
    inside eager_joins, so the joins of their gradients are the copies they are in eager code:
    the input gradients' cat (rows x d_in) and the weight gradients' stack (E x d_in x d_out,
    and the biases' E x d_out), each read and written once. The same loop marked as one grouped
    GEMM (moe.kernel grouped) joins nothing."""
    moe = dict(experts=4, top_k=2)
    _, _, kernels = run("gpt2-small", "train", layers=1, family="moe", moe={**moe, "kernel": "loop"})
    rows, d, d_ff, experts = 2 * 5 * 2, 32, 64, 4  # pairs = B * S * k; tiny gpt2: d_model 32, d_ff 64
    def joins(kernels, node):
        return [k for k in kernels if k.key[0] == "node" and not k.free and type(k.events[0].node).__name__ == node
                and k.path == "block.0.moe.experts.up"]

    (split,) = joins(kernels, "SplitWithSizesBackward0")
    assert split.read_bytes == split.write_bytes == rows * d * F32
    stacked = sorted(k.write_bytes for k in joins(kernels, "UnbindBackward0"))
    assert stacked == [experts * d_ff * F32, experts * d * d_ff * F32]  # biases, weights
    _, _, grouped = run("gpt2-small", "train", layers=1, family="moe", moe=moe)
    assert not joins(grouped, "SplitWithSizesBackward0") + joins(grouped, "UnbindBackward0")


def test_layout_copies_are_free():
    _, capture, kernels = run("gpt2-small", "train", layers=1, attention_impl="explicit", positions="none")
    assert sum(e.op == "clone" for e in capture.events) >= 3  # reshape copies of strided q, o, dO
    assert all(k.free for k in kernels if all(e.op == "clone" for e in k.events))


def test_recompute_drops_layernorm_statistics():
    """native_layer_norm writes mean and rstd for its backward; flopsim's kernels recompute them."""
    _, capture, kernels = run("gpt2-small", "train", layers=1)
    ln = next(e for e in capture.events if e.op == "native_layer_norm" and e.path == "block.0.norm1")
    assert len(ln.outputs) == 3
    (fwd,) = _kernel(kernels, "block.0.norm1", "fwd", "op")
    (bwd,) = _kernel(kernels, "block.0.norm1", "bwd", "node")
    rows, d = 10, 32
    assert fwd.write_bytes == rows * d * F32  # y only
    assert bwd.read_bytes == (2 * rows * d + 2 * d) * F32  # grad, x, weight, bias: no statistics


def test_random_dropout_mask_is_kept_not_recomputed():
    """native_dropout's bool mask is read only by its own backward -- the case RECOMPUTE
    drops -- but a random draw cannot be remade from x: written forward, read backward."""
    _, capture, kernels = run("gpt2-small", "train", layers=1, positions="none", dropout={"hidden": 0.1})
    drop = next(e for e in capture.events if e.op == "native_dropout" and e.path == "embed")
    assert len(drop.outputs) == 2  # the output and the mask
    (fwd,) = [k for k in kernels if k.path == "embed" and k.pass_ == "fwd" and k.events[0].op == "native_dropout"]
    (bwd,) = [k for k in kernels if k.path == "embed" and k.pass_ == "bwd"
              and k.events[0].op == "native_dropout_backward"]
    values = 2 * 5 * 32
    assert fwd.read_bytes == values * F32 and fwd.write_bytes == values * (F32 + 1)  # x; output and mask
    assert bwd.read_bytes == values * (F32 + 1) and bwd.write_bytes == values * F32  # grad and mask; grad x
    assert fwd.flops == bwd.flops == 2 * values


def test_dead_outputs_of_multi_output_ops_are_not_written():
    _, capture, kernels = run("gpt2-small", "forward", layers=1)
    sdpa = next(k for k in kernels if k.events[0].op.startswith("_scaled_dot_product"))
    assert len(sdpa.events[0].outputs) == 2  # out and the log-sum-exp
    assert sdpa.write_bytes == 2 * 5 * 32 * F32  # out only


def test_init_zero_fill_is_free_and_read_free():
    """MoE's combine adds rows into new_zeros: the fill and the reads of its zeros are free."""
    spec = tiny("gpt2-small", family="moe", layers=1, moe=dict(experts=4, top_k=2))
    capture = count_bytes(prepare_phase(build_reference(spec), spec, "forward", 2, 5))
    kernels = build_kernels(capture)
    combine = next(k for k in kernels if k.events[0].op == "index_add")
    assert any(e.op == "new_zeros" for e in capture.events)
    pairs = 2 * 5 * 2
    assert combine.read_bytes == pairs * I64 + pairs * 32 * F32  # index, rows: not the zeros


def test_region_writes_the_table_it_hands_on():
    """Capacity routing's slot table: eager fills it with a constant then scatters the
    kept pairs (a spare slot takes the dropped); the kernel writes the E x C table."""
    spec = tiny("gpt2-small", family="moe", layers=1, moe=dict(experts=4, top_k=2, capacity_factor=0.5))
    capture = count_bytes(prepare_phase(build_reference(spec), spec, "forward", 2, 7))
    (slots,) = [k for k in build_kernels(capture) if k.region is not None and k.region.kind == "slots"]
    pairs, table = 2 * 7 * 2, 4 * 4  # C = ceil(0.5 * 2 * 14 / 4) = 4
    assert sum(w.nbytes for w in slots.events[-1].writes) < table * F32  # eager's partial writes
    assert slots.read_bytes == pairs * (I64 + F32) and slots.write_bytes == table * (I64 + F32)


def test_every_expert_weight_is_read_outside_decode():
    """The reference's grouped GEMM runs every expert, one with no row included."""
    spec = tiny("gpt2-small", family="moe", layers=1, moe=dict(experts=4, top_k=1))
    capture = count_bytes(prepare_phase(build_reference(spec), spec, "forward", 1, 1))  # 1 row, 4 experts
    (up,) = [k for k in build_kernels(capture) if k.path == "block.0.moe.experts.up" and k.region is not None]
    assert sum(e.op == "addmm" for e in up.events) == 4
    assert up.read_bytes == 32 * F32 + 4 * (32 * 64 + 64) * F32  # the row, every expert's W and b


def test_fused_marks_nothing_outside_a_counter():
    """Outside a counter `fused` records nothing and `take` makes no alias (the reference
    is timed without the marker's cost); inside one it records the region's elements."""
    t = torch.ones(3)
    with fused("rope") as region:
        assert region.take(t) is t
        region.basis(t)
    assert not hasattr(region, "elements")
    seen = []

    def marked():
        with fused("rope") as inner:
            inner.basis(inner.take(t))
            seen.append(inner.elements)

    count_bytes(marked)
    assert seen == [3]


@pytest.mark.parametrize("kind", ["rmsnorm", "rope", "gated_act", "softmax", "cross_entropy"])
def test_dense_regions_are_marked(kind):
    _, capture, _ = run("llama-3-8b", "train", kv_heads=2, layers=1, attention_impl="explicit")
    assert any(e.region is not None and e.region.kind == kind for e in capture.events)


def test_fused_adam_moves_28_bytes_per_fp32_parameter_beside_the_gradient_write_convention():
    """torch's fused Adam reads p, g, m, v (16 B) and writes p, m, v (12 B) per fp32
    parameter: flopsim's optimizer op (28 B). The counter sees 32: aten's schema marks
    the gradients mutable, so it charges them a write (4 B) the kernel does not do."""
    from flopsim.torchref.bytes_check import optimizer_bytes

    spec = tiny("gpt2-small")
    measured, predicted = optimizer_bytes(spec)
    params = predicted // 28
    assert predicted == 28 * params
    assert measured == predicted + 4 * params
