"""Mixture-of-Experts (family `moe`): the dense transformer with an MoE FFN
in block i when i >= moe.first_dense and (i + 1) % moe.every == 0 (a dense MLP
elsewhere).

Composes primitives and `dense.mlp` only. `moe_ffn` is public (MoDE reuses
it); ops are named `{prefix}.moe.*`, the module paths of
`flopsim.torchref.moe.MoEFFN`.

Per MoE FFN on N tokens (N = B * S; decode N = B), E experts, top-k, hidden
d_expert (default d_ff), `ffn` mlp (up, down) or gated (gate_up, down):

- router: Linear(d_model, E), no bias, kind "router", on every token; a
  softmax over the E logits (router probabilities, also the combination
  weights), or a sigmoid per expert (`moe.gate: sigmoid`, DeepSeek-V3).
  DeepSeek's options (`router`): a selection bias, group-limited routing
  (`groups`, `top_groups`), the chosen weights normalised (`normalize`) and
  scaled (`scale`); the first `first_dense` blocks keep a dense MLP.
- token_choice, dropless (capacity_factor null): top-k of E per token; the
  N * k (token, expert) pairs are sorted by expert, gathered, run through
  their expert as a grouped GEMM (one product per expert on its own rows:
  N * k expert passes in all, whatever the routing), weighted and
  scatter-added back. The op is `linear(tokens=N*k/E, batch=E)`: the FLOPs
  are exactly 2 * N * k * d_in * d_out; the gemm shape is the expected one
  under uniform routing.
- token_choice with capacity_factor c: each expert runs
  C = ceil(c * k * N / E) padded slots as one batched product over
  [E, C, d] (bmm); tokens over capacity skip (Switch Transformer, Fedus et
  al. 2022). The slots are filled choice-major (every token's first choice
  before any second choice), a one-hot cumsum giving each pair its slot.
- expert_choice (Zhou et al. 2022): each expert picks its top C tokens of
  the batch by router probability, C = ceil(c * N / E) (c: capacity factor =
  average experts per token; c <= E so that C <= N), batched over
  [E, C, d]; the combination weight is the router probability of the pair.
  top_k plays no part (the `top_k` tag shows the spec's value).
- kernel loop (`moe.kernel: loop`): the grouped products as one matrix
  product per expert (a Python loop over weights stored stacked, [E, d_in,
  d_out], as eager code and the torch reference run them): the same FLOPs
  and bytes in the products, each launched `experts` times (Op.kernels),
  which sets the time of small decode steps; and the copies the loop makes
  around each projection (`<projection>.join`,
  primitives.expert_loop_copies): the experts' outputs joined, and in
  backward their input gradients joined and their weight gradients stacked
  into the parameter's.
- kernel gather (`moe.kernel: gather`, dropless token choice, inference):
  the pairs stay in token order (no sort); for each projection every pair
  indexes its expert's weight matrix into a copy and one batched
  matrix-vector product runs over the copies (gpt-fast's Mixtral):
  `primitives.gathered_experts`, whose weight reads are one expert matrix
  per pair (pairs * matrix bytes, not the distinct experts: a matrix is
  far larger than any cache) and whose copy is written and read again.
  At decode with B tokens this moves about 3 * B * k expert matrices where
  the grouped kernel reads E * (1 - (1 - k/E)^B). `gather_fused` (a compiler
  fuses the indexing into the product, as torch.compile does for gpt-fast)
  reads B * k expert matrices once, with no copy.
- shared experts: `shared_experts` dense experts of width d_expert fused as
  one MLP of width shared_experts * d_expert (DeepSeek-MoE, Qwen-MoE) on
  every token, added to the routed output. With `shared_expert_gate`
  (Qwen2-MoE) their rows are scaled by sigmoid(x W_g), W_g a d_model x 1
  product (`shared_gate`, a router-kind op), its sigmoid (`shared_gate_act`)
  and the row scaling (`shared_scale`).

Bytes of the 0-FLOP ops, each one kernel as the reference runs it (checked
by the bytes oracle, docs/bytes.md): top-k (`topk`; in train its backward
scatters the weights' gradients back); dropless: the N * k int64 expert ids
sorted (`sort`), each sorted pair's token (index // k, `rows`), the rows per
expert (`counts`, a bincount), the combination weights gathered into expert
order (`gather_weights`); capacity: the slot assignment (`positions`: reads
the pairs' experts and weights, writes the E * C slots' tokens and weights);
dispatch via `gather` (N * k rows dropless, E * C rows padded), the
weighting (`weight`, each row scaled by its weight), combine via `scatter`
into a zero-filled N x d_model output. In train, x's gradients (it feeds
the router, the dispatch, the shared experts and their gate) are summed (`grad_sum`).

Decode, dropless: the batch's n = B tokens read only the experts they
activate. Under uniform, independent routing (what load-balancing losses aim
for) the expected number of distinct experts is
    expected_distinct(E, k, n) = E * (1 - (1 - k / E) ** n)
(an expert is missed by one token with probability 1 - k/E), so expert
weight bytes = expected_distinct(E, k, B) x bytes per expert; FLOPs stay
exact (n * k expert passes). Padded variants (capacity, expert choice) run
every expert and read every expert's weights; other phases take every
expert as read (n = B * S tokens, for which the expectation is E to within
E * (1 - k/E) ** n).

Tags on every op of an MoE FFN: experts, top_k, active_experts (experts
whose weights are read, the expectation above in dropless decode), and
slots (C) for the padded variants.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

import sympy as sp

from flopsim.errors import InputError
from flopsim.families import dense
from flopsim.ops import popularity
from flopsim.ops.expectations import expected_distinct
from flopsim.ops.primitives import (
    Ctx,
    activation,
    bincount,
    elementwise,
    expert_loop_copies,
    gather,
    gathered_experts,
    gradient_sum,
    index_elementwise,
    linear,
    scale_rows,
    scatter,
    slot_assignment,
    sort_indices,
    topk,
)


def is_moe_layer(spec, i: int) -> bool:
    """Block i (0-based) has an MoE FFN when i >= moe.first_dense and (i + 1) % moe.every == 0."""
    return i >= spec.moe.first_dense and (i + 1) % spec.moe.every == 0


def capacity_slots(ctx: Ctx, tokens, *, routed_experts=None) -> Optional[sp.Expr]:
    """Slots per expert C for the spec's routing (None: dropless token choice).

    token_choice: ceil(capacity_factor * top_k * tokens / experts);
    expert_choice: ceil(capacity_factor * tokens / experts). `routed_experts`
    replaces `experts` in the denominator (MoDE's no-op expert counts)."""
    moe, d = ctx.spec.moe, ctx.dims
    if moe.capacity_factor is None:
        return None
    experts = d.experts if routed_experts is None else routed_experts
    if moe.routing == "expert_choice":
        return sp.ceiling(d.capacity_factor * tokens / experts)
    return sp.ceiling(d.capacity_factor * d.top_k * tokens / experts)


def moe_ffn(ctx: Ctx, i: int, *, tokens, prefix: str, tags: dict | None = None,
            noop_experts: int = 0, capacity: Optional[Callable] = None, name: str = "moe") -> list:
    """The MoE FFN of block i on `tokens` tokens (a drop-in `ffn` for `dense.block`).

    noop_experts: extra router outputs that run nothing (MoDE "integrated":
    a token routed there skips the FFN); the router is Linear(d_model,
    E + noop_experts) and top-k is taken over all of them. It needs padded
    slots (a capacity factor or `capacity`), since the work of a dropless
    layer would then depend on the routing; the default C divides by
    E + noop_experts.
    capacity: `capacity(tokens) -> slots per expert`, overriding the spec's
    capacity factor (padded token choice, or expert choice's C).
    name: the module name under `prefix` (`{prefix}.{name}.router`).
    """
    spec, d = ctx.spec, ctx.dims
    moe = spec.moe
    if moe is None:
        raise InputError(f"{spec.name}: moe_ffn needs a 'moe' block in the spec")
    p = f"{prefix}.{name}"
    E, k = d.experts, d.top_k
    d_expert = d.d_expert
    routed = E + noop_experts
    slots = capacity(tokens) if capacity is not None else capacity_slots(
        ctx, tokens, routed_experts=routed if noop_experts else None)
    if noop_experts and slots is None:
        raise InputError(f"moe: noop_experts {noop_experts} needs a capacity_factor (dropless work would "
                         f"depend on the routing)")
    dropless = slots is None
    decode_read = dropless and ctx.phase == "decode"
    active = distinct_experts(ctx, tokens) if decode_read else E
    moe_tags = {"experts": E, "top_k": k, "active_experts": active}
    if not dropless:
        moe_tags["slots"] = slots
    t = {**(tags or {}), **moe_tags}

    ops = router(ctx, p, i, tokens=tokens, routed=routed, tags=t)
    gathers = moe.kernel in ("gather", "gather_fused")
    if gathers and ctx.train:
        raise InputError(f"moe.kernel: {moe.kernel!r} is an inference kernel (each token indexes its experts' "
                         f"weights); train with kernel grouped")
    routing, (rows, expert_tokens, batch) = _routing(ctx, p, i, tokens=tokens, routed=routed, slots=slots, tags=t)
    ops += routing + _choice_weights(ctx, p, i, tokens=tokens, tags=t)
    ops += gather(ctx, f"{p}.dispatch", layer=i, rows=rows, d=d.d_model, module=p, tags=t)
    if gathers:  # the pairs in token order, each indexing its expert's weights
        ops += gathered_expert_mlp(ctx, i, pairs=rows, prefix=p, tags=t)
    else:
        expert_ops = dense.mlp(ctx, i, tokens=expert_tokens, prefix=p, d_ff=d_expert, name="experts",
                               batch=batch, tags=t, expert=True)
        if decode_read:
            expert_ops = [_expected_reads(op, E, active, tokens * k) for op in expert_ops]
        if moe.kernel == "loop" and dropless:  # one product per expert: E launches of each
            expert_ops = _per_expert_loop(ctx, expert_ops, experts=batch, rows=rows, tags=t)
        elif not dropless:  # padded slots [E, C, d]: one torch.bmm per projection, calibrated as one
            expert_ops = [replace(op, variant="bmm") if op.gemm is not None else op for op in expert_ops]
        ops += expert_ops
    if dropless and not gathers:  # the combination weights follow the pairs into expert order
        ops += gather(ctx, f"{p}.gather_weights", layer=i, rows=rows, d=1, module=p, tags=t)
    ops += scale_rows(ctx, f"{p}.weight", layer=i, rows=rows, d=d.d_model, module=p, tags=t)
    ops += scatter(ctx, f"{p}.combine", layer=i, rows=rows, d=d.d_model, module=p, into_zeros=True, tags=t)
    if moe.shared_experts:
        ops += dense.mlp(ctx, i, tokens=tokens, prefix=p, d_ff=d.shared_experts * d_expert, name="shared",
                         tags=t)
        if moe.shared_expert_gate:  # Qwen2-MoE: sigmoid(x W_g) scales the shared experts' rows
            ops += linear(ctx, f"{p}.shared_gate", layer=i, tokens=tokens, d_in=d.d_model, d_out=1, bias=False,
                          kind="router", tags=t)
            ops += elementwise(ctx, f"{p}.shared_gate_act", layer=i, elements=tokens, op="sigmoid", module=p,
                               tags=t)
            ops += scale_rows(ctx, f"{p}.shared_scale", layer=i, rows=tokens, d=d.d_model, module=p, tags=t)
        ops += elementwise(ctx, f"{p}.shared_add", layer=i, elements=tokens * d.d_model, op="add", inputs=2,
                           module=p, tags=t)
    # x feeds the router, the dispatch (and the shared experts): autograd sums its gradients,
    # charged to x's last user in forward (post-norm: the residual add, in the block)
    ops += gradient_sum(ctx, f"{p}.grad_sum", layer=i, elements=tokens * d.d_model,
                        count=1 + bool(moe.shared_experts) + moe.shared_expert_gate,
                        module=p if spec.norm_position == "pre" else prefix,
                        tags=t)
    return ops


def _per_expert_loop(ctx: Ctx, expert_ops: list, *, experts, rows, tags: dict) -> list:
    """`moe.kernel: loop`: each expert projection launched once per expert, followed by
    the copies the loop makes around it (`primitives.expert_loop_copies`)."""
    out = []
    for op in expert_ops:
        if op.gemm is None:
            out.append(op)
            continue
        out.append(replace(op, kernels=op.kernels * experts))
        if op.pass_ == ("bwd" if ctx.train else "fwd"):  # after the projection's last op; gemm (batch, m, n, k)
            out += expert_loop_copies(ctx, f"{op.name}.join", layer=op.layer, experts=experts, rows=rows,
                                      d_in=op.gemm[3], d_out=op.gemm[2], bias=ctx.spec.bias, module=op.module,
                                      tags=tags)
    return out


def router(ctx: Ctx, p: str, i: int, *, tokens, routed, tags: dict) -> list:
    """The router's product and its scores: a softmax over the experts, or a sigmoid per
    expert (`moe.gate`); with `moe.selection_bias` a per-expert bias added to the scores
    that choose (not to the weights); with `moe.groups` G > 1 each token's best
    `top_groups` groups are chosen first (a top-2 per group whose sum scores it under a
    sigmoid gate, DeepSeek-V3; its best score under a softmax, DeepSeek-V2), then the
    other groups' scores masked. The choice carries no gradient."""
    moe, d = ctx.spec.moe, ctx.dims
    ops = linear(ctx, f"{p}.router", layer=i, tokens=tokens, d_in=d.d_model, d_out=routed, bias=moe.router_bias,
                 kind="router", tags=tags)
    scores = tokens * routed
    if moe.gate == "softmax":
        ops += elementwise(ctx, f"{p}.softmax", layer=i, elements=scores, op="softmax", module=p, kind="softmax",
                           tags=tags)
    else:
        ops += elementwise(ctx, f"{p}.sigmoid", layer=i, elements=scores, op="sigmoid", module=p, tags=tags)
    if moe.selection_bias:
        ops += elementwise(ctx, f"{p}.selection_bias", layer=i, elements=scores, op="add", module=p,
                           backward=False, tags=tags)
    if moe.groups > 1:
        G = moe.groups
        per_group = 2 if moe.gate == "sigmoid" else 1
        ops += topk(ctx, f"{p}.group_scores", layer=i, rows=tokens * G, n=routed / G, k=per_group, module=p,
                    tags=tags)
        ops += topk(ctx, f"{p}.group_topk", layer=i, rows=tokens, n=G, k=moe.top_groups, module=p, values=False,
                    tags=tags)
        ops += elementwise(ctx, f"{p}.group_mask", layer=i, elements=scores, op="copy", module=p, backward=False,
                           tags=tags)
    return ops


def _choice_weights(ctx: Ctx, p: str, i: int, *, tokens, tags: dict) -> list:
    """The chosen experts' weights divided by their sum (`moe.normalize`) and multiplied by
    `moe.scale`, each one kernel over the N * k weights."""
    moe, d = ctx.spec.moe, ctx.dims
    weights = tokens * d.top_k
    ops = []
    if moe.normalize:
        ops += elementwise(ctx, f"{p}.normalize", layer=i, elements=weights, op="div", inputs=2, module=p,
                           tags=tags)
    if moe.scale != 1:
        ops += elementwise(ctx, f"{p}.scale", layer=i, elements=weights, op="mul", module=p, tags=tags)
    return ops


def _routing(ctx: Ctx, p: str, i: int, *, tokens, routed, slots, tags: dict):
    """The top-k and the bookkeeping that places rows for the experts; returns the ops
    and (rows dispatched, rows per expert, experts batched)."""
    d = ctx.dims
    E, k = d.experts, d.top_k
    if ctx.spec.moe.routing == "expert_choice":
        # each expert picks its top C tokens (a top-k along the token axis)
        ops = topk(ctx, f"{p}.topk", layer=i, rows=E, n=tokens, k=slots, module=p, backward=True, tags=tags)
        return ops, (E * slots, slots, E)
    ops = topk(ctx, f"{p}.topk", layer=i, rows=tokens, n=routed, k=k, module=p, backward=True, tags=tags)
    if slots is None and ctx.spec.moe.kernel in ("gather", "gather_fused"):
        return ops, (tokens * k, None, None)  # pairs stay in token order: no sort
    if slots is None:
        # sort the N*k (token, expert) pairs by expert for the grouped GEMM; each pair's token
        # (its index // k) and the rows per expert
        pairs = tokens * k
        ops += sort_indices(ctx, f"{p}.sort", layer=i, rows=1, n=pairs, module=p, tags=tags)
        ops += index_elementwise(ctx, f"{p}.rows", layer=i, elements=pairs, op="div", module=p, tags=tags)
        # the counts are read back to split the pairs by expert: the host waits here (Op.host_sync)
        ops += [replace(op, host_sync=True) for op in bincount(ctx, f"{p}.counts", layer=i, n=pairs, bins=E,
                                                                 module=p, tags=tags)]
        return ops, (pairs, pairs / E, E)
    # slot of each pair in its expert's buffer: cumsum of a one-hot
    ops += slot_assignment(ctx, f"{p}.positions", layer=i, pairs=tokens * k, slots=E * slots, routed=routed,
                           module=p, tags=tags)
    return ops, (E * slots, slots, E)


def gathered_expert_mlp(ctx: Ctx, i: int, *, pairs, prefix: str, tags: dict) -> list:
    """moe.kernel gather / gather_fused: each of the `pairs` (token, expert) pairs
    indexes its expert's weights and runs a matrix-vector product per projection
    (up, or gate and up fused; activation; down), as `dense.mlp` composes them."""
    spec, d = ctx.spec, ctx.dims
    p = f"{prefix}.experts"
    common = dict(layer=i, pairs=pairs, experts=d.experts, bias=spec.bias, tags=tags,
                  fused=spec.moe.kernel == "gather_fused")
    if spec.ffn == "gated":
        ops = gathered_experts(ctx, f"{p}.gate_up", d_in=d.d_model, d_out=2 * d.d_expert, **common)
    else:
        ops = gathered_experts(ctx, f"{p}.up", d_in=d.d_model, d_out=d.d_expert, **common)
    ops += activation(ctx, f"{p}.act", layer=i, elements=pairs * d.d_expert, gated=spec.ffn == "gated", module=p,
                      tags=tags)
    ops += gathered_experts(ctx, f"{p}.down", d_in=d.d_expert, d_out=d.d_model, **common)
    return ops


def distinct_experts(ctx: Ctx, tokens, run_probability=1):
    """Expected distinct experts `tokens` tokens read, each running the MoE with probability
    `run_probability`: expected_distinct(E, p k, n) under uniform routing, and under a skewed
    `moe.popularity` sum_e 1 - (1 - p pi_e)^n (flopsim.ops.popularity)."""
    d, moe = ctx.dims, ctx.spec.moe
    if popularity.uniform(ctx.spec):
        return expected_distinct(d.experts, run_probability * d.top_k, tokens)
    if not (sp.sympify(d.experts).is_number and sp.sympify(d.top_k).is_number):
        raise InputError("moe.popularity: experts and top_k cannot be varied with a skewed popularity "
                         "(it gives each expert its own probability)")
    pi = popularity.inclusion(popularity.shares(moe.popularity, int(d.experts)), int(d.top_k))
    groups = [(n, sp.Float(p, 17)) for n, p in popularity.grouped(pi)]
    return popularity.expected_distinct_experts([(n, run_probability * p) for n, p in groups], tokens)


def _expected_reads(op, experts, active, pairs):
    """A grouped-GEMM op of `experts` experts when only `active` are read (decode)."""
    if op.gemm is None:
        return op
    _, _, n, kk = op.gemm
    return replace(op, weight_bytes=op.weight_bytes / experts * active, gemm=(active, pairs / active, n, kk))


def block(ctx: Ctx, i: int, *, batch, queries, keys) -> list:
    ffn = moe_ffn if is_moe_layer(ctx.spec, i) else None
    return dense.block(ctx, i, batch=batch, queries=queries, keys=keys, ffn=ffn)


def build(ctx: Ctx) -> list:
    return dense.build(ctx, block_fn=block)
