"""A CPU train step against the forward step of the same model, each model in a
process of its own, under glibc's default allocator and with its heap never
trimmed: how much of the train step's miss is page faults.

    python benchmarks/train_vs_forward.py                          # every train case of the full suite
    python benchmarks/train_vs_forward.py --models dense,moe --rounds 8
    python benchmarks/train_vs_forward.py --allocators default     # one allocator setting only

Why: the validation (`flopsim validate`) compares predicted and measured
times on a host whose speed drifts by tens of percent within minutes, so an
end-to-end error mixes the model's error with the host's. The ratio of a
train step to the forward step of the same model, both timed in alternating
rounds in one process, cancels most of that drift: flopsim's train / forward
ratio against the measured one checks what the train step adds (the
backward, the optimizer, the loss) on its own. Each model runs in a fresh
process, as a training job does (and as `flopsim validate` now times each
CPU case, flopsim.case_process): glibc's heap then has that model's history
only, not the other cases'.

Allocators (each a fresh process per model; glibc reads these at start-up):
- `default`: glibc as installed. A step frees its activations and, with
  `zero_grad(set_to_none=True)` (PyTorch's default), its gradients; glibc
  returns the top of its heap to the OS when more than its trim threshold is
  free there, and the next step faults those pages in again. How many depends
  on where the long-lived blocks sit (the heap's history): 0 to 45 thousand
  4 kB pages a step for the same model on the 2-core VM.
- `no-trim`: MALLOC_TRIM_THRESHOLD_ huge and MALLOC_MMAP_THRESHOLD_ 32 MiB
  (glibc's largest): the heap is never trimmed and blocks below 32 MiB always
  come from it, so only allocations of 32 MiB or more map fresh pages -- the
  rule flopsim's fresh-pages cost assumes (flopsim.calibration lookup step 7).

Per model and allocator it prints the median forward and train step
(milliseconds), the measured train / forward ratio over flopsim's, less one
("ratio err"; +10%: the train step is 10% slower, relative to the forward,
than flopsim predicts), the minor page faults of a train step (MB, `getrusage`), and the
train step's error against flopsim's absolute prediction. The last line
gives, per allocator, the median |ratio error| and the median faulted MB.
Medians over the rounds, two timed runs a round after a warm-up
(flopsim.profiling.warm_up).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALLOCATORS = {
    "default": {},
    "no-trim": {"MALLOC_TRIM_THRESHOLD_": str(2 ** 40), "MALLOC_MMAP_THRESHOLD_": str(32 * 2 ** 20)},
}


def measure_one(suite: str, name: str, rounds: int) -> dict:
    """One model's forward and train steps, alternating, in this process."""
    import resource

    import torch

    from flopsim.calibration import load_calibration
    from flopsim.hardware import load_hardware
    from flopsim.predict import predict
    from flopsim.profiling import make_runner, time_runs, warm_up
    from flopsim.validate import load_suite

    case = next(c for c in load_suite(suite, "cpu") if c.name == name)
    hw = load_hardware("cpu")
    cal = load_calibration("auto", hw)
    predicted = {phase: predict(case.spec, hw, phase=phase, batch=case.batch, seq=case.seq, calibration=cal).time_s
                 for phase in ("forward", "train")}
    forward = make_runner(case.spec, "forward", case.batch, case.seq)
    train = make_runner(case.spec, "train", case.batch, case.seq)
    runs: dict = {"forward": [], "train": [], "faults": []}
    for _ in range(rounds):
        warm_up(forward)
        runs["forward"] += time_runs(forward, 2, warmup=0)
        warm_up(train)
        runs["train"] += time_runs(train, 2, warmup=0)  # its faults go to train.faults
    runs["faults"] = train.faults
    return {"model": name, "threads": torch.get_num_threads(), "page_bytes": resource.getpagesize(),
            "predicted": predicted, **{k: statistics.median(v) for k, v in runs.items()}}


def run_child(suite: str, name: str, rounds: int, allocator: str) -> dict:
    env = {**os.environ, **ALLOCATORS[allocator]}
    out = subprocess.run([sys.executable, __file__, "--suite", suite, "--one", name, "--rounds", str(rounds)],
                         env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_cases(suite: str) -> list:
    from flopsim.errors import InputError
    from flopsim.validate import load_suite

    try:
        return [c.name for c in load_suite(suite, "cpu") if "train" in c.phases]
    except InputError as err:
        bad_input(f"--suite: {err}")


def bad_input(message: str) -> None:
    """One line on stderr, exit code 2 (the project's bad-input convention)."""
    print(f"train_vs_forward: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="full")
    parser.add_argument("--models", default=None, help="comma-separated case names (default: every train case)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--allocators", default="default,no-trim")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child: one model, JSON out
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.suite, args.one, args.rounds)))
        return
    allocators = args.allocators.split(",")
    unknown = [a for a in allocators if a not in ALLOCATORS]
    if unknown:
        bad_input(f"--allocators: {unknown[0]!r} is not one of {', '.join(ALLOCATORS)}")
    cases = train_cases(args.suite)
    models = args.models.split(",") if args.models else cases
    unknown = [m for m in models if m not in cases]
    if unknown:
        bad_input(f"--models: {unknown[0]!r} is not a train case of suite {args.suite!r} ({', '.join(cases)})")
    if args.rounds < 1:
        bad_input(f"--rounds: {args.rounds} (expected at least 1)")
    rows = {a: [] for a in allocators}
    head = f"{'model':14s} {'pred fwd':>8s} {'train':>7s} {'ratio':>6s}"
    print(head + "".join(f" | {a + ': fwd':>13s} {'train':>7s} {'ratio err':>9s} {'faults':>8s} {'train err':>9s}"
                         for a in allocators))
    for name in models:
        line = None
        for a in allocators:
            r = run_child(args.suite, name, args.rounds, a)
            p = r["predicted"]
            if line is None:
                line = f"{name:14s} {p['forward'] * 1e3:8.1f} {p['train'] * 1e3:7.1f} {p['train'] / p['forward']:6.3f}"
            ratio_error = (r["train"] / r["forward"]) / (p["train"] / p["forward"]) - 1
            faulted_mb = r["faults"] * r["page_bytes"] / 1e6
            rows[a].append((ratio_error, faulted_mb))
            line += (f" | {r['forward'] * 1e3:13.1f} {r['train'] * 1e3:7.1f} {100 * ratio_error:+8.1f}%"
                     f" {faulted_mb:6.1f}MB {100 * (p['train'] / r['train'] - 1):+8.1f}%")
        print(line, flush=True)
    summary = []
    for a in allocators:
        errors = [abs(e) for e, _ in rows[a]]
        faults = [f for _, f in rows[a]]
        print(f"{a}: median |train/forward ratio error| {100 * statistics.median(errors):.1f}%, "
              f"median signed {100 * statistics.median(e for e, _ in rows[a]):+.1f}%, "
              f"median faulted {statistics.median(faults):.1f} MB a train step")
        summary.append(f"{a}_ratio_error={statistics.median(errors):.4f} {a}_faulted_mb={statistics.median(faults):.1f}")
    print(" ".join(summary))


if __name__ == "__main__":
    main()
