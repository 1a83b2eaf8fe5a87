"""Multi-head latent attention (the spec's `mla` block; DeepSeek-V2, arXiv:2405.04434,
section 2.1; DeepSeek-V3, arXiv:2412.19437), the attention sub-block of any dense or MoE
model. Composes primitives only; ops are named `{prefix}.attn.*`, the module paths of
`flopsim.torchref.mla.LatentAttention`.

Symbols (the paper's): H heads, d_c = `kv_rank` (the KV latent), d_c' = `q_rank` (the
query latent; none: one projection), d_nope and d_rope (a query or key head's latent and
rotary parts, d_qk = d_nope + d_rope), d_v (a value head). Per token:
- queries: `q_a` (d_model -> d_c', the spec's bias), `q_norm` over d_c', `q_b`
  (d_c' -> H d_qk, no bias); without a query latent one `q` (d_model -> H d_qk);
- `kv_a` (d_model -> d_c + d_rope, the spec's bias): the latent and the one rotary key
  all heads share; `kv_norm` over the latent;
- `rope` on the H query rotary parts and the shared rotary key (H + 1 heads of d_rope);
- prefill and decode: `kv_cache` appends the normalised latent and the rotary key,
  d_c + d_rope values a token (the whole cache: no per-head keys or values are kept);
- `out` (H d_v -> d_model, the spec's bias).

Attention, two forms:
- expanded (train, forward, prefill; decode with `mla.decode: expanded`): `kv_b`
  (d_c -> H (d_nope + d_v), no bias) up-projects the latents of every key (in prefill and
  decode the earlier positions' latents are read from the cache); `k_cat` copies each
  head's key together with the shared rotary key into one [keys, H, d_qk] tensor and
  `q_cat` each query's latent and rotated parts into one (transformers' DeepSeek joins
  them the same way); attention over H heads with d_qk-wide queries and keys and
  d_v-wide values.
- absorbed (decode, the default, as FlashMLA and serving engines run it): kv_b's key
  half W_UK is folded into the query (`q_absorb`: per head d_nope -> d_c, a batched
  product), the query's latent and rotary parts are joined (`q_cat`), attention runs as
  one shared key/value head over the cached entries (keys d_c + d_rope wide, values the
  d_c latents, each entry read once), and kv_b's value half W_UV maps each head's
  d_c-wide output to d_v (`v_absorb`). The two products own kv_b's parameters there.
FLOPs follow torch's counters for the products (the attention's with separate query
and value widths, flopsim.ops.primitives.attention).
"""

from __future__ import annotations

from dataclasses import replace

from flopsim.ops.primitives import (
    Ctx,
    attention,
    broadcast_gradient,
    elementwise,
    gradient_sum,
    kv_cache_append,
    linear,
    norm,
    rope,
)


def attention_block(ctx: Ctx, i: int, *, batch, queries, keys, prefix: str, tags: dict | None = None) -> list:
    """The MLA sub-block of block i (see the module docstring); `dense.attention_block`
    calls it for a spec with an `mla` block."""
    spec, d = ctx.spec, ctx.dims
    p = f"{prefix}.attn"
    tokens = batch * queries
    ops = _queries(ctx, i, tokens=tokens, prefix=p, tags=tags)
    ops += linear(ctx, f"{p}.kv_a", layer=i, tokens=tokens, d_in=d.d_model, d_out=d.kv_rank + d.d_rope,
                  bias=spec.bias, tags=tags)
    ops += norm(ctx, f"{p}.kv_norm", layer=i, tokens=tokens, d=d.kv_rank)
    ops += rope(ctx, f"{p}.rope", layer=i, tokens=tokens, heads=d.heads, kv_heads=1, d_head=d.d_rope, module=p,
                positions=queries, tags=tags)
    if ctx.phase in ("prefill", "decode"):
        ops += kv_cache_append(ctx, f"{p}.kv_cache", layer=i, batch=batch, tokens=queries,
                               width=d.kv_rank + d.d_rope, module=p, tags=tags)
    if ctx.phase == "decode" and spec.mla.decode == "absorbed":
        ops += _absorbed(ctx, i, batch=batch, queries=queries, keys=keys, prefix=p, tags=tags)
    else:
        ops += _expanded(ctx, i, batch=batch, queries=queries, keys=keys, prefix=p, tags=tags)
    ops += linear(ctx, f"{p}.out", layer=i, tokens=tokens, d_in=d.heads * d.d_v, d_out=d.d_model,
                  bias=spec.bias, tags=tags)
    # x feeds the query and the KV paths: autograd sums its two gradients
    ops += gradient_sum(ctx, f"{p}.grad_sum", layer=i, elements=tokens * d.d_model, module=p, tags=tags)
    return ops


def _queries(ctx: Ctx, i: int, *, tokens, prefix: str, tags) -> list:
    spec, d = ctx.spec, ctx.dims
    width = d.heads * (d.d_nope + d.d_rope)
    if spec.mla.q_rank is None:
        return linear(ctx, f"{prefix}.q", layer=i, tokens=tokens, d_in=d.d_model, d_out=width, bias=False,
                      tags=tags)
    ops = linear(ctx, f"{prefix}.q_a", layer=i, tokens=tokens, d_in=d.d_model, d_out=d.q_rank, bias=spec.bias,
                 tags=tags)
    ops += norm(ctx, f"{prefix}.q_norm", layer=i, tokens=tokens, d=d.q_rank)
    ops += linear(ctx, f"{prefix}.q_b", layer=i, tokens=tokens, d_in=d.q_rank, d_out=width, bias=False, tags=tags)
    return ops


def _from_cache(ctx: Ctx, op, cached_fraction):
    """The forward op with `cached_fraction` of its activation reads taken from the KV cache
    (in the cache's precision)."""
    if op.pass_ != "fwd":
        return op
    moved = op.act_read_bytes * cached_fraction
    return replace(op, act_read_bytes=op.act_read_bytes - moved,
                   kv_read_bytes=op.kv_read_bytes + moved / ctx.w * ctx.w_kv)


def _expanded(ctx: Ctx, i: int, *, batch, queries, keys, prefix: str, tags) -> list:
    """Up-project every key's latent, join the rotary key, attend (module docstring)."""
    spec, d, w = ctx.spec, ctx.dims, ctx.w
    H = d.heads
    cached = (keys - queries) / keys  # the earlier positions' share of the keys, read from the cache
    up = linear(ctx, f"{prefix}.kv_b", layer=i, tokens=batch * keys, d_in=d.kv_rank,
                d_out=H * (d.d_nope + d.d_v), bias=False, tags=tags)
    ops = [_from_cache(ctx, op, cached) for op in up]
    # the keys' latent parts (from kv_b) and the shared rotary key, copied into [keys, H, d_qk]
    # (the earlier positions' rotary keys are read from the cache). A concatenation's backward
    # is views of the gradient, but the shared rotary key's is the sum over the heads' copies.
    cat = elementwise(ctx, f"{prefix}.k_cat", layer=i, elements=batch * keys * H * (d.d_nope + d.d_rope),
                      op="copy", module=prefix, backward=False, tags=tags)
    ops += [replace(cat[0], act_read_bytes=batch * (keys * H * d.d_nope + queries * d.d_rope) * w,
                    kv_read_bytes=batch * (keys - queries) * d.d_rope * ctx.w_kv)]
    ops += broadcast_gradient(ctx, f"{prefix}.k_rot_grad", layer=i, elements=batch * keys * d.d_rope, copies=H,
                              module=prefix, tags=tags)
    # each query's latent part and its rotated part joined (transformers' DeepSeek does the same)
    ops += elementwise(ctx, f"{prefix}.q_cat", layer=i, elements=batch * queries * H * (d.d_nope + d.d_rope),
                       op="copy", module=prefix, backward=False, tags=tags)
    ops += attention(ctx, f"{prefix}.core", layer=i, batch=batch, queries=queries, keys=keys, heads=H,
                     kv_heads=H, d_head=d.d_nope + d.d_rope, d_v=d.d_v, causal=spec.causal,
                     kv_from_cache=False, module=prefix, tags=tags)
    return ops


def _absorbed(ctx: Ctx, i: int, *, batch, queries, keys, prefix: str, tags) -> list:
    """W_UK folded into the query, attention over the cached latents, W_UV on the output."""
    spec, d = ctx.spec, ctx.dims
    H = d.heads
    tokens = batch * queries
    ops = linear(ctx, f"{prefix}.q_absorb", layer=i, tokens=tokens, d_in=d.d_nope, d_out=d.kv_rank, batch=H,
                 bias=False, module=prefix, tags=tags)
    ops += elementwise(ctx, f"{prefix}.q_cat", layer=i, elements=tokens * H * (d.kv_rank + d.d_rope), op="copy",
                       module=prefix, tags=tags)
    ops += attention(ctx, f"{prefix}.core", layer=i, batch=batch, queries=queries, keys=keys, heads=H,
                     kv_heads=1, d_head=d.kv_rank + d.d_rope, d_v=d.kv_rank, kv_width=d.kv_rank + d.d_rope,
                     causal=spec.causal, kv_from_cache=True, module=prefix, tags=tags)
    ops += linear(ctx, f"{prefix}.v_absorb", layer=i, tokens=tokens, d_in=d.kv_rank, d_out=d.d_v, batch=H,
                  bias=False, module=prefix, tags=tags)
    return ops
