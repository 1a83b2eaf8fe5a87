"""The cross-entropy loss alone on a CPU, at one size of logits split into rows and
classes several ways: does its speed depend on the class count?

    python benchmarks/loss_classes.py
    python benchmarks/loss_classes.py --repeats 9 --megabytes 32

Why: `flopsim calibrate` times the loss (forward, and backward over a ring of
graphs) at 1,024 classes and prices any other class count by bytes, while the
validation's decoders score 8,000 or 16,000 classes. For each split of the same
fp32 logits (rows x classes) it prints the forward and the backward
(`F.cross_entropy`, then `.backward()` timed alone, the gradient freed each
call, as in a step), medians of `--repeats` loops of 30 calls, and each split's time over the
1,024-class split's, side by side. Bad input: one line naming the field, exit 2.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

CLASSES = (256, 1024, 8000, 16000)
CALLS = 30


def loop_s(fn, calls: int = CALLS) -> float:
    """Seconds per call of `fn` over `calls` back-to-back calls, after three warm-up calls."""
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def backward_s(forward, logits, calls: int = CALLS) -> float:
    """Seconds per `.backward()` of the loss, each call's forward run untimed before it and
    its gradient freed after it (as in a step), after three warm-up calls."""
    total = 0.0
    for call in range(3 + calls):
        loss = forward()
        start = time.perf_counter()
        loss.backward()
        if call >= 3:
            total += time.perf_counter() - start
        logits.grad = None
    return total / calls


def forward_backward_s(rows: int, classes: int, repeats: int) -> tuple[float, float]:
    """(forward, backward) seconds of the loss over rows x classes logits, medians of `repeats` loops."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, classes, generator=gen).requires_grad_()
    labels = torch.randint(0, classes, (rows,), generator=gen)

    def forward():
        return F.cross_entropy(logits, labels)

    fwd, bwd = [], []
    for _ in range(repeats):
        fwd.append(loop_s(forward))
        bwd.append(backward_s(forward, logits))
    return statistics.median(fwd), statistics.median(bwd)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="loops per split (the median is printed)")
    parser.add_argument("--megabytes", type=float, default=16.384, help="size of the fp32 logits")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        print(f"--repeats: {args.repeats}: must be at least 1", file=sys.stderr)
        return 2
    if not 0.1 <= args.megabytes <= 4096:
        print(f"--megabytes: {args.megabytes}: must be between 0.1 and 4096", file=sys.stderr)
        return 2
    elements = int(args.megabytes * 1e6 / 4)
    forward_backward_s(64, 64, 1)  # torch's first calls (library loading) timed nowhere
    results = {c: forward_backward_s(max(1, elements // c), c, args.repeats) for c in CLASSES}
    ref_f, ref_b = results[1024]
    print(f"cross-entropy on {elements * 4 / 1e6:.1f} MB of fp32 logits, medians of {args.repeats} loops")
    for classes, (f, b) in results.items():
        print(f"{max(1, elements // classes):7d} rows x {classes:6d} classes  forward {f * 1e3:6.2f} ms "
              f"({f / ref_f:4.2f}x the 1,024-class split)  backward {b * 1e3:6.2f} ms ({b / ref_b:4.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
