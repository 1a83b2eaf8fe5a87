"""Length reduction (token dropping): AdapLeR (Modarressi et al., ACL 2022),
PoWER-BERT (Goyal et al., ICML 2020), LTP (Kim et al., KDD 2022) and TR-BERT
(Ye et al., NAACL 2021) as one family: dense blocks whose token count shrinks
with depth. Names follow the torch reference (flopsim.torchref.length_reduction).

Tokens per layer (`kept_tokens`), for a sequence of S tokens:
- layer 0 always sees all S tokens (keep[0] = S);
- counts (some keep value > 1): layer l >= 1 sees min(keep[l], S) -- keep[0]
  is the length the schedule was written for (PoWER-BERT's retention
  configurations start at the task's maximum sequence length), shorter
  inputs are clamped;
- fractions (every keep value <= 1; keep[0] must be 1): layer l sees
  ceil(keep[l] * S), between 1 and S (ceil as MoD's capacity).
The first token ([CLS]) is always kept; the survivors keep their order.

Per layer l, in every phase: the dense block on the tokens entering it
(queries = keys = kept[l]; in prefill the keys of a cached prefix, T - S of
them, are all kept), then the layer's token scorer on those tokens:
- adapler: the contribution predictor, Linear(d_model, h), GELU,
  Linear(h, 1), softmax over the tokens (h = predictor_hidden; h = 0: one
  Linear(d_model, 1));
- tr_bert: the same predictor shape as its policy network; the schedule
  gives the tokens it keeps (TR-BERT selects at a few layers: list equal
  counts for the others);
- power_bert: no predictor; a token's significance is the attention it
  receives, summed over heads and queries of the layer's attention
  probabilities (0 FLOPs beyond attention; needs attention_impl: explicit,
  where the probabilities exist);
- ltp: the same attention-derived importance, compared with a learned
  threshold per layer (thresholds linear in depth); the schedule gives the
  tokens those thresholds keep. Thresholds (one scalar per layer) are
  treated as fixed and not counted as parameters.
At inference the kept[l + 1] best-scored tokens are selected wherever the
schedule can drop tokens (`selects`): [CLS]'s score set to +inf
(`keep_cls`), top-k indices (`select`), sorted into sequence order
(`order`), the tokens gathered (`gather`, and their positions for RoPE).
flopsim drops tokens between layers for every method; PoWER-BERT and LTP
drop after a layer's attention, before its FFN, so their FFN in layer l
runs on what flopsim lists as kept[l + 1]: shift their schedule by one layer
to match them exactly.
Train: every layer keeps all S tokens (soft removal): the scorer still
runs, and a mask sigmoid(n * s - 1) of its n scores (`soft_mask`, one
kernel) multiplies the hidden states (`mask_mul`); autograd sums the
gradients of what the scorer shares with the block (`grad_sum`).
The head runs on the tokens that survive the last layer (an LM head in
forward: kept[L-1] positions; prefill: the last kept one; cls: the first).
Decode is not modelled for a decoder-only or encoder model (token dropping
acts on a prompt).

Encoder-decoders (`encoder_layers` > 0; flopsim.families.encoder_decoder):
the encoder drops tokens -- `keep` lists its layers, the schedule above runs
over its S_enc tokens (layer l, named `encoder.block.{l}`) -- and the decoder
is dense: its blocks cross-attend to the S_enc' = kept[-1] tokens that leave
the encoder's last layer (all S_enc in train: soft removal). At prefill the
cross cache holds those S_enc' tokens; at decode the encoder does not run
and each step reads them (`encoder_output_tokens`).

Tags on every op of layer l: `tokens`, the tokens per sequence entering it.
"""

from __future__ import annotations

import sympy as sp

from flopsim.errors import InputError
from flopsim.families import dense, encoder_decoder
from flopsim.ops.primitives import (
    INDEX_BYTES,
    Ctx,
    elementwise,
    fill,
    gather,
    gradient_sum,
    linear,
    reduce_sum,
    scale_rows,
    sort_indices,
    topk,
)
from flopsim.ops.symbols import B, S_enc, exact

ATTENTION_SCORED = ("power_bert", "ltp")


def kept_tokens(spec, seq) -> list:
    """Tokens per sequence entering each layer for `seq` input tokens (an int or sympy)."""
    lr = spec.length_reduction
    out = [sp.sympify(seq)]
    for v in lr.keep[1:]:
        out.append(sp.ceiling(exact(v) * seq) if lr.fractions else sp.Min(exact(v), seq))
    return out


def selects(spec) -> list[bool]:
    """selects[l]: tokens are selected after layer l (for layer l + 1) -- where the
    schedule drops, and after layer 0 for counts (the input may exceed keep[1])."""
    lr = spec.length_reduction
    keep = lr.keep
    return [l + 1 < len(keep) and (keep[l + 1] < keep[l] or (l == 0 and not lr.fractions))
            for l in range(len(keep))]


def scorer(ctx: Ctx, i: int, *, batch, queries, keys, tags: dict) -> list:
    """The layer's token scores: the contribution predictor, or attention significance."""
    spec, d = ctx.spec, ctx.dims
    p = f"block.{i}"
    tokens = batch * queries
    if spec.length_reduction.method in ATTENTION_SCORED:
        return reduce_sum(ctx, f"{p}.significance", layer=i, rows=batch * keys, n=d.heads * queries,
                          module=p, tags=tags)
    pp = f"{p}.predictor"
    common = dict(layer=i, tokens=tokens, bias=spec.bias, kind="router", tags=tags)
    if ctx.dims.value("lr_predictor_hidden") > 0:
        h = d.lr_predictor_hidden
        ops = linear(ctx, f"{pp}.fc1", d_in=d.d_model, d_out=h, **common)
        ops += elementwise(ctx, f"{pp}.act", layer=i, elements=tokens * h, op="gelu", module=pp, tags=tags)
        ops += linear(ctx, f"{pp}.fc2", d_in=h, d_out=1, **common)
    else:
        ops = linear(ctx, f"{pp}.fc", d_in=d.d_model, d_out=1, **common)
    ops += elementwise(ctx, f"{pp}.softmax", layer=i, elements=tokens, op="softmax", module=pp, kind="softmax",
                       tags=tags)
    return ops


def scorer_gradient_sum(ctx: Ctx, i: int, *, queries, keys, tags: dict) -> list:
    """train: what the scorer reads also feeds the block's output or its attention, so
    autograd sums two gradients: the hidden states' (predictor methods: x feeds the
    predictor and the mask multiply) or the attention probabilities' (PoWER-BERT, LTP:
    they feed P V and the significance sum)."""
    d = ctx.dims
    p = f"block.{i}"
    if ctx.spec.length_reduction.method in ATTENTION_SCORED:  # the significance's gradient is a broadcast
        return gradient_sum(ctx, f"{p}.grad_sum", layer=i, elements=B * d.heads * queries * keys,
                            broadcast=B * keys, module=p, tags=tags)
    return gradient_sum(ctx, f"{p}.grad_sum", layer=i, elements=B * queries * d.d_model, module=p, tags=tags)


def select_tokens(ctx: Ctx, i: int, *, queries, kept, tags: dict) -> list:
    """Inference, after layer i: [CLS]'s score set to +inf (so it is kept), top-k of the
    scores, the kept indices sorted into sequence order, the kept tokens gathered (and
    their positions, for RoPE)."""
    p = f"block.{i}"
    ops = fill(ctx, f"{p}.keep_cls", layer=i, elements=B, module=p, tags=tags)
    ops += topk(ctx, f"{p}.select", layer=i, rows=B, n=queries, k=kept, module=p, values=False, tags=tags)
    ops += sort_indices(ctx, f"{p}.order", layer=i, rows=B, n=kept, module=p, tags=tags)
    ops += gather(ctx, f"{p}.gather", layer=i, rows=B * kept, d=ctx.dims.d_model, module=p, tags=tags,
                  variant="gather")
    if ctx.spec.positions == "rope":
        ops += gather(ctx, f"{p}.gather_positions", layer=i, rows=B * kept, d=1, module=p,
                      value_bytes=INDEX_BYTES, tags=tags, variant="gather")
    return ops


def reduced_layers(ctx: Ctx, *, queries, keys) -> tuple[list, object]:
    """The schedule's layers over `queries` tokens per sequence (a cached prefix of
    keys - queries is kept whole): each layer's dense block and scorer, then its soft mask
    (train) or the selection of the next layer's tokens; and the tokens per sequence
    that leave the last layer."""
    spec, d = ctx.spec, ctx.dims
    layers = len(spec.length_reduction.keep)
    kept = [queries] * layers if ctx.train else kept_tokens(spec, queries)
    select = selects(spec)
    ops = []
    for i, q in enumerate(kept):
        tags = {"tokens": q}
        k = q + (keys - queries)
        ops += dense.block(ctx, i, batch=B, queries=q, keys=k, tags=tags)
        ops += scorer(ctx, i, batch=B, queries=q, keys=k, tags=tags)
        if ctx.train:  # soft removal: x * sigmoid(n * score - 1)
            ops += elementwise(ctx, f"block.{i}.soft_mask", layer=i, elements=B * q, op="soft_mask",
                               module=f"block.{i}", tags=tags)
            ops += scale_rows(ctx, f"block.{i}.mask_mul", layer=i, rows=B * q, d=d.d_model, module=f"block.{i}",
                              tags=tags)
            ops += scorer_gradient_sum(ctx, i, queries=q, keys=k, tags=tags)
        elif select[i]:
            ops += select_tokens(ctx, i, queries=q, kept=kept[i + 1], tags=tags)
    return ops, kept[-1]


def encoder_output_tokens(spec, encoder_seq):
    """An encoder-decoder's encoder output tokens per sequence at inference (what the
    cross-attention reads and caches): those leaving the encoder's last layer."""
    return kept_tokens(spec, encoder_seq)[-1]


def build(ctx: Ctx) -> list:
    spec = ctx.spec
    if spec.is_encoder_decoder:  # tokens dropped in the encoder; dense decoder blocks
        return encoder_decoder.build(ctx, block_fn=dense.block,
                                     encoder_blocks=lambda enc: reduced_layers(enc, queries=S_enc, keys=S_enc))
    if ctx.phase == "decode":
        raise InputError(f"phase: 'decode': {spec.name} is a length_reduction model; token dropping acts on "
                         f"a prompt, use forward, prefill or train")
    queries, keys = dense.seq_dims(ctx)
    ops = dense.embeddings(ctx, batch=B, queries=queries)
    block_ops, out = reduced_layers(ctx, queries=queries, keys=keys)
    ops += block_ops
    ops += dense.head(ctx, batch=B, queries=out)
    return ops
