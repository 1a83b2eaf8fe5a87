"""Training plans (`plan_training`): GPUs, days, GPU-hours and cost of a run.

Training (`plan_training`), dp * tp * pp = GPUs, the global batch split into
`microbatches` = global sequences / (dp * micro_batch) per replica:

- Compute. `predict(phase="train")` of the whole model at the micro-batch
  (micro_batch sequences of `seq` tokens) gives every op's roofline time;
  tensor and pipeline parallelism split every op's FLOPs and bytes evenly, so
  a GPU's share of one micro-batch is (sum of max(compute_s, memory_s)) /
  (tp * pp) plus the launch overheads of the kernels it runs (1 / pp of them;
  when pp does not divide the layers, the slowest stage holds ceil(L / pp) blocks;
  tp does not reduce the number of kernels). Norms and elementwise ops are
  split by tp too (Megatron sequence parallelism is assumed), embeddings and
  head count as an even share of a stage. Expert parallelism moves routed
  tokens, not work: under uniform routing a GPU's experts process as many
  (token, expert) pairs as the unsharded layer does per micro-batch, so the
  expert ops are split like the rest. With `recompute` (full: a checkpoint
  per block) the blocks' forward ops run again in the backward pass; with
  `recompute="selective"` (Korthikanti et al. 2022) only the attention core
  does (its memory is taken as without recomputation: an upper bound). The
  optimizer update (one op in the Op list) runs once per step over the
  parameters this GPU updates (1/dp of its shard under ZeRO >= 1).
- Tensor parallel (Megatron): 2 all-reduces per block forward (after the
  attention and after the MLP / MoE layer) and 2 backward, +2 per block with
  recomputation, each of micro_batch * seq * d_model activations (bytes at
  the spec's dtype) over tp ranks; the sequence-parallel all-gather /
  reduce-scatter pair moves the same bytes. Embedding and loss collectives
  are not counted; an MoD block all-reduces its full sequence (an upper bound).
- MoE all-to-all (expert parallel over ep ranks): per MoE layer a dispatch
  and a combine of the routed token rows forward, the same two backward, +2
  with recomputation. Routed bytes = the MoE layer's `dispatch` op's
  activation writes in the Op list (N * top_k rows of d_model dropless,
  experts * slots with a capacity factor), / tp (sequence parallel: each tp
  rank dispatches its share of the tokens), (ep - 1) / ep of it leaving the GPU.
  The step waits for the busiest expert-parallel rank: with dropless token
  choice the routed experts' work and the all-to-all bytes are scaled by
  `expert_imbalance` = E[max over ranks of its routed pairs] / the mean rank's,
  for the ep micro-batches an EP group routes at once, from the spec's
  `moe.popularity` (flopsim.ops.popularity; uniform routing too has a small
  statistical imbalance). Padded slots and expert choice do the same work on
  every rank; with a capacity factor `dropped_fraction` is reported instead.
- Pipeline (1F1B): per micro-batch and stage one point-to-point send of the
  stage's output activations forward and one of their gradients backward,
  micro_batch * seq * d_model values / tp (Megatron's scatter-gather). A
  stage's time per micro-batch t_stage = compute + tp + ep + p2p; the
  pipeline runs (microbatches + pp - 1) slots of t_stage, i.e. the ideal
  microbatches * t_stage plus a bubble of (pp - 1) * t_stage, a fraction
  (pp - 1) / microbatches.
- Data parallel, by ZeRO stage (Rajbhandari et al. 2020), over dp ranks for
  dense parameters and dp / ep for expert parameters; W, G = the GPU's weight
  and gradient bytes before ZeRO sharding:
      0: all-reduce G once per step (after the last micro-batch's backward);
      1: reduce-scatter G once per step + all-gather W after the update;
      2: reduce-scatter G after every micro-batch's backward (the gradients
         are sharded, so they cannot accumulate locally) + all-gather W per step;
      3: per micro-batch all-gather W before the forward and again before
         the backward (and before the recomputation), reduce-scatter G after it.
  Overlap: gradient traffic can hide behind the backward pass it follows,
  parameter gathers behind the forward pass they precede, up to `dp_overlap`
  (default 1.0) of that pass's compute; what is left is exposed. TP traffic
  is exposed unless `tp_overlap` (default 0; Megatron-Core's --tp-comm-overlap
  pipelines it with the GEMMs: 1.0) of the micro-batch's compute hides it;
  EP and pipeline traffic is not overlapped (it sits on the critical path).
- step time = pipeline time + exposed DP traffic + optimizer update;
  steps = ceil(tokens / tokens per step); days = steps * step time / 86400;
  GPU-hours = GPUs * steps * step time / 3600; cost = GPU-hours * price;
  MFU = model FLOPs per step (FlopCounterMode's count of the train step,
  recomputation excluded) / (step time * GPUs * dtype peak).
- Memory per GPU: weights P*w, gradients P*g and optimizer state P*s per
  parameter (flopsim.memory's bytes per parameter; Adam in bf16 2 + 2 + 12),
  P = dense parameters / (tp * pp) + expert parameters / (tp * pp * ep);
  ZeRO shards the optimizer state (stage >= 1), the gradients (>= 2) and the
  weights (3) over the data-parallel group. Activations: flopsim.memory's
  train activations of one micro-batch (with or without recomputation) / tp
  (sequence parallel) * min(pp, microbatches) / pp (1F1B: the first stage
  holds min(pp, microbatches) micro-batches of its 1/pp of the layers).
  Not counted: framework and allocator overhead, communication buffers,
  ZeRO-3's gathered-parameter buffers, fp32 gradient-accumulation buffers.

"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from flopsim.errors import InputError, bad_value
from flopsim.planning.common import (DEFAULT_GLOBAL_BATCH_TOKENS, DEFAULT_SEQ, _gb, _long_table,
                                     _non_negative, _positive, _positive_int, _Progress, _split_s)
from flopsim.planning.links import Links, resolve_links


def bubble_fraction(pp: int, microbatches: int) -> float:
    """1F1B pipeline bubble over the ideal time: (pp - 1) / microbatches."""
    return (pp - 1) / microbatches



def _stage_s(ops, tp: int, pp: int, layers: int) -> float:
    """The slowest pipeline stage's time for `ops`, split tp ways: it holds
    ceil(layers / pp) of the blocks (stages are as even as the layers allow)
    and a 1/pp share of the rest (embeddings, head, loss)."""
    blocks = [op for op in ops if 0 <= op.layer < layers]
    rest = [op for op in ops if not 0 <= op.layer < layers]
    share = math.ceil(layers / pp) / layers
    return share * _split_s(blocks, tp, 1) + _split_s(rest, tp * pp, pp)


def _param_split(spec) -> tuple[int, int]:
    """(all parameters, routed-expert parameters) from the forward Op list."""
    from flopsim.families import build_ops

    ops = [op for op in build_ops(spec, "forward") if op.pass_ == "fwd"]
    total = int(sum(int(op.params) for op in ops))
    experts = int(sum(int(op.params) for op in ops if ".moe.experts." in op.name))
    return total, experts


@dataclass
class TrainingPlan:
    """A training run on `gpus` devices: per-step times, memory per GPU, totals."""

    spec: Any
    hw: Any
    calibration: Any
    config: dict
    links: Links
    compute: dict
    communication: dict
    memory: dict
    totals: dict
    fits: bool
    message: str
    suggestions: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def step_time_s(self) -> float:
        return self.totals["step_time_s"]

    @property
    def days(self) -> float:
        return self.totals["days"]

    @property
    def gpu_hours(self) -> float:
        return self.totals["gpu_hours"]

    @property
    def cost(self) -> Optional[float]:
        return self.totals["cost"]

    @property
    def mfu(self) -> float:
        return self.totals["mfu"]

    def to_dict(self) -> dict:
        return {
            "kind": "training", "model": self.spec.name, "family": self.spec.family, "hardware": self.hw.name,
            "dtype": self.spec.dtype, "precision": self.spec.precision_label, "calibration": self.calibration.source,
            "calibration_kind": self.calibration.kind, "calibration_label": self.calibration.provenance_label,
            "config": dict(self.config), "links": self.links.to_dict(),
            "compute": dict(self.compute), "communication": dict(self.communication),
            "memory": dict(self.memory), "totals": dict(self.totals),
            "fits": self.fits, "message": self.message, "suggestions": list(self.suggestions),
            "notes": list(self.notes),
        }

    def table(self):
        """One row per figure (section, quantity, value): a long-format DataFrame."""
        return _long_table(self.to_dict(), ("config", "links", "compute", "communication", "memory", "totals"))

    def time_parts(self) -> list[dict]:
        """The step's time by part, as the CLI and the page show it: {part, per_microbatch_s
        (None where the part is per step), per_step_s, how}; the parts sum to the step."""
        from flopsim.units import human, human_time

        c, k, cm = self.config, self.compute, self.communication
        mb = c["microbatches"]

        def part(name, per_mb, per_step, how=""):
            return {"part": name, "per_microbatch_s": per_mb, "per_step_s": per_step, "how": how}

        parts = [part("forward", k["forward_s_per_microbatch"], mb * k["forward_s_per_microbatch"],
                      "op-list time / (tp*pp) + launches / pp"),
                 part("backward", k["backward_s_per_microbatch"], mb * k["backward_s_per_microbatch"])]
        if c["recompute"]:
            parts.append(part("recompute", k["recompute_s_per_microbatch"], mb * k["recompute_s_per_microbatch"],
                              "blocks' forward again"))
        if c["tp"] > 1:
            parts.append(part("TP all-reduce", cm["tp_s_per_microbatch"], cm["tp_s_per_step"],
                              f"{cm['tp_allreduces_per_microbatch']} x {human(cm['tp_allreduce_bytes'], 'B')} "
                              f"({cm['tp_link']})"))
        if c["ep"] > 1:
            parts.append(part("MoE all-to-all", cm["ep_s_per_microbatch"], cm["ep_s_per_step"],
                              f"{cm['ep_all_to_alls_per_microbatch']} x {human(cm['ep_routed_bytes_per_layer'], 'B')} "
                              f"({cm['ep_link']})"))
        if c["pp"] > 1:
            parts.append(part("PP send/recv", cm["pp_s_per_microbatch"], cm["pp_s_per_step"],
                              f"2 x {human(cm['pp_p2p_bytes'], 'B')} ({cm['pp_link']})"))
            parts.append(part("pipeline bubble", None, k["bubble_s"],
                              f"(pp-1)/microbatches = {k['bubble_fraction']:.3g} of the ideal"))
        if c["dp"] > 1:
            parts.append(part(f"DP (ZeRO-{c['zero']}) exposed", None, cm["dp_exposed_s_per_step"],
                              f"{human(cm['dp_bytes_per_step'], 'B')} sent, {human_time(cm['dp_s_per_step'])} of "
                              f"which {human_time(cm['dp_hidden_s_per_step'])} hidden ({cm['dp_link']})"))
        parts.append(part("optimizer update", None, k["optimizer_s"], "this GPU's share of the parameters"))
        return parts

    def memory_parts(self) -> list[dict]:
        """Memory per GPU by component: {component, bytes, how} (the total last)."""
        from flopsim.units import human

        c, m = self.config, self.memory
        per = m["bytes_per_param"]
        return [{"component": name, "bytes": m[f"{key}_bytes"], "how": how} for name, key, how in (
            ("weights", "weights", f"{human(m['params_per_gpu'])} params x {per['weights']} B"
             + (" / dp" if c["zero"] >= 3 else "")),
            ("gradients", "gradients", f"x {per['gradients']} B" + (" / dp" if c["zero"] >= 2 else "")),
            ("optimizer state", "optimizer", f"x {per['optimizer']} B" + (" / dp" if c["zero"] >= 1 else "")),
            ("activations", "activations", f"{human(m['activations_one_microbatch_bytes'], 'B')} per micro-batch "
             f"/ tp" + (f" x {m['microbatches_in_flight']}/pp in flight" if c["pp"] > 1 else "")),
            ("total", "total", f"device {human(m['capacity_bytes'], 'B')}"),
        )]





def _train_memory(params_dense, params_expert, bpp, act_one_mb, *, tp, pp, dp, ep, zero, microbatches):
    """Bytes per GPU by component (see the module docstring)."""
    edp = dp // ep

    def per_gpu(per_param: float, sharded: bool) -> float:
        dense = params_dense * per_param / (tp * pp) / (dp if sharded else 1)
        expert = params_expert * per_param / (tp * pp * ep) / (edp if sharded else 1)
        return dense + expert

    out = {
        "weights_bytes": per_gpu(bpp["weights"], zero >= 3),
        "gradients_bytes": per_gpu(bpp["gradients"], zero >= 2),
        "optimizer_bytes": per_gpu(bpp["optimizer"], zero >= 1),
        "activations_bytes": act_one_mb / tp * min(pp, microbatches) / pp,
    }
    out["total_bytes"] = sum(out.values())
    return out


def _train_layout(spec, gpus, tp, pp, dp, ep, zero, dp_overlap, tp_overlap) -> int:
    """The data-parallel degree of a valid layout (one-line errors otherwise)."""
    if zero not in (0, 1, 2, 3) or isinstance(zero, bool):
        raise bad_value("zero", zero, "expected a ZeRO stage 0, 1, 2 or 3")
    for name, value in (("dp_overlap", dp_overlap), ("tp_overlap", tp_overlap)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise bad_value(name, value, "must be a fraction in [0, 1]")
    if dp is None:
        if gpus % (tp * pp):
            raise InputError(f"gpus {gpus} is not divisible by tp * pp = {tp} * {pp}; dp * tp * pp must equal gpus")
        dp = gpus // (tp * pp)
    dp = _positive_int("dp", dp)
    if dp * tp * pp != gpus:
        raise InputError(f"dp * tp * pp = {dp} * {tp} * {pp} = {dp * tp * pp} does not equal gpus {gpus}")
    if spec.heads % tp:
        raise InputError(f"tp {tp} does not divide the {spec.heads} attention heads of {spec.name}")
    if pp > spec.layers:
        raise InputError(f"pp {pp} exceeds the {spec.layers} layers of {spec.name}")
    if ep > 1:
        if spec.moe is None:
            raise InputError(f"ep {ep}: {spec.name} ({spec.family}) has no experts; expert parallelism needs an MoE")
        if spec.moe.experts % ep:
            raise InputError(f"ep {ep} does not divide the {spec.moe.experts} experts of {spec.name}")
        if dp % ep:
            raise InputError(f"ep {ep} does not divide dp {dp} (experts are sharded within the data-parallel group)")
    return dp


def _recompute_mode(recompute) -> tuple[bool, bool]:
    """(full recomputation, selective recomputation) from True/False or none/selective/full."""
    selective = recompute == "selective"
    if recompute in ("none", "full"):
        recompute = recompute == "full"
    if not (isinstance(recompute, bool) or selective):
        raise bad_value("recompute", recompute, "expected none, selective or full")
    return (False if selective else recompute), selective


def _global_batch(seq: int, dp: int, micro_batch: int, global_batch, global_batch_tokens) -> int:
    """The global batch in sequences: given in sequences or tokens, else the smallest multiple of
    dp * micro_batch holding DEFAULT_GLOBAL_BATCH_TOKENS tokens."""
    per_step = dp * micro_batch
    if global_batch is not None and global_batch_tokens is not None:
        raise InputError("give the global batch in sequences or in tokens, not both")
    if global_batch_tokens is not None:
        gbt = _positive("global_batch_tokens", global_batch_tokens)
        if gbt % seq:
            raise bad_value("global_batch_tokens", global_batch_tokens, f"is not a multiple of seq {seq}")
        global_batch = int(gbt // seq)
    if global_batch is None:
        seqs = math.ceil(DEFAULT_GLOBAL_BATCH_TOKENS / seq)
        global_batch = math.ceil(seqs / per_step) * per_step
    global_batch = _positive_int("global_batch", global_batch)
    if global_batch % per_step:
        raise InputError(f"global batch {global_batch} sequences is not a multiple of dp * micro_batch = "
                         f"{dp} * {micro_batch} = {per_step}")
    return global_batch


def routing_figures(spec, c: dict) -> dict:
    """Skewed-routing figures of an MoE training layout (flopsim.ops.popularity): the busiest
    expert-parallel rank's routed pairs over the mean rank's (`expert_imbalance`; dropless token
    choice with ep > 1, else 1: padded slots and expert choice do the same work on every rank), and
    the share of (token, expert) pairs dropped at the capacity factor (`dropped_fraction`, token
    choice with a capacity factor, over the micro-batch's tokens, as the op list's slots)."""
    from flopsim.ops import popularity

    moe = getattr(spec, "moe", None)
    if moe is None:
        return {}
    pi = popularity.spec_inclusion(spec)
    tokens = c["micro_batch"] * c["seq"]
    out = {"routing": popularity.describe(moe.popularity), "expert_imbalance": 1.0, "dropped_fraction": 0.0}
    dropless = moe.capacity_factor is None and moe.routing == "token_choice"
    if dropless and c["ep"] > 1:  # the EP group routes ep micro-batches' tokens over its ranks
        out["expert_imbalance"] = popularity.imbalance(pi, c["ep"] * tokens, c["ep"])
    if moe.capacity_factor is not None and moe.routing == "token_choice":
        slots = math.ceil(moe.capacity_factor * moe.top_k * tokens / moe.experts)
        out["dropped_fraction"] = popularity.expected_dropped(pi, tokens, slots) / (tokens * moe.top_k)
    return out


def _imbalanced(ops, factor: float) -> list:
    """The routed experts' ops with their work (not their launches) scaled by `factor`."""
    if factor == 1.0:
        return list(ops)
    from dataclasses import replace

    return [replace(op, time_s=op.overhead_s + (op.time_s - op.overhead_s) * factor)
            if ".moe.experts." in op.name else op for op in ops]


def _train_compute(r, spec, c: dict, params: float, params_expert: float) -> dict:
    """Per-GPU compute of one micro-batch (forward, backward, recomputation) and the optimizer
    update of the GPU's shard, from the unsharded train-phase roofline `r` (layout `c`); the
    routed experts' work is the busiest expert-parallel rank's (c["expert_imbalance"])."""
    tp, pp, L = c["tp"], c["pp"], spec.layers
    ops = _imbalanced(r.ops, c.get("expert_imbalance", 1.0))
    fwd = [op for op in ops if op.pass_ == "fwd" and op.kind != "optimizer"]
    bwd = [op for op in ops if op.pass_ == "bwd"]
    opt = [op for op in ops if op.kind == "optimizer"]
    blocks_fwd = [op for op in fwd if 0 <= op.layer < L]
    if c["full_recompute"]:
        t_rc = _stage_s(blocks_fwd, tp, pp, L)
    elif c["selective"]:  # Korthikanti et al. 2022: only the attention core runs again
        t_rc = _stage_s([op for op in blocks_fwd if op.kind == "attention"], tp, pp, L)
    else:
        t_rc = 0.0
    params_dense = params - params_expert
    sharded = 1 if c["zero"] >= 1 else 0
    updated = (params_dense / (tp * pp) / (c["dp"] if sharded else 1)
               + params_expert / (tp * pp * c["ep"]) / (c["dp"] // c["ep"] if sharded else 1))
    t_opt = (sum(op.time_s - op.overhead_s for op in opt) * updated / params
             + sum(op.overhead_s for op in opt)) if params else 0.0
    return {"fwd_ops": fwd, "t_fwd": _stage_s(fwd, tp, pp, L), "t_bwd": _stage_s(bwd, tp, pp, L),
            "t_rc": t_rc, "t_opt": t_opt}


def _model_parallel_comm(spec, links, t: dict, c: dict) -> dict:
    """Tensor-parallel all-reduces, expert-parallel all-to-alls and pipeline sends of one
    micro-batch on the slowest stage, and the stage's time with them."""
    tp, pp, ep, dp, mb = c["tp"], c["pp"], c["ep"], c["dp"], c["micro_batch"]
    act_bytes = mb * c["seq"] * spec.d_model * spec.dtype_bytes
    passes = 2 + 2 + (2 if c["full_recompute"] else 0)  # forward, backward, recomputation
    tp_one = links.collective_s("all_reduce", act_bytes, tp, tp)
    tp_count = passes * math.ceil(spec.layers / pp) if tp > 1 else 0
    dispatch = [op for op in t["fwd_ops"] if op.kind == "gather" and op.name.endswith(".moe.dispatch")]
    routed_total = _routed_bytes(spec, mb, c["seq"])  # all MoE layers, one micro-batch, whole batch
    # the busiest expert-parallel rank receives expert_imbalance x the mean rank's rows
    routed_layer_gpu = (routed_total / len(dispatch) / tp * c.get("expert_imbalance", 1.0)) if dispatch else 0.0
    a2a_one = links.collective_s("all_to_all", routed_layer_gpu, ep, tp * ep)
    ep_count = int(round(passes * len(dispatch) / pp)) if ep > 1 else 0
    p2p_bytes = act_bytes / tp
    p2p_one = links.collective_s("send_recv", p2p_bytes, 2, tp * dp * pp) if pp > 1 else 0.0
    compute_mb = t["t_fwd"] + t["t_bwd"] + t["t_rc"]
    tp_mb = tp_count * tp_one
    tp_exposed_mb = max(0.0, tp_mb - float(c["tp_overlap"]) * compute_mb)  # hidden behind the GEMMs it feeds
    return {"act_bytes": act_bytes, "tp_one": tp_one, "tp_count": tp_count, "tp_mb": tp_mb,
            "tp_exposed_mb": tp_exposed_mb, "routed_layer_gpu": routed_layer_gpu, "a2a_one": a2a_one,
            "ep_count": ep_count, "ep_mb": ep_count * a2a_one, "p2p_bytes": p2p_bytes, "p2p_one": p2p_one,
            "p2p_mb": 2 * p2p_one, "compute_mb": compute_mb,
            "stage_s": compute_mb + tp_exposed_mb + ep_count * a2a_one + 2 * p2p_one}


def _data_parallel_comm(links, bpp: dict, params_dense, params_expert, t: dict, c: dict) -> tuple:
    """(bytes per step, raw seconds per step, seconds exposed past the overlap) of the
    data-parallel traffic of ZeRO stage c["zero"] (flopsim.collectives)."""
    tp, pp, ep, dp, m = c["tp"], c["pp"], c["ep"], c["dp"], c["microbatches"]
    edp = dp // ep
    W_d = params_dense / (tp * pp) * bpp["weights"]
    W_e = params_expert / (tp * pp * ep) * bpp["weights"]
    G_d = params_dense / (tp * pp) * bpp["gradients"]
    G_e = params_expert / (tp * pp * ep) * bpp["gradients"]

    def both(op, dense_bytes, expert_bytes):
        return (links.collective_s(op, dense_bytes, dp, tp * dp)
                + links.collective_s(op, expert_bytes, edp, tp * dp))

    def exposed(traffic, window):
        return max(0.0, traffic - float(c["dp_overlap"]) * window)

    ar_g, rs_g, ag_w = both("all_reduce", G_d, G_e), both("reduce_scatter", G_d, G_e), both("all_gather", W_d, W_e)
    grads, weights = _frac(G_d, dp) + _frac(G_e, edp), _frac(W_d, dp) + _frac(W_e, edp)
    back = t["t_bwd"] + t["t_rc"]
    if c["zero"] == 0:
        return 2 * grads, ar_g, exposed(ar_g, back)
    if c["zero"] == 1:
        return grads + weights, rs_g + ag_w, exposed(rs_g, back) + exposed(ag_w, t["t_fwd"])
    if c["zero"] == 2:
        return m * grads + weights, m * rs_g + ag_w, m * exposed(rs_g, back) + exposed(ag_w, t["t_fwd"])
    gathers_bwd = 2 if c["full_recompute"] else 1
    return (m * ((1 + gathers_bwd) * weights + grads), m * ((1 + gathers_bwd) * ag_w + rs_g),
            m * (exposed(ag_w, t["t_fwd"]) + exposed(gathers_bwd * ag_w + rs_g, back)))


def _train_memory_verdict(spec, hw, mem, params, params_expert, c: dict, links, optimizer) -> tuple:
    """(memory dict, fits, message, suggestions) for the layout `c`."""
    tp, pp, ep, dp = c["tp"], c["pp"], c["ep"], c["dp"]
    params_dense, bpp = params - params_expert, mem.bytes_per_param
    mem_gpu = _train_memory(params_dense, params_expert, bpp, mem.activations_bytes, tp=tp, pp=pp, dp=dp, ep=ep,
                            zero=c["zero"], microbatches=c["microbatches"])
    capacity = hw.memory_capacity_bytes
    fits = mem_gpu["total_bytes"] <= capacity
    mem_out = {**mem_gpu, "capacity_bytes": capacity, "fits": fits,
               "params": params, "expert_params": params_expert,
               "params_per_gpu": params_dense / (tp * pp) + params_expert / (tp * pp * ep),
               "bytes_per_param": dict(bpp), "activations_one_microbatch_bytes": mem.activations_bytes,
               "microbatches_in_flight": min(pp, c["microbatches"])}
    desc = (f"weights {_gb(mem_gpu['weights_bytes'])}, gradients {_gb(mem_gpu['gradients_bytes'])}, "
            f"optimizer {_gb(mem_gpu['optimizer_bytes'])}, activations {_gb(mem_gpu['activations_bytes'])}")
    if fits:
        return mem_out, fits, f"fits: needs {_gb(mem_gpu['total_bytes'])} per GPU of {_gb(capacity)} ({desc})", []
    message = f"does not fit: needs {_gb(mem_gpu['total_bytes'])} per GPU, device has {_gb(capacity)} ({desc})"
    suggestions = _train_suggestions(
        spec, mem, params_dense, params_expert, bpp, capacity, gpus=c["gpus"], tp=tp, pp=pp, dp=dp, ep=ep,
        zero=c["zero"], micro_batch=c["micro_batch"], seq=c["seq"], recompute=c["full_recompute"],
        optimizer=optimizer, global_batch=c["global_batch"], gpus_per_node=links.gpus_per_node)
    if suggestions:
        message += "; try " + "; ".join(suggestions)
    else:
        message += "; no single change of recompute, ZeRO, micro-batch, tp or pp fits: add GPUs"
    return mem_out, fits, message, suggestions


def _train_totals(r, spec, hw, c: dict, tokens: float, step_s: float, price) -> dict:
    """Steps, time, GPU-hours, cost, throughput and MFU of the run."""
    tokens_per_step = c["global_batch"] * c["seq"]
    steps = math.ceil(tokens / tokens_per_step)
    train_s = steps * step_s
    gpu_hours = c["gpus"] * train_s / 3600
    flops_step = r.flops * (c["global_batch"] // c["micro_batch"])
    peak = hw.peak_flops_per_s_for(spec.compute_dtype)[0]
    return {
        "tokens": tokens, "tokens_per_step": tokens_per_step, "tokens_trained": steps * tokens_per_step,
        "steps": steps, "step_time_s": step_s, "train_time_s": train_s, "days": train_s / 86400,
        "gpu_hours": gpu_hours, "price_per_gpu_hour": price,
        "cost": None if price is None else gpu_hours * price,
        "tokens_per_s": tokens_per_step / step_s, "tokens_per_s_per_gpu": tokens_per_step / step_s / c["gpus"],
        "model_flops_per_step": flops_step, "model_flops_total": flops_step * steps,
        "mfu": flops_step / (step_s * c["gpus"] * peak), "peak_flops_per_s": peak,
    }


def _train_communication(links, mp: dict, dp_comm: tuple, c: dict) -> dict:
    """The communication section of a training plan."""
    tp, pp, ep, dp, m = c["tp"], c["pp"], c["ep"], c["dp"], c["microbatches"]
    dp_bytes, dp_raw, dp_exposed = dp_comm
    return {
        "tp_allreduce_bytes": mp["act_bytes"] if tp > 1 else 0, "tp_allreduces_per_microbatch": mp["tp_count"],
        "tp_allreduce_s": mp["tp_one"], "tp_s_per_microbatch": mp["tp_mb"], "tp_s_per_step": m * mp["tp_mb"],
        "tp_exposed_s_per_microbatch": mp["tp_exposed_mb"], "tp_overlap": float(c["tp_overlap"]),
        "tp_link": links.where(tp, tp),
        "ep_routed_bytes_per_layer": mp["routed_layer_gpu"] if ep > 1 else 0,
        "ep_all_to_alls_per_microbatch": mp["ep_count"], "ep_all_to_all_s": mp["a2a_one"] if ep > 1 else 0.0,
        "ep_s_per_microbatch": mp["ep_mb"], "ep_s_per_step": m * mp["ep_mb"], "ep_link": links.where(tp * ep, ep),
        "pp_p2p_bytes": mp["p2p_bytes"] if pp > 1 else 0, "pp_p2p_s": mp["p2p_one"],
        "pp_s_per_microbatch": mp["p2p_mb"], "pp_s_per_step": m * mp["p2p_mb"], "pp_link": links.where(tp * dp * pp, pp),
        "dp_zero_stage": c["zero"], "dp_bytes_per_step": dp_bytes, "dp_s_per_step": dp_raw,
        "dp_exposed_s_per_step": dp_exposed, "dp_hidden_s_per_step": dp_raw - dp_exposed,
        "dp_overlap": float(c["dp_overlap"]), "dp_link": links.where(tp * dp, dp),
    }


def _train_notes(spec, c: dict, tokens: float) -> list:
    tokens_per_step = c["global_batch"] * c["seq"]
    steps = math.ceil(tokens / tokens_per_step)
    notes = []
    if steps * tokens_per_step != tokens:
        notes.append(f"{steps:,} steps of {tokens_per_step:,} tokens train {steps * tokens_per_step:,.0f} tokens "
                     f"(the last step is full)")
    if c["seq"] > spec.max_seq:
        notes.append(f"seq {c['seq']} exceeds max_seq {spec.max_seq} of {spec.name} "
                     f"({spec.positions} positions: costed as is)")
    if c["pp"] > 1 and c["microbatches"] < c["pp"]:
        notes.append(f"{c['microbatches']} micro-batches per step for {c['pp']} pipeline stages: the bubble is "
                     f"{bubble_fraction(c['pp'], c['microbatches']):.0%} of the ideal time")
    if c.get("expert_imbalance", 1.0) > 1.0:
        notes.append(f"routing {c['routing']}: the busiest of {c['ep']} expert-parallel ranks gets "
                     f"{c['expert_imbalance']:.3f}x the mean rank's (token, expert) pairs; its experts' work and "
                     f"all-to-all set the step")
    if c.get("dropped_fraction", 0.0) > 0.0:
        notes.append(f"routing {c['routing']}: {100 * c['dropped_fraction']:.2f}% of the (token, expert) pairs "
                     f"overflow the capacity factor {spec.moe.capacity_factor:g} and are dropped")
    return notes


def _single_stack(spec) -> None:
    """Plans cost one stack of blocks: refuse an encoder-decoder in one line."""
    if spec.is_encoder_decoder:
        raise InputError(f"{spec.name}: plan does not lay out encoder-decoders yet (the two stacks' token "
                         f"counts, the cross-attention's all-reduces and cache); count, predict, memory and "
                         f"sweep model them")


def plan_training(spec, hw, *, gpus: int, tokens: float, seq: Optional[int] = None,
                  global_batch: Optional[int] = None, global_batch_tokens: Optional[float] = None,
                  tp: int = 1, pp: int = 1, dp: Optional[int] = None, ep: int = 1, micro_batch: int = 1,
                  recompute: bool | str = False, optimizer: str = "adam", zero: int = 1,
                  interconnect_bytes_per_s: Optional[float] = None, inter_node_bytes_per_s: Optional[float] = None,
                  gpus_per_node: Optional[int] = None, dp_overlap: float = 1.0, tp_overlap: float = 0.0,
                  comm_latency_s: Optional[float] = None, price_per_gpu_hour: Optional[float] = None,
                  calibration=None, progress: bool = False) -> TrainingPlan:
    """Plan a training run of `tokens` tokens on `gpus` x `hw` (see the module docstring).

    global batch: `global_batch` sequences or `global_batch_tokens` tokens (a
    multiple of seq); default the smallest multiple of dp * micro_batch
    sequences holding at least DEFAULT_GLOBAL_BATCH_TOKENS tokens."""
    from flopsim.calibration import load_calibration
    from flopsim.count import token_values
    from flopsim.hardware import load_hardware
    from flopsim.memory import memory
    from flopsim.ops.optimizer import get_optimizer
    from flopsim.predict import predict
    from flopsim.spec import load_model

    spec, hw = load_model(spec), load_hardware(hw)
    _single_stack(spec)
    cal = load_calibration(calibration, hw)
    gpus = _positive_int("gpus", gpus)
    tp, pp, ep, micro_batch = (_positive_int(n, v) for n, v in
                               (("tp", tp), ("pp", pp), ("ep", ep), ("micro_batch", micro_batch)))
    tokens = _positive("tokens", tokens)
    price = _non_negative("price", price_per_gpu_hour)
    get_optimizer(optimizer)
    dp = _train_layout(spec, gpus, tp, pp, dp, ep, zero, dp_overlap, tp_overlap)
    full_recompute, selective = _recompute_mode(recompute)
    seq = min(DEFAULT_SEQ, spec.max_seq) if seq is None else _positive_int("seq", seq)
    token_values(spec, "train", micro_batch, seq)  # seq within max_seq, phase supported
    global_batch = _global_batch(seq, dp, micro_batch, global_batch, global_batch_tokens)
    c = dict(gpus=gpus, dp=dp, tp=tp, pp=pp, ep=ep, seq=seq, micro_batch=micro_batch, global_batch=global_batch,
             microbatches=global_batch // (dp * micro_batch), zero=zero, full_recompute=full_recompute,
             selective=selective, dp_overlap=dp_overlap, tp_overlap=tp_overlap)
    links = resolve_links(hw, cal, interconnect_bytes_per_s, inter_node_bytes_per_s, gpus_per_node, comm_latency_s,
                   needed=gpus > 1)

    bar = _Progress(progress, f"predicting {spec.name} train step", total=3)
    try:
        r = predict(spec, hw, phase="train", batch=micro_batch, seq=seq, calibration=cal, optimizer=optimizer)
        bar.advance("memory")
        mem = memory(spec, phase="train", batch=micro_batch, seq=seq, recompute=full_recompute, optimizer=optimizer)
        bar.advance("parameters")
        params, params_expert = _param_split(spec)
        bar.advance()
    finally:
        bar.close()

    routing = routing_figures(spec, c)
    c.update(routing)
    t = _train_compute(r, spec, c, params, params_expert)
    mp = _model_parallel_comm(spec, links, t, c)
    pipeline_s = (c["microbatches"] + pp - 1) * mp["stage_s"]
    dp_comm = _data_parallel_comm(links, mem.bytes_per_param, params - params_expert, params_expert, t, c)
    step_s = pipeline_s + dp_comm[2] + t["t_opt"]
    mem_out, fits, message, suggestions = _train_memory_verdict(spec, hw, mem, params, params_expert, c, links,
                                                                optimizer)
    compute = {
        "forward_s_per_microbatch": t["t_fwd"], "backward_s_per_microbatch": t["t_bwd"],
        "recompute_s_per_microbatch": t["t_rc"], "compute_s_per_microbatch": mp["compute_mb"],
        "compute_s_per_step": c["microbatches"] * mp["compute_mb"], "optimizer_s": t["t_opt"],
        "stage_s_per_microbatch": mp["stage_s"], "pipeline_s": pipeline_s, "bubble_s": (pp - 1) * mp["stage_s"],
        "bubble_fraction": bubble_fraction(pp, c["microbatches"]),
        "unsharded_microbatch_s": r.time_s, "unsharded_microbatch_flops": r.flops,
    }
    config = {
        "gpus": gpus, "dp": dp, "tp": tp, "pp": pp, "ep": ep, "expert_dp": dp // ep, "seq": seq,
        "micro_batch": micro_batch, "global_batch": global_batch, "microbatches": c["microbatches"],
        "recompute": "selective" if selective else full_recompute, "optimizer": optimizer, "zero": zero,
        **routing,
    }
    return TrainingPlan(spec=spec, hw=hw, calibration=cal, config=config, links=links, compute=compute,
                        communication=_train_communication(links, mp, dp_comm, c), memory=mem_out,
                        totals=_train_totals(r, spec, hw, c, tokens, step_s, price), fits=fits, message=message,
                        suggestions=suggestions, notes=_train_notes(spec, c, tokens))


def _frac(nbytes: float, n: int) -> float:
    """Bytes a rank sends in a reduce-scatter or all-gather of nbytes over n ranks."""
    return (n - 1) / n * nbytes if n > 1 else 0.0


def _routed_bytes(spec, batch: int, seq: int) -> float:
    """Bytes the MoE layers' dispatch ops write forward in one micro-batch (all layers)."""
    from flopsim.count import evaluate_ops, token_values
    from flopsim.families import build_ops

    ops = [op for op in build_ops(spec, "forward")
           if op.pass_ == "fwd" and op.kind == "gather" and op.name.endswith(".moe.dispatch")]
    if not ops:
        return 0.0
    values = token_values(spec, "forward", batch, seq)
    return float(sum(op.act_write_bytes for op in evaluate_ops(ops, values)))


def _train_suggestions(spec, mem, params_dense, params_expert, bpp, capacity, *, gpus, tp, pp, dp, ep, zero,
                       micro_batch, seq, recompute, optimizer, global_batch, gpus_per_node) -> list[str]:
    """Single changes to the layout that fit, each with its per-GPU need."""
    from flopsim.memory import memory

    acts: dict = {}

    def act(mb, rc):
        if (mb, rc) not in acts:
            acts[(mb, rc)] = (mem.activations_bytes if (mb, rc) == (micro_batch, recompute) else
                              memory(spec, phase="train", batch=mb, seq=seq, recompute=rc,
                                     optimizer=optimizer).activations_bytes)
        return acts[(mb, rc)]

    def need(*, tp=tp, pp=pp, dp=dp, zero=zero, mb=micro_batch, rc=recompute):
        per_step = dp * mb
        if global_batch % per_step:
            return None
        return _train_memory(params_dense, params_expert, bpp, act(mb, rc), tp=tp, pp=pp, dp=dp, ep=ep, zero=zero,
                             microbatches=global_batch // per_step)["total_bytes"]

    options = []
    if not recompute:
        options.append(("--recompute", dict(rc=True)))
    for z in range(zero + 1, 4):
        options.append((f"--zero {z}", dict(zero=z)))
    if micro_batch > 1:
        options.append(("--micro-batch 1", dict(mb=1)))
    t2 = tp * 2
    while t2 <= gpus_per_node and spec.heads % t2 == 0 and gpus % (t2 * pp) == 0 and (gpus // (t2 * pp)) % ep == 0:
        options.append((f"--tp {t2}", dict(tp=t2, dp=gpus // (t2 * pp))))
        break
    p2 = pp * 2
    while p2 <= spec.layers:
        if spec.layers % p2 == 0 and gpus % (tp * p2) == 0 and (gpus // (tp * p2)) % ep == 0:
            options.append((f"--pp {p2}", dict(pp=p2, dp=gpus // (tp * p2))))
            break
        p2 *= 2
    out = []
    for label, change in options:
        total = need(**change)
        if total is not None and total <= capacity:
            out.append(f"{label} ({_gb(total)})")
    if not out and options:
        combined = {}
        labels = []
        for label, change in options:
            trial = {**combined, **change}
            total = need(**trial)
            if total is None:
                continue
            combined, labels = trial, labels + [label]
            if total <= capacity:
                out.append(f"{' '.join(labels)} together ({_gb(total)})")
                break
    return out
