"""Training plans (`plan_training`): GPUs, days, GPU-hours and cost of a run.

Training (`plan_training`), dp * tp * pp = GPUs, the global batch split into
`microbatches` = global sequences / (dp * micro_batch) per replica. A
sequence trains `seq` tokens; an encoder-decoder's `encoder_seq` (default
seq) encoder input tokens + `seq` decoder target tokens, which the tokens to
train on, the global batch in tokens and the throughput count (T5 and
Switch presets: `count` and `predict` take the same encoder_seq).

- Each GPU's work and communication are its pipeline stage's sharded op list
  (flopsim.parallel.shard: Megatron's splits with sequence parallelism, the
  tensor-, expert- and pipeline-parallel collectives and each layer's ZeRO
  collectives as ops, their messages read from the ops they serve; the
  recomputation `none`, `selective` (Korthikanti et al. 2022: the attention
  cores), `cheap` (LLaMA's: the norms and elementwise ops) or `full` as
  copies of the forward ops), costed by the roofline on the
  calibration's link levels; flopsim.planning.layer_costs sums it by layer,
  flopsim.planning.train_step turns the stages into a step. This module adds
  no communication formula. An encoder-decoder's stages are Megatron-LM's T5
  split (flopsim.parallel.layout: `encoder_stages` stages of encoder blocks,
  then the decoder's; plain 1F1B only, `virtual_stages` > 1 refused): its
  decoder stages also pass the encoder's output on (flopsim.parallel.shard).
- Expert parallelism: the step waits for the busiest expert-parallel rank.
  With dropless token choice its experts' work and all-to-all messages are
  `expert_imbalance` = E[max over ranks of its routed pairs] / the mean
  rank's, for the ep micro-batches an EP group routes at once, from the spec's
  `moe.popularity` (flopsim.ops.popularity; uniform routing too has a small
  statistical imbalance). Padded slots and expert choice do the same work on
  every rank; with a capacity factor `dropped_fraction` is reported instead.
  An encoder-decoder routes B x encoder_seq tokens a micro-batch in its
  encoder and B x seq in its decoder: the plan applies the larger imbalance
  (the stack with fewer tokens) to both (a note says so when they differ)
  and reports the dropped share of both stacks' pairs.
- The schedule (train_step): tensor-parallel traffic hidden behind up to
  `tp_overlap` of the micro-batch's compute (default 0; Megatron-Core's
  --tp-comm-overlap: 1.0); 1F1B, (microbatches + (pp - 1) / v) slots of the
  slowest stage's time (v = `virtual_stages`, the interleaved schedule's
  chunks a stage); data-parallel traffic hidden behind up to `dp_overlap`
  (default 1.0) of the pass it follows or precedes; the optimizer update of
  the stage's parameters (/ dp under ZeRO >= 1).
- Gradient accumulation (`grad_accumulation`, flopsim.ops.grad_accum): none
  (fused into the weight-gradient GEMM), `autograd` (default: `.grad +=` on
  micro-batches 2..m) or `main_grad` (Megatron's add into its reduction buffer
  every micro-batch), an elementwise op over the stage's parameters, x the
  micro-batches that pay it; the data-parallel gradient collectives' message in
  `grad_reduce_dtype` (default the gradients' own dtype; fp32 for
  Megatron-Core bf16 and FSDP's mixed precision with an fp32 reduce dtype).
- step time = pipeline time + exposed DP traffic + optimizer update + gradient
  accumulation;
  steps = ceil(tokens / tokens per step); days = steps * step time / 86400;
  GPU-hours = GPUs * steps * step time / 3600; cost = GPU-hours * price;
  MFU = model FLOPs per step (FlopCounterMode's count of the train step,
  recomputation excluded) / (step time * GPUs * dtype peak).
- Memory per GPU: weights P*w, gradients P*g and optimizer state P*s per
  parameter (flopsim.memory's bytes per parameter; Adam in bf16 2 + 2 + 12),
  P = dense parameters / (tp * pp) + expert parameters / (tp * pp * ep);
  ZeRO shards the optimizer state (stage >= 1), the gradients (>= 2) and the
  weights (3) over the data-parallel group. Activations: flopsim.memory's
  train activations of one micro-batch (none, selective, cheap or full recomputation) / tp
  (sequence parallel) x the first stage's share in flight,
  train_step.in_flight_chunks / (pp v) (its blocks spread evenly): min(pp,
  microbatches) / pp under 1F1B (pp micro-batches of 1/pp of the blocks);
  interleaved, min(v pp + pp - 1, v m) / (v pp), 1 + (pp - 1) / (pp v) once
  the micro-batches fill the warm-up (Korthikanti et al. 2022, arXiv
  2205.05198; Megatron-LM's theoretical_memory_usage.py). A pipelined
  encoder-decoder's stages differ: each stage's own activations of one
  micro-batch (flopsim.memory.MemoryModel.stage_activations: its blocks, its
  embeddings or head, a decoder stage's received encoder output) x its
  min(pp - r, microbatches) in flight, the largest over stages r.
  Not counted: framework and allocator overhead, communication
  buffers, ZeRO-3's gathered-parameter buffers, fp32 gradient-accumulation
  buffers, a stage's received input activations (but an encoder-decoder's
  encoder output).

"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from flopsim.errors import InputError, bad_value
from flopsim.memory import recompute_mode as checked_recompute_mode
from flopsim.planning.common import (DEFAULT_GLOBAL_BATCH_TOKENS, DEFAULT_SEQ, _gb, _long_table,
                                     _non_negative, _positive, _positive_int, _Progress)
from flopsim.planning.links import Links, resolve_links


def interleaving_runs(pp: int, microbatches: int, virtual_stages: int) -> bool:
    """Megatron-LM runs the interleaved schedule only with at least pp micro-batches
    (megatron/core/pipeline_parallel/schedules.py: microbatch_group_size_per_vp_stage,
    default pp, within [pp, M]; before 2023 M had to be a multiple of pp)."""
    return virtual_stages == 1 or microbatches >= pp


def bubble_fraction(pp: int, microbatches: int, virtual_stages: int = 1) -> float:
    """1F1B pipeline bubble over the ideal time: (pp - 1) / microbatches (/ v interleaved)."""
    return (pp - 1) / (virtual_stages * microbatches)



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
            "dtype": self.spec.dtype, "precision": self.spec.precision_label,
            "kernel_impls": self.spec.kernel_impls, "calibration": self.calibration.source,
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
                      "the slowest stage's sharded op list"),
                 part("backward", k["backward_s_per_microbatch"], mb * k["backward_s_per_microbatch"])]
        if c["recompute"]:
            what = {True: "blocks' forward", "selective": "attention cores' forward",
                    "cheap": "norms' and elementwise ops' forward"}[c["recompute"]]
            parts.append(part("recompute", k["recompute_s_per_microbatch"], mb * k["recompute_s_per_microbatch"],
                              f"{what} again"))
        for group, label in (("tp", "TP collectives"), ("ep", "MoE all-to-all"), ("pp", "PP send/recv")):
            if c[group] > 1:
                parts.append(part(label, cm[f"{group}_s_per_microbatch"], cm[f"{group}_s_per_step"],
                                  f"{cm[f'{group}_collectives_per_microbatch']} x "
                                  f"{human(cm[f'{group}_bytes_per_collective'], 'B')} ({cm[f'{group}_link']})"))
        if c["pp"] > 1:
            parts.append(part("pipeline bubble", None, k["bubble_s"],
                              f"(pp-1)/(v*microbatches) = {k['bubble_fraction']:.3g} of the ideal"))
        if c["dp"] > 1:
            parts.append(part(f"DP (ZeRO-{c['zero']}) exposed", None, cm["dp_exposed_s_per_step"],
                              f"{human(cm['dp_bytes_per_step'], 'B')} sent, {human_time(cm['dp_s_per_step'])} of "
                              f"which {human_time(cm['dp_hidden_s_per_step'])} hidden ({cm['dp_link']})"))
            if cm.get("dp_contention_s_per_step"):
                parts.append(part("DP contention", None, cm["dp_contention_s_per_step"],
                                  f"the hidden traffic's kernels hold {self.calibration.collective_sm_share:.3g} "
                                  f"of the SMs: the passes it overlaps run on the rest"))
        if k.get("grad_accumulation_s_per_step"):
            form = c["grad_accumulation"]
            paying = "microbatches - 1" if form == "autograd" else "microbatches"
            parts.append(part("gradient accumulation", k["grad_accumulation_s_per_microbatch"],
                              k["grad_accumulation_s_per_step"], f"{form} add over this GPU's parameters x {paying}"))
        parts.append(part("optimizer update", None, k["optimizer_s"], "this GPU's share of the parameters"))
        return parts

    def memory_parts(self) -> list[dict]:
        """Memory per GPU by component: {component, bytes, how} (the total last)."""
        from flopsim.units import human

        c, m = self.config, self.memory
        per = m["bytes_per_param"]
        over = " / dp" if c.get("zero_shard", c["dp"]) >= c["dp"] else f" / {c['zero_shard']} (ZeRO's shard group)"
        return [{"component": name, "bytes": m[f"{key}_bytes"], "how": how} for name, key, how in (
            ("weights", "weights", f"{human(m['params_per_gpu'])} params x {per['weights']} B"
             + (over if c["zero"] >= 3 else "")),
            ("gradients", "gradients", f"x {per['gradients']} B" + (over if c["zero"] >= 2 else "")),
            ("optimizer state", "optimizer", f"x {per['optimizer']} B" + (over if c["zero"] >= 1 else "")),
            ("activations", "activations", _activations_how(c, m)),
            ("total", "total", f"device {human(m['capacity_bytes'], 'B')}"),
        )]





def _activations_how(c: dict, m: dict) -> str:
    from flopsim.units import human

    one = f"{human(m['activations_one_microbatch_bytes'], 'B')} per micro-batch / tp"
    if c["pp"] == 1:
        return one
    if "activation_stage" in m:  # an encoder-decoder's stages, each its own
        return f"stage {m['activation_stage']}'s {one} x {m['microbatches_in_flight']:g} in flight"
    v = c.get("virtual_stages", 1)
    if v == 1:
        return f"{one} x {m['microbatches_in_flight']:g}/pp in flight"
    return f"{one} x {m['microbatches_in_flight'] * v:g} chunks/(pp x {v}) in flight (interleaved)"


def activations_in_flight(act, *, tp: int, pp: int, microbatches: int, virtual_stages: int = 1) -> dict:
    """The activations a GPU holds (see the module docstring): `act` one micro-batch's of the
    whole model (a number: the blocks spread evenly over the stages, the first holding the
    most) or of each stage (a list: a pipelined encoder-decoder, the largest stage's).
    {activations_bytes, microbatches_in_flight, activations_one_microbatch_bytes[, activation_stage]}."""
    from flopsim.planning.train_step import in_flight_chunks

    if not isinstance(act, (list, tuple)):
        chunks = in_flight_chunks(pp, microbatches, virtual_stages)
        return {"activations_bytes": act * chunks / (pp * virtual_stages) / tp,
                "microbatches_in_flight": chunks / virtual_stages, "activations_one_microbatch_bytes": act}
    held = [a * in_flight_chunks(pp, microbatches, 1, r) for r, a in enumerate(act)]
    r = max(range(len(held)), key=held.__getitem__)
    return {"activations_bytes": held[r] / tp, "microbatches_in_flight": in_flight_chunks(pp, microbatches, 1, r),
            "activations_one_microbatch_bytes": act[r], "activation_stage": r}


def stage_activations(spec, memory_model, micro_batch: int, seq: int, pp: int, encoder_stages) -> list:
    """One micro-batch's activations of each of a pipelined encoder-decoder's stages
    (flopsim.memory.MemoryModel.stage_activations of flopsim.parallel.layout.stage_places)."""
    from flopsim.parallel.layout import stage_places

    stages = [stage_places(spec, pp, r, 1, encoder_stages) for r in range(pp)]
    return memory_model.stage_activations(micro_batch, seq, seq, stages)


def _train_memory(params_dense, params_expert, bpp, act, *, tp, pp, dp, ep, zero, microbatches,
                  virtual_stages: int = 1, zero_shard: Optional[int] = None):
    """Bytes per GPU by component (see the module docstring; `act` as activations_in_flight's);
    ZeRO shards the dense parameters' state over `zero_shard` ranks (hybrid) or all dp."""
    edp, shard = dp // ep, zero_shard or dp

    def per_gpu(per_param: float, sharded: bool) -> float:
        dense = params_dense * per_param / (tp * pp) / (shard if sharded else 1)
        expert = params_expert * per_param / (tp * pp * ep) / (edp if sharded else 1)
        return dense + expert

    out = {
        "weights_bytes": per_gpu(bpp["weights"], zero >= 3),
        "gradients_bytes": per_gpu(bpp["gradients"], zero >= 2),
        "optimizer_bytes": per_gpu(bpp["optimizer"], zero >= 1),
        "activations_bytes": activations_in_flight(act, tp=tp, pp=pp, microbatches=microbatches,
                                                   virtual_stages=virtual_stages)["activations_bytes"],
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
    if pp > spec.blocks:
        raise InputError(f"pp {pp} exceeds the {spec.blocks} blocks of {spec.name}")
    if ep > 1:
        if spec.moe is None:
            raise InputError(f"ep {ep}: {spec.name} ({spec.family}) has no experts; expert parallelism needs an MoE")
        if spec.moe.experts % ep:
            raise InputError(f"ep {ep} does not divide the {spec.moe.experts} experts of {spec.name}")
        if dp % ep:
            raise InputError(f"ep {ep} does not divide dp {dp} (experts are sharded within the data-parallel group)")
    return dp


def check_engine(grad_accumulation: str, grad_reduce_dtype: Optional[str]) -> None:
    """One-line errors for the gradient accumulation form and the reduction's dtype."""
    from flopsim.ops.grad_accum import check_form, reduce_bytes

    check_form(grad_accumulation)
    reduce_bytes(grad_reduce_dtype, 2)


def recompute_name(config_value) -> str:
    """A plan config's `recompute` (False, True, 'selective' or 'cheap') as its mode's name."""
    return config_value if isinstance(config_value, str) else ("full" if config_value else "none")


def _global_batch(seq: int, dp: int, micro_batch: int, global_batch, global_batch_tokens) -> int:
    """The global batch in sequences: given in sequences or tokens, else the smallest multiple of
    dp * micro_batch holding DEFAULT_GLOBAL_BATCH_TOKENS tokens (`seq`: a sequence's tokens,
    an encoder-decoder's encoder_seq + seq)."""
    per_step = dp * micro_batch
    if global_batch is not None and global_batch_tokens is not None:
        raise InputError("give the global batch in sequences or in tokens, not both")
    if global_batch_tokens is not None:
        gbt = _positive("global_batch_tokens", global_batch_tokens)
        if gbt % seq:
            raise bad_value("global_batch_tokens", global_batch_tokens, f"is not a multiple of a sequence's {seq} "
                                                                        f"tokens")
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
    # [(tokens a micro-batch routes, MoE layers)] of each stack with experts
    stacks = [(n, layers) for n, layers in _routed_stacks(spec, c) if layers]
    out = {"routing": popularity.describe(moe.popularity), "expert_imbalance": 1.0, "dropped_fraction": 0.0}
    dropless = moe.capacity_factor is None and moe.routing == "token_choice"
    if dropless and c["ep"] > 1:  # the EP group routes ep micro-batches' tokens over its ranks
        out["expert_imbalance"] = max(popularity.imbalance(pi, c["ep"] * n, c["ep"]) for n, _ in stacks)
    if moe.capacity_factor is not None and moe.routing == "token_choice":
        dropped = sum(layers * popularity.expected_dropped(pi, n, math.ceil(moe.capacity_factor * moe.top_k * n
                                                                            / moe.experts)) for n, layers in stacks)
        out["dropped_fraction"] = dropped / sum(layers * n * moe.top_k for n, layers in stacks)
    return out


def _routed_stacks(spec, c: dict) -> list:
    """[(tokens one micro-batch routes, MoE layers)] of each stack (an encoder-decoder's encoder
    over B x encoder_seq tokens, its decoder over B x seq; flopsim.families.moe.is_moe_layer)."""
    from flopsim.families.moe import is_moe_layer

    if not spec.is_encoder_decoder:
        return [(c["micro_batch"] * c["seq"], 1)]
    count = lambda n: sum(1 for j in range(n) if is_moe_layer(spec, j))  # noqa: E731
    return [(c["micro_batch"] * c["encoder_seq"], count(spec.encoder_layers)),
            (c["micro_batch"] * c["seq"], count(spec.layers))]


def _train_memory_verdict(spec, hw, act, bpp, params, params_expert, c: dict, links, optimizer) -> tuple:
    """(memory dict, fits, message, suggestions) for the layout `c`; `act` as activations_in_flight's."""
    tp, pp, ep, dp = c["tp"], c["pp"], c["ep"], c["dp"]
    params_dense = params - params_expert
    mem_gpu = _train_memory(params_dense, params_expert, bpp, act, tp=tp, pp=pp, dp=dp, ep=ep, zero=c["zero"],
                            microbatches=c["microbatches"], virtual_stages=c["virtual_stages"],
                            zero_shard=c.get("zero_shard"))
    capacity = hw.memory_capacity_bytes
    fits = mem_gpu["total_bytes"] <= capacity
    flight = activations_in_flight(act, tp=tp, pp=pp, microbatches=c["microbatches"],
                                   virtual_stages=c["virtual_stages"])
    mem_out = {**mem_gpu, "capacity_bytes": capacity, "fits": fits,
               "params": params, "expert_params": params_expert,
               "params_per_gpu": params_dense / (tp * pp) + params_expert / (tp * pp * ep),
               "bytes_per_param": dict(bpp), **{k: v for k, v in flight.items() if k != "activations_bytes"}}
    desc = (f"weights {_gb(mem_gpu['weights_bytes'])}, gradients {_gb(mem_gpu['gradients_bytes'])}, "
            f"optimizer {_gb(mem_gpu['optimizer_bytes'])}, activations {_gb(mem_gpu['activations_bytes'])}")
    if fits:
        return mem_out, fits, f"fits: needs {_gb(mem_gpu['total_bytes'])} per GPU of {_gb(capacity)} ({desc})", []
    message = f"does not fit: needs {_gb(mem_gpu['total_bytes'])} per GPU, device has {_gb(capacity)} ({desc})"
    suggestions = _train_suggestions(spec, act, params_dense, params_expert, bpp, capacity, c, optimizer,
                                     links.gpus_per_node)
    if suggestions:
        message += "; try " + "; ".join(suggestions)
    else:
        message += "; no single change of recompute, ZeRO, micro-batch, tp or pp fits: add GPUs"
    return mem_out, fits, message, suggestions


def _activations(spec, c: dict, mem_model) -> float | list:
    """One micro-batch's activations (flopsim.memory), as activations_in_flight takes them: the
    whole model's, or each stage's of a pipelined encoder-decoder."""
    if spec.is_encoder_decoder and c["pp"] > 1:
        return stage_activations(spec, mem_model, c["micro_batch"], c["seq"], c["pp"], c["encoder_stages"])
    return mem_model.evaluate(c["micro_batch"], c["seq"], c["seq"])["activations_bytes"]


def _train_totals(flops_microbatch, spec, hw, c: dict, tokens: float, step_s: float, price) -> dict:
    """Steps, time, GPU-hours, cost, throughput and MFU of the run."""
    tokens_per_step = c["global_batch"] * c["seq_tokens"]
    steps = math.ceil(tokens / tokens_per_step)
    train_s = steps * step_s
    gpu_hours = c["gpus"] * train_s / 3600
    flops_step = flops_microbatch * (c["global_batch"] // c["micro_batch"])
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


def _stage_list(model, c: dict) -> list:
    """Each stage worth costing (flopsim.planning.train_step.stages_to_cost), from the
    per-layer costs of the sharded op list (flopsim.planning.layer_costs)."""
    from flopsim.parallel.layout import make_layout
    from flopsim.planning.train_step import stages_to_cost

    out = []
    v, e = c.get("virtual_stages", 1), c.get("encoder_stages")
    for stage in stages_to_cost(model.spec, c["pp"], v, e):
        layout = make_layout(model.spec, "train", tp=c["tp"], pp=c["pp"], dp=c["dp"], ep=c["ep"], zero=c["zero"],
                             recompute=c["recompute_mode"], sequence_parallel=c.get("sequence_parallel"),
                             gpus_per_node=model.links.gpus_per_node, torus_axis=model.links.torus_axis,
                             expert_load=c.get("expert_imbalance", 1.0), stage=stage, virtual_stages=v,
                             encoder_stages=e, zero_shard=c.get("zero_shard"),
                             recompute_fraction=c.get("recompute_fraction", 1.0))
        out.append(model.stage_times(layout, c["micro_batch"], c["seq"]))
    return out


def _train_communication(links, sched: dict, c: dict) -> dict:
    """The communication section of a training plan: per group, its collectives per
    micro-batch on the slowest stage, one message and its time, the per-step totals."""
    from flopsim.planning.train_step import tp_exposed_s

    slow, m = sched["slowest"], c["microbatches"]
    spans = {"tp": (c["tp"], c["tp"]), "ep": (c["tp"] * c["ep"], c["ep"]),
             "pp": (c["tp"] * c["dp"] * c["pp"], c["pp"]), "dp": (c["tp"] * c["dp"], c["dp"])}
    out: dict = {}
    for group in ("tp", "ep", "pp"):
        nbytes, one = slow.comm_one.get(group, (0.0, 0.0))
        out.update({f"{group}_collectives_per_microbatch": slow.comm_count[group],
                    f"{group}_bytes_per_collective": nbytes, f"{group}_collective_s": one,
                    f"{group}_s_per_microbatch": slow.comm_s[group], f"{group}_s_per_step": m * slow.comm_s[group],
                    f"{group}_link": links.where(*spans[group])})
    out.update({"tp_exposed_s_per_microbatch": tp_exposed_s(slow, float(c["tp_overlap"])),
                "tp_overlap": float(c["tp_overlap"]), "dp_zero_stage": c["zero"],
                "dp_bytes_per_step": sched["dp_bytes"], "dp_s_per_step": sched["dp_s"],
                "dp_exposed_s_per_step": sched["dp_exposed_s"], "dp_hidden_s_per_step": sched["dp_s"] - sched["dp_exposed_s"],
                "dp_contention_s_per_step": sched["dp_contention_s"],
                "dp_overlap": float(c["dp_overlap"]), "dp_link": _dp_link(links, spans["dp"], c)})
    return out


def _dp_link(links, span: tuple, c: dict) -> str:
    """Where the data-parallel traffic goes: its group's link, or with hybrid sharding the
    shard group's and the replicas' (flopsim.parallel.layout's dp_shard and dp_replica)."""
    shard = c.get("zero_shard")
    if not shard:
        return links.where(*span)
    return (f"ZeRO over {shard}: {links.where(c['tp'] * shard, shard)}; "
            f"{c['dp'] // shard} replicas: {links.where(*span)}")


def _train_notes(spec, c: dict, tokens: float) -> list:
    tokens_per_step = c["global_batch"] * c["seq_tokens"]
    steps = math.ceil(tokens / tokens_per_step)
    notes = []
    if steps * tokens_per_step != tokens:
        notes.append(f"{steps:,} steps of {tokens_per_step:,} tokens train {steps * tokens_per_step:,.0f} tokens "
                     f"(the last step is full)")
    for name in ("seq", "encoder_seq"):
        if (c.get(name) or 0) > spec.max_seq:
            notes.append(f"{name} {c[name]} exceeds max_seq {spec.max_seq} of {spec.name} "
                         f"({spec.positions} positions: costed as is)")
    if c["pp"] > 1 and c["microbatches"] < c["pp"]:
        notes.append(f"{c['microbatches']} micro-batches per step for {c['pp']} pipeline stages: the bubble is "
                     f"{bubble_fraction(c['pp'], c['microbatches'], c['virtual_stages']):.0%} of the ideal time")
    if c.get("expert_imbalance", 1.0) > 1.0:
        notes.append(f"routing {c['routing']}: the busiest of {c['ep']} expert-parallel ranks gets "
                     f"{c['expert_imbalance']:.3f}x the mean rank's (token, expert) pairs; its experts' work and "
                     f"all-to-all set the step")
    if c.get("expert_imbalance", 1.0) > 1.0 and spec.is_encoder_decoder and c["encoder_seq"] != c["seq"]:
        notes.append(f"the imbalance of the stack with fewer tokens a micro-batch (encoder {c['encoder_seq']}, "
                     f"decoder {c['seq']} a sequence) is applied to both stacks' experts")
    if c["tp"] > 1 and c.get("sequence_parallel") is False:
        notes.append("no sequence parallelism: the time runs the token-wise ops (norms, residual adds) whole on "
                     "each tensor-parallel rank, but memory still splits every activation over tp, so it is "
                     "understated by those ops' activations x (1 - 1/tp)")
    if c.get("dropped_fraction", 0.0) > 0.0:
        notes.append(f"routing {c['routing']}: {100 * c['dropped_fraction']:.2f}% of the (token, expert) pairs "
                     f"overflow the capacity factor {spec.moe.capacity_factor:g} and are dropped")
    return notes


def _train_config(spec, *, gpus, tp, pp, dp, ep, micro_batch, zero, dp_overlap, tp_overlap, recompute, optimizer,
                  seq, encoder_seq, encoder_stages, virtual_stages, global_batch, global_batch_tokens) -> dict:
    """The checked layout, schedule and batch of a plan (one-line errors naming the field)."""
    from flopsim.count import token_values
    from flopsim.parallel.layout import checked_encoder_stages

    gpus = _positive_int("gpus", gpus)
    tp, pp, ep, micro_batch = (_positive_int(n, v) for n, v in
                               (("tp", tp), ("pp", pp), ("ep", ep), ("micro_batch", micro_batch)))
    dp = _train_layout(spec, gpus, tp, pp, dp, ep, zero, dp_overlap, tp_overlap)
    virtual_stages = _positive_int("virtual_stages", virtual_stages)
    encoder_stages = checked_encoder_stages(spec, pp, virtual_stages, encoder_stages)
    recompute_mode = checked_recompute_mode(recompute)
    seq = min(DEFAULT_SEQ, spec.max_seq) if seq is None else _positive_int("seq", seq)
    # seq (and encoder_seq) within max_seq, the phase supported
    encoder_seq = _encoder_tokens(token_values(spec, "train", micro_batch, seq, encoder_seq=encoder_seq))
    seq_tokens = seq + (encoder_seq or 0)
    global_batch = _global_batch(seq_tokens, dp, micro_batch, global_batch, global_batch_tokens)
    if not interleaving_runs(pp, global_batch // (dp * micro_batch), virtual_stages):
        raise InputError(f"virtual_stages: {virtual_stages}: the interleaved schedule needs at least pp = {pp} "
                         f"micro-batches per replica, the global batch gives {global_batch // (dp * micro_batch)}")
    return dict(gpus=gpus, dp=dp, tp=tp, pp=pp, ep=ep, seq=seq, encoder_seq=encoder_seq, seq_tokens=seq_tokens,
                micro_batch=micro_batch, global_batch=global_batch, microbatches=global_batch // (dp * micro_batch),
                zero=zero, dp_overlap=dp_overlap,
                tp_overlap=tp_overlap, optimizer=optimizer, virtual_stages=virtual_stages,
                encoder_stages=encoder_stages,
                recompute_mode=recompute_mode)


def _encoder_tokens(values: dict):
    """The encoder tokens per sequence in flopsim.count.token_values' answer (None: one stack)."""
    from flopsim.ops.symbols import S_enc

    return int(values[S_enc]) if S_enc in values else None


def plan_training(spec, hw, *, gpus: int, tokens: float, seq: Optional[int] = None,
                  global_batch: Optional[int] = None, global_batch_tokens: Optional[float] = None,
                  tp: int = 1, pp: int = 1, dp: Optional[int] = None, ep: int = 1, micro_batch: int = 1,
                  recompute: bool | str = False, optimizer: str = "adam", zero: int = 1,
                  interconnect_bytes_per_s: Optional[float] = None, inter_node_bytes_per_s: Optional[float] = None,
                  gpus_per_node: Optional[int] = None, dp_overlap: float = 1.0, tp_overlap: float = 0.0,
                  comm_latency_s: Optional[float] = None, price_per_gpu_hour: Optional[float] = None,
                  calibration=None, progress: bool = False, virtual_stages: int = 1,
                  encoder_seq: Optional[int] = None, encoder_stages: Optional[int] = None,
                  sequence_parallel: Optional[bool] = None, grad_accumulation: str = "autograd",
                  grad_reduce_dtype: Optional[str] = None, zero_shard: Optional[int] = None,
                  recompute_fraction: float = 1.0) -> TrainingPlan:
    """Plan a training run of `tokens` tokens on `gpus` x `hw` (see the module docstring).
    `zero_shard`: hybrid sharding, ZeRO over that many data-parallel ranks, replicated
    (flopsim.parallel.layout; None: over all of them).
    `recompute_fraction` (recompute full): the share of the blocks checkpointed, evenly spaced
    (flopsim.parallel.layout.checkpointed_blocks; fms-fsdp's selective_checkpointing).
    `sequence_parallel`: split the token-wise ops over tp (default: on when tp > 1).
    `grad_accumulation` none | autograd | main_grad, `grad_reduce_dtype` None | fp32 | bf16 |
    fp16: flopsim.ops.grad_accum.

    global batch: `global_batch` sequences or `global_batch_tokens` tokens (a
    multiple of a sequence's tokens); default the smallest multiple of dp * micro_batch
    sequences holding at least DEFAULT_GLOBAL_BATCH_TOKENS tokens. An encoder-decoder:
    `encoder_seq` encoder tokens a sequence (default seq), `encoder_stages` of pp
    (flopsim.parallel.layout's default: by the stacks' blocks)."""
    from flopsim.calibration import load_calibration
    from flopsim.count import count
    from flopsim.hardware import load_hardware
    from flopsim.memory import MemoryModel
    from flopsim.ops.grad_accum import paying_microbatches
    from flopsim.ops.optimizer import get_optimizer
    from flopsim.parallel.layout import checked_recompute_blocks, checked_zero_shard
    from flopsim.planning.layer_costs import ShardedModel
    from flopsim.planning.train_step import step_schedule
    from flopsim.spec import load_model

    spec, hw = load_model(spec), load_hardware(hw)
    cal = load_calibration(calibration, hw)
    tokens = _positive("tokens", tokens)
    price = _non_negative("price", price_per_gpu_hour)
    get_optimizer(optimizer)
    check_engine(grad_accumulation, grad_reduce_dtype)
    c = _train_config(spec, gpus=gpus, tp=tp, pp=pp, dp=dp, ep=ep, micro_batch=micro_batch, zero=zero,
                      dp_overlap=dp_overlap, tp_overlap=tp_overlap, recompute=recompute, optimizer=optimizer,
                      seq=seq, encoder_seq=encoder_seq, encoder_stages=encoder_stages, virtual_stages=virtual_stages,
                      global_batch=global_batch, global_batch_tokens=global_batch_tokens)
    c["sequence_parallel"] = None if sequence_parallel is None else bool(sequence_parallel)
    c["zero_shard"] = checked_zero_shard(zero_shard, zero=c["zero"], dp=c["dp"], ep=c["ep"])
    c["recompute_blocks"] = checked_recompute_blocks(spec, c["recompute_mode"], recompute_fraction)
    c["recompute_fraction"] = float(recompute_fraction)
    links = resolve_links(hw, cal, interconnect_bytes_per_s, inter_node_bytes_per_s, gpus_per_node, comm_latency_s,
                          needed=c["gpus"] > 1)
    bar = _Progress(progress, f"costing {spec.name} train step", total=3)
    try:
        mem = MemoryModel(spec, "train", recompute=c["recompute_mode"], optimizer=optimizer,
                          encoder_seq=c["encoder_seq"], recompute_blocks=c["recompute_blocks"])
        act = _activations(spec, c, mem)
        params, params_expert = _param_split(spec)
        c.update(routing_figures(spec, c))
        bar.advance("stages")
        model = ShardedModel(spec, hw, cal, links, optimizer=optimizer, bytes_per_param=mem.bytes_per_param,
                             encoder_seq=c["encoder_seq"], grad_accumulation=grad_accumulation,
                             grad_reduce_dtype=grad_reduce_dtype)
        stages = _stage_list(model, c)
        bar.advance("totals")
        flops = count(spec, batch=c["micro_batch"], seq=c["seq"], encoder_seq=c["encoder_seq"], phase="train").flops
        bar.advance()
    finally:
        bar.close()
    sched = step_schedule(stages, c["microbatches"], c["pp"], float(tp_overlap), float(dp_overlap),
                          c["virtual_stages"], paying_microbatches(grad_accumulation, c["microbatches"]),
                          cal.collective_sm_share)
    mem_out, fits, message, suggestions = _train_memory_verdict(spec, hw, act, mem.bytes_per_param, params,
                                                                params_expert, c, links, optimizer)
    config = _plan_config(spec, c, model.reduce_bpp, grad_accumulation, grad_reduce_dtype)
    return TrainingPlan(spec=spec, hw=hw, calibration=cal, config=config, links=links,
                        compute=_train_compute(sched, c), communication=_train_communication(links, sched, c),
                        memory=mem_out, totals=_train_totals(flops, spec, hw, c, tokens, sched["step_s"], price),
                        fits=fits, message=message, suggestions=suggestions, notes=_train_notes(spec, c, tokens))


def _plan_config(spec, c: dict, reduce_bpp: float, grad_accumulation: str, grad_reduce_dtype) -> dict:
    """The plan's `config` section: the layout, batch and engine settings it was costed with."""
    config = {key: c[key] for key in ("gpus", "dp", "tp", "pp", "ep", "seq", "micro_batch", "global_batch",
                                      "microbatches", "optimizer", "zero")}
    config.update(zero_shard=c["zero_shard"] or c["dp"], grad_accumulation=grad_accumulation,
                  grad_reduce_dtype=grad_reduce_dtype, grad_reduce_bytes_per_param=reduce_bpp,
                  expert_dp=c["dp"] // c["ep"],
                  recompute={"none": False, "full": True}.get(c["recompute_mode"], c["recompute_mode"]),
                  recompute_fraction=c["recompute_fraction"],
                  virtual_stages=c["virtual_stages"],
                  sequence_parallel=c["tp"] > 1 if c["sequence_parallel"] is None else c["sequence_parallel"],
                  **{k: c[k] for k in ("routing", "expert_imbalance", "dropped_fraction") if k in c},
                  **({"encoder_seq": c["encoder_seq"], "encoder_stages": c["encoder_stages"]}
                     if spec.is_encoder_decoder else {}))
    return config


def _train_compute(sched: dict, c: dict) -> dict:
    """The compute section: the slowest stage's passes per micro-batch, the pipeline."""
    slow, m = sched["slowest"], c["microbatches"]
    return {
        "forward_s_per_microbatch": slow.fwd_s, "backward_s_per_microbatch": slow.bwd_s,
        "recompute_s_per_microbatch": slow.recompute_s, "compute_s_per_microbatch": slow.compute_s,
        "compute_s_per_step": m * slow.compute_s, "optimizer_s": sched["tail"].optimizer_s,
        "grad_accumulation_s_per_microbatch": sched["accumulate_s"],
        "grad_accumulation_s_per_step": sched["accumulate_step_s"],
        "stage_s_per_microbatch": sched["stage_s"], "pipeline_s": sched["pipeline_s"],
        "bubble_s": sched["bubble_s"], "bubble_fraction": bubble_fraction(c["pp"], m, c.get("virtual_stages", 1)),
        "slowest_stage": slow.stage,
    }


def _train_suggestions(spec, act_now, params_dense, params_expert, bpp, capacity, c: dict, optimizer,
                       gpus_per_node) -> list[str]:
    """Single changes to the layout `c` that fit, each with its per-GPU need (`act_now`: its
    activations, as activations_in_flight takes them)."""
    from flopsim.memory import MemoryModel
    from flopsim.parallel.layout import default_encoder_stages

    gpus, tp, pp, dp, ep, zero = (c[k] for k in ("gpus", "tp", "pp", "dp", "ep", "zero"))
    micro_batch, rc_now, v = c["micro_batch"], c["recompute_mode"], c["virtual_stages"]
    models: dict = {}

    def act(mb, rc, p, every):  # every: each block checkpointed (no --recompute-fraction below 1)
        if (mb, rc, p, every) == (micro_batch, rc_now, pp, False):
            return act_now
        if (rc, every) not in models:
            models[rc, every] = MemoryModel(
                spec, "train", recompute=rc, optimizer=optimizer, encoder_seq=c["encoder_seq"],
                recompute_blocks=c.get("recompute_blocks") if rc == rc_now and not every else None)
        stages = c["encoder_stages"] if p == pp else (default_encoder_stages(spec, p) if p > 1 else None)
        return _activations(spec, {**c, "micro_batch": mb, "pp": p, "encoder_stages": stages}, models[rc, every])

    def need(*, tp=tp, pp=pp, dp=dp, zero=zero, mb=micro_batch, rc=rc_now, shard=c.get("zero_shard"), every=False):
        per_step = dp * mb
        if c["global_batch"] % per_step:
            return None
        shard = shard if shard and dp % shard == 0 and shard < dp else None  # hybrid while it still divides dp
        return _train_memory(params_dense, params_expert, bpp, act(mb, rc, pp, every), tp=tp, pp=pp, dp=dp, ep=ep,
                             zero=zero, microbatches=c["global_batch"] // per_step,
                             virtual_stages=v, zero_shard=shard)["total_bytes"]

    options = []
    if c.get("zero_shard"):
        options.append(("no --zero-shard (ZeRO over all of dp)", dict(shard=None)))
    if rc_now != "full":
        options.append(("--recompute full", dict(rc="full")))
    elif c.get("recompute_fraction", 1.0) < 1:  # full recomputation of only some blocks: of all of them
        options.append(("--recompute-fraction 1", dict(every=True)))
    for z in range(zero + 1, 4):
        options.append((f"--zero {z}", dict(zero=z)))
    if micro_batch > 1:
        options.append(("--micro-batch 1", dict(mb=1)))
    t2 = tp * 2
    if t2 <= gpus_per_node and spec.heads % t2 == 0 and gpus % (t2 * pp) == 0 and (gpus // (t2 * pp)) % ep == 0:
        options.append((f"--tp {t2}", dict(tp=t2, dp=gpus // (t2 * pp))))
    p2 = pp * 2
    while p2 <= spec.blocks:
        if pipeline_fits_blocks(spec, p2, v) and gpus % (tp * p2) == 0 and (gpus // (tp * p2)) % ep == 0:
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


def pipeline_fits_blocks(spec, pp: int, virtual_stages: int = 1) -> bool:
    """Whether pp stages (of v chunks) take whole, equal shares of the blocks, as Megatron-LM
    asks: pp x v divides the blocks; an encoder-decoder's default encoder stages divide its
    encoder blocks and the rest its decoder blocks (flopsim.parallel.layout), with v 1."""
    from flopsim.parallel.layout import default_encoder_stages

    if not spec.is_encoder_decoder or pp == 1:
        return spec.blocks % (pp * virtual_stages) == 0
    e = default_encoder_stages(spec, pp)
    return virtual_stages == 1 and spec.encoder_layers % e == 0 and spec.layers % (pp - e) == 0
