"""Encoder-decoders (`encoder_layers` > 0; flopsim.families.encoder_decoder)
against their torch reference (flopsim.torchref.encoder_decoder).

- exactness: FLOPs in total and per module, and parameters, equal
  FlopCounterMode's and sum(p.numel()) in forward, train, prefill and decode,
  on T5 v1.1-like (relative position bias, explicit attention, RMSNorm,
  gated GELU, untied), tied / learned positions / post-norm LayerNorm with
  bias and fused attention, GQA with RoPE, Switch-like MoE (4 experts, top-1,
  capacity 1.25, every other block of each stack) and dropless top-2 MoE,
  sparse FF, sparse QKV and both; encoder lengths S_enc above, below and
  equal to the decoder's S;
- parameters derived by hand for one small config;
- symbolic reduction: the encoder's ops are a non-causal encoder model's over
  S_enc tokens, and the decoder's ops less its cross-attention are a decoder-only
  model's, op for op;
- the decoder-only reference's relative position bias, exact too;
- `relative_bias: layer` (UMT5: a table in every self-attention layer), exact
  in every phase as an encoder-decoder and as a decoder-only model, and its
  parameters: (encoder + decoder layers) tables where T5 has two;
- the bytes oracle (flopsim.torchref.bytes_check): exact per module and pass on
  three configs without relative positions; with them, only T5's bucket kernel
  differs (its reads of the query positions and its arithmetic).
"""

from __future__ import annotations

import pytest
import sympy as sp

pytest.importorskip("torch")

from flopsim import count  # noqa: E402
from flopsim.families import build_ops  # noqa: E402
from flopsim.ops.symbols import S, S_enc, T  # noqa: E402
from flopsim.errors import SpecError  # noqa: E402
from flopsim.spec import load_model  # noqa: E402
from flopsim.torchref.check import compare_with_torch  # noqa: E402

BASE = dict(name="encdec", layers=2, encoder_layers=2, d_model=16, heads=2, d_ff=32, vocab=31, max_seq=64)
T5 = dict(positions="relative", relative_buckets=8, attention_impl="explicit", norm="rmsnorm", ffn="gated",
          activation="gelu", bias=False, tied_embeddings=False)
SPARSE_QKV = dict(sparse_qkv=dict(modules=4, conv_kernel=3))
SPARSE_FF = dict(family="sparse_ff", sparse_ff=dict(block_size=8, d_lowrank=4))
CONFIGS = {
    "t5-v1.1": T5,
    "tied-learned-post-fused": dict(tied_embeddings=True, positions="learned", norm_position="post",
                                    norm="layernorm", bias=True, attention_impl="fused"),
    "gqa-rope": dict(d_model=32, heads=4, kv_heads=2, positions="rope", ffn="gated", activation="silu",
                     norm="rmsnorm", bias=False, attention_impl="explicit", encoder_layers=3),
    "gqa-rope-fused": dict(d_model=32, heads=4, kv_heads=1, positions="rope", attention_impl="fused"),
    "switch": dict(T5, family="moe", encoder_layers=3,
                   moe=dict(experts=4, top_k=1, capacity_factor=1.25, every=2)),
    "moe-dropless-top2": dict(family="moe", moe=dict(experts=4, top_k=2), attention_impl="fused"),
    "sparse-ff": dict(SPARSE_FF, positions="rope"),
    "sparse-qkv": dict(T5, **SPARSE_QKV),
    "umt5": dict(T5, relative_bias="layer", encoder_layers=3),
    "sparse-ff-qkv": dict(SPARSE_FF, **SPARSE_QKV, positions="none", layers=3),
}
# (batch, seq, encoder_seq (None: seq), decode context)
SHAPES = {"longer-encoder": (2, 5, 7, 8), "same": (1, 6, None, 6), "shorter-encoder": (3, 4, 2, 9)}
PHASES = ("forward", "train", "prefill", "decode")


def make(name: str, **changes):
    return load_model({**BASE, **CONFIGS[name], "name": name, **changes})


def check(spec, phase: str, shape: tuple):
    batch, seq, encoder_seq, context = shape
    result = compare_with_torch(spec, phase, batch, seq, context if phase == "decode" else None,
                                encoder_seq=encoder_seq)
    assert result.exact, result.describe()
    assert result.modules_checked > 10
    return result


CASES = [pytest.param(name, phase, "longer-encoder", id=f"{name}-{phase}") for name in CONFIGS for phase in PHASES]
CASES += [pytest.param(name, phase, shape, id=f"{name}-{phase}-{shape}")
          for name, shape in (("t5-v1.1", "same"), ("switch", "shorter-encoder"), ("sparse-ff-qkv", "same"),
                              ("gqa-rope", "shorter-encoder"))
          for phase in PHASES]


@pytest.mark.parametrize("name, phase, shape", CASES)
def test_exact_against_flop_counter(name, phase, shape):
    check(make(name), phase, SHAPES[shape])


def test_every_stack_and_the_cross_attention_are_checked():
    result = check(make("t5-v1.1"), "train", SHAPES["longer-encoder"])
    assert result.torch_flops > 0
    from flopsim.torchref.counting import count_with_torch
    from flopsim.torchref.model import build_reference, run_phase

    spec = make("t5-v1.1")
    measured = count_with_torch(lambda: run_phase(build_reference(spec), spec, "train", 2, 5, encoder_seq=7))
    assert measured["encoder"] + measured["decoder"] + measured["head"] == measured[""]
    assert measured["decoder.block.1.cross.kv"] == 3 * 2 * (2 * 7) * 16 * 32  # fwd + 2 bwd products on B*S_enc rows


def test_parameters_derived_by_hand():
    spec = load_model({**BASE, **T5, "ffn": "mlp"})
    d, h, d_ff, vocab, buckets = 16, 2, 32, 31, 8
    enc_block = 2 * d + d * 3 * d + d * d + 2 * d * d_ff  # two RMSNorms, qkv, out, up and down
    dec_block = enc_block + d + d * d + d * 2 * d + d * d  # + norm_cross, cross.q, cross.kv, cross.out
    total = (vocab * d  # the shared token table
             + 2 * buckets * h  # a relative position bias table per stack
             + 2 * enc_block + d  # encoder blocks, encoder.final_norm
             + 2 * dec_block + d  # decoder blocks, final_norm
             + d * vocab)  # untied head.lm
    for phase in PHASES:
        assert count(spec, batch=2, seq=3, phase=phase, encoder_seq=5).params == total
    assert compare_with_torch(spec, "forward", 1, 3, encoder_seq=4).torch_params == total
    tied = spec.with_changes(tied_embeddings=True)
    assert count(tied, batch=1, seq=3).params == total - d * vocab


def _flops_by_name(ops, prefix: str = "", drop=()) -> dict:
    return {(op.name[len(prefix):], op.pass_): op.flops for op in ops
            if op.name.startswith(prefix) and not any(part in op.name for part in drop)}


def _same(left: dict, right: dict, subs: dict) -> bool:
    return left.keys() == right.keys() and all(sp.expand(left[k] - right[k].subs(subs)) == 0 for k in left)


@pytest.mark.parametrize("name", ["t5-v1.1", "switch", "sparse-ff-qkv", "umt5"])
def test_encoder_ops_are_an_encoder_models(name):
    """The encoder stack's ops, named `encoder.X`, have the FLOPs of op X of a non-causal
    model of `encoder_layers` blocks without a head, over S_enc tokens (symbolic in B, S_enc)."""
    spec = make(name)
    alone = spec.with_changes(encoder_layers=0, layers=spec.encoder_layers, causal=False, head="none")
    for phase in ("forward", "train", "prefill"):
        enc = _flops_by_name(build_ops(spec, phase), "encoder.", drop=("output_grad_sum",))
        other = _flops_by_name(build_ops(alone, "train" if phase == "train" else "forward"), drop=("head.",))
        assert _same(enc, other, {S: S_enc, T: S_enc}), phase
    decode = build_ops(spec, "decode")
    assert all(op.flops == 0 for op in decode if op.name.startswith("encoder."))


@pytest.mark.parametrize("name", ["t5-v1.1", "moe-dropless-top2", "gqa-rope", "umt5"])
def test_decoder_less_cross_attention_is_a_decoder_only_model(name):
    """The decoder's ops less its cross-attention (`cross.*`, `norm_cross`,
    `cross_residual`; and the shared table's extra gradient sum) have, op for op, the FLOPs of a decoder-only model of `layers`
    blocks (the final norm and head included) in every phase."""
    spec = make(name)
    alone = spec.with_changes(encoder_layers=0)
    for phase in PHASES:
        ops = build_ops(spec, phase)
        dec = {**_flops_by_name(ops, "decoder.", drop=("cross", "embed.tokens_grad_sum")),
               **{k: v for k, v in _flops_by_name(ops).items() if not k[0].startswith(("encoder.", "decoder."))}}
        assert _same(dec, _flops_by_name(build_ops(alone, phase)), {}), phase


@pytest.mark.parametrize("phase", PHASES)
def test_decoder_only_relative_position_bias(phase):
    spec = load_model({**BASE, **T5, "encoder_layers": 0, "name": "t5-decoder-only"})
    result = compare_with_torch(spec, phase, 2, 5, 9 if phase == "decode" else None)
    assert result.exact, result.describe()


@pytest.mark.parametrize("phase", PHASES)
def test_decoder_only_relative_bias_per_layer(phase):
    spec = load_model({**BASE, **T5, "encoder_layers": 0, "relative_bias": "layer", "layers": 3,
                       "name": "umt5-decoder-only"})
    result = compare_with_torch(spec, phase, 2, 5, 9 if phase == "decode" else None)
    assert result.exact, result.describe()
    assert "block.2.attn.relative_bias" in {op.name for op in build_ops(spec, phase)}


def test_relative_bias_per_layer_parameters():
    """A table per self-attention layer (3 encoder + 2 decoder) and none per stack: three
    tables more than T5's two; no gradient sum across layers in train."""
    umt5, t5 = make("umt5"), make("umt5", relative_bias="stack")
    extra = 3 * 8 * 2
    for phase in PHASES:
        assert count(umt5, batch=2, seq=3, phase=phase, encoder_seq=5).params \
            == count(t5, batch=2, seq=3, phase=phase, encoder_seq=5).params + extra
    names = {op.name for op in build_ops(umt5, "train")}
    assert "encoder.block.2.attn.relative_bias" in names and "decoder.block.1.attn.relative_bias.buckets" in names
    assert not any("position_bias.grad_sum" in n or n.startswith(("encoder.position_bias", "decoder.position_bias"))
                   for n in names)
    with pytest.raises(SpecError, match="relative_bias: 'layer' needs positions: 'relative'"):
        make("umt5", positions="rope", attention_impl="fused")


@pytest.mark.parametrize("phase", ["forward", "train"])
def test_encoder_only_relative_position_bias(phase):
    spec = load_model({**BASE, **T5, "encoder_layers": 0, "causal": False, "head": "none", "name": "t5-encoder"})
    result = compare_with_torch(spec, phase, 2, 6)
    assert result.exact, result.describe()


BYTES_CASES = [(name, phase) for name in ("tied-learned-post-fused", "gqa-rope", "moe-dropless-top2")
               for phase in PHASES if (name, phase) != ("moe-dropless-top2", "decode")]  # dropless decode: expected experts


@pytest.mark.parametrize("name, phase", BYTES_CASES)
def test_bytes_oracle_exact(name, phase):
    from flopsim.torchref.bytes_check import compare_bytes

    result = compare_bytes(make(name), phase, 2, 5, 8 if phase == "decode" else None, encoder_seq=7)
    assert result.exact, result.describe()


@pytest.mark.parametrize("phase", PHASES)
def test_bytes_oracle_relative_bias_differs_only_in_its_buckets(phase):
    """T5's buckets: the reference's kernel reads the S query position ids (8 bytes each)
    and does T5's log-bucket arithmetic per pair; flopsim's `position_bias.buckets` costs
    neither. Every other module and pass is exact."""
    from flopsim.torchref.bytes_check import compare_bytes

    result = compare_bytes(make("t5-v1.1"), phase, 2, 5, 8 if phase == "decode" else None, encoder_seq=7)
    queries = {"encoder.position_bias": 7, "decoder.position_bias": 1 if phase == "decode" else 5}
    for path, pass_, field, torch_value, flopsim_value in result.mismatches:
        assert path in ("", "encoder", "decoder") or path in queries, (path, pass_, field)
        assert pass_ == "fwd"
        if path in queries and field == "bytes":
            assert torch_value - flopsim_value == 8 * queries[path]
        if path in queries and field == "other_flops":
            assert flopsim_value == 0 < torch_value
