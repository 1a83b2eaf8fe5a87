"""Measured times of the torch reference models, attributed to flopsim ops.

How torch ops map to flopsim ops: every module of the reference gets a
`record_function("flopsim::<module path>")` scope through forward hooks, so
each top-level aten op that torch.profiler records lies inside the scope of
the module that ran it. Module paths equal flopsim ops' `module` field, so
measured and predicted times join on the module path:

- a leaf Linear (`block.0.attn.qkv`, `head.lm`, `block.1.router`, ...) runs
  exactly one flopsim matrix-product op: a per-op join (GEMM errors);
- `block.i.attn` runs the attention kernel (aten::scaled_dot_product_attention,
  or matmul/softmax/matmul in the explicit path), RoPE and the KV-cache
  append: joined with the ops whose module is `block.i.attn`;
- norms, embeddings, activations (`block.i.mlp`: gelu/silu/mul) and
  residual adds (`block.i`: add) likewise by module.
Backward ops run outside forward scopes; the `train` phase is measured end
to end only.

Timing: threads fixed (`torch.set_num_threads`), warm-up runs first, the
end-to-end time is the median of unprofiled runs (perf_counter; CUDA
synchronised), per-module times the median over profiled runs. Validation
times many runners round-robin (`time_rounds`), so that each samples the
whole measurement period rather than one moment of a drifting host (on a
CPU each case in a process of its own, flopsim.case_process; `visit`). Each
visit first runs the step back to back for `WARMUP_S` (`warm_up`): a step
that follows another model's runs is slower for its first runs (on the
2-core VM a small decode step's first six to ten runs after a train step
took 8.5, 7.7, 7.4 ... ms against a steady 6.8 ms; the cause is not pinned
down -- glibc's allocation settings do not change it, a cache that takes the
step's data back over several passes would), while a
model in use runs the same step back to back, and the calibration's
microbenchmarks are timed in hot loops. Timing each visit after one run
measured that transient instead (decode about 15% slower than its steady
state).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

SCOPE = "flopsim::"
# back-to-back runs before each round-robin visit's timed runs (`warm_up`): long enough
# to cover the transient after another model's runs (six to ten runs of a 5-10 ms
# decode step on the 2-core VM, under 0.1 s); a step longer than this runs once
WARMUP_S = 0.2
WARMUP_MOST = 200


@dataclass
class Profile:
    spec_name: str
    phase: str
    batch: int
    seq: int
    context: Optional[int]
    device: str
    threads: int
    wall_s: float  # median end-to-end time of the phase
    wall_runs_s: list
    modules: dict  # module path -> median measured seconds (top-level aten ops in its scope)
    aten_ops: dict  # module path -> sorted list of aten op names seen there


@contextlib.contextmanager
def native_stderr_muted():
    """Silence what native code writes to file descriptor 2 (Kineto logs a
    line per profiler start/stop, and no setting turns it off); Python's
    sys.stderr is flushed first and restored after."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _attach_scopes(model):
    from torch.profiler import record_function

    handles, stack = [], []

    def pre(module, args, path):
        ctx = record_function(SCOPE + path)
        ctx.__enter__()
        stack.append(ctx)

    def post(module, args, out):
        stack.pop().__exit__(None, None, None)

    for path, module in model.named_modules():
        if not path:
            continue
        handles.append(module.register_forward_pre_hook(lambda m, a, p=path: pre(m, a, p)))
        handles.append(module.register_forward_hook(post))
    return handles


def _owner(event) -> Optional[str]:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(SCOPE):
            return parent.name[len(SCOPE):]
        parent = parent.cpu_parent
    return None


def _module_times(events, device: str) -> tuple[dict, dict]:
    times: dict[str, float] = defaultdict(float)
    names: dict[str, set] = defaultdict(set)
    for event in events:
        if event.name.startswith(SCOPE):
            continue
        parent = event.cpu_parent
        if parent is not None and not parent.name.startswith(SCOPE):
            continue  # only top-level aten ops: their totals include what they call
        owner = _owner(event)
        if owner is None:
            continue
        if device == "cuda":
            seconds = getattr(event, "device_time_total", 0.0) * 1e-6
        else:
            seconds = event.cpu_time_total * 1e-6
        times[owner] += seconds
        names[owner].add(event.name)
    return dict(times), {k: sorted(v) for k, v in names.items()}


@dataclass
class Runner:
    """One phase of a reference model, built once: `once()` runs it (synchronised)."""

    spec: object
    phase: str
    batch: int
    seq: int
    context: Optional[int]
    device: str
    model: object
    once: object
    run: object = None  # the phase without the synchronisation (what a queued clock times)
    faults: list = field(default_factory=list)  # minor page faults of each timed run (`time_runs`)


def make_runner(spec, phase: str, batch: int, seq: int, context: Optional[int] = None, *, device: str = "cpu",
                seed: int = 0) -> Runner:
    """The reference of `spec` in its dtype on `device`, its inputs made once."""
    import torch

    from flopsim.torchref.model import build_reference, prepare_phase, torch_dtype

    model = build_reference(spec, seed=seed).to(device=device, dtype=torch_dtype(spec.dtype))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    run = prepare_phase(model, spec, phase, batch, seq, context, seed=seed, device=device)

    def once():
        run()
        sync()

    return Runner(spec, phase, batch, seq, context, device, model, once, run)


def minor_faults() -> int:
    """This process's minor page faults so far (pages the OS mapped in on first touch:
    fresh allocations); 0 where `resource` is missing."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_runs(runner: Runner, repeats: int, warmup: int = 1) -> list:
    """Wall seconds of `repeats` unprofiled runs after `warmup` ones; each timed run's
    minor page faults are appended to `runner.faults` (when it keeps them)."""
    for _ in range(warmup):
        runner.once()
    walls = []
    faults = getattr(runner, "faults", None)
    for _ in range(repeats):
        before = minor_faults()
        start = time.perf_counter()
        runner.once()
        walls.append(time.perf_counter() - start)
        if faults is not None:
            faults.append(minor_faults() - before)
    return walls


def warm_up(runner: Runner, seconds: Optional[float] = None, most: int = WARMUP_MOST) -> int:
    """Run the step back to back for `seconds` (default WARMUP_S; at least once, at most
    `most` times), so that what follows is timed in its steady state, not in the
    transient after another model ran (the module docstring). Returns the runs made."""
    seconds = WARMUP_S if seconds is None else seconds
    start, runs = time.perf_counter(), 0
    while runs < 1 or (runs < most and time.perf_counter() - start < seconds):
        runner.once()
        runs += 1
    return runs


def time_rounds(runners: list, rounds: int = 5, repeats: int = 2, progress=None, probe=None) -> tuple[list, list]:
    """Wall times of every runner, measured round-robin: `rounds` passes over all of
    them, each `warm_up` and then `repeats` timed runs, so that every runner samples
    the whole measurement period (a shared host's speed drifts by tens of percent over
    seconds to minutes) and is timed in its steady state. With a flopsim.probe.Probe, a
    reading is taken at the start of each visit, before its warm-up. Returns (times per
    runner, readings per runner)."""
    walls = [[] for _ in runners]
    readings = [[] for _ in runners]
    for r in range(rounds):
        for i, runner in enumerate(runners):
            if progress:
                progress(f"timing round {r + 1}/{rounds}: {runner.spec.name} {runner.phase}", i, len(runners))
            if probe is not None:  # before the warm-up: the probe's cold reads would disturb the step's cached data
                readings[i].append(probe.read())
            walls[i] += visit(runner, repeats)
    return walls, readings


def visit(runner, repeats: int) -> list:
    """One round-robin visit: `warm_up`, then `repeats` timed runs (their wall seconds).
    A runner held by another process (flopsim.case_process.RemoteRunner) visits there."""
    remote = getattr(runner, "visit", None)
    if remote is not None:
        return remote(repeats)
    warm_up(runner)
    return time_runs(runner, repeats, warmup=0)


def time_queued(runner: Runner, clock, samples: int = 5) -> tuple[list, list, bool]:
    """A GPU step timed on both sides of its host-device pipeline with a
    flopsim.gpu_timing.DeviceClock: per sample, the device's seconds per step
    (one step queued behind a spin kernel: the kernels and the device's
    gaps between them, none of the host's dispatch) and the host's seconds per step
    spent queueing them (the dispatch alone, nothing waited for). Returns (device
    seconds, host seconds, whether the host fell behind in some sample: a step that
    synchronises inside -- MoE's token counts read back, say -- cannot be queued
    ahead, and its device seconds then include the device's waits for the host; nor
    can a step of more kernels than the GPU's queue of pending launches holds)."""
    runner.once()
    device, host, behind = [], [], False
    for _ in range(samples):
        device_s, host_s, fell_behind = clock.span(runner.run, 1)  # one step: hundreds of kernels
        device.append(device_s)
        host.append(host_s)
        behind = behind or fell_behind
    return device, host, behind


def _inside_aten(event) -> bool:
    """The profiler event runs inside an aten op (its caller's row counts it); an op under
    an autograd node's or another scope's record is not."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def aten_breakdown(runner: Runner, profiled_repeats: int = 3) -> list:
    """Per aten op the step runs (top level: what the model's code calls and, in a
    train step's backward, what each autograd node calls; an aten op inside another is
    part of it), over `profiled_repeats` profiled steps: calls per step, the host's seconds per step in those
    calls (what they call included: dispatch and, on a CPU, the work) and their kernels' device seconds per
    step (a GPU; 0 on a CPU). Rows (name, calls, host_s, device_s), most device time (else
    host time) first. A diagnostic: which kernels a step's time goes to, and what a call
    costs the host."""
    from torch.profiler import ProfilerActivity, profile

    runner.once()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.device == "cuda" else [])
    with native_stderr_muted(), profile(activities=activities) as prof:
        for _ in range(profiled_repeats):
            runner.once()
    totals: dict[str, list] = defaultdict(lambda: [0, 0.0, 0.0])
    for event in prof.events():
        if not event.name.startswith("aten::") or _inside_aten(event):
            continue  # top-level aten calls only (their device time includes what they call)
        row = totals[event.name]
        row[0] += 1
        row[1] += event.cpu_time_total * 1e-6
        row[2] += getattr(event, "device_time_total", 0.0) * 1e-6 if runner.device == "cuda" else 0.0
    rows = [(name, calls / profiled_repeats, host / profiled_repeats, device / profiled_repeats)
            for name, (calls, host, device) in totals.items()]
    return sorted(rows, key=lambda r: (-r[3], -r[2]))


def profile_modules(runner: Runner, profiled_repeats: int = 3) -> tuple[dict, dict]:
    """Per-module median seconds under torch.profiler and the aten ops seen per module
    (inference phases; the train phase is measured end to end only)."""
    from torch.profiler import ProfilerActivity, profile

    per_run: dict[str, list] = defaultdict(list)
    aten: dict[str, set] = defaultdict(set)
    if runner.phase == "train":
        return {}, {}
    runner.once()
    handles = _attach_scopes(runner.model)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.device == "cuda" else [])
    try:
        for _ in range(profiled_repeats):
            with native_stderr_muted(), profile(activities=activities) as prof:
                runner.once()
            times, names = _module_times(prof.events(), runner.device)
            for path, seconds in times.items():
                per_run[path].append(seconds)
            for path, ops in names.items():
                aten[path].update(ops)
    finally:
        for handle in handles:
            handle.remove()
    return {path: statistics.median(v) for path, v in per_run.items()}, {p: sorted(v) for p, v in aten.items()}


def profile_model(spec, phase: str, batch: int, seq: int, context: Optional[int] = None, *,
                  device: str = "cpu", threads: Optional[int] = None, warmup: int = 2, repeats: int = 5,
                  profiled_repeats: int = 3, seed: int = 0) -> Profile:
    """Run the reference model of `spec` for one phase; measured end-to-end and per-module times."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    runner = make_runner(spec, phase, batch, seq, context, device=device, seed=seed)
    walls = time_runs(runner, repeats, warmup)
    modules, aten = profile_modules(runner, profiled_repeats)
    return Profile(
        spec_name=spec.name, phase=phase, batch=batch, seq=seq, context=context, device=device,
        threads=torch.get_num_threads(), wall_s=statistics.median(walls), wall_runs_s=walls,
        modules=modules, aten_ops=aten,
    )
