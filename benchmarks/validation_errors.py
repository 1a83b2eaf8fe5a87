"""The headline validation figures: prediction error against measured
torch.profiler runs (reports/validation/<folder>/summary.json).

    python benchmarks/validation_errors.py                      # the committed quick-suite figures (cpu)
    python benchmarks/validation_errors.py --suite full         # reports/validation/cpu-full
    python benchmarks/validation_errors.py --folder cpu-repeat  # any report folder
    python benchmarks/validation_errors.py --run [--suite full] # measure again (calibrates in the run)

Prints the median |error| per phase (forward, prefill, decode, train), of
the speedups over the dense baseline and per GEMM op, each next to its
target, then a family x phase table. The last line is
`forward=<x> prefill=<x> decode=<x> train=<x> speedup=<x> gemm=<x>` (fractions).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("forward", "prefill", "decode", "train")
TARGET = 0.10  # median |error| per phase and on speedups (the issue "Trustworthy wall-clock")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--suite", default="quick")
    parser.add_argument("--folder", default=None, help="report folder under reports/validation/")
    parser.add_argument("--run", action="store_true", help="run `flopsim validate --recalibrate` first")
    args = parser.parse_args()
    name = args.folder or (args.device if args.suite == "quick" else f"{args.device}-{args.suite}")
    folder = ROOT / "reports" / "validation" / name
    if args.run:
        subprocess.run([sys.executable, "-m", "flopsim", "validate", "--device", args.device, "--suite", args.suite,
                        "--recalibrate", "--out", str(folder)], check=True)
    path = folder / "summary.json"
    if not path.exists():
        sys.exit(f"no {path}: run with --run")
    s = json.loads(path.read_text())
    print(f"{s['device']} ({s.get('device_name')}), torch {s['torch']}, {s['date']}, suite {s['suite']}: "
          f"{s['cases']} model runs, {s['gemm_ops']} GEMM ops, {s['speedups']} speedups; calibration "
          f"{'measured in the run' if s.get('calibrated_in_run') else s.get('calibration')}")
    figures = {p: s["by_phase"][p]["median_abs_error"] for p in PHASES if p in s["by_phase"]}
    figures["speedup"] = s["median_abs_error_speedup"]
    figures["gemm"] = s["median_abs_error_gemm"]
    for key, value in figures.items():
        target = TARGET if key != "gemm" else 0.15
        signed = s["by_phase"].get(key, {}).get("median_signed_error")
        probed = s["by_phase"].get(key, {}).get("median_abs_error_probe")
        extra = f", median signed {100 * signed:+.1f}%" if signed is not None else ""
        extra += f"; at the probed speed {100 * probed:.1f}%" if probed is not None else ""
        print(f"  {key:8s} median |error| {100 * value:5.1f}%  (target <= {100 * target:.0f}%: "
              f"{'met' if value <= target else 'not met'}{extra})")
    print("  family x phase, median |error|:")
    print("    " + f"{'family':18s}" + "".join(f"{p:>9s}" for p in PHASES))
    for family, phases in s.get("by_family", {}).items():
        cells = "".join(f"{100 * phases[p]['median_abs_error']:8.1f}%" if p in phases else f"{'-':>9s}"
                        for p in PHASES)
        print(f"    {family:18s}{cells}")
    print(" ".join(f"{k}={v:.4f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
