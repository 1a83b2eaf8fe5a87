"""flopsim.planning (training and serving capacity plans) and `flopsim plan train|serve`.

Each arithmetic test writes its derivation out and checks the plan against it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import one_error_line
from conftest import run_cli as run

import flopsim
from flopsim.errors import InputError
from flopsim.collectives import collective_s, network_bus_bytes_per_s, network_collective_s
from flopsim.parallel.layout import make_layout
from flopsim.planning import bubble_fraction, largest_true, parse_duration, parse_quantity, plan_serving, plan_training

H100 = "h100-sxm"
# the link levels of the shipped h100-sxm calibration (published nccl-tests bus bandwidths)
_H100_CAL = flopsim.load_calibration("auto", flopsim.load_hardware(H100))
UP = _H100_CAL.link("scale_up").bus_bytes_per_s  # intra-node (NVLink) bus bandwidth, one way
OUT = _H100_CAL.link("scale_out").bus_bytes_per_s  # inter-node, per GPU
LLAMA2_PARAMS = 6_738_415_616
GB = 1e9




# -- the preset ----------------------------------------------------------------------
def test_llama_2_7b_preset_has_the_published_parameter_count():
    # embeddings 32000*4096 + head 32000*4096 = 262,144,000
    # per block: q,k,v,o 4*4096^2 = 67,108,864; SwiGLU 3*4096*11008 = 135,266,304; 2 RMSNorms 8,192
    # 32 blocks * 202,383,360 = 6,476,267,520; final norm 4,096
    assert 262_144_000 + 32 * (67_108_864 + 135_266_304 + 8_192) + 4_096 == LLAMA2_PARAMS
    assert flopsim.count("llama-2-7b", seq=16).params == LLAMA2_PARAMS


# -- collectives ----------------------------------------------------------------------
def test_collective_formulas():
    b = 450e9  # one-way
    assert collective_s("all_reduce", 1e9, 8, b) == pytest.approx(2 * 7 / 8 * 1e9 / b)
    assert collective_s("all_reduce", 1e9, 8, b, 5e-6) == pytest.approx(2 * 7 / 8 * 1e9 / b + 5e-6)
    # a ring all-reduce takes 2 (n - 1) sequential steps, each paying the hop latency
    assert collective_s("all_reduce", 1e9, 8, b, 5e-6, 1e-6) == pytest.approx(2 * 7 / 8 * 1e9 / b + 5e-6 + 2 * 7 * 1e-6)
    assert collective_s("all_reduce", 1e9, 1, b, 5e-6) == 0.0  # one rank: nothing to do
    assert collective_s("all_reduce", 0, 8, b, 5e-6) == 0.0  # nothing to move
    assert collective_s("reduce_scatter", 1e9, 4, b) == pytest.approx(3 / 4 * 1e9 / b)
    assert collective_s("all_gather", 1e9, 4, b, 0, 1e-6) == pytest.approx(3 / 4 * 1e9 / b + 3 * 1e-6)
    assert collective_s("all_to_all", 8e6, 8, b) == pytest.approx(7 / 8 * 8e6 / b)
    assert collective_s("send_recv", 1e6, 2, b, 1e-6, 1e-6) == pytest.approx(1e6 / b + 1e-6 + 1e-6)
    with pytest.raises(ValueError, match="unknown collective"):
        collective_s("broadcast", 1e6, 2, b)
    assert bubble_fraction(4, 8) == 3 / 8


def test_network_ring_collectives_run_a_ring_per_nic():
    # nccl-tests over the network: 2 nodes x 4 H100 on 4 NICs, NCCL_ALGO=RING, all-reduce busbw 95 GB/s,
    # "~24GB/s per NIC" (NVIDIA/nccl-tests #252); 4 nodes x 8 B200 on 8 x 400G EFA: 381.8 GB/s = 8 x 47.7
    nic = 24e9
    assert network_bus_bytes_per_s("all_reduce", nic, 4) == pytest.approx(4 * 24e9)  # #252's 95 GB/s
    assert network_bus_bytes_per_s("all_reduce", 47.7e9, 8) == pytest.approx(381.6e9)  # the B200 run's 381.8
    for op in ("reduce_scatter", "all_gather"):
        assert network_bus_bytes_per_s(op, nic, 8) == pytest.approx(8 * nic)
    # at most the scale-up ring the rest of each ring runs on
    assert network_bus_bytes_per_s("all_reduce", 47e9, 8, 370e9) == pytest.approx(370e9)
    # one rank a node (tp fills the node), an all-to-all or a send: each GPU's own NIC share
    assert network_bus_bytes_per_s("all_reduce", nic, 1) == nic
    assert network_bus_bytes_per_s("all_to_all", nic, 8) == nic
    assert network_bus_bytes_per_s("send_recv", nic, 8) == nic


def test_network_gathers_pay_each_ring_step():
    # NCCL's latency model of a ring crossing the network (src/graph/tuning.cc): base + the steps that
    # cross nodes x the network's step + the other steps x the node's. A reduce-scatter or all-gather has
    # no tree, so at 1,024 ranks on 128 nodes (8 a node) its 1,023 steps are 127 crossing and 896 on a node.
    a, h_out, h_up, bus, nbytes = 63e-6, 14e-6, 0.633e-6, 8 * 24e9, 400e6
    for op in ("all_gather", "reduce_scatter"):
        expected = a + 127 * h_out + 896 * h_up + 1023 / 1024 * nbytes / bus
        assert network_collective_s(op, nbytes, 1024, 8, bus, a, h_out, h_up) == pytest.approx(expected)
    # one rank a node (tp fills it): every step crosses the network
    assert network_collective_s("all_gather", nbytes, 64, 1, 24e9, a, h_out, h_up) == pytest.approx(
        a + 63 * h_out + 63 / 64 * nbytes / 24e9)
    # an all-reduce runs as NCCL's tree at scale: the level's measured small-message latency, no ring steps
    assert network_collective_s("all_reduce", nbytes, 1024, 8, bus, a, h_out, h_up) == pytest.approx(
        collective_s("all_reduce", nbytes, 1024, bus, a))
    assert network_collective_s("all_gather", nbytes, 1, 1, bus, a, h_out, h_up) == 0.0
    # no step latency: the bandwidth formula alone, as before
    assert network_collective_s("all_gather", nbytes, 1024, 8, bus, a) == pytest.approx(
        collective_s("all_gather", nbytes, 1024, bus, a))


def test_fsdp_over_a_thousand_gpus_pays_its_rings_latency():
    # FSDP (zero 3) over 1,024 A100s, 8 a node: every block's gathers and its gradients' reduce-scatter are
    # rings of 1,024 ranks, each 127 network steps + 896 NVLink steps longer than the bandwidth alone says.
    cal = flopsim.load_calibration("auto", flopsim.load_hardware("a100-80gb"))
    out, up = cal.link("scale_out"), cal.link("scale_up")
    assert out.hop_latency_s == pytest.approx(14e-6)  # NCCL's NET ring step (the calibration's source)
    flat = cal.model_copy(update={"links": {name: link.model_copy(update={"hop_latency_s": 0.0})
                                            for name, link in cal.links.items()}})  # no ring steps anywhere

    def dp_s(calibration, **kw):
        p = plan_training("llama-2-7b", "a100-80gb", gpus=1024, tokens=4.2e6, seq=4096, dp=1024, zero=3,
                          micro_batch=1, global_batch=1024, calibration=calibration, **kw)
        return p.communication["dp_s_per_step"]

    rings = dp_s(cal) - dp_s(flat)
    # 34 units (the embedding, 32 blocks, the final norm with the head) x (gather forward + gather backward +
    # reduce-scatter), each ring 127 x 14 us + 896 x 0.633 us = 2.35 ms longer
    one = 127 * out.hop_latency_s + 896 * up.hop_latency_s
    assert rings == pytest.approx(34 * 3 * one)
    # a bandwidth given for the network keeps the calibration's ring steps
    given = 2 * out.bus_bytes_per_s
    assert dp_s(cal, inter_node_bytes_per_s=given) == pytest.approx(dp_s(cal))


def test_layout_ranks_of_a_group_on_one_node():
    # Megatron order (tp fastest, then cp, dp): the dp group's ranks lie tp apart, 8 // tp on a node of 8
    llama = flopsim.load_model("llama-2-7b")
    assert make_layout(llama, "train", dp=64).node_ranks("dp") == 8
    assert make_layout(llama, "train", tp=2, dp=48).node_ranks("dp") == 4
    assert make_layout(llama, "train", tp=8, dp=4).node_ranks("dp") == 1
    assert make_layout(llama, "train", tp=2, dp=2).node_ranks("dp") == 2  # the whole group on one node
    assert make_layout(llama, "train", tp=16, dp=2, gpus_per_node=8).node_ranks("dp") == 1
    assert largest_true(lambda n: n <= 37, 1000) == 37
    assert largest_true(lambda n: n <= 37, 20) == 20
    assert largest_true(lambda n: False, 20) == 0


def test_quantities_and_durations():
    assert parse_quantity("1T", "tokens") == 1e12
    assert parse_quantity("4M", "x") == 4e6
    assert parse_quantity("2.5e11", "x") == 2.5e11
    assert parse_quantity("300B", "x") == 300e9
    assert parse_duration("50ms", "tpot") == pytest.approx(0.05)
    assert parse_duration("1s", "ttft") == 1.0
    assert parse_duration("0.2", "ttft") == 0.2
    with pytest.raises(InputError):
        parse_quantity("lots", "tokens")
    with pytest.raises(InputError):
        parse_duration("5 fortnights", "tpot")


# -- training -------------------------------------------------------------------------
def _train(**kw):
    args = dict(gpus=16, tokens=1e10, seq=1024, comm_latency_s=0.0, price_per_gpu_hour=2.5)
    args.update(kw)
    return plan_training("llama-2-7b", H100, **args)


def test_data_parallel_ring_all_reduce_bytes_and_time():
    # ZeRO-0, dp 16 over two nodes of 8 -> the inter-node link, whose calibrated figure OUT is one
    # GPU's NIC share: the group has 8 ranks on each node, so NCCL runs 8 rings, one per NIC, each
    # with 1/8 of the buffer: bus bandwidth 8 x OUT, at most the NVLink ring's UP.
    # Gradients: P * 2 bytes (bf16). Ring all-reduce: 2 (n-1)/n * bytes / b.
    p = _train(zero=0, dp_overlap=0.0)
    grad_bytes = LLAMA2_PARAMS * 2
    sent = 2 * 15 / 16 * grad_bytes
    bus = min(8 * OUT, UP)
    assert p.communication["dp_bytes_per_step"] == pytest.approx(sent)
    assert p.communication["dp_link"] == "inter-node"
    assert p.communication["dp_s_per_step"] == pytest.approx(sent / bus)
    assert p.communication["dp_exposed_s_per_step"] == pytest.approx(sent / bus)  # no overlap
    # overlapped with the last micro-batch's backward pass (ZeRO-0: gradient traffic only)
    q = _train(zero=0, dp_overlap=1.0)
    hidden = min(sent / bus, q.compute["backward_s_per_microbatch"])
    assert q.communication["dp_exposed_s_per_step"] == pytest.approx(sent / bus - hidden)
    # tp 8 fills each node: every data-parallel group has one rank on a node, one NIC: OUT.
    # Its gradients are the tp shard's (the norms whole on every rank).
    t = _train(tp=8, zero=0, dp_overlap=0.0)
    assert t.communication["dp_s_per_step"] == pytest.approx(t.communication["dp_bytes_per_step"] / OUT)
    # tp 2: four ranks of each data-parallel group on a node -> 4 x OUT
    h = _train(tp=2, zero=0, dp_overlap=0.0)
    assert h.communication["dp_s_per_step"] == pytest.approx(h.communication["dp_bytes_per_step"] / (4 * OUT))
    # 8 GPUs in one node: NVLink, 900 GB/s two-way -> 450 GB/s
    r = _train(gpus=8, zero=0, dp_overlap=0.0)
    assert r.communication["dp_s_per_step"] == pytest.approx(2 * 7 / 8 * grad_bytes / UP)


def test_zero_stages_shard_what_they_should():
    # 8 GPUs = dp 2 x tp 2 x pp 2; bf16 Adam: weights 2, gradients 2, optimizer 12 bytes per parameter.
    # Per GPU before ZeRO: P / (tp * pp) parameters; ZeRO >= 1 / dp the optimizer state,
    # >= 2 the gradients, 3 the weights.
    shard = LLAMA2_PARAMS / 4
    expected = {
        0: (2 * shard, 2 * shard, 12 * shard),
        1: (2 * shard, 2 * shard, 12 * shard / 2),
        2: (2 * shard, 2 * shard / 2, 12 * shard / 2),
        3: (2 * shard / 2, 2 * shard / 2, 12 * shard / 2),
    }
    for zero, (w, g, o) in expected.items():
        m = _train(gpus=8, tp=2, pp=2, zero=zero).memory
        assert (m["weights_bytes"], m["gradients_bytes"], m["optimizer_bytes"]) == pytest.approx((w, g, o)), zero
        assert m["total_bytes"] == pytest.approx(w + g + o + m["activations_bytes"])
    # ZeRO-1's traffic: reduce-scatter of the gradients + all-gather of the weights, each (n-1)/n of them,
    # of the parameters the GPU holds: on the last stage (blocks 16-31, the final norm, the head) the
    # matrices / tp, the norms whole (tensor parallelism replicates them), the head / tp
    d, d_ff, vocab = 4096, 11008, 32000
    last_stage = 16 * ((4 * d * d + 3 * d * d_ff) / 2 + 2 * d) + d + vocab * d / 2
    c = _train(gpus=8, tp=2, pp=2, zero=1).communication
    assert c["dp_bytes_per_step"] == pytest.approx(1 / 2 * 2 * last_stage + 1 / 2 * 2 * last_stage)


def test_hybrid_sharding_divides_the_state_by_the_shard_group_and_adds_the_replica_all_reduce():
    # 16 GPUs = dp 16 on two nodes, ZeRO-3 over each node's 8 (FSDP's HYBRID_SHARD)
    one = dict(zero=3, dp_overlap=0.0, global_batch=16)  # one micro-batch of 1 a replica
    hybrid, plain = _train(zero_shard=8, **one), _train(**one)
    for part, per_param in (("weights_bytes", 2), ("gradients_bytes", 2), ("optimizer_bytes", 12)):
        assert hybrid.memory[part] == pytest.approx(LLAMA2_PARAMS * per_param / 8)
        assert plain.memory[part] == pytest.approx(LLAMA2_PARAMS * per_param / 16)
    assert hybrid.config["zero_shard"] == 8 and plain.config["zero_shard"] == 16
    # traffic: ZeRO-3 in the node (2 gathers + a reduce-scatter, each 7/8 of the parameters' bytes),
    # then the eighth each GPU holds all-reduced over 2 replicas (2 (2-1)/2 of it)
    gathered = 3 * 7 / 8 * LLAMA2_PARAMS * 2
    replica = 2 * (2 - 1) / 2 * LLAMA2_PARAMS * 2 / 8
    assert hybrid.communication["dp_bytes_per_step"] == pytest.approx(gathered + replica)
    assert hybrid.communication["dp_link"] == "ZeRO over 8: intra-node; 2 replicas: inter-node"
    out = run("plan", "train", "llama-2-7b", "-H", H100, "--gpus", 16, "--tokens", "1e10", "--zero", 3,
              "--zero-shard", 8)
    assert out.exit_code == 0 and "over 8 of dp, replicated (hybrid)" in " ".join(out.output.split())
    bad = run("plan", "train", "llama-2-7b", "-H", H100, "--gpus", 16, "--tokens", "1e10", "--zero", 3,
              "--zero-shard", 5)
    assert one_error_line(bad).startswith("flopsim: error: zero_shard: 5: does not divide")


def test_activations_split_by_tp_and_pipeline_in_flight():
    # Sequence parallel: activations / tp. 1F1B: the first stage keeps min(pp, microbatches)
    # micro-batches of its 1/pp of the layers.
    one = flopsim.memory("llama-2-7b", phase="train", batch=1, seq=1024).activations_bytes
    p = _train(gpus=8, tp=2, pp=2)
    assert p.memory["activations_bytes"] == pytest.approx(one / 2 * 2 / 2)
    rc = flopsim.memory("llama-2-7b", phase="train", batch=1, seq=1024, recompute=True).activations_bytes
    assert _train(gpus=8, tp=2, pp=2, recompute=True).memory["activations_bytes"] == pytest.approx(rc / 2)
    assert rc < one


def test_compute_split_pipeline_bubble_and_tensor_parallel_all_reduces():
    # 16 GPUs = dp 2 x tp 2 x pp 4, global batch 16 sequences -> 8 micro-batches of 1 per replica
    p = _train(tp=2, pp=4, global_batch=16)
    assert p.config["dp"] == 2 and p.config["microbatches"] == 8
    # per GPU compute = the op-list time of the slowest stage's sharded ops (flopsim.parallel):
    # the same list `predict --tp 2 --pp 4 --stage 3` costs (the last stage: 8 blocks and the head)
    assert p.compute["slowest_stage"] == 3
    layout = make_layout(flopsim.load_model("llama-2-7b"), "train", tp=2, pp=4, dp=2, zero=1, stage=3,
                         gpus_per_node=8)
    r = flopsim.predict("llama-2-7b", H100, phase="train", batch=1, seq=1024, layout=layout,
                        links=p.links.by_level)
    fwd = sum(op.time_s for op in r.ops if op.pass_ == "fwd" and op.kind not in ("collective", "optimizer"))
    assert p.compute["forward_s_per_microbatch"] == pytest.approx(fwd, rel=1e-12)
    # TP with sequence parallelism: per sub-layer an all-gather of its input and a reduce-scatter of its
    # output forward, the two conjugates backward: 2 sub-layers x 2 x 2 per block, 8 blocks per stage,
    # + the head's all-gather and its conjugate = 66, each of 1 * 1024 * 4096 * 2 bytes over 2 ranks
    # in one node: (2 - 1) / 2 of it over the link (450 GB/s one way, latency 0 here)
    act = 1024 * 4096 * 2
    assert p.communication["tp_collectives_per_microbatch"] == 8 * 2 * 2 * 2 + 2
    assert p.communication["tp_bytes_per_collective"] == act
    assert p.communication["tp_collective_s"] == pytest.approx(1 / 2 * act / UP)
    # PP: the last stage sends its input's gradient back (act / tp); stage groups span
    # tp * dp * pp = 16 ranks > 8 per node -> inter-node
    assert p.communication["pp_collectives_per_microbatch"] == 1
    assert p.communication["pp_collective_s"] == pytest.approx(act / 2 / OUT)
    stage = (p.compute["compute_s_per_microbatch"] + p.communication["tp_s_per_microbatch"]
             + p.communication["ep_s_per_microbatch"] + p.communication["pp_s_per_microbatch"])
    assert p.compute["stage_s_per_microbatch"] == pytest.approx(stage)
    # 1F1B: (microbatches + pp - 1) slots; bubble (pp - 1) slots = (pp-1)/microbatches of the ideal
    assert p.compute["pipeline_s"] == pytest.approx((8 + 3) * stage)
    assert p.compute["bubble_s"] == pytest.approx(3 * stage)
    assert p.compute["bubble_fraction"] == 3 / 8
    # the data-parallel traffic: its exposed part, and the contention of its hidden part
    # (test_hidden_data_parallel_traffic_slows_the_compute_it_overlaps)
    assert p.step_time_s == pytest.approx(p.compute["pipeline_s"] + p.communication["dp_exposed_s_per_step"]
                                          + p.communication["dp_contention_s_per_step"]
                                          + p.compute["optimizer_s"] + p.compute["grad_accumulation_s_per_step"])
    # recomputation adds the blocks' forward, its 4 collectives per block included
    q = _train(tp=2, pp=4, global_batch=16, recompute=True)
    assert q.communication["tp_collectives_per_microbatch"] == 8 * 2 * 2 * 2 + 2 + 8 * 4
    assert 0 < q.compute["recompute_s_per_microbatch"] < q.compute["forward_s_per_microbatch"]


def test_totals_days_gpu_hours_cost_mfu():
    p = _train(tokens=1e10, price_per_gpu_hour=2.5)
    t = p.totals
    tokens_per_step = p.config["global_batch"] * 1024
    assert t["steps"] == math.ceil(1e10 / tokens_per_step)
    assert t["days"] == pytest.approx(t["steps"] * t["step_time_s"] / 86400)
    assert t["gpu_hours"] == pytest.approx(16 * t["steps"] * t["step_time_s"] / 3600)
    assert t["cost"] == pytest.approx(t["gpu_hours"] * 2.5)
    assert t["tokens_per_s"] == pytest.approx(tokens_per_step / t["step_time_s"])
    flops_mb = flopsim.count("llama-2-7b", batch=1, seq=1024, phase="train").flops
    assert t["model_flops_per_step"] == flops_mb * p.config["global_batch"]
    assert t["mfu"] == pytest.approx(t["model_flops_per_step"] / (t["step_time_s"] * 16 * 989.4e12))
    # default global batch: the smallest multiple of dp * micro_batch with >= 4Mi tokens
    assert p.config["global_batch"] == 4096 and p.config["microbatches"] == 4096 // 16
    assert _train(price_per_gpu_hour=None).cost is None


def test_moe_all_to_all_bytes_and_expert_sharding():
    # Mixtral: every block is MoE, top-2 of 8, d_model 4096, bf16. 16 GPUs = dp 8 x tp 2, ep 4.
    # Routed bytes per layer per GPU = micro_batch * seq * top_k * d_model * 2 / tp
    # all-to-all: (ep - 1)/ep of them; dispatch + combine forward and backward = 4 per layer;
    # the ep group spans tp * ep = 8 ranks -> one node, 450 GB/s one way.
    # The busiest of the 4 EP ranks receives expert_imbalance x the mean rank's rows: the expected maximum
    # over ranks of the pairs that 4 micro-batches of 512 tokens route (uniform top-2 of 8, flopsim.ops.popularity).
    from flopsim.ops.popularity import imbalance

    p = plan_training("mixtral-8x7b", H100, gpus=16, tp=2, ep=4, tokens=1e9, seq=512, comm_latency_s=0.0)
    imb = imbalance(np.full(8, 2 / 8), 4 * 512, 4)
    assert p.config["expert_imbalance"] == pytest.approx(imb, rel=1e-12) and 1.0 < imb < 1.1
    routed = 1 * 512 * 2 * 4096 * 2 / 2 * imb
    c = p.communication
    assert c["ep_bytes_per_collective"] == pytest.approx(routed)
    assert c["ep_collective_s"] == pytest.approx(3 / 4 * routed / UP)
    assert c["ep_collectives_per_microbatch"] == 4 * 32
    assert c["ep_link"] == "intra-node"
    # expert parameters are sharded over tp * ep, the rest over tp
    m = p.memory
    dense = m["params"] - m["expert_params"]
    assert m["expert_params"] == 32 * 8 * 3 * 4096 * 14336
    assert m["params_per_gpu"] == pytest.approx(dense / 2 + m["expert_params"] / 8)
    # dense parameters are data-parallel over dp 8, experts over dp / ep = 2 (ZeRO-1 optimizer state)
    assert m["optimizer_bytes"] == pytest.approx(12 * (dense / 2 / 8 + m["expert_params"] / 8 / 2))


def test_does_not_fit_message_and_suggestions():
    p = plan_training("llama-3-8b", H100, gpus=8, tokens=1e9, seq=8192, micro_batch=4, global_batch=64, zero=0)
    assert not p.fits
    m = p.memory
    assert p.message.startswith(f"does not fit: needs {m['total_bytes'] / GB:.1f} GB per GPU, device has 80.0 GB")
    for part in ("weights", "optimizer", "activations"):
        assert part in p.message
    assert p.suggestions and "--recompute" in p.suggestions[0]
    # the suggestion fits when applied
    q = plan_training("llama-3-8b", H100, gpus=8, tokens=1e9, seq=8192, micro_batch=4, global_batch=64, zero=1,
                      recompute=True)
    assert q.fits and f"{q.memory['total_bytes'] / GB:.1f} GB" in p.suggestions[0]
    assert "\n" not in p.message


@pytest.mark.parametrize("kw, needle", [
    (dict(gpus=8, dp=3), "does not equal gpus 8"),
    (dict(gpus=8, tp=3), "tp * pp"),
    (dict(gpus=6, tp=3, pp=2), "does not divide the 32 attention heads"),
    (dict(gpus=8, ep=2), "has no experts"),
    (dict(gpus=8, price_per_gpu_hour=-1.0), "price"),
    (dict(gpus=8, zero=4), "ZeRO"),
    (dict(gpus=8, global_batch=12), "not a multiple of dp * micro_batch"),
    (dict(gpus=8, dp_overlap=1.5), "dp_overlap"),
])
def test_training_bad_input_is_one_input_error(kw, needle):
    args = dict(tokens=1e9)
    args.update(kw)
    with pytest.raises(flopsim.errors.FlopsimError) as err:
        plan_training("llama-2-7b", H100, **args)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_sequence_limits():
    with pytest.raises(InputError, match="max_seq"):  # learned positions stop at max_seq
        plan_training("gpt2-small", H100, gpus=8, tokens=1e9, seq=2048)
    p = _train(gpus=8, seq=8192)  # rope: costed, with a note
    assert any("exceeds max_seq 4096" in n for n in p.notes)


# -- serving ---------------------------------------------------------------------------
def test_serving_batch_search_respects_latency_and_memory():
    # tp 1 (no collectives): TPOT = predict(decode) at the mean KV length prompt + (gen + 1) // 2
    prompt, gen, target = 512, 128, 0.015
    s = plan_serving("llama-2-7b", H100, prompt=prompt, gen=gen, tp=1, pp=1, tpot_s=target,
                     price_per_gpu_hour=2.0)
    b = s.batch
    t_mean = prompt + (gen + 1) // 2
    tpot = lambda n: flopsim.predict("llama-2-7b", H100, phase="decode", batch=n, seq=1, context=t_mean).time_s  # noqa: E731
    assert s.latency["tpot_s"] == pytest.approx(tpot(b))
    assert tpot(b) <= target < tpot(b + 1)  # the largest batch that meets the target
    # memory: weights + KV cache of b sequences at prompt + gen + working set, within 0.9 * 80 GB
    mem = flopsim.memory("llama-2-7b", phase="decode", batch=b, seq=1, context=prompt + gen)
    assert s.memory["kv_cache_bytes"] == pytest.approx(mem.kv_cache_bytes)
    assert s.memory["total_bytes"] <= 0.9 * 80e9
    # TTFT = prefill of one prompt
    ttft = flopsim.predict("llama-2-7b", H100, phase="prefill", batch=1, seq=prompt).time_s
    assert s.latency["ttft_s"] == pytest.approx(ttft)
    # throughput: b requests cost b * TTFT of prefill + gen * TPOT of decode
    cycle = b * ttft + gen * tpot(b)
    assert s.throughput["output_tokens_per_s_per_replica"] == pytest.approx(b * gen / cycle)
    # cost per million tokens at $2 per GPU-hour on one GPU
    per_s = 2.0 / 3600
    assert s.cost["per_million_output_tokens"] == pytest.approx(per_s * tpot(b) / b * 1e6)
    assert s.cost["per_million_input_tokens"] == pytest.approx(per_s * ttft / prompt * 1e6)
    assert s.cost["per_million_output_tokens_blended"] == pytest.approx(per_s * cycle / (b * gen) * 1e6)


def test_serving_memory_bound_batch_without_latency_target():
    # no target: the largest batch whose weights + KV cache + working set fit 0.9 * 80 GB
    s = plan_serving("llama-2-7b", H100, prompt=2000, gen=2000, tp=2, pp=1)
    b = s.batch
    kv_per_seq = 2 * 32 * 4096 * 2 * 4000  # K and V, 32 layers, d_model 4096 (32 kv heads), bf16, 4000 tokens
    assert s.memory["kv_cache_bytes"] == pytest.approx(b * kv_per_seq / 2)  # split over tp 2
    # the sharded list's weights: every matrix and the embedding split over tp 2, the 2 x 32 + 1 RMS norms'
    # 4096 weights whole on each GPU (flopsim.parallel.shard)
    norms = (2 * 32 + 1) * 4096
    assert s.memory["weights_bytes"] == pytest.approx(((LLAMA2_PARAMS - norms) / 2 + norms) * 2)
    room = 0.9 * 80e9 - s.memory["weights_bytes"] - s.memory["activations_bytes"]
    assert b == int(room // (kv_per_seq / 2)) or b == int(room // (kv_per_seq / 2)) - 1  # working set grows with b
    assert s.memory["total_bytes"] <= 0.9 * 80e9


def test_serving_gpus_for_a_throughput_target_and_tp_communication():
    s = plan_serving("llama-2-7b", H100, prompt=512, gen=128, tp=2, pp=1, tpot_s=0.02, target_tokens_per_s=1e5,
                     comm_latency_s=0.0)
    per_replica = s.throughput["output_tokens_per_s_per_replica"]
    assert s.throughput["replicas"] == math.ceil(1e5 / per_replica)
    assert s.throughput["gpus"] == 2 * s.throughput["replicas"]
    # 2 all-reduces per block and the vocabulary-parallel embedding's, of batch * d_model * 2 bytes,
    # and the logits' all-gather, batch * vocab * 2 bytes, over tp 2 ranks in one node (the sharded
    # decode list's collectives; busbw factors 2 (n - 1) / n and (n - 1) / n)
    assert s.latency["tpot_tp_comm_s"] == pytest.approx((2 * 32 + 1) * (2 * 1 / 2 * s.batch * 4096 * 2 / UP)
                                                        + 1 / 2 * s.batch * 32000 * 2 / UP)


def test_serving_moe_reads_the_op_lists_expected_experts():
    s = plan_serving("mixtral-8x7b", H100, prompt=256, gen=64, tp=2, pp=1, ep=1, max_batch=4)
    b = s.batch
    assert b == 4
    assert s.config["active_experts_per_layer"] == pytest.approx(8 * (1 - (1 - 2 / 8) ** b))


def test_serving_does_not_fit_on_one_gpu():
    s = plan_serving("mixtral-8x7b", H100, prompt=1024, gen=256, tp=1, pp=1, ep=1)
    assert not s.fits and not s.feasible
    assert s.message.startswith("does not fit: batch 1 needs")
    assert "device has 80.0 GB" in s.message and "weights 93.4 GB" in s.message
    r = run("plan", "serve", "mixtral-8x7b", "-H", H100, "--prompt", 1024, "--gen", 256, "--tp", 1, "--pp", 1,
            "--ep", 1)
    assert r.exit_code == 0 and "does not fit" in r.output


def test_serving_picks_a_tp_when_not_given():
    s = plan_serving("mixtral-8x7b", H100, prompt=1024, gen=256, gpus=8, tpot_s=0.05, ttft_s=1.0)
    assert s.fits and s.feasible
    rows = {(r["tp"], r["pp"], r["ep"]): r for r in s.candidates}
    assert not rows[(1, 1, 1)]["fits"]  # 93 GB of weights
    assert all(8 % r["gpus"] == 0 and r["gpus"] == r["tp"] * r["pp"] * r["ep"] for r in s.candidates)
    best = max((r for r in s.candidates if r["meets"]), key=lambda r: r["output_tokens_per_s_per_gpu"])
    assert (s.tp, s.pp, s.ep) == (best["tp"], best["pp"], best["ep"])
    n = s.config["replica_gpus"]
    assert s.throughput["gpus"] == 8 and s.throughput["replicas"] == 8 // n


# -- command line -------------------------------------------------------------------------
def test_cli_train_loss_option():
    """--loss fp32_unfused plans Megatron's fp32 cross-entropy: the same plan as the spec
    with loss_impl fp32_unfused, slower than the fused loss by its forward and backward
    kernels (Megatron-Core's 1.7B, vocabulary 131,072); the options line names it; a bad
    value is one line, exit 2."""
    args = ("plan", "train", "mcore-gpt-1.7b", "-H", H100, "--gpus", 8, "--tokens", "1B", "--seq", 4096,
            "--global-batch", 8, "--format", "json")
    fused, unfused = (json.loads(run(*args, "--loss", impl).output) for impl in ("fused", "fp32_unfused"))
    spec = flopsim.load_model("mcore-gpt-1.7b").with_changes(loss_impl="fp32_unfused")
    direct = flopsim.plan_training(spec, H100, gpus=8, tokens=1e9, seq=4096, global_batch=8)
    assert unfused["totals"]["step_time_s"] == pytest.approx(direct.totals["step_time_s"], rel=1e-12)
    assert unfused["totals"]["step_time_s"] > 1.05 * fused["totals"]["step_time_s"]
    table = run(*args[:-2], "--loss", "fp32_unfused")
    assert table.exit_code == 0 and "loss fp32_unfused" in table.output
    assert "loss" in one_error_line(run(*args, "--loss", "fp16"))
    search = run(*args[:-2], "--search", "--micro-batches", 1, "--top", 1, "--loss", "fp32_unfused")
    assert search.exit_code == 0 and "--loss fp32_unfused ..." in " ".join(search.output.split())  # its best's command


def test_cli_train_prints_a_complete_plan_and_json():
    r = run("plan", "train", "llama-2-7b", "-H", H100, "--gpus", 16, "--tokens", "10B", "--seq", 1024,
            "--price", 2)
    assert r.exit_code == 0, r.output
    for needle in ("time per step", "memory per GPU", "days", "GPU-hours", "MFU", "fits"):
        assert needle in r.output
    j = run("plan", "train", "llama-2-7b", "-H", H100, "--gpus", 16, "--tokens", "10B", "--seq", 1024,
            "--format", "json")
    data = json.loads(j.output)
    assert data["kind"] == "training" and data["fits"] is True
    assert {"step_time_s", "days", "gpu_hours", "cost", "mfu", "tokens_per_s"} <= set(data["totals"])
    c = run("plan", "train", "llama-2-7b", "-H", H100, "--gpus", 16, "--tokens", "10B", "--seq", 1024,
            "--format", "csv")
    assert c.exit_code == 0 and c.output.startswith("section,quantity,value")


def test_cli_serve_json():
    r = run("plan", "serve", "llama-2-7b", "-H", H100, "--prompt", 512, "--gen", 128, "--tpot", "20ms",
            "--throughput", "50k", "--price", 2, "--format", "json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["kind"] == "serving" and data["fits"] and data["feasible"]
    assert data["latency"]["tpot_s"] <= 0.02
    assert {"per_million_output_tokens", "per_million_input_tokens"} <= set(data["cost"])
    assert data["throughput"]["gpus"] % data["config"]["tp"] == 0


@pytest.mark.parametrize("args, needle", [
    (["train", "llama-2-7b", "-H", H100, "--gpus", 8, "--tokens", "1T", "--tp", 2, "--pp", 2, "--dp", 4],
     "does not equal gpus 8"),
    (["train", "llama-2-7b", "-H", H100, "--gpus", 8, "--tokens", "1T", "--price", -1], "price"),
    (["train", "llama-2-7b", "-H", "h900", "--gpus", 8, "--tokens", "1T"], "h900"),
    (["train", "llama-2-7b", "-H", H100, "--gpus", 8, "--tokens", "lots"], "tokens"),
    (["serve", "llama-2-7b", "-H", "h900", "--prompt", 10, "--gen", 10], "h900"),
    (["serve", "llama-2-7b", "-H", H100, "--prompt", 10, "--gen", 10, "--price", -3], "price"),
    (["serve", "llama-2-7b", "-H", H100, "--prompt", 10, "--gen", 10, "--tpot", "soon"], "tpot"),
    (["serve", "llama-2-7b", "-H", H100, "--prompt", 10, "--gen", 10, "--tp", 3], "tp 3"),
    (["serve", "gpt2-small", "-H", H100, "--prompt", 1000, "--gen", 100], "max_seq"),
])
def test_cli_bad_input_is_one_line_exit_2(args, needle):
    line = one_error_line(run("plan", *args))
    assert needle in line


def test_tensor_parallel_overlap_hides_traffic_behind_the_microbatch_compute():
    """tp_overlap f: exposed TP time per micro-batch = max(0, tp traffic - f * compute)."""
    base = _train(tp=2, dp=8)
    hidden = _train(tp=2, dp=8, tp_overlap=1.0)
    half = _train(tp=2, dp=8, tp_overlap=0.5)
    tp_mb, compute = base.communication["tp_s_per_microbatch"], base.compute["compute_s_per_microbatch"]
    assert tp_mb > 0 and base.communication["tp_exposed_s_per_microbatch"] == pytest.approx(tp_mb)
    assert hidden.communication["tp_exposed_s_per_microbatch"] == pytest.approx(max(0.0, tp_mb - compute))
    assert half.communication["tp_exposed_s_per_microbatch"] == pytest.approx(max(0.0, tp_mb - 0.5 * compute))
    assert hidden.totals["step_time_s"] < base.totals["step_time_s"]


def test_interleaved_schedule_shrinks_the_bubble_by_the_chunks():
    """Narayanan et al. 2021: v chunks a stage make the bubble (pp - 1) / v slots of the stage time."""
    plain = _train(tp=2, pp=4, global_batch=16)
    inter = _train(tp=2, pp=4, global_batch=16, virtual_stages=2)
    c = inter.compute
    assert c["bubble_s"] == pytest.approx((4 - 1) / 2 * c["stage_s_per_microbatch"])
    assert c["pipeline_s"] == pytest.approx(8 * c["stage_s_per_microbatch"] + c["bubble_s"])
    assert c["bubble_fraction"] == (4 - 1) / (2 * 8)
    # twice the chunks, twice the sends: the last stage's two chunks send 3 times (2 back, 1 on)
    assert inter.communication["pp_collectives_per_microbatch"] == 3
    assert plain.communication["pp_collectives_per_microbatch"] == 1
    assert inter.step_time_s < plain.step_time_s


def test_uneven_pipeline_stages_run_at_the_pace_of_the_largest():
    """pp 3 over llama-2-7b's 32 blocks: stages of 11, 11 and 10 blocks (the earlier ones take
    the extra block), the embedding on the first, the head on the last; the pipeline runs at
    the pace of the slowest, each stage's time its own sharded op list's."""
    from flopsim.parallel.shard import stage_of_layers

    assert [len(r) for r in stage_of_layers(32, 3)] == [11, 11, 10]
    plan = _train(gpus=24, pp=3, dp=8)
    spec = flopsim.load_model("llama-2-7b")
    per_stage = []
    for stage in range(3):
        layout = make_layout(spec, "train", pp=3, dp=8, zero=1, stage=stage)
        r = flopsim.predict(spec, H100, phase="train", batch=1, seq=1024, layout=layout, links=plan.links.by_level)
        per_stage.append(sum(op.time_s for op in r.ops if op.kind != "optimizer" and op.tags.get("group") != "dp"))
    assert plan.compute["stage_s_per_microbatch"] == pytest.approx(max(per_stage), rel=1e-12)
    assert plan.compute["slowest_stage"] == int(np.argmax(per_stage))


def test_selective_recompute_reruns_only_the_attention_core():
    """recompute="selective" (Korthikanti et al. 2022): the recomputation is the blocks'
    forward attention ops alone; full recomputation reruns every block op."""
    none, selective, full = _train(), _train(recompute="selective"), _train(recompute="full")
    p = flopsim.predict("llama-2-7b", H100, phase="train", batch=1, seq=1024)
    attention = sum(op.time_s for op in p.ops if op.pass_ == "fwd" and op.kind == "attention")
    assert none.compute["recompute_s_per_microbatch"] == 0
    # tp = pp = 1 (dp 16): the recomputation is the attention ops' whole time, launches included,
    # each costed as the forward kernel it is
    assert selective.compute["recompute_s_per_microbatch"] == pytest.approx(attention, rel=1e-9)
    assert 0 < selective.compute["recompute_s_per_microbatch"] < full.compute["recompute_s_per_microbatch"]
    assert selective.config["recompute"] == "selective"


def test_plan_without_sequence_parallelism_all_reduces():
    """`sequence_parallel=False` (Megatron-LM before 2022): each tensor-parallel reduction is one
    all-reduce of B S d_model values, where sequence parallelism runs a reduce-scatter and an
    all-gather of the same message; the token-wise ops run whole on each rank (slower)."""
    kw = dict(gpus=2, tokens=1e8, seq=1024, tp=2)
    off = plan_training("llama-2-7b", "a100-80gb", sequence_parallel=False, **kw).to_dict()
    on = plan_training("llama-2-7b", "a100-80gb", **kw).to_dict()
    assert off["config"]["sequence_parallel"] is False and on["config"]["sequence_parallel"] is True
    # 32 blocks x (2 forward + 2 backward reductions) + the embedding's forward and the LM head's input gradient
    assert off["communication"]["tp_collectives_per_microbatch"] == 32 * 4 + 2
    assert on["communication"]["tp_collectives_per_microbatch"] == 2 * (32 * 4 + 2)
    assert off["communication"]["tp_bytes_per_collective"] == 1 * 1024 * 4096 * 2  # B S d_model x bf16
    assert off["compute"]["forward_s_per_microbatch"] > on["compute"]["forward_s_per_microbatch"]


def test_fsdp_over_nodes_keeps_its_per_gpu_throughput():
    # llm-foundry's H100 table (scripts/train/benchmarking/README.md at b2a43a147): MPT-13B, seq 2048,
    # micro-batch 2, FULL_SHARD, no checkpointing, on 8, 16, 32 and 64 GPUs: 4792, 4767, 4811 and 4800
    # tokens/s per GPU -- the same within 1% whether the shards' gathers stay on NVLink or cross 8 nodes.
    # A gather over 64 ranks, 8 on each node, runs 8 rings (one per NIC): the same bus bandwidth as
    # NVLink's, so the plans agree too (costing it on one NIC made the 64-GPU plan 4x slower).
    def per_gpu(gpus):
        p = plan_training("mpt-13b", H100, gpus=gpus, tokens=1e9, seq=2048, dp=gpus, zero=3, micro_batch=2,
                          global_batch=2 * gpus, grad_reduce_dtype="fp32")
        return p.totals["tokens_per_s_per_gpu"]

    one_node = per_gpu(8)
    for gpus in (16, 64):
        assert per_gpu(gpus) == pytest.approx(one_node, rel=0.05), gpus


def test_hidden_data_parallel_traffic_slows_the_compute_it_overlaps():
    # NCCL runs one thread block per channel: 24 on 8 H100s of the 132 SMs (the calibration's source). FSDP's
    # gathers and reduce-scatters hide behind the passes (dp_overlap 1) while holding those SMs, so the
    # passes run on the rest: the step grows by collective_sm_share x the hidden seconds.
    share = _H100_CAL.collective_sm_share
    assert share == pytest.approx(24 / 132, abs=1e-3)
    p = _train(gpus=8, zero=3, dp_overlap=1.0)
    c = p.communication
    assert c["dp_hidden_s_per_step"] > 0
    assert c["dp_contention_s_per_step"] == pytest.approx(share * c["dp_hidden_s_per_step"])
    free = _H100_CAL.model_copy(update={"collective_sm_share": 0.0})  # a calibration without the figure
    q = _train(gpus=8, zero=3, dp_overlap=1.0, calibration=free)
    assert q.communication["dp_contention_s_per_step"] == 0.0
    assert p.totals["step_time_s"] - q.totals["step_time_s"] == pytest.approx(c["dp_contention_s_per_step"])
    # traffic left exposed overlaps nothing: no contention
    r = _train(gpus=8, zero=3, dp_overlap=0.0)
    assert r.communication["dp_contention_s_per_step"] == 0.0


def test_collective_sm_share_is_cited_and_derived_where_shipped():
    # channels (one thread block each) / SMs: 24 / 132 on Hopper (H100, H200: one die), 24 / 108 on the A100
    import yaml
    from pathlib import Path

    expected = {"h100-sxm": 24 / 132, "h200-published": 24 / 132, "h200": 24 / 132, "h200-eager": 24 / 132,
                "a100-80gb": 24 / 108, "a100-40gb": 24 / 108}
    folder = Path(__file__).resolve().parent.parent / "specs" / "calibration"
    shipped = {}
    for path in sorted(folder.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if data.get("collective_sm_share"):
            shipped[path.stem] = data["collective_sm_share"]
            assert "thread block per channel" in data["sources"]["collective_sm_share"], path.stem
    assert shipped.keys() == expected.keys()
    for name, share in shipped.items():
        assert share == pytest.approx(expected[name], abs=5e-4), name


def test_a_cpu_plan_prices_the_forward_as_a_train_step_runs_it():
    """`plan train` costs a train step's ops as predict does, so on a calibration with points
    measured as a train step's forward runs (the shipped CPU one, lookup step 8) its forward
    per micro-batch is predict's forward, not the inference-priced one."""
    from flopsim.calibration import load_calibration
    from flopsim.hardware import load_hardware

    assert any(p.train for p in load_calibration("cpu", load_hardware("cpu")).sizes)
    p = flopsim.plan_training("gpt2-small", "cpu", gpus=1, seq=256, global_batch=2, micro_batch=2, tokens=1e6)
    r = flopsim.predict("gpt2-small", "cpu", phase="train", batch=2, seq=256)
    fwd = sum(op.time_s for op in r.ops if op.pass_ == "fwd" and op.kind not in ("collective", "optimizer"))
    assert p.compute["forward_s_per_microbatch"] == pytest.approx(fwd, rel=1e-9)


def test_a_datasheet_link_is_called_ideal_in_the_plans_text():
    """No silent ideal: a device whose calibration has no measured collective figures (Gaudi 3:
    no published HCCL measurement) prices its collectives on the datasheet's bandwidth, and
    the train and serve plans' links line says so; a calibrated link (H100) is not so marked."""
    ideal = "datasheet bandwidth: an ideal link"
    for hw, marked in (("gaudi3", True), (H100, False)):
        train = run("plan", "train", "llama-2-7b", "-H", hw, "--gpus", "16", "--tokens", "1B", "--tp", "8")
        serve = run("plan", "serve", "llama-2-7b", "-H", hw, "--prompt", "512", "--gen", "64", "--tp", "8",
                    "--pp", "1", "--max-batch", "8")
        for out in (train, serve):
            assert out.exit_code == 0, out.output[-300:]
            links = [line for line in out.output.splitlines() if line.strip().startswith("links")]
            assert len(links) == 1 and (ideal in " ".join(out.output.split())) is marked, (hw, links)
