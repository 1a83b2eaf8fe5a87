"""The drift probe: how fast a shared host is right now.

A machine shared with other tenants does not run at one speed: on the
project's 2-core development VM the bandwidth of cold weight reads swings
between 11 and 37 GB/s and the matrix rate between 180 and 300 GFLOP/s
from one 8-second sample to the next. A calibration measured in one minute
and a model timed in the next then disagree by tens of percent for reasons
that have nothing to do with the model.

The probe is three short microbenchmarks, each the median of a few calls:

- `compute_s`: a matrix product held in cache (the matrix rate);
- `memory_s`: a matrix-vector product over weights read cold from a pool
  larger than the last-level cache (the bandwidth of cold reads);
- `fixed_s`: a small composite kernel (RMSNorm over one row) right after it
  (the fixed cost of a kernel inside a step).

On a GPU (`clock`, a flopsim.gpu_timing.DeviceClock) the first two are the
device's time, queued behind a spin kernel, and `fixed_s` is the host's
wall-clock dispatch: the device and its host drift apart.

`flopsim calibrate` takes a reading beside every measured point and scales
each point to the calibration's median reading (`measured.probe`) by the
matrix rate (`compute_s`), so the calibration describes the host at its
median speed. Not by the cold reads: the calibration's own memory-bound
kernels disturb them (beside the forward memory-bound kernels, 8 kB to
256 MB, `memory_s` read 1.43-1.66x its median while `compute_s` read
0.99-1.03x and `fixed_s` 0.86-0.93x on the 2-core VM, 2026-11-27), and
scaling by them made those kernels 1.5x faster than measured. For the same
reason the fixed costs, kept in units of `fixed_s`, are restored at the
median of the readings beside their own timing, the reference's `fixed_s`
(flopsim.calibrate.reference_reading): `fixed_s` reads the phase it
follows too (in one calibration on the 2-core VM, 2026-11-28: 72 us beside
the fixed costs, 133 us beside the matrix products, 84-101 us beside the
other phases). Validation times the
models round-robin over several minutes, so their medians describe it at
its median speed too, and the two are compared. `flopsim validate` also
takes a reading beside every model's runs and reports, as a second figure,
each model predicted with the calibration scaled to that reading
(`Calibration.at_speed`: every efficiency by reference compute_s /
compute_s now, fixed costs by fixed_s now / reference fixed_s). It is the
second figure, not the headline: one reading beside a model is a snapshot
of a host that moves within seconds. The probe is a microbenchmark; nothing
in it comes from the models it helps to validate.

A reading is not only the host's drift: one taken right after a kernel that
streamed a large footprint reads that kernel's aftermath. On the 2-core VM
(2026-11-27, a 480 MiB last-level cache) the cold-read reading beside a
memory-bound calibration point was the median's at sizes up to 32 MB, 1.5-3x
it beside the 64 MB points and 2.3-11x beside the 256 MB ones; scaled by
it, those points came out 2-10x faster than measured, and a step streaming
such tensors would be predicted fast (the CPU validation suite's models
stream few). So each reading is
used through `smoothed`: the median of the readings within
SMOOTH_HALF_WINDOW of it in time, which a drift over minutes moves and one
kernel's aftermath does not. Smoothing cannot help where a whole phase of
the calibration streams memory, every reading around a point reading the
phase's aftermath: hence the matrix rate for the calibration's points.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

# shapes: (m, n, k) of the cached product; (rows, cols) of each cold weight view
SHAPES = {"cpu": dict(gemm=(192, 768, 768), gemv=(1024, 1024)),
          "cuda": dict(gemm=(2048, 2048, 2048), gemv=(4096, 4096))}
CALLS = 5
SMOOTH_HALF_WINDOW = 10  # readings on each side of one in `smoothed`
# every view into a cold pool starts at a multiple of this many bytes, as the
# framework's allocator places real tensors: cuBLAS picks slower kernels for
# operands that are not 16-byte aligned (an H200 ran such products at 0.08-0.22
# of its peak against 0.65-0.78 aligned, flopsim calibrate, 2026-11-26)
ALIGN_BYTES = 256


def align_up(elements: int, value_bytes: int) -> int:
    """`elements` rounded up to a whole number of ALIGN_BYTES."""
    unit = max(1, ALIGN_BYTES // value_bytes)
    return -(-elements // unit) * unit


def align_down(elements: int, value_bytes: int) -> int:
    """`elements` rounded down to a whole number of ALIGN_BYTES."""
    unit = max(1, ALIGN_BYTES // value_bytes)
    return elements // unit * unit


@dataclass(frozen=True)
class ProbeReading:
    compute_s: float
    memory_s: float
    fixed_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def median_reading(readings: list) -> ProbeReading:
    return ProbeReading(*(statistics.median(getattr(r, f) for r in readings)
                          for f in ("compute_s", "memory_s", "fixed_s")))


def smoothed(readings: list, half_window: Optional[int] = None) -> list:
    """Each reading of a sequence (in the order taken) replaced by the component-wise
    median of the readings within `half_window` (default SMOOTH_HALF_WINDOW) of it: the
    host's drift without one kernel's aftermath (the module docstring)."""
    k = SMOOTH_HALF_WINDOW if half_window is None else half_window
    return [median_reading(readings[max(0, i - k):i + k + 1]) for i in range(len(readings))]


def smoothed_round_robin(readings: list) -> list:
    """`smoothed` over readings taken round-robin (readings[i][r]: runner i in round r,
    taken in the order round 0 runner 0, 1, ..., round 1 runner 0, ...), returned in the
    same per-runner lists."""
    order = [(i, r) for r in range(max(map(len, readings), default=0)) for i in range(len(readings))
             if r < len(readings[i])]
    out = [[] for _ in readings]
    for (i, _), reading in zip(order, smoothed([readings[i][r] for i, r in order])):
        out[i].append(reading)
    return out


class Probe:
    """Reads the host's current speed (see the module docstring). `pool`: a flat
    tensor larger than the last-level cache, in the measured dtype."""

    def __init__(self, torch, device: str, dtype, pool, gen, clock=None):
        import torch.nn.functional as F

        self.torch, self.device, self.F, self.clock = torch, device, F, clock
        shapes = SHAPES[device]
        m, n, k = shapes["gemm"]
        rows, cols = shapes["gemv"]
        self.a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
        self.b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
        self.x = torch.randn(1, cols, generator=gen).to(device=device, dtype=dtype)
        self.row = torch.randn(1, 256, generator=gen).to(device=device, dtype=dtype)
        size, value_bytes = rows * cols, pool.element_size()
        count = max(1, min(256, pool.numel() // align_up(size, value_bytes)))
        stride = align_down(pool.numel() // count, value_bytes)
        self.views = [pool[i * stride:i * stride + size].view(rows, cols) for i in range(count)]
        self.i = 0

    def _sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def _time(self, fn: Callable) -> float:
        self._sync()
        start = time.perf_counter()
        fn()
        self._sync()
        return time.perf_counter() - start

    def _gemv(self):
        self.i = (self.i + 1) % len(self.views)
        return self.F.linear(self.x, self.views[self.i])

    def _norm(self):
        return self.F.rms_norm(self.row, (256,), eps=1e-6)

    def read(self) -> ProbeReading:
        with self.torch.no_grad():
            self._time(lambda: self.a @ self.b)  # warm
            if self.clock is not None:  # the device's time, CALLS calls queued back to back
                compute = [self.clock.sample_s(lambda: self.a @ self.b, CALLS)]
                memory = [self.clock.sample_s(self._gemv, CALLS)]
                fixed = [self._time(self._norm) for _ in range(CALLS)]
            else:
                compute = [self._time(lambda: self.a @ self.b) for _ in range(CALLS)]
                memory, fixed = [], []
                for _ in range(CALLS):
                    memory.append(self._time(self._gemv))
                    fixed.append(self._time(self._norm))
        return ProbeReading(statistics.median(compute), statistics.median(memory), statistics.median(fixed))
