"""Calibration: how close a device's kernels come to its datasheet peaks.

A `Calibration` gives each op a compute efficiency and a memory efficiency
(fractions of `peak_flops_per_s` and `memory_bandwidth_bytes_per_s`, so 1.0 is
the ideal roofline), a fixed cost per kernel launch and the speed of
collectives per link level.

Lookup order for an op of kind K with GEMM shape (batch, m, n, k):
1. when K is in `gemm_kinds`, the op has a GEMM shape and `gemm` lists
   measured shapes for K (points whose `kind` is K -- those of the op's
   `variant`, the kernel that runs, when measured -- else points with no
   kind; a router, an nn.Linear, with neither takes the matmul points),
   the efficiencies are interpolated between the measured shapes in
   log space over (m, n, k) of one product -- a batched product (experts)
   runs `batch` such products -- or over (batch*m, n, k) for the kinds in
   `fold_batch_kinds` (attention: one kernel over all heads): inverse-distance
   weights 1/d^4 on log-efficiency, exact at a measured shape. The compute
   efficiency comes from the points measured compute-bound (their `compute`),
   the memory efficiency from those measured memory-bound (their `memory`:
   decode shapes, whose weights or keys were read cold from memory), else
   from streaming the op's bytes (the measured copy's size curve), else the
   kind's;
2. otherwise, when `sizes` lists measured sizes for K (memory-bound kinds:
   small tensors stay in cache; per variant, e.g. gelu or rmsnorm, when
   measured), the same interpolation over log(bytes) gives the memory
   efficiency, and over log(executed FLOPs) the compute efficiency where the
   points record their FLOPs (else over log(bytes) too): a kernel whose bytes
   and arithmetic scale apart (an embedding's backward, the table's bytes
   and the rows' adds) meets the measured kernels that did as much work;
3. otherwise (and for a point without a memory efficiency) `kinds[K]`
   (`kinds["K@bwd"]` for a backward op, when given), else `default`.
   Backward ops (autograd's kernels) use points measured on backward
   kernels (`backward: true`) when the calibration has them, else the
   forward kernel's;
4. fixed cost per kernel launch (`fixed_s`): `fixed_s["kind:variant"]`,
   else `fixed_s["kind"]` (a backward op tries the same keys with `@bwd`
   first), else `launch_overhead_s`, else the hardware's launch overhead.
   `graph_launch_s` is the cost per kernel when a CUDA graph replays them
   (`with_graphs()`). It is the time a kernel of that kind takes on an empty
   problem (launch, dispatch, and on a CPU the framework's per-op work),
   measured as the time at the smallest size; efficiencies are measured on
   the time above it, so fixed cost + roofline reproduces every point.
   On a device that queues its kernels (a GPU run eagerly), `fixed_s` is
   the device's side alone (the gap between back-to-back kernels) and the
   framework's host dispatch per kernel is `host_s` (same keys, `launch`
   for any kind without its own): the host enqueues while the device runs,
   so the two overlap (flopsim.roofline.overlap_times). Empty on a CPU,
   whose dispatch is part of the kernel's time, and under CUDA graphs.
5. collectives (`links`): per link level (`scale_up`: within the scale-up
   domain, NVLink / xGMI / ICI; `scale_out`: between domains, InfiniBand /
   Ethernet; `scale_up_torus`: a torus' whole axes, whose rings wrap around
   and run both ways, flopsim.parallel.layout; without it such groups use
   `scale_up`) a latency and a bus bandwidth, in nccl-tests' convention
   (busbw: the per-rank bandwidth a ring algorithm sees), so a collective
   moving `nbytes` over n ranks takes
       latency_s + steps(op, n) * hop_latency_s + factor(op, n) * nbytes / bus_bytes_per_s
   with factor 2 (n - 1) / n for all-reduce, (n - 1) / n for reduce-scatter,
   all-gather (nbytes: the whole gathered buffer) and all-to-all, 1 for a
   point-to-point send. Small messages are latency-bound, large ones
   bandwidth-bound. On `scale_out`, hop_latency_s is a ring step between
   nodes: only a reduce-scatter's or all-gather's ring pays it, its steps
   inside a node at scale_up's (flopsim.collectives.network_collective_s).
6. `collective_sm_share`: the share of the GPU's SMs a collective's kernel
   holds while it runs (NCCL launches one thread block per channel: its
   channels / the SM count). Compute that overlaps a data-parallel
   collective runs on the other SMs, so each second of hidden traffic costs
   this share of a second of compute (flopsim.planning.train_step). 0 (the
   default): not known, no slowdown.
7. fresh pages (`fresh_pages`): an eager framework allocates every op's
   output anew, and a C library that maps large blocks from the OS hands
   them over as fresh pages, which the kernel faults in and zeroes on the
   first write (glibc's malloc maps a block above its mapping threshold,
   which grows with use up to 32 MiB, DEFAULT_MMAP_THRESHOLD_MAX; smaller
   ones come from its heap, in use). An allocation of `above_bytes` or
   more (its block, with the allocator's header, is over the threshold: a
   32 MiB torch.stack faults in all its 8,193 pages every call on the 2-core
   VM, 10.0 ms against 3.4 ms at 31.98 MiB) costs `s_per_byte` seconds a
   byte beyond writing into memory in use (measured by `flopsim calibrate`
   on a CPU: a copy into a new 64-256 MiB buffer against the same copy into
   one in use). Each launch of an op
   allocates its written activations (`act_write_bytes` / kernels) unless
   it writes in place (tag `in_place`); flopsim.roofline.fresh_pages_s.
   None (a GPU, whose caching allocator reuses its blocks; a published
   calibration): no cost. A process whose heap already holds a free block
   that large (freed by an earlier, larger step) serves it without faults.
8. a train step's forward (`train` in the lookup; size points `train:
   true`): autograd keeps each op's output, and the intermediates backward
   needs, until the backward, so every forward kernel writes memory that
   is not in cache (a forward without gradients writes into the blocks the
   last op freed, which are). On a CPU `flopsim calibrate` measures the
   memory-bound forward kernels so too: inputs needing gradients, the
   outputs (and with them what autograd saved) held in a ring of at least
   TRAIN_FOOTPRINT bytes (flopsim.calibrate). On the 2-core VM a 4 MiB add
   took 0.22 ms writing freed memory and 0.34 ms writing kept memory, a
   GELU 0.20 and 0.32 ms, with glibc told never to trim its heap (no page
   faults; under its defaults the kept add took 0.90 ms, faulting 2.7 MB a
   call); the reference's RoPE forward 0.65 ms without gradients and 1.27
   ms with. A train step's backward kernels read what their forward saved
   long before (not in cache) and write gradients that are kept: on a CPU
   `flopsim calibrate` measures each memory-bound backward kernel so too
   (a ring of independent forward graphs holding about TRAIN_FOOTPRINT
   bytes, each call the next one's backward, its gradient kept), and a train
   step's backward ops take those points. On the 2-core VM an RMSNorm's
   backward over 1 MB took 1.05 ms over and over on one graph and 1.79 ms
   so, a multiply's 0.20 and 0.32 ms, a GELU's over 4 MB 0.55 and 0.84 ms,
   the cross-entropy's over 512 x 8,000 logits 2.1 and 3.6 ms. A kernel
   without such points (a matrix product, attention, any kernel on a
   calibration without them) takes its forward points (a backward op, its
   backward points).

Another fused attention kernel (`attention_kernels[name]`, e.g. Triton's
FlashAttention) has its own points; `with_attention_kernel(name)` puts them
in place of the fused attention points for a run that uses that kernel.

Provenance (a contract; every output names it): `measured` (`flopsim
calibrate` on the device: `measured` records how, when and with which
torch), `published` (seeded from cited microbenchmark-level measurements:
every figure's source is in `sources`, or on the point itself), `custom` (a
user's file that says neither), or `ideal` (every efficiency 1, no fixed
cost beyond the datasheet's launch overhead) -- only when asked for.
End-to-end published results (GPU-hours, MFU, tokens/s) are never an input.

Files live in specs/calibration/<device>.yaml (picked up automatically for
that device) or anywhere else (`--calibration PATH`); `ideal` is the all-ones
calibration. A device without a calibration file is an error unless the
user asks for `ideal`.

The lookup works on numbers and on numpy arrays (sweeps), and imports no torch;
numpy is imported by the first interpolation, not with the module (a command whose
look-ups all come from flopsim.opcache never imports it).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from flopsim.ops.fields import KINDS
from flopsim.spec.paths import exists

MAX_EFFICIENCY = 10.0  # >1 allowed: a "peak" that is itself a measurement can be beaten
MAX_FIXED_S = 1.0  # no kernel's fixed cost is a second
# GEMM kinds run by the same kernel as a matrix product (a router is an nn.Linear): with no
# points of their own they take the products' points, not the kind-less default
PRICED_AS_MATMUL = ("router",)
MIN_EFFICIENCY = 1e-6  # flopsim calibrate never records less (a 1e-300 "efficiency" makes times overflow)
PROVENANCES = ("measured", "published", "custom", "ideal")
LINK_LEVELS = ("scale_up", "scale_out")


class _Strict(BaseModel):
    """Unknown fields refused, types strict (no `true` for 1, no "0.5" for 0.5), numbers finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Efficiency(_Strict):
    compute: float = Field(1.0, ge=MIN_EFFICIENCY, le=MAX_EFFICIENCY)
    memory: float = Field(1.0, ge=MIN_EFFICIENCY, le=MAX_EFFICIENCY)


class GemmPoint(_Strict):
    """A measured matrix product: `batch` products of (m x k) @ (k x n), on
    ops of `kind` (None: any kind in `gemm_kinds`). A point measured where the
    product is compute-bound gives `compute` (its compute ceiling); one
    measured where it is memory-bound (its weights or keys read cold from
    memory) gives `memory`; either or both."""

    @model_validator(mode="after")
    def _one_ceiling(self):
        if self.compute is None and self.memory is None:
            raise ValueError("a GEMM point needs a compute or a memory efficiency")
        return self

    m: PositiveInt
    n: PositiveInt
    k: PositiveInt
    batch: PositiveInt = 1
    compute: Optional[float] = Field(None, ge=MIN_EFFICIENCY, le=MAX_EFFICIENCY)  # None: measured memory-bound
    memory: Optional[float] = Field(None, ge=MIN_EFFICIENCY, le=MAX_EFFICIENCY)  # None: measured compute-bound
    kind: Optional[str] = None
    variant: Optional[str] = None  # the kernel measured (e.g. fused / explicit attention)
    backward: bool = False  # measured on the kernel's backward (autograd's) rather than its forward
    source: Optional[str] = None  # a published point's citation

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind):
        if kind is not None and kind not in KINDS:
            raise ValueError(f"unknown op kind '{kind}' (kinds: {', '.join(KINDS)})")
        return kind


class SizePoint(_Strict):
    """A measured kernel of `kind` that moves `bytes` bytes (memory-bound kinds:
    elementwise, norms, gathers, ...). Small tensors stay in cache, so the
    efficiency of these kinds depends on size as a GEMM's depends on shape."""

    kind: str
    bytes: float = Field(gt=0, le=1e16)
    compute: float = Field(ge=MIN_EFFICIENCY, le=MAX_EFFICIENCY)
    memory: float = Field(ge=MIN_EFFICIENCY, le=MAX_EFFICIENCY)
    flops: Optional[float] = Field(None, ge=0, le=1e21)  # the kernel's executed FLOPs: its compute coordinate
    variant: Optional[str] = None  # the kernel measured (e.g. gelu, rmsnorm)
    backward: bool = False  # measured on the kernel's backward (autograd's) rather than its forward
    # measured as a train step runs it (lookup step 8): a forward with inputs needing gradients and
    # what autograd keeps (the output, saved intermediates) alive, each call writing memory not in
    # cache; a backward reading its saved tensors cold and keeping the gradient it writes
    train: bool = False
    source: Optional[str] = None  # a published point's citation

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind):
        if kind not in KINDS:
            raise ValueError(f"unknown op kind '{kind}' (kinds: {', '.join(KINDS)})")
        return kind


GLIBC_MMAP_MAX_BYTES = 32 * 2 ** 20  # glibc malloc.c DEFAULT_MMAP_THRESHOLD_MAX: 4 MiB x sizeof(long), 64-bit


class FreshPages(_Strict):
    """A host's fresh pages (lookup step 7): an allocation of `above_bytes` or more costs
    `s_per_byte` seconds a byte of faulting in and zeroing its pages."""

    above_bytes: float = Field(GLIBC_MMAP_MAX_BYTES, ge=0, le=1e16)
    s_per_byte: float = Field(ge=0, le=1e-6)  # 1 us a byte: 4 ms a 4 kB page, beyond any page fault
    source: str = ""

    def seconds(self, alloc_bytes):
        """Seconds of fresh pages for one allocation of `alloc_bytes` (a number or a numpy
        array): s_per_byte x its bytes at or above the threshold, else 0."""
        if isinstance(alloc_bytes, (int, float)):
            return self.s_per_byte * alloc_bytes if alloc_bytes >= self.above_bytes else 0.0
        import numpy as np

        return np.where(np.asarray(alloc_bytes) >= self.above_bytes, self.s_per_byte * alloc_bytes, 0.0)


class LinkLevel(_Strict):
    """One level of the interconnect: a collective's fixed latency and the bus
    bandwidth (nccl-tests' busbw) of large messages; see the module docstring."""

    latency_s: float = Field(ge=0, le=MAX_FIXED_S)
    bus_bytes_per_s: float = Field(ge=1e3, le=1e15)
    hop_latency_s: float = Field(0.0, ge=0, le=MAX_FIXED_S)  # per ring step (flopsim.collectives.steps)
    source: str = ""


def _cost_keys(kind: str, variant: str, backward: bool) -> list[str]:
    """The keys of a per-kernel cost, most specific first (a backward op tries `@bwd` first)."""
    keys = [f"{kind}:{variant}", kind] if variant else [kind]
    return [f"{key}@bwd" for key in keys] + keys if backward else keys


class Calibration(_Strict):
    device: str = ""
    source: str = "ideal roofline (every efficiency 1)"
    provenance: Optional[Literal["measured", "published", "custom"]] = None  # None: derived (see .kind)
    sources: dict[str, str] = {}  # figure -> where it comes from (published calibrations)
    default: Efficiency = Efficiency()
    kinds: dict[str, Efficiency] = {}
    gemm: list[GemmPoint] = []
    gemm_kinds: tuple[str, ...] = Field(("matmul", "router", "conv"), strict=False)  # a YAML list
    sizes: list[SizePoint] = []
    fold_batch_kinds: tuple[str, ...] = Field(("attention",), strict=False)
    launch_overhead_s: Optional[float] = Field(None, ge=0, le=MAX_FIXED_S)
    fixed_s: dict[str, float] = {}  # "kind" or "kind:variant" -> seconds per launch
    graph_launch_s: Optional[float] = Field(None, ge=0, le=MAX_FIXED_S)  # per kernel, replayed as a CUDA graph
    host_s: dict[str, float] = {}  # "kind[:variant][@bwd]" or "launch" -> host dispatch seconds per kernel (queued)
    links: dict[Literal["scale_up", "scale_up_torus", "scale_out"], LinkLevel] = {}
    collective_sm_share: float = Field(0.0, ge=0, lt=1)  # SMs a collective holds / all (lookup step 6)
    fresh_pages: Optional[FreshPages] = None  # a large allocation's page faults (lookup step 7)
    # another fused attention kernel's points by name (e.g. "triton"): with_attention_kernel(name)
    attention_kernels: dict[str, list[GemmPoint]] = {}
    attention_kernel: str = ""  # the attention_kernels entry pricing fused attention ('' = the file's own points)
    measured: Optional[dict[str, Any]] = None  # how it was measured (device, date, ...); None if not measured

    @field_validator("attention_kernels")
    @classmethod
    def _attention_points(cls, kernels):
        for name, points in kernels.items():
            if not points or any(p.kind != "attention" or p.variant not in (None, "fused") for p in points):
                raise ValueError(f"attention_kernels.{name}: needs points of kind attention, variant fused")
        return kernels

    @field_validator("kinds", "gemm_kinds", "fold_batch_kinds")
    @classmethod
    def _known_kinds(cls, kinds):
        for kind in kinds:  # dict keys ("kind" or "kind@bwd") or tuple entries
            if kind.removesuffix("@bwd") not in KINDS:
                raise ValueError(f"unknown op kind '{kind}' (kinds: {', '.join(KINDS)})")
        return kinds

    @field_validator("fixed_s", "host_s")
    @classmethod
    def _known_fixed(cls, fixed, info):
        for key, seconds in fixed.items():
            kind = key.removesuffix("@bwd").split(":", 1)[0]
            if kind not in KINDS and not (info.field_name == "host_s" and key == "launch"):
                raise ValueError(f"{info.field_name}: unknown op kind '{kind}' in '{key}' (kinds: {', '.join(KINDS)})")
            if not (math.isfinite(seconds) and 0 <= seconds <= MAX_FIXED_S):
                raise ValueError(f"{info.field_name}.{key}: {seconds!r} must be a time in seconds in [0, {MAX_FIXED_S}]")
        return fixed

    @model_validator(mode="after")
    def _kernel_is_carried(self):
        if self.attention_kernel and self.attention_kernel not in self.attention_kernels:
            raise ValueError(f"attention_kernel: {self.attention_kernel!r} is not among attention_kernels "
                             f"({', '.join(self.attention_kernels) or 'none'})")
        return self

    @model_validator(mode="after")
    def _provenance_is_backed(self):
        if self.provenance == "measured" and self.measured is None:
            raise ValueError("provenance 'measured' needs a 'measured' block (how, when, where it was measured)")
        if self.provenance == "published" and not (self.sources or any(p.source for p in [*self.gemm, *self.sizes])):
            raise ValueError("provenance 'published' needs 'sources' naming where each figure comes from")
        return self

    @classmethod
    def ideal(cls, device: str = "") -> "Calibration":
        return cls(device=device)

    @property
    def is_ideal(self) -> bool:
        return (self.default == Efficiency() and all(e == Efficiency() for e in self.kinds.values())
                and not self.gemm and not self.sizes and self.launch_overhead_s is None and not self.fixed_s
                and not self.host_s and not self.links and self.fresh_pages is None)

    @property
    def kind(self) -> str:
        """measured | published | custom | ideal (see the module docstring)."""
        if self.is_ideal and self.provenance is None:
            return "ideal"
        if self.provenance is not None:
            return self.provenance
        return "measured" if self.measured is not None else "custom"

    @property
    def provenance_label(self) -> str:
        """`<device> <kind>`, with when and how for a measured one, and the fused attention
        kernel when it is not the file's own (`with_attention_kernel`)."""
        device = self.device or "custom"
        kernel = f", attention kernel {self.attention_kernel}" if self.attention_kernel else ""
        if self.kind == "ideal":
            return f"{device}: ideal roofline (efficiency 1, asked for)"
        if self.kind == "measured":
            m = self.measured or {}
            return (f"{device}: measured {m.get('date', '')} ({m.get('device_name', m.get('device', ''))}, "
                    f"torch {m.get('torch', '?')}){kernel}")
        if self.kind == "published":
            return f"{device}: published microbenchmarks ({len(self.cited_sources())} sources){kernel}"
        return f"{device}: custom file{kernel}"

    def cited_sources(self) -> list[str]:
        """Distinct citations of a published calibration (its `sources` and its points')."""
        out = list(dict.fromkeys([*self.sources.values(), *(p.source for p in [*self.gemm, *self.sizes] if p.source),
                                  *(link.source for link in self.links.values() if link.source)]))
        return out

    @property
    def label(self) -> str:
        """What every output prints: the device, the provenance and the default efficiencies."""
        if self.kind == "ideal":
            return self.provenance_label
        parts = [f"compute {self.default.compute:.3g}", f"memory {self.default.memory:.3g}"]
        if self.gemm:
            parts.append(f"{len(self.gemm)} GEMM shapes")
        if self.fixed_s:
            parts.append(f"{len(self.fixed_s)} kernel fixed costs")
        if self.host_s:
            parts.append("host dispatch overlapped")
        if self.links:
            parts.append("links " + ", ".join(self.links))
        return f"{self.provenance_label} [{', '.join(parts)}]"

    @staticmethod
    def _matching(points: list, kind: str, variant: Optional[str], kindless: bool, backward: bool = False,
                  train: bool = False) -> list:
        """Points of `kind` measured on `variant` (the kernel, e.g. rmsnorm, gelu,
        explicit attention), else those of `kind` with no variant, else all of
        `kind` (else, for GEMM points, the kind-less ones); for a backward op,
        the points measured on the backward kernel when there are any; for a
        train step's op (`train`), those measured as one runs it (SizePoint.train)
        when its kernel has any, else the plain points of its pass."""
        own = [p for p in points if p.kind == kind]
        if not own and kindless:
            own = [p for p in points if p.kind is None]
        if backward and any(p.backward for p in own):
            own = [p for p in own if p.backward]
        else:
            own = [p for p in own if not p.backward]
        trained = [p for p in own if getattr(p, "train", False)]
        if train and trained and (not variant or any(p.variant == variant for p in trained)):
            own = trained
        else:
            own = [p for p in own if not getattr(p, "train", False)]
        if variant:
            same = [p for p in own if p.variant == variant]
            if same:
                return same
        return [p for p in own if p.variant is None] or own

    def _points(self, kind: str, variant: Optional[str] = None, backward: bool = False) -> list:
        """The measured shapes that apply to `kind` (see _matching)."""
        if kind not in self.gemm_kinds:
            return []
        own = self._matching(self.gemm, kind, variant, kindless=True, backward=backward)
        if not own and kind in PRICED_AS_MATMUL:  # a product like any other: the products' points
            return self._matching(self.gemm, "matmul", variant, kindless=True, backward=backward)
        return own

    def uses_gemm_shape(self, kind: str) -> bool:
        return bool(self._points(kind))

    def efficiency(self, kind: str, gemm: Optional[tuple] = None, nbytes=None, variant: Optional[str] = None,
                   backward: bool = False, per_kernel=1, flops=None, train: bool = False):
        """(compute, memory) efficiency of an op, interpolated between the
        measured GEMM shapes (gemm kinds) or measured sizes (`nbytes`, the op's
        bytes) of its kind and variant, else the kind's, else the default.
        GEMM points measured where the product is compute-bound carry the
        compute ceiling, those measured where it is memory-bound (decode
        shapes, reading cold weights) the memory ceiling; each ceiling is
        interpolated over its own points. A backward op (`backward`) uses the
        points measured on backward kernels where there are any. Arguments may
        be numpy arrays. `per_kernel`: the products of a batched op that one kernel runs
        (a bmm or grouped GEMM: all of `batch`; a loop of launches: 1); such a kernel is
        looked up as one product of its combined size: (per_kernel * m, n, k) for its
        compute, (m, per_kernel * n, k) for its memory (it streams all its products'
        weights, as one product that wide would). Size points give the memory efficiency
        at the op's bytes and, when they record their FLOPs and the op's `flops` (executed)
        are given, the compute efficiency at its FLOPs: a kernel whose bytes and arithmetic
        scale apart (an embedding's backward: the table's bytes, the rows' adds) is
        compared with the measured kernels that did as much arithmetic. `train`: an op of
        a train step (forward or backward), priced by the size points measured as one
        runs (`_matching`)."""
        base = self.kinds.get(f"{kind}@bwd" if backward and f"{kind}@bwd" in self.kinds else kind, self.default)
        points = self._points(kind, variant, backward) if gemm is not None else []
        if points:
            import numpy as np

            batch, m, n, k = gemm
            if kind in self.fold_batch_kinds:  # one kernel over the batch (attention heads)
                coords = [np.asarray(batch, dtype=float) * np.asarray(m, dtype=float), n, k]

                def where(ps):
                    return [(p.batch * p.m, p.n, p.k) for p in ps]
            else:  # `batch` products (experts), `per_kernel` of them in each kernel launched
                coords = [np.multiply(per_kernel, m), n, k]
                memory_coords = [m, np.multiply(per_kernel, n), k]

                def where(ps):  # a point measured on a batched kernel (bmm) sits where an op like it looks
                    return [(p.batch * p.m, p.n, p.k) for p in ps]

                def memory_where(ps):
                    return [(p.m, p.batch * p.n, p.k) for p in ps]
            with_compute = [p for p in points if p.compute is not None]
            with_memory = [p for p in points if p.memory is not None]
            compute = (_interpolate_shapes(coords, where(with_compute), [p.compute for p in with_compute])
                       if with_compute else base.compute)
            if with_memory:
                folded = kind in self.fold_batch_kinds
                return compute, _interpolate_shapes(coords if folded else memory_coords,
                                                    (where if folded else memory_where)(with_memory),
                                                    [p.memory for p in with_memory])
            streaming = self._streaming_memory(nbytes)
            return compute, base.memory if streaming is None else streaming
        sized = (self._matching(self.sizes, kind, variant, kindless=False, backward=backward, train=train)
                 if nbytes is not None else [])
        if sized:
            compute, memory = _interpolate([nbytes], [(p.bytes,) for p in sized], [p.compute for p in sized],
                                           [p.memory for p in sized])
            if flops is not None and all(p.flops is not None for p in sized):
                compute = _interpolate([flops], [(p.flops,) for p in sized], [p.compute for p in sized],
                                       [p.compute for p in sized])[0]
            return compute, memory
        return base.compute, base.memory

    def _streaming_memory(self, nbytes):
        """Memory efficiency of streaming `nbytes` (cache-resident when small,
        memory-bound when large): the measured copy's size curve, else the
        elementwise kind's; None when no sizes are measured."""
        if nbytes is None:
            return None
        curve = self._matching(self.sizes, "elementwise", "copy", kindless=False)
        if not curve:
            return None
        return _interpolate([nbytes], [(p.bytes,) for p in curve], [p.memory for p in curve],
                            [p.memory for p in curve])[1]

    def overhead_s(self, hw) -> float:
        """The launch overhead of a kernel with no measured fixed cost of its own."""
        return hw.launch_overhead_s if self.launch_overhead_s is None else self.launch_overhead_s

    def at_speed(self, now) -> "Calibration":
        """This calibration scaled from the host speed it was measured at
        (`measured["probe"]`, a flopsim.probe reading) to the speed `now` (another
        reading): every efficiency and the fresh pages' seconds a byte by the matrix
        rate, ref.compute_s / now.compute_s, as flopsim.calibrate scales its points (the
        cold reads are disturbed by whatever ran just before: flopsim.probe); the host's
        per-kernel costs x now.fixed_s / ref.fixed_s (`host_s` on a device that queues
        kernels, whose device-side `fixed_s` does not move with the host; else
        `fixed_s`). Unchanged without a reference reading."""
        ref = (self.measured or {}).get("probe")
        if not ref:
            return self
        c, f = ref["compute_s"] / now.compute_s, now.fixed_s / ref["fixed_s"]

        def eff(e):
            return e.model_copy(update={"compute": min(MAX_EFFICIENCY, e.compute * c),
                                        "memory": min(MAX_EFFICIENCY, e.memory * c)})

        def point(p):
            return p.model_copy(update={
                "compute": None if p.compute is None else min(MAX_EFFICIENCY, p.compute * c),
                "memory": None if p.memory is None else min(MAX_EFFICIENCY, p.memory * c)})

        update = {"default": eff(self.default), "kinds": {k: eff(v) for k, v in self.kinds.items()},
                  "gemm": [point(p) for p in self.gemm], "sizes": [eff(p) for p in self.sizes],
                  "fresh_pages": None if self.fresh_pages is None else self.fresh_pages.model_copy(
                      update={"s_per_byte": min(1e-6, self.fresh_pages.s_per_byte / c)})}
        if self.host_s:
            update["host_s"] = {k: min(MAX_FIXED_S, v * f) for k, v in self.host_s.items()}
        else:
            update["fixed_s"] = {k: min(MAX_FIXED_S, v * f) for k, v in self.fixed_s.items()}
            update["launch_overhead_s"] = None if self.launch_overhead_s is None else self.launch_overhead_s * f
        return self.model_copy(update=update)

    def with_graphs(self) -> "Calibration":
        """This calibration for an engine that replays its kernels as a CUDA graph
        (CUDA graphs, torch.compile's reduce-overhead mode, TensorRT-LLM): every
        kernel's fixed cost is the measured gap between graph-replayed kernels
        (`graph_launch_s`) and there is no host dispatch per kernel (without a
        measured graph gap, only the host's dispatch goes)."""
        if self.graph_launch_s is None:
            return self.model_copy(update={"host_s": {}}) if self.host_s else self
        return self.model_copy(update={"fixed_s": {}, "host_s": {}, "launch_overhead_s": self.graph_launch_s})

    def with_attention_kernel(self, name: str) -> "Calibration":
        """This calibration for a run whose fused attention is the kernel `name` (e.g.
        Triton's FlashAttention): its `attention_kernels[name]` points replace the
        fused attention points. An InputError when the calibration has none for it."""
        if name not in self.attention_kernels:
            from flopsim.errors import InputError

            raise InputError(f"attention kernel {name!r}: calibration {self.device or '(unnamed)'} has no figures "
                             f"for it (attention_kernels: {', '.join(self.attention_kernels) or 'none'})")
        keep = [g for g in self.gemm if not (g.kind == "attention" and g.variant in (None, "fused"))]
        return self.model_copy(update={"gemm": keep + list(self.attention_kernels[name]), "attention_kernel": name})

    def fixed_cost_s(self, kind: str, variant: str, hw, backward: bool = False) -> float:
        """Seconds per launch of a kernel of `kind` / `variant` (lookup step 4);
        a backward op looks for `...@bwd` keys first."""
        for key in _cost_keys(kind, variant, backward):
            if key in self.fixed_s:
                return self.fixed_s[key]
        return self.overhead_s(hw)

    def host_cost_s(self, kind: str, variant: str, backward: bool = False) -> float:
        """Host dispatch seconds per launch on a device that queues kernels (`host_s`,
        the keys of `fixed_cost_s`, then `launch`); 0 where the dispatch is not separate."""
        if not self.host_s:
            return 0.0
        for key in _cost_keys(kind, variant, backward):
            if key in self.host_s:
                return self.host_s[key]
        return self.host_s.get("launch", 0.0)

    def link(self, level: str, hw=None) -> Optional[LinkLevel]:
        """The calibrated link level, else one from the hardware's datasheet
        bandwidth (half its two-way figure) and launch overhead, else None."""
        if level in self.links:
            return self.links[level]
        if level == "scale_up_torus":  # no figure for the wrapped rings: the line's (conservative)
            return self.link("scale_up", hw)
        if hw is None:
            return None
        total = hw.interconnect_bytes_per_s if level == "scale_up" else getattr(hw, "scale_out_bytes_per_s", None)
        if not total:
            return None
        return LinkLevel(latency_s=self.overhead_s(hw), bus_bytes_per_s=total / 2,
                         source=f"{hw.name} datasheet bandwidth, no measured latency (ideal link)")


def calibration_path(device: str) -> Path:
    from flopsim.spec.paths import specs_dir

    return specs_dir() / "calibration" / f"{device}.yaml"


def calibration_output_path(device: str) -> Path:
    """Where a new calibration of `device` is written by default: the specs folder of a
    checkout (or $FLOPSIM_SPECS), never the specs inside an installed package."""
    from flopsim.errors import InputError
    from flopsim.spec.paths import specs_dir

    path = calibration_path(device)
    if specs_dir().name == "_specs":  # flopsim/_specs: the installed package's own data
        raise InputError(f"output: the shipped specs are inside the installed package ({specs_dir()}); give "
                         f"--output FILE and use it with --calibration FILE, or set FLOPSIM_SPECS to your own "
                         f"specs folder")
    return path


def load_calibration(calibration: Any = None, hw=None, attention_kernel: Optional[str] = None) -> Calibration:
    """A Calibration from None/"auto" (the device's shipped file; a device
    without one is an error, never a silent ideal), "ideal", a Calibration, a
    dict or a YAML path; with `attention_kernel`, its fused attention priced with
    that kernel's points (`Calibration.with_attention_kernel`)."""
    cal = _load_calibration(calibration, hw)
    return cal.with_attention_kernel(attention_kernel) if attention_kernel else cal


def _load_calibration(calibration: Any, hw) -> Calibration:
    from flopsim.errors import InputError
    from flopsim.spec.loader import read_yaml, validate

    device = getattr(hw, "name", "") or ""
    if isinstance(calibration, Calibration):
        return calibration
    if isinstance(calibration, dict):
        return validate(Calibration, calibration, "calibration")
    if calibration is None or calibration == "auto":
        path = calibration_path(device) if device else None
        if path is None or not exists(path):
            raise InputError(f"hardware {device or '(unnamed)'!r} has no calibration (specs/calibration/{device}.yaml): "
                             f"run `flopsim calibrate` on it, give --calibration PATH, or --calibration ideal")
        return validate(Calibration, read_yaml(path, "calibration"), str(path))
    if calibration == "ideal":
        return Calibration.ideal(device)
    path = Path(str(calibration))
    if path.suffix not in (".yaml", ".yml") and not exists(path):
        path = calibration_path(str(calibration))
    return validate(Calibration, read_yaml(path, "calibration", str(calibration)), str(calibration))


IDW_POWER = 4  # inverse-distance weights 1 / d^4: the nearest points dominate, measured points are exact


def _interpolate_shapes(coords: list, where: list, values: list):
    """One efficiency at the product shapes `coords` ((m, n, k) or (batch*m, n, k): numbers
    or arrays) from the measured shapes `where`: piecewise linear in log space of
    log-efficiency over the Delaunay triangulation of the measured shapes (scipy), each
    coordinate first clamped to the measured range (no extrapolation past the largest
    or smallest measured side); inverse-distance weighting (`_interpolate`) where the
    measured shapes span fewer than three dimensions (a published seed's few shapes)
    and outside their hull. Chosen by leave-one-out on measured calibrations (each point
    predicted from the others; H200, 226 memory-bound products: median error 8.8%
    against 27% for inverse-distance weighting alone; docs/wallclock.md)."""
    import numpy as np

    table = _shape_table(tuple(tuple(float(v) for v in w) for w in where), tuple(float(v) for v in values))
    if table is None:
        return _interpolate(coords, where, values, values)[0]
    low, high, linear = table
    arrays = np.broadcast_arrays(*(np.log(np.maximum(np.asarray(c, dtype=float), 1.0)) for c in coords))
    query = np.clip(np.stack([a.reshape(-1) for a in arrays], axis=-1), low, high)
    out = linear(query)
    outside = np.isnan(out)
    if outside.any():
        exp_query = [np.exp(query[outside, i]) for i in range(query.shape[1])]
        out[outside] = np.log(_interpolate(exp_query, where, values, values)[0])
    out = np.exp(out).reshape(arrays[0].shape)
    return float(out) if out.ndim == 0 else out


@functools.lru_cache(maxsize=64)
def _shape_table(where: tuple, values: tuple):
    """(low, high, scipy LinearNDInterpolator) over log shapes and log efficiencies, or None
    where the shapes do not span three dimensions (fewer than 4 affinely independent)."""
    import numpy as np

    points = np.log(np.maximum(np.array(where, dtype=float), 1.0))
    if len(points) < points.shape[1] + 1 or np.linalg.matrix_rank(points[1:] - points[0]) < points.shape[1]:
        return None
    from scipy.interpolate import LinearNDInterpolator
    from scipy.spatial import QhullError

    try:
        linear = LinearNDInterpolator(points, np.log(np.array(values, dtype=float)))
    except QhullError:
        return None
    return points.min(axis=0), points.max(axis=0), linear


def _interpolate(coords: list, where: list, compute: list, memory: list):
    """Efficiencies at `coords` (numbers or arrays) from measured points at
    `where`: inverse-distance weighting in log space of log-efficiency (a
    weighted geometric mean), exact at a measured point."""
    import numpy as np

    logs = [np.log(np.maximum(np.asarray(c, dtype=float), 1.0)) for c in coords]
    total_w = sum_c = sum_m = 0.0
    exact_c = exact_m = None
    for point, c, mem in zip(where, compute, memory):
        d2 = sum((x - np.log(max(float(v), 1.0))) ** 2 for x, v in zip(logs, point))
        hit = d2 < 1e-18
        if np.any(hit):
            exact_c = np.where(hit, c, np.nan if exact_c is None else exact_c)
            exact_m = np.where(hit, mem, np.nan if exact_m is None else exact_m)
        w = 1.0 / np.maximum(d2, 1e-18) ** (IDW_POWER / 2)
        total_w = total_w + w
        sum_c = sum_c + w * np.log(c)
        sum_m = sum_m + w * np.log(mem)
    out_c, out_m = np.exp(sum_c / total_w), np.exp(sum_m / total_w)
    if exact_c is not None:
        out_c = np.where(np.isnan(exact_c), out_c, exact_c)
        out_m = np.where(np.isnan(exact_m), out_m, exact_m)
    if np.ndim(out_c) == 0:
        return float(out_c), float(out_m)
    return out_c, out_m
