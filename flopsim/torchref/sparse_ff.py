"""Reference Scaling Transformers model (`family: sparse_ff`); see
flopsim.families.sparse_ff for the conventions this module runs.

Module paths: `block.{i}.mlp.controller.c1` (Linear(d_model, d_lowrank), no
bias), `block.{i}.mlp.controller.c2` (Linear(d_lowrank, d_ff)),
`block.{i}.mlp.up` or `.gate_up`, `block.{i}.mlp.down` (`GatheredLinear`:
Linear weights that run whole in training and gathered per token at
inference, one torch.bmm over the gathered weights). Sparse QKV is every
reference's (flopsim.torchref.model.SparseQKV).

Training (`model.train()`) runs trax's masked dense path: Gumbel noise on the
per-block log-softmax, a straight-through one-hot mask multiplying the
activation; eval (forward, prefill, decode) takes the argmax per block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flopsim.torchref.bytes_counter import fused
from flopsim.torchref.model import ACTIVATIONS, Block, Reference, gated_activation

GUMBEL_TEMPERATURE = 0.1  # trax SparseFF's default


def gumbel_mask(logits: torch.Tensor) -> torch.Tensor:
    """trax's straight-through Gumbel-softmax mask over logits [..., block_size]: the
    one-hot of the argmax of the noisy log-probabilities forward, the probabilities'
    gradient backward. Run eagerly it is a chain of about a dozen kernels, among them a
    random draw (serial on a CPU); flopsim.calibrate times this function as the cost of
    flopsim's one-kernel op (primitives.gumbel_mask, variant "gumbel")."""
    log_mask = logits.log_softmax(dim=-1)
    mask = log_mask.exp()
    u = torch.rand_like(mask).clamp(1e-6, 1 - 1e-6)
    choice = (log_mask - torch.log(-torch.log(u)) * GUMBEL_TEMPERATURE).argmax(dim=-1)
    return F.one_hot(choice, logits.shape[-1]).to(mask.dtype) + mask - mask.detach()  # straight-through


class GatheredLinear(nn.Module):
    """A Linear(d_in, d_out) that at inference uses only some units per token:
    `select="out"` output units, `select="in"` input units. The weight is
    stored unit-major, as trax stores W1 [d_model, d_ff] and W2 [d_ff, d_model]
    for its sparse FF: [d_out, d_in] for "out", [d_in, d_out] for "in", so each
    token's units are contiguous rows."""

    def __init__(self, d_in: int, d_out: int, bias: bool, select: str):
        super().__init__()
        self.select = select
        shape = (d_out, d_in) if select == "out" else (d_in, d_out)
        self.weight = nn.Parameter(torch.randn(*shape) / math.sqrt(d_in))
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None

    def forward(self, x: torch.Tensor, units: torch.Tensor | None = None) -> torch.Tensor:
        """x [n, d_in] (or [n, units] for select "in"); units [n, u] indices, None: dense."""
        if units is None:
            weight = self.weight if self.select == "out" else self.weight.t()
            return F.linear(x, weight, self.bias)
        if self.select == "out":
            w = self.weight[units]  # [n, u, d_in]
            y = torch.bmm(x.unsqueeze(1), w.transpose(1, 2)).squeeze(1)  # [n, u]
            return y if self.bias is None else y + self.bias[units]
        w = self.weight[units]  # [n, u, d_out], contiguous rows
        y = torch.bmm(x.unsqueeze(1), w).squeeze(1)  # [n, d_out]
        return y if self.bias is None else y + self.bias


class Controller(nn.Module):
    def __init__(self, spec):
        super().__init__()
        sf = spec.sparse_ff
        self.c1 = nn.Linear(spec.d_model, sf.d_lowrank, bias=False)
        self.c2 = nn.Linear(sf.d_lowrank, spec.d_ff, bias=spec.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(self.c1(x))


class SparseFF(nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.n = spec.sparse_ff.block_size
        self.blocks = spec.d_ff // self.n
        self.gated = spec.ffn == "gated"
        self.controller = Controller(spec)
        if self.gated:
            self.gate_up = GatheredLinear(spec.d_model, 2 * spec.d_ff, spec.bias, "out")
        else:
            self.up = GatheredLinear(spec.d_model, spec.d_ff, spec.bias, "out")
        self.down = GatheredLinear(spec.d_ff, spec.d_model, spec.bias, "in")
        self.act = ACTIVATIONS[spec.activation]

    def _hidden(self, x: torch.Tensor, units=None) -> torch.Tensor:
        if self.gated:
            if units is not None:
                units = torch.cat([units, units + self.spec.d_ff], dim=1)
            return gated_activation(self.act, self.gate_up(x, units), self.spec.act_impl == "unfused")
        return self.act(self.up(x, units))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        # the controller and the FFN each get their own view of x, so that in
        # backward torch's module tracker leaves the FFN before the controller runs
        n = x.numel() // shape[-1]
        logits = self.controller(x.reshape(n, shape[-1])).view(n, self.blocks, self.n)
        x = x.reshape(n, shape[-1])
        if self.training:
            with fused("gumbel_mask") as region:  # one kernel: flopsim's mlp.controller.mask
                quant = gumbel_mask(logits)
                region.basis(quant)
            y = self.down(self._hidden(x) * quant.view(n, -1))
        else:
            units = logits.argmax(dim=-1) + torch.arange(self.blocks, device=x.device) * self.n  # [n, d_ff / N]
            y = self.down(self._hidden(x, units), units)
        return y.view(shape)


def ffn(spec, i: int) -> nn.Module:
    """Block i's FFN (every block's: a SparseFF); also each stack's of an encoder-decoder."""
    return SparseFF(spec)


def make_block(spec, i: int) -> Block:
    return Block(spec, i, mlp=ffn(spec, i))


def build(spec) -> nn.Module:
    return Reference(spec, block_factory=make_block)
