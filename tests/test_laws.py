"""The scaling laws reproduce their papers' own tables and statements from their
coefficients, and each optimum is reported in the law's convention and in the
exact FLOPs of a concrete shape.

Sources (the numbers below are the papers', copied from them):
- Hoffmann et al. 2022 (arXiv 2203.15556): Table 2 (exponents a of N_opt ~ C^a
  per approach, 10th-90th percentile in brackets), Table 3 (approach 1's
  projections), Table A3 (approaches 2 and 3), sec. D.4 (approach 1 at 1e21
  FLOPs: 2.86B; Kaplan et al.: 4.68B), Figure 4's caption (approach 3 at the
  Gopher budget 5.76e23: 40B).
- Kaplan et al. 2020 (arXiv 2001.08361): N_opt = 1.3e9 (C_min / PF-day)^0.73.
- DeepSeek-AI 2024 (arXiv 2401.02954): eq. 4, M_opt = 0.1715 C^0.5243 and
  D_opt = 5.8316 C^0.4757, M = 72 n_layer d_model^2 + 6 n_layer d_model l_seq (eq. 2).
"""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from flopsim.cli import app
from flopsim.scaling import isoflop, load_law

GOPHER = 5.76e23
# (parameters, FLOPs, tokens)
TABLE_3 = [(400e6, 1.92e19, 8.0e9), (1e9, 1.21e20, 20.2e9), (10e9, 1.23e22, 205.1e9),
           (67e9, 5.76e23, 1.5e12), (175e9, 3.85e24, 3.7e12), (280e9, 9.90e24, 5.9e12),
           (520e9, 3.43e25, 11.0e12), (1e12, 1.27e26, 21.2e12), (10e12, 1.30e28, 216.2e12)]
TABLE_A3_APPROACH_2 = [(400e6, 1.84e19, 7.7e9), (1e9, 1.20e20, 20.0e9), (10e9, 1.32e22, 219.5e9),
                       (67e9, 6.88e23, 1.7e12), (175e9, 4.54e24, 4.3e12), (280e9, 1.18e25, 7.1e12),
                       (520e9, 4.19e25, 13.4e12), (1e12, 1.59e26, 26.5e12), (10e12, 1.75e28, 292.0e12)]


def cli_optimum(budget: float, law: str) -> dict:
    r = CliRunner().invoke(app, ["isoflop", "--budget", repr(budget), "--law", law, "--format", "json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.mark.parametrize("n, c, d", TABLE_3, ids=[f"{n:.3g}" for n, _, _ in TABLE_3])
def test_chinchilla_1_reproduces_table_3(n, c, d):
    """`flopsim isoflop --budget C --law chinchilla-1`: every row of Table 3 within 2% in
    parameters and tokens, except the 67B row's tokens: 6 x 67e9 x 1.5e12 = 6.03e23 is 4.7%
    above the row's own 5.76e23 FLOPs, so no allocation under C = 6 N D gives both."""
    out = cli_optimum(c, "chinchilla-1")
    assert out["params"] == pytest.approx(n, rel=0.02)
    if n == 67e9:
        assert 6 * n * d / c - 1 == pytest.approx(0.047, abs=0.001)  # the table's inconsistency
        assert out["tokens"] == pytest.approx(c / (6 * out["params"]), rel=1e-12)
    else:
        assert out["tokens"] == pytest.approx(d, rel=0.02)


def test_chinchilla_1_and_2_exponents_and_the_papers_other_statement():
    """The power laws through Tables 3 and A3 have exponents inside Table 2's intervals
    (approach 1: 0.50 (0.488, 0.502); approach 2: 0.49 (0.462, 0.534)), and approach 1
    gives sec. D.4's 2.86B at 1e21 FLOPs, a point that is not in Table 3."""
    one, two = load_law("chinchilla-1"), load_law("chinchilla-2")
    assert 0.488 < one.exponent < 0.502 and round(one.exponent, 2) == 0.50
    assert 0.462 < two.exponent < 0.534 and round(two.exponent, 2) == 0.49
    assert one.optimum(1e21)[0] == pytest.approx(2.86e9, rel=0.005)


@pytest.mark.parametrize("n, c, d", TABLE_A3_APPROACH_2, ids=[f"{n:.3g}" for n, _, _ in TABLE_A3_APPROACH_2])
def test_chinchilla_2_reproduces_table_a3(n, c, d):
    """Table A3's approach-2 rows within 2%; its 67B row lies 3.3% off the line of the
    other eight (6 N D = 6.83e23 matches its FLOPs, so the row is consistent in itself)."""
    params, tokens = load_law("chinchilla-2").optimum(c)
    if n == 67e9:
        assert params / n - 1 == pytest.approx(0.033, abs=0.002)
    else:
        assert params == pytest.approx(n, rel=0.02) and tokens == pytest.approx(d, rel=0.02)


def test_chinchilla_3_is_the_fit_that_reproduces_the_papers_projections():
    """Approach 3 in closed form (eq. 4: N_opt = G (C/6)^a, G = (alpha A / (beta B))^(1/(alpha+beta)),
    a = beta / (alpha + beta)): the fit before rounding gives Figure 4's 40B at the Gopher budget
    and Table A3's 67B at 1.71e24 FLOPs, and a = 0.4565 (Table 2: 0.46); the printed, rounded
    coefficients put the Gopher optimum at 32B."""
    law = load_law("chinchilla")
    assert law.name == "chinchilla-3"
    a = law.beta / (law.alpha + law.beta)
    assert round(a, 2) == 0.46
    G = (law.alpha * law.A / (law.beta * law.B)) ** (1 / (law.alpha + law.beta))
    assert law.optimum(GOPHER)[0] == pytest.approx(G * (GOPHER / 6) ** a, rel=1e-12)
    assert law.optimum(GOPHER)[0] == pytest.approx(40e9, rel=0.02)
    assert law.optimum(1.71e24)[0] == pytest.approx(67e9, rel=0.02)
    printed = load_law("chinchilla-3-printed").optimum(GOPHER)[0]
    alpha, beta, A, B = 0.34, 0.28, 406.4, 410.7  # eq. 10 as printed
    G_printed = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    assert printed == pytest.approx(G_printed * (GOPHER / 6) ** (beta / (alpha + beta)), rel=1e-12)
    assert printed == pytest.approx(32.2e9, rel=0.01)  # 20% below the paper's own 40B


def test_kaplan_gives_the_allocation_hoffmann_et_al_quote():
    """Kaplan et al.: N_opt = 1.3e9 (C_min / PF-day)^0.73 non-embedding parameters, with C = 2 C_min
    at the critical batch size; at 1e21 FLOPs: C_min = 1e21 / 2 / 8.64e19 = 5.79 PF-days, N_opt =
    4.68B, as Hoffmann et al. sec. D.4 states. D_opt = C / (6 N_opt) in the law's convention."""
    law = load_law("kaplan")
    n, d = law.optimum(1e21)
    assert n == pytest.approx(1.3e9 * (1e21 / 2 / 8.64e19) ** 0.73, rel=1e-12)
    assert n == pytest.approx(4.68e9, rel=0.005)
    assert 6 * n * d == pytest.approx(1e21, rel=1e-12)
    assert law.params_kind == "non_embedding"


def test_the_optimum_is_given_in_the_law_convention_and_in_a_shapes_exact_flops():
    """Each optimum names the nearest ladder shape with its exact training FLOPs per token
    (flopsim's count of a train step / seq) and how far the law's convention (6N, N counted
    as the law counts it) is from them: gap = 6 N / exact - 1."""
    from flopsim.count import count

    r = isoflop(1e21, law="chinchilla-1")
    o = r.primary
    assert o.loss is None and o.law_optimum == pytest.approx(load_law("chinchilla-1").optimum(1e21))
    shape = o.shape
    exact = count(shape.spec, batch=1, seq=r.seq, phase="train").flops / r.seq
    assert shape.flops_per_token == pytest.approx(float(exact), rel=1e-12)
    assert o.convention_gap == pytest.approx(6 * shape.params / float(exact) - 1, rel=1e-12)
    assert o.convention_gap < 0  # 6N leaves out attention over the sequence
    assert o.shape_tokens == pytest.approx(1e21 / float(exact), rel=1e-12)
    kaplan = isoflop(1e21, law="kaplan").primary  # non-embedding N: the head's FLOPs are left out too
    assert kaplan.convention_gap < o.convention_gap


def test_a_budget_far_outside_the_fitted_range_is_flagged():
    """Hoffmann et al.'s runs reach 6 x 16B x 500B = 4.8e22 FLOPs: Table 3's last row (1.3e28)
    is a 270,000x extrapolation and says so; a budget inside the range gives no warning."""
    far = isoflop(1.3e28, law="chinchilla-1", ladder=None, families=["dense"])
    assert any("extrapolation" in w and "4.8e+22" in w for w in far.warnings)
    assert not any("extrapolation" in w for w in isoflop(1e20, law="chinchilla-1").warnings)
    assert math.isclose(load_law("kaplan").fitted_flops[1], 6 * 1.5e9 * 2.5e5 * 2 ** 19, rel_tol=0.02)


def test_deepseek_allocates_flops_per_token_as_its_paper_states():
    """DeepSeek's model size M is non-embedding FLOPs per token and C = M D: the law's
    D_opt = C / M_opt equals eq. 4's own 5.8316 C^0.4757 (0.1715 x 5.8316 = 1.0001), and a
    ladder shape's M is eq. 2 (72 n_layer d_model^2 + 6 n_layer d_model l_seq) where its
    blocks hold 12 d_model^2 parameters each."""
    law = load_law("deepseek")
    for c in (1e17, 3e20, 1e24):
        m, d = law.optimum(c)
        assert m == pytest.approx(0.1715 * c ** 0.5243, rel=1e-12)
        assert d == pytest.approx(5.8316 * c ** 0.4757, rel=2e-4) and m * d == pytest.approx(c, rel=1e-12)
    o = isoflop(1e20, law="deepseek").primary
    shape = o.shape
    assert shape.law_params("flops_per_token") == pytest.approx(
        6 * shape.params_non_embedding + 6 * shape.layers * shape.d_model * shape.seq, rel=1e-12)
    per_block = shape.params_non_embedding / shape.layers
    if per_block == pytest.approx(12 * shape.d_model ** 2, rel=0.01):  # the paper's block
        eq2 = 72 * shape.layers * shape.d_model ** 2 + 6 * shape.layers * shape.d_model * shape.seq
        assert shape.law_params("flops_per_token") == pytest.approx(eq2, rel=0.01)
    assert o.convention_gap == pytest.approx(shape.law_params("flops_per_token") / shape.flops_per_token - 1)
    assert not isoflop(1e20, law="deepseek").warnings and isoflop(1e23, law="deepseek").warnings
