"""Reference multi-head latent attention (the spec's `mla` block; flopsim.families.mla).

`LatentAttention(spec)` replaces `Attention` in `Block` for a spec with `mla`; module
paths `block.{i}.attn.{q | q_a, q_norm, q_b}`, `.kv_a`, `.kv_norm`, `.kv_b`, `.out`.
It follows DeepSeek-V2's equations (arXiv:2405.04434, section 2.1) with a latent cache:
the cache of a layer is one [B, T, d_c + d_rope] tensor (the normalised latent and the
rotated shared key) in prefill and decode (`RunState.cache[layer][0]`).
- expanded: kv_b up-projects every key's latent; each head's key joins the shared
  rotary key (a copy), and each query's rotated part joins its latent part (a copy, as
  transformers' DeepSeek runs it); attention with d_qk-wide queries and keys and d_v-wide
  values;
- absorbed (decode with `mla.decode: absorbed`): q_nope times kv_b's key half per head,
  attention over the cached entries as one shared head (values: the latents), the output
  times kv_b's value half per head.
Attention follows `spec.attention_impl`: fused calls F.scaled_dot_product_attention
(torch 2.13 on the CPU runs its math path when value and query widths differ, so a
fused train step is counted as the explicit one there; flopsim counts the fused kernel
and the tests check it against torch's own sdpa_backward_flop_count); explicit runs
Q K^T, softmax and P V.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flopsim.torchref.model import RunState, attention_probabilities, make_norm, rope_qk


class LatentAttention(nn.Module):
    def __init__(self, spec):
        super().__init__()
        m = spec.mla
        self.spec, self.m = spec, m
        h, d_qk = spec.heads, m.d_nope + m.d_rope
        if m.q_rank is None:
            self.q = nn.Linear(spec.d_model, h * d_qk, bias=False)
        else:
            self.q_a = nn.Linear(spec.d_model, m.q_rank, bias=spec.bias)
            self.q_norm = make_norm(spec, m.q_rank)
            self.q_b = nn.Linear(m.q_rank, h * d_qk, bias=False)
        self.kv_a = nn.Linear(spec.d_model, m.kv_rank + m.d_rope, bias=spec.bias)
        self.kv_norm = make_norm(spec, m.kv_rank)
        self.kv_b = nn.Linear(m.kv_rank, h * (m.d_nope + m.d_v), bias=False)
        self.out = nn.Linear(h * m.d_v, spec.d_model, bias=spec.bias)

    def forward(self, x: torch.Tensor, state: RunState, layer: int) -> torch.Tensor:
        b, s, _ = x.shape
        m, h = self.m, self.spec.heads
        # the query and KV paths each get their own view of x, made just before its use: torch's
        # module tracker closes a module's backward when the gradient of its input is made, and
        # the engine runs that view's backward node in order of creation (latest first)
        xq = x.view_as(x)
        q = self.q(xq) if self.m.q_rank is None else self.q_b(self.q_norm(self.q_a(xq)))
        q = q.view(b, s, h, m.d_nope + m.d_rope).transpose(1, 2)  # [B, H, S, d_qk]
        xkv = x.view_as(x)
        latent, k_rot = self.kv_a(xkv).split([m.kv_rank, m.d_rope], dim=-1)
        latent = self.kv_norm(latent)
        q_rot, k_rot = rope_qk(q[..., m.d_nope:], k_rot.unsqueeze(1), state.positions)
        latent, k_rot, entries = self._cache(state, layer, latent, k_rot.squeeze(1))  # every key's
        if state.phase == "decode" and m.decode == "absorbed":
            o = self._absorbed(q[..., :m.d_nope], q_rot, entries)
        else:
            o = self._expanded(torch.cat([q[..., :m.d_nope], q_rot], dim=-1), latent, k_rot)
        return self.out(o.transpose(1, 2).reshape(b, s, h * m.d_v))

    def _cache(self, state: RunState, layer: int, latent: torch.Tensor, k_rot: torch.Tensor) -> tuple:
        """(latents [B, keys, d_c], rotary keys [B, keys, d_rope], the cache [B, keys, d_c +
        d_rope] or None) of every key: in prefill and decode the new tokens' written into the
        cache (decode: the preallocated buffer's last slots) and every key's read from it; in
        forward and train the new tokens' as they are (no cache)."""
        r = self.m.kv_rank
        if state.phase not in ("prefill", "decode"):
            return latent, k_rot, None
        s = latent.shape[1]
        if state.cache is not None:
            entries = state.cache[layer][0]
        else:
            entries = torch.empty(*latent.shape[:2], r + self.m.d_rope, dtype=latent.dtype, device=latent.device)
        entries[:, -s:, :r].copy_(latent)
        entries[:, -s:, r:].copy_(k_rot)
        state.new_cache.append((entries,))
        return entries[..., :r], entries[..., r:], entries

    def _expanded(self, q: torch.Tensor, latent: torch.Tensor, k_rot: torch.Tensor) -> torch.Tensor:
        m, h = self.m, self.spec.heads
        b, t, _ = latent.shape
        kv = self.kv_b(latent).view(b, t, h, m.d_nope + m.d_v)
        k_nope, v = kv.split([m.d_nope, m.d_v], dim=-1)
        k = torch.cat([k_nope, k_rot.unsqueeze(2).expand(b, t, h, m.d_rope)], dim=-1).transpose(1, 2)  # [B, H, T, d_qk]
        return self.core(q, k, v.transpose(1, 2))

    def _absorbed(self, q_nope: torch.Tensor, q_rot: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
        m, h = self.m, self.spec.heads
        w = self.kv_b.weight.view(h, m.d_nope + m.d_v, m.kv_rank)
        # one product per head over the batch's queries (decode: S = 1, so [H, B, .] is a view)
        per_head = q_nope.squeeze(2).transpose(0, 1)  # [H, B, d_nope]
        q_latent = torch.bmm(per_head, w[:, :m.d_nope]).transpose(0, 1).unsqueeze(2)  # [B, H, 1, d_c]: W_UK
        q = torch.cat([q_latent, q_rot], dim=-1)
        keys = entries.unsqueeze(1)  # [B, 1, T, d_c + d_rope]: one head shared by all
        o = self.core(q, keys, keys[..., :m.kv_rank])  # [B, H, 1, d_c]
        out = torch.bmm(o.squeeze(2).transpose(0, 1), w[:, m.d_nope:].transpose(1, 2))  # W_UV: [H, B, d_v]
        return out.transpose(0, 1).unsqueeze(2)  # [B, H, 1, d_v]

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        causal = self.spec.causal and q.shape[2] > 1  # one query attends to the whole cache
        if self.spec.attention_impl == "fused":
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])
        b, h, s, _ = q.shape
        probs = attention_probabilities(q, k, causal)  # [B, H, S, T]
        return (probs.view(b, k.shape[1], -1, k.shape[2]) @ v).view(b, h, s, -1)
