"""The model spec (docs/design.md, "Model spec" -- a contract).

A `ModelSpec` is the validated, immutable description of one model. Every
dimension is a positive integer; defaults follow docs/design.md (`kv_heads` =
`heads`, `d_head` = `d_model // heads`). Only the block of the spec's own
family may be present (`mode` needs `mod` and `moe` as well); anything
unknown, missing, out of range or inconsistent raises a pydantic
ValidationError that `flopsim.spec.loader` turns into one line naming the
field and the value.

Extensions to the contract (all optional, defaults keep the contract's
meaning):
- `norm_position`: `pre` (GPT-2, Llama: norm before each sub-block, final
  norm) or `post` (BERT: norm after each residual, embedding norm, no final
  norm).
- `token_types`: size of BERT's token-type embedding (0: none).
- `activation`: the FFN non-linearity (gelu, relu, silu, gelu_tanh, or
  silu_clamped: GPT-OSS's gated unit, (clamp(up, -7, 7) + 1) * g * sigmoid(1.702 g)
  with g = min(gate, 7), `ffn: gated` only); it sets the elementwise cost only.
- `attention_impl`: `fused` (one scaled-dot-product-attention kernel; its
  backward recomputes the scores, 5 batched products) or `explicit` (two
  batched products and a softmax; backward 4 products).
- `loss_impl` (train): the training loss's kernels. `fused` (default): one
  softmax cross-entropy kernel per pass reading the logits in `dtype` (a
  fused loss: flash-attn's, Transformer Engine's, torch.compile's).
  `fp32_unfused`: Megatron-LM's vocab_parallel_cross_entropy without
  --cross-entropy-loss-fusion (and Megatron-DeepSpeed's CrossEntropy): the
  logits cast to fp32, then max, subtract, exp, sum and divide as separate
  kernels over the fp32 copy (the softmax kept for backward), whose backward
  scales the softmax in place and casts the gradient back to `dtype`
  (flopsim.ops.primitives.cross_entropy).
- `norm_impl`: the RMSNorm's kernels. `fused` (default): one kernel a pass,
  reading the input and writing the output in `dtype` (Transformer Engine,
  Apex, Liger, torch.compile, PyTorch's fused rms_norm on a GPU).
  `fp32_unfused`: the eager form of transformers' LlamaRMSNorm, Meta's
  reference and IBM fms's LayerNormParameterized(use_high_precision_pow):
  x cast to fp32, pow, mean, add eps, rsqrt, multiply, cast back, times the
  weight, each a kernel, and autograd's backward through them (8 + 16
  kernels in bf16; flopsim.ops.primitives.rmsnorm_fp32_unfused).
- `rope_impl`: RoPE's kernels (`positions: rope`). `fused` (default): one
  kernel over the query and key heads, the angles made on chip. The eager
  forms, each aten op a kernel, run on the queries and on the keys apart
  (flopsim.ops.primitives.rope_eager): `rotate_half` (transformers'
  apply_rotary_pos_emb: q * cos + rotate_half(q) * sin in `dtype`, 5 + 7
  kernels a tensor), `complex_fp32` (Meta's reference and torchtitan's
  apply_rotary_emb: q in fp32 viewed as complex, times the complex
  frequencies, cast back; 3 + 4 in bf16), `pairs_fp32` (IBM fms's
  RotaryEmbedding of 2024: a 2 x 2 rotation matrix per pair of q in fp32,
  broadcast product and sum, cast back, the matrices gathered per position
  each layer; 4 + 4 in bf16).
- `act_impl`: a gated FFN's activation. `fused` (default): act(gate) * up
  as one kernel. `unfused`: eager code's `act_fn(gate) * up`, the
  activation and the product two kernels, their backward three
  (flopsim.ops.primitives.gated_activation_unfused).
- `kv_cache_reads` (decode): how often a step's attention kernel loads a cached
  key/value head: `per_kv_head` (once, shared by the query heads of its group:
  FlashAttention, FlashDecoding, TensorRT-LLM's XQA) or `per_query_head` (once per
  query head: a kernel that runs one thread block per query head and sequence, as
  TensorRT-LLM's masked multi-head attention kernel does for GQA before XQA, v0.8);
  the KV-cache bytes read at decode are then heads / kv_heads times as many.
- `qkv_bias`: the fused q/k/v projection's bias, when it differs from the
  spec's `bias` (Qwen2: biases on q, k and v only, none on the output
  projection, the MLP or the norms); None (the default) follows `bias`.
- `lm_transform` (head lm only): BERT's masked-LM head, which transforms the
  hidden states before the LM product (dense d_model x d_model with the
  spec's bias, the activation, a norm) and adds an output bias of `vocab`
  to the logits (owned by the head even when the weight is tied).
- `encoder_layers` > 0 makes an encoder-decoder (T5, Switch, the Scaling
  Transformers' 800M model; flopsim.families.encoder_decoder): that many
  bidirectional encoder blocks over S_enc tokens, then `layers` causal decoder
  blocks, each with cross-attention to the encoder's output. Every other field
  describes both stacks (one d_model, heads, d_ff; an MoE's `every` counts
  blocks within each stack, as Switch places its experts). Families: dense,
  moe and sparse_ff in both stacks; `mod` routes the decoder only (dense
  encoder blocks; decoder block j routed when (j + 1) % every == 0, its
  cross-attention on the kept tokens); `length_reduction` drops tokens in the
  encoder only (`keep` lists the encoder's `encoder_layers` layers; the dense
  decoder cross-attends to the tokens leaving its last layer). Both refuse
  `positions: relative` there (the bias would be gathered per sequence).
  `mode` is refused (a staged MoDE decoder would need a MoE-aware reference
  for both stacks; not modelled).
- `positions: relative`: T5's relative position bias, one table of
  `relative_buckets` x heads per stack, looked up once per stack and added to
  every layer's scores (an explicit attention kernel: attention_impl explicit).
  `relative_bias: layer` (UMT5) gives every self-attention layer its own
  table instead: each layer computes and adds its own bias
  (`block.{i}.attn.relative_bias`), no table per stack; `stack` (default) is
  T5's one table per stack. Only with `positions: relative`.
- `dropout: {attention: p, hidden: q}` (training only; the default 0 runs
  none, and inference never does: nn.Dropout is the identity there):
  `attention` drops the attention probabilities before P V (an explicit
  attention runs it as its own kernel, `attn.core.dropout`; a fused kernel
  drops them inside, its bytes unchanged), `hidden` the embeddings' output
  (`embed.dropout`) and each sub-block's output before its residual add
  (`attn_dropout`, `mlp_dropout`): Megatron-LM's attention_dropout and
  hidden_dropout, GPT-2's attn_pdrop and resid_pdrop / embd_pdrop.
  Probabilities in [0, 1); dense, moe and sparse_ff models, not
  encoder-decoders; `attention` not with `mla` (flopsim.families.dense).
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DTYPE_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
WEIGHT_BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "fp8": 8, "int8": 8, "int4": 4, "fp4": 4}

Family = Literal["dense", "mod", "moe", "mode", "sparse_ff", "length_reduction"]
FAMILY_BLOCKS = ("mod", "moe", "mode", "sparse_ff", "length_reduction")
# which optional blocks each family needs (and is allowed to have)
FAMILY_NEEDS: dict[str, tuple[str, ...]] = {
    "dense": (),
    "mod": ("mod",),
    "moe": ("moe",),
    "mode": ("mod", "moe", "mode"),
    "sparse_ff": ("sparse_ff",),
    "length_reduction": ("length_reduction",),
}


# Bounds no real model comes near (layers ~10^2, widths ~10^4, vocabularies ~10^5-10^6,
# contexts ~10^6): a value beyond one is a typo, and would make counting hang.
MAX_LAYERS = 10_000
MAX_SIZE = 2 ** 30  # widths, heads, experts, vocabulary, ranks, block sizes
MAX_TOKENS = 2 ** 40  # max_seq
Size = Annotated[int, Field(ge=1, le=MAX_SIZE)]
Count = Annotated[int, Field(ge=0, le=MAX_SIZE)]  # may be 0 (none)


class _Strict(BaseModel):
    """Every spec block: unknown fields refused, types strict (no `true` for 1, no "16"
    for 16, no 0 for false), numbers finite (no .inf, no .nan)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class ModBlock(_Strict):
    """Mixture-of-Depths (Raposo et al. 2024; flopsim.families.mod): in block i with
    (i + 1) % every == 0 the top k = ceil(capacity * S) tokens per sequence run the
    block; predictor_hidden > 0 adds the sampling predictor d_model -> h -> 1."""

    capacity: float = 0.125
    every: Size = 2
    predictor_hidden: Count = 0
    # decode: the keep rate by position, a measured profile over len(list) equal bins of
    # positions 0 .. max_seq - 1 (positions beyond take the last bin's); None: capacity
    keep_by_position: Optional[list[Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]]] = None
    # decode: "copy" -- the running sequences' cached keys and values are copied out of the
    # batch's cache (advanced indexing, as eager PyTorch and the reference run it);
    # "in_place" -- the attention reads them where they are (an indexed or paged kernel)
    decode_cache: Literal["copy", "in_place"] = "copy"

    @field_validator("keep_by_position")
    @classmethod
    def _profile(cls, value):
        if value is not None and not value:
            raise ValueError("must list at least one keep rate")
        return value

    @field_validator("capacity")
    @classmethod
    def _capacity_fraction(cls, value):
        if not 0 < value <= 1:  # also rejects NaN
            raise ValueError("must be in (0, 1]: the fraction of each sequence's tokens a routed block runs")
        return value


class Popularity(_Strict):
    """How often the router picks each expert (flopsim.ops.popularity): give `zipf` (the
    exponent s: the expert of popularity rank r gets a share proportional to r^-s, ranks most
    popular first) or `histogram` (the (token, expert) pairs each expert received, in expert-id
    order; a list, or in a spec file the name of a file of numbers beside it). Neither: uniform."""

    zipf: Optional[float] = Field(None, ge=0, le=10)
    histogram: Optional[list[Annotated[float, Field(ge=0, allow_inf_nan=False)]]] = None

    @model_validator(mode="after")
    def _one_of(self):
        if self.zipf is not None and self.histogram is not None:
            raise ValueError("give zipf or histogram, not both")
        if self.histogram is not None and not sum(self.histogram) > 0:
            raise ValueError("histogram: every count is 0")
        return self


class MoeBlock(_Strict):
    """Mixture-of-Experts FFN (flopsim.families.moe); `d_expert` defaults to the spec's `d_ff`.
    capacity_factor null: dropless token choice; token_choice runs
    ceil(capacity_factor * top_k * tokens / experts) slots per expert,
    expert_choice ceil(capacity_factor * tokens / experts)."""

    experts: Size = 8
    top_k: Size = 2
    d_expert: Optional[Size] = None
    shared_experts: Count = 0
    # Qwen2-MoE: the shared experts' output scaled by sigmoid(x W_g), W_g a d_model x 1 gate
    shared_expert_gate: bool = False
    capacity_factor: Optional[float] = Field(None, gt=0)
    every: Size = 1
    routing: Literal["token_choice", "expert_choice"] = "token_choice"
    # grouped: the (token, expert) pairs sorted by expert, one product per expert (grouped GEMM);
    # gather: each pair indexes its expert's weights into a copy, then one batched
    # matrix-vector product (simple decode implementations, e.g. gpt-fast run eagerly);
    # gather_fused: the same indexing fused into the product by a compiler (gpt-fast under
    # torch.compile): each pair's expert weights are read once, no copy; dropless token
    # choice only, inference phases only; loop: the grouped products run as one matrix
    # product per expert (a Python loop, as eager implementations and flopsim's torch
    # reference run them): the same work as grouped, `experts` launches per projection
    kernel: Literal["grouped", "loop", "gather", "gather_fused"] = "grouped"
    popularity: Optional[Popularity] = None  # None: uniform routing
    # DeepSeek-MoE (DeepSeek-AI 2024, arXiv:2401.06066, 2405.04434, 2412.19437):
    # the first `first_dense` blocks keep the dense MLP of width d_ff (first_k_dense_replace)
    first_dense: Count = 0
    # the router's scores: softmax over the experts (Switch, Mixtral, DeepSeek-V2) or a
    # sigmoid per expert (DeepSeek-V3)
    gate: Literal["softmax", "sigmoid"] = "softmax"
    normalize: bool = False  # the top-k weights divided by their sum (norm_topk_prob)
    scale: float = Field(1.0, gt=0, le=1e6)  # the routed output's factor (routed_scaling_factor)
    selection_bias: bool = False  # a per-expert bias added for the choice only (V3's e_score_correction_bias)
    # group-limited routing: the experts in `groups` groups; each token picks among the
    # experts of its `top_groups` best groups (DeepSeek-V2: a group's best score; V3: the
    # sum of its best two)
    groups: Size = 1
    top_groups: Size = 1
    router_bias: bool = False  # the router's product has a bias (GPT-OSS)

    @model_validator(mode="after")
    def _top_k_le_experts(self):
        if self.top_k > self.experts:
            raise ValueError(f"top_k {self.top_k} exceeds experts {self.experts}")
        if self.popularity is not None and self.popularity.histogram is not None \
                and len(self.popularity.histogram) != self.experts:
            raise ValueError(f"popularity.histogram has {len(self.popularity.histogram)} counts for "
                             f"{self.experts} experts")
        if self.shared_expert_gate and not self.shared_experts:
            raise ValueError("shared_expert_gate needs shared_experts > 0 (it scales their output)")
        if self.kernel not in ("grouped", "loop") and (self.capacity_factor is not None
                                                       or self.routing != "token_choice"):
            raise ValueError(f"kernel {self.kernel} runs dropless token choice (capacity_factor null, "
                             f"routing token_choice)")
        if self.experts % self.groups:
            raise ValueError(f"groups {self.groups} does not divide experts {self.experts}")
        if self.top_groups > self.groups:
            raise ValueError(f"top_groups {self.top_groups} exceeds groups {self.groups}")
        if self.top_k > self.top_groups * (self.experts // self.groups):
            raise ValueError(f"top_k {self.top_k} exceeds the experts of the top_groups {self.top_groups} groups "
                             f"({self.top_groups * (self.experts // self.groups)})")
        if self.groups > 1 and self.routing != "token_choice":
            raise ValueError("groups: group-limited routing is token choice (routing: token_choice)")
        if self.routing == "expert_choice" and self.capacity_factor is None:
            raise ValueError("routing expert_choice needs a capacity_factor (tokens per expert)")
        if self.routing == "expert_choice" and self.capacity_factor > self.experts:
            raise ValueError(f"expert_choice capacity_factor {self.capacity_factor} exceeds experts "
                             f"{self.experts} (an expert cannot pick more than every token)")
        return self


class ModeBlock(_Strict):
    """MoD + MoE (Raposo et al. 2024, section 3.6; flopsim.families.mode): `staged`
    (MoD top-k around the block, an MoE FFN among the kept tokens) or `integrated`
    (one router over the experts plus a no-op expert; each expert runs
    ceil(capacity_factor * mod.capacity * top_k * N / experts) slots)."""

    variant: Literal["staged", "integrated"] = "staged"


class SparseFFBlock(_Strict):
    """Scaling Transformers' sparse FF (Jaszczur et al. 2021; flopsim.families.sparse_ff):
    one active unit per block of `block_size` FF units, chosen by a low-rank controller
    d_model -> d_lowrank -> d_ff. (Sparse QKV is the spec's own `sparse_qkv` block.)"""

    block_size: Size = 32
    d_lowrank: Size = 64

    @model_validator(mode="before")
    @classmethod
    def _moved_fields(cls, data):
        for name in ("sparse_qkv", "conv_kernel"):
            if isinstance(data, dict) and name in data:
                raise ValueError(f"sparse_ff.{name} has moved: give the spec's own sparse_qkv block, "
                                 f"sparse_qkv: {{modules: S, conv_kernel: K}} (any family)")
        return data


class SlidingWindow(_Strict):
    """Sliding-window attention (flopsim.families.dense): a local layer attends to the last
    `size` positions (itself included) and keeps only their keys and values; with
    `global_every` n, layer i is global (full attention) when (i + 1) % n == 0 (Gemma 2:
    n = 2; Gemma 3: 6); without it every layer is local (Mistral)."""

    size: Size
    global_every: Optional[Size] = None


class SparseQKVBlock(_Strict):
    """Scaling Transformers' sparse QKV (Jaszczur et al. 2021; flopsim.families.dense), on
    any model: the QKV projection becomes `modules` S modules of d_model / S, a
    multiplicative layer, then conv_kernel x conv_kernel convolutions over (length,
    modules) for Q and K and conv_kernel x 1 for V."""

    modules: Size
    conv_kernel: Size = 3

    @field_validator("conv_kernel")
    @classmethod
    def _odd_kernel(cls, k):
        if k % 2 == 0:
            raise ValueError(f"conv_kernel {k} must be odd (same padding over the modules)")
        return k


class MLABlock(_Strict):
    """Multi-head latent attention (DeepSeek-V2, arXiv:2405.04434, section 2.1;
    flopsim.families.mla): keys and values come from a `kv_rank` latent per token (the
    only thing cached, with one shared rotary key of `d_rope`); queries through a
    `q_rank` latent (None: one projection). Each head's query and key have a `d_nope`
    part from the latents and a `d_rope` rotary part; its value is `d_v` wide. Decode
    runs `absorbed` (the key and value up-projections folded into the query and the
    output, attention over the latents) or `expanded` (the cached latents up-projected)."""

    kv_rank: Size
    q_rank: Optional[Size] = None
    d_nope: Size = 128
    d_rope: Size = 64
    d_v: Size = 128
    decode: Literal["absorbed", "expanded"] = "absorbed"

    @field_validator("d_rope")
    @classmethod
    def _even_rope(cls, value):
        if value % 2:
            raise ValueError(f"d_rope {value} must be even (rotary pairs)")
        return value


class Precision(_Strict):
    """Precision per tensor class (flopsim.ops.primitives), each defaulting to the spec's
    `dtype` (which stays the activations' dtype):
    - `weights`: how the matrix products' weights are stored (Linear layers, routers and
      experts; embedding tables, norms and biases stay in `dtype`, and so does a tied LM
      head, which reads the embedding table). int4 and int8 carry
      one scale (and zero point) of `scale_bytes` per `group_size` weights, or per output
      channel when `group_size` is null; fp8 likewise (DeepSeek-V3: 128 x 128 blocks,
      group_size 16384, fp32 scales; MXFP4: fp4 with an 8-bit scale per 32, scale_bytes 1).
      `scope: experts` quantizes only the MoE experts' weights (GPT-OSS).
    - `kv_cache`: the KV cache's values (read and written by attention at decode).
    - `compute`: the dtype the matrix products run in, which sets their peak: `dtype` for
      weight-only quantization (the weights are dequantized inside the product), int8 or
      fp8 for W8A8, fp4 for W4A4 (MXFP4 / NVFP4 products on Blackwell's fp4 tensor cores;
      a device publishing no fp4 peak runs them at its fp8 one).
    Quantized weights are inference only (train reads and updates `dtype` weights)."""

    weights: Optional[Literal["fp32", "bf16", "fp16", "fp8", "int8", "int4", "fp4"]] = None
    group_size: Optional[Size] = None
    scale_bytes: Literal[1, 2, 4] = 2
    scope: Literal["all", "experts"] = "all"  # which products' weights: all, or the MoE experts' only
    kv_cache: Optional[Literal["fp32", "bf16", "fp16", "fp8", "int8"]] = None
    compute: Optional[Literal["fp32", "tf32", "bf16", "fp16", "fp8", "int8", "fp4"]] = None


class SoftCap(_Strict):
    """Logit soft-capping (Gemma 2): x -> cap * tanh(x / cap) on the attention scores
    before the softmax (`attention`) and on the LM head's logits (`logits`)."""

    attention: Optional[float] = Field(None, gt=0, le=1e6)
    logits: Optional[float] = Field(None, gt=0, le=1e6)


class LengthReductionBlock(_Strict):
    """Token dropping (flopsim.families.length_reduction): `keep[l]` tokens enter
    layer l -- counts, or fractions of S when every value is <= 1 (then keep[0]
    must be 1). Layer 0 always sees all S tokens. `predictor_hidden`: the
    contribution predictor's width (adapler, tr_bert: default 32; 0 scores with
    one Linear(d_model, 1)); power_bert and ltp score tokens by the attention
    they receive and have no predictor (0, the default for them)."""

    method: Literal["adapler", "power_bert", "ltp", "tr_bert"] = "adapler"
    keep: list[Union[Size, float]]
    predictor_hidden: Optional[Count] = None

    @property
    def fractions(self) -> bool:
        """True when `keep` lists fractions of S (every value <= 1)."""
        return all(v <= 1 for v in self.keep)

    @model_validator(mode="after")
    def _method_defaults(self):
        attention_scored = self.method in ("power_bert", "ltp")
        if self.predictor_hidden is None:
            object.__setattr__(self, "predictor_hidden", 0 if attention_scored else 32)
        elif attention_scored and self.predictor_hidden > 0:
            raise ValueError(f"predictor_hidden {self.predictor_hidden}: method {self.method} scores tokens by "
                             f"attention and has no predictor; set 0 or omit it")
        if self.fractions and self.keep[0] != 1:
            raise ValueError(f"keep[0]={self.keep[0]}: layer 0 sees every token; as a fraction keep[0] must be 1")
        return self

    @field_validator("keep")
    @classmethod
    def _keep_valid(cls, keep):
        if not keep:
            raise ValueError("keep must list at least one layer")
        for i, (a, b) in enumerate(zip(keep, keep[1:])):
            if b > a:
                raise ValueError(f"keep must be non-increasing, but keep[{i + 1}]={b} > keep[{i}]={a}")
        for i, v in enumerate(keep):
            if v <= 0:
                raise ValueError(f"keep[{i}]={v} must be positive")
        fractions = [v for v in keep if isinstance(v, float) and not float(v).is_integer()]
        if fractions and any(v > 1 for v in keep):
            raise ValueError("keep mixes fractions of S and token counts")
        return keep


class Dropout(_Strict):
    """Dropout probabilities in training (module docstring): `attention` on the attention
    probabilities, `hidden` on the embeddings' and each sub-block's output."""

    attention: float = 0.0
    hidden: float = 0.0

    @field_validator("attention", "hidden")
    @classmethod
    def _probability(cls, value):
        if not 0 <= value < 1:  # also rejects NaN
            raise ValueError(f"{value} must be in [0, 1): the probability of dropping a value")
        return value


class ModelSpec(_Strict):
    name: str = Field(min_length=1)
    family: Family = "dense"
    layers: Annotated[int, Field(ge=1, le=MAX_LAYERS)]
    d_model: Size
    heads: Size
    kv_heads: Optional[Size] = None
    d_head: Optional[Size] = None
    d_ff: Size
    ffn: Literal["mlp", "gated"] = "mlp"
    activation: Literal["gelu", "gelu_tanh", "relu", "silu", "silu_clamped"] = "gelu"
    vocab: Size
    positions: Literal["learned", "rope", "relative", "none"] = "learned"
    relative_buckets: Size = 32  # positions relative: T5's relative_attention_num_buckets
    relative_bias: Literal["stack", "layer"] = "stack"  # positions relative: a table per stack (T5) or layer (UMT5)
    max_seq: Annotated[int, Field(ge=1, le=MAX_TOKENS)] = 2048
    causal: bool = True
    tied_embeddings: bool = True
    bias: bool = True
    qkv_bias: Optional[bool] = None  # the q/k/v projection's own bias flag (Qwen2); None: `bias`
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_position: Literal["pre", "post"] = "pre"
    token_types: Count = 0
    head: Literal["lm", "cls", "none"] = "lm"
    lm_transform: bool = False
    classes: Size = 2
    dtype: Literal["fp32", "tf32", "bf16", "fp16", "fp8", "int8"] = "bf16"
    attention_impl: Literal["fused", "explicit"] = "fused"
    loss_impl: Literal["fused", "fp32_unfused"] = "fused"
    norm_impl: Literal["fused", "fp32_unfused"] = "fused"
    rope_impl: Literal["fused", "rotate_half", "complex_fp32", "pairs_fp32"] = "fused"
    act_impl: Literal["fused", "unfused"] = "fused"
    kv_cache_reads: Literal["per_kv_head", "per_query_head"] = "per_kv_head"
    mod: Optional[ModBlock] = None
    moe: Optional[MoeBlock] = None
    mode: Optional[ModeBlock] = None
    sparse_ff: Optional[SparseFFBlock] = None
    sparse_qkv: Optional[SparseQKVBlock] = None
    sliding_window: Optional[SlidingWindow] = None
    mla: Optional[MLABlock] = None
    precision: Optional[Precision] = None
    # Gemma 2/3, OLMo 2, Qwen3, GPT-OSS (flopsim.families.dense):
    sandwich_norms: bool = False  # a norm on each sub-block's output too, before its residual add
    qk_norm: bool = False  # an RMSNorm of each query and key head (over d_head) before RoPE
    scale_embeddings: bool = False  # token embeddings multiplied by sqrt(d_model)
    softcap: Optional[SoftCap] = None
    attention_sinks: bool = False  # a learned logit per head joining every softmax (GPT-OSS)
    length_reduction: Optional[LengthReductionBlock] = None
    encoder_layers: Annotated[int, Field(ge=0, le=MAX_LAYERS)] = 0  # > 0: an encoder-decoder
    dropout: Optional[Dropout] = None  # training's dropout probabilities; None: none

    @model_validator(mode="after")
    def _consistent(self):
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)
        if self.d_head is None:
            if self.d_model % self.heads:
                raise ValueError(f"d_model {self.d_model} is not divisible by heads {self.heads}; set d_head")
            object.__setattr__(self, "d_head", self.d_model // self.heads)
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} is not divisible by kv_heads {self.kv_heads}")
        needs = FAMILY_NEEDS[self.family]
        for block in FAMILY_BLOCKS:
            present = getattr(self, block) is not None
            if present and block not in needs:
                raise ValueError(f"block '{block}' is not allowed in a spec of family '{self.family}'")
            if not present and block in needs:
                if block == "mode":  # the variant has a default
                    object.__setattr__(self, "mode", ModeBlock())
                else:
                    raise ValueError(f"family '{self.family}' needs a '{block}' block")
        if self.lm_transform and self.head != "lm":
            raise ValueError(f"lm_transform transforms the hidden states before the LM head; head is {self.head!r}")
        reduced = self.encoder_layers or self.layers  # an encoder-decoder drops tokens in its encoder
        if self.length_reduction is not None and len(self.length_reduction.keep) != reduced:
            stack = "encoder_layers" if self.encoder_layers else "layers"
            raise ValueError(f"length_reduction.keep lists {len(self.length_reduction.keep)} layers, the model "
                             f"has {reduced} ({stack})")
        if self.length_reduction is not None and self.length_reduction.method in ("power_bert", "ltp") \
                and self.attention_impl != "explicit":
            raise ValueError(f"length_reduction.method {self.length_reduction.method} scores tokens by their "
                             f"attention probabilities; set attention_impl: explicit")
        if self.sparse_ff is not None:
            sf = self.sparse_ff
            if self.d_ff % sf.block_size:
                raise ValueError(f"sparse_ff.block_size {sf.block_size} does not divide d_ff {self.d_ff}")
        if self.sliding_window is not None:
            if not self.causal:
                raise ValueError("sliding_window: needs a causal model (the window looks back)")
            if self.family not in ("dense", "moe", "sparse_ff"):
                raise ValueError(f"sliding_window: family {self.family} is not supported (dense, moe, sparse_ff): "
                                 f"its blocks attend to routed or reduced tokens")
        self._check_mla()
        self._check_encoder_decoder()
        self._check_precision()
        self._check_architecture_options()
        self._check_dropout()
        profile = self.mod.keep_by_position if self.mod is not None else None
        if profile is not None and self.max_seq % len(profile):
            raise ValueError(f"mod.keep_by_position: {len(profile)} bins do not divide max_seq {self.max_seq}")
        if profile is not None and self.family == "mode":
            raise ValueError("mod.keep_by_position: a keep rate by position is modelled for family mod")
        if self.moe is not None and self.moe.first_dense >= self.layers:
            raise ValueError(f"moe.first_dense {self.moe.first_dense} leaves no MoE block in {self.layers} layers")
        if self.sparse_qkv is not None:
            s = self.sparse_qkv.modules
            if self.d_model % s:
                raise ValueError(f"sparse_qkv.modules {s} does not divide d_model {self.d_model}")
            if (self.kv_heads * self.d_head) % s:
                raise ValueError(f"sparse_qkv.modules {s} does not divide the key/value width "
                                 f"{self.kv_heads * self.d_head} (kv_heads * d_head)")
            if (self.heads * self.d_head) % s:
                raise ValueError(f"sparse_qkv.modules {s} does not divide the query width "
                                 f"{self.heads * self.d_head} (heads * d_head)")
        return self

    @property
    def qkv_has_bias(self) -> bool:
        """Whether the q/k/v projection has a bias: `qkv_bias`, else `bias`."""
        return self.bias if self.qkv_bias is None else self.qkv_bias

    def _check_architecture_options(self):
        if self.norm_impl == "fp32_unfused" and self.norm != "rmsnorm":
            raise ValueError(f"norm_impl: fp32_unfused: the eager fp32 RMSNorm; norm is {self.norm} "
                             f"(nn.LayerNorm runs one fused kernel)")
        if self.rope_impl != "fused" and self.positions != "rope":
            raise ValueError(f"rope_impl: {self.rope_impl}: RoPE's eager kernels; positions is {self.positions}")
        if self.act_impl == "unfused" and (self.ffn != "gated" or self.activation == "silu_clamped"):
            raise ValueError(f"act_impl: unfused: eager act(gate) * up; ffn is {self.ffn}, activation "
                             f"{self.activation} (a plain activation is one kernel; silu_clamped's clamps "
                             f"are not modelled eagerly)")
        if self.activation == "silu_clamped" and self.ffn != "gated":
            raise ValueError("activation silu_clamped: GPT-OSS's gated unit; needs ffn: gated")
        if self.kv_cache_reads == "per_query_head" and self.mla is not None:
            raise ValueError("kv_cache_reads: per_query_head describes a GQA/MHA kernel; multi-head latent "
                             "attention reads one latent per token")
        if self.qkv_bias is not None and (self.mla is not None or self.sparse_qkv is not None):
            raise ValueError(f"qkv_bias: the q/k/v projection of standard attention; not combined with "
                             f"{'mla' if self.mla is not None else 'sparse_qkv'} (their projections follow bias)")
        if self.sandwich_norms and self.norm_position != "pre":
            raise ValueError("sandwich_norms: adds output norms to a pre-norm block; use norm_position: pre")
        options = [name for name in ("sandwich_norms", "qk_norm", "scale_embeddings", "attention_sinks")
                   if getattr(self, name)] + (["softcap"] if self.softcap is not None else [])
        if options and self.family not in ("dense", "moe"):
            raise ValueError(f"{options[0]}: modelled for dense and moe models, not family {self.family}")
        if options and (self.mla is not None or self.sparse_qkv is not None):
            raise ValueError(f"{options[0]}: not combined with {'mla' if self.mla is not None else 'sparse_qkv'}")

    def _check_dropout(self):
        if self.dropout is None or not (self.dropout.attention or self.dropout.hidden):
            return
        if self.family not in ("dense", "moe", "sparse_ff"):
            raise ValueError(f"dropout: modelled for dense, moe and sparse_ff models, not family {self.family}")
        if self.dropout.attention and self.mla is not None:
            raise ValueError("dropout.attention: not modelled with mla (latent attention's probabilities)")
        if self.encoder_layers:
            raise ValueError("dropout: not modelled for an encoder-decoder (encoder_layers > 0)")

    def _check_precision(self):
        if not self.quantized_weights:
            return
        if self.family in ("sparse_ff", "length_reduction") or self.sparse_qkv is not None:
            raise ValueError(f"precision.weights {self.precision.weights}: quantized weights are modelled for "
                             f"Linear layers (dense, moe, mod, mode models without sparse_qkv)")
        if self.precision.scope == "experts" and self.moe is None:
            raise ValueError("precision.scope experts: the model has no MoE experts")
        if self.moe is not None and self.moe.kernel == "gather":
            raise ValueError("precision.weights: moe.kernel gather copies the experts' weights; use "
                             "gather_fused or grouped with quantized weights")

    def _check_encoder_decoder(self):
        if self.relative_bias != "stack" and self.positions != "relative":
            raise ValueError(f"relative_bias: {self.relative_bias!r} needs positions: 'relative' "
                             f"(got {self.positions!r})")
        if self.positions == "relative" and self.attention_impl != "explicit":
            raise ValueError("positions: 'relative': T5's position bias is added to explicit scores; "
                             "set attention_impl: explicit")
        if self.family in ("mod", "mode", "length_reduction") and self.positions == "relative":
            raise ValueError(f"positions: 'relative' with family {self.family}: its blocks attend among the kept "
                             f"tokens, which would need the stack's shared bias gathered per sequence; not "
                             f"modelled (use rope, learned or none)")
        if not self.encoder_layers:
            return
        if not self.causal:
            raise ValueError(f"encoder_layers {self.encoder_layers}: an encoder-decoder's decoder is causal; "
                             f"set causal: true (the encoder is bidirectional)")
        if self.family not in ("dense", "moe", "sparse_ff", "mod", "length_reduction"):
            raise ValueError(f"encoder_layers: family {self.family} is not modelled as an encoder-decoder "
                             f"(dense, moe, sparse_ff, mod, length_reduction)")
        if self.head not in ("lm", "none") or self.lm_transform or self.token_types:
            raise ValueError("encoder_layers: an encoder-decoder has an LM head (or none) on its decoder, "
                             "no token types and no lm_transform")
        for other in ("mla", "sliding_window", "softcap"):
            if getattr(self, other) is not None:
                raise ValueError(f"encoder_layers: not combined with {other}")
        if self.moe is not None and self.moe.first_dense:
            raise ValueError("encoder_layers: moe.first_dense is not modelled for an encoder-decoder")

    def _check_mla(self):
        if self.mla is None:
            return
        if self.family not in ("dense", "moe"):
            raise ValueError(f"mla: family {self.family} is not supported (dense, moe)")
        if self.positions != "rope":
            raise ValueError(f"mla: positions {self.positions!r}: latent attention's keys carry a decoupled rotary "
                             f"part; use positions: rope")
        if self.kv_heads != self.heads:
            raise ValueError(f"mla: kv_heads {self.kv_heads}: every head has its own keys from the latent; "
                             f"omit kv_heads")
        for other in ("sparse_qkv", "sliding_window"):
            if getattr(self, other) is not None:
                raise ValueError(f"mla: not combined with {other}")

    @model_validator(mode="after")
    def _routing_supported(self):
        """What Mixture-of-Depths and integrated MoDE can route, checked at load (not at counting)."""
        if self.family in ("mod", "mode") and self.norm_position != "pre":
            raise ValueError(f"norm_position {self.norm_position!r}: Mixture-of-Depths routes a pre-norm block's "
                             "residual branch (x' = r f(x) + x); use norm_position: pre")
        if self.family == "mode" and self.moe.groups > 1:
            raise ValueError(f"moe.groups {self.moe.groups}: group-limited routing is not modelled with MoDE's "
                             "routing (family moe)")
        if self.family == "mode" and self.mode.variant == "integrated":
            if self.moe.capacity_factor is None:
                raise ValueError("moe.capacity_factor null: integrated MoDE runs ceil(capacity_factor * "
                                 "mod.capacity * top_k * N / experts) slots per expert; set a capacity_factor")
            if self.moe.routing != "token_choice":
                raise ValueError(f"moe.routing {self.moe.routing!r}: integrated MoDE routes each token to experts "
                                 "or the no-op expert (token_choice)")
            if self.mod.predictor_hidden:
                raise ValueError(f"mod.predictor_hidden {self.mod.predictor_hidden}: integrated MoDE decides per "
                                 "token with its router (no predictor); use 0")
        return self

    # -- derived ---------------------------------------------------------
    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def weight_dtype(self) -> str:
        """How the matrix products' weights are stored (`precision.weights`, else `dtype`)."""
        return (self.precision and self.precision.weights) or self.dtype

    @property
    def kv_dtype(self) -> str:
        return (self.precision and self.precision.kv_cache) or self.dtype

    @property
    def compute_dtype(self) -> str:
        """The dtype the matrix products run in: their peak (`precision.compute`, else `dtype`)."""
        return (self.precision and self.precision.compute) or self.dtype

    @property
    def quantized_weights(self) -> bool:
        """Weights stored apart from the activations' dtype (or with group scales)."""
        p = self.precision
        return p is not None and ((p.weights or self.dtype) != self.dtype or p.group_size is not None)

    @property
    def kernel_impls(self) -> dict:
        """How code runs the memory-bound ops the model has: {"loss", "norm" (an RMSNorm),
        "rope" (RoPE), "activation" (a gated FFN)} -> the `*_impl` field (fused, or an eager form)."""
        has = {"loss": True, "norm": self.norm == "rmsnorm", "rope": self.positions == "rope",
               "activation": self.ffn == "gated"}
        impls = {"loss": self.loss_impl, "norm": self.norm_impl, "rope": self.rope_impl, "activation": self.act_impl}
        return {what: impl for what, impl in impls.items() if has[what]}

    @property
    def precision_label(self) -> str:
        """`bf16`, or each tensor class that differs: `bf16, weights int4 g128, KV fp8`."""
        p = self.precision
        if p is None:
            return self.dtype
        parts = [self.dtype]
        if self.quantized_weights:
            parts.append(f"weights {self.weight_dtype}" + (f" g{p.group_size}" if p.group_size else ""))
        if self.kv_dtype != self.dtype:
            parts.append(f"KV {self.kv_dtype}")
        if self.compute_dtype != self.dtype:
            parts.append(f"compute {self.compute_dtype}")
        return ", ".join(parts)

    @property
    def attention_dropout(self) -> float:
        """The training dropout of the attention probabilities (0: none)."""
        return self.dropout.attention if self.dropout is not None else 0.0

    @property
    def hidden_dropout(self) -> float:
        """The training dropout of the embeddings' and sub-blocks' outputs (0: none)."""
        return self.dropout.hidden if self.dropout is not None else 0.0

    @property
    def is_encoder(self) -> bool:
        return not self.causal

    @property
    def stack_bias(self) -> bool:
        """T5's relative position bias from one table per stack (`relative_bias: stack`)."""
        return self.positions == "relative" and self.relative_bias == "stack"

    @property
    def layer_bias(self) -> bool:
        """A relative position bias table in every self-attention layer (`relative_bias: layer`)."""
        return self.positions == "relative" and self.relative_bias == "layer"

    @property
    def is_encoder_decoder(self) -> bool:
        return self.encoder_layers > 0

    @property
    def blocks(self) -> int:
        """Blocks in all: op layers 0 .. blocks - 1 (an encoder-decoder's encoder blocks
        first); the final norm and the head are layer `blocks`."""
        return self.encoder_layers + self.layers

    def with_changes(self, **changes) -> "ModelSpec":
        """A validated copy with some fields changed (nested blocks as dicts).
        Derived defaults (kv_heads, d_head) are derived again unless given."""
        from flopsim.spec.loader import validate

        data = self.model_dump(exclude_unset=True)
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return validate(ModelSpec, data, self.name)
