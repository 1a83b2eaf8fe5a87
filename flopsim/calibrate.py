"""`flopsim calibrate`: microbenchmarks measuring how close this device's
kernels come to its hardware spec, written as a Calibration
(flopsim.calibration) that the roofline then uses.

Each microbenchmark pairs a torch kernel with the flopsim primitive that
costs it (flopsim.ops.primitives), so the efficiencies are measured against
exactly the FLOPs and bytes the predictions use -- no second formula.

What is measured (`calibrate`), each a median of timed runs after warm-up,
threads fixed, CUDA synchronised:
- fixed cost per kernel launch (`fixed_s`, per kind and kernel variant,
  forward and backward): the kernel on a tiny problem. On a CPU it is timed
  *cold*, one call right after a decode-like matrix-vector product over
  cold weights -- the state a kernel finds inside a step (caches holding
  other data, the thread pool just busy) -- which costs 1.5-3x the hot
  loop's time. On a GPU, whose host queues kernels for the device, two
  figures: the device's time for the tiny kernel (`fixed_s`, queued back to
  back behind a spin kernel, flopsim.gpu_timing) and the host's dispatch
  per call (`host_s`, the eager wall-clock loop), which overlap in a step
  (flopsim.roofline.overlap_times). Every GPU point below is device time.
  A GPU also gets `graph_launch_s`: the device's time per kernel when a
  CUDA graph of GRAPH_KERNELS tiny kernels is replayed.
- matrix products over a grid of shapes (decode shapes m = 1..64, every m to 4, router
  widths n = 1, 8; a GPU's widths multiples of 128, GEMM_GRID): the
  weights are views into a pool larger than the
  last-level cache, cycled so that every call reads them from memory. On
  a CPU each product also writes its output into memory that is not in
  cache (views cycled over a second pool, `Bench.cold_outputs`), as a step
  does: a model's product writes a block the allocator last handed out
  many kernels earlier, a hot loop rewrites the one it just freed (on the
  2-core VM products of m = k = 512 and n = 512-8000 ran 11-12% slower
  into a cold output, one of k = 2048 no slower; inside the dense
  reference's forward its products ran 2-26% slower than in a hot loop).
  Where the product is compute-bound at the ideal roofline its measured
  busy time gives a compute efficiency; where it is memory-bound, a memory
  efficiency (the cold weights set its time). Busy time = time - the hot
  fixed cost of the kernel.
- batched products (torch.bmm, as padded MoE experts run): E = 8 products
  per kernel, their weights read cold (variant bmm), outputs as above.
- attention, fused and explicit, forward and backward; decode shapes read
  their keys and values cold from the pool (memory efficiency).
- memory-bound kernels (copy, elementwise ops per variant, RoPE, norms,
  softmax, sparse FF's Gumbel mask, embedding, gather, scatter, top-k, argmax,
  KV-cache append, loss, fused Adam), forward and backward, at sizes from cache-resident to
  memory-bound: an efficiency per size (small tensors stay in cache). On a
  CPU the forward kernels a train step runs are measured again as it runs
  them (`measure_train_forward`: inputs needing gradients, outputs kept),
  and so are the backward kernels (`measure_train_backward`: each call the
  backward of the next of a ring of graphs, its saved tensors cold, its
  gradient kept), points of their own (flopsim.calibration lookup step 8). The
  gathers per kernel both ways (index_select, x[idx], torch.gather, and
  forward the 2-d index): x[idx]'s backward, index_put_ with accumulate,
  runs serially on a CPU.

Efficiencies: compute_eff = (all_flops / peak) / busy, memory_eff =
(bytes / bandwidth) / busy, so fixed cost + roofline reproduces every
measured point. The shapes here are deliberately unlike the validation
suite's models (flopsim.validate checks that no calibration shape is a
validation shape).
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

# m: rows (tokens); n, k: output and input features. Decode shapes m = 1..64. A library's
# kernel for a small product changes with m, and its speed does not rise with it: on a 2-core
# AMD EPYC guest (torch 2.13, fp32, 2026-11-28) an 8000 x 512 product with cold weights read
# 10.2 GB/s at m = 1, 4.8 at m = 2, 3.5 at m = 3, 6.6 at m = 4 and 7.7 at m = 8, so every m
# up to 4 (a decode step of that many sequences) is measured, not interpolated across the dip.
GEMM_ROWS = (1, 2, 3, 4, 8, 24, 64, 200, 700, 2400)
GEMM_OUTPUTS = (1, 8, 96, 352, 1400, 5000)  # n: 1 and 8 for routers (MoD, MoE)
GEMM_INPUTS = (24, 96, 352, 1400, 5000)  # k: 24 for low-rank controllers
# A GPU's grid: widths that are multiples of 128, as models' are, and a row count past the
# 4,096 tokens of a GPU step. cuBLAS tiles products 64-256 wide, and a width off that grain
# wastes part of every tile: on an H200 (2026-11-26) 2400 x 5000 x 5000 ran at 0.59-0.61 of
# peak and 2400 x 5120 x 5120 at 0.76-0.78 (docs/measurements.md). A model with widths off
# the grain is predicted that much too fast.
GEMM_GRID = {"cpu": (GEMM_ROWS, GEMM_OUTPUTS, GEMM_INPUTS),
             "cuda": (GEMM_ROWS + (8192,), (1, 8, 96, 384, 1408, 5120), (24, 96, 384, 1408, 5120))}
# attention: (batch, heads, queries, keys, d_head)
ATTENTION_SHAPES = ((1, 6, 90, 90, 40), (2, 6, 300, 300, 40), (1, 10, 700, 700, 72), (3, 10, 1, 1500, 72),
                    (8, 6, 1, 300, 40), (1, 10, 1, 5000, 72))
ATTENTION_BACKWARD_SHAPES = ((1, 6, 90, 90, 40), (2, 6, 300, 300, 40), (1, 10, 700, 700, 72))
# a GPU also at the lengths and head widths its models run (fused kernels' efficiency
# climbs with both; the 2026-11-26 H200 run had only the shapes above, and predicted
# 1024-token, 128-wide attention 2.2x too slow from them)
ATTENTION_SHAPES_GPU = ((2, 12, 2000, 2000, 128), (1, 20, 3000, 3000, 64), (4, 12, 1, 6000, 128),
                        (16, 8, 1, 3000, 128))
ATTENTION_BACKWARD_SHAPES_GPU = ((2, 12, 2000, 2000, 128),)
# skip shapes that would take too long. A CPU's cap keeps the large-m, large-n, mid-k corner
# (2400 x 5000 x 352 .. 700 x 5000 x 5000, up to 0.2 s a call): with it skipped (cap 6e9,
# before 2026-11-27) a training step's LM head, 512 x 8000 x 512, was interpolated from the
# k = 24 and 96 products of that corner's edge, 0.63 of peak where it runs at 1.16, and
# the dense 2-core train step was predicted 18% slow
MAX_GEMM_FLOPS = {"cpu": 4e10, "cuda": 5e12}
# the pool of cold data: at least twice the last-level cache, within these bounds
POOL_BYTES = {"cpu": (256e6, 1.5e9), "cuda": (256e6, 2e9)}
FLUSH_BYTES = 4e6  # the decode-like product run before each cold timing
COLD_REPEATS = 41
MAX_VIEWS = 4096  # views a cold cycle spreads over the pool
PASSES = 3  # interleaved passes over the memory-bound products and the fixed costs
# a train step's forward kernels (measure_train_forward): the ring of kept outputs spans at least
# TRAIN_FOOTPRINT bytes written (or TRAIN_RING calls): far past a CPU's private caches, as a step's
# activations are (tens to hundreds of MB on the validation suite's models)
TRAIN_KERNELS = ("add", "mul", "gelu", "gelu_tanh", "relu", "silu", "swiglu", "tanh", "rope", "layernorm", "rmsnorm",
                 "softmax", "embedding", "gather index_select", "gather index", "gather gather", "gumbel_mask",
                 "cross_entropy")
TRAIN_FOOTPRINT = 256e6
TRAIN_RING = 4096
# bytes moved by the memory-bound benchmarks: from cache-resident to memory-bound (on a CPU an
# output above the allocator's mmap threshold -- glibc's grows to 32 MiB -- is fresh pages faulted
# in on first touch: the points are recorded net of that cost, measured apart, FRESH_PAGE_MIB)
MEMORY_SIZES = {"cpu": (8e3, 64e3, 512e3, 4e6, 32e6, 64e6, 256e6), "cuda": (64e3, 1e6, 16e6, 256e6, 2e9)}
BACKWARD_SIZES = {"cpu": (64e3, 4e6, 64e6), "cuda": (1e6, 64e6, 512e6)}
# allocations whose fresh pages are timed (CPU; flopsim.calibration lookup step 7): well above
# the most glibc's malloc serves from its heap (DEFAULT_MMAP_THRESHOLD_MAX, 32 MiB on 64-bit),
# so each is mapped afresh; below it a loop that frees and allocates one buffer is served by
# the heap's trimmed top, which a model's step, holding its other tensors, does not see
FRESH_PAGE_MIB = (64, 128, 256)
FRESH_PAGE_REPEATS = 9  # fresh and reused copies, alternating
# parameters of the fused Adam benchmarks: from cache-resident to a state (28 bytes a parameter
# moved) twice a CPU's last-level cache (on the 2-core VM: 44 GB/s at 8M parameters, 35 at 16M and 32M)
ADAM_PARAMS = {"cpu": (256 * 1024, 8 * 2 ** 20, 32 * 2 ** 20), "cuda": (2 ** 20, 64 * 2 ** 20)}
SMOKE = dict(rows=(1, 24), features=(96, 352), attention=((1, 2, 16, 16, 8), (1, 2, 1, 40, 8)),
             backward_attention=((1, 2, 16, 16, 8),), sizes=(64e3, 1e6), backward_sizes=(64e3,),
             pool=8e6, adam=(4096,), repeats=5, int4=((1, 256, 256),), fresh_pages=(2,))


@dataclass
class Point:
    """One measured kernel."""

    name: str
    kind: str
    gemm: Optional[tuple]  # (batch, m, n, k) for matrix products and attention
    seconds: float
    all_flops: float
    bytes: float
    compute_eff: float
    memory_eff: float
    size: Optional[float] = None  # the size class of a memory-bound benchmark (bytes)
    variant: str = ""  # the kernel (the op's variant: gelu, rmsnorm, explicit attention, ...)
    backward: bool = False
    memory_bound: bool = False  # measured where the ideal roofline is memory-bound (cold reads)
    train: bool = False  # measured as a train step's forward runs it (measure_train_forward)
    fixed_s: float = 0.0  # the kernel's hot fixed cost, subtracted from `seconds` for the efficiencies
    fresh_s: float = 0.0  # its output's fresh pages (flopsim.roofline.fresh_pages_s), subtracted as well
    probe: object = None  # the flopsim.probe reading taken beside it


MEASUREMENT_ENVIRONMENT = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME", "MKL_NUM_THREADS",
                           "MKL_THREADING_LAYER")


def measurement_environment() -> dict:
    """The threading environment measurements ran in (recorded with the calibration and
    the validation report). Nothing is changed: a measurement describes the machine as
    a user runs it. On a machine shared with other busy processes, torch's two OpenMP
    pools (ATen's and MKL's) spin-wait for cores they do not get and a kernel after a
    matrix product can stall by milliseconds (seen here: a 64-element gelu at 7.9 ms,
    0.02 ms on the idle machine): calibrate and validate on an idle machine."""
    import os

    return {key: os.environ.get(key, "") for key in MEASUREMENT_ENVIRONMENT}


def make_timer(device: str, min_time_s: float, repeats: int):
    """A hot-loop timer: seconds per call of fn (median of `repeats` batches)."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(fn: Callable[[], object]) -> float:
        fn()
        sync()
        n = 1
        while True:
            start = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= min_time_s or n >= 1 << 16:
                break
            n *= 2
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            samples.append((time.perf_counter() - start) / n)
        return statistics.median(samples)

    return timed


def last_level_cache_bytes(hw) -> float:
    """The device's last-level cache: on a CPU the largest cache level the OS
    reports (a virtual machine may report the host's), else the hardware spec's."""
    import glob

    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip().upper()
        except OSError:
            continue
        scale = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return float(max(sizes)) if sizes else float(hw.last_level_cache_bytes or 64e6)


@dataclass
class Bench:
    """What every microbenchmark needs: torch, the device, timers, the cold pool and the results."""

    torch: object
    device: str
    dtype: str
    hw: object
    timed: Callable
    pool: object  # a flat tensor larger than the last-level cache
    say: Callable
    smoke: bool
    gen: object
    points: list = field(default_factory=list)
    out_pool: object = None  # a CPU's products write into views of it (`cold_outputs`); made when first used
    fixed_hot: dict = field(default_factory=dict)  # "kind[:variant][@bwd]" -> hot seconds per call
    fixed_cold: dict = field(default_factory=dict)  # the same, cold (what the calibration records)
    host: dict = field(default_factory=dict)  # a queued device: host dispatch per call, in probe units
    host_timed: Optional[Callable] = None  # a queued device: the wall-clock timer (host dispatch)
    offset: int = 0
    probe: object = None  # flopsim.probe.Probe
    readings: list = field(default_factory=list)  # every probe reading taken
    fixed_readings: list = field(default_factory=list)  # those taken beside the fixed costs' own timing
    graph_launch_s: Optional[float] = None  # a GPU: device seconds per kernel replayed from a CUDA graph
    fresh_pages: object = None  # a CPU's calibration.FreshPages, at the speed of `fresh_reading`
    fresh_reading: object = None  # the probe reading beside the fresh pages' timing

    @property
    def queued(self) -> bool:
        """The host queues kernels for the device (a GPU): dispatch and device time are apart."""
        return self.host_timed is not None

    def fixed_units(self, reading) -> float:
        """The unit fixed costs are kept in: the probe's host-speed reading on a CPU (dispatch is
        in them), seconds on a queued device (device time does not move with the host)."""
        return 1.0 if self.queued else reading.fixed_s

    def time_host(self, key: str, fn: Callable[[], object], reading, per: int = 1) -> None:
        """A queued device's host dispatch for `key` (wall clock, in probe units)."""
        if self.queued:
            self.host.setdefault(key, []).append(self.host_timed(fn) / per / reading.fixed_s)

    def read_probe(self):
        """A drift-probe reading, kept for the calibration's median (flopsim.probe)."""
        reading = self.probe.read()
        self.readings.append(reading)
        return reading

    @property
    def torch_dtype(self):
        return {"fp32": self.torch.float32, "bf16": self.torch.bfloat16, "fp16": self.torch.float16}[self.dtype]

    @property
    def value_bytes(self) -> int:
        return 4 if self.dtype == "fp32" else 2

    @property
    def pool_bytes(self) -> float:
        return self.pool.numel() * self.value_bytes

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def rand(self, *shape, grad: bool = False):
        t = self.torch.randn(*shape, generator=self.gen).to(device=self.device, dtype=self.torch_dtype)
        return t.requires_grad_(grad)

    def cold(self, *shape):
        """A view of `shape` into the pool, the next one along (cycled): its data is not in cache."""
        from flopsim.probe import align_up

        n = math.prod(shape)
        if n > self.pool.numel():
            return self.rand(*shape)
        if self.offset + n > self.pool.numel():
            self.offset = 0
        view = self.pool[self.offset:self.offset + n].view(*shape)
        self.offset += align_up(n, self.value_bytes)  # the next view aligned (flopsim.probe.ALIGN_BYTES)
        return view

    def cold_cycle(self, *shape, footprint: Optional[float] = None, pool=None):
        """fn() -> the next of the views of `shape` spread over `footprint` bytes of the pool
        (or of `pool`; at most MAX_VIEWS of them: a tensor smaller than footprint / MAX_VIEWS is not
        read cold, but its time is its fixed cost anyway)."""
        from flopsim.probe import align_down, align_up

        pool = self.pool if pool is None else pool
        n = math.prod(shape)
        total = min(pool.numel(), int((footprint or self.pool_bytes) / self.value_bytes))
        count = max(1, min(MAX_VIEWS, total // max(align_up(n, self.value_bytes), 1)))
        stride = align_down(total // count, self.value_bytes)  # every view aligned (flopsim.probe.ALIGN_BYTES)
        views = ([pool[i * stride:i * stride + n].view(*shape) for i in range(count)] if n <= total
                 else [self.rand(*shape)])
        state = {"i": 0}

        def nxt():
            state["i"] = (state["i"] + 1) % len(views)
            return views[state["i"]]

        return nxt

    def cold_outputs(self, *shape):
        """fn() -> the next of the views of `shape` over the output pool (as large as the
        cold pool, apart from it, its pages touched once): where a CPU's product writes its
        result, memory that is not in cache, as inside a step (the module docstring)."""
        if self.out_pool is None:
            self.out_pool = self.torch.zeros_like(self.pool)
        return self.cold_cycle(*shape, pool=self.out_pool)

    def cold_time(self, fn: Callable[[], object]) -> float:
        """Median seconds of one call right after a decode-like product over cold weights (CPU);
        back to back on a GPU (launch-bound)."""
        if self.device == "cuda":
            return self.timed(fn)
        import torch.nn.functional as F

        side = int(math.sqrt(FLUSH_BYTES / self.value_bytes))
        x = self.rand(1, side)
        nxt = self.cold_cycle(side, side)
        samples = []
        for _ in range(SMOKE["repeats"] if self.smoke else COLD_REPEATS):
            F.linear(x, nxt())
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    def fixed(self, key: str, backward: bool = False) -> float:
        """The hot fixed cost of a kernel (for busy times), most specific key first."""
        kind_variant = key
        keys = [kind_variant, kind_variant.split(":")[0]]
        if backward:
            keys = [f"{k}@bwd" for k in keys] + keys
        for k in keys:
            if k in self.fixed_hot:
                return self.fixed_hot[k]
        return self.fixed_hot.get("launch", 0.0)

    def record(self, name, kind, gemm, seconds, op, matrix: bool, size=None, memory_bound: bool = False,
               reading=None, train: bool = False):
        """A measured kernel against its flopsim op (a primitive's forward or backward op)."""
        from flopsim.calibration import MAX_EFFICIENCY
        from flopsim.count import evaluate_ops

        from flopsim.roofline import executed_flops, fresh_pages_s

        cost = evaluate_ops([op], {})[0]
        all_flops, nbytes = float(executed_flops(cost)), float(cost.bytes)
        backward = op.pass_ == "bwd"
        fixed = self.fixed(f"{kind}:{op.variant}" if op.variant else kind, backward)
        fresh = float(fresh_pages_s(float(cost.act_write_bytes), float(cost.kernels), bool(op.tags.get("in_place")),
                                    self.fresh_pages))  # predicted on top of the roofline, as the fixed cost is
        busy = max(seconds - fixed - fresh, 0.1 * seconds)
        rate = self.hw.peak_flops_per_s_for(self.dtype)[0] if matrix else self.hw.vector_flops_per_s
        ce = min(MAX_EFFICIENCY, max(1e-6, all_flops / rate / busy)) if all_flops else 1.0
        me = min(MAX_EFFICIENCY, max(1e-6, nbytes / self.hw.memory_bandwidth_bytes_per_s / busy)) if nbytes else 1.0
        if reading is None and self.probe is not None:
            reading = self.read_probe()
        self.points.append(Point(name, kind, gemm, seconds, all_flops, nbytes, ce, me, size, op.variant, backward,
                                 memory_bound, train, fixed, fresh, reading))


def _ctx(dtype: str, phase: str = "forward", **changes):
    from flopsim.ops.primitives import Ctx
    from flopsim.ops.symbols import Dims
    from flopsim.spec.model import ModelSpec

    spec = ModelSpec(name="calibration", layers=1, d_model=64, heads=1, d_ff=64, vocab=2, dtype=dtype, **changes)
    return Ctx(spec=spec, phase=phase, dims=Dims.of(spec))


def _fwd(ops):
    return ops[0]


def _bwd(ops):
    """The primitive's backward op, or None when autograd's backward costs nothing in
    flopsim (an add passes its gradient through)."""
    op = next((op for op in ops if op.pass_ == "bwd"), None)
    if op is None or not (op.bytes or op.all_flops):
        return None
    return op


def calibrate(device: str = "cpu", *, hardware: Optional[str] = None, threads: Optional[int] = None,
              dtype: Optional[str] = None, min_time_s: float = 0.01, repeats: int = 5,
              progress: Optional[Callable[[str], None]] = None, smoke: bool = False, gemms_into=None):
    """Run the microbenchmarks on `device` ("cpu" or "cuda") against the
    hardware spec `hardware` (default: "cpu", or the GPU's preset when it
    can be recognised); returns (Calibration, list[Point]). `smoke` runs a
    handful of tiny shapes (tests of the machinery, not a calibration).
    `gemms_into` (a measured Calibration of this device): measure only the
    fixed costs and the matrix products, and return it with those replaced."""
    openmp = measurement_environment()
    import torch

    from flopsim.hardware import load_hardware

    if device == "cuda" and not torch.cuda.is_available():
        from flopsim.errors import InputError

        raise InputError("device: 'cuda': torch sees no CUDA device here")
    hw = load_hardware(hardware or guess_hardware(device))
    dtype = dtype or ("fp32" if device == "cpu" else "bf16")
    if gemms_into is not None:
        check_gemms_into(gemms_into, hw.name, dtype)
    if threads is not None:
        torch.set_num_threads(threads)
    say = progress or (lambda message: None)
    cache = last_level_cache_bytes(hw) if device == "cpu" else float(hw.last_level_cache_bytes or 64e6)
    low, high = POOL_BYTES[device]
    pool_bytes = SMOKE["pool"] if smoke else min(max(2 * cache, low), high)
    gen = torch.Generator(device="cpu").manual_seed(0)
    value_bytes = 4 if dtype == "fp32" else 2
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    pool = torch.randn(int(pool_bytes / value_bytes), generator=gen, dtype=torch.float32).to(device=device,
                                                                                            dtype=torch_dtype)
    clock = None
    if device == "cuda":
        from flopsim.gpu_timing import DeviceClock

        clock = DeviceClock.create(torch)
    wall = make_timer(device, min_time_s, repeats)
    bench = Bench(torch=torch, device=device, dtype=dtype, hw=hw, pool=pool, say=say, smoke=smoke, gen=gen,
                  timed=clock.timer(min_time_s, repeats) if clock else wall, host_timed=wall if clock else None)
    from flopsim.probe import Probe

    bench.probe = Probe(torch, device, torch_dtype, pool, gen, clock=clock)
    say(f"cold pool {pool_bytes / 1e6:.0f} MB (last-level cache {cache / 1e6:.0f} MB)")
    with torch.no_grad():
        measure_fixed_costs(bench)
        measure_fresh_pages(bench)
        measure_gemms(bench)
        measure_int4_products(bench)
        measure_batched_products(bench)
    if gemms_into is not None:
        return replace_gemms(gemms_into, bench), bench.points
    measure_attention(bench)
    measure_memory_kernels(bench)
    measure_backward_kernels(bench)
    measure_optimizer(bench)
    return assemble(bench, cache, openmp), bench.points


def check_gemms_into(base, hardware: str, dtype: str) -> None:
    """`--gemms-into`: the calibration must be a measured one of this device and dtype."""
    from flopsim.errors import InputError

    measured_dtype = (base.measured or {}).get("dtype")
    if base.kind != "measured" or (base.device, measured_dtype) != (hardware, dtype):
        raise InputError(f"gemms-into: a {base.kind} calibration of {base.device!r} in {measured_dtype}, "
                         f"not a measured one of {hardware!r} in {dtype}")


def measure_fixed_costs(bench: Bench) -> None:
    """Each kernel on a tiny problem, hot (for busy times) and cold (the calibration's fixed_s)."""
    kernels = tiny_kernels(bench)
    hot = {key: [] for key in kernels}
    cold = {key: [] for key in kernels}
    for _ in range(1 if bench.smoke else PASSES):  # interleaved passes (a shared host drifts)
        for key, (fn, backward) in kernels.items():
            reading = bench.read_probe()  # cold fixed costs are kept at the probe's speed (see assemble)
            bench.fixed_readings.append(reading)
            hot[key].append(bench.timed(fn))
            cold_s = hot[key][-1] if bench.queued else bench.cold_time(fn)  # a queued device: its time, back to back
            cold[key].append(cold_s / bench.fixed_units(reading))
            bench.time_host(key, fn, reading)
    bench.fixed_hot = {key: statistics.median(v) for key, v in hot.items()}
    bench.fixed_cold = {key: statistics.median(v) for key, v in cold.items()}  # in bench.fixed_units
    if bench.queued:
        bench.graph_launch_s = measure_graph_launch(bench)
    bench.say(f"fixed costs of {len(bench.fixed_cold)} kernels")


def measure_fresh_pages(bench: Bench) -> None:
    """A CPU's cost of fresh pages (flopsim.calibration, lookup step 7): at each size of
    FRESH_PAGE_MIB, a copy into a buffer allocated for it, as an eager op allocates its
    output (and freed after it, as the op's output is when it dies), against the same
    copy into a buffer in use, alternating; the median over the sizes of the difference
    a byte, at least 0. Measured before every other kernel, whose points are then
    recorded net of it (Bench.record). Not on a GPU, whose caching allocator reuses
    its blocks."""
    if bench.device != "cpu":
        return
    from flopsim.calibration import GLIBC_MMAP_MAX_BYTES, FreshPages

    torch = bench.torch
    bench.fresh_reading = bench.read_probe()
    rates = []
    for mib in (SMOKE["fresh_pages"] if bench.smoke else FRESH_PAGE_MIB):
        n = min(int(mib * 2 ** 20 / bench.value_bytes), bench.pool.numel())
        src = bench.pool[:n]
        kept = torch.empty_like(src)
        kept.copy_(src)  # its pages in use from now on
        fresh, reused = [], []
        for _ in range(SMOKE["repeats"] if bench.smoke else FRESH_PAGE_REPEATS):
            start = time.perf_counter()
            torch.empty_like(src).copy_(src)
            fresh.append(time.perf_counter() - start)
            start = time.perf_counter()
            kept.copy_(src)
            reused.append(time.perf_counter() - start)
        rates.append(max(0.0, statistics.median(fresh) - statistics.median(reused)) / (n * bench.value_bytes))
    sizes = "/".join(str(m) for m in (SMOKE["fresh_pages"] if bench.smoke else FRESH_PAGE_MIB))
    bench.fresh_pages = FreshPages(
        above_bytes=float(GLIBC_MMAP_MAX_BYTES), s_per_byte=statistics.median(rates),
        source=(f"flopsim calibrate: a copy into a new {sizes} MiB buffer against one in use, "
                f"{statistics.median(rates) * 1e12:.3g} ms a GB as measured (median of the sizes; the figure is "
                f"scaled to the calibration's reference speed); threshold: glibc "
                f"malloc.c DEFAULT_MMAP_THRESHOLD_MAX"))
    bench.say(f"fresh pages: {bench.fresh_pages.s_per_byte * 1e12:.3g} ms a GB from 32 MiB")


def fresh_pages_at(bench: Bench, ref):
    """The measured fresh pages scaled from the speed read beside them to `ref` by the
    matrix-rate reading, as every point is (`_at_reference`)."""
    if bench.fresh_pages is None or bench.fresh_reading is None:
        return bench.fresh_pages
    factor = ref.compute_s / bench.fresh_reading.compute_s
    return bench.fresh_pages.model_copy(update={"s_per_byte": min(1e-6, bench.fresh_pages.s_per_byte * factor)})


GRAPH_KERNELS = 256  # tiny kernels captured in the graph that measures graph_launch_s


def measure_graph_launch(bench: Bench) -> Optional[float]:
    """Device seconds per kernel when a CUDA graph replays GRAPH_KERNELS tiny adds back to
    back (what an engine that replays its step as a graph pays per kernel: the
    Calibration's `graph_launch_s`); None where torch cannot capture a graph here."""
    torch = bench.torch
    x, y = bench.rand(1, 64), bench.rand(1, 64)
    out = torch.empty_like(x)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for _ in range(3):
                torch.add(x, y, out=out)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_KERNELS):
                torch.add(x, y, out=out)
    except (RuntimeError, AttributeError) as err:  # no graph support in this build or driver
        bench.say(f"CUDA graph capture failed ({type(err).__name__}): graph_launch_s not measured")
        return None
    return bench.timed(graph.replay) / GRAPH_KERNELS


def tiny_kernels(bench: Bench) -> dict:
    """"kind[:variant][@bwd]" -> (fn, backward) on a tiny problem (64 values, one row)."""
    import torch
    import torch.nn.functional as F

    from flopsim.torchref.model import make_norm, rope_qk
    from flopsim.torchref.sparse_ff import gumbel_mask

    x, y = bench.rand(1, 64), bench.rand(1, 64)
    # the modules the references call (module-call overhead included)
    dev, dt = bench.device, bench.torch_dtype
    linear = torch.nn.Linear(64, 64, bias=False).to(dev, dt)
    router = torch.nn.Linear(64, 8, bias=False).to(dev, dt)
    layernorm = make_norm(_ctx(bench.dtype).spec, 64).to(dev, dt)
    rmsnorm = make_norm(_ctx(bench.dtype, norm="rmsnorm").spec, 64).to(dev, dt)
    embed = torch.nn.Embedding(256, 64).to(dev, dt)
    q, k, v = bench.rand(1, 1, 1, 16), bench.rand(1, 1, 8, 16), bench.rand(1, 1, 8, 16)
    table, ids = bench.rand(256, 64), torch.zeros(1, dtype=torch.long, device=bench.device)
    positions = torch.zeros(1, 1, dtype=torch.long, device=bench.device)
    cache, new = bench.rand(1, 1, 4, 16), bench.rand(1, 1, 1, 16)
    kernels = {
        "launch": (lambda: torch.add(x, y), False),
        "matmul": (lambda: linear(x), False),
        "router": (lambda: router(x), False),
        "attention:fused": (lambda: F.scaled_dot_product_attention(q, k, v), False),
        "attention:explicit": (lambda: explicit_attention(q, k, v, False), False),
        "elementwise:rope": (lambda: rope_qk(q, k[:, :, :1], positions), False),
        "softmax": (lambda: torch.softmax(x, dim=-1), False),
        "softmax:gumbel": (lambda: gumbel_mask(x.view(1, -1, GUMBEL_BLOCK)), False),
        "norm:layernorm": (lambda: layernorm(x), False),
        "norm:rmsnorm": (lambda: rmsnorm(x), False),
        "embedding": (lambda: embed(ids), False),
        "gather": (lambda: table.index_select(0, ids), False),
        "gather:index": (lambda: table[ids], False),
        "gather:gather": (lambda: table.gather(0, ids.unsqueeze(-1).expand(-1, 64)), False),
        "gather:index_2d": (lambda: table[ids.view(1, 1)], False),
        "scatter": (lambda: table.index_add_(0, ids, x), False),
        "topk": (lambda: torch.topk(x, 8, dim=-1), False),
        "topk:argmax": (lambda: torch.argmax(x, dim=-1), False),
        "kv_cache": (lambda: cache[:, :, -1:].copy_(new), False),
        "loss": (lambda: F.cross_entropy(x, ids), False),
    }
    for op, (_, fn) in elementwise_kernels().items():
        kernels[f"elementwise:{op}"] = ((lambda fn=fn: fn(x, y)), False)
    return kernels


def measure_gemms(bench: Bench) -> None:
    """Matrix products (F.linear, as the reference's nn.Linear runs them; on a CPU its kernel,
    mm, writing into a cold output) with cold weights, timed by `_time_products`."""
    import torch.nn.functional as F

    from flopsim.ops import primitives as P

    ctx = _ctx(bench.dtype)
    rows, outputs, inputs = ((SMOKE["rows"], SMOKE["features"], SMOKE["features"]) if bench.smoke
                             else GEMM_GRID[bench.device])
    shapes = []
    for m, n, k in itertools.product(rows, outputs, inputs):
        if 2 * m * n * k > MAX_GEMM_FLOPS[bench.device]:
            continue
        op = _fwd(P.linear(ctx, "x", layer=0, tokens=m, d_in=k, d_out=n, bias=False))
        x, weights = bench.rand(m, k), bench.cold_cycle(n, k)
        if bench.device == "cpu":  # the result written cold, as inside a step (F.linear's own kernel: mm)
            outputs = bench.cold_outputs(m, n)
            fn = (lambda x=x, w=weights, o=outputs: bench.torch.mm(x, w().t(), out=o()))
        else:
            fn = (lambda x=x, w=weights: F.linear(x, w()))
        shapes.append(((1, m, n, k), fn, op))
    _time_products(bench, "matrix products", shapes)


# batched products (torch.bmm over [E, m, k] x [E, k, n], as padded MoE experts run): E, then the rows,
# outputs and inputs of each product (the CPU's GEMM grid's widths)
BMM_GRID = {"cpu": ((8,), (8, 24, 64, 200), (352, 1400), (352, 1400)),
            "cuda": ((8,), (64, 256, 1024), (1024, 4096), (1024, 4096))}


def measure_batched_products(bench: Bench) -> None:
    """Batched products (torch.bmm, the padded MoE experts' kernel: variant "bmm") with each
    batch's weights read cold, as one projection of E experts streams them. A CPU runs the E
    products of a bmm about as its own products, not as one product of E x m rows, and reads
    E weight matrices: the lookup places a bmm point (batch E, m, n, k) where an op of E
    products in one kernel looks, (E m, n, k) for compute and (m, E n, k) for memory
    (Calibration.efficiency). Timed by `_time_products`, as the products are."""
    from dataclasses import replace

    from flopsim.ops import primitives as P

    ctx = _ctx(bench.dtype)
    batches, rows, outputs, inputs = (((2,), SMOKE["rows"], SMOKE["features"], SMOKE["features"]) if bench.smoke
                                      else BMM_GRID[bench.device])
    shapes = []
    for e, m, n, k in itertools.product(batches, rows, outputs, inputs):
        if 2 * e * m * n * k > MAX_GEMM_FLOPS[bench.device]:
            continue
        op = replace(_fwd(P.linear(ctx, "x", layer=0, tokens=m, d_in=k, d_out=n, bias=False, batch=e)), variant="bmm")
        x, weights = bench.rand(e, m, k), bench.cold_cycle(e, k, n)
        outputs = bench.cold_outputs(e, m, n) if bench.device == "cpu" else (lambda: None)
        shapes.append(((e, m, n, k), (lambda x=x, w=weights, o=outputs: bench.torch.bmm(x, w(), out=o())), op))
    _time_products(bench, "batched products", shapes)


def _time_products(bench: Bench, label: str, shapes: list) -> None:
    """Record matrix products ((batch, m, n, k), fn, flopsim op): each timed in PASSES
    interleaved passes, a drift-probe reading beside each timing (flopsim.probe), and the
    median of the timings scaled to one host speed kept (a shared host's speed drifts
    within seconds); memory-bound where the ideal roofline is (cold weights set its time)."""
    peak, bandwidth = bench.hw.peak_flops_per_s_for(bench.dtype)[0], bench.hw.memory_bandwidth_bytes_per_s
    samples = {shape: [] for shape, _, _ in shapes}  # (seconds, the probe reading beside them)
    for i in range(1 if bench.smoke else PASSES):
        for shape, fn, _ in shapes:
            samples[shape].append((bench.timed(fn), bench.read_probe()))
        bench.say(f"{len(shapes)} {label}, pass {i + 1}")
    for (b, m, n, k), _, op in shapes:
        memory_bound = 2 * b * m * n * k / peak < float(op.bytes) / bandwidth
        seconds, reading = at_first_reading(samples[(b, m, n, k)], "memory_s" if memory_bound else "compute_s")
        name = f"linear m={m} n={n} k={k}" if b == 1 else f"bmm b={b} m={m} n={n} k={k}"
        bench.record(name, "matmul", (b, m, n, k), seconds, op, matrix=True, memory_bound=memory_bound,
                     reading=reading)


# weight-only int4 products (tinygemm, `torch.ops.aten._weight_int4pack_mm`: gpt-fast's int4 kernel) at
# decode: (m, n, k) and group sizes; a bf16 / fp16 run only (its scales and zero points are the dtype's)
INT4_SHAPES = {"cpu": ((1, 4096, 4096),), "cuda": ((1, 4096, 4096), (1, 12288, 4096), (1, 4096, 11008),
                                                   (1, 8192, 8192), (16, 4096, 4096))}
INT4_GROUPS = (32, 128)


def _int4_kernel(bench: Bench):
    """(make packed weights (n, k) -> tensor, product (x, w, group, scales) -> y) of tinygemm on
    this device, or None where torch has none."""
    torch, aten = bench.torch, bench.torch.ops.aten
    if bench.device == "cpu" and hasattr(aten, "_weight_int4pack_mm_for_cpu"):
        def make(n, k):
            return aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32,
                                                                          generator=bench.gen), 8)
        return make, aten._weight_int4pack_mm_for_cpu
    if bench.device == "cuda" and hasattr(aten, "_weight_int4pack_mm"):
        def make(n, k):  # two 4-bit values a byte, packed for the kernel's 8 inner k-tiles
            raw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=bench.gen).to(bench.device)
            return aten._convert_weight_to_int4pack(raw, 8)
        return make, aten._weight_int4pack_mm
    return None


def measure_int4_products(bench: Bench) -> None:
    """Weight-only int4 products as gpt-fast runs them (tinygemm: int4 weights, a bf16 scale
    and zero point per group, dequantized inside the kernel), each reading weights cold (copies
    spread over the pool), priced with the model's op (`precision: {weights: int4, group_size,
    scale_bytes: 4}`, variant int4_weights). Only in bf16 / fp16 runs; a torch without the kernel,
    or one that refuses a shape, measures none (said in the progress)."""
    from flopsim.ops import primitives as P

    kernel = _int4_kernel(bench) if bench.dtype in ("bf16", "fp16") else None
    if kernel is None:
        bench.say("int4 products: not measured (a bf16 / fp16 run with torch's tinygemm kernel only)")
        return
    make, product = kernel
    shapes = SMOKE["int4"] if bench.smoke else INT4_SHAPES[bench.device]
    for m, n, k in shapes:
        for group in INT4_GROUPS:
            ctx = _ctx(bench.dtype, precision={"weights": "int4", "group_size": group, "scale_bytes": 4})
            op = _fwd(P.linear(ctx, "x", layer=0, tokens=m, d_in=k, d_out=n, bias=False))
            copies = max(2, int(bench.pool_bytes // float(op.weight_bytes)) + 1)  # more than the pool: cold
            try:
                weights = [make(n, k) for _ in range(min(copies, MAX_VIEWS))]
                scales = bench.rand(k // group, n, 2)
                x, turn = bench.rand(m, k), itertools.cycle(weights)  # the next copy each call: cold

                def fn(x=x, turn=turn, scales=scales, group=group):
                    return product(x, next(turn), group, scales)

                seconds = bench.timed(fn)
            except (RuntimeError, TypeError, ValueError) as err:  # this torch refuses the shape or the layout
                bench.say(f"int4 product m={m} n={n} k={k} group {group}: not measured ({str(err)[:80]})")
                continue
            bench.record(f"int4 linear m={m} n={n} k={k} g={group}", "matmul", (1, m, n, k), seconds, op,
                         matrix=True, memory_bound=True)
    bench.say("int4 products")


def at_first_reading(samples: list, component: str):
    """(median time, reading) of (seconds, probe reading) samples of one kernel taken at
    different moments, each scaled to the host speed of the first reading."""
    first = samples[0][1]
    return statistics.median(t * getattr(first, component) / getattr(r, component) for t, r in samples), first


def projected_qkv(bench: Bench, b: int, h: int, s: int, dh: int, grad: bool = False):
    """Queries, keys and values [b, h, s, dh] as the references lay them out: views of one
    fused projection's output [b, s, 3 h dh], split and transposed (flopsim.torchref.model's
    Attention.project), not three contiguous tensors: a kernel reads them strided. With
    `grad`, the projection's output is a leaf and the views are what gradients are taken
    for (torch.autograd.grad to the views runs no split-backward copy)."""
    qkv = bench.rand(b, s, 3 * h * dh, grad=grad)
    return tuple(t.view(b, s, h, dh).transpose(1, 2) for t in qkv.split(h * dh, dim=-1))


def measure_attention(bench: Bench) -> None:
    """Fused (SDPA) and explicit attention, forward (decode shapes reading cold keys) and backward."""
    import torch
    import torch.nn.functional as F

    from flopsim.ops import primitives as P

    def run(impl, q, k_, v, causal):
        if impl == "fused":
            return F.scaled_dot_product_attention(q, k_, v, is_causal=causal)
        return explicit_attention(q, k_, v, causal)

    gpu = bench.device == "cuda"
    shapes = ATTENTION_SHAPES + (ATTENTION_SHAPES_GPU if gpu else ())
    backward_shapes = ATTENTION_BACKWARD_SHAPES + (ATTENTION_BACKWARD_SHAPES_GPU if gpu else ())
    for b, h, s, t, dh in (SMOKE["attention"] if bench.smoke else shapes):
        decode = s == 1  # one query against a cache: contiguous cached keys and values
        cold = (lambda shape=(b, h, t, dh): bench.cold(*shape)) if decode else None
        q, k_, v = (bench.rand(b, h, s, dh), None, None) if decode else projected_qkv(bench, b, h, s, dh)
        for impl in ("fused", "explicit"):
            if decode:
                fn = (lambda impl=impl: run(impl, q, cold(), cold(), False))
            else:
                fn = (lambda impl=impl: run(impl, q, k_, v, True))
            with torch.no_grad():  # decode shapes read cold keys: the median of PASSES timings
                seconds = statistics.median(bench.timed(fn) for _ in range(PASSES if decode and not bench.smoke else 1))
            op = _fwd(P.attention(_ctx(bench.dtype, attention_impl=impl), "x", layer=0, batch=b, queries=s, keys=t,
                                  heads=h, kv_heads=h, d_head=dh, causal=not decode, kv_from_cache=decode,
                                  module="x"))
            bench.record(f"attention {impl} b={b} h={h} s={s} t={t} d={dh}", "attention", (b * h, s, t, dh),
                         seconds, op, matrix=True, memory_bound=decode)
    for b, h, s, t, dh in (SMOKE["backward_attention"] if bench.smoke else backward_shapes):
        for impl in ("fused", "explicit"):
            q, k_, v = projected_qkv(bench, b, h, s, dh, grad=True)
            out = run(impl, q, k_, v, True)
            grad = torch.randn_like(out)
            seconds = bench.timed(lambda: torch.autograd.grad(out, (q, k_, v), grad, retain_graph=True))
            op = _bwd(P.attention(_ctx(bench.dtype, "train", attention_impl=impl), "x", layer=0, batch=b, queries=s,
                                  keys=t, heads=h, kv_heads=h, d_head=dh, causal=True, kv_from_cache=False,
                                  module="x"))
            bench.record(f"attention {impl} backward b={b} h={h} s={s} d={dh}", "attention", (b * h, s, t, dh),
                         seconds, op, matrix=True)
    bench.say("attention")


def _memory_shapes(bench: Bench, size: float, width: int = 1024) -> tuple[int, int]:
    """(elements, rows) of a [rows, width] tensor read once in `size` bytes of a read + write."""
    n = width * max(1, int(size / (2 * bench.value_bytes)) // width)
    n = n if n < 64 * 64 else n // (64 * 64) * (64 * 64)  # whole [positions, 64] tiles for RoPE
    return n, n // width


def measure_memory_kernels(bench: Bench) -> None:
    """Memory-bound forward kernels at sizes from cache-resident to memory-bound (hot: activations);
    on a CPU also as a train step's forward runs them (`measure_train_forward`)."""
    import torch

    sizes = SMOKE["sizes"] if bench.smoke else MEMORY_SIZES[bench.device]
    with torch.no_grad():
        for size in sizes:
            for name, kind, fn, op in memory_kernels(bench, size):
                bench.record(f"{name} {size:.3g}B", kind, None, bench.timed(fn), op, matrix=False, size=size)
            bench.say(f"memory-bound kernels at {size:.3g} B")
    if bench.device == "cpu":
        for size in sizes:
            measure_train_forward(bench, size)


def measure_train_forward(bench: Bench, size: float) -> None:
    """The memory-bound forward kernels a train step runs (TRAIN_KERNELS) at `size`, as it runs
    them (flopsim.calibration lookup step 8): inputs needing gradients, and each call's
    output -- with what autograd saved for its backward -- held in a ring of at least
    TRAIN_FOOTPRINT bytes (at most TRAIN_RING calls), filled before the timing, so that each
    call writes memory not in cache while the ring's oldest block is freed. A GPU's caching
    allocator and its small cache leave it out (its forward points serve)."""
    from collections import deque

    for name, kind, fn, op in memory_kernels(bench, size, grad=True):
        if name not in TRAIN_KERNELS:
            continue
        # what a call keeps: its output, or for a loss (a scalar written) its input's size
        written = float(op.act_write_bytes) or float(op.act_read_bytes)
        footprint = SMOKE["pool"] if bench.smoke else TRAIN_FOOTPRINT
        ring = deque(maxlen=max(2, min(TRAIN_RING, math.ceil(footprint / written))))
        for _ in range(ring.maxlen):
            ring.append(fn())
        seconds = bench.timed(lambda fn=fn, ring=ring: ring.append(fn()))
        ring.clear()
        bench.record(f"{name} {size:.3g}B, train", kind, None, seconds, op, matrix=False, size=size, train=True)
    bench.say(f"train-step forward kernels at {size:.3g} B")


def memory_kernels(bench: Bench, size: float, grad: bool = False) -> list:
    """(name, kind, fn, flopsim op) of every memory-bound forward kernel at `size` (`grad`: its
    inputs need gradients, as in a train step)."""
    import torch
    import torch.nn.functional as F

    from flopsim.ops import primitives as P
    from flopsim.torchref.model import make_norm, rope_qk
    from flopsim.torchref.sparse_ff import gumbel_mask

    ctx, dt, dev = _ctx(bench.dtype), bench.dtype, bench.device
    width = 1024
    n, rows = _memory_shapes(bench, size, width)
    x, other = bench.rand(rows, width, grad=grad), bench.rand(rows, width, grad=grad)
    out = []
    for op, (inputs, fn) in elementwise_kernels().items():
        out.append((op, "elementwise", (lambda fn=fn: fn(x, other)),
                    _fwd(P.elementwise(ctx, "x", layer=0, elements=n, op=op, inputs=inputs, module="x"))))
    span, heads = rope_layout(n)  # queries and keys as the references lay them out: views of a
    qkv = x.view(-1)[:3 * heads * span * 64].view(1, span, 3 * heads * 64)  # [1, positions, 3 heads 64] projection
    q, k = (t.view(1, span, heads, 64).transpose(1, 2) for t in qkv.split(heads * 64, dim=-1)[:2])
    positions = torch.arange(span, device=dev).expand(1, span)
    out.append(("rope", "elementwise", lambda: rope_qk(q, k, positions),
                _fwd(P.elementwise(ctx, "x", layer=0, elements=2 * heads * span * 64, op="rope", module="x"))))
    layernorm = make_norm(ctx.spec, width).to(dev, bench.torch_dtype)  # the references' norm modules
    rmsnorm = make_norm(_ctx(dt, norm="rmsnorm").spec, width).to(dev, bench.torch_dtype)
    out.append(("layernorm", "norm", lambda: layernorm(x), _fwd(P.norm(ctx, "x", layer=0, tokens=rows, d=width))))
    out.append(("rmsnorm", "norm", lambda: rmsnorm(x),
                _fwd(P.norm(_ctx(dt, norm="rmsnorm"), "x", layer=0, tokens=rows, d=width))))
    logits = x.view(-1, 256 if n >= 256 else n)
    out.append(("softmax", "softmax", lambda: torch.softmax(logits, dim=-1),
                _fwd(P.elementwise(ctx, "x", layer=0, elements=n, op="softmax", module="x", kind="softmax"))))
    table_rows = max(4 * rows, 4096)
    table = bench.rand(table_rows, width, grad=grad)
    ids = torch.randint(0, table_rows, (rows,), generator=bench.gen).to(dev)
    out.append(("embedding", "embedding", lambda: F.embedding(ids, table),
                _fwd(P.embedding(ctx, "x", layer=0, tokens=rows, rows=table_rows, d=width))))
    local = ids.remainder(rows)
    along = local.unsqueeze(-1).expand(-1, width)
    for variant, fn in (("index_select", lambda: x.index_select(0, local)), ("index", lambda: x[local]),
                        ("gather", lambda: x.gather(0, along))):  # the gather kernels the references run
        out.append((f"gather {variant}", "gather", fn,
                    _fwd(P.gather(ctx, "x", layer=0, rows=rows, d=width, module="x", variant=variant))))
    out.append(_weight_row_copy(bench, ctx, rows, width))
    target = bench.rand(rows, width)
    perm = torch.randperm(rows, generator=bench.gen).to(dev)  # distinct rows, as combine / scatter-back write
    out.append(("scatter", "scatter", lambda: target.index_add_(0, perm, x),
                _fwd(P.scatter(ctx, "x", layer=0, rows=rows, d=width, module="x"))))
    blocks = x.view(-1)[:n // GUMBEL_BLOCK * GUMBEL_BLOCK].view(-1, GUMBEL_BLOCK)
    out.append(("gumbel_mask", "softmax", lambda: gumbel_mask(blocks),
                _fwd(P.gumbel_mask(ctx, "x", layer=0, elements=blocks.numel(), module="x"))))
    scores = x.view(-1, 64)
    out.append(("argmax", "topk", lambda: torch.argmax(scores, dim=-1),
                P.argmax(ctx, "x", layer=0, rows=n // 64, n=64, module="x")[0]))
    out.append(("topk", "topk", lambda: torch.topk(scores, 8, dim=-1),
                P.topk(ctx, "x", layer=0, rows=n // 64, n=64, k=8, module="x")[0]))
    batch = max(1, rows // 8)  # new keys and values of `batch` sequences, 8 heads of 64
    cache_k, new_k = bench.rand(batch, 8, 16, 64), bench.rand(batch, 8, 1, 64)
    out.append(("kv_cache append", "kv_cache", lambda: cache_k[:, :, -1:].copy_(new_k),
                P.kv_cache_append(ctx, "x", layer=0, batch=batch, tokens=1, width=2 * 8 * 64, module="x")[0]))
    classes = 1024
    labels = torch.randint(0, classes, (n // classes,), generator=bench.gen).to(dev)
    out.append(("cross_entropy", "loss", lambda: F.cross_entropy(x.view(-1, classes), labels),
                _fwd(P.cross_entropy(ctx, "x", layer=0, rows=n // classes, classes=classes, module="x"))))
    return out


GUMBEL_BLOCK = 16  # logits per block of the Gumbel mask's benchmark (sparse FF's block size N)
SPARSE_FF_TABLE_ROWS = 4096  # the table of the index_2d measurement: a 4096 x 1024 FF weight (16 MB in fp32)


def _weight_row_copy(bench: Bench, ctx, rows: int, width: int) -> tuple:
    """Sparse FF's per-token weight gather as the model runs it: `rows` rows copied
    out of one FF-sized weight table (W[units], 16 per token) and priced with the
    model's own op (flopsim.ops.primitives.weight_row_copy: the distinct rows read
    once, the copy written). The table stays the same size at every size: a forward's
    copy outgrows it, as a model's does, so reads hit the cache and writes dominate."""
    import torch

    from flopsim.ops import primitives as P

    table = bench.rand(SPARSE_FF_TABLE_ROWS, width)
    units = torch.randint(0, SPARSE_FF_TABLE_ROWS, (max(1, rows // 16), 16), generator=bench.gen).to(bench.device)
    op = P.weight_row_copy(ctx, "x", layer=0, copies=units.numel(), row=width,
                           units_read=int(units.unique().numel()), module="x")
    return "gather index_2d", "gather", (lambda: table[units]), op


def backward_kernels(bench: Bench, n: int, width: int = 1024) -> list:
    """(name, kind, variant, make) of the backward kernels whose forward is memory-bound; make() ->
    (output, inputs) of a forward with gradients, on n elements ([rows, width])."""
    import torch
    import torch.nn.functional as F

    from flopsim.torchref.sparse_ff import gumbel_mask

    rows = max(1, n // width)
    dev = bench.device
    table_rows = max(4 * rows, 4096)
    ids = torch.randint(0, table_rows, (rows,), generator=bench.gen).to(dev)
    labels = torch.randint(0, width, (rows,), generator=bench.gen).to(dev)
    local = torch.randperm(rows, generator=bench.gen).to(dev)
    out = []
    for op, (inputs, fn) in elementwise_kernels().items():
        if op == "copy":
            continue
        out.append((op, "elementwise", op, lambda fn=fn, inputs=inputs: _graph(
            bench, fn, [(rows, width, True)] * inputs + [(rows, width, False)] * (2 - inputs))))
    out.append(("layernorm", "norm", "layernorm", lambda: _graph(
        bench, lambda x, w, b: F.layer_norm(x, (width,), w, b), [(rows, width, True), (width, True), (width, True)])))
    out.append(("rmsnorm", "norm", "rmsnorm", lambda: _graph(
        bench, lambda x, w: F.rms_norm(x, (width,), w, eps=1e-6), [(rows, width, True), (width, True)])))
    out.append(("softmax", "softmax", "softmax", lambda: _graph(
        bench, lambda x: torch.softmax(x, dim=-1), [(rows, width, True)])))
    out.append(("gumbel_mask", "softmax", "gumbel", lambda: _graph(
        bench, lambda x: gumbel_mask(x.view(rows, -1, GUMBEL_BLOCK)), [(rows, width, True)])))
    out.append(("embedding", "embedding", "", lambda: _graph(
        bench, lambda t: F.embedding(ids, t), [(table_rows, width, True)])))
    # the gather kernels' backward differs by kernel: index_select's and torch.gather's add the
    # rows' gradients in parallel; x[idx]'s (index_put_ with accumulate) runs serially on a CPU,
    # about 10x slower (MoE's dispatch: each token's row picked top-k times)
    src = max(1, rows // 2)
    repeated = torch.randint(0, src, (rows,), generator=bench.gen).to(dev)
    along = local.unsqueeze(-1).expand(-1, width)
    for variant, fn, source in (("index_select", lambda x: x.index_select(0, local), rows),
                                ("index", lambda x: x[repeated], src),
                                ("gather", lambda x: x.gather(0, along), rows)):
        out.append((f"gather {variant}", "gather", variant, lambda fn=fn, source=source: _graph(
            bench, fn, [(source, width, True)])))
    out.append(("cross_entropy", "loss", "", lambda: _graph(
        bench, lambda x: F.cross_entropy(x, labels), [(rows, width, True)])))
    out.append(("rope", "elementwise", "rope", lambda: _rope_graph(bench, n)))
    return out


def rope_layout(n: int) -> tuple[int, int]:
    """(positions, heads) of the RoPE benchmarks on about n elements: queries and keys of
    [1, heads, positions, 64] (2 * heads * positions * 64 elements)."""
    span = max(1, min(64, n // 192))
    return span, max(1, n // (3 * span * 64))


def _rope_graph(bench: Bench, n: int):
    """((queries, keys) rotated, (queries, keys)) of the references' RoPE (rope_qk) on views
    of one projection's output (projected_qkv, with gradients): its backward as autograd runs
    the eager kernels -- the gradients through cat, neg and the halves' slices
    (slice_backward), summed -- which flopsim's one `rope` op prices."""
    import torch

    from flopsim.torchref.model import rope_qk

    span, heads = rope_layout(n)
    q, k, _ = projected_qkv(bench, 1, heads, span, 64, grad=True)
    positions = torch.arange(span, device=bench.device).expand(1, span)
    return rope_qk(q, k, positions), [q, k]


CHAIN = 16  # nodes in the chain that times a backward node inside a backward pass


def _chain(make):
    """(output, inputs) of CHAIN copies of the kernel applied one after another (each on the last output,
    for one-tensor kernels; side by side and summed otherwise)."""
    outs, leaves = [], []
    for _ in range(CHAIN):
        out, inputs = make()
        outs += out if isinstance(out, tuple) else [out]  # a kernel of several outputs: each summed
        leaves += inputs
    total = outs[0]
    for out in outs[1:]:
        total = total + out.reshape(total.shape) if out.numel() == total.numel() else total + out.sum()
    return total, leaves


def _graph(bench: Bench, fn, shapes):
    """(output, inputs needing gradients) of fn on random inputs of `shapes` ((.., grad) tuples)."""
    args = [bench.rand(*shape[:-1], grad=shape[-1]) for shape in shapes]
    return fn(*args), [a for a in args if a.requires_grad]


def _backward_op(bench: Bench, name: str, kind: str, n: int, width: int = 1024, variant: str = ""):
    """The flopsim backward op of a kernel measured by measure_backward_kernels."""
    from flopsim.ops import primitives as P

    ctx, rows = _ctx(bench.dtype, "train"), max(1, n // width)
    if name == "rope":
        span, heads = rope_layout(n)
        return _bwd(P.rope(ctx, "x", layer=0, tokens=span, heads=heads, kv_heads=heads, d_head=64, module="x",
                           positions=span))
    if kind == "elementwise":
        inputs = elementwise_kernels()[name][0]
        return _bwd(P.elementwise(ctx, "x", layer=0, elements=n, op=name, inputs=inputs, module="x"))
    if kind == "norm":
        return _bwd(P.norm(_ctx(bench.dtype, "train", norm=name), "x", layer=0, tokens=rows, d=width))
    if name == "gumbel_mask":
        return _bwd(P.gumbel_mask(ctx, "x", layer=0, elements=rows * width, module="x"))
    if kind == "softmax":
        return _bwd(P.elementwise(ctx, "x", layer=0, elements=n, op="softmax", module="x", kind="softmax"))
    if kind == "embedding":
        return _bwd(P.embedding(ctx, "x", layer=0, tokens=rows, rows=max(4 * rows, 4096), d=width))
    if kind == "gather":
        return _bwd(P.gather(ctx, "x", layer=0, rows=rows, d=width, module="x", variant=variant))
    return _bwd(P.cross_entropy(ctx, "x", layer=0, rows=rows, classes=width, module="x"))


def measure_backward_kernels(bench: Bench) -> None:
    """Autograd's backward of each memory-bound kernel: fixed cost (tiny) and efficiency by size."""
    import torch

    def timer_of(make):
        out, inputs = make()
        grad = tuple(map(torch.randn_like, out)) if isinstance(out, tuple) else torch.randn_like(out)
        return lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)

    for name, kind, variant, make in backward_kernels(bench, 64, width=64):
        key = f"{kind}:{variant}@bwd" if variant else f"{kind}@bwd"
        # one autograd.grad call on one node: the per-call cost, subtracted for busy times
        bench.fixed_hot[key] = bench.timed(timer_of(make))
        # inside a backward pass a node costs less: a chain of CHAIN nodes, per node
        reading = bench.read_probe()
        chain = timer_of(lambda make=make: _chain(make))
        bench.fixed_cold[key] = bench.timed(chain) / CHAIN / bench.fixed_units(reading)
        bench.time_host(key, chain, reading, per=CHAIN)
    _kind_level_backward_costs(bench)
    for size in (SMOKE["backward_sizes"] if bench.smoke else BACKWARD_SIZES[bench.device]):
        n, _ = _memory_shapes(bench, size)
        for name, kind, variant, make in backward_kernels(bench, n):
            op = _backward_op(bench, name, kind, n, variant=variant)
            if op is None:
                continue
            bench.record(f"{name} backward {size:.3g}B", kind, None, bench.timed(timer_of(make)), op, matrix=False,
                         size=size)
        bench.say(f"backward kernels at {size:.3g} B")
        if bench.device == "cpu":
            measure_train_backward(bench, size)


def measure_train_backward(bench: Bench, size: float) -> None:
    """Each memory-bound backward kernel at `size` as a train step runs it (CPU; flopsim.calibration
    lookup step 8): it reads what its forward saved long before, and writes a gradient that is kept
    (for the next node, or until the optimizer). A ring of independent forward graphs is built
    before the timing, as many as TRAIN_FOOTPRINT over one graph's inputs plus the bytes its
    backward reads (at most TRAIN_RING; an overestimate of what a graph holds, so the ring
    holds somewhat less than TRAIN_FOOTPRINT, still far past a CPU's private caches); each
    call runs the next graph's backward against one incoming gradient (just written by the
    node before it, in a step) and keeps its output in a ring of as many, so that each call
    reads saved tensors not in cache and writes memory the allocator did not just free.
    measure_backward_kernels' points time one graph over and over: its saved tensors stay in cache."""
    import itertools
    from collections import deque

    import torch

    n, _ = _memory_shapes(bench, size)
    footprint = SMOKE["pool"] if bench.smoke else TRAIN_FOOTPRINT
    for name, kind, variant, make in backward_kernels(bench, n):
        op = _backward_op(bench, name, kind, n, variant=variant)
        if op is None:
            continue
        graphs = [make()]
        held = sum(t.numel() * t.element_size() for t in graphs[0][1]) + float(op.act_read_bytes)
        graphs += [make() for _ in range(max(1, min(TRAIN_RING, math.ceil(footprint / max(held, 1.0)))) - 1)]
        out = graphs[0][0]
        grad = tuple(map(torch.randn_like, out)) if isinstance(out, tuple) else torch.randn_like(out)
        turn, kept = itertools.cycle(graphs), deque(maxlen=len(graphs))

        def call(turn=turn, kept=kept, grad=grad):
            out, inputs = next(turn)
            kept.append(torch.autograd.grad(out, inputs, grad, retain_graph=True))

        seconds = bench.timed(call)
        kept.clear()
        del graphs
        bench.record(f"{name} backward {size:.3g}B, train", kind, None, seconds, op, matrix=False, size=size,
                     train=True)
    bench.say(f"train-step backward kernels at {size:.3g} B")


def _kind_level_backward_costs(bench: Bench, kinds: tuple = ("gather",)) -> None:
    """A kind whose backward is measured per kernel only (gather) also gets a kind-level
    backward fixed cost, the median of its kernels', for its kernels not measured."""
    for kind in kinds:
        values = [v for k, v in bench.fixed_cold.items() if k.startswith(f"{kind}:") and k.endswith("@bwd")]
        if values:
            bench.fixed_cold.setdefault(f"{kind}@bwd", statistics.median(values))


def measure_optimizer(bench: Bench) -> None:
    """torch's fused Adam (the reference's update step) over parameter sets of several sizes."""
    import torch

    from flopsim.ops.optimizer import optimizer_update

    def adam(params: int):
        tensors = [torch.nn.Parameter(bench.rand(params // 4)) for _ in range(4)]
        for t in tensors:
            t.grad = torch.randn_like(t)
        try:
            opt = torch.optim.Adam(tensors, lr=1e-5, fused=True)
        except (RuntimeError, ValueError):
            opt = torch.optim.Adam(tensors, lr=1e-5, foreach=True)
        return opt.step

    step = adam(256)
    bench.fixed_hot["optimizer"] = bench.timed(step)
    reading = bench.read_probe()
    bench.fixed_cold["optimizer"] = bench.cold_time(step) / bench.fixed_units(reading)
    bench.time_host("optimizer", step, reading)
    for params in (SMOKE["adam"] if bench.smoke else ADAM_PARAMS[bench.device]):
        seconds = bench.timed(adam(params))
        op = optimizer_update(params, weight_bytes=bench.value_bytes, layer=0)[0]
        bench.record(f"adam {params} params", "optimizer", None, seconds, op, matrix=False,
                     size=float(op.weight_bytes))
    bench.say("optimizer")


def assemble(bench: Bench, cache_bytes: float, openmp: dict):
    """The Calibration from the measured points (see flopsim.calibration for the lookup)."""
    import torch

    from flopsim.calibration import Calibration, Efficiency

    ref, points = _at_reference_all(bench)
    bench.points = points
    gemm_points, kinds = _gemm_part(points)
    size_points = []
    for kind in sorted({p.kind for p in points if p.gemm is None}):
        for backward in (False, True):
            mine = [p for p in points if p.kind == kind and p.gemm is None and p.backward == backward]
            trained = [p for p in mine if p.train]  # a train step's forward (lookup step 8): points of their own
            mine = [p for p in mine if not p.train]
            if trained:
                size_points += _size_points(trained, kind, backward, train=True)
            if not mine:
                continue
            size_points += _size_points(mine, kind, backward)
            largest = [p for p in mine if p.size == max(q.size for q in mine)]
            kinds[f"{kind}@bwd" if backward else kind] = Efficiency(
                compute=statistics.median(p.compute_eff for p in largest),
                memory=statistics.median(p.memory_eff for p in largest))
    default = Efficiency(compute=kinds["matmul"].compute, memory=kinds["elementwise"].memory)
    fixed, launch, host = _fixed_part(bench, ref)
    meta = dict(device=bench.device, hardware=bench.hw.name, dtype=bench.dtype, threads=torch.get_num_threads(),
                torch=torch.__version__, date=time.strftime("%Y-%m-%d"), device_name=device_name(bench.device),
                launch_overhead_s=launch, last_level_cache_bytes=cache_bytes, probe=ref.to_dict(),
                cold_pool_bytes=bench.pool_bytes, environment=openmp,
                timing="device (queued behind a spin kernel, CUDA events)" if bench.queued else "wall clock",
                achieved_bandwidth_bytes_per_s=_largest_copy(points).memory_eff * bench.hw.memory_bandwidth_bytes_per_s)
    return Calibration(
        device=bench.hw.name, provenance="measured",
        source=(f"flopsim calibrate --device {bench.device}: {len(points)} microbenchmarks on {meta['device_name']}, "
                f"torch {torch.__version__}, {meta['threads']} threads, {bench.dtype}, {meta['date']}"),
        default=default, kinds=kinds, gemm=gemm_points, gemm_kinds=("matmul", "router", "conv", "attention"),
        sizes=size_points, launch_overhead_s=launch, fixed_s=fixed, host_s=host,
        graph_launch_s=bench.graph_launch_s, fresh_pages=fresh_pages_at(bench, ref), measured=meta,
    )


def _gemm_part(points: list) -> tuple[list, dict]:
    """(GEMM points, {kind: median Efficiency}) of the measured points that have a GEMM shape."""
    from flopsim.calibration import Efficiency, GemmPoint

    gemm_points = [GemmPoint(kind=p.kind, variant=p.variant or None, batch=p.gemm[0], m=p.gemm[1], n=p.gemm[2],
                             k=p.gemm[3], backward=p.backward,
                             compute=None if p.memory_bound else p.compute_eff,
                             memory=p.memory_eff if p.memory_bound else None)
                   for p in points if p.gemm is not None]
    kinds = {}
    for kind in sorted({p.kind for p in points if p.gemm is not None}):
        mine = [p for p in points if p.kind == kind and p.gemm is not None and not p.backward
                and not (kind == "matmul" and p.variant)]  # int4 weights', bmm's points: their own
        compute = [p.compute_eff for p in mine if not p.memory_bound] or [1.0]
        memory = [p.memory_eff for p in mine if p.memory_bound] or [1.0]
        kinds[kind] = Efficiency(compute=statistics.median(compute), memory=statistics.median(memory))
    return gemm_points, kinds


def _fixed_part(bench: Bench, ref) -> tuple[dict, float, dict]:
    """(fixed_s, launch_overhead_s, host_s) of the measured tiny kernels, at the reference reading."""
    unit = bench.fixed_units(ref)  # from probe units (a CPU) or seconds (a queued device)
    fixed = {k: v * unit for k, v in bench.fixed_cold.items() if k != "launch"}
    host = {k: statistics.median(v) * ref.fixed_s for k, v in bench.host.items()}
    return fixed, bench.fixed_cold["launch"] * unit, host


def replace_gemms(base, bench: Bench):
    """`base` (a measured Calibration of this device) with its forward matrix-product
    points, the matmul kind's medians and the fixed costs (device and host, per kernel,
    and per kernel replayed from a graph) replaced by the ones `bench` just measured."""
    ref, bench.points = _at_reference_all(bench)
    fresh, kinds = _gemm_part(bench.points)
    kept = [p for p in base.gemm if not (p.kind == "matmul" and not p.backward)]
    when = time.strftime("%Y-%m-%d")
    note = dict(date=when, device_name=device_name(bench.device), points=len(fresh), probe=ref.to_dict(),
                timing="device (queued behind a spin kernel, CUDA events)" if bench.queued else "wall clock")
    fixed, launch, host = _fixed_part(bench, ref)
    return base.model_copy(update={
        "fixed_s": {**base.fixed_s, **fixed}, "launch_overhead_s": launch, "host_s": {**base.host_s, **host},
        "graph_launch_s": bench.graph_launch_s if bench.graph_launch_s is not None else base.graph_launch_s,
        "gemm": kept + fresh, "kinds": {**base.kinds, "matmul": kinds["matmul"]},
        "fresh_pages": fresh_pages_at(bench, ref) or base.fresh_pages,  # what the new points are net of
        "default": base.default.model_copy(update={"compute": kinds["matmul"].compute}),  # as assemble sets it
        "source": f"{base.source}; matrix products and fixed costs re-measured {when} ({len(fresh)} shapes, "
                  f"--gemms-into)",
        "measured": {**(base.measured or {}), "gemms_remeasured": note}})


def _largest_copy(points: list) -> Point:
    """The copy measured at the largest size (streaming from memory, not cache)."""
    copies = [p for p in points if p.kind == "elementwise" and p.variant == "copy" and not p.backward]
    return max(copies, key=lambda p: p.size or 0.0)


def _at_reference_all(bench: Bench) -> tuple:
    """(the calibration's reference reading, every point scaled to it from the smoothed
    reading around its own: flopsim.probe.smoothed, not the one right after the point's
    own timing, which reads a large kernel's aftermath). The reference is the median of
    all readings, its fixed cost the median of those beside the fixed costs' own timing
    (`reference_reading`)."""
    from dataclasses import replace

    from flopsim.probe import smoothed

    ref = reference_reading(bench.readings, bench.fixed_readings)
    steady = dict(zip(map(id, bench.readings), smoothed(bench.readings)))
    points = [_at_reference(replace(p, probe=steady.get(id(p.probe), p.probe)), ref) for p in bench.points]
    return ref, points


def reference_reading(readings: list, fixed_readings: Optional[list] = None):
    """The reading a calibration's figures are restored at (`measured.probe`): the median
    of all readings for the matrix rate and the cold reads, and for the fixed cost the
    median of the readings taken beside the fixed costs' own timing, at which they are
    kept in probe units (`measure_fixed_costs`). The probe's fixed cost reads the phase it
    follows as well as the host: in one calibration on the 2-core VM (2026-11-28) it read
    72 us beside the fixed costs' timing, 133 us beside the matrix products (717 of the
    1,238 readings) and 84-101 us beside the other phases, so the median of all, 103 us,
    restored the fixed costs at 1.44x the reading they were timed at (the same reason the
    points are not scaled by the cold reads, `_at_reference`)."""
    from dataclasses import replace

    from flopsim.probe import median_reading

    ref = median_reading(readings)
    if fixed_readings:
        ref = replace(ref, fixed_s=statistics.median(r.fixed_s for r in fixed_readings))
    return ref


def _at_reference(p: Point, ref) -> Point:
    """A point's efficiencies scaled from the host speed the probe read beside it to the
    calibration's median speed `ref` (flopsim.probe) by the matrix-rate reading, every
    point alike. Not by the cold-read reading, which the calibration's own kernels
    disturb: beside the memory-bound kernels (forward, 8 kB to 256 MB) it read 1.43-1.66x
    its median while the matrix rate read 0.99-1.03x and the fixed cost 0.86-0.93x (the
    2-core VM, 2026-11-27), so scaled by it those points came out 1.5x faster than
    measured, and a step's norms, activations and decode attention with them."""
    from dataclasses import replace

    from flopsim.calibration import MAX_EFFICIENCY

    if p.probe is None:
        return p
    factor = p.probe.compute_s / ref.compute_s
    return replace(p, compute_eff=min(MAX_EFFICIENCY, p.compute_eff * factor),
                   memory_eff=min(MAX_EFFICIENCY, p.memory_eff * factor))


def _size_points(mine: list, kind: str, backward: bool, train: bool = False) -> list:
    """Size points of one kind: per kernel variant (when the kind has several), then the kind's medians."""
    from flopsim.calibration import SizePoint

    out = []
    variants = sorted({p.variant for p in mine})
    for variant in variants + [None]:
        if variant is not None and (not variant or len(variants) == 1):
            continue  # one kernel only: the kind-level points say it all
        for size in sorted({p.size for p in mine}):
            at = [p for p in mine if p.size == size and (variant is None or p.variant == variant)]
            if not at:
                continue
            out.append(SizePoint(kind=kind, variant=variant, backward=backward, train=train,
                                 bytes=statistics.median(p.bytes for p in at),
                                 flops=statistics.median(p.all_flops for p in at),
                                 compute=statistics.median(p.compute_eff for p in at),
                                 memory=statistics.median(p.memory_eff for p in at)))
    return out


def guess_hardware(device: str) -> str:
    """The hardware preset for this device: `cpu`, or the CUDA device's name mapped to a preset."""
    if device != "cuda":
        return "cpu"
    import torch

    name = torch.cuda.get_device_name().lower()
    for key, preset in (("gb200", "gb200"), ("b200", "b200"), ("h200", "h200"), ("h100", "h100-sxm"),
                        ("a100", "a100-80gb"), ("l40s", "l40s"), ("l4", "l4"), ("a10g", "a10g"),
                        ("v100", "v100-sxm2-32gb"), ("mi325", "mi325x"), ("mi300", "mi300x")):
        if key in name:
            if preset == "h100-sxm" and "pcie" in name:
                return "h100-pcie"
            if preset == "a100-80gb" and "40gb" in name:
                return "a100-40gb"
            return preset
    return "h100-sxm"


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    import platform

    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def elementwise_kernels() -> dict:
    """flopsim elementwise op (variant) -> (inputs, torch kernel of (x, y)) as the references run them."""
    import torch
    import torch.nn.functional as F

    return {
        "copy": (1, lambda x, y: x.clone()),
        "add": (2, lambda x, y: x + y),
        "mul": (2, lambda x, y: x * y),
        "gelu": (1, lambda x, y: F.gelu(x)),
        "gelu_tanh": (1, lambda x, y: F.gelu(x, approximate="tanh")),
        "relu": (1, lambda x, y: F.relu(x)),
        "silu": (1, lambda x, y: F.silu(x)),
        "swiglu": (2, lambda x, y: F.silu(x) * y),
        "tanh": (1, lambda x, y: torch.tanh(x)),
    }


def explicit_attention(q, k, v, causal: bool):
    """The reference's explicit path (flopsim.torchref.model.Attention.core): Q K^T, scale, mask, softmax, P V."""
    from flopsim.torchref.model import attention_probabilities

    return attention_probabilities(q, k, causal) @ v
