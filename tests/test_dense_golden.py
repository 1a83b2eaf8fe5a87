"""Golden numbers from real models, each written as its derivation or
checked against a published figure or an independent formula."""

from __future__ import annotations

import sympy as sp

import flopsim
from flopsim.count import count, formula
from flopsim.ops.symbols import B, S


def gpt2_small_params():
    V, P, d, L, ff = 50257, 1024, 768, 12, 3072
    per_block = (
        2 * d  # ln_1
        + d * 3 * d + 3 * d  # c_attn
        + d * d + d  # attn c_proj
        + 2 * d  # ln_2
        + d * ff + ff  # mlp c_fc
        + ff * d + d  # mlp c_proj
    )
    return V * d + P * d + L * per_block + 2 * d  # wte, wpe, blocks, ln_f (head tied)


def test_gpt2_small_params_and_forward_flops():
    r = count("gpt2-small", batch=1, seq=1024, phase="forward")
    assert r.params == gpt2_small_params() == 124_439_808  # HF gpt2
    s, d, L, ff, V, H, dh = 1024, 768, 12, 3072, 50257, 12, 64
    per_block = (
        2 * s * d * 3 * d  # qkv
        + 2 * 2 * H * s * s * dh  # Q K^T and P V, full S x S
        + 2 * s * d * d  # attention output
        + 2 * 2 * s * d * ff  # MLP up and down
    )
    assert r.flops == L * per_block + 2 * s * d * V == 291_648_307_200


def test_published_parameter_counts():
    # BERT-base BertModel: 109,482,240 (HF bert-base-uncased); classifier 768 * 2 + 2
    assert count("bert-base", seq=128).params == 109_482_240 + 768 * 2 + 2
    # Llama 3 8B: 8,030,261,248 (HF model card / safetensors index)
    d, L, ff, V, kv = 4096, 32, 14336, 128256, 1024
    llama = 2 * V * d + L * (d * (d + 2 * kv) + d * d + 3 * d * ff + 2 * d) + d
    assert count("llama-3-8b", seq=16).params == llama == 8_030_261_248
    # GPT-2 medium: 354,823,168 (HF gpt2-medium)
    assert count("gpt2-medium", seq=16).params == 354_823_168


def matmul_weights(spec):
    """N in PaLM's 6N: elements of every weight matrix a token multiplies by
    (embedding lookups excluded, the LM head included even when tied)."""
    d, H, Hkv, dh, ff = spec.d_model, spec.heads, spec.kv_heads, spec.d_head, spec.d_ff
    per_block = d * (H + 2 * Hkv) * dh + H * dh * d + (3 if spec.ffn == "gated" else 2) * d * ff
    return spec.layers * per_block + d * spec.vocab


def test_train_flops_equal_palm_formula_with_explicit_attention():
    """PaLM (Chowdhery et al. 2022, appendix B): training FLOPs per token =
    6N + 12 L H Q T. With explicit attention (4 backward products) flopsim
    equals it exactly; fused attention recomputes Q K^T in backward, adding
    2 L H Q T per token."""
    for preset in ("gpt2-small", "llama-3-8b"):
        spec = flopsim.load_model(preset).with_changes(attention_impl="explicit")
        b, s = 2, 512
        got = count(spec, batch=b, seq=s, phase="train").flops
        L, H, Q = spec.layers, spec.heads, spec.d_head
        assert got == b * s * (6 * matmul_weights(spec) + 12 * L * H * Q * s)
        fused = count(spec.with_changes(attention_impl="fused"), batch=b, seq=s, phase="train").flops
        assert fused - got == b * s * 2 * L * H * Q * s


def test_forward_formula_is_kaplan_style_polynomial():
    """Symbolic forward FLOPs = 2 N B S + 4 L H d_head B S^2 (Kaplan et al. 2020 with both
    attention products)."""
    spec = flopsim.load_model("llama-3-8b")
    expr = formula(spec, phase="forward")
    L, H, dh = spec.layers, spec.heads, spec.d_head
    assert sp.expand(expr - (2 * matmul_weights(spec) * B * S + 4 * L * H * dh * B * S**2)) == 0


def test_decode_flops_and_kv_cache_bytes():
    spec = flopsim.load_model("llama-3-8b")
    b, t = 4, 4096
    r = count(spec, batch=b, seq=1, context=t, phase="decode")
    L, H, Hkv, dh, w = spec.layers, spec.heads, spec.kv_heads, spec.d_head, 2
    assert r.flops == b * (2 * matmul_weights(spec) + 4 * L * H * dh * t)
    kv_read = sum(op.kv_read_bytes for op in r.ops)
    kv_write = sum(op.kv_write_bytes for op in r.ops)
    assert kv_read == L * 2 * b * t * Hkv * dh * w  # keys and values of T tokens, every layer
    assert kv_write == L * 2 * b * 1 * Hkv * dh * w  # the new token's keys and values
    # every weight matrix is read once per step; the token embedding only b rows
    d = spec.d_model
    weights = sum(op.weight_bytes for op in r.ops)
    assert weights == w * (matmul_weights(spec) + (2 * L + 1) * d + b * d)


def test_prefill_head_runs_on_last_position_only():
    spec = flopsim.load_model("gpt2-small")
    fwd = count(spec, batch=2, seq=100, phase="forward")
    pre = count(spec, batch=2, seq=100, phase="prefill")
    head = 2 * spec.d_model * spec.vocab
    assert fwd.flops - pre.flops == 2 * 100 * head - 2 * head


def test_causal_flops_count_the_triangle():
    spec = flopsim.load_model("gpt2-small")
    b, s = 1, 1024
    r = count(spec, batch=b, seq=s, phase="forward")
    L, H, dh = spec.layers, spec.heads, spec.d_head
    full = 4 * b * L * H * dh * s * s
    triangle = 4 * b * L * H * dh * (s * (s + 1) // 2)
    assert r.flops - r.causal_flops == full - triangle
    enc = count("bert-base", batch=1, seq=128, phase="forward")
    assert enc.flops == enc.causal_flops  # encoders attend everywhere


def test_symbolic_and_concrete_ops_agree():
    spec = flopsim.load_model("gpt2-small")
    from flopsim.families import build_ops
    from flopsim.ops.symbols import Dims

    subs = Dims.of(spec, symbolic=True).substitutions()
    for phase in ("forward", "train", "prefill", "decode"):
        concrete = build_ops(spec, phase)
        symbolic = build_ops(spec, phase, symbolic=True)
        assert [o.key for o in concrete] == [o.key for o in symbolic]
        for a, b in zip(concrete, symbolic):
            for f in ("flops", "bytes", "params"):
                assert sp.expand(getattr(a, f) - getattr(b, f).xreplace(subs)) == 0, (phase, a.key, f)


def test_per_layer_table_sums_to_total():
    r = count("gpt2-small", batch=2, seq=64, phase="train")
    layers = r.per_layer()
    assert int(layers["flops"].sum()) == r.flops
    assert int(layers["params"].sum()) == r.params
    assert list(layers["part"])[:2] == ["embed", "block.0"] and list(layers["part"])[-1] == "head"
    table = r.table()
    assert set(["name", "layer", "kind", "flops", "bytes"]) <= set(table.columns)
    assert int(table["flops"].sum()) == r.flops


def test_fp32_unfused_loss_bytes_at_bf16():
    """Megatron's fp32 cross-entropy (loss_impl fp32_unfused) on bf16 logits, derived per
    logit (n = rows x vocab) and per row; the oracle checks it at fp32, where the two casts
    vanish (tests/test_bytes_exact.py). Against the fused loss: 52 bytes a logit, not 6."""
    rows, vocab = 2 * 16, 50257  # batch 2 x seq 16, GPT-2's vocabulary
    n = rows * vocab
    fwd = (2 * n + 4 * n  # cast: read bf16, write fp32
           + 4 * n + 4 * rows  # row max
           + 4 * n + 4 * rows + 4 * n  # subtract it in place
           + rows * (8 + 4) + 4 * rows  # pick the targets' logits
           + 4 * n + 4 * n  # exp in place
           + 4 * n + 4 * rows  # row sum
           + 4 * rows + 4 * rows  # log of the sum
           + 2 * 4 * rows + 4 * rows  # minus the pick
           + 4 * n + 4 * rows + 4 * n  # divide by the sum: the softmax
           + 4 * rows)  # mean
    bwd = (4 * rows  # the mean's gradient
           + rows * (8 + 4) + 4 * rows  # one subtracted at each target
           + 4 * n + 4 * rows + 4 * n  # scaled by the rows' gradients in place
           + 4 * n + 2 * n)  # cast back to bf16
    assert fwd + bwd == 52 * n + 80 * rows
    spec = flopsim.load_model("gpt2-small").with_changes(dtype="bf16")
    for impl, total in (("fp32_unfused", fwd + bwd), ("fused", 6 * n + 16 * rows)):
        ops = count(spec.with_changes(loss_impl=impl), batch=2, seq=16, phase="train").ops
        assert sum(o.bytes for o in ops if o.module.startswith("head") and ".loss" in o.name) == total
        assert sum(o.kernels for o in ops if ".loss" in o.name) == (13 if impl == "fp32_unfused" else 2)
