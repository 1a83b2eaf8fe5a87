"""Skewed routing: expert popularity and the expectations that follow from it.

A trained router does not spread tokens evenly: some experts are chosen
far more often than others. flopsim describes that by `moe.popularity`:
uniform (the default, what load-balancing losses aim for), Zipf with an
exponent s (the expert of popularity rank r gets a share proportional to
r^-s; ranks are listed most popular first), or a measured histogram (the
(token, expert) pairs each expert received, in expert-id order).

Model. A token's top-k is a set of k distinct experts; expert e is in it
with probability pi_e, independently across tokens, and sum_e pi_e = k. The
popularity gives each expert's share s_e of the routed pairs (sum s = 1);
pi_e = k * s_e, except that no pi can exceed 1 (a token picks an expert at
most once): experts at the cap keep pi = 1 and the rest share the remainder
in proportion to s (`inclusion`). Uniform routing gives pi_e = k / E.

What follows, for n tokens routed at once (n = B at decode):
- distinct experts read: sum_e 1 - (1 - pi_e)^n (`expected_distinct_experts`;
  uniform: E * (1 - (1 - k/E)^n), flopsim.ops.expectations);
- tokens per expert: L_e ~ Binomial(n, pi_e); (token, expert) pairs dropped
  at a capacity of C slots per expert: sum_e E[max(0, L_e - C)], the
  binomial tail summed exactly (`expected_dropped`);
- the busiest of R expert-parallel ranks, rank r holding the E / R experts
  [r E/R, (r+1) E/R) in the popularity's order (Megatron's layout): the
  step waits for it. Its load L_r = sum over its experts of L_e; with n
  large each L_r is close to Normal(n m_r, n v_r), m_r = sum pi_e,
  v_r = sum pi_e (1 - pi_e), and E[max_r L_r] = integral over x > 0 of
  1 - prod_r Phi((x - n m_r) / sqrt(n v_r)) dx, taking the ranks as
  independent (`expected_busiest_rank`); `imbalance` = that / the mean rank.
Each is checked against a numpy simulation that draws every token's k
experts (tests/test_popularity.py).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def shares(popularity, experts: int) -> np.ndarray:
    """Each expert's share of the routed pairs (sums to 1), from a spec's `moe.popularity` (None: uniform)."""
    if popularity is None or (popularity.zipf is None and popularity.histogram is None):
        return np.full(experts, 1.0 / experts)
    if popularity.zipf is not None:
        w = np.arange(1, experts + 1, dtype=float) ** -float(popularity.zipf)
    else:
        w = np.asarray(popularity.histogram, dtype=float)
    return w / w.sum()


def inclusion(share: Sequence[float], top_k: int) -> np.ndarray:
    """pi_e = k * s_e capped at 1, the excess spread over the uncapped experts in proportion to s."""
    s = np.asarray(share, dtype=float)
    pi = np.zeros_like(s)
    capped = np.zeros(len(s), dtype=bool)
    for _ in range(len(s)):
        left = top_k - capped.sum()
        free = ~capped
        pi[free] = left * s[free] / s[free].sum() if s[free].sum() > 0 else 0.0
        pi[capped] = 1.0
        over = free & (pi > 1.0)
        if not over.any():
            break
        capped |= over
    return np.minimum(pi, 1.0)


def grouped(pi: np.ndarray) -> list[tuple[int, float]]:
    """(count, pi) for each distinct inclusion probability: an expression needs one term per value."""
    values, counts = np.unique(np.round(pi, 15), return_counts=True)
    return [(int(c), float(v)) for v, c in zip(values, counts)]


def expected_distinct_experts(pi_groups: list[tuple[int, float]], tokens):
    """sum_e 1 - (1 - pi_e)^tokens over (count, pi) groups; `tokens` may be a sympy symbol."""
    return sum(count * (1 - (1 - p) ** tokens) for count, p in pi_groups)


def expected_dropped(pi: np.ndarray, tokens: int, slots: int) -> float:
    """Expected (token, expert) pairs over a capacity of `slots` per expert: sum_e E[max(0, L_e - slots)]."""
    from scipy.stats import binom

    total = 0.0
    load = np.arange(slots + 1, tokens + 1)
    for p in pi:
        if p <= 0:
            continue
        total += float(np.sum((load - slots) * binom.pmf(load, tokens, p)))
    return total


def rank_loads(pi: np.ndarray, ranks: int) -> tuple[np.ndarray, np.ndarray]:
    """Per expert-parallel rank (contiguous experts): the mean and variance of one token's pairs on it."""
    per = len(pi) // ranks
    blocks = pi[: per * ranks].reshape(ranks, per)
    return blocks.sum(axis=1), (blocks * (1 - blocks)).sum(axis=1)


def expected_busiest_rank(pi: np.ndarray, tokens: float, ranks: int) -> float:
    """E[max over ranks of the pairs a rank receives] for `tokens` tokens (normal approximation)."""
    from scipy.special import ndtr  # the standard normal's CDF (scipy.stats' norm.cdf, without its import cost)

    m, v = rank_loads(pi, ranks)
    mean, sd = tokens * m, np.sqrt(tokens * v)
    if not (sd > 0).any():
        return float(mean.max())
    hi = float((mean + 12 * np.maximum(sd, 1e-12)).max())
    x = np.linspace(0.0, hi, 20001)
    z = np.where(sd[:, None] > 0, (x[None, :] - mean[:, None]) / np.where(sd > 0, sd, 1.0)[:, None],
                 np.where(x[None, :] >= mean[:, None], np.inf, -np.inf))
    below = np.prod(ndtr(z), axis=0)  # P(every rank <= x)
    return float(np.trapezoid(1.0 - below, x))


def imbalance(pi: np.ndarray, tokens: float, ranks: int) -> float:
    """The busiest rank's expected pairs over the mean rank's (1 = balanced): what an expert-parallel step waits for."""
    if ranks <= 1:
        return 1.0
    mean = tokens * float(np.sum(pi)) / ranks
    return expected_busiest_rank(pi, tokens, ranks) / mean if mean > 0 else 1.0


def describe(popularity) -> str:
    """A short name for tables and notes."""
    if popularity is None or (popularity.zipf is None and popularity.histogram is None):
        return "uniform"
    if popularity.zipf is not None:
        return f"Zipf s={popularity.zipf:g}"
    return f"measured histogram ({len(popularity.histogram)} experts)"


def spec_inclusion(spec) -> Optional[np.ndarray]:
    """pi for a spec's MoE (None without one)."""
    moe = getattr(spec, "moe", None)
    if moe is None:
        return None
    return inclusion(shares(moe.popularity, moe.experts), moe.top_k)


def uniform(spec) -> bool:
    moe = getattr(spec, "moe", None)
    pop = getattr(moe, "popularity", None)
    return pop is None or (pop.zipf is None and pop.histogram is None)
