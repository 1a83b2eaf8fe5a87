"""`recompute: cheap`: LLaMA's checkpointing (Touvron et al. 2023, section 2.4: "we save the
activations that are expensive to compute, such as the outputs of linear layers"): each block's
norms, elementwise ops but adds, and softmaxes outside the attention core run again in the
backward pass; the products' and attention kernels' outputs are kept.

Each figure is written as its derivation from the model's dimensions or checked against the
op list it is read from (the forward ops' own times)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import one_error_line
from conftest import run_cli as run

import flopsim
from flopsim.count import count
from flopsim.families import build_ops
from flopsim.parallel.layout import make_layout
from flopsim.planning import plan_training

LLAMA = flopsim.load_model("llama-2-7b")  # d 4096, 32 heads of 128 (no GQA), d_ff 11008, 32 blocks
EAGER = dict(norm_impl="fp32_unfused", rope_impl="complex_fp32", act_impl="unfused")  # Meta's model.py
B, S = 2, 256


def _cheap_names(spec) -> set:
    """The forward ops of the blocks that cheap recomputation runs again (`Op.cheap`)."""
    return {o.name for o in build_ops(spec, "train") if o.pass_ == "fwd" and 0 <= o.layer < spec.layers and o.cheap}


def test_cheap_ops_are_the_norms_rope_and_activation_of_a_llama_block():
    block = [o for o in build_ops(LLAMA, "train") if o.pass_ == "fwd" and o.layer == 0]
    assert [o.name for o in block if o.cheap] == ["block.0.norm1", "block.0.attn.rope", "block.0.norm2",
                                                  "block.0.mlp.act"]
    # the adds (the residual stream, which the next norm keeps as its input) and the products are kept
    assert not any(o.cheap for o in block if o.kind in ("matmul", "attention") or o.variant == "add")


def test_an_explicit_attentions_softmax_and_dropout_stay_in_the_attention_core():
    spec = flopsim.load_model("gpt2-small").with_changes(attention_impl="explicit",
                                                         dropout={"attention": 0.1, "hidden": 0.1})
    block = [o for o in build_ops(spec, "train") if o.pass_ == "fwd" and o.layer == 0]
    assert sorted(o.name for o in block if o.attention_core) == ["block.0.attn.core", "block.0.attn.core.dropout"]
    assert not any(o.cheap for o in block if o.attention_core)
    # the hidden dropouts (before each residual add) are cheap: their masks come again from the RNG
    assert {"block.0.attn_dropout", "block.0.mlp_dropout"} <= {o.name for o in block if o.cheap}


@pytest.mark.parametrize("changes", [{}, EAGER], ids=["fused", "eager"])
def test_memory_keeps_all_but_the_cheap_ops_and_rebuilds_one_block(changes):
    """none - cheap = (L - 1) blocks of what the cheap ops keep (one block's is rebuilt at a time).
    Fused kernels, per token a block: two norm outputs 2 * d * 2 bytes, RoPE's rotated q and k
    2 * d * 2, the activation's output d_ff * 2. Meta's eager forms keep what autograd saves
    (flopsim.ops.primitives): the fp32 norm its output and n in bf16, h = x in fp32 and a row's
    rsqrt; the activation act(gate) besides the product; RoPE its output."""
    spec = LLAMA.with_changes(**changes)
    d, d_ff, blocks = spec.d_model, spec.d_ff, spec.layers
    acts = {rc: flopsim.memory(spec, phase="train", batch=B, seq=S, recompute=rc).activations_bytes
            for rc in ("none", "cheap")}
    if not changes:
        per_token = 2 * (d * 2) + 2 * d * 2 + d_ff * 2  # norms + rope + act
    else:
        norm = 2 * d * 2 + 4 * d + 4  # y and n in bf16, h in fp32, r
        per_token = 2 * norm + 2 * d * 2 + 2 * d_ff * 2  # norms + rope + silu(gate) and the product
    assert acts["none"] - acts["cheap"] == (blocks - 1) * per_token * B * S


def test_the_sharded_list_reruns_exactly_the_cheap_ops_before_each_backward():
    plain = count(LLAMA, batch=B, seq=S, phase="train", layout=make_layout(LLAMA, "train", tp=2))
    cheap = count(LLAMA, batch=B, seq=S, phase="train", layout=make_layout(LLAMA, "train", tp=2, recompute="cheap"))
    again = [o for o in cheap.ops if o.name.endswith(".recompute")]
    names = _cheap_names(LLAMA)
    expected = [o for o in plain.ops if o.pass_ == "fwd" and o.name in names]
    assert len(expected) == 4 * LLAMA.layers
    assert sorted(o.name for o in again) == sorted(f"{o.name}.recompute" for o in expected)
    assert {o.kind for o in again} == {"norm", "elementwise"}
    assert cheap.flops == plain.flops  # no matrix product runs twice
    assert cheap.bytes - plain.bytes == sum(o.bytes for o in expected)


def test_plan_reruns_the_cheap_ops_forward_time_and_names_the_mode():
    spec = LLAMA.with_changes(**EAGER)
    kw = dict(gpus=1, tokens=1e8, seq=1024, global_batch=8, micro_batch=1)
    cheap = plan_training(spec, "a100-80gb", recompute="cheap", **kw)
    p = flopsim.predict(spec, "a100-80gb", phase="train", batch=1, seq=1024)
    names = _cheap_names(spec)
    block_cheap = sum(op.time_s for op in p.ops if op.pass_ == "fwd" and op.name in names)
    assert cheap.compute["recompute_s_per_microbatch"] == pytest.approx(block_cheap, rel=1e-9)
    assert cheap.config["recompute"] == "cheap"
    none = plan_training(spec, "a100-80gb", recompute="none", **kw)
    assert cheap.memory["activations_bytes"] < none.memory["activations_bytes"]
    assert "norms' and elementwise ops' forward again" in {part["how"] for part in cheap.time_parts()}


def test_cli_takes_cheap_and_refuses_what_is_not_a_mode():
    r = run("memory", "llama-2-7b", "--phase", "train", "--batch", 1, "--seq", 512, "--recompute", "cheap",
            "--format", "json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["recompute"] == "cheap"
    assert data["activations_bytes"] == int(flopsim.memory("llama-2-7b", phase="train", batch=1, seq=512,
                                                           recompute="cheap").activations_bytes)
    r = run("plan", "train", "llama-2-7b", "-H", "a100-80gb", "--gpus", 8, "--tokens", "1e9", "--recompute", "cheap")
    assert r.exit_code == 0, r.output
    assert "recompute cheap" in r.output
    r = run("plan", "train", "llama-2-7b", "-H", "a100-80gb", "--gpus", 8, "--tokens", "1e9", "--recompute", "some")
    assert r.exit_code == 2
    assert "recompute" in one_error_line(r) and "cheap" in one_error_line(r)


# -- against torch's own selective checkpointing ---------------------------------------
TINY = flopsim.load_model("llama-3-8b").with_changes(heads=4, kv_heads=2, d_model=32, d_ff=48, layers=2, dtype="fp32")


def _kept_by_llama(op) -> bool:
    """LLaMA's rule as a torch selective-checkpoint policy: keep the matrix products', the
    attention kernel's and the adds' outputs; everything else is recomputed."""
    name = str(op)  # aten.mm.default, aten._scaled_dot_product_flash_attention_for_cpu.default, ...
    return "mm" in name.split(".")[1] or "scaled_dot_product" in name or name == "aten.add.Tensor"


def _backward_ops(spec, checkpointed: bool):
    """(module, aten op) -> count of the non-view ops that run during the backward pass of the
    torch reference's train step, each charged to the innermost module whose forward runs it
    (a recomputation runs the blocks' forward again inside the backward)."""
    import torch
    import torch.nn.modules.module as module_hooks
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.checkpoint import (CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts,
                                        set_checkpoint_early_stop)

    from flopsim.torchref.model import build_reference, prepare_phase

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if _kept_by_llama(op) else CheckpointPolicy.PREFER_RECOMPUTE

    model = build_reference(spec)
    if checkpointed:
        for blk in model.block:
            blk.forward = lambda x, state, fwd=blk.forward: checkpoint(
                fwd, x, state, use_reentrant=False,
                context_fn=lambda: create_selective_checkpoint_contexts(policy))
    names = {id(m): n for n, m in model.named_modules()}
    stack: list = []

    class Backward(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if torch._C._current_autograd_node() is not None and not func.is_view \
                    and func.__name__ != "_unsafe_view.default":
                self.ops[(names[stack[-1]] if stack else "", str(func))] += 1
            return func(*args, **(kwargs or {}))

    step = prepare_phase(model, spec, "train", 2, 16, optimizer="none")
    pre = module_hooks.register_module_forward_pre_hook(lambda m, a: stack.append(id(m)))
    post = module_hooks.register_module_forward_hook(lambda m, a, o: stack.pop() and None)
    try:
        with set_checkpoint_early_stop(False), Backward() as mode:
            step()
    finally:
        pre.remove()
        post.remove()
    return mode.ops


@pytest.mark.parametrize("changes", [{}, {"norm_impl": "fp32_unfused", "act_impl": "unfused"}],
                         ids=["fused", "eager"])
def test_torchs_selective_checkpointing_with_llamas_rule_reruns_the_cheap_ops_modules(changes):
    """torch.utils.checkpoint's selective checkpointing, keeping what LLaMA keeps, reruns in the
    backward pass ops of exactly the modules of flopsim's cheap ops (each block's norms, its
    attention module's RoPE, its MLP's activation), and no matrix product or attention kernel."""
    spec = TINY.with_changes(**changes)
    again = _backward_ops(spec, checkpointed=True) - _backward_ops(spec, checkpointed=False)
    assert again and not any(_kept_by_llama(op) for _, op in again)
    modules = {o.module for o in build_ops(spec, "train") if o.pass_ == "fwd" and 0 <= o.layer < spec.layers
               and o.cheap}  # recomputation runs the blocks again, not the final norm
    assert {module for module, _ in again} == modules == {f"block.{i}.{m}" for i in range(spec.layers)
                                                          for m in ("norm1", "attn", "norm2", "mlp")}


def test_metas_published_rows_run_metas_kernels_and_checkpointing():
    """Every training row of the LLaMA paper and the Llama 2 model card runs what Meta's released
    llama/model.py writes (fp32 eager RMSNorm, complex fp32 RoPE, unfused SwiGLU) and the paper's
    checkpointing (`recompute: cheap`), each note saying where that was read."""
    from flopsim.published import load_published

    rows = [r for r in load_published().rows if r.source in ("llama1-paper", "llama2-model-card")]
    assert len(rows) == 7
    for row in rows:
        assert {k: row.changes.get(k) for k in EAGER} == EAGER, row.id
        assert row.parallel.recompute == "cheap", row.id
        assert "llama/model.py" in row.notes and "recompute cheap" in row.notes, row.id
