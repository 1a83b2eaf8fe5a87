"""Reference Mixture-of-Depths model (`family: mod`); see flopsim.families.mod.

Module paths: a routed block `block.{i}` has `router` (Linear(d_model, 1),
no bias) and, when predictor_hidden > 0, `predictor.up` / `predictor.down`
beside the dense block's `norm1`, `attn`, `norm2`, `mlp`.

forward / train / prefill: top-k = ceil(c * S) tokens per sequence by router
score, re-sorted into sequence order, gathered (with their positions, for
RoPE), run through the block's residual branch f (attention among the kept
tokens, FFN), and added back as x' = x + r * f (scatter-add). In train the
predictor (or, without one, the router) is fitted by BCE to the top-k
membership; `Reference.aux_loss` returns the sum, which run_phase adds to
the loss.

decode: the round(c * B) tokens (half up) of the batch whose decider (the
predictor, else the router) scores highest run the block -- what a
calibrated per-token decider runs in expectation, c of the tokens. (A fixed
threshold on an untrained decider's scores, all near sigmoid 0.5, would run
none below c = 1/2 and all above it.) The running tokens are gathered and
attend to the first round(c * (T - 1)) entries of the layer's cache (it
holds only the tokens that ran the block) plus themselves. flopsim counts
the expectation of a per-token decision: exact in FLOPs whenever c * B and
c * (T - 1) are whole numbers (and at c = 1).

An encoder-decoder's routed decoder block (flopsim.torchref.encoder_decoder.
RoutedDecoderBlock) passes the encoder's output (`memory`, the prefill's
cross cache list) to its kept tokens' branch, and at decode the running
sequences' rows of its cross cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flopsim.families.mod import is_routed, kept_tokens
from flopsim.ops.symbols import exact
from flopsim.torchref.bytes_counter import fused
from flopsim.torchref.model import ACTIVATIONS, Block, Reference, RunState


class AnchoredLinear(nn.Linear):
    """nn.Linear called as `lin(x, anchor)`: the anchor (its own weight) is
    ignored by the product and only tells torch's ModuleTracker when the module
    is left in backward (see Predictor)."""

    def forward(self, x: torch.Tensor, anchor: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


class Predictor(nn.Module):
    """The sampling predictor: d_model -> h -> 1 on a detached (stop-gradient)
    input, so its first product has no grad-input product in backward.

    FlopCounterMode attributes backward FLOPs with torch.utils.module_tracker,
    which leaves a module in backward once the gradients of its inputs that
    require grad are computed; a module fed only a detached tensor is never
    left, and every later backward op would be charged to it. So `up` and the
    predictor are called with `up.weight` as an extra (unused) input: they are
    left when that weight's gradient is computed, the last step of their
    backward. This changes no product."""

    def __init__(self, spec, hidden: int):
        super().__init__()
        self.up = AnchoredLinear(spec.d_model, hidden, bias=spec.bias)
        self.down = nn.Linear(hidden, 1, bias=spec.bias)
        self.act = ACTIVATIONS[spec.activation]

    def forward(self, x: torch.Tensor, anchor: torch.Tensor | None = None) -> torch.Tensor:
        return self.down(self.act(self.up(x.detach(), self.up.weight))).squeeze(-1)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Scores [B, S] of the (detached) block input x."""
        return self(x.detach(), self.up.weight)


class RoutedBlock(Block):
    """A dense block whose residual branch runs only on the router's top-k tokens.
    `mlp` may be any FFN module (MoDE: an MoE FFN)."""

    def __init__(self, spec, layer: int, mlp=None):
        super().__init__(spec, layer, mlp=mlp)
        self.capacity = exact(spec.mod.capacity)
        self.router = nn.Linear(spec.d_model, 1, bias=False)
        hidden = spec.mod.predictor_hidden
        self.predictor = Predictor(spec, hidden) if hidden > 0 else None
        self._aux = None

    def branch(self, x: torch.Tensor, state: RunState) -> torch.Tensor:
        """f(x): the block's residual branch (attention output + MLP output)."""
        h = self.attn(self.norm1(x), state, self.layer)
        return h + self.mlp(self.norm2(x + h))

    def forward(self, x: torch.Tensor, state: RunState) -> torch.Tensor:
        r = self.router(x).squeeze(-1)  # [B, S]
        p = self.predictor.score(x) if self.predictor is not None else None
        if state.phase == "decode":
            return self._decode(x, r, p, state)
        b, s, d = x.shape
        k = int(kept_tokens(self.capacity, s))
        idx = r.topk(k, dim=-1).indices.sort(dim=-1).values  # [B, k], sequence order
        rows = idx.unsqueeze(-1).expand(b, k, d)
        xs = x.gather(1, rows)
        rs = r.gather(1, idx).unsqueeze(-1)
        positions = state.positions.gather(1, idx) if self.spec.positions == "rope" else None  # only RoPE needs them
        sub = RunState(state.phase, positions, cache=state.cache, new_cache=state.new_cache, memory=state.memory,
                       new_cross_cache=state.new_cross_cache)
        f = self.branch(xs, sub)
        out = x.scatter_add(1, rows, rs * f)
        if self.training:
            with fused("bce") as region:  # one kernel: flopsim's {decider}.loss
                target = torch.zeros_like(r).scatter(1, idx, 1.0)
                self._aux = F.binary_cross_entropy_with_logits(p if p is not None else r, target)
                region.basis(r)
        return out

    def _decode(self, x, r, p, state: RunState) -> torch.Tensor:
        score = p if p is not None else r  # [B, 1]
        running = decode_runs(self.capacity, score.shape[0])
        if running == 0:
            return x
        run = score[:, 0].topk(running).indices.sort().values
        cache = None
        if state.cache is not None and state.cache[self.layer] is not None:
            k, v = state.cache[self.layer]
            keep = round(float(self.capacity) * (k.shape[2] - 1))  # cached entries; one slot for the new token
            cache = list(state.cache)
            cache[self.layer] = (k[run, :, :keep + 1], v[run, :, :keep + 1])
        cross = None
        if state.cross_cache is not None:  # an encoder-decoder: the running sequences' cross cache
            cross = list(state.cross_cache)
            cross[self.layer] = tuple(t[run] for t in cross[self.layer])
        positions = state.positions[run] if self.spec.positions == "rope" else None  # only RoPE needs them
        sub = RunState(state.phase, positions, cache=cache, new_cache=state.new_cache, cross_cache=cross)
        xs = x[run]
        f = self.branch(xs, sub)
        return x.index_add(0, run, r[run].unsqueeze(-1) * f)


def decode_runs(capacity, batch: int) -> int:
    """Tokens of a decode batch that run a routed block: c * B rounded half up."""
    return int(exact(capacity) * batch + exact(1) / 2)  # floor(c B + 1/2), exact in rationals


def aux_loss(blocks) -> torch.Tensor:
    """The sum of the routed blocks' decider losses of the last train step (then cleared)."""
    losses = [blk._aux for blk in blocks if getattr(blk, "_aux", None) is not None]
    for blk in blocks:
        if hasattr(blk, "_aux"):
            blk._aux = None
    return sum(losses) if losses else torch.zeros(())


class ModReference(Reference):
    def aux_loss(self) -> torch.Tensor:
        return aux_loss(self.block)


def block_factory(spec, i: int, mlp_factory=None):
    """Routed or dense block i; `mlp_factory(spec, i)` builds the FFN (MoDE)."""
    mlp = mlp_factory(spec, i) if mlp_factory is not None else None
    if is_routed(i, spec.mod.every):
        return RoutedBlock(spec, i, mlp=mlp)
    return Block(spec, i, mlp=mlp)


def build(spec) -> nn.Module:
    return ModReference(spec, block_factory=block_factory)
