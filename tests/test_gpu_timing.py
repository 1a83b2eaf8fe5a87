"""flopsim.gpu_timing on a simulated GPU: a host that queues kernels on a
virtual clock and a device that runs them in order. The clock must report
the device's time per call, not the host's dispatch, and retake a sample
whose spin was too short for the host to queue its calls."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from flopsim import gpu_timing
from flopsim.gpu_timing import DeviceClock

HZ = 1.5e9  # the simulated spin kernel's clock


class SimulatedGPU:
    def __init__(self):
        self.host_s = 0.0  # the host's clock
        self.free_s = 0.0  # when the device finishes what is queued

    def enqueue(self, seconds: float) -> float:
        self.free_s = max(self.free_s, self.host_s) + seconds
        return self.free_s

    def torch(self):
        gpu = self

        class Event:
            def __init__(self, enable_timing=False):
                self.at = None

            def record(self):
                self.at = gpu.enqueue(0.0)

            def elapsed_time(self, end):
                return (end.at - self.at) * 1e3

        def sleep(cycles):
            gpu.host_s += 1e-6
            gpu.enqueue(cycles / HZ)

        def synchronize():
            gpu.host_s = max(gpu.host_s, gpu.free_s)

        return SimpleNamespace(cuda=SimpleNamespace(_sleep=sleep, Event=Event, synchronize=synchronize))

    def kernel(self, host_s: float, device_s: float):
        def fn():
            self.host_s += host_s
            self.enqueue(device_s)
        return fn


@pytest.mark.parametrize("host_s, device_s", [(20e-6, 3e-6), (20e-6, 200e-6), (5e-6, 5e-6)])
def test_device_clock_reports_device_time_not_dispatch(monkeypatch, host_s, device_s):
    gpu = SimulatedGPU()
    monkeypatch.setattr(gpu_timing.time, "perf_counter", lambda: gpu.host_s)
    clock = DeviceClock.create(gpu.torch())
    assert clock.cycles_per_s == pytest.approx(HZ, rel=1e-3)  # 20M cycles timed, 1 us of launch in it
    timed = clock.timer(min_time_s=0.01, repeats=3)
    assert timed(gpu.kernel(host_s, device_s)) == pytest.approx(device_s, rel=1e-9)


def test_a_spin_too_short_for_the_host_is_retaken(monkeypatch):
    """256 calls of 20 us dispatch need 5 ms of spin; the first spin is 1 ms, so the device
    catches up and waits (the sample would read the host): it is retaken, longer."""
    gpu = SimulatedGPU()
    monkeypatch.setattr(gpu_timing.time, "perf_counter", lambda: gpu.host_s)
    clock = DeviceClock.create(gpu.torch())
    fn = gpu.kernel(20e-6, 3e-6)
    assert clock.ahead_s == 1e-3
    assert clock.sample_s(fn, 256) == pytest.approx(3e-6, rel=1e-9)
    assert clock.ahead_s > 256 * 20e-6


def test_no_spin_kernel_no_clock():
    assert DeviceClock.create(SimpleNamespace(cuda=SimpleNamespace())) is None
