"""Primitive ops: the only place a cost formula is written.

Every family composes these; count, roofline, memory, validation and plots
read the Op lists they return. Each primitive returns the forward op and, in
the `train` phase, the backward op autograd runs for it (same name,
`pass_="bwd"`); `families.build_ops` orders backward ops after the forward
ones, in reverse.

Sources for the matrix-product counts are torch.utils.flop_counter's
formulas (torch 2.13), which the tests check to the integer:
- mm / addmm / bmm: 2*m*n*k per product; a Linear's backward runs one product
  for the input gradient (skipped when the input needs no gradient) and one
  for the weight gradient.
- fused attention (sdpa_flop_count): 2 products forward; its backward
  (sdpa_backward_flop_count) recomputes the scores, then 4 products: 5 in all.
  The explicit path (matmul, softmax, matmul) has 4 backward products.
- convolution (conv_flop_count): 2 * batch * out_positions * c_out *
  (c_in / groups) * kernel_positions; backward: the same for the input
  gradient, `groups` times it for the weight gradient (conv_backward_flop).

`other_flops` uses the per-element arithmetic in ELEMENTWISE_FLOPS (a
roofline input only; FlopCounterMode counts these ops as 0). Backward
elementwise work is taken as twice the forward (the derivative and the
product with the incoming gradient), except where the backward is a
different kernel (an add's is none; RoPE's is the inverse rotation).

Bytes and `other_flops` are checked against what the torch reference moves
by flopsim.torchref.bytes_check (docs/bytes.md): each op is one kernel that
reads its inputs from memory once and writes its outputs once; int64 indices
(token ids, positions, top-k picks) are INDEX_BYTES each; values a kernel
keeps only for its own backward (norm statistics, attention's log-sum-exp,
the loss's) are recomputed there, not saved.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from flopsim.ops.op import Op
from flopsim.ops.symbols import Dims
from flopsim.spec.model import DTYPE_BYTES, WEIGHT_BITS

# arithmetic per element, forward (not part of `flops`)
ELEMENTWISE_FLOPS = {
    "copy": 0,
    "add": 1,
    "mul": 1,
    "scale": 1,  # times a constant (its backward: the gradient times the constant, no saved input)
    "div": 1,
    "scale_add": 2,  # y = r * f(x) + x (MoD's router-weighted residual)
    "relu": 1,
    "gelu": 8,
    "gelu_tanh": 8,
    "silu": 4,
    "swiglu": 5,  # silu(gate) * up
    "geglu": 9,  # gelu(gate) * up
    "reglu": 2,  # relu(gate) * up
    # GPT-OSS: g = min(gate, L); (clamp(up, -L, L) + 1) * g * sigmoid(alpha g): two clamps (one
    # each, as torch's clamp is one op with both bounds), the scale by alpha, the sigmoid (4),
    # the product with g, the + 1, the product with up
    "swiglu_clamped": 10,
    "tanh": 4,
    "sigmoid": 4,
    "soft_mask": 6,  # sigmoid(n * s - 1): the affine (2) and the sigmoid (4)
    "rope": 3,  # x * cos + rotate(x) * sin
    "softcap": 6,  # cap * tanh(x / cap): the division, the tanh (4), the product
    "softcap_bwd": 10,  # tanh's derivative (twice its 4) and the two scalings (1 each)
    # autograd through GPT-OSS's unit: the two products' gradients (2 + 2), the sigmoid's (8),
    # the alpha scale's (1), g's two gradients summed (1), each clamp's mask test (2 + 1)
    "swiglu_clamped_bwd": 17,
    "softmax": 5,  # max, subtract, exp, sum, divide
    "layernorm": 8,  # mean, variance, normalise, scale, shift
    "rmsnorm": 4,  # square-mean, rsqrt, normalise, scale
    "cross_entropy": 5,  # log-softmax and the pick
    "dropout": 2,  # the random draw compared with p, the product by mask / (1 - p) (the draw itself uncounted)
}
GATED_ACTIVATION = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu", "relu": "reglu",
                    "silu_clamped": "swiglu_clamped"}
BACKWARD_ELEMENTWISE = 2  # backward elementwise arithmetic relative to forward
INDEX_BYTES = 8  # int64 indices (token ids, positions, top-k and gather indices), as torch uses
MASK_BYTES = 1  # a dropout mask: torch.bool, one byte per element


def gradient_sum(ctx: "Ctx", name: str, *, layer: int, elements, module: str, count=1, broadcast=None,
                 tags: dict | None = None) -> list[Op]:
    """train: `count` sums of a tensor's gradients, where the tensor feeds more ops than
    one (autograd sums the gradients it receives: each sum reads two, writes one, an add
    per element). `broadcast`: the second gradient is a broadcast of that many values
    (a sum's gradient), read once. A backward op only (the sum has no forward
    counterpart), charged to the tensor's last user in forward."""
    if not ctx.train:
        return []
    w = ctx.w
    second = elements if broadcast is None else broadcast
    return [Op(name=name, kind="elementwise", layer=layer, module=module, pass_="bwd", tags=tags or {},
               variant="add", other_flops=count * ELEMENTWISE_FLOPS["add"] * elements,
               act_read_bytes=count * (elements + second) * w, act_write_bytes=count * elements * w)]


def broadcast_gradient(ctx: "Ctx", name: str, *, layer: int, elements, copies, module: str,
                       tags: dict | None = None) -> list[Op]:
    """train: the gradient of a tensor of `elements` values used as `copies` broadcast copies
    (an expand) is their sum: one kernel reading the copies' gradients, writing the
    tensor's, an add per value read. A backward op only (the expand is a view)."""
    if not ctx.train:
        return []
    w = ctx.w
    return [Op(name=name, kind="elementwise", layer=layer, module=module, pass_="bwd", tags=tags or {},
               variant="sum", other_flops=elements * copies,
               act_read_bytes=elements * copies * w, act_write_bytes=elements * w)]


@dataclass(frozen=True)
class Ctx:
    """What every builder needs: the spec, the phase and the dimensions."""

    spec: object
    phase: str
    dims: Dims
    # an encoder-decoder's decoder: the encoder tokens per sequence its cross-attention
    # reads (flopsim.families.encoder_decoder); None elsewhere
    cross_keys: object = None

    @property
    def train(self) -> bool:
        return self.phase == "train"

    @property
    def w(self) -> sp.Expr:
        """Bytes per activation value (and per weight and KV-cache value unless the spec's
        `precision` stores those otherwise)."""
        return self.dims.dtype_bytes

    @property
    def w_kv(self) -> sp.Expr:
        """Bytes per KV-cache value (`precision.kv_cache`)."""
        spec = self.spec
        return self.w if spec.kv_dtype == spec.dtype else sp.Integer(DTYPE_BYTES[spec.kv_dtype])


def matrix_bytes(ctx: Ctx, elements, rows, expert: bool = False) -> sp.Expr:
    """Bytes of a weight matrix of `elements` values in `rows` output rows, stored in the
    spec's weight precision: `dtype` values, or bits / 8 per value plus one scale of
    `scale_bytes` per `group_size` values of a row (per row without a group size).
    `expert`: an MoE expert's matrix (quantized under `precision.scope: experts` too)."""
    spec = ctx.spec
    if not spec.quantized_weights or (spec.precision.scope == "experts" and not expert):
        return elements * ctx.w
    p = spec.precision
    scales = rows * sp.ceiling(elements / rows / p.group_size) if p.group_size else rows
    return elements * sp.Rational(WEIGHT_BITS[spec.weight_dtype], 8) + scales * p.scale_bytes


def weight_only_kernel(ctx: Ctx, expert: bool = False) -> str | None:
    """The kernel of a product whose weights are quantized weight-only (stored in
    `precision.weights`, dequantized inside the product, which runs in `dtype`):
    "<weights>_weights", e.g. "int4_weights" (tinygemm, Marlin), calibrated apart from
    the plain product when measured (flopsim.calibrate); None for a plain product, a
    W8A8 / fp8 one (its own peak) or a product outside `precision.scope`."""
    spec = ctx.spec
    if not spec.quantized_weights or (spec.precision.scope == "experts" and not expert):
        return None
    return f"{spec.weight_dtype}_weights" if spec.compute_dtype == spec.dtype else None


def _with_backward(ctx: Ctx, fwd: Op, bwd: dict | None) -> list[Op]:
    if not ctx.train or bwd is None:
        return [fwd]
    return [fwd, Op(name=fwd.name, kind=fwd.kind, layer=fwd.layer, module=fwd.module, pass_="bwd",
                    gemm=bwd.pop("gemm", fwd.gemm), tags=fwd.tags, variant=fwd.variant, **bwd)]


def linear(ctx: Ctx, name: str, *, layer: int, tokens, d_in, d_out, bias: bool,
           module: str | None = None, kind: str = "matmul", tied: bool = False,
           input_grad: bool = True, batch=1, tags: dict | None = None, expert: bool = False) -> list[Op]:
    """y = x W^T (+ b) on `tokens` rows; `batch` independent weight matrices
    (batched experts) each see `tokens` rows. `tied`: the weight belongs to
    another op (it is read, not owned; a bias is still this op's). `expert`:
    MoE experts' weights (their precision scope, `matrix_bytes`).

    Backward, one kernel: reads the gradient and the saved input once, and W
    when the input needs a gradient (not the bias); writes grad W, grad b and
    grad x. A tied weight's two gradients are summed (read both, write the
    sum), charged here: this op is the weight's last user in forward, whose
    gradient autograd receives first."""
    w = ctx.w
    mnk = batch * tokens * d_in * d_out
    matrix = batch * d_in * d_out
    weight = matrix + (batch * d_out if bias else 0)
    # the weights in their stored precision (a tied head reads the embedding table's dtype)
    stored = weight * w if tied else matrix_bytes(ctx, matrix, batch * d_out, expert) + (batch * d_out * w if bias else 0)
    fwd = Op(
        name=name, kind=kind, layer=layer, module=module or name,
        flops=2 * mnk,
        other_flops=batch * tokens * d_out if bias else 0,  # bias add
        weight_bytes=stored,
        act_read_bytes=batch * tokens * d_in * w,
        act_write_bytes=batch * tokens * d_out * w,
        params=weight - matrix if tied else weight,  # tied: its bias alone
        param_bytes=(weight - matrix) * w if tied else stored,
        gemm=(batch, tokens, d_out, d_in),
        tags=tags or {},
        variant=None if tied else weight_only_kernel(ctx, expert),
    )
    products = 2 if input_grad else 1  # grad-input (when needed) and grad-weight
    bwd = dict(
        flops=2 * mnk * products,
        other_flops=(batch * tokens * d_out if bias else 0)  # bias-gradient reduction
        + (matrix if tied else 0),  # the tied gradients' sum
        weight_bytes=(weight + (matrix if input_grad else 0)  # write grad W (and b); read W for grad-in
                      + (3 * matrix if tied else 0)) * w,  # tied: read both gradients, write their sum
        act_read_bytes=batch * tokens * (d_out + d_in) * w,  # grad_out, saved input
        act_write_bytes=(batch * tokens * d_in * w) if input_grad else 0,
    )
    return _with_backward(ctx, fwd, bwd)


def _cache_reads(ctx: Ctx, heads, kv_heads):
    """Loads of each cached key/value head by a decode step's attention (`kv_cache_reads`):
    1, or one per query head of its group (a thread block per query head)."""
    if ctx.phase == "decode" and ctx.spec.kv_cache_reads == "per_query_head":
        return sp.Integer(heads) / kv_heads
    return 1


def attention(ctx: Ctx, name: str, *, layer: int, batch, queries, keys, heads, kv_heads,
              d_head, causal: bool, kv_from_cache: bool, module: str,
              tags: dict | None = None, window=None, d_v=None, kv_width=None, softcap: bool = False,
              sinks: bool = False, dropout: bool = False) -> list[Op]:
    """softmax(Q K^T / sqrt(d_head)) V for `queries` x `keys` per sequence and head.
    Scores are the full queries x keys product (what FlopCounterMode counts);
    `causal_flops` (what a kernel that skips masked blocks runs) counts the
    triangle: query j (0-based) of the last `queries` positions sees
    keys - queries + j + 1 keys; with a sliding `window`, min(window, that).
    `d_v`: the value head width when it differs from the query/key width d_head
    (multi-head latent attention); `kv_width`: values a fused kernel reads per key and
    key/value head (default d_head + d_v: K and V apart; MLA's absorbed form reads one
    latent that is both; explicit products read keys and values apart whatever it is). `softcap`: the scores capped, cap * tanh(s / cap), inside the
    kernel (Gemma 2); `sinks`: one learned logit per head joins every softmax
    (GPT-OSS; `heads` parameters, a column more per softmax). `dropout` (train, fused):
    the kernel drops probabilities inside (FlashAttention with dropout_p: the mask
    regenerated from the RNG seed in backward, none stored), its bytes unchanged, the
    dropout's arithmetic per score added forward and backward; an explicit attention's
    dropout is its own kernel (`dropout`, flopsim.families.dense). sdpa_flop_count: Q K^T 2 d_head, P V 2 d_v per score; backward
    (sdpa_backward_flop_count) 3 products of d_head (the recomputed scores, dQ, dK)
    and 2 of d_v (dV, dP); explicit: 2 of each."""
    w = ctx.w
    impl = ctx.spec.attention_impl
    d_v = d_head if d_v is None else d_v
    # a fused kernel reads a latent that is both key and value once; explicit products each read theirs
    kv_width = d_head + d_v if kv_width is None or impl == "explicit" else kv_width
    per_score = batch * heads * queries * keys  # query-key pairs over heads
    triangle = queries * keys - queries * (queries - 1) / 2 if causal else queries * keys
    if window is not None:  # the first m queries see a + j <= window keys, the rest `window`
        a = keys - queries + 1
        m = sp.Max(0, sp.Min(queries, window - a + 1))
        triangle = m * a + m * (m - 1) / 2 + (queries - m) * window
    causal_fraction = triangle / (queries * keys)
    scores = per_score
    q_bytes = batch * queries * heads * d_head * w
    o_bytes = batch * queries * heads * d_v * w  # the output: a value-width row per query and head
    kv_bytes = batch * keys * kv_heads * kv_width * w
    materialised = 4 * scores * w if impl == "explicit" else 0  # write/read scores, write/read probs
    fwd_flops = 2 * per_score * (d_head + d_v)  # Q K^T and P V (sdpa_flop_count)
    in_kernel_dropout = ELEMENTWISE_FLOPS["dropout"] if dropout and ctx.train and impl == "fused" else 0
    per_score_ops = ELEMENTWISE_FLOPS["softmax"] + 1 + (ELEMENTWISE_FLOPS["softcap"] if softcap else 0) \
        + in_kernel_dropout
    # each softmax row's sink: in its max and its sum (max, subtract, exp, add; no probability kept)
    sink_rows = batch * heads * queries if sinks else 0
    sink_ops = 4
    fwd = Op(
        name=name, kind="attention", layer=layer, module=module,
        flops=fwd_flops,
        causal_flops=fwd_flops * causal_fraction,
        # softmax and the 1/sqrt(d) scale (and the cap) per score
        other_flops=scores * per_score_ops + sink_rows * sink_ops,
        weight_bytes=heads * w if sinks else 0,
        params=heads if sinks else 0,
        act_read_bytes=q_bytes + (0 if kv_from_cache else kv_bytes) + materialised / 2,
        kv_read_bytes=kv_bytes / w * ctx.w_kv * _cache_reads(ctx, heads, kv_heads) if kv_from_cache else 0,
        act_write_bytes=o_bytes + materialised / 2,
        gemm=(batch * heads, queries, keys, d_head),
        tags=tags or {},
        variant=impl,
    )
    # fused recomputes Q K^T (sdpa_backward_flop_count): 3 products of d_head, 2 of d_v
    bwd_flops = 2 * per_score * ((3 if impl == "fused" else 2) * d_head + 2 * d_v)
    bwd = dict(
        flops=bwd_flops,
        causal_flops=bwd_flops * causal_fraction,
        other_flops=scores * (ELEMENTWISE_FLOPS["softmax"] * BACKWARD_ELEMENTWISE + 1  # and the scale's
                              + (ELEMENTWISE_FLOPS["softcap_bwd"] if softcap else 0) + in_kernel_dropout)
        + sink_rows * sink_ops * BACKWARD_ELEMENTWISE,
        weight_bytes=2 * heads * w if sinks else 0,  # read the sinks, write their gradient
        # fused (one kernel): q, o, dO, k, v in; dq, dk, dv out. explicit (three kernels):
        # P V's backward reads dO, V, P and writes dP, dV; softmax's reads dP, P and writes
        # dS; Q K^T's reads dS, Q, K and writes dQ, dK
        # (explicit with a soft cap: its backward reads the saved capped scores too)
        act_read_bytes=(q_bytes + 2 * o_bytes + kv_bytes) if impl == "fused"
        else (q_bytes + o_bytes + kv_bytes + (5 if softcap else 4) * scores * w),
        act_write_bytes=q_bytes + kv_bytes + (2 * scores * w if impl == "explicit" else 0),
    )
    return _with_backward(ctx, fwd, bwd)


def conv2d(ctx: Ctx, name: str, *, layer: int, batch, c_in, c_out, out_positions, kernel_positions,
           groups=1, bias: bool, module: str, input_grad: bool = True,
           tags: dict | None = None) -> list[Op]:
    """A 2-D convolution with `out_positions` output positions (padding 'same')."""
    w = ctx.w
    macs = batch * out_positions * c_out * (c_in / groups) * kernel_positions
    weight = c_out * (c_in / groups) * kernel_positions + (c_out if bias else 0)
    fwd = Op(
        name=name, kind="conv", layer=layer, module=module,
        flops=2 * macs,  # conv_flop_count
        other_flops=batch * out_positions * c_out if bias else 0,
        weight_bytes=weight * w,
        act_read_bytes=batch * out_positions * c_in * w,
        act_write_bytes=batch * out_positions * c_out * w,
        params=weight,
        tags=tags or {},
    )
    bwd = dict(
        # conv_backward_flop: grad input as the forward; grad weight counts every
        # input channel (groups times the forward's c_in / groups)
        flops=2 * macs * ((1 if input_grad else 0) + groups),
        weight_bytes=weight * (2 if input_grad else 1) * w,
        act_read_bytes=batch * out_positions * (c_in + c_out) * w,
        act_write_bytes=(batch * out_positions * c_in * w) if input_grad else 0,
    )
    return _with_backward(ctx, fwd, bwd)


def elementwise(ctx: Ctx, name: str, *, layer: int, elements, op: str, inputs: int = 1,
                module: str, kind: str = "elementwise", backward: bool = True,
                tags: dict | None = None) -> list[Op]:
    """An elementwise kernel over `elements` outputs reading `inputs` tensors of that size.
    Backward: one kernel reading the gradient and the saved inputs, writing each
    input's gradient, at BACKWARD_ELEMENTWISE times the forward arithmetic -- except
    an add, whose backward passes the gradient through unchanged: a backward op with
    no cost (no kernel runs; a residual's gradient sum is `residual_add`'s)."""
    w = ctx.w
    per = ELEMENTWISE_FLOPS[op] * (max(inputs - 1, 1) if op == "add" else 1)  # n inputs: n - 1 adds
    fwd = Op(name=name, kind=kind, layer=layer, module=module,
             other_flops=per * elements,
             act_read_bytes=inputs * elements * w,
             act_write_bytes=elements * w,
             tags=tags or {}, variant=op)
    bwd = dict(other_flops=per * elements * BACKWARD_ELEMENTWISE,
               act_read_bytes=(inputs + 1) * elements * w,  # grad_out and saved inputs
               act_write_bytes=inputs * elements * w) if backward else None
    if backward and op == "add":
        bwd = {}  # the gradient passes through
    if backward and op == "scale":  # the gradient times the constant: read it, write it
        bwd = dict(other_flops=per * elements, act_read_bytes=elements * w, act_write_bytes=elements * w)
    if backward and op in ("softcap", "swiglu_clamped"):  # a derivative of its own, not twice the forward
        bwd["other_flops"] = ELEMENTWISE_FLOPS[f"{op}_bwd"] * elements
    return _with_backward(ctx, fwd, bwd)


def dropout(ctx: Ctx, name: str, *, layer: int, elements, p: float, module: str,
            tags: dict | None = None) -> list[Op]:
    """Training dropout of `elements` values with probability p (train only, p > 0; else
    no op: nn.Dropout is the identity), as torch's native_dropout runs it on a GPU, one
    kernel: reads x, writes the output and the kept-values mask (bool, MASK_BYTES each),
    which backward needs. Backward (native_dropout_backward), one kernel: reads the
    gradient and the mask, writes the input's gradient (grad * mask / (1 - p))."""
    if not ctx.train or not p:
        return []
    w = ctx.w
    per = ELEMENTWISE_FLOPS["dropout"]
    fwd = Op(name=name, kind="elementwise", layer=layer, module=module,
             other_flops=per * elements,
             act_read_bytes=elements * w,
             act_write_bytes=elements * (w + MASK_BYTES),
             tags=tags or {}, variant="dropout")
    bwd = dict(other_flops=per * elements,
               act_read_bytes=elements * (w + MASK_BYTES),
               act_write_bytes=elements * w)
    return _with_backward(ctx, fwd, bwd)


def residual_add(ctx: Ctx, name: str, *, layer: int, elements, module: str,
                 tags: dict | None = None) -> list[Op]:
    """x + f(x): the add of a residual branch. Its backward passes the gradient to
    both inputs; x, having fed both f and this add, then gets the sum of its two
    gradients -- one kernel reading two, writing one, an add per element."""
    w = ctx.w
    fwd = Op(name=name, kind="elementwise", layer=layer, module=module,
             other_flops=ELEMENTWISE_FLOPS["add"] * elements,
             act_read_bytes=2 * elements * w,
             act_write_bytes=elements * w,
             tags=tags or {}, variant="add")
    bwd = dict(other_flops=ELEMENTWISE_FLOPS["add"] * elements,
               act_read_bytes=2 * elements * w,
               act_write_bytes=elements * w)
    return _with_backward(ctx, fwd, bwd)


def rope(ctx: Ctx, name: str, *, layer: int, tokens, heads, kv_heads, d_head, module: str, positions,
         tags: dict | None = None) -> list[Op]:
    """Rotary embedding of `heads` query and `kv_heads` key heads of d_head on `tokens` tokens,
    one kernel: it reads x and the int64 position ids (the angles are made on chip) and
    writes x * cos + rotate(x) * sin. RoPE is a rotation, so its backward is the
    inverse rotation: the same arithmetic on the gradient, without the saved input. The
    spec's `rope_impl` other than fused runs `rope_eager` (`positions`: the positions a
    sequence holds, the rows of its frequency table; the fused kernel makes its angles)."""
    if ctx.spec.rope_impl != "fused":
        return rope_eager(ctx, name, layer=layer, tokens=tokens, heads=heads, kv_heads=kv_heads, d_head=d_head,
                          module=module, positions=positions, tags=tags)
    w = ctx.w
    elements = tokens * (heads + kv_heads) * d_head
    per = ELEMENTWISE_FLOPS["rope"]
    fwd = Op(name=name, kind="elementwise", layer=layer, module=module,
             other_flops=per * elements,
             act_read_bytes=elements * w + tokens * INDEX_BYTES,
             act_write_bytes=elements * w,
             tags=tags or {}, variant="rope")
    bwd = dict(other_flops=per * elements,
               act_read_bytes=elements * w + tokens * INDEX_BYTES,
               act_write_bytes=elements * w)
    return _with_backward(ctx, fwd, bwd)


def _rope_eager_costs(impl: str, n, w, tokens, positions, d_head) -> dict:
    """One tensor's (n elements: the queries' or the keys') eager RoPE, each aten op a kernel:
    pass -> (read, write, kernels, arithmetic), the bytes of the matrices the layer gathers
    (`gathered`, read by each product), and the widest kernel's working set (`widest`). f = 4
    (fp32), c = 1 when the dtype is not fp32 (a cast is a kernel), else 0.
    - rotate_half (transformers: q * cos + cat(-q2, q1) * sin; cos and sin [tokens, d_head]
      in dtype, made once a forward by the model): forward mul, neg (half), cat, mul, add:
      reads 5.5 n w + 2 tables, writes 4.5 n w, 3.5 n arithmetic. Backward mul, neg, mul,
      two slice_backward (the halves' zero-padded gradients) and two adds into q's:
      reads 7.5 n w + 2 tables, writes 6.5 n w, 4.5 n arithmetic.
    - complex_fp32 (Meta: view_as_complex(q.float()) * freqs, back to real, type_as(q);
      freqs [positions, d_head / 2] complex64): forward cast (c), complex product, cast (c);
      backward cast (c), freqs.conj() materialised, the product, cast (c). A complex
      product is 6 real operations (3 a real element).
    - pairs_fp32 (fms: freqs [tokens, d_head / 2, 2, 2] fp32 gathered per layer from the
      cached table, freqs.mul(q.float() as pairs).sum(-1), type_as(q)): cast (c), broadcast
      product (2n outputs), sum (over 2n), cast (c); backward the same kernels (the sum's
      gradient broadcast into the product by the matrices, summed over the pair)."""
    f, c = 4, (0 if w == 4 else 1)
    casts = c * (n * w + n * f)  # x.float() and .type_as(x): each reads one form, writes the other
    if impl == "rotate_half":
        table = tokens * d_head * w
        return dict(fwd=(sp.Rational(11, 2) * n * w + 2 * table, sp.Rational(9, 2) * n * w, 5, sp.Rational(7, 2) * n),
                    bwd=(sp.Rational(15, 2) * n * w + 2 * table, sp.Rational(13, 2) * n * w, 7,
                         sp.Rational(9, 2) * n), gathered=0, widest=3 * n * w)  # the add: 2n read, n written
    if impl == "complex_fp32":
        table = positions * d_head * 4  # d_head / 2 complex64 values a position
        return dict(fwd=(casts + n * f + table, casts + n * f, 1 + 2 * c, 3 * n),
                    bwd=(casts + n * f + 2 * table, casts + n * f + table, 2 + 2 * c, 3 * n), gathered=0,
                    widest=2 * n * f + table)  # the product
    table = tokens * d_head * 8  # d_head / 2 2 x 2 fp32 matrices a token
    step = (casts + 3 * n * f + table, casts + 3 * n * f, 2 + 2 * c, 4 * n)
    return dict(fwd=step, bwd=step, gathered=table, widest=3 * n * f + table)  # the product: n + table in, 2n out


def rope_eager(ctx: Ctx, name: str, *, layer: int, tokens, heads, kv_heads, d_head, module: str, positions,
               tags: dict | None = None) -> list[Op]:
    """RoPE as eager code runs it (`rope_impl`; `_rope_eager_costs` derives each form): the
    queries' kernels, then the keys' (pairs_fp32: after one gather of the layer's matrices,
    reading the int64 ids and the selected rows). Memory (flopsim.memory): autograd keeps the
    output (and pairs_fp32's gathered matrices, which both products save; cos, sin and the
    complex table are the model's, made once: not counted): tag `kept_bytes`; the largest
    kernel's working set is the queries' widest kernel's (`working_bytes`)."""
    w = ctx.w
    parts = [_rope_eager_costs(ctx.spec.rope_impl, tokens * h * d_head, w, tokens, positions, d_head)
             for h in (heads, kv_heads)]
    gathered = parts[0]["gathered"]
    gather = (tokens * INDEX_BYTES + gathered, gathered, 1) if gathered else (0, 0, 0)

    def total(p, i):
        return sum(part[p][i] for part in parts)

    out = tokens * (heads + kv_heads) * d_head * w
    fwd = Op(name=name, kind="elementwise", layer=layer, module=module,
             other_flops=total("fwd", 3),
             act_read_bytes=total("fwd", 0) + gather[0],
             act_write_bytes=total("fwd", 1) + gather[1],
             kernels=sp.Integer(total("fwd", 2) + gather[2]), variant=f"rope_{ctx.spec.rope_impl}",
             tags={**(tags or {}), "kept_bytes": out + gathered, "working_bytes": parts[0]["widest"]})
    bwd = dict(other_flops=total("bwd", 3), act_read_bytes=total("bwd", 0), act_write_bytes=total("bwd", 1),
               kernels=sp.Integer(total("bwd", 2)))
    return _with_backward(ctx, fwd, bwd)


def activation(ctx: Ctx, name: str, *, layer: int, elements, gated: bool, module: str,
               tags: dict | None = None) -> list[Op]:
    """The FFN's activation over `elements` outputs: act(x), or act(gate) * up when `gated`,
    one kernel; the spec's `act_impl: unfused` runs a gated one as `gated_activation_unfused`."""
    if gated and ctx.spec.act_impl == "unfused":
        return gated_activation_unfused(ctx, name, layer=layer, elements=elements, module=module, tags=tags)
    op = GATED_ACTIVATION[ctx.spec.activation] if gated else ctx.spec.activation
    return elementwise(ctx, name, layer=layer, elements=elements, op=op, inputs=2 if gated else 1, module=module,
                       tags=tags)


def gated_activation_unfused(ctx: Ctx, name: str, *, layer: int, elements, module: str,
                             tags: dict | None = None) -> list[Op]:
    """act(gate) * up as eager code writes it (transformers' LlamaMLP, fms's GatedLinearUnit):
    s = act(gate) (reads E, writes E) and s * up (reads 2E, writes E), a kernel each, E =
    `elements`. Backward: grad * up and grad * s (MulBackward, each reads 2E, writes E), then
    act's backward (reads grad_s and gate, writes E): 6E read, 3E written. Arithmetic a + 1
    per element forward, 2 + 2a backward (a: the activation's; its backward twice it). The
    join of gate's and up's gradients is the SPLIT convention's (docs/bytes.md: free, as with
    flopsim's fused gate_up product; code with two projections sums x's two gradients
    instead). Autograd keeps s and the output (`kept_bytes`, 2E); the widest kernel is the
    product's (`working_bytes`, 3E)."""
    w = ctx.w
    a = ELEMENTWISE_FLOPS[ctx.spec.activation]
    fwd = Op(name=name, kind="elementwise", layer=layer, module=module,
             other_flops=(a + 1) * elements,
             act_read_bytes=3 * elements * w,
             act_write_bytes=2 * elements * w,
             kernels=sp.Integer(2), variant=f"{GATED_ACTIVATION[ctx.spec.activation]}_unfused",
             tags={**(tags or {}), "kept_bytes": 2 * elements * w, "working_bytes": 3 * elements * w})
    bwd = dict(other_flops=(2 + 2 * a) * elements,
               act_read_bytes=6 * elements * w,
               act_write_bytes=3 * elements * w,
               kernels=sp.Integer(3))
    return _with_backward(ctx, fwd, bwd)


def norm(ctx: Ctx, name: str, *, layer: int, tokens, d, module: str | None = None) -> list[Op]:
    """LayerNorm (weight, and bias when the spec has biases) or RMSNorm (weight) over d; the
    spec's `norm_impl: fp32_unfused` runs the RMSNorm as `rmsnorm_fp32_unfused`."""
    if ctx.spec.norm_impl == "fp32_unfused":
        return rmsnorm_fp32_unfused(ctx, name, layer=layer, tokens=tokens, d=d, module=module)
    w = ctx.w
    kind = ctx.spec.norm
    weight = d * (2 if kind == "layernorm" and ctx.spec.bias else 1)
    per = ELEMENTWISE_FLOPS[kind]
    fwd = Op(name=name, kind="norm", layer=layer, module=module or name,
             other_flops=per * tokens * d,
             weight_bytes=weight * w,
             act_read_bytes=tokens * d * w,
             act_write_bytes=tokens * d * w,
             params=weight, variant=kind)
    bwd = dict(other_flops=per * tokens * d * BACKWARD_ELEMENTWISE,
               weight_bytes=2 * weight * w,  # read weight, write its gradient
               act_read_bytes=2 * tokens * d * w,  # saved input, grad_out
               act_write_bytes=tokens * d * w)
    return _with_backward(ctx, fwd, bwd)


def rmsnorm_fp32_unfused(ctx: Ctx, name: str, *, layer: int, tokens, d, module: str | None = None) -> list[Op]:
    """RMSNorm over d as eager code writes it (transformers' LlamaRMSNorm, Meta's reference, IBM
    fms with use_high_precision_pow), each line a kernel: h = x.to(fp32) (a kernel unless the
    dtype is fp32: `c`), p = h.pow(2), m = p.mean(-1), a = m + eps, r = rsqrt(a) (per row), n =
    h * r, y = weight * n.to(dtype) (`c` again). Per element, with w the dtype's bytes and f = 4:
    forward reads c(w + f) + 3f + w, writes c(f + w) + 2f + w; per row 3f each way. Backward,
    autograd through them: the weight's gradient (grad * n, summed over rows), grad * weight,
    cast to fp32 (c), then the two paths into h (grad * r; grad * h summed per row, through
    rsqrt, the mean's expand, pow's 2h) and their sum, cast back (c): reads 4w + 10f + c(w + f),
    writes 2w + 7f + c(f + w) per element, 6f and 4f per row. 6 + 2c kernels forward, 14 + 2c
    backward. Arithmetic as the counter counts it: 4 per element + 2 per row forward, 11 + 3
    backward. For flopsim.memory: autograd keeps y, n in dtype, h (c) and r (tag `kept_bytes`);
    the input is x (`input_bytes`); the largest kernel's working set is n = h * r's
    (`working_bytes`)."""
    w, f = ctx.w, 4
    c = 0 if w == f else 1
    fwd = Op(name=name, kind="norm", layer=layer, module=module or name,
             other_flops=4 * tokens * d + 2 * tokens,
             weight_bytes=d * w,
             act_read_bytes=tokens * d * (c * (w + f) + 3 * f + w) + 3 * f * tokens,
             act_write_bytes=tokens * d * (c * (f + w) + 2 * f + w) + 3 * f * tokens,
             params=d, variant="rmsnorm_fp32_unfused", kernels=sp.Integer(6 + 2 * c),
             tags={"kept_bytes": tokens * d * (2 * w + c * f) + f * tokens,  # y, n, h (c), r
                   "input_bytes": tokens * d * w,  # the block's input x, as the fused norm reads it
                   "working_bytes": 2 * f * tokens * d + f * tokens})  # the largest kernel's: n = h * r
    bwd = dict(other_flops=11 * tokens * d + 3 * tokens,
               weight_bytes=2 * d * w,  # read the weight, write its gradient
               act_read_bytes=tokens * d * (4 * w + 10 * f + c * (w + f)) + 6 * f * tokens,
               act_write_bytes=tokens * d * (2 * w + 7 * f + c * (f + w)) + 4 * f * tokens,
               kernels=sp.Integer(14 + 2 * c))
    return _with_backward(ctx, fwd, bwd)


def embedding(ctx: Ctx, name: str, *, layer: int, tokens, rows, d, module: str | None = None) -> list[Op]:
    """A table lookup: reads the int64 ids and `tokens` rows of a rows x d table.
    Backward (embedding_dense_backward) reads the gradient and the ids, adds each
    gradient row into its table row and writes the whole table's gradient."""
    w = ctx.w
    fwd = Op(name=name, kind="embedding", layer=layer, module=module or name,
             weight_bytes=tokens * d * w,
             act_read_bytes=tokens * INDEX_BYTES,
             act_write_bytes=tokens * d * w,
             params=rows * d)
    bwd = dict(other_flops=tokens * d,  # each gradient row added into the table's gradient
               weight_bytes=rows * d * w,  # embedding_dense_backward writes a full-size gradient
               act_read_bytes=tokens * d * w + tokens * INDEX_BYTES)
    return _with_backward(ctx, fwd, bwd)


def kv_cache_append(ctx: Ctx, name: str, *, layer: int, batch, tokens, width, module: str,
                    tags: dict | None = None) -> list[Op]:
    """The cache entries of `tokens` new tokens per sequence, `width` values each (keys and
    values: 2 * kv_heads * d_head; MLA: its latent and rotary key), appended to the cache."""
    values = batch * tokens * width  # read as activations, written in the cache's precision
    return [Op(name=name, kind="kv_cache", layer=layer, module=module,
               act_read_bytes=values * ctx.w, kv_write_bytes=values * ctx.w_kv, tags=tags or {})]


def cross_entropy(ctx: Ctx, name: str, *, layer: int, rows, classes, module: str) -> list[Op]:
    """Softmax cross-entropy over `rows` x `classes` logits and int64 targets (train
    only), one fused kernel per pass: forward reads the logits and the targets and
    writes the (scalar) loss; backward reads them again (the row statistics are
    recomputed, not saved) and writes the logits' gradient. `spec.loss_impl:
    fp32_unfused`: `cross_entropy_fp32_unfused`'s kernels instead (module `<module>.loss`)."""
    if ctx.spec.loss_impl == "fp32_unfused":
        return cross_entropy_fp32_unfused(ctx, name, layer=layer, rows=rows, classes=classes,
                                          module=f"{module}.loss")
    w = ctx.w
    fwd = Op(name=name, kind="loss", layer=layer, module=module,
             other_flops=ELEMENTWISE_FLOPS["cross_entropy"] * rows * classes,
             act_read_bytes=rows * classes * w + rows * INDEX_BYTES)
    bwd = dict(other_flops=ELEMENTWISE_FLOPS["cross_entropy"] * rows * classes,
               act_read_bytes=rows * classes * w + rows * INDEX_BYTES,
               act_write_bytes=rows * classes * w)
    return _with_backward(ctx, fwd, bwd)


def cross_entropy_fp32_unfused(ctx: Ctx, name: str, *, layer: int, rows, classes, module: str) -> list[Op]:
    """Megatron-LM's vocab_parallel_cross_entropy without loss fusion (`spec.loss_impl:
    fp32_unfused`) over `rows` x `classes` logits: the logits cast to fp32, then one
    kernel per step over the fp32 copy, in place where Megatron works in place. With
    n = rows x classes, f = 4 bytes (fp32) and w the spec's dtype:
    - forward: the cast (reads n w, writes n f; none when the dtype is fp32: .float()
      returns the logits themselves), the row max (reads n f, writes rows), its
      subtraction (reads n f and the maxima, writes n f), the targets' logits picked
      (reads the int64 targets and one value a row, writes rows), exp (reads and
      writes n f), the row sum (reads n f, writes rows), log of the sum minus the pick
      (two kernels over rows), the division by the sum (`softmax`: reads n f and the
      sums, writes n f, kept for backward) and the mean (reads rows);
    - backward: the mean's (writes rows); one autograd node (`softmax`) subtracting
      one at each target (reads the targets and one value a row, writes it) and
      scaling the softmax by the rows' gradients in place (reads n f and them, writes
      n f); the cast of the gradient back to the dtype (reads n f, writes n w; none at
      fp32).
    Arithmetic: 1 per element of each step (a reduction: per element read), as the
    torch counter's table. Megatron's vocab-range masking of targets (tensor-parallel
    ranks) touches only rows-sized tensors and is not counted. The steps overwriting
    the fp32 copy are tagged `in_place` (flopsim.memory keeps that buffer once: the
    cast's, or at fp32 the logits); a backward op shares the name of the forward op it
    belongs to (flopsim.parallel.shard splits it with it)."""
    w, f, n = ctx.w, DTYPE_BYTES["fp32"], rows * classes

    def step(suffix, kind="elementwise", variant="", pass_="fwd", in_place=False, **cost):
        return Op(name=f"{name}.{suffix}", kind=kind, layer=layer, module=module, pass_=pass_,
                  variant=variant or suffix, tags={"in_place": True} if in_place else {}, **cost)

    cast = w != f
    ops = [step("cast", variant="copy", act_read_bytes=n * w, act_write_bytes=n * f)] if cast else []
    ops += [step("max", other_flops=n, act_read_bytes=n * f, act_write_bytes=rows * f),
            step("sub", in_place=True, other_flops=n, act_read_bytes=n * f + rows * f, act_write_bytes=n * f),
            step("pick", kind="gather", variant="gather", act_read_bytes=rows * (INDEX_BYTES + f),
                 act_write_bytes=rows * f),
            step("exp", in_place=True, other_flops=n, act_read_bytes=n * f, act_write_bytes=n * f),
            step("sum", other_flops=n, act_read_bytes=n * f, act_write_bytes=rows * f),
            step("log", other_flops=rows, act_read_bytes=rows * f, act_write_bytes=rows * f),
            step("nll", variant="sub", other_flops=rows, act_read_bytes=2 * rows * f, act_write_bytes=rows * f),
            step("softmax", variant="div", in_place=True, other_flops=n, act_read_bytes=n * f + rows * f,
                 act_write_bytes=n * f),
            step("mean", other_flops=rows, act_read_bytes=rows * f)]
    # backward, listed as its forward (families.build_ops runs backward ops in reverse order)
    if cast:
        ops += [step("cast", variant="copy", pass_="bwd", act_read_bytes=n * f, act_write_bytes=n * w)]
    return ops + [step("softmax", variant="mul", pass_="bwd", in_place=True, other_flops=n + rows,  # scale; minus one
                       act_read_bytes=n * f + rows * (INDEX_BYTES + 2 * f), act_write_bytes=n * f + rows * f),
                  step("mean", variant="div", pass_="bwd", other_flops=rows, act_write_bytes=rows * f)]


def binary_cross_entropy(ctx: Ctx, name: str, *, layer: int, rows, picked, module: str,
                         tags: dict | None = None) -> list[Op]:
    """Binary cross-entropy with logits of `rows` scores against a 0/1 target given by
    `picked` int64 indices (top-k membership; train only), one fused kernel per pass:
    forward reads the scores and the indices and writes the (scalar) loss; backward
    reads them again and writes the scores' gradient."""
    w = ctx.w
    per = ELEMENTWISE_FLOPS["cross_entropy"]
    fwd = Op(name=name, kind="loss", layer=layer, module=module, other_flops=per * rows,
             act_read_bytes=rows * w + picked * INDEX_BYTES, tags=tags or {})
    bwd = dict(other_flops=per * rows, act_read_bytes=rows * w + picked * INDEX_BYTES, act_write_bytes=rows * w)
    return _with_backward(ctx, fwd, bwd)


def topk(ctx: Ctx, name: str, *, layer: int, rows, n, k, module: str, kind: str = "topk",
         values: bool = True, backward: bool = False, tags: dict | None = None) -> list[Op]:
    """Select k of n scores in each of `rows` rows: int64 indices out, and the values
    unless `values` is False (a caller using only the indices: the values are not
    written). `backward` (the values carry a gradient, e.g. combination weights): the
    backward scatters the k gradients per row into the scores' zero-filled gradient
    (reads them and the indices, writes them)."""
    w = ctx.w
    fwd = Op(name=name, kind=kind, layer=layer, module=module,
             other_flops=rows * n,  # one comparison per score
             act_read_bytes=rows * n * w,
             act_write_bytes=rows * k * ((w if values else 0) + INDEX_BYTES),
             tags=tags or {})
    bwd = dict(act_read_bytes=rows * k * (w + INDEX_BYTES), act_write_bytes=rows * k * w) if backward else None
    return _with_backward(ctx, fwd, bwd)


def slot_assignment(ctx: Ctx, name: str, *, layer: int, pairs, slots, routed, module: str,
                    tags: dict | None = None) -> list[Op]:
    """Capacity routing's bookkeeping, one kernel: reads each of `pairs` (token, choice)
    pairs' int64 expert and its combination weight; a cumsum over the pairs x `routed`
    one-hot ranks each pair within its expert (an add per one-hot element); writes each
    of `slots` slots' int64 token and weight. Backward reads the slots' weight gradients
    and the experts (the placement is recomputed) and writes the pairs' weight gradients."""
    w = ctx.w
    fwd = Op(name=name, kind="elementwise", layer=layer, module=module,
             other_flops=pairs * routed,
             act_read_bytes=pairs * (INDEX_BYTES + w),
             act_write_bytes=slots * (INDEX_BYTES + w),
             tags=tags or {}, variant="add")
    bwd = dict(act_read_bytes=slots * w + pairs * INDEX_BYTES, act_write_bytes=pairs * w)
    return _with_backward(ctx, fwd, bwd)


def bincount(ctx: Ctx, name: str, *, layer: int, n, bins, module: str, tags: dict | None = None) -> list[Op]:
    """Count n int64 values into `bins` int64 counters (rows per expert): an increment each."""
    return [Op(name=name, kind="topk", layer=layer, module=module, other_flops=n,
               act_read_bytes=n * INDEX_BYTES, act_write_bytes=bins * INDEX_BYTES, tags=tags or {},
               variant="bincount")]


def fill(ctx: Ctx, name: str, *, layer: int, elements, module: str, tags: dict | None = None) -> list[Op]:
    """Write a constant into `elements` values of an existing tensor (e.g. [CLS]'s score
    set to +inf so that top-k keeps it): writes them, no arithmetic, no backward."""
    return [Op(name=name, kind="elementwise", layer=layer, module=module, act_write_bytes=elements * ctx.w,
               tags=tags or {}, variant="copy")]


def gumbel_mask(ctx: Ctx, name: str, *, layer: int, elements, module: str, tags: dict | None = None) -> list[Op]:
    """train: Scaling Transformers' straight-through Gumbel-softmax mask over `elements`
    controller logits, one kernel: a softmax per block and the argmax of the noisy
    log-probabilities (one comparison per logit; the noise is made on chip and its
    arithmetic not counted), writing the mask; backward reads the mask's gradient and the
    logits (the softmax recomputed) and writes the logits' gradient. Variant "gumbel": its
    forward is calibrated apart, as the reference runs it (eagerly, a dozen kernels and a
    random draw, flopsim.torchref.sparse_ff.gumbel_mask); without such points, a softmax's."""
    w = ctx.w
    per = ELEMENTWISE_FLOPS["softmax"]
    fwd = Op(name=name, kind="softmax", layer=layer, module=module, other_flops=(per + 1) * elements,
             act_read_bytes=elements * w, act_write_bytes=elements * w, tags=tags or {}, variant="gumbel")
    bwd = dict(other_flops=per * BACKWARD_ELEMENTWISE * elements, act_read_bytes=2 * elements * w,
               act_write_bytes=elements * w)
    return _with_backward(ctx, fwd, bwd)


def sort_indices(ctx: Ctx, name: str, *, layer: int, rows, n, module: str, kind: str = "topk",
                 tags: dict | None = None) -> list[Op]:
    """Sort n int64 indices in each of `rows` rows (e.g. top-k picks back into sequence
    order): reads and writes them; one comparison per index."""
    return [Op(name=name, kind=kind, layer=layer, module=module,
               other_flops=rows * n,
               act_read_bytes=rows * n * INDEX_BYTES,
               act_write_bytes=rows * n * INDEX_BYTES,
               tags=tags or {}, variant="sort")]


def gather(ctx: Ctx, name: str, *, layer: int, rows, d, module: str, kind: str = "gather",
           value_bytes=None, tags: dict | None = None, variant: str = "index") -> list[Op]:
    """Copy `rows` rows of width d picked by an int64 index; `value_bytes`: bytes per
    value when not the activations' (int64 positions: 8). Backward scatter-adds the
    rows' gradients into a zero-filled gradient of the source (an add per value).
    `variant`: the kernel that runs -- "index" (advanced indexing, x[idx]),
    "index_2d" (a table indexed by a 2-d index: rows per token, as sparse FF's
    weight gather), "gather" (torch.gather along a dimension) or
    "index_select" -- which differ in speed on a CPU and are calibrated apart."""
    w = ctx.w if value_bytes is None else value_bytes
    fwd = Op(name=name, kind=kind, layer=layer, module=module,
             act_read_bytes=rows * d * w + rows * INDEX_BYTES,
             act_write_bytes=rows * d * w,
             tags=tags or {}, variant=variant)
    bwd = dict(other_flops=rows * d,
               act_read_bytes=rows * d * w + rows * INDEX_BYTES,
               act_write_bytes=rows * d * w)
    return _with_backward(ctx, fwd, bwd)


def scale_rows(ctx: Ctx, name: str, *, layer: int, rows, d, module: str, tags: dict | None = None) -> list[Op]:
    """y = r * f: each of `rows` rows of width d scaled by its own value r (a router or
    combination weight). Reads f and r, writes y; backward, one kernel, reads the
    gradient, f and r and writes grad f (g * r) and grad r (the row sum of g * f):
    two products and a sum per element."""
    w = ctx.w
    fwd = Op(name=name, kind="elementwise", layer=layer, module=module,
             other_flops=ELEMENTWISE_FLOPS["mul"] * rows * d,
             act_read_bytes=rows * d * w + rows * w,
             act_write_bytes=rows * d * w,
             tags=tags or {}, variant="mul")
    bwd = dict(other_flops=3 * rows * d,
               act_read_bytes=2 * rows * d * w + rows * w,
               act_write_bytes=rows * d * w + rows * w)
    return _with_backward(ctx, fwd, bwd)


def select_rows(ctx: Ctx, name: str, *, layer: int, rows, total_rows, d, module: str,
                tags: dict | None = None) -> list[Op]:
    """Take `rows` of `total_rows` rows of width d as a view (the [CLS] position): no
    bytes forward. Backward writes the whole input's gradient, zero except at the
    taken rows, reading theirs."""
    w = ctx.w
    fwd = Op(name=name, kind="gather", layer=layer, module=module, tags=tags or {}, variant="select")
    bwd = dict(act_read_bytes=rows * d * w, act_write_bytes=total_rows * d * w)
    return _with_backward(ctx, fwd, bwd)


def scatter(ctx: Ctx, name: str, *, layer: int, rows, d, module: str, into_zeros: bool = False,
            tags: dict | None = None) -> list[Op]:
    """Add `rows` rows of width d back into a larger tensor at indexed rows (reading the
    target rows it adds into; `into_zeros`: a zero-filled output, whose rows need no read)."""
    w = ctx.w
    fwd = Op(name=name, kind="scatter", layer=layer, module=module,
             other_flops=rows * d,  # the add
             act_read_bytes=(1 if into_zeros else 2) * rows * d * w + rows * INDEX_BYTES,
             act_write_bytes=rows * d * w,
             tags=tags or {})
    bwd = dict(act_read_bytes=rows * d * w + rows * INDEX_BYTES,
               act_write_bytes=rows * d * w)
    return _with_backward(ctx, fwd, bwd)


# -- sparse feed-forward and sparse QKV (Scaling Transformers), length reduction --

def weight_row_copy(ctx: Ctx, name: str, *, layer: int, copies, row, units_read, module: str,
                    tags: dict | None = None) -> Op:
    """`copies` rows of width `row` copied out of a weight table by an int64 index
    (torch: `W[units]` with a 2-d index, kind "gather", variant "index_2d"): the
    `units_read` distinct rows come from memory once (weight_bytes), the index is
    read, the copy written. Sparse FF's per-token weight gather, and the
    calibration's measurement of that kernel (flopsim.calibrate), are this op."""
    w = ctx.w
    return Op(name=name, kind="gather", layer=layer, module=module, variant="index_2d",
              weight_bytes=units_read * row * w,
              act_read_bytes=copies * INDEX_BYTES,
              act_write_bytes=copies * row * w,
              tags=tags or {})


def gathered_linear(ctx: Ctx, name: str, *, layer: int, tokens, d_in, d_out, select: str, units,
                    units_read, bias: bool, module: str | None = None, kind: str = "matmul",
                    tags: dict | None = None) -> list[Op]:
    """A Linear with a d_in x d_out weight (owned whole) of which each of `tokens`
    rows uses only `units` units of one side, picked per token by an int64 index
    [tokens, units]: `select="out"` gathers output columns (y has `units` values
    per token), `select="in"` gathers input rows (x has `units` values per token).

    It runs as an indexed copy of the weights then a batched product over the
    copy (torch: `W[units]`, then bmm of [tokens, 1, k] x [tokens, k, n]):
    - `{name}.gather` (kind "gather", 0 FLOPs): reads the index and the chosen
      rows of the weight table and writes a per-token copy of tokens * units * r
      values (r = d_in for "out", d_out for "in"). `units_read` (an expectation,
      e.g. the union over the tokens) is how many distinct units of the table
      come from memory: weight_bytes = units_read * r * w;
      act_read = tokens * units * INDEX_BYTES; act_write = tokens * units * r * w.
    - `{name}` (the bmm, 2 * tokens * k * n FLOPs, bmm_flop): reads x and the
      copy, act_read = tokens * k * w + tokens * units * r * w; writes
      tokens * n * w; no weight bytes (it reads the copy, not the table); owns
      the parameters.
    - with a bias, "out": `{name}.bias_gather` (b[units]: weight_bytes
      units_read * w, the index, tokens * units * w written) and `{name}.bias`
      (y + b[units], an add over tokens * units); "in": `{name}.bias` (y + b,
      reading the whole bias, d_out * w).
    The weight is stored unit-major (trax's layout), so each unit's values are
    one contiguous row. Inference only (no backward ops)."""
    w = ctx.w
    module = module or name
    tags = tags or {}
    if select == "out":
        k, n, row = d_in, units, d_in
    elif select == "in":
        k, n, row = units, d_out, d_out
    else:
        raise ValueError(f"select must be 'in' or 'out', not {select!r}")
    copy = tokens * units * row  # values of the per-token weight copy
    index = tokens * units * INDEX_BYTES
    ops = [weight_row_copy(ctx, f"{name}.gather", layer=layer, copies=tokens * units, row=row,
                           units_read=units_read, module=module, tags=tags),
           Op(name=name, kind=kind, layer=layer, module=module,
              flops=2 * tokens * k * n,  # bmm_flop
              act_read_bytes=tokens * k * w + copy * w,
              act_write_bytes=tokens * n * w,
              params=d_in * d_out + (d_out if bias else 0),
              gemm=(tokens, 1, n, k),
              tags=tags)]
    if bias and select == "out":
        ops += _gathered_bias(ctx, name, layer=layer, values=tokens * units, read=units_read, index=index,
                              module=module, tags=tags)
    elif bias:
        ops.append(Op(name=f"{name}.bias", kind="elementwise", layer=layer, module=module,
                      other_flops=tokens * d_out,
                      weight_bytes=d_out * w,
                      act_read_bytes=tokens * d_out * w,
                      act_write_bytes=tokens * d_out * w,
                      tags=tags, variant="add"))
    return ops


def factored_dense(ctx: Ctx, name: str, *, layer: int, tokens, d_in, modules, d_module, bias: bool,
                   module: str | None = None, tags: dict | None = None) -> list[Op]:
    """Scaling Transformers' multiplicative layer (trax FactoredDense):
    y[s, m] = sum_i x[i] D[s, i] E[i, m] (+ b[s, m]) with D: modules x d_in gating
    vectors and E: d_in x d_module shared by the modules. Runs as a gate (x * D,
    `modules` copies of x) then one product of tokens * modules rows by E, so the
    product costs 2 * tokens * modules * d_in * d_module FLOPs (as linear)."""
    w = ctx.w
    module = module or name
    tags = tags or {}
    gated = tokens * modules * d_in
    gate = Op(name=f"{name}.gate", kind="elementwise", layer=layer, module=module,
              other_flops=gated,
              weight_bytes=modules * d_in * w,
              act_read_bytes=tokens * d_in * w,
              act_write_bytes=gated * w,
              params=modules * d_in,
              tags=tags)
    ops = _with_backward(ctx, gate, dict(
        other_flops=2 * gated,  # grad x (multiply, sum over modules), grad D (multiply, sum over tokens)
        weight_bytes=2 * modules * d_in * w,
        act_read_bytes=gated * w + tokens * d_in * w,  # grad_out, saved x
        act_write_bytes=tokens * d_in * w))
    ops += linear(ctx, name, layer=layer, tokens=tokens * modules, d_in=d_in, d_out=d_module, bias=False,
                  module=module, tags=tags)
    if bias:
        out = tokens * modules * d_module
        add = Op(name=f"{name}.bias", kind="elementwise", layer=layer, module=module,
                 other_flops=out,
                 weight_bytes=modules * d_module * w,
                 act_read_bytes=out * w,
                 act_write_bytes=out * w,
                 params=modules * d_module,
                 tags=tags)
        ops += _with_backward(ctx, add, dict(other_flops=out,  # the bias gradient's reduction
                                             weight_bytes=modules * d_module * w,
                                             act_read_bytes=out * w))
    return ops


def reduce_sum(ctx: Ctx, name: str, *, layer: int, rows, n, module: str, tags: dict | None = None) -> list[Op]:
    """Sum n values into each of `rows` outputs (e.g. attention received per token);
    backward broadcasts the gradient back: a view, no kernel (its consumer reads the
    `rows` values)."""
    w = ctx.w
    fwd = Op(name=name, kind="elementwise", layer=layer, module=module,
             other_flops=rows * n,
             act_read_bytes=rows * n * w,
             act_write_bytes=rows * w,
             tags=tags or {})
    bwd = dict()
    return _with_backward(ctx, fwd, bwd)


# -- int64 index work (sparse feed-forward's choice of units) --

def argmax(ctx: Ctx, name: str, *, layer: int, rows, n, module: str, tags: dict | None = None) -> list[Op]:
    """The index of the largest of n scores in each of `rows` rows (int64 indices out, no values)."""
    return [Op(name=name, kind="topk", layer=layer, module=module,
               other_flops=rows * n,  # one comparison per score
               act_read_bytes=rows * n * ctx.w,
               act_write_bytes=rows * INDEX_BYTES,
               tags=tags or {}, variant="argmax")]


def index_elementwise(ctx: Ctx, name: str, *, layer: int, elements, op: str = "add", inputs: int = 1,
                      broadcast=0, module: str, tags: dict | None = None) -> list[Op]:
    """An elementwise kernel over `elements` int64 indices (an offset add, a
    concatenation's copy) reading `inputs` tensors of that size and, `broadcast`, a
    smaller one broadcast over them (the per-block offsets); no backward."""
    return [Op(name=name, kind="elementwise", layer=layer, module=module,
               other_flops=ELEMENTWISE_FLOPS[op] * elements,
               act_read_bytes=(inputs * elements + broadcast) * INDEX_BYTES,
               act_write_bytes=elements * INDEX_BYTES,
               tags=tags or {}, variant=op)]


def expert_loop_copies(ctx: Ctx, name: str, *, layer: int, experts, rows, d_in, d_out, bias: bool,
                       module: str, tags: dict | None = None) -> list[Op]:
    """The copies a per-expert loop (`moe.kernel: loop`) makes around one expert projection
    whose weights are stored stacked, [E, d_in, d_out], each expert's a view: forward, the
    E outputs joined into one `rows` x d_out tensor (a cat: read and write it). Backward,
    two kernels: the E input gradients joined into one `rows` x d_in tensor (the split's
    backward) and the E weight (and bias) gradients stacked into the parameter's gradient
    (the views' backward): each read and written once. A grouped GEMM makes none."""
    w = ctx.w
    fwd = Op(name=name, kind="elementwise", layer=layer, module=module, variant="copy",
             act_read_bytes=rows * d_out * w, act_write_bytes=rows * d_out * w, tags=tags or {})
    stacked = experts * (d_in * d_out + (d_out if bias else 0))
    bwd = dict(act_read_bytes=rows * d_in * w, act_write_bytes=rows * d_in * w,
               weight_bytes=2 * stacked * w, kernels=2 + bool(bias))
    return _with_backward(ctx, fwd, bwd)


def gathered_experts(ctx: Ctx, name: str, *, layer: int, pairs, experts, d_in, d_out, bias: bool,
                     module: str | None = None, tags: dict | None = None, fused: bool = False) -> list[Op]:
    """`pairs` (token, expert) pairs, each indexing its expert's d_out x d_in weight
    (of `experts` stacked, all owned here) into a copy, then one batched
    matrix-vector product over the copies (torch: `W[idx]`, then bmm of
    [pairs, 1, d_in] x [pairs, d_in, d_out]; gpt-fast's MoE):
    - `{name}.gather` (kind "gather", 0 FLOPs): reads each pair's expert weights
      from memory -- weight_bytes = pairs * d_in * d_out * w: one expert matrix
      is far larger than any cache, so two pairs of one expert read it twice --
      and the int64 index; writes the copy, pairs * d_in * d_out * w.
    - `{name}` (the bmm, 2 * pairs * d_in * d_out FLOPs): reads x and the copy,
      writes pairs * d_out; owns the parameters.
    - with a bias: `{name}.bias_gather` (b[idx]) and `{name}.bias` (the add).
    `fused` (a compiler fuses the indexing into the product): one op `{name}`
    reading each pair's expert weights (and bias) by index, x and the index,
    writing pairs * d_out; no copy.
    Inference only (no backward ops)."""
    w = ctx.w
    module = module or name
    tags = tags or {}
    matrix = d_in * d_out
    index = pairs * INDEX_BYTES
    if fused:
        return [Op(name=name, kind="matmul", layer=layer, module=module,
                   flops=2 * pairs * matrix,
                   other_flops=pairs * d_out if bias else 0,
                   weight_bytes=pairs * (matrix_bytes(ctx, matrix, d_out, True) + (d_out * w if bias else 0)),
                   param_bytes=experts * (matrix_bytes(ctx, matrix, d_out, True) + (d_out * w if bias else 0)),
                   act_read_bytes=pairs * d_in * w + index,
                   act_write_bytes=pairs * d_out * w,
                   params=experts * (matrix + (d_out if bias else 0)),
                   gemm=(pairs, 1, d_out, d_in), tags=tags, variant=weight_only_kernel(ctx, True))]
    ops = [Op(name=f"{name}.gather", kind="gather", layer=layer, module=module,
              weight_bytes=pairs * matrix * w,
              act_read_bytes=index,
              act_write_bytes=pairs * matrix * w,
              tags=tags, variant="weights"),
           Op(name=name, kind="matmul", layer=layer, module=module,
              flops=2 * pairs * matrix,  # bmm_flop
              act_read_bytes=pairs * d_in * w + pairs * matrix * w,
              act_write_bytes=pairs * d_out * w,
              params=experts * (matrix + (d_out if bias else 0)),
              gemm=(pairs, 1, d_out, d_in),
              tags=tags)]
    if bias:
        ops += _gathered_bias(ctx, name, layer=layer, values=pairs * d_out, read=pairs * d_out, index=index,
                              module=module, tags=tags)
    return ops


def _gathered_bias(ctx: Ctx, name: str, *, layer: int, values, read, index, module: str, tags: dict) -> list[Op]:
    """A bias indexed per row (`b[idx]`: `read` bias values from memory, the index
    read, `values` written), then added to the product's `values` outputs."""
    w = ctx.w
    return [Op(name=f"{name}.bias_gather", kind="gather", layer=layer, module=module,
               weight_bytes=read * w,
               act_read_bytes=index,
               act_write_bytes=values * w,
               tags=tags),
            Op(name=f"{name}.bias", kind="elementwise", layer=layer, module=module,
               other_flops=values,
               act_read_bytes=2 * values * w,
               act_write_bytes=values * w,
               tags=tags, variant="add")]
