"""Skewed routing (flopsim.ops.popularity): the expectations against a numpy
simulation that draws every token's k distinct experts with the model's
inclusion probabilities, within 2%; the spec field and its errors; the
decode reads and the training plan that use them."""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp
from conftest import one_error_line
from conftest import run_cli as run

import flopsim
from flopsim.ops import popularity as pop
from flopsim.spec import load_model

RNG_SEED = 20261126
CASES = [  # (experts, top_k, popularity)
    (8, 2, {"zipf": 0.5}), (8, 2, {"zipf": 1.0}), (8, 1, {"zipf": 1.5}), (64, 6, {"zipf": 1.0}),
    (16, 2, {"histogram": [50, 30, 20, 10, 8, 6, 5, 4, 3, 3, 2, 2, 1, 1, 1, 1]}), (8, 2, None),
]


def _popularity(experts, top_k, p):
    spec = load_model("mixtral-8x7b").with_changes(moe={"experts": experts, "top_k": top_k, "popularity": p})
    return spec, pop.spec_inclusion(spec)


def draw(pi: np.ndarray, tokens: int, trials: int, rng) -> np.ndarray:
    """[trials, tokens, E] 0/1: each token's k = sum(pi) distinct experts, expert e with probability
    pi_e (systematic sampling over a random order per token: exact marginals, k distinct)."""
    E, k = len(pi), int(round(pi.sum()))
    out = np.zeros((trials, tokens, E), dtype=np.int8)
    order = np.argsort(rng.random((trials, tokens, E)), axis=2)
    cum = np.cumsum(np.take_along_axis(np.broadcast_to(pi, (trials, tokens, E)), order, axis=2), axis=2)
    start = rng.random((trials, tokens, 1))
    for j in range(k):  # the unit interval's points start + j fall in the chosen experts' intervals
        pos = np.minimum((cum < start + j).sum(axis=2), E - 1)
        chosen = np.take_along_axis(order, pos[..., None], axis=2)[..., 0]
        np.put_along_axis(out, chosen[..., None], 1, axis=2)
    return out


def test_inclusion_probabilities():
    assert pop.inclusion(np.full(8, 1 / 8), 2) == pytest.approx(np.full(8, 2 / 8))
    for experts, top_k, p in CASES:
        _, pi = _popularity(experts, top_k, p)
        assert pi.sum() == pytest.approx(top_k) and pi.max() <= 1.0 and pi.min() >= 0
    pi = pop.inclusion(pop.shares(load_model("mixtral-8x7b").moe.model_copy(
        update={"popularity": flopsim.spec.model.Popularity(zipf=3.0)}).popularity, 8), 2)
    assert pi[0] == 1.0 and pi.sum() == pytest.approx(2)  # the top expert is capped, the rest share the remainder
    assert pi[1] / pi[2] == pytest.approx((3 / 2) ** 3.0)  # ranks 2 and 3 share the rest as r^-s


def test_the_sampler_has_the_model_marginals():
    rng = np.random.default_rng(RNG_SEED)
    _, pi = _popularity(16, 2, CASES[4][2])
    x = draw(pi, 1, 40000, rng)[:, 0, :]
    assert (x.sum(axis=1) == 2).all()
    assert x.mean(axis=0) == pytest.approx(pi, abs=0.01)


@pytest.mark.parametrize("experts, top_k, p", CASES)
def test_distinct_experts_match_a_simulation(experts, top_k, p):
    rng = np.random.default_rng(RNG_SEED)
    _, pi = _popularity(experts, top_k, p)
    groups = pop.grouped(pi)
    for tokens in (1, 4, 16, 64):
        simulated = draw(pi, tokens, 3000, rng).max(axis=1).sum(axis=1).mean()
        predicted = pop.expected_distinct_experts(groups, tokens)
        assert predicted == pytest.approx(simulated, rel=0.02), (tokens, predicted, simulated)
    if p is None:  # uniform: the closed form the MoE family has always used
        assert pop.expected_distinct_experts(groups, 5) == pytest.approx(experts * (1 - (1 - top_k / experts) ** 5))


@pytest.mark.parametrize("experts, top_k, p", [CASES[0], CASES[1], CASES[4]])
def test_dropped_pairs_match_a_simulation(experts, top_k, p):
    rng = np.random.default_rng(RNG_SEED)
    _, pi = _popularity(experts, top_k, p)
    tokens = 256
    loads = draw(pi, tokens, 1500, rng).sum(axis=1)  # [trials, E]
    for factor in (1.0, 1.25):
        slots = int(np.ceil(factor * top_k * tokens / experts))
        simulated = np.maximum(loads - slots, 0).sum(axis=1).mean()
        assert pop.expected_dropped(pi, tokens, slots) == pytest.approx(simulated, rel=0.02)


@pytest.mark.parametrize("experts, top_k, p, ranks", [
    (8, 2, None, 4), (8, 2, {"zipf": 0.5}, 4), (8, 2, {"zipf": 1.0}, 8), (64, 6, {"zipf": 1.0}, 8),
    (16, 2, CASES[4][2], 4)])
def test_busiest_rank_matches_a_simulation(experts, top_k, p, ranks):
    rng = np.random.default_rng(RNG_SEED)
    _, pi = _popularity(experts, top_k, p)
    tokens = 2048
    loads = draw(pi, tokens, 200, rng).sum(axis=1)  # [trials, E]
    per_rank = loads.reshape(len(loads), ranks, experts // ranks).sum(axis=2)
    simulated = per_rank.max(axis=1).mean()
    assert pop.expected_busiest_rank(pi, tokens, ranks) == pytest.approx(simulated, rel=0.02)
    assert pop.imbalance(pi, tokens, ranks) == pytest.approx(simulated / (tokens * top_k / ranks), rel=0.02)


def test_decode_reads_the_expected_distinct_experts():
    from flopsim.families import build_ops

    spec, pi = _popularity(8, 2, {"zipf": 1.0})
    B = 4
    pairs = [(a, b) for a, b in zip(build_ops(spec, "decode"), build_ops(load_model("mixtral-8x7b"), "decode"))
             if ".moe.experts." in a.name and a.gemm is not None]
    assert pairs
    ratio = pop.expected_distinct_experts(pop.grouped(pi), B) / (8 * (1 - (1 - 2 / 8) ** B))
    from flopsim.count import token_values

    values = token_values(spec, "decode", B, 512)
    for a, b in pairs:  # the same ops; weight bytes scale with the experts read
        assert a.flops == b.flops
        assert float(a.weight_bytes.subs(values)) == pytest.approx(float(b.weight_bytes.subs(values)) * ratio,
                                                                   rel=1e-9)
    skewed = flopsim.predict(spec, "h100-sxm", phase="decode", batch=B, seq=512)
    uniform = flopsim.predict("mixtral-8x7b", "h100-sxm", phase="decode", batch=B, seq=512)
    assert skewed.flops == uniform.flops and skewed.bytes < uniform.bytes  # fewer distinct experts read


def test_mode_decode_reads_with_the_run_probability():
    spec = load_model("decoder-220m-mode").with_changes(moe={"capacity_factor": None})  # dropless: reads vary
    skewed = spec.with_changes(moe={"popularity": {"zipf": 1.0}})
    from flopsim.families import build_ops

    from flopsim.count import token_values

    def active(s):
        routed = s.mod.every - 1  # the first MoD-routed block: its MoE runs for a token with probability c
        ops = [op for op in build_ops(s, "decode") if "active_experts" in op.tags and op.layer == routed]
        return float(sp.sympify(ops[0].tags["active_experts"]).subs(token_values(s, "decode", 8, 512)))

    c, k, E = spec.mod.capacity, spec.moe.top_k, spec.moe.experts
    assert active(spec) == pytest.approx(E * (1 - (1 - c * k / E) ** 8))
    pi = pop.spec_inclusion(skewed)
    assert active(skewed) == pytest.approx(sum(1 - (1 - c * p) ** 8 for p in pi))


def test_training_plan_waits_for_the_busiest_rank():
    from flopsim.planning import plan_training

    base = load_model("mixtral-8x7b")
    skewed = base.with_changes(moe={"popularity": {"zipf": 1.0}})
    kw = dict(gpus=64, tokens=1e12, tp=2, pp=2, ep=4, micro_batch=1, seq=4096)
    a, b = plan_training(base, "h100-sxm", **kw), plan_training(skewed, "h100-sxm", **kw)
    pi = pop.spec_inclusion(skewed)
    assert b.config["expert_imbalance"] == pytest.approx(pop.imbalance(pi, 4 * 4096, 4), rel=1e-12)
    assert a.config["expert_imbalance"] < 1.03 < b.config["expert_imbalance"]
    assert b.step_time_s > a.step_time_s and "busiest of 4 expert-parallel ranks" in " ".join(b.notes)
    cf = skewed.with_changes(moe={"capacity_factor": 1.0})
    c = plan_training(cf, "h100-sxm", **kw)
    assert c.config["expert_imbalance"] == 1.0  # padded slots: every rank does the same work
    slots = int(np.ceil(1.0 * 2 * 4096 / 8))
    assert c.config["dropped_fraction"] == pytest.approx(pop.expected_dropped(pi, 4096, slots) / (4096 * 2))


def test_spec_field_errors_and_histogram_file(tmp_path):
    spec = tmp_path / "m.yaml"
    base = "name: m\nfamily: moe\nlayers: 2\nd_model: 64\nheads: 4\nd_ff: 128\nvocab: 100\nmax_seq: 64\n"
    (tmp_path / "counts.txt").write_text("5, 3\n2 1\n")
    spec.write_text(base + "moe: {experts: 4, top_k: 2, popularity: {histogram: counts.txt}}\n")
    m = load_model(str(spec))
    assert m.moe.popularity.histogram == [5.0, 3.0, 2.0, 1.0]
    for bad, needle in (("{zipf: 1, histogram: [1, 1, 1, 1]}", "not both"), ("{histogram: [1, 1]}", "2 counts"),
                        ("{histogram: [0, 0, 0, 0]}", "every count is 0"), ("{zipf: -1}", "zipf"),
                        ("{histogram: [1, -1, 1, 1]}", "histogram"), ("{histogram: missing.txt}", "missing.txt")):
        spec.write_text(base + f"moe: {{experts: 4, top_k: 2, popularity: {bad}}}\n")
        line = one_error_line(run("count", spec))
        assert needle in line, line
    spec.write_text(base + "moe: {experts: 4, top_k: 2, popularity: {zipf: 1}}\n")
    line = one_error_line(run("sweep", spec, "-H", "h100-sxm", "--phase", "decode", "--seq", 32,
                              "--vary", "experts=4,8"))
    assert "popularity" in line
