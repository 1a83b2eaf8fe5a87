"""Layout search for a training run (`search_training`, `flopsim plan train --search`):
every tensor x pipeline x data (x expert) layout of each GPU count, every
micro-batch, ZeRO stage and recomputation choice; the layouts that fit memory
are costed, the fastest first, with the Pareto front of (GPUs, days, cost).

Candidates for G GPUs (N nodes of `gpus_per_node`): tp a power of two up to
the node dividing the heads; pp a divisor of the blocks; dp = G / (tp * pp);
with pp > 1 the interleaved schedule's 2, 3 or 4 chunks a stage where they
divide the blocks; an encoder-decoder's pp where its default encoder stages
(flopsim.parallel.layout) divide the encoder's blocks and the rest the
decoder's (train.pipeline_fits_blocks), plain 1F1B only, and one
`encoder_seq` for all;
ep (MoE) a divisor of the experts and of dp; under ZeRO, both the state
sharded over all dp ranks and, where dp spans nodes, hybrid sharding over the
dp ranks of one node (`zero_shard` = gpus_per_node / tp, replicated over the
nodes: HSDP, whose gathers stay on NVLink while FSDP's over a thousand ranks
pay each ring step between nodes, flopsim.collectives); micro-batches from
`micro_batches`; one global batch for all (a training hyperparameter, not a
layout choice): the one given, else ~4M tokens (ceil(4 Mi / a sequence's
tokens) sequences, an encoder-decoder's encoder_seq + seq);
layouts whose dp * micro-batch does not divide it are skipped.

Each layout is costed exactly as `plan_training` costs it (the same memory
formula, the same per-layer costs of the sharded op lists,
flopsim.planning.layer_costs, and the same step schedule): an op list is
sharded once per (tp, ep), evaluated once per micro-batch and each distinct
op costed once; what varies with pp, dp, ZeRO and recomputation is sums over
the cached per-layer arrays. `benchmarks/plan_search.py` prints the time.

Pareto front: a fitting layout is on it when no other fitting layout is at
least as good in GPUs, days and cost (GPU-hours without a price) and better
in one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from flopsim.errors import InputError, bad_value
from flopsim.ops.fields import RECOMPUTE_MODES
from flopsim.planning.common import _positive, _positive_int

DEFAULT_MICRO_BATCHES = (1, 2, 4, 8)
ZERO_STAGES = (0, 1, 2, 3)
RECOMPUTE = RECOMPUTE_MODES
VIRTUAL_STAGES = (1, 2, 3, 4)  # the interleaved schedule's chunks a stage tried (pp > 1, dividing the blocks)
MAX_LAYOUTS = 200_000


@dataclass
class SearchResult:
    """Every layout tried (`rows`), the fitting ones fastest first (`fastest`) and the Pareto front."""

    spec: Any
    hw: Any
    calibration: Any
    rows: list
    fastest: list
    pareto: list
    elapsed_s: float
    notes: list = field(default_factory=list)

    @property
    def best(self) -> Optional[dict]:
        return self.fastest[0] if self.fastest else None

    def to_dict(self) -> dict:
        return {"kind": "training_search", "model": self.spec.name, "hardware": self.hw.name,
                "calibration": self.calibration.source, "calibration_kind": self.calibration.kind,
                "calibration_label": self.calibration.provenance_label, "layouts": len(self.rows),
                "fitting": len(self.fastest), "elapsed_s": self.elapsed_s, "fastest": self.fastest,
                "pareto": self.pareto, "notes": list(self.notes)}


def _powers_of_two(upper: int) -> list[int]:
    out, t = [], 1
    while t <= upper:
        out.append(t)
        t *= 2
    return out


def candidate_layouts(spec, gpus: int, gpus_per_node: int, micro_batches: Sequence[int], zeros: Sequence[int],
                      recomputes: Sequence[str]) -> list[dict]:
    """Every layout of `gpus` GPUs (see the module docstring), as keyword dicts."""
    from flopsim.planning.train import pipeline_fits_blocks

    experts = spec.moe.experts if spec.moe is not None else 1
    out = []
    for tp in (t for t in _powers_of_two(min(gpus_per_node, gpus)) if spec.heads % t == 0):
        for pp in (p for p in range(1, spec.blocks + 1) if pipeline_fits_blocks(spec, p) and gpus % (tp * p) == 0):
            dp = gpus // (tp * pp)
            chunks = [v for v in VIRTUAL_STAGES if v == 1 or (pp > 1 and pipeline_fits_blocks(spec, pp, v))]
            for ep in (e for e in range(1, experts + 1) if experts % e == 0 and dp % e == 0):
                for v in chunks:
                    for mb in micro_batches:
                        for zero in zeros:
                            for shard in _zero_shards(zero, dp, ep, tp, gpus_per_node):
                                for rc in recomputes:
                                    out.append(dict(gpus=gpus, tp=tp, pp=pp, dp=dp, ep=ep, virtual_stages=v,
                                                    micro_batch=mb, zero=zero, zero_shard=shard, recompute=rc))
    return out


def _zero_shards(zero: int, dp: int, ep: int, tp: int, gpus_per_node: int) -> list:
    """ZeRO's shard groups tried: all dp ranks (None) and, where dp spans nodes, the dp
    ranks of one node (gpus_per_node / tp, when it divides dp; not with expert parallelism,
    flopsim.parallel.layout.checked_zero_shard)."""
    node = max(1, gpus_per_node // tp)
    if not zero or ep > 1 or not 1 < node < dp or dp % node:
        return [None]
    return [None, node]


def _checked_choices(micro_batches, zero, recompute) -> tuple:
    mbs = [_positive_int("micro_batches", m) for m in micro_batches]
    for z in zero:
        if isinstance(z, bool) or z not in ZERO_STAGES:
            raise bad_value("zero", z, "expected ZeRO stages among 0, 1, 2, 3")
    for r in recompute:
        if r not in RECOMPUTE:
            raise bad_value("recompute", r, "expected none, selective, cheap or full")
    for name, chosen in (("micro_batches", mbs), ("zero", zero), ("recompute", recompute)):
        if not chosen:
            raise bad_value(name, "", "give at least one choice to search")
    return mbs, list(zero), list(recompute)


def pareto_front(rows: list[dict]) -> list[dict]:
    """The rows no other row beats in GPUs, days and cost (GPU-hours without a price), by GPUs."""
    def key(r):
        return (r["gpus"], r["days"], r["cost"] if r["cost"] is not None else r["gpu_hours"])

    front = []
    for r in rows:
        a = key(r)
        if not any(all(x <= y for x, y in zip(key(o), a)) and key(o) != a for o in rows):
            front.append(r)
    seen, out = set(), []
    for r in sorted(front, key=key):
        if key(r) not in seen:
            seen.add(key(r))
            out.append(r)
    return out


class _Costing:
    """What every layout of one search shares: the sharded model, the activations per
    (micro-batch, recomputation), the routing figures and the FLOPs per micro-batch."""

    def __init__(self, spec, hw, cal, links, *, seq: int, optimizer: str, dp_overlap: float, tp_overlap: float,
                 encoder_seq=None, grad_accumulation: str = "autograd", grad_reduce_dtype=None):
        from flopsim.memory import MemoryModel
        from flopsim.planning.layer_costs import ShardedModel
        from flopsim.planning.train import _param_split

        self.spec, self.hw, self.cal, self.links, self.seq = spec, hw, cal, links, seq
        self.encoder_seq = encoder_seq
        self.dp_overlap, self.tp_overlap, self.optimizer = dp_overlap, tp_overlap, optimizer
        self._memory = {rc: MemoryModel(spec, "train", recompute=rc, optimizer=optimizer, encoder_seq=encoder_seq)
                        for rc in RECOMPUTE}
        self.bpp = self._memory["none"].bytes_per_param
        self.model = ShardedModel(spec, hw, cal, links, optimizer=optimizer, bytes_per_param=self.bpp,
                                  encoder_seq=encoder_seq, grad_accumulation=grad_accumulation,
                                  grad_reduce_dtype=grad_reduce_dtype)
        self.grad_accumulation = grad_accumulation
        self.params, self.params_expert = _param_split(spec)
        self._flops: dict = {}
        self._routing: dict = {}
        self._acts: dict = {}

    def activations(self, c: dict):
        """One micro-batch's activations of layout `c` (flopsim.planning.train._activations), cached."""
        from flopsim.planning.train import _activations

        key = (c["micro_batch"], c["recompute_mode"], c["pp"] if self.spec.is_encoder_decoder else 1)
        if key not in self._acts:
            self._acts[key] = _activations(self.spec, c, self._memory[c["recompute_mode"]])
        return self._acts[key]

    def flops(self, micro_batch: int) -> float:
        from flopsim.count import count

        if micro_batch not in self._flops:
            self._flops[micro_batch] = count(self.spec, batch=micro_batch, seq=self.seq, encoder_seq=self.encoder_seq,
                                             phase="train").flops
        return self._flops[micro_batch]

    def evaluate(self, layout: dict, global_batch: int, tokens: float, price) -> dict:
        """One layout's row: memory, and when it fits its step, days, GPU-hours, cost and MFU,
        by plan_training's own functions."""
        from flopsim.planning.train import _stage_list, _train_memory, _train_totals, routing_figures
        from flopsim.ops.grad_accum import paying_microbatches
        from flopsim.parallel.layout import default_encoder_stages
        from flopsim.planning.train_step import step_schedule

        enc = default_encoder_stages(self.spec, layout["pp"]) if self.spec.is_encoder_decoder and layout["pp"] > 1 \
            else None
        c = dict(layout, seq=self.seq, encoder_seq=self.encoder_seq, seq_tokens=self.seq + (self.encoder_seq or 0),
                 global_batch=global_batch, encoder_stages=enc,
                 microbatches=global_batch // (layout["dp"] * layout["micro_batch"]),
                 recompute_mode=layout["recompute"])
        mem = _train_memory(self.params - self.params_expert, self.params_expert, self.bpp, self.activations(c),
                            tp=c["tp"], pp=c["pp"], dp=c["dp"], ep=c["ep"], zero=c["zero"],
                            microbatches=c["microbatches"], virtual_stages=c["virtual_stages"],
                            zero_shard=c.get("zero_shard"))
        row = {**layout, "global_batch": global_batch, "microbatches": c["microbatches"],
               **({"encoder_stages": enc} if self.spec.is_encoder_decoder else {}),
               "memory_gb": mem["total_bytes"] / 1e9, "fits": mem["total_bytes"] <= self.hw.memory_capacity_bytes}
        if not row["fits"]:
            return row
        key = (layout["micro_batch"], layout["ep"])
        if key not in self._routing:
            self._routing[key] = routing_figures(self.spec, c)
        c.update(self._routing[key])
        sched = step_schedule(_stage_list(self.model, c), c["microbatches"], c["pp"], self.tp_overlap,
                              self.dp_overlap, c["virtual_stages"],
                              paying_microbatches(self.grad_accumulation, c["microbatches"]),
                              self.cal.collective_sm_share)
        t = _train_totals(self.flops(layout["micro_batch"]), self.spec, self.hw, c, tokens, sched["step_s"], price)
        row.update(step_time_s=t["step_time_s"], days=t["days"], gpu_hours=t["gpu_hours"], cost=t["cost"],
                   mfu=t["mfu"], tokens_per_s_per_gpu=t["tokens_per_s_per_gpu"], bubble_s=sched["bubble_s"],
                   dp_exposed_s=sched["dp_exposed_s"])
        return row


def search_training(spec, hw, *, gpus, tokens: float, seq: Optional[int] = None,
                    global_batch: Optional[int] = None, global_batch_tokens: Optional[float] = None,
                    micro_batches: Sequence[int] = DEFAULT_MICRO_BATCHES, zero: Sequence[int] = ZERO_STAGES,
                    recompute: Sequence[str] = RECOMPUTE, optimizer: str = "adam", dp_overlap: float = 1.0,
                    tp_overlap: float = 0.0, price_per_gpu_hour: Optional[float] = None, calibration=None,
                    interconnect_bytes_per_s: Optional[float] = None, inter_node_bytes_per_s: Optional[float] = None,
                    gpus_per_node: Optional[int] = None, comm_latency_s: Optional[float] = None,
                    progress: bool = False, encoder_seq: Optional[int] = None, grad_accumulation: str = "autograd",
                    grad_reduce_dtype: Optional[str] = None) -> SearchResult:
    """Search the layouts of a training run on `gpus` (an int or several) x `hw` (see the
    module docstring); the other arguments as plan_training's."""
    from flopsim.calibration import load_calibration
    from flopsim.count import token_values
    from flopsim.hardware import load_hardware
    from flopsim.ops.optimizer import get_optimizer
    from flopsim.planning.common import DEFAULT_GLOBAL_BATCH_TOKENS, DEFAULT_SEQ, _non_negative, _Progress
    from flopsim.planning.links import resolve_links
    from flopsim.planning.train import _encoder_tokens, _global_batch, check_engine, interleaving_runs
    from flopsim.spec import load_model

    start = time.perf_counter()
    spec, hw = load_model(spec), load_hardware(hw)
    cal = load_calibration(calibration, hw)
    counts = sorted({_positive_int("gpus", g) for g in ([gpus] if isinstance(gpus, int) else gpus)})
    if not counts:
        raise bad_value("gpus", gpus, "give at least one GPU count")
    tokens, price = _positive("tokens", tokens), _non_negative("price", price_per_gpu_hour)
    get_optimizer(optimizer)
    check_engine(grad_accumulation, grad_reduce_dtype)
    mbs, zeros, rcs = _checked_choices(micro_batches, zero, recompute)
    seq = min(DEFAULT_SEQ, spec.max_seq) if seq is None else _positive_int("seq", seq)
    encoder_seq = _encoder_tokens(token_values(spec, "train", 1, seq, encoder_seq=encoder_seq))
    seq_tokens = seq + (encoder_seq or 0)
    links = resolve_links(hw, cal, interconnect_bytes_per_s, inter_node_bytes_per_s, gpus_per_node, comm_latency_s,
                          needed=max(counts) > 1)
    if global_batch is None and global_batch_tokens is None:  # one global batch for every layout
        global_batch = math.ceil(DEFAULT_GLOBAL_BATCH_TOKENS / seq_tokens)
    layouts = [lay for g in counts for lay in candidate_layouts(spec, g, links.gpus_per_node, mbs, zeros, rcs)]
    if len(layouts) > MAX_LAYOUTS:
        raise bad_value("gpus", gpus, f"gives {len(layouts):,} layouts, over {MAX_LAYOUTS:,}: narrow the search")
    costing = _Costing(spec, hw, cal, links, seq=seq, optimizer=optimizer, dp_overlap=float(dp_overlap),
                       tp_overlap=float(tp_overlap), encoder_seq=encoder_seq, grad_accumulation=grad_accumulation,
                       grad_reduce_dtype=grad_reduce_dtype)
    rows, notes = [], []
    bar = _Progress(progress, f"searching {len(layouts):,} layouts", total=len(layouts))
    try:
        for lay in layouts:
            bar.advance()
            try:
                gb = _global_batch(seq_tokens, lay["dp"], lay["micro_batch"], global_batch, global_batch_tokens)
            except InputError:  # the global batch does not divide over this layout
                continue
            if not interleaving_runs(lay["pp"], gb // (lay["dp"] * lay["micro_batch"]), lay["virtual_stages"]):
                continue
            rows.append(costing.evaluate(lay, gb, tokens, price))
    finally:
        bar.close()
    fitting = sorted((r for r in rows if r["fits"]), key=lambda r: (r["days"], r["gpus"], r["memory_gb"]))
    if not fitting:
        notes.append(f"no layout of {', '.join(map(str, counts))} GPUs fits {hw.name}'s memory: add GPUs")
    return SearchResult(spec=spec, hw=hw, calibration=cal, rows=rows, fastest=fitting, pareto=pareto_front(fitting),
                        elapsed_s=time.perf_counter() - start, notes=notes)
