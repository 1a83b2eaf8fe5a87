"""Scaling Transformers (Jaszczur et al. 2021, arXiv 2111.12763): sparse
feed-forward. Every block is the dense block with its FFN replaced; names
follow the torch reference (`flopsim.torchref.sparse_ff`).

Sparse FF, Y = act(x W1 (+ b1)) * Controller(x) W2 (+ b2); the controller is
low rank, logits = x C1 C2 (+ c), C1: d_model x d_lowrank (no bias, as trax's
m1), C2: d_lowrank x d_ff; the argmax in each of the d_ff / N blocks of N =
block_size units picks one active unit per block, d_ff / N per token.

- Inference (forward, prefill, decode): `mlp.controller.c1`, `.c2` (router
  products on every token), `mlp.controller.argmax` (top-1 of N in each
  block: int64 indices out), `mlp.units_arange`, `.units_offset`, `.units`
  (the index [n, d_ff / N] = argmax + arange(d_ff / N) * N; for a gated FFN
  also `mlp.units_up` (+ d_ff) and `mlp.units_cat`, the gate and up columns'
  index [n, 2 d_ff / N]), then `mlp.up`
  (`mlp.gate_up` for a gated FFN) and `mlp.down` on the active units only.
  Each runs as the reference runs it, and as trax's `predict` mode does on
  accelerators too (trax/layers/research/sparsity.py, _SparseFFMain: the
  advanced index `w1[idx1, idx2, :]`, then an einsum; "not efficient for large
  size of joint_batch, but at inference that will be 1 most of the time"):
  the weights of each token's units are first copied out of the table, then
  one batched product per token runs over the copy
  (flopsim.ops.primitives.gathered_linear):
    `mlp.up.gather`   W1[units] -> [n, u, d_model], u = d_ff / N units per token
    `mlp.up`          torch.bmm of [n, 1, d_model] x [n, d_model, u]:
                      2 * n * d_model * u FLOPs
    `mlp.down.gather` W2^T[units] -> [n, u, d_model]
    `mlp.down`        torch.bmm of [n, 1, u] x [n, u, d_model]: the same FLOPs
  (with biases, `mlp.up.bias_gather` b1[units] and the adds `mlp.up.bias`,
  `mlp.down.bias`). n = B * S in forward and prefill, n = B at decode.
  Bytes (w bytes per value): each gather reads the index (n * u * 8) and the
  chosen rows of the table and writes n * u * d_model * w, the per-token
  copy; the product reads that copy (as an activation: no weight bytes) and x.
  The table's traffic is the union of the units the n tokens chose: assuming
  each token's choice in a block is uniform and independent (what the
  controller's balanced use aims at), the expected distinct units read are
      units_read = (d_ff / N) * expected_distinct(N, 1, n) = d_ff * (1 - (1 - 1/N)^n)
  (flopsim.ops.expectations); for n = 1 that is d_ff / N, for large n all of
  d_ff; the gather's weight bytes are units_read * d_model * w.
  Both weights are stored unit-major as trax stores them (W1 [d_ff, d_model]
  rows per unit here, W2 [d_ff, d_model]), so each gathered unit is one
  contiguous row.
  The copy makes a sparse FFN memory-bound well before a dense one: it moves
  2 * n * u * d_model * w bytes per product (written, then read), where the
  dense product reads x and the whole weight once (at n = 512, d_ff / N = 128,
  d_model = 512, fp32: 268 MB against 5 MB). A fused sparse kernel that reads
  each token's units straight from the table (only the union from memory, no
  copy) would be faster; flopsim does not model one (there is no spec option
  for it), since neither the reference nor trax runs one.
- Train: the masked dense path (trax's `train` mode): the controller, the
  straight-through Gumbel-softmax mask as one kernel (`mlp.controller.mask`:
  a softmax per block and the noisy argmax; the noise made on chip), the full
  W1 and W2 products, the mask multiply, and the sum of x's two gradients
  (controller, FFN).

Sparse QKV, with or without sparse FF, is the spec's own `sparse_qkv` block on any
family (flopsim.families.dense).

Tags on every op of a block's FFN: `active_units` (d_ff / N per token) and
`units_read` (the expectation above; all of d_ff in train).
"""

from __future__ import annotations

from flopsim.families import dense
from flopsim.ops.expectations import expected_distinct
from flopsim.ops.primitives import (
    Ctx,
    activation,
    argmax,
    elementwise,
    gathered_linear,
    gradient_sum,
    gumbel_mask,
    index_elementwise,
    linear,
)


def controller(ctx: Ctx, i: int, *, tokens, prefix: str, tags: dict) -> list:
    """The low-rank controller's logits: d_model -> d_lowrank -> d_ff on every token."""
    d = ctx.dims
    p = f"{prefix}.controller"
    ops = linear(ctx, f"{p}.c1", layer=i, tokens=tokens, d_in=d.d_model, d_out=d.d_lowrank, bias=False,
                 kind="router", tags=tags)
    ops += linear(ctx, f"{p}.c2", layer=i, tokens=tokens, d_in=d.d_lowrank, d_out=d.d_ff,
                  bias=ctx.spec.bias, kind="router", tags=tags)
    return ops


def sparse_ffn(ctx: Ctx, i: int, *, tokens, prefix: str, tags: dict | None = None) -> list:
    """The sparse FFN of block i on `tokens` tokens (see the module docstring)."""
    spec, d = ctx.spec, ctx.dims
    p = f"{prefix}.mlp"
    blocks = d.d_ff / d.block_size  # active units per token
    gated = spec.ffn == "gated"
    if ctx.train:
        tags = {**(tags or {}), "active_units": blocks, "units_read": d.d_ff}
        ops = controller(ctx, i, tokens=tokens, prefix=p, tags=tags)
        ops += gumbel_mask(ctx, f"{p}.controller.mask", layer=i, elements=tokens * d.d_ff, module=p, tags=tags)
        ops += dense.mlp(ctx, i, tokens=tokens, prefix=prefix, tags=tags)
        # the (straight-through) mask multiplies the activation before the down product
        down = ops.index(next(op for op in ops if op.name == f"{p}.down"))
        mask = elementwise(ctx, f"{p}.mask", layer=i, elements=tokens * d.d_ff, op="mul", inputs=2,
                           module=p, tags=tags)
        # x feeds the controller and the FFN: autograd sums its two gradients, charged to x's last
        # user in forward (post-norm: the residual add, in the block)
        last = p if spec.norm_position == "pre" else prefix
        grad_sum = gradient_sum(ctx, f"{p}.grad_sum", layer=i, elements=tokens * d.d_model, module=last, tags=tags)
        return ops[:down] + mask + ops[down:] + grad_sum
    n_read = blocks * expected_distinct(d.block_size, 1, tokens)  # distinct active units over the tokens
    tags = {**(tags or {}), "active_units": blocks, "units_read": n_read}
    ops = controller(ctx, i, tokens=tokens, prefix=p, tags=tags)
    ops += argmax(ctx, f"{p}.controller.argmax", layer=i, rows=tokens * blocks, n=d.block_size, module=p,
                  tags=tags)
    # the unit index [tokens, d_ff / N] = argmax + arange(d_ff / N) * N
    ops += index_elementwise(ctx, f"{p}.units_arange", layer=i, elements=blocks, op="copy", inputs=0, module=p,
                             tags=tags)
    ops += index_elementwise(ctx, f"{p}.units_offset", layer=i, elements=blocks, op="mul", module=p, tags=tags)
    ops += index_elementwise(ctx, f"{p}.units", layer=i, elements=tokens * blocks, broadcast=blocks, module=p,
                             tags=tags)
    if gated:  # gate_up's index: cat([units, units + d_ff])
        ops += index_elementwise(ctx, f"{p}.units_up", layer=i, elements=tokens * blocks, module=p, tags=tags)
        ops += index_elementwise(ctx, f"{p}.units_cat", layer=i, elements=2 * tokens * blocks, op="copy",
                                 module=p, tags=tags)
    width = 2 if gated else 1  # a gated FFN gathers the gate and the up column of each active unit
    ops += gathered_linear(ctx, f"{p}.gate_up" if gated else f"{p}.up", layer=i, tokens=tokens, d_in=d.d_model,
                           d_out=width * d.d_ff, select="out", units=width * blocks, units_read=width * n_read,
                           bias=spec.bias, tags=tags)
    ops += activation(ctx, f"{p}.act", layer=i, elements=tokens * blocks, gated=gated, module=p, tags=tags)
    ops += gathered_linear(ctx, f"{p}.down", layer=i, tokens=tokens, d_in=d.d_ff, d_out=d.d_model, select="in",
                           units=blocks, units_read=n_read, bias=spec.bias, tags=tags)
    return ops


def build(ctx: Ctx) -> list:
    def block_fn(ctx, i, *, batch, queries, keys):
        return dense.block(ctx, i, batch=batch, queries=queries, keys=keys, ffn=sparse_ffn)

    return dense.build(ctx, block_fn=block_fn)
