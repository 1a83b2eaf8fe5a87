"""flopsim's Hugging Face import against transformers' own model classes.

For every architecture in flopsim.spec.hf.ARCHITECTURES, transformers' class is built
from a small config (2-3 layers, widths of 32, a vocabulary of 97, random weights,
float32, offline) and run under FlopCounterMode with flopsim.torchref.counting's formulas
(`aten._grouped_mm`, the MoE experts' path, and CPU SDPA), and compared with flopsim's
count of the same config imported through flopsim.spec.hf: `config.to_dict()` with
`architectures` set, attention from the attn_implementation transformers ran (eager ->
explicit, sdpa -> fused). FLOPs and parameters are equal, or differ by exactly the amount a
case states (`Gap`), derived from the modules flopsim does not model; never approximately.

Phases, B = 2 sequences of S = 7 tokens, decode attending to T = 9 keys (sliding windows
are 5 tokens, so T > W and a local layer's cache holds W); an encoder-decoder's encoder
reads S_ENC = 5 tokens (flopsim's encoder_seq):
- forward: no_grad, use_cache False, logits at every position;
- train: model.train(), the model's own loss (LM: labels = the inputs; classification: one
  label per sequence; pre-training: and the next-sentence label; no head: cross-entropy over
  the last hidden states, as flopsim's reference trains such a model) and its backward, no
  optimizer step (Adam runs no products);
- prefill: no_grad, use_cache, logits_to_keep=1 as generate() runs a prompt; an
  encoder-decoder runs its encoder and the decoder's prompt (both caches written);
- decode: one token per sequence after an uncounted prefill of T - 1 tokens (T keys); an
  encoder-decoder's decoder takes the encoder's output precomputed, as generate() does, and
  reads its cross-attention cache.

Where transformers runs something flopsim does not model the same way, the case's gap says
what and why (specs/models/hf/README.md, "Differences from transformers"):
- BERT pre-training and BertModel: the pooler (and the next-sentence head), not modelled;
- T5 family and Switch (both stacks, cross-attention, relative bias and experts modelled):
  their prefill computes every position's logits (no logits_to_keep); under SDPA in training the
  cross-attention's fused backward recomputes its scores (seq2seq_gap). Switch is built with an
  expert_capacity above any sequence, so that no token is dropped (flopsim: dropless);
- DeepSeek: transformers' decode up-projects the cached latents (flopsim's `mla.decode:
  expanded`; the import's default, absorbed, is derived against it below);
- Gemma 3 (multimodal): the vision tower and the projector (parameters; text-only input);
- CPU SDPA runs plain products in training with attention dropout, with T5's trainable
  bias, and with MLA's unequal query and value widths: flopsim's explicit count matches
  (T5's import is explicit in every phase: its bias is added to explicit scores).
A module that torch runs but no flopsim op covers is therefore never silently tolerated.

At full size (on the meta device: no memory, no initialisation) every shipped config in
specs/models/hf/ (Gemma 2 9B and Gemma 3 4B / 27B among them) and mT5's, UMT5's and Switch's
transformers default configs (Switch also with experts in every other FFN: Switch-Base-8-like)
have flopsim's parameter count, less the same parts; T5 v1.1 also less its LM head, which
transformers 5.24 ties when building T5 from a config (see full_size_gap). The shipped Gemma
files also run at the small widths with every other key as published (shipped_small): FLOPs
in the four phases, the windows from the files' own keys (Gemma 3's default pattern).
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flopsim.count import count  # noqa: E402
from flopsim.spec.hf import ARCHITECTURES, GEMMA3_TEXT_DEFAULTS, architecture, convert  # noqa: E402
from flopsim.spec.paths import specs_dir  # noqa: E402
from flopsim.torchref.counting import count_with_torch  # noqa: E402

B, S, T = 2, 7, 9
S_ENC = 5  # an encoder-decoder's encoder tokens per sequence (S_enc != S)
PHASES = ("forward", "train", "prefill", "decode")
ENCODER_PHASES = ("forward", "train")
HF = specs_dir() / "models" / "hf"

# small configs: 32 wide, 4 heads (2 key/value heads), 3 layers, vocabulary 97
DECODER = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=16)
LATENT = dict(DECODER, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=12, qk_nope_head_dim=8,
              qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
              n_shared_experts=1, first_k_dense_replace=1)
GPT2 = dict(vocab_size=97, n_embd=32, n_layer=3, n_head=4, n_positions=64)
BERT = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=64, attention_probs_dropout_prob=0.0)
# T5: heads x d_kv (24) != d_model; 2 encoder and 3 decoder blocks
T5 = dict(vocab_size=97, d_model=32, d_ff=64, d_kv=6, num_layers=2, num_decoder_layers=3, num_heads=4,
          feed_forward_proj="gated-gelu", dropout_rate=0.0)
T5_V1_0 = dict(T5, feed_forward_proj="relu")
# Switch: experts in encoder block 1 of 2 and decoder block 1 of 3 (transformers: i % step == 1, step
# = layers // sparse layers; flopsim: every 2); expert_capacity above any sequence's tokens (T = 9):
# no token is dropped, so transformers runs every token through its expert, as flopsim's dropless count
SWITCH = dict(vocab_size=97, d_model=32, d_ff=48, d_kv=8, num_layers=2, num_decoder_layers=3, num_heads=4,
              num_experts=4, expert_capacity=16, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
              dropout_rate=0.0)


def _config(name: str, **values):
    return getattr(transformers, name)(**values)


# -- what transformers runs -------------------------------------------------------------

def _accepts(model, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _seq2seq(model) -> bool:
    return _accepts(model, "encoder_outputs")


def _ids(model, g, length: int):
    vocab = model.config.get_text_config().vocab_size
    return torch.randint(0, vocab, (B, length), generator=g)


def _train_loss(model, g):
    """The model's own loss (a loss over the hidden states for a model without a head)."""
    ids = _ids(model, g, S_ENC if _seq2seq(model) else S)
    kwargs = {"decoder_input_ids": _ids(model, g, S)} if _seq2seq(model) else {}
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        kwargs["labels"] = torch.randint(0, model.config.num_labels, (B,), generator=g)
    elif name.endswith("ForPreTraining"):
        kwargs.update(labels=ids, next_sentence_label=torch.randint(0, 2, (B,), generator=g))
    elif _accepts(model, "labels"):
        kwargs["labels"] = kwargs.get("decoder_input_ids", ids)
    out = model(ids, **kwargs)
    if "labels" in kwargs:
        return out.loss
    hidden = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
    return torch.nn.functional.cross_entropy(hidden, torch.randint(0, hidden.shape[-1], (B * S,), generator=g))


def _phase_fn(model, phase: str) -> Callable[[], object]:
    """The phase as a function of no arguments; what it needs beforehand (a prefill for
    decode, the encoder's output for an encoder-decoder's decode) is run here. An
    encoder-decoder's encoder reads S_ENC tokens, its decoder S (decode: T keys)."""
    g = torch.Generator().manual_seed(0)
    seq2seq = _seq2seq(model)
    model.train(phase == "train")
    if phase == "train":
        return lambda: _train_loss(model, g).backward()
    ids = _ids(model, g, S_ENC if seq2seq else S)
    keep = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    if phase == "forward":
        extra = {"decoder_input_ids": _ids(model, g, S)} if seq2seq else {}
        return torch.no_grad()(lambda: model(ids, use_cache=False, **extra))
    if seq2seq and phase == "prefill":  # generate()'s first step: the encoder, then the decoder's prompt
        prompt = _ids(model, g, S)
        # Switch's forward hands use_cache to its encoder too, which refuses it: its decoder
        # caches by the config's use_cache (true)
        cache = {"use_cache": True} if _accepts(model, "use_cache") else {}
        assert cache or model.config.use_cache
        return torch.no_grad()(lambda: model(ids, decoder_input_ids=prompt, **cache, **keep))
    encoder = {}
    if seq2seq:  # the encoder ran at prefill: decode takes its output
        with torch.no_grad():
            encoder = {"encoder_outputs": model.get_encoder()(input_ids=ids)}

    def run(tokens, **kwargs):
        if seq2seq:
            return model(decoder_input_ids=tokens, use_cache=True, **encoder, **kwargs)
        return model(tokens, use_cache=True, **kwargs)

    if phase == "prefill":
        return torch.no_grad()(lambda: run(_ids(model, g, S), **keep))
    with torch.no_grad():
        cache = run(_ids(model, g, T - 1), **keep).cache
    step = _ids(model, g, 1)
    return torch.no_grad()(lambda: run(step, cache=cache))


def measure(model, phase: str) -> dict[str, int]:
    """FlopCounterMode's FLOPs of one phase, by module path ('' the total)."""
    return count_with_torch(_phase_fn(model, phase))


def hf_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def params_under(model, *prefixes: str) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if name.startswith(prefixes))


# -- what flopsim counts ------------------------------------------------------------------

def import_config(model, attention: Optional[str] = None, overrides: Optional[dict] = None):
    """(spec, notes): the model's config as a config.json would hold it (with a case's
    `overrides`, the keys a published config.json holds where transformers rewrites them),
    imported."""
    config = {**model.config.to_dict(), **(overrides or {})}
    config["architectures"] = [type(model).__name__]
    return convert(config, "hf-small", attention=attention or model.config._attn_implementation)


def import_default(model, overrides: Optional[dict] = None):
    """(spec, notes): as import_config, attention left to the import's default."""
    config = {k: v for k, v in model.config.to_dict().items() if "attn_implementation" not in k}
    config = {**config, **(overrides or {}), "architectures": [type(model).__name__]}
    return convert(config, "hf-small")


def flopsim_count(spec, phase: str):
    return count(spec, batch=B, seq=S, phase=phase, context=T if phase == "decode" else None,
                 encoder_seq=S_ENC if spec.is_encoder_decoder else None)


# -- the cases ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Gap:
    """transformers minus flopsim: FLOPs and parameters, derived for the case."""

    flops: int = 0
    params: int = 0


NO_GAP = lambda case, phase, model, measured, spec: Gap()  # noqa: E731


@dataclass(frozen=True)
class Case:
    arch: str
    config: Callable[[], object]
    phases: tuple = PHASES
    attn: Optional[str] = None  # the attn_implementation transformers is asked for
    gap: Callable = NO_GAP
    # phases in which torch's CPU SDPA runs plain products: flopsim counts them explicit
    cpu_explicit: tuple = ()
    # spec changes in a phase where transformers runs another of flopsim's forms
    forms: dict = field(default_factory=dict)
    tag: str = ""  # tells apart the cases of one architecture
    # config.json keys as published where transformers' config rewrites them (T5 v1.1's
    # tie_word_embeddings false), and the model as from_pretrained makes it (`prepare`)
    overrides: dict = field(default_factory=dict)
    prepare: Optional[Callable] = None

    @property
    def id(self) -> str:
        return self.arch + (f"-{self.tag}" if self.tag else "") + (f"-{self.attn}" if self.attn else "")

    def model(self):
        return _built(self.arch, self.attn, self.config, self.prepare)


@functools.cache
def _built(arch: str, attn: Optional[str], config_fn, prepare=None) -> object:
    """transformers' class from the small config, seed 0 (built once per case)."""
    torch.manual_seed(0)
    config = config_fn()
    if attn is not None:
        config._attn_implementation = attn
    model = getattr(transformers, arch)(config).float()
    if prepare is not None:
        prepare(model)
    return model


def untie_head(model) -> None:
    """The LM head as from_pretrained leaves T5 v1.1 and mT5: transformers 5.24 ties it when it
    builds the model from a config (their configs force tie_word_embeddings true), and unties it
    when it loads a checkpoint that stores the head apart with other values."""
    assert model.lm_head.weight is model.shared.weight
    model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())


def pooler_gap(case, phase, model, measured, spec) -> Gap:
    """BertModel's pooler (dense d x d + tanh on the first token), BertForPreTraining's with its
    next-sentence head (Linear(d, 2)): forward 2 B d (d + 2); the pre-training loss takes
    both, so train runs their backward too (2 products each); BertModel's loss over the
    hidden states leaves the pooler out of the graph (forward only)."""
    d = model.config.hidden_size
    pretraining = case.arch == "BertForPreTraining"
    width = d + 2 if pretraining else d
    products = 3 if phase == "train" and pretraining else 1
    assert measured[module_path(measured, "pooler")] == 2 * B * d * d * products
    return Gap(flops=2 * B * d * width * products, params=d * d + d + (2 * d + 2 if pretraining else 0))


def module_path(measured: dict, leaf: str) -> str:
    (path,) = [p for p in measured if p.split(".")[-1] == leaf]
    return path


def seq2seq_gap(case, phase, model, measured, spec) -> Gap:
    """T5, mT5, UMT5 and Switch (encoder-decoders and T5's encoder stack). Both stacks,
    cross-attention, the relative position bias and the experts are modelled; what differs:
    - prefill: the ForConditionalGeneration classes have no logits_to_keep, so the LM head
      runs on all S prompt positions, flopsim's on the last: 2 B (S - 1) d_model vocab FLOPs;
    - train under SDPA: the cross-attention's bias is a tensor of zeros that needs no gradient,
      so torch's CPU SDPA runs it with its fused kernel, whose backward recomputes the scores:
      one product of 2 B heads S S_enc d_head per decoder layer more than flopsim's explicit
      count (the self-attention's bias needs a gradient: plain products, as flopsim counts).
    Also asserted: the encoder stack's FLOPs equal flopsim's encoder ops' (forward, train,
    prefill)."""
    flops = 0
    if phase == "train" and spec.is_encoder_decoder and model.config._attn_implementation == "sdpa":
        flops += spec.layers * 2 * B * spec.heads * S * S_ENC * spec.d_head
    if phase == "prefill" and spec.head == "lm":
        head = measured["lm_head"]
        assert head == S * 2 * B * spec.d_model * spec.vocab
        flops += head * (S - 1) // S
    if spec.is_encoder_decoder and phase != "decode":
        ours = flopsim_count(spec, phase)
        assert measured["encoder"] == sum(op.flops for op in ours.ops if op.name.startswith("encoder."))
    if spec.moe is not None:  # transformers' expert blocks are flopsim's, stack by stack
        stacks = (("encoder", spec.encoder_layers), ("decoder", spec.layers)) if spec.is_encoder_decoder \
            else (("encoder", spec.layers),)  # SwitchTransformersEncoderModel: the encoder stack
        for stack, layers in stacks:
            sparse = {i for i in range(layers) if getattr(model, stack).block[i].layer[-1].is_sparse}
            assert sparse == {i for i in range(layers) if (i + 1) % spec.moe.every == 0}
    check_bias_tables(model, spec)
    return Gap(flops=flops)


def check_bias_tables(model, spec) -> None:
    """transformers' relative-position tables (buckets x heads) are flopsim's: UMT5's one in
    every self-attention layer (`relative_bias: layer`), T5's, mT5's and Switch's one per stack."""
    stored = sum(p.numel() for n, p in model.named_parameters() if "relative_attention_bias" in n)
    table = spec.relative_buckets * spec.heads
    per_layer = type(model).__name__.startswith("UMT5")
    assert spec.layer_bias == per_layer
    assert stored == (spec.blocks if per_layer else (2 if spec.is_encoder_decoder else 1)) * table


def absorbed_decode_gap(case, phase, model, measured, spec) -> Gap:
    """DeepSeek decode: transformers up-projects all T cached latents (kv_b: d_c -> H (d_nope +
    d_v)) and attends over H heads of d_qk keys and d_v values; flopsim's absorbed form (the
    import's default) folds W_UK into the query (H d_nope x d_c per token), attends over the
    T latents as one shared head (keys d_c + d_rope, values d_c) and maps each head's output
    through W_UV (d_c x d_v). Derived per MLA layer, B tokens:"""
    m = spec.mla
    heads, d_qk = spec.heads, m.d_nope + m.d_rope
    expanded = 2 * B * T * m.kv_rank * heads * (m.d_nope + m.d_v) + 2 * B * heads * T * (d_qk + m.d_v)
    absorbed = (2 * B * heads * m.d_nope * m.kv_rank + 2 * B * heads * T * (m.kv_rank + m.d_rope + m.kv_rank)
                + 2 * B * heads * m.kv_rank * m.d_v)
    return Gap(flops=spec.layers * (expanded - absorbed))


def vision_gap(case, phase, model, measured, spec) -> Gap:
    """Gemma 3's vision tower (SigLIP) and multimodal projector: not modelled; text-only
    input runs neither, so only parameters differ."""
    assert params_under(model, "model.vision_tower.", "model.multi_modal_projector.") > 0
    return Gap(params=params_under(model, "model.vision_tower.", "model.multi_modal_projector."))


def _tiny_siglip():
    return transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=28, patch_size=14)


def _gemma3_multimodal():
    text = dict(DECODER, head_dim=8, sliding_window=5,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    return transformers.Gemma3Config(text_config=text, vision_config=_tiny_siglip().to_dict(), mm_tokens_per_image=4,
                                     image_token_index=96, boi_token_index=94, eoi_token_index=95)


CASES = [
    Case("LlamaForCausalLM", lambda: _config("LlamaConfig", **DECODER)),
    Case("LlamaForCausalLM", lambda: _config("LlamaConfig", **DECODER), attn="eager"),
    Case("MistralForCausalLM", lambda: _config("MistralConfig", **DECODER, sliding_window=5)),
    Case("Qwen2ForCausalLM", lambda: _config("Qwen2Config", **DECODER)),
    Case("Qwen3ForCausalLM", lambda: _config("Qwen3Config", **DECODER, head_dim=8)),
    Case("MixtralForCausalLM", lambda: _config("MixtralConfig", **DECODER, num_local_experts=4,
                                               num_experts_per_tok=2)),
    Case("Qwen2MoeForCausalLM", lambda: _config("Qwen2MoeConfig", **DECODER, **MOE, num_experts=4,
                                                shared_expert_intermediate_size=32, decoder_sparse_step=1)),
    Case("Qwen3MoeForCausalLM", lambda: _config("Qwen3MoeConfig", **DECODER, **MOE, num_experts=4, head_dim=8)),
    Case("DeepseekV2ForCausalLM", lambda: _config("DeepseekV2Config", **dict(LATENT, q_lora_rank=None)),
         cpu_explicit=("train",), forms={"decode": "expanded"}),
    Case("DeepseekV3ForCausalLM", lambda: _config("DeepseekV3Config", **LATENT, n_group=4, topk_group=2),
         cpu_explicit=("train",), forms={"decode": "expanded"}),
    Case("Gemma2ForCausalLM", lambda: _config("Gemma2Config", **DECODER, head_dim=8, sliding_window=5)),
    Case("Gemma3ForCausalLM", lambda: _config("Gemma3TextConfig", **DECODER, head_dim=8, sliding_window=5,
                                              sliding_window_pattern=3, final_logit_softcapping=20.0)),
    Case("Gemma3ForConditionalGeneration", _gemma3_multimodal, gap=vision_gap),
    Case("GptOssForCausalLM", lambda: _config("GptOssConfig", **DECODER, head_dim=8, sliding_window=5,
                                              num_local_experts=4, num_experts_per_tok=2)),
    Case("GPT2LMHeadModel", lambda: _config("GPT2Config", **GPT2), cpu_explicit=("train",)),  # attn_pdrop 0.1
    Case("GPT2LMHeadModel", lambda: _config("GPT2Config", **GPT2, attn_pdrop=0.0)),
    Case("GPT2LMHeadModel", lambda: _config("GPT2Config", **GPT2), attn="eager"),
    Case("GPT2Model", lambda: _config("GPT2Config", **GPT2, attn_pdrop=0.0)),
    Case("BertForMaskedLM", lambda: _config("BertConfig", **BERT), phases=ENCODER_PHASES),
    Case("BertForPreTraining", lambda: _config("BertConfig", **BERT), phases=ENCODER_PHASES, gap=pooler_gap),
    Case("BertForSequenceClassification", lambda: _config("BertConfig", **BERT, num_labels=3),
         phases=ENCODER_PHASES),
    Case("BertModel", lambda: _config("BertConfig", **BERT), phases=ENCODER_PHASES, gap=pooler_gap),
    Case("BertForMaskedLM", lambda: _config("BertConfig", **{**BERT, "attention_probs_dropout_prob": 0.1}),
         phases=ENCODER_PHASES, attn="eager"),
]
T5_CLASSES = ("ForConditionalGeneration", "Model", "EncoderModel")
V1_1 = dict(overrides={"tie_word_embeddings": False}, prepare=untie_head)  # as published, as loaded
CASES += [
    Case("T5ForConditionalGeneration", lambda: _config("T5Config", **T5), tag="v1_1", gap=seq2seq_gap, **V1_1),
    Case("T5ForConditionalGeneration", lambda: _config("T5Config", **T5_V1_0), tag="v1_0", gap=seq2seq_gap),
    Case("T5ForConditionalGeneration", lambda: _config("T5Config", **T5_V1_0), tag="v1_0", attn="eager",
         gap=seq2seq_gap),
    Case("T5Model", lambda: _config("T5Config", **T5), gap=seq2seq_gap),
    Case("T5EncoderModel", lambda: _config("T5Config", **T5), phases=ENCODER_PHASES, gap=seq2seq_gap),
    Case("MT5ForConditionalGeneration", lambda: _config("MT5Config", **T5), gap=seq2seq_gap, **V1_1),
    Case("MT5Model", lambda: _config("MT5Config", **T5), gap=seq2seq_gap),
    Case("MT5EncoderModel", lambda: _config("MT5Config", **T5), phases=ENCODER_PHASES, gap=seq2seq_gap),
    Case("UMT5ForConditionalGeneration", lambda: _config("UMT5Config", **T5), gap=seq2seq_gap),
    Case("UMT5Model", lambda: _config("UMT5Config", **T5), gap=seq2seq_gap),
    Case("UMT5EncoderModel", lambda: _config("UMT5Config", **T5), phases=ENCODER_PHASES, gap=seq2seq_gap),
    Case("SwitchTransformersForConditionalGeneration", lambda: _config("SwitchTransformersConfig", **SWITCH),
         gap=seq2seq_gap),
    Case("SwitchTransformersModel", lambda: _config("SwitchTransformersConfig", **SWITCH), gap=seq2seq_gap),
    Case("SwitchTransformersEncoderModel", lambda: _config("SwitchTransformersConfig", **SWITCH),
         phases=ENCODER_PHASES, gap=seq2seq_gap),
]


def test_every_supported_architecture_has_a_case():
    assert {c.arch for c in CASES} == set(ARCHITECTURES)


PARAMS = [pytest.param(case, phase, id=f"{case.id}-{phase}") for case in CASES for phase in case.phases]


@pytest.mark.parametrize("case,phase", PARAMS)
def test_flops_and_params_match_transformers(case, phase):
    model = case.model()
    attention = "explicit" if phase in case.cpu_explicit else None
    spec, notes = import_config(model, attention, case.overrides)
    if case.attn is None:  # the import's default is the attention transformers chose for the class
        default, default_notes = import_default(model, case.overrides)
        # T5's relative position bias is added to explicit scores: explicit whatever the kernel
        eager = model.config._attn_implementation == "eager"
        relative_sdpa = default.positions == "relative" and not eager
        assert default.attention_impl == ("explicit" if eager or relative_sdpa else "fused")
        if phase in case.cpu_explicit or relative_sdpa:  # notes say when CPU SDPA runs plain products
            assert any("SDPA" in n and "plain products" in n for n in default_notes)
    if phase in case.forms:
        spec = spec.with_changes(mla={**spec.mla.model_dump(), "decode": case.forms[phase]})
    measured = measure(model, phase)
    gap = case.gap(case, phase, model, measured, spec)
    result = flopsim_count(spec, phase)
    assert (measured[""] - result.flops, hf_params(model) - result.params) == (gap.flops, gap.params)


@pytest.mark.parametrize("arch", ["DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"])
def test_deepseek_decode_against_the_absorbed_default(arch):
    """The import's default decode (absorbed) against transformers' (expanded): the gap is the
    derived difference of the two forms' products (absorbed_decode_gap)."""
    case = next(c for c in CASES if c.arch == arch)
    model = case.model()
    spec, _ = import_config(model)
    assert spec.mla.decode == "absorbed"
    measured = measure(model, "decode")
    gap = absorbed_decode_gap(case, "decode", model, measured, spec)
    assert gap.flops != 0
    assert measured[""] - flopsim_count(spec, "decode").flops == gap.flops


def test_switch_dropped_tokens_are_the_gap_to_dropless():
    """With expert_capacity 2 (below the tokens a sequence sends an expert), transformers drops
    a sequence's tokens past 2 per expert and runs each expert on its kept tokens only: its
    FLOPs are flopsim's dropless count less 2 * 2 d_model d_ff (wi, wo) per dropped token,
    the tokens kept read from the routers' dispatch masks."""
    config = lambda: _config("SwitchTransformersConfig", **{**SWITCH, "expert_capacity": 2})  # noqa: E731
    model = _built("SwitchTransformersForConditionalGeneration", None, config)
    routed = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: routed.append(out[0].sum().item()))
             for m in model.modules() if type(m).__name__ == "SwitchTransformersTop1Router"]
    try:
        measured = measure(model, "forward")
    finally:
        for h in hooks:
            h.remove()
    spec, _ = import_config(model)
    tokens = (B * S_ENC, B * S)  # the encoder's sparse block, then the decoder's
    dropped = sum(t - kept for t, kept in zip(tokens, routed))
    assert len(routed) == 2 and dropped > 0
    assert flopsim_count(spec, "forward").flops - measured[""] == dropped * 4 * spec.d_model * spec.d_ff


def test_gemma3_text_defaults_are_transformers():
    defaults = transformers.Gemma3TextConfig()
    assert {k: getattr(defaults, k) for k in GEMMA3_TEXT_DEFAULTS} == GEMMA3_TEXT_DEFAULTS


# -- full size, on the meta device ---------------------------------------------------------

def full_size(config: dict):
    """transformers' class for a config dict, built on the meta device (no memory, no init)."""
    cls = getattr(transformers, architecture(config))
    with torch.device("meta"):
        return cls(cls.config_class.from_dict(config))


def full_size_gap(model, spec) -> int:
    """transformers minus flopsim, parameters of a full-size model: a T5 / mT5 / UMT5 LM head
    that transformers 5.24 ties when it builds the model from a config (their configs force
    tie_word_embeddings true; loading a checkpoint that stores the head apart unties it again,
    so flopsim counts the untied head such a checkpoint holds, where the config.json says
    tie_word_embeddings false); Gemma 3's vision tower. The relative-position tables are
    flopsim's (check_bias_tables)."""
    name = type(model).__name__
    if name.startswith(("T5", "MT5", "UMT5")):
        tied = hasattr(model, "lm_head") and model.lm_head.weight is model.shared.weight and not spec.tied_embeddings
        check_bias_tables(model, spec)
        return -(spec.vocab * spec.d_model if tied else 0)
    if name == "Gemma3ForConditionalGeneration":
        return vision_gap(None, None, model, None, spec).params
    return 0


def _defaults(name: str, arch: str, **changes) -> dict:
    """A transformers 5.24 config class's defaults (as config.json keys), with `changes`."""
    config = {**getattr(transformers, name)(**changes).to_dict(), "architectures": [arch]}
    return {k: v for k, v in config.items() if "attn_implementation" not in k}


def _default_configs() -> dict:
    """Full-size configs from transformers' own config classes (no Hub): mT5's and UMT5's
    defaults (mt5-small's and umt5-small's shapes); Switch's defaults (the class's docstring
    checkpoint is google/switch-base-8; experts in blocks 1, 5, 9 of each stack: placed
    elsewhere than flopsim's every 4, as many) and Switch-Base-8-like, experts in every other
    FFN (num_sparse_*_layers 6 of 12, blocks 1, 3, ...: flopsim's every 2)."""
    switch = "SwitchTransformersForConditionalGeneration"
    return {"mt5-defaults": _defaults("MT5Config", "MT5ForConditionalGeneration"),
            "umt5-defaults": _defaults("UMT5Config", "UMT5ForConditionalGeneration"),
            "switch-defaults": _defaults("SwitchTransformersConfig", switch),
            "switch-base-8-like": _defaults("SwitchTransformersConfig", switch, num_sparse_encoder_layers=6,
                                            num_sparse_decoder_layers=6)}


FULL_SIZE = [pytest.param(json.loads(p.read_text()), id=p.stem) for p in sorted(HF.glob("*.json"))]
FULL_SIZE += [pytest.param(config, id=name) for name, config in _default_configs().items()]


@pytest.mark.parametrize("config", FULL_SIZE)
def test_full_size_parameters_match_transformers(config):
    model = full_size(config)
    spec, _ = convert(config, "full")
    assert hf_params(model) - count(spec, seq=16).params == full_size_gap(model, spec)


# -- the shipped Gemma files at the small widths -------------------------------------------

SMALL_TEXT = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, max_position_embeddings=64, sliding_window=5)
# the multimodal wrapper's image tokens inside the small vocabulary, for the tiny vision tower
SMALL_IMAGE = dict(image_token_index=96, boi_token_index=94, eoi_token_index=95, mm_tokens_per_image=4)
SHIPPED_SMALL = [("gemma-2-9b-it", 4), ("gemma-3-27b-it", 7)]


def shipped_small(name: str, layers: int) -> dict:
    """A shipped Gemma config.json at the small widths (SMALL_TEXT, `layers` layers, a window of
    5 < T), every other key as published: Gemma 2's soft-caps and query_pre_attn_scalar (its
    unused sliding_window_size follows the window), Gemma 3's rope_scaling and
    query_pre_attn_scalar. Neither file has layer_types or a window pattern: both take their
    class's default layout (Gemma 2 every other layer local, Gemma 3 five local to one global)."""
    config = json.loads((HF / f"{name}.json").read_text())
    if "text_config" not in config:
        return {**config, **SMALL_TEXT, "num_hidden_layers": layers, "sliding_window_size": 5}
    text = {**config["text_config"], **SMALL_TEXT, "num_hidden_layers": layers}
    return {**config, **SMALL_IMAGE, "text_config": text, "vision_config": _tiny_siglip().to_dict()}


@functools.cache
def _shipped_model(name: str, layers: int):
    config = shipped_small(name, layers)
    cls = getattr(transformers, architecture(config))
    torch.manual_seed(0)
    return cls(cls.config_class.from_dict(config)).float()


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("name, layers", SHIPPED_SMALL, ids=[name for name, _ in SHIPPED_SMALL])
def test_shipped_gemma_files_small_match_transformers(name, layers, phase):
    """flopsim imports the file's own keys (the dict itself, not transformers' rewrite of it, at
    the import's default attention); its local layers are transformers' layer_types, its
    attention the one transformers runs, and FLOPs and parameters are transformers' less the
    vision tower."""
    from flopsim.families.dense import is_local

    model = _shipped_model(name, layers)
    spec, _ = convert(shipped_small(name, layers), name)
    types = model.config.get_text_config().layer_types
    assert [t == "sliding_attention" for t in types] == [is_local(spec, i) for i in range(layers)]
    assert 0 < sum(t == "full_attention" for t in types) < layers
    eager = model.config.get_text_config()._attn_implementation == "eager"
    assert spec.attention_impl == ("explicit" if eager else "fused")
    measured = measure(model, phase)
    multimodal = type(model).__name__ == "Gemma3ForConditionalGeneration"
    gap = vision_gap(None, phase, model, measured, spec) if multimodal else Gap()
    result = flopsim_count(spec, phase)
    assert (measured[""] - result.flops, hf_params(model) - result.params) == (gap.flops, gap.params)


# -- the grouped GEMM's formula --------------------------------------------------------------

def _grouped_mm_layouts():
    """(layout, a, b, offs, each group's operands, the grouped output as the groups' products in
    order): the four layouts of aten._grouped_mm; the 2D x 3D ends leave the last rows out."""
    ends = lambda *e: torch.tensor(e, dtype=torch.int32)  # noqa: E731
    cols = [slice(4 * g, 4 * g + 4) for g in range(3)]
    a, b = torch.randn(12, 8), torch.randn(3, 8, 8)
    yield ("2d-3d", a, b, ends(3, 5, 9), [(a[s:e], b[g]) for g, (s, e) in enumerate([(0, 3), (3, 5), (5, 9)])],
           lambda out: out[:9].flatten())
    a, b = torch.randn(3, 12, 8), torch.randn(8, 12)
    yield ("3d-2d", a, b, ends(4, 8, 12), [(a[g], b[:, c]) for g, c in enumerate(cols)],
           lambda out: torch.cat([out[:, c].flatten() for c in cols]))
    a, b = torch.randn(8, 12), torch.randn(12, 8)
    yield "2d-2d", a, b, ends(4, 8, 12), [(a[:, c], b[c]) for c in cols], lambda out: out.flatten()
    a, b = torch.randn(3, 12, 8), torch.randn(3, 8, 8)
    yield "3d-3d", a, b, None, [(a[g], b[g]) for g in range(3)], lambda out: out.flatten()


def test_grouped_mm_formula_counts_the_products_of_its_groups():
    """flopsim.torchref.counting's formula for aten._grouped_mm equals FlopCounterMode's count of
    the same products run one group at a time (torch's own mm formula), in every layout; the
    outputs agree, so the groups are the ones the kernel runs."""
    from torch.utils.flop_counter import FlopCounterMode

    from flopsim.torchref.counting import register_formulas

    register_formulas()
    torch.manual_seed(0)
    for layout, a, b, offs, operands, as_groups in _grouped_mm_layouts():
        with FlopCounterMode(display=False) as grouped:
            out = torch._grouped_mm(a, b, offs)
        with FlopCounterMode(display=False) as one_by_one:
            products = [x @ y for x, y in operands]
        assert grouped.get_total_flops() == one_by_one.get_total_flops() > 0, layout
        assert torch.allclose(as_groups(out), torch.cat([p.flatten() for p in products]), atol=1e-5), layout
