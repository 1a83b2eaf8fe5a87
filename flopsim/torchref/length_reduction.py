"""Reference token-dropping model (`family: length_reduction`); see
flopsim.families.length_reduction for the conventions this module runs.

Module paths: the dense block's, plus `block.{l}.predictor.fc1` / `.fc2`
(or `.fc` when predictor_hidden is 0) for adapler and tr_bert. For PoWER-BERT
and LTP, `block.{l}.attn` runs the explicit attention path and keeps its
probabilities; `block.{l}` sums them into each token's significance. At
inference each block selects the best-scored tokens
for the next ([CLS] first and the survivors in order, their positions too);
in training it multiplies the hidden states by a sigmoid of the scores.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from flopsim.families.length_reduction import ATTENTION_SCORED, kept_tokens, selects
from flopsim.torchref.bytes_counter import fused
from flopsim.torchref.model import Attention, Block, Reference, RunState


class ScoredAttention(Attention):
    """Explicit attention (Q K^T, softmax, P V) that keeps the probabilities
    [B, H, queries, keys] in `self.probs` for the significance scores."""

    def probabilities(self, q: torch.Tensor, k: torch.Tensor, is_causal: bool, bias=None) -> torch.Tensor:
        self.probs = super().probabilities(q, k, is_causal, bias=bias)
        return self.probs


class Predictor(nn.Module):
    """AdapLeR's contribution predictor: d_model -> h -> 1 (GELU), softmax over tokens."""

    def __init__(self, spec):
        super().__init__()
        h = spec.length_reduction.predictor_hidden
        if h:
            self.fc1 = nn.Linear(spec.d_model, h, bias=spec.bias)
            self.fc2 = nn.Linear(h, 1, bias=spec.bias)
        else:
            self.fc = nn.Linear(spec.d_model, 1, bias=spec.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.fc2(F.gelu(self.fc1(x))) if hasattr(self, "fc1") else self.fc(x)
        return s.squeeze(-1).softmax(dim=-1)  # [B, tokens]


class LengthReductionBlock(Block):
    def __init__(self, spec, layer: int):
        super().__init__(spec, layer)
        if spec.length_reduction.method in ATTENTION_SCORED:
            self.attn = ScoredAttention(spec)
        else:
            self.predictor = Predictor(spec)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """[B, tokens] scores of the tokens that ran this block."""
        if hasattr(self, "predictor"):
            return self.predictor(x)
        return self.attn.probs.sum(dim=(1, 2))  # attention received: over heads and queries

    def forward(self, x: torch.Tensor, state: RunState, keep_next: Optional[int] = None) -> torch.Tensor:
        x = super().forward(x, state)
        scores = self.score(x)
        if self.training:  # soft removal
            with fused("soft_mask") as region:  # one kernel: flopsim's block.{l}.soft_mask
                mask = torch.sigmoid(scores * scores.shape[-1] - 1)
                region.basis(mask)
            return x * mask.unsqueeze(-1)
        if keep_next is None:
            return x
        scores = scores.clone()
        scores[:, 0] = float("inf")  # [CLS] is always kept
        idx = scores.topk(keep_next, dim=-1).indices.sort(dim=-1).values  # survivors in order
        if self.spec.positions == "rope":  # only RoPE reads positions past the embeddings
            state.positions = state.positions.gather(1, idx)
        return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class LengthReductionReference(Reference):
    def forward(self, ids: torch.Tensor, state: RunState) -> torch.Tensor:
        x = self.embed(ids, state)
        kept = [int(k) for k in kept_tokens(self.spec, ids.shape[1])]
        select = selects(self.spec)
        for i, blk in enumerate(self.block):
            x = blk(x, state, kept[i + 1] if select[i] else None)
        if self.spec.norm_position == "pre":
            x = self.final_norm(x)
        return self.head(x, state.phase)


def build(spec) -> nn.Module:
    return LengthReductionReference(spec, block_factory=lambda spec, i: LengthReductionBlock(spec, i))
