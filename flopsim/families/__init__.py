"""Families: each composes the primitives in `flopsim.ops.primitives` into
one Op list per model and phase, and writes no formula of its own.

`build_ops(spec, phase)` is the entry point every consumer uses. Each family
module exposes `build(ctx) -> list[Op]` returning the ops in forward order
(with each op's backward op right after it in `train`); this function moves
the backward ops after all forward ones, in reverse, as autograd runs them.
"""

from __future__ import annotations

import importlib
from functools import lru_cache

from flopsim.errors import InputError

# the ops, their context and sympy load with the first build (check_phase needs none of them)

PHASES = ("forward", "train", "prefill", "decode")

# family -> module implementing build(ctx)
FAMILY_MODULES = {
    "dense": "flopsim.families.dense",
    "mod": "flopsim.families.mod",
    "moe": "flopsim.families.moe",
    "mode": "flopsim.families.mode",
    "sparse_ff": "flopsim.families.sparse_ff",
    "length_reduction": "flopsim.families.length_reduction",
}


def check_phase(spec, phase: str) -> None:
    if phase not in PHASES:
        raise InputError(f"phase: {phase!r}: expected one of {', '.join(PHASES)}")
    if phase in ("prefill", "decode") and not spec.causal:
        raise InputError(f"phase: {phase!r}: {spec.name} is an encoder (causal: false); use forward or train")
    if phase == "train" and spec.quantized_weights:
        raise InputError(f"phase: 'train': {spec.name} stores its weights in {spec.weight_dtype} "
                         f"(precision.weights); training reads and updates {spec.dtype} weights")
    if phase in ("prefill", "decode") and spec.head == "cls":
        raise InputError(f"phase: {phase!r}: {spec.name} has a cls head; use forward or train")


def order_passes(ops: list) -> list:
    forward = [op for op in ops if op.pass_ == "fwd"]
    backward = [op for op in ops if op.pass_ == "bwd"]
    return forward + backward[::-1]


@lru_cache(maxsize=256)
def _build_cached(spec_json: str, phase: str, symbolic: bool) -> tuple:
    from flopsim.ops.primitives import Ctx
    from flopsim.ops.symbols import Dims
    from flopsim.spec.model import ModelSpec

    spec = ModelSpec.model_validate_json(spec_json)
    module = importlib.import_module(FAMILY_MODULES[spec.family])
    ctx = Ctx(spec=spec, phase=phase, dims=Dims.of(spec, symbolic=symbolic))
    return tuple(order_passes(module.build(ctx)))


def build_ops(spec, phase: str, symbolic: bool = False) -> list:
    """The model's ops for a phase, as sympy expressions of B, S, T (and the
    dimensions when `symbolic`)."""
    check_phase(spec, phase)
    return list(_build_cached(spec.model_dump_json(), phase, symbolic))
