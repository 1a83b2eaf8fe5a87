"""The roofline: an op's time on a device from its FLOPs and bytes.

One formula, written once (`roofline_time`), used by predict (numbers) and
sweep (numpy arrays):

    compute_s = executed_flops / (peak_flops_per_s * compute_eff)
    memory_s  = bytes     / (memory_bandwidth_bytes_per_s * memory_eff)
    device_s  = max(compute_s, memory_s) + kernels * fixed_s   (0 for an op with no work)
                + fresh_s                                        (fresh pages, `fresh_pages_s`)
    host_s    = kernels * host dispatch per kernel               (0 unless the device queues kernels)
    time_s    = host_s + device_s                                (the op alone)
    bound     = "compute" if compute_s >= memory_s else "memory"

A step is a sequence of ops. On a device that queues kernels (a GPU run
eagerly) the host enqueues op i+1 while the device runs op i, so a step
is a two-stage pipeline (`overlap_times`): with H_i the host's finish time
of op i (the running sum of host_s) and F_i the device's,

    F_i = max(F_{i-1}, H_i) + device_s_i,   step time = F_n
        = max over j of (host_s_1 + ... + host_s_j) + (device_s_j + ... + device_s_n),

and each op's share of the step is F_i - F_{i-1} (its device time plus any
wait for the host), so the shares sum to the step. After an op that makes
the host wait for the device (`Op.host_sync`: an eager MoE reading its
token counts back) the host starts again from F_i: H_i = F_i. With no host dispatch
(a CPU, whose dispatch is in fixed_s; CUDA graphs) this is the plain sum of
device_s. Between max(sum host, sum device) and sum(host + device).

Conventions:
- `executed_flops`: `all_flops` (matrix FLOPs plus the elementwise
  arithmetic `flops` leaves out), except for fused causal attention, which
  skips the masked half (see `executed_flops`); `bytes` is the op's own traffic, as the
  Op list states it (each op is its own kernel: what it reads comes from
  memory, what it writes goes to memory). The roofline consumes these and
  never re-derives them: a conditional model's expected distinct experts at
  decode are already in its ops' weight bytes.
- `peak_flops_per_s`: matrix-unit kinds (MATRIX_KINDS) run at the model
  dtype's peak, every other kind at the device's vector (fp32) rate; see
  HardwareSpec.peak_flops_per_s_for for dtype fallbacks.
- Efficiencies and the fixed cost per kernel launch (`fixed_s`: launch and
  dispatch, per kind and kernel variant where measured) come from a
  Calibration (ideal: 1, 1 and the hardware's launch_overhead_s); `kernels`
  is the op's expected launches per step (Op.kernels: below 1 for a branch
  that is not always taken, so a skipped block costs no launch).
- `fresh_s`: on a host whose allocator maps large buffers afresh (a CPU with
  glibc's malloc), each launch's output, `act_write_bytes / kernels` unless
  the op writes in place (tag `in_place`), costs the calibration's fresh-page
  seconds a byte once above its threshold (flopsim.calibration, lookup step
  7); 0 without such figures (a GPU's caching allocator reuses its blocks).
- Weights and the KV cache are read from memory, not cache (a step reads
  each once): the calibration measures matrix products and decode attention
  with them cold, so their memory efficiency is that of cold reads.
- Intensity is all_flops / bytes (FLOP per byte; inf for an op with no bytes).
- A collective (kind `collective`, added by flopsim.parallel.shard) has no
  FLOPs and no memory bytes: `collective_time` prices its message
  (`comm_bytes`) with flopsim.collectives on its link level (latency and ring
  steps once per expected launch, the bytes over the bus bandwidth), bound
  "comm", its time in `comm_s`.
- Numbers or numpy arrays: on plain Python numbers (a predict) the formulas run in
  Python floats, which is numpy's IEEE double arithmetic bit for bit, so a command
  whose efficiencies come from flopsim.opcache never imports numpy (`_evaluate`);
  arrays, numpy scalars, NaN, infinities and a division by zero go to numpy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

MATRIX_KINDS = ("matmul", "attention", "router", "conv")


class _Floats:
    """The few numpy functions the formulas below use, on Python floats."""

    divide = staticmethod(lambda a, b: a / b)
    add = staticmethod(lambda a, b: a + b)
    multiply = staticmethod(lambda a, b: a * b)
    maximum = staticmethod(lambda a, b: max(a, b))  # the first on a tie, as np.maximum
    clip = staticmethod(lambda a, low, high: min(max(a, low), high))  # np.clip: minimum(maximum(a, low), high)
    asarray = staticmethod(lambda a, dtype=float: float(a))
    ndim = staticmethod(lambda a: 0)


def _plain(value) -> bool:
    """A Python int that converts to a double exactly, or a finite Python float."""
    if type(value) is int:
        return -2 ** 53 <= value <= 2 ** 53
    return type(value) is float and math.isfinite(value)


def _evaluate(formula, numbers, *args):
    """formula(xp, *args) with xp = _Floats when every value in `numbers` is plain
    (`_plain`) and the results are finite: each operation rounds once as numpy's does,
    so the results are numpy's bit for bit; else (arrays, numpy scalars, NaN or
    infinities in or out, a division by zero) with xp = numpy."""
    if all(_plain(v) for v in numbers):
        try:
            out = formula(_Floats, *args)
        except ZeroDivisionError:  # numpy's inf or nan (and its warning)
            pass
        else:
            if all(math.isfinite(v) for v in (out if isinstance(out, (tuple, list)) else [out])):
                return out
    import numpy as np

    return formula(np, *args)


def roofline_time(all_flops, bytes_, peak_flops_per_s, bytes_per_s, compute_eff=1.0, memory_eff=1.0,
                  overhead_s=0.0, kernels=1.0):
    """(compute_s, memory_s, time_s) for numbers or numpy arrays (broadcast);
    `overhead_s` is the fixed cost of one launch, `kernels` the expected launches."""
    compute_rate, memory_rate = peak_flops_per_s * compute_eff, bytes_per_s * memory_eff
    return _evaluate(_roofline, (all_flops, bytes_, compute_rate, memory_rate, overhead_s, kernels),
                     all_flops, bytes_, compute_rate, memory_rate, overhead_s, kernels)


def _roofline(xp, all_flops, bytes_, compute_rate, memory_rate, overhead_s, kernels):
    compute_s = xp.divide(all_flops, compute_rate)
    memory_s = xp.divide(bytes_, memory_rate)
    launched = xp.add(all_flops, bytes_) > 0
    time_s = xp.maximum(compute_s, memory_s) + xp.multiply(overhead_s, kernels) * launched
    return compute_s, memory_s, time_s


def overlap_times(host_s, device_s, syncs=None) -> list:
    """Each op's share F_i - F_{i-1} of a step run as a host-device pipeline (see the
    module docstring); `host_s` and `device_s` are sequences in execution order, of
    numbers or numpy arrays (broadcast). `syncs` (booleans, in the same order): after
    such an op the host waits for the device (H_i = F_i) before it queues the next.
    The shares sum to the step's time."""
    host_s, device_s = list(host_s), list(device_s)
    return _evaluate(_overlap, host_s + device_s, host_s, device_s, syncs)


def _overlap(xp, host_s, device_s, syncs) -> list:
    host_done, device_done, shares = 0.0, 0.0, []
    for i, (host, device) in enumerate(zip(host_s, device_s)):
        host_done = host_done + host
        finished = xp.maximum(device_done, host_done) + device
        shares.append(finished - device_done)
        device_done = finished
        if syncs is not None and syncs[i]:
            host_done = finished
    return shares


def executed_flops(op):
    """The arithmetic the kernel runs: `all_flops`, except that a fused attention
    kernel with a causal mask skips the masked blocks (FlashAttention and torch's
    CPU flash kernel iterate only over the keys a query sees), so it runs the
    causal triangle: all_flops * causal_flops / flops. FLOP counts (`flops`)
    keep the full product, as FlopCounterMode counts it."""
    if op.kind == "attention" and op.variant == "fused" and op.flops:
        return op.all_flops * op.causal_flops / op.flops
    return op.all_flops


def fresh_pages_s(write_bytes, kernels, in_place: bool, fresh):
    """Seconds an op's launches spend on fresh pages (see the module docstring):
    `kernels` launches, each allocating `write_bytes / kernels` (numbers or numpy
    arrays), priced by `fresh` (a calibration's `fresh_pages`); 0 for an op that
    writes in place or without the figure."""
    if in_place or fresh is None:
        return 0.0
    if isinstance(kernels, (int, float)) and isinstance(write_bytes, (int, float)):
        return kernels * fresh.seconds(write_bytes / kernels) if kernels > 0 else 0.0
    import numpy as np

    kernels = np.asarray(kernels, dtype=float)
    launches = np.maximum(kernels, 1e-300)
    return np.where(kernels > 0, kernels * fresh.seconds(write_bytes / launches), 0.0)


def bound_of(compute_s, memory_s):
    return "compute" if compute_s >= memory_s else "memory"


def op_peak_flops_per_s(kind: str, hw, dtype: str) -> float:
    """The FLOP/s an op of `kind` runs at on `hw` for a model stored in `dtype`."""
    if kind in MATRIX_KINDS:
        return hw.peak_flops_per_s_for(dtype)[0]
    return hw.vector_flops_per_s


@dataclass(frozen=True)
class OpTime:
    """One op on one device: its costs, its roofline terms and its bound."""

    name: str
    kind: str
    layer: int
    pass_: str
    flops: Any
    all_flops: Any
    bytes: Any
    intensity: float
    peak_flops_per_s: float
    compute_eff: float
    memory_eff: float
    compute_s: float
    memory_s: float
    overhead_s: float
    time_s: float
    bound: str
    kernels: float = 1.0
    variant: str = ""
    host_s: float = 0.0  # host dispatch, overlapping the device on a device that queues kernels
    device_s: float = 0.0  # max(compute_s, memory_s) + the device's fixed costs
    host_sync: bool = False  # the host waits for the device after this op (flopsim.ops.op.Op.host_sync)
    comm_s: float = 0.0  # a collective's time on its link (bound "comm")
    comm_bytes: float = 0.0  # a collective's message
    fresh_s: float = 0.0  # fresh pages of its outputs (in device_s; `fresh_pages_s`)
    tags: dict = field(default_factory=dict, compare=False)  # a collective's group, ranks, level, per, window

    @property
    def key(self) -> str:
        return self.name if self.pass_ == "fwd" else f"{self.name}:bwd"

    def to_dict(self) -> dict:
        row = asdict(self)
        row["pass"] = row.pop("pass_")
        tags = row.pop("tags")
        row.update({f"tag_{k}": v for k, v in tags.items()})
        return row


def products_per_kernel(gemm, kernels):
    """The products of a batched GEMM op (gemm = (batch, m, n, k)) that each of its
    `kernels` expected launches runs: batch / kernels, between 1 and batch (a bmm or
    grouped GEMM launches once for all; a loop of products launches once per product).
    Numbers or numpy arrays."""
    if gemm is None:
        return 1.0
    return _evaluate(_products, (gemm[0], kernels), gemm[0], kernels)


def _products(xp, batch, kernels):
    batch = xp.asarray(batch, dtype=float)
    per = xp.clip(batch / xp.maximum(xp.asarray(kernels, dtype=float), 1e-12), 1.0, xp.maximum(batch, 1.0))
    return float(per) if xp.ndim(per) == 0 else per


def collective_time(op, hw, calibration, links=None) -> OpTime:
    """A collective op (kind `collective`): flopsim.collectives' latency + bandwidth
    time of its message on its link level (`links`: {level: LinkLevel} overriding the
    calibration's `link`), times its expected launches (latency) and its bytes. Over the
    network a ring collective's bandwidth is its group's ranks on a node (tag `node_ranks`)
    times the level's NIC share, at most the scale-up level's, and a reduce-scatter's or an
    all-gather's ring steps cost each level's hop latency (network_collective_s)."""
    from flopsim.collectives import collective_s, network_bus_bytes_per_s, network_collective_s
    from flopsim.errors import InputError

    level = op.tags.get("level", "scale_up")
    link = (links or {}).get(level) or (calibration.link(level, hw) if calibration is not None else None)
    if link is None:
        raise InputError(f"{op.name}: {hw.name} has no {level.replace('_', '-')} link figure (hardware "
                         f"interconnect_bytes_per_s / scale_out_bytes_per_s, or the calibration's links)")
    kernels = float(getattr(op, "kernels", 1))
    ranks = int(op.tags.get("ranks", 1))
    nbytes = float(op.comm_bytes) / kernels if kernels else 0.0
    if level == "scale_out":  # a ring per NIC of the group's ranks on a node; ring steps on both levels
        up = (links or {}).get("scale_up") or (calibration.link("scale_up", hw) if calibration is not None else None)
        node_ranks = int(op.tags.get("node_ranks", 1))
        bus = network_bus_bytes_per_s(op.variant, link.bus_bytes_per_s, node_ranks,
                                      up.bus_bytes_per_s if up is not None else None)
        one = network_collective_s(op.variant, nbytes, ranks, node_ranks, bus, link.latency_s, link.hop_latency_s,
                                   up.hop_latency_s if up is not None else 0.0)
    else:
        one = collective_s(op.variant, nbytes, ranks, link.bus_bytes_per_s, link.latency_s, link.hop_latency_s)
    comm_s = kernels * one
    return OpTime(name=op.name, kind=op.kind, layer=op.layer, pass_=op.pass_, flops=0, all_flops=0, bytes=0,
                  intensity=0.0, peak_flops_per_s=0.0, compute_eff=1.0, memory_eff=1.0, compute_s=0.0,
                  memory_s=0.0, overhead_s=0.0, time_s=comm_s, bound="comm", kernels=kernels, variant=op.variant,
                  host_s=0.0, device_s=comm_s, comm_s=comm_s, comm_bytes=float(op.comm_bytes),
                  tags=dict(op.tags))


def op_time(op, hw, dtype: str, calibration=None, links=None, efficiency=None, train: bool = False) -> OpTime:
    """The roofline of one evaluated op (a flopsim.count.OpCost); a collective's time
    comes from its link level (`collective_time`). `efficiency`: the calibration's
    lookup (`op_times` passes a memoized one). `train`: the op belongs to a train step,
    whose forward ops keep their outputs for the backward and whose backward ops read
    what the forward saved long before (flopsim.calibration lookup step 8)."""
    from flopsim.calibration import Calibration

    calibration = calibration or Calibration.ideal(hw.name)
    efficiency = efficiency or calibration.efficiency
    if op.kind == "collective":
        return collective_time(op, hw, calibration, links)
    peak = op_peak_flops_per_s(op.kind, hw, dtype)
    backward = op.pass_ == "bwd"
    kernels = float(getattr(op, "kernels", 1))
    all_flops, nbytes = op.all_flops, op.bytes  # (OpCost.bytes is a sum: read once)
    executed = float(executed_flops(op))
    compute_eff, memory_eff = efficiency(op.kind, op.gemm, float(nbytes), op.variant, backward,
                                         products_per_kernel(op.gemm, kernels), executed, train)
    compute_s, memory_s, time_s = roofline_time(
        executed, float(nbytes), peak, hw.memory_bandwidth_bytes_per_s,
        compute_eff, memory_eff, calibration.fixed_cost_s(op.kind, op.variant, hw, backward), kernels)
    compute_s, memory_s, device_s = float(compute_s), float(memory_s), float(time_s)
    fresh_s = float(fresh_pages_s(float(getattr(op, "act_write_bytes", 0)), kernels, bool(op.tags.get("in_place")),
                                  calibration.fresh_pages))
    device_s += fresh_s
    host_s = kernels * calibration.host_cost_s(op.kind, op.variant, backward) if device_s > 0 else 0.0
    time_s = host_s + device_s
    overhead = time_s - max(compute_s, memory_s)
    return OpTime(
        name=op.name, kind=op.kind, layer=op.layer, pass_=op.pass_,
        flops=op.flops, all_flops=all_flops, bytes=nbytes,
        intensity=intensity(all_flops, nbytes),
        peak_flops_per_s=peak, compute_eff=float(compute_eff), memory_eff=float(memory_eff),
        compute_s=compute_s, memory_s=memory_s, overhead_s=overhead, time_s=time_s,
        bound=bound_of(compute_s, memory_s), kernels=kernels, variant=op.variant, host_s=host_s, device_s=device_s,
        host_sync=bool(getattr(op, "host_sync", False)), fresh_s=fresh_s,
    )


def op_times(ops, hw, dtype: str, calibration=None, links=None, train: bool = False) -> list:
    """`op_time` of each of a step's evaluated ops (numbers, not arrays; `train`: a train
    step's), the calibration's efficiency looked up once per distinct (kind, shape, bytes,
    variant, pass): a model's blocks repeat the same few shapes, and the lookup interpolates."""
    from flopsim import opcache
    from flopsim.calibration import Calibration

    calibration = calibration or Calibration.ideal(hw.name)
    efficiency = opcache.Efficiencies(calibration)  # memoized; across runs when the cache is on
    times = [op_time(op, hw, dtype, calibration, links, efficiency, train) for op in ops]
    efficiency.save()
    return times


def in_sequence(times: list) -> list:
    """OpTimes of one step, in execution order, with each op's `time_s` its share of the
    step's host-device pipeline (`overlap_times`; unchanged when no op has host dispatch)."""
    from dataclasses import replace

    if not any(t.host_s for t in times):
        return times
    shares = overlap_times([t.host_s for t in times], [t.device_s for t in times], [t.host_sync for t in times])
    return [replace(t, time_s=float(share), overhead_s=float(share) - max(t.compute_s, t.memory_s))
            for t, share in zip(times, shares)]


def intensity(all_flops, nbytes) -> float:
    if not nbytes:
        return float("inf") if all_flops else 0.0
    return float(all_flops) / float(nbytes)


def ridge_intensity(hw, dtype: str, kind: str = "matmul", calibration: Optional[Any] = None) -> float:
    """FLOP per byte above which an op of `kind` is compute-bound."""
    from flopsim.calibration import Calibration

    calibration = calibration or Calibration.ideal(hw.name)
    compute_eff, memory_eff = calibration.efficiency(kind)
    return (op_peak_flops_per_s(kind, hw, dtype) * compute_eff) / (hw.memory_bandwidth_bytes_per_s * memory_eff)
