"""Reference MoDE model (`family: mode`); see flopsim.families.mode.

staged: MoDE blocks are `flopsim.torchref.mod.RoutedBlock`s (router, optional
predictor, top-k of the sequence, attention among the kept tokens) whose FFN
is `flopsim.torchref.moe.MoEFFN` (registered as `block.{i}.moe`), run on the
kept tokens only.

integrated: MoDE blocks are dense `Block`s whose FFN is
`MoEFFN(noop_experts=1, capacity=...)`: a router over E experts plus a no-op
expert, C = ceil(capacity_factor * c * top_k * N / E) padded slots per real
expert (the same sympy expression flopsim counts), pairs routed to the
no-op expert or over capacity skipped.

Other blocks: an MoE FFN where (i + 1) % moe.every == 0, dense elsewhere.
"""

from __future__ import annotations

from torch import nn

from flopsim.families.mode import integrated_slots
from flopsim.families.mod import is_routed
from flopsim.families.moe import is_moe_layer
from flopsim.ops.primitives import Ctx
from flopsim.ops.symbols import Dims
from flopsim.torchref.mod import ModReference, RoutedBlock
from flopsim.torchref.model import Block
from flopsim.torchref.moe import MoEFFN


def build(spec) -> nn.Module:
    ctx = Ctx(spec=spec, phase="forward", dims=Dims.of(spec))

    def slots(tokens: int) -> int:
        return int(integrated_slots(ctx, tokens))

    def factory(spec, i):
        if is_routed(i, spec.mod.every):
            if spec.mode.variant == "staged":
                return RoutedBlock(spec, i, mlp=MoEFFN(spec, i))
            return Block(spec, i, mlp=MoEFFN(spec, i, noop_experts=1, capacity=slots))
        return Block(spec, i, mlp=MoEFFN(spec, i) if is_moe_layer(spec, i) else None)

    return ModReference(spec, block_factory=factory)
