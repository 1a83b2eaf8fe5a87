"""Device time of GPU kernels, free of the host's dispatch cost.

A GPU runs the kernels its host queues. Timed with a wall clock around n
calls, a kernel shorter than its dispatch (PyTorch eager: 5-50 us of host
work per op) measures the host, not the device. `DeviceClock` queues a spin
kernel first (`torch.cuda._sleep`), long enough for the host to queue the n
calls behind it, and CUDA events recorded after the spin and after the last
call time the calls back to back on the device: device seconds per call,
the device's own gap between kernels included, the host's dispatch not.

The spin's length follows the host: three times the time the host took to
queue the previous sample; when the host took over half the spin (the
device may have caught up and waited), the sample is taken again with a
longer spin, up to MAX_AHEAD_S, beyond which the sample is kept (an upper
bound: a call that synchronises inside, for one, cannot be queued ahead).
The host cannot run ahead by more than the GPU's queue of pending launches
(about a thousand): `timer` halves the calls of a sample that still fell
behind.

Needs torch with CUDA; `DeviceClock.create` returns None where the spin
kernel is unavailable, and callers then time with the wall clock.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

MAX_AHEAD_S = 0.1  # the longest spin queued ahead of one sample
MAX_CALLS = 64  # calls per sample (CUDA events resolve about 0.5 us: a 64-call span of 2-us kernels is timed to 0.5%)
RETRIES = 3  # samples retaken with a longer spin when the host fell behind


class DeviceClock:
    """Device seconds per call of a function that queues GPU kernels (see the module docstring)."""

    def __init__(self, torch, cycles_per_s: float):
        self.torch = torch
        self.cycles_per_s = cycles_per_s
        self.ahead_s = 1e-3

    @classmethod
    def create(cls, torch) -> Optional["DeviceClock"]:
        """A clock for the current CUDA device, or None where the spin kernel is missing."""
        sleep = getattr(torch.cuda, "_sleep", None)
        if sleep is None:
            return None
        start, end = cls._events(torch)
        cycles = 20_000_000
        sleep(cycles)  # the clocks ramp up first
        torch.cuda.synchronize()
        start.record()
        sleep(cycles)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) * 1e-3
        return cls(torch, cycles / seconds) if seconds > 0 else None

    @staticmethod
    def _events(torch):
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def sample_s(self, fn: Callable[[], object], calls: int) -> float:
        """One sample: device seconds per call over `calls` calls queued back to back."""
        return self.span(fn, calls)[0]

    def span(self, fn: Callable[[], object], calls: int) -> tuple[float, float, bool]:
        """One sample of `calls` calls queued back to back: (device seconds per call, host
        seconds per call spent queueing them, whether the host still fell behind the
        device after the retries -- then the device seconds are an upper bound)."""
        for attempt in range(RETRIES + 1):
            seconds, queued_s = self._queued_span(fn, calls)
            fell_behind = queued_s > 0.5 * self.ahead_s
            self.ahead_s = min(MAX_AHEAD_S, max(1e-4, 3 * queued_s))
            if not fell_behind or self.ahead_s >= MAX_AHEAD_S:
                break
        return seconds / calls, queued_s / calls, fell_behind

    def _queued_span(self, fn: Callable[[], object], calls: int) -> tuple[float, float]:
        """(device seconds of `calls` calls behind a spin of ahead_s, host seconds spent queueing them)."""
        torch = self.torch
        start, end = self._events(torch)
        torch.cuda._sleep(int(self.ahead_s * self.cycles_per_s))
        start.record()
        begun = time.perf_counter()  # the host's queueing of the calls alone
        for _ in range(calls):
            fn()
        end.record()
        queued_s = time.perf_counter() - begun
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e-3, queued_s

    def timer(self, min_time_s: float, repeats: int) -> Callable[[Callable[[], object]], float]:
        """A timer like flopsim.calibrate.make_timer's, in device seconds per call: the
        median of `repeats` samples of enough calls to fill min_time_s (at most MAX_CALLS).
        A sample in which the host still fell behind is taken again with half the calls:
        a GPU holds about a thousand pending launches, and a host that fills that queue
        waits for the device, which then runs at the host's pace (an H200, 2026-11-26:
        the reference's RoPE, 23 kernels, read 110 us a call over 64 calls and 47 us
        over one)."""

        def timed(fn: Callable[[], object]) -> float:
            fn()
            first = self.sample_s(fn, 1)
            calls = int(min(MAX_CALLS, max(1, min_time_s / max(first, 1e-7))))
            samples: list = []
            while len(samples) < repeats:
                seconds, _, behind = self.span(fn, calls)
                if behind and calls > 1:
                    calls, samples = calls // 2, []
                    continue
                samples.append(seconds)
            return statistics.median(samples)

        return timed
