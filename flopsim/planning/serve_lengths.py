"""Request lengths for serving plans: a fixed length or a distribution, and the
steady state of continuous batching over them (flopsim.planning.serve).

Conventions:
- A length is a whole number of tokens, at least 1. `--prompt` / `--gen` take
  `N` (every request N tokens), `uniform:A:B` (every integer A..B equally
  likely), `lognormal:MEDIAN:SIGMA` (ln L ~ Normal(ln MEDIAN, SIGMA),
  discretized: P(L) = F(L + 1/2) - F(L - 1/2), L = 1 taking everything below
  3/2, truncated at the 99.9th percentile and renormalised) or a CSV file of
  `length,count` rows (a header line and `#` comments allowed).
- Prompt and generated lengths are independent.
- Steady state, `batch` slots always full: a request holds its slot for its G
  decode steps, so requests finish at batch / E[G] per step, and the requests
  in flight at a random step are the arrivals weighted by G (length-biased).
  At a uniformly random one of its steps j = 1..G the new token attends to
  P + j keys (itself included), so the mean KV length of a decode step is
      E[T] = E[G (P + (G + 1) / 2)] / E[G] = E[P] + E[G (G + 1)] / (2 E[G])
  (fixed lengths: P + (G + 1) / 2); the plan costs decode at floor(E[T])
  (decode time is linear in T while no op changes bound).
- Worst cases (WORST_QUANTILE, the 99th percentile): memory holds every slot's
  KV cache at the p99 of P + G (the distribution of the sum by convolution;
  longer requests are the 1% a paged cache would preempt or queue), a TTFT
  target bounds the TTFT of the p99 prompt. Fixed lengths: P + G and P.
- Prefill over a prompt distribution is costed at no more than PREFILL_GROUPS
  lengths: the support split into groups of equal probability, each costed at
  its probability-weighted mean length (rounded) with its probability; exact
  up to PREFILL_GROUPS distinct lengths. Attention is quadratic in the length,
  so a group's mean length slightly understates its mean cost.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flopsim.errors import FlopsimError, InputError, bad_value

WORST_QUANTILE = 0.99
LOGNORMAL_TAIL = 0.999  # a discretized lognormal stops at this quantile
PREFILL_GROUPS = 8
MAX_LENGTH = 2 ** 21  # 2M tokens: longer than any context a model serves
FORMS = "a positive integer, uniform:A:B, lognormal:MEDIAN:SIGMA or a CSV file of length,count rows"


@dataclass(frozen=True, eq=False)
class Lengths:
    """A length distribution: distinct `values` (ascending) with probabilities `probs`."""

    values: np.ndarray
    probs: np.ndarray
    label: str

    @property
    def fixed(self) -> bool:
        return len(self.values) == 1

    @property
    def mean(self) -> float:
        return float(np.dot(self.values, self.probs))

    @property
    def max(self) -> int:
        return int(self.values[-1])

    def expect(self, f) -> float:
        """E[f(L)] for a numpy-vectorized f."""
        return float(np.dot(f(self.values.astype(float)), self.probs))

    def quantile(self, q: float) -> int:
        """The smallest length whose cumulative probability reaches q."""
        cdf = np.cumsum(self.probs)
        return int(self.values[min(int(np.searchsorted(cdf, q - 1e-12)), len(self.values) - 1)])

    def groups(self, n: int = PREFILL_GROUPS) -> list[tuple[int, float]]:
        """(length, probability) of at most n groups of equal probability (see the module docstring)."""
        if len(self.values) <= n:
            return [(int(v), float(p)) for v, p in zip(self.values, self.probs)]
        mid = np.cumsum(self.probs) - self.probs / 2  # each length goes to the group of its middle
        which = np.minimum((mid * n).astype(int), n - 1)
        out = []
        for g in range(n):
            sel = which == g
            p = float(self.probs[sel].sum())
            if p > 0:
                out.append((int(round(float(np.dot(self.values[sel], self.probs[sel])) / p)), p))
        return out

    def describe(self) -> str:
        if self.fixed:
            return f"{self.max:,}"
        return f"{self.label} (mean {self.mean:,.0f}, p99 {self.quantile(WORST_QUANTILE):,}, max {self.max:,})"


def fixed_length(n: int) -> Lengths:
    return Lengths(np.array([n], dtype=np.int64), np.array([1.0]), str(n))


def _from_weights(name: str, values, weights, label: str) -> Lengths:
    values, weights = np.asarray(values, dtype=np.int64), np.asarray(weights, dtype=float)
    keep = weights > 0
    if not keep.any():
        raise bad_value(name, label, "every count is 0")
    values, weights = values[keep], weights[keep]
    order = np.argsort(values)
    values, weights = values[order], weights[order]
    uniq, where = np.unique(values, return_inverse=True)
    summed = np.bincount(where, weights=weights)
    return Lengths(uniq, summed / summed.sum(), label)


def _lognormal(name: str, text: str, median: float, sigma: float) -> Lengths:
    if not (median >= 1 and sigma > 0 and math.isfinite(median) and math.isfinite(sigma)):
        raise bad_value(name, text, "lognormal needs MEDIAN >= 1 and SIGMA > 0")
    from scipy.special import ndtr, ndtri

    top = math.ceil(median * math.exp(sigma * float(ndtri(LOGNORMAL_TAIL))))
    if top > MAX_LENGTH:
        raise bad_value(name, text, f"its {LOGNORMAL_TAIL:.1%} quantile {top:,} is over {MAX_LENGTH:,} tokens")
    values = np.arange(1, top + 1)
    cdf = ndtr((np.log(values + 0.5) - math.log(median)) / sigma)  # F(L + 1/2)
    return _from_weights(name, values, np.diff(np.concatenate([[0.0], cdf])), text)


def _histogram(name: str, path: Path) -> Lengths:
    from flopsim.spec.reading import read_input_text

    try:
        text = read_input_text(path, "length histogram (CSV)")
    except FlopsimError as err:
        raise InputError(f"{name}: {err}") from None
    values, counts, header_allowed = [], [], True
    for i, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        cells = [c.strip() for c in line.split(",")]
        try:
            length, count = int(cells[0]), float(cells[1])
            ok = len(cells) == 2 and 1 <= length <= MAX_LENGTH and math.isfinite(count) and count >= 0
        except (ValueError, IndexError):
            if header_allowed:  # the first row may name the columns
                header_allowed = False
                continue
            ok = False
        header_allowed = False
        if not ok:
            raise bad_value(name, str(path), f"line {i} {line[:40]!r} is not length,count (a length 1..{MAX_LENGTH:,}, "
                                              f"a count >= 0)")
        values.append(length)
        counts.append(count)
    if not values:
        raise bad_value(name, str(path), "no length,count rows")
    return _from_weights(name, values, counts, path.name)


def parse_lengths(name: str, value) -> Lengths:
    """A Lengths from an int, a Lengths, or text in one of the forms of the module docstring."""
    if isinstance(value, Lengths):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if not 1 <= value <= MAX_LENGTH:
            raise bad_value(name, value, f"must be a length 1..{MAX_LENGTH:,}")
        return fixed_length(int(value))
    if not isinstance(value, (str, Path)):
        raise bad_value(name, value, f"expected {FORMS}")
    text = str(value).strip()
    if re.fullmatch(r"[0-9]+", text):
        return parse_lengths(name, int(text))
    number = r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)"
    if m := re.fullmatch(r"uniform:([0-9]+):([0-9]+)", text):
        a, b = int(m.group(1)), int(m.group(2))
        if not 1 <= a <= b <= MAX_LENGTH:
            raise bad_value(name, text, f"uniform:A:B needs 1 <= A <= B <= {MAX_LENGTH:,}")
        return _from_weights(name, np.arange(a, b + 1), np.ones(b - a + 1), text)
    if m := re.fullmatch(rf"lognormal:{number}:{number}", text):
        return _lognormal(name, text, float(m.group(1)), float(m.group(2)))
    if text and Path(text).exists():
        return _histogram(name, Path(text))
    raise bad_value(name, text, f"expected {FORMS}")


def mean_decode_context(prompt: Lengths, gen: Lengths) -> float:
    """E[T] = E[P] + E[G (G + 1)] / (2 E[G]): the mean KV length of a decode step in the
    steady state (module docstring)."""
    return prompt.mean + gen.expect(lambda g: g * (g + 1)) / (2 * gen.mean)


def total_quantile(prompt: Lengths, gen: Lengths, q: float = WORST_QUANTILE) -> int:
    """The q-quantile of P + G (independent): their probability mass functions convolved."""
    if prompt.fixed and gen.fixed:
        return prompt.max + gen.max
    p = np.zeros(prompt.max + 1)
    p[prompt.values] = prompt.probs
    g = np.zeros(gen.max + 1)
    g[gen.values] = gen.probs
    n = len(p) + len(g) - 1
    pmf = np.clip(np.fft.irfft(np.fft.rfft(p, n) * np.fft.rfft(g, n), n), 0, None)
    cdf = np.cumsum(pmf) / pmf.sum()
    return int(min(np.searchsorted(cdf, q - 1e-9), prompt.max + gen.max))
