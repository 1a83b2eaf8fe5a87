"""The T5, Switch and Scaling Transformers encoder-decoder presets against published
parameter counts (within 1%, or the table's own rounding where it prints fewer digits)
and, at full size on the meta device, against transformers' own classes (equal)."""

from __future__ import annotations

import pytest

from flopsim.count import count

# preset -> (published parameters, where)
PUBLISHED = {
    "t5-base": (223e6, "Switch Transformers sec. 2.4 / Table 8: '223M parameter T5-Base'"),
    "t5-large": (739e6, "Switch Transformers sec. 2.4: '739M parameter T5-Large'"),
    "t5-v1.1-base": (250e6, "t5 released_checkpoints.md: t5.1.1 base ~250M"),
    "t5-v1.1-large": (800e6, "t5 released_checkpoints.md: t5.1.1 large ~800M"),
    "t5-v1.1-xxl": (11e9, "Switch Transformers Table 9: T5-XXL 11B"),
    "switch-base-128": (7410e6, "Switch Transformers Table 8: Switch-Base 7410M"),
    "switch-large-128": (26e9, "Switch Transformers Table 9: Switch-Large 26B"),
    "switch-xxl-128": (395e9, "Switch Transformers Table 9: Switch-XXL 395B"),
    "switch-c-2048": (1571e9, "Switch Transformers Table 9: Switch-C 1571B"),
    "st-800m-encdec": (800e6, "Scaling Transformers Table 1: baseline 800M"),
}
# a figure printed to two significant digits (26B) or as a round size (~250M, ~800M, 11B,
# 800M) allows half its last digit; four-digit figures must be within 1%
TOLERANCE = {"switch-large-128": 0.5e9 / 26e9, "t5-v1.1-base": 5e6 / 250e6, "t5-v1.1-large": 50e6 / 800e6,
             "t5-v1.1-xxl": 0.5e9 / 11e9, "st-800m-encdec": 50e6 / 800e6}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameters_match_the_published_figure(name):
    published, where = PUBLISHED[name]
    params = count(name, seq=8).params
    assert abs(params / published - 1) <= max(0.01, TOLERANCE.get(name, 0)), (name, params, where)


def _hf_params(config_cls, model_cls, **config) -> int:
    torch = pytest.importorskip("torch")
    with torch.device("meta"):
        model = model_cls(config_cls(**config))
    return sum(p.numel() for p in model.parameters())


T5_SHAPES = {  # t5x t5_1_0 / t5_1_1 gin configs
    "t5-base": dict(d_model=768, d_ff=3072, num_heads=12, num_layers=12, feed_forward_proj="relu"),
    "t5-v1.1-base": dict(d_model=768, d_ff=2048, num_heads=12, num_layers=12, feed_forward_proj="gated-gelu"),
    "t5-v1.1-xxl": dict(d_model=4096, d_ff=10240, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu"),
}


@pytest.mark.parametrize("name", list(T5_SHAPES))
def test_t5_equals_transformers_at_full_size(name):
    transformers = pytest.importorskip("transformers")
    hf = _hf_params(transformers.T5Config, transformers.T5ForConditionalGeneration, d_kv=64, vocab_size=32128,
                    **T5_SHAPES[name])
    spec = count(name, seq=8).spec
    # transformers 5 builds T5 from a config with its LM head tied to the shared table
    # whatever tie_word_embeddings says; an untied head (T5 1.1) adds vocab x d_model
    untied_head = 0 if spec.tied_embeddings else spec.vocab * spec.d_model
    assert count(name, seq=8).params == hf + untied_head


def test_switch_base_equals_transformers_at_full_size():
    transformers = pytest.importorskip("transformers")
    hf = _hf_params(transformers.SwitchTransformersConfig, transformers.SwitchTransformersForConditionalGeneration,
                    d_model=768, d_ff=3072, num_heads=12, d_kv=64, num_layers=12, num_decoder_layers=12,
                    num_experts=128, encoder_sparse_step=2, decoder_sparse_step=2, vocab_size=32128)
    assert count("switch-base-128", seq=8).params == hf


def test_switch_costs_what_t5_costs_per_token_when_dropless():
    """Top-1 dropless experts of the T5 FFN's shape: the same FLOPs as the dense baseline, plus the
    router's 2 * d_model * E per token in each MoE block (6 + 6 of them)."""
    t5, switch = count("t5-base", seq=114, encoder_seq=512), count("switch-base-128", seq=114, encoder_seq=512)
    router = 2 * 768 * 128 * (6 * 512 + 6 * 114)
    assert switch.flops - t5.flops == router
