"""Encoder-decoder models (T5, Switch, the Scaling Transformers' 800M model):
two stacks built from any family's blocks (`spec.encoder_layers` > 0).

- The encoder: `encoder_layers` bidirectional blocks over S_enc tokens per
  sequence (the symbol `S_enc`), its own embedding lookup in the shared token
  table (`encoder.embed.tokens` owns the table), its final norm (pre-norm).
  It runs in forward, train and prefill; at decode its output is already in
  the cross-attention cache, and its ops stay in the list with their
  parameters only (no cost, no launch).
- The decoder: `layers` causal blocks over the decoder's tokens (S queries
  attending to T keys, as a decoder-only model's), each with cross-attention
  to the encoder's output after self-attention (flopsim.families.dense,
  `cross_attention_block`), then the final norm and the head. Its lookup
  reads the same table (`decoder.embed.tokens`, no parameters of its own).
- Names: every encoder op is prefixed `encoder.`, every decoder op before the
  final norm `decoder.` (`decoder.block.3.cross.q`); op layers number the
  encoder blocks 0 .. encoder_layers - 1, the decoder blocks after them and
  the final norm and head `spec.blocks`. A block's family decisions (which
  blocks hold experts: `moe.every`) use its index within its stack, as
  Switch places an expert layer every other FFN in each stack.
- Phases: forward and train run both stacks over (S_enc, S); prefill runs the
  encoder and the decoder prompt, writing both caches; decode runs one
  decoder token per sequence, reading its self-attention cache of T keys and
  the cross-attention cache of S_enc.
- Train: the encoder's output feeds every decoder block's `cross.kv`; autograd
  sums those `layers` gradients (`encoder.output_grad_sum`, charged to the
  last decoder block's `cross`, the output's last user in forward). The decoder's
  lookup adds its gradient of the shared token table to the encoder lookup's
  (and a tied head's): one more sum of vocab x d_model
  (`decoder.embed.tokens_grad_sum`).
- Conditional families, per stack where they make sense: MoE and sparse FF in
  both stacks (their `every` counted within each); Mixture-of-Depths
  (`family: mod`) routes the causal decoder only -- the encoder's blocks are
  dense, decoder block j is routed when (j + 1) % mod.every == 0 and its
  cross-attention runs for the kept tokens (queries k, keys all the encoder
  outputs); length reduction (`family: length_reduction`) drops tokens in the
  encoder only (`keep` lists the encoder's layers), and the dense decoder
  cross-attends to the tokens leaving the encoder's last layer: S_enc' =
  kept[-1] of the encoder's schedule (the encoder's final norm, the
  cross-attention projections, the cross cache and its gradient sum are over
  S_enc' tokens; S_enc in train, where the family keeps every token).
"""

from __future__ import annotations

from dataclasses import replace

from flopsim.families import dense
from flopsim.ops.primitives import Ctx, gradient_sum, norm
from flopsim.ops.symbols import B, S_enc


def _prefixed(ops: list, prefix: str, offset: int = 0) -> list:
    """The ops renamed into a stack (`encoder.`, `decoder.`), block layers shifted by `offset`."""
    return [replace(op, name=prefix + op.name, module=prefix + op.module if op.module else prefix.rstrip("."),
                    layer=op.layer + offset if op.layer >= 0 else op.layer) for op in ops]


def encoder(ctx: Ctx, block_fn, blocks=None) -> tuple[list, object]:
    """The encoder stack over S_enc tokens per sequence, bidirectional, with no cache, and
    the tokens per sequence of its output; `blocks(enc_ctx) -> (ops, tokens)` replaces its
    blocks (length reduction: fewer tokens leave than enter)."""
    spec = ctx.spec
    enc = Ctx(spec=spec.model_copy(update={"causal": False}), phase="train" if ctx.train else "forward",
              dims=ctx.dims)
    ops = dense.embeddings(enc, batch=B, queries=S_enc)
    if spec.stack_bias:  # relative_bias layer: in each block's attention
        ops += dense.position_bias(enc, queries=S_enc, keys=S_enc, layers=spec.encoder_layers)
    out = S_enc
    if blocks is None:
        for j in range(spec.encoder_layers):
            ops += block_fn(enc, j, batch=B, queries=S_enc, keys=S_enc)
    else:
        block_ops, out = blocks(enc)
        ops += block_ops
    if spec.norm_position == "pre":
        ops += norm(enc, "final_norm", layer=spec.encoder_layers - 1, tokens=B * out, d=ctx.dims.d_model)
    return _prefixed(ops, "encoder."), out


def decoder(ctx: Ctx, block_fn, memory=S_enc) -> list:
    """The decoder stack's embeddings and blocks (cross-attending to `memory` encoder
    output tokens per sequence)."""
    spec = ctx.spec
    queries, keys = dense.seq_dims(ctx)
    dec = replace(ctx, cross_keys=memory)
    ops = [replace(op, params=0) if op.name == "embed.tokens" else op  # the encoder's table
           for op in dense.embeddings(dec, batch=B, queries=queries)]
    if spec.stack_bias:  # relative_bias layer: in each block's attention
        ops += dense.position_bias(dec, queries=queries, keys=keys, layers=spec.layers)
    for j in range(spec.layers):
        ops += block_fn(dec, j, batch=B, queries=queries, keys=keys)
    return _prefixed(ops, "decoder.", offset=spec.encoder_layers)


def build(ctx: Ctx, *, block_fn, encoder_blocks=None) -> list:
    """Encoder (not at decode), decoder, final norm and head (module docstring);
    `encoder_blocks(enc_ctx) -> (ops, tokens)` replaces the encoder's blocks."""
    spec = ctx.spec
    queries, _ = dense.seq_dims(ctx)
    ops, memory = encoder(ctx, block_fn, encoder_blocks)
    if ctx.phase == "decode":  # the encoder ran at prefill: its weights are held, not read
        ops = [dense.not_run(op) for op in ops if op.pass_ == "fwd"]
    ops += decoder(ctx, block_fn, memory)
    if spec.layers > 1:  # charged to the encoder output's last user in forward: the last cross-attention
        ops += gradient_sum(ctx, "encoder.output_grad_sum", layer=spec.blocks - 1,
                            elements=B * memory * ctx.dims.d_model, module=f"decoder.block.{spec.layers - 1}.cross",
                            count=spec.layers - 1)
    ops += dense.head(ctx, batch=B, queries=queries)
    # train: the decoder's lookup adds a gradient of the shared table to the encoder's (and
    # the tied head's): one more sum, charged where the earlier gradient was delivered
    owner = "head.lm" if ctx.spec.tied_embeddings and ctx.spec.head == "lm" else "encoder.embed.tokens"
    ops += gradient_sum(ctx, "decoder.embed.tokens_grad_sum", layer=-1,
                        elements=ctx.dims.vocab * ctx.dims.d_model, module=owner)
    return ops
