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
    def __init__(self, queue: int = 10**9):
        self.host_s = 0.0  # the host's clock
        self.free_s = 0.0  # when the device finishes what is queued
        self.queue = queue  # pending launches the device holds; a launch past them waits
        self.pending = []  # finish times of the launches queued

    def enqueue(self, seconds: float) -> float:
        self.pending = [t for t in self.pending if t > self.host_s]
        if len(self.pending) >= self.queue:  # the queue is full: the host waits for a slot
            self.host_s = self.pending.pop(0)
        self.free_s = max(self.free_s, self.host_s) + seconds
        self.pending.append(self.free_s)
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


def _step(gpu, kernels, host_s, device_s, sync_after=None):
    """A model step on the simulated GPU: `kernels` kernels of host_s dispatch and device_s
    work each; with `sync_after`, the host waits for the device after that many (MoE's
    token counts read back)."""
    def run():
        for i in range(kernels):
            gpu.host_s += host_s
            gpu.enqueue(device_s)
            if sync_after is not None and i + 1 == sync_after:
                gpu.host_s = max(gpu.host_s, gpu.free_s)
    return run


@pytest.mark.parametrize("host_s, device_s", [(20e-6, 5e-6), (5e-6, 50e-6)])
def test_a_step_is_timed_on_both_sides(monkeypatch, host_s, device_s):
    """flopsim.profiling.time_queued: a host-bound and a device-bound step of 100 kernels
    each read back their device seconds and their host's dispatch seconds apart."""
    from flopsim.profiling import Runner, time_queued

    gpu = SimulatedGPU()
    monkeypatch.setattr(gpu_timing.time, "perf_counter", lambda: gpu.host_s)
    clock = DeviceClock.create(gpu.torch())
    step = _step(gpu, 100, host_s, device_s)
    runner = Runner(None, "forward", 1, 1, None, "cuda", None, step, step)
    device, host, waits = time_queued(runner, clock, samples=3)
    assert device == pytest.approx([100 * device_s] * 3, rel=1e-9)
    assert host == pytest.approx([100 * host_s] * 3, rel=1e-9)
    assert not waits


def test_a_step_that_synchronises_inside_is_flagged(monkeypatch):
    """A step whose host waits for the device half-way cannot be queued ahead: its
    device seconds then hold the device's wait for the host, and it says so."""
    from flopsim.profiling import Runner, time_queued

    gpu = SimulatedGPU()
    monkeypatch.setattr(gpu_timing.time, "perf_counter", lambda: gpu.host_s)
    clock = DeviceClock.create(gpu.torch())
    step = _step(gpu, 100, 20e-6, 5e-6, sync_after=50)
    runner = Runner(None, "forward", 1, 1, None, "cuda", None, step, step)
    device, host, waits = time_queued(runner, clock, samples=2)
    assert waits
    assert min(device) > 100 * 5e-6 * 1.5  # the device waited for the host's second half


def test_a_host_that_fills_the_launch_queue_takes_fewer_calls(monkeypatch):
    """A call of 23 kernels (the reference's RoPE) behind a GPU that holds 1,000 pending
    launches: 64 calls overflow the queue, the host waits and the device then runs at
    the host's pace; the timer halves the calls until the sample is queued ahead."""
    gpu = SimulatedGPU(queue=1000)
    monkeypatch.setattr(gpu_timing.time, "perf_counter", lambda: gpu.host_s)
    clock = DeviceClock.create(gpu.torch())
    call = _step(gpu, 23, 10e-6, 1e-6)
    assert clock.span(call, 64)[2]  # fell behind: 1,472 launches
    assert clock.timer(min_time_s=0.01, repeats=3)(call) == pytest.approx(23e-6, rel=1e-9)
