"""Architecture options of today's dense and MoE models (flopsim.families.dense): per-head
q/k norms (Qwen3, Gemma 3, OLMo 2), sandwich norms and scaled embeddings (Gemma 2/3), logit
soft-capping of the attention scores and of the LM head (Gemma 2), attention sinks
(GPT-OSS) and q/k/v biases alone (`qkv_bias`: Qwen2): exact against the torch reference in FLOPs and parameters in every phase, and
in bytes and elementwise FLOPs as stated below; presets' parameters derived term by term."""

from __future__ import annotations

import pytest

from conftest import assert_exact
from flopsim.count import count
from flopsim.errors import SpecError
from flopsim.spec import load_model

SHAPES = {"forward": (2, 5, None), "train": (2, 5, None), "prefill": (2, 6, None), "decode": (2, 1, 9)}
OPTIONS = {
    "qk-norm": dict(qk_norm=True),
    "sandwich-scaled": dict(sandwich_norms=True, scale_embeddings=True),
    "softcap": dict(attention_impl="explicit", softcap=dict(attention=50.0, logits=30.0)),
    "softcap-windows": dict(attention_impl="explicit", softcap=dict(attention=50.0),
                            sliding_window=dict(size=3, global_every=2)),
    "sinks-windows": dict(attention_impl="explicit", attention_sinks=True, sliding_window=dict(size=4, global_every=2)),
    "gemma2-like": dict(attention_impl="explicit", sandwich_norms=True, scale_embeddings=True,
                        softcap=dict(attention=50.0, logits=30.0), tied_embeddings=True,
                        activation="gelu_tanh", sliding_window=dict(size=4, global_every=2)),
    "moe-qk-norm-sandwich": dict(family="moe", moe=dict(experts=4, top_k=2, d_expert=32), qk_norm=True,
                                 sandwich_norms=True),
    "qwen2-qkv-bias": dict(bias=False, qkv_bias=True),
    "moe-qkv-bias": dict(family="moe", moe=dict(experts=4, top_k=2, d_expert=32), bias=False, qkv_bias=True),
    "qkv-without-bias": dict(bias=True, qkv_bias=False, norm="layernorm"),
    "clamped-swiglu": dict(activation="silu_clamped"),  # GPT-OSS's gated unit on a dense model
    "gpt-oss-like": dict(family="moe", bias=True, attention_impl="explicit", attention_sinks=True, activation="silu_clamped",
                         sliding_window=dict(size=4, global_every=2),
                         moe=dict(experts=4, top_k=2, d_expert=32, normalize=True, router_bias=True)),
}
# bytes and elementwise FLOPs: exact everywhere but the sinks' train step, whose eager
# softmax-with-a-sink decomposition in the reference has a backward of its own
BYTES_EXACT = [(name, phase) for name in OPTIONS for phase in SHAPES
               if not (name == "sinks-windows" and phase == "train") and not name.startswith(("moe", "gpt-oss"))]


def small(name):
    return load_model("llama-3-8b").with_changes(layers=2, d_model=64, heads=4, kv_heads=2, d_ff=128, vocab=101,
                                                 max_seq=64, **OPTIONS[name])


@pytest.mark.parametrize("name, phase", [(n, p) for n in OPTIONS for p in SHAPES])
def test_exact_flops_and_parameters(name, phase):
    pytest.importorskip("torch")
    batch, seq, context = SHAPES[phase]
    assert_exact(small(name), phase, batch, seq, context)


@pytest.mark.parametrize("name, phase", BYTES_EXACT)
def test_exact_bytes_and_elementwise_flops(name, phase):
    pytest.importorskip("torch")
    from flopsim.torchref.bytes_check import compare_bytes

    batch, seq, context = SHAPES[phase]
    cmp = compare_bytes(small(name), phase, batch, seq, context)
    assert cmp.exact, cmp.describe()


def test_option_parameters():
    """q/k norms: 2 * d_head per layer; sandwich norms: 2 * d_model per layer (RMSNorm
    weights); sinks: heads per layer."""
    base = small("qk-norm").with_changes(qk_norm=False)
    p0 = count(base, seq=4).params
    assert count(base.with_changes(qk_norm=True), seq=4).params - p0 == 2 * 2 * 16
    assert count(base.with_changes(sandwich_norms=True), seq=4).params - p0 == 2 * 2 * 64
    assert count(base.with_changes(attention_sinks=True, attention_impl="explicit"), seq=4).params - p0 == 2 * 4
    # q/k/v biases alone: (heads + 2 kv_heads) * d_head per layer; bias adds are no products
    biased = base.with_changes(qkv_bias=True)
    assert count(biased, seq=4).params - p0 == 2 * (4 + 2 * 2) * 16
    assert count(biased, seq=4, phase="train").flops == count(base, seq=4, phase="train").flops
    assert base.qkv_has_bias is False and biased.qkv_has_bias is True


def test_logit_softcap_reads_and_writes_the_logits():
    spec = small("softcap")
    ops = {op.name: op for op in count(spec, phase="forward", batch=2, seq=5).ops}
    cap = ops["head.softcap"]
    assert cap.act_read_bytes == cap.act_write_bytes == 2 * 5 * 101 * 2  # B * S * vocab, bf16
    assert cap.other_flops == 6 * 2 * 5 * 101


@pytest.mark.parametrize("changes, expect", [
    (dict(sandwich_norms=True, norm_position="post"), "sandwich_norms"),
    (dict(family="mod", mod=dict(capacity=0.5), qk_norm=True), "qk_norm: modelled for dense and moe"),
    (dict(softcap=dict(attention=0)), "softcap.attention"),
    (dict(softcap=dict(logits=-1.0)), "softcap.logits"),
    (dict(qkv_bias=True, sparse_qkv=dict(modules=4)), "qkv_bias: the q/k/v projection of standard attention"),
    (dict(qkv_bias=1), "qkv_bias"),
])
def test_bad_options_are_one_line(changes, expect):
    with pytest.raises(SpecError) as err:
        load_model("llama-3-8b").with_changes(**changes)
    assert expect in str(err.value) and "\n" not in str(err.value)


def gemma_params(*, layers, d, heads, kv_heads, d_head, d_ff, vocab, qk_norm):
    """Per block: q, k, v, o products (no biases), the gated FFN (gate, up, down), four
    RMSNorms (before and after attention and the FFN) and, with q/k norms, two of d_head;
    the tied embedding table and the final norm."""
    attention = d * heads * d_head + 2 * d * kv_heads * d_head + heads * d_head * d
    block = attention + 3 * d * d_ff + 4 * d + (2 * d_head if qk_norm else 0)
    return vocab * d + layers * block + d


def test_gemma_2_9b_parameters():
    """Gemma 2 9B (arXiv 2408.00118; the model card's 9.24B)."""
    expected = gemma_params(layers=42, d=3584, heads=16, kv_heads=8, d_head=256, d_ff=14336, vocab=256000,
                            qk_norm=False)
    assert count(load_model("gemma-2-9b"), seq=16).params == expected == 9_241_705_984


def test_gemma_3_27b_parameters():
    """Gemma 3 27B's language model (arXiv 2503.19786; the card's 27.4B adds a 417M vision encoder)."""
    expected = gemma_params(layers=62, d=5376, heads=32, kv_heads=16, d_head=128, d_ff=21504, vocab=262208,
                            qk_norm=True)
    assert count(load_model("gemma-3-27b"), seq=16).params == expected == 27_009_346_304
    assert round((expected + 417e6) / 1e8) / 10 == 27.4


def test_gemma_3_decode_reads_local_windows():
    """At a 32k context, Gemma 3's 52 local layers read min(T, 1024) keys and its 10 global
    ones all T: the KV bytes of one decode step, 2 (K, V) * 16 heads * 128 * 2 bytes a key."""
    spec = load_model("gemma-3-27b")
    t = 32768
    r = count(spec, phase="decode", batch=1, context=t)
    per_key = 2 * 16 * 128 * 2
    local, global_ = 62 - 62 // 6, 62 // 6
    assert r.total("kv_read_bytes") == per_key * (local * 1024 + global_ * t)


def test_gpt_oss_20b_parameters_and_mxfp4_weights():
    """gpt-oss-20b (the gpt-oss model card, table 1: 20.91B total, 3.61B active, a 12.8 GiB
    checkpoint). Per block: q, k, v, o with biases and 64 sink logits; the router with a
    bias; 32 experts, each gate_up (2880 x 5760 + 5760) and down (2880 x 2880 + 2880);
    two RMSNorms. Untied embeddings, the final norm. MXFP4 experts: 4 bits a weight and a
    1-byte scale per 32 (biases bf16); everything else bf16."""
    d, heads, kv, dh, E, L, V = 2880, 64, 8, 64, 32, 24, 201088
    attention = d * heads * dh + heads * dh + 2 * (d * kv * dh + kv * dh) + heads * dh * d + d + heads
    router = d * E + E
    expert_weights = E * (d * 2 * d + d * d)
    expert_biases = E * (2 * d + d)
    block = attention + router + expert_weights + expert_biases + 2 * d
    expected = L * block + 2 * V * d + d
    spec = load_model("gpt-oss-20b")
    r = count(spec, seq=16)
    assert r.params == expected == 20_914_757_184
    assert round(r.active_params(lookups=False) / 1e7) / 100 == 3.61
    from flopsim.memory import MemoryModel

    stored = (expected - L * expert_weights) * 2 + L * expert_weights * (4 / 8 + 1 / 32)
    weights = MemoryModel(spec, "decode").evaluate(1, 1, 16)["weights_bytes"]
    assert weights == stored
    assert round(weights / 2 ** 30, 1) == 12.8
