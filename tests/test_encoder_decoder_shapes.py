"""Encoder-decoders through count, memory, sweep, the CLI and the spec's checks: each
figure written as its derivation (the FLOPs exactness against the torch reference is
tests/test_encoder_decoder.py's)."""

from __future__ import annotations

import json

import pytest
import sympy as sp
from typer.testing import CliRunner

from flopsim.cli import app
from flopsim.count import count, formula
from flopsim.errors import InputError, SpecError
from flopsim.memory import memory
from flopsim.spec import load_model

D, H, DH, FF, V, L, LE = 16, 2, 8, 32, 50, 2, 3
BUCKETS = 32
T5_LIKE = dict(name="t5-tiny", layers=L, encoder_layers=LE, d_model=D, heads=H, d_ff=FF, vocab=V,
               positions="relative", attention_impl="explicit", bias=False, norm="rmsnorm",
               tied_embeddings=False, dtype="fp32")


@pytest.fixture(scope="module")
def spec():
    return load_model(T5_LIKE)


def test_parameters_derived(spec):
    attn = D * 3 * H * DH + H * DH * D  # fused qkv, out
    mlp = 2 * D * FF  # up, down
    enc_block = attn + mlp + 2 * D  # two RMSNorm weights
    cross = D * H * DH + D * 2 * H * DH + H * DH * D + D  # q, kv, out, norm_cross
    dec_block = enc_block + cross
    expected = (V * D  # the shared token table (the encoder's lookup owns it)
                + 2 * BUCKETS * H  # one relative-bias table per stack
                + LE * enc_block + D  # encoder blocks, encoder final norm
                + L * dec_block + D  # decoder blocks, final norm
                + D * V)  # untied LM head
    for phase in ("forward", "train", "prefill", "decode"):
        assert count(spec, phase=phase, seq=4, context=6 if phase in ("prefill", "decode") else None).params \
            == expected


def test_decode_flops_derived(spec):
    batch, context, enc = 3, 9, 11
    per_block = (2 * D * 3 * H * DH  # self qkv on the new token
                 + 2 * H * context * 2 * DH  # Q K^T and P V over the T cached keys
                 + 2 * H * DH * D  # self out
                 + 2 * D * H * DH  # cross q
                 + 2 * H * enc * 2 * DH  # cross attention over the S_enc cached encoder outputs
                 + 2 * H * DH * D  # cross out
                 + 2 * 2 * D * FF)  # up, down
    expected = batch * (L * per_block + 2 * D * V)  # the encoder does not run; the head on the token
    assert count(spec, phase="decode", batch=batch, seq=5, context=context, encoder_seq=enc).flops == expected


def test_kv_cache_memory_derived(spec):
    batch, prompt, enc, w = 2, 5, 7, 4
    self_cache = L * batch * prompt * 2 * H * DH * w
    cross_cache = L * batch * enc * 2 * H * DH * w  # keys and values of the encoder output, per decoder layer
    prefill = memory(spec, phase="prefill", batch=batch, seq=prompt, encoder_seq=enc)
    assert prefill.components["kv_cache_bytes"] == self_cache + cross_cache
    decode = memory(spec, phase="decode", batch=batch, seq=prompt, context=prompt, encoder_seq=enc)
    assert decode.components["kv_cache_bytes"] == self_cache + cross_cache
    assert decode.to_dict()["encoder_seq"] == enc


def test_encoder_length_defaults_to_seq_and_is_a_symbol(spec):
    assert count(spec, seq=6).flops == count(spec, seq=6, encoder_seq=6).flops
    assert count(spec, seq=6, encoder_seq=9).flops > count(spec, seq=6).flops
    assert sp.Symbol("S_enc", positive=True, integer=True) in formula(spec, phase="forward").free_symbols


def test_sweep_follows_seq_into_the_encoder(spec):
    from flopsim.sweep import sweep

    for phase in ("forward", "decode"):
        r = sweep(spec, "h100-sxm", phase=phase, vary={"seq": [4, 12]}, seq=4)
        expected = [count(spec, phase=phase, seq=s).flops for s in (4, 12)]
        assert [int(f) for f in r.grids["flops"]] == expected


def test_stacks_name_ops_and_layers(spec):
    r = count(spec, phase="forward", seq=4)
    parts = [row["part"] for row in r.per_layer_rows()]
    assert parts == ["embed", *[f"encoder.block.{j}" for j in range(LE)],
                     *[f"decoder.block.{j}" for j in range(L)], "head"]
    names = {op.name for op in r.ops}
    assert {"encoder.embed.tokens", "decoder.embed.tokens", "encoder.final_norm", "decoder.block.1.cross.kv",
            "encoder.position_bias", "decoder.position_bias", "final_norm", "head.lm"} <= names


@pytest.mark.parametrize("changes, field", [
    (dict(attention_impl="fused"), "relative"),
    (dict(family="mode", mod=dict(capacity=0.5), moe=dict(experts=4, top_k=1), positions="rope"),
     "encoder_layers"),
    (dict(family="mod", mod=dict(capacity=0.5)), "relative"),  # the kept tokens' bias: gathered per sequence
    (dict(causal=False), "encoder_layers"),
    (dict(head="cls"), "encoder_layers"),
])
def test_spec_refuses(changes, field):
    with pytest.raises(SpecError, match=field):
        load_model({**T5_LIKE, **changes})


@pytest.mark.parametrize("family", ["mod", "length_reduction"])
def test_routed_decoder_only_models_refuse_relative_positions(family):
    blocks = dict(mod=dict(mod=dict(capacity=0.5)), length_reduction=dict(length_reduction=dict(keep=[1, 0.5])))
    decoder_only = {k: v for k, v in T5_LIKE.items() if k != "encoder_layers"}
    with pytest.raises(SpecError, match="relative"):
        load_model({**decoder_only, "family": family, **blocks[family]})


def test_encoder_seq_needs_an_encoder():
    with pytest.raises(InputError, match="encoder_seq"):
        count("gpt2-small", seq=8, encoder_seq=8)


def test_cli(tmp_path):
    path = tmp_path / "t5.yaml"
    path.write_text(json.dumps(T5_LIKE))  # JSON is YAML
    runner = CliRunner()
    out = runner.invoke(app, ["count", str(path), "--seq", "4", "--encoder-seq", "9", "-f", "json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["encoder_seq"] == 9
    out = runner.invoke(app, ["predict", str(path), "-H", "h100-sxm", "--seq", "4", "--encoder-seq", "9"])
    assert out.exit_code == 0 and "S_enc=9" in out.output
    out = runner.invoke(app, ["count", "gpt2-small", "--encoder-seq", "9"])
    assert out.exit_code == 2 and len(out.output.strip().splitlines()) == 1, out.output
    # plan train lays out both stacks (tests/test_plan_encoder_decoder.py)
    out = runner.invoke(app, ["plan", "train", str(path), "-H", "h100-sxm", "--gpus", "8", "--tokens", "1B",
                              "--seq", "4", "--encoder-seq", "9", "-f", "json"])
    assert out.exit_code == 0 and json.loads(out.output)["config"]["encoder_seq"] == 9, out.output
