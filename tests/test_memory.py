"""Memory arithmetic, each check with its derivation written out
(flopsim/memory.py and flopsim/ops/optimizer.py state the conventions)."""

from __future__ import annotations

import pytest

from flopsim.hardware import load_hardware
from flopsim.memory import MemoryModel, memory
from flopsim.ops.optimizer import optimizer_update, state_bytes_per_param, update_bytes_per_param
from flopsim.spec import load_model

GPT2_PARAMS = 124_439_808  # README: gpt2-small


# -- optimizer bytes per parameter ------------------------------------------------
def test_adam_bytes_per_parameter():
    # mixed precision (bf16, w = 2): state = m + v (fp32, 4 + 4) + fp32 master (4) = 12
    assert state_bytes_per_param("adam", 2) == 12
    # fp32 weights are their own master copy: m + v = 8
    assert state_bytes_per_param("adam", 4) == 8
    assert state_bytes_per_param("adam", 2, master_weights=False) == 8
    assert state_bytes_per_param("sgd", 2) == 4 + 4 and state_bytes_per_param("none", 2) == 0
    # one update step, bf16: read grad 2 + read/write master 8 + read/write m, v 16 + write bf16 copy 2 = 28
    assert update_bytes_per_param("adam", 2) == 28
    # fp32: read grad 4 + read/write weights 8 + read/write m, v 16 = 28
    assert update_bytes_per_param("adam", 4) == 28
    # fp32 gradients in a bf16 model: 4 + 8 + 16 + 2 = 30
    assert update_bytes_per_param("adam", 2, grad_bytes=4) == 30
    (op,) = optimizer_update(1000, weight_bytes=2, layer=3)
    assert (op.kind, int(op.weight_bytes), int(op.other_flops), int(op.flops)) == ("optimizer", 28_000, 11_000, 0)
    assert optimizer_update(1000, weight_bytes=2, layer=3, optimizer="none") == []


def test_train_weights_gradients_state_are_16_bytes_per_parameter():
    m = memory("gpt2-small", phase="train", batch=1, seq=128)
    assert m.params == GPT2_PARAMS
    assert m.weights_bytes == 2 * GPT2_PARAMS
    assert m.gradients_bytes == 2 * GPT2_PARAMS
    assert m.optimizer_bytes == 12 * GPT2_PARAMS
    assert m.kv_cache_bytes == 0
    fp32_grads = memory("gpt2-small", phase="train", batch=1, seq=128, grad_bytes=4)
    assert fp32_grads.gradients_bytes == 4 * GPT2_PARAMS
    sgd = memory("gpt2-small", phase="train", batch=1, seq=128, optimizer="sgd")
    assert sgd.optimizer_bytes == 8 * GPT2_PARAMS
    inference = memory("gpt2-small", phase="forward", batch=1, seq=128)
    assert inference.gradients_bytes == inference.optimizer_bytes == 0


# -- activations ---------------------------------------------------------------------
def _gpt2_activation_terms(b, s, h=768, vocab=50257, layers=12):
    """gpt2-small, bf16 (2 bytes), fused attention; what forward ops that have a
    backward op write, per layer, in elements of s*b*h:
      norm1 1, qkv 3, attention output 1, out-proj 1, residual add 1,
      norm2 1, up 4, gelu 4, down 1, residual add 1          = 18 -> 36 s*b*h bytes
    embeddings: tokens 1, positions 1, their sum 1            =  3 ->  6 s*b*h bytes
    head: final norm 1 (2 s*b*h bytes), logits s*b*V (2 bytes each); the loss
          saves nothing (its row statistics are recomputed in backward)."""
    sbh = s * b * h
    per_layer = 36 * sbh
    embed = 6 * sbh
    head = 2 * sbh + 2 * s * b * vocab
    return per_layer, embed, head, layers


def test_train_activations_without_recomputation():
    b, s = 2, 128
    per_layer, embed, head, layers = _gpt2_activation_terms(b, s)
    m = memory("gpt2-small", phase="train", batch=b, seq=s)
    assert m.activations_bytes == pytest.approx(layers * per_layer + embed + head, rel=1e-12)


def test_train_activations_with_full_recomputation():
    """A checkpoint per block keeps each block's input (s*b*h values, 2 bytes)
    and rebuilds one block at a time: 12 * 2 s*b*h + 36 s*b*h, plus the
    embeddings and the head, which are not checkpointed."""
    b, s = 2, 128
    per_layer, embed, head, layers = _gpt2_activation_terms(b, s)
    m = memory("gpt2-small", phase="train", batch=b, seq=s, recompute=True)
    sbh = s * b * 768
    assert m.activations_bytes == pytest.approx(layers * 2 * sbh + per_layer + embed + head, rel=1e-12)
    assert m.activations_bytes < memory("gpt2-small", phase="train", batch=b, seq=s).activations_bytes


def test_inference_activations_are_the_largest_op_working_set():
    """forward of gpt2-small at b=1, s=64: the largest op is the LM head, reading
    s*h and writing s*V values (2 bytes each)."""
    m = memory("gpt2-small", phase="forward", batch=1, seq=64)
    assert m.activations_bytes == 2 * 64 * 768 + 2 * 64 * 50257


# -- KV cache ---------------------------------------------------------------------------
def test_kv_cache_of_llama_3_8b():
    """keys and values (2) x 32 layers x 8 KV heads x 128 dims x 2 bytes = 131,072
    bytes per token per sequence: 2048 tokens x 4 sequences = 1 GiB."""
    per_token = 2 * 32 * 8 * 128 * 2
    decode = memory("llama-3-8b", phase="decode", batch=4, context=2048)
    assert decode.kv_cache_bytes == per_token * 2048 * 4
    prefill = memory("llama-3-8b", phase="prefill", batch=4, seq=2048)
    assert prefill.kv_cache_bytes == per_token * 2048 * 4
    cached_prefix = memory("llama-3-8b", phase="prefill", batch=1, seq=512, context=4096)
    assert cached_prefix.kv_cache_bytes == per_token * 4096
    assert decode.weights_bytes == 2 * 8_030_261_248


# -- fitting a device ----------------------------------------------------------------------
def test_largest_batch_and_context_that_fit():
    hw = load_hardware("h100-sxm")
    m = memory("llama-3-8b", phase="decode", batch=1, context=4096, hw="h100-sxm")
    assert m.fits and m.capacity_bytes == 80e9
    # weights 16.06 GB + 0.537 GB of KV cache per sequence at 4096 tokens: (80 - 16.06) / 0.537 = 119
    assert m.max_batch == 119
    at = memory("llama-3-8b", phase="decode", batch=m.max_batch, context=4096)
    over = memory("llama-3-8b", phase="decode", batch=m.max_batch + 1, context=4096)
    assert at.total_bytes <= hw.memory_capacity_bytes < over.total_bytes
    ctx = m.max_context
    assert memory("llama-3-8b", phase="decode", batch=1, context=ctx).total_bytes <= 80e9
    assert memory("llama-3-8b", phase="decode", batch=1, context=ctx + 1).total_bytes > 80e9


def test_train_that_does_not_fit():
    """llama-3-8b with Adam needs 16 bytes x 8.03e9 parameters = 128 GB before activations."""
    m = memory("llama-3-8b", phase="train", batch=1, seq=2048, hw="h100-sxm")
    assert not m.fits and m.max_batch == 0 and m.max_context == 0
    assert memory("llama-3-8b", phase="train", batch=1, seq=2048, hw="mi300x").fits


def test_learned_positions_cap_the_context():
    m = memory("gpt2-small", phase="train", batch=1, seq=128, hw="h100-sxm")
    assert m.max_context == 1024 and any("max_seq" in n for n in m.notes)
    assert m.max_batch > 100


def test_memory_model_reads_the_same_op_lists():
    spec = load_model("decoder-220m")
    model = MemoryModel(spec, "train")
    from flopsim.count import count

    assert model.params == count(spec, batch=1, seq=8, phase="train").params
    d = model.evaluate(3, 256, 256)
    assert d["total_bytes"] == pytest.approx(sum(d[k] for k in ("weights_bytes", "gradients_bytes", "optimizer_bytes",
                                                                  "activations_bytes", "kv_cache_bytes")))


def test_conditional_kv_cache_follows_the_family_ops():
    """MoD: the family's ops decide what a routed block writes to the cache; memory
    only scales kv_write_bytes by the context, so the MoD model never needs more
    cache than its dense baseline."""
    dense = memory("decoder-220m", phase="decode", batch=8, context=2048)
    mod = memory("decoder-220m-mod", phase="decode", batch=8, context=2048)
    assert 0 < mod.kv_cache_bytes <= dense.kv_cache_bytes
    assert mod.weights_bytes == pytest.approx(dense.weights_bytes, rel=1e-3)


def test_selective_recomputation_drops_the_attention_scores():
    """Korthikanti et al. 2022: selective recomputation keeps no attention scores. Explicit
    attention writes scores and probabilities, 2 * B * H * S * S values a layer (bf16), which
    selective recomputation does not keep; a fused kernel writes none, so it changes nothing."""
    fused = load_model("gpt2-small")  # 12 layers, 12 heads, bf16, fused attention
    explicit = fused.with_changes(attention_impl="explicit")
    b, s = 2, 128

    def act(spec, rc):
        return memory(spec, phase="train", batch=b, seq=s, recompute=rc).activations_bytes

    assert act(explicit, "none") - act(explicit, "selective") == 12 * 2 * b * 12 * s * s * 2
    assert act(explicit, "selective") == act(fused, "none") == act(fused, "selective")
    assert act(explicit, "full") < act(explicit, "selective")


@pytest.mark.parametrize("dtype,kept", [("bf16", 4), ("fp32", 0)])
def test_fp32_unfused_loss_keeps_its_fp32_softmax_once(dtype, kept):
    """Megatron's fp32 loss (loss_impl fp32_unfused) keeps one fp32 copy of the logits
    for backward (the softmax, written in place over the cast's buffer): 4 bytes a logit
    more than the fused loss in bf16, nothing more in fp32 (the logits themselves, which
    the LM head's output already counts). The in-place steps add nothing."""
    b, s, vocab = 2, 128, 50257
    spec = load_model("gpt2-small").with_changes(dtype=dtype)
    fused = memory(spec, phase="train", batch=b, seq=s).activations_bytes
    unfused = memory(spec.with_changes(loss_impl="fp32_unfused"), phase="train", batch=b, seq=s).activations_bytes
    assert unfused - fused == kept * b * s * vocab
