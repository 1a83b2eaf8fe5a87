"""Numbers for people: SI prefixes and durations, shared by the CLI's tables,
the plan's breakdowns, the report and the pages (4 significant digits)."""

from __future__ import annotations

import math
from typing import Any


SI = [(1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]


def human(value: Any, unit: str = "") -> str:
    """291648307200 -> '291.6 G' + unit; small values unchanged."""
    if value is None:
        return "-"
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    for scale, prefix in SI:
        if abs(value) >= scale:
            return f"{value / scale:.4g} {prefix}{unit}"
    if isinstance(value, float):
        return f"{value:.4g} {unit}".rstrip()
    return f"{value} {unit}".rstrip()


def human_time(seconds: float) -> str:
    if seconds is None:
        return "-"
    for scale, unit in ((86400, "d"), (3600, "h"), (60, "min"), (1, "s"), (1e-3, "ms"), (1e-6, "us")):
        if seconds >= scale:
            return f"{seconds / scale:.4g} {unit}"
    return f"{seconds * 1e9:.4g} ns"
