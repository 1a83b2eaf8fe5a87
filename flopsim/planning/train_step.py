"""One training step on a parallel layout, from each pipeline stage's sharded op
list (flopsim.parallel.shard: one GPU's ops of one micro-batch plus its
collectives, costed by flopsim.roofline on the calibration's link levels).
No communication formula lives here: the collectives' messages are ops.

Per stage and micro-batch (`StageTimes`): forward, backward and
recomputation compute; the collectives by group (tp, cp, ep, pp) and the
data-parallel ones by when they run (`per` micro-batch or step) and which
pass they can hide behind (`window`).

The step (`step_schedule`), for microbatches m and pp stages, t_stage =
compute + exposed tp + cp + ep + pp of the slowest stage:
- tensor-parallel traffic hides behind up to `tp_overlap` of the
  micro-batch's compute (Megatron-Core's --tp-comm-overlap: 1.0; default 0);
  context-, expert- and pipeline-parallel traffic is exposed (it sits on the
  critical path);
- 1F1B pipeline: (m + pp - 1) * t_stage, a bubble of (pp - 1) / m of the ideal;
  interleaved over v chunks a stage (Narayanan et al. 2021), (m + (pp - 1) / v)
  * t_stage, the chunks' extra sends in t_stage;
- data-parallel traffic hides behind up to `dp_overlap` of the pass it follows
  (gradients: the backward and recomputation) or precedes (weight gathers:
  the forward); what is left is exposed, m times for per-micro-batch traffic;
  while hidden, its kernels hold the calibration's `collective_sm_share` of
  the SMs, so the pass it hides behind runs that much slower: `sm_share` x
  the hidden seconds (`dp_contention_s`);
- the optimizer update of the stage's parameters;
- gradient accumulation (flopsim.ops.grad_accum): the op over the stage's
  parameters, x the micro-batches that pay it (`accumulating`), serial (not
  hidden, not in the bubble: charged once a paying micro-batch);
- step = pipeline + the largest (exposed data-parallel + its contention +
  optimizer + accumulation) over stages.

Micro-batches in flight (`in_flight_chunks`, for memory): under 1F1B stage r
runs pp - r - 1 warm-up forwards, then one forward before its first
backward: it holds min(pp - r, m) micro-batches of its blocks. Interleaved,
its warm-up is (pp - r - 1) x 2 + (v - 1) x pp model chunks (Megatron-LM's
schedules.py, get_pp_rank_microbatches, with microbatch_group_size_per_vp_stage
= pp, its default), each 1/v of its blocks: stage 0 holds min(v pp + pp - 1,
m v) chunks, (v pp + pp - 1) / (v pp) = 1 + (pp - 1) / (pp v) times the
blocks of plain 1F1B's pp micro-batches once m v >= v pp + pp - 1 -- the
factor Korthikanti et al. 2022 give for the first stage and Megatron-LM's
theoretical_memory_usage.py applies (interleaved_schedule_memory_penalty).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from flopsim.parallel.layout import stage_blocks

GROUPS = ("tp", "cp", "ep", "pp")


@dataclass
class StageTimes:
    """Sums over one stage's timed ops (flopsim.roofline.OpTime) of one micro-batch."""

    stage: int
    fwd_s: float = 0.0
    bwd_s: float = 0.0
    recompute_s: float = 0.0
    optimizer_s: float = 0.0
    accumulate_s: float = 0.0  # one micro-batch's gradient accumulation (flopsim.ops.grad_accum)
    comm_s: dict = field(default_factory=lambda: dict.fromkeys(GROUPS, 0.0))
    comm_count: dict = field(default_factory=lambda: dict.fromkeys(GROUPS, 0))
    comm_one: dict = field(default_factory=dict)  # group -> (message bytes, seconds) of its first collective
    dp: dict = field(default_factory=lambda: defaultdict(float))  # (per, window) -> seconds
    dp_bytes: dict = field(default_factory=lambda: defaultdict(float))  # per -> bytes sent

    @property
    def compute_s(self) -> float:
        return self.fwd_s + self.bwd_s + self.recompute_s


def stages_to_cost(spec, pp: int, virtual_stages: int = 1, encoder_stages=None) -> list[int]:
    """The stages whose time can differ: the first (embeddings), the last (head), an
    encoder-decoder's last encoder stage (the encoder's final norm) and first decoder stage
    (the decoder's embeddings, one gradient sent back), and the first stage of each stack and
    size in between (stages of one stack and size hold as many like blocks and send alike)."""
    chosen, kinds = {0, pp - 1}, set()
    if encoder_stages is not None:
        chosen |= {encoder_stages - 1, encoder_stages}
    for s, layers in enumerate(stage_blocks(spec, pp, virtual_stages, encoder_stages)):
        kind = (encoder_stages is not None and s >= encoder_stages, len(layers))
        if s not in chosen and kind not in kinds:
            kinds.add(kind)
            chosen.add(s)
    return sorted(chosen)


def in_flight_chunks(pp: int, microbatches: int, virtual_stages: int = 1, stage: int = 0) -> int:
    """Model chunks (1 / virtual_stages of a stage's blocks, one micro-batch) whose activations
    pipeline stage `stage` holds at its peak (see the module docstring): its warm-up forwards
    and the forward of its first 1F1B pair, at most all microbatches x virtual_stages."""
    rest = pp - stage - 1
    warmup = rest if virtual_stages == 1 else rest * 2 + (virtual_stages - 1) * pp
    return min(warmup + 1, microbatches * virtual_stages)


def tp_exposed_s(st: StageTimes, tp_overlap: float) -> float:
    """Tensor-parallel traffic left after hiding up to tp_overlap of the micro-batch's compute."""
    return max(0.0, st.comm_s["tp"] - tp_overlap * st.compute_s)


def stage_s(st: StageTimes, tp_overlap: float) -> float:
    """A stage's time per micro-batch: compute + exposed tp + cp + ep + pp traffic."""
    return st.compute_s + tp_exposed_s(st, tp_overlap) + st.comm_s["cp"] + st.comm_s["ep"] + st.comm_s["pp"]


def dp_times(st: StageTimes, microbatches: int, dp_overlap: float,
             sm_share: float = 0.0) -> tuple[float, float, float, float]:
    """(bytes sent, seconds, seconds exposed, seconds of contention) of a stage's
    data-parallel traffic per step: contention = sm_share x the seconds hidden (the
    compute it overlaps runs on the SMs the collectives leave)."""
    raw = exposed = 0.0
    for (per, window), secs in st.dp.items():
        n = microbatches if per == "microbatch" else 1
        hide = st.fwd_s if window == "forward" else st.bwd_s + st.recompute_s
        raw += n * secs
        exposed += n * max(0.0, secs - dp_overlap * hide)
    sent = st.dp_bytes.get("step", 0.0) + microbatches * st.dp_bytes.get("microbatch", 0.0)
    return sent, raw, exposed, sm_share * (raw - exposed)


def step_schedule(stages: list, microbatches: int, pp: int, tp_overlap: float, dp_overlap: float,
                  virtual_stages: int = 1, accumulating: int = 0, sm_share: float = 0.0) -> dict:
    """The step from the costed stages (see the module docstring): the slowest stage sets
    the pipeline, the stage with the most exposed data-parallel traffic (and its contention,
    `sm_share`: the calibration's collective_sm_share), update and gradient accumulation
    (`accumulating`: the micro-batches that pay it) ends it."""
    slow = max(stages, key=lambda st: stage_s(st, tp_overlap))
    t_stage = stage_s(slow, tp_overlap)

    def tail_s(st):
        _, _, exposed, contention = dp_times(st, microbatches, dp_overlap, sm_share)
        return exposed + contention + st.optimizer_s + accumulating * st.accumulate_s

    tail = max(stages, key=tail_s)
    sent, raw, exposed, contention = dp_times(tail, microbatches, dp_overlap, sm_share)
    bubble = (pp - 1) / virtual_stages * t_stage
    pipeline = microbatches * t_stage + bubble
    return {"slowest": slow, "tail": tail, "stage_s": t_stage, "pipeline_s": pipeline,
            "bubble_s": bubble, "dp_bytes": sent, "dp_s": raw, "dp_exposed_s": exposed,
            "dp_contention_s": contention,
            "accumulate_s": tail.accumulate_s, "accumulate_step_s": accumulating * tail.accumulate_s,
            "step_s": pipeline + exposed + contention + tail.optimizer_s + accumulating * tail.accumulate_s}
