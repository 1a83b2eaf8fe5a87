"""Expectations for conditional models at decode, where what a batch reads
is the union of what its tokens activate.

One formula serves them all (tokens choose independently and uniformly --
the balanced routing that load-balancing losses aim for):

    expected_distinct(pool, picks, draws) = pool * (1 - (1 - picks / pool) ** draws)

the expected number of distinct items of a pool of `pool` items touched by
`draws` independent draws of `picks` distinct items each (an item is missed
by one draw with probability 1 - picks/pool).
- MoE: experts loaded for n tokens with top-k of E:  expected_distinct(E, k, n)
  (Issue: E * (1 - (1 - k/E)^B)).
- Sparse FF: one active unit per block of N, d_ff / N blocks:
  (d_ff / N) * expected_distinct(N, 1, n) units read.
- MoD at decode: a routed block runs for a token with probability c (its
  capacity); its weights are read when any of n tokens runs it:
  expected_distinct(1, c, n) = 1 - (1 - c)^n. With a keep rate by position
  (`kept_among`), c is the rate at the new token's position and the cache
  holds the expected kept tokens among the earlier positions.
Tests check each against a numpy random-routing simulation.
"""

from __future__ import annotations


def expected_distinct(pool, picks, draws):
    """Expected distinct items of `pool` touched by `draws` draws of `picks` items (sympy or numbers)."""
    return pool * (1 - (1 - picks / pool) ** draws)


def kept_among(rates, bin_width, n):
    """Expected tokens kept among positions 0 .. n - 1 when position p is kept with the
    rate of its bin, bins of `bin_width` positions (the last bin extends to infinity):
    sum_j rates[j] * (positions of bin j below n). Kept at position n - 1 alone:
    kept_among(n) - kept_among(n - 1). Symbolic in n (sympy Min / Max)."""
    import sympy as sp

    last = len(rates) - 1
    total = sp.Integer(0)
    for j, rate in enumerate(rates):
        inside = sp.Max(0, n - j * bin_width)
        total += rate * (inside if j == last else sp.Min(inside, bin_width))
    return total
