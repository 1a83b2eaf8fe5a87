"""The dense reference transformer, and the phase runner every family uses.

Module paths equal flopsim op modules: `embed.tokens`, `block.{i}.norm1`,
`block.{i}.attn.qkv`, `block.{i}.attn` (runs the attention kernel),
`block.{i}.attn.out`, `block.{i}.mlp.{up|gate_up,down}`, `final_norm`,
`head.lm` (after `head.transform.{dense,norm}` with `spec.lm_transform`) /
`head.pooler` / `head.classifier` (`spec.mla`: the attention is
flopsim.torchref.mla.LatentAttention). With `spec.sparse_qkv` the
QKV projection is `SparseQKV` in every family: `block.{i}.attn.qkv.mult`
(`FactoredDense`) and the convolutions `block.{i}.attn.qkv.q`, `.k`, `.v`
(nn.Conv2d over [B, M, length, modules]; flopsim.families.dense). With
`spec.sliding_window` a local layer's decode cache is a ring of min(context,
window) positions and prefill writes the last `window` positions into it;
train, forward and prefill attend to every key as the op list counts them (a
window mask changes no count).

Attention follows `spec.attention_impl`: `fused` calls
F.scaled_dot_product_attention (GQA through enable_gqa), `explicit` runs
Q K^T, softmax and P V as separate ops, the query heads of a key/value head
grouped into one product (keys and values read once). Families subclass
`Block` or pass their own `block_factory`.

Training dropout (`spec.dropout`, phase train only) runs `dropout`: torch's
native_dropout, the one kernel a GPU's F.dropout dispatches to (output and a
bool mask; CPU's F.dropout decomposes into bernoulli_, div_ and mul instead),
on the embeddings' output (in `embed`), each sub-block's output before its
residual add (in `block.{i}`) and an explicit attention's probabilities (in
`block.{i}.attn`); a fused attention with attention dropout has no CPU kernel
that drops inside (CPU SDPA runs the plain products then), so it is refused.

Code that flopsim counts as one kernel is marked `fused(kind)` (RoPE on q and
k, RMSNorm, the gated activation, the explicit scale + mask + softmax, the
embeddings' sum, the loss) for the bytes oracle (flopsim.torchref.bytes_check);
outside a counter the marker does nothing. Inputs (token ids, position ids,
token types, loss targets, the decode cache) are made by `prepare_phase`, not
inside the step; prefill writes keys and values into new cache buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from flopsim.torchref.bytes_counter import fused

def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float = 7.0, alpha: float = 1.702) -> torch.Tensor:
    """GPT-OSS's gated unit (transformers' GptOssExperts): both halves clamped, up shifted by one."""
    gate = gate.clamp(max=limit)
    return (up.clamp(-limit, limit) + 1) * (gate * torch.sigmoid(gate * alpha))


clamped_swiglu.gates_up = True  # takes (gate, up), not gate alone

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "silu_clamped": clamped_swiglu,
}


def gate_times_up(act, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """act(gate) * up, or the activation's own combination of both (clamped_swiglu)."""
    return act(gate, up) if getattr(act, "gates_up", False) else act(gate) * up


@dataclass
class RunState:
    """What blocks see besides the hidden states.

    positions: [B, S] position ids of the current tokens (for RoPE);
    cache: per layer, preallocated (k, v) buffers [B, H_kv, T, d_head] holding the
        earlier tokens, with the last S slots free for the new tokens (or None);
    new_cache: filled with each layer's full (k, v) in prefill and decode (prefill
        writes the keys and values into new buffers, as a serving engine's cache);
    token_types: [B, S] token type ids (an input, as BERT's token_type_ids; None: zeros);
    position_bias: the stack's relative position bias [H, S, T] (`positions: relative`),
        added to every layer's scores (set by the model once per stack); with
        `relative_bias: layer` a list of each layer's own bias (`layer_biases`);
    encoder_ids, encoder_positions: [B, S_enc] an encoder-decoder's encoder inputs;
    memory: the encoder's output [B, S_enc, d_model] its decoder blocks cross-attend to;
    cross_cache: at decode, per decoder layer the (k, v) [B, H_kv, S_enc, d_head] of the
        encoder's output; new_cross_cache: filled with them at prefill
        (flopsim.torchref.encoder_decoder).
    """

    phase: str
    positions: torch.Tensor
    cache: Optional[list] = None
    new_cache: list = field(default_factory=list)
    token_types: Optional[torch.Tensor] = None
    position_bias: Optional[torch.Tensor | list] = None
    encoder_ids: Optional[torch.Tensor] = None
    encoder_positions: Optional[torch.Tensor] = None
    memory: Optional[torch.Tensor] = None
    cross_cache: Optional[list] = None
    new_cross_cache: list = field(default_factory=list)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm, marked as one fused kernel (eager torch runs it as six ops on CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with fused("rmsnorm") as region:
            y = super().forward(region.take(x))
            region.basis(y)
        return y


class EagerRMSNorm(nn.Module):
    """`norm_impl: fp32_unfused`: transformers' LlamaRMSNorm, each line its own kernels (no
    fused region): x to fp32, pow, mean, add eps, rsqrt, multiply, back to the dtype, weight."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def dropout(x: torch.Tensor, p: float, state: "RunState") -> torch.Tensor:
    """x with training dropout p (module docstring); x itself outside train or at p 0."""
    if state.phase != "train" or not p:
        return x
    return torch.native_dropout(x, p, True)[0]


def make_norm(spec, d: int) -> nn.Module:
    if spec.norm == "rmsnorm":
        return EagerRMSNorm(d, eps=1e-6) if spec.norm_impl == "fp32_unfused" else RMSNorm(d, eps=1e-6)
    return nn.LayerNorm(d, bias=spec.bias)


def rope_tables(positions: torch.Tensor, d: int, dtype, base: float = 10000.0):
    """(cos, sin) [B, 1, S, d] of the rotary embedding at positions [B, S]."""
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32, device=positions.device) / d))
    angles = positions.to(torch.float32)[:, None, :, None] * inv  # [B, 1, S, d/2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope(x: torch.Tensor, tables) -> torch.Tensor:
    """Rotary embedding (rotate-half form) of x [B, H, S, d] with tables from rope_tables."""
    cos, sin = tables
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def rope_qk(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
    """RoPE on queries and keys as one fused kernel (flopsim's `attn.rope` op): the angle
    table is made once for both, on chip."""
    with fused("rope") as region:
        q, k = region.take(q, k)
        tables = rope_tables(positions, q.shape[-1], q.dtype)
        q, k = rope(q, tables), rope(k, tables)
        region.basis(q, k)
    return q, k


def write_cache(t: torch.Tensor) -> torch.Tensor:
    """A new KV-cache buffer holding `t` (prefill's cache write: a copy)."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


class FactoredDense(nn.Module):
    """y[..., s, m] = sum_i x_i gate[s, i] weight[i, m] (+ bias[s, m]) (trax FactoredDense)."""

    def __init__(self, modules: int, d_in: int, d_module: int, bias: bool):
        super().__init__()
        self.gate = nn.Parameter(torch.randn(modules, d_in) * 0.5)
        self.weight = nn.Parameter(torch.randn(d_in, d_module) / math.sqrt(d_in))
        self.bias = nn.Parameter(torch.zeros(modules, d_module)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x.unsqueeze(-2) * self.gate) @ self.weight  # one mm over tokens * modules rows
        return y if self.bias is None else y + self.bias


class SparseQKV(nn.Module):
    """The multiplicative layer, then causal-over-length convolutions producing
    Q, K, V laid out as the dense projection's [q | k | v]."""

    def __init__(self, spec):
        super().__init__()
        s = spec.sparse_qkv.modules
        self.modules_, self.k = s, spec.sparse_qkv.conv_kernel
        m = spec.d_model // s
        self.mult = FactoredDense(s, spec.d_model, m, spec.bias)
        self.q = nn.Conv2d(m, spec.heads * spec.d_head // s, (self.k, self.k), bias=spec.bias)
        self.k_ = nn.Conv2d(m, spec.kv_heads * spec.d_head // s, (self.k, self.k), bias=spec.bias)
        self.v = nn.Conv2d(m, spec.kv_heads * spec.d_head // s, (self.k, 1), bias=spec.bias)
        # registered as `k` for the module path (self.k is the kernel size)
        self._modules["k"] = self._modules.pop("k_")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        y = self.mult(x).permute(0, 3, 1, 2)  # [B, M, length, modules]
        outs = []
        for name in ("q", "k", "v"):
            conv = self._modules[name]
            half = (conv.kernel_size[1] - 1) // 2
            # causal over the length (K - 1 earlier positions: zeros here, the remembered
            # ones when decoding), 'same' over the modules
            z = conv(F.pad(y, (half, half, self.k - 1, 0)))  # [B, c, length, modules]
            outs.append(z.permute(0, 2, 3, 1).reshape(b, length, -1))
        return torch.cat(outs, dim=-1)


class Attention(nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        h, hkv, dh = spec.heads, spec.kv_heads, spec.d_head
        self.qkv = (SparseQKV(spec) if spec.sparse_qkv is not None
                    else nn.Linear(spec.d_model, (h + 2 * hkv) * dh, bias=spec.qkv_has_bias))
        if spec.qk_norm:
            self.q_norm, self.k_norm = make_norm(spec, dh), make_norm(spec, dh)
        self.sinks = nn.Parameter(torch.randn(h) * 0.1) if spec.attention_sinks else None
        if spec.layer_bias:  # the layer's own relative position table (UMT5; flopsim's attn.relative_bias)
            self.relative_bias = RelativePositionBias(spec, bidirectional=not spec.causal)
        self.out = nn.Linear(h * dh, spec.d_model, bias=spec.bias)

    def forward(self, x: torch.Tensor, state: RunState, layer: int, causal: Optional[bool] = None) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.project(x, state, layer)
        causal = self.spec.causal if causal is None else causal
        bias = state.position_bias[layer] if self.spec.layer_bias else state.position_bias  # layer_biases
        drop = self.spec.attention_dropout if state.phase == "train" else 0.0
        o = self.core(q, k, v, causal and s > 1, bias=bias, dropout_p=drop)  # one query: the whole cache
        return self.out(o.transpose(1, 2).reshape(b, s, -1))

    def project(self, x: torch.Tensor, state: RunState, layer: int):
        """Q, K, V [B, heads, S, d_head] (RoPE applied; keys and values through the cache)."""
        spec = self.spec
        b, s, _ = x.shape
        h, hkv, dh = spec.heads, spec.kv_heads, spec.d_head
        q, k, v = self.qkv(x).split([h * dh, hkv * dh, hkv * dh], dim=-1)
        q, k = q.view(b, s, h, dh), k.view(b, s, hkv, dh)
        if spec.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.transpose(1, 2)
        k = k.transpose(1, 2)
        v = v.view(b, s, hkv, dh).transpose(1, 2)
        if spec.positions == "rope":
            q, k = rope_qk(q, k, state.positions)
        prior = state.cache[layer] if state.cache is not None else None
        if prior is not None:  # preallocated buffers; the new tokens fill the last s slots in place
            prior[0][:, :, -s:].copy_(k)
            prior[1][:, :, -s:].copy_(v)
            k, v = prior
        elif state.phase == "prefill" and window_of(spec, layer) is not None and s > window_of(spec, layer):
            w = window_of(spec, layer)  # a local layer's ring keeps the last w positions; all s are attended
            state.new_cache.append((write_cache(k[:, :, -w:]), write_cache(v[:, :, -w:])))
            return q, k, v
        elif state.phase == "prefill":
            k, v = write_cache(k), write_cache(v)
        if state.phase in ("prefill", "decode"):
            state.new_cache.append((k, v))
        return q, k, v

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool,
             bias: Optional[torch.Tensor] = None, dropout_p: float = 0.0) -> torch.Tensor:
        """The attention kernel: fused (SDPA) or explicit (Q K^T, softmax, P V). The
        explicit path groups the query heads sharing a key/value head (GQA) into one
        product per key/value head, so keys and values are read once, not repeated;
        `bias` [H, S, T] (T5's relative position bias) is added to its scores;
        `dropout_p` (train) drops the explicit path's probabilities before P V."""
        h, hkv = self.spec.heads, self.spec.kv_heads
        capped = self.spec.softcap is not None and self.spec.softcap.attention
        if self.spec.attention_impl == "fused" and (capped or self.sinks is not None or bias is not None):
            raise ValueError("the reference's fused attention (SDPA) has no soft-capping, sinks or position "
                             "bias; use attention_impl: explicit")
        if self.spec.attention_impl == "fused" and dropout_p:
            raise ValueError("the reference's fused attention (SDPA) on CPU does not drop inside its kernel; "
                             "use attention_impl: explicit with dropout.attention")
        if self.spec.attention_impl == "fused":
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=hkv != h)
        b, _, s, dh = q.shape
        probs = self.probabilities(q, k, is_causal, bias=bias)  # [B, H, S, T]
        if dropout_p:  # flopsim's attn.core.dropout
            probs = torch.native_dropout(probs, dropout_p, True)[0]
        grouped = probs.view(b, hkv, (h // hkv) * s, -1) @ v  # [B, H_kv, G * S, d_head]
        return grouped.view(b, h, s, dh)

    def probabilities(self, q: torch.Tensor, k: torch.Tensor, is_causal: bool,
                      bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        cap = self.spec.softcap.attention if self.spec.softcap is not None else None
        return attention_probabilities(q, k, is_causal, softcap=cap, sinks=self.sinks, bias=bias)


def window_of(spec, layer: int) -> Optional[int]:
    """The sliding window of a local layer (flopsim.families.dense.is_local), None for a global one."""
    from flopsim.families.dense import is_local

    return spec.sliding_window.size if is_local(spec, layer) else None


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, is_causal: bool, softcap: Optional[float] = None,
                            sinks: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_head)) [B, H, S, T], causal over the last queries of the keys
    when asked; q [B, H, S, d], k [B, H_kv, T, d] (the H / H_kv query heads of a group
    share their key head: one product per key head). The scale, the mask and the
    softmax are one fused kernel; so are a soft cap (cap * tanh(s / cap)) and sinks
    (a learned logit per head joining each softmax, its probability dropped). A
    relative position bias [H, S, T] is added to the raw scores first, as its own
    kernel (flopsim's `attn.position_bias`)."""
    b, h, s, dh = q.shape
    hkv, t = k.shape[1], k.shape[-2]
    scores = (q.reshape(b, hkv, (h // hkv) * s, dh) @ k.transpose(-2, -1)).view(b, h, s, t)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    with fused("softmax") as region:
        scores = region.take(scores) / math.sqrt(dh)
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        if is_causal:
            mask = torch.ones(s, t, dtype=torch.bool, device=q.device).tril(diagonal=t - s)
            scores = scores.masked_fill(~mask, float("-inf"))
        if sinks is not None:  # the sink joins the max and the sum; its probability is not kept
            sink = sinks.view(1, h, 1, 1).to(scores.dtype)
            top = torch.maximum(scores.amax(dim=-1, keepdim=True), sink)
            e = (scores - top).exp()
            probs = e / (e.sum(dim=-1, keepdim=True) + (sink - top).exp())
        else:
            probs = scores.softmax(dim=-1)
        region.basis(probs)
    return probs


class MLP(nn.Module):
    def __init__(self, spec, d_ff: Optional[int] = None):
        super().__init__()
        d_ff = d_ff or spec.d_ff
        self.gated = spec.ffn == "gated"
        if self.gated:  # gate and up fused into one product
            self.gate_up = nn.Linear(spec.d_model, 2 * d_ff, bias=spec.bias)
        else:
            self.up = nn.Linear(spec.d_model, d_ff, bias=spec.bias)
        self.down = nn.Linear(d_ff, spec.d_model, bias=spec.bias)
        self.act = ACTIVATIONS[spec.activation]
        self.unfused = spec.act_impl == "unfused"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down(gated_activation(self.act, self.gate_up(x), self.unfused))
        return self.down(self.act(self.up(x)))


def gated_activation(act, gate_up: torch.Tensor, unfused: bool = False) -> torch.Tensor:
    """act(gate) * up of a fused gate_up output [..., 2 d_ff], as one fused kernel, or
    (`act_impl: unfused`) as eager code runs it: the activation and the product, a kernel each."""
    if unfused:
        gate, up = gate_up.chunk(2, dim=-1)
        return gate_times_up(act, gate, up)
    with fused("gated_act") as region:
        gate, up = region.take(gate_up).chunk(2, dim=-1)
        h = gate_times_up(act, gate, up)
        region.basis(h)
    return h


class Block(nn.Module):
    """norm1 / attn / norm2 / mlp, pre- or post-norm; `mlp` may be any FFN module."""

    def __init__(self, spec, layer: int, mlp: Optional[nn.Module] = None):
        super().__init__()
        self.spec, self.layer = spec, layer
        self.pre = spec.norm_position == "pre"
        self.norm1 = make_norm(spec, spec.d_model)
        if spec.sandwich_norms:  # each sub-block's output normalised before its residual add
            self.attn_out_norm, self.mlp_out_norm = make_norm(spec, spec.d_model), make_norm(spec, spec.d_model)
        if spec.mla is not None:
            from flopsim.torchref.mla import LatentAttention

            self.attn = LatentAttention(spec)
        else:
            self.attn = Attention(spec)
        self.norm2 = make_norm(spec, spec.d_model)
        ffn = mlp if mlp is not None else MLP(spec)
        # registered as `mlp`, or under the FFN's own `module_name` (MoE: `moe`,
        # so paths read block.{i}.moe.router); `self.mlp` is the FFN either way
        self.ffn_name = getattr(ffn, "module_name", "mlp")
        self.add_module(self.ffn_name, ffn)

    @property
    def mlp(self) -> nn.Module:
        try:
            return self._modules[self.__dict__.get("ffn_name", "mlp")]
        except KeyError:
            raise AttributeError("mlp") from None

    def forward(self, x: torch.Tensor, state: RunState) -> torch.Tensor:
        p = self.spec.hidden_dropout  # on each sub-block's output (train only)
        if self.pre and self.spec.sandwich_norms:
            x = x + dropout(self.attn_out_norm(self.attn(self.norm1(x), state, self.layer)), p, state)
            return x + dropout(self.mlp_out_norm(self.mlp(self.norm2(x))), p, state)
        if self.pre:
            x = x + dropout(self.attn(self.norm1(x), state, self.layer), p, state)
            return x + dropout(self.mlp(self.norm2(x)), p, state)
        x = self.norm1(x + dropout(self.attn(x, state, self.layer), p, state))
        return self.norm2(x + dropout(self.mlp(x), p, state))


def relative_position_buckets(relative: torch.Tensor, bidirectional: bool, buckets: int,
                               max_distance: int = 128) -> torch.Tensor:
    """T5's bucket of each key - query distance (HF `_relative_position_bucket`): half the
    buckets exact for short distances, the rest logarithmic up to `max_distance`; the
    encoder's buckets split by direction, the decoder's look only back. Integer and
    elementwise work only: FlopCounterMode counts 0 FLOPs."""
    ret = torch.zeros_like(relative)
    if bidirectional:
        buckets //= 2
        ret = ret + (relative > 0).long() * buckets
        n = relative.abs()
    else:
        n = (-relative).clamp(min=0)
    exact = buckets // 2
    far = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                   * (buckets - exact)).long()
    far = far.clamp(max=buckets - 1)
    return ret + torch.where(n < exact, n, far)


class RelativePositionBias(nn.Module):
    """T5's relative position bias of one stack (`positions: relative`; flopsim's
    `position_bias`): a relative_buckets x heads table, looked up once per step for
    every (query, key) pair and shared by the batch and every layer of the stack; with
    `relative_bias: layer` each self-attention layer holds one (`block.{i}.attn.relative_bias`,
    UMT5), shared by the batch only."""

    def __init__(self, spec, bidirectional: bool):
        super().__init__()
        self.bidirectional, self.buckets = bidirectional, spec.relative_buckets
        self.weight = nn.Parameter(torch.randn(spec.relative_buckets, spec.heads) * 0.1)

    def forward(self, queries: torch.Tensor, keys: int) -> torch.Tensor:
        """The bias [H, S, T] of query positions `queries` [S] against key positions 0 .. keys - 1."""
        with fused("position_buckets") as region:  # one kernel: flopsim's position_bias.buckets
            relative = torch.arange(keys, device=queries.device)[None, :] - region.take(queries)[:, None]  # [S, T]
            bucket = relative_position_buckets(relative, self.bidirectional, self.buckets)
            region.basis(bucket)
        return F.embedding(bucket, self.weight).permute(2, 0, 1)


def stack_position_bias(module: RelativePositionBias, positions: torch.Tensor) -> torch.Tensor:
    """A stack's bias for the current tokens at `positions` [B, S] (every sequence at the
    same positions): their queries against every key up to the last of them."""
    queries = positions[0]
    return module(queries, int(queries[-1]) + 1)


def stack_biases(spec, stack: nn.Module, blocks, positions: torch.Tensor):
    """`state.position_bias` of a stack (`positions: relative`): its one bias made by
    `stack.position_bias`, or with `relative_bias: layer` the list of every block's own
    (`block.{i}.attn.relative_bias`), None without relative positions. The per-layer biases
    are all made here, where the stack's would be, not inside each attention: the module
    tracker enters a module with no differentiable input in backward and never leaves it
    (flopsim.torchref.encoder_decoder's docstring), so their 0-FLOP backward must come last.
    The FLOPs are the same as making each inside its layer (HF UMT5)."""
    if spec.stack_bias:
        return stack_position_bias(stack.position_bias, positions)
    if spec.layer_bias:
        return [stack_position_bias(blk.attn.relative_bias, positions) for blk in blocks]
    return None


class Embeddings(nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.tokens = nn.Embedding(spec.vocab, spec.d_model)
        if spec.positions == "learned":
            self.positions = nn.Embedding(spec.max_seq, spec.d_model)
        if spec.token_types:
            self.types = nn.Embedding(spec.token_types, spec.d_model)
        if spec.norm_position == "post":
            self.norm = make_norm(spec, spec.d_model)

    def forward(self, ids: torch.Tensor, state: RunState) -> torch.Tensor:
        parts = [self.tokens(ids)]
        if self.spec.scale_embeddings:  # Gemma: x * sqrt(d_model)
            parts[0] = parts[0] * math.sqrt(self.spec.d_model)
        if self.spec.positions == "learned":
            parts.append(self.positions(state.positions))
        if self.spec.token_types:
            types = state.token_types if state.token_types is not None else torch.zeros_like(ids)
            parts.append(self.types(types))
        x = parts[0]
        if len(parts) > 1:
            with fused("embed_sum") as region:  # one kernel summing the embeddings
                for part in parts[1:]:
                    x = x + part
                region.basis(x)
        if self.spec.norm_position == "post":
            x = self.norm(x)
        return dropout(x, self.spec.hidden_dropout, state)


class TiedLinear(nn.Module):
    """The LM head reading the token embedding's weight (owns no weight; a bias of its own
    when asked, as BERT's MLM head)."""

    def __init__(self, embedding: nn.Embedding, bias: bool = False):
        super().__init__()
        self._embedding = [embedding]  # a list: not registered as a child
        self.bias = nn.Parameter(torch.zeros(embedding.num_embeddings)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._embedding[0].weight, self.bias)


class LMTransform(nn.Module):
    """BERT's MLM transform (`spec.lm_transform`): dense d_model x d_model, activation, norm."""

    def __init__(self, spec):
        super().__init__()
        self.dense = nn.Linear(spec.d_model, spec.d_model, bias=spec.bias)
        self.act = ACTIVATIONS[spec.activation]
        self.norm = make_norm(spec, spec.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(x)))


class _Fp32CrossEntropyFn(torch.autograd.Function):
    """Megatron-LM's vocab_parallel_cross_entropy (megatron/core/tensor_parallel/
    cross_entropy.py at f2e5db402c; megatron/mpu/cross_entropy.py in 2021-22) on one
    rank holding every class: per row the loss log(sum(exp(x - max))) - (x - max)[target],
    each step its own kernel, in place over the fp32 logits (the logits themselves at
    fp32, as .float() returns them); the softmax is kept for backward, which subtracts
    one at each target and scales it by the incoming gradient in place. The target's
    logit is picked with gather (Megatron indexes with an arange: the same values read)."""

    @staticmethod
    def forward(ctx, logits, target):
        x = logits.float()
        x -= torch.max(x, dim=-1)[0].unsqueeze(-1)
        picked = x.gather(1, target.unsqueeze(1)).squeeze(1)
        torch.exp(x, out=x)
        total = x.sum(dim=-1)
        loss = torch.log(total) - picked
        x.div_(total.unsqueeze(-1))
        ctx.save_for_backward(x, target)
        return loss

    @staticmethod
    def backward(ctx, grad):
        softmax, target = ctx.saved_tensors
        one = torch.full((target.numel(), 1), -1.0, dtype=softmax.dtype, device=softmax.device)
        softmax.scatter_add_(1, target.unsqueeze(1), one)
        softmax.mul_(grad.unsqueeze(-1))
        return softmax, None


class Fp32CrossEntropy(nn.Module):
    """`spec.loss_impl: fp32_unfused`: the mean of _Fp32CrossEntropyFn's per-row losses
    (flopsim's head.loss.* ops), a child of the head so that its ops are charged there."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _Fp32CrossEntropyFn.apply(logits, target).mean()


class Head(nn.Module):
    def __init__(self, spec, embedding: nn.Embedding):
        super().__init__()
        self.spec = spec
        if spec.loss_impl == "fp32_unfused":
            self.loss = Fp32CrossEntropy()
        if spec.head == "lm":
            if spec.lm_transform:
                self.transform = LMTransform(spec)
            bias = spec.lm_transform  # BERT's logits bias
            self.lm = (TiedLinear(embedding, bias) if spec.tied_embeddings
                       else nn.Linear(spec.d_model, spec.vocab, bias=bias))
        elif spec.head == "cls":
            self.pooler = nn.Linear(spec.d_model, spec.d_model, bias=spec.bias)
            self.classifier = nn.Linear(spec.d_model, spec.classes, bias=spec.bias)

    def forward(self, x: torch.Tensor, phase: str) -> torch.Tensor:
        if self.spec.head == "lm":
            if phase == "prefill":
                x = x[:, -1:]
            if self.spec.lm_transform:  # (a [B, 1, d] slice as [B, d] rows: addmm takes it without a copy)
                x = self.transform(x[:, 0]).unsqueeze(1) if phase == "prefill" else self.transform(x)
            logits = self.lm(x)
            cap = self.spec.softcap.logits if self.spec.softcap is not None else None
            if not cap:
                return logits
            with fused("softcap") as region:  # one kernel: flopsim's head.softcap
                logits = cap * torch.tanh(region.take(logits) / cap)
                region.basis(logits)
            return logits
        if self.spec.head == "cls":
            return self.classifier(torch.tanh(self.pooler(x[:, 0])))
        return x


class Reference(nn.Module):
    def __init__(self, spec, block_factory: Optional[Callable] = None):
        super().__init__()
        self.spec = spec
        block_factory = block_factory or (lambda spec, i: Block(spec, i))
        self.embed = Embeddings(spec)
        if spec.stack_bias:  # relative_bias layer: each Attention holds its own
            self.position_bias = RelativePositionBias(spec, bidirectional=not spec.causal)
        self.block = nn.ModuleList([block_factory(spec, i) for i in range(spec.layers)])
        if spec.norm_position == "pre":
            self.final_norm = make_norm(spec, spec.d_model)
        self.head = Head(spec, self.embed.tokens)

    def forward(self, ids: torch.Tensor, state: RunState) -> torch.Tensor:
        x = self.embed(ids, state)
        state.position_bias = stack_biases(self.spec, self, self.block, state.positions)
        for blk in self.block:
            x = blk(x, state)
        if self.spec.norm_position == "pre":
            x = self.final_norm(x)
        if self.spec.head == "none":  # calling an identity head would leave torch's module tracker inside it
            return x
        return self.head(x, state.phase)


TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(dtype: str):
    """The torch dtype a reference runs in for a spec's `dtype` (fp32, bf16, fp16)."""
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"the torch reference runs fp32, bf16 or fp16, not {dtype!r}")
    return getattr(torch, TORCH_DTYPES[dtype])


def build_reference(spec, seed: int = 0) -> nn.Module:
    """The reference module of `spec`'s family (fp32, eval mode; `.to(dtype)` for another)."""
    import importlib

    if spec.rope_impl != "fused":
        raise ValueError(f"rope_impl {spec.rope_impl}: the torch reference runs RoPE fused; the eager forms are "
                         f"checked against the bytes counter aten op by aten op (tests/test_eager_kernels.py)")
    torch.manual_seed(seed)
    family_module = {
        "dense": None,
        "mod": "flopsim.torchref.mod",
        "moe": "flopsim.torchref.moe",
        "mode": "flopsim.torchref.mode",
        "sparse_ff": "flopsim.torchref.sparse_ff",
        "length_reduction": "flopsim.torchref.length_reduction",
    }[spec.family]
    if spec.is_encoder_decoder:
        from flopsim.torchref.encoder_decoder import build

        model = build(spec)
    elif family_module is None:
        model = Reference(spec)
    else:
        model = importlib.import_module(family_module).build(spec)
    return model.eval()


def prepare_phase(model: nn.Module, spec, phase: str, batch: int, seq: int, context: Optional[int] = None,
                  seed: int = 0, device: str = "cpu", optimizer: str = "adam",
                  encoder_seq: Optional[int] = None) -> Callable[[], torch.Tensor]:
    """Make the random inputs of one phase once; returns a function that runs the
    phase on them (what profiling times) and returns the logits or the loss.

    forward: no_grad over B x S; train: loss on every position (or the class),
    backward, and the optimizer step (`optimizer`: "adam" runs torch's fused
    Adam, one multi-tensor kernel as flopsim.ops.optimizer costs it; "none"
    stops after the backward); prefill: no_grad over the prompt, logits of the last
    position, KV cache built; decode: one token per sequence attending to a
    preallocated cache of context - 1 earlier tokens plus itself (written in
    place into the cache's last slot, as serving engines do). An encoder-decoder's
    encoder reads `encoder_seq` (default `seq`) tokens per sequence; at decode its
    output is a cross-attention cache per decoder layer instead
    (flopsim.torchref.encoder_decoder.encoder_inputs).
    """
    from flopsim.torchref.encoder_decoder import encoder_inputs

    g = torch.Generator().manual_seed(seed)
    if phase == "decode":
        keys = context if context is not None else seq
        ids = torch.randint(0, spec.vocab, (batch, 1), generator=g).to(device)
        positions = torch.full((batch, 1), keys - 1, dtype=torch.long, device=device)
        dtype = next(model.parameters()).dtype

        def slots(layer: int) -> tuple:  # a sliding-window layer's ring holds min(keys, window) positions
            w = window_of(spec, layer)
            return (batch, spec.kv_heads, keys if w is None else min(keys, w), spec.d_head)

        def buffers(layer: int) -> tuple:  # keys and values, or MLA's one latent tensor
            shapes = ([(batch, keys, spec.mla.kv_rank + spec.mla.d_rope)] if spec.mla is not None
                      else [slots(layer)] * 2)
            return tuple(torch.randn(shape, generator=g).to(device=device, dtype=dtype) for shape in shapes)

        cache = [buffers(i) for i in range(spec.layers)]
        extra = encoder_inputs(spec, phase, batch, seq if encoder_seq is None else encoder_seq, g, device, dtype)

        def decode():
            with torch.no_grad():
                return model(ids, RunState(phase, positions, cache=cache, **extra))

        return decode
    ids = torch.randint(0, spec.vocab, (batch, seq), generator=g).to(device)
    positions = torch.arange(seq, device=device).repeat(batch, 1)  # [B, S] position ids, as models take them
    types = torch.zeros_like(ids) if spec.token_types else None
    extra = encoder_inputs(spec, phase, batch, seq if encoder_seq is None else encoder_seq, g, device)
    if phase != "train":
        def infer():
            with torch.no_grad():
                return model(ids, RunState(phase, positions, token_types=types, **extra))

        return infer
    rows, classes = loss_shape(spec, batch, seq)
    target = torch.randint(0, classes, (rows,), generator=g).to(device)
    step = make_optimizer(model, optimizer)

    def train():
        model.train()
        try:
            out = model(ids, RunState(phase, positions, token_types=types, **extra))
            flat = out.reshape(-1, out.shape[-1])  # in the model's dtype, as flopsim's loss reads it
            if spec.loss_impl == "fp32_unfused":  # Megatron's kernels (their own cast): flopsim's head.loss.*
                loss = model.head.loss(flat, target)
            else:
                with fused("cross_entropy", path="head") as region:  # the loss: flopsim's head.loss
                    loss = F.cross_entropy(region.take(flat), target)
                    region.basis(flat)
            if hasattr(model, "aux_loss"):
                loss = loss + model.aux_loss()
            loss.backward()
            step()
            return loss.detach()
        finally:
            model.eval()
            model.zero_grad(set_to_none=True)

    return train


def make_optimizer(model: nn.Module, optimizer: str) -> Callable[[], None]:
    """The update step the reference's train phase ends with: "adam" (torch's
    fused Adam where the device has it, else its multi-tensor form) or "none"."""
    if optimizer == "none":
        return lambda: None
    if optimizer != "adam":
        raise ValueError(f"reference optimizer {optimizer!r}: expected adam or none")
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        opt = torch.optim.Adam(params, lr=1e-5, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        opt = torch.optim.Adam(params, lr=1e-5, foreach=True)
    return opt.step


def loss_shape(spec, batch: int, seq: int) -> tuple[int, int]:
    """(rows, classes) of the training loss: one row per position (the class head: per
    sequence), over the vocabulary, the classes, or (no head) the hidden units."""
    if spec.head == "cls":
        return batch, spec.classes
    return batch * seq, spec.vocab if spec.head == "lm" else spec.d_model


def run_phase(model: nn.Module, spec, phase: str, batch: int, seq: int, context: Optional[int] = None,
              seed: int = 0, device: str = "cpu", encoder_seq: Optional[int] = None):
    """Run one phase of `model` on random tokens (see prepare_phase)."""
    return prepare_phase(model, spec, phase, batch, seq, context, seed=seed, device=device,
                         encoder_seq=encoder_seq)()
