"""Hugging Face `config.json` -> ModelSpec, offline (no download, no transformers).

`load_hf_config(path)` reads a config.json (or a folder holding one) and
`hf_to_spec(config, name)` maps the parsed dict; `convert(config, name)`
returns the spec together with notes on what flopsim does not model for that
config. `flopsim.load_model("path/config.json")` and every CLI command that
takes a spec dispatch here for `.json` paths.

The architecture is `architectures[0]`, or, when a config has no
`architectures`, the usual one for its `model_type`. Supported:

| architectures | family | what is modelled |
| --- | --- | --- |
| LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM | dense | decoder, gated FFN, RMSNorm, RoPE (Qwen3: qk_norm) |
| MixtralForCausalLM | moe | as Llama, every FFN an MoE of `num_local_experts` |
| Qwen2MoeForCausalLM, Qwen3MoeForCausalLM | moe (dense if no sparse layer) | routed experts of `moe_intermediate_size`, shared experts |
| DeepseekV2ForCausalLM, DeepseekV3ForCausalLM | moe (dense if no sparse layer) | mla (latent attention), DeepSeek-MoE routing |
| Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3ForConditionalGeneration | dense | sandwich norms, scaled embeddings, local/global windows; Gemma 2 softcap, Gemma 3 qk_norm (multimodal: the language model) |
| GptOssForCausalLM | moe | attention sinks, alternating windows, biased experts and router, MXFP4 experts |
| GPT2LMHeadModel, GPT2Model | dense | pre-LayerNorm, learned positions, biases |
| BertForSequenceClassification, BertForMaskedLM, BertForPreTraining, BertModel | dense | post-LayerNorm encoder, token types |
| T5ForConditionalGeneration, T5Model, MT5ForConditionalGeneration, MT5Model, UMT5ForConditionalGeneration, UMT5Model | dense | encoder-decoder: `num_layers` encoder and `num_decoder_layers` decoder blocks, cross-attention, relative position bias |
| T5EncoderModel, MT5EncoderModel, UMT5EncoderModel | dense | the encoder stack, relative position bias |
| SwitchTransformersEncoderModel | moe | a Switch model's encoder stack: `causal: false`, head none, experts as its encoder's |
| SwitchTransformersForConditionalGeneration, SwitchTransformersModel | moe | as T5 (v1.0), top-1 experts in every n-th FFN of each stack |

Mapping decisions (see specs/models/hf/README.md for the full list):
- Qwen shared experts: flopsim's moe block has one expert width, so a
  shared expert of `shared_expert_intermediate_size` becomes
  `shared_experts = shared / moe_intermediate_size` experts of width
  `moe_intermediate_size` (Qwen1.5-MoE-A2.7B: 5632 / 1408 = 4). The moe
  family runs shared experts fused as one MLP of width
  shared_experts * d_expert, so this is Qwen's shared expert exactly
  (weights, FLOPs, product shapes), and its sigmoid `shared_expert_gate`
  (a d_model x 1 product scaling the shared experts' rows) is the moe
  block's `shared_expert_gate`. A width that is not a multiple is an error.
- Qwen `decoder_sparse_step` / `mlp_only_layers` -> `moe.every`; a set of
  sparse layers that no `every` reproduces is an error.
- Biases: Qwen2's and Qwen2-MoE's q/k/v biases (none on the output
  projection or the MLP) are the spec's `qkv_bias` under `bias: false`.
  Otherwise the spec's one `bias` flag follows the MLP (which holds most of
  the weights): a Llama with `attention_bias` != `mlp_bias` gets `bias =
  mlp_bias` (noted). Bias adds count 0 FLOPs, so only parameters and bytes
  move (by < 0.01%).
- T5 / mT5 / UMT5 / Switch: `encoder_layers` = num_layers, `layers` =
  num_decoder_layers (default num_layers), d_head = d_kv, RMSNorm pre-norm, no
  biases; `positions: relative` with `relative_buckets` =
  relative_attention_num_buckets (one table of buckets x heads per stack, in
  its first layer), so attention_impl is explicit whatever kernel is asked
  for (a fused one is noted: SDPA takes the bias as a mask, the same forward
  products). UMT5 holds a table in every self-attention layer, each layer
  computing its own bias: `relative_bias: layer`. `gated-gelu` is HF's gated
  `gelu_new` (tanh GELU). The head follows `tie_word_embeddings` as saved: T5 v1.1's and mT5's false is the
  untied head their checkpoints store (transformers 5.24 ties the head when it
  builds these classes from a config and unties it on loading such a
  checkpoint; noted). The Model classes have no head; the EncoderModel
  classes are the encoder stack alone (not causal, no head).
- Switch: family moe, top_k 1, experts num_experts, d_expert d_ff, FFN
  `dense_act_fn` (not gated), router_bias; transformers makes block i of a
  stack sparse when i % step == 1 (step = layers // num_sparse_*_layers),
  flopsim when (i + 1) % every == 0: step 2 is every 2 exactly; otherwise an
  `every` giving as many sparse blocks in each stack (placement noted: every
  total is equal), else an error. `expert_capacity` is not a padded capacity:
  transformers drops a sequence's tokens beyond it per expert and runs the
  kept tokens only, so the import is dropless (`capacity_factor` null, kernel
  loop, as transformers' loop over the experts), exact when no expert gets
  more than expert_capacity tokens of a sequence and an upper bound otherwise
  (noted). transformers runs Switch eagerly (no SDPA path).
- BERT: post-norm, token types; `BertForSequenceClassification` -> cls head
  (pooler + classifier, `classes` = len(id2label), else num_labels, else 2);
  `BertForMaskedLM` / `BertForPreTraining` -> a tied LM head after the MLM
  transform (`lm_transform`: dense + activation + LayerNorm, and the logits'
  bias); BertForPreTraining's pooler and next-sentence head are not modelled;
  `BertModel` -> no head (its pooler is not modelled).
- attention_impl: `explicit` for transformers' `eager` attention, else
  `fused` (sdpa, the default, and the flash and flex kernels), from the
  `attention` argument or the config's `attn_implementation` (the key
  transformers itself reads). Training on CPU, torch's SDPA runs the explicit
  products whenever attention dropout is above 0 (GPT-2's and BERT's published
  configs) or a mask needs a gradient (T5's relative position bias); CUDA's
  fused kernels take both, so fused stays the default and such a config gets a
  note saying how to count the CPU run. T5's relative bias: explicit (above).
  Gemma 2 and GPT-OSS have no SDPA path in transformers, which runs them
  eagerly: their default is `explicit` (noted; a flash kernel: `fused`).
- dtype from `torch_dtype` (or `dtype`, transformers >= 4.56); a config
  without one loads as fp32 in transformers, and so it does here.
- max_seq from `max_position_embeddings` / `n_positions`; Mistral's and
  Mixtral's `sliding_window` -> `sliding_window: {size: W}` on every layer
  (decode reads and caches min(T, W) keys); Gemma's and GPT-OSS's local
  layers from transformers' `layer_types` (else Gemma 3's
  `sliding_window_pattern` n, default 6; Gemma 2 and GPT-OSS: 2): layer i
  global when (i + 1) % n == 0 (`global_every`); a layout that is not
  periodic so is an error. Qwen2's windows from `max_window_layers` on are
  not modelled (full attention, noted).
- DeepSeek: `mla` {kv_rank: kv_lora_rank, q_rank: q_lora_rank, d_nope, d_rope,
  d_v from the qk_*/v head dims}; moe {experts: n_routed_experts, top_k,
  d_expert: moe_intermediate_size, shared_experts: n_shared_experts,
  first_dense: first_k_dense_replace, every from moe_layer_freq (DeepSeek's
  code routes layer i when i % freq == 0; transformers ignores the key), gate
  from scoring_func, normalize: norm_topk_prob, scale: routed_scaling_factor,
  selection_bias: topk_method noaux_tc, groups / top_groups: n_group /
  topk_group unless topk_method is greedy}; absent keys take transformers'
  defaults of the version (V3: sigmoid, noaux_tc, 3 dense blocks). Decode is
  flopsim's absorbed form; transformers' class runs the expanded one (noted).
  quantization_config fp8 with weight_block_size [a, b] (DeepSeek-V3's
  checkpoint) -> precision {weights fp8, group_size a*b, scale_bytes 4 (its
  weight_scale_inv tensors are float32), compute fp8 when activation_scheme is
  dynamic (activations quantized per token group at run time)}; the
  multi-token-prediction layers (num_nextn_predict_layers) are not modelled
  (noted: they are not part of the published 671B).
- Gemma: `hidden_activation` (gelu_pytorch_tanh -> gelu_tanh), head_dim
  (default 256), tied head, sandwich_norms, scale_embeddings; Gemma 2's
  softcap {attention: attn_logit_softcapping, logits:
  final_logit_softcapping} (absent: 50 and 30, as transformers); Gemma 3's
  qk_norm. Gemma 3's text config holds only what differs from transformers'
  Gemma3TextConfig defaults (GEMMA3_TEXT_DEFAULTS fills the rest).
- GPT-OSS: moe {experts: num_local_experts, top_k, d_expert:
  intermediate_size, normalize (the softmax over the chosen top-k logits),
  router_bias}, bias (attention_bias; the experts' biases), attention_sinks;
  quantization_config mxfp4 -> precision {weights fp4, group_size 32,
  scale_bytes 1, scope experts}; activation silu_clamped (the experts' clamped
  SwiGLU).
- rope_scaling / rope_parameters other than default (llama3, yarn, linear,
  dynamic): the rotary frequencies change, not the products: no cost, noted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from flopsim.errors import SpecError

# HF activation names (transformers.activations.ACT2FN) -> ModelSpec.activation
ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_accurate": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
}

DTYPES = {
    "float32": "fp32", "float": "fp32",
    "float16": "fp16", "half": "fp16",
    "bfloat16": "bf16",
    "float8_e4m3fn": "fp8", "float8_e5m2": "fp8",
    "int8": "int8",
}

# transformers' attn_implementation -> ModelSpec.attention_impl (flopsim's own names accepted too):
# eager runs Q K^T, softmax and P V as separate products (backward: 4 products); the others are
# one kernel whose backward recomputes the scores (5 products, as torch's FLOP formulas count it)
ATTENTION = {
    "eager": "explicit",
    "sdpa": "fused",
    "flash_attention_2": "fused",
    "flash_attention_3": "fused",
    "flex_attention": "fused",
    "explicit": "explicit",
    "fused": "fused",
}

# the attention-dropout probability in each architecture's config
ATTENTION_DROPOUT = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob", "dropout_rate")

_MISSING = object()

# architectures whose per-layer windows `_windows` maps (not _decoder_common's every-layer window)
_OWN_WINDOWS = ("Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration", "GptOssForCausalLM")
# transformers runs these with eager attention by default: they have no SDPA path
# (SDPA has no soft-capping, nor sinks)
_EAGER_DEFAULT = ("Gemma2ForCausalLM", "GptOssForCausalLM")


def attention_impl(value: Any, where: str = "attention") -> str:
    """ModelSpec.attention_impl for an attention implementation's name (transformers' or flopsim's)."""
    if not isinstance(value, str) or value not in ATTENTION:
        raise SpecError(f"{where}: value {str(value)[:60]!r}: not supported (one of {', '.join(ATTENTION)})")
    return ATTENTION[value]


class _Config:
    """Typed access to a config dict; errors name the key, the value and the architecture."""

    def __init__(self, data: dict, arch: str, source: str):
        self.data, self.arch, self.source = data, arch, source

    def fail(self, message: str) -> SpecError:
        return SpecError(f"{self.source}: {self.arch}: {message}")

    def require(self, *keys: str) -> None:
        missing = [k for k in keys if self.data.get(k) is None]
        if missing:
            names = ", ".join(f"'{k}'" for k in missing)
            raise self.fail(f"config is missing key{'s' if len(missing) > 1 else ''} {names}")

    def get(self, key: str, default: Any = _MISSING) -> Any:
        value = self.data.get(key)
        if value is None:
            if default is _MISSING:
                self.require(key)
            return default
        return value

    def integer(self, key: str, default: Any = _MISSING, *, minimum: int = 1) -> Any:
        value = self.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            need = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise self.fail(f"key '{key}': value {value!r}: expected {need}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(f"key '{key}': value {value!r}: expected true or false")
        return value

    def activation(self, key: str, default: str) -> str:
        value = self.get(key, default)
        if value not in ACTIVATIONS:
            raise self.fail(f"key '{key}': value {value!r}: not supported (one of {', '.join(ACTIVATIONS)})")
        return ACTIVATIONS[value]

    def dtype(self) -> str:
        key = "torch_dtype" if self.data.get("torch_dtype") is not None else "dtype"
        value = self.data.get(key)
        if value is None:
            return "fp32"  # transformers loads a config without a dtype in float32
        name = str(value).removeprefix("torch.")
        if name not in DTYPES:
            raise self.fail(f"key '{key}': value {value!r}: not supported (one of {', '.join(DTYPES)})")
        return DTYPES[name]


# -- the architectures -------------------------------------------------------

def _decoder_common(c: _Config, notes: list[str], *, max_pos_default: int, tied_default: bool = False) -> dict:
    """Llama-style decoders: GQA, gated FFN, RMSNorm, RoPE, no biases unless the config says so."""
    c.require("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    heads = c.integer("num_attention_heads")
    spec = dict(
        layers=c.integer("num_hidden_layers"),
        d_model=c.integer("hidden_size"),
        heads=heads,
        kv_heads=c.integer("num_key_value_heads", heads),
        d_ff=c.integer("intermediate_size"),
        ffn="gated",
        activation=c.activation("hidden_act", "silu"),
        vocab=c.integer("vocab_size"),
        positions="rope",
        max_seq=c.integer("max_position_embeddings", max_pos_default),
        causal=True,
        tied_embeddings=c.flag("tie_word_embeddings", tied_default),
        norm="rmsnorm",
        norm_position="pre",
        head="lm",
        dtype=c.dtype(),
    )
    head_dim = c.integer("head_dim", None)
    if head_dim is not None:
        spec["d_head"] = head_dim
    window = c.data.get("sliding_window")
    if c.arch in _OWN_WINDOWS:  # Gemma, GPT-OSS: per-layer windows (`_windows`)
        pass
    elif window is not None and c.data.get("use_sliding_window", True) is not False:
        if c.arch in ("MistralForCausalLM", "MixtralForCausalLM"):  # every layer: a window of W keys
            spec["sliding_window"] = {"size": c.integer("sliding_window")}
        else:  # Qwen2's windows start at max_window_layers: not a pattern flopsim describes
            notes.append(f"sliding_window {window} is not modelled: attention is costed over the full context "
                         f"(exact up to {window} tokens)")
    _rope_note(c, notes)
    return spec


def _rope_note(c: _Config, notes: list[str]) -> None:
    """RoPE scaling (Llama 3.1's llama3, yarn, linear, dynamic) rescales the rotary frequencies
    (computed once, or per sequence length): no product changes, so no cost; noted."""
    for key in ("rope_scaling", "rope_parameters"):
        value = c.data.get(key)
        if not isinstance(value, dict) or not value:
            continue
        # Gemma 3 keeps one parameter set per layer type: {"full_attention": {...}, ...}
        parts = list(value.values()) if all(isinstance(v, dict) for v in value.values()) else [value]
        kinds = sorted({str(p.get("rope_type", p.get("type", "default"))) for p in parts} - {"default"})
        if kinds:
            notes.append(f"{key} {', '.join(kinds)}: RoPE's frequencies rescaled, no cost (the rotary "
                         f"products and their count are unchanged)")
            return


def _windows(c: _Config, layers: int, *, pattern_default: Optional[int] = None) -> Optional[dict]:
    """The spec's sliding_window from transformers' per-layer `layer_types` (sliding_attention /
    full_attention), else from `sliding_window_pattern` n (Gemma 3's older key; also its default):
    layer i full when (i + 1) % n == 0. None when no layer is local (or no window size)."""
    size = c.integer("sliding_window", None)
    types = c.get("layer_types", None)
    if types is not None:
        known = ("sliding_attention", "full_attention")
        if not isinstance(types, list) or len(types) != layers or any(t not in known for t in types):
            raise c.fail(f"key 'layer_types': value {str(types)[:80]!r}: expected {layers} entries, each "
                         f"{' or '.join(known)}")
        local = {i for i, t in enumerate(types) if t == "sliding_attention"}
    else:
        n = c.integer("sliding_window_pattern", pattern_default)
        local = set(range(layers)) if n is None else {i for i in range(layers) if (i + 1) % n}
    if size is None or not local:
        return None
    if local == set(range(layers)):
        return {"size": size}
    for n in range(2, layers + 1):
        if local == {i for i in range(layers) if (i + 1) % n}:
            return {"size": size, "global_every": n}
    raise c.fail(f"local (sliding-window) layers {sorted(local)} of {layers}: not every layer but each n-th, "
                 f"which flopsim's sliding_window.global_every needs")


def _bias(c: _Config, notes: list[str], *, attention: bool, mlp: bool, what: str = "") -> bool:
    """One `bias` flag for the spec: it follows the MLP's; a mismatch is noted."""
    if attention != mlp:
        where = what or "the attention projections"
        notes.append(f"{where} {'have' if attention else 'lack'} biases but the MLP "
                     f"{'has' if mlp else 'has none'}: flopsim's single bias flag follows the MLP "
                     f"(bias {str(mlp).lower()}); parameters and bytes differ by those bias vectors only")
    return mlp


def _llama(c: _Config, notes: list[str]) -> dict:
    defaults = {"MistralForCausalLM": 4096 * 32, "Qwen2ForCausalLM": 32768, "Qwen3ForCausalLM": 32768}
    spec = _decoder_common(c, notes, max_pos_default=defaults.get(c.arch, 2048))
    if c.arch == "Qwen2ForCausalLM":  # q/k/v biases hard-wired, o_proj and MLP without
        spec.update(bias=False, qkv_bias=True)
    else:
        spec["bias"] = _bias(c, notes, attention=c.flag("attention_bias", False), mlp=c.flag("mlp_bias", False))
    if c.arch == "Qwen3ForCausalLM":
        spec["qk_norm"] = True  # an RMSNorm over d_head on each query and key head
    return spec


def _mixtral(c: _Config, notes: list[str]) -> dict:
    c.require("num_local_experts", "num_experts_per_tok")
    spec = _decoder_common(c, notes, max_pos_default=4096 * 32)
    spec["bias"] = False
    spec["family"] = "moe"
    spec["moe"] = dict(experts=c.integer("num_local_experts"), top_k=c.integer("num_experts_per_tok"),
                       d_expert=spec["d_ff"], shared_experts=0, capacity_factor=None, every=1,
                       routing="token_choice")
    return spec


def _sparse_every(c: _Config, layers: int) -> Optional[int]:
    """Qwen-MoE: layer i is sparse when (i + 1) % decoder_sparse_step == 0 and i is not in
    mlp_only_layers. The `every` of flopsim that gives the same layers; None when none is sparse."""
    step = c.integer("decoder_sparse_step", 1)
    mlp_only = c.get("mlp_only_layers", [])
    if not isinstance(mlp_only, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in mlp_only):
        raise c.fail(f"key 'mlp_only_layers': value {mlp_only!r}: expected a list of layer indices")
    sparse = {i for i in range(layers) if (i + 1) % step == 0 and i not in mlp_only}
    if not sparse:
        return None
    for every in range(1, layers + 1):
        if sparse == {i for i in range(layers) if (i + 1) % every == 0}:
            return every
    raise c.fail(f"keys 'decoder_sparse_step' {step} and 'mlp_only_layers' {mlp_only}: sparse layers "
                 f"{sorted(sparse)} are not every n-th layer, which flopsim's moe.every needs")


def _qwen_moe(c: _Config, notes: list[str]) -> dict:
    # transformers 5 saves Qwen3-MoE's `num_experts` as `num_local_experts` (its attribute_map)
    experts_key = "num_local_experts" if c.data.get("num_experts") is None and \
        c.data.get("num_local_experts") is not None else "num_experts"
    c.require(experts_key, "num_experts_per_tok", "moe_intermediate_size")
    spec = _decoder_common(c, notes, max_pos_default=8192 if c.arch == "Qwen2MoeForCausalLM" else 32768)
    if c.arch == "Qwen2MoeForCausalLM":  # q/k/v biases (transformers' qkv_bias), o_proj and MLP without
        spec.update(bias=False, qkv_bias=c.flag("qkv_bias", True))
    else:
        spec["bias"] = _bias(c, notes, attention=c.flag("attention_bias", False), mlp=False)
        spec["qk_norm"] = True  # Qwen3: an RMSNorm over d_head on each query and key head
    every = _sparse_every(c, spec["layers"])
    experts = c.integer(experts_key, minimum=0)
    if every is None or experts == 0:
        notes.append("no layer is sparse (num_experts 0, or every layer in mlp_only_layers): a dense model")
        return spec
    d_expert = c.integer("moe_intermediate_size")
    shared_size = c.integer("shared_expert_intermediate_size", 0, minimum=0)
    if shared_size % d_expert:
        raise c.fail(f"key 'shared_expert_intermediate_size': value {shared_size}: not a multiple of "
                     f"moe_intermediate_size {d_expert}; flopsim's moe block has one expert width")
    shared = shared_size // d_expert
    if shared:
        notes.append(f"the shared expert of width {shared_size} is modelled as {shared} shared experts of width "
                     f"{d_expert} (same weights and FLOPs), with its sigmoid gate (shared_expert_gate)")
    if every > 1 or c.data.get("mlp_only_layers"):
        notes.append(f"layers that are not sparse run a dense MLP of intermediate_size {spec['d_ff']}")
    spec["family"] = "moe"
    spec["moe"] = dict(experts=experts, top_k=c.integer("num_experts_per_tok"), d_expert=d_expert,
                       shared_experts=shared, shared_expert_gate=bool(shared), capacity_factor=None, every=every,
                       routing="token_choice")
    return spec


def _deepseek_every(c: _Config, layers: int, first_dense: int) -> int:
    """DeepSeek's own code routes layer i when i >= first_k_dense_replace and i % moe_layer_freq
    == 0 (transformers' classes ignore moe_layer_freq: every layer from first_k_dense_replace).
    The `every` of flopsim (block i routed when i >= first_dense and (i + 1) % every == 0)
    that routes the same layers."""
    freq = c.integer("moe_layer_freq", 1)
    sparse = {i for i in range(first_dense, layers) if i % freq == 0}
    for every in range(1, layers + 1):
        if sparse == {i for i in range(first_dense, layers) if (i + 1) % every == 0}:
            return every
    raise c.fail(f"key 'moe_layer_freq': value {freq}: sparse layers {sorted(sparse)} are not each n-th layer "
                 f"from first_k_dense_replace {first_dense}, which flopsim's moe.every needs")


def _deepseek_quantization(c: _Config, spec: dict, notes: list[str]) -> None:
    """DeepSeek-V3's fp8 checkpoint (block-scaled weights) as a precision; its next-token
    prediction layers noted (see the module docstring)."""
    quant = c.get("quantization_config", None)
    if isinstance(quant, dict) and quant.get("quant_method") == "fp8":
        block = quant.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2
                and all(isinstance(b, int) and not isinstance(b, bool) and 0 < b <= 1 << 16 for b in block)):
            raise c.fail(f"key 'quantization_config.weight_block_size': value {str(block)[:60]}: expected two "
                         f"positive integers")
        dynamic = quant.get("activation_scheme") == "dynamic"
        spec["precision"] = dict(weights="fp8", group_size=block[0] * block[1], scale_bytes=4,
                                 **({"compute": "fp8"} if dynamic else {}))
        notes.append(f"quantization_config fp8: weights in fp8 with a float32 scale per {block[0]} x {block[1]} "
                     f"block" + (", products in fp8 (activations quantized at run time)" if dynamic else "")
                     + "; the router's weights, stored in the dtype, are costed as fp8 too")
    elif quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        notes.append(f"quantization_config {str(method)[:40]}: not modelled (weights in the dtype)")
    mtp = c.integer("num_nextn_predict_layers", 0, minimum=0)
    if mtp:
        notes.append(f"num_nextn_predict_layers {mtp}: the multi-token-prediction module is not modelled (it "
                     f"is not part of the published parameter count; inference may skip it)")


def _deepseek(c: _Config, notes: list[str]) -> dict:
    """DeepSeek-V2 / V3: multi-head latent attention and DeepSeek-MoE (see the module docstring)."""
    c.require("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
              "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
              "num_experts_per_tok", "moe_intermediate_size")
    v3 = c.arch == "DeepseekV3ForCausalLM"
    spec = _decoder_common(c, notes, max_pos_default=4096 if v3 else 2048)
    spec.pop("d_head", None)  # transformers' head_dim is the rotary width; MLA's widths are its own
    spec.pop("kv_heads")  # every head has its own keys and values from the latent
    spec["bias"] = _bias(c, notes, attention=c.flag("attention_bias", False),
                         mlp=False if v3 else c.flag("mlp_bias", False))
    spec["mla"] = dict(kv_rank=c.integer("kv_lora_rank"), q_rank=c.integer("q_lora_rank", None),
                       d_nope=c.integer("qk_nope_head_dim"), d_rope=c.integer("qk_rope_head_dim"),
                       d_v=c.integer("v_head_dim"))
    _deepseek_quantization(c, spec, notes)
    notes.append("transformers' DeepSeek attention caches the latents and up-projects all of them at every "
                 "decode step (mla.decode expanded); flopsim's default decode is absorbed, as serving engines "
                 "run it")
    first_dense = c.integer("first_k_dense_replace", 3 if v3 else 0, minimum=0)
    if first_dense >= spec["layers"]:
        notes.append(f"first_k_dense_replace {first_dense}: every layer runs a dense MLP: a dense model")
        return spec
    method = c.get("topk_method", "noaux_tc" if v3 else "greedy")
    if method not in ("greedy", "group_limited_greedy", "noaux_tc"):
        raise c.fail(f"key 'topk_method': value {str(method)[:60]!r}: not supported "
                     f"(one of greedy, group_limited_greedy, noaux_tc)")
    gate = c.get("scoring_func", "sigmoid" if v3 else "softmax")
    if gate not in ("softmax", "sigmoid"):
        raise c.fail(f"key 'scoring_func': value {str(gate)[:60]!r}: not supported (softmax or sigmoid)")
    grouped = method != "greedy"
    scale = c.get("routed_scaling_factor", 2.5 if v3 else 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise c.fail(f"key 'routed_scaling_factor': value {scale!r}: expected a positive number")
    normalize = c.flag("norm_topk_prob", v3)
    if normalize and not v3:
        notes.append("norm_topk_prob: DeepSeek's code divides the top-k weights by their sum, transformers' "
                     "DeepseekV2 does not (elementwise FLOPs only); costed as normalised")
    spec["family"] = "moe"
    spec["moe"] = dict(experts=c.integer("n_routed_experts"), top_k=c.integer("num_experts_per_tok"),
                       d_expert=c.integer("moe_intermediate_size"),
                       shared_experts=c.integer("n_shared_experts", 1 if v3 else 2, minimum=0),
                       first_dense=first_dense, every=_deepseek_every(c, spec["layers"], first_dense),
                       gate=gate, normalize=normalize, scale=float(scale), selection_bias=method == "noaux_tc",
                       groups=c.integer("n_group", 1) if grouped else 1,
                       top_groups=c.integer("topk_group", 1) if grouped else 1,
                       capacity_factor=None, routing="token_choice")
    return spec


def _softcap(c: _Config, defaults: tuple) -> Optional[dict]:
    """Gemma's soft-capping: attn_logit_softcapping (scores), final_logit_softcapping (logits);
    an absent key takes transformers' default, null none."""
    caps = {}
    for field, key, default in zip(("attention", "logits"),
                                   ("attn_logit_softcapping", "final_logit_softcapping"), defaults):
        value = c.data[key] if key in c.data else default
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise c.fail(f"key '{key}': value {value!r}: expected a positive number or null")
            caps[field] = float(value)
    return caps or None


# transformers' Gemma3TextConfig defaults (5.24): the Hub's Gemma 3 text_config holds only the
# keys that differ from them (tests/test_transformers_exact.py checks them against the class)
GEMMA3_TEXT_DEFAULTS = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131_072,
    tie_word_embeddings=True, attention_bias=False, sliding_window=4096,
)


def _gemma(c: _Config, notes: list[str]) -> dict:
    """Gemma 2 and Gemma 3's language model: sandwich norms, scaled embeddings, tied head,
    GeGLU, local and global layers; Gemma 2 soft-caps, Gemma 3 normalises q and k per head."""
    gemma3 = c.arch != "Gemma2ForCausalLM"
    if gemma3:
        c = _Config({**GEMMA3_TEXT_DEFAULTS, **c.data}, c.arch, c.source)
    if c.flag("use_bidirectional_attention", False):
        raise c.fail("key 'use_bidirectional_attention': value True: a bidirectional Gemma is not supported")
    spec = _decoder_common(c, notes, max_pos_default=8192, tied_default=True)
    spec.update(activation=c.activation("hidden_activation", "gelu_pytorch_tanh"), d_head=c.integer("head_dim", 256),
                bias=_bias(c, notes, attention=c.flag("attention_bias", False), mlp=False),
                sandwich_norms=True, scale_embeddings=True)
    if gemma3:
        spec["qk_norm"] = True
    window = _windows(c, spec["layers"], pattern_default=6 if gemma3 else 2)
    if window is not None:
        spec["sliding_window"] = window
    caps = _softcap(c, (None, None) if gemma3 else (50.0, 30.0))
    if caps is not None:
        spec["softcap"] = caps
    return spec


def _gemma3_multimodal(c: _Config, notes: list[str]) -> dict:
    """Gemma3ForConditionalGeneration: its language model (`text_config`, over transformers'
    defaults); the SigLIP vision tower and the projector are not modelled."""
    text = c.get("text_config", {})
    if not isinstance(text, dict):
        raise c.fail(f"key 'text_config': value {str(text)[:60]!r}: expected a mapping")
    outer = {k: c.data[k] for k in ("torch_dtype", "dtype", "tie_word_embeddings") if c.data.get(k) is not None}
    spec = _gemma(_Config({**outer, **text}, c.arch, f"{c.source}: text_config"), notes)
    notes.append("the vision tower (SigLIP) and the multimodal projector are not modelled: the language model "
                 "on text tokens")
    return spec


def _gpt_oss(c: _Config, notes: list[str]) -> dict:
    """GPT-OSS: an MoE of biased experts under a biased router (softmax over the chosen top-k),
    attention sinks, local and full layers alternating; MXFP4 experts when quantized so."""
    c.require("num_local_experts", "num_experts_per_tok")
    spec = _decoder_common(c, notes, max_pos_default=131072)
    spec["d_head"] = c.integer("head_dim", spec["d_model"] // spec["heads"])
    spec["bias"] = _bias(c, notes, attention=c.flag("attention_bias", True), mlp=True, what="the attention projections")
    spec["attention_sinks"] = True
    window = _windows(c, spec["layers"], pattern_default=2)
    if window is not None:
        spec["sliding_window"] = window
    spec["family"] = "moe"
    spec["moe"] = dict(experts=c.integer("num_local_experts"), top_k=c.integer("num_experts_per_tok"),
                       d_expert=spec["d_ff"], normalize=True, router_bias=True, capacity_factor=None,
                       routing="token_choice")
    spec["activation"] = "silu_clamped"  # its limit and alpha are constants: the cost is the same for any
    quant = c.get("quantization_config", None)
    if all(c.data.get(k) is None for k in ("torch_dtype", "dtype")):
        notes.append("no torch_dtype: fp32, as transformers builds this config; the checkpoint stores the "
                     "weights outside the experts in bf16, which from_pretrained(dtype='auto') keeps (set `dtype: "
                     "bf16` in a spec to cost that)")
    if isinstance(quant, dict) and quant.get("quant_method") == "mxfp4":
        spec["precision"] = dict(weights="fp4", group_size=32, scale_bytes=1, scope="experts")
        notes.append("quantization_config mxfp4: the experts' weights in MXFP4 (4-bit values, an 8-bit scale "
                     "per 32), the rest in the dtype")
    elif quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        notes.append(f"quantization_config {str(method)[:40]}: not modelled (weights in the dtype)")
    return spec


def _gpt2(c: _Config, notes: list[str]) -> dict:
    c.require("n_embd", "n_layer", "n_head", "vocab_size")
    d_model = c.integer("n_embd")
    max_key = "n_positions" if c.data.get("n_positions") is not None else "n_ctx"
    return dict(
        layers=c.integer("n_layer"),
        d_model=d_model,
        heads=c.integer("n_head"),
        d_ff=c.integer("n_inner", 4 * d_model),
        ffn="mlp",
        activation=c.activation("activation_function", "gelu_new"),
        vocab=c.integer("vocab_size"),
        positions="learned",
        max_seq=c.integer(max_key, 1024),
        causal=True,
        tied_embeddings=c.flag("tie_word_embeddings", True),
        bias=True,
        norm="layernorm",
        norm_position="pre",
        head="lm" if c.arch == "GPT2LMHeadModel" else "none",
        dtype=c.dtype(),
    )


def _classes(c: _Config) -> int:
    id2label = c.data.get("id2label")
    if id2label:
        if not isinstance(id2label, dict):
            raise c.fail(f"key 'id2label': value {id2label!r}: expected a mapping of labels")
        return len(id2label)
    return c.integer("num_labels", 2)


def _bert(c: _Config, notes: list[str]) -> dict:
    c.require("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    kind = c.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise c.fail(f"key 'position_embedding_type': value {kind!r}: only 'absolute' is supported")
    if c.flag("is_decoder", False):
        raise c.fail("key 'is_decoder': value True: a causal BERT is not supported")
    spec = dict(
        layers=c.integer("num_hidden_layers"),
        d_model=c.integer("hidden_size"),
        heads=c.integer("num_attention_heads"),
        d_ff=c.integer("intermediate_size"),
        ffn="mlp",
        activation=c.activation("hidden_act", "gelu"),
        vocab=c.integer("vocab_size"),
        positions="learned",
        max_seq=c.integer("max_position_embeddings", 512),
        token_types=c.integer("type_vocab_size", 2, minimum=0),
        causal=False,
        tied_embeddings=c.flag("tie_word_embeddings", True),
        bias=True,
        norm="layernorm",
        norm_position="post",
        dtype=c.dtype(),
    )
    if c.arch == "BertForSequenceClassification":
        spec.update(head="cls", classes=_classes(c))
    elif c.arch in ("BertForMaskedLM", "BertForPreTraining"):
        spec.update(head="lm", lm_transform=True)  # dense + activation + LayerNorm, logits bias
        if c.arch == "BertForPreTraining":
            d = spec["d_model"]
            notes.append(f"the pooler (dense + tanh on the first token) and the next-sentence head "
                         f"(Linear(d_model, 2)) are not modelled ({d * d + d + 2 * d + 2:,} parameters, "
                         f"2 * batch * d_model * (d_model + 2) FLOPs forward)")
    else:
        spec["head"] = "none"
        notes.append(f"BertModel's pooler (dense + tanh on the first token, {spec['d_model'] ** 2 + spec['d_model']:,} "
                     f"parameters) is not modelled: head none")
    return spec


_T5_ENCODER_DECODERS = {"T5ForConditionalGeneration", "T5Model", "MT5ForConditionalGeneration", "MT5Model",
                        "UMT5ForConditionalGeneration", "UMT5Model"}
_SWITCH = {"SwitchTransformersForConditionalGeneration", "SwitchTransformersModel"}
_SWITCH_ENCODER = "SwitchTransformersEncoderModel"  # the encoder stack alone


def _t5_stacks(c: _Config, notes: list[str], ffn: str, activation: str) -> dict:
    """What T5, mT5, UMT5 and Switch share: RMSNorm pre-norm, no biases, d_kv-wide heads, T5's
    relative position bias (one table of buckets x heads per stack, in the first layer; UMT5: one
    per self-attention layer, set by _t5), and for
    an encoder-decoder class `num_layers` encoder blocks and `num_decoder_layers` decoder blocks."""
    c.require("d_model", "d_ff", "num_heads", "d_kv", "num_layers", "vocab_size")
    both = c.arch in _T5_ENCODER_DECODERS or c.arch in _SWITCH
    lm = c.arch.endswith("ForConditionalGeneration")  # the Model classes: the decoder's hidden states
    spec = dict(
        layers=c.integer("num_decoder_layers", c.integer("num_layers")) if both else c.integer("num_layers"),
        d_model=c.integer("d_model"), heads=c.integer("num_heads"), d_head=c.integer("d_kv"),
        d_ff=c.integer("d_ff"), ffn=ffn, activation=activation, vocab=c.integer("vocab_size"),
        positions="relative", relative_buckets=c.integer("relative_attention_num_buckets", 32),
        max_seq=c.integer("n_positions", 512), causal=both,
        tied_embeddings=c.flag("tie_word_embeddings", True), bias=False, norm="rmsnorm", norm_position="pre",
        head="lm" if lm else "none", dtype=c.dtype(),
    )
    if both:
        spec["encoder_layers"] = c.integer("num_layers")
    if not lm:
        notes.append(f"{c.arch}: no LM head (the {'decoder' if both else 'encoder'}'s hidden states)")
    return spec


def _t5(c: _Config, notes: list[str]) -> dict:
    """T5, mT5, UMT5: encoder-decoders (the ForConditionalGeneration and Model classes) or the
    encoder stack (EncoderModel); see the module docstring."""
    proj = c.get("feed_forward_proj", "relu")
    parts = str(proj).split("-")
    gated = len(parts) == 2 and parts[0] == "gated"
    if len(parts) > 2 or (len(parts) == 2 and not gated):
        raise c.fail(f"key 'feed_forward_proj': value {proj!r}: expected ACT or gated-ACT")
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]  # as transformers' T5Config does
    if act not in ACTIVATIONS:
        raise c.fail(f"key 'feed_forward_proj': value {proj!r}: activation {act!r} not supported "
                     f"(one of {', '.join(ACTIVATIONS)})")
    spec = _t5_stacks(c, notes, "gated" if gated else "mlp", ACTIVATIONS[act])
    if c.arch.startswith("UMT5"):  # a relative-position table in every self-attention layer
        spec["relative_bias"] = "layer"
    _t5_head_notes(c, notes, spec, scaled=c.data.get("scale_decoder_outputs", spec["tied_embeddings"])
                   and not c.arch.startswith("MT5"))
    return spec


def _t5_head_notes(c: _Config, notes: list[str], spec: dict, scaled: bool) -> None:
    if spec["head"] != "lm":
        return
    if not spec["tied_embeddings"] and c.arch not in _SWITCH:
        notes.append("tie_word_embeddings false: transformers 5.24 builds a tied LM head from this config "
                     "(its T5-family configs force tie_word_embeddings) and unties it when loading a checkpoint "
                     "that stores both tensors; flopsim counts the untied head the checkpoint holds")
    if scaled:
        notes.append("tied LM head: the decoder output is scaled by d_model ** -0.5 (an elementwise op, not costed)")


def _switch_sparse(layers: int, sparse_layers: int) -> set:
    """transformers' SwitchTransformersStack: step = layers // sparse_layers (layers when 0);
    block i holds experts when i % step == 1 or step == 1."""
    step = layers // sparse_layers if sparse_layers > 0 else layers
    return {i for i in range(layers) if step > 0 and (i % step == 1 or step == 1)}


def _switch_every(c: _Config, notes: list[str], enc_layers: int, dec_layers: int) -> Optional[int]:
    """flopsim's moe.every (block j of a stack routed when (j + 1) % every == 0, in both stacks)
    for transformers' sparse blocks; None when no block is sparse. The same blocks when some
    `every` gives them; else the same number in each stack (placement noted: the blocks are
    alike, so every total is equal); else an error."""
    enc = _switch_sparse(enc_layers, c.integer("num_sparse_encoder_layers", 3, minimum=0))
    dec = _switch_sparse(dec_layers, c.integer("num_sparse_decoder_layers", 3, minimum=0))
    if not enc and not dec:
        return None
    routed = lambda n, every: {i for i in range(n) if (i + 1) % every == 0}  # noqa: E731
    candidates = range(1, max(enc_layers, dec_layers) + 2)
    for every in candidates:
        if routed(enc_layers, every) == enc and routed(dec_layers, every) == dec:
            return every
    for every in candidates:
        if len(routed(enc_layers, every)) == len(enc) and len(routed(dec_layers, every)) == len(dec):
            notes.append(f"transformers' sparse blocks (encoder {sorted(enc)}, decoder {sorted(dec)}: i % step == 1) "
                         f"sit elsewhere than flopsim's moe.every {every} ((j + 1) % {every} == 0); as many in each "
                         f"stack, and the blocks are alike: every total is equal, the per-layer breakdown is not")
            return every
    raise c.fail(f"sparse blocks encoder {sorted(enc)} of {enc_layers}, decoder {sorted(dec)} of {dec_layers} "
                 f"(num_sparse_encoder_layers, num_sparse_decoder_layers): no moe.every gives as many in both "
                 f"stacks")


def _switch(c: _Config, notes: list[str]) -> dict:
    """Switch Transformers: T5 (v1.0: relu MLP, tied head) with top-1 experts in every
    `encoder_sparse_step`-th FFN of each stack (see the module docstring)."""
    spec = _t5_stacks(c, notes, "mlp", c.activation("dense_act_fn", "relu"))
    # the EncoderModel: its one stack is the encoder (no decoder blocks, so none sparse)
    stacks = (spec["layers"], 0) if c.arch == _SWITCH_ENCODER else (spec["encoder_layers"], spec["layers"])
    every = _switch_every(c, notes, *stacks)
    _t5_head_notes(c, notes, spec, scaled=spec["tied_embeddings"])
    if every is None:
        notes.append("no sparse block: a dense model")
        return spec
    capacity = c.integer("expert_capacity", 64)
    spec["family"] = "moe"
    spec["moe"] = dict(experts=c.integer("num_experts", 8), top_k=1, d_expert=spec["d_ff"], capacity_factor=None,
                       every=every, kernel="loop", router_bias=c.flag("router_bias", False), routing="token_choice")
    notes.append(f"expert_capacity {capacity}: transformers drops a sequence's tokens beyond {capacity} per expert "
                 f"and runs each expert on its routed tokens only (a loop over the experts hit): its expert FLOPs "
                 f"are those of the tokens kept, at most flopsim's dropless count and equal to it when no expert "
                 f"gets more than {capacity} tokens of one sequence (always for sequences of <= {capacity})")
    notes.append("the router runs in router_dtype (float32) whatever the dtype; its jitter noise and z-loss "
                 "are elementwise (not costed)")
    return spec


def _attention(c: _Config, notes: list[str], attention: Optional[str]) -> str:
    """The spec's attention_impl: `attention` when given, else the config's attn_implementation
    (as transformers reads it), else transformers' default for the class (sdpa: fused; eager,
    noted, for the classes without an SDPA path). A fused kernel that torch's CPU SDPA would
    not run in training is noted."""
    key = next((k for k in ("attn_implementation", "_attn_implementation") if c.data.get(k) is not None), None)
    if attention is not None:
        impl = attention_impl(attention, f"{c.source}: attention")
    elif key is not None:
        impl = attention_impl(c.data[key], f"{c.source}: {c.arch}: key '{key}'")
    elif c.arch in _EAGER_DEFAULT:
        notes.append(f"{c.arch} has no SDPA path in transformers, which runs it with eager attention: attention "
                     f"explicit (a flash kernel with soft-capping or sinks: `--attention fused`)")
        return "explicit"
    else:
        impl = "fused"
    if c.arch in ARCHITECTURES and ARCHITECTURES[c.arch] in (_t5, _switch):
        # transformers has no SDPA path for Switch: it runs eagerly unless asked otherwise
        switch = c.arch in _SWITCH or c.arch == _SWITCH_ENCODER
        return _relative_attention(c, notes, impl if not switch or attention or key else "explicit")
    if impl == "explicit":
        return impl
    dropout = next((c.data[k] for k in ATTENTION_DROPOUT if isinstance(c.data.get(k), (int, float))
                    and not isinstance(c.data.get(k), bool) and c.data[k] > 0), None)
    cpu = ("training on CPU, torch's SDPA then runs attention as plain products (Q K^T, softmax, P V: "
           "4 backward products, not the fused kernel's 5; CUDA's fused kernels take it): count that run with "
           "attention 'explicit' (`--attention explicit`, or attn_implementation eager in the config)")
    if dropout is not None:
        notes.append(f"attention dropout {dropout}: {cpu}")
    if c.arch in ARCHITECTURES and ARCHITECTURES[c.arch] is _deepseek:
        notes.append("latent attention's query and key heads (d_nope + d_rope) are wider than its value heads "
                     "(d_v): torch's CPU SDPA then runs attention as plain products in every phase (the same "
                     "FLOPs forward; in training 4 backward products, not the fused kernel's 5): count a CPU "
                     "training run with attention 'explicit' (`--attention explicit`)")
    return impl


def _relative_attention(c: _Config, notes: list[str], impl: str) -> str:
    """T5's relative position bias is added to explicit scores (flopsim's positions relative):
    explicit whatever kernel runs it; a fused one is noted."""
    if impl == "fused":
        notes.append("T5's relative position bias is added to the scores: attention explicit. transformers' SDPA "
                     "takes it as a float mask and runs the same two products in forward, prefill and decode; "
                     "training on CPU, self-attention (whose bias needs a gradient) runs the plain products "
                     "(4 backward, as flopsim counts), while an encoder-decoder's cross-attention (a bias of zeros, "
                     "no gradient) runs the fused kernel, whose backward recomputes the scores: 2 B heads S S_enc "
                     "d_head FLOPs more per decoder layer; a CUDA kernel taking the bias's gradient recomputes "
                     "the self-attention's scores too")
    return "explicit"


ARCHITECTURES: dict[str, Callable[[_Config, list], dict]] = {
    "LlamaForCausalLM": _llama,
    "MistralForCausalLM": _llama,
    "Qwen2ForCausalLM": _llama,
    "Qwen3ForCausalLM": _llama,
    "MixtralForCausalLM": _mixtral,
    "Qwen2MoeForCausalLM": _qwen_moe,
    "Qwen3MoeForCausalLM": _qwen_moe,
    "DeepseekV2ForCausalLM": _deepseek,
    "DeepseekV3ForCausalLM": _deepseek,
    "Gemma2ForCausalLM": _gemma,
    "Gemma3ForCausalLM": _gemma,
    "Gemma3ForConditionalGeneration": _gemma3_multimodal,
    "GptOssForCausalLM": _gpt_oss,
    "GPT2LMHeadModel": _gpt2,
    "GPT2Model": _gpt2,
    "BertForSequenceClassification": _bert,
    "BertForMaskedLM": _bert,
    "BertForPreTraining": _bert,
    "BertModel": _bert,
    **{arch: _t5 for arch in sorted(_T5_ENCODER_DECODERS)},
    "T5EncoderModel": _t5,
    "MT5EncoderModel": _t5,
    "UMT5EncoderModel": _t5,
    "SwitchTransformersForConditionalGeneration": _switch,
    "SwitchTransformersModel": _switch,
    _SWITCH_ENCODER: _switch,
}

# a config without `architectures`: its model_type's usual architecture
MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gemma3": "Gemma3ForConditionalGeneration",
    "gpt_oss": "GptOssForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "bert": "BertModel",
    "t5": "T5ForConditionalGeneration",
    "mt5": "MT5ForConditionalGeneration",
    "umt5": "UMT5ForConditionalGeneration",
    "switch_transformers": "SwitchTransformersForConditionalGeneration",
}


def architecture(config: dict, source: str = "config") -> str:
    archs = config.get("architectures")
    if archs:
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise SpecError(f"{source}: key 'architectures': value {archs!r}: expected a list of class names")
        known = [a for a in archs if a in ARCHITECTURES]
        arch = known[0] if known else archs[0]
    else:
        model_type = config.get("model_type")
        if model_type is None:
            raise SpecError(f"{source}: config has neither 'architectures' nor 'model_type'; "
                            f"is it a Hugging Face config.json?")
        if not isinstance(model_type, str):
            raise SpecError(f"{source}: key 'model_type': value {str(model_type)[:60]!r}: expected a name")
        arch = MODEL_TYPES.get(model_type, f"model_type {model_type!r}")
    if arch not in ARCHITECTURES:
        raise SpecError(f"{source}: architecture {arch} is not supported (supported: {', '.join(ARCHITECTURES)})")
    return arch


def convert(config: dict, name: str, source: Optional[str] = None, attention: Optional[str] = None) -> tuple:
    """(ModelSpec, notes): the spec and, one line each, what flopsim does not model for it.
    `attention` (eager, sdpa, ... or explicit, fused) overrides the config's attn_implementation."""
    from flopsim.spec.loader import validate
    from flopsim.spec.model import ModelSpec

    source = source or name
    if not isinstance(config, dict):
        raise SpecError(f"{source}: expected a JSON object (a Hugging Face config.json), got {type(config).__name__}")
    arch = architecture(config, source)
    c = _Config(config, arch, source)
    notes: list[str] = []
    fields = ARCHITECTURES[arch](c, notes)
    fields["attention_impl"] = _attention(c, notes, attention)
    return validate(ModelSpec, {"name": name, **fields}, f"{source} ({arch})"), notes


def hf_to_spec(config: dict, name: str, source: Optional[str] = None, attention: Optional[str] = None):
    """A ModelSpec from a parsed Hugging Face config dict."""
    return convert(config, name, source, attention)[0]


def spec_name(path: Path) -> str:
    """`.../Meta-Llama-3-8B/config.json` -> Meta-Llama-3-8B; `gpt2.json` -> gpt2."""
    if path.stem == "config" and path.resolve().parent.name:
        return path.resolve().parent.name
    return path.stem or "hf-model"


def read_config(path) -> tuple[dict, Path]:
    from flopsim.spec.reading import parse_json, read_input_text

    path = Path(path)
    try:
        if path.is_dir():
            path = path / "config.json"
        exists = path.exists()
    except OSError:
        exists = False
    if not exists:
        raise SpecError(f"{str(path)[:120]}: no such file (expected a Hugging Face config.json)")
    config = parse_json(read_input_text(path, "Hugging Face config.json"), str(path))
    if not isinstance(config, dict):
        raise SpecError(f"{path}: expected a JSON object (a Hugging Face config.json), got {type(config).__name__}")
    return config, path


def load_hf_config(path, attention: Optional[str] = None):
    """A ModelSpec from a Hugging Face config.json (or a folder holding one), offline."""
    config, path = read_config(path)
    return hf_to_spec(config, spec_name(path), str(path), attention)


def load_hf_config_with_notes(path, attention: Optional[str] = None) -> tuple:
    """(ModelSpec, notes) from a Hugging Face config.json."""
    config, path = read_config(path)
    return convert(config, spec_name(path), str(path), attention)
