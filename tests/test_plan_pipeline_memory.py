"""The activations a pipeline stage holds in flight (flopsim.planning.train_step.in_flight_chunks,
flopsim.planning.train.activations_in_flight): plain 1F1B and the interleaved schedule, each
count derived from Megatron-LM's warm-up rule and checked against the closed form of
Korthikanti et al. 2022 / Megatron-LM's theoretical_memory_usage.py."""

from __future__ import annotations

import pytest

import flopsim
from flopsim.planning import plan_training
from flopsim.planning.train_step import in_flight_chunks

H100 = "h100-sxm"


def test_one_f_one_b_holds_pp_minus_rank_micro_batches():
    # warm-up pp - r - 1 forwards, then the forward of the first 1F1B pair: pp - r
    assert [in_flight_chunks(4, 64, 1, r) for r in range(4)] == [4, 3, 2, 1]
    assert in_flight_chunks(4, 2) == 2  # two micro-batches: both forwards are the warm-up
    assert in_flight_chunks(1, 8) == 1  # no pipeline: one micro-batch at a time


def test_interleaved_warm_up_is_megatrons():
    # Megatron-LM schedules.py: warm-up (pp - r - 1) * 2 + (v - 1) * pp chunks (group size pp), + 1
    pp, v = 4, 2
    assert in_flight_chunks(pp, 64, v, 0) == (pp - 0 - 1) * 2 + (v - 1) * pp + 1 == 11
    assert in_flight_chunks(pp, 64, v, 3) == (pp - 3 - 1) * 2 + (v - 1) * pp + 1 == 5
    assert in_flight_chunks(pp, 4, v, 0) == 4 * v  # m v = 8 < 11: every forward in the warm-up


@pytest.mark.parametrize("pp, v", [(2, 2), (4, 2), (4, 3), (8, 2), (16, 4), (35, 3)])
def test_the_first_stages_factor_is_korthikantis(pp, v):
    # chunks of 1/(pp v) of the blocks: (v pp + pp - 1) / (v pp) = 1 + (pp - 1) / (pp v)
    assert in_flight_chunks(pp, 10_000, v) / (pp * v) == pytest.approx(1 + (pp - 1) / (pp * v), rel=1e-15)


def test_the_plan_holds_the_interleaved_factor():
    """llama-2-7b, tp 2 x pp 4 on 16 GPUs (dp 2), 64 micro-batches: v = 1 keeps plain 1F1B's
    4 micro-batches of 1/4 of the blocks; v = 2 holds 11 chunks of 1/8, 1 + 3/8 times that."""
    one = flopsim.memory("llama-2-7b", phase="train", batch=1, seq=1024).activations_bytes

    def plan(v, global_batch=128):
        return plan_training("llama-2-7b", H100, gpus=16, tokens=1e10, seq=1024, tp=2, pp=4,
                             global_batch=global_batch, virtual_stages=v)

    plain, inter = plan(1), plan(2)
    assert plain.config["microbatches"] == 64
    assert plain.memory["activations_bytes"] == pytest.approx(one / 2 * 4 / 4, rel=1e-12)
    assert inter.memory["activations_bytes"] == pytest.approx(one / 2 * 11 / 8, rel=1e-12)
    assert inter.memory["activations_bytes"] / plain.memory["activations_bytes"] == pytest.approx(1 + 3 / (4 * 2))
    assert inter.memory["microbatches_in_flight"] == 11 / 2
    assert "11 chunks/(pp x 2) in flight" in inter.memory_parts()[3]["how"]
    # 8 micro-batches of a replica (global batch 16 / dp 2) x 2 chunks: 16 forwards, over the 11 of the warm-up
    assert plan(2, 16).memory["activations_bytes"] == pytest.approx(one / 2 * 11 / 8, rel=1e-12)
    # fewer than pp micro-batches a replica: Megatron does not interleave (test below)


def test_interleaving_needs_pp_micro_batches():
    """Megatron-LM runs the interleaved schedule with at least pp micro-batches a replica:
    a plan with fewer is a one-line error, and the search never offers one."""
    from flopsim.errors import InputError
    from flopsim.planning.search import search_training

    kw = dict(gpus=64, tokens=1e9, tp=8, pp=4, micro_batch=1, virtual_stages=2)
    assert plan_training("llama-2-70b", "a100-80gb", global_batch=8, **kw).config["microbatches"] == 8 // 2
    with pytest.raises(InputError, match="virtual_stages: 2: .* at least pp = 4 micro-batches .* gives 3"):
        plan_training("llama-2-70b", "a100-80gb", global_batch=6, **kw)
    rows = search_training("llama-2-70b", "a100-80gb", gpus=64, tokens=1e9, global_batch=8, micro_batches=[1],
                           zero=[1], recompute=["none"]).rows
    assert rows and all(r["virtual_stages"] == 1 or r["microbatches"] >= r["pp"] for r in rows)
    assert any(r["virtual_stages"] > 1 for r in rows)
