"""Reference encoder-decoder (`spec.encoder_layers` > 0: T5, Switch, the Scaling
Transformers' 800M model); see flopsim.families.encoder_decoder.

Module paths equal flopsim's op modules:
- `encoder.embed.tokens` (owns the token table; `encoder.embed.positions` with
  learned positions, `encoder.embed.norm` post-norm), `encoder.position_bias`
  (`positions: relative`; with `relative_bias: layer` each block's
  `attn.relative_bias` instead), `encoder.block.{j}` (the family's `Block` over a
  non-causal copy of the spec), `encoder.final_norm` (pre-norm);
- `decoder.embed.tokens` (`SharedEmbedding`: a lookup in the encoder's table,
  no parameters), `decoder.position_bias`, `decoder.block.{j}`
  (`DecoderBlock`: self-attention, then cross-attention `cross.q` on the
  decoder tokens, `cross.kv` one fused Linear of width 2 * kv_heads * d_head on
  the encoder's output, the attention kernel run by `cross` itself (fused or
  explicit per `spec.attention_impl`, never causal, no position bias),
  `cross.out`, its norm `norm_cross`, then the FFN);
- `final_norm` (pre-norm), `head.lm` (tied: the encoder's table).
Each family supplies its FFN for both stacks (`ffn(spec, i)` of
flopsim.torchref.moe and .sparse_ff; `i` counts blocks within a stack, as
`moe.every` does); sparse QKV replaces the self-attention QKV only
(`stacks` picks each stack's blocks). Mixture-of-Depths (`family: mod`)
routes the decoder: dense encoder Blocks, decoder block j a
`RoutedDecoderBlock` when (j + 1) % mod.every == 0 (top-k of the decoder's
tokens run self-attention, cross-attention to every encoder output and the
FFN; the decider losses join the train loss). Length reduction
(`family: length_reduction`) drops tokens in the encoder: a `ReducingEncoder`
of LengthReductionBlocks, whose output (the tokens leaving its last layer)
the dense DecoderBlocks cross-attend to; at decode the cross cache holds
those tokens.

Phases (inputs made by `encoder_inputs`, called by prepare_phase): forward
and train run the encoder over S_enc tokens, then the decoder over S;
prefill also writes the self-attention cache and the cross-attention cache
(the encoder's keys and values, projected once, copied into new buffers:
`RunState.new_cross_cache`); decode runs one decoder token per sequence on
a preallocated self cache of T keys and a cross cache [B, kv_heads, S_enc,
d_head] x 2 per decoder layer, the encoder not run.

Ordering for torch's module tracker (FlopCounterMode's per-module counts):
a backward hook runs when autograd runs a node, and autograd runs the nodes
made later first. Modules with no differentiable input (embeddings, the
position bias; with `relative_bias: layer` every layer's, made with the
stack's: `stack_biases`) are entered in backward and never left, so the decoder's
embeddings and position bias are made before the encoder runs (their
0-FLOP backward then comes last), the decoder stack gets a view of its
input made after the encoder (so it is left before the encoder's backward),
and each `cross.kv` reads its own view of the encoder's output (shared by
every decoder block).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from flopsim.families.length_reduction import encoder_output_tokens, kept_tokens, selects
from flopsim.families.mod import is_routed
from flopsim.torchref.length_reduction import LengthReductionBlock
from flopsim.torchref.mod import RoutedBlock, aux_loss
from flopsim.torchref.model import (
    Block,
    Embeddings,
    Head,
    RelativePositionBias,
    RunState,
    attention_probabilities,
    make_norm,
    stack_biases,
    write_cache,
)


def family_ffn(spec) -> Callable:
    """`ffn(spec, i)` of the spec's family: block i's FFN module, None for the dense MLP."""
    if spec.family == "moe":
        from flopsim.torchref.moe import ffn

        return ffn
    if spec.family == "sparse_ff":
        from flopsim.torchref.sparse_ff import ffn

        return ffn
    if spec.family != "dense":
        raise ValueError(f"encoder-decoder reference: family {spec.family} (dense, moe, sparse_ff, mod, "
                         f"length_reduction)")
    return lambda spec, i: None


class SharedEmbedding(nn.Module):
    """The decoder's lookup in the encoder's token table (owns no weight)."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self._embedding = [embedding]  # a list: not registered as a child

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self._embedding[0].weight)


class CrossAttention(nn.Module):
    """A decoder block's attention to the encoder's output: q on the decoder tokens,
    one kv Linear on the encoder's output (or the cross cache at decode), out."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        h, hkv, dh = spec.heads, spec.kv_heads, spec.d_head
        self.q = nn.Linear(spec.d_model, h * dh, bias=spec.qkv_has_bias)
        self.kv = nn.Linear(spec.d_model, 2 * hkv * dh, bias=spec.qkv_has_bias)
        self.out = nn.Linear(h * dh, spec.d_model, bias=spec.bias)

    def forward(self, x: torch.Tensor, state: RunState, layer: int) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.spec.heads, self.spec.d_head).transpose(1, 2)
        k, v = self.keys_values(state, layer)
        o = self.core(q, k, v)
        return self.out(o.transpose(1, 2).reshape(b, s, -1))

    def keys_values(self, state: RunState, layer: int):
        """(k, v) [B, kv_heads, S_enc, d_head]: the cross cache at decode, else projected
        from the encoder's output (and at prefill copied into new cache buffers)."""
        if state.cross_cache is not None:
            return state.cross_cache[layer]
        memory = state.memory
        b, t, _ = memory.shape
        hkv, dh = self.spec.kv_heads, self.spec.d_head
        k, v = self.kv(memory.view_as(memory)).split([hkv * dh, hkv * dh], dim=-1)
        k, v = k.view(b, t, hkv, dh).transpose(1, 2), v.view(b, t, hkv, dh).transpose(1, 2)
        if state.phase == "prefill":
            k, v = write_cache(k), write_cache(v)
            state.new_cross_cache.append((k, v))
        return k, v

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Bidirectional attention over the encoder tokens: SDPA, or Q K^T, softmax, P V
        with the query heads of a key/value head grouped into one product."""
        h, hkv = self.spec.heads, self.spec.kv_heads
        if self.spec.attention_impl == "fused":
            return F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=hkv != h)
        b, _, s, dh = q.shape
        probs = attention_probabilities(q, k, False)  # [B, H, S, S_enc]
        return (probs.view(b, hkv, (h // hkv) * s, -1) @ v).view(b, h, s, dh)


class DecoderBlock(Block):
    """A family's block with cross-attention between self-attention and the FFN:
    pre-norm x += attn(norm1 x); x += cross(norm_cross x); x += ffn(norm2 x) (sandwich
    norms on the self-attention and FFN outputs, as flopsim's block); post-norm
    x = norm1(x + attn x); x = norm_cross(x + cross x); x = norm2(x + ffn x)."""

    def __init__(self, spec, layer: int, mlp: Optional[nn.Module] = None):
        super().__init__(spec, layer, mlp)
        self.norm_cross = make_norm(spec, spec.d_model)
        self.cross = CrossAttention(spec)

    def forward(self, x: torch.Tensor, state: RunState) -> torch.Tensor:
        if not self.pre:
            x = self.norm1(x + self.attn(x, state, self.layer))
            x = self.norm_cross(x + self.cross(x, state, self.layer))
            return self.norm2(x + self.mlp(x))
        sandwich = self.spec.sandwich_norms
        a = self.attn(self.norm1(x), state, self.layer)
        x = x + (self.attn_out_norm(a) if sandwich else a)
        x = x + self.cross(self.norm_cross(x), state, self.layer)
        m = self.mlp(self.norm2(x))
        return x + (self.mlp_out_norm(m) if sandwich else m)


class Encoder(nn.Module):
    """The bidirectional stack over the encoder tokens: embeddings, position bias,
    `encoder_layers` blocks (`block(spec, j)`, the spec a non-causal copy), the final
    norm (pre-norm)."""

    def __init__(self, spec, block: Callable):
        super().__init__()
        spec = spec.model_copy(update={"causal": False})
        self.spec = spec
        self.embed = Embeddings(spec)
        if spec.stack_bias:  # relative_bias layer: each block's Attention holds its own
            self.position_bias = RelativePositionBias(spec, bidirectional=True)
        self.block = nn.ModuleList([block(spec, j) for j in range(spec.encoder_layers)])
        if spec.norm_position == "pre":
            self.final_norm = make_norm(spec, spec.d_model)

    def forward(self, ids: torch.Tensor, state: RunState) -> torch.Tensor:
        x = self.embed(ids, state)
        state.position_bias = stack_biases(self.spec, self, self.block, state.positions)
        x = self.blocks(x, state)
        return self.final_norm(x) if self.spec.norm_position == "pre" else x

    def blocks(self, x: torch.Tensor, state: RunState) -> torch.Tensor:
        for blk in self.block:
            x = blk(x, state)
        return x


class ReducingEncoder(Encoder):
    """A length-reduction encoder (flopsim.families.length_reduction): its blocks are
    LengthReductionBlocks, each selecting the next layer's tokens at inference (soft
    removal in train); its output holds the tokens leaving the last layer."""

    def blocks(self, x: torch.Tensor, state: RunState) -> torch.Tensor:
        kept = [int(k) for k in kept_tokens(self.spec, x.shape[1])]
        select = selects(self.spec)
        for i, blk in enumerate(self.block):
            x = blk(x, state, kept[i + 1] if select[i] else None)
        return x


class Decoder(nn.Module):
    """The causal stack: its embeddings (the encoder's token table), its position bias
    and `layers` decoder blocks (`block(spec, j)`); the model calls the embeddings and
    the bias itself, before the encoder (module docstring), and `forward` runs the blocks."""

    def __init__(self, spec, block: Callable, tokens: nn.Embedding):
        super().__init__()
        self.embed = Embeddings(spec)
        self.embed.tokens = SharedEmbedding(tokens)
        if spec.stack_bias:
            self.position_bias = RelativePositionBias(spec, bidirectional=False)
        self.block = nn.ModuleList([block(spec, j) for j in range(spec.layers)])

    def forward(self, x: torch.Tensor, state: RunState) -> torch.Tensor:
        for blk in self.block:
            x = blk(x, state)
        return x


class EncoderDecoder(nn.Module):
    """`encoder_block(spec, j)` / `decoder_block(spec, j)` make each stack's blocks
    (`stacks`); `encoder` the encoder's class (ReducingEncoder for length reduction)."""

    def __init__(self, spec, encoder_block: Callable, decoder_block: Callable, encoder: type = Encoder):
        super().__init__()
        self.spec = spec
        self.encoder = encoder(spec, encoder_block)
        self.decoder = Decoder(spec, decoder_block, self.encoder.embed.tokens)
        if spec.norm_position == "pre":
            self.final_norm = make_norm(spec, spec.d_model)
        self.head = Head(spec, self.encoder.embed.tokens)

    def forward(self, ids: torch.Tensor, state: RunState) -> torch.Tensor:
        """The decoder's logits for tokens `ids`; the encoder's inputs, or at decode the
        cross cache, come in `state`."""
        spec = self.spec
        x = self.decoder.embed(ids, state)  # before the encoder: see the module docstring
        state.position_bias = stack_biases(spec, self.decoder, self.decoder.block, state.positions)
        if state.cross_cache is None:
            encoder_state = RunState("train" if state.phase == "train" else "forward", state.encoder_positions)
            state.memory = self.encoder(state.encoder_ids, encoder_state)
        x = self.decoder(x.view_as(x), state)
        if spec.norm_position == "pre":
            x = self.final_norm(x)
        if spec.head == "none":  # calling an identity head would leave torch's module tracker inside it
            return x
        return self.head(x, state.phase)


class ModEncoderDecoder(EncoderDecoder):
    """Mixture-of-Depths in the decoder: the train phase adds its routed blocks' decider losses."""

    def aux_loss(self) -> torch.Tensor:
        return aux_loss(self.decoder.block)


class RoutedDecoderBlock(RoutedBlock):
    """A routed MoD block of the decoder (flopsim.families.mod): the kept tokens' branch
    is the DecoderBlock's, f(x) = (a + c) + m with a = attn(norm1 x), c = cross(norm_cross
    x1) on the kept tokens (keys all the encoder outputs), m = mlp(norm2(x1 + c)),
    x1 = x + a: four adds, the dense block's three and a + c (flopsim's `branch_add`)."""

    def __init__(self, spec, layer: int, mlp: Optional[nn.Module] = None):
        super().__init__(spec, layer, mlp)
        self.norm_cross = make_norm(spec, spec.d_model)
        self.cross = CrossAttention(spec)

    def branch(self, x: torch.Tensor, state: RunState) -> torch.Tensor:
        a = self.attn(self.norm1(x), state, self.layer)
        x1 = x + a
        c = self.cross(self.norm_cross(x1), state, self.layer)
        return (a + c) + self.mlp(self.norm2(x1 + c))


def stacks(spec) -> tuple:
    """(encoder_block, decoder_block, encoder class, model class) of the spec's family:
    dense, moe, sparse_ff in both stacks; mod routes the decoder; length_reduction
    drops tokens in the encoder (module docstring)."""
    if spec.family == "mod":
        def decoder_block(spec, j):
            return (RoutedDecoderBlock if is_routed(j, spec.mod.every) else DecoderBlock)(spec, j)

        return (lambda spec, j: Block(spec, j)), decoder_block, Encoder, ModEncoderDecoder
    if spec.family == "length_reduction":
        return LengthReductionBlock, (lambda spec, j: DecoderBlock(spec, j)), ReducingEncoder, EncoderDecoder
    ffn = family_ffn(spec)
    return (lambda spec, j: Block(spec, j, mlp=ffn(spec, j))), \
        (lambda spec, j: DecoderBlock(spec, j, mlp=ffn(spec, j))), Encoder, EncoderDecoder


def build(spec) -> nn.Module:
    """The encoder-decoder reference of `spec` (its family's blocks in each stack)."""
    encoder_block, decoder_block, encoder, model = stacks(spec)
    return model(spec, encoder_block, decoder_block, encoder)


def encoder_inputs(spec, phase: str, batch: int, encoder_seq: int, generator: torch.Generator,
                   device: str = "cpu", dtype: Optional[torch.dtype] = None) -> dict:
    """RunState fields of an encoder-decoder's phase ({} for other models): the encoder's
    token and position ids [B, S_enc], or at decode the cross cache (per decoder layer
    keys and values [B, kv_heads, S_enc, d_head], random, as the self cache)."""
    if not spec.is_encoder_decoder:
        return {}
    if phase == "decode":
        if spec.family == "length_reduction":  # the cross cache holds the tokens leaving the encoder
            encoder_seq = int(encoder_output_tokens(spec, encoder_seq))
        shape = (batch, spec.kv_heads, encoder_seq, spec.d_head)
        cache = [tuple(torch.randn(shape, generator=generator).to(device=device, dtype=dtype) for _ in range(2))
                 for _ in range(spec.layers)]
        return {"cross_cache": cache}
    ids = torch.randint(0, spec.vocab, (batch, encoder_seq), generator=generator).to(device)
    return {"encoder_ids": ids, "encoder_positions": torch.arange(encoder_seq, device=device).repeat(batch, 1)}
