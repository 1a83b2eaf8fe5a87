"""Mixture-of-Depths (Raposo et al. 2024, arXiv 2404.02258): `family: mod`.

Block i (0-based) is *routed* when (i + 1) % mod.every == 0; the others are
dense blocks (`flopsim.families.dense.block`). A routed block, in
forward / train / prefill (static top-k, shapes known in advance):

    router     r = x w            Linear(d_model, 1), no bias, on all B*S tokens
    predictor  p = MLP(sg(x))     d_model -> h -> 1 on all B*S tokens (h > 0 only)
    select     topk(r, k)         k = ceil(c * S) per sequence (c = mod.capacity)
    order      sort(indices)      kept tokens stay in sequence order (causal attention)
    gather     x~ = x[idx], r~ = r[idx]
    block      f(x~)              norms, attention among the k kept tokens, FFN;
                                  f is the block's residual branch (attn + mlp
                                  outputs), its adds are the dense block's two adds
    scale      r~ * f(x~)         each kept row scaled by its router weight
    scatter    x'[idx] = x[idx] + r~ * f(x~)     (the add of x' = r f + x)

The mul and the scatter's add are `scale_add`'s two FLOPs per element, split
over the two kernels that run them; other tokens pass on the residual
untouched (no cost). In `train` the gradients run as autograd runs them: the
router's Linear backward has both products (grad-input, grad-weight), the
multiply by r is elementwise (0 FLOPs), topk / sort have no backward.

The router and the predictor (conventions chosen here, documented in the
tests):
- the router has no bias (r_i = w^T x_i, as in the paper);
- the sampling predictor, when `predictor_hidden` h > 0, is
  Linear(d_model, h, bias) -> activation -> Linear(h, 1, bias) on the
  detached (stop-gradient) block input, so in `train` its first Linear runs
  only its grad-weight product. It runs on every token in every phase, so
  a model's parameters and graph are the same in all phases; only its role
  changes: train -- fitted by a BCE loss to the router's top-k membership;
  forward / prefill -- evaluated beside the router (the top-k decides);
  decode -- it decides per token.
- with h = 0 the router decides at decode, and `train` fits it to the top-k
  membership with the paper's auxiliary BCE loss on the router logits.
  Either loss is elementwise (0 FLOPs); it is costed as a `loss` op (a
  binary cross-entropy reading the scores and the kept indices).

Bytes (each op one kernel as the reference runs it, checked by the bytes
oracle, docs/bytes.md): `select` writes only the top-k indices (the values
are not used), `order` sorts those int64 indices, `gather_positions` (RoPE
only) gathers the kept tokens' position ids; in train, `grad_sum` sums x's
three gradients (router, gather, scatter) and, without a predictor,
`router.grad_sum` the router scores' two (loss, gather).

prefill: the routed block's cache holds the kept tokens, so its attention
reads ceil(c * T) keys: the new k and a cached prefix of ceil(c * T) - k,
the rule applied once over the whole context (at T = S this is k). Rounding
the prefix and the new tokens separately would let a longer prompt at the
same T read fewer keys (S = 1, T = 2 at c = 0.5 would read 2, S = 2 only 1).

decode (one new token per sequence, per-token decisions). Expectation: a
routed block runs for a token with probability c = mod.capacity
(independently per token; a calibrated decider runs the fraction c the
router's top-k runs in training). Hence, per routed block:
- the router (and predictor) run on every token: B rows, not scaled;
- the block runs on the c*B tokens that chose it, in expectation: its ops
  are the dense block's primitives with batch c*B -- FLOPs, activation and
  KV bytes are linear in the batch, so this is c x the dense block's (by
  linearity of expectation), and the GEMM shapes carry the expected m = c*B
  rows the gathered kernel runs (what the roofline wants; `Op.scaled(c)`
  would give the same FLOPs but keep m = B);
- a routed block's KV cache holds only the tokens that ran it: of the T - 1
  earlier tokens c*(T - 1) in expectation, plus the new token itself (it
  runs the block), so attention reads 1 + c*(T - 1) keys (= T at c = 1,
  about c*T for long contexts);
- weights are read once if any of the B tokens runs the block: the dense
  block's weight bytes x expected_distinct(1, c, B) = 1 - (1 - c)^B;
- likewise the block's kernels launch only when some token runs it:
  Op.kernels = 1 - (1 - c)^B per op, so a skipped block costs no launch
  overhead (at B = 1 a block skipped with probability 1 - c launches c
  times per step in expectation).
- the decision and the data movement around the block, as an eager
  implementation runs them (the reference's kernels, bytes-exact at c = 1):
  `select` picks the running tokens among the B scores and `order` sorts
  them (every step); with probability p each, `cache_k` / `cache_v` copy the
  running sequences' 1 + c(T - 1) cached keys and values out of the batch's
  cache (advanced indexing; an encoder-decoder's `cross_cache_k` / `_v` its
  cross cache), `gather_positions` (RoPE) and `gather` their positions and
  hidden states, and after the block `gather_r`, `scale` and `scatter` add
  each running token's branch, scaled by its router score, back into its
  row. `mod.decode_cache: in_place` (an engine whose attention reads the
  running sequences' cache where it is: indexed or paged kernels) drops the
  cache copies.
- `mod.keep_by_position` (a measured profile, e.g. routers that keep early
  tokens more often): c becomes the profile's rate at the new token's
  position T - 1, and the cache holds the expected kept tokens among
  positions 0 .. T - 2, sum_p rate(p), instead of c (T - 1).

Encoder-decoders (`encoder_layers` > 0; flopsim.families.encoder_decoder):
MoD routes the causal decoder. The encoder's blocks are dense (it sees the
whole input; no top-k over its sequence); decoder block j (its index within
the decoder) is routed when (j + 1) % every == 0, with k = ceil(c * S) of the
decoder's S tokens, and as above in every phase. A routed block's
cross-attention runs for the kept tokens only: queries k (c * B tokens in
expectation at decode), keys all S_enc encoder outputs, projected (`cross.kv`)
for every sequence in forward / train / prefill; at decode the cross cache of
all B sequences is held (memory) and read by the running ones. Its residual
branch f = (a + c) + m (attention, cross-attention, FFN outputs) takes one
add beyond the dense block's three (x + a, x + a + c, and the last):
`branch_add`, a + c, forward and its gradient sum in backward (a feeds two
adds); at decode on the c * B running tokens, as the rest of their block.

Tags (per op, shown by `flopsim count`'s per-layer table): `routed`
(bool) and `tokens`: tokens per sequence that run the block (k in routed
blocks, c in expectation at decode; S, or 1 at decode, in dense blocks).
"""

from __future__ import annotations

from dataclasses import replace

import sympy as sp

from flopsim.families import dense
from flopsim.ops.expectations import expected_distinct, kept_among
from flopsim.ops.primitives import (
    INDEX_BYTES,
    Ctx,
    binary_cross_entropy,
    elementwise,
    gradient_sum,
    gather,
    linear,
    residual_add,
    scale_rows,
    scatter,
    sort_indices,
    topk,
)


def kept_tokens(capacity, seq) -> sp.Expr:
    """k = ceil(capacity * seq): tokens per sequence a routed block processes
    (exact: capacity is a sympy Rational; the torch reference calls this too)."""
    return sp.ceiling(capacity * seq)


def is_routed(i: int, every: int) -> bool:
    return (i + 1) % every == 0


def decider_loss(ctx: Ctx, i: int, *, tokens, kept, tags: dict) -> list:
    """train: the BCE fitting the decider (predictor, or the router when there is
    none) to the top-k membership of each token (`kept` indices). The router's
    scores also feed the gather of the kept tokens' weights, so without a predictor
    their two gradients are summed (charged here, their last user)."""
    if not ctx.train:
        return []
    predictor = ctx.dims.value("mod_predictor_hidden") > 0
    name = f"block.{i}.predictor" if predictor else f"block.{i}.router"
    ops = binary_cross_entropy(ctx, f"{name}.loss", layer=i, rows=tokens, picked=kept, module=f"block.{i}",
                               tags=tags)
    if not predictor:
        ops += gradient_sum(ctx, f"block.{i}.router.grad_sum", layer=i, elements=tokens, module=f"block.{i}",
                            tags=tags)
    return ops


def router(ctx: Ctx, i: int, *, tokens, tags: dict, d_out=1, name: str = "router") -> list:
    """The router Linear(d_model, d_out) (no bias) and, when predictor_hidden > 0,
    the sampling predictor on the detached input; both on `tokens` rows."""
    spec, d = ctx.spec, ctx.dims
    prefix = f"block.{i}"
    ops = linear(ctx, f"{prefix}.{name}", layer=i, tokens=tokens, d_in=d.d_model, d_out=d_out, bias=False,
                 kind="router", tags=tags)
    if ctx.dims.value("mod_predictor_hidden") > 0:
        h = d.mod_predictor_hidden
        p = f"{prefix}.predictor"
        ops += linear(ctx, f"{p}.up", layer=i, tokens=tokens, d_in=d.d_model, d_out=h, bias=spec.bias,
                      kind="router", input_grad=False, tags=tags)  # stop-gradient input
        ops += elementwise(ctx, f"{p}.act", layer=i, elements=tokens * h, op=spec.activation, module=p, tags=tags)
        ops += linear(ctx, f"{p}.down", layer=i, tokens=tokens, d_in=h, d_out=1, bias=spec.bias,
                      kind="router", tags=tags)
    return ops


def routed_block(ctx: Ctx, i: int, *, batch, queries, keys, ffn=None) -> list:
    """A routed block (see the module docstring); `ffn` replaces the block's MLP
    (MoDE: an MoE FFN among the kept tokens)."""
    d = ctx.dims
    c = d.mod_capacity
    prefix = f"block.{i}"
    if ctx.phase == "decode":
        c, cached = decode_keep(ctx, keys)
        tags = {"routed": True, "tokens": c * queries}
        ops = router(ctx, i, tokens=batch * queries, tags=tags)
        ops[-1] = replace(ops[-1], host_sync=True)  # which tokens run is read back (Op.host_sync)
        ops += decode_select(ctx, i, batch=batch, running=c * batch, tags=tags)
        running = decode_gather(ctx, i, running=c * batch, cached=cached, tags=tags)
        running += dense.block(ctx, i, batch=c * batch, queries=queries, keys=1 + cached, ffn=ffn, tags=tags)
        running += branch_add(ctx, i, tokens=c * batch * queries, tags=tags)
        running += decode_scatter(ctx, i, running=c * batch, tags=tags)
        p_any = expected_distinct(1, c, batch)
        return ops + [replace(op, weight_bytes=op.weight_bytes * p_any, kernels=op.kernels * p_any,
                              tags=_held_by_all(ctx, op.tags, batch)) for op in running]
    k = kept_tokens(c, queries)
    cached = k if ctx.phase != "prefill" else kept_tokens(c, keys)  # ceil(c * T), at least k
    tags = {"routed": True, "tokens": k}
    tokens = batch * queries
    ops = router(ctx, i, tokens=tokens, tags=tags)
    ops += topk(ctx, f"{prefix}.select", layer=i, rows=batch, n=queries, k=k, module=prefix, values=False,
                tags=tags)
    ops += sort_indices(ctx, f"{prefix}.order", layer=i, rows=batch, n=k, module=prefix, tags=tags)
    # torch.gather along the sequence (flopsim.torchref.mod)
    ops += gather(ctx, f"{prefix}.gather", layer=i, rows=batch * k, d=d.d_model, module=prefix, tags=tags,
                  variant="gather")
    ops += gather(ctx, f"{prefix}.gather_r", layer=i, rows=batch * k, d=1, module=prefix, tags=tags,
                  variant="gather")
    if ctx.spec.positions == "rope":  # the kept tokens' positions, for their rotary embedding
        ops += gather(ctx, f"{prefix}.gather_positions", layer=i, rows=batch * k, d=1, module=prefix,
                      value_bytes=INDEX_BYTES, tags=tags, variant="gather")[:1]
    ops += dense.block(ctx, i, batch=batch, queries=k, keys=cached, ffn=ffn, tags=tags)
    ops += branch_add(ctx, i, tokens=batch * k, tags=tags)
    ops += scale_rows(ctx, f"{prefix}.scale", layer=i, rows=batch * k, d=d.d_model, module=prefix, tags=tags)
    ops += scatter(ctx, f"{prefix}.scatter", layer=i, rows=batch * k, d=d.d_model, module=prefix, tags=tags)
    # x feeds the router, the gather and the scatter: autograd sums its three gradients
    ops += gradient_sum(ctx, f"{prefix}.grad_sum", layer=i, elements=tokens * d.d_model, count=2, module=prefix,
                        tags=tags)
    ops += decider_loss(ctx, i, tokens=tokens, kept=batch * k, tags=tags)
    return ops


def decode_select(ctx: Ctx, i: int, *, batch, running, tags: dict) -> list:
    """decode: which of the batch's tokens run the block, picked among the B scores and
    put in batch order (module docstring)."""
    prefix = f"block.{i}"
    return (topk(ctx, f"{prefix}.select", layer=i, rows=1, n=batch, k=running, module=prefix, values=False,
                 tags=tags)
            + sort_indices(ctx, f"{prefix}.order", layer=i, rows=1, n=running, module=prefix, tags=tags))


def decode_gather(ctx: Ctx, i: int, *, running, cached, tags: dict) -> list:
    """decode: the running sequences' inputs gathered out of the batch (advanced indexing,
    a copy each): their cached keys and values (the 1 + cached slots their attention
    reads; none with `mod.decode_cache: in_place`), an encoder-decoder's cross cache, their
    RoPE positions, their hidden states."""
    d, prefix = ctx.dims, f"block.{i}"
    slab = d.kv_heads * d.d_head  # one position's keys (or values) of one sequence
    caches = {"cache": slab * (1 + cached)} if ctx.spec.mod.decode_cache == "copy" else {}
    if caches and ctx.cross_keys is not None:
        caches["cross_cache"] = slab * ctx.cross_keys
    ops = [op for cache, width in caches.items() for name in ("k", "v")
           for op in gather(ctx, f"{prefix}.{cache}_{name}", layer=i, rows=running, d=width, value_bytes=ctx.w_kv,
                            module=prefix, tags=tags)]
    if ctx.spec.positions == "rope":
        ops += gather(ctx, f"{prefix}.gather_positions", layer=i, rows=running, d=1, value_bytes=INDEX_BYTES,
                      module=prefix, tags=tags)
    return ops + gather(ctx, f"{prefix}.gather", layer=i, rows=running, d=d.d_model, module=prefix, tags=tags)


def decode_scatter(ctx: Ctx, i: int, *, running, tags: dict) -> list:
    """decode: each running token's branch output scaled by its router score (gathered)
    and added back into its row of the batch."""
    d, prefix = ctx.dims, f"block.{i}"
    return (gather(ctx, f"{prefix}.gather_r", layer=i, rows=running, d=1, module=prefix, tags=tags)
            + scale_rows(ctx, f"{prefix}.scale", layer=i, rows=running, d=d.d_model, module=prefix, tags=tags)
            + scatter(ctx, f"{prefix}.scatter", layer=i, rows=running, d=d.d_model, module=prefix, tags=tags))


def branch_add(ctx: Ctx, i: int, *, tokens, tags: dict) -> list:
    """An encoder-decoder's routed decoder block: its branch f = (a + c) + m takes the add
    a + c beyond the dense block's three (module docstring); none elsewhere."""
    if ctx.cross_keys is None:
        return []
    return residual_add(ctx, f"block.{i}.branch_add", layer=i, elements=tokens * ctx.dims.d_model,
                        module=f"block.{i}", tags=tags)


def _held_by_all(ctx: Ctx, tags: dict, batch) -> dict:
    """decode: the cross-attention cache is held for every sequence, not only for the c*B
    tokens that read it this step (an encoder-decoder's routed decoder block)."""
    if "held_cache_bytes" not in tags:
        return tags
    return {**tags, "held_cache_bytes": dense.cross_cache_bytes(ctx, batch)}


def decode_keep(ctx: Ctx, keys):
    """(probability the new token runs a routed block, expected earlier tokens in its
    cache) at decode with `keys` = T: (c, c (T - 1)), or with `mod.keep_by_position` the
    profile's rate at position T - 1 and its expected kept tokens among positions
    0 .. T - 2 (flopsim.ops.expectations.kept_among)."""
    mod = ctx.spec.mod
    if mod.keep_by_position is None:
        c = ctx.dims.mod_capacity
        return c, c * (keys - 1)
    rates = [sp.Rational(str(r)) for r in mod.keep_by_position]
    width = ctx.spec.max_seq // len(rates)
    return kept_among(rates, width, keys) - kept_among(rates, width, keys - 1), kept_among(rates, width, keys - 1)


def dense_block(ctx: Ctx, i: int, *, batch, queries, keys, ffn=None) -> list:
    return dense.block(ctx, i, batch=batch, queries=queries, keys=keys, ffn=ffn,
                       tags={"routed": False, "tokens": queries})


def in_encoder(ctx: Ctx) -> bool:
    """An encoder-decoder's encoder block: dense (MoD routes the causal decoder)."""
    return ctx.spec.is_encoder_decoder and ctx.cross_keys is None


def build(ctx: Ctx) -> list:
    every = ctx.spec.mod.every

    def block_fn(ctx, i, *, batch, queries, keys):
        fn = routed_block if is_routed(i, every) and not in_encoder(ctx) else dense_block
        return fn(ctx, i, batch=batch, queries=queries, keys=keys)

    return dense.build(ctx, block_fn=block_fn)
