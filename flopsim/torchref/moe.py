"""Reference Mixture-of-Experts model (`family: moe`); see flopsim.families.moe.

`MoEFFN(spec, layer)` is an FFN module for `Block(spec, i, mlp=MoEFFN(...))`;
the block registers it as `moe` (its `module_name`), so module paths are
`block.{i}.moe.router` (Linear(d_model, E), no bias),
`block.{i}.moe.experts.{gate_up|up,down}` (stacked expert weights, one
`GroupedLinear` each) and, with shared experts,
`block.{i}.moe.shared.{gate_up|up,down}` (one MLP of width
shared_experts * d_expert).

Routing runs for real (softmax over the router logits, or a sigmoid, then the
top-k with DeepSeek's options: `MoEFFN.choose`):
- token_choice, dropless: the N * k (token, expert) pairs are sorted by
  expert and each expert multiplies its own rows (one mm/addmm per expert,
  an expert that got no row included: flopsim reads every expert's weights
  outside decode), as one grouped GEMM (a fused region): N * k expert passes
  whatever the routing.
- token_choice with a capacity factor: C = ceil(c * k * N / E) slots per
  expert (exact rational arithmetic, as flopsim's), filled choice-major;
  pairs over capacity are dropped; an [E, C, d] buffer (empty slots point at
  a zero row) runs through one bmm / baddbmm per projection.
- expert_choice: each expert takes its top C = ceil(c * N / E) tokens by
  router probability; [E, C, d] through bmm.
- moe.kernel gather (dropless token choice, inference): the pairs in token
  order, each row multiplied by a copy of its expert's weights
  (`weight[expert]`, then one bmm per projection). gather_fused runs the
  same eager code (a compiler would fuse the indexing; the FLOPs are equal).
Outputs are weighted by the router probability of the pair and
scatter-added (index_add) into the N x d_model output.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from flopsim.families.moe import is_moe_layer
from flopsim.torchref.bytes_counter import eager_joins, fused
from flopsim.torchref.model import ACTIVATIONS, MLP, Block, Reference, gate_times_up, gated_activation


class GroupedLinear(nn.Module):
    """`experts` independent Linear(d_in, d_out) layers with stacked weights [E, d_in, d_out]:
    each expert computes x @ W_e, so its weight gradient comes out in the parameter's own
    layout, as a grouped GEMM writes it. (Stored as nn.Linear stores one, [E, d_out, d_in]
    and used transposed, the gradient came out transposed and autograd copied it into the
    parameter's layout every step: a layout copy flopsim's kernels do not make, 66 ms of a
    380 ms CPU train step of the full suite's capacity MoE.)

    forward(x): x [E, C, d_in] -> [E, C, d_out] as one bmm (baddbmm with bias).
    forward(x, counts): x [sum(counts), d_in] sorted by expert -> one
    product per expert on its counts[e] rows. `loop` False (moe.kernel grouped):
    the loop is marked as one grouped GEMM writing every expert's rows into one
    output (flopsim counts one kernel). `loop` True (moe.kernel loop): the loop as
    it runs, the copies it makes included: the experts' outputs joined (cat), and in
    backward their input gradients joined (split's backward) and their weight
    gradients stacked into the parameter's (unbind's backward)."""

    def __init__(self, experts: int, d_in: int, d_out: int, bias: bool, loop: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, d_in, d_out) / math.sqrt(d_in))
        self.bias = nn.Parameter(torch.zeros(experts, d_out)) if bias else None
        self.loop = loop

    def forward(self, x: torch.Tensor, counts: Optional[list] = None) -> torch.Tensor:
        if counts is None:
            if self.bias is None:
                return torch.bmm(x, self.weight)
            return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)
        if self.loop:
            with eager_joins():  # the loop's input and weight gradients are joined by copies
                return self._loop(x, counts)
        with fused("grouped_gemm") as region:  # one kernel writing every expert's rows into one output
            y = self._loop(x, counts)
            region.basis(y)
        return y

    def _loop(self, x: torch.Tensor, counts: list) -> torch.Tensor:
        biases = self.bias.unbind(0) if self.bias is not None else [None] * len(counts)
        outs = [chunk @ w if b is None else torch.addmm(b, chunk, w)
                for chunk, w, b in zip(x.split(counts, dim=0), self.weight.unbind(0), biases)]
        return torch.cat(outs, dim=0)

    def gathered(self, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """x [P, d_in], expert [P]: each row times a copy of its expert's weight (moe.kernel gather)."""
        w = self.weight[expert]  # [P, d_in, d_out]: the copy
        y = torch.bmm(x.unsqueeze(1), w).squeeze(1)
        return y if self.bias is None else y + self.bias[expert]


class Experts(nn.Module):
    """E stacked expert FFNs (mlp: up, down; gated: gate_up fused, down)."""

    def __init__(self, spec, experts: int, d_expert: int):
        super().__init__()
        self.gated = spec.ffn == "gated"
        loop = spec.moe.kernel == "loop"
        if self.gated:
            self.gate_up = GroupedLinear(experts, spec.d_model, 2 * d_expert, spec.bias, loop)
        else:
            self.up = GroupedLinear(experts, spec.d_model, d_expert, spec.bias, loop)
        self.down = GroupedLinear(experts, d_expert, spec.d_model, spec.bias, loop)
        self.act = ACTIVATIONS[spec.activation]
        self.unfused = spec.act_impl == "unfused"

    def forward(self, x: torch.Tensor, counts: Optional[list] = None) -> torch.Tensor:
        if self.gated:
            h = gated_activation(self.act, self.gate_up(x, counts), self.unfused)
        else:
            h = self.act(self.up(x, counts))
        return self.down(h, counts)

    def gathered(self, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """moe.kernel gather: every (token, expert) row through copies of its expert's weights."""
        if self.gated:
            gate, up = self.gate_up.gathered(x, expert).chunk(2, dim=-1)
            h = gate_times_up(self.act, gate, up)
        else:
            h = self.act(self.up.gathered(x, expert))
        return self.down.gathered(h, expert)


def exact_fraction(value) -> Fraction:
    """0.1 -> 1/10, as flopsim.ops.symbols.exact does (so ceilings agree)."""
    return Fraction(str(value)) if isinstance(value, float) else Fraction(value)


class MoEFFN(nn.Module):
    """The MoE FFN of block `layer` (see the module docstring).

    noop_experts: extra router outputs that run nothing (MoDE "integrated");
    needs padded slots. capacity: an int, or `capacity(tokens) -> slots`,
    overriding the spec's capacity factor. name: the module name the block
    registers it under (`module_name`). Mirrors flopsim.families.moe.moe_ffn.
    """

    def __init__(self, spec, layer: int, *, noop_experts: int = 0,
                 capacity: Union[None, int, Callable[[int], int]] = None, name: str = "moe"):
        super().__init__()
        moe = spec.moe
        self.spec, self.layer, self.module_name = spec, layer, name
        self.experts_n, self.top_k = moe.experts, moe.top_k
        self.noop_experts = noop_experts
        self.routing = moe.routing
        self.capacity = capacity
        if noop_experts and capacity is None and moe.capacity_factor is None:
            raise ValueError(f"moe: noop_experts {noop_experts} needs a capacity_factor")
        d_expert = moe.d_expert or spec.d_ff
        self.router = nn.Linear(spec.d_model, moe.experts + noop_experts, bias=moe.router_bias)
        if moe.selection_bias:  # a buffer, not a parameter (DeepSeek-V3 updates it outside the gradient)
            self.register_buffer("selection_bias", torch.randn(moe.experts + noop_experts) * 0.1)
        self.experts = Experts(spec, moe.experts, d_expert)
        self.shared = MLP(spec, d_ff=moe.shared_experts * d_expert) if moe.shared_experts else None
        self.shared_gate = nn.Linear(spec.d_model, 1, bias=False) if moe.shared_expert_gate else None

    def slots(self, tokens: int) -> Optional[int]:
        """Slots per expert C (None: dropless), as flopsim.families.moe.capacity_slots."""
        if self.capacity is not None:
            return int(self.capacity(tokens) if callable(self.capacity) else self.capacity)
        cf = self.spec.moe.capacity_factor
        if cf is None:
            return None
        routed = self.experts_n + self.noop_experts if self.noop_experts else self.experts_n
        if self.routing == "expert_choice":
            return math.ceil(exact_fraction(cf) * tokens / routed)
        return math.ceil(exact_fraction(cf) * self.top_k * tokens / routed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        n, d = x.shape
        # the router and the shared experts each get their own view of x: torch's module
        # tracker closes a module's backward when its input's gradient is complete, which
        # for a tensor shared with other modules waits for their backward too
        logits = self.router(x.view_as(x))  # [N, E (+ noop)]
        probs = logits.softmax(dim=-1) if self.spec.moe.gate == "softmax" else logits.sigmoid()
        slots = self.slots(n)
        if self.routing == "expert_choice":
            out = self._expert_choice(x, probs, slots)
        elif slots is None and self.spec.moe.kernel in ("gather", "gather_fused"):
            out = self._gathered(x, probs)
        elif slots is None:
            out = self._dropless(x, probs)
        else:
            out = self._capacity(x, probs, slots)
        if self.shared is not None:
            shared = self.shared(x.view_as(x))
            if self.shared_gate is not None:  # Qwen2-MoE's sigmoid gate on the shared experts
                shared = torch.sigmoid(self.shared_gate(x.view_as(x))) * shared
            out = out + shared
        return out.reshape(shape)

    def choose(self, probs):
        """(weights, experts) [N, k] of token choice: the top k by score (plus the selection
        bias), among the experts of each token's best `top_groups` groups; the weights are
        the unbiased scores, normalised and scaled as the spec says (flopsim.families.moe.router)."""
        moe = self.spec.moe
        scores = probs + self.selection_bias if moe.selection_bias else probs
        if moe.groups > 1:
            n = scores.shape[0]
            grouped = scores.view(n, moe.groups, -1)
            best = grouped.topk(2, dim=-1)[0].sum(-1) if moe.gate == "sigmoid" else grouped.amax(-1)
            keep = torch.zeros_like(best).scatter_(1, best.topk(moe.top_groups, dim=-1)[1], 1.0)
            scores = grouped.masked_fill(keep.unsqueeze(-1) == 0, float("-inf")).view(n, -1)
        if scores is probs:
            weights, chosen = probs.topk(self.top_k, dim=-1)
        else:  # chosen by the biased or masked scores, weighted by the scores themselves
            chosen = scores.topk(self.top_k, dim=-1)[1]
            weights = probs.gather(1, chosen)
        if moe.normalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights * moe.scale if moe.scale != 1 else weights, chosen

    def _dropless(self, x, probs):
        n, d = x.shape
        weights, chosen = self.choose(probs)  # [N, k]
        flat_e = chosen.reshape(-1)
        order = flat_e.argsort(stable=True)
        token = order // self.top_k  # pair i is token i // k's choice i % k
        counts = torch.bincount(flat_e, minlength=self.experts_n).tolist()
        y = self.experts(x[token], counts)  # [N * k, d], sorted by expert
        y = y * weights.reshape(-1)[order].unsqueeze(-1)
        return x.new_zeros(n, d).index_add(0, token, y)

    def _gathered(self, x, probs):
        """moe.kernel gather: pairs in token order, each copying its expert's weights."""
        n, d = x.shape
        weights, chosen = self.choose(probs)  # [N, k]
        token = torch.arange(n, device=x.device).repeat_interleave(self.top_k)
        y = self.experts.gathered(x[token], chosen.reshape(-1))  # [N * k, d]
        y = y * weights.reshape(-1).unsqueeze(-1)
        return x.new_zeros(n, d).index_add(0, token, y)

    def _capacity(self, x, probs, slots):
        n, d = x.shape
        E = self.experts_n
        weights, chosen = self.choose(probs)  # [N, k]
        index, w = self._slots(chosen, weights, n, slots)
        y = self.experts(x[index].view(E, slots, d)).reshape(E * slots, d)
        y = y * w.unsqueeze(-1)
        return x.new_zeros(n, d).index_add(0, index, y)

    def _slots(self, chosen, weights, n: int, slots: int):
        """The token index [E * C] and combination weight [E * C] of every slot, as one
        kernel (flopsim's {p}.positions): pairs are placed choice-major (every first
        choice before any second) at their rank among their expert's pairs (a cumsum of
        the one-hot); pairs over capacity, or routed to a no-op expert, are dropped. An
        empty slot runs token n - 1 with weight 0 (adding nothing back)."""
        E, k = self.experts_n, self.top_k
        total = E * slots
        with fused("slots") as region:
            flat_e = chosen.t().reshape(-1)
            flat_w = weights.t().reshape(-1)
            token = torch.arange(n, device=chosen.device).repeat(k)
            onehot = F.one_hot(flat_e, E + self.noop_experts)
            position = (onehot.cumsum(0) * onehot).sum(-1) - 1  # slot within the expert
            keep = (position < slots) & (flat_e < E)  # over capacity, or a no-op expert: skip
            slot = torch.where(keep, flat_e * slots + position, total)  # dropped pairs: a spare slot
            index = torch.full((total + 1,), n - 1, dtype=torch.long, device=chosen.device).index_put_((slot,), token)[:total]
            w = flat_w.new_zeros(total + 1).index_put_((slot,), flat_w)[:total]
            region.basis(onehot)
        return index, w

    def _expert_choice(self, x, probs, slots):
        n, d = x.shape
        E = self.experts_n
        w, index = probs[:, :E].t().topk(slots, dim=-1)  # [E, C]: each expert's top C tokens
        index = index.reshape(-1)
        y = self.experts(x[index].view(E, slots, d)).reshape(E * slots, d)
        y = y * w.reshape(-1, 1)
        return x.new_zeros(n, d).index_add(0, index, y)


def ffn(spec, i: int) -> Optional[nn.Module]:
    """Block i's FFN: an MoEFFN in MoE layers, None (the block's dense MLP) elsewhere; an
    encoder-decoder asks per stack, i counting blocks within it (flopsim.torchref.encoder_decoder)."""
    return MoEFFN(spec, i) if is_moe_layer(spec, i) else None


def build(spec) -> nn.Module:
    """The MoE reference: Block(spec, i, mlp=MoEFFN(spec, i)) in MoE layers, dense elsewhere."""
    return Reference(spec, block_factory=lambda spec, i: Block(spec, i, mlp=ffn(spec, i)))
