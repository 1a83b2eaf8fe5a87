"""Serving plans (`plan_serving`): replicas, batch, latency, throughput and cost.

Serving (`plan_serving`): replicas of tp x pp x ep GPUs (flopsim.planning.serve_layouts:
tp tensor-parallel within an attention group; ep attention groups, MoE only, each with its
own batch, sharing the routed experts; pp pipeline stages, pp batches in flight as vLLM's
virtual engines), each engine -- a stage's batch of one group -- running continuous
batching of `batch` sequences; a request has a prompt of P tokens and generates G, each a
fixed length or a distribution (flopsim.planning.serve_lengths: the steady state, the
length-biased mean KV length T of a decode step, the p99 worst cases). The times and
memory of one replica (as is, with chunked prefill, or with speculative decoding; an
encoder-decoder's prompt is its encoder's input) are flopsim.planning.serve_model's, every
time the roofline of one GPU's sharded ops per stage (flopsim.planning.serve_steps):

- TTFT = the prefill of one prompt alone on the replica (no queueing): the sum of the
  stages' prefill times, each with its collectives (tp all-reduces and the logits'
  all-gather, ep all-to-alls) and its send to the next stage; with a distribution, the
  TTFT of the p99 prompt (what a target bounds) and the mean over prompts.
- TPOT = one decode step of an engine's batch at the mean KV length T (every op's time
  is linear in T while its bound does not change, so this is the average over the
  generation): its period, pp x the busiest stage's step. MoE decode reads the expected
  distinct experts of the ep groups' tokens, as the op list states them. Chunked prefill:
  the mean mixed step; speculative decoding: a draft-and-verify step / expected tokens.
- KV cache values in `precision.kv_cache` (`kv_dtype`), else the spec's dtype.
- Memory per GPU (the fullest stage): its stage's weights (flopsim.memory on the sharded
  list: matrices / tp, routed experts / (tp ep), norms whole), the KV cache of its layers
  for the pp x batch sequences that pass through it at the p99 of prompt + gen (KV heads
  split over min(tp, kv_heads), replicated beyond; a latent MLA cache whole on every rank)
  and the largest working set of a step, against `memory_utilization` (default 0.9,
  vLLM's gpu_memory_utilization) of the device's memory.
- Batch (an engine's): the largest batch that fits memory (and, with chunked prefill,
  whose prompts the chunks keep up with: serve_model's `batch_limit`) and meets the
  targets that grow with it (TPOT; TTFT too with chunked prefill: doubling, then
  bisection); when none does, the largest that meets TPOT alone, else 1, reported as
  missing. A target is met when the figure reported for it is within it: every row and
  the plan's message say met only then.
- Throughput: an engine's cycle serves `batch` requests (serve_model's `cycle`), a
  replica's pp x ep engines at once, so output tokens/s = engines x batch x E[G] / cycle;
  GPUs for a target = ceil(target / that) x replica GPUs.
- Cost: price x replica GPUs / 3600 per replica-second; per million output tokens
  (decode time only), per million input tokens (the rest of the cycle), and blended (all
  replica time / output tokens).
- Search: tp, pp and ep each given or tried (serve_layouts' candidates: powers of two, a
  replica within `gpus` or one node); the replica with the most output tokens/s per GPU
  that fits and meets the targets is chosen (the smaller replica on a tie); every replica
  tried is a row of `candidates`.
"""

from __future__ import annotations

import math
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Optional

from flopsim.planning.common import (DEFAULT_GPUS_PER_NODE, DEFAULT_MEMORY_UTILIZATION, MAX_SERVING_BATCH, _gb,
                                     _long_table, _non_negative, _positive, _positive_int, _Progress,
                                     largest_true)
from flopsim.planning.links import Links, resolve_links
from flopsim.planning.serve_inputs import _fraction
from flopsim.planning.serve_notes import serving_notes
from flopsim.planning.serve_model import serve_model
from flopsim.planning.serve_steps import StepCoster


@dataclass
class ServingPlan:
    """Serving `prompt` + `gen` token requests: the chosen replica (tp, pp, ep) and batch,
    latencies, throughput, GPUs and cost; `candidates` has one row per replica tried."""

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
    def pp(self) -> int:
        return self.config["pp"]

    @property
    def ep(self) -> int:
        return self.config["ep"]

    @property
    def gpus(self) -> Optional[int]:
        return self.throughput.get("gpus")

    def to_dict(self) -> dict:
        return {
            "kind": "serving", "model": self.spec.name, "family": self.spec.family, "hardware": self.hw.name,
            "dtype": self.spec.dtype, "precision": self.spec.precision_label,
            "kernel_impls": self.spec.kernel_impls, "calibration": self.calibration.source,
            "calibration_kind": self.calibration.kind, "calibration_label": self.calibration.provenance_label,
            "config": dict(self.config), "links": self.links.to_dict(), "latency": dict(self.latency),
            "throughput": dict(self.throughput), "memory": dict(self.memory), "cost": dict(self.cost),
            "fits": self.fits, "feasible": self.feasible, "message": self.message,
            "candidates": list(self.candidates), "notes": list(self.notes),
        }

    def table(self):
        """One row per figure (section, quantity, value): a long-format DataFrame."""
        return _long_table(self.to_dict(), ("config", "links", "latency", "throughput", "memory", "cost"))


def serve_layout(spec, phase: str, tp: int, links, *, pp: int = 1, ep: int = 1, stage: Optional[int] = None,
                 expert_load: float = 1.0, vocab_parallel: bool = True):
    """The layout of one GPU of a tp x pp x ep serving replica (stage `stage`, None: the
    last; flopsim.planning.serve_layouts), or None for one GPU."""
    from flopsim.planning.serve_layouts import Replica, replica_layout

    return replica_layout(spec, phase, Replica(tp, pp, ep), links.gpus_per_node, stage=stage,
                          expert_load=expert_load, torus_axis=links.torus_axis, vocab_parallel=vocab_parallel)


def _stage_predict(spec, hw, cal, links, phase, *, tp, pp, ep, stage, batch, seq, context, encoder_seq,
                   vocab_parallel=True):
    from flopsim.planning.serve_layouts import expert_load
    from flopsim.predict import predict

    layout = serve_layout(spec, phase, tp, links, pp=pp, ep=ep, stage=stage,
                          expert_load=expert_load(spec, ep, batch * seq), vocab_parallel=vocab_parallel)
    return predict(spec, hw, phase=phase, batch=batch, seq=seq, context=context, calibration=cal,
                   encoder_seq=encoder_seq, layout=layout, links=links.by_level)


def tp_prefill_s(spec, hw, cal, links, *, tp: int, batch: int, prompt: int, encoder_seq: Optional[int] = None,
                 pp: int = 1, ep: int = 1, stage: Optional[int] = None,
                 vocab_parallel: bool = True) -> tuple[float, Any]:
    """(seconds, PredictResult) of a prefill of `batch` prompts on one GPU of a tp x pp x ep
    replica: its sharded op list, collectives included (with pp: stage `stage`'s, None the
    last; an encoder-decoder's encoder over `encoder_seq` tokens a sequence, default `prompt`;
    `vocab_parallel` False: the embedding and LM head whole on each rank, flopsim.parallel.layout)."""
    r = _stage_predict(spec, hw, cal, links, "prefill", tp=tp, pp=pp, ep=ep, stage=stage, batch=batch, seq=prompt,
                       context=None, encoder_seq=encoder_seq, vocab_parallel=vocab_parallel)
    return r.time_s, r


def tp_decode_s(spec, hw, cal, links, *, tp: int, batch: int, context: int, encoder_seq: Optional[int] = None,
                pp: int = 1, ep: int = 1, stage: Optional[int] = None,
                vocab_parallel: bool = True) -> tuple[float, Any]:
    """(seconds, PredictResult) of one decode step of `batch` sequences at KV length `context` on
    one GPU of a tp x pp x ep replica (with pp: stage `stage`'s ops; an encoder-decoder's
    cross-attention over `encoder_seq` encoder tokens, default `context`; `vocab_parallel` as
    tp_prefill_s)."""
    if spec.is_encoder_decoder and encoder_seq is None:
        encoder_seq = context
    r = _stage_predict(spec, hw, cal, links, "decode", tp=tp, pp=pp, ep=ep, stage=stage, batch=batch, seq=1,
                       context=context, encoder_seq=encoder_seq, vocab_parallel=vocab_parallel)
    return r.time_s, r


def _usable_note(usable: float, hw) -> str:
    if usable >= hw.memory_capacity_bytes:
        return ""
    return f" ({_gb(usable)} usable at memory utilization {usable / hw.memory_capacity_bytes:g})"


def _misses(model, batch: int, ttft_target, tpot_target) -> list:
    """Why the figures reported at `batch` miss the targets (empty: every target met)."""
    reasons, on = [], model.replica.label
    if tpot_target is not None and model.tpot(batch) > tpot_target:
        reasons.append(f"TPOT at batch {batch} is {model.tpot(batch) * 1e3:.3g} ms on {on}, over the "
                       f"{tpot_target * 1e3:.3g} ms target")
    if ttft_target is not None and model.ttft(batch) > ttft_target:
        which = "" if model.prompt.fixed else f" (p99 prompt, {model.p_worst:,} tokens)"
        reasons.append(f"TTFT{which} {model.ttft(batch) * 1e3:.3g} ms on {on} is over the "
                       f"{ttft_target * 1e3:.3g} ms target")
    return reasons


def _serve_row(model, hw, usable: float, upper: int, ttft_target, tpot_target, bar) -> dict:
    """One replica: the largest batch memory allows, the largest that meets the targets
    (else that meets TPOT alone, else 1), and why it misses them (reasons, at the batch
    reported), with its latency and throughput."""
    r = model.replica
    row: dict = {"tp": r.tp, "pp": r.pp, "ep": r.ep, "gpus": r.gpus}
    b_mem = largest_true(model.fits, upper)
    row["max_batch_memory"] = b_mem
    if b_mem == 0:
        m = model.memory(1)
        row.update(batch=None, ttft_s=None, fits=False, meets=False, needs_bytes=m["total_bytes"])  # no latency
        row["reasons"] = [f"batch 1 needs {_gb(m['total_bytes'])} per GPU on {r.label}, device has "
                          f"{_gb(hw.memory_capacity_bytes)}{_usable_note(usable, hw)} "
                          f"(weights {_gb(m['weights_bytes'])}, KV cache "
                          f"{_gb(m['kv_cache_bytes'])}, activations {_gb(m['activations_bytes'])})"]
        return row
    limit = model.batch_limit()
    if limit is not None:
        row["max_batch_prefill"] = limit
    batch = b_mem if limit is None else min(b_mem, limit)
    if tpot_target is not None or ttft_target is not None:
        def meets(b, ttft=ttft_target):
            bar.advance(f"{r.label}: batch {b}", n=0)
            return not _misses(model, b, ttft, tpot_target)
        if not meets(batch):
            batch = largest_true(meets, batch) or largest_true(lambda b: meets(b, None), batch) or 1
    reasons = _misses(model, batch, ttft_target, tpot_target)
    th = model.throughput(batch)
    row.update(fits=True, batch=batch, ttft_s=model.ttft(batch), tpot_s=model.tpot(batch), meets=not reasons,
               reasons=reasons, output_tokens_per_s=th["output_tokens_per_s"],
               output_tokens_per_s_per_gpu=th["output_tokens_per_s"] / r.gpus)
    return row


def _serve_throughput(model, batch: int, target, gpus, notes: list) -> dict:
    """Throughput per replica, and replicas for a target rate or the GPUs available."""
    th, n = model.throughput(batch), model.replica.gpus
    per_replica = th["output_tokens_per_s"]
    out = {"output_tokens_per_s_per_replica": per_replica, "input_tokens_per_s_per_replica": th["input_tokens_per_s"],
           "output_tokens_per_s_per_gpu": per_replica / n,
           "decode_tokens_per_s_per_replica": model.replica.engines * batch / model.tpot(batch),
           "requests_per_s_per_replica": per_replica / model.gen.mean}
    if target is not None:
        replicas = math.ceil(target / per_replica)
        out.update(replicas=replicas, gpus=replicas * n, output_tokens_per_s=replicas * per_replica)
        if gpus is not None:
            out["gpus_available_meet_target"] = gpus // n * per_replica >= target
            if not out["gpus_available_meet_target"]:
                notes.append(f"{gpus} GPUs give {gpus // n * per_replica:,.0f} output tokens/s, short of the "
                             f"{target:,.0f} target: {replicas * n} GPUs are needed")
    elif gpus is not None:
        replicas = gpus // n
        out.update(replicas=replicas, gpus=replicas * n, output_tokens_per_s=replicas * per_replica)
    else:
        out.update(replicas=1, gpus=n, output_tokens_per_s=per_replica)
    return out


def _serve_cost(model, batch: int, price, gpus_used: int) -> dict:
    """Price per million output tokens (decode time) and input tokens (the rest of the
    cycle), blended (the whole cycle), and per hour; a replica's cycle serves engines x
    batch requests."""
    cost: dict = {"price_per_gpu_hour": price}
    if price is not None:
        per_s = price * model.replica.gpus / 3600
        cycle, gen = model.throughput(batch)["cycle_s"], model.gen.mean
        decode, served = gen * model.decode_token_s(batch), model.replica.engines * batch
        cost.update(
            per_million_output_tokens=per_s * decode / (served * gen) * 1e6,
            per_million_input_tokens=per_s * (cycle - decode) / (served * model.prompt.mean) * 1e6,
            per_million_output_tokens_blended=per_s * cycle / (served * gen) * 1e6,
            per_hour=price * gpus_used,
        )
    return cost


def _serving_latency(model, batch: int) -> dict:
    """Time to first token (of the p99 prompt, and the mean), time per output token (alone,
    and the mean time between tokens with other requests' prefills: the cycle / E[G]), a
    request's mean time, and the collectives within TTFT and TPOT by group (tp always; ep,
    pp where the replica has them)."""
    tpot, gen = model.tpot(batch), model.gen.mean
    comm, r = model.comm(batch), model.replica
    out = {"ttft_s": model.ttft(batch), "ttft_mean_s": model.ttft_mean(batch),
           "tpot_s": tpot, "tpot_with_prefills_s": model.throughput(batch)["cycle_s"] / gen,
           "request_s": model.ttft_mean(batch) + gen * tpot, "decode_step_s": model.decode_s(batch)}
    for group in ["tp"] + [g for g, n in (("ep", r.ep), ("pp", r.pp)) if n > 1]:
        out[f"ttft_{group}_comm_s"] = comm["ttft"].get(group, 0.0)
        out[f"tpot_{group}_comm_s"] = comm["tpot"].get(group, 0.0)
    if r.pp > 1:
        out["decode_stage_s"] = list(model.decode_stages(batch))
        out["prefill_stage_s"] = list(model.prefill_stages(model.p_worst))
    if hasattr(model, "draft"):
        out.update(speculative_step_s=model.step_s(batch), draft_decode_s=model.draft_decode_s(batch),
                   verify_s=model.verify_s(batch))
    return out


def _best_serving(evaluated: list) -> tuple:
    """((row, model) chosen, feasible, fits): the most output tokens/s per GPU among the
    replicas that meet the targets, else among those that fit (on a tie the smaller
    replica, then the smaller tp, then the fewer stages), else the last one tried (nothing fits)."""
    good = [(row, m) for row, m in evaluated if row.get("meets")]
    fitting = [(row, m) for row, m in evaluated if row.get("fits")]
    pool = good or fitting
    chosen = max(pool, key=lambda rm: (rm[0]["output_tokens_per_s_per_gpu"], -rm[0]["gpus"], -rm[0]["tp"],
                                       -rm[0]["pp"])) if pool else evaluated[-1]
    return chosen, bool(good), bool(fitting)


def _replicas(spec, hw, x, *, tp, pp, ep, gpus, gpus_per_node, interconnect_bytes_per_s) -> list:
    from flopsim.planning.serve_layouts import replica_candidates

    one = interconnect_bytes_per_s is None and hw.interconnect_bytes_per_s is None
    return replica_candidates(spec, x.draft, tp=tp, pp=pp, ep=ep, gpus=gpus, gpus_per_node=gpus_per_node,
                              one_gpu=one)


def _reachable(replicas: list, links, searched: bool, notes: list) -> list:
    """The replicas the links can lay out: without an inter-node figure, a searched replica
    whose groups span nodes is left out (a given one is costed, and fails on the missing figure)."""
    from flopsim.planning.serve_layouts import spans_nodes

    if links.scale_out is not None or not searched:
        return replicas
    kept = [r for r in replicas if not spans_nodes(r, links.gpus_per_node)]
    if len(kept) < len(replicas):
        notes.append(f"{len(replicas) - len(kept)} replicas spanning nodes left out: no inter-node link figure "
                     f"(give --inter-node)")
    return kept or replicas


def _config(x, model, row: dict, **given) -> dict:
    r = model.replica
    return {**x.config(model), "tp": r.tp, "pp": r.pp, "ep": r.ep, "replica_gpus": r.gpus,
            "engines": r.engines, "batch": row.get("batch", 0),
            "concurrent_sequences": (row.get("batch") or 0) * r.engines,
            "max_batch_memory": row.get("max_batch_memory", 0), "max_batch_prefill": row.get("max_batch_prefill"),
            **given}


def _no_fit_message(row: dict, gpus, given: tuple) -> str:
    bigger = "a larger --tp, --pp or --ep (or --gpus for a larger replica)" if gpus is None or \
        any(g is not None for g in given) else "more --gpus"
    return f"does not fit: {row['reasons'][0]}; try {bigger}, a device with more memory, or a shorter prompt + gen"


def plan_serving(spec, hw, *, prompt, gen, gpus: Optional[int] = None,
                 target_tokens_per_s: Optional[float] = None, ttft_s: Optional[float] = None,
                 tpot_s: Optional[float] = None, tp: Optional[int] = None, pp: Optional[int] = None,
                 ep: Optional[int] = None, max_batch: Optional[int] = None,
                 memory_utilization: float = DEFAULT_MEMORY_UTILIZATION,
                 price_per_gpu_hour: Optional[float] = None, interconnect_bytes_per_s: Optional[float] = None,
                 inter_node_bytes_per_s: Optional[float] = None, gpus_per_node: Optional[int] = None,
                 comm_latency_s: Optional[float] = None, chunk: Optional[int] = None, draft=None,
                 draft_len: Optional[int] = None, acceptance: Optional[float] = None,
                 kv_dtype: Optional[str] = None, calibration=None, vocab_parallel: bool = True,
                 progress: bool = False) -> ServingPlan:
    """Plan serving requests of `prompt` prompt tokens and `gen` generated tokens, each an
    int or a distribution (flopsim.planning.serve_lengths: "uniform:A:B",
    "lognormal:MEDIAN:SIGMA", a CSV histogram path) (see the module docstring).
    `target_tokens_per_s`: output tokens/s to sustain (-> GPUs needed); `gpus`: GPUs
    available (-> throughput they give); `ttft_s` / `tpot_s`: latency targets; `tp`, `pp`,
    `ep`: a replica's tensor, pipeline and expert-parallel degrees (each not given is
    searched); `max_batch`: an engine's largest batch; `chunk`: chunked prefill, prompt
    tokens per step; `draft` (a spec), `draft_len` (k) and `acceptance` (a): speculative
    decoding (Leviathan et al. 2023); `kv_dtype`: the KV cache's dtype; `vocab_parallel`
    False: the embedding and LM head whole on every tensor-parallel rank (gpt-fast), not
    split over the vocabulary with the logits gathered (Megatron-LM, vLLM, TensorRT-LLM)."""
    from flopsim.calibration import load_calibration
    from flopsim.hardware import load_hardware
    from flopsim.planning.serve_inputs import serving_inputs

    hw = load_hardware(hw)
    x = serving_inputs(spec, prompt, gen, chunk, draft, draft_len, acceptance, kv_dtype)
    spec, cal = x.spec, load_calibration(calibration, hw)
    gpus = None if gpus is None else _positive_int("gpus", gpus)
    target = _positive("target_tokens_per_s", target_tokens_per_s)
    ttft_target, tpot_target = _positive("ttft_s", ttft_s), _positive("tpot_s", tpot_s)
    price = _non_negative("price", price_per_gpu_hour)
    usable = _fraction("memory_utilization", memory_utilization) * hw.memory_capacity_bytes
    upper = MAX_SERVING_BATCH if max_batch is None else _positive_int("max_batch", max_batch)
    gpus_per_node = _positive_int("gpus_per_node", gpus_per_node if gpus_per_node is not None
                                  else (hw.scale_up_domain or DEFAULT_GPUS_PER_NODE))
    replicas = _replicas(spec, hw, x, tp=tp, pp=pp, ep=ep, gpus=gpus, gpus_per_node=gpus_per_node,
                         interconnect_bytes_per_s=interconnect_bytes_per_s)
    links = resolve_links(hw, cal, interconnect_bytes_per_s, inter_node_bytes_per_s, gpus_per_node, comm_latency_s,
                          needed=max(r.gpus for r in replicas) > 1)
    notes: list = []
    replicas = _reachable(replicas, links, None in (tp, pp, ep), notes)

    evaluated, steps = [], StepCoster(spec, hw, cal, links, vocab_parallel=vocab_parallel)
    with closing(_Progress(progress, "serving plan", total=len(replicas))) as bar:
        for r in replicas:
            bar.advance(f"{r.label}: batch search", n=0)
            model = serve_model(spec, hw, cal, links, replica=r, prompt=x.prompt, gen=x.gen, usable_bytes=usable,
                                chunk=x.chunk, draft=x.draft, steps=steps)
            evaluated.append((_serve_row(model, hw, usable, upper, ttft_target, tpot_target, bar), model))
            bar.advance()
    (row, model), feasible, fits = _best_serving(evaluated)
    candidates = [{k: v for k, v in r.items() if k != "reasons"} | {"reasons": "; ".join(r.get("reasons", []))}
                  for r, _ in evaluated]
    config = _config(x, model, row, max_batch=max_batch, ttft_target_s=ttft_target, tpot_target_s=tpot_target,
                     target_tokens_per_s=target, gpus_available=gpus, memory_utilization=memory_utilization,
                     vocab_parallel=vocab_parallel)
    mem = model.memory(max(1, row.get("batch", 0) or 1))
    mem_out = {**mem, "capacity_bytes": hw.memory_capacity_bytes, "usable_bytes": usable,
               "memory_utilization": memory_utilization, "fits": fits}
    if not fits:
        message = _no_fit_message(row, gpus, given=(tp, pp, ep))
        return ServingPlan(spec=spec, hw=hw, calibration=cal, config=config, links=links, latency={}, throughput={},
                           memory=mem_out, cost={}, fits=False, feasible=False, message=message,
                           candidates=candidates, notes=notes)

    batch = row["batch"]
    latency = _serving_latency(model, batch)
    throughput = _serve_throughput(model, batch, target, gpus, notes)
    if (active := _active_experts(spec, batch * model.replica.ep, model.t_mean)) is not None:
        config["active_experts_per_layer"] = active
    cost = _serve_cost(model, batch, price, throughput["gpus"])
    if feasible:
        message = (f"{model.replica.label}, batch {batch}: TTFT {latency['ttft_s'] * 1e3:.3g} ms, TPOT "
                   f"{latency['tpot_s'] * 1e3:.3g} ms, {throughput['output_tokens_per_s_per_gpu']:,.0f} output "
                   f"tokens/s per GPU")
    else:
        message = "targets not met: " + "; ".join(row["reasons"]) + " (showing the best plan that fits)"
    notes += serving_notes(x, model, row, latency, tpot_target)
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
