"""How much a published row's unpublished layout moves its prediction.

Some rows of the published suite (`specs/published/measurements.yaml`) state the model,
hardware, tokens and batch but not the parallel layout; their notes say "LAYOUT NOT
PUBLISHED" and give the layout assumed a priori, the one the suite scores. This script
predicts each such row again under every other layout of the same run that a reader could
equally assume, and prints the ratios side by side: whether the row's miss lies inside the
spread its missing layout leaves, or outside it.

The layouts tried, for each GPU count in --gpus (default: the row's): tensor parallelism tp in 1, 2, 4, 8 (one node,
sequence parallel), data parallelism dp = GPUs / tp over the row's global batch with its
ZeRO stage and recomputation, each replica's sequences in the largest micro-batch that
divides them and fits the device (flopsim's memory model), the rest accumulated. A layout
whose sequences do not divide over dp, or whose tp does not divide the heads, is skipped. Nothing is fitted: every figure is `flopsim.published.predict_row` on
the row with its `parallel` and `micro_batch` replaced; the scored row is unchanged.

    python benchmarks/unpublished_layouts.py [--rows ID,ID] [--gpus 1024,2048]

Llama 2's model-card hours divide into whole hours on 1,024 or on 2,048 GPUs (the rows'
notes), so `--rows llama2-7b-gpu-hours,llama2-13b-gpu-hours,llama2-70b-gpu-hours --gpus
1024,2048` tries both.
"""

from __future__ import annotations

import argparse
import sys

MARK = "LAYOUT NOT PUBLISHED"


def _sequences(row) -> int:
    """The row's global batch in sequences."""
    shape = row.shape
    if "global_batch" in shape:
        return int(shape["global_batch"])
    return int(shape["global_batch_tokens"] // shape["seq"])


def _variant(row, gpus: int, tp: int, micro_batch: int):
    """The row with the layout (gpus, tp, dp = gpus / tp) and micro-batch replaced."""
    from flopsim.published import Row

    parallel = row.parallel.model_copy(update={"gpus": gpus, "tp": tp, "dp": gpus // tp, "pp": 1,
                                               "sequence_parallel": None})
    data = row.model_dump()
    data.update(id=f"{row.id}@{gpus}x{tp}", parallel=parallel.model_dump(),
                shape={**row.shape, "micro_batch": micro_batch})
    return Row(**data)


def _layouts(row, gpu_counts: list[int]):
    """(gpus, tp, dp, micro-batch, RowResult, fits) for every layout tried (module docstring):
    each replica's sequences in the largest micro-batch dividing them that fits the device."""
    from flopsim.errors import InputError
    from flopsim.published import _setup, _train_plan, predict_row

    seqs = _sequences(row)
    for gpus in gpu_counts:
        for tp in (1, 2, 4, 8):
            dp = gpus // tp
            if gpus % tp or seqs % dp:
                continue
            per_replica = seqs // dp
            for micro_batch in [m for m in range(per_replica, 0, -1) if per_replica % m == 0]:
                variant = _variant(row, gpus, tp, micro_batch)
                try:
                    fits = _train_plan(variant, _setup(variant), tokens=float(row.shape["tokens"])).fits
                except InputError as err:  # e.g. tp does not divide the heads
                    print(f"  {gpus:>5} {tp:>3}: skipped, {err}")
                    break
                if fits or micro_batch == 1:
                    yield gpus, tp, dp, micro_batch, predict_row(variant, {}), fits
                    break


def _gpu_counts(text: str) -> list[int]:
    counts = [int(g) for g in text.split(",")]  # ValueError on a non-integer
    if any(g < 1 for g in counts):
        raise ValueError("GPU counts must be positive")
    return counts


def _print_row(row, counts: list[int]) -> None:
    from flopsim.published import predict_row

    scored = predict_row(row, {})
    print(f"\n{row.id} ({row.model}, {row.hardware}, {row.metric} {row.value:,.0f}; scored: "
          f"{row.parallel.gpus} GPUs, tp {row.parallel.tp}, micro-batch {row.shape.get('micro_batch', 1):g}, "
          f"ratio {scored.ratio:.3f})")
    print(f"  {'GPUs':>5} {'tp':>3} {'dp':>5} {'micro':>5} {'fits':>5} {'MFU':>6} {'predicted':>12} "
          f"{'ratio':>6} {'x off':>6}")
    ratios = []
    for gpus, tp, dp, mb, result, fits in _layouts(row, counts):
        ratios += [result.ratio] if fits else []
        mark = "*" if (gpus, tp, mb) == (row.parallel.gpus, row.parallel.tp,
                                          int(row.shape.get("micro_batch", 1))) else " "
        print(f"{mark} {gpus:>5} {tp:>3} {dp:>5} {mb:>5} {'yes' if fits else 'no':>5} "
              f"{result.details.get('mfu', float('nan')):>6.1%} {result.predicted:>12,.0f} {result.ratio:>6.3f} "
              f"{result.fold:>5.2f}x")
    if ratios:
        print(f"  over the layouts that fit: ratio {min(ratios):.3f} to {max(ratios):.3f} "
              f"({_speed(min(ratios))} to {_speed(max(ratios))})")


def _speed(ratio: float) -> str:
    """A GPU-hours ratio (predicted / published) in words: below 1 flopsim is fast."""
    return f"{1 / ratio:.2f}x fast" if ratio < 1 else f"{ratio:.2f}x slow"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=None, help="comma-separated row ids of train_run rows (default: every "
                                                      f"row whose notes say {MARK!r})")
    parser.add_argument("--gpus", default=None, help="comma-separated GPU counts (default: the row's)")
    args = parser.parse_args(argv)

    from flopsim.published import load_published

    suite = load_published()
    runs = {r.id: r for r in suite.rows if r.task == "train_run"}
    wanted = [r.id for r in suite.rows if MARK in r.notes and r.id in runs] if args.rows is None \
        else args.rows.split(",")
    unknown = [i for i in wanted if i not in runs]
    if unknown:
        print(f"--rows: {','.join(unknown)}: not a train_run row of the published suite", file=sys.stderr)
        return 2
    try:
        counts = None if args.gpus is None else _gpu_counts(args.gpus)
    except ValueError:
        print(f"--gpus: {args.gpus}: not a comma-separated list of positive integers", file=sys.stderr)
        return 2
    print("ratio = predicted / published; 'x off' = the larger over the smaller; * = the scored (a priori) layout")
    for row_id in wanted:
        _print_row(runs[row_id], counts or [runs[row_id].parallel.gpus])
    return 0


if __name__ == "__main__":
    sys.exit(main())
