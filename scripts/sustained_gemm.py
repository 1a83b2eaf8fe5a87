"""Whether a large matrix product keeps its speed when it runs for seconds, as in training (a diagnostic).

    python3 scripts/sustained_gemm.py --device cuda --seconds 20 --out sustained.csv
    python3 scripts/sustained_gemm.py --device cpu --size 1024 --seconds 5 --out sustained.csv

A calibration times each product over tens of calls, a tenth of a second or so;
a training step runs products back to back for hours, beside its collectives'
kernels. A GPU held at its power limit lowers its SM clock, and how much it
draws depends on its operands' bits (random data toggles more of the
multipliers than zeros do) and on what runs beside it (DeepGEMM issue #120:
Hopper clocks from 1,980 to 1,575 MHz when products overlap communication).
This runs square products of random operands (torch.randn) back to back for
--seconds, timed in windows of about --window seconds; then the same products
of zero operands for --zero-seconds; then, on a CUDA device, random operands
again for --overlap-seconds while a second stream copies a 256 MB buffer over
and over (a collective's kernels share the SMs, the memory and the power
budget the same way). On a CUDA device a background nvidia-smi reads the SM
clock, the power draw, the temperature and the clock event reasons every
200 ms; each window gets the median of the readings taken within it.

Writes one CSV row per window: data (randn, zeros, randn+copies), t_end_s,
calls, tflops, sm_clock_mhz, power_w, temperature_c, clock_reasons,
copy_gb_per_s (empty where not read). Prints the first window of ten calls or more
(what a calibration's short loop sees), the random windows' last third (sustained),
their ratio, the zero windows' median and the products' speed beside the
copies. scripts/gpu-validate.sh runs it last. A phase that fails on the device
says so in one line and the windows timed before it are written. Bad input: one
line naming the field, exit code 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flopsim.errors import InputError  # noqa: E402

SMI_FIELDS = ["clocks.sm", "power.draw", "temperature.gpu", "clocks_event_reasons.active"]
CSV_COLUMNS = ["data", "t_end_s", "calls", "tflops", "sm_clock_mhz", "power_w", "temperature_c", "clock_reasons",
               "copy_gb_per_s"]


class SmiSampler:
    """nvidia-smi's readings every `period_ms`, each stamped with time.monotonic() when it arrived."""

    def __init__(self, gpu_index: int, period_ms: int = 200):
        self.readings: list = []
        fields = [f for f in SMI_FIELDS if _smi_accepts(f)]
        self.fields = fields
        self.proc = None
        if not fields:
            return
        self.proc = subprocess.Popen(
            ["nvidia-smi", "-i", str(gpu_index), f"--query-gpu={','.join(fields)}",
             "--format=csv,noheader,nounits", f"--loop-ms={period_ms}"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.readings.append((time.monotonic(), [v.strip() for v in line.split(",")]))

    def between(self, start: float, end: float) -> dict:
        """The median of each field over the readings that arrived in [start, end] (the last reason as read)."""
        rows = [values for t, values in self.readings if start <= t <= end and len(values) == len(self.fields)]
        out = {}
        for i, field in enumerate(self.fields):
            column = [row[i] for row in rows]
            if field == "clocks_event_reasons.active":
                out[field] = column[-1] if column else ""
                continue
            numbers = [float(v) for v in column if _is_number(v)]
            out[field] = round(statistics.median(numbers), 1) if numbers else ""
        return out

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=5)


def _smi_accepts(field: str) -> bool:
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def run_windows(torch, a, b, seconds: float, window_s: float, sync) -> list:
    """(t_start, t_end, calls, product seconds, "") per window of back-to-back a @ b until `seconds` have passed."""
    out = []
    calls = 1
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        t0 = time.monotonic()
        for _ in range(calls):
            torch.matmul(a, b)
        sync()
        elapsed = time.monotonic() - t0
        out.append((t0, time.monotonic(), calls, elapsed, ""))
        calls = max(1, round(calls * window_s / max(elapsed, 1e-9)))
    return out


def overlap_windows(torch, a, b, seconds: float, window_s: float, copy_bytes: int = 256 * 2**20) -> list:
    """run_windows' products while a side stream copies a `copy_bytes` buffer over and over, as a
    collective's kernels run beside a training step's products (SMs, memory and power shared):
    (t_start, t_end, calls, product seconds, the copies' GB/s read + written) per window, each timed
    on its own stream by CUDA events; the copies' count follows the products' time."""
    main, side = torch.cuda.current_stream(), torch.cuda.Stream()
    src = torch.empty(copy_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    out = []
    calls = copies = 1
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        t0 = time.monotonic()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        events[0].record(main)  # the products first: the copies' launches would hold them back otherwise
        for _ in range(calls):
            torch.matmul(a, b)
        events[1].record(main)
        with torch.cuda.stream(side):
            events[2].record(side)
            for _ in range(copies):
                dst.copy_(src)
            events[3].record(side)
        torch.cuda.synchronize()
        product_s, copy_s = events[0].elapsed_time(events[1]) / 1e3, events[2].elapsed_time(events[3]) / 1e3
        out.append((t0, time.monotonic(), calls, product_s, round(2 * copy_bytes * copies / copy_s / 1e9, 1)))
        calls = max(1, round(calls * window_s / max(product_s, 1e-9)))
        copies = max(1, round(copies * product_s / max(copy_s, 1e-9)))
    return out


def product_flops(n: int, dtype: str) -> float:
    """The FLOPs of one n x n x n product, as flopsim's own op for it counts them (calibrate's way)."""
    from flopsim.calibrate import _ctx
    from flopsim.count import evaluate_ops
    from flopsim.ops import primitives as P

    op = P.linear(_ctx(dtype), "x", layer=0, tokens=n, d_in=n, d_out=n, bias=False)[0]
    return float(evaluate_ops([op], {})[0].flops)


def measure(args) -> list:
    """Every window's CSV row: random operands, zero operands, then (CUDA) random operands beside copies."""
    import torch

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise InputError("--device: 'cuda': torch sees no CUDA device")
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n = args.size
    flops = product_flops(n, "bf16" if cuda else "fp32")
    phases = [("randn", args.seconds), ("zeros", args.zero_seconds)]
    phases += [("randn+copies", args.overlap_seconds)] if cuda else []
    sampler = SmiSampler(torch.cuda.current_device()) if cuda else None
    rows = []
    origin = time.monotonic()  # t_end_s counts from here
    try:
        for data, seconds in phases:
            make = torch.zeros if data == "zeros" else torch.randn
            a = make(n, n, dtype=dtype, device=args.device)
            b = make(n, n, dtype=dtype, device=args.device)
            torch.matmul(a, b)  # the kernel chosen and loaded before the first window
            sync()
            try:
                windows = (overlap_windows(torch, a, b, seconds, args.window) if data == "randn+copies"
                           else run_windows(torch, a, b, seconds, args.window, sync))
            except RuntimeError as err:  # the windows timed before it stand
                print(f"sustained_gemm: the {data} windows failed: {err}")
                continue
            for t0, t1, calls, elapsed, copy_gb_per_s in windows:
                smi = sampler.between(t0, t1) if sampler else {}
                rows.append([data, round(t1 - origin, 3), calls, round(flops * calls / elapsed / 1e12, 3),
                             smi.get("clocks.sm", ""), smi.get("power.draw", ""), smi.get("temperature.gpu", ""),
                             smi.get("clocks_event_reasons.active", ""), copy_gb_per_s])
            del a, b
    finally:
        if sampler:
            sampler.stop()
    return rows


def summary(rows: list) -> list:
    """Lines: the first random window, the random windows' last third, their ratio, the zero windows,
    the windows beside copies."""
    randn = [r for r in rows if r[0] == "randn"]
    zeros = [r for r in rows if r[0] == "zeros"]
    if not randn:
        return ["sustained_gemm: no window was timed"]
    tail = randn[len(randn) - max(1, len(randn) // 3):]
    head = next((r for r in randn if r[2] >= 10), randn[0])  # the first of 10 calls or more: a calibration's loop
    first, last = head[3], statistics.median(r[3] for r in tail)
    lines = [f"sustained_gemm: random operands, first window of {head[2]} calls {first:.4g} TF/s"
             f"{_clock([head])}; last third ({len(tail)} windows to {randn[-1][1]:.0f} s) "
             f"{last:.4g} TF/s{_clock(tail)}; last / first {last / first:.3f}"]
    if zeros:
        lines.append(f"sustained_gemm: zero operands after them, {statistics.median(r[3] for r in zeros):.4g} TF/s"
                     f"{_clock(zeros)} (median of {len(zeros)} windows)")
    beside = [r for r in rows if r[0] == "randn+copies"]
    if beside:
        tail = beside[len(beside) - max(1, len(beside) // 3):]
        tflops = statistics.median(r[3] for r in tail)
        lines.append(f"sustained_gemm: random operands beside a stream of copies, {tflops:.4g} TF/s"
                     f"{_clock(tail)} ({tflops / last:.3f} of the last third alone), the copies at "
                     f"{statistics.median(r[8] for r in tail):.0f} GB/s (last {len(tail)} windows)")
    return lines


def _clock(rows: list) -> str:
    clocks = [r[4] for r in rows if r[4] != ""]
    power = [r[5] for r in rows if r[5] != ""]
    if not clocks:
        return ""
    text = f" at {statistics.median(clocks):.0f} MHz"
    return text + (f", {statistics.median(power):.0f} W" if power else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", type=int, default=None, help="the square product's side (default 8192 cuda, 1024 cpu)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of random-operand products")
    parser.add_argument("--zero-seconds", type=float, default=4.0, help="seconds of zero-operand products after them")
    parser.add_argument("--overlap-seconds", type=float, default=4.0,
                        help="CUDA: seconds of random-operand products beside a stream of copies, last")
    parser.add_argument("--window", type=float, default=0.25, help="seconds a window aims at")
    parser.add_argument("--out", required=True, help="the CSV to write")
    args = parser.parse_args()
    args.size = args.size or (8192 if args.device == "cuda" else 1024)
    try:
        for field, value, low in (("--size", args.size, 1), ("--seconds", args.seconds, 0.1),
                                  ("--zero-seconds", args.zero_seconds, 0.0),
                                  ("--overlap-seconds", args.overlap_seconds, 0.0), ("--window", args.window, 0.01)):
            if value < low:
                raise InputError(f"{field}: {value!r}: expected at least {low}")
        from flopsim.outputs import check_output_file, write_atomic

        check_output_file(Path(args.out), "--out")
        rows = measure(args)
    except InputError as err:
        print(f"sustained_gemm: error: {err}", file=sys.stderr)
        return 2
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(CSV_COLUMNS)
    writer.writerows(rows)
    write_atomic(Path(args.out), text.getvalue())
    for line in summary(rows):
        print(line)
    print(f"wrote {args.out} ({len(rows)} windows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
