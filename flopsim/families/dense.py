"""The dense transformer: the baseline every conditional family builds on.

Pieces (`embeddings`, `attention_block`, `mlp`, `block`, `head`) are
public so that families reuse them with other token counts or another FFN.
Token counts per phase (`seq_dims`):
- forward / train: S queries per sequence attending to T = S keys; the head
  on every position;
- prefill: S prompt tokens attending to T keys (T = S unless a cached prefix
  is given); keys and values go through the KV cache; the head on the last
  position only;
- decode: 1 new token per sequence attending to T cached keys (the new one
  included); the head on that token.
Names match the torch reference's module paths (`block.3.attn.qkv`).

Sliding-window attention (`sliding_window: {size: W, global_every: n}`;
Mistral, Gemma 2/3, GPT-OSS): a local layer keeps the keys and values of its
last W positions (a ring of W slots; global layers keep every position) and
a query attends to at most W keys, itself included.
- decode: the new token is written into the ring and attends to min(T, W)
  keys; the KV cache holds min(T, W) positions per local layer (memory).
- prefill of S tokens after P = T - S cached ones: min(P, W) cached + S new
  keys; the scores are counted over all of them (FlopCounterMode counts the
  full product of an attention kernel given a window mask, as it counts the
  causal one), the time uses the band a windowed kernel runs: query j sees
  min(W, keys - S + j + 1) keys (`Op.causal_flops`). The ring receives the
  last min(S, W) new positions.
- train and forward: S x S scores counted, the band's work timed.

Architecture options of dense and MoE models (Gemma 2/3, Qwen3, OLMo 2, GPT-OSS):
`qk_norm` (an RMSNorm of each query and key head over d_head, `attn.q_norm` /
`attn.k_norm`, before RoPE), `sandwich_norms` (`attn_out_norm`, `mlp_out_norm`:
each sub-block's output normalised before its residual add), `scale_embeddings`
(`embed.scale`: x * sqrt(d_model)), `softcap.attention` (the scores capped inside
the attention kernel, 6 FLOPs a score: the division, tanh, the product),
`softcap.logits` (`head.softcap`, one kernel over the logits) and
`attention_sinks` (a learned logit per head in every softmax, owned by the
attention op).

Dropout in training (`dropout: {attention: p, hidden: q}`; none at inference,
where nn.Dropout is the identity; flopsim.ops.primitives.dropout's bytes:
reads x, writes the output and a one-byte mask; backward reads the gradient
and the mask): `embed.dropout` on the embeddings' output, `attn_dropout` and
`mlp_dropout` on each sub-block's output before its residual add (the unfused
torch form; Megatron-LM fuses bias, dropout and add, not modelled), and the
probabilities' dropout: an explicit attention's own kernel `attn.core.dropout`
on B x heads x S x T values (tag `attention_core`: selective recomputation
runs it again), whose output P V reads instead of the probabilities (the
attention op's bytes unchanged); a fused attention drops inside its kernel
(no mask kept; its arithmetic only, flopsim.ops.primitives.attention).

T5's relative position bias (`positions: relative`): each stack computes one
bias of heads x queries x keys per step (`position_bias.buckets`, the bucket
of each query-key distance, a few integer ops per pair; `position_bias`, the
lookup in a relative_buckets x heads table), and every layer adds it to its
scores (`attn.position_bias`, broadcast over the batch; in train its gradient
is summed over the batch, `attn.position_bias_grad`, and over the layers,
`position_bias.grad_sum`). Decode computes the bias of its one query.
With `relative_bias: layer` (UMT5) every self-attention layer owns its table
and makes its own bias the same way (`attn.relative_bias.buckets`,
`attn.relative_bias`, layer ops with the layer's parameters), with no stack
table and no gradient sum across layers (each table has one user).

An encoder-decoder's decoder block (`ctx.cross_keys`, flopsim.families.
encoder_decoder) adds cross-attention after self-attention: `cross.q` on the
decoder tokens, `cross.kv` on the encoder's output (projected once per
sequence: in prefill written to the cross-attention cache, `cross.kv_cache`;
at decode read from it, the projection not run), `cross.core` (bidirectional
over the encoder tokens), `cross.out`, with its own norm (`norm_cross`) and
residual (`cross_residual`).

Sparse QKV (`sparse_qkv: {modules: S, conv_kernel: K}`, any family; M =
d_model / S), following trax's MultiplicativeConvCausalAttention
(v_concat_type 'none', Jaszczur et al. 2021), replaces the QKV projection:
- `attn.qkv.mult`: one multiplicative layer shared by Q, K and V (trax
  FactoredDense), y[s, m] = sum_i x_i D[s, i] E[i, m] (+ b), d_model -> d_model
  as S modules of M; FLOPs 2 * tokens * S * d_model * M = 2 * tokens * d_model^2.
- `attn.qkv.q`, `.k`, `.v`: 2-D convolutions over (length, modules) with M
  input channels, causal over the length (padding K - 1 earlier positions) and
  'same' over the modules: Q and K with a K x K kernel, V with K x 1 (trax:
  kernel_size 3 for Q/K, 1 for V, length_kernel_size for the length); output
  channels per module heads * d_head / S for Q and kv_heads * d_head / S for
  K and V (M each in trax, where heads * d_head = d_model). Biases follow
  `spec.bias` (trax always has them). At decode the convolution reads the
  K - 1 earlier multiplicative outputs of each sequence (trax keeps them in
  its state); that small read is not costed. In a Mixture-of-Depths block the
  convolution runs over the block's selected tokens, as the reference does.
"""

from __future__ import annotations

from dataclasses import replace

import sympy as sp

from flopsim.families import mla
from flopsim.ops.primitives import (
    Ctx,
    activation,
    attention,
    broadcast_gradient,
    conv2d,
    cross_entropy,
    dropout,
    elementwise,
    embedding,
    factored_dense,
    gradient_sum,
    index_elementwise,
    kv_cache_append,
    linear,
    norm,
    residual_add,
    rope,
    select_rows,
)
from flopsim.ops.symbols import B, S, T


def seq_dims(ctx: Ctx) -> tuple[sp.Expr, sp.Expr]:
    """(queries, keys) per sequence for the phase."""
    if ctx.phase == "decode":
        return sp.Integer(1), T
    if ctx.phase == "prefill":
        return S, T
    return S, S


def uses_kv_cache(ctx: Ctx) -> bool:
    return ctx.phase in ("prefill", "decode")


def embeddings(ctx: Ctx, *, batch, queries) -> list:
    spec, d = ctx.spec, ctx.dims
    tokens = batch * queries
    ops = embedding(ctx, "embed.tokens", layer=-1, tokens=tokens, rows=d.vocab, d=d.d_model)
    if spec.scale_embeddings:  # Gemma: x * sqrt(d_model)
        ops += elementwise(ctx, "embed.scale", layer=-1, elements=tokens * d.d_model, op="scale", module="embed")
    summed = 1
    if spec.positions == "learned":
        ops += embedding(ctx, "embed.positions", layer=-1, tokens=tokens, rows=d.max_seq, d=d.d_model)
        summed += 1
    if spec.token_types:
        ops += embedding(ctx, "embed.types", layer=-1, tokens=tokens, rows=d.token_types, d=d.d_model)
        summed += 1
    if summed > 1:
        ops += elementwise(ctx, "embed.add", layer=-1, elements=tokens * d.d_model, op="add",
                           inputs=summed, module="embed")
    if spec.norm_position == "post":
        ops += norm(ctx, "embed.norm", layer=-1, tokens=tokens, d=d.d_model)
    ops += dropout(ctx, "embed.dropout", layer=-1, elements=tokens * d.d_model, p=spec.hidden_dropout,
                   module="embed")
    return ops


def attention_block(ctx: Ctx, i: int, *, batch, queries, keys, prefix: str, tags: dict | None = None,
                    qkv=None) -> list:
    """QKV projection, rotary embedding, KV-cache append, attention, output projection;
    `qkv(ctx, i, batch=, queries=, prefix=, tags=)` replaces the QKV projection (sparse QKV).
    A spec with an `mla` block runs multi-head latent attention instead (flopsim.families.mla)."""
    spec, d = ctx.spec, ctx.dims
    if spec.mla is not None:
        return mla.attention_block(ctx, i, batch=batch, queries=queries, keys=keys, prefix=prefix, tags=tags)
    p = f"{prefix}.attn"
    tokens = batch * queries
    if qkv is None and spec.sparse_qkv is not None:
        qkv = sparse_qkv
    if qkv is None:
        ops = linear(ctx, f"{p}.qkv", layer=i, tokens=tokens, d_in=d.d_model,
                     d_out=(d.heads + 2 * d.kv_heads) * d.d_head, bias=spec.qkv_has_bias, tags=tags)
    else:
        ops = qkv(ctx, i, batch=batch, queries=queries, prefix=p, tags=tags)
    if spec.qk_norm:  # each query and key head normalised over d_head (Qwen3, Gemma 3, OLMo 2)
        ops += norm(ctx, f"{p}.q_norm", layer=i, tokens=tokens * d.heads, d=d.d_head)
        ops += norm(ctx, f"{p}.k_norm", layer=i, tokens=tokens * d.kv_heads, d=d.d_head)
    if spec.positions == "rope":
        ops += rope(ctx, f"{p}.rope", layer=i, tokens=tokens, heads=d.heads, kv_heads=d.kv_heads, d_head=d.d_head,
                    positions=queries, module=p, tags=tags)
    window = d.window if is_local(spec, i) else None
    written, kv_tags = queries, tags
    if window is not None:
        keys, written = windowed_keys(ctx, queries, keys, window), sp.Min(queries, window)
        kv_tags = {**(tags or {}), "cache_tokens": sp.Min(T, window), "written_tokens": written}
    if uses_kv_cache(ctx):
        ops += kv_cache_append(ctx, f"{p}.kv_cache", layer=i, batch=batch, tokens=written,
                               width=2 * d.kv_heads * d.d_head, module=p, tags=kv_tags)
    if spec.layer_bias:  # the layer's own table (UMT5)
        ops += position_bias(ctx, queries=queries, keys=keys, layers=1, name=f"{p}.relative_bias", layer=i)
    if spec.positions == "relative":  # the stack's (or the layer's) bias added to the scores (T5)
        scores, bias = batch * d.heads * queries * keys, d.heads * queries * keys
        added = elementwise(ctx, f"{p}.position_bias", layer=i, elements=scores, op="add", inputs=2, module=p,
                            tags=tags)
        # the bias is broadcast over the batch: read once, not per sequence
        ops += [replace(op, act_read_bytes=(scores + bias) * ctx.w) if op.pass_ == "fwd" else op for op in added]
        ops += broadcast_gradient(ctx, f"{p}.position_bias_grad", layer=i, elements=d.heads * queries * keys,
                                  copies=batch, module=p, tags=tags)
    ops += attention(ctx, f"{p}.core", layer=i, batch=batch, queries=queries, keys=keys,
                     heads=d.heads, kv_heads=d.kv_heads, d_head=d.d_head, causal=spec.causal,
                     kv_from_cache=uses_kv_cache(ctx), module=p, tags=tags, window=window,
                     softcap=bool(spec.softcap and spec.softcap.attention), sinks=spec.attention_sinks,
                     dropout=bool(spec.attention_dropout))
    if spec.attention_impl == "explicit":  # its own kernel on the probabilities, before P V
        ops += dropout(ctx, f"{p}.core.dropout", layer=i, elements=batch * d.heads * queries * keys,
                       p=spec.attention_dropout, module=p, tags={**(tags or {}), "attention_core": True})
    ops += linear(ctx, f"{p}.out", layer=i, tokens=tokens, d_in=d.heads * d.d_head, d_out=d.d_model,
                  bias=spec.bias, tags=tags)
    return ops


def is_local(spec, i: int) -> bool:
    """Layer i attends within a sliding window (module docstring)."""
    sw = spec.sliding_window
    return sw is not None and not (sw.global_every and (i + 1) % sw.global_every == 0)


def windowed_keys(ctx: Ctx, queries, keys, window):
    """The keys a local layer's queries attend to: a ring of the last `window` positions.
    decode: min(T, W); prefill after P = T - S cached tokens: min(P, W) + S; train and
    forward: all S (the window only masks scores there)."""
    if ctx.phase == "decode":
        return sp.Min(keys, window)
    if ctx.phase == "prefill":
        return sp.Min(keys - queries, window) + queries
    return keys


def sparse_qkv(ctx: Ctx, i: int, *, batch, queries, prefix: str, tags: dict | None = None) -> list:
    """Sparse QKV: the multiplicative layer, then the Q, K and V convolutions (module docstring)."""
    spec, d = ctx.spec, ctx.dims
    p = f"{prefix}.qkv"
    modules, k = d.sparse_qkv, d.conv_kernel
    m = d.d_model / modules
    ops = factored_dense(ctx, f"{p}.mult", layer=i, tokens=batch * queries, d_in=d.d_model, modules=modules,
                         d_module=m, bias=spec.bias, tags=tags)
    for name, heads, kernel in (("q", d.heads, k * k), ("k", d.kv_heads, k * k), ("v", d.kv_heads, k)):
        ops += conv2d(ctx, f"{p}.{name}", layer=i, batch=batch, c_in=m, c_out=heads * d.d_head / modules,
                      out_positions=queries * modules, kernel_positions=kernel, bias=spec.bias,
                      module=f"{p}.{name}", tags=tags)
    return ops


def mlp(ctx: Ctx, i: int, *, tokens, prefix: str, d_ff=None, name: str = "mlp",
        batch=1, tags: dict | None = None, expert: bool = False) -> list:
    """Up (gate and up, fused, when gated) projection, activation, down projection;
    `batch` stacked copies (experts; `expert`: MoE experts' weights, for their precision)."""
    spec, d = ctx.spec, ctx.dims
    d_ff = d.d_ff if d_ff is None else d_ff
    p = f"{prefix}.{name}"
    common = dict(layer=i, tokens=tokens, bias=spec.bias, batch=batch, tags=tags, expert=expert)
    if spec.ffn == "gated":
        # gate and up as one product (Megatron's linear_fc1, vLLM's merged projection)
        ops = linear(ctx, f"{p}.gate_up", d_in=d.d_model, d_out=2 * d_ff, **common)
    else:
        ops = linear(ctx, f"{p}.up", d_in=d.d_model, d_out=d_ff, **common)
    ops += activation(ctx, f"{p}.act", layer=i, elements=batch * tokens * d_ff, gated=spec.ffn == "gated",
                      module=p, tags=tags)
    ops += linear(ctx, f"{p}.down", d_in=d_ff, d_out=d.d_model, **common)
    return ops


def residual(ctx: Ctx, name: str, i: int, *, tokens, module: str, tags: dict | None = None) -> list:
    return residual_add(ctx, name, layer=i, elements=tokens * ctx.dims.d_model, module=module, tags=tags)


def hidden_dropout(ctx: Ctx, name: str, i: int, *, tokens, module: str, tags: dict | None = None) -> list:
    """`dropout.hidden` on a sub-block's output before its residual add (train only): the
    unfused torch form, as flopsim keeps the residual add its own kernel (Megatron fuses
    the output projection's bias, this dropout and the add: bias_dropout_add_fused_train)."""
    return dropout(ctx, name, layer=i, elements=tokens * ctx.dims.d_model, p=ctx.spec.hidden_dropout,
                   module=module, tags=tags)


def block(ctx: Ctx, i: int, *, batch, queries, keys, ffn=None, tags: dict | None = None, qkv=None) -> list:
    """One transformer block on `queries` tokens per sequence; `ffn(ctx, i, tokens=, prefix=)`
    replaces the MLP (MoE, sparse FF), `qkv` the QKV projection (see attention_block)."""
    spec, d = ctx.spec, ctx.dims
    prefix = f"block.{i}"
    tokens = batch * queries
    ffn = ffn or mlp
    pre = spec.norm_position == "pre"
    ops = []
    if pre:
        ops += norm(ctx, f"{prefix}.norm1", layer=i, tokens=tokens, d=d.d_model)
    ops += attention_block(ctx, i, batch=batch, queries=queries, keys=keys, prefix=prefix, tags=tags, qkv=qkv)
    if spec.sandwich_norms:  # Gemma 2/3: the sub-block's output normalised before the residual add
        ops += norm(ctx, f"{prefix}.attn_out_norm", layer=i, tokens=tokens, d=d.d_model)
    ops += hidden_dropout(ctx, f"{prefix}.attn_dropout", i, tokens=tokens, module=prefix, tags=tags)
    ops += residual(ctx, f"{prefix}.attn_residual", i, tokens=tokens, module=prefix, tags=tags)
    if ctx.cross_keys is not None:  # an encoder-decoder's decoder block
        if not pre:
            ops += norm(ctx, f"{prefix}.norm1", layer=i, tokens=tokens, d=d.d_model)
        ops += cross_attention_block(ctx, i, batch=batch, queries=queries, prefix=prefix, tags=tags)
        ops += norm(ctx, f"{prefix}.norm2" if pre else f"{prefix}.norm_cross", layer=i, tokens=tokens,
                    d=d.d_model)
    else:
        ops += norm(ctx, f"{prefix}.norm2" if pre else f"{prefix}.norm1", layer=i, tokens=tokens, d=d.d_model)
    ops += ffn(ctx, i, tokens=tokens, prefix=prefix, tags=tags)
    if spec.sandwich_norms:
        ops += norm(ctx, f"{prefix}.mlp_out_norm", layer=i, tokens=tokens, d=d.d_model)
    ops += hidden_dropout(ctx, f"{prefix}.mlp_dropout", i, tokens=tokens, module=prefix, tags=tags)
    ops += residual(ctx, f"{prefix}.mlp_residual", i, tokens=tokens, module=prefix, tags=tags)
    if not pre:
        ops += norm(ctx, f"{prefix}.norm2", layer=i, tokens=tokens, d=d.d_model)
    return ops


def cross_attention_block(ctx: Ctx, i: int, *, batch, queries, prefix: str, tags: dict | None = None) -> list:
    """A decoder block's cross-attention to the encoder's `ctx.cross_keys` output tokens per
    sequence, with its pre-norm (`norm_cross`) and residual (module docstring)."""
    spec, d = ctx.spec, ctx.dims
    p, keys, tokens = f"{prefix}.cross", ctx.cross_keys, batch * queries
    kv_width = 2 * d.kv_heads * d.d_head
    ops = norm(ctx, f"{prefix}.norm_cross", layer=i, tokens=tokens, d=d.d_model) \
        if spec.norm_position == "pre" else []
    ops += linear(ctx, f"{p}.q", layer=i, tokens=tokens, d_in=d.d_model, d_out=d.heads * d.d_head,
                  bias=spec.qkv_has_bias, tags=tags)
    kv = linear(ctx, f"{p}.kv", layer=i, tokens=batch * keys, d_in=d.d_model, d_out=kv_width,
                bias=spec.qkv_has_bias, tags=tags)
    if ctx.phase == "decode":  # projected at prefill and cached: held, not run
        kv = [not_run(op) for op in kv]
    ops += kv
    if ctx.phase == "prefill":
        ops += kv_cache_append(ctx, f"{p}.kv_cache", layer=i, batch=batch, tokens=keys, width=kv_width,
                               module=p, tags={**(tags or {}), "cache_tokens": keys, "written_tokens": keys})
    core_tags = tags
    if ctx.phase == "decode":  # the cross cache, read and held (memory), written at prefill
        core_tags = {**(tags or {}), "held_cache_bytes": cross_cache_bytes(ctx, batch)}
    ops += attention(ctx, f"{p}.core", layer=i, batch=batch, queries=queries, keys=keys, heads=d.heads,
                     kv_heads=d.kv_heads, d_head=d.d_head, causal=False, kv_from_cache=uses_kv_cache(ctx),
                     module=p, tags=core_tags)
    ops += linear(ctx, f"{p}.out", layer=i, tokens=tokens, d_in=d.heads * d.d_head, d_out=d.d_model,
                  bias=spec.bias, tags=tags)
    ops += residual(ctx, f"{prefix}.cross_residual", i, tokens=tokens, module=prefix, tags=tags)
    return ops


def cross_cache_bytes(ctx: Ctx, batch):
    """Bytes of a decoder layer's cross-attention cache: keys and values of the
    `ctx.cross_keys` encoder outputs of `batch` sequences."""
    return batch * ctx.cross_keys * 2 * ctx.dims.kv_heads * ctx.dims.d_head * ctx.w_kv


def not_run(op):
    """`op` as held but not run this step: its parameters, no cost, no launch."""
    return replace(op.scaled(0), kernels=0, gemm=None)


def position_bias(ctx: Ctx, *, queries, keys, layers: int, name: str = "position_bias", layer: int = -1) -> list:
    """A relative position bias, heads x queries x keys, made once per step from one table
    (T5; module docstring): the stack's (`name` position_bias, layer -1), or with
    `relative_bias: layer` block `layer`'s own (`block.{i}.attn.relative_bias`, layers 1). In
    train the gradients of its `layers` uses are summed."""
    d = ctx.dims
    pairs = queries * keys  # per head, not per sequence: the bias is shared by the batch
    ops = index_elementwise(ctx, f"{name}.buckets", layer=layer, elements=pairs, op="copy", inputs=0, module=name)
    ops += embedding(ctx, name, layer=layer, tokens=pairs, rows=d.relative_buckets, d=d.heads)
    if layers > 1:  # charged to the bias's last user in forward, the last block's attention
        ops += gradient_sum(ctx, f"{name}.grad_sum", layer=layers - 1, elements=pairs * d.heads,
                            module=f"block.{layers - 1}.attn", count=layers - 1)
    return ops


def head(ctx: Ctx, *, batch, queries) -> list:
    """Final norm (pre-norm models) and the LM or classification head."""
    spec, d = ctx.spec, ctx.dims
    L = spec.blocks
    ops = []
    if spec.norm_position == "pre":
        ops += norm(ctx, "final_norm", layer=L, tokens=batch * queries, d=d.d_model)
    if spec.head == "lm":
        rows = batch if ctx.phase == "prefill" else batch * queries  # prefill: last position only
        if spec.lm_transform:  # BERT's MLM head: dense, activation, norm; the logits get a bias
            ops += linear(ctx, "head.transform.dense", layer=L, tokens=rows, d_in=d.d_model, d_out=d.d_model,
                          bias=spec.bias)
            ops += elementwise(ctx, "head.transform.act", layer=L, elements=rows * d.d_model, op=spec.activation,
                               module="head.transform")
            ops += norm(ctx, "head.transform.norm", layer=L, tokens=rows, d=d.d_model)
        ops += linear(ctx, "head.lm", layer=L, tokens=rows, d_in=d.d_model, d_out=d.vocab, bias=spec.lm_transform,
                      tied=spec.tied_embeddings)
        if spec.softcap is not None and spec.softcap.logits:  # Gemma 2: cap * tanh(logits / cap)
            ops += elementwise(ctx, "head.softcap", layer=L, elements=rows * d.vocab, op="softcap", module="head")
        if ctx.train:
            ops += cross_entropy(ctx, "head.loss", layer=L, rows=rows, classes=d.vocab, module="head")
    elif spec.head == "cls":
        # BERT: pooler (dense + tanh) on the first token, then the classifier
        ops += select_rows(ctx, "head.select", layer=L, rows=batch, total_rows=batch * queries, d=d.d_model,
                           module="head")
        ops += linear(ctx, "head.pooler", layer=L, tokens=batch, d_in=d.d_model, d_out=d.d_model, bias=spec.bias)
        ops += elementwise(ctx, "head.pooler_act", layer=L, elements=batch * d.d_model, op="tanh", module="head")
        ops += linear(ctx, "head.classifier", layer=L, tokens=batch, d_in=d.d_model, d_out=d.classes,
                      bias=spec.bias)
        if ctx.train:
            ops += cross_entropy(ctx, "head.loss", layer=L, rows=batch, classes=d.classes, module="head")
    elif ctx.train:  # no head: the loss is taken over the hidden states (what the reference trains on)
        ops += cross_entropy(ctx, "head.loss", layer=L, rows=batch * queries, classes=d.d_model, module="head")
    return ops


def build(ctx: Ctx, *, block_fn=None) -> list:
    """Embeddings, `spec.layers` blocks (`block_fn(ctx, i, batch=, queries=, keys=)`), head;
    an encoder-decoder's two stacks (flopsim.families.encoder_decoder)."""
    block_fn = block_fn or block
    if ctx.spec.is_encoder_decoder:
        from flopsim.families import encoder_decoder

        return encoder_decoder.build(ctx, block_fn=block_fn)
    queries, keys = seq_dims(ctx)
    ops = embeddings(ctx, batch=B, queries=queries)
    if ctx.spec.stack_bias:
        ops += position_bias(ctx, queries=queries, keys=keys, layers=ctx.spec.layers)
    for i in range(ctx.spec.layers):
        ops += block_fn(ctx, i, batch=B, queries=queries, keys=keys)
    ops += head(ctx, batch=B, queries=queries)
    return ops
