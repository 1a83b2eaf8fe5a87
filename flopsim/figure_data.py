"""Plain data the report's figures share: the static ones (flopsim.plots,
matplotlib) and the interactive ones (flopsim.iplots, plotly) draw the same
points, so both read them from here and neither does its own arithmetic.

Conventions:
- an op *point* is every op of one step with the same name once the layer
  index is dropped (`block.3.attn.qkv` -> `block.*.attn.qkv`), the same
  pass, kind and bound, and the same per-op cost (FLOPs, bytes and time to
  relative 1e-9): the same kernel repeated in several layers. Its `count` is
  how many ops it stands for, `layers` which ones; `time_s` is their summed
  time, `op_time_s` one op's; FLOPs and bytes are per op;
- `intensity` = all FLOPs (elementwise included) / bytes, `tflops` =
  all FLOPs / one op's time / 1e12 (what the op achieves), both None for an
  op with no FLOPs or no bytes (it cannot be placed on a log-log roofline
  and goes on the no-FLOP view: bytes against time);
- `share` is the point's fraction of the step's summed op time.
"""

from __future__ import annotations

import math
import re
from typing import Iterable

LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)")


def generic_name(name: str) -> tuple[str, str]:
    """`block.3.attn.qkv` -> (`block.*.attn.qkv`, `3`); names without a layer index unchanged."""
    layers = LAYER_INDEX.findall(name)
    return LAYER_INDEX.sub("*", name), ".".join(layers)


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-30)


def op_points(ops: Iterable) -> list[dict]:
    """Merge one step's ops (flopsim.roofline.OpTime, or dicts with the same
    fields) into points (see the module docstring), in first-seen order."""
    points: list[dict] = []
    index: dict = {}
    total = 0.0
    for op in ops:
        get = op.get if isinstance(op, dict) else (lambda k, op=op: getattr(op, k))
        name, layer = generic_name(get("name"))
        flops, nbytes, time_s = float(get("all_flops")), float(get("bytes")), float(get("time_s"))
        if get("kind") == "collective":  # a collective's bytes are its message (flopsim.parallel)
            nbytes = float(get("comm_bytes"))
        total += time_s
        key = (name, get("pass_"), get("kind"), get("bound"))
        match = next((p for p in index.get(key, ()) if _same(p["all_flops"], flops)
                      and _same(p["bytes"], nbytes) and _same(p["op_time_s"], time_s)), None)
        if match is None:
            placed = flops > 0 and nbytes > 0 and time_s > 0
            match = {"name": name, "pass": get("pass_"), "kind": get("kind"), "bound": get("bound"), "count": 0,
                     "layers": [], "all_flops": flops, "bytes": nbytes, "op_time_s": time_s, "time_s": 0.0,
                     "intensity": flops / nbytes if placed else None,
                     "tflops": flops / time_s / 1e12 if placed else None}
            index.setdefault(key, []).append(match)
            points.append(match)
        match["count"] += 1
        match["time_s"] += time_s
        if layer:
            match["layers"].append(layer)
    for p in points:
        p["share"] = p["time_s"] / total if total > 0 else 0.0
    return points


def point_label(point: dict) -> str:
    """The name a figure prints: the generic name, its pass when backward, and the count."""
    label = point["name"] + (" (bwd)" if point["pass"] == "bwd" else "")
    return label + (f" x{point['count']}" if point["count"] > 1 else "")


def layer_ranges(layers: list[str]) -> str:
    """'0,1,2,3,7' for hover text, as ranges: '0-3, 7'."""
    if not layers:
        return ""
    if not all(x.isdigit() for x in layers):
        return ", ".join(layers)
    nums = sorted({int(x) for x in layers})
    out, start, prev = [], nums[0], nums[0]
    for n in nums[1:] + [None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(out)


def largest(points: list[dict], n: int) -> list[dict]:
    """The n points with the largest share of the step's time (ties in first-seen order)."""
    return sorted(points, key=lambda p: -p["time_s"])[:n]
