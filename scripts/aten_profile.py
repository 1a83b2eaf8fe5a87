"""Where each step of a validation suite spends its time, per aten op (a diagnostic).

    python3 scripts/aten_profile.py --device cuda --suite quick --out aten.csv
    python3 scripts/aten_profile.py --device cpu --cases dense,moe-capacity --out aten.csv

For every case and phase of the suite (or the cases named), the reference model
runs a few profiled steps (torch.profiler) and each top-level aten op the step
calls (a train step: its backward's too, each autograd node's, and the optimizer's) gets a row: calls per step, the host's seconds per step in those calls and,
on a GPU, their kernels' device seconds per step (flopsim.profiling.aten_breakdown).
What it answers that the validation's per-module table does not: which kernel a
module's time goes to, and what one call costs the host (seconds / calls), the
views and small ops flopsim does not count included. scripts/gpu-validate.sh runs
it after the validation. Bad input: one line naming the field, exit code 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flopsim.errors import InputError  # noqa: E402


def rows(device: str, suite: str, names: list | None, repeats: int) -> list:
    """(case, phase, aten op, calls, host_s, device_s) per step, for the suite's cases."""
    from flopsim.profiling import aten_breakdown, make_runner
    from flopsim.validate import load_suite

    cases = load_suite(suite, device)
    if names:
        unknown = sorted(set(names) - {c.name for c in cases})
        if unknown:
            raise InputError(f"--cases: {','.join(unknown)!r}: not in suite {suite!r} "
                             f"(its cases: {', '.join(c.name for c in cases)})")
        cases = [c for c in cases if c.name in names]
    out = []
    for case in cases:
        for phase in case.phases:
            runner = make_runner(case.spec, phase, case.batch, case.seq, case.context if phase == "decode" else None,
                                 device=device)
            for name, calls, host_s, device_s in aten_breakdown(runner, repeats):
                out.append((case.name, phase, name, calls, host_s, device_s))
            print(f"{case.name} {phase}: {len(out)} rows so far", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--suite", default="quick")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="profiled steps per case and phase")
    parser.add_argument("--out", required=True, help="the CSV to write")
    args = parser.parse_args()
    try:
        if args.repeats < 1:
            raise InputError(f"--repeats: {args.repeats}: expected at least 1")
        from flopsim.outputs import check_output_file, write_atomic

        check_output_file(Path(args.out), "--out")
        table = rows(args.device, args.suite, [n for n in args.cases.split(",") if n] or None, args.repeats)
    except InputError as err:
        print(f"aten_profile: error: {err}", file=sys.stderr)
        return 2
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["case", "phase", "aten_op", "calls_per_step", "host_s_per_step", "device_s_per_step"])
    writer.writerows(table)
    write_atomic(Path(args.out), text.getvalue())
    print(f"wrote {args.out} ({len(table)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
