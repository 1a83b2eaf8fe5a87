"""Full recomputation of only some blocks (`recompute_fraction`, `--recompute-fraction`): IBM
fms-fsdp's selective_checkpointing and torchtitan's every-k-th-layer checkpointing. The
checkpointed blocks are placed by fms's rule; only they are recomputed (forward again, and
under ZeRO-3 gathered again), and only they keep just their input."""

from __future__ import annotations

import pytest
from conftest import one_error_line
from conftest import run_cli as run

import flopsim
from flopsim.errors import InputError
from flopsim.parallel.layout import checkpointed_blocks

PLAN = dict(gpus=8, dp=8, zero=3, micro_batch=1, seq=1024, global_batch=8, tokens=1e9)


def _plan(fraction=1.0, recompute="full", model="llama-2-7b"):
    return flopsim.plan_training(model, "h100-sxm", recompute=recompute, recompute_fraction=fraction, **PLAN)


def test_checkpointed_blocks_follow_fms_placement():
    """fms-fsdp's apply_selective_ac walks blocks 1..L and checkpoints block i when i * p reaches
    the cut-off 0.5, 1.5, 2.5, ...: p = 1/2 of 40 blocks -> blocks 1, 3, 5, ... (0-based 0, 2,
    4, ...); p = 1/3 of 10 -> i = 2, 5, 8 (0-based 1, 4, 7); round(p * L) blocks in all."""
    assert checkpointed_blocks(40, 0.5) == frozenset(range(0, 40, 2))
    assert checkpointed_blocks(10, 1 / 3) == frozenset({1, 4, 7})
    assert checkpointed_blocks(32, 1.0) == frozenset(range(32))
    for blocks, p in ((32, 0.25), (80, 0.3), (48, 0.75), (7, 0.5)):
        assert len(checkpointed_blocks(blocks, p)) == int(p * blocks + 0.5)


def test_fraction_one_is_full_recomputation():
    full, one = _plan(recompute="full"), _plan(1.0)
    assert one.totals["step_time_s"] == full.totals["step_time_s"]
    assert one.memory["activations_bytes"] == full.memory["activations_bytes"]


def test_half_the_blocks_recompute_half_the_forward_and_keep_the_rest():
    """32 identical blocks, p = 1/2: 16 recomputed. Recomputation time is half full's; each block
    not checkpointed keeps its activations A instead of its input `in`, so activations grow by
    16 (A - in) over full's, and the same per block between p = 1/4 (8 checkpointed) and 1/2."""
    full, half, quarter, none = _plan(1.0), _plan(0.5), _plan(0.25), _plan(recompute="none")
    assert half.compute["recompute_s_per_microbatch"] == pytest.approx(full.compute["recompute_s_per_microbatch"] / 2,
                                                                       rel=1e-9)
    act = {k: p.memory["activations_bytes"] for k, p in (("full", full), ("half", half), ("quarter", quarter),
                                                          ("none", none))}
    per_block = (act["half"] - act["full"]) / 16  # A - in
    assert act["quarter"] - act["full"] == pytest.approx(24 * per_block, rel=1e-9)
    assert act["full"] < act["half"] < act["quarter"] < act["none"]
    # fewer blocks gathered again under ZeRO-3: less data-parallel traffic than full, more than none
    sent = {k: p.communication["dp_bytes_per_step"] for k, p in (("full", full), ("half", half), ("none", none))}
    assert sent["none"] < sent["half"] < sent["full"]


@pytest.mark.parametrize("fraction, recompute, match", [(0.0, "full", "above 0"), (1.5, "full", "at most 1"),
                                                        (0.5, "selective", "needs recompute full")])
def test_bad_fractions_are_refused(fraction, recompute, match):
    with pytest.raises(InputError, match=f"recompute_fraction: .*{match}"):
        _plan(fraction, recompute)


def test_cli_recompute_fraction():
    args = ("plan", "train", "llama-2-7b", "-H", "h100-sxm", "--gpus", 8, "--zero", 3, "--seq", 1024,
            "--global-batch", 8, "--tokens", "1B", "--recompute", "full")
    table = " ".join(run(*args, "--recompute-fraction", 0.5).output.split())
    assert "recompute full (0.5 of the blocks)" in table
    assert one_error_line(run(*args, "--recompute-fraction", 2)).startswith("flopsim: error: recompute_fraction: 2")
    assert one_error_line(run(*args, "--recompute-fraction", 0.5, "--search")).startswith(
        "flopsim: error: recompute_fraction: 0.5")


def test_a_fraction_that_does_not_fit_is_offered_every_block():
    """A plan that checkpoints only some blocks and does not fit is offered
    `--recompute-fraction 1` (every block checkpointed), with the need that plan has."""
    GB = 1e9
    kw = dict(gpus=8, dp=8, zero=1, micro_batch=4, seq=4096, global_batch=32, tokens=1e9)
    p = flopsim.plan_training("llama-2-7b", "h100-sxm", recompute="full", recompute_fraction=0.5, **kw)
    assert not p.fits
    offered = [s for s in p.suggestions if s.startswith("--recompute-fraction 1 ")]
    assert len(offered) == 1
    q = flopsim.plan_training("llama-2-7b", "h100-sxm", recompute="full", recompute_fraction=1.0, **kw)
    assert q.fits and f"({q.memory['total_bytes'] / GB:.1f} GB)" in offered[0]
    # every block already checkpointed: nothing to offer there (micro-batches of 32 do not fit)
    everything = flopsim.plan_training("llama-2-7b", "h100-sxm", recompute="full",
                                       **{**kw, "micro_batch": 32, "global_batch": 256})
    assert not everything.fits and everything.suggestions
    assert not any(s.startswith("--recompute") for s in everything.suggestions)
