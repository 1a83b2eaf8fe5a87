"""The layout search against Megatron-LM's published layouts.

For every training row of the published-measurements suite whose source is a
Megatron-LM table (megatron-* sources), on the row's GPU count, global batch,
sequence, hardware and calibration: the row's own layout as plan_training
costs it (the suite's prediction, its error against the published figure)
and the fastest layout `flopsim plan train --search` finds (tp, pp, dp,
micro-batches 1-8 and the row's own, ZeRO 0-3, recomputation none /
selective / full, interleaving; the row's data-parallel overlap). The search includes the published layout, so the best
it finds is at least as fast unless flopsim judges the published layout not
to fit memory (said so). Prints one line per row and, last,

    rows=<N> search_at_least_as_fast=<n> median_published_layout_error=<e>

    python benchmarks/megatron_search.py [--rows ID,ID]
"""

from __future__ import annotations

import argparse
import statistics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=None)
    args = parser.parse_args()

    from flopsim.planning.search import search_training
    from flopsim.published import _setup, _shape, load_published, predict_row

    suite = load_published()
    by_id = {r.id: r for r in suite.rows}
    wanted = set(args.rows.split(",")) if args.rows else None
    rows = [r for r in suite.rows if r.task == "train" and r.source.startswith("megatron")
            and (wanted is None or r.id in wanted)]
    faster, errors = 0, []
    for row in rows:
        pred = predict_row(row, by_id)
        errors.append(abs(pred.error))
        s = _setup(row)
        mb = _shape(row, "micro_batch", 1)
        result = search_training(s.spec, s.hw, gpus=row.parallel.gpus, tokens=1e12, seq=_shape(row, "seq"),
                                 global_batch=_shape(row, "global_batch"),
                                 micro_batches=sorted({1, 2, 4, 8, mb}), calibration=s.cal,
                                 tp_overlap=1.0 if row.engine.tp_comm_overlap else 0.0,
                                 dp_overlap=1.0 if row.engine.dp_comm_overlap else 0.0)
        best = result.best
        own = pred.details["step_time_s"]
        if best is None:
            print(f"{row.id:48s} no layout fits; published layout predicted {own:.3f} s")
            continue
        ok = best["step_time_s"] <= own * (1 + 1e-9)
        faster += ok
        p = row.parallel
        print(f"{row.id:48s} published tp{p.tp} pp{p.pp} v{p.virtual_stages} dp{p.dp} mb{mb} {p.recompute}: {own:.3f} s "
              f"(error {100 * pred.error:+.1f}% vs measured; fits {pred.details.get('fits')}) | search best "
              f"tp{best['tp']} pp{best['pp']} v{best['virtual_stages']} dp{best['dp']} mb{best['micro_batch']} ZeRO-{best['zero']} "
              f"{best['recompute']}: {best['step_time_s']:.3f} s ({own / best['step_time_s']:.2f}x) "
              f"[{len(result.rows)} layouts, {result.elapsed_s:.1f} s]")
    print(f"rows={len(rows)} search_at_least_as_fast={faster} "
          f"median_published_layout_error={statistics.median(errors) if errors else float('nan'):.3f}")


if __name__ == "__main__":
    main()
