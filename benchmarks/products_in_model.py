"""Where a CPU matrix product writes its result: in a hot loop or inside a model.

    python benchmarks/products_in_model.py                  # the full suite's dense model, forward
    python benchmarks/products_in_model.py --model moe --passes 12

Two measurements, printed side by side (medians; no prediction involved):

1. Inside the model. Every nn.Linear of the reference's forward is timed by
   forward hooks (perf_counter) over several runs, then the same call on
   the same input is timed in a hot loop, where each call writes its
   result into the block the previous one freed. The ratio is how much
   slower the model runs its products than a hot loop does.
2. The mechanism alone. `torch.mm` of the model's product shapes writing
   into one hot buffer against writing into views cycled over a pool larger
   than the last-level cache (as `flopsim calibrate` now times a CPU's
   products, `Bench.cold_outputs`), interleaved passes.

Why: the calibration's hot loops measured the first kind, the models run
the second (docs/wallclock.md, "A product writes memory that is not in
cache").
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time


def hooked_products(model_name: str, runs: int) -> tuple[dict, dict, float]:
    """(module -> median seconds inside the model, module -> (module, input), median step seconds)."""
    import torch

    from flopsim import profiling
    from flopsim.validate import load_suite

    case = {c.spec.name: c for c in load_suite("full", "cpu")}[model_name]
    runner = profiling.make_runner(case.spec, "forward", case.batch, case.seq, case.context)
    profiling.time_runs(runner, 3, 2)
    started, inside, calls = {}, {}, {}

    def before(module, args, path):
        started[path] = time.perf_counter()

    def after(module, args, path):  # returns None: the output is left as it is
        inside.setdefault(path, []).append(time.perf_counter() - started[path])
        calls[path] = (module, args[0])

    handles = []
    for path, module in runner.model.named_modules():
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_pre_hook(lambda m, a, p=path: before(m, a, p)))
            handles.append(module.register_forward_hook(lambda m, a, o, p=path: after(m, a, p)))
    steps = []
    for _ in range(runs):
        start = time.perf_counter()
        runner.once()
        steps.append(time.perf_counter() - start)
    for handle in handles:
        handle.remove()
    return {p: statistics.median(v) for p, v in inside.items()}, calls, statistics.median(steps)


def hot_loop(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def cold_outputs(shapes: set, passes: int, pool_bytes: float) -> dict:
    """(m, n, k) -> (seconds into a hot buffer, seconds into cold views), interleaved medians."""
    import torch

    weights_pool = torch.randn(int(pool_bytes / 4))
    outputs_pool = torch.zeros(int(pool_bytes / 4))
    runs = {}
    for m, n, k in sorted(shapes):
        x = torch.randn(m, k)
        weights = [weights_pool[i * n * k:(i + 1) * n * k].view(n, k) for i in range(weights_pool.numel() // (n * k))]
        outputs = [outputs_pool[i * m * n:(i + 1) * m * n].view(m, n) for i in range(outputs_pool.numel() // (m * n))]
        w, o, hot = itertools.cycle(weights), itertools.cycle(outputs), torch.empty(m, n)
        runs[m, n, k] = ((lambda x=x, w=w, hot=hot: torch.mm(x, next(w).t(), out=hot)),
                         (lambda x=x, w=w, o=o: torch.mm(x, next(w).t(), out=next(o))), [], [])
    for _ in range(passes):
        for hot_fn, cold_fn, hot_s, cold_s in runs.values():
            hot_s.append(hot_loop(hot_fn, 5))
            cold_s.append(hot_loop(cold_fn, 5))
    return {shape: (statistics.median(r[2]), statistics.median(r[3])) for shape, r in runs.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dense", help="a model of the full validation suite (default dense)")
    parser.add_argument("--runs", type=int, default=9, help="hooked forward runs (default 9)")
    parser.add_argument("--passes", type=int, default=8, help="interleaved passes of the cold-output timing")
    parser.add_argument("--pool-mb", type=float, default=1024, help="the cold pools' size, MB (default 1024)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    inside, calls, step_s = hooked_products(args.model, args.runs)
    print(f"{args.model} forward, median step {step_s * 1e3:.1f} ms; each nn.Linear inside it against a hot loop:")
    total_in = total_hot = 0.0
    shapes = set()
    with torch.no_grad():
        for path, (module, x) in calls.items():
            hot = hot_loop(lambda m=module, x=x: m(x), 9)
            total_in, total_hot = total_in + inside[path], total_hot + hot
            m, k = x.numel() // x.shape[-1], x.shape[-1]
            shapes.add((m, module.out_features, k))
            print(f"  {path:28s} {m} x {module.out_features} x {k}: inside {inside[path] * 1e3:7.3f} ms, "
                  f"hot loop {hot * 1e3:7.3f} ms, ratio {inside[path] / hot:.3f}")
    print(f"  summed: inside {total_in * 1e3:.1f} ms, hot loop {total_hot * 1e3:.1f} ms, "
          f"ratio {total_in / total_hot:.3f}")
    print(f"torch.mm into a hot buffer against views cycled over {args.pool_mb:.0f} MB ({args.passes} passes):")
    for (m, n, k), (hot_s, cold_s) in cold_outputs(shapes, args.passes, args.pool_mb * 1e6).items():
        print(f"  {m} x {n} x {k}: hot {hot_s * 1e3:7.3f} ms, cold output {cold_s * 1e3:7.3f} ms, "
              f"ratio {cold_s / hot_s:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
