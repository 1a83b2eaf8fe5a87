"""Mixture-of-Depths-and-Experts (Raposo et al. 2024, section 3.6): `family: mode`.

Which blocks: block i is a MoDE block when (i + 1) % mod.every == 0
("routed"); a MoDE block always has an MoE FFN. The other blocks follow the
`moe` family: an MoE FFN when (i + 1) % moe.every == 0, a dense MLP
elsewhere.

`mode.variant: staged` -- MoD routing around the block, MoE inside it: the
MoD router's top-k = ceil(c * S) tokens per sequence (c = mod.capacity) run
the block (`flopsim.families.mod.routed_block`: router, optional predictor,
top-k, gather, attention among the kept tokens, scale, scatter) and the
block's FFN is the MoE FFN (`flopsim.families.moe.moe_ffn`) on those
N = B * k tokens: its routing, capacity factor and shared experts are the
spec's moe block, applied to the kept tokens. Tokens not kept skip attention
and FFN. decode: as MoD (the block runs for a token with probability c, on
c * B tokens in expectation, weights read with probability 1 - (1 - c)^B);
for a dropless MoE inside, a token that runs the block picks each expert
with probability k / E, so a given expert is read with probability
1 - (1 - c k / E)^B: expected_distinct(E, c * k, B) experts in all
(padded MoE variants run every expert whenever the block runs; their slots
are taken at the expected c * B running tokens, ceil(C_f * k * c * B / E) --
the ceiling of the expectation, not the expectation of the ceiling).

`mode.variant: integrated` -- one router over the E experts plus one no-op
expert (Linear(d_model, E + 1)); a (token, choice) routed to the no-op
expert skips the FFN. As in the paper, attention runs on every token (the
no-op expert sits "among the conventional MLP experts"; skipping attention
is what the staged variant buys). How many tokens run experts: capacity
based, per expert -- each of the E real experts runs

    C = ceil(capacity_factor * c * top_k * N / E)   slots  (N = B * S; decode N = B)

i.e. the moe capacity-factor rule (`moe.capacity_slots`) applied to the
fraction c of the N tokens that MoD lets through: room for c * top_k * N
(token, expert) passes in all (times the capacity factor's slack). Pairs
over capacity are dropped (they, like the no-op pairs, skip). The slots are
padded, so the work is static in every phase (decode included, where every
expert runs its C slots). It needs moe.capacity_factor (a dropless layer's
work would depend on the routing) and no MoD predictor (the router decides
per token, causally).

Tags: `routed`, `tokens` (tokens per sequence running attention) and the MoE
FFN's `experts`, `top_k`, `active_experts`, `slots`.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from flopsim.families import dense, mod
from flopsim.families.moe import capacity_slots, distinct_experts, is_moe_layer, moe_ffn
from flopsim.ops.expectations import expected_distinct
from flopsim.ops.primitives import Ctx
from flopsim.ops.symbols import B


def integrated_slots(ctx: Ctx, tokens):
    """Slots per real expert of an integrated MoDE FFN on `tokens` tokens."""
    return capacity_slots(ctx, ctx.dims.mod_capacity * tokens)


def integrated_ffn(ctx: Ctx, i: int, *, tokens, prefix: str, tags: dict | None = None) -> list:
    """The MoE FFN with one no-op expert and capacity-based slots (module docstring)."""
    return moe_ffn(ctx, i, tokens=tokens, prefix=prefix, tags=tags, noop_experts=1,
                   capacity=partial(integrated_slots, ctx))


def staged_ffn(ctx: Ctx, i: int, *, tokens, prefix: str, tags: dict | None = None) -> list:
    """The MoE FFN among a staged block's kept tokens. At decode (dropless), the
    expert reads are set conditional on the block running -- routed_block then
    multiplies every weight read by P(block runs) = expected_distinct(1, c, B) --
    so that the product is expected_distinct(E, c * k, B) experts read."""
    ops = moe_ffn(ctx, i, tokens=tokens, prefix=prefix, tags=tags)
    if ctx.phase != "decode" or ctx.spec.moe.capacity_factor is not None or ctx.spec.moe.routing != "token_choice":
        return ops
    d = ctx.dims
    read = distinct_experts(ctx, B, d.mod_capacity)  # experts read by the batch
    given_runs = read / expected_distinct(1, d.mod_capacity, B)
    experts = f"{prefix}.moe.experts."
    out = []
    for op in ops:
        if op.name.startswith(experts) and op.weight_bytes != 0:
            # moe_ffn read active_experts of E for `tokens` = c * B tokens; re-weigh
            op = replace(op, weight_bytes=op.weight_bytes / op.tags["active_experts"] * given_runs)
        out.append(replace(op, tags={**op.tags, "active_experts": read}))
    return out


def build(ctx: Ctx) -> list:
    spec = ctx.spec
    every, variant = spec.mod.every, spec.mode.variant

    def block_fn(ctx, i, *, batch, queries, keys):
        if not mod.is_routed(i, every):
            ffn = moe_ffn if is_moe_layer(spec, i) else None
            return mod.dense_block(ctx, i, batch=batch, queries=queries, keys=keys, ffn=ffn)
        if variant == "staged":
            return mod.routed_block(ctx, i, batch=batch, queries=queries, keys=keys, ffn=staged_ffn)
        return dense.block(ctx, i, batch=batch, queries=queries, keys=keys, ffn=integrated_ffn,
                           tags={"routed": True, "tokens": queries})

    return dense.build(ctx, block_fn=block_fn)
