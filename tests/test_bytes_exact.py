"""flopsim's bytes and other_flops equal the bytes oracle (flopsim.torchref.bytes_check:
what the torch reference moves, under the stated kernel rules), per module and pass,
to the byte and the FLOP.

- the dense exactness grid (tests/test_dense_exact.py's configurations), every phase;
- a subset of each family's exactness grid covering its variants, in the phases
  where the model is exact: its expectations (MoD decode below capacity 1, dropless MoE decode, sparse
  FF inference on more than one token) are not realised counts, and sparse QKV is not
  in the oracle (docs/bytes.md, "What is not compared");
- where flopsim counts an expectation, the difference stays in the modules that read
  the expected weights.
"""

from __future__ import annotations

import pytest

import test_dense_exact as dense_grid
import test_family_length_reduction as lr_grid
import test_family_mod as mod_grid
import test_family_mode as mode_grid
import test_family_moe as moe_grid
import test_family_sparse_ff as sff_grid
from flopsim.torchref.bytes_check import compare_bytes


def assert_bytes_exact(spec, phase, batch, seq, context=None):
    cmp = compare_bytes(spec, phase, batch, seq, context)
    assert cmp.exact, cmp.describe()
    assert cmp.torch[("", "fwd")][0] > 0
    return cmp


@pytest.mark.parametrize("spec,phase,batch,seq", dense_grid.CASES)
def test_dense_grid_bytes_exact(spec, phase, batch, seq):
    assert_bytes_exact(spec, phase, batch, seq, seq + 3 if phase == "decode" else None)


def _named(grid, name):
    return next((spec, shape) for spec, shape in grid if spec.name == name)


# (family grid, config name, phases): each family's variants, in its exact phases
MOD = [("mod-c1/8-every2", ("forward", "train", "prefill")), ("mod-predictor-gated-gqa", ("train",)),
       ("mod-explicit-gqa-predictor", ("train", "prefill")), ("mod-encoder", ("forward", "train")),
       ("mod-c1-every1", ("train", "decode")),  # capacity 1: decode's selection, gathers and scatter exact
       ("mod-c1-predictor", ("decode",))]
MOE = [("moe-dropless-top2", ("forward", "train", "prefill")), ("moe-dropless-shared-bias", ("train",)),
       ("moe-dropless-shared-gate", ("forward", "train")),  # dropless decode reads expected experts
       ("moe-capacity-top2-gated", ("train", "decode")), ("moe-capacity-drops", ("train",)),
       ("moe-expert-choice-shared", ("train", "decode")), ("moe-dropless-explicit-attn", ("train",)),
       # the per-expert loop as it runs: its outputs joined, gradients joined and stacked
       ("moe-dropless-loop-bias", ("forward", "train")), ("moe-dropless-loop-gated", ("train", "prefill"))]
MODE = [(spec.name, ("train", "prefill")) for spec, _ in mode_grid.GRID[::4]]
SPARSE_FF = [("n8", ("train",)), ("gated-llama", ("train",)), ("explicit-attn", ("train",)),
             ("encoder-gated-n2", ("train",))]
SPARSE_FF_ONE_TOKEN = [("n8", "decode"), ("gated-llama", "decode"), ("encoder", "forward"), ("n1", "forward")]
LENGTH_REDUCTION = [("adapler-counts", ("forward", "train")), ("power-bert-gqa", ("forward", "train")),
                    ("decoder-ltp-rope-gated", ("train", "prefill")), ("tr-bert", ("forward",))]


def _family_cases():
    cases = []
    for grid, picks in ((mod_grid.GRID, MOD), (moe_grid.GRID, MOE), (mode_grid.GRID, MODE)):
        for name, phases in picks:
            spec, (b, s) = _named(grid, name)
            cases += [pytest.param(spec, phase, b, s, id=f"{name}-{phase}") for phase in phases]
    for module, picks in ((sff_grid, SPARSE_FF), (lr_grid, LENGTH_REDUCTION)):
        for name, phases in picks:
            _, changes, shapes = next(c for c in module.CONFIGS if c[0] == name)
            b, s = shapes[0]
            cases += [pytest.param(module.make(changes), phase, b, s, id=f"{name}-{phase}") for phase in phases]
    for name, phase in SPARSE_FF_ONE_TOKEN:  # one token: the expected union of units is the units
        _, changes, _ = next(c for c in sff_grid.CONFIGS if c[0] == name)
        cases.append(pytest.param(sff_grid.make(changes), phase, 1, 1 if phase == "forward" else 4,
                                  id=f"sparse-ff-{name}-{phase}-one-token"))
    return cases


@pytest.mark.parametrize("spec,phase,batch,seq", _family_cases())
def test_family_subset_bytes_exact(spec, phase, batch, seq):
    assert_bytes_exact(spec, phase, batch, seq, seq + 2 if phase == "decode" else None)


def test_family_subset_covers_each_family_and_phase():
    cases = _family_cases()
    families = {p.values[0].family for p in cases}
    assert families == {"mod", "moe", "mode", "sparse_ff", "length_reduction"}
    assert {p.values[1] for p in cases} == {"forward", "train", "prefill", "decode"}
    routings = {("dropless" if p.values[0].moe.capacity_factor is None else p.values[0].moe.routing)
                for p in cases if p.values[0].family == "moe"}
    assert routings == {"dropless", "token_choice", "expert_choice"}


def test_expected_expert_reads_differ_only_where_experts_are_read():
    """Dropless MoE decode: flopsim reads E(1 - (1 - k/E)^B) experts' weights, an
    expectation over the routing; the realised run differs, and only in the experts'
    products (and the modules holding them)."""
    spec, (b, s) = _named(moe_grid.GRID, "moe-dropless-top2")
    cmp = compare_bytes(spec, "decode", b, s, s + 2)
    assert cmp.mismatches and all(field == "bytes" for _, _, field, _, _ in cmp.mismatches), cmp.describe()
    diff = {path: t - f for path, _, _, t, f in cmp.mismatches}
    experts = {path: d for path, d in diff.items() if path.endswith((".experts.up", ".experts.down"))}
    for path, d in diff.items():  # every difference is the sum of the expert products' below it
        assert d == sum(v for q, v in experts.items() if path == "" or q == path or q.startswith(path + "."))


@pytest.mark.parametrize("ffn,activation", [("gated", "relu"), ("gated", "gelu"), ("gated", "gelu_tanh"),
                                            ("mlp", "relu"), ("mlp", "silu"), ("mlp", "gelu_tanh")])
def test_every_activation_bytes_exact(ffn, activation):
    """The activations the dense grid does not reach (it runs silu gated and gelu mlp)."""
    from conftest import tiny

    spec = tiny("llama-3-8b", kv_heads=2, layers=1, ffn=ffn, activation=activation)
    for phase in ("forward", "train"):
        assert_bytes_exact(spec, phase, 2, 5)


def _fp32_loss_cases():
    """The fp32 unfused loss (spec.loss_impl) on an LM head (tied and not), a class head,
    no head (the loss over the hidden units) and a MoE's head."""
    from conftest import tiny

    moe, (b, s) = _named(moe_grid.GRID, "moe-dropless-top2")
    return [pytest.param(tiny("gpt2-small", layers=1), 2, 5, id="lm-tied"),
            pytest.param(tiny("llama-3-8b", kv_heads=2, layers=1), 2, 5, id="lm-untied"),
            pytest.param(tiny("bert-base", layers=1, head="cls"), 3, 4, id="cls"),
            pytest.param(tiny("gpt2-small", layers=1, head="none"), 2, 3, id="no-head"),
            pytest.param(moe, b, s, id="moe")]


@pytest.mark.parametrize("spec,batch,seq", _fp32_loss_cases())
def test_fp32_unfused_loss_bytes_exact(spec, batch, seq):
    """Megatron's fp32 cross-entropy, one kernel per step (the reference runs the same
    steps as an autograd Function), to the byte and the FLOP, under `head.loss`."""
    cmp = assert_bytes_exact(spec.with_changes(loss_impl="fp32_unfused"), "train", batch, seq)
    assert cmp.torch[("head.loss", "fwd")][0] > 0 and cmp.torch[("head.loss", "bwd")][0] > 0
