"""Whole-process time of the common commands (median of several rounds, each
command a fresh process once a round) against the 0.5 s target of the issue "Hardening", and
whether torch / matplotlib were imported on the way.

    python benchmarks/cli_startup.py [--runs 7] [--no-compile]

The last line is `<command>_s=<seconds> ... torch_imported=0|1 matplotlib_imported=0|1`.

First it byte-compiles the flopsim package it runs (what pip does on install), as a
plain `python` would on a module's first import: with PYTHONDONTWRITEBYTECODE set (as on
these machines) a checkout's edited modules would otherwise be compiled from source on
every run, ~40 ms of `predict` (`--no-compile` measures the tree as it is). Then it
runs each command once untimed, so that every timed run reads flopsim.opcache's cache
as a repeated command does (the first count of a spec builds its ops with sympy).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

TARGET_S = 0.5
COMMANDS = {
    "help": ["--help"],
    "count": ["count", "gpt2-small", "--seq", "1024"],
    "count_llama_train": ["count", "llama-3-8b", "--seq", "2048", "--phase", "train", "--format", "json"],
    "predict_decode": ["predict", "llama-3-8b", "--hardware", "h100-sxm", "--phase", "decode"],
    "hardware_list": ["hardware", "list"],
}


def median_seconds(args, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(args, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--no-compile", action="store_true", help="leave flopsim's bytecode as it is")
    args = parser.parse_args()
    runs = args.runs
    if not args.no_compile:
        subprocess.run([sys.executable, "-c", "import compileall, os, flopsim; "
                        "compileall.compile_dir(os.path.dirname(flopsim.__file__), quiet=1)"], check=True)
    for argv in COMMANDS.values():  # untimed: fills flopsim.opcache, as any earlier run of the command has
        subprocess.run([sys.executable, "-m", "flopsim", *argv], check=True, capture_output=True)
    # round-robin (each round runs every command once), so that a drift of the host's
    # speed during the benchmark weighs on every command alike
    times: dict = {name: [] for name in ("python", *COMMANDS)}
    for _ in range(runs):
        times["python"].append(median_seconds([sys.executable, "-c", "pass"], 1))
        for name, argv in COMMANDS.items():
            times[name].append(median_seconds([sys.executable, "-m", "flopsim", *argv], 1))
    print(f"{'python -c pass':18s} {statistics.median(times.pop('python')):.3f} s  (the interpreter alone)")
    medians = {}
    for name in COMMANDS:
        medians[name] = statistics.median(times[name])
        verdict = "met" if medians[name] <= TARGET_S else "NOT met"
        print(f"{name:18s} {medians[name]:.3f} s  (target {TARGET_S} s: {verdict})")
    probe = subprocess.run([sys.executable, "-c",
                            "import sys, flopsim.cli; print(int('torch' in sys.modules), "
                            "int('matplotlib' in sys.modules))"], capture_output=True, text=True, check=True)
    torch_loaded, mpl_loaded = probe.stdout.split()
    print(" ".join(f"{k}_s={v:.3f}" for k, v in medians.items())
          + f" torch_imported={torch_loaded} matplotlib_imported={mpl_loaded}")


if __name__ == "__main__":
    main()
