"""flopsim.parallel: a layout turns one step's op list into one GPU's ops plus the
collectives among the GPUs. Each expected value is written as its derivation."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import one_error_line
from conftest import run_cli as run

import flopsim
from flopsim.collectives import collective_s
from flopsim.count import count
from flopsim.errors import InputError, SpecError
from flopsim.parallel.layout import make_layout
from flopsim.parallel.shard import stage_of_layers
from flopsim.roofline import collective_time

LLAMA = flopsim.load_model("llama-2-7b")  # d 4096, 32 blocks, 32 heads, d_ff 11008, vocab 32000, bf16
D, L, DFF, V, W = 4096, 32, 11008, 32000, 2
B, S = 2, 256


def _layout(spec=LLAMA, phase="train", **kw):
    return make_layout(spec, phase, **kw)


def _collectives(result, **match):
    return [op for op in result.ops if op.kind == "collective"
            and all(op.tags.get(k) == v if k != "variant" else op.variant == v for k, v in match.items())]


def test_a_one_gpu_layout_changes_nothing():
    base = count(LLAMA, batch=B, seq=S, phase="train")
    same = count(LLAMA, batch=B, seq=S, phase="train", layout=_layout())
    assert [(o.key, o.flops, o.bytes, o.params) for o in same.ops] == [(o.key, o.flops, o.bytes, o.params)
                                                                       for o in base.ops]


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_tensor_parallelism_splits_the_matrix_flops_exactly(tp):
    base = count(LLAMA, batch=B, seq=S, phase="train")
    one = count(LLAMA, batch=B, seq=S, phase="train", layout=_layout(tp=tp))
    assert one.flops * tp == base.flops


def test_parameters_per_gpu_replicate_the_norms():
    # tp 2: every matrix and both vocabulary tables / 2; the RMSNorms whole on each rank
    one = count(LLAMA, batch=B, seq=S, phase="forward", layout=_layout(phase="forward", tp=2))
    matrices = L * (4 * D * D + 3 * D * DFF)
    norms = L * 2 * D + D
    assert one.params == matrices / 2 + norms + 2 * V * D / 2


def test_tensor_parallel_collectives_with_and_without_sequence_parallelism():
    act = B * S * D * W  # a sub-layer's output: B x S x d_model values
    # train (sequence parallel): per sub-layer an all-gather in and a reduce-scatter out, forward; their
    # conjugates backward; + the embedding's reduce-scatter and the head's all-gather (and conjugates)
    r = count(LLAMA, batch=B, seq=S, phase="train", layout=_layout(tp=4))
    tp_ops = _collectives(r, group="tp")
    assert Counter((o.variant, o.pass_) for o in tp_ops) == {
        ("all_gather", "fwd"): 2 * L + 1, ("reduce_scatter", "fwd"): 2 * L + 1,
        ("reduce_scatter", "bwd"): 2 * L + 1, ("all_gather", "bwd"): 2 * L + 1}
    assert {o.comm_bytes for o in tp_ops} == {act}
    assert {o.tags["ranks"] for o in tp_ops} == {4} and {o.tags["level"] for o in tp_ops} == {"scale_up"}
    # decode (no sequence parallelism): one all-reduce per sub-layer and the embedding's, of B x d_model,
    # then the vocabulary-split logits all-gathered, B x V
    d = count(LLAMA, batch=B, seq=1, context=S, phase="decode", layout=_layout(phase="decode", tp=4))
    ars = _collectives(d, group="tp")
    assert [o.variant for o in ars] == ["all_reduce"] * (2 * L + 1) + ["all_gather"]
    assert {o.comm_bytes for o in ars[:-1]} == {B * D * W} and ars[-1].comm_bytes == B * V * W


def test_gqa_beyond_kv_heads_replicates_the_kv_cache():
    # tp 16 > 8 KV heads: each rank keeps one KV head whole (replicated on 2 ranks) -> KV / 8
    spec = flopsim.load_model("llama-3.1-70b")  # 64 heads, 8 KV heads, 80 blocks
    base = count(spec, batch=1, seq=1, context=1024, phase="decode")
    one = count(spec, batch=1, seq=1, context=1024, phase="decode", layout=_layout(spec, "decode", tp=16))
    kv = lambda r: sum(o.kv_read_bytes + o.kv_write_bytes for o in r.ops)  # noqa: E731
    assert kv(one) == pytest.approx(kv(base) / min(16, spec.kv_heads))


def test_a_kernel_loading_the_cache_per_query_head():
    """`kv_cache_reads: per_query_head` (a thread block per query head: TensorRT-LLM's masked
    MHA before XQA): a decode step's attention loads each KV head heads / kv_heads times;
    the cache's append, prefill and MHA models are unchanged; under tp each GPU loads
    its own query heads' share (/ tp, not / min(tp, kv_heads))."""
    spec = flopsim.load_model("llama-3.1-70b")  # 64 heads, 8 KV heads, 80 blocks, d_head 128
    per_query = spec.with_changes(kv_cache_reads="per_query_head")
    T = 1024
    reads = lambda r: sum(o.kv_read_bytes for o in r.ops if o.kind == "attention")  # noqa: E731
    base = count(spec, batch=B, context=T, phase="decode")
    assert reads(base) == 80 * B * T * 8 * (128 + 128) * W  # layers x B x T x kv heads x (K + V) x bytes
    group = count(per_query, batch=B, context=T, phase="decode")
    assert reads(group) == 80 * B * T * 64 * (128 + 128) * W  # a load per query head
    writes = lambda r: sum(o.kv_write_bytes for o in r.ops)  # noqa: E731
    assert writes(group) == writes(base)
    assert count(per_query, batch=B, seq=S, phase="prefill").bytes == count(spec, batch=B, seq=S,
                                                                              phase="prefill").bytes
    mha = flopsim.load_model("llama-2-7b")
    assert count(mha.with_changes(kv_cache_reads="per_query_head"), batch=B, context=T, phase="decode").bytes \
        == count(mha, batch=B, context=T, phase="decode").bytes
    tp16 = count(per_query, batch=B, context=T, phase="decode", layout=_layout(per_query, "decode", tp=16))
    assert reads(tp16) == pytest.approx(reads(group) / 16)  # 4 local query heads each load their KV head
    with pytest.raises(SpecError, match="kv_cache_reads: per_query_head"):
        flopsim.load_model("deepseek-v2-lite").with_changes(kv_cache_reads="per_query_head")


def test_expert_parallel_all_to_alls_and_expert_shards():
    spec = flopsim.load_model("mixtral-8x7b")  # 32 MoE blocks, top-2 of 8, d 4096, d_expert 14336
    layout = _layout(spec, ep=4, dp=4, expert_load=1.25)
    r = count(spec, batch=1, seq=S, phase="train", layout=layout)
    a2a = _collectives(r, group="ep")
    # dispatch and combine forward, the same two backward, per MoE layer; each the routed rows
    # (S tokens x top-2) x d_model x 2 bytes, x the busiest rank's load
    assert len(a2a) == 4 * 32
    assert [o.comm_bytes for o in a2a] == pytest.approx([S * 2 * D * W * 1.25] * len(a2a))
    # a GPU holds 8 / 4 experts: their weights / 4; their work is the busiest rank's
    base = count(spec, batch=1, seq=S, phase="train")
    gate_up = next(o for o in base.ops if o.name == "block.0.moe.experts.gate_up" and o.pass_ == "fwd")
    mine = next(o for o in r.ops if o.name == "block.0.moe.experts.gate_up" and o.pass_ == "fwd")
    assert mine.params == gate_up.params / 4 and mine.weight_bytes == gate_up.weight_bytes / 4
    assert mine.flops == pytest.approx(gate_up.flops * 1.25)
    assert mine.gemm == (8 / 4, gate_up.gemm[1] * 4 * 1.25, gate_up.gemm[2], gate_up.gemm[3])


def test_pipeline_stages_and_their_sends():
    assert [list(r) for r in stage_of_layers(5, 2)] == [[0, 1, 2], [3, 4]]
    for stage in (0, 1, 3):
        r = count(LLAMA, batch=B, seq=S, phase="train", layout=_layout(pp=4, tp=2, stage=stage))
        layers = {o.layer for o in r.ops if o.kind != "collective"}
        blocks = set(range(8 * stage, 8 * stage + 8))
        assert layers == blocks | ({-1} if stage == 0 else set()) | ({L} if stage == 3 else set())
        sends = _collectives(r, group="pp")
        # the stage's activations forward (not the last), their gradients back (not the first),
        # B x S x d_model / tp (Megatron's scatter-gather)
        assert [o.pass_ for o in sends] == (["fwd"] if stage < 3 else []) + (["bwd"] if stage > 0 else [])
        assert {o.comm_bytes for o in sends} == {B * S * D * W / 2}


@pytest.mark.parametrize("zero, expected", [
    (0, {("all_reduce", "step", "backward")}),
    (1, {("reduce_scatter", "step", "backward"), ("all_gather", "step", "forward")}),
    (2, {("reduce_scatter", "microbatch", "backward"), ("all_gather", "step", "forward")}),
    (3, {("reduce_scatter", "microbatch", "backward"), ("all_gather", "microbatch", "forward"),
         ("all_gather", "microbatch", "backward")}),
])
def test_zero_stages_move_the_layers_parameters(zero, expected):
    r = count(LLAMA, batch=B, seq=S, phase="train", layout=_layout(dp=8, zero=zero))
    dp_ops = _collectives(r, group="dp")
    assert {(o.variant, o.tags["per"], o.tags["window"]) for o in dp_ops} == expected
    # one collective of each kind per layer: the embedding, 32 blocks, the head; a block's
    # message is its parameters x 2 bytes (gradients and weights in bf16)
    block = 4 * D * D + 3 * D * DFF + 2 * D
    grads = [o for o in dp_ops if o.pass_ == "bwd" and o.variant != "all_gather"]
    assert len(grads) == L + 2 and {o.comm_bytes for o in grads if 0 <= o.layer < L} == {block * W}
    assert sum(o.comm_bytes for o in grads) == count(LLAMA, seq=16).params * W


def test_hybrid_sharding_shards_in_a_node_and_all_reduces_the_shards_over_the_replicas():
    """FSDP's HYBRID_SHARD: ZeRO-3 over 8 ranks (one node), 4 replicas over the network. A
    block's gradients are reduce-scattered in the shard group, then each GPU's eighth
    all-reduced over the replicas; weights are gathered in the node."""
    hybrid = count(LLAMA, batch=B, seq=S, phase="train", layout=_layout(dp=32, zero=3, zero_shard=8))
    block = 4 * D * D + 3 * D * DFF + 2 * D
    shard_ops = _collectives(hybrid, group="dp_shard")
    assert {(o.variant, o.tags["ranks"], o.tags["level"]) for o in shard_ops} == {
        ("reduce_scatter", 8, "scale_up"), ("all_gather", 8, "scale_up")}
    replicas = _collectives(hybrid, group="dp_replica")
    assert {(o.variant, o.tags["ranks"], o.tags["level"], o.tags["node_ranks"]) for o in replicas} == {
        ("all_reduce", 4, "scale_out", 1)}  # one rank of each replica group a node: one NIC's ring
    assert {o.comm_bytes for o in replicas if 0 <= o.layer < L} == {block * W / 8}
    assert not _collectives(hybrid, group="dp")
    # the degenerate setting: sharding over the whole data-parallel group is plain ZeRO
    whole = count(LLAMA, batch=B, seq=S, phase="train", layout=_layout(dp=32, zero=3, zero_shard=32))
    plain = count(LLAMA, batch=B, seq=S, phase="train", layout=_layout(dp=32, zero=3))
    assert [(o.name, o.variant, o.comm_bytes, o.tags) for o in _collectives(whole)] == [
        (o.name, o.variant, o.comm_bytes, o.tags) for o in _collectives(plain)]


@pytest.mark.parametrize("kw, field", [(dict(dp=32, zero=3, zero_shard=6), "zero_shard"),
                                       (dict(dp=32, zero=0, zero_shard=8), "zero_shard"),
                                       (dict(dp=32, zero=3, zero_shard=0), "zero_shard")])
def test_hybrid_sharding_refuses_what_it_cannot_be(kw, field):
    with pytest.raises(InputError, match=f"^{field}: "):
        _layout(**kw)


def test_recomputation_copies_the_forward():
    full = count(LLAMA, batch=B, seq=S, phase="train", layout=_layout(tp=2, recompute="full"))
    plain = count(LLAMA, batch=B, seq=S, phase="train", layout=_layout(tp=2))
    block_fwd = [o for o in plain.ops if o.pass_ == "fwd" and 0 <= o.layer < L]
    rc = [o for o in full.ops if o.name.endswith(".recompute")]
    assert sorted(o.name for o in rc) == sorted(f"{o.name}.recompute" for o in block_fwd)
    assert full.flops - plain.flops == sum(o.flops for o in block_fwd)
    selective = count(LLAMA, batch=B, seq=S, phase="train", layout=_layout(tp=2, recompute="selective"))
    assert {o.kind for o in selective.ops if o.name.endswith(".recompute")} == {"attention"}


def test_context_parallel_gathers_keys_and_values():
    r = count(LLAMA, batch=B, seq=S, phase="forward", layout=_layout(phase="forward", cp=4, tp=2))
    base = count(LLAMA, batch=B, seq=S, phase="forward")
    assert r.flops * 8 == base.flops
    kv = _collectives(r, group="cp")
    # per block: keys and values of the whole sequence, 2 x B x S x kv_heads x d_head x 2 bytes, / tp heads
    assert len(kv) == L and {o.comm_bytes for o in kv} == {2 * B * S * 32 * 128 * W / 2}
    assert {o.tags["level"] for o in kv} == {"scale_up"}  # tp * cp = 8 ranks: one node


def test_mod_decode_collectives_launch_when_the_block_runs():
    spec = flopsim.load_model("decoder-220m-mod")
    r = count(spec, batch=1, seq=1, context=64, phase="decode", layout=_layout(spec, "decode", tp=2))
    kernels = {o.tags.get("group"): o.kernels for o in _collectives(r) if o.layer == 1}
    assert 0 < kernels["tp"] < 1  # a routed block runs with probability below 1


def test_encoder_decoder_tensor_parallel_reduces_per_sub_layer():
    spec = flopsim.load_model("t5-v1.1-base")  # 12 + 12 blocks
    r = count(spec, batch=1, seq=8, encoder_seq=16, phase="forward", layout=_layout(spec, "forward", tp=2))
    per_layer = Counter(o.layer for o in _collectives(r, group="tp") if 0 <= o.layer < spec.blocks)
    assert set(per_layer[i] for i in range(12)) == {2} and set(per_layer[i] for i in range(12, 24)) == {3}


def test_a_collective_costs_latency_plus_its_message_over_the_link():
    hw = flopsim.load_hardware("h100-sxm")
    cal = flopsim.load_calibration("auto", hw)
    r = count(LLAMA, batch=1, seq=1, context=128, phase="decode", layout=_layout(phase="decode", tp=8))
    op = _collectives(r, group="tp")[1]
    link = cal.link("scale_up", hw)
    t = collective_time(op, hw, cal)
    expected = link.latency_s + 2 * (8 - 1) * link.hop_latency_s + 2 * 7 / 8 * D * W / link.bus_bytes_per_s
    assert t.time_s == pytest.approx(expected) == collective_s("all_reduce", D * W, 8, link.bus_bytes_per_s,
                                                               link.latency_s, link.hop_latency_s)
    assert t.bound == "comm"


@pytest.mark.parametrize("kw, field", [
    (dict(tp=3), "tp"), (dict(pp=99), "pp"), (dict(ep=2), "ep"), (dict(zero=4), "zero"),
    (dict(recompute="some"), "recompute"), (dict(stage=4, pp=2), "stage"), (dict(tp=0), "tp"),
])
def test_bad_layouts_are_one_line_errors(kw, field):
    with pytest.raises(InputError, match=rf"^{field}"):
        _layout(**kw)


def test_cli_count_and_predict_show_the_collectives():
    out = run("count", "llama-2-7b", "--seq", "128", "--tp", "2", "--ops", "--format", "csv")
    assert out.exit_code == 0 and "tp_reduce" in out.output and "all_reduce" not in out.output.split("\n")[0]
    out = run("predict", "llama-2-7b", "-H", "h100-sxm", "--phase", "decode", "--seq", "128", "--tp", "8")
    assert out.exit_code == 0 and "collectives" in out.output
    line = one_error_line(run("predict", "llama-2-7b", "-H", "h100-sxm", "--tp", "5"))
    assert "tp" in line and "5" in line


def test_interleaved_stages_hold_chunks_and_send_per_chunk():
    # 32 blocks, pp 4, v 2: chunks of 32 / 8 = 4 blocks, chunk c on stage c mod 4
    assert stage_of_layers(32, 4, 2)[1] == [4, 5, 6, 7, 20, 21, 22, 23]
    r = count(LLAMA, batch=B, seq=S, phase="train", layout=_layout(pp=4, virtual_stages=2, stage=3))
    sends = _collectives(r, group="pp")
    # the last stage's chunks 3 and 7: chunk 3 sends on, chunk 7 (the model's last) does not; both send back
    assert [o.pass_ for o in sends] == ["fwd", "bwd", "bwd"]
    with pytest.raises(InputError, match="^virtual_stages"):
        _layout(pp=4, virtual_stages=3)  # 32 blocks do not split into 12 chunks


def test_fp32_unfused_loss_is_split_with_the_vocabulary_parallel_head():
    """Megatron's fp32 loss runs on each rank's share of the vocabulary: every one of its
    kernels, forward and backward, moves 1 / tp of the logits' bytes, with or without
    sequence parallelism (without it, an op outside the vocabulary-parallel region would
    run whole on every rank)."""
    spec = LLAMA.with_changes(loss_impl="fp32_unfused")

    def loss_bytes(result, pass_):
        return {o.name: float(o.bytes) for o in result.ops if ".loss." in o.name and o.pass_ == pass_}

    one = count(spec, batch=B, seq=S, phase="train")
    for sp in (True, False):
        two = count(spec, batch=B, seq=S, phase="train", layout=_layout(spec, tp=2, sequence_parallel=sp))
        for pass_ in ("fwd", "bwd"):
            whole, half = loss_bytes(one, pass_), loss_bytes(two, pass_)
            assert set(whole) == set(half) and len(whole) >= 3
            assert all(half[k] == pytest.approx(v / 2, rel=1e-12) for k, v in whole.items()), (sp, pass_)


def test_a_head_left_whole_is_read_whole_on_every_rank():
    """gpt-fast's tensor parallelism (its tp.py shards only the blocks' attention and FFN
    products): the LM head and the embedding table stay whole on each rank, so a decode
    step reads the whole head; the embedding needs no all-reduce, the blocks are unchanged."""
    tp = 8
    split = count(LLAMA, batch=B, seq=1, context=S, phase="decode", layout=_layout(phase="decode", tp=tp))
    whole = count(LLAMA, batch=B, seq=1, context=S, phase="decode",
                  layout=_layout(phase="decode", tp=tp, vocab_parallel=False))
    one = count(LLAMA, batch=B, seq=1, context=S, phase="decode")
    by_name = {o.key: o for o in whole.ops}
    head = next(o for o in one.ops if o.name == "head.lm")
    assert (by_name[head.key].flops, by_name[head.key].weight_bytes, by_name[head.key].gemm) == (
        head.flops, head.weight_bytes, head.gemm)
    assert whole.params - split.params == (1 - 1 / tp) * 2 * V * D  # head and table whole: 2 x V x d
    extra_weight_bytes = (1 - 1 / tp) * (V * D * W      # the head's weights, read whole
                                         + B * D * W)   # the B embedding rows looked up, each on every rank
    weights = [sum(float(o.weight_bytes) for o in r.ops) for r in (whole, split)]
    assert weights[0] - weights[1] == pytest.approx(extra_weight_bytes, rel=1e-12)
    assert [o.variant for o in _collectives(whole, group="tp")] == ["all_reduce"] * (2 * L)  # blocks' only
    blocks = [(o.key, o.flops, o.bytes) for o in split.ops if o.name.startswith("block.")]
    assert len(blocks) > L and blocks == [(o.key, o.flops, o.bytes) for o in whole.ops if o.name.startswith("block.")]


@pytest.mark.parametrize("phase, seq, rows", [("decode", 1, B),     # a token per sequence
                                              ("prefill", S, B),    # the last position's logits only
                                              ("forward", S, B * S)])  # every position's
def test_inference_gathers_the_vocabulary_split_logits(phase, seq, rows):
    """A vocabulary-parallel head leaves each rank V / tp columns of the logits; to sample
    (or return them) an engine gathers them (Megatron-LM's gather_output, TensorRT-LLM's
    ColumnLinear(gather_output=True), vLLM's logits gather): one all-gather of the whole
    logits, rows x V values, after the head; none in training (the loss is vocabulary-parallel)
    and none with the head whole on every rank."""
    tp = 4
    kw = dict(batch=B, seq=seq, context=S if phase == "decode" else None, phase=phase)
    split = count(LLAMA, **kw, layout=_layout(phase=phase, tp=tp))
    whole = count(LLAMA, **kw, layout=_layout(phase=phase, tp=tp, vocab_parallel=False))
    gathers = [o for o in split.ops if o.name == "head.lm.logits_gather"]
    assert len(gathers) == 1 and gathers[0].variant == "all_gather"
    assert gathers[0].comm_bytes == rows * V * W and gathers[0].tags["ranks"] == tp
    names = [o.name for o in split.ops]
    assert names.index("head.lm.logits_gather") == names.index("head.lm") + 1  # right after the head
    assert not [o for o in whole.ops if "logits_gather" in o.name]
    train = count(LLAMA, batch=B, seq=S, phase="train", layout=_layout(tp=tp))
    assert not [o for o in train.ops if "logits_gather" in o.name]
    one = count(LLAMA, batch=B, seq=S, phase="forward", layout=_layout(phase="forward", tp=1))
    assert not [o for o in one.ops if o.kind == "collective"]
    gemma = flopsim.load_model("gemma-2-9b")  # its logits capped after the head: gathered once capped
    capped = [o.name for o in count(gemma, **kw, layout=_layout(gemma, phase=phase, tp=tp)).ops]
    assert capped[capped.index("head.softcap") + 1] == "head.softcap.logits_gather"
    assert [n for n in capped if "logits_gather" in n] == ["head.softcap.logits_gather"]


def test_a_whole_head_in_training_keeps_its_loss_whole_and_gathers_nothing():
    """Sequence-parallel training with the head whole: each rank runs the head and the loss
    on its own tokens (1 / tp of them), so no all-gather before the head and no
    reduce-scatter after the embedding; the blocks keep their 2 x L pairs."""
    tp = 4
    r = count(LLAMA, batch=B, seq=S, phase="train", layout=_layout(tp=tp, vocab_parallel=False))
    one = count(LLAMA, batch=B, seq=S, phase="train")
    assert Counter((o.variant, o.pass_) for o in _collectives(r, group="tp")) == {
        ("all_gather", "fwd"): 2 * L, ("reduce_scatter", "fwd"): 2 * L,
        ("reduce_scatter", "bwd"): 2 * L, ("all_gather", "bwd"): 2 * L}
    for name in ("head.lm", "head.loss"):
        mine = [o for o in r.ops if o.name == name]
        base = {o.key: o for o in one.ops if o.name == name}
        assert mine and all(o.flops * tp == base[o.key].flops and o.weight_bytes == base[o.key].weight_bytes
                            for o in mine), name
    with pytest.raises(InputError, match="^vocab_parallel"):
        _layout(tp=2, vocab_parallel="no")


def test_cli_keeps_the_head_and_table_whole_with_no_vocab_parallel():
    import json

    def both(command, *extra):
        out = [run(command, "llama-2-7b", *extra, "--phase", "decode", "--seq", "1", "--context", "128",
                   "--tp", "8", *flag, "--format", "json") for flag in ((), ("--no-vocab-parallel",))]
        assert all(o.exit_code == 0 for o in out), [o.output[-300:] for o in out]
        return [json.loads(o.output) for o in out]

    split, whole = both("count")
    assert whole["params"] - split["params"] == (1 - 1 / 8) * 2 * V * D  # head and table whole: 2 x V x d
    split, whole = both("predict", "-H", "a100-80gb")
    assert whole["time_s"] > split["time_s"]  # the head read whole; one all-reduce fewer is far less


def test_plan_serve_keeps_the_head_whole_with_no_vocab_parallel():
    """`plan serve --no-vocab-parallel` (gpt-fast's tensor parallelism): each GPU holds the
    whole LM head and embedding table (2 x V x d x (1 - 1 / tp) more weight bytes a GPU) and
    its TP collectives lose the embedding's all-reduce and the logits' all-gather."""
    import json

    from flopsim.planning import plan_serving

    tp, H = 4, "a100-80gb"
    kw = dict(prompt=256, gen=64, tp=tp, pp=1, max_batch=4)
    split, whole = (plan_serving("llama-2-7b", H, vocab_parallel=v, **kw) for v in (True, False))
    assert (split.config["vocab_parallel"], whole.config["vocab_parallel"]) == (True, False)
    assert whole.memory["weights_bytes"] - split.memory["weights_bytes"] == pytest.approx(
        (1 - 1 / tp) * 2 * V * D * W, rel=1e-9)
    assert whole.latency["tpot_s"] > split.latency["tpot_s"]  # the whole head read every step
    out = run("plan", "serve", "llama-2-7b", "-H", H, "--prompt", "256", "--gen", "64", "--tp", str(tp), "--pp", "1",
              "--max-batch", "4", "--no-vocab-parallel", "--format", "json")
    assert out.exit_code == 0, out.output[-300:]
    assert json.loads(out.output)["config"]["vocab_parallel"] is False
    text = run("plan", "serve", "llama-2-7b", "-H", H, "--prompt", "256", "--gen", "64", "--tp", str(tp),
               "--max-batch", "4", "--no-vocab-parallel")
    assert "LM head and embedding whole on each rank" in text.output
