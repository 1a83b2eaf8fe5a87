"""Training dropout (`dropout: {attention, hidden}`; flopsim.ops.primitives.dropout,
flopsim.families.dense): its ops' bytes derived, the torch reference's FLOPs and bytes
equal to the op list's (FlopCounterMode, the bytes oracle), nothing at inference or at
p = 0, memory and selective recomputation, bad input."""

from __future__ import annotations

import pytest

from conftest import assert_exact, tiny
from flopsim.count import count
from flopsim.families import build_ops
from flopsim.memory import memory
from flopsim.parallel.layout import make_layout
from flopsim.spec.loader import SpecError
from flopsim.torchref.bytes_check import compare_bytes

BOTH = {"attention": 0.1, "hidden": 0.1}
B, S = 2, 5
W = 2  # bf16


def _spec(**changes):
    return tiny("gpt2-small", **{"name": "drop", "heads": 4, "kv_heads": 2, "d_ff": 48, **changes})


# the torch reference runs the same dropouts: FLOPs (dropout adds none) and bytes exact
EXACT = [
    pytest.param(_spec(attention_impl="explicit", dropout=BOTH), id="explicit-both-learned-pre"),
    pytest.param(_spec(attention_impl="explicit", positions="rope", norm_position="post", causal=False,
                       head="cls", token_types=2, dropout=BOTH), id="explicit-both-rope-post-encoder"),
    pytest.param(_spec(dropout={"hidden": 0.2}), id="fused-hidden"),
    pytest.param(_spec(family="moe", moe={"experts": 4, "top_k": 2}, attention_impl="explicit", ffn="gated",
                       activation="silu", dropout=BOTH), id="moe-explicit-both"),
]


@pytest.mark.parametrize("spec", EXACT)
@pytest.mark.parametrize("phase", ["train", "forward"])
def test_reference_flops_and_bytes_exact(spec, phase):
    assert_exact(spec, phase, B, S)
    cmp = compare_bytes(spec, phase, B, S)
    assert cmp.exact, cmp.describe()


def _named(ops, suffix, pass_="fwd"):
    return [op for op in ops if op.name.endswith(suffix) and op.pass_ == pass_]


def test_zero_or_absent_dropout_and_inference_change_nothing():
    plain = build_ops(_spec(attention_impl="explicit"), "train")
    assert build_ops(_spec(attention_impl="explicit", dropout={"attention": 0.0, "hidden": 0.0}), "train") == plain
    for phase in ("forward", "prefill", "decode"):
        with_dropout = build_ops(_spec(attention_impl="explicit", dropout=BOTH), phase)
        assert with_dropout == build_ops(_spec(attention_impl="explicit"), phase)
        assert not [op for op in with_dropout if op.variant == "dropout"]


def test_explicit_attention_dropout_moves_five_bytes_a_score_each_pass():
    """native_dropout reads P (2), writes P' (2) and the bool mask (1); its backward reads
    dP' (2) and the mask (1), writes dP (2). The attention op itself is unchanged (P V reads
    P' instead of P)."""
    spec = _spec(attention_impl="explicit", dropout={"attention": 0.1})
    ops = count(spec, batch=B, seq=S, phase="train").ops
    scores = B * spec.heads * S * S
    for i in range(spec.layers):
        (fwd,) = _named(ops, f"block.{i}.attn.core.dropout")
        (bwd,) = _named(ops, f"block.{i}.attn.core.dropout", "bwd")
        assert fwd.bytes == bwd.bytes == (2 * W + 1) * scores
        assert fwd.other_flops == bwd.other_flops == 2 * scores
    assert all(op.attention_core for op in build_ops(spec, "train") if op.name.endswith("core.dropout"))
    plain = count(_spec(attention_impl="explicit"), batch=B, seq=S, phase="train")
    assert [op for op in ops if op.kind == "attention"] == [op for op in plain.ops if op.kind == "attention"]
    assert count(spec, batch=B, seq=S, phase="train").bytes - plain.bytes == spec.layers * 2 * 5 * scores


def test_hidden_dropout_after_each_sub_block_and_the_embeddings():
    spec = _spec(dropout={"hidden": 0.1})
    ops = build_ops(spec, "train")
    drops = [op.name for op in ops if op.variant == "dropout" and op.pass_ == "fwd"]
    assert drops == ["embed.dropout"] + [f"block.{i}.{s}_dropout" for i in range(spec.layers)
                                         for s in ("attn", "mlp")]
    names = [op.name for op in ops if op.pass_ == "fwd"]
    for i in range(spec.layers):  # before the residual add, after the output projection
        for sub, before in (("attn", "attn.out"), ("mlp", "mlp.down")):
            k = names.index(f"block.{i}.{sub}_dropout")
            assert names[k - 1] == f"block.{i}.{before}" and names[k + 1] == f"block.{i}.{sub}_residual"
    tokens = B * S
    (embed,) = _named(count(spec, batch=B, seq=S, phase="train").ops, "embed.dropout")
    assert embed.act_read_bytes == tokens * spec.d_model * W
    assert embed.act_write_bytes == tokens * spec.d_model * (W + 1)


def test_fused_attention_drops_inside_its_kernel():
    """FlashAttention regenerates its mask from the seed: the kernel's bytes do not change,
    its arithmetic gains the dropout's 2 a score each pass; no separate op."""
    spec = _spec(dropout={"attention": 0.1})
    assert not [op for op in build_ops(spec, "train") if op.variant == "dropout"]
    ops, plain = (count(x, batch=B, seq=S, phase="train").ops for x in (spec, _spec()))
    scores = B * spec.heads * S * S
    for a, b in zip(ops, plain):
        assert a.bytes == b.bytes
        extra = 2 * scores if a.kind == "attention" else 0
        assert a.other_flops - b.other_flops == extra


def test_memory_keeps_outputs_and_masks_and_selective_recomputes_the_probability_dropout():
    b, s = 2, 64
    plain, dropped = _spec(attention_impl="explicit"), _spec(attention_impl="explicit", dropout=BOTH)
    h, a, L = dropped.d_model, dropped.heads, dropped.layers
    sbh, as2b = s * b * h, a * s * s * b
    # per block: two hidden dropouts (2 + 1 bytes each per value) and the probabilities' (2 + 1 per score);
    # the embeddings' one more
    extra = L * (2 * 3 * sbh + 3 * as2b) + 3 * sbh
    for recompute, expected in (("none", extra), ("selective", extra - L * 3 * as2b)):
        grown = memory(dropped, phase="train", batch=b, seq=s, recompute=recompute).activations_bytes \
            - memory(plain, phase="train", batch=b, seq=s, recompute=recompute).activations_bytes
        assert grown == pytest.approx(expected, rel=1e-12)


def test_selective_recomputation_runs_the_probability_dropout_again():
    spec = _spec(attention_impl="explicit", dropout=BOTH)
    layout = make_layout(spec, "train", tp=2, recompute="selective")
    rc = [op.name for op in count(spec, batch=B, seq=S, phase="train", layout=layout).ops
          if op.name.endswith(".recompute")]
    assert sorted(rc) == sorted(f"block.{i}.attn.core{x}.recompute" for i in range(spec.layers)
                                for x in ("", ".dropout"))


@pytest.mark.parametrize("changes,expected", [
    (dict(dropout={"attention": 1.0}), "dropout.attention"),
    (dict(dropout={"hidden": -0.1}), "dropout.hidden"),
    (dict(dropout={"residual": 0.1}), "dropout.residual"),
    (dict(family="mod", mod={"capacity": 0.5}, dropout={"hidden": 0.1}), "family mod"),
    (dict(encoder_layers=1, dropout={"hidden": 0.1}), "encoder-decoder"),
])
def test_bad_dropout_is_one_line_naming_the_field(changes, expected):
    with pytest.raises(SpecError) as err:
        _spec(**changes)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_reference_refuses_a_fused_attention_dropout():
    from flopsim.torchref.check import compare_with_torch

    with pytest.raises(ValueError, match="does not drop inside"):
        compare_with_torch(_spec(dropout={"attention": 0.1}), "train", B, S)


def test_plan_selective_recomputation_reruns_the_probability_dropout():
    """plan train --recompute selective reruns each block's attention core with its
    probabilities' dropout (Korthikanti et al. 2022 §4.2): the recompute time is those
    forward ops' predicted time, one GPU, one micro-batch."""
    import flopsim
    from flopsim.planning import plan_training
    from flopsim.predict import predict

    spec = flopsim.load_model("gpt2-small").with_changes(attention_impl="explicit",
                                                         dropout=dict(attention=0.1, hidden=0.1))
    plan = plan_training(spec, "a100-80gb", gpus=1, tokens=1e8, seq=512, recompute="selective", global_batch=8)
    ops = predict(spec, "a100-80gb", phase="train", batch=1, seq=512).ops
    core = [o for o in ops if o.pass_ == "fwd" and (o.kind == "attention" or o.name.endswith(".attn.core.dropout"))]
    assert len(core) == 2 * 12  # each block's core and its dropout
    assert plan.to_dict()["compute"]["recompute_s_per_microbatch"] == pytest.approx(sum(o.time_s for o in core),
                                                                                  rel=1e-12)
