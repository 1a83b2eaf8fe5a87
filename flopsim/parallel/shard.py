"""Parallelism as a transformation of the op list: one step's ops (one
micro-batch; flopsim.predict.phase_ops) under a Layout become one GPU's ops,
the collectives that layout needs among them (kind `collective`, the
message in `comm_bytes`, taken from the ops' own bytes).

Splitting (each op's FLOPs, bytes, parameters and matrix shape; tp' = tp
with sequence parallelism, else 1). A block's sub-layer is the run of ops
that ends in its residual add (`attn_residual`, `cross_residual`,
`mlp_residual`); within it the ops from its first column-parallel matrix
product up to its row-parallel one work on tp-split tensors:
- column-parallel products (q/k/v, gate/up, the LM head over the vocabulary):
  everything / tp, the product's n / tp; row-parallel (attention out, down):
  everything / tp, k / tp; the attention core: / tp over heads, its KV-cache
  bytes / min(tp, kv_heads) (GQA replicates a KV head on tp / kv_heads
  ranks; a latent MLA cache is whole on every rank; a kernel loading the cache
  once per query head, `kv_cache_reads: per_query_head`, / tp); the ops between them
  (activation, RoPE, per-head norms, the vocabulary-parallel loss): / tp;
- token-wise ops outside (norms, residual adds, routers, embeddings): FLOPs,
  activation and KV bytes / tp', their weights whole (replicated), except the
  token embedding's table, split over the vocabulary (/ tp);
- the layout's `vocab_parallel` off (gpt-fast's tensor parallelism): the LM
  head and the loss after it are token-wise ops (whole on every rank without
  sequence parallelism, its weights whole), the embedding's table whole;
- MLA's latent down-projections and their norm run whole on every rank;
- routed experts (expert parallel, expert-tensor-parallel = tp, as
  Megatron-Core's default): work / tp x expert_load (the busiest rank's
  pairs; under ep a rank's E / ep experts serve all ep ranks' tokens, so the
  work per GPU equals one micro-batch's), their weights / (tp * ep), the
  grouped product (E, m, n, k) -> (E / ep, m * ep, ...); the weight bytes a
  step reads are those the ep ranks' tokens reach (B -> ep B in an op whose
  reads depend on B: decode's expected distinct experts, a gather kernel's
  pairs), / (tp * ep);
- a cache an op holds without writing it (`held_cache_bytes`: an
  encoder-decoder's cross-attention cache at decode) / its KV split;
- context parallel: every op's FLOPs and activation bytes / cp (its m / cp),
  weights whole.

Collectives (flopsim.collectives prices them by message size and link level):
- tp: per sub-layer, an all-reduce of its output (the residual add's bytes)
  before the residual add; with sequence parallelism a reduce-scatter there
  and an all-gather of its input before its first matrix product (Megatron's
  pair, the same bytes), and before a cross-attention's key/value projection
  an all-gather of the encoder's output (its input bytes; Megatron's
  ColumnParallelLinear gathers a sequence-parallel input); the token
  embedding's output likewise (vocabulary-parallel only). Inference with the
  head split over the vocabulary: its logits (the head's output, or the
  softcap's after it) all-gathered after it, rows x V values (Megatron-LM's
  gather_output, TensorRT-LLM's and vLLM's logits gather before sampling); in
  training the loss is vocabulary-parallel and nothing is gathered. Backward:
  the conjugates (all-gather <-> reduce-scatter, all-reduce for all-reduce).
- ep: an all-to-all after the dispatch (its bytes / tp' x expert_load) and one
  back after the last expert product; backward the same two.
- cp: keys and values all-gathered before each attention core (2 x its
  tokens x kv_heads x d_head values, / min(tp, kv_heads)), reduce-scattered
  in backward.
- pp: the stage's output activations (its last residual add's bytes / tp,
  Megatron's scatter-gather) sent forward, their gradients sent back; with
  the interleaved schedule once per chunk the stage holds. An encoder-decoder
  (Megatron-LM's T5 schedule, schedules.py get_tensor_shapes / forward_step):
  a decoder stage also sends the encoder's output on (its cross.kv's input
  bytes / tp) and its gradient back (the first decoder stage, whose input is
  the encoder's output alone, sends back only that); each decoder stage adds
  its blocks' gradients of the encoder's output to the one it receives.
- dp (train): per layer of the stage, by ZeRO stage, over dp * cp ranks (routed
  experts over dp * cp / ep): 0 all-reduce the gradients once a step; 1
  reduce-scatter them once a step and all-gather the updated weights; 2
  reduce-scatter after every micro-batch, all-gather once a step; 3 gather the
  weights before each forward and backward (and recomputation) and
  reduce-scatter the gradients after, every micro-batch. Gradient and weight
  bytes per parameter come from the caller (flopsim.memory's). Tags: `per`
  (`microbatch` or `step`), `window` (`forward` / `backward`: the pass the
  traffic can hide behind). Hybrid sharding (`zero_shard` s): the same over the
  shard group of s ranks (`dp_shard`), then each GPU's reduced 1 / s of the
  gradients all-reduced over the dp * cp / s replicas (`dp_replica`), as
  PyTorch FSDP's HYBRID_SHARD does.
Every collective op carries tags `group`, `ranks`, `level` (scale_up /
scale_out, Layout.level), `node_ranks` (its group's ranks on one node,
Layout.node_ranks: over the network a ring collective runs one ring per NIC
of them, flopsim.collectives); a branch that runs only sometimes (its op's
`kernels` below 1) scales its collective's launches the same.

Recomputation (train): full copies every block's forward ops (collectives
included), selective its attention cores (`Op.attention_core`: with an explicit
attention its probabilities' dropout too), cheap its norms and elementwise ops
(`Op.cheap`), as forward-kernel ops named
`<op>.recompute` (tag `recompute`) placed before the block's backward. Pipeline: each
stage's blocks and other ops by flopsim.parallel.layout (`stage_places`, `place`:
the blocks in contiguous stages as evenly as they go, an encoder-decoder's
encoder stages first; the embeddings on the first stage, the final norm, head
and loss on the last); the sharded list is stage `layout.stage` (default the
last). Ops are grouped by their placement key; a key whose backward comes in
two runs (a stack's bias gradient sum, charged to its last block) gets its
recomputation and weight gathers before the first, its gradient collectives
after the last. The optimizer update covers the stage's parameters (/ the
data-parallel ranks under ZeRO >= 1); a gradient-accumulation op
(flopsim.ops.grad_accum, tag `grad_accumulation`) the stage's parameters (/
the data-parallel ranks under ZeRO >= 2, whose gradients are sharded), after
the backward. The ZeRO collectives' gradient message is in the caller's
bytes per parameter (flopsim.ops.grad_accum.reduce_bytes: the reduction's dtype). Not counted: the vocabulary-parallel
loss's small all-reduces, a tied embedding's copy on the last stage (and an
encoder-decoder's shared table's on its first decoder stage) and the
all-reduce of that table's gradient over the stages holding it (Megatron's
embedding group). A stack's bias gradient sum (its blocks' n - 1 adds) is
charged to the stage of its last block, as the encoder output's gradient sum
to the last stage (each decoder stage adds its own blocks' in fact: as many
adds in all).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Optional

import sympy as sp

from flopsim.ops.op import Op
from flopsim.ops.symbols import B
from flopsim.parallel.layout import DECODER_BIAS, DECODER_INPUT, STACK_BIAS, place, stage_places
from flopsim.parallel.layout import stage_of_layers  # noqa: F401 (re-exported: callers import it from here)

RESIDUAL = re.compile(r"(attn|cross|mlp)_residual$")
COLUMN = ("attn.qkv", "attn.q", "attn.q_b", "attn.kv_b", "attn.qkv.mult", "cross.q", "cross.kv", "mlp.up",
          "mlp.gate_up", "moe.experts.up", "moe.experts.gate_up", "moe.shared.up", "moe.shared.gate_up", "head.lm")
ROW = ("attn.out", "cross.out", "mlp.down", "moe.experts.down", "moe.shared.down")
LATENT = ("attn.q_a", "attn.kv_a", "attn.kv_norm")  # MLA's down-projections: whole on every rank
CONJUGATE = {"all_gather": "reduce_scatter", "reduce_scatter": "all_gather", "all_reduce": "all_reduce",
             "all_to_all": "all_to_all", "send_recv": "send_recv"}
_PREFIX = re.compile(r"^(encoder\.|decoder\.)?(block\.\d+\.)?")


def local_name(name: str) -> str:
    """An op's name within its block: `decoder.block.3.attn.q` -> `attn.q`."""
    return _PREFIX.sub("", name, count=1)


def collective(name: str, op: str, nbytes, *, layer: int, group: str, layout, pass_: str = "fwd",
               kernels=1, **tags) -> Op:
    """A collective op: `op` over the layout's group `group` on a message of `nbytes`."""
    ranks, _ = layout.group(group)
    return Op(name=name, kind="collective", layer=layer, module=name.rsplit(".", 1)[0], pass_=pass_,
              variant=op, comm_bytes=nbytes, kernels=kernels,
              tags={"group": group, "ranks": ranks, "level": layout.level(group),
                    "node_ranks": layout.node_ranks(group), **tags})


# -- splitting ---------------------------------------------------------------------------------


def _column(local: str, layout) -> bool:
    """Whether an op (by its name within its block) is a column-parallel product under
    `layout`: the LM head only when it is split over the vocabulary."""
    return local in COLUMN and (layout.vocab_parallel or local != "head.lm")


def _regions(fwd_ops: list, layout) -> set:
    """Names of the forward ops that work on tp-split tensors: in each sub-layer,
    from its first column-parallel product to its row-parallel one (to the end of
    the sub-layer when it has none, as the head's loss after the vocabulary-parallel head)."""
    inside, names = False, set()
    for op in fwd_ops:
        local = local_name(op.name)
        if _column(local, layout):
            inside = True
        if inside:
            names.add(op.name)
        if local in ROW or RESIDUAL.search(op.name):
            inside = False
    return names


EXPERT_LOAD = sp.Symbol("expert_load", positive=True)  # a layout may leave the load a symbol, set at evaluation


def _load(layout):
    """The busiest expert-parallel rank's load as a sympy number (1 exactly when balanced),
    or the symbol EXPERT_LOAD when the layout holds it."""
    if isinstance(layout.expert_load, sp.Basic):
        return layout.expert_load
    return sp.Integer(1) if layout.expert_load == 1 else sp.Float(layout.expert_load)


def _gemm(gemm, axis: int, divisor):
    if gemm is None or divisor == 1:
        return gemm
    out = list(gemm)
    out[axis] = out[axis] / divisor
    return tuple(out)


def _div(value, divisor):
    return value if divisor == 1 or value == 0 else value / divisor


def _divided(op: Op, work, weights, kv=None, gemm=None) -> Op:
    """The op with FLOPs and activation bytes / work, weights and parameters / weights,
    KV bytes / kv (default work), `gemm` its new shape."""
    kv = work if kv is None else kv
    changes = {f: _div(getattr(op, f), work) for f in ("flops", "causal_flops", "other_flops", "act_read_bytes",
                                                       "act_write_bytes")}
    changes.update(kv_read_bytes=_div(op.kv_read_bytes, kv), kv_write_bytes=_div(op.kv_write_bytes, kv),
                   weight_bytes=_div(op.weight_bytes, weights), params=_div(op.params, weights),
                   param_bytes=None if op.param_bytes is None else _div(op.param_bytes, weights))
    if "held_cache_bytes" in op.tags:  # a cache held, not written this step (cross-attention's at decode)
        changes["tags"] = {**op.tags, "held_cache_bytes": _div(op.tags["held_cache_bytes"], kv)}
    if gemm is not None:
        changes["gemm"] = gemm
    return replace(op, **changes)


def split_op(op: Op, spec, layout, in_region: bool) -> Op:
    """One op's share on one GPU (see the module docstring)."""
    tp, cp, ts = layout.tp, layout.cp, layout.token_split
    local = local_name(op.name)
    kv_split = 1 if spec.mla is not None else min(tp, spec.kv_heads)
    if ".moe.experts." in op.name:
        load = _load(layout)
        gemm = op.gemm
        if layout.ep > 1 and isinstance(op.weight_bytes, sp.Basic) and B in op.weight_bytes.free_symbols:
            op = replace(op, weight_bytes=op.weight_bytes.xreplace({B: B * layout.ep}))  # ep groups' tokens
        if gemm is not None:
            gemm = (gemm[0] / layout.ep, gemm[1] * layout.ep / cp * load, *gemm[2:])
            gemm = _gemm(gemm, 2 if local in COLUMN else 3, tp) if local in COLUMN + ROW else gemm
        return _divided(op, tp * cp / load, tp * layout.ep, gemm=gemm)
    if local in LATENT and spec.mla is not None:
        return _divided(op, cp, 1, gemm=_gemm(op.gemm, 1, cp))
    if _column(local, layout) or local in ROW:
        gemm = _gemm(_gemm(op.gemm, 2 if local in COLUMN else 3, tp), 1, cp)
        return _divided(op, tp * cp, tp, kv=tp * cp, gemm=gemm)
    if op.kind in ("attention", "conv") or (op.kind == "kv_cache"):
        gemm = _gemm(_gemm(op.gemm, 0, tp), 1, cp)
        # a kernel loading the cache once per query head loads it once per local query head
        per_query = op.kind == "attention" and spec.kv_cache_reads == "per_query_head"
        return _divided(op, tp * cp, tp, kv=(tp if per_query else kv_split) * cp, gemm=gemm)
    if in_region:
        return _divided(op, tp * cp, 1, gemm=_gemm(_gemm(op.gemm, 1, tp), 1, cp))
    weights = tp if _vocab_split_embedding(op, local, layout) else 1
    return _divided(op, ts * cp, weights, gemm=_gemm(op.gemm, 1, ts * cp))


def _vocab_split_embedding(op: Op, local: str, layout) -> bool:
    """Whether `op` is the token embedding with its table split over tp by vocabulary (each
    rank looks up its rows, the partial outputs all-reduced)."""
    return layout.vocab_parallel and op.kind == "embedding" and local.endswith("embed.tokens")


# -- collectives -------------------------------------------------------------------------------


class _Placed:
    """Forward collectives and where they sit, by the placement key of their run:
    key -> [(anchor op name, 'before' | 'after', op)]."""

    def __init__(self):
        self.anchors: dict = {}
        self.key = None  # the key of the run being laid out

    def add(self, out: list, anchor: Op, where: str, coll: Op) -> None:
        out.append(coll)
        self.anchors.setdefault(self.key, []).append((anchor.name, where, coll))


def _kv_bytes(op: Op, spec):
    """Keys and values an attention core reads (its gemm (B*H, S, T, d_head)): 2 x B x T x
    kv_heads x d_head values."""
    batch_heads, _, keys, d_head = op.gemm
    return 2 * batch_heads / spec.heads * spec.kv_heads * keys * d_head * spec.dtype_bytes


def _sublayer_bytes(ops: list, k: int):
    """The bytes of the sub-layer's input at op k: its residual add's output (a sub-layer
    maps d_model-wide tokens to as many), else the op before k's output (the head's input)."""
    for orig, _ in ops[k:]:
        if RESIDUAL.search(orig.name):
            return orig.act_write_bytes
    return ops[k - 1][0].act_write_bytes


def _logits_op(ops: list, region: set):
    """The name of the op whose output is the head's vocabulary-split logits (the LM head, or
    the softcap after it), or None when `ops` hold no vocabulary-parallel head."""
    names = [o.name for o, _ in ops if o.name in region and local_name(o.name).startswith("head.")]
    return names[-1] if names else None


def _layer_forward(ops: list, spec, layout, region: set, placed: _Placed, gather_logits: bool = False) -> list:
    """One layer's forward ops (already split) with its tp, ep and cp collectives; `ops` are
    (original, split) pairs: the collectives' bytes come from the original (whole) op.
    `gather_logits` (inference): the vocabulary-split logits are all-gathered after the head."""
    tp, ts, cp = layout.tp, layout.token_split, layout.cp
    logits = _logits_op(ops, region) if gather_logits and tp > 1 else None
    reduce = "reduce_scatter" if layout.sequence_parallel else "all_reduce"
    last_expert = max((j for j, (o, _) in enumerate(ops) if ".moe.experts." in o.name), default=None)
    out: list = []
    gathered, routed = False, None

    def add(op, where, suffix, kind, nbytes, group, kernels=None):
        placed.add(out, op, where, collective(f"{op.name}.{suffix}", kind, nbytes, layer=op.layer, group=group,
                                              layout=layout, kernels=op.kernels if kernels is None else kernels))

    for k, (orig, op) in enumerate(ops):
        local = local_name(op.name)
        split_input = op.name in region or (local in LATENT and spec.mla is not None)
        if tp > 1 and layout.sequence_parallel and not gathered and split_input and k > 0:
            add(op, "before", "tp_gather", "all_gather", _sublayer_bytes(ops, k) / cp, "tp")
            gathered = True
        if tp > 1 and layout.sequence_parallel and local == "cross.kv":  # the encoder's output, split by tokens
            add(op, "before", "tp_gather", "all_gather", orig.act_read_bytes / cp, "tp")
        if cp > 1 and op.kind == "attention" and not local.startswith("cross."):
            add(op, "before", "cp_gather", "all_gather", _kv_bytes(orig, spec) / min(tp, spec.kv_heads), "cp")
        if tp > 1 and RESIDUAL.search(op.name):
            add(op, "before", "tp_reduce", reduce, orig.act_write_bytes / cp, "tp")
            gathered = False
        out.append(op)
        if tp > 1 and _vocab_split_embedding(op, local, layout):
            add(op, "after", "tp_reduce", reduce, orig.act_write_bytes / cp, "tp", kernels=1)
        if op.name == logits:  # every rank's V / tp columns of the logits, gathered for sampling
            add(op, "after", "logits_gather", "all_gather", orig.act_write_bytes / cp, "tp", kernels=1)
        if layout.ep > 1 and local.endswith("moe.dispatch"):
            routed = orig.act_write_bytes / (ts * cp) * _load(layout)
            add(op, "after", "ep_dispatch", "all_to_all", routed, "ep")
        if layout.ep > 1 and k == last_expert and routed is not None:
            add(op, "after", "ep_combine", "all_to_all", routed, "ep")
    return out


def _conjugate(coll: Op) -> Op:
    return replace(coll, pass_="bwd", variant=CONJUGATE[coll.variant])


def _layer_backward(ops: list, placed: _Placed, recomputed: list, key: int, done: set, last: bool) -> list:
    """One run of a key's backward ops with the conjugates of its forward collectives: a
    collective before an op in forward comes after its backward, one after it before; those
    whose op has no backward after the key's `last` run (`done`: the ops met in its runs)."""
    anchors = placed.anchors.get(key, [])
    by_anchor: dict = {}
    for name, where, coll in anchors:
        by_anchor.setdefault(name, []).append((where, coll))
    out = list(recomputed)
    for op in ops:
        for where, coll in by_anchor.get(op.name, []):
            if where == "after":
                out.append(_conjugate(coll))
        out.append(op)
        for where, coll in by_anchor.get(op.name, []):
            if where == "before":
                out.append(_conjugate(coll))
        done.add(op.name)
    if last:
        out += [_conjugate(c) for name, _, c in anchors if name not in done]
    return out


def _recomputation(fwd_layer: list, layout) -> list:
    """Backward-pass copies of a block's forward (full), of its attention cores (selective) or of its
    norms and elementwise ops (cheap)."""
    if layout.recompute == "none":
        return []
    chosen = fwd_layer if layout.recompute == "full" else [
        op for op in fwd_layer if (op.cheap if layout.recompute == "cheap" else op.attention_core)]
    return [replace(op, name=f"{op.name}.recompute", tags={**op.tags, "recompute": True})
            for op in chosen]


_KEY_NAMES = {DECODER_INPUT: "decoder_input", STACK_BIAS: "position_bias", DECODER_BIAS: "decoder_position_bias"}


def _data_parallel(params: dict, layout, layer: int, grad_bpp: float, weight_bpp: float, key=None) -> dict:
    """A layer's ZeRO collectives by where they go: {'pre_fwd', 'pre_bwd', 'post_bwd': [ops]}
    (see the module docstring); `params` {'dp': dense, 'edp': routed-expert} on this GPU; `key`
    (flopsim.parallel.layout.place), when not the layer, tags them `place`."""
    out: dict = {"pre_fwd": [], "pre_bwd": [], "post_bwd": []}
    zero = layout.zero
    own = {} if key is None or key == layer else {"place": key}
    for group, count in params.items():
        if not count or layout.group(group)[0] <= 1:
            continue
        grads, weights = count * grad_bpp, count * weight_bpp
        name = f"layer.{layer}" + (f".{_KEY_NAMES[key]}" if own else "") + f".{group}"

        hybrid = group == "dp" and layout.hybrid  # ZeRO within the shard group, its shards all-reduced over replicas

        def coll(suffix, op, nbytes, per, window, pass_, over=None):
            over = over or ("dp_shard" if hybrid else group)
            return collective(f"{name}.{suffix}", op, nbytes, layer=layer, group=over, layout=layout, pass_=pass_,
                              per=per, window=window, **own)
        per_reduce = "microbatch" if zero >= 2 else "step"
        out["post_bwd"].append(coll("grad_reduce", "all_reduce" if zero == 0 else "reduce_scatter", grads,
                                    per_reduce, "backward", "bwd"))
        if hybrid:
            out["post_bwd"].append(coll("grad_replica_reduce", "all_reduce", grads / layout.shard_ranks, per_reduce,
                                        "backward", "bwd", over="dp_replica"))
        if zero in (1, 2):
            out["pre_fwd"].append(coll("weight_gather", "all_gather", weights, "step", "forward", "fwd"))
        if zero == 3:
            out["pre_fwd"].append(coll("weight_gather", "all_gather", weights, "microbatch", "forward", "fwd"))
            gathers = 2 if layout.recomputes(layer) else 1  # a checkpointed block gathers again to recompute
            out["pre_bwd"] += [coll(f"weight_gather_bwd{'' if i == 0 else i}", "all_gather", weights, "microbatch",
                                    "backward", "bwd") for i in range(gathers)]
    return out


def _runs(ops: list, spec) -> list[tuple[int, list]]:
    """Contiguous runs of ops of one placement key (flopsim.parallel.layout.place), in order:
    [(key, ops)]. A key may come back (a stack's bias gradient sum is charged to its last
    block, after the block's other backward ops)."""
    runs: list = []
    for op in ops:
        key = place(op, spec)
        if runs and runs[-1][0] == key:
            runs[-1][1].append(op)
        else:
            runs.append((key, [op]))
    return runs


def _stage_layers(spec, layout) -> set:
    """The placement keys stage `layout.last_stage` runs (flopsim.parallel.layout.stage_places):
    its blocks, the embeddings on the first, the final norm and head on the last."""
    return stage_places(spec, layout.pp, layout.last_stage, layout.virtual_stages, layout.encoder_stages)


def _forward_runs(fwd: list, spec, layout, region: set, split: dict, placed: _Placed,
                  gather_logits: bool) -> tuple[list, dict]:
    """([(key, its run's forward ops with their collectives)], {key: parameters on this GPU})."""
    runs, params = [], {}
    for key, run in _runs(fwd, spec):
        placed.key = key
        runs.append((key, _layer_forward([(op, split[op.key]) for op in run], spec, layout, region, placed,
                                         gather_logits)))
        p = params.setdefault(key, {"dp": sp.Integer(0), "edp": sp.Integer(0)})
        for op in run:
            p["edp" if ".moe.experts." in op.name else "dp"] += split[op.key].params
    return runs, params


def shard(ops: list, spec, phase: str, layout, *, grad_bytes_per_param: Optional[float] = None,
          weight_bytes_per_param: Optional[float] = None) -> list:
    """One GPU's ops of one micro-batch of `phase` under `layout` (see the module docstring).
    `ops`: flopsim.predict.phase_ops of the phase; the ZeRO collectives need the bytes per
    parameter of gradients and weights (default: the spec's dtype)."""
    if layout.trivial:
        return list(ops)
    grad_bpp = spec.dtype_bytes if grad_bytes_per_param is None else grad_bytes_per_param
    weight_bpp = spec.dtype_bytes if weight_bytes_per_param is None else weight_bytes_per_param
    held = _stage_layers(spec, layout)
    fwd_all = [op for op in ops if op.pass_ == "fwd" and op.kind != "optimizer"]
    region = _regions(fwd_all, layout)
    mine = [op for op in ops if op.kind != "optimizer" and not _accumulates(op) and place(op, spec) in held]
    split = {op.key: split_op(op, spec, layout, op.name in region) for op in mine}
    placed = _Placed()
    runs, params_by_layer = _forward_runs([op for op in mine if op.pass_ == "fwd"], spec, layout, region, split,
                                          placed, gather_logits=phase != "train")
    layer_of = {key: run[0].layer for key, run in _runs(mine, spec)}
    none = {"pre_fwd": [], "pre_bwd": [], "post_bwd": []}
    dp_ops = {key: _data_parallel(p, layout, layer_of[key], grad_bpp, weight_bpp, key) if phase == "train" else none
              for key, p in params_by_layer.items()}
    recomputed: dict = {}
    out_fwd: list = []
    for key, layer_ops in runs:
        if key not in recomputed:
            out_fwd += dp_ops[key]["pre_fwd"]
            recomputed[key] = []
        if 0 <= key < spec.blocks and (layout.recompute != "full" or layout.recomputes(key)):
            recomputed[key] += _recomputation(layer_ops, layout)
        out_fwd += layer_ops
    sends_fwd, sends_bwd = _pipeline_sends(out_fwd, spec, layout)
    out_fwd += sends_fwd
    out_bwd = _backward([op for op in mine if op.pass_ == "bwd"], spec, split, placed, recomputed, dp_ops)
    if out_bwd:
        out_bwd += sends_bwd
    return out_fwd + out_bwd + _accumulation(ops, params_by_layer, layout) + _optimizer(ops, params_by_layer, layout)


def _backward(bwd: list, spec, split: dict, placed: _Placed, recomputed: dict, dp_ops: dict) -> list:
    """The stage's backward ops by runs of a key: before a key's first run its weight
    gathers and recomputation, after its last its gradient collectives (module docstring)."""
    runs = _runs(bwd, spec)
    last = {key: i for i, (key, _) in enumerate(runs)}
    none = {"pre_bwd": [], "post_bwd": []}
    out: list = []
    done: dict = {}  # key -> the names of its ops met so far
    for i, (key, run) in enumerate(runs):
        first, d = key not in done, dp_ops.get(key, none)
        out += d["pre_bwd"] if first else []
        out += _layer_backward([split[op.key] for op in run], placed, recomputed.get(key, []) if first else [],
                               key, done.setdefault(key, set()), last[key] == i)
        out += d["post_bwd"] if last[key] == i else []
    return out


def _pipeline_sends(fwd: list, spec, layout) -> tuple[list, list]:
    """(forward, backward) sends of the stage: each of its chunks sends its output on
    (but the model's last) and its input's gradient back (but the model's first), the
    last residual add's bytes / (tp * cp) (Megatron's scatter-gather); an encoder-decoder's
    decoder stage also the encoder's output, and back its gradient (the module docstring)."""
    if layout.pp <= 1:
        return [], []
    last = [op for op in fwd if op.kind != "collective" and RESIDUAL.search(op.name)]
    if not last:
        return [], []
    op = last[-1]  # already split by tp' and cp; Megatron's scatter-gather sends 1 / tp of it
    nbytes = op.act_write_bytes * layout.token_split / layout.tp
    s, v, pp = layout.last_stage, layout.virtual_stages, layout.pp
    chunks = range(s, pp * v, pp)

    def send(direction, i, what="", size=nbytes, kernels=op.kernels):
        return collective(f"stage.{s}.send_{direction}{'' if v == 1 else f'.chunk{i}'}{what}", "send_recv", size,
                          layer=op.layer, group="pp", layout=layout, kernels=kernels,
                          pass_="fwd" if direction == "fwd" else "bwd")
    fwd_sends = [send("fwd", c) for c in chunks if c < pp * v - 1]
    bwd_sends = [send("bwd", c) for c in chunks if c > 0]
    if layout.encoder_stages is None or s < layout.encoder_stages:
        return fwd_sends, bwd_sends
    kv = next(o for o in fwd if local_name(o.name) == "cross.kv" and o.kind != "collective")
    enc = kv.act_read_bytes  # its column-parallel share: the encoder's output / tp
    if s == layout.encoder_stages:  # its input is the encoder's output alone; the decoder's starts here
        bwd_sends = []
    return (fwd_sends + [send("fwd", s, ".encoder_output", enc, 1) for _ in fwd_sends],
            bwd_sends + [send("bwd", s, ".encoder_output", enc, 1)])


def _owned_share(params_by_layer: dict, layout, total, zero_from: int):
    """The share of the model's parameters this GPU holds some state of: its stage's shards,
    / the data-parallel ranks when the ZeRO stage is at least `zero_from` (routed experts'
    over theirs)."""
    dense = sum(p["dp"] for p in params_by_layer.values())
    expert = sum(p["edp"] for p in params_by_layer.values())
    if layout.zero >= zero_from:
        dense, expert = dense / layout.shard_ranks, expert / max(1, layout.group("edp")[0])
    return (dense + expert) / total if total != 0 else 0


def optimizer_share(params_by_layer: dict, layout, total):
    """The share of the parameters this GPU updates (its optimizer state: sharded from ZeRO 1)."""
    return _owned_share(params_by_layer, layout, total, 1)


def _optimizer(ops: list, params_by_layer: dict, layout) -> list:
    """The update of this GPU's parameters (`optimizer_share` of the whole update)."""
    opt = [op for op in ops if op.kind == "optimizer"]
    if not opt:
        return []
    total = sum((op.params for op in ops if op.pass_ == "fwd"), sp.Integer(0))
    return [op.scaled(optimizer_share(params_by_layer, layout, total)) for op in opt]


def _accumulates(op: Op) -> bool:
    return "grad_accumulation" in op.tags


def accumulation_share(params_by_layer: dict, layout, total):
    """The share of the parameters whose gradients this GPU accumulates (its gradient shard:
    sharded from ZeRO 2)."""
    return _owned_share(params_by_layer, layout, total, 2)


def _accumulation(ops: list, params_by_layer: dict, layout) -> list:
    """The gradient accumulation of this GPU's parameters (`accumulation_share` of the whole)."""
    acc = [op for op in ops if _accumulates(op)]
    if not acc:
        return []
    total = sum((op.params for op in ops if op.pass_ == "fwd"), sp.Integer(0))
    return [op.scaled(accumulation_share(params_by_layer, layout, total)) for op in acc]
