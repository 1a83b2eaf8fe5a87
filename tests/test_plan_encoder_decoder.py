"""Training plans of encoder-decoders (T5, Switch): the stacks over pipeline stages
(Megatron-LM's split rank), the sends and collectives the decoder's cross-attention adds,
memory per stage, tokens per sequence, the search and the CLI. Each expected value is
written as its derivation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import one_error_line
from conftest import run_cli as run

import flopsim
from flopsim.count import count
from flopsim.errors import InputError
from flopsim.memory import MemoryModel
from flopsim.parallel.layout import STACK_BIAS, make_layout, stage_blocks, stage_places
from flopsim.planning import plan_training
from flopsim.planning.search import candidate_layouts, search_training

H100 = "h100-sxm"
T5 = flopsim.load_model("t5-base")  # 12 + 12 blocks, d_model 768, 12 heads, bf16, tied head
D, W, HEADS = 768, 2, 12
T5_PARAMS = 222_903_552  # Switch Transformers' "223M parameter T5-Base"
S_ENC, S = 128, 32  # encoder input and decoder target tokens a sequence


def _layout(**kw):
    return make_layout(T5, "train", **kw)


def test_the_stacks_split_at_the_encoder_stages():
    # default: floor(pp x 12 / 24) encoder stages, each stack as even as it goes over its own
    assert stage_blocks(T5, 4, 1, _layout(pp=4).encoder_stages) == [list(range(0, 6)), list(range(6, 12)),
                                                                    list(range(12, 18)), list(range(18, 24))]
    assert _layout(pp=3).encoder_stages == 3 * 12 // 24 == 1  # the decoder takes the odd stage
    assert stage_blocks(T5, 3, 1, 2) == [list(range(0, 6)), list(range(6, 12)), list(range(12, 24))]
    assert _layout(pp=1).encoder_stages is None
    # the embeddings on stage 0, the decoder's on its first stage, each stack's bias on each of its stages
    assert stage_places(T5, 4, 1, 1, 2) == set(range(6, 12)) | {STACK_BIAS}
    assert -2 in stage_places(T5, 4, 2, 1, 2) and -2 not in stage_places(T5, 4, 3, 1, 2)


@pytest.mark.parametrize("kw, field", [
    (dict(pp=4, encoder_stages=4), "encoder_stages"), (dict(pp=4, encoder_stages=0), "encoder_stages"),
    (dict(pp=2, encoder_stages=1, virtual_stages=2), "virtual_stages"), (dict(encoder_stages=1), "encoder_stages"),
])
def test_layouts_not_modelled_are_one_line_errors(kw, field):
    with pytest.raises(InputError, match=rf"^{field}"):
        _layout(**kw)
    with pytest.raises(InputError, match="^encoder_stages"):
        make_layout(flopsim.load_model("llama-2-7b"), "train", pp=2, encoder_stages=1)


def _sends(stage, tp=2):
    r = count(T5, batch=1, seq=S, encoder_seq=S_ENC, phase="train", layout=_layout(tp=tp, pp=4, stage=stage))
    return [(o.name.split(".", 2)[2], o.pass_, float(o.comm_bytes)) for o in r.ops
            if o.kind == "collective" and o.tags["group"] == "pp"]


def test_decoder_stages_pass_the_encoders_output_on():
    enc, dec = 1 * S_ENC * D * W / 2, 1 * S * D * W / 2  # B x tokens x d_model values / tp (scatter-gather)
    assert _sends(0) == [("send_fwd", "fwd", enc)]
    assert _sends(1) == [("send_fwd", "fwd", enc), ("send_bwd", "bwd", enc)]
    # the first decoder stage: its input is the encoder's output alone, the decoder's embeddings run here
    assert _sends(2) == [("send_fwd", "fwd", dec), ("send_fwd.encoder_output", "fwd", enc),
                         ("send_bwd.encoder_output", "bwd", enc)]
    assert _sends(3) == [("send_bwd", "bwd", dec), ("send_bwd.encoder_output", "bwd", enc)]


def test_tensor_parallel_collectives_of_both_stacks():
    r = count(T5, batch=1, seq=S, encoder_seq=S_ENC, phase="train", layout=_layout(tp=2))
    tp = [o for o in r.ops if o.kind == "collective" and o.tags["group"] == "tp"]
    per = {(layer, side): sum(1 for o in tp if o.layer == layer and o.pass_ == side) for layer in range(24)
           for side in ("fwd", "bwd")}
    # sequence parallel: a gather in and a reduce-scatter out per sub-layer (encoder 2, decoder 3), and
    # before each cross-attention's key/value projection a gather of the encoder's output; the
    # conjugates backward, once each
    assert {per[(i, s)] for i in range(12) for s in ("fwd", "bwd")} == {2 * 2}
    assert {per[(i, s)] for i in range(12, 24) for s in ("fwd", "bwd")} == {3 * 2 + 1}
    kv = [o for o in tp if o.name.endswith("cross.kv.tp_gather") and o.pass_ == "fwd"]
    assert len(kv) == 12 and {float(o.comm_bytes) for o in kv} == {1 * S_ENC * D * W}
    # full recomputation copies each block's forward once
    full = count(T5, batch=1, seq=S, encoder_seq=S_ENC, phase="train", layout=_layout(tp=2, recompute="full"))
    again = [o.name for o in full.ops if o.layer == 23 and o.name.endswith(".recompute")]
    assert again == [f"{o.name}.recompute" for o in full.ops if o.layer == 23 and o.pass_ == "fwd"
                     and not o.name.endswith(".recompute")]


def test_zero_reduces_every_parameters_gradient_once():
    # dp 2, ZeRO 0: an all-reduce of each parameter's bf16 gradient, the shared token table included
    r = count(T5, batch=1, seq=S, encoder_seq=S_ENC, phase="train", layout=_layout(dp=2))
    grads = [float(o.comm_bytes) for o in r.ops if o.name.endswith("grad_reduce")]
    assert sum(grads) == T5_PARAMS * W
    # pp 4: the stages' together, + each stack's 32 x 12 bias table on its second stage
    staged = sum(float(o.comm_bytes) for stage in range(4) for o in count(
        T5, batch=1, seq=S, encoder_seq=S_ENC, phase="train", layout=_layout(pp=4, dp=2, stage=stage)).ops
        if o.name.endswith("grad_reduce"))
    assert staged == (T5_PARAMS + 2 * 32 * HEADS) * W


def test_stage_memory_adds_the_received_encoder_output():
    model = MemoryModel(T5, "train", encoder_seq=S_ENC)
    stages = [stage_places(T5, 4, s, 1, 2) for s in range(4)]
    acts = model.stage_activations(2, S, S, stages)
    whole = model.evaluate(2, S, S)["activations_bytes"]
    assert model.stage_activations(2, S, S, [stage_places(T5, 1, 0)]) == [whole]
    # the two decoder stages keep the encoder's output (2 x S_enc x d_model); stage 1 and stage 3 make
    # their stack's bias again (heads x S x S, kept for its gradient)
    assert sum(acts) == pytest.approx(whole + 2 * 2 * S_ENC * D * W + HEADS * S_ENC ** 2 * W + HEADS * S ** 2 * W,
                                      rel=1e-12)
    full = MemoryModel(T5, "train", recompute="full", encoder_seq=S_ENC)
    assert full.stage_activations(2, S, S, [stage_places(T5, 1, 0)]) == [full.evaluate(2, S, S)["activations_bytes"]]


def _plan(**kw):
    args = dict(gpus=16, tokens=1e9, seq=S, encoder_seq=S_ENC, tp=2, pp=4, global_batch=64)
    return plan_training("t5-base", H100, **{**args, **kw})


def test_plan_memory_is_the_fullest_stage():
    p = _plan()
    assert p.config["encoder_stages"] == 2 and p.config["microbatches"] == 64 // 2
    acts = MemoryModel(T5, "train", encoder_seq=S_ENC).stage_activations(
        1, S, S, [stage_places(T5, 4, s, 1, 2) for s in range(4)])
    held = [a * min(4 - s, 32) / 2 for s, a in enumerate(acts)]  # 1F1B: stage s holds pp - s, / tp
    assert p.memory["activations_bytes"] == pytest.approx(max(held), rel=1e-12)
    assert p.memory["activation_stage"] == int(np.argmax(held))


def test_plan_time_is_the_slowest_stages_own_op_list():
    p = _plan(recompute="full", zero=1)
    per_stage = []
    for stage in range(4):
        layout = make_layout(T5, "train", tp=2, pp=4, dp=2, zero=1, recompute="full", stage=stage, gpus_per_node=8)
        r = flopsim.predict(T5, H100, phase="train", batch=1, seq=S, encoder_seq=S_ENC, layout=layout,
                            links=p.links.by_level)
        per_stage.append(sum(op.time_s for op in r.ops if op.kind != "optimizer" and op.tags.get("group") != "dp"))
    assert p.compute["stage_s_per_microbatch"] == pytest.approx(max(per_stage), rel=1e-9)
    assert p.compute["slowest_stage"] == int(np.argmax(per_stage))


def test_a_sequence_trains_its_encoder_and_decoder_tokens():
    p = _plan(global_batch=None, pp=1, gpus=2)  # dp 1
    per_seq = S_ENC + S
    assert p.config["global_batch"] == math.ceil(4 * 2 ** 20 / per_seq)  # ~4M tokens
    assert p.totals["tokens_per_step"] == p.config["global_batch"] * per_seq
    flops = count(T5, batch=1, seq=S, encoder_seq=S_ENC, phase="train").flops
    assert p.totals["model_flops_per_step"] == flops * p.config["global_batch"]
    with pytest.raises(InputError, match="^global_batch_tokens"):
        _plan(global_batch=None, global_batch_tokens=per_seq * 64 + S)
    long = _plan(pp=1, gpus=2, encoder_seq=1024)  # relative positions: costed beyond max_seq 512, said so
    assert any(n.startswith("encoder_seq 1024 exceeds max_seq 512") for n in long.notes)


def test_switch_routing_takes_each_stacks_tokens():
    from flopsim.ops import popularity

    spec = flopsim.load_model("switch-base-128")  # 6 MoE layers in each stack, top-1
    pi = popularity.spec_inclusion(spec)
    p = plan_training(spec, H100, gpus=8, tokens=1e9, seq=S, encoder_seq=S_ENC, ep=2)
    # the EP group routes ep micro-batches: the decoder's 2 x 32 tokens are the more uneven
    assert p.config["expert_imbalance"] == popularity.imbalance(pi, 2 * S, 2) > popularity.imbalance(pi, 2 * S_ENC, 2)
    assert any("fewer tokens" in n for n in p.notes)
    capped = spec.with_changes(moe={"capacity_factor": 1.0})
    q = plan_training(capped, H100, gpus=8, tokens=1e9, seq=S, encoder_seq=S_ENC)
    dropped = sum(6 * popularity.expected_dropped(pi, n, math.ceil(n / 128)) for n in (S_ENC, S))
    assert q.config["dropped_fraction"] == pytest.approx(dropped / (6 * S_ENC + 6 * S), rel=1e-12)


def test_search_lays_out_both_stacks():
    # pp where the default encoder stages floor(pp / 2) divide the 12 encoder blocks and the rest the 12
    # decoder blocks; plain 1F1B only
    got = candidate_layouts(T5, 24, 8, [1], [1], ["none"])
    pps = {c["pp"] for c in got}
    assert pps == {p for p in (1, 2, 3, 4, 6, 8, 12, 24) if p == 1 or (12 % (p // 2) == 0 and 12 % (p - p // 2) == 0)}
    assert {c["virtual_stages"] for c in got} == {1}
    result = search_training("t5-base", H100, gpus=8, tokens=1e9, seq=S, encoder_seq=S_ENC, micro_batches=(1,),
                             zero=(1,), recompute=("none",))
    row = next(r for r in result.fastest if r["pp"] > 1)
    p = plan_training("t5-base", H100, gpus=8, tokens=1e9, seq=S, encoder_seq=S_ENC, tp=row["tp"], pp=row["pp"],
                      micro_batch=1, zero=1, global_batch=row["global_batch"])
    assert row["encoder_stages"] == p.config["encoder_stages"] == row["pp"] // 2
    assert p.step_time_s == pytest.approx(row["step_time_s"], rel=1e-9)
    assert p.memory["total_bytes"] / 1e9 == pytest.approx(row["memory_gb"], rel=1e-12)


def test_cli_plans_and_searches_an_encoder_decoder():
    base = ("plan", "train", "t5-base", "-H", H100, "--tokens", "1e9", "--seq", S, "--encoder-seq", S_ENC)
    out = run(*base, "--gpus", 16, "--tp", 2, "--pp", 4, "--encoder-stages", 1, "--format", "json")
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["config"]["encoder_stages"] == 1 and data["config"]["encoder_seq"] == S_ENC
    out = run(*base, "--gpus", 16, "--pp", 4)
    assert out.exit_code == 0 and "encoder on stages 0-1" in out.output
    out = run(*base, "--gpus", 8, "--search", "--micro-batches", 1, "--zero", 1, "--recompute", "none")
    assert out.exit_code == 0 and "Pareto front" in out.output and f"--encoder-seq {S_ENC}" in out.output
    for args, field in ((["--gpus", 16, "--pp", 4, "--virtual-stages", 2], "virtual_stages"),
                        (["--gpus", 16, "--pp", 4, "--encoder-stages", 4], "encoder_stages"),
                        (["--gpus", 8, "--search", "--encoder-stages", 1], "encoder_stages"),
                        (["--gpus", 8, "--encoder-seq", 0], "encoder_seq")):
        assert field in one_error_line(run(*base, *args))
    assert "encoder_seq" in one_error_line(run("plan", "train", "llama-2-7b", "-H", H100, "--tokens", "1e9",
                                               "--gpus", 8, "--encoder-seq", 64))
