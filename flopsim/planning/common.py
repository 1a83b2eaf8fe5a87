"""What both plans share: input parsing and checks, defaults, a progress bar,
a monotone search and long-format tables."""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Optional

from flopsim.errors import InputError, bad_value

DEFAULT_GPUS_PER_NODE = 8  # when the hardware spec gives no scale_up_domain
DEFAULT_GLOBAL_BATCH_TOKENS = 4 * 2 ** 20  # ~4M tokens (Llama 2's global batch)
DEFAULT_SEQ = 4096
MAX_SERVING_BATCH = 2 ** 20
# the share of device memory a serving engine fills (vLLM's gpu_memory_utilization default)
DEFAULT_MEMORY_UTILIZATION = 0.9
GB = 1e9


# -- input helpers -------------------------------------------------------------------
_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9, "t": 1e12, "p": 1e15}


def parse_quantity(text: Any, name: str) -> float:
    """'1T' -> 1e12, '4M' -> 4e6, '2.5e11' -> 2.5e11 (decimal suffixes k M G/B T P)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGbBtTpP]?)\s*", str(text))
    if not match:
        raise bad_value(name, text, "expected a number, optionally with a suffix k, M, G, T or P (e.g. 1T, 4M)")
    return float(match.group(1)) * _SUFFIX[match.group(2).lower()]


_DURATION = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "min": 60.0}


def parse_duration(text: Any, name: str) -> float:
    """'50ms' -> 0.05, '1s' -> 1.0, '0.2' -> 0.2 (seconds; units s, ms, us, min)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(s|ms|us|min)?\s*", str(text))
    if not match:
        raise bad_value(name, text, "expected a duration in seconds, or with a unit s, ms, us (e.g. 50ms)")
    return float(match.group(1)) * _DURATION[match.group(2) or ""]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad_value(name, value, "must be a positive integer")
    return value


def _non_negative(name: str, value) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
        raise bad_value(name, value, "must be a non-negative number")
    return float(value)


def _positive(name: str, value) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise bad_value(name, value, "must be a positive number")
    return float(value)


class _Progress:
    """A rich progress bar on stderr (only when enabled and stderr is a terminal)."""

    def __init__(self, enabled: bool, description: str, total: Optional[int] = None):
        self._bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, \
            TimeElapsedColumn

        console = Console(stderr=True)
        if not console.is_terminal:
            return
        self._bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), console=console, transient=True)
        self._bar.start()
        self._task = self._bar.add_task(description, total=total)

    def advance(self, description: Optional[str] = None, n: int = 1):
        if self._bar is not None:
            self._bar.update(self._task, advance=n, **({"description": description} if description else {}))

    def close(self):
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def largest_true(pred: Callable[[int], bool], upper: int) -> int:
    """The largest n in [1, upper] with pred(n) true (0 when pred(1) is false),
    for a predicate that is true up to some n and false after: doubling, then bisection."""
    if upper < 1 or not pred(1):
        return 0
    lo, hi = 1, 2
    while hi <= upper and pred(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, upper + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if pred(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _gb(x: float) -> str:
    return f"{x / GB:.1f} GB"



def _long_table(d: dict, sections) -> Any:
    import pandas as pd

    rows = []
    for section in sections:
        for key, value in d[section].items():
            if isinstance(value, (dict, list)):
                continue
            rows.append({"section": section, "quantity": key, "value": value})
    rows.append({"section": "verdict", "quantity": "fits", "value": d["fits"]})
    rows.append({"section": "verdict", "quantity": "message", "value": d["message"]})
    return pd.DataFrame(rows)


def parse_gpu_counts(text, name: str = "gpus") -> list[int]:
    """'1024' -> [1024]; '256,512,1024' -> those; '64:1024' -> every power of two from 64 to 1024."""
    if isinstance(text, int) and not isinstance(text, bool):
        return [_positive_int(name, text)]
    raw = str(text).strip()
    try:
        if ":" in raw:
            lo, hi = (int(x) for x in raw.split(":"))
            if not 1 <= lo <= hi:
                raise ValueError
            out, g = [], 1
            while g <= hi:
                if g >= lo:
                    out.append(g)
                g *= 2
            if not out:
                raise ValueError
            return out
        out = [int(x) for x in raw.split(",")]
    except ValueError:
        raise bad_value(name, text, "expected a GPU count N, a list N,M,... or a range A:B (its powers of two)") from None
    return [_positive_int(name, g) for g in out]


def _single_stack(spec) -> None:
    """Plans cost one stack of blocks: refuse an encoder-decoder in one line."""
    if spec.is_encoder_decoder:
        raise InputError(f"{spec.name}: plan does not lay out encoder-decoders yet (the two stacks' token "
                         f"counts, the cross-attention's all-reduces and cache); count, predict, memory and "
                         f"sweep model them")
