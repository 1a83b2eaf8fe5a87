"""Hugging Face config.json import (flopsim.spec.hf): the shipped configs in
specs/models/hf/ load, their parameter counts equal the published ones where
the architecture is modelled exactly (derived below term by term, or cited),
the differences are exactly the parts flopsim does not model where it is not,
and bad input is one line with exit 2 through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import flopsim
from flopsim.cli import app
from flopsim.count import count  # not flopsim.count: the submodule shadows it once imported
from flopsim.errors import SpecError
from flopsim.spec.hf import convert, hf_to_spec, load_hf_config_with_notes
from flopsim.spec.paths import specs_dir

HF = specs_dir() / "models" / "hf"
runner = CliRunner()


def cfg(name: str) -> dict:
    return json.loads((HF / f"{name}.json").read_text())


def params(spec_or_path) -> int:
    return count(spec_or_path, seq=16).params


# -- parameter-count building blocks (HF module shapes) ----------------------

def llama_like(*, layers, d, heads, kv_heads, d_head, d_ff, vocab, tied=False, bias=False):
    """Embedding, per layer q/k/v/o + gate/up/down + 2 RMSNorms, final RMSNorm, LM head."""
    attn = d * heads * d_head + 2 * d * kv_heads * d_head + heads * d_head * d
    mlp = 3 * d * d_ff
    per_layer = attn + mlp + 2 * d
    return vocab * d * (1 if tied else 2) + layers * per_layer + d


# -- every shipped file loads --------------------------------------------------

SHIPPED = ["meta-llama-3-8b", "mistral-7b-v0.1", "mixtral-8x7b-v0.1", "qwen1.5-moe-a2.7b-chat",
           "qwen3-30b-a3b", "gpt2", "bert-base-uncased", "t5-v1_1-base", "deepseek-v3", "deepseek-v2-lite",
           "gpt-oss-20b", "gpt-oss-120b", "qwen3-8b", "llama-3.1-8b", "gemma-2-9b-it", "gemma-3-4b-it",
           "gemma-3-27b-it"]


def test_every_shipped_config_is_documented_and_loads():
    files = sorted(p.stem for p in HF.glob("*.json"))
    assert files == sorted(SHIPPED)
    readme = (HF / "README.md").read_text()
    for name in SHIPPED:
        assert f"{name}.json" in readme
        spec = flopsim.load_model(str(HF / f"{name}.json"))
        assert spec.name.startswith(name)


# -- dense decoders: exact ----------------------------------------------------

def test_llama_3_8b_published_count():
    spec = flopsim.load_model(str(HF / "meta-llama-3-8b.json"))
    assert (spec.layers, spec.d_model, spec.heads, spec.kv_heads, spec.d_head) == (32, 4096, 32, 8, 128)
    assert (spec.ffn, spec.activation, spec.norm, spec.positions, spec.bias) == ("gated", "silu", "rmsnorm", "rope", False)
    assert (spec.tied_embeddings, spec.max_seq, spec.dtype) == (False, 8192, "bf16")
    derived = llama_like(layers=32, d=4096, heads=32, kv_heads=8, d_head=128, d_ff=14336, vocab=128256)
    assert derived == 8_030_261_248  # model card 8.03B; sum of numel() of LlamaForCausalLM
    assert params(spec) == derived


def test_hf_llama_equals_the_preset_field_by_field():
    hf = flopsim.load_model(str(HF / "meta-llama-3-8b.json")).model_dump()
    preset = flopsim.load_model("llama-3-8b").model_dump()
    assert {k: v for k, v in hf.items() if k != "name"} == {k: v for k, v in preset.items() if k != "name"}
    assert count(str(HF / "meta-llama-3-8b.json"), seq=512, phase="train").flops == \
        count("llama-3-8b", seq=512, phase="train").flops


def test_mistral_7b_published_count_and_sliding_window():
    spec, notes = load_hf_config_with_notes(HF / "mistral-7b-v0.1.json")
    derived = llama_like(layers=32, d=4096, heads=32, kv_heads=8, d_head=128, d_ff=14336, vocab=32000)
    assert derived == 7_241_732_096  # Mistral-7B-v0.1: 7.24B; sum of numel() of MistralForCausalLM
    assert params(spec) == derived
    assert spec.max_seq == 32768
    assert spec.sliding_window.size == 4096 and spec.sliding_window.global_every is None  # every layer
    assert not any("sliding_window" in n for n in notes)
    # decode past the window reads (and caches) 4096 keys per layer, as HF's sliding cache keeps them
    B, T = 1, 8192
    full = spec.model_copy(update={"sliding_window": None})
    dh, heads, L = 128, 32, 32
    assert count(spec, batch=B, seq=1, context=T, phase="decode").flops == \
        count(full, batch=B, seq=1, context=T, phase="decode").flops - L * 4 * B * heads * dh * (T - 4096)


def test_gpt2_published_count_and_preset():
    spec = flopsim.load_model(str(HF / "gpt2.json"))
    d, L, V, P = 768, 12, 50257, 1024
    derived = V * d + P * d + L * (2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d)
                                   + (4 * d * d + d)) + 2 * d
    assert derived == 124_439_808  # GPT2LMHeadModel("gpt2"), tied head
    assert params(spec) == derived
    assert spec.dtype == "fp32"  # no torch_dtype: transformers loads it in float32
    preset = flopsim.load_model("gpt2-small")
    different = {k for k, v in spec.model_dump().items() if preset.model_dump()[k] != v}
    assert different == {"name", "dtype"}


# -- BERT ---------------------------------------------------------------------

BERT_MODEL = 109_482_240  # BertModel("bert-base-uncased"), pooler included
BERT_POOLER = 768 * 768 + 768


def test_bert_masked_lm_counts_the_encoder_and_the_mlm_transform():
    spec, notes = load_hf_config_with_notes(HF / "bert-base-uncased.json")
    assert (spec.causal, spec.norm_position, spec.token_types, spec.head, spec.tied_embeddings, spec.lm_transform) == \
        (False, "post", 2, "lm", True, True)
    # BertForMaskedLM's published 109,514,298 = BertModel without its pooler + the MLM transform
    # (768x768 dense with bias, LayerNorm) + the logits' bias (vocab)
    transform = 768 * 768 + 768 + 2 * 768 + 30522
    assert params(spec) == BERT_MODEL - BERT_POOLER + transform == 109_514_298
    assert len(notes) == 1 and notes[0].startswith("attention dropout 0.1: training on CPU")  # nothing unmodelled
    pretraining, notes = convert({**cfg("bert-base-uncased"), "architectures": ["BertForPreTraining"]}, "bert")
    assert params(pretraining) == params(spec)  # the pooler and next-sentence head are noted, not modelled
    assert any(f"{BERT_POOLER + 2 * 768 + 2:,} parameters" in n for n in notes)


def test_bert_sequence_classification_equals_the_preset():
    config = {**cfg("bert-base-uncased"), "architectures": ["BertForSequenceClassification"],
              "torch_dtype": "bfloat16"}
    spec = hf_to_spec(config, "bert-base")
    assert spec.model_dump() == flopsim.load_model("bert-base").model_dump()
    assert params(spec) == BERT_MODEL + 768 * 2 + 2
    three = hf_to_spec({**config, "id2label": {"0": "neg", "1": "neu", "2": "pos"}}, "b3")
    assert three.classes == 3 and params(three) == BERT_MODEL + 768 * 3 + 3
    assert hf_to_spec({**config, "num_labels": 5}, "b5").classes == 5


def test_bert_model_has_no_head():
    spec, notes = convert({**cfg("bert-base-uncased"), "architectures": ["BertModel"]}, "bert")
    assert spec.head == "none" and params(spec) == BERT_MODEL - BERT_POOLER
    assert any("pooler" in n for n in notes)


# -- T5 -----------------------------------------------------------------------

def test_t5_v1_1_base_is_an_encoder_decoder():
    spec, notes = load_hf_config_with_notes(HF / "t5-v1_1-base.json")
    assert spec.name == "t5-v1_1-base"
    assert (spec.encoder_layers, spec.layers, spec.d_model, spec.heads, spec.d_head, spec.d_ff) == \
        (12, 12, 768, 12, 64, 2048)
    assert (spec.ffn, spec.activation, spec.positions, spec.relative_buckets, spec.norm, spec.bias, spec.causal,
            spec.attention_impl, spec.tied_embeddings) == \
        ("gated", "gelu_tanh", "relative", 32, "rmsnorm", False, True, "explicit", False)
    d, V, L, ff = 768, 32128, 12, 2048
    attn, ffn, table = 4 * d * d, 3 * d * ff, 32 * 12
    encoder = L * (attn + ffn + 2 * d) + table + d  # blocks, the relative-position table, final norm
    decoder = L * (attn + attn + ffn + 3 * d) + table + d  # self- and cross-attention, 3 norms a block
    # T5ForConditionalGeneration("google/t5-v1_1-base") has 247,577,856 parameters: the shared
    # table, the untied LM head the checkpoint stores, both stacks
    assert params(spec) == V * d + encoder + decoder + V * d == 247_577_856
    assert any("unties it when loading" in n for n in notes)
    assert not any("scaled by d_model" in n for n in notes)


def test_t5_encoder_and_original_relu_t5():
    enc = hf_to_spec({**cfg("t5-v1_1-base"), "architectures": ["T5EncoderModel"]}, "t5-enc")
    assert (enc.causal, enc.head, enc.layers, enc.encoder_layers, enc.positions) == (False, "none", 12, 0, "relative")
    relu, notes = convert({**cfg("t5-v1_1-base"), "feed_forward_proj": "relu", "tie_word_embeddings": True,
                           "num_decoder_layers": 6, "n_positions": 512}, "t5-small-ish")
    assert (relu.ffn, relu.activation, relu.tied_embeddings, relu.encoder_layers, relu.layers) == \
        ("mlp", "relu", True, 12, 6)
    assert any("scaled by d_model ** -0.5" in n for n in notes)
    # heads * d_kv need not equal d_model (t5-11b: 128 heads of 128 in d_model 1024)
    wide = hf_to_spec({**cfg("t5-v1_1-base"), "d_model": 1024, "num_heads": 128, "d_kv": 128}, "wide")
    assert wide.heads * wide.d_head == 16384


def test_t5_attention_is_explicit_whatever_the_kernel():
    """T5's relative position bias is added to explicit scores (positions relative); a fused
    kernel asked for is noted, not an error."""
    for attention in ("sdpa", "eager", "fused", None):
        spec, notes = convert(cfg("t5-v1_1-base"), "t5", attention=attention)
        assert spec.attention_impl == "explicit"
        assert any("SDPA" in n for n in notes) == (attention != "eager")


def test_umt5_has_a_table_per_layer():
    """UMT5's relative-position table in every self-attention layer: relative_bias layer
    (20 tables of 32 x 12 here); T5's one per stack."""
    spec, notes = convert({**cfg("t5-v1_1-base"), "architectures": ["UMT5ForConditionalGeneration"],
                           "num_decoder_layers": 8}, "umt5")
    assert (spec.encoder_layers, spec.layers) == (12, 8)
    assert spec.relative_bias == "layer" and not any("tables" in n for n in notes)
    t5 = spec.with_changes(relative_bias="stack")
    assert count(spec, batch=1, seq=4, encoder_seq=4).params - count(t5, batch=1, seq=4, encoder_seq=4).params \
        == 18 * 32 * 12
    assert convert(cfg("t5-v1_1-base"), "t5")[0].relative_bias == "stack"


# -- Switch Transformers --------------------------------------------------------

# transformers 5.24's SwitchTransformersConfig defaults (its docstring's checkpoint:
# google/switch-base-8), with experts in every other FFN of each stack
SWITCH = dict(architectures=["SwitchTransformersForConditionalGeneration"], model_type="switch_transformers",
              vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, expert_capacity=64, num_layers=12,
              num_sparse_encoder_layers=6, num_decoder_layers=12, num_sparse_decoder_layers=6, num_heads=12,
              num_experts=8, router_bias=False, relative_attention_num_buckets=32, dense_act_fn="relu",
              tie_word_embeddings=True)


def test_switch_is_a_top_1_encoder_decoder_moe():
    spec, notes = convert(SWITCH, "switch")
    assert (spec.family, spec.encoder_layers, spec.layers, spec.ffn, spec.activation, spec.positions,
            spec.attention_impl) == ("moe", 12, 12, "mlp", "relu", "relative", "explicit")
    m = spec.moe
    assert (m.experts, m.top_k, m.d_expert, m.every, m.capacity_factor, m.kernel, m.router_bias) == \
        (8, 1, 2048, 2, None, "loop", False)
    assert any("expert_capacity 64" in n for n in notes) and not any("SDPA" in n for n in notes)
    d, V, ff, E, table = 768, 32128, 2048, 8, 32 * 12
    attn, mlp, moe = 4 * d * d, 2 * d * ff, E * 2 * d * ff + d * E
    encoder = 6 * (attn + mlp + 2 * d) + 6 * (attn + moe + 2 * d) + table + d
    decoder = 6 * (2 * attn + mlp + 3 * d) + 6 * (2 * attn + moe + 3 * d) + table + d
    assert params(spec) == V * d + encoder + decoder  # tied head
    assert convert({k: v for k, v in SWITCH.items() if k != "architectures"}, "switch")[0] == spec  # model_type


def test_switch_sparse_blocks_map_to_every():
    """transformers: block i sparse when i % step == 1 (step = layers // sparse layers);
    flopsim: (i + 1) % every == 0. Step 2 is every 2 exactly; step 4 (the class's default, 3 of
    12) as many blocks elsewhere (noted); no every giving as many in both stacks: an error."""
    spec, notes = convert({**SWITCH, "num_sparse_encoder_layers": 3, "num_sparse_decoder_layers": 3}, "s")
    assert spec.moe.every == 4 and any("encoder [1, 5, 9]" in n for n in notes)
    dense, notes = convert({**SWITCH, "num_sparse_encoder_layers": 13, "num_sparse_decoder_layers": 13}, "s")
    assert dense.family == "dense" and any("no sparse block" in n for n in notes)
    with pytest.raises(SpecError, match="no moe.every gives as many"):
        convert({**SWITCH, "num_layers": 11, "num_decoder_layers": 11, "num_sparse_encoder_layers": 3,
                 "num_sparse_decoder_layers": 3}, "s")
    with pytest.raises(SpecError, match="no moe.every gives as many"):
        convert({**SWITCH, "num_sparse_decoder_layers": 3}, "s")


# -- MoE ------------------------------------------------------------------------

def test_mixtral_spec():
    spec = flopsim.load_model(str(HF / "mixtral-8x7b-v0.1.json"))
    assert spec.family == "moe"
    moe = spec.moe
    assert (moe.experts, moe.top_k, moe.d_expert, moe.shared_experts, moe.every, moe.capacity_factor) == \
        (8, 2, 14336, 0, 1, None)


def test_mixtral_published_count():
    d, L, V, E, ff = 4096, 32, 32000, 8, 14336
    attn = 2 * d * d + 2 * d * 1024
    derived = 2 * V * d + L * (attn + E * 3 * d * ff + d * E + 2 * d) + d
    assert derived == 46_702_792_704  # Mixtral-8x7B: 46.7B total; sum of numel() of MixtralForCausalLM
    assert params(str(HF / "mixtral-8x7b-v0.1.json")) == derived


def test_qwen2_moe_shared_experts_and_notes():
    spec, notes = load_hf_config_with_notes(HF / "qwen1.5-moe-a2.7b-chat.json")
    moe = spec.moe
    assert (moe.experts, moe.top_k, moe.d_expert, moe.shared_experts, moe.every) == (60, 4, 1408, 4, 1)
    assert moe.shared_expert_gate
    assert (spec.kv_heads, spec.bias, spec.qkv_bias, spec.tied_embeddings, spec.d_ff) == (16, False, True, False, 5632)
    assert any("4 shared experts of width 1408" in n for n in notes)
    assert not any("bias" in n for n in notes)
    assert hf_to_spec({**cfg("qwen1.5-moe-a2.7b-chat"), "qkv_bias": False}, "q").qkv_has_bias is False


def test_qwen1_5_moe_count_is_the_published_one():
    d, L, V, E, w, shared = 2048, 24, 151936, 60, 1408, 5632
    per_layer = (4 * d * d + 3 * d  # q, k, v (with bias), o
                 + E * 3 * d * w + d * E  # routed experts, router
                 + 3 * d * shared + d  # shared expert, its sigmoid gate
                 + 2 * d)
    published = 2 * V * d + L * per_layer + d
    assert published == 14_315_784_192  # "14.3B parameters in total" (Qwen1.5-MoE-A2.7B model card)
    assert params(str(HF / "qwen1.5-moe-a2.7b-chat.json")) == published  # q/k/v biases: qkv_bias


def test_qwen3_moe_count():
    spec, notes = load_hf_config_with_notes(HF / "qwen3-30b-a3b.json")
    assert (spec.d_head, spec.kv_heads, spec.moe.experts, spec.moe.top_k, spec.moe.d_expert,
            spec.moe.shared_experts) == (128, 4, 128, 8, 768, 0)
    d, L, V, E, w, dh = 2048, 48, 151936, 128, 768, 128
    per_layer = d * 32 * dh + 2 * d * 4 * dh + 32 * dh * d + 2 * dh + E * 3 * d * w + d * E + 2 * d
    published = 2 * V * d + L * per_layer + d
    assert published == 30_532_122_624  # Qwen3-30B-A3B: "30.5B in total"
    assert spec.qk_norm and params(spec) == published  # its per-head q/k RMSNorms (2 x 128 a layer) included
    assert notes == []


@pytest.mark.parametrize("step,mlp_only,expected", [
    (1, [], 1), (2, [], 2), (1, [0, 2], 2), (3, [], 3), (1, list(range(4)), None), (2, [1, 3], None),
])
def test_qwen_sparse_layers_map_to_every(step, mlp_only, expected):
    config = {**cfg("qwen1.5-moe-a2.7b-chat"), "num_hidden_layers": 4, "decoder_sparse_step": step,
              "mlp_only_layers": mlp_only}
    spec = hf_to_spec(config, "q")
    if expected is None:
        assert spec.family == "dense" and spec.moe is None
    else:
        assert spec.family == "moe" and spec.moe.every == expected


def test_qwen_moe_unrepresentable_layouts_are_errors():
    base = {**cfg("qwen1.5-moe-a2.7b-chat"), "num_hidden_layers": 4}
    with pytest.raises(SpecError, match="sparse layers \\[0, 2, 3\\] are not every n-th layer"):
        hf_to_spec({**base, "mlp_only_layers": [1]}, "q")
    with pytest.raises(SpecError, match="'shared_expert_intermediate_size': value 5000: not a multiple"):
        hf_to_spec({**base, "shared_expert_intermediate_size": 5000}, "q")
    assert hf_to_spec({**base, "shared_expert_intermediate_size": 0}, "q").moe.shared_experts == 0


# -- DeepSeek, Gemma, GPT-OSS --------------------------------------------------------
# The shipped config.json files (sources in specs/models/hf/README.md). Gemma 2 9B's is
# gemma-2-9b-it as released (query_pre_attn_scalar 224, later 256 on the Hub: a scale, no cost).

DEEPSEEK_V3 = cfg("deepseek-v3")
DEEPSEEK_V2_LITE = cfg("deepseek-v2-lite")
GPT_OSS_20B = cfg("gpt-oss-20b")
GEMMA_2_9B = cfg("gemma-2-9b-it")
GEMMA_3_27B = cfg("gemma-3-27b-it")  # Gemma3ForConditionalGeneration: text_config over the class defaults


def test_deepseek_v3_fp8_checkpoint_is_its_precision():
    """quantization_config fp8, weight_block_size [128, 128], activation_scheme dynamic: fp8
    weights with a float32 scale per 128 x 128 block, fp8 products; the MTP layer noted."""
    spec, notes = load_hf_config_with_notes(HF / "deepseek-v3.json")
    p = spec.precision
    assert (p.weights, p.group_size, p.scale_bytes, p.compute, p.scope) == ("fp8", 128 * 128, 4, "fp8", "all")
    assert any(n.startswith("quantization_config fp8") for n in notes)
    assert any(n.startswith("num_nextn_predict_layers 1") for n in notes)
    bad = {**DEEPSEEK_V3, "quantization_config": {**DEEPSEEK_V3["quantization_config"], "weight_block_size": [0, 128]}}
    with pytest.raises(SpecError, match="weight_block_size"):
        hf_to_spec(bad, "bad")


def _same_as_preset(spec, preset: str, *, but: tuple = ()) -> None:
    mine = spec.model_dump()
    theirs = flopsim.load_model(preset).model_dump()
    assert {k for k in mine if mine[k] != theirs[k]} == {"name", *but}


@pytest.mark.parametrize("config, preset, but", [
    (DEEPSEEK_V3, "deepseek-v3", ("precision",)),  # the checkpoint's fp8 blocks; the preset is bf16
    (DEEPSEEK_V2_LITE, "deepseek-v2-lite", ()),
    (GEMMA_2_9B, "gemma-2-9b", ("attention_impl",)),  # transformers runs Gemma 2 eagerly
    (GEMMA_3_27B, "gemma-3-27b", ()),
    # transformers runs GPT-OSS eagerly; the config.json has no torch_dtype: fp32 (see below)
    (GPT_OSS_20B, "gpt-oss-20b", ("attention_impl", "dtype")),
], ids=["deepseek-v3", "deepseek-v2-lite", "gemma-2-9b", "gemma-3-27b", "gpt-oss-20b"])
def test_todays_configs_equal_the_presets(config, preset, but):
    spec, notes = convert(config, "x")
    _same_as_preset(spec, preset, but=but)
    assert spec.attention_impl == ("explicit" if "attention_impl" in but else "fused")
    assert spec.dtype == ("fp32" if "dtype" in but else "bf16")


def test_deepseek_notes_and_routing_options():
    spec, notes = convert(DEEPSEEK_V3, "v3")
    assert spec.mla.decode == "absorbed" and any("mla.decode expanded" in n for n in notes)
    assert any(n.startswith("rope_scaling yarn: ") for n in notes)
    moe = spec.moe
    assert (moe.gate, moe.selection_bias, moe.groups, moe.top_groups, moe.normalize, moe.scale) == \
        ("sigmoid", True, 8, 4, True, 2.5)
    lite = hf_to_spec(DEEPSEEK_V2_LITE, "lite").moe
    assert (lite.gate, lite.selection_bias, lite.groups, lite.top_groups, lite.normalize, lite.first_dense) == \
        ("softmax", False, 1, 1, False, 1)
    # V2's group-limited routing (DeepSeek-V2: 8 groups, the best 3) and a normalisation transformers skips
    v2 = {**DEEPSEEK_V2_LITE, "topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3,
          "norm_topk_prob": True}
    spec, notes = convert(v2, "v2")
    assert (spec.moe.groups, spec.moe.top_groups, spec.moe.normalize) == (8, 3, True)
    assert any("transformers' DeepseekV2 does not" in n for n in notes)
    # moe_layer_freq: DeepSeek's code routes layer i >= first_k_dense_replace when i % freq == 0
    small = {**DEEPSEEK_V2_LITE, "num_hidden_layers": 3}
    assert hf_to_spec({**small, "moe_layer_freq": 2}, "f").moe.every == 3  # layer 2 only
    with pytest.raises(SpecError, match="'moe_layer_freq': value 2: sparse layers \\[2, 4\\]"):
        hf_to_spec({**small, "num_hidden_layers": 5, "moe_layer_freq": 2}, "f")
    dense, notes = convert({**small, "first_k_dense_replace": 3}, "d")
    assert dense.family == "dense" and dense.moe is None and any("a dense model" in n for n in notes)


@pytest.mark.parametrize("changes, local, every", [
    ({}, 1, 2),  # Gemma 2: local, global, ...
    ({"layer_types": ["full_attention"] * 4}, None, None),
    ({"layer_types": ["sliding_attention"] * 4}, 1, None),  # every layer local (no global_every)
    ({"layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]}, 1, 4),
    ({"sliding_window": None}, None, None),
])
def test_gemma_window_layouts(changes, local, every):
    spec = hf_to_spec({**GEMMA_2_9B, "num_hidden_layers": 4, **changes}, "g")
    if local is None:
        assert spec.sliding_window is None
    else:
        assert (spec.sliding_window.size, spec.sliding_window.global_every) == \
            (changes.get("sliding_window", 4096), every)


def test_gemma3_window_pattern_and_text_defaults():
    text = {"num_hidden_layers": 12, "sliding_window_pattern": 3}
    spec = hf_to_spec({**GEMMA_3_27B, "text_config": {**GEMMA_3_27B["text_config"], **text}}, "g")
    assert (spec.layers, spec.sliding_window.global_every, spec.qk_norm, spec.softcap) == (12, 3, True, None)
    bare = hf_to_spec({"architectures": ["Gemma3ForCausalLM"]}, "g")  # every key from transformers' defaults
    assert (bare.layers, bare.d_model, bare.vocab, bare.sliding_window.size, bare.sliding_window.global_every) == \
        (26, 2304, 262208, 4096, 6)
    spec, notes = convert(GEMMA_3_27B, "g")
    assert any("vision tower" in n for n in notes)
    assert any(n.startswith("rope_scaling linear") for n in notes)


# Published counts: keras-hub's presets (keras_hub/src/models/gemma/gemma_presets.py at 02aeee5f,
# gemma3/gemma3_presets.py at 00d9f10a). Keras' Gemma 3 text presets hold 262,144 embedding rows,
# transformers' (vocab_size 262,208) 64 more, one row of d_model each.
KERAS_GEMMA3_ROWS = 262_144


@pytest.mark.parametrize("name, shape, published", [
    ("gemma-2-9b-it", dict(layers=42, d=3584, heads=16, kv_heads=8, d_head=256, d_ff=14336, vocab=256000,
                           qk_norm=False),
     9_241_705_984),  # gemma2_instruct_9b_en; the copy's model.safetensors.index.json: 2 x 9,241,705,984 bytes
    ("gemma-3-4b-it", dict(layers=34, d=2560, heads=8, kv_heads=4, d_head=256, d_ff=10240, vocab=262208,
                           qk_norm=True),
     3_880_099_328 + (262_208 - KERAS_GEMMA3_ROWS) * 2560),  # gemma3_instruct_4b_text
    ("gemma-3-27b-it", dict(layers=62, d=5376, heads=32, kv_heads=16, d_head=128, d_ff=21504, vocab=262208,
                            qk_norm=True),
     27_009_002_240 + (262_208 - KERAS_GEMMA3_ROWS) * 5376),  # gemma3_instruct_27b_text
], ids=["gemma-2-9b-it", "gemma-3-4b-it", "gemma-3-27b-it"])
def test_gemma_published_counts(name, shape, published):
    """Gemma 2 9B and Gemma 3 4B / 27B as published: the language model's parameters derived
    term by term (gemma_params) equal keras-hub's published counts and flopsim's; Gemma 3 4B's
    text_config gives only its widths and layers, transformers' defaults the heads (8 of 256,
    4 key/value heads), which the import fills in."""
    from test_architecture_options import gemma_params

    spec = flopsim.load_model(str(HF / f"{name}.json"))
    assert (spec.layers, spec.d_model, spec.heads, spec.kv_heads, spec.d_head, spec.d_ff, spec.vocab) == \
        tuple(shape[k] for k in ("layers", "d", "heads", "kv_heads", "d_head", "d_ff", "vocab"))
    assert params(spec) == gemma_params(**shape) == published


def test_gemma_shipped_structure():
    """Gemma 2: a 4096 window on every other layer (local first), soft-capped scores (50) and
    logits (30), eager attention; Gemma 3: 1024-token windows, five local layers to a global
    one (the class's default pattern: no layer_types or pattern in the files), q/k norms, no
    soft-capping; both tied, sandwich-normed, scaled embeddings, bf16."""
    g2, g2_notes = load_hf_config_with_notes(HF / "gemma-2-9b-it.json")
    assert (g2.sliding_window.size, g2.sliding_window.global_every) == (4096, 2)
    assert (g2.softcap.attention, g2.softcap.logits, g2.qk_norm, g2.attention_impl) == (50.0, 30.0, False, "explicit")
    assert any("no SDPA path" in n for n in g2_notes)
    for name in ("gemma-3-4b-it", "gemma-3-27b-it"):
        g3, notes = load_hf_config_with_notes(HF / f"{name}.json")
        window = (g3.sliding_window.size, g3.sliding_window.global_every)
        assert (window, g3.softcap, g3.qk_norm) == ((1024, 6), None, True)
        assert g3.max_seq == 131_072 and g3.attention_impl == "fused"
        assert any("vision tower" in n for n in notes) and any(n.startswith("rope_scaling linear") for n in notes)
    for spec in (g2, g3):
        assert (spec.tied_embeddings, spec.sandwich_norms, spec.scale_embeddings) == (True, True, True)
        assert spec.dtype == "bf16"


def test_gpt_oss_mapping_and_notes():
    spec, notes = convert(GPT_OSS_20B, "oss")
    assert spec.attention_impl == "explicit" and any("no SDPA path in transformers" in n for n in notes)
    assert convert(GPT_OSS_20B, "oss", attention="flash_attention_2")[0].attention_impl == "fused"
    assert spec.precision.weights == "fp4" and spec.precision.scope == "experts"
    assert spec.activation == "silu_clamped" and not any("SwiGLU" in n for n in notes)  # modelled, not noted
    plain = hf_to_spec({k: v for k, v in GPT_OSS_20B.items() if k != "quantization_config"}, "oss")
    assert plain.precision is None and count(plain, seq=16).params == count(spec, seq=16).params
    spec, notes = convert({**GPT_OSS_20B, "attention_bias": False}, "oss")
    assert spec.bias is True and any("the attention projections lack biases" in n for n in notes)


def test_llama_3_1_rope_scaling_is_noted_and_costs_nothing():
    """Llama 3.1 8B is Llama 3 8B with a 128k context and llama3 rope scaling, which changes
    RoPE's frequencies only: the same spec as the preset, 8,030,261,248 parameters (8.03B)."""
    llama31 = cfg("llama-3.1-8b")
    spec, notes = convert(llama31, "l")
    assert notes == ["rope_scaling llama3: RoPE's frequencies rescaled, no cost (the rotary products and their "
                     "count are unchanged)"]
    _same_as_preset(spec, "llama-3.1-8b")
    assert spec == hf_to_spec({**cfg("meta-llama-3-8b"), "max_position_embeddings": 131072}, "l")
    assert params(spec) == llama_like(layers=32, d=4096, heads=32, kv_heads=8, d_head=128, d_ff=14336,
                                      vocab=128256) == 8_030_261_248
    assert convert({**llama31, "rope_scaling": None}, "l")[1] == []


# -- today's shipped configs: the published counts ---------------------------------------

def test_deepseek_files_have_the_published_counts():
    """DeepSeek-V3: 671B total, 37B activated (arXiv 2412.19437; the model card's 685B adds the
    14B multi-token-prediction module, num_nextn_predict_layers 1, which neither transformers'
    class nor flopsim has). DeepSeek-V2-Lite: 15.7B total, 2.4B activated (arXiv 2405.04434,
    appendix B). Both derived term by term (tests/test_mla.py's deepseek_params); activated
    without the embedding lookup, as DeepSeek counts them."""
    from test_mla import deepseek_params

    v3 = count(str(HF / "deepseek-v3.json"), seq=16)
    assert DEEPSEEK_V3["num_nextn_predict_layers"] == 1
    assert v3.params == deepseek_params(layers=61, d=7168, heads=128, vocab=129280, d_ff=18432, kv_rank=512,
                                        q_rank=1536, d_nope=128, d_rope=64, d_v=128, experts=256, d_expert=2048,
                                        shared=1, first_dense=3) == 671_026_404_352
    assert round(v3.active_params(lookups=False) / 1e9) == 37
    lite = count(str(HF / "deepseek-v2-lite.json"), seq=16)
    assert lite.params == deepseek_params(layers=27, d=2048, heads=16, vocab=102400, d_ff=10944, kv_rank=512,
                                          q_rank=None, d_nope=128, d_rope=64, d_v=128, experts=64, d_expert=1408,
                                          shared=2, first_dense=1) == 15_706_484_224
    assert round(lite.params / 1e8) / 10 == 15.7
    assert lite.active_params(lookups=False) / 1e9 == pytest.approx(2.4, rel=0.025)  # 2.45B: see test_mla


def gpt_oss_params(*, layers: int, experts: int) -> int:
    """gpt-oss's parameters, term by term: per block q, k, v, o with biases and 64 sink
    logits, the router with its bias, the experts' gate_up (2880 x 5760 + 5760) and down
    (2880 x 2880 + 2880), two RMSNorms; untied embeddings and head, the final norm."""
    d, heads, kv, dh, vocab = 2880, 64, 8, 64, 201088
    attention = d * heads * dh + heads * dh + 2 * (d * kv * dh + kv * dh) + heads * dh * d + d + heads
    moe = d * experts + experts + experts * (d * 2 * d + 2 * d + d * d + d)
    return layers * (attention + moe + 2 * d) + 2 * vocab * d + d


@pytest.mark.parametrize("name, layers, experts, total, card_total, card_active", [
    ("gpt-oss-20b", 24, 32, 20_914_757_184, 20.91, 3.61),
    ("gpt-oss-120b", 36, 128, 116_829_156_672, 116.83, 5.13),
])
def test_gpt_oss_files_have_the_published_counts(name, layers, experts, total, card_total, card_active):
    """The gpt-oss model card, table 1: gpt-oss-120b 116.83B total, 5.13B active; gpt-oss-20b
    20.91B and 3.61B (active: 4 experts a token, the embedding lookup left out). Neither
    config.json has a torch_dtype: flopsim imports fp32, as transformers builds a model from
    the config (the checkpoints hold the non-expert weights in bf16)."""
    spec, notes = load_hf_config_with_notes(HF / f"{name}.json")
    assert (spec.layers, spec.moe.experts, spec.moe.top_k, spec.precision.weights, spec.dtype) == \
        (layers, experts, 4, "fp4", "fp32")
    r = count(spec, seq=16)
    assert r.params == gpt_oss_params(layers=layers, experts=experts) == total
    assert round(total / 1e7) / 100 == card_total
    assert round(r.active_params(lookups=False) / 1e7) / 100 == card_active
    big, small = cfg("gpt-oss-120b"), cfg("gpt-oss-20b")
    assert {k for k in big if big[k] != small.get(k)} == {"num_hidden_layers", "num_local_experts", "layer_types"}


def test_qwen3_8b_published_count():
    """Qwen3-8B's model card: 8.2B parameters, 6.95B without the embeddings (the input table
    and the untied head); per-head q/k RMSNorms (2 x 128 a layer) counted."""
    spec, notes = load_hf_config_with_notes(HF / "qwen3-8b.json")
    assert (spec.qk_norm, spec.d_head, spec.kv_heads, spec.tied_embeddings, spec.max_seq) == (True, 128, 8, False, 40960)
    assert notes == []  # sliding windows are off (use_sliding_window false)
    derived = llama_like(layers=36, d=4096, heads=32, kv_heads=8, d_head=128, d_ff=12288, vocab=151936) \
        + 36 * 2 * 128
    assert params(spec) == derived == 8_190_735_360
    assert round(derived / 1e8) / 10 == 8.2
    assert round((derived - 2 * 151936 * 4096) / 1e7) / 100 == 6.95


def test_t5_model_has_no_lm_head():
    spec, notes = convert({**cfg("t5-v1_1-base"), "architectures": ["T5Model"]}, "t5")
    assert spec.head == "none" and spec.causal and spec.encoder_layers == 12
    assert any("no LM head" in n for n in notes) and not any("scaled by d_model" in n for n in notes)


@pytest.mark.parametrize("config, expected", [
    ({**DEEPSEEK_V3, "topk_method": "random"}, "key 'topk_method': value 'random'"),
    ({**DEEPSEEK_V3, "scoring_func": "relu"}, "key 'scoring_func': value 'relu'"),
    ({**DEEPSEEK_V3, "routed_scaling_factor": "2.5"}, "key 'routed_scaling_factor': value '2.5'"),
    ({**GEMMA_2_9B, "layer_types": ["sliding_attention"]}, "key 'layer_types'"),
    ({**GEMMA_2_9B, "layer_types": ["full_attention", "sliding_attention"] * 21}, "local (sliding-window) layers"),
    ({**GEMMA_2_9B, "attn_logit_softcapping": -1}, "key 'attn_logit_softcapping': value -1"),
    ({**GEMMA_2_9B, "use_bidirectional_attention": True}, "a bidirectional Gemma is not supported"),
    ({**GEMMA_3_27B, "text_config": "x"}, "key 'text_config': value 'x'"),
    ({**GPT_OSS_20B, "num_local_experts": None}, "GptOssForCausalLM: config is missing key 'num_local_experts'"),
], ids=["topk-method", "scoring", "scale", "layer-types-length", "layer-types-pattern", "softcap", "bidirectional",
        "text-config", "experts"])
def test_bad_todays_configs(config, expected):
    with pytest.raises(SpecError) as err:
        hf_to_spec(config, "x")
    assert expected in str(err.value) and "\n" not in str(err.value)


# -- smaller mapping rules --------------------------------------------------------

def test_dtypes_head_dim_model_type_and_bias_rule():
    llama = cfg("meta-llama-3-8b")
    assert hf_to_spec({**llama, "torch_dtype": "float16"}, "x").dtype == "fp16"
    assert hf_to_spec({**llama, "torch_dtype": None, "dtype": "float32"}, "x").dtype == "fp32"
    assert hf_to_spec({**llama, "head_dim": 160, "hidden_size": 5120}, "x").d_head == 160  # Mistral-Nemo style
    no_arch = {k: v for k, v in llama.items() if k != "architectures"}
    assert hf_to_spec(no_arch, "x").model_dump() == hf_to_spec(llama, "x").model_dump()
    spec, notes = convert({**llama, "attention_bias": True}, "x")
    assert spec.bias is False and any("follows the MLP" in n for n in notes)
    assert hf_to_spec({**llama, "attention_bias": True, "mlp_bias": True}, "x").bias is True
    assert hf_to_spec({**llama, "tie_word_embeddings": True}, "x").tied_embeddings is True


def test_config_json_in_a_folder_is_named_after_the_folder(tmp_path):
    folder = tmp_path / "Meta-Llama-3-8B"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg("meta-llama-3-8b")))
    assert flopsim.load_model(str(folder / "config.json")).name == "Meta-Llama-3-8B"


def test_cli_counts_an_hf_config():
    r = runner.invoke(app, ["count", str(HF / "gpt2.json"), "--seq", "1024", "--format", "json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["params"] == 124_439_808
    assert data["flops"] == count("gpt2-small", seq=1024).flops
    r = runner.invoke(app, ["formula", str(HF / "t5-v1_1-base.json")])
    assert r.exit_code == 0, r.output


# -- bad input: one line, exit 2 ------------------------------------------------------

def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("content,expected", [
    (json.dumps({"architectures": ["FalconForCausalLM"], "hidden_size": 7168}),
     "architecture FalconForCausalLM is not supported"),
    (json.dumps({"architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 7168}),
     "DeepseekV3ForCausalLM: config is missing keys 'num_hidden_layers', 'num_attention_heads'"),
    (json.dumps({"model_type": "falcon"}), "architecture model_type 'falcon' is not supported"),
    (json.dumps({"hidden_size": 8}), "neither 'architectures' nor 'model_type'"),
    (json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_attention_heads": 32}),
     "LlamaForCausalLM: config is missing keys 'num_hidden_layers', 'intermediate_size', 'vocab_size'"),
    (json.dumps({**{k: v for k, v in cfg("mixtral-8x7b-v0.1").items() if k != "num_local_experts"}}),
     "MixtralForCausalLM: config is missing key 'num_local_experts'"),
    (json.dumps({**cfg("gpt2"), "n_embd": "768"}), "GPT2LMHeadModel: key 'n_embd': value '768': expected a positive integer"),
    (json.dumps({**cfg("gpt2"), "activation_function": "quick_gelu"}), "key 'activation_function': value 'quick_gelu'"),
    (json.dumps({**cfg("meta-llama-3-8b"), "torch_dtype": "float64"}), "key 'torch_dtype': value 'float64'"),
    (json.dumps({**cfg("meta-llama-3-8b"), "num_key_value_heads": 3}), "heads 32 is not divisible by kv_heads 3"),
    (json.dumps({**cfg("t5-v1_1-base"), "feed_forward_proj": "gated-mish"}), "key 'feed_forward_proj'"),
    (json.dumps({**cfg("bert-base-uncased"), "position_embedding_type": "relative_key"}),
     "only 'absolute' is supported"),
    (json.dumps({**DEEPSEEK_V3, "topk_method": "random"}), "DeepseekV3ForCausalLM: key 'topk_method'"),
    (json.dumps({**GEMMA_2_9B, "layer_types": "sliding"}), "Gemma2ForCausalLM: key 'layer_types'"),
    (json.dumps({**GPT_OSS_20B, "sliding_window": 0}), "GptOssForCausalLM: key 'sliding_window': value 0"),
    (json.dumps({**GEMMA_3_27B, "text_config": {"num_hidden_layers": "62"}}),
     "text_config: Gemma3ForConditionalGeneration: key 'num_hidden_layers': value '62'"),
    (json.dumps([1, 2, 3]), "expected a JSON object"),
    ("{\"architectures\": [\"LlamaForCausalLM\"],\n  \"hidden_size\": 4096,,}", "line 2: JSON does not parse"),
    ("name: gpt2\nlayers: 12\n", "JSON does not parse"),
])
def test_bad_configs_are_one_line_exit_2(tmp_path, content, expected):
    path = write(tmp_path, "config.json", content)
    with pytest.raises(SpecError) as err:
        flopsim.load_model(path)
    assert expected in str(err.value) and "\n" not in str(err.value)
    r = runner.invoke(app, ["count", path, "--seq", "16"])
    assert r.exit_code == 2, r.output
    assert expected in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_missing_and_binary_files_are_one_line(tmp_path):
    r = runner.invoke(app, ["count", str(tmp_path / "absent.json")])
    assert r.exit_code == 2 and "no such file" in r.stderr and r.stderr.count("\n") == 1
    binary = tmp_path / "weights.json"
    binary.write_bytes(b"\x80\x81\xfe\xff\x00")
    r = runner.invoke(app, ["count", str(binary)])
    assert r.exit_code == 2 and "not UTF-8 text" in r.stderr and r.stderr.count("\n") == 1
