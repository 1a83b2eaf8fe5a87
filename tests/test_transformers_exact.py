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
are 5 tokens, so T > W and a local layer's cache holds W):
- forward: no_grad, use_cache False, logits at every position;
- train: model.train(), the model's own loss (LM: labels = the inputs; classification: one
  label per sequence; pre-training: and the next-sentence label; no head: cross-entropy over
  the last hidden states, as flopsim's reference trains such a model) and its backward, no
  optimizer step (Adam runs no products);
- prefill: no_grad, use_cache, logits_to_keep=1 as generate() runs a prompt; encoder-decoders
  take the encoder's output precomputed, as generate() does;
- decode: one token per sequence after an uncounted prefill of T - 1 tokens (T keys).

Where transformers runs something flopsim does not model the same way, the case's gap says
what and why (specs/models/hf/README.md, "Differences from transformers"):
- BERT pre-training and BertModel: the pooler (and the next-sentence head), not modelled;
- T5 family: the encoder stack and the decoder's cross-attention (flopsim models the
  decoder stack), the relative-position tables; T5's prefill computes every position's
  logits (no logits_to_keep);
- DeepSeek: transformers' decode up-projects the cached latents (flopsim's `mla.decode:
  expanded`; the import's default, absorbed, is derived against it below);
- Gemma 3 (multimodal): the vision tower and the projector (parameters; text-only input);
- CPU SDPA runs plain products in training with attention dropout, with T5's trainable
  bias, and with MLA's unequal query and value widths: flopsim's explicit count matches.
A module that torch runs but no flopsim op covers is therefore never silently tolerated.

At full size (on the meta device: no memory, no initialisation) every shipped config in
specs/models/hf/ and the architecture dicts of today's presets (tests/test_hf_import.py)
have flopsim's parameter count, less the same parts; T5 v1.1 also less its LM head, which
transformers 5.24 ties when building T5 from a config (see full_size_gap).
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
T5 = dict(vocab_size=97, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=3, num_heads=4,
          feed_forward_proj="gated-gelu", dropout_rate=0.0)


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
    ids = _ids(model, g, S)
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
    decode, the encoder's output for an encoder-decoder's prefill and decode) is run here."""
    g = torch.Generator().manual_seed(0)
    seq2seq = _seq2seq(model)
    model.train(phase == "train")
    if phase == "train":
        return lambda: _train_loss(model, g).backward()
    ids = _ids(model, g, S)
    keep = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    if phase == "forward":
        extra = {"decoder_input_ids": _ids(model, g, S)} if seq2seq else {}
        return torch.no_grad()(lambda: model(ids, use_cache=False, **extra))
    encoder = {}
    if seq2seq:  # generate() runs the encoder once, before the decoder's first step
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

def import_config(model, attention: Optional[str] = None):
    """(spec, notes): the model's config as a config.json would hold it, imported."""
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    return convert(config, "hf-small", attention=attention or model.config._attn_implementation)


def flopsim_count(spec, phase: str):
    return count(spec, batch=B, seq=S, phase=phase, context=T if phase == "decode" else None)


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

    @property
    def id(self) -> str:
        return self.arch + (f"-{self.attn}" if self.attn else "")

    def model(self):
        return _built(self.arch, self.attn, self.config)


@functools.cache
def _built(arch: str, attn: Optional[str], config_fn) -> object:
    """transformers' class from the small config, seed 0 (built once per case)."""
    torch.manual_seed(0)
    config = config_fn()
    if attn is not None:
        config._attn_implementation = attn
    return getattr(transformers, arch)(config).float()


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


def t5_gap(case, phase, model, measured, spec) -> Gap:
    """T5: flopsim models one stack. An encoder-decoder's encoder stack (run in forward and
    train; prefill and decode take its output) and the decoder's cross-attention
    (`decoder.block.i.layer.1`) are not modelled: their FLOPs as measured, and the encoder
    stack's equal flopsim's count of the encoder (T5EncoderModel) of the same config. The
    relative-position tables (buckets x heads: every layer of UMT5, the first of T5 and mT5)
    are costed as positions none. T5 has no logits_to_keep: its prefill computes the
    logits of all S positions, flopsim's of the last."""
    seq2seq = _seq2seq(model)
    relative = sum(p.numel() for n, p in model.named_parameters()  # the encoder's are counted with it below
                   if "relative_attention_bias" in n and not (seq2seq and n.startswith("encoder.")))
    if not seq2seq:
        return Gap(params=relative)
    layers = model.config.num_decoder_layers
    cross = [f"decoder.block.{i}.layer.1" for i in range(layers)]
    flops = sum(measured.get(path, 0) for path in cross)
    if phase in ("forward", "train"):
        family = type(model).__name__.split("For")[0].removesuffix("Model")
        encoder, _ = import_config_as(model, f"{family}EncoderModel", spec.attention_impl)
        assert measured["encoder"] == flopsim_count(encoder, phase).flops
        flops += measured["encoder"]
    if phase == "prefill" and spec.head == "lm":
        head = measured["lm_head"]
        assert head == S * 2 * B * spec.d_model * spec.vocab
        flops += head * (S - 1) // S
    return Gap(flops=flops, params=params_under(model, "encoder.", *[p + "." for p in cross]) + relative)


def import_config_as(model, arch: str, attention: str):
    config = model.config.to_dict()
    config["architectures"] = [arch]
    return convert(config, "hf-small", attention=attention)


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
for family in ("T5", "MT5", "UMT5"):
    config = f"{family}Config"
    CASES += [
        Case(f"{family}ForConditionalGeneration", lambda c=config: _config(c, **T5), gap=t5_gap,
             cpu_explicit=("train",)),
        Case(f"{family}Model", lambda c=config: _config(c, **T5), gap=t5_gap, cpu_explicit=("train",)),
        Case(f"{family}EncoderModel", lambda c=config: _config(c, **T5), phases=ENCODER_PHASES, gap=t5_gap,
             cpu_explicit=("train",)),
    ]


def test_every_supported_architecture_has_a_case():
    assert {c.arch for c in CASES} == set(ARCHITECTURES)


PARAMS = [pytest.param(case, phase, id=f"{case.id}-{phase}") for case in CASES for phase in case.phases]


@pytest.mark.parametrize("case,phase", PARAMS)
def test_flops_and_params_match_transformers(case, phase):
    model = case.model()
    attention = "explicit" if phase in case.cpu_explicit else None
    spec, notes = import_config(model, attention)
    if case.attn is None:  # the import's default is the attention transformers chose for the class
        default, default_notes = import_config_as(model, case.arch, None)
        assert default.attention_impl == ("explicit" if model.config._attn_implementation == "eager" else "fused")
        if phase in case.cpu_explicit:  # and its notes say when CPU SDPA runs plain products
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
    """transformers minus flopsim, parameters of a full-size model: T5's encoder stack, cross-attention and relative-position tables (t5_gap), less the LM head
    that transformers 5.24 ties when it builds T5 from a config (T5Config forces
    tie_word_embeddings true and keeps a saved false only as `scale_decoder_outputs`; loading
    the v1.1 checkpoint unties it again, since both tensors are stored and differ, so
    flopsim counts the untied head the checkpoint holds); Gemma 3's vision tower."""
    name = type(model).__name__
    if name.startswith(("T5", "MT5", "UMT5")):
        tied = model.lm_head.weight is model.shared.weight and not spec.tied_embeddings
        return t5_gap(None, "decode", model, {}, spec).params - (spec.vocab * spec.d_model if tied else 0)
    if name == "Gemma3ForConditionalGeneration":
        return vision_gap(None, None, model, None, spec).params
    return 0


def _todays():
    from test_hf_import import DEEPSEEK_V2_LITE, DEEPSEEK_V3, GEMMA_2_9B, GEMMA_3_27B, GPT_OSS_20B

    return {"deepseek-v3": DEEPSEEK_V3, "deepseek-v2-lite": DEEPSEEK_V2_LITE, "gemma-2-9b": GEMMA_2_9B,
            "gemma-3-27b": GEMMA_3_27B, "gpt-oss-20b": GPT_OSS_20B}


FULL_SIZE = [pytest.param(json.loads(p.read_text()), id=p.stem) for p in sorted(HF.glob("*.json"))]
FULL_SIZE += [pytest.param(config, id=name) for name, config in _todays().items()]


@pytest.mark.parametrize("config", FULL_SIZE)
def test_full_size_parameters_match_transformers(config):
    model = full_size(config)
    spec, _ = convert(config, "full")
    assert hf_params(model) - count(spec, seq=16).params == full_size_gap(model, spec)


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
