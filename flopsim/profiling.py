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
synchronised), per-module times the median over profiled runs.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

SCOPE = "flopsim::"


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


def profile_model(spec, phase: str, batch: int, seq: int, context: Optional[int] = None, *,
                  device: str = "cpu", threads: Optional[int] = None, warmup: int = 2, repeats: int = 5,
                  profiled_repeats: int = 3, seed: int = 0) -> Profile:
    """Run the reference model of `spec` for one phase; measured end-to-end and per-module times."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from flopsim.torchref.model import build_reference, prepare_phase, torch_dtype

    if threads is not None:
        torch.set_num_threads(threads)
    model = build_reference(spec, seed=seed).to(device=device, dtype=torch_dtype(spec.dtype))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    run = prepare_phase(model, spec, phase, batch, seq, context, seed=seed, device=device)  # inputs made once

    def once():
        run()
        sync()

    for _ in range(warmup):
        once()
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        walls.append(time.perf_counter() - start)

    per_run: dict[str, list] = defaultdict(list)
    aten: dict[str, set] = defaultdict(set)
    if phase != "train":
        handles = _attach_scopes(model)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        try:
            for _ in range(profiled_repeats):
                with native_stderr_muted(), profile(activities=activities) as prof:
                    once()
                times, names = _module_times(prof.events(), device)
                for path, seconds in times.items():
                    per_run[path].append(seconds)
                for path, ops in names.items():
                    aten[path].update(ops)
        finally:
            for handle in handles:
                handle.remove()
    return Profile(
        spec_name=spec.name, phase=phase, batch=batch, seq=seq, context=context, device=device,
        threads=torch.get_num_threads(), wall_s=statistics.median(walls), wall_runs_s=walls,
        modules={path: statistics.median(v) for path, v in per_run.items()},
        aten_ops={path: sorted(v) for path, v in aten.items()},
    )
