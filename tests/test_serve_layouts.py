"""`plan serve` on replicas of tp x pp x ep GPUs and for encoder-decoders
(flopsim.planning.serve_layouts, serve_steps, serve_model).

Each arithmetic test writes its derivation out: a stage's time is flopsim.predict of that
stage's sharded op list (tp_prefill_s / tp_decode_s with `stage`), a weight or cache figure
is written from the model's dimensions."""

from __future__ import annotations

import json

import pytest
from conftest import one_error_line
from conftest import run_cli as run

import flopsim
from flopsim.count import count
from flopsim.planning import plan_serving, tp_decode_s, tp_prefill_s
from flopsim.planning.serve_layouts import Replica, replica_layout
from flopsim.roofline import collective_time

H100 = "h100-sxm"
# llama-2-7b: d 4096, 32 blocks, d_ff 11008 (gated), vocab 32000, untied head, RMS norms, bf16
LLAMA_BLOCK = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096  # q, k, v, o; gate, up, down; two norms
LLAMA_TABLE = 32000 * 4096  # the token embedding, and the LM head, each


def _stages(fn, s, pp, **kw):
    """fn (tp_prefill_s / tp_decode_s) of each of the pp stages of the plan's replica."""
    return [fn(s.spec, s.hw, s.calibration, s.links, tp=s.tp, pp=pp, ep=s.ep, stage=st, **kw)[0] for st in range(pp)]


@pytest.fixture(scope="module")
def llama_pp2():
    return plan_serving("llama-2-7b", H100, prompt=512, gen=128, tp=1, pp=2, max_batch=16)


def test_pipeline_ttft_is_the_stages_prefills_and_the_send(llama_pp2):
    s = llama_pp2
    assert (s.tp, s.pp, s.ep, s.config["replica_gpus"], s.config["engines"]) == (1, 2, 1, 2, 2)
    # a prompt alone passes stage 0 (embedding, blocks 0-15, the send) then stage 1 (blocks 16-31, head)
    first, r0 = tp_prefill_s(s.spec, s.hw, s.calibration, s.links, tp=1, pp=2, stage=0, batch=1, prompt=512)
    last, r1 = tp_prefill_s(s.spec, s.hw, s.calibration, s.links, tp=1, pp=2, stage=1, batch=1, prompt=512)
    assert s.latency["ttft_s"] == pytest.approx(first + last, rel=1e-12)
    sends = [o for o in r0.ops if o.kind == "collective"]
    assert [o.tags["group"] for o in sends] == ["pp"] and not [o for o in r1.ops if o.kind == "collective"]
    # the send: the last block's output, 512 tokens x 4096 values x 2 bytes, over the intra-node link
    assert sends[0].comm_bytes == 512 * 4096 * 2 and sends[0].tags["level"] == "scale_up"
    priced = collective_time(sends[0], s.hw, s.calibration, s.links.by_level).time_s
    assert first == pytest.approx(sum(o.time_s for o in r0.ops if o.kind != "collective") + priced, rel=1e-12)
    assert s.latency["ttft_pp_comm_s"] == pytest.approx(priced)


def test_pipeline_tpot_cycle_and_throughput(llama_pp2):
    s = llama_pp2
    b, t = s.batch, 512 + (128 + 1) // 2  # the mean KV length P + (G + 1) / 2, floored
    dec = _stages(tp_decode_s, s, 2, batch=b, context=t)
    assert s.latency["decode_stage_s"] == pytest.approx(dec, rel=1e-12)
    # two engines (virtual engines) share the stages: each steps once every 2 x the busiest stage
    assert s.latency["tpot_s"] == pytest.approx(2 * max(dec), rel=1e-12) and 2 * max(dec) >= sum(dec)
    pre = _stages(tp_prefill_s, s, 2, batch=1, prompt=512)
    cycle = 2 * max(b * p + 128 * d for p, d in zip(pre, dec))  # the busiest stage serves both engines' work
    assert s.throughput["output_tokens_per_s_per_replica"] == pytest.approx(2 * b * 128 / cycle)
    assert s.throughput["output_tokens_per_s_per_gpu"] == pytest.approx(b * 128 / cycle)  # 2 engines on 2 GPUs
    assert s.config["concurrent_sequences"] == 2 * b


def test_pipeline_memory_is_the_fullest_stage(llama_pp2):
    s = llama_pp2
    b = s.batch
    # stage 1 holds blocks 16-31, the final norm and the head; stage 0 blocks 0-15 and the embedding: 4096
    # weights fewer, and a smaller working set than the head's logits
    assert s.memory["stage"] == 1
    assert s.memory["weights_bytes"] == pytest.approx((16 * LLAMA_BLOCK + 4096 + LLAMA_TABLE) * 2)
    # the KV cache of its 16 layers for both engines' 2 b sequences at prompt + gen tokens: K and V, 32 heads x 128
    assert s.memory["kv_cache_bytes"] == pytest.approx(2 * b * 16 * 2 * 4096 * 2 * (512 + 128))
    one = plan_serving("llama-2-7b", H100, prompt=512, gen=128, tp=1, pp=1, max_batch=b)
    assert one.memory["kv_cache_bytes"] == pytest.approx(s.memory["kv_cache_bytes"])  # b x 32 layers on 1 GPU
    assert s.memory["weights_bytes"] < 0.51 * one.memory["weights_bytes"]  # about half: 6.74 B parameters / 2


def test_uneven_pipeline_split():
    # 32 blocks over 3 stages: 11, 11, 10 (the earlier stages take the extra block)
    s = plan_serving("llama-2-7b", H100, prompt=128, gen=32, tp=1, pp=3, max_batch=4)
    assert s.memory["stage"] == 0  # 11 blocks and the embedding weigh more than 10 blocks and the head
    assert s.memory["weights_bytes"] == pytest.approx((11 * LLAMA_BLOCK + LLAMA_TABLE) * 2)
    assert len(s.latency["decode_stage_s"]) == 3


def test_expert_parallel_weights_messages_and_reads():
    s = plan_serving("mixtral-8x7b", H100, prompt=256, gen=64, tp=1, pp=1, ep=4, max_batch=8)
    assert (s.config["replica_gpus"], s.config["engines"]) == (4, 4)
    # every dense weight whole on each GPU; each GPU holds 2 of the 8 routed experts of every layer
    attention = 4096 * 4096 * 2 + 2 * 4096 * 8 * 128  # q and o; k and v over 8 KV heads of 128
    dense = 32 * (attention + 4096 * 8 + 2 * 4096) + 2 * 32000 * 4096 + 4096  # + router, norms; table, head, norm
    experts = 32 * 8 * 3 * 4096 * 14336  # gate, up and down of width 14336
    assert s.memory["weights_bytes"] == pytest.approx((dense + experts / 4) * 2)
    # each group's own batch: the KV cache of b sequences, all 32 layers, whole heads (tp 1)
    b = s.batch
    assert s.memory["kv_cache_bytes"] == pytest.approx(b * 32 * 2 * 8 * 128 * 2 * (256 + 64))
    # the step: the sharded decode list (expert load from the 4 groups' routed tokens), two all-to-alls a layer
    t = 256 + (64 + 1) // 2
    assert s.latency["tpot_s"] == pytest.approx(tp_decode_s(s.spec, s.hw, s.calibration, s.links, tp=1, ep=4,
                                                            batch=b, context=t)[0], rel=1e-9)
    assert s.latency["tpot_ep_comm_s"] > 0 and s.latency["tpot_tp_comm_s"] == 0


def test_expert_parallel_shard_reads_the_groups_experts():
    # one token a group, 4 groups: 4 tokens route 2 of 8 experts each; a GPU's 2 experts are read when any
    # token reaches them: 8 (1 - (1 - 2/8)^4) / 4 of them expected, each 3 x 4096 x 14336 bf16 values
    spec = flopsim.load_model("mixtral-8x7b")
    layout = replica_layout(spec, "decode", Replica(tp=1, ep=4), gpus_per_node=8)  # 4 groups (dp 4) of one GPU
    assert (layout.ep, layout.dp, layout.gpus) == (4, 4, 4)
    ops = count(spec, phase="decode", batch=1, seq=1, context=100, layout=layout).ops
    read = sum(o.weight_bytes for o in ops if o.layer == 0 and ".moe.experts." in o.name)
    assert read == pytest.approx(8 * (1 - (1 - 2 / 8) ** 4) / 4 * 3 * 4096 * 14336 * 2)
    # the all-to-all after the dispatch: the token's 2 routed copies of 4096 bf16 values (balanced load)
    dispatch = next(o for o in ops if o.name == "block.0.moe.dispatch.ep_dispatch")
    assert dispatch.comm_bytes == 2 * 4096 * 2 and dispatch.tags["ranks"] == 4


def test_the_search_finds_a_layout_when_tp_alone_does_not_fit():
    # 70.6 B parameters, 141 GB in bf16: no single H100; with tp fixed at 1, stages or nothing
    s = plan_serving("llama-3.1-70b", H100, prompt=1024, gen=256, tp=1, gpus=4)
    rows = {(r["tp"], r["pp"], r["ep"]): r for r in s.candidates}
    assert set(rows) == {(1, 1, 1), (1, 2, 1), (1, 4, 1)}  # replicas dividing the 4 GPUs, dense: ep 1
    assert not rows[(1, 1, 1)]["fits"] and rows[(1, 1, 1)]["needs_bytes"] > 141e9
    assert s.fits and s.pp > 1 and s.memory["total_bytes"] <= s.memory["usable_bytes"]
    # an MoE: the experts split over ep, or the blocks over pp
    m = plan_serving("mixtral-8x7b", H100, prompt=1024, gen=256, tp=1, gpus=2)
    assert m.fits and (m.pp, m.ep) in ((2, 1), (1, 2))
    assert not next(r for r in m.candidates if r["gpus"] == 1)["fits"]


def test_targets_are_met_only_when_within_them():
    base = plan_serving("mixtral-8x7b", H100, prompt=512, gen=128, gpus=4, max_batch=64)
    tpots = sorted(r["tpot_s"] for r in base.candidates if r["fits"])
    target = (tpots[0] + tpots[-1]) / 2  # some replicas' batch-64 steps are within it, others not
    s = plan_serving("mixtral-8x7b", H100, prompt=512, gen=128, gpus=4, max_batch=64, tpot_s=target)
    for r in s.candidates:
        ok = r["fits"] and r["tpot_s"] <= target
        assert r["meets"] is ok and (r["reasons"] == "") is ok
    assert s.feasible and s.latency["tpot_s"] <= target
    best = max((r for r in s.candidates if r["meets"]), key=lambda r: r["output_tokens_per_s_per_gpu"])
    assert (s.tp, s.pp, s.ep) == (best["tp"], best["pp"], best["ep"])
    assert not s.message.startswith("targets not met")
    tight = plan_serving("mixtral-8x7b", H100, prompt=512, gen=128, gpus=4, max_batch=64, tpot_s=tpots[0] / 10)
    assert not tight.feasible and tight.message.startswith("targets not met")
    assert not any(r["meets"] for r in tight.candidates)


def test_encoder_decoder_ttft_decode_and_cache():
    prompt, gen = 400, 100
    s = plan_serving("t5-base", H100, prompt=prompt, gen=gen, tp=1, max_batch=8)
    spec, b = s.spec, s.batch
    # TTFT: the encoder over the 400-token prompt, then the decoder's first token (its start token), one list
    pre = flopsim.predict(spec, H100, phase="prefill", batch=1, seq=1, encoder_seq=prompt)
    assert s.latency["ttft_s"] == pytest.approx(pre.time_s, rel=1e-12)
    fwd = count(spec, phase="forward", batch=1, seq=1, encoder_seq=prompt)  # the encoder's forward, as in forward
    enc = lambda r: sum(o.flops for o in r.ops if o.name.startswith("encoder."))  # noqa: E731
    assert enc(count(spec, phase="prefill", batch=1, seq=1, encoder_seq=prompt)) == enc(fwd) > 0
    # decode: the decoder's own 1 + j keys at step j, mean floor(1 + (G + 1) / 2) = 51; cross-attention to 400
    assert s.config["decode_context_mean"] == 51 and s.config["encoder_tokens_mean"] == prompt
    dec = flopsim.predict(spec, H100, phase="decode", batch=b, seq=1, context=51, encoder_seq=prompt)
    assert s.latency["tpot_s"] == pytest.approx(dec.time_s, rel=1e-12)
    # KV cache: in each of 12 decoder layers, K and V (12 heads x 64) of the 1 + 100 decoder tokens and of the
    # 400 encoder outputs, bf16
    assert s.memory["kv_cache_bytes"] == pytest.approx(b * 12 * 2 * 768 * 2 * (1 + gen + prompt))
    assert s.config["kv_context_max"] == 1 + gen + prompt
    assert any(n.startswith("encoder-decoder:") for n in s.notes)
    assert all(r["pp"] == 1 for r in s.candidates)  # an encoder-decoder is served with pp 1
    # tp 2: both caches' heads split over the two GPUs (the cross cache held at decode too)
    two = plan_serving("t5-base", H100, prompt=prompt, gen=gen, tp=2, max_batch=8)
    assert two.memory["kv_cache_bytes"] == pytest.approx(two.batch * 12 * 2 * 768 * 2 * (1 + gen + prompt) / 2)


def test_cli_pp_ep_json_and_table():
    args = ["plan", "serve", "mixtral-8x7b", "-H", H100, "--prompt", 256, "--gen", 64, "--tp", 1, "--pp", 2,
            "--ep", 2, "--max-batch", 8]
    r = run(*args, "--format", "json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    c = d["config"]
    assert (c["tp"], c["pp"], c["ep"], c["replica_gpus"], c["engines"]) == (1, 2, 2, 4, 4)
    assert {"ttft_ep_comm_s", "ttft_pp_comm_s", "tpot_ep_comm_s", "decode_stage_s"} <= set(d["latency"])
    assert d["memory"]["stage"] in (0, 1) and [(x["pp"], x["ep"]) for x in d["candidates"]] == [(2, 2)]
    t = run(*args)
    assert t.exit_code == 0, t.output
    for needle in ("tp 1, pp 2, ep 2, batch", "replicas tried", "EP all-to-alls", "PP sends", "pipeline of 2 stages"):
        assert needle in t.output


@pytest.mark.parametrize("extra, needle", [
    (["llama-2-7b", "--ep", 2], "ep: 2: llama-2-7b (dense) has no routed experts"),
    (["llama-2-7b", "--pp", 40], "pp: 40: exceeds the 32 blocks"),
    (["llama-2-7b", "--pp", 0], "pp: 0: must be a positive integer"),
    (["mixtral-8x7b", "--ep", 3], "ep: 3: does not divide the 8 experts"),
    (["llama-2-7b", "--tp", 2, "--pp", 2, "--gpus", 6], "tp * pp * ep must divide the GPUs available"),
    (["t5-base", "--pp", 2], "pp: 2: pipeline stages of an encoder-decoder"),
    (["t5-base", "--chunk", 64], "chunk: 64: chunked prefill of an encoder-decoder"),
    (["gpt2-medium", "--pp", 2, "--draft", "gpt2-small", "--draft-len", 2, "--acceptance", 0.5],
     "pp: 2: speculative decoding is served with pp 1"),
])
def test_bad_layouts_are_one_line(extra, needle):
    spec, *rest = extra
    line = one_error_line(run("plan", "serve", spec, "-H", H100, "--prompt", 64, "--gen", 16, *rest))
    assert needle in line
