"""Capacity planning: how many GPUs, how long and at what cost to train a model,
and how many GPUs, which batch and at what cost per token to serve it.

Both plans are built on the same Op lists as everything else: compute times
come from `flopsim.predict` (roofline per op, the device's calibration),
memory from `flopsim.memory`; this module only adds the parallel layout,
the collectives and the arithmetic of steps, days and money.

Links: two levels, each with a latency and a bus bandwidth
(flopsim.calibration.LinkLevel; nccl-tests' busbw, one way):

- intra-node (scale-up: NVLink, xGMI, ICI): the calibration's
  `links.scale_up` (published or measured nccl-tests figures), else the
  hardware's `interconnect_bytes_per_s` halved with one launch of latency
  (an ideal link, labelled so in the output); `interconnect_bytes_per_s=`
  (two-way) overrides the bandwidth;
- inter-node (scale-out: InfiniBand, RoCE): the calibration's
  `links.scale_out`, else the hardware's `scale_out_bytes_per_s` halved;
  `inter_node_bytes_per_s=` (two-way) overrides it;
- nodes of `gpus_per_node` GPUs (default: the hardware's `scale_up_domain`).
  Ranks are laid out Megatron-style, tp fastest, then dp (with ep inside
  dp), then pp: a group whose ranks span at most one node (tp: tp ranks;
  ep: tp * ep; dp: tp * dp; pp: tp * dp * pp) uses the intra-node level,
  any other group the inter-node one (its slowest link);
- `comm_latency_s=` overrides both levels' latency.

Collectives (flopsim.collectives: latency + factor * nbytes / bus bandwidth;
n ranks, `nbytes` the data one rank holds): all-reduce 2 (n - 1) / n,
reduce-scatter and all-gather (n - 1) / n of the whole buffer, all-to-all
(n - 1) / n, point-to-point 1. Small messages (decode's all-reduces of
batch * d_model values) are latency-bound.

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

Serving (`plan_serving`): replicas of tp GPUs, each running continuous
batching of `batch` sequences, every request a prompt of `prompt` tokens and
`gen` generated tokens:

- TTFT = the prefill of one prompt alone on the replica (no queueing):
  predict(prefill, batch 1) / tp + 2 all-reduces per block of
  prompt * d_model activations.
- TPOT = one decode step of the whole batch at the mean KV length
  T = prompt + (gen + 1) // 2 (generated token j attends to prompt + j keys;
  every op's time is linear in T while its bound does not change, so this is
  the average over the generation), / tp, + 2 all-reduces per block of
  batch * d_model. MoE decode reads the expected distinct experts of the
  batch, as the Op list states them.
- Memory per GPU: weights / tp + KV cache of `batch` sequences at the full
  prompt + gen tokens / min(tp, kv_heads) (KV heads are split over tp, and
  replicated when tp > kv_heads; a multi-head-latent-attention cache is one
  latent per token, replicated on every tp rank) + the largest working set of a decode step
  or a one-prompt prefill / tp, against `memory_utilization` (default 0.9,
  vLLM's gpu_memory_utilization) of the device's memory.
- Batch: the largest batch that fits memory and, with a TPOT target, whose
  decode step meets it (both grow with the batch: doubling, then bisection).
  A TTFT target does not depend on the batch: a tp that misses it is rejected.
- Throughput: a replica spends batch * TTFT prefilling and gen * TPOT decoding
  for every `batch` requests, so output tokens/s = batch * gen /
  (batch * TTFT + gen * TPOT); GPUs for a target = ceil(target / that) * tp.
- Cost: price * tp / 3600 per replica-second; per million output tokens
  (decode time only), per million input tokens (prefill time only), and
  blended (all replica time / output tokens).
- tp: given, or every power of two up to gpus_per_node (dividing the heads and
  the GPUs when given) is tried and the one with the most output tokens/s per
  GPU that fits and meets the targets is chosen.
"""

from __future__ import annotations

import math
import re
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from flopsim.collectives import collective_s
from flopsim.errors import InputError, bad_value

DEFAULT_GPUS_PER_NODE = 8  # when the hardware spec gives no scale_up_domain
DEFAULT_GLOBAL_BATCH_TOKENS = 4 * 2 ** 20  # ~4M tokens (Llama 2's global batch)
DEFAULT_SEQ = 4096
MAX_SERVING_BATCH = 2 ** 20
# the share of device memory a serving engine fills (vLLM's gpu_memory_utilization default)
DEFAULT_MEMORY_UTILIZATION = 0.9
GB = 1e9

# -- collectives -------------------------------------------------------------------


def bubble_fraction(pp: int, microbatches: int) -> float:
    """1F1B pipeline bubble over the ideal time: (pp - 1) / microbatches."""
    return (pp - 1) / microbatches


@dataclass(frozen=True)
class Links:
    """The two link levels a GPU's collectives use (flopsim.calibration.LinkLevel:
    latency and bus bandwidth, with where each figure comes from) and how many
    GPUs share the scale-up level."""

    scale_up: Any
    scale_out: Any  # None: no network figure (a group beyond one node is an error)
    gpus_per_node: int

    def inside(self, span: int) -> bool:
        """Whether a group whose ranks span `span` consecutive ranks stays within one node."""
        return span <= self.gpus_per_node and self.gpus_per_node % span == 0

    def level(self, span: int):
        if self.inside(span):
            return self.scale_up
        if self.scale_out is None:
            raise InputError(f"a group spanning {span} GPUs crosses nodes of {self.gpus_per_node}, and neither the "
                             "hardware spec (scale_out_bytes_per_s) nor the calibration (links.scale_out) gives a "
                             "network figure; give --inter-node")
        return self.scale_out

    def collective_s(self, op: str, nbytes: float, ranks: int, span: int) -> float:
        """`op` on `nbytes` over `ranks` ranks spanning `span` consecutive ranks (flopsim.collectives)."""
        if ranks <= 1:
            return 0.0
        link = self.level(span)
        return collective_s(op, nbytes, ranks, link.bus_bytes_per_s, link.latency_s, link.hop_latency_s)

    def where(self, span: int, size: int = 2) -> str:
        """'intra-node' or 'inter-node' for a group of `size` ranks spanning `span` ('-' for one rank)."""
        if size <= 1:
            return "-"
        return "intra-node" if self.inside(span) else "inter-node"

    def to_dict(self) -> dict:
        out = {"gpus_per_node": self.gpus_per_node}
        for name, link in (("intra_node", self.scale_up), ("inter_node", self.scale_out)):
            if link is not None:
                out[f"{name}_bus_bytes_per_s"] = link.bus_bytes_per_s
                out[f"{name}_latency_s"] = link.latency_s
                out[f"{name}_source"] = link.source
        return out


# -- input helpers -------------------------------------------------------------------
_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9, "t": 1e12, "p": 1e15}


def parse_quantity(text: Any, name: str) -> float:
    """'1T' -> 1e12, '4M' -> 4e6, '2.5e11' -> 2.5e11 (decimal suffixes k M G/B T P)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGbBtTpP]?)\s*", str(text))
    if not match:
        raise bad_value(name, text, "expected a number, optionally with a suffix k, M, G, T or P (e.g. 1T, 4M)")
    return float(match.group(1)) * _SUFFIX[match.group(2).lower()]


_DURATION = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "min": 60.0}


def parse_duration(text: Any, name: str) -> float:
    """'50ms' -> 0.05, '1s' -> 1.0, '0.2' -> 0.2 (seconds; units s, ms, us, min)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(s|ms|us|min)?\s*", str(text))
    if not match:
        raise bad_value(name, text, "expected a duration in seconds, or with a unit s, ms, us (e.g. 50ms)")
    return float(match.group(1)) * _DURATION[match.group(2) or ""]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad_value(name, value, "must be a positive integer")
    return value


def _non_negative(name: str, value) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
        raise bad_value(name, value, "must be a non-negative number")
    return float(value)


def _positive(name: str, value) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise bad_value(name, value, "must be a positive number")
    return float(value)


def _links(hw, cal, interconnect_bytes_per_s, inter_node_bytes_per_s, gpus_per_node, comm_latency_s,
           needed: bool) -> Links:
    """Link levels from the user's figures, else the calibration's measured
    `links`, else the hardware's datasheet bandwidths (half their two-way
    figure, latency one launch: an ideal link, so labelled)."""
    from flopsim.calibration import LinkLevel

    latency = _non_negative("comm_latency_s", comm_latency_s)
    if latency is not None and latency > 1.0:
        raise bad_value("comm_latency_s", comm_latency_s, "expected at most 1 s per collective")

    def level(name: str, user_two_way, what: str):
        user = _positive(what, user_two_way)
        if user is not None:
            if not 2e3 <= user <= 2e15:
                raise bad_value(what, user_two_way, "expected 2e3 to 2e15 bytes/s (both directions)")
            base = cal.link(name, hw)
            return LinkLevel(latency_s=base.latency_s if base else cal.overhead_s(hw), bus_bytes_per_s=user / 2,
                             source=f"--{what.replace('_', '-')} (given: {user:.3g} B/s both ways)")
        return cal.link(name, hw)

    up = level("scale_up", interconnect_bytes_per_s, "interconnect_bytes_per_s")
    if up is None:
        if needed:
            raise InputError(f"hardware {hw.name} has no interconnect_bytes_per_s; give --interconnect "
                             f"(bytes/s per GPU, both directions)")
        up = LinkLevel(latency_s=0.0, bus_bytes_per_s=1e3, source="none (one GPU: no collectives)")
    out = level("scale_out", inter_node_bytes_per_s, "inter_node_bytes_per_s")
    if latency is not None:
        up = LinkLevel(latency_s=latency, bus_bytes_per_s=up.bus_bytes_per_s, source=up.source)
        if out is not None:
            out = LinkLevel(latency_s=latency, bus_bytes_per_s=out.bus_bytes_per_s, source=out.source)
    node = gpus_per_node if gpus_per_node is not None else (hw.scale_up_domain or DEFAULT_GPUS_PER_NODE)
    return Links(scale_up=up, scale_out=out, gpus_per_node=_positive_int("gpus_per_node", node))


def _split_s(ops, shards: int, kernel_shards: int) -> float:
    """A GPU's time for `ops` when their work is split `shards` ways and their
    kernels `kernel_shards` ways: sum(max(compute, memory)) / shards + launches / kernel_shards."""
    work = sum(op.time_s - op.overhead_s for op in ops)
    launch = sum(op.overhead_s for op in ops)
    return work / shards + launch / kernel_shards


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


class _Progress:
    """A rich progress bar on stderr (only when enabled and stderr is a terminal)."""

    def __init__(self, enabled: bool, description: str, total: Optional[int] = None):
        self._bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, \
            TimeElapsedColumn

        console = Console(stderr=True)
        if not console.is_terminal:
            return
        self._bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), console=console, transient=True)
        self._bar.start()
        self._task = self._bar.add_task(description, total=total)

    def advance(self, description: Optional[str] = None, n: int = 1):
        if self._bar is not None:
            self._bar.update(self._task, advance=n, **({"description": description} if description else {}))

    def close(self):
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def largest_true(pred: Callable[[int], bool], upper: int) -> int:
    """The largest n in [1, upper] with pred(n) true (0 when pred(1) is false),
    for a predicate that is true up to some n and false after: doubling, then bisection."""
    if upper < 1 or not pred(1):
        return 0
    lo, hi = 1, 2
    while hi <= upper and pred(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, upper + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if pred(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _gb(x: float) -> str:
    return f"{x / GB:.1f} GB"


# -- training ----------------------------------------------------------------------
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


def _long_table(d: dict, sections) -> Any:
    import pandas as pd

    rows = []
    for section in sections:
        for key, value in d[section].items():
            if isinstance(value, (dict, list)):
                continue
            rows.append({"section": section, "quantity": key, "value": value})
    rows.append({"section": "verdict", "quantity": "fits", "value": d["fits"]})
    rows.append({"section": "verdict", "quantity": "message", "value": d["message"]})
    return pd.DataFrame(rows)


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
    links = _links(hw, cal, interconnect_bytes_per_s, inter_node_bytes_per_s, gpus_per_node, comm_latency_s,
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


# -- serving -----------------------------------------------------------------------------
@dataclass
class ServingPlan:
    """Serving `prompt` + `gen` token requests: the chosen tp and batch, latencies,
    throughput, GPUs and cost; `candidates` has one row per tp tried."""

    spec: Any
    hw: Any
    calibration: Any
    config: dict
    links: Links
    latency: dict
    throughput: dict
    memory: dict
    cost: dict
    fits: bool
    feasible: bool
    message: str
    candidates: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def batch(self) -> int:
        return self.config["batch"]

    @property
    def tp(self) -> int:
        return self.config["tp"]

    @property
    def gpus(self) -> Optional[int]:
        return self.throughput.get("gpus")

    def to_dict(self) -> dict:
        return {
            "kind": "serving", "model": self.spec.name, "family": self.spec.family, "hardware": self.hw.name,
            "dtype": self.spec.dtype, "precision": self.spec.precision_label, "calibration": self.calibration.source,
            "calibration_kind": self.calibration.kind, "calibration_label": self.calibration.provenance_label,
            "config": dict(self.config), "links": self.links.to_dict(), "latency": dict(self.latency),
            "throughput": dict(self.throughput), "memory": dict(self.memory), "cost": dict(self.cost),
            "fits": self.fits, "feasible": self.feasible, "message": self.message,
            "candidates": list(self.candidates), "notes": list(self.notes),
        }

    def table(self):
        """One row per figure (section, quantity, value): a long-format DataFrame."""
        return _long_table(self.to_dict(), ("config", "links", "latency", "throughput", "memory", "cost"))


def tp_allreduce_s(spec, links, tp: int, rows: int, encoder_rows: int = 0) -> float:
    """Megatron tensor parallelism's all-reduces of one step: two per block (after
    the attention and after the FFN), each of `rows` x d_model activations; an
    encoder-decoder's decoder blocks a third (after the cross-attention), and its
    encoder blocks two each of `encoder_rows` (0: the encoder does not run)."""
    if tp <= 1:
        return 0.0
    one = lambda n: links.collective_s("all_reduce", n * spec.d_model * spec.dtype_bytes, tp, tp)  # noqa: E731
    per_block = 3 if spec.is_encoder_decoder else 2
    encoder = 2 * spec.encoder_layers * one(encoder_rows) if encoder_rows else 0.0
    return per_block * spec.layers * one(rows) + encoder


def tp_prefill_s(spec, hw, cal, links, *, tp: int, batch: int, prompt: int,
                 encoder_seq: Optional[int] = None) -> tuple[float, Any]:
    """(seconds, PredictResult) of a prefill of `batch` prompts on a tp-way replica (an
    encoder-decoder's encoder over `encoder_seq` tokens a sequence, default `prompt`)."""
    from flopsim.predict import predict

    r = predict(spec, hw, phase="prefill", batch=batch, seq=prompt, calibration=cal, encoder_seq=encoder_seq)
    encoder_rows = batch * (r.encoder_seq or 0)
    return _split_s(r.ops, tp, 1) + tp_allreduce_s(spec, links, tp, batch * prompt, encoder_rows), r


def tp_decode_s(spec, hw, cal, links, *, tp: int, batch: int, context: int,
                encoder_seq: Optional[int] = None) -> tuple[float, Any]:
    """(seconds, PredictResult) of one decode step of `batch` sequences at KV length `context`, tp-way
    (an encoder-decoder's cross-attention over `encoder_seq` encoder tokens, default `context`)."""
    from flopsim.predict import predict

    if spec.is_encoder_decoder and encoder_seq is None:
        encoder_seq = context
    r = predict(spec, hw, phase="decode", batch=batch, seq=1, context=context, calibration=cal,
                encoder_seq=encoder_seq)
    return _split_s(r.ops, tp, 1) + tp_allreduce_s(spec, links, tp, batch), r


class _ServeModel:
    """Per-GPU times and memory of one spec at one tp (cached by batch)."""

    def __init__(self, spec, hw, cal, links, *, tp, prompt, gen, usable_bytes):
        from flopsim.memory import MemoryModel

        self.spec, self.hw, self.cal, self.links, self.tp = spec, hw, cal, links, tp
        self.prompt, self.gen, self.usable_bytes = prompt, gen, usable_bytes
        self.t_max = prompt + gen
        self.t_mean = prompt + (gen + 1) // 2
        self._decode = MemoryModel(spec, "decode")
        self._prefill_act = MemoryModel(spec, "prefill").evaluate(1, prompt, prompt)["activations_bytes"]
        self._times: dict[int, float] = {}
        self.ttft_tp_s = tp_allreduce_s(spec, links, tp, prompt)
        self.ttft_s, r = tp_prefill_s(spec, hw, cal, links, tp=tp, batch=1, prompt=prompt)
        self.prefill_flops = r.flops

    def memory(self, batch: int) -> dict:
        m = self._decode.evaluate(batch, 1, self.t_max)
        # KV heads split over tp; MLA's latent cache is one tensor every tp rank keeps whole
        kv_split = 1 if self.spec.mla is not None else min(self.tp, self.spec.kv_heads)
        out = {
            "weights_bytes": m["weights_bytes"] / self.tp,
            "kv_cache_bytes": m["kv_cache_bytes"] / kv_split,
            "activations_bytes": max(m["activations_bytes"], self._prefill_act) / self.tp,
        }
        out["total_bytes"] = sum(out.values())
        return out

    def fits(self, batch: int) -> bool:
        return self.memory(batch)["total_bytes"] <= self.usable_bytes

    def decode_tp_s(self, batch: int) -> float:
        return tp_allreduce_s(self.spec, self.links, self.tp, batch)

    def tpot(self, batch: int) -> float:
        if batch not in self._times:
            self._times[batch] = tp_decode_s(self.spec, self.hw, self.cal, self.links, tp=self.tp, batch=batch,
                                             context=self.t_mean)[0]
        return self._times[batch]

    def throughput(self, batch: int) -> dict:
        tpot = self.tpot(batch)
        cycle = batch * self.ttft_s + self.gen * tpot
        return {"cycle_s": cycle, "output_tokens_per_s": batch * self.gen / cycle,
                "input_tokens_per_s": batch * self.prompt / cycle}


def _usable_note(usable: float, hw) -> str:
    if usable >= hw.memory_capacity_bytes:
        return ""
    return f" ({_gb(usable)} usable at memory utilization {usable / hw.memory_capacity_bytes:g})"


def _tp_candidates(spec, gpus: Optional[int], gpus_per_node: int) -> list[int]:
    out = []
    t = 1
    while t <= gpus_per_node and (gpus is None or t <= gpus):
        if spec.heads % t == 0 and (gpus is None or gpus % t == 0):
            out.append(t)
        t *= 2
    return out


def _serve_tps(spec, gpus, tp, interconnect_bytes_per_s, hw, gpus_per_node) -> list:
    """The tensor-parallel degrees to try: the one given, 1 with no interconnect, else the candidates."""
    if tp is not None:
        tp = _positive_int("tp", tp)
        if spec.heads % tp:
            raise InputError(f"tp {tp} does not divide the {spec.heads} attention heads of {spec.name}")
        if gpus is not None and gpus % tp:
            raise InputError(f"tp {tp} does not divide gpus {gpus}")
        return [tp]
    if interconnect_bytes_per_s is None and hw.interconnect_bytes_per_s is None:
        return [1]  # no interconnect to split a model over
    tps = _tp_candidates(spec, gpus, gpus_per_node)
    if not tps:
        raise InputError(f"no tensor-parallel degree up to {gpus_per_node} divides both the {spec.heads} heads "
                         f"and gpus {gpus}; give --tp")
    return tps


def _serve_row(model, t: int, hw, usable: float, upper: int, ttft_target, tpot_target, bar) -> dict:
    """One tensor-parallel degree: the largest batch memory allows, the batch the TPOT target
    allows, and why it misses its targets (reasons), with its latency and throughput."""
    row: dict = {"tp": t, "ttft_s": model.ttft_s}
    b_mem = largest_true(model.fits, upper)
    row["max_batch_memory"] = b_mem
    reasons = []
    if b_mem == 0:
        m = model.memory(1)
        row.update(batch=None, ttft_s=None, fits=False, meets=False)  # no batch runs: no latency
        reasons.append(f"batch 1 needs {_gb(m['total_bytes'])} per GPU on tp {t}, device has "
                       f"{_gb(hw.memory_capacity_bytes)}{_usable_note(usable, hw)} "
                       f"(weights {_gb(m['weights_bytes'])}, KV cache "
                       f"{_gb(m['kv_cache_bytes'])}, activations {_gb(m['activations_bytes'])})")
        row["reasons"] = reasons
        return row
    row["fits"] = True
    batch = b_mem
    if tpot_target is not None:
        def meets(b):
            bar.advance(f"tp {t}: batch {b}", n=0)
            return model.tpot(b) <= tpot_target
        b_lat = largest_true(meets, b_mem)
        if b_lat == 0:
            reasons.append(f"TPOT at batch 1 is {model.tpot(1) * 1e3:.3g} ms on tp {t}, over the "
                           f"{tpot_target * 1e3:.3g} ms target")
            batch = 1
        else:
            batch = b_lat
    if ttft_target is not None and model.ttft_s > ttft_target:
        reasons.append(f"TTFT {model.ttft_s * 1e3:.3g} ms on tp {t} is over the {ttft_target * 1e3:.3g} ms target")
    row.update(batch=batch, tpot_s=model.tpot(batch), meets=not reasons, reasons=reasons)
    th = model.throughput(batch)
    row.update(output_tokens_per_s=th["output_tokens_per_s"], output_tokens_per_s_per_gpu=th["output_tokens_per_s"] / t)
    return row


def _serve_throughput(model, batch: int, t: int, gen: int, target, gpus, notes: list) -> dict:
    """Throughput per replica, and replicas for a target rate or the GPUs available."""
    tpot = model.tpot(batch)
    th = model.throughput(batch)
    per_replica = th["output_tokens_per_s"]
    out = {"output_tokens_per_s_per_replica": per_replica, "input_tokens_per_s_per_replica": th["input_tokens_per_s"],
           "output_tokens_per_s_per_gpu": per_replica / t, "decode_tokens_per_s_per_replica": batch / tpot,
           "requests_per_s_per_replica": per_replica / gen}
    if target is not None:
        replicas = math.ceil(target / per_replica)
        out.update(replicas=replicas, gpus=replicas * t, output_tokens_per_s=replicas * per_replica)
        if gpus is not None:
            out["gpus_available_meet_target"] = gpus // t * per_replica >= target
            if not out["gpus_available_meet_target"]:
                notes.append(f"{gpus} GPUs give {gpus // t * per_replica:,.0f} output tokens/s, short of the "
                             f"{target:,.0f} target: {replicas * t} GPUs are needed")
    elif gpus is not None:
        replicas = gpus // t
        out.update(replicas=replicas, gpus=replicas * t, output_tokens_per_s=replicas * per_replica)
    else:
        out.update(replicas=1, gpus=t, output_tokens_per_s=per_replica)
    return out


def _serve_cost(model, batch: int, t: int, prompt: int, gen: int, price, gpus_used: int) -> dict:
    """Price per million output and input tokens (and blended), and per hour."""
    cost: dict = {"price_per_gpu_hour": price}
    if price is not None:
        per_s = price * t / 3600
        cost.update(
            per_million_output_tokens=per_s * model.tpot(batch) / batch * 1e6,
            per_million_input_tokens=per_s * model.ttft_s / prompt * 1e6,
            per_million_output_tokens_blended=per_s * model.throughput(batch)["cycle_s"] / (batch * gen) * 1e6,
            per_hour=price * gpus_used,
        )
    return cost


def _serve_notes(spec, model, row: dict, latency: dict, prompt: int, gen: int, tpot_target, notes: list) -> None:
    if prompt + gen > spec.max_seq:
        notes.append(f"prompt + gen = {prompt + gen} exceeds max_seq {spec.max_seq} of {spec.name} "
                     f"({spec.positions} positions: costed as is)")
    if tpot_target is not None and latency["tpot_with_prefills_s"] > tpot_target:
        notes.append(f"with other requests' prefills interleaved the mean time between tokens is "
                     f"{latency['tpot_with_prefills_s'] * 1e3:.3g} ms, over the {tpot_target * 1e3:.3g} ms TPOT target "
                     f"(the target bounds the decode step); lower --max-batch or run prefill on separate GPUs")
    if row["batch"] == row.get("max_batch_memory") and tpot_target is None:
        notes.append("no TPOT target: the batch is the largest that fits memory (give --tpot to bound latency)")


def _fraction(name: str, value) -> float:
    """A number in (0, 1], else the one-line error naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise bad_value(name, value, "must be a fraction in (0, 1]")
    return value


def _serving_latency(model, batch: int, gen: int) -> dict:
    """Time to first token, time per output token (alone and with other requests' prefills
    interleaved: each of the batch's requests prefills once per `gen` steps) and a request's time."""
    tpot = model.tpot(batch)
    return {"ttft_s": model.ttft_s, "ttft_tp_comm_s": model.ttft_tp_s, "tpot_s": tpot,
            "tpot_tp_comm_s": model.decode_tp_s(batch),
            "tpot_with_prefills_s": tpot + batch * model.ttft_s / gen,
            "request_s": model.ttft_s + gen * tpot}


def _best_serving(evaluated: list) -> tuple:
    """((row, model) chosen, feasible, fits): the most output tokens/s per GPU among the
    tp degrees that meet the targets, else among those that fit (the smaller tp on a tie),
    else the last one tried (nothing fits)."""
    good = [(row, m) for row, m in evaluated if row.get("meets")]
    fitting = [(row, m) for row, m in evaluated if row.get("fits")]
    pool = good or fitting
    chosen = max(pool, key=lambda rm: (rm[0]["output_tokens_per_s_per_gpu"], -rm[0]["tp"])) if pool \
        else evaluated[-1]
    return chosen, bool(good), bool(fitting)


def plan_serving(spec, hw, *, prompt: int, gen: int, gpus: Optional[int] = None,
                 target_tokens_per_s: Optional[float] = None, ttft_s: Optional[float] = None,
                 tpot_s: Optional[float] = None, tp: Optional[int] = None, max_batch: Optional[int] = None,
                 memory_utilization: float = DEFAULT_MEMORY_UTILIZATION,
                 price_per_gpu_hour: Optional[float] = None, interconnect_bytes_per_s: Optional[float] = None,
                 inter_node_bytes_per_s: Optional[float] = None, gpus_per_node: Optional[int] = None,
                 comm_latency_s: Optional[float] = None, calibration=None, progress: bool = False) -> ServingPlan:
    """Plan serving requests of `prompt` prompt tokens and `gen` generated tokens
    (see the module docstring). `target_tokens_per_s`: output tokens/s to sustain
    (-> GPUs needed); `gpus`: GPUs available (-> throughput they give);
    `ttft_s` / `tpot_s`: latency targets; `tp`: tensor-parallel degree (default:
    the best power of two)."""
    from flopsim.calibration import load_calibration
    from flopsim.count import token_values
    from flopsim.hardware import load_hardware
    from flopsim.spec import load_model

    spec, hw = load_model(spec), load_hardware(hw)
    _single_stack(spec)
    cal, prompt, gen = load_calibration(calibration, hw), _positive_int("prompt", prompt), _positive_int("gen", gen)
    gpus = None if gpus is None else _positive_int("gpus", gpus)
    target = _positive("target_tokens_per_s", target_tokens_per_s)
    ttft_target, tpot_target = _positive("ttft_s", ttft_s), _positive("tpot_s", tpot_s)
    price = _non_negative("price", price_per_gpu_hour)
    usable = _fraction("memory_utilization", memory_utilization) * hw.memory_capacity_bytes
    upper = MAX_SERVING_BATCH if max_batch is None else _positive_int("max_batch", max_batch)
    gpus_per_node = _positive_int("gpus_per_node", gpus_per_node if gpus_per_node is not None
                                  else (hw.scale_up_domain or DEFAULT_GPUS_PER_NODE))
    token_values(spec, "prefill", 1, prompt)
    token_values(spec, "decode", 1, 1, prompt + gen)  # the longest KV cache within max_seq
    tps = _serve_tps(spec, gpus, tp, interconnect_bytes_per_s, hw, gpus_per_node)
    links = _links(hw, cal, interconnect_bytes_per_s, inter_node_bytes_per_s, gpus_per_node, comm_latency_s,
                   needed=max(tps) > 1)

    evaluated = []
    with closing(_Progress(progress, "serving plan", total=len(tps))) as bar:
        for t in tps:
            bar.advance(f"tp {t}: batch search", n=0)
            model = _ServeModel(spec, hw, cal, links, tp=t, prompt=prompt, gen=gen, usable_bytes=usable)
            evaluated.append((_serve_row(model, t, hw, usable, upper, ttft_target, tpot_target, bar), model))
            bar.advance()
    (row, model), feasible, fits = _best_serving(evaluated)
    t = row["tp"]
    candidates = [{k: v for k, v in r.items() if k != "reasons"} | {"reasons": "; ".join(r.get("reasons", []))}
                  for r, _ in evaluated]
    config = {"prompt": prompt, "gen": gen, "tp": t, "batch": row.get("batch", 0),
              "decode_context_mean": model.t_mean, "kv_context_max": model.t_max,
              "max_batch_memory": row.get("max_batch_memory", 0), "max_batch": max_batch,
              "ttft_target_s": ttft_target, "tpot_target_s": tpot_target, "target_tokens_per_s": target,
              "gpus_available": gpus, "memory_utilization": memory_utilization}
    mem = model.memory(max(1, row.get("batch", 0) or 1))
    mem_out = {**mem, "capacity_bytes": hw.memory_capacity_bytes, "usable_bytes": usable,
               "memory_utilization": memory_utilization, "fits": fits}
    if not fits:
        more_tp = tp is not None or t < gpus_per_node
        message = "does not fit: " + row["reasons"][0] + (
            "; try a larger --tp, a device with more memory, or a shorter prompt + gen" if more_tp
            else "; try a device with more memory, a shorter prompt + gen, or tp across nodes")
        return ServingPlan(spec=spec, hw=hw, calibration=cal, config=config, links=links, latency={}, throughput={},
                           memory=mem_out, cost={}, fits=False, feasible=False, message=message,
                           candidates=candidates, notes=[])

    batch = row["batch"]
    latency = _serving_latency(model, batch, gen)
    tpot = latency["tpot_s"]
    notes: list = []
    throughput = _serve_throughput(model, batch, t, gen, target, gpus, notes)
    active = _active_experts(spec, batch, model.t_mean)
    if active is not None:
        config["active_experts_per_layer"] = active
    cost = _serve_cost(model, batch, t, prompt, gen, price, throughput["gpus"])
    if feasible:
        message = (f"tp {t}, batch {batch}: TTFT {model.ttft_s * 1e3:.3g} ms, TPOT {tpot * 1e3:.3g} ms, "
                   f"{throughput['output_tokens_per_s_per_replica'] / t:,.0f} output tokens/s per GPU")
    else:
        message = "targets not met: " + "; ".join(row["reasons"]) + " (showing the best plan that fits)"
    _serve_notes(spec, model, row, latency, prompt, gen, tpot_target, notes)
    return ServingPlan(spec=spec, hw=hw, calibration=cal, config=config, links=links, latency=latency,
                       throughput=throughput, memory=mem_out, cost=cost, fits=True, feasible=feasible,
                       message=message, candidates=candidates, notes=notes)


def _active_experts(spec, batch: int, context: int) -> Optional[float]:
    """Expected distinct experts read per MoE layer at decode (the Op list's tag), or None."""
    if spec.moe is None:
        return None
    from flopsim.count import count

    for op in count(spec, batch=batch, seq=1, phase="decode", context=context).ops:
        if "active_experts" in op.tags:
            return float(op.tags["active_experts"])
    return None
