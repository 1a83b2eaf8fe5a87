"""Serving plans (`plan_serving`): replicas, batch, latency, throughput and cost.

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
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Optional

from flopsim.errors import InputError, bad_value
from flopsim.planning.common import (DEFAULT_GPUS_PER_NODE, DEFAULT_MEMORY_UTILIZATION, MAX_SERVING_BATCH, _gb,
                                     _long_table, _non_negative, _positive, _positive_int, _Progress,
                                     _split_s, largest_true)
from flopsim.planning.links import Links, resolve_links
from flopsim.planning.train import _single_stack


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
    links = resolve_links(hw, cal, interconnect_bytes_per_s, inter_node_bytes_per_s, gpus_per_node, comm_latency_s,
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
