"""Mixture-of-Depths decode with a keep rate by position (`mod.keep_by_position`): the
expected cache length and the chance the new token runs a routed block follow the
profile, checked against a numpy simulation that draws each position's decision; a
one-bin profile is the plain capacity, symbolically; bad input is one line."""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp

from flopsim.count import count, formula
from flopsim.errors import SpecError
from flopsim.families.mod import decode_keep
from flopsim.ops.expectations import kept_among
from flopsim.ops.primitives import Ctx
from flopsim.ops.symbols import Dims, T
from flopsim.spec import load_model

PROFILE = [0.5, 0.25, 0.125, 0.0625]  # rates of 4 bins of 512 positions (max_seq 2048)


def profiled(rates=PROFILE):
    return load_model("decoder-220m-mod").with_changes(mod={"keep_by_position": rates})


def simulate(rates, width, context, draws=200_000, seed=0):
    """(mean tokens kept among positions 0 .. context - 2, share of draws keeping position
    context - 1): each position kept independently with its bin's rate."""
    rng = np.random.default_rng(seed)
    positions = np.arange(context)
    p = np.asarray(rates)[np.minimum(positions // width, len(rates) - 1)]
    kept = rng.random((draws, context)) < p
    return kept[:, :-1].sum(axis=1).mean(), kept[:, -1].mean()


@pytest.mark.parametrize("context", [2, 300, 512, 513, 1500, 2048, 3000])
def test_expectations_match_a_simulation(context):
    spec = profiled()
    ctx = Ctx(spec=spec, phase="decode", dims=Dims.of(spec))
    run, cached = (float(sp.sympify(e).subs(T, context)) for e in decode_keep(ctx, T))
    sim_cached, sim_run = simulate(PROFILE, 512, context)
    assert cached == pytest.approx(sim_cached, rel=0.02, abs=0.02)
    assert run == pytest.approx(sim_run, rel=0.02, abs=0.005)
    # and exactly: the rate of position context - 1's bin, the sum of the earlier positions' rates
    rate = PROFILE[min((context - 1) // 512, 3)]
    assert run == rate
    assert cached == sum(PROFILE[min(q // 512, 3)] for q in range(context - 1))


def test_routed_block_decode_follows_the_profile():
    """A routed block's attention at decode: c_run * B rows attend to 1 + cached keys, its KV
    cache read bytes B * c_run * (1 + cached) * 2 * d_model * 2 bytes."""
    spec = profiled()
    b, t = 8, 1000
    run = PROFILE[(t - 1) // 512]
    cached = sum(PROFILE[min(q // 512, 3)] for q in range(t - 1))
    ops = {op.name: op for op in count(spec, phase="decode", batch=b, context=t).ops}
    core = ops["block.1.attn.core"]  # block 1 is routed (every 2)
    assert core.kv_read_bytes == pytest.approx(b * run * (1 + cached) * 2 * spec.d_model * 2, rel=1e-12)
    assert ops["block.0.attn.core"].kv_read_bytes == b * t * 2 * spec.d_model * 2  # a dense block


def test_one_bin_is_the_capacity_symbolically():
    base = load_model("decoder-220m-mod")
    one = base.with_changes(mod={"keep_by_position": [base.mod.capacity]})
    assert sp.simplify(formula(one, phase="decode") - formula(base, phase="decode")) == 0


def test_kept_among_is_linear_within_bins_and_flat_past_zero():
    assert kept_among([sp.Rational(1, 2)], 4, 0) == 0
    assert kept_among([sp.Rational(1, 2), 1], 4, 6) == sp.Rational(1, 2) * 4 + 2


@pytest.mark.parametrize("changes, expect", [
    (dict(mod={"keep_by_position": [0.5, 0.25, 0.1]}), "3 bins do not divide max_seq 2048"),
    (dict(mod={"keep_by_position": [1.5]}), "mod.keep_by_position"),
    (dict(mod={"keep_by_position": []}), "at least one keep rate"),
])
def test_bad_profile_is_one_line(changes, expect):
    with pytest.raises(SpecError) as err:
        load_model("decoder-220m-mod").with_changes(**changes)
    assert expect in str(err.value) and "\n" not in str(err.value)


def test_mode_refuses_a_profile():
    with pytest.raises(SpecError, match="modelled for family mod"):
        load_model("decoder-220m-mode").with_changes(mod={"keep_by_position": [0.5, 0.25]})
