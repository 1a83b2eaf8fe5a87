"""A parallel layout: how one step's work is spread over GPUs, and which link
level each communication group uses.

Degrees (Megatron-LM's names): `tp` tensor parallel (heads and FFN columns
split; with `sequence_parallel` the token-wise ops between them too), `cp`
context parallel (the sequence split, keys and values gathered for
attention), `pp` pipeline stages (contiguous blocks), `dp` data parallel
(replicas; gradients reduced over dp * cp), `ep` expert parallel (each GPU
holds experts / ep of every MoE layer's routed experts, within the
data-parallel group). GPUs = tp * cp * dp * pp. `virtual_stages` v > 1: the
interleaved 1F1B schedule (Narayanan et al. 2021), each stage holding v chunks
of blocks / (pp v) blocks, chunk c on stage c mod pp. `zero` (0-3) shards the
optimizer state, gradients and weights over the data-parallel group
(Rajbhandari et al. 2020); `recompute` none / selective (the attention core,
Korthikanti et al. 2022) / full (every block's forward, once more before its
backward).

Rank order (Megatron's): tp fastest, then cp, then dp (ep inside dp), then
pp. A group whose ranks span at most one node of `gpus_per_node` GPUs (and
a whole number of groups fits a node) uses the scale-up link (NVLink, ICI),
any other group the scale-out link (its slowest):

    group   ranks              span (consecutive ranks)
    tp      tp                 tp
    cp      cp                 tp * cp
    ep      ep                 tp * cp * ep
    dp      dp * cp            tp * cp * dp        (dense parameters' gradients)
    edp     dp * cp / ep       tp * cp * dp        (routed experts' gradients)
    pp      2 (a send)         tp * cp * dp * pp
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from flopsim.errors import InputError, bad_value

RECOMPUTE = ("none", "selective", "full")
MAX_DEGREE = 2 ** 20


def within_node(span: int, gpus_per_node: int) -> bool:
    """Whether a group of `span` consecutive ranks stays within one node (and a whole number
    of such groups fills a node): it then uses the scale-up link."""
    return span <= gpus_per_node and gpus_per_node % span == 0


def _degree(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DEGREE:
        raise bad_value(name, value, f"must be a positive integer (at most {MAX_DEGREE:,})")
    return value


@dataclass(frozen=True)
class Layout:
    """One parallel layout (see the module docstring). `expert_load`: the busiest
    expert-parallel rank's routed (token, expert) pairs over the mean rank's (1:
    balanced); `stage`: the pipeline stage whose ops a sharded list holds (None: the last)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    cp: int = 1
    zero: int = 0
    recompute: str = "none"
    sequence_parallel: bool = False
    gpus_per_node: int = 8
    expert_load: float = 1.0
    stage: Optional[int] = None
    virtual_stages: int = 1  # the interleaved schedule's chunks a stage (Narayanan et al. 2021); 1: plain 1F1B

    @property
    def gpus(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    @property
    def trivial(self) -> bool:
        """One GPU doing everything: sharding changes nothing."""
        return self.gpus == 1 and self.recompute == "none" and self.expert_load == 1.0

    @property
    def token_split(self) -> int:
        """The ways token-wise ops (norms, residual adds) split over tp: tp with sequence parallelism, else 1."""
        return self.tp if self.sequence_parallel else 1

    @property
    def last_stage(self) -> int:
        return self.pp - 1 if self.stage is None else self.stage

    def group(self, name: str) -> tuple[int, int]:
        """(ranks, span) of a communication group (see the module docstring)."""
        tp, cp, dp, ep, pp = self.tp, self.cp, self.dp, self.ep, self.pp
        return {"tp": (tp, tp), "cp": (cp, tp * cp), "ep": (ep, tp * cp * ep), "dp": (dp * cp, tp * cp * dp),
                "edp": (dp * cp // ep, tp * cp * dp), "pp": (2 if pp > 1 else 1, tp * cp * dp * pp)}[name]

    def inside_node(self, span: int) -> bool:
        return within_node(span, self.gpus_per_node)

    def level(self, name: str) -> str:
        """'scale_up' or 'scale_out': the link level group `name` uses."""
        return "scale_up" if self.inside_node(self.group(name)[1]) else "scale_out"

    def describe(self) -> str:
        parts = [f"{k}{getattr(self, k)}" for k in ("tp", "cp", "pp", "dp", "ep") if getattr(self, k) > 1]
        if self.zero:
            parts.append(f"zero{self.zero}")
        if self.recompute != "none":
            parts.append(f"recompute {self.recompute}")
        if self.sequence_parallel and self.tp > 1:
            parts.append("sequence parallel")
        return ", ".join(parts) or "one GPU"


def make_layout(spec, phase: str, *, tp: int = 1, pp: int = 1, dp: int = 1, ep: int = 1, cp: int = 1,
                zero: int = 0, recompute="none", sequence_parallel: Optional[bool] = None,
                gpus_per_node: Optional[int] = None, expert_load: float = 1.0,
                stage: Optional[int] = None, virtual_stages: int = 1) -> Layout:
    """A validated Layout of `spec` for `phase` (one-line errors naming the field).
    `sequence_parallel` defaults to on in train with tp > 1 (Megatron's setting), off
    elsewhere (inference engines all-reduce); `gpus_per_node` to the hardware's domain."""
    tp, pp, dp, ep, cp = (_degree(n, v) for n, v in (("tp", tp), ("pp", pp), ("dp", dp), ("ep", ep), ("cp", cp)))
    if isinstance(zero, bool) or zero not in (0, 1, 2, 3):
        raise bad_value("zero", zero, "expected a ZeRO stage 0, 1, 2 or 3")
    if recompute is True or recompute is False:
        recompute = "full" if recompute else "none"
    if recompute not in RECOMPUTE:
        raise bad_value("recompute", recompute, "expected none, selective or full")
    if phase != "train" and (recompute != "none" or zero or dp > 1):
        field, value = ("recompute", recompute) if recompute != "none" else ("zero", zero) if zero else ("dp", dp)
        raise bad_value(field, value, f"applies to training; phase {phase} runs no backward pass")
    if spec.heads % tp:
        raise bad_value("tp", tp, f"does not divide the {spec.heads} attention heads of {spec.name}")
    if pp > spec.blocks:
        raise bad_value("pp", pp, f"exceeds the {spec.blocks} blocks of {spec.name}")
    if ep > 1:
        if spec.moe is None:
            raise bad_value("ep", ep, f"{spec.name} ({spec.family}) has no routed experts")
        if spec.moe.experts % ep:
            raise bad_value("ep", ep, f"does not divide the {spec.moe.experts} experts of {spec.name}")
        if phase == "train" and dp % ep:
            raise bad_value("ep", ep, f"does not divide dp {dp} (experts are sharded within the data-parallel group)")
    if cp > 1:
        _check_context_parallel(spec, phase, cp)
    if isinstance(expert_load, bool) or not isinstance(expert_load, (int, float)) or not 1 <= expert_load <= 1e6:
        raise bad_value("expert_load", expert_load, "must be a number >= 1 (busiest rank / mean rank)")
    if stage is not None and (isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < pp):
        raise bad_value("stage", stage, f"must be a pipeline stage 0 to {pp - 1}")
    virtual_stages = _degree("virtual_stages", virtual_stages)
    if virtual_stages > 1 and (pp == 1 or spec.blocks % (pp * virtual_stages)):
        raise bad_value("virtual_stages", virtual_stages, f"interleaving needs pp > 1 and pp * virtual_stages "
                                                          f"dividing the {spec.blocks} blocks (pp {pp})")
    node = _degree("gpus_per_node", gpus_per_node if gpus_per_node is not None else 8)
    sp = (phase == "train" and tp > 1) if sequence_parallel is None else bool(sequence_parallel)
    return Layout(tp=tp, pp=pp, dp=dp, ep=ep, cp=cp, zero=zero, recompute=recompute, sequence_parallel=sp,
                  gpus_per_node=node, expert_load=float(expert_load), stage=stage, virtual_stages=virtual_stages)


def _check_context_parallel(spec, phase: str, cp: int) -> None:
    """Context parallelism gathers plain keys and values: refuse what it does not cover."""
    if phase == "decode":
        raise bad_value("cp", cp, "context parallelism splits a sequence's tokens; decode has one per sequence")
    for what, present in (("multi-head latent attention", spec.mla is not None),
                          ("sparse QKV", getattr(spec, "sparse_qkv", None) is not None),
                          ("an encoder-decoder", spec.is_encoder_decoder)):
        if present:
            raise InputError(f"cp {cp}: context parallelism of {what} ({spec.name}) is not modelled; use cp 1")
