"""flopsim against public measurements: every row of the published suite
(specs/published/measurements.yaml), published next to predicted, and the
headline figures against the targets (median |error| <= 15%, no row off by
more than 1.5x).

    python benchmarks/published_suite.py            # predict every row (a few seconds)
    python benchmarks/published_suite.py --by task  # medians by task (or source, hardware)

The last line is `rows=<n> sources=<n> median_abs_error=<x> worst_fold=<x> within_1_5x=<n>`.
"""

from __future__ import annotations

import argparse

from flopsim.published import run_published

MEDIAN_TARGET, FOLD_TARGET = 0.15, 1.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--by", default="task", choices=["task", "source", "hardware"])
    args = parser.parse_args()
    result = run_published()
    for r in result.results:
        note = "" if r.row.scored else "  (not scored)"
        print(f"{r.row.id:58s} {r.row.metric:21s} published {r.row.value:11.4g} predicted {r.predicted:11.4g} "
              f"ratio {r.ratio:6.3f}{note}")
    for row_id, why in result.failures:
        print(f"{row_id:58s} not predicted: {why}")
    s = result.summary()
    print(f"\nby {args.by}:")
    for key, v in s["by"][args.by].items():
        print(f"  {key:28s} rows {v['rows']:3d}  median |error| {100 * v['median_abs_error']:5.1f}%")
    print(f"\n{s['rows']} scored rows from {s['sources']} sources ({s['unscored_rows']} shown, not scored): median "
          f"|error| {100 * s['median_abs_error']:.1f}% (target <= {100 * MEDIAN_TARGET:.0f}%: "
          f"{'met' if s['median_abs_error'] <= MEDIAN_TARGET else 'not met'}), worst {s['worst_fold']:.2f}x "
          f"({s['worst_row']}; target <= {FOLD_TARGET}x: {'met' if s['worst_fold'] <= FOLD_TARGET else 'not met'}), "
          f"{s['within_1_5x']}/{s['rows']} within 1.5x, median signed error {100 * s['median_signed_error']:+.1f}%")
    print(f"rows={s['rows']} sources={s['sources']} median_abs_error={s['median_abs_error']:.4f} "
          f"worst_fold={s['worst_fold']:.4f} within_1_5x={s['within_1_5x']}")


if __name__ == "__main__":
    main()
