"""Wall-clock predictions: a model's Op list for a phase, costed on a device
with the roofline (flopsim.roofline), op by op, and summed.

Phases (token arguments as in flopsim.count):
- `train`: one optimizer step = the forward and backward ops the family
  lists (autograd's order) + one optimizer-update op (flopsim.ops.optimizer;
  Adam by default: 28 bytes moved per parameter in bf16, 11 FLOPs).
  tokens = batch * seq.
- `forward`: the whole sequence, head on every position. tokens = batch * seq.
- `prefill`: a prompt of `seq` tokens per sequence (attending to `context`
  keys, default seq), writing the KV cache. tokens = batch * seq.
- `decode`: one new token for each of `batch` sequences attending to
  `context` cached keys (default seq). tokens = batch.

Conditional models' decode costs (expected distinct experts, MoD blocks that
run, sparse-FF units read) are in the families' ops; the roofline only
consumes op bytes and FLOPs.

Totals: `time_s` = sum of op times: ops run one after another on the
device; on a device that queues kernels the host's dispatch overlaps the
device's work and each op's time is its share of that pipeline
(flopsim.roofline.overlap_times);
`bound` = compute when the compute-bound ops take at least as long as the
memory-bound ones (launch overheads aside; collectives, bound "comm", are
`comm_s`); `tokens_per_s` = tokens / time_s;
`mfu` = flops / (time_s * peak) with `flops` the model FLOPs as counted
(FlopCounterMode's convention) and peak the dtype's dense peak.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

from flopsim.count import OpTotals
from flopsim.errors import InputError


def phase_ops(spec, phase: str, *, symbolic: bool = False, optimizer: str = "adam",
              grad_bytes: Optional[int] = None, master_weights: Optional[bool] = None,
              grad_accumulation: str = "autograd", grad_reduce_dtype: Optional[str] = None,
              microbatches: int = 1) -> list:
    """The ops one step of `phase` runs: the family's ops, plus in `train` the
    gradient accumulation of a step of `microbatches` micro-batches (flopsim.ops.grad_accum:
    its op x the micro-batches that pay it; autograd's form pays none of one) and the
    optimizer update (their parameter count summed from the same ops)."""
    from flopsim.families import build_ops
    from flopsim.ops import grad_accum
    from flopsim.ops.optimizer import optimizer_update

    ops = build_ops(spec, phase, symbolic=symbolic)
    if phase == "train":
        params = sum((op.params for op in ops if op.pass_ == "fwd"), 0)
        g = spec.dtype_bytes if grad_bytes is None else grad_bytes
        paying = grad_accum.paying_microbatches(grad_accumulation, microbatches)
        acc = grad_accum.grad_accumulation(params, grad_accumulation, grad_bytes=g, layer=spec.blocks + 1,
                                           buffer_bytes=grad_accum.reduce_bytes(grad_reduce_dtype, g))
        ops = ops + [op.scaled(paying) for op in acc if paying]
        ops = ops + optimizer_update(params, weight_bytes=spec.dtype_bytes, layer=spec.blocks + 1,
                                     optimizer=optimizer, grad_bytes=grad_bytes, master_weights=master_weights)
    return ops


def tokens_of(phase: str, batch, seq):
    """Tokens one step of `phase` processes (decode: one per sequence)."""
    return batch if phase == "decode" else batch * seq


@dataclass
class PredictResult(OpTotals):
    """One model, phase and shape on one device. Totals are properties; `.ops` per op."""

    spec: Any
    hw: Any
    phase: str
    batch: int
    seq: int
    context: int
    calibration: Any
    optimizer: str
    ops: list = field(default_factory=list)  # list[flopsim.roofline.OpTime]
    encoder_seq: Optional[int] = None  # an encoder-decoder's encoder tokens per sequence
    layout: Any = None  # flopsim.parallel.Layout: the ops are one GPU's under it

    @property
    def time_s(self) -> float:
        return self.total("time_s")

    @property
    def compute_bound_s(self) -> float:
        return sum(max(op.compute_s, op.memory_s) for op in self.ops if op.bound == "compute")

    @property
    def memory_bound_s(self) -> float:
        return sum(max(op.compute_s, op.memory_s) for op in self.ops if op.bound == "memory")

    @property
    def overhead_s(self) -> float:
        return self.total("overhead_s")

    @property
    def bound(self) -> str:
        return "compute" if self.compute_bound_s >= self.memory_bound_s else "memory"

    @property
    def tokens(self) -> int:
        return tokens_of(self.phase, self.batch, self.seq)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.time_s if self.time_s > 0 else float("inf")

    @property
    def peak_flops_per_s(self) -> float:
        return self.hw.peak_flops_per_s_for(self.spec.compute_dtype)[0]

    @property
    def mfu(self) -> float:
        return self.flops / (self.time_s * self.peak_flops_per_s) if self.time_s > 0 else 0.0

    def table(self):
        """One row per op (pandas DataFrame): costs, roofline terms, bound."""
        import pandas as pd

        return pd.DataFrame([op.to_dict() for op in self.ops])

    def per_layer(self):
        """Time, FLOPs and bytes per layer (pandas DataFrame)."""
        from flopsim.count import layer_label

        table = self.table()
        sums = table.groupby("layer", sort=True)[["time_s", "flops", "bytes"]].sum()
        sums.insert(0, "part", [layer_label(layer, self.spec) if layer <= self.spec.blocks else "optimizer"
                                for layer in sums.index])
        return sums.reset_index()

    def summary(self) -> dict:
        return {
            "model": self.spec.name, "family": self.spec.family, "hardware": self.hw.name,
            "phase": self.phase, "batch": self.batch, "seq": 1 if self.phase == "decode" else self.seq,
            "context": self.context,
            "dtype": self.spec.dtype, "precision": self.spec.precision_label,
            "kernel_impls": self.spec.kernel_impls, "calibration": self.calibration.source,
            "calibration_kind": self.calibration.kind, "calibration_label": self.calibration.provenance_label,
            "time_s": self.time_s, "flops": self.flops, "all_flops": self.all_flops, "bytes": self.bytes,
            "bound": self.bound, "tokens_per_s": self.tokens_per_s, "mfu": self.mfu,
            "compute_bound_s": self.compute_bound_s, "memory_bound_s": self.memory_bound_s,
            "overhead_s": self.overhead_s, "peak_flops_per_s": self.peak_flops_per_s,
            "host_s": self.total("host_s"), "device_s": self.total("device_s"), "fresh_s": self.total("fresh_s"),
            # kernel launches a step (an op may run several: the eager norm's 24; an MoD block's
            # ops launch with the probability that any token takes it) and the ops that run
            "kernels": sum(op.kernels for op in self.ops if op.time_s > 0),
            "ops": sum(1 for op in self.ops if op.time_s > 0), "comm_s": self.total("comm_s"),
            **({"layout": self.layout.describe()} if self.layout is not None else {}),
            **({"encoder_seq": self.encoder_seq} if self.encoder_seq is not None else {}),
        }

    def to_dict(self, ops: bool = True) -> dict:
        out = self.summary()
        if ops:
            out["ops"] = [op.to_dict() for op in self.ops]
        return out


def predict(spec, hw, *, phase: str = "forward", batch: int = 1, seq: int = 1024,
            context: Optional[int] = None, calibration=None, optimizer: str = "adam",
            encoder_seq: Optional[int] = None, layout=None, links: Optional[dict] = None,
            grad_accumulation: str = "autograd", grad_reduce_dtype: Optional[str] = None) -> PredictResult:
    """Predicted time of one step of `phase` of `spec` (ModelSpec, path or preset)
    on `hw` (HardwareSpec, path or preset). `calibration`: None/"auto" (the
    device's specs/calibration file, else ideal), "ideal", a path or a Calibration.
    `encoder_seq`: an encoder-decoder's encoder tokens per sequence (default `seq`).
    `layout` (flopsim.parallel.Layout): one GPU's ops of that layout (`batch` is then the
    micro-batch; its collectives run in sequence, none hidden: flopsim.planning applies
    overlap), on the calibration's link levels or `links` ({level: LinkLevel}).
    `grad_accumulation`, `grad_reduce_dtype` (train): flopsim.ops.grad_accum's form (a step of
    one micro-batch: only `main_grad` adds an op) and the data-parallel reduction's dtype."""
    from flopsim.calibration import load_calibration
    from flopsim import opcache
    from flopsim.count import token_numbers
    from flopsim.hardware import load_hardware
    from flopsim.roofline import in_sequence, op_times
    from flopsim.spec import load_model

    spec = load_model(spec)
    hw = load_hardware(hw)
    cal = load_calibration(calibration, hw)
    numbers = token_numbers(spec, phase, batch, seq, context, encoder_seq)
    if layout is not None and not layout.trivial:
        from flopsim.count import evaluate_ops, token_values
        from flopsim.parallel.shard import shard

        from flopsim.ops.grad_accum import reduce_bytes

        ops = shard(phase_ops(spec, phase, optimizer=optimizer, grad_accumulation=grad_accumulation,
                              grad_reduce_dtype=grad_reduce_dtype), spec, phase, layout,
                    grad_bytes_per_param=reduce_bytes(grad_reduce_dtype, spec.dtype_bytes))
        costs = evaluate_ops(ops, token_values(spec, phase, batch, seq, context, encoder_seq))
    else:
        options = f"optimizer={optimizer}" + ("" if grad_accumulation == "autograd" and grad_reduce_dtype is None
                                              else f",grad_accumulation={grad_accumulation},"
                                                   f"grad_reduce_dtype={grad_reduce_dtype}")
        costs = opcache.costs(spec, phase, numbers, lambda: phase_ops(
            spec, phase, optimizer=optimizer, grad_accumulation=grad_accumulation,
            grad_reduce_dtype=grad_reduce_dtype), options=options)
    times = in_sequence(op_times(costs, hw, spec.compute_dtype, cal, links, train=phase == "train"))
    return PredictResult(spec=spec, hw=hw, phase=phase, batch=batch, seq=seq, context=numbers["T"],
                         calibration=cal, optimizer=optimizer, ops=times, encoder_seq=numbers.get("S_enc"),
                         layout=layout)


@dataclass
class CompareResult:
    """Several specs on one device, one row per (phase, spec); speedup is the
    first spec's time over each spec's time, within a phase. Each row names the
    device and the calibration it was priced on (source and kind)."""

    results: list  # list[PredictResult], phase-major

    @property
    def rows(self) -> list[dict]:
        out = []
        base: dict[str, PredictResult] = {}
        for r in self.results:
            first = base.setdefault(r.phase, r)
            out.append({
                "phase": r.phase, "name": r.spec.name, "family": r.spec.family,
                "time_s": r.time_s, "flops": r.flops, "bytes": r.bytes, "bound": r.bound,
                "tokens_per_s": r.tokens_per_s, "mfu": r.mfu,
                "speedup": first.time_s / r.time_s if r.time_s > 0 else float("inf"),
                "flops_ratio": r.flops / first.flops if first.flops else float("nan"),
                "hardware": r.hw.name, "calibration": r.calibration.source, "calibration_kind": r.calibration.kind,
            })
        return out

    def table(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def to_dict(self) -> list[dict]:
        return self.rows


def compare(specs: Sequence, hw, *, phase: str | Iterable[str] = "forward", batch: int = 1, seq: int = 1024,
            context: Optional[int] = None, calibration=None, optimizer: str = "adam",
            encoder_seq: Optional[int] = None) -> CompareResult:
    """`predict` for each spec (and each phase when `phase` is a list); see CompareResult.
    `encoder_seq` applies to the encoder-decoders among the specs."""
    from flopsim.calibration import load_calibration
    from flopsim.hardware import load_hardware
    from flopsim.spec import load_model

    if not specs:
        raise InputError("compare: give at least one spec")
    phases = [phase] if isinstance(phase, str) else list(phase)
    if not phases:
        raise InputError("phase: give at least one phase")
    hw = load_hardware(hw)
    cal = load_calibration(calibration, hw)
    specs = [load_model(spec) for spec in specs]
    results = [predict(spec, hw, phase=p, batch=batch, seq=seq, context=context, calibration=cal,
                       optimizer=optimizer, encoder_seq=encoder_seq if spec.is_encoder_decoder else None)
               for p in phases for spec in specs]
    return CompareResult(results=results)


from flopsim._callable import make_module_callable  # noqa: E402

make_module_callable(__name__, "predict")
